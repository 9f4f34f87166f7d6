//! Routes by configuration: which transport carries which events, and how
//! subscriptions to them are dispatched.
//!
//! A [`Routing`] is read from a TOML file, from the `SEAMBUS_ROUTES`
//! environment variable, or built in code, and handed to
//! [`BusBuilder::routing`](crate::BusBuilder::routing). Moving a flow from
//! in-process to a broker, or from inline to queued, is then a change of
//! configuration, not of code.
//!
//! # The TOML form
//!
//! Routes live in the `[routes]` table; other tables of the same file are
//! ignored, so an application can keep its own settings next to them.
//!
//! ```toml
//! [routes]
//! # The default route: every event no other route names.
//! "*" = { transport = "in-process", dispatch = "queued" }
//! # One module's events, on a broker.
//! "shipments.*" = "nats"
//! # One event, on a broker.
//! "orders.order_confirmed" = { transport = "nats" }
//! ```
//!
//! A pattern is an exact event name, a prefix ending in `.*`, or `*` for
//! the default route. A value is a transport name, or a table with
//! `transport` and/or `dispatch` (`"queued"` or `"inline"`).
//!
//! # The environment form
//!
//! `SEAMBUS_ROUTES` holds the same rules as `pattern=transport[:dispatch]`,
//! separated by commas, semicolons or new lines:
//!
//! ```text
//! SEAMBUS_ROUTES='*=in-process:inline, shipments.*=nats, orders.order_confirmed=nats'
//! ```
//!
//! When it is set, it replaces the routes of the file (it does not merge with
//! them), so what runs is always one readable list.
//!
//! # Rules that are refused
//!
//! Two patterns that can match the same event name (`orders.*` and
//! `orders.order_placed`, or the same pattern twice) are an error: every
//! event has at most one route, and reading the list tells which. A
//! transport name the program did not register is an error when the bus is
//! built.

use std::fmt;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::event::validate_name;
use crate::transport::Dispatch;

/// The environment variable [`Routing::from_env`] reads.
pub const ROUTES_ENV: &str = "SEAMBUS_ROUTES";

/// The pattern of the default route.
pub const DEFAULT_PATTERN: &str = "*";

/// One rule: events matching `pattern` go to `transport` (or the default
/// transport), dispatched as `dispatch` (or as the subscription says).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `*`, an exact event name, or a `prefix.*`.
    pub pattern: String,
    /// The transport's name; `None` keeps the default transport.
    pub transport: Option<String>,
    /// The dispatch of subscriptions to matching events; `None` leaves it to
    /// the subscription (queued unless it says otherwise).
    pub dispatch: Option<Dispatch>,
}

impl Rule {
    /// A rule sending `pattern` to `transport`.
    pub fn new(pattern: impl Into<String>, transport: impl Into<String>) -> Self {
        Self {
            pattern: pattern.into(),
            transport: Some(transport.into()),
            dispatch: None,
        }
    }

    /// Sets the dispatch of matching subscriptions.
    pub fn with_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = Some(dispatch);
        self
    }

    /// Whether this is the default route (`*`).
    pub fn is_default(&self) -> bool {
        self.pattern == DEFAULT_PATTERN
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}",
            self.pattern,
            self.transport.as_deref().unwrap_or("")
        )?;
        match self.dispatch {
            Some(Dispatch::Inline) => f.write_str(":inline"),
            Some(_) => f.write_str(":queued"),
            None => Ok(()),
        }
    }
}

/// A checked list of routing [`Rule`]s.
///
/// ```
/// use seambus::routing::Routing;
/// use seambus::{Bus, Dispatch, InProcessTransport};
///
/// let routing = Routing::from_toml_str(r#"
///     [routes]
///     "*" = { dispatch = "inline" }
///     "shipments.*" = "queue"
/// "#)?;
/// assert_eq!(routing.transports(), ["queue"]);
///
/// let bus = Bus::builder()
///     .transport("queue", InProcessTransport::default())
///     .routing(&routing)
///     .build()?;
/// assert_eq!(bus.route_of("shipments.order_shipped"), "queue");
/// assert_eq!(bus.route_of("orders.order_placed"), "in-process");
/// # Ok::<(), seambus::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    rules: Vec<Rule>,
}

impl Routing {
    /// Checks `rules`: valid patterns and transport names, no overlaps.
    pub fn new(rules: impl IntoIterator<Item = Rule>) -> Result<Self> {
        let rules: Vec<Rule> = rules.into_iter().collect();
        for rule in &rules {
            check_pattern(&rule.pattern)?;
            if let Some(t) = &rule.transport {
                check_transport_name(t)?;
            }
        }
        for (i, a) in rules.iter().enumerate() {
            for b in &rules[i + 1..] {
                if overlap(&a.pattern, &b.pattern) {
                    return Err(config(format!(
                        "routes `{}` and `{}` overlap: an event name may match only one route",
                        a.pattern, b.pattern
                    )));
                }
            }
        }
        Ok(Self { rules })
    }

    /// The rules, in the order given (a TOML file's order).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether there is no rule (everything on the in-process default).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The transport names the rules use, each once, in order: the
    /// transports the program must create.
    pub fn transports(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for name in self.rules.iter().filter_map(|r| r.transport.as_deref()) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// The rule whose pattern matches `event_name` (not the default rule).
    pub fn rule_for(&self, event_name: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| !r.is_default() && matches(&r.pattern, event_name))
    }

    /// The default rule (`*`), if any.
    pub fn default_rule(&self) -> Option<&Rule> {
        self.rules.iter().find(|r| r.is_default())
    }

