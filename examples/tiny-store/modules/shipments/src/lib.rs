//! The shipments module: ships every confirmed order, once.

use std::collections::HashMap;
use std::sync::Arc;

use seambus::{Bus, HandlerError, Module, Received};
use seambus_sql::InboxResult;
use sqlx::{Any, Transaction};
use tiny_store_orders_contract::OrderConfirmed;
use tiny_store_platform::{signed, BoxError, Db, Started, Storage};
use tiny_store_shipments_contract::OrderShipped;
use uuid::Uuid;

/// The module's name on the bus (declared in its contract).
pub const MODULE: &str = tiny_store_shipments_contract::MODULE.name();

/// The shipments module.
#[derive(Clone)]
pub struct Shipments {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    module: Module,
    db: Db,
}

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS shipments (
    order_id text PRIMARY KEY,
    tracking_number text NOT NULL,
    items bigint NOT NULL
);";

impl Shipments {
    /// Opens the module's database (creating its tables).
    pub async fn open(bus: &Bus, storage: &Storage) -> Result<Self, BoxError> {
        Ok(Self {
            inner: Arc::new(Inner {
                bus: bus.clone(),
                module: bus.module_of(&tiny_store_shipments_contract::MODULE),
                db: Db::open(storage, MODULE, MIGRATION).await?,
            }),
        })
    }

    /// Subscribes to confirmed orders (through the inbox: a redelivered
    /// confirmation ships nothing again) and forwards its outbox.
    pub async fn start(&self) -> seambus::Result<Started> {
        let this = self.clone();
        let handler =
            self.inner
                .db
                .inbox()
                .handler(move |e: Received<OrderConfirmed>, _ctx, tx| {
                    let this = this.clone();
                    async move { this.on_confirmed(tx, &e).await }
                });
        let confirmed = self.inner.module.subscribe(handler).await?;
        Ok(Started {
            module: MODULE,
            subscriptions: vec![confirmed],
            relay: Some(self.inner.db.relay(self.inner.bus.clone())),
        })
    }

    /// Tracking numbers, by order.
    pub async fn shipments(&self) -> Result<HashMap<Uuid, String>, BoxError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT order_id, tracking_number FROM shipments")
                .fetch_all(self.inner.db.pool())
                .await?;
        rows.into_iter()
            .map(|(id, tracking)| Ok((id.parse()?, tracking)))
            .collect()
    }

    /// Ships the order (once: a second confirmation of one order finds its
    /// shipment) and writes `OrderShipped` to the outbox, in one
    /// transaction.
    async fn on_confirmed(
        &self,
        mut tx: Transaction<'static, Any>,
        e: &OrderConfirmed,
    ) -> InboxResult<Any> {
        let items: u64 = e.lines.iter().map(|l| u64::from(l.quantity)).sum();
        let fresh = format!("TS-{}", Uuid::now_v7().simple());
        sqlx::query(
            "INSERT INTO shipments (order_id, tracking_number, items) VALUES ($1, $2, $3) \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(e.order_id.to_string())
        .bind(&fresh)
        .bind(signed(items))
        .execute(&mut *tx)
        .await
        .map_err(HandlerError::retry)?;
        let tracking_number: String =
            sqlx::query_scalar("SELECT tracking_number FROM shipments WHERE order_id = $1")
                .bind(e.order_id.to_string())
                .fetch_one(&mut *tx)
                .await
                .map_err(HandlerError::retry)?;
        let shipped = OrderShipped {
            order_id: e.order_id,
            tracking_number,
        };
        self.inner
            .db
            .publish(&mut tx, &self.inner.module, e.order_id, shipped)
            .await
            .map_err(HandlerError::retry)?;
        Ok(tx)
    }
}
