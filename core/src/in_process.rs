//! The in-process transport: the embedded default, with broker semantics
//! (groups, per-key order, bounded queues, delayed retries, dead letters,
//! graceful shutdown) and no serialization.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::engine::{decide, Decision, Verdict};
use crate::transport::lanes::{lane_key, Laned, Lanes};
use crate::transport::support::call_guarded;
use crate::transport::{
    Capabilities, Consumer, DeadLetter, Delivery, DeliveryHandler, Dispatch, GroupId, Ordering,
    RetryPolicy, Settlement, ShutdownReport, SubscriptionSpec, Transport, TryPublish, Unfinished,
};

/// What `publish` does when a group's queue is full.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait until there is room (backpressure). The default.
    #[default]
    Wait,
    /// Fail at once with [`ErrorKind::QueueFull`] (retryable).
    Fail,
}

/// Configuration of the [`InProcessTransport`].
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InProcessConfig {
    /// Events a group may hold at once (queued, waiting for their key,
    /// waiting to retry, or being handled). Default 1024.
    pub queue_capacity: usize,
    /// What `publish` does when a group is full. Default [`WhenFull::Wait`].
    pub when_full: WhenFull,
    /// Dead letters kept in memory **per group** (each group has its own
    /// store, so one group's failures never touch another's). Default
    /// 10 000; at least 1 (0 is raised to 1: a store that keeps nothing
    /// would lose dead letters).
    ///
    /// Nothing is ever evicted. When a group's store is full, its next dead
    /// letter waits, with the group, for room: a queued event keeps its queue
    /// slot and its partition key (so a full store holds publishers back
    /// through the bounded queue, and later events of that key wait), an
    /// inline one keeps its publisher waiting. The store logs one error when
    /// it becomes full. [`Transport::discard_dead_letters`] and
    /// [`Transport::redrive`] make room, and the waiting dead letters then
    /// enter the store in the order they were dead-lettered. Those still
    /// waiting at shutdown are in [`ShutdownReport::unfinished`].
    pub dead_letter_capacity: usize,
}

impl Default for InProcessConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            when_full: WhenFull::Wait,
            dead_letter_capacity: 10_000,
        }
    }
}

impl InProcessConfig {
    /// Sets [`InProcessConfig::queue_capacity`] (at least 1).
    pub fn with_queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// Sets [`InProcessConfig::when_full`].
    pub fn with_when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// Sets [`InProcessConfig::dead_letter_capacity`] (per group, at least
    /// 1).
    pub fn with_dead_letter_capacity(mut self, n: usize) -> Self {
        self.dead_letter_capacity = n.max(1);
        self
    }
}

/// The embedded transport: every module in one process, no broker.
///
/// It keeps the semantics of a broker so that moving a flow to one later
/// changes nothing for handlers:
/// - **groups**: every subscribing group gets every event; inside a group
///   each event runs on one worker (`concurrency` workers per subscription);
/// - **per-key order**: events with one partition key run one at a time in
///   publish order, also across retries, while other keys go on;
/// - **bounded queues**: a full group makes `publish` wait (or fail, see
///   [`WhenFull`]);
/// - **retries** are timers, not sleeping workers, so a waiting retry never
///   blocks other keys; after the last attempt the event is dead-lettered;
/// - **dead letters** are kept in memory, one bounded store per group that
///   never evicts (see [`InProcessConfig::dead_letter_capacity`]), listed,
///   redriven and discarded through [`Transport::dead_letters`],
///   [`Transport::redrive`] and [`Transport::discard_dead_letters`];
/// - **shutdown** drains until the deadline, inline runs in progress
///   included, and hands back what is left in [`ShutdownReport::unfinished`].
///   An inline run cut off by the deadline (in its handler, waiting to
///   retry, or waiting for room in a full dead-letter store) is not a
///   failure and is not dead-lettered: its event is in the report, and its
///   `publish` returns Ok (the event was accepted, like a queued one the
///   drain did not reach). A publish that starts after shutdown began fails
///   with [`ErrorKind::Closed`].
///
/// Events are not persistent: they live in this process.
pub struct InProcessTransport {
    shared: Arc<Shared>,
}

impl Default for InProcessTransport {
    fn default() -> Self {
        Self::new(InProcessConfig::default())
    }
}

impl std::fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessTransport")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: InProcessConfig,
    /// By event name. Hashed with foldhash: looked up on every publish,
    /// and the names are the program's own (SipHash cost ~190 instructions
    /// per lookup, the in-process benchmark's largest single item).
    topics: RwLock<HashMap<String, Topic, foldhash::fast::RandomState>>,
    groups: Mutex<HashMap<GroupId, Arc<Group>>>,
    /// One dead-letter store per group (queued or inline), created with the
    /// group's first subscription and kept for the transport's life.
    dead: Mutex<HashMap<GroupId, Arc<DeadStore>>>,
    closed: AtomicBool,
    /// Held shared while a publish checks `closed`, takes queue slots and
    /// pushes, and while it runs inline handlers; shutdown takes it
    /// exclusively once, so no publish that saw the transport open can push
    /// after the drain began, and the inline runs in progress are waited for
    /// (up to the deadline).
    gate: Gate,
    /// Fired when the shutdown deadline passes: in-flight work is abandoned.
    stop: Signal,
    /// Inline runs cut off by the shutdown deadline.
    inline_abandoned: Mutex<Vec<Unfinished>>,
    hasher: std::collections::hash_map::RandomState,
}

