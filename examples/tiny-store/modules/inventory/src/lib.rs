//! The inventory module: holds stock, reserves it for placed orders (all
//! lines or none), and releases it when an order is cancelled.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use seambus::{Bus, HandlerError, Module, PublishOptions, Received};
use serde::{Deserialize, Serialize};
use tiny_store_inventory_contract::{StockRejected, StockReserved};
use tiny_store_orders_contract::{OrderCancelled, OrderLine, OrderPlaced};
use tiny_store_platform::{lock, open_pool, BoxError, Started, Storage};
use tokio::sync::watch;
use uuid::Uuid;

/// The module's name on the bus.
pub const MODULE: &str = "inventory";

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
    module: Module,
    store: Store,
    /// Bumped whenever a reservation is released.
    released: watch::Sender<u64>,
}

enum Store {
    Memory(Mutex<Memory>),
    Postgres(Pool),
}

#[derive(Default)]
struct Memory {
    levels: BTreeMap<String, Level>,
    reservations: HashMap<Uuid, Reservation>,
}

/// What inventory decided for one order; kept so a redelivered event gets
/// the same answer.
#[derive(Clone)]
enum Reservation {
    Held(Vec<OrderLine>),
    Released,
    Rejected(String),
}

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS stock (
    sku text PRIMARY KEY,
    available bigint NOT NULL CHECK (available >= 0),
    reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id uuid PRIMARY KEY,
    state text NOT NULL,
    reason text,
    lines text NOT NULL
);";

