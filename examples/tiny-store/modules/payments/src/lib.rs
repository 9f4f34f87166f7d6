//! The payments module: captures the amount of every order whose stock is
//! reserved, or declines it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use seambus::{Bus, HandlerError, Module, PublishOptions, Received};
use tiny_store_inventory_contract::StockReserved;
use tiny_store_payments_contract::{PaymentCaptured, PaymentFailed};
use tiny_store_platform::{lock, open_pool, BoxError, Started, Storage};
use uuid::Uuid;

/// The module's name on the bus.
pub const MODULE: &str = "payments";

/// The card limit: larger amounts are declined.
pub const CARD_LIMIT_CENTS: u64 = 50_000;

/// Customers whose cards are always declined start with this.
pub const BLOCKED_PREFIX: &str = "blocked-";

/// The payments module.
#[derive(Clone)]
pub struct Payments {
    inner: Arc<Inner>,
}

struct Inner {
    module: Module,
    store: Store,
}

enum Store {
    Memory(Mutex<HashMap<Uuid, Payment>>),
    Postgres(Pool),
}

/// One order's payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payment {
    /// The amount, in cents, was captured.
    Captured(u64),
    /// Declined, with the reason.
    Declined(String),
}

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS payments (
    order_id uuid PRIMARY KEY,
    customer text NOT NULL,
    amount_cents bigint NOT NULL,
    captured boolean NOT NULL,
    reason text
);";

impl Payments {
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

    /// Subscribes to reserved stock.
    pub async fn start(&self) -> seambus::Result<Started> {
        let this = self.clone();
        let reserved = self
            .inner
            .module
            .subscribe(move |e: Received<StockReserved>, _ctx| {
                let this = this.clone();
                async move { this.on_reserved(&e).await }
            })
            .await?;
        Ok(Started {
            module: MODULE,
            subscriptions: vec![reserved],
        })
    }

    /// Every payment, by order.
    pub async fn payments(&self) -> Result<HashMap<Uuid, Payment>, BoxError> {
        match &self.inner.store {
            Store::Memory(m) => Ok(lock(m).clone()),
            Store::Postgres(pool) => {
                let rows = pool
                    .get()
                    .await?
                    .query(
                        "SELECT order_id, amount_cents, captured, reason FROM payments",
                        &[],
                    )
                    .await?;
                rows.iter()
                    .map(|r| {
                        let amount: i64 = r.try_get(1)?;
                        let payment = if r.try_get(2)? {
                            Payment::Captured(u64::try_from(amount)?)
                        } else {
                            Payment::Declined(
                                r.try_get::<_, Option<String>>(3)?.unwrap_or_default(),
                            )
                        };
                        Ok((r.try_get(0)?, payment))
                    })
                    .collect()
            }
        }
    }

    async fn on_reserved(&self, e: &StockReserved) -> Result<(), HandlerError> {
        let payment = self
            .charge(e.order_id, &e.customer, e.amount_cents)
            .await
            .map_err(HandlerError::retry)?;
        let key = PublishOptions::new().key(e.order_id.to_string());
        // The stored outcome is published again on a redelivery.
        let published = match payment {
            Payment::Captured(amount_cents) => {
                let event = PaymentCaptured {
                    order_id: e.order_id,
                    amount_cents,
                };
                self.inner.module.publish_with(event, key).await
            }
            Payment::Declined(reason) => {
                let event = PaymentFailed {
                    order_id: e.order_id,
                    reason,
                };
                self.inner.module.publish_with(event, key).await
            }
        };
        published.map(|_| ()).map_err(HandlerError::retry)
    }

    /// Decides once per order; a second call returns the first decision.
    async fn charge(
        &self,
        order_id: Uuid,
        customer: &str,
        amount: u64,
    ) -> Result<Payment, BoxError> {
        let decision = if customer.starts_with(BLOCKED_PREFIX) {
            Payment::Declined("card blocked".into())
        } else if amount > CARD_LIMIT_CENTS {
            Payment::Declined("over the card limit".into())
        } else {
            Payment::Captured(amount)
        };
        match &self.inner.store {
            Store::Memory(m) => Ok(lock(m).entry(order_id).or_insert(decision).clone()),
            Store::Postgres(pool) => {
                let (captured, reason) = match &decision {
                    Payment::Captured(_) => (true, None),
                    Payment::Declined(r) => (false, Some(r.as_str())),
                };
                let client = pool.get().await?;
                client
                    .execute(
                        "INSERT INTO payments (order_id, customer, amount_cents, captured, reason) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING",
                        &[&order_id, &customer, &i64::try_from(amount)?, &captured, &reason],
                    )
                    .await?;
                let row = client
                    .query_one(
                        "SELECT amount_cents, captured, reason FROM payments WHERE order_id = $1",
                        &[&order_id],
                    )
                    .await?;
                let amount: i64 = row.try_get(0)?;
                Ok(if row.try_get(1)? {
                    Payment::Captured(u64::try_from(amount)?)
                } else {
                    Payment::Declined(row.try_get::<_, Option<String>>(2)?.unwrap_or_default())
                })
            }
        }
    }
}
