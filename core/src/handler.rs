//! What a handler receives and returns, and the adapter that runs a typed
//! handler for a transport.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::error::HandlerError;
use crate::transport::{DeadLetterReason, Delivery, DeliveryHandler, GroupId, Outcome};
use crate::upcast::{Codecs, Resolved, Upcasters};
use crate::Event;

tokio::task_local! {
    /// The envelope whose handler is running on this task: events published
    /// from the handler take their correlation and causation from it.
    pub(crate) static CURRENT: Envelope;
}

/// The event a handler received, already decoded and upcast to the version
/// the subscriber asked for. Dereferences to the event.
///
/// On the in-process transport the value is shared with the publisher and
/// every other subscriber (never copied or serialized);
/// [`Received::into_inner`] clones it only if it must.
pub struct Received<E>(Resolved<E>);

impl<E> Deref for Received<E> {
    type Target = E;
    fn deref(&self) -> &E {
        match &self.0 {
            Resolved::Shared(typed) => &typed.value,
            Resolved::Owned(value) => value,
        }
    }
}

impl<E: Clone> Received<E> {
    /// The event by value (a clone when the value is shared).
    pub fn into_inner(self) -> E {
        match self.0 {
            Resolved::Shared(typed) => match Arc::try_unwrap(typed) {
                Ok(typed) => typed.value,
                Err(shared) => shared.value.clone(),
            },
            Resolved::Owned(value) => value,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Received<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Received").field(&**self).finish()
    }
}

/// Everything about a delivery besides the event: its envelope, the attempt
/// number and the group handling it.
#[derive(Clone)]
pub struct Context {
    envelope: Envelope,
    attempt: u32,
    group: Arc<GroupId>,
}

impl Context {
    /// The envelope (id, source, time, headers, ...). The `id` is the dedupe
    /// key for idempotent handlers.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// 1 on the first delivery, then 2, 3, ... on retries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The group handling the event.
    pub fn group(&self) -> &GroupId {
        &self.group
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.envelope.id())
            .field("attempt", &self.attempt)
            .field("group", &self.group)
            .finish()
    }
}

/// An async function or closure that handles events of type `E`.
///
/// Implemented for every `Fn(Received<E>, Context) -> impl Future<Output =
/// Result<(), HandlerError>>` that is `Send + Sync + 'static`:
///
/// ```
/// use seambus::{Context, HandlerError, Received};
/// # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// # #[event(name = "orders.order_placed")]
/// # struct OrderPlaced { order_id: u64 }
///
/// async fn reserve_stock(order: Received<OrderPlaced>, ctx: Context) -> Result<(), HandlerError> {
///     println!("order {} (attempt {})", order.order_id, ctx.attempt());
///     Ok(())
/// }
/// # fn check<H: seambus::Handler<OrderPlaced>>(_: H) {}
/// # check(reserve_stock);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Seambus handler for `{E}`",
    note = "a handler is an async fn or closure `(Received<E>, Context) -> Result<(), HandlerError>` that is Send + Sync + 'static, returning a Send future"
)]
pub trait Handler<E>: Send + Sync + 'static {
    /// The future the handler returns.
    type Future: Future<Output = Result<(), HandlerError>> + Send + 'static;

    /// Handles one event.
    fn call(&self, event: Received<E>, ctx: Context) -> Self::Future;
}

impl<E, F, Fut> Handler<E> for F
where
    E: Event,
    F: Fn(Received<E>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Future = Fut;
    fn call(&self, event: Received<E>, ctx: Context) -> Fut {
        self(event, ctx)
    }
}

/// Counters of one subscription, in this process.
#[derive(Debug, Default)]
pub(crate) struct StatsCell {
    succeeded: AtomicU64,
    retried: AtomicU64,
    panicked: AtomicU64,
    dead_lettered: AtomicU64,
    handling_nanos: AtomicU64,
    /// Handling times in microseconds (1 us to 1 h, 2 significant digits:
    /// a few KiB per subscription).
    handling_us: Mutex<Option<Histogram<u64>>>,
}

/// A snapshot of a subscription's counters in this process.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries the handler finished with Ok.
    pub succeeded: u64,
    /// Deliveries that failed transiently and will be (or were) retried.
    pub retried: u64,
    /// Handler panics (each also counted as retried or dead-lettered).
    pub panicked: u64,
    /// Deliveries that ended in the dead letter (rejected, undecodable, or
    /// out of attempts).
    pub dead_lettered: u64,
    /// Total time spent in the handler, in nanoseconds.
    pub handling_nanos: u64,
    /// Median handling time (zero before the first delivery).
    pub handling_p50: Duration,
    /// 99th percentile of handling time.
    pub handling_p99: Duration,
    /// Longest handling time.
    pub handling_max: Duration,
}

