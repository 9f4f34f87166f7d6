//! The inventory module: holds stock, reserves it for placed orders (all
//! lines or none), and releases it when an order is cancelled.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use seambus::{Bus, HandlerError, Module, Received};
use seambus_sql::InboxResult;
use serde::{Deserialize, Serialize};
use sqlx::{Any, AnyConnection, Transaction};
use tiny_store_inventory_contract::{StockRejected, StockReserved};
use tiny_store_orders_contract::{OrderCancelled, OrderLine, OrderPlaced};
use tiny_store_platform::{notifying, signed, unsigned, BoxError, Db, Started, Storage};
use tokio::sync::watch;
use uuid::Uuid;

/// The module's name on the bus (declared in its contract).
pub const MODULE: &str = tiny_store_inventory_contract::MODULE.name();

/// Stock of one SKU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    /// Free to reserve.
    pub available: u64,
    /// Held for orders (shipped or about to be).
    pub reserved: u64,
}

/// The inventory module.
#[derive(Clone)]
pub struct Inventory {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    module: Module,
    db: Db,
    /// Bumped whenever a cancellation was handled (stock may be released).
    released: watch::Sender<u64>,
}

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS stock (
    sku text PRIMARY KEY,
    available bigint NOT NULL CHECK (available >= 0),
    reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id text PRIMARY KEY,
    state text NOT NULL,
    reason text,
    lines text NOT NULL
);";

impl Inventory {
    /// Opens the module's database (creating its tables).
    pub async fn open(bus: &Bus, storage: &Storage) -> Result<Self, BoxError> {
        Ok(Self {
            inner: Arc::new(Inner {
                bus: bus.clone(),
                module: bus.module_of(&tiny_store_inventory_contract::MODULE),
                db: Db::open(storage, MODULE, MIGRATION).await?,
                released: watch::Sender::new(0),
            }),
        })
    }

    /// Subscribes to placed and cancelled orders (through the inbox: a
    /// redelivery reserves or releases nothing again) and forwards its
    /// outbox.
    pub async fn start(&self) -> seambus::Result<Started> {
        let (m, inbox) = (&self.inner.module, self.inner.db.inbox());
        let this = self.clone();
        let placed = m
            .subscribe(inbox.handler(move |e: Received<OrderPlaced>, _ctx, tx| {
                let this = this.clone();
                async move { this.on_placed(tx, &e).await }
            }))
            .await?;
        let cancelled = m
            .subscribe(notifying(
                inbox.handler(|e: Received<OrderCancelled>, _ctx, mut tx| async move {
                    release(&mut tx, e.order_id)
                        .await
                        .map_err(HandlerError::retry)?;
                    Ok(tx)
                }),
                self.inner.released.clone(),
            ))
            .await?;
        Ok(Started {
            module: MODULE,
            subscriptions: vec![placed, cancelled],
            relay: Some(self.inner.db.relay(self.inner.bus.clone())),
        })
    }

    /// Sets the free stock of `sku` (a delivery from the supplier).
    pub async fn restock(&self, sku: &str, available: u64) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO stock (sku, available) VALUES ($1, $2) \
             ON CONFLICT (sku) DO UPDATE SET available = EXCLUDED.available",
        )
        .bind(sku)
        .bind(signed(available))
        .execute(self.inner.db.pool())
        .await?;
        Ok(())
    }

    /// Puts `available` free units of `sku` in stock if the SKU is new;
    /// one already in stock keeps what it has (a restarted shop).
    pub async fn stock_new(&self, sku: &str, available: u64) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO stock (sku, available) VALUES ($1, $2) ON CONFLICT (sku) DO NOTHING",
        )
        .bind(sku)
        .bind(signed(available))
        .execute(self.inner.db.pool())
        .await?;
        Ok(())
    }

    /// Stock of every SKU.
    pub async fn levels(&self) -> Result<BTreeMap<String, Level>, BoxError> {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT sku, available, reserved FROM stock")
                .fetch_all(self.inner.db.pool())
                .await?;
        rows.into_iter()
            .map(|(sku, available, reserved)| {
                let level = Level {
                    available: unsigned(available)?,
                    reserved: unsigned(reserved)?,
                };
                Ok((sku, level))
            })
            .collect()
    }

    /// Reserves every line or none, stores the decision and writes its
    /// event to the outbox, in one transaction.
    async fn on_placed(
        &self,
        mut tx: Transaction<'static, Any>,
        order: &OrderPlaced,
    ) -> InboxResult<Any> {
        let decided = reserve(&mut tx, order.order_id, &order.lines)
            .await
            .map_err(HandlerError::retry)?;
        let Some(decision) = decided else {
            // Decided before, on another event about this order.
            return Ok(tx);
        };
        let (db, module, id) = (&self.inner.db, &self.inner.module, order.order_id);
        let written = match decision {
            Reservation::Held => {
                let event = StockReserved {
                    order_id: id,
                    customer: order.customer.clone(),
                    amount_cents: order.total_cents(),
                };
                db.publish(&mut tx, module, id, event).await
            }
            Reservation::Rejected(reason) => {
                let event = StockRejected {
                    order_id: id,
                    reason,
                };
                db.publish(&mut tx, module, id, event).await
            }
        };
        written.map_err(HandlerError::retry)?;
        Ok(tx)
    }

    /// How many of `orders` still hold stock.
    pub async fn holding(&self, orders: &[Uuid]) -> Result<usize, BoxError> {
        let held: Vec<String> =
            sqlx::query_scalar("SELECT order_id FROM reservations WHERE state = 'held'")
                .fetch_all(self.inner.db.pool())
                .await?;
        let held: HashSet<String> = held.into_iter().collect();
        Ok(orders
            .iter()
            .filter(|id| held.contains(&id.to_string()))
            .count())
    }

    /// Waits until none of `orders` holds stock (they were cancelled and
    /// the release is on its way), or until `timeout`; returns how many
    /// still do.
    pub async fn wait_released(
        &self,
        orders: &[Uuid],
        timeout: std::time::Duration,
    ) -> Result<usize, BoxError> {
        let mut changes = self.inner.released.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changes.mark_unchanged();
            let holding = self.holding(orders).await?;
            if holding == 0 {
                return Ok(0);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(holding);
            }
        }
    }
}

