//! Consuming: one durable pull consumer per group, fed to the core delivery
//! engine ([`seambus::transport::engine`]), which keeps per-key order,
//! retries and attempts.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures_util::StreamExt;
use seambus::transport::engine::{self, Fetch, Fetched, Host, Limits, Verdict};
use seambus::transport::{Consumer, DeliveryHandler, SubscriptionSpec};
use seambus::{Envelope, Error, ErrorKind, Result};

use crate::error::api_error;
use crate::publisher::publish_confirmed;
use crate::wire::{
    attempt_of, consumer_name, dead_letter_headers, dead_letter_subject, envelope_of,
    event_subject, for_other_group,
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
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: event_subject(&config.subject_prefix, &spec.event_type),
                ack_policy: AckPolicy::Explicit,
                // A group receives what is published after it first exists
                // (an existing consumer keeps its position).
                deliver_policy: DeliverPolicy::New,
                ack_wait: config.ack_wait,
                max_deliver: config.max_deliver,
                max_ack_pending: config.max_in_flight as i64,
                ..Default::default()
            },
        )
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
        name,
    };
    let limits =
        Limits::new(config.max_in_flight).with_delivery_limit(Some(config.delivery_limit.max(1)));
    let host = Host {
        subscriptions: &inner.subscriptions,
        closing: &inner.closing,
        stop: &inner.stop,
    };
    Ok(engine::spawn(host, spec, handler, source, sink, limits))
}

/// A message this process holds, with its stream sequence.
pub(crate) struct Held {
    message: jetstream::Message,
    stream_seq: u64,
}

struct NatsSource {
    inner: Arc<Inner>,
    consumer: jetstream::consumer::PullConsumer,
    messages: Option<jetstream::consumer::pull::Stream>,
    name: String,
}

#[async_trait]
impl engine::Source for NatsSource {
    type Token = Held;

    async fn fetch(&mut self) -> Result<Fetch<Held>> {
        loop {
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
            let message = match stream.next().await {
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
                token: Held {
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
        held.message
            .ack()
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, format!("ack: {e}")))
    }

    async fn release(&self, held: &Held) {
        // Back to the server at once, for this group's next consumer. The
        // server counts a delivery; the attempt (a header) does not change.
        let _ = held.message.ack_with(AckKind::Nak(None)).await;
    }

    fn keep_alive_every(&self) -> Option<Duration> {
        Some(self.inner.config.ack_wait / 3)
    }

    async fn keep_alive(&self, held: &Held) {
        let _ = held.message.ack_with(AckKind::Progress).await;
    }

    /// Publishes the event to the group's dead-letter subject (confirmed),
    /// then terminates it.
    async fn dead_letter(
        &self,
        held: &Held,
        envelope: Option<&Envelope>,
        verdict: &Verdict,
    ) -> Result<()> {
        let msg_id = format!("dl:{}:{}", self.name, held.stream_seq);
        // Without its payload, only the dead-letter headers and the
        // event's attributes are kept.
        let (original, payload) = match verdict.without_payload {
            false => (held.message.headers.as_ref(), held.message.payload.clone()),
            true => (None, bytes::Bytes::new()),
        };
        let headers = dead_letter_headers(
            envelope,
            original,
            verdict,
            &self.group,
            held.message.subject.as_str(),
            &msg_id,
        );
        publish_confirmed(
            &self.inner.js,
            &self.dead_letter_subject,
            &msg_id,
            headers,
            payload,
            self.inner.config.publish_timeout,
        )
        .await?;
        if let Err(e) = held.message.double_ack_with(AckKind::Term).await {
            // Stored already: the redelivery is dead-lettered again under
            // the same message id, so the server keeps one copy.
            tracing::warn!(group = %self.group, error = %e, "could not terminate a dead-lettered event");
        }
        Ok(())
    }
}
