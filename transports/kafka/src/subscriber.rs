//! Consuming: one consumer group per Seambus group, handlers run
//! concurrently with per-key order, offsets stored only for the contiguous
//! prefix of finished events, retries held in the process.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::ClientContext;
use seambus::transport::support::{call_guarded, header_text, triage, TaskConsumer};
use seambus::transport::{
    Consumer, DeadLetterReason, DeliveryHandler, GroupId, Ordering, Outcome, SubscriptionSpec,
    Unfinished,
};
use seambus::{Envelope, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::kafka_error;
use crate::publisher::{envelope_of, header_pairs, send};
use crate::Inner;

/// Header naming the only group a redriven event is for.
pub(crate) const REDRIVE_GROUP: &str = "seambus-redrive-group";
/// Prefix of the dead-letter headers.
pub(crate) const DL_PREFIX: &str = "seambus-dl-";

/// Assigned partitions, each with an epoch that changes on every new
/// assignment (so work from an earlier assignment never stores offsets).
#[derive(Default)]
pub(crate) struct Assignment {
    epochs: Mutex<HashMap<i32, u64>>,
    next_epoch: std::sync::atomic::AtomicU64,
}

impl Assignment {
    fn epoch(&self, partition: i32) -> Option<u64> {
        self.epochs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&partition)
            .copied()
    }
}

/// Rebalance hooks: commit what finished before partitions go.
pub(crate) struct GroupContext {
    assignment: Arc<Assignment>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            {
                let mut epochs = self
                    .assignment
                    .epochs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for element in list.elements() {
                    epochs.remove(&element.partition());
                }
            }
            // Offsets of finished events are stored as they finish; commit
            // them now. Events still running are redelivered to the new
            // owner: duplicates, never gaps.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "commit on revoke");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let mut epochs = self
                .assignment
                .epochs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for element in list.elements() {
                let epoch = self
                    .assignment
                    .next_epoch
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                epochs.insert(element.partition(), epoch);
            }
        }
    }
}

/// One record this process holds.
struct Held {
    record: OwnedMessage,
    epoch: u64,
    attempt: u32,
    key: Option<u64>,
    envelope: std::result::Result<Envelope, String>,
    /// Decided already: goes to the dead letter (storing it failed before).
    dead_letter: Option<(DeadLetterReason, String)>,
}

enum Settled {
    Released,
    RetryHere(Box<Held>, Duration),
    Abandoned(Envelope),
}

struct Done {
    partition: i32,
    offset: i64,
    epoch: u64,
    key: Option<u64>,
    settled: Settled,
}

/// Offsets of one partition: which are still being worked on.
struct Offsets {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    next: i64,
    stored: i64,
}

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    spec: SubscriptionSpec,
    handler: Arc<dyn DeliveryHandler>,
) -> Result<Box<dyn Consumer>> {
    let config = &inner.config;
    let topic = config.topic(&spec.event_type);
    let dead_topic = config.dead_letter_topic(&spec.group);
    inner.topics.ensure(&topic).await?;
    inner.topics.ensure(&dead_topic).await?;
    let assignment = Arc::new(Assignment::default());
    let group_id = config.group_id(&spec.group);
    let mut client = config.client_config();
    client
        .set("group.id", &group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.auto_offset_reset)
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000");
    let consumer: StreamConsumer<GroupContext> = config
        .finish(client)
        .create_with_context(GroupContext {
            assignment: assignment.clone(),
        })
        .map_err(|e| kafka_error("create consumer", e))?;
    consumer
        .subscribe(&[&topic])
        .map_err(|e| kafka_error(&format!("subscribe to {topic}"), e))?;
    let detach = CancellationToken::new();
    let runner = Arc::new(Runner {
        inner: inner.clone(),
        handler,
        ordered: spec.ordering == Ordering::ByKey,
        group: spec.group.clone(),
        group_id,
        topic,
        dead_topic,
        spec,
        detach: detach.clone(),
        assignment,
    });
    let running = inner.subscriptions.start();
    let task = tokio::spawn(async move {
        let unfinished = runner.run(consumer).await;
        running.finish(unfinished);
    });
    Ok(Box::new(TaskConsumer::new(detach, task)))
}

struct Runner {
    inner: Arc<Inner>,
    handler: Arc<dyn DeliveryHandler>,
    spec: SubscriptionSpec,
    group: GroupId,
    group_id: String,
    topic: String,
    dead_topic: String,
    ordered: bool,
    detach: CancellationToken,
    assignment: Arc<Assignment>,
}

impl Runner {
    fn stopping(&self) -> bool {
        self.detach.is_cancelled() || self.inner.closing.is_cancelled()
    }

