//! Run with: `cargo run -p quickstart`
//!
//! Three modules of one program talk only through Seambus events, on the
//! in-process default (no broker):
//! - `orders` publishes `OrderPlaced`, in two versions: an old code path
//!   still publishes v1, the new one v2;
//! - `inventory` wants v2 (v1 is upcast on the way), reserves stock with
//!   per-order-key ordering, and publishes `StockReserved` or rejects;
//! - `shipping` ships reserved orders; its handler fails once on the first
//!   attempt to show a retry.
//!
//! A rejected order lands in the dead letter, with its reason, and is
//! listed at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seambus::config::{BusConfig, Kinds};
use seambus::{Context, Event, HandlerError, PublishOptions, Received};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The original shape, still published by an old code path.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 1)]
struct OrderPlacedV1 {
    order_id: u64,
    sku: String,
}

/// Today's shape: adds the quantity.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 2)]
struct OrderPlaced {
    order_id: u64,
    sku: String,
    quantity: u32,
}

impl From<OrderPlacedV1> for OrderPlaced {
    fn from(v1: OrderPlacedV1) -> Self {
        Self {
            order_id: v1.order_id,
            sku: v1.sku,
            quantity: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "inventory.stock_reserved")]
struct StockReserved {
    order_id: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();

    // The bus from configuration: SEAMBUS_ROUTES (and a file, when given)
    // say which transport carries what; with neither, everything stays
    // in-process. A program with broker crates lists their kinds here
    // (`Kinds::new().with::<seambus_nats::NatsTransport>()`, ...).
    let bus = BusConfig::load(None)?
        .builder(&Kinds::new())
        .await?
        .upcast::<OrderPlacedV1, OrderPlaced>()
        .build()?;
    let (orders, inventory, shipping) = (
        bus.module("orders"),
        bus.module("inventory"),
        bus.module("shipping"),
    );

    // inventory: reserve stock, one order key at a time.
    let stock = Arc::new(Mutex::new(HashMap::from([
        ("apple".to_string(), 3u32),
        ("pear".to_string(), 1),
    ])));
    let inv = inventory.clone();
    let reservations = inventory
        .subscribe(move |order: Received<OrderPlaced>, ctx: Context| {
            let (inv, stock) = (inv.clone(), stock.clone());
            async move {
                {
                    let mut stock = stock.lock().map_err(|_| HandlerError::retry("lock"))?;
                    let left = stock.entry(order.sku.clone()).or_default();
                    if *left < order.quantity {
                        return Err(HandlerError::reject(format!(
                            "only {left} {} left for order {}",
                            order.sku, order.order_id
                        )));
                    }
                    *left -= order.quantity;
                }
                println!(
                    "inventory: reserved {} x {} for order {} (published as v{})",
                    order.quantity,
                    order.sku,
                    order.order_id,
                    ctx.envelope().data_version()
                );
                inv.publish(StockReserved {
                    order_id: order.order_id,
                })
                .await?;
                Ok(())
            }
        })
        .concurrency(4)
        .await?;

    // shipping: fails each order's first attempt, to show a retry.
    let (shipped_tx, mut shipped_rx) = mpsc::unbounded_channel();
    shipping
        .subscribe(move |reserved: Received<StockReserved>, ctx: Context| {
            let shipped_tx = shipped_tx.clone();
            async move {
                if ctx.attempt() == 1 {
                    return Err(HandlerError::retry("courier busy"));
                }
                let caused_by = ctx.envelope().attributes().causation_id.clone();
                println!(
                    "shipping:  shipped order {} on attempt {} (caused by event {})",
                    reserved.order_id,
                    ctx.attempt(),
                    caused_by.unwrap_or_default()
                );
                shipped_tx.send(reserved.order_id)?;
                Ok(())
            }
        })
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .await?;

    // orders: the old path publishes v1, the new path v2.
    orders
        .publish_with(
            OrderPlacedV1 {
                order_id: 1,
                sku: "apple".into(),
            },
            PublishOptions::new().key("order-1"),
        )
        .await?;
    for (order_id, sku, quantity) in [(2, "apple", 2), (3, "pear", 5)] {
        orders
            .publish_with(
                OrderPlaced {
                    order_id,
                    sku: sku.into(),
                    quantity,
                },
                PublishOptions::new().key(format!("order-{order_id}")),
            )
            .await?;
    }

    // Orders 1 and 2 ship; order 3 asks for more pears than there are.
    let mut shipped = vec![shipped_rx.recv().await, shipped_rx.recv().await];
    shipped.sort();
    println!("shipped orders: {shipped:?}");

    let report = bus.shutdown(Duration::from_secs(5)).await?;
    for dead in reservations.dead_letters().await? {
        println!(
            "dead letter: event {} in group {}: {} ({})",
            dead.envelope.id(),
            dead.group,
            dead.reason,
            dead.error
        );
    }
    println!(
        "inventory handled {} events; shutdown drained: {}",
        reservations.stats().succeeded,
        report.drained
    );
    Ok(())
}
