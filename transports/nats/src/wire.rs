//! The wire binding: subjects and consumer names, the CloudEvents header
//! binding, the attempt header, dead-letter headers and the redrive filter.

use async_nats::header::HeaderMap;
use bytes::Bytes;
use seambus::transport::support::{dead_letter_fields, dead_letter_from, starts_with_ignore_case};
use seambus::transport::{engine::Verdict, DeadLetter, GroupId};
use seambus::{Attributes, Envelope, Result};

/// Prefix of the CloudEvents attribute headers.
pub(crate) const CE_PREFIX: &str = "ce-";
/// The header that carries `datacontenttype`.
pub(crate) const CONTENT_TYPE: &str = "content-type";
/// JetStream's de-duplication header.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";

/// The subject of an event: `<prefix>.<event name>`.
pub(crate) fn event_subject(prefix: &str, event_type: &str) -> String {
    format!("{prefix}.{event_type}")
}

/// Headers that belong to the transport, not to the user.
pub(crate) fn is_transport_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(CONTENT_TYPE)
        || starts_with_ignore_case(name, "nats-")
        || starts_with_ignore_case(name, "seambus-")
}

/// The envelope's attributes as NATS headers: `ce-<attribute>` for each
/// CloudEvents attribute, `content-type` for `datacontenttype`, user headers
/// as they are.
pub(crate) fn headers_of(attrs: &Attributes) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in attrs.to_wire_headers(CE_PREFIX) {
        if name == "ce-datacontenttype" {
            headers.insert(CONTENT_TYPE, value);
        } else {
            headers.insert(name.as_str(), value);
        }
    }
    headers
}

/// Reads an envelope back from a message's headers and payload.
pub(crate) fn envelope_of(headers: Option<&HeaderMap>, payload: Bytes) -> Result<Envelope> {
    let empty = HeaderMap::new();
    let headers = headers.unwrap_or(&empty);
    let pairs = headers.iter().flat_map(|(name, values)| {
        values
            .iter()
            .map(move |v| (AsRef::<str>::as_ref(name), AsRef::<str>::as_ref(v)))
    });
    let mut attrs = Attributes::from_wire_headers(&[CE_PREFIX], pairs, is_transport_header)?;
    if let Some(ct) = headers.get(CONTENT_TYPE) {
        attrs.data_content_type = ct.as_str().to_owned().into();
    }
    Ok(Envelope::from_bytes(attrs, payload))
}

/// Header naming the only group a redriven event is for.
pub(crate) const REDRIVE_GROUP: &str = "seambus-redrive-group";
/// Prefix of the dead-letter headers.
pub(crate) const DL_PREFIX: &str = "seambus-dl-";
pub(crate) const DL_SUBJECT: &str = "seambus-dl-subject";

/// The durable consumer of a group. Consumer names cannot hold `.`, and
/// our names never hold `~`, so `.` becomes `~` and `~~` joins module and
/// subscription: distinct groups get distinct names.
pub(crate) fn consumer_name(group: &GroupId) -> String {
    format!(
        "{}~~{}",
        group.module().replace('.', "~"),
        group.subscription().replace('.', "~")
    )
}

/// The dead-letter subject of a group.
pub(crate) fn dead_letter_subject(prefix: &str, group: &GroupId) -> String {
    format!("{prefix}_dlq.{}", consumer_name(group))
}

/// The attempt this delivery is (absent: 1). Set by nothing but a redrive
/// today, so that the server's redelivery count (which counts shutdowns)
/// is never taken for the attempt.
pub(crate) const ATTEMPT: &str = "seambus-attempt";

/// The attempt a message carries.
pub(crate) fn attempt_of(headers: Option<&HeaderMap>) -> u32 {
    headers
        .and_then(|h| h.get(ATTEMPT))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(1)
}

/// Whether a message is a redrive meant for another group (`consumer` is
/// this group's consumer name).
pub(crate) fn for_other_group(headers: Option<&HeaderMap>, consumer: &str) -> bool {
    headers
        .and_then(|h| h.get(REDRIVE_GROUP))
        .is_some_and(|target| target.as_str() != consumer)
}

/// The headers of a dead letter: the event's own (or the message's, when it
/// is not an envelope) plus the `seambus-dl-*` ones.
pub(crate) fn dead_letter_headers(
    envelope: Option<&Envelope>,
    original: Option<&HeaderMap>,
    verdict: &Verdict,
    group: &GroupId,
    subject: &str,
    msg_id: &str,
) -> HeaderMap {
    let mut headers = match envelope {
        Some(envelope) => headers_of(envelope.attributes()),
        None => original.cloned().unwrap_or_default(),
    };
    let id = envelope.map_or_else(uuid::Uuid::now_v7, Envelope::id);
    for (name, value) in dead_letter_fields(verdict, group, id) {
        headers.insert(format!("{DL_PREFIX}{name}"), value);
    }
    headers.insert(DL_SUBJECT, subject);
    headers.insert(MSG_ID, msg_id);
    headers
}

