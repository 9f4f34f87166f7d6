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
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::error::HandlerError;
use crate::transport::{DeadLetterReason, Delivery, DeliveryHandler, GroupId, Outcome, Settlement};
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

/// Shared state given to a subscription with
/// [`SubscribeBuilder::with_state`](crate::SubscribeBuilder::with_state):
/// a handler that takes `State<S>` as its first argument gets a clone of it
/// on every call (put an `Arc` inside for anything large).
#[derive(Clone, Copy, Debug, Default)]
pub struct State<S>(pub S);

impl<S> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

/// An async function or closure that handles events of type `E`.
///
/// Implemented for every `Fn(Received<E>, Context) -> impl Future<Output =
/// Result<(), HandlerError>>` and, for subscriptions given state with
/// [`SubscribeBuilder::with_state`](crate::SubscribeBuilder::with_state),
/// every `Fn(State<S>, Received<E>, Context) -> ...`, that is
/// `Send + Sync + 'static`. `T` tells the two shapes apart; `S` is the
/// state's type (`()` without state).
///
/// ```
/// use seambus::{Context, HandlerError, Received, State};
/// # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// # #[event(name = "orders.order_placed")]
/// # struct OrderPlaced { order_id: u64 }
///
/// async fn reserve_stock(order: Received<OrderPlaced>, ctx: Context) -> Result<(), HandlerError> {
///     println!("order {} (attempt {})", order.order_id, ctx.attempt());
///     Ok(())
/// }
///
/// #[derive(Clone)]
/// struct Stock { warehouse: &'static str }
///
/// async fn reserve_in(stock: State<Stock>, order: Received<OrderPlaced>, _ctx: Context) -> Result<(), HandlerError> {
///     println!("order {} from {}", order.order_id, stock.warehouse);
///     Ok(())
/// }
/// # fn check<H: seambus::Handler<OrderPlaced>>(_: H) {}
/// # check(reserve_stock);
/// # fn check_state<T, H: seambus::Handler<OrderPlaced, T, Stock>>(_: H) {}
/// # check_state(reserve_in);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Seambus handler for `{E}`",
    note = "a handler is an async fn or closure `(Received<E>, Context) -> Result<(), HandlerError>`, or `(State<S>, Received<E>, Context) -> ...` with `.with_state(s)`, that is Send + Sync + 'static, returning a Send future"
)]
pub trait Handler<E, T = (Received<E>, Context), S = ()>: Send + Sync + 'static {
    /// The future the handler returns.
    type Future: Future<Output = Result<(), HandlerError>> + Send + 'static;

    /// Handles one event.
    fn call(&self, event: Received<E>, ctx: Context, state: &S) -> Self::Future;
}

impl<E, S, F, Fut> Handler<E, (Received<E>, Context), S> for F
where
    E: Event,
    F: Fn(Received<E>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Future = Fut;
    fn call(&self, event: Received<E>, ctx: Context, _state: &S) -> Fut {
        self(event, ctx)
    }
}