/// What inventory decided for one order.
enum Reservation {
    Held,
    Rejected(String),
}

/// Reserves every line of the order or none, and records the decision;
/// `None` when the order was decided before.
async fn reserve(
    conn: &mut AnyConnection,
    order_id: Uuid,
    lines: &[OrderLine],
) -> Result<Option<Reservation>, BoxError> {
    let id = order_id.to_string();
    let known: Option<String> =
        sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
            .bind(&id)
            .fetch_optional(&mut *conn)
            .await?;
    if known.is_some() {
        return Ok(None);
    }
    // Lines of the same SKU add up; sorted, so concurrent reservations
    // lock rows in one order.
    let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
    for l in lines {
        *wanted.entry(l.sku.as_str()).or_default() += u64::from(l.quantity);
    }
    let mut taken = Vec::new();
    let mut short = None;
    for (sku, qty) in &wanted {
        let n = sqlx::query(
            "UPDATE stock SET available = available - $2, reserved = reserved + $2 \
             WHERE sku = $1 AND available >= $2",
        )
        .bind(*sku)
        .bind(signed(*qty))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if n == 0 {
            short = Some(*sku);
            break;
        }
        taken.push((*sku, *qty));
    }
    let decision = match short {
        None => Reservation::Held,
        Some(sku) => {
            // Give back the lines taken so far, in this transaction.
            for (sku, qty) in taken {
                give_back(conn, sku, qty).await?;
            }
            Reservation::Rejected(format!("not enough {sku}"))
        }
    };
    let (state, reason) = match &decision {
        Reservation::Held => ("held", None),
        Reservation::Rejected(r) => ("rejected", Some(r.as_str())),
    };
    sqlx::query(
        "INSERT INTO reservations (order_id, state, reason, lines) VALUES ($1, $2, $3, $4)",
    )
    .bind(&id)
    .bind(state)
    .bind(reason)
    .bind(serde_json::to_string(lines)?)
    .execute(&mut *conn)
    .await?;
    Ok(Some(decision))
}

/// Gives back what was held for `order_id`, once.
async fn release(conn: &mut AnyConnection, order_id: Uuid) -> Result<(), BoxError> {
    let lines: Option<String> = sqlx::query_scalar(
        "UPDATE reservations SET state = 'released' \
         WHERE order_id = $1 AND state = 'held' RETURNING lines",
    )
    .bind(order_id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(lines) = lines {
        let mut lines: Vec<OrderLine> = serde_json::from_str(&lines)?;
        // The order `reserve` locks rows in, so the two never deadlock.
        lines.sort_by(|a, b| a.sku.cmp(&b.sku));
        for l in &lines {
            give_back(conn, &l.sku, u64::from(l.quantity)).await?;
        }
    }
    Ok(())
}

/// Moves `qty` units of `sku` from reserved back to available.
async fn give_back(conn: &mut AnyConnection, sku: &str, qty: u64) -> Result<(), BoxError> {
    sqlx::query(
        "UPDATE stock SET available = available + $2, reserved = reserved - $2 WHERE sku = $1",
    )
    .bind(sku)
    .bind(signed(qty))
    .execute(conn)
    .await?;
    Ok(())
}
