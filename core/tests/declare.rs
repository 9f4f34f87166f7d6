//! Modules declared once ([`ModuleDecl`]): a misspelt module is refused
//! at its first subscription or publish, naming the declared ones; a
//! module publishes only what it declares; without declarations any name
//! is a module.

use std::time::Duration;

use seambus::{Bus, Context, ErrorKind, EventDecl, HandlerError, ModuleDecl, Received};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 1)]
struct OrderPlaced {
    id: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "orders.order_archived", version = 1)]
struct OrderArchived {
    id: u64,
}

const ORDERS: ModuleDecl = ModuleDecl::new("orders", &[EventDecl::of::<OrderPlaced>()]);
const SHIPMENTS: ModuleDecl = ModuleDecl::new("shipments", &[]);

fn bus() -> Bus {
    Bus::builder()
        .declare(&[&ORDERS, &SHIPMENTS])
        .build()
        .expect("bus")
}

async fn noop(_e: Received<OrderPlaced>, _ctx: Context) -> Result<(), HandlerError> {
    Ok(())
}

#[tokio::test]
async fn a_misspelt_module_is_refused_naming_the_declared_ones() {
    let bus = bus();
    let err = bus.module("shipmnets").subscribe(noop).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.is_retryable());
    assert!(
        err.message().contains("`shipmnets`") && err.message().contains("orders, shipments"),
        "{}",
        err.message()
    );
    let err = bus
        .module("ordrs")
        .publish(OrderPlaced { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    // No group was made for the misspelt module.
    assert!(bus.module_of(&SHIPMENTS).subscribe(noop).await.is_ok());
    bus.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn a_module_publishes_only_what_it_declares() {
    let bus = bus();
    let orders = bus.module_of(&ORDERS);
    let err = orders.publish(OrderArchived { id: 1 }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message().contains("orders.order_archived"),
        "{}",
        err.message()
    );
    let sub = bus.module_of(&SHIPMENTS).subscribe(noop).await.unwrap();
    orders.publish(OrderPlaced { id: 2 }).await.unwrap();
    // The name form reaches the same declaration.
    bus.module("orders")
        .publish(OrderPlaced { id: 3 })
        .await
        .unwrap();
    let report = bus.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(report.drained);
    assert_eq!(sub.stats().succeeded, 2);
}

#[tokio::test]
async fn a_declaration_the_bus_was_not_given_is_refused() {
    const BILLING: ModuleDecl = ModuleDecl::new("billing", &[]);
    let bus = bus();
    let err = bus.module_of(&BILLING).subscribe(noop).await.unwrap_err();
    assert!(err.message().contains("`billing`"), "{}", err.message());
    // On a bus that declares nothing, a declaration is just a name with
    // its list of events.
    let free = Bus::new();
    assert!(free.module_of(&BILLING).subscribe(noop).await.is_ok());
    assert!(free.module("anything").subscribe(noop).await.is_ok());
    assert_eq!(free.declared_modules().len(), 0);
    assert_eq!(bus.declared_modules().len(), 2);
}

#[test]
fn declaring_a_module_twice_is_a_build_error() {
    let err = Bus::builder()
        .declare(&[&ORDERS])
        .declare(&[&ORDERS])
        .build()
        .unwrap_err();
    assert!(
        err.message().contains("declared twice"),
        "{}",
        err.message()
    );
}