/// The groups subscribed to one event name (copy-on-write lists).
#[derive(Clone, Default)]
struct Topic {
    queued: Arc<[Arc<Group>]>,
    inline: Arc<[Arc<InlineGroup>]>,
}

struct InlineGroup {
    id: GroupId,
    handler: Arc<dyn DeliveryHandler>,
    retry: RetryPolicy,
    dead: Arc<DeadStore>,
}

struct Group {
    id: GroupId,
    event_type: String,
    ordered: bool,
    slots: Slots,
    dead: Arc<DeadStore>,
    state: Mutex<GroupState>,
    /// Workers wait here for work.
    work: Notify,
    /// Shutdown waits here for `outstanding == 0` or no workers.
    changed: Notify,
}

/// A queued delivery, with its lane.
struct Queued {
    delivery: Delivery,
    key: Option<u64>,
}

impl Laned for Queued {
    fn key(&self) -> Option<u64> {
        self.key
    }
}

#[derive(Default)]
struct GroupState {
    /// Events waiting for a worker, for their key or for their retry.
    lanes: Lanes<Queued>,
    /// Accepted and not finished (the queue slots' view, counted here too so
    /// shutdown can wait for zero). A dead letter waiting for room in the
    /// full store no longer counts (no worker can do anything for it) but
    /// keeps its slot and its key until it is stored.
    outstanding: usize,
    workers: usize,
    draining: bool,
    /// In-flight events abandoned at the shutdown deadline.
    abandoned: Vec<Envelope>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the state half
    // written (every critical section is a few plain moves), so a poisoned
    // lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A one-way signal whose hot-path check is one atomic load (a
/// `CancellationToken` check takes a lock), awaitable through the token.
#[derive(Default)]
struct Signal {
    set: AtomicBool,
    token: CancellationToken,
}

impl Signal {
    fn fire(&self) {
        self.set.store(true, SeqCst);
        self.token.cancel();
    }

    fn is_set(&self) -> bool {
        self.set.load(SeqCst)
    }

    fn fired(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// A group's queue slots: a counter and a wakeup, cheaper on the hot path
/// than a semaphore (taking and giving back a slot are a few atomic
/// operations, no lock). Not FIFO-fair among publishers waiting for room.
struct Slots {
    free: AtomicUsize,
    closed: AtomicBool,
    room: Notify,
}

impl Slots {
    fn new(n: usize) -> Self {
        Self {
            free: AtomicUsize::new(n),
            closed: AtomicBool::new(false),
            room: Notify::new(),
        }
    }

    /// Takes a slot if one is free and the queue is open.
    fn try_take(&self) -> bool {
        if self.closed.load(SeqCst) {
            return false;
        }
        self.free
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Waits for a slot; `false` once the queue is closed.
    async fn take(&self) -> bool {
        loop {
            if self.try_take() {
                return true;
            }
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.closed.load(SeqCst) {
                return false;
            }
            if self.try_take() {
                return true;
            }
            room.await;
        }
    }

    fn give_back(&self, n: usize) {
        self.free.fetch_add(n, SeqCst);
        // Without a waiter this stores one wakeup (atomics only), which a
        // later waiter consumes and re-checks.
        self.room.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, SeqCst);
        self.room.notify_waiters();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }
}

/// Lets publishes through until shutdown, then waits for those inside to
/// leave: an atomic count, no lock on the hot path. A publish counts itself
/// in, then checks `closed`; shutdown sets `closed`, then waits for the
/// count to reach zero (both sequentially consistent, so one of the two
/// always sees the other).
#[derive(Default)]
struct Gate {
    inside: AtomicUsize,
    closed: AtomicBool,
    left: Notify,
}

/// One publish inside the [`Gate`].
struct Pass<'a>(&'a Gate);

impl Gate {
    fn enter(&self) -> Option<Pass<'_>> {
        self.inside.fetch_add(1, SeqCst);
        let pass = Pass(self);
        if self.closed.load(SeqCst) {
            return None;
        }
        Some(pass)
    }

