//! The shipments module's contract: the events it publishes.

use seambus::{Event, EventDecl, ModuleDecl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The order left the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(name = "shipments.order_shipped", version = 1)]
pub struct OrderShipped {
    /// The order.
    pub order_id: Uuid,
    /// The carrier's tracking number.
    pub tracking_number: String,
}

/// The shipments module as the bus knows it: its name and every event it
/// publishes (a misspelt module, or an event it does not list, is refused).
pub const MODULE: ModuleDecl = ModuleDecl::new("shipments", &[EventDecl::of::<OrderShipped>()]);
