//! Consuming: one durable pull consumer per group, fed to the core delivery
//! engine ([`seambus::transport::engine`]), which keeps per-key order,
//! retries and attempts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::response::Response;
use bytes::Bytes;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures_util::StreamExt;
use seambus::transport::engine::{self, Fetch, Fetched, Limits, Verdict};
use seambus::transport::{Consumer, DeliveryHandler, SubscriptionSpec};
use seambus::{Envelope, Error, ErrorKind, Result};

use crate::error::api_error;
use crate::publisher::publish_confirmed;
use crate::wire::{
    attempt_of, consumer_name, dead_letter_headers, dead_letter_subject, envelope_of,
    event_subject, for_other_group, read_header_block,
};
use crate::Inner;

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    spec: SubscriptionSpec,
    handler: Arc<dyn DeliveryHandler>,
) -> Result<Box<dyn Consumer>> {
    let name = consumer_name(&spec.group);
    let config = &inner.config;
    let stream = inner
        .js
        .get_stream(&config.stream.name)
        .await
        .map_err(|e| api_error("get stream", e))?;
    // Before the consumer exists, so that no advisory is missed. A queue
    // subscription: one process of the group reads each.
    let advisories = inner
        .client
        .queue_subscribe(
            format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{name}",
                config.stream.name
            ),
            name.clone(),
        )
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("subscribe to advisories: {e}"),
            )
        })?;
    // Created, or updated to these settings when it exists.
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: event_subject(&config.subject_prefix, &spec.event_type),
            ack_policy: AckPolicy::Explicit,
            // A group receives what is published after it first exists
            // (an existing consumer keeps its position).
            deliver_policy: DeliverPolicy::New,
            ack_wait: config.ack_wait,
            // One more than the limit: the engine dead-letters that
            // delivery; a message the client cannot read stops there and
            // comes back through the advisory.
            max_deliver: i64::from(config.delivery_limit) + 1,
            max_ack_pending: config.max_in_flight as i64,
            ..Default::default()
        })
        .await
        .map_err(|e| api_error(&format!("create consumer {name}"), e))?;
    let sink = Arc::new(NatsSink {
        inner: inner.clone(),
        dead_letter_subject: dead_letter_subject(&config.subject_prefix, &spec.group),
        group: spec.group.clone(),
        name: name.clone(),
    });
    let source = NatsSource {
        inner: inner.clone(),
        consumer,
        messages: None,
        advisories,
        given_up: VecDeque::new(),
        name,
    };
    let limits =
        Limits::new(config.max_in_flight).with_delivery_limit(Some(config.delivery_limit.max(1)));
    Ok(engine::spawn(
        &inner.host,
        spec,
        handler,
        source,
        sink,
        limits,
    ))
}

/// A message this process holds.
// The large variant is the one of every message: boxing it would cost an
// allocation per message for the sake of a rare one.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Held {
    /// Delivered by the group's consumer, with its stream sequence.
    Delivered {
        message: jetstream::Message,
        stream_seq: u64,
    },
    /// One the server stopped delivering (its delivery limit), read from
    /// the stream as stored: nothing to settle on the consumer.
    GivenUp(Stored),
}

