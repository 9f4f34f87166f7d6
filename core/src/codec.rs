//! Codecs turn typed events into payload bytes and back.
//!
//! Decode errors end up in `warn` logs, in [`crate::DeadLetter::error`] and
//! in brokers' dead-letter headers, so their text names the place in the
//! payload (a path such as `items[2].sku`) and the problem, never the value:
//! `order_id: invalid type: string, expected u64 at line 1 column 26`.

use std::borrow::Cow;
use std::fmt;

use serde::de::DeserializeOwned;
use serde_path_to_error::{Path, Segment};

use crate::error::{Error, ErrorKind, Result};

/// The content type of [`JsonCodec`].
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The visitor a codec hands its deserializer to.
pub type Visit<'a> =
    dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error> + 'a;

/// Encodes and decodes payloads for one content type.
///
/// The trait is object-safe (through `erased-serde`) so codecs can be chosen
/// at run time by an envelope's `datacontenttype`. JSON ([`JsonCodec`]) is the
/// default; register others with [`crate::BusBuilder::codec`].
///
/// Error texts end up in logs and dead letters: a codec's own errors must
/// not quote payload values. [`decode`] replaces the text of errors that
/// come back through the visitor (serde's `invalid type: string "…"` and
/// the like) with a value-free one; errors a codec raises before or after
/// the visitor are reported as they are.
pub trait Codec: Send + Sync + 'static {
    /// The `datacontenttype` this codec writes and reads.
    fn content_type(&self) -> &'static str;

    /// Encodes a value.
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>>;

    /// Builds a deserializer over `bytes` and hands it to `visit`. Must fail
    /// if bytes are left over after the value. [`decode`] calls it a second
    /// time after a failure, to find where in the payload it failed.
    fn decode_with(&self, bytes: &[u8], visit: &mut Visit<'_>) -> Result<()>;

    /// The built-in [`JsonCodec`], which [`decode`] reads without the
    /// object-safe detour (about 2.5 times faster). Other codecs keep the
    /// default.
    #[doc(hidden)]
    fn is_builtin_json(&self) -> bool {
        false
    }
}

/// Decodes a typed value with a codec.
///
/// A failure is an [`ErrorKind::Decode`] whose message names the path and
/// the problem but never a value of the payload, and which keeps no
/// `source()`: the deserializer's own error quotes the value.
pub fn decode<T: DeserializeOwned>(codec: &dyn Codec, bytes: &[u8]) -> Result<T> {
    if codec.is_builtin_json() {
        // Same checks as `JsonCodec::decode_with` (trailing bytes are an
        // error), typed all the way; only a failure pays for the path.
        return serde_json::from_slice(bytes).map_err(|e| json_failure::<T>(bytes, e));
    }
    let mut out = None;
    let mut failed = None;
    let result = codec.decode_with(bytes, &mut |de| match erased_serde::deserialize::<T>(de) {
        Ok(value) => {
            out = Some(value);
            Ok(())
        }
        Err(e) => {
            failed = Some(e.to_string());
            Err(e)
        }
    });
    match (result, failed) {
        // Whatever the codec made of it, the text is the deserializer's.
        (Err(_), Some(text)) => Err(erased_failure::<T>(codec, bytes, &text)),
        (Err(e), None) => Err(e),
        (Ok(()), _) => out.ok_or_else(|| Error::new(ErrorKind::Decode, "codec produced no value")),
    }
}

/// The built-in JSON path failed: decode again, tracking the path.
#[cold]
fn json_failure<T: DeserializeOwned>(bytes: &[u8], first: serde_json::Error) -> Error {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let (path, err) = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(e) => (Some(e.path().clone()), e.into_inner()),
        // Trailing characters, or a `Deserialize` that fails only sometimes.
        Ok(_) => (None, de.end().err().unwrap_or(first)),
    };
    let syntax = matches!(
        err.classify(),
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof
    );
    failure("JSON", path.as_ref(), &err.to_string(), syntax)
}