    /// Closes the gate and waits until no publish is inside.
    async fn close(&self) {
        self.closed.store(true, SeqCst);
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if self.inside.load(SeqCst) == 0 {
                return;
            }
            left.await;
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.0.inside.fetch_sub(1, SeqCst) == 1 && self.0.closed.load(SeqCst) {
            self.0.left.notify_waiters();
        }
    }
}

/// One group's dead letters: bounded, never evicting. A dead letter that
/// finds it full waits for room (see [`InProcessConfig::dead_letter_capacity`]).
struct DeadStore {
    group: GroupId,
    capacity: usize,
    letters: Mutex<DeadLetters>,
    /// Inline runs waiting for room.
    room: Notify,
    /// A queued dead letter started waiting for room (a redrive waiting for
    /// a queue slot takes the slot it holds instead).
    parked: Notify,
}

#[derive(Default)]
struct DeadLetters {
    /// Oldest first.
    stored: VecDeque<DeadLetter>,
    /// Dead letters of queued deliveries waiting for room, oldest first;
    /// each keeps its delivery's queue slot and lane key.
    waiting: VecDeque<(DeadLetter, Option<u64>)>,
    /// The store refused a dead letter and has had no room since (so it
    /// logs once when it becomes full, not once per dead letter).
    full: bool,
}

impl DeadStore {
    fn new(group: GroupId, capacity: usize) -> Self {
        Self {
            group,
            capacity: capacity.max(1),
            letters: Mutex::default(),
            room: Notify::new(),
            parked: Notify::new(),
        }
    }

    /// Stores `dl`, or hands it back when the store is full.
    fn try_store(
        &self,
        letters: &mut DeadLetters,
        dl: DeadLetter,
    ) -> std::result::Result<(), DeadLetter> {
        if letters.stored.len() < self.capacity {
            letters.stored.push_back(dl);
            return Ok(());
        }
        if !letters.full {
            letters.full = true;
            tracing::error!(
                group = %self.group,
                capacity = self.capacity,
                "in-process dead-letter store of this group is full: new dead letters wait \
                 with the group (holding their queue slots and keys) until dead letters are \
                 redriven or discarded"
            );
        }
        Err(dl)
    }

    /// Removes the stored dead letter `id`.
    fn remove(letters: &mut DeadLetters, id: Uuid) -> Option<DeadLetter> {
        let at = letters.stored.iter().position(|d| d.envelope.id() == id)?;
        letters.stored.remove(at)
    }

    /// After a removal: moves waiting dead letters into the room there is.
    /// Returns their lane keys, which the caller releases with their slots
    /// (see [`Shared::room_made`]) once the lock is gone.
    fn fill(&self, letters: &mut DeadLetters) -> Vec<Option<u64>> {
        let mut released = Vec::new();
        while letters.stored.len() < self.capacity {
            let Some((dl, key)) = letters.waiting.pop_front() else {
                break;
            };
            letters.stored.push_back(dl);
            released.push(key);
        }
        if letters.stored.len() < self.capacity {
            letters.full = false;
        }
        released
    }
}

/// Slots taken from the first `n` groups, given back unless kept (a publish
/// cancelled or failed while it waits for room loses no slot).
struct Taken<'a> {
    groups: &'a [Arc<Group>],
    n: usize,
}

impl Taken<'_> {
    /// The slots now belong to the pushed deliveries.
    fn keep(mut self) {
        self.n = 0;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        for g in &self.groups[..self.n] {
            g.slots.give_back(1);
        }
    }
}

impl Group {
    /// The delivery is done for good (acked or dead-lettered): release its
    /// key to the next event waiting on it, and its queue slot.
    fn finish(&self, key: Option<u64>) {
        let mut st = lock(&self.state);
        let successor = st.lanes.release(key);
        st.outstanding -= 1;
        // Only shutdown waits for a group to go idle (it sets `draining`
        // under this lock first), so an idle group outside a drain wakes
        // nobody.
        let idle = st.outstanding == 0 && st.draining;
        drop(st);
        self.slots.give_back(1);
        if successor {
            self.work.notify_one();
        }
        if idle {
            self.changed.notify_waiters();
            self.work.notify_waiters();
        }
    }

    /// The delivery's dead letter waits for room in the full store: the
    /// workers are done with it, but it keeps its key and its slot.
    fn park(&self) {
        let mut st = lock(&self.state);
        st.outstanding -= 1;
        let idle = st.outstanding == 0 && st.draining;
        drop(st);
        if idle {
            self.changed.notify_waiters();
            self.work.notify_waiters();
        }
    }

    /// A parked delivery's dead letter was stored: release its key, and its
    /// slot unless `keep_slot` (a redrive takes the slot over).
    fn unpark(&self, key: Option<u64>, keep_slot: bool) {
        let successor = lock(&self.state).lanes.release(key);
        if !keep_slot {
            self.slots.give_back(1);
        }
        if successor {
            self.work.notify_one();
        }
    }

    fn push(&self, envelope: Envelope, attempt: u32, hasher: &impl BuildHasher) {
        let key = lane_key(hasher, self.ordered, &envelope);
        let queued = Queued {
            delivery: Delivery { envelope, attempt },
            key,
        };
        let mut st = lock(&self.state);
        let ready = st.lanes.push(queued);
        st.outstanding += 1;
        drop(st);
        if ready {
            self.work.notify_one();
        }
    }

