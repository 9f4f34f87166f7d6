//! The bus: modules publish and subscribe typed events through it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::Instrument;
use uuid::Uuid;

use crate::codec::Codec;
use crate::declare::ModuleDecl;
use crate::envelope::{Attributes, Envelope};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{validate_header, validate_name};
use crate::handler::{Handler, Stats, StatsCell, TypedHandler, CURRENT};
use crate::in_process::InProcessTransport;
use crate::routing::{self, Routing};
use crate::transport::{
    Capabilities, Consumer, DeadLetter, Dispatch, GroupId, Ordering, RetryPolicy, ShutdownReport,
    SubscriptionSpec, Transport, TryPublish,
};
use crate::upcast::{Codecs, Upcasters};
use crate::Event;

/// Default largest encoded payload: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Builds a [`Bus`]: transports, routes, upcasts, codecs.
///
/// ```
/// use seambus::{Bus, InProcessTransport};
/// # #[derive(Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
/// # #[event(name = "orders.order_placed", version = 1)]
/// # struct OrderPlacedV1 { id: u64 }
/// # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
/// # #[event(name = "orders.order_placed", version = 2)]
/// # struct OrderPlacedV2 { id: u64, total_cents: u64 }
/// # impl From<OrderPlacedV1> for OrderPlacedV2 {
/// #     fn from(v1: OrderPlacedV1) -> Self { Self { id: v1.id, total_cents: 0 } }
/// # }
/// let bus = Bus::builder()
///     .transport("memory", InProcessTransport::default())
///     .upcast::<OrderPlacedV1, OrderPlacedV2>()
///     .build()?;
/// # Ok::<(), seambus::Error>(())
/// ```
pub struct BusBuilder {
    transports: Vec<(String, Arc<dyn Transport>)>,
    default: Option<String>,
    routes: Vec<(String, String)>,
    dispatch: Vec<(String, Dispatch)>,
    default_dispatch: Dispatch,
    upcasters: Upcasters,
    codecs: Codecs,
    verify_codec: bool,
    max_payload: usize,
    layers: Vec<crate::layer::LayerFn>,
    declared: Vec<&'static ModuleDecl>,
    testing: bool,
    errors: Vec<Error>,
}

impl Default for BusBuilder {
    fn default() -> Self {
        Self {
            transports: Vec::new(),
            default: None,
            routes: Vec::new(),
            dispatch: Vec::new(),
            default_dispatch: Dispatch::Queued,
            upcasters: Upcasters::default(),
            codecs: Codecs::default(),
            verify_codec: std::env::var("SEAMBUS_VERIFY_CODEC").is_ok_and(|v| v == "1"),
            max_payload: DEFAULT_MAX_PAYLOAD,
            layers: Vec::new(),
            declared: Vec::new(),
            testing: false,
            errors: Vec::new(),
        }
    }
}

impl BusBuilder {
    /// Makes a bus for tests: [`Bus::idle`] waits until every delivery
    /// ended, and [`Bus::test_kit`] reads back what was published and
    /// consumed and injects faults ([`crate::testing`]). It costs a few
    /// counters and a copy of every event; leave it out of production.
    pub fn testing(mut self) -> Self {
        self.testing = true;
        self
    }

