//! Consuming: one consumer group per Seambus group, fed to the core delivery
//! engine ([`seambus::transport::engine`]), which keeps per-key order,
//! retries and attempts. Offsets are stored only for the contiguous prefix
//! of settled records; a revoked partition's records leave the engine.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use seambus::transport::engine::{self, Fetch, Fetched, Limits, Verdict};
use seambus::transport::{Consumer, DeliveryHandler, GroupId, SubscriptionSpec};
use seambus::{Envelope, Result};
use tokio::sync::Notify;

use crate::error::kafka_error;
use crate::publisher::send;
use crate::wire::{attempt_of, dead_letter_headers, envelope_of, for_other_group, header_pairs};
use crate::ClientLog;
use crate::Inner;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Assigned partitions, each with an epoch that changes on every new
/// assignment (so work from an earlier assignment never stores offsets).
#[derive(Default)]
pub(crate) struct Assignment {
    epochs: Mutex<HashMap<i32, u64>>,
    next_epoch: AtomicU64,
    /// Partitions were revoked.
    revoked: Notify,
    /// The group's first assignment came (the member has joined).
    joined: std::sync::atomic::AtomicBool,
}

impl Assignment {
    fn epoch(&self, partition: i32) -> Option<u64> {
        lock(&self.epochs).get(&partition).copied()
    }
}

/// Rebalance hooks, and the transport's client log.
pub(crate) struct GroupContext {
    assignment: Arc<Assignment>,
    log: ClientLog,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.log.error(error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            {
                let mut epochs = lock(&self.assignment.epochs);
                for element in list.elements() {
                    epochs.remove(&element.partition());
                }
            }
            self.assignment.revoked.notify_one();
            // Offsets of settled records are stored as they settle; commit
            // them without blocking the polling thread. Records still held
            // go to the new owner: duplicates, never gaps.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
                tracing::debug!(error = %e, "commit on revoke");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            tracing::debug!(partitions = list.count(), "partitions assigned");
            self.assignment.joined.store(true, SeqCst);
            {
                let mut epochs = lock(&self.assignment.epochs);
                for element in list.elements() {
                    let epoch = self.assignment.next_epoch.fetch_add(1, SeqCst);
                    epochs.insert(element.partition(), epoch);
                }
            }
        }
    }
}

/// Offsets of one partition: which records are still held.
struct Offsets {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    next: i64,
    stored: i64,
}

/// The consumer and its offset bookkeeping, shared by source and sink.
struct Group {
    consumer: StreamConsumer<GroupContext>,
    assignment: Arc<Assignment>,
    offsets: Mutex<HashMap<i32, Offsets>>,
    topic: String,
    group: GroupId,
}

impl Group {
    /// Counts a fetched record as held; true for the first record of its
    /// partition in this assignment (the one at the committed offset).
    fn hold(&self, partition: i32, offset: i64, epoch: u64) -> bool {
        let mut offsets = lock(&self.offsets);
        let mut first = false;
        let state = offsets.entry(partition).or_insert_with(|| {
            first = true;
            Offsets {
                epoch,
                in_flight: BTreeSet::new(),
                next: offset,
                stored: offset,
            }
        });
        if state.epoch != epoch {
            first = true;
            // Assigned anew: start over from what the group committed.
            *state = Offsets {
                epoch,
                in_flight: BTreeSet::new(),
                next: offset,
                stored: offset,
            };
        }
        state.in_flight.insert(offset);
        state.next = state.next.max(offset + 1);
        first
    }

    /// Counts one more delivery of the record at `offset`, the first of
    /// its partition in this assignment, on the broker: the committed
    /// offset's metadata holds the deliveries of the record at that
    /// offset. Committed (synchronously; blocking) before the record is
    /// handled, so a process that dies while handling it has counted it.
    /// Returns the deliveries, this one included.
    fn count_delivery(&self, partition: i32, offset: i64) -> u32 {
        let mut asked = TopicPartitionList::new();
        asked.add_partition(&self.topic, partition);
        let before = self
            .consumer
            .committed_offsets(asked, COUNT_TIMEOUT)
            .ok()
            .and_then(|c| {
                let e = c.find_partition(&self.topic, partition)?;
                (e.offset() == Offset::Offset(offset))
                    .then(|| e.metadata().strip_prefix(DELIVERIES)?.parse::<u32>().ok())
                    .flatten()
            })
            .unwrap_or(0);
        let deliveries = before.saturating_add(1);
        let mut count = TopicPartitionList::new();
        count
            .add_partition(&self.topic, partition)
            .set_offset(Offset::Offset(offset))
            .and_then(|()| {
                if let Some(mut e) = count.find_partition(&self.topic, partition) {
                    e.set_metadata(format!("{DELIVERIES}{deliveries}"));
                }
                self.consumer.commit(&count, CommitMode::Sync)
            })
            .unwrap_or_else(|e| {
                tracing::debug!(group = %self.group, partition, error = %e, "delivery count not committed");
            });
        deliveries
    }

