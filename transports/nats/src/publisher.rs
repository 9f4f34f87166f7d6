//! Publishing: subjects, the CloudEvents header binding, confirmed publish.

use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use seambus::{Attributes, Envelope, Error, ErrorKind, Result};
use tokio::time::Instant;

use crate::error::connection_error;

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
        || name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-")
        || name.len() >= 8 && name[..8].eq_ignore_ascii_case("seambus-")
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
    let mut attrs = Attributes::from_wire_headers(CE_PREFIX, pairs, is_transport_header)?;
    if let Some(ct) = headers.get(CONTENT_TYPE) {
        attrs.data_content_type = ct.as_str().to_owned().into();
    }
    Ok(Envelope::from_bytes(attrs, payload))
}

fn publish_error(subject: &str, err: async_nats::jetstream::context::PublishError) -> Error {
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            Error::new(ErrorKind::PayloadTooLarge, format!("{subject}: {err}")).with_source(err)
        }
        // Also what a server answers while JetStream is still recovering its
        // streams after a restart, so it is retried until the timeout.
        PublishErrorKind::StreamNotFound => connection_error(
            format!(
                "no stream takes subject {subject} (JetStream starting up, or the stream was deleted)"
            ),
            err,
        ),
        _ => connection_error(format!("publish to {subject}"), err),
    }
}

/// Publishes one message and waits for the stream's ack. Failures that a
/// retry can fix (timeouts, a connection being re-established) are retried
/// with the same `Nats-Msg-Id` until `timeout`, so the server keeps exactly
/// one copy.
pub(crate) async fn publish_confirmed(
    js: &async_nats::jetstream::Context,
    subject: &str,
    msg_id: &str,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let message = PublishMessage::build()
            .payload(payload.clone())
            .headers(headers.clone())
            .message_id(msg_id);
        let attempt = async {
            js.send_publish(subject.to_owned(), message)
                .await?
                .await
                .map(|_ack| ())
        };
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => publish_error(subject, e),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("publish to {subject} not confirmed within {timeout:?}"),
                ))
            }
        };
        if !error.is_retryable() || Instant::now() + pause >= deadline {
            return Err(error);
        }
        tracing::debug!(subject, %error, "publish failed; retrying with the same message id");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_plain_message_is_not_an_envelope() {
        let err = envelope_of(None, Bytes::from_static(b"hello")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
    }
}
