//! The wire binding: the CloudEvents Kafka binding (binary mode), the
//! attempt header, dead-letter headers and the redrive filter.

use rdkafka::message::{Header, Headers, OwnedHeaders};
use seambus::transport::engine::Verdict;
use seambus::transport::support::{dead_letter_fields, starts_with_ignore_case};
use seambus::transport::GroupId;
use seambus::{Attributes, Envelope, Result};

/// Prefix of CloudEvents attribute headers (binary content mode).
pub(crate) const CE_PREFIX: &str = "ce_";
/// The header that carries `datacontenttype`.
pub(crate) const CONTENT_TYPE: &str = "content-type";

/// Headers Seambus adds that are not user headers.
pub(crate) fn is_transport_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(CONTENT_TYPE) || starts_with_ignore_case(name, "seambus-")
}

/// The envelope's attributes as Kafka headers.
pub(crate) fn headers_of(attrs: &Attributes) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(12 + attrs.headers.len());
    for (name, value) in attrs.to_wire_headers(CE_PREFIX) {
        let name = if name == "ce_datacontenttype" {
            CONTENT_TYPE.to_owned()
        } else {
            name
        };
        headers = headers.insert(Header {
            key: &name,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// Header pairs with text values (others are skipped).
pub(crate) fn header_pairs(headers: Option<&impl Headers>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .iter()
        .filter_map(|h| {
            let value = std::str::from_utf8(h.value.unwrap_or_default()).ok()?;
            Some((h.key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Reads an envelope back from a record's headers and payload.
pub(crate) fn envelope_of(pairs: &[(String, String)], payload: &[u8]) -> Result<Envelope> {
    let mut attrs = Attributes::from_wire_headers(
        &[CE_PREFIX],
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        is_transport_header,
    )?;
    if let Some((_, ct)) = pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(CONTENT_TYPE))
    {
        attrs.data_content_type = ct.clone().into();
    }
    Ok(Envelope::from_bytes(attrs, payload.to_vec()))
}

/// Header naming the only group a redriven event is for.
pub(crate) const REDRIVE_GROUP: &str = "seambus-redrive-group";
/// Prefix of the dead-letter headers.
pub(crate) const DL_PREFIX: &str = "seambus-dl-";
/// The attempt a record carries (absent: 1).
pub(crate) const ATTEMPT: &str = "seambus-attempt";

/// The attempt a record carries.
pub(crate) fn attempt_of(pairs: &[(String, String)]) -> u32 {
    pairs
        .iter()
        .find(|(k, _)| k == ATTEMPT)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1)
}

/// Whether a record is a redrive meant for another consumer group.
pub(crate) fn for_other_group(pairs: &[(String, String)], group_id: &str) -> bool {
    pairs
        .iter()
        .any(|(k, target)| k == REDRIVE_GROUP && target != group_id)
}

/// A dead letter's headers: the record's own plus the `seambus-dl-*` ones.
pub(crate) fn dead_letter_headers(
    pairs: &[(String, String)],
    verdict: &Verdict,
    group: &GroupId,
    origin: (&str, i32, i64),
    id: uuid::Uuid,
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(pairs.len() + 9);
    // Without its payload, only the event's attributes stay.
    let kept = pairs
        .iter()
        .filter(|(k, _)| !verdict.without_payload || k.starts_with("ce_") || k == "content-type");
    for (k, v) in kept {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let (topic, partition, offset) = origin;
    let origin = [
        ("topic", topic.to_owned()),
        ("partition", partition.to_string()),
        ("offset", offset.to_string()),
    ];
    for (name, value) in dead_letter_fields(verdict, group, id).iter().chain(&origin) {
        let key = format!("{DL_PREFIX}{name}");
        headers = headers.insert(Header {
            key: &key,
            value: Some(value.as_bytes()),
        });
    }
    headers
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
        let pairs = header_pairs(Some(&headers));
        assert!(pairs
            .iter()
            .any(|(k, v)| k == CONTENT_TYPE && v == "application/json"));
        let env = envelope_of(&pairs, b"{}").unwrap();
        assert_eq!(env.attributes(), &attrs);
    }

    #[test]
    fn non_ascii_header_names_are_user_headers() {
        assert!(!is_transport_header("seambusé"));
        assert!(!is_transport_header("é"));
        assert!(is_transport_header("Seambus-attempt"));
    }

    #[test]
    fn a_plain_record_is_not_an_envelope() {
        assert_eq!(
            envelope_of(&[], b"x").unwrap_err().kind(),
            ErrorKind::Decode
        );
    }
}
