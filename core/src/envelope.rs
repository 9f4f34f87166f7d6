//! The envelope: an event on the move, with its CloudEvents attributes.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::event::validate_header;

/// Header-name prefixes of the CloudEvents bindings (HTTP/NATS, Kafka, AMQP).
const RESERVED_PREFIXES: [&str; 3] = ["ce-", "ce_", "cloudevents:"];

/// The CloudEvents `specversion` every envelope carries.
pub const SPEC_VERSION: &str = "1.0";

/// The CloudEvents 1.0 attributes and Seambus extensions of an envelope.
///
/// Field names follow the CloudEvents attribute they carry (`type` is
/// `event_type`, `dataversion` is `data_version`, ...).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    /// `id`: UUIDv7, unique per event; the dedupe key for idempotent handlers.
    /// For an event from a foreign producer whose `id` is not a UUID (the
    /// CloudEvents spec allows any string), a UUIDv5 derived from its
    /// `source` and `id`, so every copy of one foreign event has one id.
    pub id: Uuid,
    /// The `id` as a foreign producer sent it, when it is not a UUID; it is
    /// what goes back on the wire (dead letters, redrives, causation ids).
    pub foreign_id: Option<String>,
    /// `source`: the publishing module.
    pub source: Cow<'static, str>,
    /// `type`: the event name.
    pub event_type: Cow<'static, str>,
    /// `time`: when the event was published.
    pub time: DateTime<Utc>,
    /// `datacontenttype`: how the payload bytes are encoded.
    pub data_content_type: Cow<'static, str>,
    /// `subject`: optional subject of the event within the source.
    pub subject: Option<String>,
    /// `dataversion` (extension): the event version of the payload.
    pub data_version: u32,
    /// `partitionkey` (extension): events with one key are handled in order.
    pub partition_key: Option<String>,
    /// `correlationid` (extension): the conversation this event belongs to.
    pub correlation_id: Option<String>,
    /// `causationid` (extension): the id of the event whose handler
    /// published this one.
    pub causation_id: Option<String>,
    /// `traceparent` (extension): W3C trace context.
    pub traceparent: Option<String>,
    /// Free user headers, in insertion order.
    pub headers: Vec<(String, String)>,
}

/// The UUIDv5 namespace of foreign event ids.
const FOREIGN_IDS: Uuid = Uuid::from_u128(0x5ea3_b05e_0000_4000_8000_000f_0e16_0001);

/// Orders the UUIDv7 ids of this process (as `Uuid::now_v7` does), from a
/// clock reading the caller already has.
static IDS: std::sync::Mutex<uuid::ContextV7> = std::sync::Mutex::new(uuid::ContextV7::new());

fn id_at(now: std::time::SystemTime) -> Uuid {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Uuid::new_v7(uuid::Timestamp::from_unix(
        &IDS,
        since.as_secs(),
        since.subsec_nanos(),
    ))
}

impl Attributes {
    /// Attributes with a fresh UUIDv7 id, the current time and JSON content.
    pub fn new(
        source: impl Into<Cow<'static, str>>,
        event_type: impl Into<Cow<'static, str>>,
        data_version: u32,
    ) -> Self {
        // One clock reading gives both the time and the id's timestamp.
        let now = std::time::SystemTime::now();
        Self {
            id: id_at(now),
            foreign_id: None,
            source: source.into(),
            event_type: event_type.into(),
            time: DateTime::<Utc>::from(now),
            data_content_type: Cow::Borrowed(crate::codec::JSON_CONTENT_TYPE),
            subject: None,
            data_version,
            partition_key: None,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            headers: Vec::new(),
        }
    }

    /// The `id` as it travels: the foreign producer's own string when there
    /// is one, else the UUID.
    pub fn wire_id(&self) -> String {
        self.foreign_id
            .clone()
            .unwrap_or_else(|| self.id.to_string())
    }

    /// The UUID Seambus gives a foreign event whose `id` is not a UUID: a
    /// UUIDv5 of its `source` and `id` (CloudEvents makes the pair unique).
    pub fn foreign_uuid(source: &str, id: &str) -> Uuid {
        let name = format!("{source}\n{id}");
        Uuid::new_v5(&FOREIGN_IDS, name.as_bytes())
    }