    /// Keeps the key busy and brings the delivery back after `delay`, as
    /// the next attempt.
    fn retry_later(self: &Arc<Self>, mut queued: Queued, delay: Duration) {
        // A far-future deadline rather than an overflow for absurd delays.
        let now = Instant::now();
        let at = now
            .checked_add(delay)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        queued.delivery.attempt += 1;
        lock(&self.state).lanes.delay(at, queued);
        let group = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let moved = lock(&group.state).lanes.due(Instant::now());
            for _ in 0..moved {
                group.work.notify_one();
            }
        });
    }

    /// Everything not finished, for the shutdown report.
    fn take_unfinished(&self) -> Vec<Envelope> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let mut out = std::mem::take(&mut st.abandoned);
        out.extend(st.lanes.drain().map(|q| q.delivery.envelope));
        out
    }
}

impl InProcessTransport {
    /// A transport with `config`.
    pub fn new(mut config: InProcessConfig) -> Self {
        config.queue_capacity = config.queue_capacity.max(1);
        config.dead_letter_capacity = config.dead_letter_capacity.max(1);
        Self {
            shared: Arc::new(Shared {
                config,
                topics: RwLock::default(),
                groups: Mutex::default(),
                dead: Mutex::default(),
                closed: AtomicBool::new(false),
                gate: Gate::default(),
                stop: Signal::default(),
                inline_abandoned: Mutex::default(),
                hasher: Default::default(),
            }),
        }
    }

    fn topic(&self, event_type: &str) -> Option<Topic> {
        self.shared
            .topics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(event_type)
            .cloned()
    }

    fn edit_topic(&self, event_type: &str, edit: impl FnOnce(&mut Topic)) {
        let mut topics = self
            .shared
            .topics
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        edit(topics.entry(event_type.to_owned()).or_default());
    }
}

/// Runs `f` until it finishes or the shutdown deadline passes (`None`).
/// `f` is polled first, and only one that has to wait creates the wait for
/// the deadline, so one that finishes at once costs nothing more.
async fn until_stopped<F: Future>(stop: &Signal, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut stopped = std::pin::pin!(None);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if stopped.is_none() {
            stopped.set(Some(stop.fired()));
        }
        match stopped.as_mut().as_pin_mut() {
            Some(stopped) => stopped.poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    })
    .await
}

/// The dead letter of a verdict, counted in the handler's statistics.
fn dead_letter_of(
    group: &GroupId,
    handler: &dyn DeliveryHandler,
    envelope: Envelope,
    verdict: Verdict,
) -> DeadLetter {
    handler.settled(group, Settlement::DeadLettered(verdict.reason));
    DeadLetter::new(
        envelope,
        group.clone(),
        verdict.reason,
        verdict.error,
        verdict.attempts,
    )
}

fn log_dead_letter(dl: &DeadLetter) {
    tracing::warn!(
        group = %dl.group,
        id = %dl.envelope.id(),
        reason = %dl.reason,
        attempts = dl.attempts,
        error = %dl.error,
        "event dead-lettered"
    );
}

impl Shared {
    /// The group's dead-letter store, created on first use.
    fn dead_store(&self, group: &GroupId) -> Arc<DeadStore> {
        lock(&self.dead)
            .entry(group.clone())
            .or_insert_with(|| {
                Arc::new(DeadStore::new(
                    group.clone(),
                    self.config.dead_letter_capacity,
                ))
            })
            .clone()
    }

    /// The group's dead-letter store, if it has one.
    fn dead_store_of(&self, group: &GroupId) -> Option<Arc<DeadStore>> {
        lock(&self.dead).get(group).cloned()
    }

    /// A queued delivery's dead letter: stored and the delivery finished,
    /// or, if the store is full, parked with the delivery (which keeps its
    /// slot and key) until room is made.
    fn dead_letter_queued(&self, group: &Group, key: Option<u64>, dl: DeadLetter) {
        log_dead_letter(&dl);
        let mut letters = lock(&group.dead.letters);
        match group.dead.try_store(&mut letters, dl) {
            Ok(()) => {
                drop(letters);
                group.finish(key);
            }
            Err(dl) => {
                letters.waiting.push_back((dl, key));
                drop(letters);
                group.park();
                group.dead.parked.notify_waiters();
            }
        }
    }

    /// An inline run's dead letter: stored, after waiting for room while
    /// the store is full. False if the shutdown deadline passed first (the
    /// caller reports the event unfinished).
    async fn dead_letter_inline(&self, store: &DeadStore, mut dl: DeadLetter) -> bool {
        log_dead_letter(&dl);
        loop {
            let room = store.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            dl = match store.try_store(&mut lock(&store.letters), dl) {
                Ok(()) => return true,
                Err(dl) => dl,
            };
            if until_stopped(&self.stop, room).await.is_none() {
                return false;
            }
        }
    }

