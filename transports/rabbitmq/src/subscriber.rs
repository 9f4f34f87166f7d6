//! Consuming: one runner per subscription that (re)connects, declares the
//! group's queues, consumes with a bounded prefetch, keeps per-key order
//! and settles every delivery.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use seambus::transport::{
    support::{call_guarded, header_text, triage, TaskConsumer},
    Consumer, DeadLetterReason, DeliveryHandler, GroupId, Ordering, Outcome, SubscriptionSpec,
    Unfinished,
};
use seambus::{Envelope, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connection::{dead_letter_exchange, declare_group, GroupQueues};
use crate::publisher::{envelope_of, publish_confirmed, text, ATTEMPT, DL_PREFIX};
use crate::Inner;

/// One delivery this process holds (unacknowledged).
struct Held {
    delivery: AmqpDelivery,
    generation: u64,
    attempt: u32,
    key: Option<u64>,
    envelope: std::result::Result<Envelope, String>,
}

enum Settled {
    /// Acked, dead-lettered or moved to a retry queue: the key is free.
    Released,
    /// Retry in this process after the delay, keeping the key (ordered).
    RetryHere(Box<Held>, Duration),
    /// The shutdown deadline cut the handler short; not acknowledged.
    Abandoned(Envelope),
}

struct Done {
    key: Option<u64>,
    generation: u64,
    settled: Settled,
}

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
        .map_err(|e| crate::error::amqp_error("open channel", e))?;
    declare_group(
        &channel,
        &inner.config,
        &queues,
        &spec.event_type,
        spec.retry.max_attempts,
    )
    .await?;
    let _ = channel.close(200, "declared".into()).await;

    let detach = CancellationToken::new();
    let runner = Arc::new(Runner {
        inner: inner.clone(),
        handler,
        ordered: spec.ordering == Ordering::ByKey,
        group: spec.group.clone(),
        queues,
        spec,
        detach: detach.clone(),
    });
    let running = inner.subscriptions.start();
    let task = tokio::spawn(async move {
        let abandoned = runner.run().await;
        running.finish(abandoned);
    });
    Ok(Box::new(TaskConsumer::new(detach, task)))
}

struct Runner {
    inner: Arc<Inner>,
    handler: Arc<dyn DeliveryHandler>,
    spec: SubscriptionSpec,
    group: GroupId,
    queues: GroupQueues,
    ordered: bool,
    detach: CancellationToken,
}

enum Flow {
    Reconnect,
    Stopped,
}

