//! The inventory module's contract: the events it publishes.

use seambus::{Event, EventDecl, ModuleDecl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// All the order's lines are reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "inventory.stock_reserved", version = 1)]
pub struct StockReserved {
    /// The order.
    pub order_id: Uuid,
    /// Who ordered (for the payment).
    pub customer: String,
    /// The value of the reserved goods, in cents (the amount to capture).
    pub amount_cents: u64,
}

/// The order cannot be served from stock; nothing is held for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "inventory.stock_rejected", version = 1)]
pub struct StockRejected {
    /// The order.
    pub order_id: Uuid,
    /// Why, for people.
    pub reason: String,
}

/// The inventory module as the bus knows it: its name and every event it
/// publishes (a misspelt module, or an event it does not list, is refused).
pub const MODULE: ModuleDecl = ModuleDecl::new(
    "inventory",
    &[
        EventDecl::of::<StockReserved>(),
        EventDecl::of::<StockRejected>(),
    ],
);
