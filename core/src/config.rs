//! The bus from configuration: `[routes]` and `[transports.<name>]` tables,
//! for every transport kind the program registers.
//!
//! ```toml
//! [bus]
//! namespace = "shop"            # prefixes every broker name (optional)
//!
//! [routes]
//! "*" = { transport = "in-process", dispatch = "queued" }
//! "shipments.*" = "nats"
//!
//! [transports.nats]             # the kind is the table's name...
//! servers = ["nats://127.0.0.1:4222"]
//!
//! [transports.audit]            # ...or says so
//! kind = "sql"
//! url = "sqlite://audit.db"
//! ```
//!
//! Each transport crate implements [`Configurable`] for its transport (its
//! configuration type is what the table holds; an unknown key is an
//! error). A program lists the kinds it has compiled in, and the bus
//! connects the transports the routes name:
//!
//! ```
//! # async fn run() -> seambus::Result<()> {
//! use seambus::config::{BusConfig, Kinds};
//!
//! let config = BusConfig::from_toml_str("[routes]\n\"*\" = \"in-process\"")?;
//! let bus = config.build(&Kinds::new()).await?; // add .with::<NatsTransport>() ...
//! # bus.shutdown(std::time::Duration::from_secs(1)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! What is refused, at start: a route naming a transport with neither a
//! table nor a registered kind of that name, a table whose kind is not
//! registered (naming both), and a key the transport's configuration does
//! not have. Tables no route names are still read (a typo fails at
//! start), but not connected.
//!
//! Environment: `SEAMBUS_ROUTES` replaces the file's routes (see
//! [`Routing`]), `SEAMBUS_NAMESPACE` the namespace, and each kind reads its
//! own overrides ([`Configurable::apply_env`]: `SEAMBUS_NATS_URL`, ...).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};
use crate::routing::Routing;
use crate::transport::Transport;
use crate::IN_PROCESS;
use crate::{Bus, BusBuilder};

/// The environment variable of the namespace.
pub const NAMESPACE_ENV: &str = "SEAMBUS_NAMESPACE";

/// Reads one environment variable (empty counts as unset).
pub type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// A transport a [`BusConfig`] can build from its table.
#[async_trait]
pub trait Configurable: Transport + Sized {
    /// The kind: the table name `[transports.<kind>]`, or its `kind` key.
    const KIND: &'static str;
    /// The configuration a table holds.
    type Config: DeserializeOwned + Default + Send + 'static;

    /// Applies the kind's environment overrides (read through `env`).
    fn apply_env(config: &mut Self::Config, env: Env<'_>) -> Result<()> {
        let _ = (config, env);
        Ok(())
    }

    /// Prefixes the names this transport creates on its broker with
    /// `namespace` (streams, subjects, exchanges, topics, groups, schemas),
    /// so two programs with different namespaces never meet.
    fn apply_namespace(config: &mut Self::Config, namespace: &str) {
        let _ = (config, namespace);
    }

    /// Connects with `config`.
    async fn connect_config(config: Self::Config) -> Result<Self>;
}

type Connect = Box<
    dyn Fn(
            toml::Table,
            Option<&str>,
            Env<'_>,
        ) -> Result<BoxFuture<'static, Result<Arc<dyn Transport>>>>
        + Send
        + Sync,
>;

/// The transport kinds a program has compiled in.
#[derive(Default)]
pub struct Kinds {
    kinds: Vec<(&'static str, Connect)>,
}

impl fmt::Debug for Kinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Kinds {
    /// Only `in-process`, which every bus has.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds kind `T` ([`Configurable::KIND`]).
    pub fn with<T: Configurable>(mut self) -> Self {
        let connect: Connect = Box::new(|table, namespace, env| {
            let config = prepare::<T>(table, namespace, env)?;
            Ok(Box::pin(async move {
                let t = T::connect_config(config).await?;
                Ok(Arc::new(t) as Arc<dyn Transport>)
            }))
        });
        self.kinds.retain(|(k, _)| *k != T::KIND);
        self.kinds.push((T::KIND, connect));
        self
    }

    /// The kinds, `in-process` first.
    pub fn names(&self) -> Vec<&'static str> {
        std::iter::once(IN_PROCESS)
            .chain(self.kinds.iter().map(|(k, _)| *k))
            .collect()
    }

    fn get(&self, kind: &str) -> Option<&Connect> {
        self.kinds.iter().find(|(k, _)| *k == kind).map(|(_, c)| c)
    }
}

