//! The contract between the bus and a transport (in-process, Kafka,
//! RabbitMQ, NATS). The types subscriptions and transports share live in
//! their own module (re-exported here and at the crate root); the helpers
//! for transport authors in [`support`], the delivery engine that broker
//! transports run on in [`engine`].
//!
//! Application code does not use this module: it talks to [`crate::Bus`].
//! Transport authors implement [`Transport`] and run the conformance suite
//! (feature `conformance`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use uuid::Uuid;

pub use crate::delivery::{
    DeadLetter, DeadLetterReason, Dispatch, GroupId, Ordering, RetryPolicy, ShutdownReport,
    Unfinished,
};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};

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
    /// Largest payload the transport carries, if bounded.
    pub max_payload: Option<usize>,
    /// A new group receives the events the transport still keeps from
    /// before it existed (replay), instead of starting after them.
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
pub(crate) mod lanes;

pub mod support;

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
        assert_eq!(&support::outgoing(&ok, "test", None).unwrap()[..], b"{}");
        let mut forged = Attributes::new("m", "m.e", 1);
        forged.headers.push(("ce-id".into(), "x".into()));
        let err =
            support::outgoing(&Envelope::from_bytes(forged, &b"{}"[..]), "test", None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidHeader);
        let wildcard = Envelope::from_bytes(Attributes::new("m", "m.*", 1), &b"{}"[..]);
        assert_eq!(
            support::outgoing(&wildcard, "test", None)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidName
        );
        #[derive(serde::Serialize, serde::Deserialize, crate::Event)]
        #[event(name = "m.e")]
        struct E;
        let typed = Envelope::typed(Attributes::new("m", "m.e", 1), E);
        assert_eq!(
            support::outgoing(&typed, "test", None).unwrap_err().kind(),
            ErrorKind::Encode
        );
        let big = Envelope::from_bytes(crate::Attributes::new("m", "m.e", 1), &b"12345"[..]);
        assert!(support::outgoing(&big, "test", Some(5)).is_ok());
        let err = support::outgoing(&big, "test", Some(4)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
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
