//! The delivery engine: the consumer side of every broker transport,
//! written once.
//!
//! A broker crate supplies a [`Source`] (fetch messages, pause and resume
//! fetching) and a [`Sink`] (ack, give back, keep alive, schedule a retry,
//! store a dead letter) for its client library; [`run`] does everything
//! else, so every transport has the same semantics by construction:
//!
//! - **per-key lanes**: with [`Ordering::ByKey`], events of one partition
//!   key run one at a time in fetch order, also across retries; other keys
//!   run concurrently, up to the subscription's `concurrency`;
//! - **retries**: a transient failure is retried after the policy's delay.
//!   An event with a key waits in this process (so no later event of its
//!   key overtakes it and its key never depends on another process); an
//!   event without one is handed to the broker's own delayed retry when the
//!   sink has one ([`Sink::retry_later`]), else it waits here too. A waiting
//!   retry holds no worker;
//! - **the attempt** comes with the message ([`Fetched::attempt`], a header
//!   on every broker) and grows only when a handler ran and failed.
//!   Stopping, closing, a rebalance or the shutdown deadline give an event
//!   back ([`Sink::release`]; [`Sink::abandon`] for a handler the deadline
//!   cut off) without counting an attempt. Crash loops are
//!   capped separately by the broker's delivery count
//!   ([`Fetched::delivered`] against the delivery limit);
//! - **holding limit**: at most `max_held` messages are held (waiting,
//!   running or waiting to retry); past it fetching pauses
//!   ([`Source::pause`]), and keep-alives ([`Sink::keep_alive`]) keep every
//!   held message from being redelivered meanwhile;
//! - **dead letters**: undecodable messages at once, rejected events at
//!   once, others after the last attempt; a dead letter that cannot be
//!   stored is kept (with its key) and stored again later, never dropped;
//! - **stop**: on close or shutdown fetching stops, held events that did not
//!   start are given back, running handlers finish until the shutdown
//!   deadline, and those cut short are reported as unfinished.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lanes::{lane_key, Laned, Lanes};
use super::support::{call_guarded, Subscriptions, TaskConsumer};
use super::{
    Consumer, DeadLetterReason, Delivery, DeliveryHandler, GroupId, Ordering, Outcome, Settlement,
    SubscriptionSpec, Unfinished,
};
use crate::envelope::Envelope;
use crate::error::{ErrorKind, Result};

/// One message a [`Source`] fetched.
#[derive(Debug)]
pub struct Fetched<T> {
    /// The broker's handle on the message (for acks and the like).
    pub token: T,
    /// The envelope, or why the message is not one (dead-lettered as
    /// [`DeadLetterReason::Undecodable`]).
    pub envelope: std::result::Result<Envelope, String>,
    /// The attempt this delivery is, as carried with the event (1 when the
    /// message carries none).
    pub attempt: u32,
    /// How often the broker has delivered this message, if it counts
    /// (crashes and shutdowns included): compared with the delivery limit
    /// to stop crash loops, never used as the attempt.
    pub delivered: Option<u32>,
}

/// What [`Source::fetch`] returns.
#[derive(Debug)]
pub enum Fetch<T> {
    /// A message.
    Message(Fetched<T>),
    /// Some messages this consumer holds are no longer its own (a Kafka
    /// rebalance, a lost RabbitMQ channel): the engine drops those for which
    /// [`Sink::owns`] is false.
    Revoked,
}

/// The fetching half of a broker subscription. Owned by the engine's task.
#[async_trait]
pub trait Source: Send + 'static {
    /// The broker's handle on one message.
    type Token: Send + Sync + 'static;

    /// Whether [`Source::fetch`] must be called even while paused (Kafka:
    /// polling keeps the member in its group and runs rebalances).
    const POLL_WHILE_PAUSED: bool = false;

    /// Waits for the next message. Must be cancellation safe: the engine
    /// drops the future when something else happens first. An error is
    /// logged, and fetch is called again after a pause.
    async fn fetch(&mut self) -> Result<Fetch<Self::Token>>;

    /// Called when the engine holds as many messages as it may (`true`)
    /// and when it has room again (`false`).
    fn pause(&mut self, paused: bool) {
        let _ = paused;
    }

    /// Called once when the subscription stops, after every message was
    /// settled or given back.
    async fn close(&mut self) {}
}