    /// Declares the program's modules ([`ModuleDecl`]): from then on, a
    /// module of another name cannot publish or subscribe (a typo is an
    /// error at its first use, naming the declared ones), and a module
    /// publishes only the events its declaration lists. Without
    /// declarations any name is a module, as before.
    pub fn declare(mut self, modules: &[&'static ModuleDecl]) -> Self {
        for m in modules {
            if self.declared.iter().any(|d| d.name() == m.name()) {
                self.errors.push(Error::new(
                    ErrorKind::Config,
                    format!("module `{}` declared twice", m.name()),
                ));
            } else {
                self.declared.push(m);
            }
        }
        self
    }

    /// Adds a transport under `name`. The first one added carries the events
    /// no route names, unless [`BusBuilder::default_transport`] or a
    /// [`Routing`] says otherwise. With no transport at all, the bus creates
    /// an [`InProcessTransport`] named `in-process`.
    pub fn transport(mut self, name: impl Into<String>, transport: impl Transport) -> Self {
        self.transports.push((name.into(), Arc::new(transport)));
        self
    }

    /// Adds a shared transport (for example one used by two buses).
    pub fn transport_arc(mut self, name: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        self.transports.push((name.into(), transport));
        self
    }

    /// The transport that carries events no route names. Naming
    /// `in-process` without adding it makes the bus create one.
    pub fn default_transport(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    /// How subscriptions to events no route names are dispatched when
    /// neither they nor a [`BusBuilder::dispatch`] pattern say so (default:
    /// [`Dispatch::Queued`]). Routed events are queued unless a dispatch
    /// pattern says otherwise.
    pub fn default_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.default_dispatch = dispatch;
        self
    }

    /// Routes events to the transport `transport`: `pattern` is an exact
    /// event name (`orders.order_placed`) or a prefix ending in `.*`
    /// (`orders.*`). Two routes that can match the same event name are an
    /// error when the bus is built.
    pub fn route(mut self, pattern: impl Into<String>, transport: impl Into<String>) -> Self {
        self.routes.push((pattern.into(), transport.into()));
        self
    }

    /// Sets how subscriptions to matching events are dispatched when they do
    /// not say so themselves: `pattern` is an exact event name or a
    /// `prefix.*`, as for [`BusBuilder::route`]. This moves a flow between
    /// inline (L0, like a synchronous call) and queued (L1) by configuration,
    /// with no change to the handler or the subscription code.
    pub fn dispatch(mut self, pattern: impl Into<String>, dispatch: Dispatch) -> Self {
        self.dispatch.push((pattern.into(), dispatch));
        self
    }

    /// Applies a [`Routing`] read from configuration: its routes, its
    /// dispatch settings, and its default rule (`*`). Unless a
    /// [`BusBuilder::default_transport`] call came before, or the `*` rule
    /// names a transport, the default route is `in-process` (the design's
    /// default), even when other transports were added: an empty routing
    /// means everything in-process. Calls after this one override it. The
    /// transports it names must be added with [`BusBuilder::transport`],
    /// except `in-process`, which the bus creates when it is not added.
    pub fn routing(mut self, routing: &Routing) -> Self {
        if self.default.is_none() {
            self.default = Some(IN_PROCESS.to_owned());
        }
        for rule in routing.rules() {
            if rule.is_default() {
                if let Some(t) = &rule.transport {
                    self.default = Some(t.clone());
                }
                if let Some(d) = rule.dispatch {
                    self.default_dispatch = d;
                }
                continue;
            }
            if let Some(t) = &rule.transport {
                self.routes.push((rule.pattern.clone(), t.clone()));
            }
            if let Some(d) = rule.dispatch {
                self.dispatch.push((rule.pattern.clone(), d));
            }
        }
        self
    }

    /// Registers the upcast step from `A` to `B`: the same event name,
    /// `B::VERSION == A::VERSION + 1`, and `B: From<A>`.
    pub fn upcast<A, B>(mut self) -> Self
    where
        A: Event + Clone,
        B: Event + From<A>,
    {
        if let Err(e) = self.upcasters.register::<A, B>() {
            self.errors.push(e);
        }
        self
    }

    /// Adds a codec, readable by its content type; with `default`, events
    /// are also published with it.
    pub fn codec(mut self, codec: impl Codec, default: bool) -> Self {
        self.codecs.add(Arc::new(codec), default);
        self
    }

    /// Test mode: every published event is encoded and decoded back, and
    /// in-process deliveries carry the bytes, so a type that cannot cross a
    /// broker fails in tests, not in production. Also on when the
    /// environment has `SEAMBUS_VERIFY_CODEC=1`.
    pub fn verify_codec(mut self, on: bool) -> Self {
        self.verify_codec = on;
        self
    }

    /// Largest encoded payload accepted by `publish` (default
    /// [`DEFAULT_MAX_PAYLOAD`]); a transport's own limit applies too. Checked
    /// wherever an event is encoded: on broker routes and in
    /// [`BusBuilder::verify_codec`] mode.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Wraps the handler of every subscription of this bus in a tower
    /// [`Layer`](tower::Layer) (see [`crate::layer`]): the first layer added
    /// sees each event first, and bus layers come before a subscription's
    /// own ([`SubscribeBuilder::layer`]).
    pub fn layer(mut self, layer: impl crate::layer::HandlerLayer) -> Self {
        self.layers.push(std::sync::Arc::new(layer));
        self
    }

    /// Checks the configuration and builds the bus.
    pub fn build(mut self) -> Result<Bus> {
        if let Some(e) = self.errors.into_iter().next() {
            return Err(e);
        }
        let mut names = HashSet::new();
        for (name, _) in &self.transports {
            if !names.insert(name.as_str()) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("transport `{name}` added twice"),
                ));
            }
        }
        let default_name = match (&self.default, self.transports.first()) {
            (Some(name), _) | (None, Some((name, _))) => name.clone(),
            (None, None) => IN_PROCESS.to_owned(),
        };
        let in_process_named =
            default_name == IN_PROCESS || self.routes.iter().any(|(_, t)| t == IN_PROCESS);
        if in_process_named && !names.contains(IN_PROCESS) {
            self.transports
                .push((IN_PROCESS.into(), Arc::new(InProcessTransport::default())));
        }
        let index_of = |name: &str| {
            self.transports
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| {
                    let known: Vec<&str> =
                        self.transports.iter().map(|(n, _)| n.as_str()).collect();
                    Error::new(
                        ErrorKind::Config,
                        format!("unknown transport `{name}`; known: {}", known.join(", ")),
                    )
                })
        };
        let default = index_of(&default_name)?;
        let mut routes = Vec::new();
        for (pattern, transport) in &self.routes {
            routes.push((Route::parse(pattern)?, index_of(transport)?));
        }
        check_overlaps("routes", routes.iter().map(|(r, _)| r))?;
        let mut dispatch = Vec::new();
        for (pattern, mode) in &self.dispatch {
            dispatch.push((Route::parse(pattern)?, *mode));
        }
        check_overlaps("dispatch patterns", dispatch.iter().map(|(r, _)| r))?;
        let capabilities = self
            .transports
            .iter()
            .map(|(_, t)| t.capabilities())
            .collect();
        Ok(Bus {
            inner: Arc::new(BusInner {
                transports: self.transports,
                capabilities,
                default,
                default_dispatch: self.default_dispatch,
                routes,
                dispatch,
                upcasters: Arc::new(self.upcasters),
                codecs: Arc::new(self.codecs),
                verify_codec: self.verify_codec,
                max_payload: self.max_payload,
                layers: self.layers,
                subscriptions: Mutex::default(),
                declared: self.declared,
                testing: self
                    .testing
                    .then(|| Arc::new(crate::testing::Testing::new())),
                closed: AtomicBool::new(false),
            }),
        })
    }
}