/// The headers of a redriven dead letter: the original ones without the
/// dead-letter headers, for `consumer`'s group only, attempt 1.
pub(crate) fn redrive_headers(stored: &HeaderMap, consumer: &str, msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in stored.iter() {
        let name: &str = name.as_ref();
        if starts_with_ignore_case(name, DL_PREFIX) || name.eq_ignore_ascii_case(ATTEMPT) {
            continue;
        }
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    headers.insert(MSG_ID, msg_id);
    headers.insert(REDRIVE_GROUP, consumer);
    headers
}

/// Reads a stored dead letter back.
pub(crate) fn dead_letter_of(group: &GroupId, headers: &HeaderMap, payload: Bytes) -> DeadLetter {
    dead_letter_from(
        group,
        envelope_of(Some(headers), payload.clone()),
        &payload,
        |name| {
            let header = match name {
                "origin" => DL_SUBJECT.to_owned(),
                name => format!("{DL_PREFIX}{name}"),
            };
            headers.get(header.as_str()).map(|v| v.as_str().to_owned())
        },
    )
}

/// Reads a header block as the server stores it (`NATS/1.0`, then one
/// `name: value` line each, continuation lines indented) by the rules the
/// client applies on delivery. Returns the headers it could read and, when
/// the client could not read the block, why (naming lines, never quoting
/// them: they may hold payload values).
pub(crate) fn read_header_block(raw: &[u8]) -> (HeaderMap, Option<String>) {
    use async_nats::header::{HeaderName, HeaderValue};
    use std::str::FromStr;
    let mut headers = HeaderMap::new();
    let Ok(text) = std::str::from_utf8(raw) else {
        return (headers, Some("its header block is not UTF-8".into()));
    };
    let mut lines = text.lines().enumerate().peekable();
    if !lines
        .next()
        .is_some_and(|(_, version)| version.starts_with("NATS/1.0"))
    {
        return (
            headers,
            Some("its header block does not start with NATS/1.0".into()),
        );
    }
    let mut unreadable = Vec::new();
    while let Some((n, line)) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let mut value = String::new();
        let name = line.split_once(':').and_then(|(name, first)| {
            value.push_str(first.trim_start());
            HeaderName::from_str(name).ok()
        });
        while let Some((_, more)) = lines.next_if(|(_, l)| l.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        match (name, HeaderValue::from_str(value.trim_end())) {
            (Some(name), Ok(value)) => headers.append(name, value),
            _ => unreadable.push((n + 1).to_string()),
        }
    }
    let why = (!unreadable.is_empty()).then(|| {
        format!(
            "its header block cannot be read (line {} not a `name: value` header); dropped from the dead letter",
            unreadable.join(", ")
        )
    });
    (headers, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seambus::ErrorKind;

    #[test]
    fn headers_round_trip() {
        let mut attrs = Attributes::new("orders", "orders.order_placed", 2);
        attrs.partition_key = Some("k".into());
        attrs.headers.push(("x-tenant".into(), "acme".into()));
        let headers = headers_of(&attrs);
        assert_eq!(
            headers.get(CONTENT_TYPE).map(|v| v.as_str()),
            Some("application/json")
        );
        let env = envelope_of(Some(&headers), Bytes::from_static(b"{}")).unwrap();
        assert_eq!(env.attributes(), &attrs);
    }

    #[test]
    fn header_names_are_never_sliced_inside_a_character() {
        // 'é' straddles byte 5 and byte 8: slicing there panicked.
        for name in ["abcdé", "abcdéfg", "seambuséé", "ñ", "nats-é"] {
            let _ = is_transport_header(name);
        }
        assert!(is_transport_header("NATS-Msg-Id"));
        assert!(is_transport_header("Seambus-attempt"));
        assert!(!is_transport_header("x-tenant"));
        let mut stored = HeaderMap::new();
        stored.insert("seambus-dl-reason", "rejected");
        stored.insert("x-tenant", "acme");
        let out = redrive_headers(&stored, "m~~s", "id-1");
        assert!(out.get("seambus-dl-reason").is_none());
        assert_eq!(out.get("x-tenant").map(|v| v.as_str()), Some("acme"));
        assert_eq!(out.get(REDRIVE_GROUP).map(|v| v.as_str()), Some("m~~s"));
    }

    #[test]
    fn a_plain_message_is_not_an_envelope() {
        let err = envelope_of(None, Bytes::from_static(b"hello")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
    }

    #[test]
    fn header_blocks_are_read_by_the_clients_rules() {
        let (h, why) = read_header_block(b"NATS/1.0\r\nce-id: 1\r\nx-long: a\r\n b\r\n\r\n");
        assert_eq!(why, None);
        assert_eq!(h.get("ce-id").map(|v| v.as_str()), Some("1"));
        assert_eq!(h.get("x-long").map(|v| v.as_str()), Some("a b"));
        let (h, why) = read_header_block(b"NATS/1.0\r\nce-id: 1\r\nsecret value\r\n\r\n");
        let why = why.expect("unreadable");
        assert!(why.contains("line 3"), "{why}");
        assert!(!why.contains("secret"), "{why}");
        assert_eq!(h.get("ce-id").map(|v| v.as_str()), Some("1"));
        assert!(read_header_block(b"HTTP/1.1\r\n\r\n").1.is_some());
        assert!(read_header_block(b"NATS/1.0\r\n\xff: x\r\n\r\n")
            .1
            .is_some());
    }
}
