//! Bus behaviour and bad input: every mistake is a typed error, never a
//! panic.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use seambus::transport::{
    Capabilities, Consumer, DeadLetter, DeliveryHandler, GroupId, ShutdownReport, SubscriptionSpec,
    Transport, TryPublish,
};
use seambus::{
    Bus, Context, Dispatch, Envelope, ErrorKind, Event, HandlerError, InProcessConfig,
    InProcessTransport, PublishOptions, Received, WhenFull,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 1)]
struct OrderPlacedV1 {
    order_id: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 2)]
struct OrderPlacedV2 {
    order_id: u64,
    currency: String,
}

impl From<OrderPlacedV1> for OrderPlacedV2 {
    fn from(v1: OrderPlacedV1) -> Self {
        Self {
            order_id: v1.order_id,
            currency: "EUR".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "inventory.stock_reserved")]
struct StockReserved {
    order_id: u64,
}

fn ok() -> Result<(), HandlerError> {
    Ok(())
}

async fn noop<E>(_e: Received<E>, _c: Context) -> Result<(), HandlerError> {
    ok()
}

/// A handler that forwards every event it gets.
fn forward<E: Event + Clone>(
    tx: mpsc::UnboundedSender<(E, Context)>,
) -> impl Fn(
    Received<E>,
    Context,
) -> futures_util::future::BoxFuture<'static, Result<(), HandlerError>>
       + Send
       + Sync
       + 'static {
    move |e, ctx| {
        let tx = tx.clone();
        Box::pin(async move {
            tx.send(((*e).clone(), ctx))?;
            ok()
        })
    }
}

#[tokio::test]
async fn publishing_another_modules_event_is_refused() {
    let bus = Bus::new();
    let err = bus
        .module("inventory")
        .publish(OrderPlacedV1 { order_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotOwner);
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("owned by `orders`"), "{err}");
}

macro_rules! hand_written_event {
    ($ty:ident, $name:expr) => {
        #[derive(Serialize, Deserialize)]
        struct $ty;
        impl Event for $ty {
            const NAME: &'static str = $name;
            const VERSION: u32 = 1;
            const MODULE: &'static str = "orders";
        }
    };
}
hand_written_event!(EmptyName, "");
hand_written_event!(BadName, "Orders Placed!");

