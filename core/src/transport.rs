//! The contract between the bus and a transport (in-process, Kafka,
//! RabbitMQ, NATS).
//!
//! Application code does not use this module: it talks to [`crate::Bus`].
//! Transport authors implement [`Transport`] and run the conformance suite
//! (feature `conformance`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};

/// A group: the workers of one subscribing module for one subscription.
///
/// Every group receives every event of its subscription (fan-out across
/// modules); inside a group each event is handled by one worker at a time.
/// Two processes that subscribe with the same module and subscription name
/// share one group (competing consumers).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId {
    module: String,
    subscription: String,
}

impl GroupId {
    /// The group of `module`'s subscription `subscription`.
    pub fn new(module: impl Into<String>, subscription: impl Into<String>) -> Self {
        Self {
            module: module.into(),
            subscription: subscription.into(),
        }
    }

    /// The subscribing module.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The subscription's name (the event name unless set otherwise).
    pub fn subscription(&self) -> &str {
        &self.subscription
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.module, self.subscription)
    }
}

/// How failed deliveries are retried: exponential backoff with jitter, up to
/// a maximum number of attempts (the first delivery is attempt 1).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Attempts before the event is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// Delay before the second attempt. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Upper bound of the delay. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Growth factor per attempt. Default 2.
    pub multiplier: f32,
    /// Random jitter on each delay (so retries of many events spread out).
    /// Default true.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Sets [`RetryPolicy::max_attempts`] (at least 1).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the first and the largest delay.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Turns jitter on or off.
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before attempt `failed_attempt + 1`, after attempt
    /// `failed_attempt` (1-based) failed.
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        use backon::BackoffBuilder;
        let mut builder = backon::ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(self.multiplier.max(1.0))
            .with_max_times(usize::MAX);
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder
            .build()
            .nth(failed_attempt.saturating_sub(1) as usize)
            .unwrap_or(self.max_backoff)
    }
}

/// Whether events with the same partition key are handled in publish order.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// Same key, one at a time, in publish order (also across retries);
    /// different keys run concurrently. The default.
    #[default]
    ByKey,
    /// No ordering: any event may run on any worker at any time.
    Unordered,
}

/// How a subscription's handler is driven.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dispatch {
    /// Through the transport's queue; `publish` returns once the event is
    /// accepted. The default.
    #[default]
    Queued,
    /// The publisher runs the handler (with its retries) before `publish`
    /// returns, like a synchronous call. In-process only.
    Inline,
}

/// What a transport needs to know about one subscription.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscriptionSpec {
    /// The group (module and subscription name).
    pub group: GroupId,
    /// The event name subscribed to.
    pub event_type: Cow<'static, str>,
    /// How many events of this group one process handles at once.
    pub concurrency: usize,
    /// Retry and dead-letter policy.
    pub retry: RetryPolicy,
    /// Per-key ordering.
    pub ordering: Ordering,
    /// Queued or inline.
    pub dispatch: Dispatch,
}

impl SubscriptionSpec {
    /// A spec with default options.
    pub fn new(group: GroupId, event_type: impl Into<Cow<'static, str>>) -> Self {
        Self {
            group,
            event_type: event_type.into(),
            concurrency: 1,
            retry: RetryPolicy::default(),
            ordering: Ordering::default(),
            dispatch: Dispatch::default(),
        }
    }
}

/// One delivery of an envelope to a group.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The event.
    pub envelope: Envelope,
    /// 1 for the first delivery, then 2, 3, ...
    pub attempt: u32,
}

/// Why an event went to a dead letter.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// The handler failed on every allowed attempt.
    MaxAttempts,
    /// The handler returned a permanent error.
    Rejected,
    /// The payload or the envelope could not be decoded.
    Undecodable,
    /// The event name is not the subscription's.
    UnknownEvent,
    /// The event version is newer than the subscriber knows.
    UnknownVersion,
}

