//! The shipments module: ships every confirmed order, once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use seambus::{Bus, HandlerError, Module, PublishOptions, Received};
use tiny_store_orders_contract::OrderConfirmed;
use tiny_store_platform::{lock, open_pool, BoxError, Started, Storage};
use tiny_store_shipments_contract::OrderShipped;
use uuid::Uuid;

/// The module's name on the bus.
pub const MODULE: &str = "shipments";

/// The shipments module.
#[derive(Clone)]
pub struct Shipments {
    inner: Arc<Inner>,
}

struct Inner {
    module: Module,
    store: Store,
}

enum Store {
    Memory(Mutex<HashMap<Uuid, String>>),
    Postgres(Pool),
}

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS shipments (
    order_id uuid PRIMARY KEY,
    tracking_number text NOT NULL,
    items bigint NOT NULL,
    shipped_at timestamptz NOT NULL DEFAULT now()
);";

impl Shipments {
    /// Opens the module's storage (creating its schema on PostgreSQL).
    pub async fn open(bus: &Bus, storage: &Storage) -> Result<Self, BoxError> {
        let store = match open_pool(storage, MODULE, MIGRATION).await? {
            None => Store::Memory(Mutex::default()),
            Some(pool) => Store::Postgres(pool),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                module: bus.module(MODULE),
                store,
            }),
        })
    }

    /// Subscribes to confirmed orders.
    pub async fn start(&self) -> seambus::Result<Started> {
        let this = self.clone();
        let confirmed = self
            .inner
            .module
            .subscribe(move |e: Received<OrderConfirmed>, _ctx| {
                let this = this.clone();
                async move { this.on_confirmed(&e).await }
            })
            .await?;
        Ok(Started {
            module: MODULE,
            subscriptions: vec![confirmed],
        })
    }

    /// Tracking numbers, by order.
    pub async fn shipments(&self) -> Result<HashMap<Uuid, String>, BoxError> {
        match &self.inner.store {
            Store::Memory(m) => Ok(lock(m).clone()),
            Store::Postgres(pool) => pool
                .get()
                .await?
                .query("SELECT order_id, tracking_number FROM shipments", &[])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect(),
        }
    }

    async fn on_confirmed(&self, e: &OrderConfirmed) -> Result<(), HandlerError> {
        let items: u64 = e.lines.iter().map(|l| u64::from(l.quantity)).sum();
        let tracking_number = self
            .ship(e.order_id, items)
            .await
            .map_err(HandlerError::retry)?;
        // Published again on a redelivery, with the same number.
        self.inner
            .module
            .publish_with(
                OrderShipped {
                    order_id: e.order_id,
                    tracking_number,
                },
                PublishOptions::new().key(e.order_id.to_string()),
            )
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }

    /// One shipment per order; a second call returns the first number.
    async fn ship(&self, order_id: Uuid, items: u64) -> Result<String, BoxError> {
        let fresh = format!("TS-{}", Uuid::now_v7().simple());
        match &self.inner.store {
            Store::Memory(m) => Ok(lock(m).entry(order_id).or_insert(fresh).clone()),
            Store::Postgres(pool) => {
                let client = pool.get().await?;
                client
                    .execute(
                        "INSERT INTO shipments (order_id, tracking_number, items) VALUES ($1, $2, $3) \
                         ON CONFLICT (order_id) DO NOTHING",
                        &[&order_id, &fresh, &i64::try_from(items)?],
                    )
                    .await?;
                let row = client
                    .query_one(
                        "SELECT tracking_number FROM shipments WHERE order_id = $1",
                        &[&order_id],
                    )
                    .await?;
                Ok(row.try_get(0)?)
            }
        }
    }
}