    /// A record is settled: store the offset after the longest settled
    /// prefix.
    fn settle(&self, partition: i32, offset: i64, epoch: u64) {
        let mut offsets = lock(&self.offsets);
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
            match self.consumer.store_offset(&self.topic, partition, next - 1) {
                Ok(()) => state.stored = next,
                Err(e) => {
                    tracing::debug!(group = %self.group, partition, error = %e, "offset not stored (partition revoked?)")
                }
            }
        }
    }
}

impl Group {
    /// Per partition this consumer holds records of: the offset it has
    /// settled up to, and how many fetched records wait to be settled.
    /// Only this consumer's own bookkeeping: no call into the client.
    fn held(&self) -> Vec<(i32, i64, usize)> {
        let epochs = lock(&self.assignment.epochs).clone();
        lock(&self.offsets)
            .iter()
            .filter(|(p, o)| epochs.get(p) == Some(&o.epoch))
            .map(|(p, o)| (*p, o.stored, o.in_flight.len()))
            .collect()
    }
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
        // Without a committed offset (a new partition, or one retention
        // emptied) the group starts at the oldest record; new groups are
        // pinned at the end below unless they replay.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        // The engine polls all the time (also while it holds all it may),
        // so a short poll interval costs nothing; it is also the rebalance
        // timeout the group waits for a member that went away mid-join.
        .set("max.poll.interval.ms", "30000");
    let client = config.finish(client);
    let consumer: StreamConsumer<GroupContext> = client
        .create_with_context(GroupContext {
            assignment: assignment.clone(),
            log: inner.log.clone(),
        })
        .map_err(|e| kafka_error("create consumer", e))?;
    if !config.replays() {
        // A short-lived client of the group, never a member, so the
        // group's own consumer joins untouched.
        let pinner: BaseConsumer<ClientLog> = client
            .create_with_context(inner.log.clone())
            .map_err(|e| kafka_error("create consumer", e))?;
        let name = topic.clone();
        tokio::task::spawn_blocking(move || pin_new_group(&pinner, &name))
            .await
            .map_err(|e| {
                seambus::Error::new(seambus::ErrorKind::Other, format!("pin a new group: {e}"))
            })?
            .map_err(|e| {
                kafka_error(&format!("start group {group_id} at the end of {topic}"), e)
            })?;
    }
    consumer
        .subscribe(&[&topic])
        .map_err(|e| kafka_error(&format!("subscribe to {topic}"), e))?;
    let group = Arc::new(Group {
        consumer,
        assignment,
        offsets: Mutex::default(),
        topic,
        group: spec.group.clone(),
    });
    tokio::spawn(watch_progress(Arc::downgrade(&group), config.stall_warning));
    let sink = Arc::new(KafkaSink {
        inner: inner.clone(),
        group: group.clone(),
        dead_topic,
    });
    let source = KafkaSource {
        group,
        group_id,
        counting: None,
    };
    let limits = Limits::new(config.max_in_flight).with_delivery_limit(Some(config.delivery_limit));
    Ok(engine::spawn(
        &inner.host,
        spec,
        handler,
        source,
        sink,
        limits,
    ))
}