/// An object-safe codec failed in the visitor: decode again, tracking the
/// path.
#[cold]
fn erased_failure<T: DeserializeOwned>(codec: &dyn Codec, bytes: &[u8], text: &str) -> Error {
    let mut path = None;
    // The codec's result is the first one's again; only the path is new.
    let _ = codec.decode_with(bytes, &mut |de| {
        serde_path_to_error::deserialize::<_, T>(de)
            .map(drop)
            .map_err(|e| {
                path = Some(e.path().clone());
                e.into_inner()
            })
    });
    failure(codec.content_type(), path.as_ref(), text, false)
}

/// The decode error for a deserializer's error `text`: the path, the
/// problem without the value, and the position if the text has one.
/// `syntax` says the text is known to be a syntax error, which quotes no
/// input and is kept.
///
/// Every error of this module about a payload's content comes from here.
fn failure(format: &str, path: Option<&Path>, text: &str, syntax: bool) -> Error {
    let (text, position) = split_position(text);
    let problem = if syntax {
        Cow::Owned(text.to_owned())
    } else {
        problem(text)
    };
    let path = path.filter(|p| !p.iter().all(|s| matches!(s, Segment::Unknown)));
    Error::new(
        ErrorKind::Decode,
        Failure {
            format,
            path,
            problem: &problem,
            position,
        }
        .to_string(),
    )
}

struct Failure<'a> {
    format: &'a str,
    path: Option<&'a Path>,
    problem: &'a str,
    position: Option<(usize, usize)>,
}

impl fmt::Display for Failure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} decode: ", self.format)?;
        if let Some(path) = self.path {
            write!(f, "{path}: ")?;
        }
        f.write_str(self.problem)?;
        if let Some((line, column)) = self.position {
            write!(f, " at line {line} column {column}")?;
        }
        Ok(())
    }
}

/// Splits serde_json's " at line L column C" off the end of an error text.
fn split_position(text: &str) -> (&str, Option<(usize, usize)>) {
    let parsed = text.rfind(" at line ").and_then(|at| {
        let (line, column) = text[at + " at line ".len()..].split_once(" column ")?;
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        Some((&text[..at], (number(line)?, number(column)?)))
    });
    match parsed {
        Some((text, position)) => (text, Some(position)),
        None => (text, None),
    }
}

/// serde_json's syntax errors (its `ErrorCode`s other than data messages):
/// they quote no input.
const JSON_SYNTAX: &[&str] = &[
    "EOF while parsing a list",
    "EOF while parsing an object",
    "EOF while parsing a string",
    "EOF while parsing a value",
    "expected `:`",
    "expected `,` or `]`",
    "expected `,` or `}`",
    "expected ident",
    "expected value",
    "expected `\"`",
    "invalid escape",
    "invalid number",
    "number out of range",
    "invalid unicode code point",
    "control character (\\u0000-\\u001F) found while parsing a string",
    "key must be a string",
    "invalid value: expected key to be a number in quotes",
    "float key must be finite (got NaN or +/-inf)",
    "lone leading surrogate in hex escape",
    "trailing comma",
    "trailing characters",
    "unexpected end of hex escape",
    "recursion limit exceeded",
];