/// A message read from the stream by its sequence.
pub(crate) struct Stored {
    stream_seq: u64,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Held {
    fn stream_seq(&self) -> u64 {
        match self {
            Held::Delivered { stream_seq, .. } => *stream_seq,
            Held::GivenUp(stored) => stored.stream_seq,
        }
    }
}

struct NatsSource {
    inner: Arc<Inner>,
    consumer: jetstream::consumer::PullConsumer,
    messages: Option<jetstream::consumer::pull::Stream>,
    /// The server's advisories that it stopped delivering a message.
    advisories: async_nats::Subscriber,
    /// Stream sequences of those, to read and dead-letter (kept until
    /// done: fetch may be cancelled half-way).
    given_up: VecDeque<(u64, u32)>,
    name: String,
}

/// The part of a max-deliveries advisory this transport reads.
#[derive(serde::Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// The stream's answer to `STREAM.MSG.GET`.
#[derive(serde::Deserialize)]
struct StoredReply {
    message: StoredMessage,
}

#[derive(serde::Deserialize)]
struct StoredMessage {
    subject: String,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

/// JetStream's "no message found".
const NO_MESSAGE_FOUND: u64 = 10037;

impl NatsSource {
    /// Reads a message the server gave up delivering, as the engine's next
    /// message; `None` when it is gone (deleted, purged, aged out).
    async fn read_given_up(
        &self,
        stream_seq: u64,
        deliveries: u32,
    ) -> Result<Option<Fetched<Held>>> {
        use base64::Engine as _;
        let reply: Response<StoredReply> = self
            .inner
            .js
            .request(
                format!("STREAM.MSG.GET.{}", self.inner.config.stream.name),
                &serde_json::json!({ "seq": stream_seq }),
            )
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("read stream message {stream_seq}: {e}"),
                )
            })?;
        let stored = match reply {
            Response::Ok(reply) => reply.message,
            Response::Err { error } if error.error_code().0 == NO_MESSAGE_FOUND => return Ok(None),
            Response::Err { error } => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!("read stream message {stream_seq}: {error}"),
                ))
            }
        };
        let decode = |text: Option<String>| {
            base64::engine::general_purpose::STANDARD
                .decode(text.unwrap_or_default())
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Other,
                        format!("stream message {stream_seq} is not base64"),
                    )
                })
        };
        let (headers, unreadable) = read_header_block(&decode(stored.hdrs)?);
        let payload = Bytes::from(decode(stored.data)?);
        if for_other_group(Some(&headers), &self.name) {
            return Ok(None);
        }
        let envelope = match unreadable {
            Some(why) => Err(why),
            None => {
                envelope_of(Some(&headers), payload.clone()).map_err(|e| e.message().to_owned())
            }
        };
        let attempt = attempt_of(Some(&headers));
        Ok(Some(Fetched {
            token: Held::GivenUp(Stored {
                stream_seq,
                subject: stored.subject,
                headers,
                payload,
            }),
            envelope,
            attempt,
            delivered: Some(deliveries),
        }))
    }
}

#[async_trait]
impl engine::Source for NatsSource {
    type Token = Held;

    async fn fetch(&mut self) -> Result<Fetch<Held>> {
        loop {
            if let Some(&(stream_seq, deliveries)) = self.given_up.front() {
                let fetched = match self.read_given_up(stream_seq, deliveries).await {
                    Ok(fetched) => fetched,
                    // Asked again after a pause.
                    Err(e) if e.is_retryable() => return Err(e),
                    // No retry reads it: said, with where it stays.
                    Err(e) => {
                        tracing::warn!(
                            consumer = %self.name,
                            stream_seq,
                            error = %e,
                            "cannot read a message the server gave up delivering; it stays in the stream at this sequence"
                        );
                        None
                    }
                };
                self.given_up.pop_front();
                match fetched {
                    Some(fetched) => return Ok(Fetch::Message(fetched)),
                    None => continue,
                }
            }
            if self.messages.is_none() {
                let stream = self
                    .consumer
                    .stream()
                    .max_messages_per_batch(self.inner.config.max_in_flight)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(|e| Error::new(ErrorKind::Connection, format!("cannot pull: {e}")))?;
                self.messages = Some(stream);
            }
            let Some(stream) = self.messages.as_mut() else {
                continue;
            };
            let next = tokio::select! {
                biased;
                advisory = self.advisories.next() => {
                    match advisory.map(|a| serde_json::from_slice::<MaxDeliveries>(&a.payload)) {
                        Some(Ok(a)) => {
                            tracing::warn!(
                                consumer = %self.name,
                                stream_seq = a.stream_seq,
                                deliveries = a.deliveries,
                                "the server stopped delivering a message (its delivery limit); dead-lettering it from the stream"
                            );
                            let deliveries = u32::try_from(a.deliveries).unwrap_or(u32::MAX);
                            self.given_up.push_back((a.stream_seq, deliveries));
                        }
                        Some(Err(_)) => tracing::debug!(consumer = %self.name, "advisory not understood; ignored"),
                        None => {
                            return Err(Error::new(ErrorKind::Connection, "the advisory subscription ended"));
                        }
                    }
                    continue;
                }
                next = stream.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    tracing::debug!(consumer = %self.name, error = %e, "pull stream error; resuming");
                    continue;
                }
                None => {
                    self.messages = None;
                    continue;
                }
            };
            let (stream_seq, delivered) = match message.info() {
                Ok(info) => (info.stream_sequence, info.delivered),
                Err(e) => {
                    tracing::warn!(consumer = %self.name, error = %e, "message without JetStream metadata; ignored");
                    continue;
                }
            };
            let headers = message.headers.as_ref();
            if for_other_group(headers, &self.name) {
                let _ = message.ack().await;
                continue;
            }
            let envelope =
                envelope_of(headers, message.payload.clone()).map_err(|e| e.message().to_owned());
            let attempt = attempt_of(headers);
            return Ok(Fetch::Message(Fetched {
                token: Held::Delivered {
                    message,
                    stream_seq,
                },
                envelope,
                attempt,
                delivered: Some(u32::try_from(delivered.max(1)).unwrap_or(u32::MAX)),
            }));
        }
    }
}