#[tokio::test]
async fn empty_or_invalid_event_names_are_refused() {
    let bus = Bus::new();
    let orders = bus.module("orders");
    assert_eq!(
        orders.publish(EmptyName).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(
        orders.publish(BadName).await.unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    let err = bus
        .module("x")
        .subscribe(noop::<BadName>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
    let err = bus
        .module("Bad Module")
        .subscribe(noop::<OrderPlacedV1>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
    let err = bus
        .module("x")
        .subscribe(noop::<OrderPlacedV1>)
        .name("")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
}

#[tokio::test]
async fn duplicate_subscription_name_is_refused_until_closed() {
    let bus = Bus::new();
    let m = bus.module("inventory");
    let first = m.subscribe(noop::<OrderPlacedV1>).await.unwrap();
    let err = m.subscribe(noop::<OrderPlacedV1>).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DuplicateSubscription);
    // Another name is another group; it works.
    m.subscribe(noop::<OrderPlacedV1>)
        .name("audit")
        .await
        .unwrap();
    first.close().await.unwrap();
    m.subscribe(noop::<OrderPlacedV1>).await.unwrap();
}

#[tokio::test]
async fn missing_upcast_step_is_a_startup_error() {
    let bus = Bus::new();
    let err = bus
        .module("inventory")
        .subscribe(noop::<OrderPlacedV2>)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingUpcast);
    assert!(err.to_string().contains("v1 to v2"), "{err}");
}

#[test]
fn an_upcast_that_skips_a_version_is_a_config_error() {
    #[derive(Clone, Serialize, Deserialize, seambus::Event)]
    #[event(name = "orders.order_placed", version = 3)]
    struct V3 {
        order_id: u64,
    }
    impl From<OrderPlacedV1> for V3 {
        fn from(v: OrderPlacedV1) -> Self {
            Self {
                order_id: v.order_id,
            }
        }
    }
    let err = Bus::builder()
        .upcast::<OrderPlacedV1, V3>()
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn older_versions_are_upcast_for_newer_subscribers() {
    let bus = Bus::builder()
        .upcast::<OrderPlacedV1, OrderPlacedV2>()
        .build()
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.module("inventory")
        .subscribe(forward::<OrderPlacedV2>(tx))
        .await
        .unwrap();
    bus.module("orders")
        .publish(OrderPlacedV1 { order_id: 9 })
        .await
        .unwrap();
    let (got, ctx) = rx.recv().await.unwrap();
    assert_eq!(
        got,
        OrderPlacedV2 {
            order_id: 9,
            currency: "EUR".into()
        }
    );
    assert_eq!(ctx.envelope().data_version(), 1, "the wire version is kept");
}

#[tokio::test]
async fn header_with_cr_lf_is_refused() {
    let bus = Bus::new();
    for (name, value) in [
        ("x-a", "1\r\nx-b: 2"),
        ("x-a", "1\n"),
        ("x a", "1"),
        ("ce_id", "forged"),
        ("CE-Type", "forged"),
        ("cloudEvents:source", "forged"),
        ("content-type", "text/plain"),
    ] {
        let err = bus
            .module("orders")
            .publish_with(
                OrderPlacedV1 { order_id: 1 },
                PublishOptions::new().header(name, value),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidHeader, "{name:?}: {value:?}");
    }
    let err = bus
        .module("orders")
        .publish_with(
            OrderPlacedV1 { order_id: 1 },
            PublishOptions::new().key("a\nb"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidHeader);
}

#[derive(Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.blob")]
struct Blob {
    data: String,
}

#[tokio::test]
async fn payload_over_the_maximum_is_refused() {
    let bus = Bus::builder()
        .max_payload(64)
        .verify_codec(true)
        .build()
        .unwrap();
    let orders = bus.module("orders");
    orders
        .publish(Blob {
            data: "x".repeat(10),
        })
        .await
        .unwrap();
    let err = orders
        .publish(Blob {
            data: "x".repeat(100),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(err.to_string().contains("over the limit of 64"), "{err}");
}

/// Serializes field `x` as "a" but reads it as "b": it cannot cross a broker.
#[derive(Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.lopsided")]
struct Lopsided {
    #[serde(rename(serialize = "a", deserialize = "b"))]
    x: u32,
}

#[tokio::test]
async fn a_type_that_cannot_cross_a_broker_fails_in_verify_mode_only() {
    // In-process by default: shared, never serialized, so it "works"...
    let bus = Bus::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.module("audit")
        .subscribe(forward::<Lopsided>(tx))
        .await
        .unwrap();
    bus.module("orders")
        .publish(Lopsided { x: 1 })
        .await
        .unwrap();
    let (_, ctx) = rx.recv().await.unwrap();
    assert!(ctx.envelope().is_typed(), "in-process shares the value");

    // ...and the test mode catches it at the publish site.
    let bus = Bus::builder().verify_codec(true).build().unwrap();
    let err = bus
        .module("orders")
        .publish(Lopsided { x: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert!(
        err.to_string().contains("could not cross a broker"),
        "{err}"
    );
}

#[tokio::test]
async fn verify_mode_delivers_bytes_through_the_codec() {
    let bus = Bus::builder().verify_codec(true).build().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.module("audit")
        .subscribe(forward::<OrderPlacedV1>(tx))
        .await
        .unwrap();
    bus.module("orders")
        .publish(OrderPlacedV1 { order_id: 3 })
        .await
        .unwrap();
    let (got, ctx) = rx.recv().await.unwrap();
    assert_eq!(got.order_id, 3);
    let bytes = ctx
        .envelope()
        .payload_bytes()
        .expect("bytes in verify mode");
    assert_eq!(&bytes[..], br#"{"order_id":3}"#);
}

#[tokio::test]
async fn inline_dispatch_runs_handlers_before_publish_returns() {
    let bus = Bus::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    bus.module("inventory")
        .subscribe(move |_e: Received<OrderPlacedV1>, ctx: Context| {
            let h = h.clone();
            async move {
                if ctx.attempt() == 1 {
                    return Err(HandlerError::retry("first attempt fails"));
                }
                h.fetch_add(1, SeqCst);
                ok()
            }
        })
        .dispatch(Dispatch::Inline)
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .await
        .unwrap();
    for n in 1..=3 {
        bus.module("orders")
            .publish(OrderPlacedV1 { order_id: n })
            .await
            .unwrap();
        // No waiting: the handler (and its retry) ran inside publish.
        assert_eq!(handled.load(SeqCst), n as usize);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn dispatch_mode_comes_from_configuration_without_touching_the_subscription() {
    for (mode, handled_when_publish_returns) in [(Dispatch::Inline, 1), (Dispatch::Queued, 0)] {
        let bus = Bus::builder().dispatch("orders.*", mode).build().unwrap();
        // The same subscription code in both configurations.
        let sub = bus
            .module("inventory")
            .subscribe(noop::<OrderPlacedV1>)
            .await
            .unwrap();
        bus.module("orders")
            .publish(OrderPlacedV1 { order_id: 1 })
            .await
            .unwrap();
        // One thread and no yield since publish returned: only an inline
        // handler can have run.
        assert_eq!(
            sub.stats().succeeded,
            handled_when_publish_returns,
            "{mode:?}"
        );
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            sub.stats().succeeded,
            1,
            "{mode:?}: handled by shutdown's drain"
        );
    }
}

#[tokio::test]
async fn inline_failures_go_to_the_dead_letter_and_can_be_redriven() {
    let bus = Bus::new();
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let sub = bus
        .module("inventory")
        .subscribe(move |_e: Received<OrderPlacedV1>, _c: Context| {
            let h = h.clone();
            async move {
                if h.load(SeqCst) {
                    ok()
                } else {
                    Err(HandlerError::reject("no stock"))
                }
            }
        })
        .dispatch(Dispatch::Inline)
        .await
        .unwrap();
    let id = bus
        .module("orders")
        .publish(OrderPlacedV1 { order_id: 1 })
        .await
        .unwrap();
    let dead = sub.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id(), id);
    assert_eq!(dead[0].error, "permanent: no stock");
    healed.store(true, SeqCst);
    assert_eq!(sub.redrive(None).await.unwrap(), 1);
    assert!(sub.dead_letters().await.unwrap().is_empty());
    assert_eq!(sub.stats().succeeded, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn full_queue_makes_publish_wait_or_fail() {
    for when_full in [WhenFull::Wait, WhenFull::Fail] {
        let transport = InProcessTransport::new(
            InProcessConfig::default()
                .with_queue_capacity(2)
                .with_when_full(when_full),
        );
        let bus = Bus::builder()
            .transport("memory", transport)
            .build()
            .unwrap();
        let gate = Arc::new(Notify::new());
        let g = gate.clone();
        bus.module("slow")
            .subscribe(move |_e: Received<OrderPlacedV1>, _c: Context| {
                let g = g.clone();
                async move {
                    g.notified().await;
                    ok()
                }
            })
            .await
            .unwrap();
        let orders = bus.module("orders");
        orders.publish(OrderPlacedV1 { order_id: 1 }).await.unwrap();
        orders.publish(OrderPlacedV1 { order_id: 2 }).await.unwrap();
        match when_full {
            WhenFull::Fail => {
                let err = orders
                    .publish(OrderPlacedV1 { order_id: 3 })
                    .await
                    .unwrap_err();
                assert_eq!(err.kind(), ErrorKind::QueueFull);
                assert!(err.is_retryable());
            }
            _ => {
                let o = orders.clone();
                let third =
                    tokio::spawn(async move { o.publish(OrderPlacedV1 { order_id: 3 }).await });
                for _ in 0..50 {
                    tokio::task::yield_now().await;
                }
                assert!(
                    !third.is_finished(),
                    "publish waits while the group is full"
                );
                gate.notify_one();
                third.await.unwrap().unwrap();
            }
        }
        for _ in 0..3 {
            gate.notify_one();
        }
    }
}

#[tokio::test]
async fn publish_after_shutdown_is_closed() {
    let bus = Bus::new();
    let report = bus.shutdown(Duration::from_secs(1)).await.unwrap();
    assert!(report.drained);
    let err = bus
        .module("orders")
        .publish(OrderPlacedV1 { order_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn shutdown_hands_back_what_it_could_not_finish() {
    let bus = Bus::new();
    let sub = bus
        .module("stuck")
        .subscribe(|_e: Received<OrderPlacedV1>, _c: Context| async {
            std::future::pending::<()>().await;
            ok()
        })
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            bus.module("orders")
                .publish(OrderPlacedV1 { order_id: n })
                .await
                .unwrap(),
        );
    }
    let report = bus.shutdown(Duration::from_millis(20)).await.unwrap();
    assert!(!report.drained);
    let mut back: Vec<_> = report.unfinished.iter().map(|u| u.envelope.id()).collect();
    back.sort();
    ids.sort();
    assert_eq!(back, ids, "every accepted event is handed back");
    assert!(
        sub.dead_letters().await.unwrap().is_empty(),
        "cancellation never dead-letters"
    );
    assert_eq!(sub.stats().retried, 0);
}

#[tokio::test]
async fn events_published_in_a_handler_carry_correlation_and_causation() {
    let bus = Bus::new();
    let inventory = bus.module("inventory");
    let inv = inventory.clone();
    inventory
        .subscribe(move |order: Received<OrderPlacedV1>, _c: Context| {
            let inv = inv.clone();
            async move {
                inv.publish(StockReserved {
                    order_id: order.order_id,
                })
                .await?;
                ok()
            }
        })
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.module("shipping")
        .subscribe(forward::<StockReserved>(tx))
        .await
        .unwrap();
    let id = bus
        .module("orders")
        .publish(OrderPlacedV1 { order_id: 5 })
        .await
        .unwrap();
    let (_, ctx) = rx.recv().await.unwrap();
    let a = ctx.envelope().attributes();
    assert_eq!(a.causation_id.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(a.correlation_id.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(a.source, "inventory");
}

/// Delegates to the in-process transport but claims less.
struct Limited(InProcessTransport);

#[async_trait]
impl Transport for Limited {
    fn name(&self) -> &str {
        "limited"
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.consumer_groups = true;
        caps.max_payload = Some(32);
        caps
    }
    fn try_publish(&self, envelope: Envelope) -> TryPublish {
        self.0.try_publish(envelope)
    }
    async fn publish(&self, envelope: Envelope) -> seambus::Result<()> {
        assert!(
            envelope.payload_bytes().is_some(),
            "bytes for a non-sharing transport"
        );
        self.0.publish(envelope).await
    }
    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> seambus::Result<Box<dyn Consumer>> {
        self.0.subscribe(spec, handler).await
    }
    async fn dead_letters(&self, group: &GroupId) -> seambus::Result<Vec<DeadLetter>> {
        self.0.dead_letters(group).await
    }
    async fn shutdown(&self, deadline: Duration) -> seambus::Result<ShutdownReport> {
        self.0.shutdown(deadline).await
    }
}

#[tokio::test]
async fn subscriptions_that_ask_more_than_the_route_gives_are_refused() {
    let bus = Bus::builder()
        .transport("memory", InProcessTransport::default())
        .transport("limited", Limited(InProcessTransport::default()))
        .default_transport("memory")
        .route("orders.*", "limited")
        .build()
        .unwrap();
    assert_eq!(bus.route_of("orders.order_placed"), "limited");
    assert_eq!(bus.route_of("inventory.stock_reserved"), "memory");
    let m = bus.module("inventory");
    let err = m
        .subscribe(noop::<OrderPlacedV1>)
        .dispatch(Dispatch::Inline)
        .ordering(seambus::Ordering::Unordered)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let err = m.subscribe(noop::<OrderPlacedV1>).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Unsupported,
        "per-key order by default"
    );
    // Encoded for a broker-like route, limited by the transport's max payload.
    let (tx, mut rx) = mpsc::unbounded_channel();
    m.subscribe(forward::<OrderPlacedV1>(tx))
        .ordering(seambus::Ordering::Unordered)
        .await
        .unwrap();
    bus.module("orders")
        .publish(OrderPlacedV1 { order_id: 1 })
        .await
        .unwrap();
    let (got, ctx) = rx.recv().await.unwrap();
    assert_eq!(got.order_id, 1);
    assert!(!ctx.envelope().is_typed());
    // The transport's own limit (32 bytes) applies without verify mode.
    let err = bus
        .module("orders")
        .publish(Blob {
            data: "x".repeat(40),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
}

#[test]
fn bad_routes_and_transports_are_config_errors() {
    let err = Bus::builder()
        .transport("memory", InProcessTransport::default())
        .route("orders.*", "kafka")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string().contains("unknown transport `kafka`"),
        "{err}"
    );
    let err = Bus::builder()
        .transport("a", InProcessTransport::default())
        .transport("a", InProcessTransport::default())
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = Bus::builder()
        .route("Orders.*", "in-process")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName);
}

mod routing_by_configuration {
    use super::*;
    use seambus::routing::{Routing, Rule};

    const TOML: &str = r#"
        [app]
        ignored = true

        [routes]
        "*" = { transport = "in-process", dispatch = "inline" }
        "shipments.*" = "queue"
        "orders.order_confirmed" = { transport = "queue", dispatch = "queued" }
    "#;

    #[test]
    fn toml_and_environment_forms_say_the_same() {
        let from_toml = Routing::from_toml_str(TOML).unwrap();
        let from_env = Routing::parse_env(
            "*=in-process:inline; shipments.*=queue,\n orders.order_confirmed=queue:queued",
        )
        .unwrap();
        // Same rules, same order (a TOML file keeps its order).
        assert_eq!(from_toml, from_env);
        assert_eq!(from_toml.transports(), ["in-process", "queue"]);
        // Display gives the environment form back.
        assert_eq!(
            Routing::parse_env(&from_toml.to_string()).unwrap(),
            from_toml
        );
        assert_eq!(
            from_toml
                .rule_for("shipments.order_shipped")
                .unwrap()
                .transport
                .as_deref(),
            Some("queue")
        );
        assert!(from_toml.rule_for("orders.order_placed").is_none());
        assert!(Routing::from_toml_str("[app]\nx = 1").unwrap().is_empty());
    }

    #[test]
    fn overlapping_routes_are_startup_errors_naming_both() {
        for (a, b) in [
            ("orders.*", "orders.order_placed"),
            ("orders.*", "orders.audit.*"),
        ] {
            let err = Routing::new([Rule::new(a, "x"), Rule::new(b, "y")]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(
                err.to_string().contains(a) && err.to_string().contains(b),
                "{err}"
            );
            // The builder keeps the same rule.
            let err = Bus::builder()
                .transport("x", InProcessTransport::default())
                .route(a, "x")
                .route(b, "x")
                .build()
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains("overlap"), "{err}");
        }
        let err = Routing::parse_env("orders.*=x, orders.*=y").unwrap_err();
        assert!(err.to_string().contains("SEAMBUS_ROUTES"), "{err}");
        assert!(err.to_string().contains("overlap"), "{err}");
        // Disjoint prefixes and the default are fine.
        Routing::parse_env("*=a, orders.*=b, ordersx.*=c, inventory.stock_reserved=d").unwrap();
    }

    #[test]
    fn unknown_transports_are_startup_errors_listing_the_known_ones() {
        let routing = Routing::parse_env("shipments.*=natz").unwrap();
        let err = Bus::builder()
            .transport("nats", InProcessTransport::default())
            .routing(&routing)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let text = err.to_string();
        assert!(text.contains("unknown transport `natz`"), "{text}");
        assert!(
            text.contains("nats") && text.contains("in-process"),
            "{text}"
        );
        let err = Bus::builder()
            .routing(&Routing::parse_env("*=kafka").unwrap())
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown transport `kafka`"),
            "{err}"
        );
    }

    #[test]
    fn bad_routing_text_gets_a_clear_error() {
        for (text, needle) in [
            (
                "[routes]\n\"orders.*\" = { transport = \"a\", dispatch = \"sync\" }",
                "unknown dispatch `sync`",
            ),
            (
                "[routes]\n\"orders.*\" = { transprt = \"a\" }",
                "unknown key `transprt`",
            ),
            ("[routes]\n\"orders.*\" = 3", "expected a transport name"),
            ("routes = 1", "`routes` must be a table"),
            ("[routes\n", "routing TOML"),
        ] {
            let err = Routing::from_toml_str(text).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{text}");
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
        let err = Routing::from_toml_str("[routes]\n\"Orders!\" = \"a\"").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName);
        let err = Routing::parse_env("orders.* nats").unwrap_err();
        assert!(err.to_string().contains("pattern=transport"), "{err}");
        let err = Routing::parse_env("orders.*=na ts").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName);
        let err = Routing::from_toml_file("/nonexistent/seambus.toml").unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/seambus.toml"),
            "{err}"
        );
    }

    #[test]
    fn the_environment_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("seambus-routing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("routes.toml");
        std::fs::write(&file, TOML).unwrap();
        std::env::remove_var(seambus::routing::ROUTES_ENV);
        assert_eq!(
            Routing::load(Some(&file)).unwrap(),
            Routing::from_toml_str(TOML).unwrap()
        );
        std::env::set_var(seambus::routing::ROUTES_ENV, "inventory.*=b");
        let loaded = Routing::load(Some(&file));
        std::env::remove_var(seambus::routing::ROUTES_ENV);
        assert_eq!(
            loaded.unwrap(),
            Routing::parse_env("inventory.*=b").unwrap()
        );
        assert!(Routing::load(None).unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dispatch_is_chosen_per_route() {
        // (routing, inline for orders.order_placed, inline for shipments.*)
        for (routes, orders_inline, shipments_inline) in [
            ("*=:inline, shipments.*=queue", true, false),
            ("*=:inline, shipments.*=queue:inline", true, true),
            ("shipments.*=queue:inline", false, true),
            ("", false, false),
            // A route to the default transport is a route: queued.
            (
                "*=:inline, orders.order_placed=in-process, shipments.*=queue",
                false,
                false,
            ),
            // `in-process` is created when only a route names it.
            (
                "*=queue:inline, orders.*=in-process, shipments.*=queue",
                false,
                false,
            ),
        ] {
            let routing = Routing::parse_env(routes).unwrap();
            let bus = Bus::builder()
                .transport("queue", InProcessTransport::default())
                .routing(&routing)
                .build()
                .unwrap();
            let orders = bus
                .module("inventory")
                .subscribe(noop::<OrderPlacedV1>)
                .await
                .unwrap();
            let shipments = bus
                .module("orders")
                .subscribe(noop::<OrderShipped>)
                .await
                .unwrap();
            bus.module("orders")
                .publish(OrderPlacedV1 { order_id: 1 })
                .await
                .unwrap();
            bus.module("shipments")
                .publish(OrderShipped { order_id: 1 })
                .await
                .unwrap();
            // One thread, no yield since the publishes returned: only inline
            // handlers can have run.
            assert_eq!(
                orders.stats().succeeded,
                u64::from(orders_inline),
                "{routes}"
            );
            assert_eq!(
                shipments.stats().succeeded,
                u64::from(shipments_inline),
                "{routes}"
            );
            let expected_route = if routes.contains("shipments") {
                "queue"
            } else {
                "in-process"
            };
            assert_eq!(bus.route_of(OrderShipped::NAME), expected_route);
            assert_eq!(bus.route_of(OrderPlacedV1::NAME), "in-process", "{routes}");
            bus.shutdown(Duration::from_secs(5)).await.unwrap();
        }
    }

    #[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
    #[event(name = "shipments.order_shipped")]
    struct OrderShipped {
        order_id: u64,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn stats_report_handling_time_percentiles() {
    let bus = Bus::new();
    let sub = bus
        .module("inventory")
        .subscribe(|e: Received<OrderPlacedV1>, _c: Context| async move {
            if e.order_id == 9 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ok()
        })
        .dispatch(Dispatch::Inline)
        .await
        .unwrap();
    assert_eq!(sub.stats().handling_max, Duration::ZERO);
    for order_id in 0..10 {
        bus.module("orders")
            .publish(OrderPlacedV1 { order_id })
            .await
            .unwrap();
    }
    let stats = sub.stats();
    assert_eq!(stats.succeeded, 10);
    assert!(stats.handling_p50 < Duration::from_millis(20), "{stats:?}");
    assert!(stats.handling_p99 >= Duration::from_millis(20), "{stats:?}");
    assert!(stats.handling_max >= stats.handling_p99, "{stats:?}");
}

#[tokio::test]
async fn an_encoded_envelope_is_forwarded_later_as_the_same_event() {
    let bus = Bus::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _sub = bus
        .module("billing")
        .subscribe(forward::<OrderPlacedV1>(tx))
        .await
        .unwrap();
    // Checked as a publish is: only the owner encodes its events.
    let err = bus
        .module("billing")
        .encode(OrderPlacedV1 { order_id: 7 }, PublishOptions::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotOwner);
    let envelope = bus
        .module("orders")
        .encode(
            OrderPlacedV1 { order_id: 7 },
            PublishOptions::new().key("order-7"),
        )
        .unwrap();
    assert!(envelope.payload_bytes().is_some(), "encoded, to be stored");
    let id = envelope.id();
    bus.forward(envelope.clone()).await.unwrap();
    let (event, ctx) = rx.recv().await.unwrap();
    assert_eq!(event, OrderPlacedV1 { order_id: 7 });
    assert_eq!(ctx.envelope().id(), id, "the stored id, not a new one");
    assert_eq!(
        ctx.envelope().attributes().partition_key.as_deref(),
        Some("order-7")
    );
    // Nothing is forwarded after shutdown.
    bus.shutdown(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        bus.forward(envelope).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}
