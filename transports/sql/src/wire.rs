//! The row binding: an envelope's attributes and user headers are the
//! `headers` column, a JSON list of `[name, value]` pairs in CloudEvents
//! binary mode with the prefix `ce_`; the payload is the `payload` column
//! as it was encoded.

use bytes::Bytes;
use seambus::transport::support::dead_letter_from;
use seambus::transport::{DeadLetter, GroupId};
use seambus::{Attributes, Envelope};

/// The prefix of CloudEvents attributes in the `headers` column.
pub(crate) const PREFIX: &str = "ce_";

/// The `headers` column of an event.
pub(crate) fn headers_of(attrs: &Attributes) -> String {
    let pairs = attrs.to_wire_headers(PREFIX);
    serde_json::to_string(&pairs).expect("a list of string pairs is JSON")
}

fn pairs_of(headers: &str) -> Result<Vec<(String, String)>, String> {
    // The error names where the column stops being a list of pairs, never
    // what it holds.
    serde_json::from_str(headers).map_err(|e| {
        format!(
            "the headers column is not a JSON list of [name, value] pairs (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// The envelope of a row, or why the row is not one.
pub(crate) fn envelope_of(headers: &str, payload: Vec<u8>) -> Result<Envelope, String> {
    let pairs = pairs_of(headers)?;
    let attrs = Attributes::from_wire_headers(
        &[PREFIX],
        pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        |_| false,
    )
    .map_err(|e| e.message().to_owned())?;
    Ok(Envelope::from_bytes(attrs, Bytes::from(payload)))
}

/// One row of the dead-letter table.
pub(crate) struct DeadRow {
    pub(crate) id: i64,
    pub(crate) headers: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) reason: String,
    pub(crate) error: String,
    pub(crate) attempts: i64,
    /// Milliseconds since the epoch.
    pub(crate) dead_at: i64,
}

impl DeadRow {
    /// The dead letter this row stores (one whose row is not an envelope
    /// is described by its columns, with version 0).
    pub(crate) fn dead_letter(&self, group: &GroupId) -> DeadLetter {
        let envelope = envelope_of(&self.headers, self.payload.clone())
            .map_err(|why| seambus::Error::new(seambus::ErrorKind::Decode, why));
        let time = chrono::DateTime::from_timestamp_millis(self.dead_at).map(|t| t.to_rfc3339());
        dead_letter_from(group, envelope, &self.payload, |name| match name {
            "reason" => Some(self.reason.clone()),
            "error" => Some(self.error.clone()),
            "attempts" => Some(self.attempts.to_string()),
            "time" => time.clone(),
            "origin" => Some(format!("dead-letter row {}", self.id)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_through_its_row() {
        let mut attrs = Attributes::new("orders", "orders.order_placed", 2);
        attrs.partition_key = Some("order-7".into());
        attrs.headers.push(("tenant".into(), "acme".into()));
        let row = headers_of(&attrs);
        let back = envelope_of(&row, b"{}".to_vec()).expect("decodes");
        assert_eq!(back.attributes(), &attrs);
        assert_eq!(back.payload_bytes().map(|b| &b[..]), Some(&b"{}"[..]));
    }

    #[test]
    fn a_bad_headers_column_is_named_without_its_contents() {
        let why = envelope_of(r#"{"secret-value": 1}"#, vec![]).unwrap_err();
        assert!(why.contains("headers column"), "{why}");
        assert!(!why.contains("secret-value"), "{why}");
        let why = envelope_of(r#"[["ce_type", "x"]]"#, vec![]).unwrap_err();
        assert!(why.contains("id"), "{why}");
    }
}