    /// The value of user header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The optional string attributes that are set, by CloudEvents name.
    fn optional_attributes(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("subject", &self.subject),
            ("partitionkey", &self.partition_key),
            ("correlationid", &self.correlation_id),
            ("causationid", &self.causation_id),
            ("traceparent", &self.traceparent),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_deref().map(|v| (name, v)))
    }

    /// Checks every user header and optional attribute for CR/LF/NUL, and
    /// that no user header could pass for a CloudEvents attribute on the
    /// wire (`ce-*`, `ce_*`, `cloudEvents:*`, `content-type`).
    pub fn validate(&self) -> Result<()> {
        for (name, value) in &self.headers {
            validate_header(name, value)?;
            let lower = name.to_ascii_lowercase();
            if RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p)) || lower == "content-type" {
                return Err(Error::new(
                    ErrorKind::InvalidHeader,
                    format!("header name `{name}` is reserved for CloudEvents attributes"),
                ));
            }
        }
        for (name, value) in self.optional_attributes() {
            validate_header(name, value)?;
        }
        Ok(())
    }

    /// The attributes as CloudEvents binary-mode header pairs, each name
    /// prefixed with `prefix` (`ce-` for NATS/HTTP, `ce_` for Kafka,
    /// `cloudEvents:` for AMQP), followed by the user headers unprefixed.
    ///
    /// `datacontenttype` is included as `<prefix>datacontenttype`; a
    /// binding with its own content-type slot may move it there.
    pub fn to_wire_headers(&self, prefix: &str) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(8 + self.headers.len());
        let mut put = |name: &str, value: String| out.push((format!("{prefix}{name}"), value));
        put("specversion", SPEC_VERSION.to_owned());
        put("id", self.wire_id());
        put("source", self.source.to_string());
        put("type", self.event_type.to_string());
        put(
            "time",
            self.time
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        );
        put("datacontenttype", self.data_content_type.to_string());
        put("dataversion", self.data_version.to_string());
        for (name, value) in self.optional_attributes() {
            put(name, value.to_owned());
        }
        out.extend(self.headers.iter().cloned());
        out
    }

    /// Reads attributes back from header pairs written by
    /// [`Attributes::to_wire_headers`] (or by any CloudEvents binary-mode
    /// producer). Names with one of `prefixes` are attributes (matched
    /// case-insensitively; a binding may have several, as AMQP has
    /// `cloudEvents_` and `cloudEvents:`); other names become user headers
    /// unless `skip` says they belong to the transport.
    ///
    /// A missing `id`, `type` or `dataversion`, a malformed value, or an
    /// attribute with CR, LF or NUL in it is a [`ErrorKind::Decode`] error,
    /// so the message can be dead-lettered with that reason. A user header
    /// that could not be sent again (CR, LF or NUL, or an unusable name) is
    /// left out, and a warning names it. An `id` that is not a UUID is kept
    /// in [`Attributes::foreign_id`] (see [`Attributes::id`]).
    pub fn from_wire_headers<'a>(
        prefixes: &[&str],
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        skip: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let bad = |why: String| Error::new(ErrorKind::Decode, why);
        let mut attrs = Attributes::new("", "", 0);
        let (mut id, mut ty, mut version) = (None, false, false);
        for (name, value) in headers {
            let attr = prefixes.iter().find_map(|prefix| {
                crate::transport::support::starts_with_ignore_case(name, prefix)
                    .then(|| name[prefix.len()..].to_ascii_lowercase())
            });
            let Some(attr) = attr else {
                if skip(name) {
                    continue;
                }
                match validate_header(name, value) {
                    Ok(()) => attrs.headers.push((name.to_owned(), value.to_owned())),
                    Err(e) => {
                        tracing::warn!(reason = %e.message(), "an inbound header was left out")
                    }
                }
                continue;
            };
            if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(bad(format!(
                    "attribute `{attr}` has CR, LF or NUL in its value"
                )));
            }
            match attr.as_str() {
                "specversion" if value != SPEC_VERSION => {
                    return Err(bad(format!("unsupported specversion {value:?}")))
                }
                "specversion" => {}
                "id" if value.is_empty() => return Err(bad("the id is empty".into())),
                "id" => id = Some(value),
                "source" => attrs.source = Cow::Owned(value.to_owned()),
                "type" => {
                    attrs.event_type = Cow::Owned(value.to_owned());
                    ty = true;
                }
                "time" => {
                    attrs.time = DateTime::parse_from_rfc3339(value)
                        .map_err(|e| bad(format!("time {value:?}: {e}")))?
                        .with_timezone(&Utc)
                }
                "datacontenttype" => attrs.data_content_type = Cow::Owned(value.to_owned()),
                "dataversion" => {
                    attrs.data_version = value
                        .parse()
                        .map_err(|e| bad(format!("dataversion {value:?}: {e}")))?;
                    version = true;
                }
                "subject" => attrs.subject = Some(value.to_owned()),
                "partitionkey" => attrs.partition_key = Some(value.to_owned()),
                "correlationid" => attrs.correlation_id = Some(value.to_owned()),
                "causationid" => attrs.causation_id = Some(value.to_owned()),
                "traceparent" => attrs.traceparent = Some(value.to_owned()),
                _ => attrs.headers.push((name.to_owned(), value.to_owned())),
            }
        }
        let prefix = prefixes.first().copied().unwrap_or_default();
        match (id, ty, version) {
            (Some(id), true, true) => {
                match id.parse() {
                    Ok(uuid) => attrs.id = uuid,
                    Err(_) => {
                        attrs.id = Self::foreign_uuid(&attrs.source, id);
                        attrs.foreign_id = Some(id.to_owned());
                    }
                }
                Ok(attrs)
            }
            _ => Err(bad(format!(
                "missing {prefix}id, {prefix}type or {prefix}dataversion"
            ))),
        }
    }
}