impl DeadLetterReason {
    /// The reason as a stable string (used in broker headers).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max_attempts",
            Self::Rejected => "rejected",
            Self::Undecodable => "undecodable",
            Self::UnknownEvent => "unknown_event",
            Self::UnknownVersion => "unknown_version",
        }
    }

    /// Parses [`DeadLetterReason::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "max_attempts" => Self::MaxAttempts,
            "rejected" => Self::Rejected,
            "undecodable" => Self::Undecodable,
            "unknown_event" => Self::UnknownEvent,
            "unknown_version" => Self::UnknownVersion,
            _ => return None,
        })
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of handling one delivery, as the bus reports it to the
/// transport.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: acknowledge.
    Ack,
    /// Transient failure: redeliver after the retry policy's delay, or
    /// dead-letter with [`DeadLetterReason::MaxAttempts`] after the last
    /// attempt.
    Retry {
        /// Error text for the dead letter.
        error: String,
    },
    /// Dead-letter at once.
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
        /// Error text.
        error: String,
    },
}

/// What became of a delivery that did not succeed, as the transport tells
/// the handler (for its statistics).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// It will run again.
    Retry,
    /// It went to the group's dead letter.
    DeadLettered(DeadLetterReason),
}

/// Handles deliveries for one subscription. The bus implements it (decode,
/// upcast, call the typed handler, catch panics); transports call it.
pub trait DeliveryHandler: Send + Sync + 'static {
    /// Handles one delivery. Never panics.
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome>;

    /// Told what the transport did with a delivery that did not succeed
    /// (also those dead-lettered before [`DeliveryHandler::handle`] ran).
    fn settled(&self, group: &GroupId, settlement: Settlement) {
        let _ = (group, settlement);
    }
}

/// An event that a group could not handle.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The original envelope, unchanged.
    pub envelope: Envelope,
    /// The group that gave up.
    pub group: GroupId,
    /// Why.
    pub reason: DeadLetterReason,
    /// The last error text.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the event was dead-lettered.
    pub time: DateTime<Utc>,
}

impl DeadLetter {
    /// A dead letter stamped now.
    pub fn new(
        envelope: Envelope,
        group: GroupId,
        reason: DeadLetterReason,
        error: impl Into<String>,
        attempts: u32,
    ) -> Self {
        Self {
            envelope,
            group,
            reason,
            error: error.into(),
            attempts,
            time: Utc::now(),
        }
    }
}

/// An event a group had taken but not finished when shutdown's deadline
/// passed. Not acknowledged: a persistent transport redelivers it; the
/// in-process transport hands it back here.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct Unfinished {
    /// The group.
    pub group: GroupId,
    /// The event.
    pub envelope: Envelope,
}

impl Unfinished {
    /// An unfinished event of `group`.
    pub fn new(group: GroupId, envelope: Envelope) -> Self {
        Self { group, envelope }
    }
}

/// What shutdown left behind.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct ShutdownReport {
    /// True when everything drained before the deadline.
    pub drained: bool,
    /// Events not handled by the deadline (never acknowledged, never
    /// dead-lettered).
    pub unfinished: Vec<Unfinished>,
}

impl ShutdownReport {
    /// A report of a clean, complete drain.
    pub fn drained() -> Self {
        Self {
            drained: true,
            unfinished: Vec::new(),
        }
    }

    /// Folds another report into this one.
    pub fn merge(&mut self, other: ShutdownReport) {
        self.drained &= other.drained;
        self.unfinished.extend(other.unfinished);
    }
}

/// What a transport guarantees. The bus refuses a subscription that needs
/// more than its route gives, and the conformance suite runs the cases that
/// apply.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Accepted events survive a restart of the process / broker.
    pub persistent: bool,
    /// Groups with competing workers.
    pub consumer_groups: bool,
    /// Per-partition-key order inside a group, among the consumers of one
    /// process.
    pub per_key_order: bool,
    /// Per-key order also holds between consumers of one group in
    /// different processes.
    pub per_key_order_across_consumers: bool,
    /// Retries are delayed by the transport without blocking the queue.
    pub native_delayed_retry: bool,
    /// Largest payload the transport carries, if bounded.
    pub max_payload: Option<usize>,
    /// Events can be replayed from the start.
    pub replay: bool,
    /// Inline dispatch (publisher runs the handler).
    pub inline_dispatch: bool,
    /// Typed values are shared, never serialized.
    pub shares_values: bool,
    /// Dead letters can be listed and redriven through the transport.
    pub dead_letter_store: bool,
    /// The same event may be delivered twice to one group (at-least-once).
    pub duplicates: bool,
}