/// The settling half of a broker subscription, shared by the handler tasks.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The broker's handle on one message.
    type Token: Send + Sync + 'static;

    /// False when the message is no longer this consumer's to settle.
    fn owns(&self, token: &Self::Token) -> bool {
        let _ = token;
        true
    }

    /// Acknowledges a handled (or dead-lettered, or rescheduled) message.
    async fn ack(&self, token: &Self::Token) -> Result<()>;

    /// Gives the message back to the broker for redelivery, counting no
    /// attempt (close, shutdown, deadline).
    async fn release(&self, token: &Self::Token);

    /// Gives back a message whose handler the shutdown deadline cut off.
    /// Not an attempt either, but the broker may count it as a delivery
    /// (as it would a crash) so that an event no handler ever finishes
    /// reaches the delivery limit. Default: [`Sink::release`].
    async fn abandon(&self, token: &Self::Token) {
        self.release(token).await;
    }

    /// How often held messages need [`Sink::keep_alive`], if ever.
    fn keep_alive_every(&self) -> Option<Duration> {
        None
    }

    /// Tells the broker a held message is still being worked on.
    async fn keep_alive(&self, token: &Self::Token) {
        let _ = token;
    }

    /// Hands a failed event without a key to the broker's delayed retry:
    /// it comes back after `delay` as attempt `attempt`, and this message is
    /// settled. `Ok(false)` (the default): the broker has none; the engine
    /// waits here.
    async fn retry_later(
        &self,
        token: &Self::Token,
        envelope: &Envelope,
        attempt: u32,
        delay: Duration,
    ) -> Result<bool> {
        let _ = (token, envelope, attempt, delay);
        Ok(false)
    }

    /// Stores the message as a dead letter of the group (durably), then
    /// settles it.
    async fn dead_letter(
        &self,
        token: &Self::Token,
        envelope: Option<&Envelope>,
        verdict: &Verdict,
    ) -> Result<()>;
}

/// Why a message goes to the dead letter.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The reason.
    pub reason: DeadLetterReason,
    /// The error text, fit for a header (no line breaks, no payload values).
    pub error: String,
    /// The attempts made.
    pub attempts: u32,
    /// Store the dead letter without the payload (and without headers
    /// other than the event's attributes): the whole copy was too large
    /// for the destination. The reason is then
    /// [`DeadLetterReason::TooLarge`] and the error names the first reason.
    pub without_payload: bool,
}

impl Verdict {
    /// The same dead letter, to be stored without its payload.
    fn too_large(&self) -> Self {
        Self {
            reason: DeadLetterReason::TooLarge,
            error: super::support::header_text(&format!(
                "{}: {}; too large to dead-letter whole, kept without its payload",
                self.reason, self.error
            )),
            attempts: self.attempts,
            without_payload: true,
        }
    }
}

/// The signals a subscription obeys.
#[derive(Clone, Debug, Default)]
pub struct Signals {
    /// This subscription closes.
    pub detach: CancellationToken,
    /// The transport shuts down: stop fetching, let running handlers finish.
    pub closing: CancellationToken,
    /// The shutdown deadline passed: abandon running handlers.
    pub stop: CancellationToken,
}

/// Limits of one subscription on a broker.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most messages held at once.
    pub max_held: usize,
    /// Deliveries after which a message is dead-lettered as a crash loop.
    pub delivery_limit: Option<u32>,
}

impl Limits {
    /// Holding at most `max_held`, no delivery limit.
    pub fn new(max_held: usize) -> Self {
        Self {
            max_held: max_held.max(1),
            delivery_limit: None,
        }
    }

    /// Sets [`Limits::delivery_limit`].
    pub fn with_delivery_limit(mut self, limit: Option<u32>) -> Self {
        self.delivery_limit = limit;
        self
    }
}