    /// Room was made in `store`: release the keys and slots of the dead
    /// letters that moved in, and wake inline runs waiting for room.
    fn room_made(&self, store: &DeadStore, released: Vec<Option<u64>>) {
        if !released.is_empty() {
            if let Some(g) = lock(&self.groups).get(&store.group).cloned() {
                for key in released {
                    g.unpark(key, false);
                }
            }
        }
        store.room.notify_waiters();
    }

    fn closed_error() -> Error {
        Error::new(ErrorKind::Closed, "the in-process transport is shut down")
    }

    /// Runs an inline subscription in the caller's task, with retries.
    /// False when the shutdown deadline cut the run off (in the handler,
    /// waiting to retry, or waiting for room in the dead-letter store): no
    /// failure counted, nothing dead-lettered; the caller reports the event.
    async fn run_inline(&self, group: &InlineGroup, envelope: &Envelope) -> bool {
        let mut attempt = 1;
        loop {
            let delivery = Delivery {
                envelope: envelope.clone(),
                attempt,
            };
            let handling = call_guarded(&*group.handler, delivery);
            let Some(outcome) = until_stopped(&self.stop, handling).await else {
                return false;
            };
            let verdict = match decide(outcome, attempt, &group.retry) {
                Decision::Ack => return true,
                Decision::Retry(delay) => {
                    group.handler.settled(&group.id, Settlement::Retry);
                    if until_stopped(&self.stop, tokio::time::sleep(delay))
                        .await
                        .is_none()
                    {
                        return false;
                    }
                    attempt += 1;
                    continue;
                }
                Decision::DeadLetter(verdict) => verdict,
            };
            let dl = dead_letter_of(&group.id, &*group.handler, envelope.clone(), verdict);
            return self.dead_letter_inline(&group.dead, dl).await;
        }
    }

    /// Runs the inline groups in turn; the shutdown deadline cuts the run
    /// off, and this group and the ones after it get the event back in the
    /// shutdown report.
    async fn run_inline_all(&self, groups: &[Arc<InlineGroup>], envelope: &Envelope) {
        for (i, group) in groups.iter().enumerate() {
            if !self.run_inline(group, envelope).await {
                let mut cut = lock(&self.inline_abandoned);
                for g in &groups[i..] {
                    cut.push(Unfinished::new(g.id.clone(), envelope.clone()));
                }
                return;
            }
        }
    }
}

#[async_trait]
impl Transport for InProcessTransport {
    fn name(&self) -> &str {
        "in-process"
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.consumer_groups = true;
        caps.per_key_order = true;
        caps.per_key_order_across_consumers = true;
        caps.inline_dispatch = true;
        caps.shares_values = true;
        caps.dead_letter_store = true;
        caps.duplicates = false;
        caps
    }

    fn try_publish(&self, envelope: Envelope) -> TryPublish {
        let Some(_pass) = self.shared.gate.enter() else {
            return TryPublish::Done(Err(Shared::closed_error()));
        };
        if self.shared.closed.load(SeqCst) {
            return TryPublish::Done(Err(Shared::closed_error()));
        }
        // The read lock is held while pushing (no await here), so the
        // topic's lists are used in place rather than cloned.
        let topics = self
            .shared
            .topics
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(topic) = topics.get(envelope.event_type()) else {
            return TryPublish::Done(Ok(()));
        };
        if !topic.inline.is_empty() {
            return TryPublish::Pending(envelope);
        }
        let mut taken = Taken {
            groups: &topic.queued,
            n: 0,
        };
        for g in topic.queued.iter() {
            if !g.slots.try_take() {
                if self.shared.config.when_full == WhenFull::Fail || g.slots.is_closed() {
                    return TryPublish::Done(Err(full_or_closed(g)));
                }
                return TryPublish::Pending(envelope);
            }
            taken.n += 1;
        }
        taken.keep();
        push_all(&topic.queued, envelope, &self.shared.hasher);
        TryPublish::Done(Ok(()))
    }