/// The name of the in-process transport the bus creates when no other
/// default is set.
pub const IN_PROCESS: &str = "in-process";

/// A checked route pattern: an exact event name or a `prefix.*`.
struct Route(String);

impl Route {
    fn parse(pattern: &str) -> Result<Self> {
        validate_name(pattern.strip_suffix(".*").unwrap_or(pattern))?;
        Ok(Self(pattern.to_owned()))
    }

    fn matches(&self, name: &str) -> bool {
        routing::matches(&self.0, name)
    }
}

fn check_overlaps<'a>(what: &str, routes: impl Iterator<Item = &'a Route>) -> Result<()> {
    let routes: Vec<&Route> = routes.collect();
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[i + 1..] {
            if routing::overlap(&a.0, &b.0) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{what} `{}` and `{}` overlap: an event name may match only one",
                        a.0, b.0
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The event bus of one program. Cheap to clone.
///
/// ```
/// use seambus::{Bus, Context, HandlerError, Received};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
/// #[event(name = "orders.order_placed", version = 1)]
/// struct OrderPlaced { order_id: u64 }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), seambus::Error> {
/// let bus = Bus::new(); // in-process, no broker
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// bus.module("inventory")
///     .subscribe(move |order: Received<OrderPlaced>, _ctx: Context| {
///         let tx = tx.clone();
///         async move {
///             tx.send(order.order_id)?;
///             Ok::<(), HandlerError>(())
///         }
///     })
///     .await?;
///
/// bus.module("orders").publish(OrderPlaced { order_id: 7 }).await?;
/// assert_eq!(rx.recv().await, Some(7));
/// bus.shutdown(std::time::Duration::from_secs(5)).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

struct BusInner {
    transports: Vec<(String, Arc<dyn Transport>)>,
    capabilities: Vec<Capabilities>,
    default: usize,
    default_dispatch: Dispatch,
    routes: Vec<(Route, usize)>,
    dispatch: Vec<(Route, Dispatch)>,
    upcasters: Arc<Upcasters>,
    codecs: Arc<Codecs>,
    verify_codec: bool,
    max_payload: usize,
    layers: Vec<crate::layer::LayerFn>,
    subscriptions: Mutex<HashSet<GroupId>>,
    declared: Vec<&'static ModuleDecl>,
    pub(crate) testing: Option<Arc<crate::testing::Testing>>,
    closed: AtomicBool,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .inner
            .transports
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        f.debug_struct("Bus")
            .field("transports", &names)
            .field("verify_codec", &self.inner.verify_codec)
            .finish_non_exhaustive()
    }
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    /// A bus on one [`InProcessTransport`] with default settings.
    pub fn new() -> Self {
        Self::builder()
            .build()
            .unwrap_or_else(|_| unreachable!("the default configuration is valid"))
    }

    /// Starts a [`BusBuilder`].
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

    /// The handle of module `name`, through which it publishes and
    /// subscribes. Cheap; call it as often as you like.
    pub fn module(&self, name: impl Into<Cow<'static, str>>) -> Module {
        let name = name.into();
        let declared = &self.inner.declared;
        let decl = if declared.is_empty() {
            Decl::Free
        } else {
            declared
                .iter()
                .find(|d| d.name() == name)
                .map_or(Decl::Unknown, |d| Decl::Declared(d))
        };
        Module {
            bus: self.clone(),
            name,
            decl,
        }
    }

    /// The handle of a declared module ([`BusBuilder::declare`]). A
    /// declaration the bus was not given works only on a bus with no
    /// declarations at all.
    pub fn module_of(&self, module: &'static ModuleDecl) -> Module {
        let declared = &self.inner.declared;
        let decl = if declared.is_empty() || declared.contains(&module) {
            Decl::Declared(module)
        } else {
            Decl::Unknown
        };
        Module {
            bus: self.clone(),
            name: Cow::Borrowed(module.name()),
            decl,
        }
    }

    pub(crate) fn testing_state(&self) -> Option<&crate::testing::Testing> {
        self.inner.testing.as_deref()
    }

    pub(crate) fn default_codec(&self) -> &dyn Codec {
        &*self.inner.codecs.default
    }

    /// The test kit of a bus built with [`BusBuilder::testing`].
    pub fn test_kit(&self) -> Option<crate::testing::TestKit> {
        self.inner
            .testing
            .is_some()
            .then(|| crate::testing::TestKit { bus: self.clone() })
    }

    /// Waits until every delivery this process's publishes caused (and
    /// those their handlers' publishes caused) was handled or
    /// dead-lettered, at most `timeout` (see [`crate::testing`]). Only on a
    /// bus built with [`BusBuilder::testing`]; a `Config` error otherwise.
    pub async fn idle(&self, timeout: Duration) -> Result<()> {
        match self.test_kit() {
            Some(kit) => kit.idle(timeout).await,
            None => Err(Error::new(
                ErrorKind::Config,
                "Bus::idle needs a bus built with BusBuilder::testing()",
            )),
        }
    }

    /// The modules declared to this bus, with the events each publishes.
    pub fn declared_modules(&self) -> &[&'static ModuleDecl] {
        &self.inner.declared
    }

    /// The transport registered under `name` (for operations such as
    /// listing dead letters).
    pub fn transport(&self, name: &str) -> Option<Arc<dyn Transport>> {
        self.inner
            .transports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
    }

    /// The name of the transport that carries `event_name`.
    pub fn route_of(&self, event_name: &str) -> &str {
        &self.inner.transports[self.inner.route_index(event_name)].0
    }

    /// Publishes an encoded envelope on its event's route: one that
    /// [`Module::encode`] made and that was stored meanwhile (the outbox's
    /// relay forwards with it). It keeps its id, time and attributes, so a
    /// forward repeated after a crash is the same event again (dedupe by
    /// id). Fails as a publish does (`Closed`, the route's payload limit,
    /// the transport's errors), and with `Encode` for an envelope that
    /// holds a value instead of bytes.
    pub async fn forward(&self, envelope: Envelope) -> Result<()> {
        let bus = &*self.inner;
        if bus.closed.load(SeqCst) {
            return Err(Error::closed());
        }
        envelope.attributes().validate()?;
        let Some(size) = envelope.payload_bytes().map(|b| b.len()) else {
            return Err(Error::new(
                ErrorKind::Encode,
                "only an encoded envelope (from Module::encode) can be forwarded",
            ));
        };
        let index = bus.route_index(envelope.event_type());
        if let Some(limit) = bus.capabilities[index].max_payload {
            if size > limit {
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!(
                        "{} is {size} bytes, over its route's limit of {limit}",
                        envelope.event_type()
                    ),
                ));
            }
        }
        let module = envelope.attributes().source.to_string();
        if let (Some(t), Some(bytes)) = (&bus.testing, envelope.payload_bytes()) {
            t.record_published(
                envelope.event_type(),
                envelope.data_version(),
                bytes.to_vec(),
            );
        }
        self.send(index, envelope, &module).await
    }

    /// Hands `envelope` to the transport of route `index`.
    async fn send(&self, index: usize, envelope: Envelope, module: &str) -> Result<()> {
        // A testing bus counts the deliveries this publish causes.
        let counted = match &self.inner.testing {
            None => None,
            Some(t) => Some(t.before_send(envelope.event_type())?),
        };
        let (name, transport) = &self.inner.transports[index];
        let sent = match transport.try_publish(envelope) {
            TryPublish::Done(result) => result,
            TryPublish::Pending(envelope) => {
                // Only a publish that waits gets a span: one that finished
                // at once has nothing to trace inside.
                let span = tracing::debug_span!(
                    "seambus.publish",
                    %module,
                    event = %envelope.event_type(),
                    version = envelope.data_version(),
                    id = %envelope.id(),
                    transport = %name,
                );
                transport.publish(envelope).instrument(span).await
            }
        };
        if let (Some(n), Err(_), Some(t)) = (counted, &sent, &self.inner.testing) {
            t.undo(n);
        }
        sent
    }

    /// Stops every transport: no new publishes, in-flight handlers finish
    /// until `deadline`, what is left is reported (and left unacknowledged
    /// on brokers, for redelivery).
    pub async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        self.inner.closed.store(true, SeqCst);
        let results = futures_util::future::join_all(
            self.inner
                .transports
                .iter()
                .map(|(_, t)| t.shutdown(deadline)),
        )
        .await;
        let mut report = ShutdownReport::drained();
        for r in results {
            report.merge(r?);
        }
        Ok(report)
    }
}