/// Routes, transport tables and namespace, read from TOML and the
/// environment. `Debug` shows each table's keys, never their values (a
/// URL may hold a password).
#[derive(Clone, Default)]
pub struct BusConfig {
    routing: Routing,
    tables: BTreeMap<String, toml::Table>,
    namespace: Option<String>,
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tables: BTreeMap<&str, Vec<&str>> = self
            .tables
            .iter()
            .map(|(name, t)| (name.as_str(), t.keys().map(String::as_str).collect()))
            .collect();
        f.debug_struct("BusConfig")
            .field("routing", &self.routing.to_string())
            .field("transports", &tables)
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn config_error(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Config, message)
}

impl BusConfig {
    /// Reads `[routes]`, `[transports.*]` and `[bus] namespace` of a TOML
    /// document; other tables are left to the application.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| config_error(format!("TOML: {}", e.message())))?;
        let mut config = Self {
            routing: Routing::from_toml_str(text)?,
            ..Self::default()
        };
        if let Some(transports) = doc.get("transports") {
            let transports = transports
                .as_table()
                .ok_or_else(|| config_error("`transports` must hold one table per transport"))?;
            for (name, table) in transports {
                let table = table
                    .as_table()
                    .ok_or_else(|| config_error(format!("`transports.{name}` must be a table")))?;
                config.tables.insert(name.clone(), table.clone());
            }
        }
        if let Some(bus) = doc.get("bus") {
            let bus = bus
                .as_table()
                .ok_or_else(|| config_error("`bus` must be a table"))?;
            for (key, value) in bus {
                match (key.as_str(), value) {
                    ("namespace", toml::Value::String(ns)) => config.namespace = Some(ns.clone()),
                    ("namespace", _) => {
                        return Err(config_error("`bus.namespace` must be a string"))
                    }
                    (other, _) => {
                        return Err(config_error(format!(
                            "`bus.{other}`: unknown key (the `bus` table has `namespace`)"
                        )))
                    }
                }
            }
        }
        Ok(config)
    }

    /// Reads a TOML file; see [`BusConfig::from_toml_str`].
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error(format!("cannot read {}", path.display())).with_source(e))?;
        Self::from_toml_str(&text)
            .map_err(|e| config_error(format!("{}: {}", path.display(), e.message())))
    }

    /// The file at `path` (or nothing), then `SEAMBUS_ROUTES` and
    /// `SEAMBUS_NAMESPACE` from the environment.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut config = match path {
            Some(p) => Self::from_toml_file(p)?,
            None => Self::default(),
        };
        if let Some(routing) = Routing::from_env()? {
            config.routing = routing;
        }
        if let Some(ns) = std::env::var(NAMESPACE_ENV).ok().filter(|v| !v.is_empty()) {
            config.namespace = Some(ns);
        }
        Ok(config)
    }

    /// Lays `other` over this one: its routes (when it has any) replace
    /// these, its tables' keys replace these keys, its namespace this one.
    /// For an application's defaults under the user's file.
    pub fn merge(mut self, other: Self) -> Self {
        if !other.routing.is_empty() {
            self.routing = other.routing;
        }
        for (name, table) in other.tables {
            self.tables.entry(name).or_default().extend(table);
        }
        if other.namespace.is_some() {
            self.namespace = other.namespace;
        }
        self
    }

    /// The routes.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// Replaces the routes.
    pub fn set_routing(&mut self, routing: Routing) {
        self.routing = routing;
    }

    /// The namespace, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// Sets the namespace.
    pub fn set_namespace(&mut self, namespace: impl Into<String>) {
        self.namespace = Some(namespace.into());
    }

    /// The table of transport `name`, created empty if missing (to set a
    /// key from code or a command line).
    pub fn table_mut(&mut self, name: &str) -> &mut toml::Table {
        self.tables.entry(name.to_owned()).or_default()
    }

    /// The kind of transport `name`: its table's `kind`, else the name.
    pub fn kind_of<'a>(&'a self, name: &'a str) -> Result<&'a str> {
        match self.tables.get(name).and_then(|t| t.get("kind")) {
            None => Ok(name),
            Some(toml::Value::String(kind)) => Ok(kind),
            Some(_) => Err(config_error(format!(
                "`transports.{name}.kind` must be a string"
            ))),
        }
    }

    /// Checks every table and route against `kinds` and connects the
    /// transports the routes name (the environment as it is).
    pub async fn connect(&self, kinds: &Kinds) -> Result<Vec<(String, Arc<dyn Transport>)>> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        self.connect_with_env(kinds, &env).await
    }

    /// [`BusConfig::connect`] reading the environment through `env`.
    pub async fn connect_with_env(
        &self,
        kinds: &Kinds,
        env: Env<'_>,
    ) -> Result<Vec<(String, Arc<dyn Transport>)>> {
        let known = || kinds.names().join(", ");
        let mut pending = Vec::new();
        for name in self.tables.keys() {
            let kind = self.kind_of(name)?;
            if kind == IN_PROCESS {
                continue;
            }
            let Some(connect) = kinds.get(kind) else {
                return Err(config_error(format!(
                    "transport `{name}` is of kind `{kind}`, which this program does not have \
                     (it has {}; add its crate and `Kinds::with`)",
                    known()
                )));
            };
            let mut table = self.tables[name].clone();
            table.remove("kind");
            let connect = connect(table, self.namespace.as_deref(), env)
                .map_err(|e| config_error(format!("[transports.{name}]: {}", e.message())))?;
            if self.routing.transports().contains(&name.as_str()) {
                pending.push((name.clone(), connect));
            }
        }
        for rule in self.routing.rules() {
            let Some(name) = rule.transport.as_deref() else {
                continue;
            };
            if name == IN_PROCESS || self.tables.contains_key(name) {
                continue;
            }
            let Some(connect) = kinds.get(name) else {
                return Err(config_error(format!(
                    "route `{}` names transport `{name}`, which this program does not have \
                     (it has {})",
                    rule.pattern,
                    known()
                )));
            };
            if !pending.iter().any(|(n, _)| n == name) {
                let connect = connect(toml::Table::new(), self.namespace.as_deref(), env)?;
                pending.push((name.to_owned(), connect));
            }
        }
        let mut connected = Vec::with_capacity(pending.len());
        for (name, connect) in pending {
            let transport = connect.await.map_err(|e| {
                Error::new(e.kind(), format!("transport `{name}`: {}", e.message()))
            })?;
            connected.push((name, transport));
        }
        Ok(connected)
    }

    /// Transport `name` as its own type `T`, connected from its table (the
    /// environment and the namespace applied), for what only that
    /// transport's API does (tear-down, say).
    pub async fn connect_as<T: Configurable>(&self, name: &str) -> Result<T> {
        let kind = self.kind_of(name)?;
        if kind != T::KIND {
            return Err(config_error(format!(
                "transport `{name}` is of kind `{kind}`, not `{}`",
                T::KIND
            )));
        }
        let mut table = self.tables.get(name).cloned().unwrap_or_default();
        table.remove("kind");
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let config = prepare::<T>(table, self.namespace.as_deref(), &env)
            .map_err(|e| config_error(format!("[transports.{name}]: {}", e.message())))?;
        T::connect_config(config).await
    }

    /// A bus builder with these routes and the transports they name
    /// connected, for more settings (upcasters, layers) before `build`.
    pub async fn builder(&self, kinds: &Kinds) -> Result<BusBuilder> {
        let mut builder = Bus::builder().routing(&self.routing);
        for (name, transport) in self.connect(kinds).await? {
            builder = builder.transport_arc(name, transport);
        }
        Ok(builder)
    }

    /// The bus of these routes, with the transports they name connected.
    pub async fn build(&self, kinds: &Kinds) -> Result<Bus> {
        self.builder(kinds).await?.build()
    }
}