    async fn publish(&self, envelope: Envelope) -> Result<()> {
        let Some(pass) = self.shared.gate.enter() else {
            return Err(Shared::closed_error());
        };
        if self.shared.closed.load(SeqCst) {
            return Err(Shared::closed_error());
        }
        let Some(topic) = self.topic(envelope.event_type()) else {
            return Ok(());
        };
        // Slots are given back unless every group has room, so a publish
        // cancelled while it waits loses none.
        let mut taken = Taken {
            groups: &topic.queued,
            n: 0,
        };
        for g in topic.queued.iter() {
            let room = match self.shared.config.when_full {
                WhenFull::Wait => g.slots.take().await,
                WhenFull::Fail => g.slots.try_take(),
            };
            if !room {
                return Err(full_or_closed(g));
            }
            taken.n += 1;
        }
        taken.keep();
        if topic.inline.is_empty() {
            push_all(&topic.queued, envelope, &self.shared.hasher);
            return Ok(());
        }
        push_all(&topic.queued, envelope.clone(), &self.shared.hasher);
        // Still inside the gate: shutdown waits for inline runs as it waits
        // for queued work, and cuts them off at its deadline.
        self.shared.run_inline_all(&topic.inline, &envelope).await;
        drop(pass);
        Ok(())
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Box<dyn Consumer>> {
        if self.shared.closed.load(SeqCst) {
            return Err(Shared::closed_error());
        }
        if spec.concurrency == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "concurrency must be at least 1",
            ));
        }
        if spec.dispatch == Dispatch::Inline {
            let inline = Arc::new(InlineGroup {
                id: spec.group.clone(),
                handler,
                retry: spec.retry.clone(),
                dead: self.shared.dead_store(&spec.group),
            });
            self.edit_topic(&spec.event_type, |t| {
                t.inline = t.inline.iter().cloned().chain([inline.clone()]).collect();
            });
            return Ok(Box::new(InlineConsumer {
                transport: self.shared.clone(),
                event_type: spec.event_type.to_string(),
                group: inline,
            }));
        }
        let group = {
            let mut groups = lock(&self.shared.groups);
            match groups.get(&spec.group) {
                Some(g) if g.event_type != spec.event_type => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "group {} is subscribed to {}, not {}",
                            spec.group, g.event_type, spec.event_type
                        ),
                    ))
                }
                Some(g) => g.clone(),
                None => {
                    let g = Arc::new(Group {
                        id: spec.group.clone(),
                        event_type: spec.event_type.to_string(),
                        ordered: spec.ordering == Ordering::ByKey,
                        slots: Slots::new(self.shared.config.queue_capacity),
                        dead: self.shared.dead_store(&spec.group),
                        state: Mutex::default(),
                        work: Notify::new(),
                        changed: Notify::new(),
                    });
                    groups.insert(spec.group.clone(), g.clone());
                    self.edit_topic(&spec.event_type, |t| {
                        t.queued = t.queued.iter().cloned().chain([g.clone()]).collect();
                    });
                    g
                }
            }
        };
        let detach = Arc::new(Signal::default());
        lock(&group.state).workers += spec.concurrency;
        let workers = (0..spec.concurrency)
            .map(|_| {
                tokio::spawn(run_worker(
                    self.shared.clone(),
                    group.clone(),
                    handler.clone(),
                    spec.retry.clone(),
                    detach.clone(),
                ))
            })
            .collect();
        Ok(Box::new(QueuedConsumer {
            detach,
            workers: Mutex::new(workers),
        }))
    }

    async fn dead_letters(&self, group: &GroupId) -> Result<Vec<DeadLetter>> {
        Ok(self
            .shared
            .dead_store_of(group)
            .map(|store| lock(&store.letters).stored.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn redrive(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let target = lock(&self.shared.groups).get(group).cloned();
        let inline = if target.is_none() {
            self.topic_of_inline(group)
        } else {
            None
        };
        if target.is_none() && inline.is_none() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("group {group} has no subscription on this transport to redrive to"),
            ));
        }
        let Some(store) = self.shared.dead_store_of(group) else {
            return Ok(0);
        };
        let wanted: Vec<Uuid> = lock(&store.letters)
            .stored
            .iter()
            .filter(|d| ids.is_none_or(|ids| ids.contains(&d.envelope.id())))
            .map(|d| d.envelope.id())
            .collect();
        let mut n = 0;
        for id in wanted {
            let Some(_pass) = self.shared.gate.enter() else {
                return Err(Shared::closed_error());
            };
            if self.shared.closed.load(SeqCst) {
                return Err(Shared::closed_error());
            }
            let redriven = if let Some(g) = &target {
                self.redrive_queued(g, &store, id).await?
            } else if let Some(inline) = &inline {
                // Redriven concurrently by someone else: skip it.
                let Some(dl) = self.take_dead_letter(&store, id) else {
                    continue;
                };
                // A redrive dropped while the handler runs puts the dead
                // letter back (or has it wait for room).
                let envelope = dl.envelope.clone();
                let mut back = PutBack {
                    store: &store,
                    dl: Some(dl),
                };
                self.shared
                    .run_inline_all(std::slice::from_ref(inline), &envelope)
                    .await;
                back.dl = None;
                true
            } else {
                false
            };
            n += usize::from(redriven);
        }
        Ok(n)
    }

    async fn discard_dead_letters(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let Some(store) = self.shared.dead_store_of(group) else {
            return Ok(0);
        };
        let mut letters = lock(&store.letters);
        let before = letters.stored.len();
        match ids {
            None => letters.stored.clear(),
            Some(ids) => {
                let ids: std::collections::HashSet<&Uuid> = ids.iter().collect();
                letters.stored.retain(|d| !ids.contains(&d.envelope.id()));
            }
        }
        let n = before - letters.stored.len();
        if n == 0 {
            return Ok(0);
        }
        let released = store.fill(&mut letters);
        drop(letters);
        tracing::info!(%group, discarded = n, "in-process dead letters discarded");
        self.shared.room_made(&store, released);
        Ok(n)
    }

    async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        self.shared.closed.store(true, SeqCst);
        let all_groups =
            || -> Vec<Arc<Group>> { lock(&self.shared.groups).values().cloned().collect() };
        for g in all_groups() {
            g.slots.close();
        }
        let start_drain = || -> Vec<Arc<Group>> {
            let groups = all_groups();
            for g in &groups {
                g.slots.close();
                lock(&g.state).draining = true;
                g.work.notify_waiters();
            }
            groups
        };
        let drain = async {
            // Publishers waiting for a queue slot fail now that the queues
            // are closed; wait until none is between its check and its push,
            // and until the inline runs in progress end (they hold their
            // pass while their handlers run).
            self.shared.gate.close().await;
            for g in &start_drain() {
                wait_for(g, |st| st.outstanding == 0 || st.workers == 0).await;
            }
        };
        let in_time = tokio::time::timeout(deadline, drain).await.is_ok();
        // Abandon what is still running; wait for the inline runs (each
        // waits for the stop signal too, so they leave as soon as they are
        // polled) and the workers to leave.
        self.shared.stop.fire();
        self.shared.gate.close().await;
        let groups = start_drain();
        for g in &groups {
            wait_for(g, |st| st.workers == 0).await;
        }
        let mut report = ShutdownReport::drained();
        for g in &groups {
            for envelope in g.take_unfinished() {
                report
                    .unfinished
                    .push(Unfinished::new(g.id.clone(), envelope));
            }
        }
        report
            .unfinished
            .append(&mut lock(&self.shared.inline_abandoned));
        // Dead letters still waiting for room: handed back, never lost.
        let stores: Vec<Arc<DeadStore>> = lock(&self.shared.dead).values().cloned().collect();
        for store in stores {
            let waiting = std::mem::take(&mut lock(&store.letters).waiting);
            for (dl, _) in waiting {
                report
                    .unfinished
                    .push(Unfinished::new(store.group.clone(), dl.envelope));
            }
        }
        report.drained = in_time && report.unfinished.is_empty();
        if !report.unfinished.is_empty() {
            tracing::warn!(
                unfinished = report.unfinished.len(),
                "in-process shutdown left events unhandled; they are in the report"
            );
        }
        Ok(report)
    }
}