impl BusInner {
    fn route_index(&self, event_name: &str) -> usize {
        self.routes
            .iter()
            .find(|(r, _)| r.matches(event_name))
            .map_or(self.default, |(_, i)| *i)
    }

    /// A dispatch pattern, else the default dispatch for events no route
    /// names, else queued (a routed flow, on a broker or not, never turns
    /// inline because the default route is).
    fn dispatch_of(&self, event_name: &str) -> Dispatch {
        match self.dispatch.iter().find(|(r, _)| r.matches(event_name)) {
            Some((_, d)) => *d,
            None if self.routes.iter().any(|(r, _)| r.matches(event_name)) => Dispatch::Queued,
            None => self.default_dispatch,
        }
    }
}

/// Options of one publish: partition key, subject, correlation, headers.
///
/// ```
/// let opts = seambus::PublishOptions::new()
///     .key("customer-42")
///     .header("x-tenant", "acme");
/// ```
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    key: Option<String>,
    subject: Option<String>,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    headers: Vec<(String, String)>,
}

impl PublishOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// The partition key: events with one key are handled in publish order.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The CloudEvents `subject`.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the correlation id (otherwise inherited from the handler that
    /// publishes, if any).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the W3C `traceparent` (otherwise inherited from the handler that
    /// publishes, if any).
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Adds a user header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A module's handle on the bus.
#[derive(Clone)]
pub struct Module {
    bus: Bus,
    name: Cow<'static, str>,
    decl: Decl,
}

