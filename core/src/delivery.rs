//! What every subscription and every transport share: groups, retry
//! policy, ordering, dispatch, dead letters, the shutdown report.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;

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
    /// Dead-lettered for another reason (named in the error text), but too
    /// large for the dead-letter destination: kept with its attributes and
    /// the reference to where it was published, without its payload.
    TooLarge,
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
            Self::TooLarge => "too_large",
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
            "too_large" => Self::TooLarge,
            _ => return None,
        })
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
