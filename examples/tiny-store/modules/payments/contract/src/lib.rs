//! The payments module's contract: the events it publishes.

use seambus::{Event, EventDecl, ModuleDecl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The order's amount was captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "payments.payment_captured", version = 1)]
pub struct PaymentCaptured {
    /// The order.
    pub order_id: Uuid,
    /// How much, in cents.
    pub amount_cents: u64,
}

/// The payment was declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "payments.payment_failed", version = 1)]
pub struct PaymentFailed {
    /// The order.
    pub order_id: Uuid,
    /// Why, for people.
    pub reason: String,
}

/// The payments module as the bus knows it: its name and every event it
/// publishes (a misspelt module, or an event it does not list, is refused).
pub const MODULE: ModuleDecl = ModuleDecl::new(
    "payments",
    &[
        EventDecl::of::<PaymentCaptured>(),
        EventDecl::of::<PaymentFailed>(),
    ],
);
