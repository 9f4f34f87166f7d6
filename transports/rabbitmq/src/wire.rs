//! The wire binding: the CloudEvents AMQP binding, the attempt and
//! dead-letter headers; and confirmed, mandatory publishes (which tell a
//! routed message from an unrouted one).

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use seambus::transport::support::{dead_letter_fields, starts_with_ignore_case};
use seambus::{Attributes, Envelope, Error, ErrorKind, Result};
use tokio::time::Instant;

use crate::connection::Connector;
use crate::error::amqp_error;

/// Prefix of CloudEvents attributes among the application properties.
pub(crate) const CE_PREFIX: &str = "cloudEvents:";
/// The attribute prefixes read: the AMQP binding's two (`cloudEvents:`,
/// and `cloudEvents_`, which the current spec prefers), and the `ce-` of
/// the CloudEvents SDKs' RabbitMQ binding.
const READ_PREFIXES: [&str; 3] = [CE_PREFIX, "cloudEvents_", "ce-"];
/// The attempt number of the next delivery.
pub(crate) const ATTEMPT: &str = "x-seambus-attempt";
/// Prefix of the dead-letter headers.
pub(crate) const DL_PREFIX: &str = "x-seambus-dl-";

/// How often a quorum queue has delivered this message, this delivery
/// included (its `x-delivery-count` counts the earlier ones); `None` on a
/// classic queue, which does not count.
pub(crate) fn delivered_of(properties: &BasicProperties) -> Option<u32> {
    let count = properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-delivery-count")
        .and_then(value_text)?
        .parse::<u32>()
        .ok()?;
    Some(count.saturating_add(1))
}

/// Headers RabbitMQ or Seambus add, which are not user headers.
pub(crate) fn is_transport_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("x-seambus-")
        || lower == "x-death"
        || lower == "x-delivery-count"
        || lower.starts_with("x-first-death-")
        || lower.starts_with("x-last-death-")
}

/// The properties with their headers edited.
pub(crate) fn with_headers(
    properties: &BasicProperties,
    edit: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    edit(&mut headers);
    properties.clone().with_headers(headers)
}

/// The properties of a retry copy: attempt `next`, waiting `delay`.
pub(crate) fn retry_properties(
    properties: &BasicProperties,
    next: u32,
    delay: std::time::Duration,
) -> BasicProperties {
    with_headers(properties, |h| {
        h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(next)));
    })
    .with_expiration(delay.as_millis().max(1).to_string().into())
}

/// The properties of a dead letter: the message's own plus the
/// `x-seambus-dl-*` headers.
pub(crate) fn dead_letter_properties(
    properties: &BasicProperties,
    verdict: &seambus::transport::engine::Verdict,
    group: &seambus::transport::GroupId,
    routing_key: &str,
    id: uuid::Uuid,
) -> BasicProperties {
    with_headers(properties, |h| {
        let dl = |name: &str| ShortString::from(format!("{DL_PREFIX}{name}"));
        for (name, value) in dead_letter_fields(verdict, group, id) {
            h.insert(dl(name), text(&value));
        }
        // A number, as AMQP has them.
        h.insert(
            dl("attempts"),
            AMQPValue::LongLongInt(i64::from(verdict.attempts)),
        );
        h.insert(dl("routing-key"), text(routing_key));
    })
}

pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A header value as text, when it is text or a number.
pub(crate) fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortUInt(n) => Some(n.to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        // An AMQP timestamp (seconds since the epoch), which the CloudEvents
        // AMQP binding allows for `time`.
        AMQPValue::Timestamp(t) => i64::try_from(*t)
            .ok()
            .and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339()),
        _ => None,
    }
}

/// Message properties of an envelope: `message_id` = id, `content_type` =
/// `datacontenttype`, persistent, `cloudEvents:*` application properties
/// for the other attributes, user headers as they are.
pub(crate) fn properties_of(attrs: &Attributes, attempt: u32) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in attrs.to_wire_headers(CE_PREFIX) {
        if name != "cloudEvents:datacontenttype" {
            headers.insert(ShortString::from(name), text(&value));
        }
    }
    headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt)));
    BasicProperties::default()
        .with_message_id(attrs.wire_id().into())
        .with_content_type(attrs.data_content_type.as_ref().into())
        .with_delivery_mode(2)
        .with_timestamp(attrs.time.timestamp().max(0) as u64)
        .with_type(attrs.event_type.as_ref().into())
        .with_app_id(attrs.source.as_ref().into())
        .with_headers(headers)
}