impl Capabilities {
    /// Nothing guaranteed; a starting point for `with_*`-style updates.
    pub fn none() -> Self {
        Self {
            persistent: false,
            consumer_groups: false,
            per_key_order: false,
            per_key_order_across_consumers: false,
            native_delayed_retry: false,
            max_payload: None,
            replay: false,
            inline_dispatch: false,
            shares_values: false,
            dead_letter_store: false,
            duplicates: true,
        }
    }
}

/// The result of [`Transport::try_publish`].
#[derive(Debug)]
pub enum TryPublish {
    /// Finished without waiting.
    Done(Result<()>),
    /// Could not finish without waiting: call [`Transport::publish`].
    Pending(Envelope),
}

/// A running subscription on a transport.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Stops taking deliveries, lets in-flight handlers finish, and leaves
    /// the group (and its undelivered events) in place for the next
    /// subscriber of the same group.
    async fn close(&self) -> Result<()>;
}

/// A transport carries envelopes between publishers and groups.
///
/// Object-safe: the bus holds `Arc<dyn Transport>`. See the crate's design
/// notes for the semantics every implementation keeps; the conformance
/// suite checks them.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// A short name for logs and errors (`in-process`, `nats`, ...).
    fn name(&self) -> &str;

    /// What this transport guarantees.
    fn capabilities(&self) -> Capabilities;

    /// Publishes without waiting, if that is possible right now. The default
    /// always returns [`TryPublish::Pending`].
    fn try_publish(&self, envelope: Envelope) -> TryPublish {
        TryPublish::Pending(envelope)
    }

    /// Publishes; returns Ok once the transport has accepted the event
    /// (queued in-process, or confirmed by the broker). Envelopes carry
    /// encoded bytes unless [`Capabilities::shares_values`].
    async fn publish(&self, envelope: Envelope) -> Result<()>;

    /// Starts delivering the group's events to `handler`, declaring what the
    /// transport needs (idempotently).
    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Box<dyn Consumer>>;

    /// Lists the group's dead letters, oldest first.
    async fn dead_letters(&self, group: &GroupId) -> Result<Vec<DeadLetter>> {
        let _ = group;
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("transport {} has no dead-letter store", self.name()),
        ))
    }

    /// Sends the group's dead letters (those with the given ids, or all)
    /// back to the group, with the attempt count reset. Returns how many.
    async fn redrive(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let _ = (group, ids);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("transport {} cannot redrive dead letters", self.name()),
        ))
    }

    /// Removes the group's dead letters (those with the given ids, or all)
    /// for good; the only way other than [`Transport::redrive`] that a dead
    /// letter leaves the store. Returns how many were removed (ids not in
    /// the store are skipped). A bounded store that was full takes the dead
    /// letters waiting for room into the room this makes.
    async fn discard_dead_letters(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let _ = (group, ids);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("transport {} cannot discard dead letters", self.name()),
        ))
    }

    /// Stops taking publishes and deliveries, lets in-flight handlers finish
    /// until `deadline`, acknowledges what finished and reports the rest.
    async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport>;
}

pub mod engine;

/// Helpers for transport authors: the bookkeeping every broker transport
/// needs for subscriptions and shutdown.
pub mod support {
    use std::sync::{Arc, Mutex, PoisonError};

    use async_trait::async_trait;
    use tokio::sync::Notify;
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    use super::{Consumer, Unfinished};
    use crate::error::{Error, ErrorKind, Result};

    /// The running subscriptions of a transport, and what they left
    /// unfinished when they stopped.
    #[derive(Debug, Default)]
    pub struct Subscriptions {
        state: Mutex<(usize, Vec<Unfinished>)>,
        changed: Notify,
    }

    /// Counts one running subscription until dropped.
    #[derive(Debug)]
    pub struct Running(Arc<Subscriptions>);

    impl Running {
        /// Records what the subscription leaves unfinished, then ends it.
        pub fn finish(self, unfinished: Vec<Unfinished>) {
            self.0
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1
                .extend(unfinished);
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.0
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0 -= 1;
            self.0.changed.notify_waiters();
        }
    }

    impl Subscriptions {
        /// Counts a subscription that starts running.
        pub fn start(self: &Arc<Self>) -> Running {
            self.state.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
            Running(self.clone())
        }

        /// Waits until no subscription runs.
        pub async fn idle(&self) {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.state.lock().unwrap_or_else(PoisonError::into_inner).0 == 0 {
                    return;
                }
                changed.await;
            }
        }

