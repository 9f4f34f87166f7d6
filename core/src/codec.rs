//! Codecs turn typed events into payload bytes and back.

use serde::de::DeserializeOwned;

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
pub trait Codec: Send + Sync + 'static {
    /// The `datacontenttype` this codec writes and reads.
    fn content_type(&self) -> &'static str;

    /// Encodes a value.
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>>;

    /// Builds a deserializer over `bytes` and hands it to `visit`. Must fail
    /// if bytes are left over after the value.
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
pub fn decode<T: DeserializeOwned>(codec: &dyn Codec, bytes: &[u8]) -> Result<T> {
    if codec.is_builtin_json() {
        // Same checks as `JsonCodec::decode_with` (trailing bytes are an
        // error), typed all the way.
        return serde_json::from_slice(bytes).map_err(|e| {
            Error::new(ErrorKind::Decode, format!("JSON decode: {e}")).with_source(e)
        });
    }
    let mut out = None;
    codec.decode_with(bytes, &mut |de| {
        out = Some(erased_serde::deserialize::<T>(de)?);
        Ok(())
    })?;
    out.ok_or_else(|| Error::new(ErrorKind::Decode, "codec produced no value"))
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
        visit(&mut <dyn erased_serde::Deserializer>::erase(&mut de))
            .map_err(|e| Error::new(ErrorKind::Decode, format!("JSON decode: {e}")))?;
        de.end()
            .map_err(|e| Error::new(ErrorKind::Decode, format!("JSON decode: {e}")).with_source(e))
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