impl StatsCell {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            succeeded: self.succeeded.load(Relaxed),
            retried: self.retried.load(Relaxed),
            panicked: self.panicked.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            handling_nanos: self.handling_nanos.load(Relaxed),
            ..self.percentiles()
        }
    }

    fn record(&self, elapsed: Duration) {
        self.handling_nanos
            .fetch_add(elapsed.as_nanos() as u64, Relaxed);
        let mut h = self
            .handling_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let h = h.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, 3_600_000_000, 2)
                .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
        });
        h.saturating_record(elapsed.as_micros().max(1) as u64);
    }

    fn percentiles(&self) -> Stats {
        let h = self
            .handling_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(h) = h.as_ref().filter(|h| !h.is_empty()) else {
            return Stats::default();
        };
        let at = |q: f64| Duration::from_micros(h.value_at_quantile(q));
        Stats {
            handling_p50: at(0.5),
            handling_p99: at(0.99),
            handling_max: Duration::from_micros(h.max()),
            ..Stats::default()
        }
    }
}

/// Runs a typed handler for a transport: resolve (decode and upcast),
/// call inside a span with the causal context set, catch panics, count.
pub(crate) struct TypedHandler<E, H> {
    inner: Arc<TypedInner<H>>,
    _event: PhantomData<fn() -> E>,
}

struct TypedInner<H> {
    handler: H,
    group: Arc<GroupId>,
    max_attempts: u32,
    timeout: Option<std::time::Duration>,
    upcasters: Arc<Upcasters>,
    codecs: Arc<Codecs>,
    stats: Arc<StatsCell>,
}

impl<E, H> TypedHandler<E, H> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        handler: H,
        group: GroupId,
        max_attempts: u32,
        timeout: Option<std::time::Duration>,
        upcasters: Arc<Upcasters>,
        codecs: Arc<Codecs>,
        stats: Arc<StatsCell>,
    ) -> Self {
        Self {
            inner: Arc::new(TypedInner {
                handler,
                group: Arc::new(group),
                max_attempts,
                timeout,
                upcasters,
                codecs,
                stats,
            }),
            _event: PhantomData,
        }
    }
}

impl<E: Event, H: Handler<E>> DeliveryHandler for TypedHandler<E, H> {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.run::<E>(delivery).await })
    }
}

impl<H> TypedInner<H> {
    async fn run<E: Event>(&self, delivery: Delivery) -> Outcome
    where
        H: Handler<E>,
    {
        let Delivery { envelope, attempt } = delivery;
        let (id, group) = (envelope.id(), &*self.group);
        let span = tracing::info_span!(
            "seambus.handle",
            module = %self.group.module(),
            subscription = %self.group.subscription(),
            event = %envelope.event_type(),
            version = envelope.data_version(),
            id = %envelope.id(),
            attempt,
        );
        // User code runs here too (custom `Deserialize`, upcast `From`
        // impls): a panic in it is an undecodable event, not a dead worker.
        let resolving = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.upcasters.resolve::<E>(&envelope, &self.codecs)
        }))
        .unwrap_or_else(|panic| {
            Err((
                DeadLetterReason::Undecodable,
                format!("decoding or upcasting panicked: {}", panic_message(&*panic)),
            ))
        });
        let resolved = match resolving {
            Ok(resolved) => resolved,
            Err((reason, error)) => {
                span.in_scope(|| {
                    tracing::warn!(%group, %id, %reason, %error, "dead-lettering undeliverable event")
                });
                self.stats.dead_lettered.fetch_add(1, Relaxed);
                return Outcome::DeadLetter { reason, error };
            }
        };
        let ctx = Context {
            envelope: envelope.clone(),
            attempt,
            group: self.group.clone(),
        };
        // quanta reads the CPU's counter: a fraction of a clock_gettime.
        let started = quanta::Instant::now();
        // The call is inside the future, so a panic before the handler's
        // first await is caught like any other.
        let call = async move { self.handler.call(Received(resolved), ctx).await };
        let fut = CURRENT.scope(envelope, call);
        let guarded = AssertUnwindSafe(fut).catch_unwind();
        let result = match self.timeout {
            None => guarded.instrument(span.clone()).await,
            Some(limit) => tokio::time::timeout(limit, guarded)
                .instrument(span.clone())
                .await
                .unwrap_or_else(|_| {
                    Ok(Err(HandlerError::retry(format!(
                        "handler timed out after {limit:?}"
                    ))))
                }),
        };
        self.stats.record(started.elapsed());
        let _enter = span.enter();
        let (error, transient) = match result {
            Ok(Ok(())) => {
                self.stats.succeeded.fetch_add(1, Relaxed);
                return Outcome::Ack;
            }
            Ok(Err(err)) => (err.to_string(), err.is_transient()),
            Err(panic) => {
                self.stats.panicked.fetch_add(1, Relaxed);
                (
                    format!("handler panicked: {}", panic_message(&*panic)),
                    true,
                )
            }
        };
        if transient && attempt < self.max_attempts {
            tracing::warn!(%group, %id, attempt, %error, "handler failed; will retry");
            self.stats.retried.fetch_add(1, Relaxed);
            Outcome::Retry { error }
        } else if transient {
            tracing::error!(%group, %id, attempt, %error, "handler failed on its last attempt; dead-lettering");
            self.stats.dead_lettered.fetch_add(1, Relaxed);
            Outcome::Retry { error }
        } else {
            tracing::error!(%group, %id, attempt, %error, "handler rejected the event; dead-lettering");
            self.stats.dead_lettered.fetch_add(1, Relaxed);
            Outcome::DeadLetter {
                reason: DeadLetterReason::Rejected,
                error,
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
