//! The shipments module's contract: the events it publishes.

use seambus::Event;
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