/// What the bus knows of a module's name.
#[derive(Clone, Copy)]
enum Decl {
    /// The bus declares no module: any name is one.
    Free,
    /// Declared, with the events it publishes.
    Declared(&'static ModuleDecl),
    /// The bus declares modules, and not this one.
    Unknown,
}

impl Module {
    /// Refuses an undeclared module (on a bus that declares modules).
    fn check_declared(&self) -> Result<()> {
        if let Decl::Unknown = self.decl {
            let known: Vec<&str> = self.bus.inner.declared.iter().map(|d| d.name()).collect();
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "module `{}` is not declared to this bus (declared: {})",
                    self.name,
                    known.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Module").field(&self.name).finish()
    }
}

impl Module {
    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Publishes an event this module owns. Returns its envelope id once
    /// the route's transport accepted it.
    pub async fn publish<E: Event>(&self, event: E) -> Result<Uuid> {
        self.publish_with(event, PublishOptions::default()).await
    }

    /// Publishes with [`PublishOptions`].
    pub async fn publish_with<E: Event>(&self, event: E, options: PublishOptions) -> Result<Uuid> {
        let bus = &*self.bus.inner;
        let attrs = self.checked_attributes::<E>(options)?;
        if let Some(t) = &bus.testing {
            t.record_published(E::NAME, E::VERSION, bus.codecs.default.encode(&event)?);
        }
        let index = bus.route_index(E::NAME);
        let caps = &bus.capabilities[index];
        let envelope = if caps.shares_values && !bus.verify_codec {
            Envelope::typed(attrs, event)
        } else {
            let limit = caps
                .max_payload
                .map_or(bus.max_payload, |m| m.min(bus.max_payload));
            Envelope::from_bytes(attrs, self.encoded(&event, limit)?)
        };
        let id = envelope.id();
        self.bus.send(index, envelope, &self.name).await?;
        Ok(id)
    }