impl<E, S, F, Fut> Handler<E, (State<S>, Received<E>, Context), S> for F
where
    E: Event,
    S: Clone + Send + Sync + 'static,
    F: Fn(State<S>, Received<E>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Future = Fut;
    fn call(&self, event: Received<E>, ctx: Context, state: &S) -> Fut {
        self(State(state.clone()), event, ctx)
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

/// Runs a typed handler for a transport. The pipeline around the handler,
/// outermost first (each step does one thing, once):
///
/// 1. **span** `seambus.handle` (module, subscription, event, version, id,
///    attempt), around everything below;
/// 2. **resolve**: decode and upcast to the subscriber's version; failure
///    (or a panic in user decode/upcast code) is a dead letter at once
///    (`undecodable`, `unknown_event`, `unknown_version`), never a retry;
/// 3. **statistics**: handling time and panics;
/// 4. the **layers** of the bus ([`crate::BusBuilder::layer`]), then of the
///    subscription ([`crate::SubscribeBuilder::layer`]), each in the order
///    added (the first added sees the event first);
/// 5. **timeout** ([`crate::SubscribeBuilder::timeout`]): past it the call
///    is dropped and counts as a transient failure;
/// 6. **causation scope**: events published by the handler take their
///    correlation and causation from this one;
/// 7. the handler.
///
/// A panic anywhere inside is caught once, by the transport's call
/// ([`crate::transport::support::call_guarded`]), as a transient failure;
/// whether a failure is retried or dead-lettered is decided once, by the
/// transport, from the subscription's retry policy.
pub(crate) struct TypedHandler<E, H, T, S> {
    inner: Arc<TypedInner<H, S>>,
    _event: PhantomData<fn() -> (E, T)>,
}

struct TypedInner<H, S> {
    handler: H,
    state: S,
    group: Arc<GroupId>,
    timeout: Option<std::time::Duration>,
    layers: Option<crate::layer::Stack>,
    upcasters: Arc<Upcasters>,
    codecs: Arc<Codecs>,
    stats: Arc<StatsCell>,
    testing: Option<Arc<crate::testing::Testing>>,
}

/// What a subscription's handler is built from.
pub(crate) struct Parts<H, S> {
    pub(crate) handler: H,
    pub(crate) state: S,
    pub(crate) group: GroupId,
    pub(crate) timeout: Option<std::time::Duration>,
    pub(crate) layers: Vec<crate::layer::LayerFn>,
    pub(crate) upcasters: Arc<Upcasters>,
    pub(crate) codecs: Arc<Codecs>,
    pub(crate) stats: Arc<StatsCell>,
    pub(crate) testing: Option<Arc<crate::testing::Testing>>,
}

impl<E, H, T, S> TypedHandler<E, H, T, S>
where
    E: Event,
    T: 'static,
    S: Send + Sync + 'static,
    H: Handler<E, T, S>,
{
    pub(crate) fn new(parts: Parts<H, S>) -> Self {
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<TypedInner<H, S>>| {
            let layers = (!parts.layers.is_empty()).then(|| {
                let weak = weak.clone();
                crate::layer::Stack::new(&parts.layers, move |request| {
                    let weak = weak.clone();
                    async move {
                        match weak.upgrade() {
                            Some(inner) => inner.innermost::<E, T>(request).await,
                            None => Err(HandlerError::retry("the subscription is gone")),
                        }
                    }
                })
            });
            TypedInner {
                handler: parts.handler,
                state: parts.state,
                group: Arc::new(parts.group),
                timeout: parts.timeout,
                layers,
                upcasters: parts.upcasters,
                codecs: parts.codecs,
                stats: parts.stats,
                testing: parts.testing,
            }
        });
        Self {
            inner,
            _event: PhantomData,
        }
    }
}

impl<E, H, T, S> DeliveryHandler for TypedHandler<E, H, T, S>
where
    E: Event,
    T: 'static,
    S: Send + Sync + 'static,
    H: Handler<E, T, S>,
{
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        Box::pin(TypedInner::run::<E, T>(self.inner.clone(), delivery))
    }

    fn settled(&self, _group: &GroupId, settlement: Settlement) {
        let counter = match settlement {
            Settlement::Retry => &self.inner.stats.retried,
            _ => {
                if let Some(t) = &self.inner.testing {
                    t.done();
                }
                &self.inner.stats.dead_lettered
            }
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Counts a panic that unwinds through the handler (the transport catches
/// it; this only counts).
struct PanicCounter<'a>(&'a StatsCell);

impl Drop for PanicCounter<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.panicked.fetch_add(1, Relaxed);
        }
    }
}