/// The running state every broker transport keeps, written once: whether
/// it is shut down, the signals its subscriptions obey, the gate that
/// publishes and subscribes hold while they run, and the running
/// subscriptions. [`spawn`] runs a subscription under it;
/// [`Host::admit`] lets a publish or subscribe in; [`Host::shut_down`]
/// ends it all.
#[derive(Debug)]
pub struct Host {
    transport: &'static str,
    closed: std::sync::atomic::AtomicBool,
    closing: CancellationToken,
    stop: CancellationToken,
    gate: tokio::sync::RwLock<()>,
    subscriptions: Arc<Subscriptions>,
}

impl Host {
    /// The state of a new transport, named in errors (`"NATS"`).
    pub fn new(transport: &'static str) -> Self {
        Self {
            transport,
            closed: Default::default(),
            closing: CancellationToken::new(),
            stop: CancellationToken::new(),
            gate: Default::default(),
            subscriptions: Arc::default(),
        }
    }

    /// Lets one publish or subscribe in: a guard that shutdown waits for
    /// (up to its deadline), or [`ErrorKind::Closed`] once shutdown began.
    pub async fn admit(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>> {
        let open = self.gate.read().await;
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::Error::new(
                ErrorKind::Closed,
                format!("the {} transport is shut down", self.transport),
            ));
        }
        Ok(open)
    }

    /// Fired when the transport's shutdown begins (for the transport's
    /// own waits, e.g. reconnecting).
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Shuts down: refuses new work, tells subscriptions to stop, and
    /// waits for publishes in flight and subscriptions up to `deadline`
    /// ([`support::drain`](super::support::drain)); the report says what
    /// was left unfinished.
    pub async fn shut_down(&self, deadline: Duration) -> super::ShutdownReport {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.closing.cancel();
        super::support::drain(deadline, &self.gate, &self.subscriptions, &self.stop).await
    }
}

/// Runs one subscription ([`run`]) on its own task, counted in the host's
/// subscriptions; the returned consumer closes it.
pub fn spawn<S, K>(
    host: &Host,
    spec: SubscriptionSpec,
    handler: Arc<dyn DeliveryHandler>,
    source: S,
    sink: Arc<K>,
    limits: Limits,
) -> Box<dyn Consumer>
where
    S: Source,
    K: Sink<Token = S::Token>,
{
    let detach = CancellationToken::new();
    let signals = Signals {
        detach: detach.clone(),
        closing: host.closing.clone(),
        stop: host.stop.clone(),
    };
    let running = host.subscriptions.start();
    let task = tokio::spawn(async move {
        let unfinished = run(spec, handler, source, sink, limits, signals).await;
        running.finish(unfinished);
    });
    Box::new(TaskConsumer::new(detach, task))
}

/// Delay before storing a dead letter again after the broker refused it,
/// doubling with every refusal up to the maximum.
const DEAD_LETTER_AGAIN: Duration = Duration::from_millis(500);
const DEAD_LETTER_AGAIN_MAX: Duration = Duration::from_secs(60);
/// Pause after a fetch error.
const FETCH_PAUSE: Duration = Duration::from_millis(100);

/// One held message.
struct Item<T> {
    seq: u64,
    token: Arc<T>,
    envelope: std::result::Result<Envelope, String>,
    attempt: u32,
    delivered: Option<u32>,
    key: Option<u64>,
    /// A dead letter decided before, that could not be stored yet.
    verdict: Option<Verdict>,
    /// How often storing it failed.
    dead_letter_failures: u32,
}

impl<T> Laned for Item<T> {
    fn key(&self) -> Option<u64> {
        self.key
    }
}

/// What a handler task reports.
enum Done<T> {
    /// Settled for good (acked, dead-lettered, handed to the broker).
    Settled(Item<T>),
    /// Wait `delay`, then run again (or store the pending dead letter).
    Again(Item<T>, Duration),
    /// The deadline cut it short; given back.
    Abandoned(Item<T>),
}

struct Shared<K> {
    handler: Arc<dyn DeliveryHandler>,
    sink: Arc<K>,
    spec: SubscriptionSpec,
    limits: Limits,
    signals: Signals,
}

