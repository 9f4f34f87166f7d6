//! The payments module: captures the amount of every order whose stock is
//! reserved, or declines it.

use std::collections::HashMap;
use std::sync::Arc;

use seambus::{Bus, HandlerError, Module, Received};
use seambus_sql::InboxResult;
use sqlx::{Any, Transaction};
use tiny_store_inventory_contract::StockReserved;
use tiny_store_payments_contract::{PaymentCaptured, PaymentFailed};
use tiny_store_platform::{signed, unsigned, BoxError, Db, Started, Storage};
use uuid::Uuid;

/// The module's name on the bus (declared in its contract).
pub const MODULE: &str = tiny_store_payments_contract::MODULE.name();

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
    bus: Bus,
    module: Module,
    db: Db,
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
    order_id text PRIMARY KEY,
    customer text NOT NULL,
    amount_cents bigint NOT NULL,
    captured bigint NOT NULL,
    reason text
);";

impl Payments {
    /// Opens the module's database (creating its tables).
    pub async fn open(bus: &Bus, storage: &Storage) -> Result<Self, BoxError> {
        Ok(Self {
            inner: Arc::new(Inner {
                bus: bus.clone(),
                module: bus.module_of(&tiny_store_payments_contract::MODULE),
                db: Db::open(storage, MODULE, MIGRATION).await?,
            }),
        })
    }

    /// Subscribes to reserved stock (through the inbox: a redelivery
    /// charges nothing again) and forwards its outbox.
    pub async fn start(&self) -> seambus::Result<Started> {
        let this = self.clone();
        let handler = self
            .inner
            .db
            .inbox()
            .handler(move |e: Received<StockReserved>, _ctx, tx| {
                let this = this.clone();
                async move { this.on_reserved(tx, &e).await }
            });
        let reserved = self.inner.module.subscribe(handler).await?;
        Ok(Started {
            module: MODULE,
            subscriptions: vec![reserved],
            relay: Some(self.inner.db.relay(self.inner.bus.clone())),
        })
    }

    /// Every payment, by order.
    pub async fn payments(&self) -> Result<HashMap<Uuid, Payment>, BoxError> {
        let rows: Vec<(String, i64, i64, Option<String>)> =
            sqlx::query_as("SELECT order_id, amount_cents, captured, reason FROM payments")
                .fetch_all(self.inner.db.pool())
                .await?;
        rows.into_iter()
            .map(|(id, amount, captured, reason)| {
                let payment = if captured != 0 {
                    Payment::Captured(unsigned(amount)?)
                } else {
                    Payment::Declined(reason.unwrap_or_default())
                };
                Ok((id.parse()?, payment))
            })
            .collect()
    }

    /// Decides once per order, stores the decision and writes its event
    /// to the outbox, in one transaction.
    async fn on_reserved(
        &self,
        mut tx: Transaction<'static, Any>,
        e: &StockReserved,
    ) -> InboxResult<Any> {
        let amount = e.amount_cents;
        let payment = if e.customer.starts_with(BLOCKED_PREFIX) {
            Payment::Declined("card blocked".into())
        } else if amount > CARD_LIMIT_CENTS {
            Payment::Declined("over the card limit".into())
        } else {
            Payment::Captured(amount)
        };
        let (captured, reason) = match &payment {
            Payment::Captured(_) => (1_i64, None),
            Payment::Declined(r) => (0, Some(r.as_str())),
        };
        let first = sqlx::query(
            "INSERT INTO payments (order_id, customer, amount_cents, captured, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(e.order_id.to_string())
        .bind(&e.customer)
        .bind(signed(amount))
        .bind(captured)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(HandlerError::retry)?
        .rows_affected()
            == 1;
        if !first {
            // Decided before, on another event about this order.
            return Ok(tx);
        }
        let (db, module) = (&self.inner.db, &self.inner.module);
        let written = match payment {
            Payment::Captured(amount_cents) => {
                let event = PaymentCaptured {
                    order_id: e.order_id,
                    amount_cents,
                };
                db.publish(&mut tx, module, e.order_id, event).await
            }
            Payment::Declined(reason) => {
                let event = PaymentFailed {
                    order_id: e.order_id,
                    reason,
                };
                db.publish(&mut tx, module, e.order_id, event).await
            }
        };
        written.map_err(HandlerError::retry)?;
        Ok(tx)
    }
}