/// What an [`Envelope`] points at: attributes plus either the typed value
/// (in-process, never serialized) or encoded bytes.
pub(crate) trait Carried: Any + Send + Sync {
    fn attrs(&self) -> &Attributes;
    fn bytes(&self) -> Option<&Bytes>;
    fn value(&self) -> Option<&(dyn Any + Send + Sync)>;
    fn serializable(&self) -> Option<&dyn erased_serde::Serialize>;
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

pub(crate) struct Typed<E> {
    pub(crate) attrs: Attributes,
    pub(crate) value: E,
}

struct Encoded {
    attrs: Attributes,
    bytes: Bytes,
}

impl<E: crate::Event> Carried for Typed<E> {
    fn attrs(&self) -> &Attributes {
        &self.attrs
    }
    fn bytes(&self) -> Option<&Bytes> {
        None
    }
    fn value(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.value)
    }
    fn serializable(&self) -> Option<&dyn erased_serde::Serialize> {
        Some(&self.value)
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

impl Carried for Encoded {
    fn attrs(&self) -> &Attributes {
        &self.attrs
    }
    fn bytes(&self) -> Option<&Bytes> {
        Some(&self.bytes)
    }
    fn value(&self) -> Option<&(dyn Any + Send + Sync)> {
        None
    }
    fn serializable(&self) -> Option<&dyn erased_serde::Serialize> {
        None
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// An event on the move: [`Attributes`] and a payload, behind one shared
/// pointer, so cloning an envelope for every subscriber costs no allocation.
///
/// On the in-process transport the payload is the typed value itself; on a
/// broker it is bytes in the `datacontenttype`.
#[derive(Clone)]
pub struct Envelope(pub(crate) Arc<dyn Carried>);

impl Envelope {
    /// An envelope around already-encoded payload bytes (what a broker
    /// transport builds from a received message).
    pub fn from_bytes(attrs: Attributes, payload: impl Into<Bytes>) -> Self {
        Self(Arc::new(Encoded {
            attrs,
            bytes: payload.into(),
        }))
    }

    pub(crate) fn typed<E: crate::Event>(attrs: Attributes, value: E) -> Self {
        Self(Arc::new(Typed { attrs, value }))
    }

    /// The attributes.
    pub fn attributes(&self) -> &Attributes {
        self.0.attrs()
    }

    /// The `id` attribute.
    pub fn id(&self) -> Uuid {
        self.0.attrs().id
    }

    /// The `type` attribute: the event name.
    pub fn event_type(&self) -> &str {
        &self.0.attrs().event_type
    }

    /// The `dataversion` attribute.
    pub fn data_version(&self) -> u32 {
        self.0.attrs().data_version
    }

    /// The encoded payload, if this envelope carries bytes. Envelopes given
    /// to a transport that does not share typed values always do.
    pub fn payload_bytes(&self) -> Option<&Bytes> {
        self.0.bytes()
    }

    /// Whether the payload is a typed value shared in-process.
    pub fn is_typed(&self) -> bool {
        self.0.value().is_some()
    }

    pub(crate) fn value(&self) -> Option<&(dyn Any + Send + Sync)> {
        self.0.value()
    }

    /// The payload as bytes: shared when the envelope carries bytes,
    /// encoded with `codec` when it carries a typed value.
    pub fn encode_payload(&self, codec: &dyn crate::codec::Codec) -> Result<Bytes> {
        match (self.0.bytes(), self.0.serializable()) {
            (Some(bytes), _) => Ok(bytes.clone()),
            (None, Some(value)) => codec.encode(value).map(Bytes::from),
            (None, None) => Err(Error::new(ErrorKind::Encode, "envelope has no payload")),
        }
    }

    pub(crate) fn downcast<E: crate::Event>(&self) -> Option<Arc<Typed<E>>> {
        self.0.clone().into_any().downcast::<Typed<E>>().ok()
    }
}

impl fmt::Debug for Envelope {
    /// Shows attributes and the payload size, never the payload itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Envelope");
        d.field("attributes", self.attributes());
        match self.payload_bytes() {
            Some(b) => d.field("payload", &format_args!("<{} bytes>", b.len())),
            None => d.field("payload", &format_args!("<typed value>")),
        };
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_headers_round_trip() {
        let mut a = Attributes::new("orders", "orders.order_placed", 3);
        a.subject = Some("order-7".into());
        a.partition_key = Some("customer-1".into());
        a.correlation_id = Some("corr".into());
        a.causation_id = Some("cause".into());
        a.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        a.headers.push(("x-tenant".into(), "acme".into()));
        // Wire time keeps microseconds at least; compare via the parsed value.
        let wire = a.to_wire_headers("ce_");
        assert!(wire
            .iter()
            .any(|(n, v)| n == "ce_id" && *v == a.id.to_string()));
        let back = Attributes::from_wire_headers(
            &["ce_"],
            wire.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            |_| false,
        )
        .unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn foreign_message_is_a_decode_error() {
        let err =
            Attributes::from_wire_headers(&["ce-"], [("content-type", "text/plain")], |_| false)
                .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.message().starts_with("missing ce-id"), "{err}");
    }

    #[test]
    fn a_foreign_id_is_kept_and_gives_one_uuid_per_source_and_id() {
        let read = |source: &str, id: &str| {
            Attributes::from_wire_headers(
                &["ce-"],
                [
                    ("ce-id", id),
                    ("ce-source", source),
                    ("ce-type", "a.b"),
                    ("ce-dataversion", "1"),
                ],
                |_| false,
            )
            .unwrap()
        };
        let a = read("shop", "order-42");
        assert_eq!(a.foreign_id.as_deref(), Some("order-42"));
        assert_eq!(a.id, read("shop", "order-42").id, "copies share the id");
        assert_ne!(a.id, read("other-shop", "order-42").id);
        assert_eq!(a.id, Attributes::foreign_uuid("shop", "order-42"));
        // It goes back on the wire as it came.
        let wire = a.to_wire_headers("ce-");
        assert!(wire.iter().any(|(n, v)| n == "ce-id" && v == "order-42"));
        // A UUID id is the id.
        let uuid = uuid::Uuid::now_v7();
        let b = read("shop", &uuid.to_string());
        assert_eq!((b.id, b.foreign_id), (uuid, None));
    }

    #[test]
    fn inbound_attributes_are_as_strict_as_outbound_ones() {
        let read = |extra: (&'static str, &'static str)| {
            Attributes::from_wire_headers(
                &["cloudEvents:", "cloudEvents_"],
                [
                    ("cloudEvents_id", "e-1"),
                    ("cloudEvents:type", "a.b"),
                    ("cloudEvents_dataversion", "1"),
                    extra,
                ],
                |_| false,
            )
        };
        for bad in [
            ("cloudEvents_correlationid", "c\r\nx-forged: 1"),
            ("cloudEvents:subject", "a\nb"),
            ("cloudEvents_source", "nul\0"),
        ] {
            let err = read(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Decode);
            assert!(!err.message().contains("forged"), "no value quoted: {err}");
        }
        // A user header that could not be sent again is left out.
        let attrs = read(("x-note", "a\r\nb")).unwrap();
        assert!(attrs.headers.is_empty(), "{:?}", attrs.headers);
        // Both AMQP prefixes are read.
        assert_eq!(read(("x-ok", "fine")).unwrap().event_type, "a.b");
    }

    #[test]
    fn debug_never_shows_payload() {
        let env = Envelope::from_bytes(Attributes::new("m", "m.e", 1), &b"secret-token"[..]);
        let shown = format!("{env:?}");
        assert!(!shown.contains("secret-token"));
        assert!(shown.contains("<12 bytes>"));
    }
}