impl Inventory {
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
                released: watch::Sender::new(0),
            }),
        })
    }

    /// Subscribes to placed and cancelled orders.
    pub async fn start(&self) -> seambus::Result<Started> {
        let m = &self.inner.module;
        let this = self.clone();
        let placed = m
            .subscribe(move |e: Received<OrderPlaced>, _ctx| {
                let this = this.clone();
                async move { this.on_placed(&e).await }
            })
            .await?;
        let this = self.clone();
        let cancelled = m
            .subscribe(move |e: Received<OrderCancelled>, _ctx| {
                let this = this.clone();
                async move { this.release(e.order_id).await.map_err(HandlerError::retry) }
            })
            .await?;
        Ok(Started {
            module: MODULE,
            subscriptions: vec![placed, cancelled],
        })
    }

    /// Sets the free stock of `sku` (a delivery from the supplier).
    pub async fn restock(&self, sku: &str, available: u64) -> Result<(), BoxError> {
        match &self.inner.store {
            Store::Memory(m) => {
                lock(m).levels.entry(sku.to_owned()).or_default().available = available;
            }
            Store::Postgres(pool) => {
                pool.get()
                    .await?
                    .execute(
                        "INSERT INTO stock (sku, available) VALUES ($1, $2) \
                         ON CONFLICT (sku) DO UPDATE SET available = EXCLUDED.available",
                        &[&sku, &i64::try_from(available)?],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Stock of every SKU.
    pub async fn levels(&self) -> Result<BTreeMap<String, Level>, BoxError> {
        match &self.inner.store {
            Store::Memory(m) => Ok(lock(m).levels.clone()),
            Store::Postgres(pool) => {
                let rows = pool
                    .get()
                    .await?
                    .query("SELECT sku, available, reserved FROM stock", &[])
                    .await?;
                rows.iter()
                    .map(|r| {
                        let available: i64 = r.try_get(1)?;
                        let reserved: i64 = r.try_get(2)?;
                        Ok((
                            r.try_get(0)?,
                            Level {
                                available: u64::try_from(available)?,
                                reserved: u64::try_from(reserved)?,
                            },
                        ))
                    })
                    .collect()
            }
        }
    }

    async fn on_placed(&self, order: &OrderPlaced) -> Result<(), HandlerError> {
        let decision = self
            .reserve(order.order_id, &order.lines)
            .await
            .map_err(HandlerError::retry)?;
        let key = PublishOptions::new().key(order.order_id.to_string());
        // On a redelivery the stored decision is published again: the
        // first publish may not have happened, and subscribers are
        // idempotent.
        let published = match decision {
            Reservation::Held(_) | Reservation::Released => {
                let event = StockReserved {
                    order_id: order.order_id,
                    customer: order.customer.clone(),
                    amount_cents: order.total_cents(),
                };
                self.inner.module.publish_with(event, key).await
            }
            Reservation::Rejected(reason) => {
                let event = StockRejected {
                    order_id: order.order_id,
                    reason,
                };
                self.inner.module.publish_with(event, key).await
            }
        };
        published.map(|_| ()).map_err(HandlerError::retry)
    }

    /// Reserves every line or none; the decision is stored with the order.
    async fn reserve(&self, order_id: Uuid, lines: &[OrderLine]) -> Result<Reservation, BoxError> {
        // Lines of the same SKU add up; sorted, so concurrent reservations
        // lock rows in one order.
        let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
        for l in lines {
            *wanted.entry(l.sku.as_str()).or_default() += u64::from(l.quantity);
        }
        match &self.inner.store {
            Store::Memory(m) => {
                let mut m = lock(m);
                if let Some(done) = m.reservations.get(&order_id) {
                    return Ok(done.clone());
                }
                let short = wanted
                    .iter()
                    .find(|(sku, qty)| m.levels.get(**sku).map_or(0, |l| l.available) < **qty);
                let decision = match short {
                    Some((sku, _)) => Reservation::Rejected(format!("not enough {sku}")),
                    None => {
                        for (sku, qty) in &wanted {
                            let level = m.levels.entry((*sku).to_owned()).or_default();
                            level.available -= qty;
                            level.reserved += qty;
                        }
                        Reservation::Held(lines.to_vec())
                    }
                };
                m.reservations.insert(order_id, decision.clone());
                Ok(decision)
            }
            Store::Postgres(pool) => {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                if let Some(done) = stored(&tx, order_id).await? {
                    return Ok(done);
                }
                let mut short = None;
                for (sku, qty) in &wanted {
                    let n = tx
                        .execute(
                            "UPDATE stock SET available = available - $2, reserved = reserved + $2 \
                             WHERE sku = $1 AND available >= $2",
                            &[sku, &i64::try_from(*qty)?],
                        )
                        .await?;
                    if n == 0 {
                        short = Some(*sku);
                        break;
                    }
                }
                let (decision, state, reason) = match short {
                    Some(sku) => {
                        // Undo the lines taken so far.
                        tx.rollback().await?;
                        let reason = format!("not enough {sku}");
                        let tx = client.transaction().await?;
                        let kept = record(&tx, order_id, "rejected", Some(&reason), lines).await?;
                        tx.commit().await?;
                        return Ok(kept.unwrap_or(Reservation::Rejected(reason)));
                    }
                    None => (Reservation::Held(lines.to_vec()), "held", None),
                };
                match record(&tx, order_id, state, reason, lines).await? {
                    // Another worker decided first (a redelivery raced).
                    Some(earlier) => {
                        tx.rollback().await?;
                        Ok(earlier)
                    }
                    None => {
                        tx.commit().await?;
                        Ok(decision)
                    }
                }
            }
        }
    }

    /// Gives back what was held for `order_id`, once.
    async fn release(&self, order_id: Uuid) -> Result<(), BoxError> {
        match &self.inner.store {
            Store::Memory(m) => {
                let mut m = lock(m);
                let Some(Reservation::Held(lines)) = m.reservations.get(&order_id).cloned() else {
                    return Ok(());
                };
                for l in &lines {
                    let level = m.levels.entry(l.sku.clone()).or_default();
                    level.available += u64::from(l.quantity);
                    level.reserved -= u64::from(l.quantity);
                }
                m.reservations.insert(order_id, Reservation::Released);
                drop(m);
                self.inner.released.send_modify(|n| *n += 1);
                Ok(())
            }
            Store::Postgres(pool) => {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                let row = tx
                    .query_opt(
                        "UPDATE reservations SET state = 'released' \
                         WHERE order_id = $1 AND state = 'held' RETURNING lines",
                        &[&order_id],
                    )
                    .await?;
                if let Some(row) = row {
                    let mut lines: Vec<OrderLine> = serde_json::from_str(row.try_get(0)?)?;
                    // The order `reserve` locks rows in, so the two never
                    // deadlock.
                    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
                    for l in &lines {
                        tx.execute(
                            "UPDATE stock SET available = available + $2, reserved = reserved - $2 \
                             WHERE sku = $1",
                            &[&l.sku, &i64::from(l.quantity)],
                        )
                        .await?;
                    }
                }
                tx.commit().await?;
                self.inner.released.send_modify(|n| *n += 1);
                Ok(())
            }
        }
    }

    /// How many of `orders` still hold stock.
    pub async fn holding(&self, orders: &[Uuid]) -> Result<usize, BoxError> {
        match &self.inner.store {
            Store::Memory(m) => {
                let m = lock(m);
                Ok(orders
                    .iter()
                    .filter(|id| matches!(m.reservations.get(id), Some(Reservation::Held(_))))
                    .count())
            }
            Store::Postgres(pool) => {
                let row = pool
                    .get()
                    .await?
                    .query_one(
                        "SELECT count(*) FROM reservations WHERE state = 'held' AND order_id = ANY($1)",
                        &[&orders],
                    )
                    .await?;
                Ok(usize::try_from(row.try_get::<_, i64>(0)?)?)
            }
        }
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

async fn stored(
    tx: &deadpool_postgres::Transaction<'_>,
    order_id: Uuid,
) -> Result<Option<Reservation>, BoxError> {
    let row = tx
        .query_opt(
            "SELECT state, reason, lines FROM reservations WHERE order_id = $1",
            &[&order_id],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let state: &str = row.try_get(0)?;
    Ok(Some(match state {
        "held" => Reservation::Held(serde_json::from_str(row.try_get(2)?)?),
        "released" => Reservation::Released,
        _ => Reservation::Rejected(row.try_get::<_, Option<String>>(1)?.unwrap_or_default()),
    }))
}

/// Stores the decision; returns the earlier one if there is one already.
async fn record(
    tx: &deadpool_postgres::Transaction<'_>,
    order_id: Uuid,
    state: &str,
    reason: Option<&str>,
    lines: &[OrderLine],
) -> Result<Option<Reservation>, BoxError> {
    let n = tx
        .execute(
            "INSERT INTO reservations (order_id, state, reason, lines) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (order_id) DO NOTHING",
            &[&order_id, &state, &reason, &serde_json::to_string(lines)?],
        )
        .await?;
    if n == 1 {
        Ok(None)
    } else {
        stored(tx, order_id).await
    }
}
