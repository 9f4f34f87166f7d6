//! The orders module's contract: the events it publishes. Other modules
//! depend on this crate, never on `tiny-store-orders`.

use seambus::{Event, EventDecl, ModuleDecl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in cents.
    pub unit_price_cents: u64,
}

impl OrderLine {
    /// `quantity * unit_price_cents` (saturating: a forged event cannot
    /// overflow it).
    pub fn total_cents(&self) -> u64 {
        u64::from(self.quantity).saturating_mul(self.unit_price_cents)
    }
}

/// Version 1 of "an order was placed": one SKU per order. The legacy
/// checkout still publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 1)]
pub struct OrderPlacedV1 {
    /// The order.
    pub order_id: Uuid,
    /// The one SKU ordered.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in cents.
    pub unit_price_cents: u64,
}

/// Version 2 of "an order was placed": a customer and several lines.
/// Subscribers ask for this version; v1 is upcast to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 2)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: Uuid,
    /// Who ordered.
    pub customer: String,
    /// What was ordered.
    pub lines: Vec<OrderLine>,
}

/// The customer that v1 events, which had none, are upcast with.
pub const LEGACY_CUSTOMER: &str = "legacy-checkout";

impl From<OrderPlacedV1> for OrderPlaced {
    fn from(v1: OrderPlacedV1) -> Self {
        Self {
            order_id: v1.order_id,
            customer: LEGACY_CUSTOMER.to_owned(),
            lines: vec![OrderLine {
                sku: v1.sku,
                quantity: v1.quantity,
                unit_price_cents: v1.unit_price_cents,
            }],
        }
    }
}

impl OrderPlaced {
    /// The sum of the lines.
    pub fn total_cents(&self) -> u64 {
        self.lines
            .iter()
            .fold(0, |sum, l| sum.saturating_add(l.total_cents()))
    }
}

/// Stock is reserved and the payment captured: the order will ship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_confirmed", version = 1)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: Uuid,
    /// Who ordered.
    pub customer: String,
    /// What to ship.
    pub lines: Vec<OrderLine>,
}

/// The order will not ship; any stock held for it is to be released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_cancelled", version = 1)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Why, for people.
    pub reason: String,
}

/// The orders module as the bus knows it: its name and every event it
/// publishes (a misspelt module, or an event it does not list, is refused).
pub const MODULE: ModuleDecl = ModuleDecl::new(
    "orders",
    &[
        EventDecl::of::<OrderPlacedV1>(),
        EventDecl::of::<OrderPlaced>(),
        EventDecl::of::<OrderConfirmed>(),
        EventDecl::of::<OrderCancelled>(),
    ],
);