/// Warns when this consumer holds records of a partition and has settled
/// none of them for `after` (a handler that never ends, a key that never
/// gets through): once per stall, naming the group, the partition and the
/// records waiting. Ends with the subscription.
async fn watch_progress(group: std::sync::Weak<Group>, after: Duration) {
    let every = (after / 4).max(Duration::from_millis(100));
    // Per partition: the offset settled up to, since when, and whether
    // this stall was reported.
    let mut seen: HashMap<i32, (i64, tokio::time::Instant, bool)> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let (name, topic, held) = match group.upgrade() {
            Some(g) => (g.group.clone(), g.topic.clone(), g.held()),
            None => return,
        };
        let now = tokio::time::Instant::now();
        seen.retain(|p, _| held.iter().any(|(q, _, _)| q == p));
        for (partition, reached, waiting) in held {
            let entry = seen.entry(partition).or_insert((reached, now, false));
            if entry.0 != reached || waiting == 0 {
                if entry.2 {
                    tracing::info!(group = %name, partition, "consuming again after a stall");
                }
                *entry = (reached, now, false);
            } else if !entry.2 && now.duration_since(entry.1) >= after {
                entry.2 = true;
                tracing::warn!(
                    group = %name,
                    %topic,
                    partition,
                    waiting,
                    stalled_for = ?now.duration_since(entry.1),
                    "no progress on a partition with records waiting"
                );
            }
        }
    }
}

/// How long a closing consumer waits for its first assignment.
const JOIN_BEFORE_LEAVING: Duration = Duration::from_secs(10);

/// How long the blocking calls that pin a new group may take.
const PIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes a group that has no committed offset on a partition start after
/// what the partition holds now: the end offsets are committed for it
/// before it joins, so every event published after this returns reaches
/// the group (also when another member gets the partition first). A group
/// with committed offsets is left as it is. A commit the broker refuses
/// because the group is running already is harmless: its members commit.
fn pin_new_group(consumer: &BaseConsumer<ClientLog>, topic: &str) -> KafkaResult<()> {
    let metadata = consumer.fetch_metadata(Some(topic), PIN_TIMEOUT)?;
    let mut all = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            all.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(all, PIN_TIMEOUT)?;
    let mut pin = TopicPartitionList::new();
    for element in committed.elements() {
        if element.offset() == Offset::Invalid {
            let (_, end) = consumer.fetch_watermarks(topic, element.partition(), PIN_TIMEOUT)?;
            pin.add_partition_offset(topic, element.partition(), Offset::Offset(end))?;
        }
    }
    if pin.count() > 0 {
        if let Err(e) = consumer.commit(&pin, CommitMode::Sync) {
            tracing::debug!(topic, error = %e, "pinning a new group: commit refused");
        }
    }
    Ok(())
}

/// The prefix of the committed offset's metadata that counts deliveries.
const DELIVERIES: &str = "seambus-deliveries=";
/// How long counting a delivery may wait for the broker.
const COUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// A record this process holds, with the assignment epoch it came in.
pub(crate) struct Held {
    record: OwnedMessage,
    epoch: u64,
    pairs: Vec<(String, String)>,
}

struct KafkaSource {
    group: Arc<Group>,
    group_id: String,
    /// The first record of a partition's assignment while its delivery is
    /// counted (kept here: fetch may be cancelled meanwhile).
    counting: Option<(Held, tokio::task::JoinHandle<u32>)>,
}

impl KafkaSource {
    fn fetched(held: Held, delivered: Option<u32>) -> Fetch<Held> {
        let envelope = envelope_of(&held.pairs, held.record.payload().unwrap_or_default())
            .map_err(|e| e.message().to_owned());
        let attempt = attempt_of(&held.pairs);
        Fetch::Message(Fetched {
            token: held,
            envelope,
            attempt,
            delivered,
        })
    }
}

#[async_trait]
impl engine::Source for KafkaSource {
    type Token = Held;

    /// Polling keeps the member in its group and runs rebalances, so the
    /// consumer is polled even when the engine holds all it may.
    const POLL_WHILE_PAUSED: bool = true;