/// What a serde error text says is wrong, without the value it may quote.
///
/// serde's data errors have fixed shapes; the part after ", expected " comes
/// from the schema (a visitor's `expecting`), the part before it may be the
/// payload's value, so a value that itself contains ", expected " is cut
/// at the last one. Texts of any other shape come from a `Deserialize` impl
/// (`custom`), which may put anything in them: they are "invalid data".
fn problem(text: &str) -> Cow<'static, str> {
    if JSON_SYNTAX.contains(&text) {
        return Cow::Owned(text.to_owned());
    }
    for (prefix, what) in [
        ("invalid type: ", "invalid type"),
        ("invalid value: ", "invalid value"),
    ] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return Cow::Owned(match rest.rsplit_once(", expected ") {
                Some((unexpected, expected)) => match unexpected_kind(unexpected) {
                    Some(kind) => format!("{what}: {kind}, expected {expected}"),
                    None => format!("{what}, expected {expected}"),
                },
                None => what.to_owned(),
            });
        }
    }
    if let Some(rest) = text.strip_prefix("invalid length ") {
        // "invalid length <n>, expected <what>": a count, not a value.
        return match rest.split_once(", expected ") {
            Some((n, _)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                Cow::Owned(text.to_owned())
            }
            _ => Cow::Borrowed("invalid length"),
        };
    }
    if text.starts_with("unknown variant `") {
        // The variant is the payload's value; the list is the schema's.
        return match text.rsplit_once("`, expected ") {
            Some((_, expected)) => Cow::Owned(format!("unknown variant, expected {expected}")),
            None if text.ends_with("`, there are no variants") => {
                Cow::Borrowed("unknown variant, there are no variants")
            }
            None => Cow::Borrowed("unknown variant"),
        };
    }
    // Field names are the schema's (an unknown one the sender's schema).
    let field = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix('`'))
            .is_some_and(|name| !name.contains('`'))
    };
    if text.starts_with("unknown field `") || field("missing field `") || field("duplicate field `")
    {
        return Cow::Owned(text.to_owned());
    }
    // serde_derive's own messages, which name only types.
    if let Some(name) = text.strip_prefix("data did not match any variant of untagged enum ") {
        if !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '<' | '>' | '.' | '-'))
        {
            return Cow::Owned(text.to_owned());
        }
    }
    if text == "unexpected map key" {
        return Cow::Borrowed("unexpected map key");
    }
    Cow::Borrowed("invalid data")
}

/// The kind of value serde's `Unexpected` describes, without the value.
fn unexpected_kind(unexpected: &str) -> Option<&'static str> {
    const WITH_VALUE: &[(&str, &str)] = &[
        ("boolean `", "boolean"),
        ("integer `", "integer"),
        ("floating point `", "floating point"),
        ("character `", "character"),
        ("string \"", "string"),
    ];
    const BARE: &[&str] = &[
        "byte array",
        "unit value",
        "null",
        "Option value",
        "newtype struct",
        "sequence",
        "map",
        "enum",
        "unit variant",
        "newtype variant",
        "tuple variant",
        "struct variant",
    ];
    WITH_VALUE
        .iter()
        .find(|(prefix, _)| unexpected.starts_with(prefix))
        .map(|(_, kind)| *kind)
        .or_else(|| BARE.iter().find(|k| **k == unexpected).copied())
}