/// Puts a dead letter taken out for an inline redrive back if the redrive
/// is dropped before its run ends.
struct PutBack<'a> {
    store: &'a DeadStore,
    dl: Option<DeadLetter>,
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        let Some(dl) = self.dl.take() else {
            return;
        };
        let mut letters = lock(&self.store.letters);
        if let Err(dl) = self.store.try_store(&mut letters, dl) {
            // No queued group owns this delivery: no key to release later.
            letters.waiting.push_back((dl, None));
        }
    }
}

impl InProcessTransport {
    /// Takes the stored dead letter `id` out of `store`, making room.
    fn take_dead_letter(&self, store: &DeadStore, id: Uuid) -> Option<DeadLetter> {
        let mut letters = lock(&store.letters);
        let dl = DeadStore::remove(&mut letters, id)?;
        let released = store.fill(&mut letters);
        drop(letters);
        self.shared.room_made(store, released);
        Some(dl)
    }

    /// Sends the stored dead letter `id` back to queued group `g`; false if
    /// someone else took it first. The dead letter leaves the store only
    /// once the group has a queue slot for it, so a redrive cancelled while
    /// it waits loses nothing.
    async fn redrive_queued(&self, g: &Arc<Group>, store: &DeadStore, id: Uuid) -> Result<bool> {
        loop {
            let parked = store.parked.notified();
            tokio::pin!(parked);
            parked.as_mut().enable();
            {
                let mut letters = lock(&store.letters);
                let Some(at) = letters.stored.iter().position(|d| d.envelope.id() == id) else {
                    return Ok(false);
                };
                // The store is full and a dead letter waits for room holding
                // a queue slot (the slots may all be held that way): it
                // takes this one's place in the store, this one its slot.
                if let Some((waiting, key)) = letters.waiting.pop_front() {
                    letters.stored.push_back(waiting);
                    let dl = letters
                        .stored
                        .remove(at)
                        .expect("the dead letter was found under this lock");
                    drop(letters);
                    g.unpark(key, true);
                    g.push(dl.envelope, 1, &self.shared.hasher);
                    return Ok(true);
                }
            }
            tokio::select! {
                room = g.slots.take() => {
                    if !room {
                        return Err(Shared::closed_error());
                    }
                    break;
                }
                () = &mut parked => continue,
            }
        }
        let Some(dl) = self.take_dead_letter(store, id) else {
            g.slots.give_back(1);
            return Ok(false);
        };
        g.push(dl.envelope, 1, &self.shared.hasher);
        Ok(true)
    }
}