impl<H, S: Send + Sync + 'static> TypedInner<H, S> {
    // Each level of nested futures costs a copy of its state when it starts:
    // the handler's future is created and awaited in as few levels as the
    // pipeline allows.
    async fn run<E: Event, T: 'static>(self: Arc<Self>, delivery: Delivery) -> Outcome
    where
        H: Handler<E, T, S>,
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
                span.in_scope(
                    || tracing::warn!(%group, %id, %reason, %error, "undeliverable event"),
                );
                return Outcome::DeadLetter { reason, error };
            }
        };
        let ctx = Context {
            envelope,
            attempt,
            group: self.group.clone(),
        };
        let recorded = match &self.testing {
            None => None,
            Some(t) => {
                let event = match &resolved {
                    Resolved::Shared(typed) => &typed.value,
                    Resolved::Owned(value) => value,
                };
                Some(self.rehearse::<E, T>(t, event, &ctx).await)
            }
        };
        // quanta reads the CPU's counter: a fraction of a clock_gettime.
        let started = quanta::Instant::now();
        let panics = PanicCounter(&self.stats);
        let result = match &self.layers {
            None => {
                self.call_timed(Received(resolved), ctx)
                    .instrument(span.clone())
                    .await
            }
            Some(stack) => {
                stack
                    .call(crate::layer::Request::new(ctx, Received(resolved)))
                    .instrument(span.clone())
                    .await
            }
        };
        drop(panics);
        self.stats.record(started.elapsed());
        let _enter = span.enter();
        match result {
            Ok(()) => {
                self.stats.succeeded.fetch_add(1, Relaxed);
                if let (Some(t), Some(bytes)) = (&self.testing, recorded) {
                    t.record_consumed(E::NAME, E::VERSION, bytes);
                    t.done();
                }
                Outcome::Ack
            }
            Err(err) if err.is_transient() => {
                let error = err.to_string();
                tracing::warn!(%group, %id, attempt, %error, "handler failed");
                Outcome::Retry { error }
            }
            Err(err) => {
                let error = err.to_string();
                tracing::warn!(%group, %id, attempt, %error, "handler rejected the event");
                Outcome::DeadLetter {
                    reason: DeadLetterReason::Rejected,
                    error,
                }
            }
        }
    }

    /// The innermost step of a layered pipeline: the typed event back out of
    /// the request, then timeout, causation and the handler.
    async fn innermost<E: Event, T: 'static>(
        &self,
        request: crate::layer::Request,
    ) -> Result<(), HandlerError>
    where
        H: Handler<E, T, S>,
    {
        let (ctx, event) = request.into_parts();
        match event.downcast::<Received<E>>() {
            Ok(event) => self.call_timed(*event, ctx).await,
            Err(_) => Err(HandlerError::reject(
                "a layer replaced the event with a value of another type",
            )),
        }
    }

    /// Timeout, causation scope, handler.
    /// On a testing bus, before the handler runs: the event's bytes (to
    /// record it once handled), after the faults asked for: a delay, and a
    /// first run whose outcome is dropped (a redelivery).
    async fn rehearse<E: Event, T: 'static>(
        &self,
        testing: &crate::testing::Testing,
        event: &E,
        ctx: &Context,
    ) -> Vec<u8>
    where
        H: Handler<E, T, S>,
    {
        let bytes = self.codecs.default.encode(event).unwrap_or_default();
        if let Some(by) = testing.delay_of(E::NAME) {
            tokio::time::sleep(by).await;
        }
        if testing.take_twice(E::NAME) {
            if let Ok(again) = crate::codec::decode::<E>(&*self.codecs.default, &bytes) {
                let _ = self
                    .call_timed::<E, T>(Received(Resolved::Owned(again)), ctx.clone())
                    .await;
            }
        }
        bytes
    }

    async fn call_timed<E: Event, T: 'static>(
        &self,
        event: Received<E>,
        ctx: Context,
    ) -> Result<(), HandlerError>
    where
        H: Handler<E, T, S>,
    {
        let envelope = ctx.envelope.clone();
        // Called while this future is polled, so a panic before the
        // handler's first await unwinds through the same path as any other.
        let call = self.handler.call(event, ctx, &self.state);
        let scoped = CURRENT.scope(envelope, call);
        match self.timeout {
            None => scoped.await,
            Some(limit) => tokio::time::timeout(limit, scoped)
                .await
                .unwrap_or_else(|_| {
                    Err(HandlerError::retry(format!(
                        "handler timed out after {limit:?}"
                    )))
                }),
        }
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