/// JSON through `serde_json`; content type `application/json`.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    fn content_type(&self) -> &'static str {
        JSON_CONTENT_TYPE
    }

    fn is_builtin_json(&self) -> bool {
        true
    }

    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>> {
        serde_json::to_vec(value)
            .map_err(|e| Error::new(ErrorKind::Encode, format!("JSON encode: {e}")).with_source(e))
    }

    fn decode_with(&self, bytes: &[u8], visit: &mut Visit<'_>) -> Result<()> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        // Through the erasure a syntax error is text like any other: the
        // list of serde_json's syntax errors tells it apart.
        visit(&mut <dyn erased_serde::Deserializer>::erase(&mut de))
            .map_err(|e| failure("JSON", None, &e.to_string(), false))?;
        de.end()
            .map_err(|e| failure("JSON", None, &e.to_string(), true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u32,
        b: String,
    }

    #[test]
    fn json_round_trip() {
        let value = Sample {
            a: 7,
            b: "x".into(),
        };
        let bytes = JsonCodec.encode(&value).unwrap();
        assert_eq!(decode::<Sample>(&JsonCodec, &bytes).unwrap(), value);
    }

    /// The same codec behind the object-safe path only (a codec that
    /// delegates to JSON but is not the built-in one).
    struct ErasedJson;

    impl Codec for ErasedJson {
        fn content_type(&self) -> &'static str {
            JSON_CONTENT_TYPE
        }
        fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>> {
            JsonCodec.encode(value)
        }
        fn decode_with(&self, bytes: &[u8], visit: &mut Visit<'_>) -> Result<()> {
            JsonCodec.decode_with(bytes, visit)
        }
    }

    #[test]
    fn the_typed_json_path_agrees_with_the_object_safe_one() {
        assert!(JsonCodec.is_builtin_json() && !ErasedJson.is_builtin_json());
        for input in [
            &b"{\"a\":1,\"b\":\"x\"}"[..],
            b"{",
            b"not json",
            b"{\"a\":1}",
            b"{\"a\":1,\"b\":\"x\"} trailing",
            b"{\"a\":1,\"b\":\"x\"}  ",
        ] {
            let fast = decode::<Sample>(&JsonCodec, input);
            let erased = decode::<Sample>(&ErasedJson, input);
            match (fast, erased) {
                (Ok(f), Ok(e)) => assert_eq!(f, e),
                (Err(f), Err(e)) => assert_eq!(f.kind(), e.kind(), "{input:?}"),
                (f, e) => panic!("{input:?}: typed {f:?}, object-safe {e:?}"),
            }
        }
    }

    #[test]
    fn bad_bytes_are_a_decode_error() {
        for bad in [
            &b"{"[..],
            b"not json",
            b"{\"a\":1}",
            b"{\"a\":1,\"b\":\"x\"} trailing",
        ] {
            let err = decode::<Sample>(&JsonCodec, bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Decode, "{bad:?}");
        }
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn serdes_data_error_shapes_lose_their_values() {
        for (text, want) in [
            (
                r#"invalid type: string "s3cr3t", expected u64"#,
                "invalid type: string, expected u64",
            ),
            (
                "invalid value: integer `123456`, expected u8",
                "invalid value: integer, expected u8",
            ),
            (
                "invalid type: character `s`, expected a string",
                "invalid type: character, expected a string",
            ),
            (
                "invalid type: floating point `1.5`, expected i32",
                "invalid type: floating point, expected i32",
            ),
            (
                "invalid type: null, expected a string",
                "invalid type: null, expected a string",
            ),
            // `Unexpected::Other` is free text: only the expectation stays.
            (
                "invalid type: s3cr3t thing, expected u64",
                "invalid type, expected u64",
            ),
            ("invalid type: s3cr3t", "invalid type"),
            (
                "invalid length 3, expected a tuple of size 2",
                "invalid length 3, expected a tuple of size 2",
            ),
            ("invalid length s3cr3t, expected 2", "invalid length"),
            (
                "unknown variant `s3cr3t`, expected one of `A`, `B`, `C`",
                "unknown variant, expected one of `A`, `B`, `C`",
            ),
            (
                "unknown variant `s3cr3t`, there are no variants",
                "unknown variant, there are no variants",
            ),
            ("unknown variant `s3cr3t", "unknown variant"),
            (
                "unknown field `extra`, expected `a` or `b`",
                "unknown field `extra`, expected `a` or `b`",
            ),
            ("missing field `a`", "missing field `a`"),
            ("duplicate field `a`", "duplicate field `a`"),
            (
                "data did not match any variant of untagged enum Shape",
                "data did not match any variant of untagged enum Shape",
            ),
            ("EOF while parsing a value", "EOF while parsing a value"),
            ("trailing characters", "trailing characters"),
        ] {
            assert_eq!(problem(text), want, "{text}");
        }
    }

    #[test]
    fn anything_else_is_invalid_data() {
        for text in [
            "not an email address: s3cr3t",
            "missing field `a` (s3cr3t)",
            "duplicate field `a`, s3cr3t `b`",
            "data did not match any variant of untagged enum s3cr3t value",
            "invalid character: expected an optional prefix of `urn:uuid:`, found `s`",
            "",
        ] {
            assert_eq!(problem(text), "invalid data", "{text}");
        }
    }

    #[test]
    fn the_position_is_split_off_only_when_it_is_one() {
        assert_eq!(
            split_position("expected value at line 3 column 14"),
            ("expected value", Some((3, 14)))
        );
        assert_eq!(split_position("expected value"), ("expected value", None));
        assert_eq!(
            split_position("x at line 3 column y"),
            ("x at line 3 column y", None)
        );
        assert_eq!(
            split_position("x at line  column 4"),
            ("x at line  column 4", None)
        );
    }

    #[test]
    fn a_syntax_error_is_kept_with_its_position_and_no_source() {
        let err = decode::<Vec<u32>>(&JsonCodec, b"[1,").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert_eq!(
            err.message(),
            "JSON decode: EOF while parsing a value at line 1 column 3"
        );
        assert!(std::error::Error::source(&err).is_none());
    }
}