    /// The envelope [`Module::publish_with`] would send, encoded with the
    /// bus's codec, without sending it: for an event stored now and sent
    /// later (an outbox), through [`Bus::forward`]. Checked as a publish
    /// is (owner, name, version, headers, the bus's payload limit); the
    /// route's own limit is checked when it is forwarded.
    pub fn encode<E: Event>(&self, event: E, options: PublishOptions) -> Result<Envelope> {
        let attrs = self.checked_attributes::<E>(options)?;
        let bytes = self.encoded(&event, self.bus.inner.max_payload)?;
        Ok(Envelope::from_bytes(attrs, bytes))
    }

    /// The attributes of a new event of this module, after the checks
    /// every publish makes.
    fn checked_attributes<E: Event>(&self, options: PublishOptions) -> Result<Attributes> {
        if self.bus.inner.closed.load(SeqCst) {
            return Err(Error::closed());
        }
        self.check_declared()?;
        if let Decl::Declared(decl) = self.decl {
            if !decl.declares::<E>() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "module `{}` does not declare {} v{} among the events it publishes",
                        self.name,
                        E::NAME,
                        E::VERSION
                    ),
                ));
            }
        }
        if E::MODULE != self.name {
            return Err(Error::new(
                ErrorKind::NotOwner,
                format!(
                    "module `{}` cannot publish {} (owned by `{}`)",
                    self.name,
                    E::NAME,
                    E::MODULE
                ),
            ));
        }
        if !const { crate::event::name_is_valid(E::NAME) } {
            validate_name(E::NAME)?;
        }
        if E::VERSION == 0 {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!("{}: versions start at 1", E::NAME),
            ));
        }
        self.attributes::<E>(options)
    }

    /// `event` encoded with the bus's codec, at most `limit` bytes (and,
    /// in test mode, checked to decode again).
    fn encoded<E: Event>(&self, event: &E, limit: usize) -> Result<bytes::Bytes> {
        let bus = &*self.bus.inner;
        let bytes = bus.codecs.default.encode(event)?;
        if bytes.len() > limit {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "{} encodes to {} bytes, over the limit of {limit}",
                    E::NAME,
                    bytes.len()
                ),
            ));
        }
        if bus.verify_codec {
            crate::codec::decode::<E>(&*bus.codecs.default, &bytes).map_err(|e| {
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "{} does not survive its codec (it could not cross a broker): {}",
                        std::any::type_name::<E>(),
                        e.message()
                    ),
                )
            })?;
        }
        Ok(bytes.into())
    }

    fn attributes<E: Event>(&self, options: PublishOptions) -> Result<Attributes> {
        let mut attrs = Attributes::new(E::MODULE, E::NAME, E::VERSION);
        attrs.data_content_type = Cow::Borrowed(self.bus.inner.codecs.default.content_type());
        let PublishOptions {
            key,
            subject,
            correlation_id,
            traceparent,
            headers,
        } = options;
        attrs.partition_key = key;
        attrs.subject = subject;
        attrs.correlation_id = correlation_id;
        attrs.traceparent = traceparent;
        // Inside a handler: link the new event to the one being handled.
        let _ = CURRENT.try_with(|parent| {
            let p = parent.attributes();
            let parent_id = p.wire_id();
            if attrs.correlation_id.is_none() {
                attrs.correlation_id = Some(p.correlation_id.clone().unwrap_or(parent_id.clone()));
            }
            attrs.causation_id = Some(parent_id);
            if attrs.traceparent.is_none() {
                attrs.traceparent = p.traceparent.clone();
            }
        });
        for (name, value) in &headers {
            validate_header(name, value)?;
        }
        attrs.headers = headers;
        attrs.validate()?;
        Ok(attrs)
    }

    /// Subscribes this module to events of type `E` (inferred from the
    /// handler's event argument). Set options on the returned builder (state
    /// with [`SubscribeBuilder::with_state`], layers, retries, ...), then
    /// `.await` it; the handler's shape is checked there (see
    /// [`Handler`]).
    pub fn subscribe<E, T, H>(&self, handler: H) -> SubscribeBuilder<E, H, T, ()> {
        SubscribeBuilder {
            module: self.clone(),
            handler,
            state: (),
            layers: Vec::new(),
            name: None,
            spec_concurrency: 1,
            retry: RetryPolicy::default(),
            ordering: Ordering::default(),
            dispatch: None,
            timeout: None,
            _event: PhantomData,
        }
    }
}