/// Reads an envelope and the attempt number back from a message.
pub(crate) fn envelope_of(properties: &BasicProperties, data: &[u8]) -> (Result<Envelope>, u32) {
    let empty = FieldTable::default();
    let headers = properties.headers().as_ref().unwrap_or(&empty);
    let attempt = headers
        .inner()
        .get(ATTEMPT)
        .and_then(value_text)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let pairs: Vec<(String, String)> = headers
        .inner()
        .iter()
        .filter_map(|(k, v)| value_text(v).map(|v| (k.as_str().to_owned(), v)))
        .collect();
    let parsed = Attributes::from_wire_headers(
        &READ_PREFIXES,
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        is_transport_header,
    )
    .map(|mut attrs| {
        if let Some(ct) = properties.content_type() {
            attrs.data_content_type = ct.as_str().to_owned().into();
        }
        // No `time` attribute: the message's own timestamp, if it has one.
        let has_time = pairs.iter().any(|(k, _)| {
            READ_PREFIXES.iter().any(|p| {
                k.len() == p.len() + 4
                    && starts_with_ignore_case(k, p)
                    && k[p.len()..].eq_ignore_ascii_case("time")
            })
        });
        if let (false, Some(t)) = (has_time, properties.timestamp()) {
            if let Some(t) = i64::try_from(*t)
                .ok()
                .and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0))
            {
                attrs.time = t;
            }
        }
        Envelope::from_bytes(attrs, data.to_vec())
    });
    (parsed, attempt)
}

/// Where a confirmed publish went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Into at least one queue.
    Queued,
    /// Confirmed, but no queue is bound to the routing key: the broker
    /// returned it (as `mandatory` asks) and stored it nowhere.
    Unrouted,
}

/// Publishes and waits for the broker's confirm, for a message that must
/// reach a queue (a retry copy, a dead letter, a redrive): an unroutable
/// one (its queue is gone) is an error. Connection and channel losses are
/// retried until `publish_timeout`.
pub(crate) async fn publish_confirmed(
    connector: &Connector,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
    timeout: std::time::Duration,
) -> Result<()> {
    match publish_routed(connector, exchange, routing_key, payload, properties, timeout).await? {
        Routed::Queued => Ok(()),
        Routed::Unrouted => Err(Error::new(
            ErrorKind::Other,
            format!(
                "unroutable: no queue is bound to `{routing_key}` on exchange `{exchange}` (its queue was deleted?)"
            ),
        )),
    }
}

/// Publishes and waits for the broker's confirm; says whether a queue took
/// the message ([`Routed::Unrouted`] is not an error here: publishing an
/// event that no group subscribes to is Ok). Connection and channel losses
/// are retried until `publish_timeout`.
pub(crate) async fn publish_routed(
    connector: &Connector,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
    timeout: std::time::Duration,
) -> Result<Routed> {
    let deadline = Instant::now() + timeout;
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        // Taken again on every try: a lane given up meanwhile is replaced.
        let lane = connector.lane(exchange, routing_key);
        let attempt = async {
            let channel = connector.publisher(&lane, Some(deadline)).await?;
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties.clone(),
                )
                .await
                .map_err(|e| amqp_error("publish", e))?;
            match confirm
                .await
                .map_err(|e| amqp_error("publisher confirm", e))?
            {
                Confirmation::Ack(None) => Ok(Routed::Queued),
                Confirmation::Ack(Some(returned)) => {
                    let reply = &returned.reply_text;
                    tracing::trace!(routing_key, exchange, %reply, "returned by the broker");
                    Ok(Routed::Unrouted)
                }
                Confirmation::Nack(_) => Err(Error::new(
                    ErrorKind::Connection,
                    format!("the broker refused to store a message for `{routing_key}`"),
                )),
                Confirmation::NotRequested => Err(Error::new(
                    ErrorKind::Other,
                    "publisher confirms are not enabled on the channel",
                )),
            }
        };
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(routed)) => return Ok(routed),
            Ok(Err(e)) => e,
            Err(_) => {
                // The connection may be blocked by the queue that did not
                // confirm: the next publish here gets a fresh one.
                connector.discard(&lane);
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "publish to `{routing_key}` on exchange `{exchange}` not confirmed within {timeout:?}: \
                         a queue it routes to is not taking messages (a quorum queue without a leader, \
                         a blocked or full queue?); publishes to other destinations are not held up"
                    ),
                ));
            }
        };
        if !error.is_retryable() || Instant::now() + pause >= deadline {
            return Err(error);
        }
        tracing::debug!(routing_key, %error, "publish failed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip() {
        let mut attrs = Attributes::new("orders", "orders.order_placed", 2);
        attrs.partition_key = Some("k".into());
        attrs.headers.push(("x-tenant".into(), "acme".into()));
        let props = properties_of(&attrs, 3);
        let (env, attempt) = envelope_of(&props, b"{}");
        assert_eq!(env.unwrap().attributes(), &attrs);
        assert_eq!(attempt, 3);
    }

    #[test]
    fn a_plain_message_is_not_an_envelope() {
        let (env, attempt) = envelope_of(&BasicProperties::default(), b"hello");
        assert_eq!(env.unwrap_err().kind(), ErrorKind::Decode);
        assert_eq!(attempt, 1);
    }
}