/// Runs one subscription until it closes or the transport stops; returns
/// the events the shutdown deadline cut short.
pub async fn run<S, K>(
    spec: SubscriptionSpec,
    handler: Arc<dyn DeliveryHandler>,
    mut source: S,
    sink: Arc<K>,
    limits: Limits,
    signals: Signals,
) -> Vec<Unfinished>
where
    S: Source,
    K: Sink<Token = S::Token>,
{
    let shared = Arc::new(Shared {
        handler,
        sink,
        spec,
        limits,
        signals,
    });
    let mut state = State::<S::Token> {
        lanes: Lanes::default(),
        held: HashMap::new(),
        seq: 0,
        hasher: Default::default(),
        unfinished: Vec::new(),
    };
    let mut running: JoinSet<Done<S::Token>> = JoinSet::new();
    let keep_alive_every = shared.sink.keep_alive_every();
    let mut keep_alive = keep_alive_every.map(|every| {
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut paused = false;
    let signals = &shared.signals;
    let stopping = || signals.detach.is_cancelled() || signals.closing.is_cancelled();
    loop {
        while running.len() < shared.spec.concurrency {
            let Some(item) = state.lanes.pop() else {
                break;
            };
            let shared = shared.clone();
            running.spawn(async move { handle(shared, item).await });
        }
        if stopping() {
            break;
        }
        let full = state.held.len() >= shared.limits.max_held;
        if full != paused {
            paused = full;
            source.pause(paused);
        }
        let next_due = state.lanes.next_due();
        tokio::select! {
            _ = signals.detach.cancelled() => {}
            _ = signals.closing.cancelled() => {}
            Some(done) = running.join_next(), if !running.is_empty() => match done {
                Ok(done) => state.done(&shared, done),
                Err(e) => tracing::error!(group = %shared.spec.group, error = %e, "handler task failed"),
            },
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                state.lanes.due(Instant::now());
            }
            _ = async {
                match keep_alive.as_mut() {
                    Some(tick) => {
                        tick.tick().await;
                    }
                    None => std::future::pending().await,
                }
            } => {
                for token in state.held.values() {
                    shared.sink.keep_alive(token).await;
                }
            }
            fetched = source.fetch(), if !paused || S::POLL_WHILE_PAUSED => match fetched {
                Ok(Fetch::Message(fetched)) => state.accept(&shared, fetched),
                Ok(Fetch::Revoked) => state.revoke(&shared),
                Err(e) => {
                    tracing::warn!(group = %shared.spec.group, error = %e, "cannot fetch; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(FETCH_PAUSE) => {}
                        _ = signals.detach.cancelled() => {}
                        _ = signals.closing.cancelled() => {}
                    }
                }
            },
        }
    }

    // Stop: what did not start goes back at once; running handlers finish
    // (until the deadline, where they give their event back). Past the
    // deadline every broker call here has `STOP_GRACE` to finish (a broker
    // that stops answering must not hang the shutdown); what did not is
    // abandoned to the broker, which redelivers it.
    let waiting: Vec<Item<S::Token>> = state.lanes.drain().collect();
    let group = &shared.spec.group;
    let give_back = async {
        for item in waiting {
            if shared.sink.owns(&item.token) {
                shared.sink.release(&item.token).await;
            }
        }
    };
    if !within_grace(&signals.stop, give_back).await {
        tracing::warn!(%group, "giving back held events did not finish in time after the shutdown deadline; the broker redelivers them");
    }
    let finishing = async {
        while let Some(done) = running.join_next().await {
            match done {
                Ok(Done::Abandoned(item)) => {
                    if let Ok(envelope) = item.envelope {
                        state
                            .unfinished
                            .push(Unfinished::new(shared.spec.group.clone(), envelope));
                    }
                }
                // A retry decided while stopping: back to the broker, which
                // keeps its attempt.
                Ok(Done::Again(item, _)) if shared.sink.owns(&item.token) => {
                    shared.sink.release(&item.token).await;
                }
                _ => {}
            }
        }
    };
    if !within_grace(&signals.stop, finishing).await {
        tracing::warn!(%group, handlers = running.len(), "handlers still settling their events after the shutdown deadline were abandoned; the broker redelivers those events");
        running.abort_all();
    }
    let closed = tokio::time::timeout(CLOSE_LIMIT, within_grace(&signals.stop, source.close()));
    if !closed.await.unwrap_or(false) {
        tracing::warn!(%group, "closing the subscription's broker side did not finish in time; abandoned");
    }
    state.unfinished
}

/// How long broker calls may still take once the shutdown deadline passed.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long closing a subscription's broker side may take at most.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Runs `work` to its end, or until `STOP_GRACE` after `stop` fired;
/// false if it was cut short.
async fn within_grace(
    stop: &CancellationToken,
    work: impl std::future::Future<Output = ()>,
) -> bool {
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::select! {
        biased;
        () = work => true,
        () = grace => false,
    }
}

struct State<T> {
    /// Waiting, ready and delayed items.
    lanes: Lanes<Item<T>>,
    /// Every held message, for keep-alives and the holding limit.
    held: HashMap<u64, Arc<T>>,
    seq: u64,
    hasher: std::collections::hash_map::RandomState,
    unfinished: Vec<Unfinished>,
}

impl<T: Send + Sync + 'static> State<T> {
    fn accept<K: Sink<Token = T>>(&mut self, shared: &Shared<K>, fetched: Fetched<T>) {
        self.seq += 1;
        let ordered = shared.spec.ordering == Ordering::ByKey;
        let key = match &fetched.envelope {
            Ok(envelope) => lane_key(&self.hasher, ordered, envelope),
            Err(_) => None,
        };
        let item = Item {
            seq: self.seq,
            token: Arc::new(fetched.token),
            envelope: fetched.envelope,
            attempt: fetched.attempt.max(1),
            delivered: fetched.delivered,
            key,
            verdict: None,
            dead_letter_failures: 0,
        };
        self.held.insert(item.seq, item.token.clone());
        self.lanes.push(item);
    }

    fn done<K: Sink<Token = T>>(&mut self, shared: &Shared<K>, done: Done<T>) {
        match done {
            Done::Settled(item) => {
                self.held.remove(&item.seq);
                self.lanes.release(item.key);
            }
            Done::Again(item, delay) => {
                if !shared.sink.owns(&item.token) {
                    self.held.remove(&item.seq);
                    self.lanes.release(item.key);
                    return;
                }
                let now = Instant::now();
                let at = now
                    .checked_add(delay)
                    .unwrap_or(now + Duration::from_secs(86_400));
                self.lanes.delay(at, item);
            }
            Done::Abandoned(item) => {
                self.held.remove(&item.seq);
                if let Ok(envelope) = item.envelope {
                    self.unfinished
                        .push(Unfinished::new(shared.spec.group.clone(), envelope));
                }
            }
        }
    }

    /// Drops what is no longer this consumer's: the broker gives it to the
    /// new owner.
    fn revoke<K: Sink<Token = T>>(&mut self, shared: &Shared<K>) {
        let sink = &*shared.sink;
        let held = &mut self.held;
        self.lanes.retain(|item| {
            let owned = sink.owns(&item.token);
            if !owned {
                held.remove(&item.seq);
            }
            owned
        });
    }
}

