//! Consuming: a channel per subscription that (re)connects, declares the
//! group's queues and consumes with a bounded prefetch, fed to the core
//! delivery engine ([`seambus::transport::engine`]), which keeps per-key
//! order, retries and attempts.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use seambus::transport::engine::{self, Fetch, Fetched, Limits, Verdict};
use seambus::transport::{Consumer, DeliveryHandler, SubscriptionSpec};
use seambus::{Envelope, Error, ErrorKind, Result};

use crate::config::QueueType;
use crate::connection::{dead_letter_exchange, declare_group, GroupQueues};
use crate::error::amqp_error;
use crate::wire::{
    dead_letter_properties, delivered_of, envelope_of, publish_confirmed, retry_properties,
};
use crate::Inner;

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    spec: SubscriptionSpec,
    handler: Arc<dyn DeliveryHandler>,
) -> Result<Box<dyn Consumer>> {
    let queues = GroupQueues::new(&inner.config.exchange, &spec.group);
    // Declare once now, so configuration errors surface at subscribe time.
    let connection = inner
        .connector
        .connection(Some(
            tokio::time::Instant::now() + inner.config.publish_timeout,
        ))
        .await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", e))?;
    declare_group(
        &channel,
        &inner.config,
        &queues,
        &spec.event_type,
        spec.retry.max_attempts,
    )
    .await?;
    let _ = channel.close(200, "declared".into()).await;

    let generation = Arc::new(AtomicU64::new(0));
    let sink = Arc::new(RabbitSink {
        inner: inner.clone(),
        queues: queues.clone(),
        group: spec.group.clone(),
        generation: generation.clone(),
    });
    let source = RabbitSource {
        inner: inner.clone(),
        queues,
        event_type: spec.event_type.to_string(),
        max_attempts: spec.retry.max_attempts,
        generation,
        current: None,
        revoked: false,
    };
    // A quorum queue counts deliveries and drops a message past
    // `x-delivery-limit` to the DLQ itself; the engine dead-letters it one
    // delivery earlier, so the dead letter says why and is counted.
    let limit = (inner.config.queue_type == QueueType::Quorum)
        .then(|| inner.config.delivery_limit.saturating_sub(1).max(1));
    let limits = Limits::new(usize::from(inner.config.prefetch.max(1))).with_delivery_limit(limit);
    Ok(engine::spawn(
        &inner.host,
        spec,
        handler,
        source,
        sink,
        limits,
    ))
}

/// A delivery this process holds, with the channel generation it came on.
pub(crate) struct Held {
    delivery: AmqpDelivery,
    generation: u64,
}

/// The channel being consumed.
struct Current {
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    tag: String,
}

struct RabbitSource {
    inner: Arc<Inner>,
    queues: GroupQueues,
    event_type: String,
    max_attempts: u32,
    generation: Arc<AtomicU64>,
    current: Option<Current>,
    /// A channel was lost: what it delivered is the broker's again.
    revoked: bool,
}

impl RabbitSource {
    /// The channel is gone, and with it every delivery it made: the broker
    /// requeued them.
    fn lost(&mut self) {
        self.current = None;
        self.generation.fetch_add(1, SeqCst);
        self.revoked = true;
    }

    async fn open(&self) -> Result<Current> {
        let connection = self.inner.connector.connection(None).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open consuming channel", e))?;
        declare_group(
            &channel,
            &self.inner.config,
            &self.queues,
            &self.event_type,
            self.max_attempts,
        )
        .await?;
        channel
            .basic_qos(self.inner.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("set prefetch", e))?;
        let tag = format!("seambus-{}", uuid::Uuid::now_v7().simple());
        let consumer = channel
            .basic_consume(
                self.queues.work.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("consume", e))?;
        tracing::debug!(queue = %self.queues.work, "consuming");
        Ok(Current {
            channel,
            consumer,
            tag,
        })
    }
}

#[async_trait]
impl engine::Source for RabbitSource {
    type Token = Held;