    async fn fetch(&mut self) -> Result<Fetch<Held>> {
        loop {
            if let Some((_, task)) = self.counting.as_mut() {
                let delivered = task.await.unwrap_or(1);
                let (held, _) = self.counting.take().expect("counting");
                return Ok(Self::fetched(held, Some(delivered)));
            }
            let received = tokio::select! {
                received = self.group.consumer.recv() => received,
                _ = self.group.assignment.revoked.notified() => return Ok(Fetch::Revoked),
            };
            let log = &self.group.consumer.context().log;
            let record = match received {
                Ok(record) => record.detach(),
                // librdkafka reconnects on its own: said once, not once per
                // fetch.
                Err(e) if ClientLog::is_outage(&e) => {
                    log.unreachable(&e.to_string());
                    continue;
                }
                Err(e) => return Err(kafka_error("receive", e)),
            };
            log.reached();
            let (partition, offset) = (record.partition(), record.offset());
            let Some(epoch) = self.group.assignment.epoch(partition) else {
                continue;
            };
            let first = self.group.hold(partition, offset, epoch);
            let pairs = header_pairs(record.headers());
            if for_other_group(&pairs, &self.group_id) {
                self.group.settle(partition, offset, epoch);
                continue;
            }
            let held = Held {
                record,
                epoch,
                pairs,
            };
            if !first {
                return Ok(Self::fetched(held, None));
            }
            // Only the first record of an assignment is counted: it sits at
            // the committed offset, which is where a record that takes its
            // consumers down every time stays.
            let group = self.group.clone();
            let task = tokio::task::spawn_blocking(move || group.count_delivery(partition, offset));
            self.counting = Some((held, task));
        }
    }

    /// Nothing: librdkafka's partition pause did not survive a broker
    /// restart here (consumption stalled for good after the broker came
    /// back), so a full engine keeps polling and records keep coming,
    /// bounded by librdkafka's own fetch queue (`queued.max.messages.kbytes`)
    /// rather than by `max_in_flight`.
    fn pause(&mut self, _paused: bool) {}

    async fn close(&mut self) {
        // A member that leaves in the middle of its first join can leave
        // the group waiting for it (seen on tansu: a group closed right
        // after it subscribed received nothing for minutes when it came
        // back). Finish the join first, for a bounded time; records that
        // come meanwhile are not stored, so the group gets them again.
        let joined = async {
            // Polling runs the rebalance callback; recv alone would wait
            // for a record before the flag is looked at again.
            while !self.group.assignment.joined.load(SeqCst) {
                let _ = tokio::time::timeout(Duration::from_millis(50), self.group.consumer.recv())
                    .await;
            }
        };
        if tokio::time::timeout(JOIN_BEFORE_LEAVING, joined)
            .await
            .is_err()
        {
            tracing::debug!(group = %self.group.group, "left before the first assignment came");
        }
        // The last offsets, committed off the runtime's threads.
        let group = self.group.clone();
        let committed = tokio::task::spawn_blocking(move || {
            group.consumer.commit_consumer_state(CommitMode::Sync)
        })
        .await;
        if let Ok(Err(e)) = committed {
            tracing::debug!(group = %self.group.group, error = %e, "final commit");
        }
    }
}

struct KafkaSink {
    inner: Arc<Inner>,
    group: Arc<Group>,
    dead_topic: String,
}

impl KafkaSink {
    fn settle(&self, held: &Held) {
        self.group
            .settle(held.record.partition(), held.record.offset(), held.epoch);
    }
}

#[async_trait]
impl engine::Sink for KafkaSink {
    type Token = Held;

    fn owns(&self, held: &Held) -> bool {
        self.group.assignment.epoch(held.record.partition()) == Some(held.epoch)
    }

    async fn ack(&self, held: &Held) -> Result<()> {
        self.settle(held);
        Ok(())
    }

    /// Nothing to tell the broker: the offset is not stored, so the group
    /// gets the record again.
    async fn release(&self, _held: &Held) {}

    /// Sends the record, with reason headers, to the group's dead-letter
    /// topic, waits for the delivery report, then settles it.
    async fn dead_letter(
        &self,
        held: &Held,
        envelope: Option<&Envelope>,
        verdict: &Verdict,
    ) -> Result<()> {
        let id = envelope.map_or_else(uuid::Uuid::now_v7, Envelope::id);
        let record = &held.record;
        let headers = dead_letter_headers(
            &held.pairs,
            verdict,
            &self.group.group,
            (&self.group.topic, record.partition(), record.offset()),
            id,
        );
        send(
            &self.inner.producer,
            &self.dead_topic,
            record.key(),
            match verdict.without_payload {
                false => record.payload().unwrap_or_default(),
                true => &[],
            },
            headers,
            self.inner.config.publish_timeout,
        )
        .await?;
        self.settle(held);
        Ok(())
    }
}