/// Handles one item and settles it.
async fn handle<K: Sink>(shared: Arc<Shared<K>>, mut item: Item<K::Token>) -> Done<K::Token> {
    let sink = &*shared.sink;
    let retry = &shared.spec.retry;
    let verdict = match item.verdict.take() {
        Some(verdict) => verdict,
        None => {
            let outcome = match (&item.envelope, item.delivered) {
                (Err(why), _) => Outcome::DeadLetter {
                    reason: DeadLetterReason::Undecodable,
                    error: format!("not a Seambus envelope: {why}"),
                },
                (Ok(_), Some(n)) if shared.limits.delivery_limit.is_some_and(|l| n > l) => {
                    Outcome::DeadLetter {
                        reason: DeadLetterReason::MaxAttempts,
                        error: format!(
                            "delivered {n} times, over the delivery limit (a process kept dying while handling it)"
                        ),
                    }
                }
                (Ok(envelope), _) => {
                    let delivery = Delivery {
                        envelope: envelope.clone(),
                        attempt: item.attempt,
                    };
                    tokio::select! {
                        biased;
                        _ = shared.signals.stop.cancelled() => {
                            // The deadline: not a failure, not an attempt.
                            if sink.owns(&item.token) {
                                sink.abandon(&item.token).await;
                            }
                            return Done::Abandoned(item);
                        }
                        outcome = call_guarded(&*shared.handler, delivery) => outcome,
                    }
                }
            };
            match decide(outcome, item.attempt, retry) {
                Decision::Ack => {
                    if let Err(e) = sink.ack(&item.token).await {
                        // The broker redelivers it: a duplicate, never a loss.
                        tracing::warn!(group = %shared.spec.group, error = %e, "could not acknowledge an event; it will come again");
                    }
                    return Done::Settled(item);
                }
                Decision::Retry(delay) => {
                    let next = item.attempt + 1;
                    shared
                        .handler
                        .settled(&shared.spec.group, Settlement::Retry);
                    if let (None, Ok(envelope)) = (item.key, &item.envelope) {
                        match sink.retry_later(&item.token, envelope, next, delay).await {
                            Ok(true) => return Done::Settled(item),
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(group = %shared.spec.group, error = %e, "cannot schedule a retry on the broker; retrying here")
                            }
                        }
                    }
                    item.attempt = next;
                    return Done::Again(item, delay);
                }
                Decision::DeadLetter(verdict) => verdict,
            }
        }
    };
    let mut verdict = Verdict {
        error: super::support::header_text(&verdict.error),
        ..verdict
    };
    loop {
        let stored = sink
            .dead_letter(&item.token, item.envelope.as_ref().ok(), &verdict)
            .await;
        match stored {
            Ok(()) => {
                log_dead_letter(&shared.spec.group, &item, &verdict);
                shared
                    .handler
                    .settled(&shared.spec.group, Settlement::DeadLettered(verdict.reason));
                return Done::Settled(item);
            }
            Err(e) if e.kind() == ErrorKind::PayloadTooLarge && !verdict.without_payload => {
                verdict = verdict.too_large();
            }
            Err(e) => {
                // Kept, and stored again later: never dropped, never
                // acknowledged before it is stored.
                item.dead_letter_failures += 1;
                let again = DEAD_LETTER_AGAIN
                    .saturating_mul(1 << item.dead_letter_failures.min(6))
                    .min(DEAD_LETTER_AGAIN_MAX);
                tracing::error!(group = %shared.spec.group, id = ?item.envelope.as_ref().ok().map(Envelope::id), error = %e, retry_in = ?again, "cannot store a dead letter; keeping the event and trying again");
                item.verdict = Some(verdict);
                return Done::Again(item, again);
            }
        }
    }
}