        /// Takes what stopped subscriptions left unfinished.
        pub fn take_unfinished(&self) -> Vec<Unfinished> {
            std::mem::take(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner).1)
        }
    }

    /// A [`Consumer`] backed by a task that stops when `detach` is
    /// cancelled.
    #[derive(Debug)]
    pub struct TaskConsumer {
        detach: CancellationToken,
        task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    }

    impl TaskConsumer {
        /// Wraps the subscription task and its stop signal.
        pub fn new(detach: CancellationToken, task: JoinHandle<()>) -> Self {
            Self {
                detach,
                task: tokio::sync::Mutex::new(Some(task)),
            }
        }
    }

    #[async_trait]
    impl Consumer for TaskConsumer {
        async fn close(&self) -> Result<()> {
            self.detach.cancel();
            if let Some(task) = self.task.lock().await.take() {
                task.await.map_err(|e| {
                    Error::new(ErrorKind::Other, format!("subscription task failed: {e}"))
                })?;
            }
            Ok(())
        }
    }

    /// Calls a delivery handler, turning a panic into a transient failure.
    /// This is the one place a handler's panic is caught (the bus's own
    /// handlers count it and let it unwind to here).
    pub async fn call_guarded(
        handler: &dyn super::DeliveryHandler,
        delivery: super::Delivery,
    ) -> super::Outcome {
        use futures_util::FutureExt;
        use std::panic::AssertUnwindSafe;
        let panicked = |payload: Box<dyn std::any::Any + Send>| super::Outcome::Retry {
            error: format!(
                "handler panicked: {}",
                crate::handler::panic_message(&*payload)
            ),
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(delivery))) {
            Ok(fut) => AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .unwrap_or_else(panicked),
            Err(payload) => panicked(payload),
        }
    }

    /// A dead letter read back from a broker: `get(name)` returns the
    /// transport's dead-letter header `name` (`reason`, `error`,
    /// `attempts`, `time`, `id`, and `origin`, where the event was
    /// published). A stored message that is not an envelope is described
    /// by those headers, with version 0 and its origin as event type.
    pub fn dead_letter_from(
        group: &super::GroupId,
        envelope: std::result::Result<super::Envelope, crate::Error>,
        payload: &[u8],
        get: impl Fn(&str) -> Option<String>,
    ) -> super::DeadLetter {
        let envelope = envelope.unwrap_or_else(|_| {
            let mut attrs = crate::Attributes::new("unknown", get("origin").unwrap_or_default(), 0);
            if let Some(id) = get("id").and_then(|s| s.parse().ok()) {
                attrs.id = id;
            }
            super::Envelope::from_bytes(attrs, payload.to_vec())
        });
        let reason = get("reason")
            .and_then(|r| super::DeadLetterReason::parse(&r))
            .unwrap_or(super::DeadLetterReason::Undecodable);
        let mut dl = super::DeadLetter::new(
            envelope,
            group.clone(),
            reason,
            get("error").unwrap_or_else(|| "dead-lettered by the broker".into()),
            get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
        );
        if let Some(time) = get("time").and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
        {
            dl.time = time.with_timezone(&chrono::Utc);
        }
        dl
    }

    /// The checks every broker transport makes before sending: headers
    /// without CR/LF and not posing as CloudEvents attributes, an event
    /// name fit for a topic or subject, and an encoded payload (which a
    /// [`crate::Bus`] always provides to transports that do not share
    /// values). Returns the payload.
    pub fn outgoing<'a>(
        envelope: &'a super::Envelope,
        transport: &str,
    ) -> Result<&'a bytes::Bytes> {
        let attrs = envelope.attributes();
        attrs.validate()?;
        crate::validate_name(&attrs.event_type)?;
        envelope.payload_bytes().ok_or_else(|| {
            Error::new(
                ErrorKind::Encode,
                format!(
                    "the {transport} transport carries encoded payloads; publish through a Bus"
                ),
            )
        })
    }

    /// Whether `name` starts with `prefix`, ASCII case ignored. Never
    /// slices inside a character (names from the wire may be anything).
    pub fn starts_with_ignore_case(name: &str, prefix: &str) -> bool {
        name.as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
    }

    /// Error text fit for a message header: control characters (CR, LF)
    /// become spaces, at most 1024 characters.
    pub fn header_text(text: &str) -> String {
        text.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(1024)
            .collect()
    }

    /// The common end of a broker transport's shutdown, once it refuses new
    /// work and has told its subscriptions to stop (`closing`): waits until
    /// publishes in flight (holding `gate` shared) and subscriptions finish,
    /// up to `deadline`; then fires `stop` so handlers still running give
    /// their events back, and reports.
    pub async fn drain(
        deadline: std::time::Duration,
        gate: &tokio::sync::RwLock<()>,
        subscriptions: &Subscriptions,
        stop: &CancellationToken,
    ) -> super::ShutdownReport {
        let in_time = tokio::time::timeout(deadline, async {
            drop(gate.write().await);
            subscriptions.idle().await;
        })
        .await
        .is_ok();
        stop.cancel();
        subscriptions.idle().await;
        let unfinished = subscriptions.take_unfinished();
        let mut report = super::ShutdownReport::drained();
        report.drained = in_time && unfinished.is_empty();
        report.unfinished = unfinished;
        report
    }

    /// A URL with the password of its `user:password@` part hidden, for
    /// logs, errors and `Debug`.
    ///
    /// ```
    /// use seambus::transport::support::redact_url;
    /// assert_eq!(redact_url("amqp://app:s3cr3t@mq:5672/"), "amqp://app:<redacted>@mq:5672/");
    /// assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    /// ```
    pub fn redact_url(url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_owned();
        };
        match rest.rsplit_once('@') {
            // `user:password@`: the user stays; a lone `token@` goes.
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                None => format!("{scheme}://<redacted>@{host}"),
            },
            None => url.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets() {
        use super::support::redact_url;
        assert_eq!(
            redact_url("amqp://guest:guest@host:5672/%2f"),
            "amqp://guest:<redacted>@host:5672/%2f"
        );
        assert_eq!(
            redact_url("nats://s3cr3t@host:4222"),
            "nats://<redacted>@host:4222"
        );
        assert_eq!(redact_url("nats://host:4222"), "nats://host:4222");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default()
            .with_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .with_jitter(false);
        // backon computes in f32: allow a microsecond of rounding.
        let close =
            |d: Duration, ms: u64| d.abs_diff(Duration::from_millis(ms)) < Duration::from_micros(1);
        for (attempt, ms) in [(1, 10), (2, 20), (3, 40), (4, 50), (40, 50)] {
            assert!(
                close(p.delay(attempt), ms),
                "attempt {attempt}: {:?}",
                p.delay(attempt)
            );
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p =
            RetryPolicy::default().with_backoff(Duration::from_millis(10), Duration::from_secs(1));
        for attempt in 1..6 {
            let d = p.delay(attempt);
            let base = Duration::from_millis(10) * 2u32.pow(attempt - 1);
            assert!(d >= base && d <= base * 2, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn outgoing_checks_headers_names_and_bytes() {
        use crate::{Attributes, Envelope, ErrorKind};
        let ok = Envelope::from_bytes(Attributes::new("m", "m.e", 1), &b"{}"[..]);
        assert_eq!(&support::outgoing(&ok, "test").unwrap()[..], b"{}");
        let mut forged = Attributes::new("m", "m.e", 1);
        forged.headers.push(("ce-id".into(), "x".into()));
        let err = support::outgoing(&Envelope::from_bytes(forged, &b"{}"[..]), "test").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidHeader);
        let wildcard = Envelope::from_bytes(Attributes::new("m", "m.*", 1), &b"{}"[..]);
        assert_eq!(
            support::outgoing(&wildcard, "test").unwrap_err().kind(),
            ErrorKind::InvalidName
        );
        #[derive(serde::Serialize, serde::Deserialize, crate::Event)]
        #[event(name = "m.e")]
        struct E;
        let typed = Envelope::typed(Attributes::new("m", "m.e", 1), E);
        assert_eq!(
            support::outgoing(&typed, "test").unwrap_err().kind(),
            ErrorKind::Encode
        );
    }

    #[test]
    fn reasons_round_trip() {
        for r in [
            DeadLetterReason::MaxAttempts,
            DeadLetterReason::Rejected,
            DeadLetterReason::Undecodable,
            DeadLetterReason::UnknownEvent,
            DeadLetterReason::UnknownVersion,
        ] {
            assert_eq!(DeadLetterReason::parse(r.as_str()), Some(r));
        }
    }
}
