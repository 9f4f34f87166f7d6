//! Consuming: one durable pull consumer per group, a runner task per
//! subscription that keeps per-key order, and handler tasks.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures_util::StreamExt;
use seambus::transport::{
    support::{call_guarded, dead_letter_from, header_text, triage, TaskConsumer},
    Consumer, DeadLetterReason, DeliveryHandler, GroupId, Ordering, Outcome, SubscriptionSpec,
    Unfinished,
};
use seambus::{Envelope, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::api_error;
use crate::publisher::{envelope_of, event_subject, headers_of, publish_confirmed, MSG_ID};
use crate::Inner;

/// Header naming the only group a redriven event is for.
pub(crate) const REDRIVE_GROUP: &str = "seambus-redrive-group";
pub(crate) const DL_REASON: &str = "seambus-dl-reason";
pub(crate) const DL_ERROR: &str = "seambus-dl-error";
pub(crate) const DL_ATTEMPTS: &str = "seambus-dl-attempts";
pub(crate) const DL_TIME: &str = "seambus-dl-time";
pub(crate) const DL_GROUP: &str = "seambus-dl-group";
pub(crate) const DL_SUBJECT: &str = "seambus-dl-subject";
pub(crate) const DL_ID: &str = "seambus-dl-id";

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

/// One message this process holds.
struct Held {
    message: jetstream::Message,
    stream_seq: u64,
    attempt: u32,
    key: Option<u64>,
    /// The envelope, or why the message is not one.
    envelope: std::result::Result<Envelope, String>,
}

/// What a handler task reports back.
struct Done {
    key: Option<u64>,
    stream_seq: u64,
    /// False when the event was nak'd for a retry: its key stays busy until
    /// the redelivery succeeds.
    releases_key: bool,
    /// Set when the shutdown deadline cut the handler short.
    abandoned: Option<Envelope>,
}

/// A busy partition key: whose redelivery it waits for, and who waits.
struct KeyState {
    owner_seq: u64,
    waiting: VecDeque<Held>,
}

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
                deliver_policy: DeliverPolicy::All,
                ack_wait: config.ack_wait,
                max_deliver: config.max_deliver,
                max_ack_pending: config.max_in_flight as i64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| api_error(&format!("create consumer {name}"), e))?;
    let detach = CancellationToken::new();
    let runner = Runner {
        inner: inner.clone(),
        handler,
        dead_letter_subject: dead_letter_subject(&config.subject_prefix, &spec.group),
        group: spec.group.clone(),
        name,
        ordered: spec.ordering == Ordering::ByKey,
        spec,
        detach: detach.clone(),
    };
    let running = inner.subscriptions.start();
    let task = tokio::spawn(async move {
        let abandoned = runner.run(consumer).await;
        running.finish(abandoned);
    });
    Ok(Box::new(TaskConsumer::new(detach, task)))
}

struct Runner {
    inner: Arc<Inner>,
    handler: Arc<dyn DeliveryHandler>,
    spec: SubscriptionSpec,
    group: GroupId,
    name: String,
    dead_letter_subject: String,
    ordered: bool,
    detach: CancellationToken,
}