/// The configuration of kind `T` from its table, with the environment's
/// overrides and the namespace applied.
fn prepare<T: Configurable>(
    table: toml::Table,
    namespace: Option<&str>,
    env: Env<'_>,
) -> Result<T::Config> {
    let mut config: T::Config = read_table(table)?;
    T::apply_env(&mut config, env)?;
    if let Some(ns) = namespace {
        T::apply_namespace(&mut config, ns);
    }
    Ok(config)
}

/// A table as `T`, unknown keys refused; the error names the key, never a
/// value (a URL may hold a password).
fn read_table<T: DeserializeOwned>(table: toml::Table) -> Result<T> {
    let value = toml::Value::Table(table);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = without_values(e.into_inner().message());
        config_error(format!("`{path}`: {message}"))
    })
}

/// `message` with every double-quoted part (a value, in serde's messages)
/// replaced by `"…"`; names stay (serde puts them in backticks).
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            out.push_str("\"…");
        } else {
            out.push('"');
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_keep_names_and_drop_values() {
        assert_eq!(
            without_values("invalid type: string \"nats://u:secret@h\", expected a sequence"),
            "invalid type: string \"…\", expected a sequence"
        );
        assert_eq!(
            without_values("unknown field `urll`, expected one of `url`, `schema`"),
            "unknown field `urll`, expected one of `url`, `schema`"
        );
    }
}