/// Options of a subscription; `.await` it to subscribe.
#[must_use = "a subscription starts only when the builder is awaited"]
pub struct SubscribeBuilder<E, H, T = (crate::Received<E>, crate::Context), S = ()> {
    module: Module,
    handler: H,
    state: S,
    layers: Vec<crate::layer::LayerFn>,
    name: Option<String>,
    spec_concurrency: usize,
    retry: RetryPolicy,
    ordering: Ordering,
    dispatch: Option<Dispatch>,
    timeout: Option<Duration>,
    _event: PhantomData<fn() -> (E, T)>,
}

impl<E, H, T, S> SubscribeBuilder<E, H, T, S> {
    /// Gives the handler shared state: a handler
    /// `async fn(State<S>, Received<E>, Context)` gets a clone of `state` on
    /// every call (axum's `with_state`). Put an `Arc` inside for anything
    /// large.
    ///
    /// ```
    /// use seambus::{Bus, Context, HandlerError, Received, State};
    /// # #[derive(serde::Serialize, serde::Deserialize, seambus::Event)]
    /// # #[event(name = "orders.order_placed")]
    /// # struct OrderPlaced { order_id: u64 }
    /// #[derive(Clone)]
    /// struct Db(std::sync::Arc<std::sync::Mutex<Vec<u64>>>);
    ///
    /// async fn remember(db: State<Db>, order: Received<OrderPlaced>, _: Context) -> Result<(), HandlerError> {
    ///     db.0 .0.lock().unwrap().push(order.order_id);
    ///     Ok(())
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> seambus::Result<()> {
    /// let bus = Bus::new();
    /// let db = Db(Default::default());
    /// let sub = bus.module("audit").subscribe(remember).with_state(db.clone()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_state<S2>(self, state: S2) -> SubscribeBuilder<E, H, T, S2> {
        SubscribeBuilder {
            module: self.module,
            handler: self.handler,
            state,
            layers: self.layers,
            name: self.name,
            spec_concurrency: self.spec_concurrency,
            retry: self.retry,
            ordering: self.ordering,
            dispatch: self.dispatch,
            timeout: self.timeout,
            _event: PhantomData,
        }
    }

    /// Wraps this subscription's handler in a tower
    /// [`Layer`](tower::Layer) (see [`crate::layer`]), inside the bus's
    /// layers; the first added sees each event first.
    pub fn layer(mut self, layer: impl crate::layer::HandlerLayer) -> Self {
        self.layers.push(std::sync::Arc::new(layer));
        self
    }

    /// The subscription's name, unique within the module (default: the
    /// event name). Two handlers of one module for one event need two names.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How many events this process handles at once for this subscription.
    /// Default 1.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.spec_concurrency = n;
        self
    }

    /// Attempts before dead-lettering (default 5).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.retry = self.retry.with_max_attempts(n);
        self
    }

    /// First and largest retry delay.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry = self.retry.with_backoff(initial, max);
        self
    }

    /// The whole retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Longest time one handler call may take; past it the call is dropped
    /// and counts as a transient failure (retried, then dead-lettered).
    /// Default: no limit.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Per-key ordering (default [`Ordering::ByKey`]).
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.ordering = ordering;
        self
    }

    /// Queued or inline dispatch. Default: what [`BusBuilder::dispatch`]
    /// configured for the event, else queued.
    pub fn dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = Some(dispatch);
        self
    }
}