    /// Reads the `[routes]` table of a TOML document (other tables are
    /// ignored). A document without one gives no rule.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| config(format!("routing TOML: {}", e.message())))?;
        let Some(routes) = doc.get("routes") else {
            return Ok(Self::default());
        };
        let routes = routes
            .as_table()
            .ok_or_else(|| config("`routes` must be a table of pattern = transport"))?;
        let mut rules = Vec::with_capacity(routes.len());
        for (pattern, value) in routes {
            rules.push(rule_from_toml(pattern, value)?);
        }
        Self::new(rules)
    }

    /// Reads a TOML file; see [`Routing::from_toml_str`].
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read routing file {}", path.display()),
            )
            .with_source(e)
        })?;
        Self::from_toml_str(&text).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("{}: {}", path.display(), e.message()),
            )
        })
    }

    /// Parses the environment form: `pattern=transport[:dispatch]` rules
    /// separated by `,`, `;` or new lines. The transport may be left empty
    /// (`*=:inline`) to change only the dispatch.
    pub fn parse_env(value: &str) -> Result<Self> {
        let mut rules = Vec::new();
        for item in value
            .split([',', ';', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (pattern, target) = item.split_once('=').ok_or_else(|| {
                config(format!(
                    "{ROUTES_ENV}: `{item}` is not pattern=transport[:dispatch]"
                ))
            })?;
            let (transport, dispatch) = match target.split_once(':') {
                Some((t, d)) => (t.trim(), Some(parse_dispatch(d.trim())?)),
                None => (target.trim(), None),
            };
            rules.push(Rule {
                pattern: pattern.trim().to_owned(),
                transport: (!transport.is_empty()).then(|| transport.to_owned()),
                dispatch,
            });
        }
        Self::new(rules).map_err(|e| Error::new(e.kind(), format!("{ROUTES_ENV}: {}", e.message())))
    }

    /// The rules in `SEAMBUS_ROUTES`, or `None` when it is unset or holds
    /// no rule.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(ROUTES_ENV) {
            Ok(v) => {
                let routing = Self::parse_env(&v)?;
                Ok((!routing.is_empty()).then_some(routing))
            }
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(config(format!("{ROUTES_ENV} is not valid UTF-8")))
            }
        }
    }

    /// The routing a program runs with: `SEAMBUS_ROUTES` when set, else the
    /// file at `path` when given, else no rule.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        if let Some(env) = Self::from_env()? {
            return Ok(env);
        }
        match path {
            Some(p) => Self::from_toml_file(p),
            None => Ok(Self::default()),
        }
    }
}

impl fmt::Display for Routing {
    /// The environment form, which [`Routing::parse_env`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{rule}")?;
        }
        Ok(())
    }
}

fn rule_from_toml(pattern: &str, value: &toml::Value) -> Result<Rule> {
    match value {
        toml::Value::String(t) => Ok(Rule::new(pattern, t.as_str())),
        toml::Value::Table(t) => {
            let mut rule = Rule {
                pattern: pattern.to_owned(),
                transport: None,
                dispatch: None,
            };
            for (key, v) in t {
                let text = v.as_str().ok_or_else(|| {
                    config(format!("route `{pattern}`: `{key}` must be a string"))
                })?;
                match key.as_str() {
                    "transport" => rule.transport = Some(text.to_owned()),
                    "dispatch" => rule.dispatch = Some(parse_dispatch(text)?),
                    other => {
                        return Err(config(format!(
                            "route `{pattern}`: unknown key `{other}` (expected `transport` or `dispatch`)"
                        )))
                    }
                }
            }
            Ok(rule)
        }
        _ => Err(config(format!(
            "route `{pattern}`: expected a transport name or {{ transport = .., dispatch = .. }}"
        ))),
    }
}

fn parse_dispatch(text: &str) -> Result<Dispatch> {
    match text {
        "queued" => Ok(Dispatch::Queued),
        "inline" => Ok(Dispatch::Inline),
        other => Err(config(format!(
            "unknown dispatch `{other}` (expected `queued` or `inline`)"
        ))),
    }
}

fn check_pattern(pattern: &str) -> Result<()> {
    if pattern == DEFAULT_PATTERN {
        return Ok(());
    }
    validate_name(pattern.strip_suffix(".*").unwrap_or(pattern))
}

fn check_transport_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidName,
            format!("transport name `{name}`: use letters, digits, `-` and `_`"),
        ))
    }
}

/// Whether `pattern` (exact or `prefix.*`, not `*`) matches `name`.
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix) && name.len() > prefix.len(),
        None => pattern == name,
    }
}

/// Whether some event name can match both patterns. The default route
/// overlaps only itself.
pub(crate) fn overlap(a: &str, b: &str) -> bool {
    if a == DEFAULT_PATTERN || b == DEFAULT_PATTERN {
        return a == b;
    }
    match (a.strip_suffix('*'), b.strip_suffix('*')) {
        (None, None) => a == b,
        (Some(p), None) => b.starts_with(p),
        (None, Some(p)) => a.starts_with(p),
        (Some(p), Some(q)) => p.starts_with(q) || q.starts_with(p),
    }
}

fn config(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Config, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_symmetric_and_exact() {
        let cases = [
            ("orders.*", "orders.order_placed", true),
            ("orders.*", "orders.*", true),
            ("orders.*", "orders.audit.*", true),
            ("orders.*", "ordersx.placed", false),
            ("orders.a", "orders.b", false),
            ("*", "orders.*", false),
            ("*", "*", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(overlap(a, b), want, "{a} / {b}");
            assert_eq!(overlap(b, a), want, "{b} / {a}");
        }
        assert!(matches("orders.*", "orders.order_placed"));
        assert!(!matches("orders.*", "orders"));
        assert!(!matches("orders.*", "ordersx.placed"));
    }
}