/// What to do with a delivery's outcome: the one place where a failure
/// becomes a retry or a dead letter (the in-process transport uses it too).
#[derive(Debug)]
pub(crate) enum Decision {
    /// Handled.
    Ack,
    /// Run again after this delay, as the next attempt.
    Retry(Duration),
    /// Give up.
    DeadLetter(Verdict),
}

/// Decides with the subscription's retry policy.
pub(crate) fn decide(outcome: Outcome, attempt: u32, retry: &super::RetryPolicy) -> Decision {
    match outcome {
        Outcome::Ack => Decision::Ack,
        Outcome::Retry { .. } if attempt < retry.max_attempts => {
            Decision::Retry(retry.delay(attempt))
        }
        Outcome::Retry { error } => Decision::DeadLetter(Verdict {
            reason: DeadLetterReason::MaxAttempts,
            error,
            attempts: attempt,
            without_payload: false,
        }),
        Outcome::DeadLetter { reason, error } => Decision::DeadLetter(Verdict {
            reason,
            error,
            attempts: attempt,
            without_payload: false,
        }),
    }
}

fn log_dead_letter<T>(group: &GroupId, item: &Item<T>, verdict: &Verdict) {
    let id = item.envelope.as_ref().ok().map(Envelope::id);
    tracing::warn!(%group, ?id, reason = %verdict.reason, attempts = verdict.attempts, error = %verdict.error, "event dead-lettered");
}