    async fn fetch(&mut self) -> Result<Fetch<Held>> {
        loop {
            if self.revoked {
                self.revoked = false;
                return Ok(Fetch::Revoked);
            }
            if self.current.is_none() {
                self.current = Some(self.open().await?);
            }
            let Some(current) = self.current.as_mut() else {
                continue;
            };
            match current.consumer.next().await {
                Some(Ok(delivery)) => {
                    let (envelope, attempt) = envelope_of(&delivery.properties, &delivery.data);
                    let delivered = delivered_of(&delivery.properties);
                    return Ok(Fetch::Message(Fetched {
                        token: Held {
                            delivery,
                            generation: self.generation.load(SeqCst),
                        },
                        envelope: envelope.map_err(|e| e.message().to_owned()),
                        attempt,
                        delivered,
                    }));
                }
                Some(Err(e)) => {
                    self.lost();
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!("consumer failed; reconnecting: {e}"),
                    ));
                }
                None => {
                    self.lost();
                    tracing::warn!(queue = %self.queues.work, "consumer ended; reconnecting");
                }
            }
        }
    }

    async fn close(&mut self) {
        if let Some(current) = self.current.take() {
            let _ = current
                .channel
                .basic_cancel(current.tag.as_str().into(), BasicCancelOptions::default())
                .await;
            // Whatever is still unacknowledged goes back to the queue.
            let _ = current
                .channel
                .close(200, "subscription closed".into())
                .await;
        }
    }
}

struct RabbitSink {
    inner: Arc<Inner>,
    queues: GroupQueues,
    group: seambus::transport::GroupId,
    generation: Arc<AtomicU64>,
}

#[async_trait]
impl engine::Sink for RabbitSink {
    type Token = Held;

    fn owns(&self, held: &Held) -> bool {
        held.generation == self.generation.load(SeqCst)
    }

    async fn ack(&self, held: &Held) -> Result<()> {
        match held.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::new(
                ErrorKind::Connection,
                "ack not sent (channel gone)",
            )),
            Err(e) => Err(amqp_error("ack", e)),
        }
    }

    async fn release(&self, held: &Held) {
        let _ = held
            .delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }

    /// A copy waits in the retry queue of the next attempt for `delay`, then
    /// returns to the work queue; the original is acked once the copy is
    /// stored.
    async fn retry_later(
        &self,
        held: &Held,
        _envelope: &Envelope,
        attempt: u32,
        delay: std::time::Duration,
    ) -> Result<bool> {
        publish_confirmed(
            &self.inner.connector,
            "",
            &self.queues.retry(attempt),
            &held.delivery.data,
            retry_properties(&held.delivery.properties, attempt, delay),
            self.inner.config.publish_timeout,
        )
        .await?;
        if let Err(e) = self.ack(held).await {
            // The copy is stored: the redelivery is a duplicate, not a loss.
            tracing::warn!(group = %self.group, error = %e, "could not ack an event moved to its retry queue");
        }
        Ok(true)
    }

    /// Publishes the event with reason headers to the group's dead-letter
    /// queue (through the dead-letter exchange), confirmed, then acks it.
    async fn dead_letter(
        &self,
        held: &Held,
        envelope: Option<&Envelope>,
        verdict: &Verdict,
    ) -> Result<()> {
        let id = envelope.map_or_else(uuid::Uuid::now_v7, Envelope::id);
        let properties = dead_letter_properties(
            &held.delivery.properties,
            verdict,
            &self.group,
            held.delivery.routing_key.as_str(),
            id,
        );
        publish_confirmed(
            &self.inner.connector,
            &dead_letter_exchange(&self.inner.config.exchange),
            &self.queues.work,
            match verdict.without_payload {
                false => &held.delivery.data,
                true => &[],
            },
            properties,
            self.inner.config.publish_timeout,
        )
        .await?;
        if let Err(e) = self.ack(held).await {
            // Stored already: the redelivery is dead-lettered again (a
            // duplicate dead letter, never a loss).
            tracing::warn!(group = %self.group, error = %e, "could not ack a dead-lettered event");
        }
        Ok(())
    }
}