impl InProcessTransport {
    fn topic_of_inline(&self, group: &GroupId) -> Option<Arc<InlineGroup>> {
        let topics = self
            .shared
            .topics
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        topics
            .values()
            .flat_map(|t| t.inline.iter())
            .find(|g| &g.id == group)
            .cloned()
    }
}

/// Pushes one delivery per group (slots already taken); the last group
/// takes the envelope itself, so a single subscriber costs no clone.
fn push_all(groups: &[Arc<Group>], envelope: Envelope, hasher: &impl BuildHasher) {
    if let Some((last, rest)) = groups.split_last() {
        for g in rest {
            g.push(envelope.clone(), 1, hasher);
        }
        last.push(envelope, 1, hasher);
    }
}

fn full_or_closed(g: &Group) -> Error {
    if g.slots.is_closed() {
        Shared::closed_error()
    } else {
        Error::new(
            ErrorKind::QueueFull,
            format!("the queue of group {} is full", g.id),
        )
    }
}

/// Waits until `done(state)` holds, re-checking whenever the group changes.
async fn wait_for(g: &Group, done: impl Fn(&GroupState) -> bool) {
    loop {
        let changed = g.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if done(&lock(&g.state)) {
            return;
        }
        changed.await;
    }
}

/// Keeps the group's worker count right however the worker ends, and hands
/// on work it leaves behind to another worker.
struct WorkerSlot(Arc<Group>);

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        let pending = {
            let mut st = lock(&self.0.state);
            st.workers -= 1;
            st.lanes.has_ready()
        };
        if pending {
            self.0.work.notify_one();
        }
        self.0.changed.notify_waiters();
    }
}

async fn run_worker(
    shared: Arc<Shared>,
    group: Arc<Group>,
    handler: Arc<dyn DeliveryHandler>,
    retry: RetryPolicy,
    detach: Arc<Signal>,
) {
    let _slot = WorkerSlot(group.clone());
    let stop = &shared.stop;
    loop {
        let next = {
            let mut st = lock(&group.state);
            if detach.is_set() || stop.is_set() {
                return;
            }
            match st.lanes.pop() {
                Some(q) => Some(q),
                None if st.draining && st.outstanding == 0 => return,
                None => None,
            }
        };
        let Some(queued) = next else {
            // Idle: register for a wakeup, then look again, so a push
            // between the look above and the registration is not missed.
            // (Only an idle worker registers; a busy one never touches the
            // wakeup list.)
            let work = group.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            {
                let st = lock(&group.state);
                if st.lanes.has_ready() || (st.draining && st.outstanding == 0) {
                    continue;
                }
            }
            tokio::select! {
                _ = &mut work => continue,
                _ = detach.fired() => return,
                _ = stop.fired() => return,
            }
        };
        // The handler runs first; only a handler that has to wait also
        // waits for the shutdown deadline (one that finishes at once never
        // registers for it).
        let outcome = {
            let handling = call_guarded(&*handler, queued.delivery.clone());
            let stopped = stop.fired();
            tokio::pin!(handling, stopped);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(outcome) = handling.as_mut().poll(cx) {
                    return Poll::Ready(Some(outcome));
                }
                stopped.as_mut().poll(cx).map(|()| None)
            })
            .await
        };
        let Some(outcome) = outcome else {
            // Deadline passed: not a failure, not dead-lettered; reported.
            lock(&group.state).abandoned.push(queued.delivery.envelope);
            return;
        };
        match decide(outcome, queued.delivery.attempt, &retry) {
            Decision::Ack => group.finish(queued.key),
            Decision::Retry(delay) => {
                handler.settled(&group.id, Settlement::Retry);
                group.retry_later(queued, delay);
            }
            Decision::DeadLetter(verdict) => {
                let dl = dead_letter_of(&group.id, &*handler, queued.delivery.envelope, verdict);
                shared.dead_letter_queued(&group, queued.key, dl);
            }
        }
    }
}

struct QueuedConsumer {
    detach: Arc<Signal>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

#[async_trait]
impl Consumer for QueuedConsumer {
    async fn close(&self) -> Result<()> {
        self.detach.fire();
        let workers = std::mem::take(&mut *lock(&self.workers));
        for w in workers {
            w.await
                .map_err(|e| Error::new(ErrorKind::Other, format!("worker task failed: {e}")))?;
        }
        Ok(())
    }
}

struct InlineConsumer {
    transport: Arc<Shared>,
    event_type: String,
    group: Arc<InlineGroup>,
}

#[async_trait]
impl Consumer for InlineConsumer {
    async fn close(&self) -> Result<()> {
        let mut topics = self
            .transport
            .topics
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = topics.get_mut(&self.event_type) {
            t.inline = t
                .inline
                .iter()
                .filter(|g| !Arc::ptr_eq(g, &self.group))
                .cloned()
                .collect();
        }
        Ok(())
    }
}