struct NatsSink {
    inner: Arc<Inner>,
    dead_letter_subject: String,
    group: seambus::transport::GroupId,
    name: String,
}

#[async_trait]
impl engine::Sink for NatsSink {
    type Token = Held;

    async fn ack(&self, held: &Held) -> Result<()> {
        match held {
            Held::Delivered { message, .. } => message
                .ack()
                .await
                .map_err(|e| Error::new(ErrorKind::Connection, format!("ack: {e}"))),
            Held::GivenUp(_) => Ok(()),
        }
    }

    async fn release(&self, held: &Held) {
        match held {
            // Back to the server at once, for this group's next consumer.
            // The server counts a delivery; the attempt (a header) does not
            // change.
            Held::Delivered { message, .. } => {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
            // The server delivers it no more: it stays in the stream.
            Held::GivenUp(stored) => tracing::warn!(
                group = %self.group,
                stream = %self.inner.config.stream.name,
                stream_seq = stored.stream_seq,
                "stopped before dead-lettering a message the server gave up delivering; it stays in the stream at this sequence"
            ),
        }
    }

    fn keep_alive_every(&self) -> Option<Duration> {
        Some(self.inner.config.ack_wait / 3)
    }

    async fn keep_alive(&self, held: &Held) {
        if let Held::Delivered { message, .. } = held {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }

    /// Publishes the event to the group's dead-letter subject (confirmed),
    /// then terminates it.
    async fn dead_letter(
        &self,
        held: &Held,
        envelope: Option<&Envelope>,
        verdict: &Verdict,
    ) -> Result<()> {
        let msg_id = format!("dl:{}:{}", self.name, held.stream_seq());
        let (headers, payload, subject) = match held {
            Held::Delivered { message, .. } => (
                message.headers.as_ref(),
                &message.payload,
                message.subject.as_str(),
            ),
            Held::GivenUp(stored) => (
                Some(&stored.headers),
                &stored.payload,
                stored.subject.as_str(),
            ),
        };
        // Without its payload, only the dead-letter headers and the
        // event's attributes are kept.
        let (original, payload) = match verdict.without_payload {
            false => (headers, payload.clone()),
            true => (None, Bytes::new()),
        };
        let headers =
            dead_letter_headers(envelope, original, verdict, &self.group, subject, &msg_id);
        publish_confirmed(
            &self.inner.js,
            &self.dead_letter_subject,
            &msg_id,
            headers,
            payload,
            self.inner.config.publish_timeout,
        )
        .await?;
        let Held::Delivered { message, .. } = held else {
            return Ok(());
        };
        if let Err(e) = message.double_ack_with(AckKind::Term).await {
            // Stored already: the redelivery is dead-lettered again under
            // the same message id, so the server keeps one copy.
            tracing::warn!(group = %self.group, error = %e, "could not terminate a dead-lettered event");
        }
        Ok(())
    }
}