impl<E, H, T, S> SubscribeBuilder<E, H, T, S>
where
    E: Event,
    T: 'static,
    S: Send + Sync + 'static,
    H: Handler<E, T, S>,
{
    async fn start(self) -> Result<Subscription> {
        let bus = &self.module.bus.inner;
        if bus.closed.load(SeqCst) {
            return Err(Error::closed());
        }
        validate_name(&self.module.name)?;
        self.module.check_declared()?;
        validate_name(E::NAME)?;
        let subscription = self.name.unwrap_or_else(|| E::NAME.to_owned());
        validate_name(&subscription)?;
        if self.spec_concurrency == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "concurrency must be at least 1",
            ));
        }
        bus.upcasters.check_chain::<E>()?;
        let index = bus.route_index(E::NAME);
        let (transport_name, transport) = &bus.transports[index];
        let caps = &bus.capabilities[index];
        let dispatch = self.dispatch.unwrap_or_else(|| bus.dispatch_of(E::NAME));
        if dispatch == Dispatch::Inline && !caps.inline_dispatch {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} is routed to `{transport_name}`, which has no inline dispatch",
                    E::NAME
                ),
            ));
        }
        if self.ordering == Ordering::ByKey && !caps.per_key_order {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} is routed to `{transport_name}`, which cannot keep per-key order; \
                     subscribe with Ordering::Unordered",
                    E::NAME
                ),
            ));
        }
        let group = GroupId::new(self.module.name.to_string(), subscription);
        {
            let mut subs = bus
                .subscriptions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !subs.insert(group.clone()) {
                return Err(Error::new(
                    ErrorKind::DuplicateSubscription,
                    format!(
                        "module `{}` already has a subscription named `{}`; give the second one another .name()",
                        group.module(),
                        group.subscription()
                    ),
                ));
            }
        }
        let stats = Arc::new(StatsCell::default());
        let handler = TypedHandler::<E, H, T, S>::new(crate::handler::Parts {
            handler: self.handler,
            state: self.state,
            group: group.clone(),
            timeout: self.timeout,
            layers: bus.layers.iter().chain(&self.layers).cloned().collect(),
            upcasters: bus.upcasters.clone(),
            codecs: bus.codecs.clone(),
            stats: stats.clone(),
            testing: bus.testing.clone(),
        });
        let mut spec = SubscriptionSpec::new(group.clone(), E::NAME);
        spec.concurrency = self.spec_concurrency;
        spec.retry = self.retry;
        spec.ordering = self.ordering;
        spec.dispatch = dispatch;
        match transport.subscribe(spec, Arc::new(handler)).await {
            Ok(consumer) => Ok(Subscription {
                bus: {
                    if let Some(t) = &bus.testing {
                        t.group_added(E::NAME);
                    }
                    self.module.bus.clone()
                },
                event: E::NAME,
                group,
                transport: transport.clone(),
                consumer,
                stats,
            }),
            Err(e) => {
                bus.subscriptions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&group);
                Err(e)
            }
        }
    }
}

impl<E, H, T, S> IntoFuture for SubscribeBuilder<E, H, T, S>
where
    E: Event,
    T: 'static,
    S: Send + Sync + 'static,
    H: Handler<E, T, S>,
{
    type Output = Result<Subscription>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Subscription>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

/// A running subscription. Dropping it does not stop it; call
/// [`Subscription::close`].
pub struct Subscription {
    bus: Bus,
    event: &'static str,
    group: GroupId,
    transport: Arc<dyn Transport>,
    consumer: Box<dyn Consumer>,
    stats: Arc<StatsCell>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("group", &self.group)
            .field("transport", &self.transport.name())
            .finish()
    }
}

impl Subscription {
    /// The group this subscription works for.
    pub fn group(&self) -> &GroupId {
        &self.group
    }

    /// Counters of this subscription in this process.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    /// The group's dead letters, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.transport.dead_letters(&self.group).await
    }

    /// Sends dead letters (those with `ids`, or all) back to this group.
    /// They are upcast again on the way, like any delivery.
    pub async fn redrive(&self, ids: Option<&[Uuid]>) -> Result<usize> {
        self.transport.redrive(&self.group, ids).await
    }

    /// Removes dead letters (those with `ids`, or all) of this group for
    /// good. Returns how many were removed. Dead letters are never removed
    /// otherwise (except by [`Subscription::redrive`]).
    pub async fn discard_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<usize> {
        self.transport.discard_dead_letters(&self.group, ids).await
    }

    /// Stops this subscription after its in-flight handlers finish. The
    /// group and its pending events stay on the transport; subscribing
    /// again with the same module and name resumes them.
    pub async fn close(self) -> Result<()> {
        let result = self.consumer.close().await;
        if let Some(t) = &self.bus.inner.testing {
            t.group_removed(self.event);
        }
        self.bus
            .inner
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.group);
        result
    }
}