impl Runner {
    fn stopping(&self) -> bool {
        self.detach.is_cancelled() || self.inner.closing.is_cancelled()
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.detach.cancelled() => {}
            _ = self.inner.closing.cancelled() => {}
        }
    }

    async fn run(self: Arc<Self>) -> Vec<Unfinished> {
        let mut running: JoinSet<Done> = JoinSet::new();
        let mut abandoned = Vec::new();
        let mut generation = 0;
        let mut pause = Duration::from_millis(100);
        while !self.stopping() {
            generation += 1;
            match self.consume(generation, &mut running, &mut abandoned).await {
                Ok(Flow::Stopped) => break,
                Ok(Flow::Reconnect) => pause = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %e, ?pause, "cannot consume; retrying");
                    self.pause(pause).await;
                    pause = (pause * 2).min(self.inner.config.max_reconnect_delay);
                }
            }
        }
        // Handlers of lost channels may still be running: let them end.
        while let Some(done) = running.join_next().await {
            if let Ok(Done {
                settled: Settled::Abandoned(envelope),
                ..
            }) = done
            {
                abandoned.push(envelope);
            }
        }
        abandoned
            .into_iter()
            .map(|envelope| Unfinished::new(self.group.clone(), envelope))
            .collect()
    }

    /// One channel's life: declare, consume, settle, until the channel
    /// fails (reconnect) or the subscription stops.
    async fn consume(
        self: &Arc<Self>,
        generation: u64,
        running: &mut JoinSet<Done>,
        abandoned: &mut Vec<Envelope>,
    ) -> Result<Flow> {
        let connection = self.inner.connector.connection(None).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| crate::error::amqp_error("open consuming channel", e))?;
        declare_group(
            &channel,
            &self.inner.config,
            &self.queues,
            &self.spec.event_type,
            self.spec.retry.max_attempts,
        )
        .await?;
        channel
            .basic_qos(self.inner.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| crate::error::amqp_error("set prefetch", e))?;
        let tag = format!("seambus-{}", uuid::Uuid::now_v7().simple());
        let mut consumer = channel
            .basic_consume(
                self.queues.work.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| crate::error::amqp_error("consume", e))?;
        tracing::debug!(group = %self.group, queue = %self.queues.work, "consuming");

        let hasher = std::collections::hash_map::RandomState::new();
        let mut keys: HashMap<u64, VecDeque<Held>> = HashMap::new();
        let mut ready: VecDeque<Held> = VecDeque::new();
        let mut timers: JoinSet<Held> = JoinSet::new();
        let flow = loop {
            while running.len() < self.spec.concurrency {
                let Some(held) = ready.pop_front() else { break };
                let runner = self.clone();
                running.spawn(async move { runner.handle(held).await });
            }
            if self.stopping() {
                break Flow::Stopped;
            }
            tokio::select! {
                _ = self.detach.cancelled() => {}
                _ = self.inner.closing.cancelled() => {}
                Some(done) = running.join_next(), if !running.is_empty() => {
                    let Ok(done) = done else { continue };
                    match done.settled {
                        Settled::Abandoned(envelope) => abandoned.push(envelope),
                        // Deliveries of a lost channel were requeued by the broker.
                        _ if done.generation != generation => {}
                        Settled::RetryHere(held, delay) => {
                            timers.spawn(async move {
                                tokio::time::sleep(delay).await;
                                *held
                            });
                        }
                        Settled::Released => {
                            if let Some(key) = done.key {
                                if let Entry::Occupied(mut waiting) = keys.entry(key) {
                                    match waiting.get_mut().pop_front() {
                                        Some(next) => ready.push_back(next),
                                        None => {
                                            waiting.remove();
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                Some(Ok(held)) = timers.join_next(), if !timers.is_empty() => ready.push_back(held),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let held = self.accept(delivery, generation, &hasher);
                        match held.key {
                            None => ready.push_back(held),
                            Some(key) => match keys.entry(key) {
                                Entry::Vacant(slot) => {
                                    slot.insert(VecDeque::new());
                                    ready.push_back(held);
                                }
                                Entry::Occupied(mut waiting) => waiting.get_mut().push_back(held),
                            },
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(group = %self.group, error = %e, "consumer failed; reconnecting");
                        break Flow::Reconnect;
                    }
                    None => {
                        tracing::warn!(group = %self.group, "consumer ended; reconnecting");
                        break Flow::Reconnect;
                    }
                },
            }
        };
        if let Flow::Stopped = flow {
            // No new deliveries; handlers finish (until the shutdown deadline)
            // and ack on this channel; closing it then returns everything
            // still held to the queue.
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
            timers.abort_all();
            while let Some(done) = running.join_next().await {
                if let Ok(Done {
                    settled: Settled::Abandoned(envelope),
                    ..
                }) = done
                {
                    abandoned.push(envelope);
                }
            }
            drop(ready);
            drop(keys);
            let _ = channel.close(200, "subscription closed".into()).await;
            drop(consumer);
        }
        Ok(flow)
    }

    fn accept(&self, delivery: AmqpDelivery, generation: u64, hasher: &impl BuildHasher) -> Held {
        let (envelope, attempt) = envelope_of(&delivery.properties, &delivery.data);
        let envelope = envelope.map_err(|e| e.message().to_owned());
        let key = match (&envelope, self.ordered) {
            (Ok(env), true) => env
                .attributes()
                .partition_key
                .as_deref()
                .map(|k| hasher.hash_one(k)),
            _ => None,
        };
        Held {
            delivery,
            generation,
            attempt,
            key,
            envelope,
        }
    }

    async fn handle(self: Arc<Self>, mut held: Held) -> Done {
        let max_attempts = self.spec.retry.max_attempts;
        let done = |settled| Done {
            key: held.key,
            generation: held.generation,
            settled,
        };
        let outcome = match triage(&held.envelope, held.attempt, max_attempts) {
            Err(outcome) => outcome,
            Ok(delivery) => {
                let envelope = delivery.envelope.clone();
                let call = call_guarded(&*self.handler, delivery);
                tokio::select! {
                    biased;
                    _ = self.inner.stop.cancelled() => {
                        // Deadline passed: not a failure; the channel's close
                        // returns it to the queue.
                        return done(Settled::Abandoned(envelope));
                    }
                    outcome = call => outcome,
                }
            }
        };
        let settled = match outcome {
            Outcome::Ack => {
                self.ack(&held).await;
                Settled::Released
            }
            Outcome::Retry { error } if held.attempt < max_attempts => {
                let delay = self.spec.retry.delay(held.attempt);
                if held.key.is_some() {
                    // Ordered key: retry here so no later event of the key
                    // overtakes it.
                    tracing::debug!(group = %self.group, %error, ?delay, "retrying in process");
                    held.attempt += 1;
                    let key = held.key;
                    let generation = held.generation;
                    return Done {
                        key,
                        generation,
                        settled: Settled::RetryHere(Box::new(held), delay),
                    };
                }
                self.to_retry_queue(&held, delay, &error).await;
                Settled::Released
            }
            Outcome::Retry { error } => {
                self.dead_letter(&held, DeadLetterReason::MaxAttempts, &error)
                    .await;
                Settled::Released
            }
            Outcome::DeadLetter { reason, error } => {
                self.dead_letter(&held, reason, &error).await;
                Settled::Released
            }
            _ => {
                self.requeue(&held).await;
                Settled::Released
            }
        };
        done(settled)
    }

    async fn ack(&self, held: &Held) {
        match held.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            // Not an ack: the broker redelivers it (a duplicate, not a loss).
            Ok(false) => {
                tracing::warn!(group = %self.group, "ack not sent (channel gone); the event will be redelivered")
            }
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "ack failed; the event will be redelivered")
            }
        }
    }

    /// Back to the queue after a pause (used when a retry or dead letter
    /// cannot be stored right now).
    async fn requeue(&self, held: &Held) {
        tokio::time::sleep(Duration::from_secs(1)).await;
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
    async fn to_retry_queue(&self, held: &Held, delay: Duration, error: &str) {
        let next = held.attempt + 1;
        let properties = with_headers(&held.delivery.properties, |h| {
            h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(next)));
        })
        .with_expiration(delay.as_millis().max(1).to_string().into());
        let stored = publish_confirmed(
            &self.inner.connector,
            "",
            &self.queues.retry(next),
            &held.delivery.data,
            properties,
            self.inner.config.publish_timeout,
        )
        .await;
        match stored {
            Ok(()) => {
                tracing::debug!(group = %self.group, %error, ?delay, next, "moved to the retry queue");
                self.ack(held).await;
            }
            Err(e) => {
                tracing::error!(group = %self.group, error = %e, "cannot store a retry; requeueing");
                self.requeue(held).await;
            }
        }
    }

    /// Publishes the event with reason headers to the group's dead-letter
    /// queue (through the dead-letter exchange), confirmed, then acks it.
    async fn dead_letter(&self, held: &Held, reason: DeadLetterReason, error: &str) {
        let error_line = header_text(error);
        let id = match &held.envelope {
            Ok(env) => env.id(),
            Err(_) => uuid::Uuid::now_v7(),
        };
        let properties = with_headers(&held.delivery.properties, |h| {
            let dl = |name: &str| ShortString::from(format!("{DL_PREFIX}{name}"));
            h.insert(dl("reason"), text(reason.as_str()));
            h.insert(dl("error"), text(&error_line));
            h.insert(
                dl("attempts"),
                AMQPValue::LongLongInt(i64::from(held.attempt)),
            );
            h.insert(dl("time"), text(&chrono::Utc::now().to_rfc3339()));
            h.insert(dl("group"), text(&self.group.to_string()));
            h.insert(dl("routing-key"), text(held.delivery.routing_key.as_str()));
            h.insert(dl("id"), text(&id.to_string()));
        });
        let stored = publish_confirmed(
            &self.inner.connector,
            &dead_letter_exchange(&self.inner.config.exchange),
            &self.queues.work,
            &held.delivery.data,
            properties,
            self.inner.config.publish_timeout,
        )
        .await;
        match stored {
            Ok(()) => {
                tracing::warn!(group = %self.group, %id, %reason, attempts = held.attempt, error = %error_line, "event dead-lettered");
                self.ack(held).await;
            }
            Err(e) => {
                tracing::error!(group = %self.group, %id, error = %e, "cannot store a dead letter; requeueing");
                self.requeue(held).await;
            }
        }
    }
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
