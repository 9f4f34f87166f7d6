//! Typed, versioned events.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};

/// A typed, versioned event owned by one module.
///
/// Derive it with [`derive@crate::Event`]:
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
/// #[event(name = "orders.order_placed", version = 1)]
/// struct OrderPlaced {
///     order_id: u64,
/// }
///
/// use seambus::Event as _;
/// assert_eq!(OrderPlaced::NAME, "orders.order_placed");
/// assert_eq!(OrderPlaced::MODULE, "orders"); // the name's first segment
/// assert_eq!(OrderPlaced::VERSION, 1);
/// ```
///
/// Several Rust types may share one `NAME` with different `VERSION`s; the
/// bus converts older versions into the one a subscriber asks for with the
/// upcast steps registered by [`crate::BusBuilder::upcast`].
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Stable name on the wire, such as `orders.order_placed`.
    const NAME: &'static str;
    /// Version of the payload shape, starting at 1.
    const VERSION: u32;
    /// The module that owns the event: the only one allowed to publish it.
    const MODULE: &'static str;
}

/// Checks an event, module or subscription name: non-empty, at most 200
/// bytes, dot-separated segments of `a-z`, `0-9`, `_`, `-`.
///
/// These names become topic, subject and queue names on every broker, so
/// the rule is the intersection of what Kafka, NATS and RabbitMQ accept.
///
/// ```
/// assert!(seambus::validate_name("orders.order_placed").is_ok());
/// assert!(seambus::validate_name("Orders.*").is_err());
/// ```
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why: String| Err(Error::new(ErrorKind::InvalidName, why));
    if name.is_empty() {
        return bad("a name must not be empty".into());
    }
    if name.len() > 200 {
        return bad(format!("name of {} bytes is over 200", name.len()));
    }
    if name.split('.').any(str::is_empty) {
        return bad(format!("`{name}` has an empty segment between dots"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.')))
    {
        return bad(format!(
            "`{}` has the character {c:?}; use a-z, 0-9, '_', '-', '.'",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// What [`validate_name`] accepts, as a `const fn`, so a publish checks a
/// type's constant name at compile time instead of on every call.
pub(crate) const fn name_is_valid(name: &str) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > 200 || b[0] == b'.' || b[b.len() - 1] == b'.' {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.');
        if !ok || (c == b'.' && i + 1 < b.len() && b[i + 1] == b'.') {
            return false;
        }
        i += 1;
    }
    true
}

/// Checks a user header: the name is a non-empty token of visible ASCII
/// without `:`; neither name nor value has CR, LF or NUL (they would split
/// or truncate headers on the wire).
pub fn validate_header(name: &str, value: &str) -> Result<()> {
    let bad = |why: String| Err(Error::new(ErrorKind::InvalidHeader, why));
    if name.is_empty() {
        return bad("a header name must not be empty".into());
    }
    if name.bytes().any(|b| !b.is_ascii_graphic() || b == b':') {
        return bad(format!(
            "header name `{}` must be visible ASCII without ':'",
            name.escape_debug()
        ));
    }
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return bad(format!("header `{name}` has CR, LF or NUL in its value"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["orders", "orders.order_placed", "a-b.c_d.v2"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "Orders",
            "orders..x",
            ".x",
            "x.",
            "orders.*",
            "a b",
            "ä",
        ] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidName, "{bad:?}");
        }
        assert_eq!(
            validate_name(&"a".repeat(201)).unwrap_err().kind(),
            ErrorKind::InvalidName
        );
    }

    #[test]
    fn the_const_check_agrees_with_validate_name() {
        let long = "a".repeat(200);
        let too_long = "a".repeat(201);
        for name in [
            "orders",
            "orders.order_placed",
            "a-b.c_d.v2",
            "",
            ".",
            "..",
            "Orders",
            "orders..x",
            ".x",
            "x.",
            "orders.*",
            "a b",
            "ä",
            "x",
            long.as_str(),
            too_long.as_str(),
        ] {
            assert_eq!(name_is_valid(name), validate_name(name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn headers() {
        validate_header("x-tenant", "acme corp").unwrap();
        for (n, v) in [
            ("x", "a\r\nInjected: 1"),
            ("x", "a\nb"),
            ("x", "nul\0"),
            ("", "v"),
            ("bad name", "v"),
            ("bad\r\nname", "v"),
            ("a:b", "v"),
        ] {
            let err = validate_header(n, v).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidHeader, "{n:?} {v:?}");
        }
    }
}