    async fn run(self: Arc<Self>, consumer: StreamConsumer<GroupContext>) -> Vec<Unfinished> {
        let hasher = std::collections::hash_map::RandomState::new();
        let mut offsets: HashMap<i32, Offsets> = HashMap::new();
        let mut keys: HashMap<u64, VecDeque<Held>> = HashMap::new();
        let mut ready: VecDeque<Held> = VecDeque::new();
        let mut timers: JoinSet<Held> = JoinSet::new();
        let mut running: JoinSet<Done> = JoinSet::new();
        let mut unfinished = Vec::new();
        let max_held = self.inner.config.max_in_flight;
        loop {
            while running.len() < self.spec.concurrency {
                let Some(held) = ready.pop_front() else { break };
                if self.assignment.epoch(held.record.partition()) != Some(held.epoch) {
                    // Revoked meanwhile: the new owner handles it.
                    self.release_key(held.key, &mut keys, &mut ready);
                    continue;
                }
                let runner = self.clone();
                running.spawn(async move { runner.handle(held).await });
            }
            if self.stopping() {
                break;
            }
            let held_now: usize = offsets.values().map(|o| o.in_flight.len()).sum();
            tokio::select! {
                _ = self.detach.cancelled() => {}
                _ = self.inner.closing.cancelled() => {}
                Some(done) = running.join_next(), if !running.is_empty() => {
                    let Ok(done) = done else { continue };
                    match done.settled {
                        Settled::Abandoned(envelope) => {
                            unfinished.push(Unfinished::new(self.group.clone(), envelope));
                        }
                        Settled::RetryHere(held, delay) => {
                            timers.spawn(async move {
                                tokio::time::sleep(delay).await;
                                *held
                            });
                        }
                        Settled::Released => {
                            self.complete(&consumer, &mut offsets, done.partition, done.offset, done.epoch);
                            self.release_key(done.key, &mut keys, &mut ready);
                        }
                    }
                }
                Some(Ok(held)) = timers.join_next(), if !timers.is_empty() => ready.push_back(held),
                received = consumer.recv(), if held_now < max_held => match received {
                    Ok(message) => {
                        let record = message.detach();
                        let (partition, offset) = (record.partition(), record.offset());
                        let Some(epoch) = self.assignment.epoch(partition) else { continue };
                        let state = offsets.entry(partition).or_insert(Offsets {
                            epoch,
                            in_flight: BTreeSet::new(),
                            next: offset,
                            stored: offset,
                        });
                        if state.epoch != epoch {
                            // Assigned anew: start over from what the group committed.
                            *state = Offsets { epoch, in_flight: BTreeSet::new(), next: offset, stored: offset };
                        }
                        state.in_flight.insert(offset);
                        state.next = state.next.max(offset + 1);
                        match self.accept(record, epoch, &hasher) {
                            None => self.complete(&consumer, &mut offsets, partition, offset, epoch),
                            Some(held) => match held.key {
                                None => ready.push_back(held),
                                Some(key) => match keys.entry(key) {
                                    Entry::Vacant(slot) => {
                                        slot.insert(VecDeque::new());
                                        ready.push_back(held);
                                    }
                                    Entry::Occupied(mut waiting) => waiting.get_mut().push_back(held),
                                },
                            },
                        }
                    }
                    Err(e) => {
                        tracing::warn!(group = %self.group, error = %e, "consumer error; continuing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
        // Stop: handlers finish (until the shutdown deadline); what is not
        // finished is not stored, so the group gets it again.
        timers.abort_all();
        while let Some(done) = running.join_next().await {
            let Ok(done) = done else { continue };
            match done.settled {
                Settled::Abandoned(envelope) => {
                    unfinished.push(Unfinished::new(self.group.clone(), envelope))
                }
                Settled::Released => self.complete(
                    &consumer,
                    &mut offsets,
                    done.partition,
                    done.offset,
                    done.epoch,
                ),
                Settled::RetryHere(..) => {}
            }
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(group = %self.group, error = %e, "final commit");
        }
        unfinished
    }

    /// Stores the offset after the longest finished prefix.
    fn complete(
        &self,
        consumer: &StreamConsumer<GroupContext>,
        offsets: &mut HashMap<i32, Offsets>,
        partition: i32,
        offset: i64,
        epoch: u64,
    ) {
        let Some(state) = offsets.get_mut(&partition) else {
            return;
        };
        if state.epoch != epoch {
            return;
        }
        state.in_flight.remove(&offset);
        let next = state.in_flight.first().copied().unwrap_or(state.next);
        if next > state.stored {
            // librdkafka commits the stored offset + 1.
            match consumer.store_offset(&self.topic, partition, next - 1) {
                Ok(()) => state.stored = next,
                Err(e) => {
                    tracing::debug!(group = %self.group, partition, error = %e, "offset not stored (partition revoked?)")
                }
            }
        }
    }

    fn release_key(
        &self,
        key: Option<u64>,
        keys: &mut HashMap<u64, VecDeque<Held>>,
        ready: &mut VecDeque<Held>,
    ) {
        let Some(key) = key else { return };
        if let Entry::Occupied(mut waiting) = keys.entry(key) {
            match waiting.get_mut().pop_front() {
                Some(next) => ready.push_back(next),
                None => {
                    waiting.remove();
                }
            }
        }
    }

    /// Reads the envelope; `None` for another group's redrive (skipped).
    fn accept(&self, record: OwnedMessage, epoch: u64, hasher: &impl BuildHasher) -> Option<Held> {
        let pairs = header_pairs(record.headers());
        if let Some((_, target)) = pairs.iter().find(|(k, _)| k == REDRIVE_GROUP) {
            if *target != self.group_id {
                return None;
            }
        }
        let envelope = envelope_of(&pairs, record.payload().unwrap_or_default())
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
            record,
            epoch,
            attempt: 1,
            key,
            envelope,
            dead_letter: None,
        })
    }

    async fn handle(self: Arc<Self>, mut held: Held) -> Done {
        let mut done = Done {
            partition: held.record.partition(),
            offset: held.record.offset(),
            epoch: held.epoch,
            key: held.key,
            settled: Settled::Released,
        };
        let max_attempts = self.spec.retry.max_attempts;
        let decided = held.dead_letter.take();
        let (reason, error) = match decided {
            Some(decided) => decided,
            None => {
                let outcome = match triage(&held.envelope, held.attempt, max_attempts) {
                    Err(outcome) => outcome,
                    Ok(delivery) => {
                        let envelope = delivery.envelope.clone();
                        tokio::select! {
                            biased;
                            _ = self.inner.stop.cancelled() => {
                                done.settled = Settled::Abandoned(envelope);
                                return done;
                            }
                            outcome = call_guarded(&*self.handler, delivery) => outcome,
                        }
                    }
                };
                match outcome {
                    Outcome::Ack => return done,
                    Outcome::Retry { error } if held.attempt < max_attempts => {
                        let delay = self.spec.retry.delay(held.attempt);
                        tracing::debug!(group = %self.group, %error, ?delay, "retrying in process");
                        held.attempt += 1;
                        done.settled = Settled::RetryHere(Box::new(held), delay);
                        return done;
                    }
                    Outcome::Retry { error } => (DeadLetterReason::MaxAttempts, error),
                    Outcome::DeadLetter { reason, error } => (reason, error),
                    _ => (DeadLetterReason::Undecodable, "unknown outcome".to_owned()),
                }
            }
        };
        if let Err(e) = self.dead_letter(&held, reason, &error).await {
            tracing::error!(group = %self.group, error = %e, "cannot store a dead letter; trying again shortly");
            held.dead_letter = Some((reason, error));
            done.settled = Settled::RetryHere(Box::new(held), Duration::from_secs(1));
        }
        done
    }

    /// Sends the record, with reason headers, to the group's dead-letter
    /// topic and waits for the delivery report.
    async fn dead_letter(&self, held: &Held, reason: DeadLetterReason, error: &str) -> Result<()> {
        let error_line = header_text(error);
        let id = match &held.envelope {
            Ok(env) => env.id(),
            Err(_) => uuid::Uuid::now_v7(),
        };
        let mut headers = OwnedHeaders::new();
        for (k, v) in header_pairs(held.record.headers()) {
            headers = headers.insert(Header {
                key: &k,
                value: Some(v.as_bytes()),
            });
        }
        let dl = [
            ("reason", reason.as_str().to_owned()),
            ("error", error_line.clone()),
            ("attempts", held.attempt.to_string()),
            ("time", chrono::Utc::now().to_rfc3339()),
            ("group", self.group.to_string()),
            ("topic", self.topic.clone()),
            ("partition", held.record.partition().to_string()),
            ("offset", held.record.offset().to_string()),
            ("id", id.to_string()),
        ];
        for (name, value) in &dl {
            let key = format!("{DL_PREFIX}{name}");
            headers = headers.insert(Header {
                key: &key,
                value: Some(value.as_bytes()),
            });
        }
        send(
            &self.inner.producer,
            &self.dead_topic,
            held.record.key(),
            held.record.payload().unwrap_or_default(),
            headers,
            self.inner.config.publish_timeout,
        )
        .await?;
        tracing::warn!(group = %self.group, %id, %reason, attempts = held.attempt, error = %error_line, "event dead-lettered");
        Ok(())
    }
}