impl Runner {
    /// Reads the consumer until the subscription closes or the transport
    /// shuts down; returns the envelopes the deadline cut short.
    async fn run(self, consumer: jetstream::consumer::PullConsumer) -> Vec<Unfinished> {
        let this = Arc::new(self);
        let mut keys: HashMap<u64, KeyState> = HashMap::new();
        let mut ready: VecDeque<Held> = VecDeque::new();
        let mut running: JoinSet<Done> = JoinSet::new();
        let mut abandoned = Vec::new();
        let hasher = std::collections::hash_map::RandomState::new();
        let mut progress = tokio::time::interval(this.inner.config.ack_wait / 3);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut messages = None;
        let mut reconnect_pause = Duration::from_millis(100);
        let stopping = || this.detach.is_cancelled() || this.inner.closing.is_cancelled();

        loop {
            while running.len() < this.spec.concurrency {
                let Some(held) = ready.pop_front() else { break };
                let runner = this.clone();
                running.spawn(async move { runner.handle(held).await });
            }
            if stopping() {
                break;
            }
            if messages.is_none() {
                match consumer
                    .stream()
                    .max_messages_per_batch(this.inner.config.max_in_flight)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                {
                    Ok(stream) => {
                        messages = Some(stream);
                        reconnect_pause = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!(group = %this.group, error = %e, "cannot pull; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(reconnect_pause) => {}
                            _ = this.detach.cancelled() => {}
                            _ = this.inner.closing.cancelled() => {}
                        }
                        reconnect_pause = (reconnect_pause * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let Some(stream) = messages.as_mut() else {
                continue;
            };
            tokio::select! {
                _ = this.detach.cancelled() => {}
                _ = this.inner.closing.cancelled() => {}
                Some(done) = running.join_next(), if !running.is_empty() => {
                    match done {
                        Ok(done) => this.finished(done, &mut keys, &mut ready, &mut abandoned),
                        Err(e) => tracing::error!(group = %this.group, error = %e, "handler task failed"),
                    }
                }
                _ = progress.tick() => {
                    for held in ready.iter().chain(keys.values().flat_map(|k| k.waiting.iter())) {
                        let _ = held.message.ack_with(AckKind::Progress).await;
                    }
                }
                next = stream.next() => match next {
                    Some(Ok(message)) => {
                        if let Some(held) = this.accept(message, &hasher).await {
                            this.route(held, &mut keys, &mut ready);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(group = %this.group, error = %e, "pull stream error; resuming");
                    }
                    None => messages = None,
                },
            }
        }

        // Stop pulling. Events held but not started go back to the server
        // at once, for this group's next consumer.
        drop(messages);
        for held in ready
            .drain(..)
            .chain(keys.drain().flat_map(|(_, k)| k.waiting))
        {
            let _ = held.message.ack_with(AckKind::Nak(None)).await;
        }
        // In-flight handlers finish (until the shutdown deadline, where they
        // report themselves abandoned).
        while let Some(done) = running.join_next().await {
            if let Ok(Done {
                abandoned: Some(envelope),
                ..
            }) = done
            {
                abandoned.push(envelope);
            }
        }
        abandoned
            .into_iter()
            .map(|envelope| Unfinished::new(this.group.clone(), envelope))
            .collect()
    }

    /// Reads delivery metadata and the envelope. Messages for another
    /// group's redrive are acknowledged and skipped.
    async fn accept(&self, message: jetstream::Message, hasher: &impl BuildHasher) -> Option<Held> {
        let (stream_seq, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "message without JetStream metadata; ignored");
                return None;
            }
        };
        if let Some(target) = message.headers.as_ref().and_then(|h| h.get(REDRIVE_GROUP)) {
            if target.as_str() != self.name {
                let _ = message.ack().await;
                return None;
            }
        }
        let envelope = envelope_of(message.headers.as_ref(), message.payload.clone())
            .map_err(|e| e.message().to_owned());
        let key = match (&envelope, self.ordered) {
            (Ok(env), true) => env
                .attributes()
                .partition_key
                .as_deref()
                .map(|k| hasher.hash_one(k)),
            _ => None,
        };
        Some(Held {
            message,
            stream_seq,
            attempt: u32::try_from(delivered.max(1)).unwrap_or(u32::MAX),
            key,
            envelope,
        })
    }

    /// Runs now, or waits behind its key.
    fn route(&self, held: Held, keys: &mut HashMap<u64, KeyState>, ready: &mut VecDeque<Held>) {
        let Some(key) = held.key else {
            ready.push_back(held);
            return;
        };
        match keys.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(KeyState {
                    owner_seq: held.stream_seq,
                    waiting: VecDeque::new(),
                });
                ready.push_back(held);
            }
            // The redelivery the key waits for.
            Entry::Occupied(state) if state.get().owner_seq == held.stream_seq => {
                ready.push_back(held)
            }
            Entry::Occupied(mut state) => {
                let waiting = &mut state.get_mut().waiting;
                // A redelivery of an event already waiting replaces it.
                waiting.retain(|w| w.stream_seq != held.stream_seq);
                waiting.push_back(held);
            }
        }
    }

    fn finished(
        &self,
        done: Done,
        keys: &mut HashMap<u64, KeyState>,
        ready: &mut VecDeque<Held>,
        abandoned: &mut Vec<Envelope>,
    ) {
        if let Some(envelope) = done.abandoned {
            abandoned.push(envelope);
        }
        let Some(key) = done.key else { return };
        if !done.releases_key {
            return;
        }
        if let Entry::Occupied(mut state) = keys.entry(key) {
            if state.get().owner_seq != done.stream_seq {
                return;
            }
            match state.get_mut().waiting.pop_front() {
                Some(next) => {
                    state.get_mut().owner_seq = next.stream_seq;
                    ready.push_back(next);
                }
                None => {
                    state.remove();
                }
            }
        }
    }

    /// Handles one event and settles it with the server.
    async fn handle(self: Arc<Self>, held: Held) -> Done {
        let max_attempts = self.spec.retry.max_attempts;
        let mut done = Done {
            key: held.key,
            stream_seq: held.stream_seq,
            releases_key: true,
            abandoned: None,
        };
        let outcome = match triage(&held.envelope, held.attempt, max_attempts) {
            Err(outcome) => outcome,
            Ok(delivery) => {
                let envelope = delivery.envelope.clone();
                let call = call_guarded(&*self.handler, delivery);
                tokio::pin!(call);
                // The first progress ack is one period away. (An
                // `interval`'s first tick is not free: awaiting it costs a
                // trip through the timer, about 1 ms per delivery.)
                let period = self.inner.config.ack_wait / 3;
                let mut progress =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                loop {
                    tokio::select! {
                        biased;
                        _ = self.inner.stop.cancelled() => {
                            // Deadline passed: not a failure; back to the server.
                            let _ = held.message.ack_with(AckKind::Nak(None)).await;
                            done.abandoned = Some(envelope.clone());
                            return done;
                        }
                        outcome = &mut call => break outcome,
                        _ = progress.tick() => {
                            let _ = held.message.ack_with(AckKind::Progress).await;
                        }
                    }
                }
            }
        };
        let settle = match outcome {
            Outcome::Ack => held.message.ack().await,
            Outcome::Retry { error } if held.attempt < max_attempts => {
                let delay = self.spec.retry.delay(held.attempt);
                tracing::debug!(group = %self.group, seq = held.stream_seq, %error, ?delay, "nak for retry");
                done.releases_key = false;
                held.message.ack_with(AckKind::Nak(Some(delay))).await
            }
            Outcome::Retry { error } => {
                self.dead_letter(&held, DeadLetterReason::MaxAttempts, &error, &mut done)
                    .await
            }
            Outcome::DeadLetter { reason, error } => {
                self.dead_letter(&held, reason, &error, &mut done).await
            }
            _ => held.message.ack_with(AckKind::Nak(None)).await,
        };
        if let Err(e) = settle {
            // The server redelivers it: a duplicate, never a loss.
            tracing::warn!(group = %self.group, seq = held.stream_seq, error = %e, "could not settle an event with the server");
        }
        done
    }

    /// Publishes the event to the group's dead-letter subject (confirmed),
    /// then terminates it. If the dead letter cannot be stored, the event is
    /// nak'd and comes back later: nothing is lost.
    async fn dead_letter(
        &self,
        held: &Held,
        reason: DeadLetterReason,
        error: &str,
        done: &mut Done,
    ) -> std::result::Result<(), async_nats::Error> {
        let mut headers = match &held.envelope {
            Ok(envelope) => headers_of(envelope.attributes()),
            Err(_) => held.message.headers.clone().unwrap_or_default(),
        };
        let id = match &held.envelope {
            Ok(envelope) => envelope.id(),
            Err(_) => uuid::Uuid::now_v7(),
        };
        // Header values cannot hold line breaks.
        let error_line = header_text(error);
        headers.insert(DL_REASON, reason.as_str());
        headers.insert(DL_ERROR, error_line.as_str());
        headers.insert(DL_ATTEMPTS, held.attempt.to_string());
        headers.insert(DL_TIME, chrono::Utc::now().to_rfc3339());
        headers.insert(DL_GROUP, self.group.to_string());
        headers.insert(DL_SUBJECT, held.message.subject.as_str());
        headers.insert(DL_ID, id.to_string());
        let msg_id = format!("dl:{}:{}", self.name, held.stream_seq);
        headers.insert(MSG_ID, msg_id.as_str());
        let stored = publish_confirmed(
            &self.inner.js,
            &self.dead_letter_subject,
            &msg_id,
            headers,
            held.message.payload.clone(),
            self.inner.config.publish_timeout,
        )
        .await;
        match stored {
            Ok(()) => {
                tracing::warn!(group = %self.group, %id, %reason, attempts = held.attempt, error = %error_line, "event dead-lettered");
                held.message.double_ack_with(AckKind::Term).await
            }
            Err(e) => {
                tracing::error!(group = %self.group, %id, error = %e, "cannot store a dead letter; the event will come back");
                done.releases_key = false;
                held.message
                    .ack_with(AckKind::Nak(Some(self.inner.config.ack_wait)))
                    .await
            }
        }
    }
}

/// Reads a stored dead letter back.
pub(crate) fn dead_letter_of(
    group: &GroupId,
    headers: &HeaderMap,
    payload: Bytes,
) -> seambus::transport::DeadLetter {
    dead_letter_from(
        group,
        envelope_of(Some(headers), payload.clone()),
        &payload,
        |name| {
            let header = match name {
                "reason" => DL_REASON,
                "error" => DL_ERROR,
                "attempts" => DL_ATTEMPTS,
                "time" => DL_TIME,
                "id" => DL_ID,
                "origin" => DL_SUBJECT,
                _ => return None,
            };
            headers.get(header).map(|v| v.as_str().to_owned())
        },
    )
}
