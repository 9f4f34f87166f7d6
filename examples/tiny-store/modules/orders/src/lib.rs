//! The orders module: takes orders, follows them to confirmed and shipped,
//! or cancelled. Talks to the other modules only through events.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use seambus::{Bus, Event, HandlerError, Module, Received};
use seambus_sql::InboxResult;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row, Transaction};
use tiny_store_inventory_contract::StockRejected;
use tiny_store_orders_contract::{
    OrderCancelled, OrderConfirmed, OrderLine, OrderPlaced, OrderPlacedV1,
};
use tiny_store_payments_contract::{PaymentCaptured, PaymentFailed};
use tiny_store_platform::{notifying, signed, unsigned, BoxError, Db, Started, Storage};
use tiny_store_shipments_contract::OrderShipped;
use tokio::sync::watch;
use uuid::Uuid;

/// The module's name on the bus (declared in its contract).
pub const MODULE: &str = tiny_store_orders_contract::MODULE.name();

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Waiting for stock and payment.
    Placed,
    /// Stock reserved and paid; waiting for shipment.
    Confirmed,
    /// On its way. Final.
    Shipped,
    /// Will not ship. Final.
    Cancelled,
}

impl OrderState {
    /// Shipped or cancelled: nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Shipped | Self::Cancelled)
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Confirmed => "confirmed",
            Self::Shipped => "shipped",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Result<Self, BoxError> {
        Ok(match s {
            "placed" => Self::Placed,
            "confirmed" => Self::Confirmed,
            "shipped" => Self::Shipped,
            "cancelled" => Self::Cancelled,
            other => return Err(format!("unknown order state `{other}`").into()),
        })
    }
}

/// An order as the module knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its id.
    pub order_id: Uuid,
    /// Who ordered.
    pub customer: String,
    /// What.
    pub lines: Vec<OrderLine>,
    /// The sum of the lines, in cents.
    pub total_cents: u64,
    /// Where it stands.
    pub state: OrderState,
    /// Why it was cancelled.
    pub reason: Option<String>,
    /// The carrier's number, once shipped.
    pub tracking_number: Option<String>,
}

/// A request that cannot become an order.
#[derive(Debug)]
#[non_exhaustive]
pub enum PlaceError {
    /// The order is malformed (no lines, zero quantity, empty SKU...).
    Invalid(String),
    /// The database failed; nothing was stored and nothing will be
    /// published. Trying again can help.
    Unavailable(BoxError),
}

impl std::fmt::Display for PlaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(why) => write!(f, "invalid order: {why}"),
            Self::Unavailable(e) => write!(f, "order could not be taken: {e}"),
        }
    }
}

impl std::error::Error for PlaceError {}

fn unavailable(e: impl Into<BoxError>) -> PlaceError {
    PlaceError::Unavailable(e.into())
}

/// The orders module.
#[derive(Clone)]
pub struct Orders {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    module: Module,
    db: Db,
    /// Bumped whenever a handler committed (an order may have settled).
    settled: watch::Sender<u64>,
}

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS orders (
    order_id text PRIMARY KEY,
    customer text NOT NULL,
    lines text NOT NULL,
    total_cents bigint NOT NULL,
    state text NOT NULL,
    reason text,
    tracking_number text
);";

const COLUMNS: &str = "order_id, customer, lines, total_cents, state, reason, tracking_number";

/// What a transition did.
enum Moved {
    /// The order moved to the new state.
    Now(Order),
    /// It was in the new state already.
    Already(Order),
    /// It is in a state the transition does not start from.
    Refused(Order),
    /// No such order.
    Missing,
}

impl Orders {
    /// Opens the module's database (creating its tables).
    pub async fn open(bus: &Bus, storage: &Storage) -> Result<Self, BoxError> {
        Ok(Self {
            inner: Arc::new(Inner {
                bus: bus.clone(),
                module: bus.module_of(&tiny_store_orders_contract::MODULE),
                db: Db::open(storage, MODULE, MIGRATION).await?,
                settled: watch::Sender::new(0),
            }),
        })
    }

    /// Subscribes to what the module reacts to, and starts forwarding its
    /// outbox. Each handler changes the order and writes the event that
    /// follows in one transaction with the inbox record of the event it
    /// handles: a redelivery changes nothing.
    pub async fn start(&self) -> seambus::Result<Started> {
        let m = &self.inner.module;
        let subscriptions = vec![
            m.subscribe(self.on(|this, e: Received<StockRejected>, tx| async move {
                let reason = format!("out of stock: {}", e.reason);
                this.cancel(tx, e.order_id, reason).await
            }))
            .await?,
            m.subscribe(self.on(|this, e: Received<PaymentFailed>, tx| async move {
                let reason = format!("payment failed: {}", e.reason);
                this.cancel(tx, e.order_id, reason).await
            }))
            .await?,
            m.subscribe(
                self.on(|this, e: Received<PaymentCaptured>, tx| async move {
                    this.confirm(tx, e.order_id).await
                }),
            )
            .await?,
            m.subscribe(self.on(|this, e: Received<OrderShipped>, tx| async move {
                this.shipped(tx, e.order_id, &e.tracking_number).await
            }))
            .await?,
        ];
        Ok(Started {
            module: MODULE,
            subscriptions,
            relay: Some(self.inner.db.relay(self.inner.bus.clone())),
        })
    }

    /// Places an order: stores it and writes `OrderPlaced` (v2) to the
    /// outbox in one transaction, and returns it as stored. The event is
    /// published once the transaction commits, even if this process dies
    /// right after: there is no order without its event, nor an event
    /// without its order.
    pub async fn place(&self, customer: &str, lines: Vec<OrderLine>) -> Result<Order, PlaceError> {
        check(customer, &lines)?;
        self.store_new(customer, lines, |order| OrderPlaced {
            order_id: order.order_id,
            customer: order.customer.clone(),
            lines: order.lines.clone(),
        })
        .await
    }

    /// The old checkout: one SKU, no customer, and it still publishes
    /// `OrderPlaced` version 1. Subscribers get it upcast to version 2.
    pub async fn place_legacy(
        &self,
        sku: &str,
        quantity: u32,
        unit_price_cents: u64,
    ) -> Result<Order, PlaceError> {
        let line = OrderLine {
            sku: sku.to_owned(),
            quantity,
            unit_price_cents,
        };
        let customer = tiny_store_orders_contract::LEGACY_CUSTOMER;
        check(customer, std::slice::from_ref(&line))?;
        self.store_new(customer, vec![line], |order| OrderPlacedV1 {
            order_id: order.order_id,
            sku: sku.to_owned(),
            quantity,
            unit_price_cents,
        })
        .await
    }

    /// One order.
    pub async fn get(&self, order_id: Uuid) -> Result<Option<Order>, BoxError> {
        let mut conn = self.inner.db.pool().acquire().await?;
        load(&mut conn, order_id).await
    }

    /// Every order.
    pub async fn all(&self) -> Result<Vec<Order>, BoxError> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM orders"))
            .fetch_all(self.inner.db.pool())
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Waits until every order in `ids` is shipped or cancelled, or until
    /// `timeout`; returns those orders as they are then. `on_progress` gets
    /// the number settled each time it changes.
    pub async fn wait_settled(
        &self,
        ids: &[Uuid],
        timeout: Duration,
        mut on_progress: impl FnMut(usize),
    ) -> Result<Vec<Order>, BoxError> {
        let wanted: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
        let mut changes = self.inner.settled.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = usize::MAX;
        loop {
            changes.mark_unchanged();
            let states: Vec<(String, String)> =
                sqlx::query_as("SELECT order_id, state FROM orders")
                    .fetch_all(self.inner.db.pool())
                    .await?;
            let settled = states
                .iter()
                .filter(|(id, state)| {
                    wanted.contains(id) && OrderState::parse(state).is_ok_and(OrderState::is_final)
                })
                .count();
            if settled != last {
                on_progress(settled);
                last = settled;
            }
            let timed_out = settled < ids.len()
                && tokio::time::timeout_at(deadline, changes.changed())
                    .await
                    .is_err();
            if settled == ids.len() || timed_out {
                let mut orders = Vec::with_capacity(ids.len());
                for id in ids {
                    orders.extend(self.get(*id).await?);
                }
                return Ok(orders);
            }
            // Many handlers commit at once: read again once they did.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A handler of `E` run through the inbox, that bumps `settled` once
    /// its transaction committed.
    fn on<E, F, Fut>(
        &self,
        f: F,
    ) -> impl Fn(
        Received<E>,
        seambus::Context,
    ) -> futures_util::future::BoxFuture<'static, Result<(), HandlerError>>
           + Send
           + Sync
           + 'static
    where
        E: Event,
        F: Fn(Self, Received<E>, Transaction<'static, Any>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = InboxResult<Any>> + Send + 'static,
    {
        let this = self.clone();
        let handler = self
            .inner
            .db
            .inbox()
            .handler(move |e, _ctx, tx| f(this.clone(), e, tx));
        notifying(handler, self.inner.settled.clone())
    }

    /// Writes `event` about `order_id` to the outbox in `tx`.
    async fn publish<E: Event>(
        &self,
        tx: &mut AnyConnection,
        order_id: Uuid,
        event: E,
    ) -> Result<(), HandlerError> {
        self.inner
            .db
            .publish(tx, &self.inner.module, order_id, event)
            .await
            .map_err(HandlerError::retry)
    }

    async fn store_new<E: Event>(
        &self,
        customer: &str,
        lines: Vec<OrderLine>,
        event: impl FnOnce(&Order) -> E,
    ) -> Result<Order, PlaceError> {
        let order = Order {
            order_id: Uuid::now_v7(),
            customer: customer.to_owned(),
            total_cents: lines.iter().map(OrderLine::total_cents).sum(),
            lines,
            state: OrderState::Placed,
            reason: None,
            tracking_number: None,
        };
        let lines = serde_json::to_string(&order.lines).map_err(unavailable)?;
        let mut tx = self.inner.db.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO orders (order_id, customer, lines, total_cents, state) \
             VALUES ($1, $2, $3, $4, 'placed')",
        )
        .bind(order.order_id.to_string())
        .bind(&order.customer)
        .bind(lines)
        .bind(signed(order.total_cents))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        self.inner
            .db
            .publish(&mut tx, &self.inner.module, order.order_id, event(&order))
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(order)
    }

    async fn cancel(
        &self,
        mut tx: Transaction<'static, Any>,
        order_id: Uuid,
        reason: String,
    ) -> InboxResult<Any> {
        let moved = transition(
            &mut tx,
            order_id,
            OrderState::Placed,
            OrderState::Cancelled,
            Some(&reason),
            None,
        )
        .await?;
        match moved {
            Moved::Now(_) => {
                self.publish(&mut tx, order_id, OrderCancelled { order_id, reason })
                    .await?;
            }
            Moved::Already(_) => {}
            Moved::Refused(o) => tracing::warn!(%order_id, state = ?o.state, "cancel ignored"),
            Moved::Missing => return Err(HandlerError::reject(format!("no order {order_id}"))),
        }
        Ok(tx)
    }

    async fn confirm(&self, mut tx: Transaction<'static, Any>, order_id: Uuid) -> InboxResult<Any> {
        let moved = transition(
            &mut tx,
            order_id,
            OrderState::Placed,
            OrderState::Confirmed,
            None,
            None,
        )
        .await?;
        match moved {
            Moved::Now(o) => {
                let event = OrderConfirmed {
                    order_id,
                    customer: o.customer,
                    lines: o.lines,
                };
                self.publish(&mut tx, order_id, event).await?;
            }
            Moved::Already(_) => {}
            Moved::Refused(o) => {
                tracing::warn!(%order_id, state = ?o.state, "confirmation ignored");
            }
            Moved::Missing => return Err(HandlerError::reject(format!("no order {order_id}"))),
        }
        Ok(tx)
    }

    async fn shipped(
        &self,
        mut tx: Transaction<'static, Any>,
        order_id: Uuid,
        tracking: &str,
    ) -> InboxResult<Any> {
        let moved = transition(
            &mut tx,
            order_id,
            OrderState::Confirmed,
            OrderState::Shipped,
            None,
            Some(tracking),
        )
        .await?;
        match moved {
            Moved::Now(_) => {}
            // The same shipment announced again.
            Moved::Already(o) if o.tracking_number.as_deref() == Some(tracking) => {}
            // A second shipment of one order: a fault upstream, kept as a
            // dead letter for someone to look at.
            Moved::Already(_) => {
                return Err(HandlerError::reject(format!(
                    "order {order_id} is shipped already, under another tracking number"
                )))
            }
            Moved::Refused(o) => {
                tracing::warn!(%order_id, state = ?o.state, "shipment of an unconfirmed order");
            }
            Moved::Missing => return Err(HandlerError::reject(format!("no order {order_id}"))),
        }
        Ok(tx)
    }
}

/// Moves order `order_id` from `from` to `to` in `conn`'s transaction.
async fn transition(
    conn: &mut AnyConnection,
    order_id: Uuid,
    from: OrderState,
    to: OrderState,
    reason: Option<&str>,
    tracking: Option<&str>,
) -> Result<Moved, HandlerError> {
    let updated = sqlx::query(&format!(
        "UPDATE orders SET state = $3, reason = coalesce($4, reason), \
         tracking_number = coalesce($5, tracking_number) \
         WHERE order_id = $1 AND state = $2 RETURNING {COLUMNS}"
    ))
    .bind(order_id.to_string())
    .bind(from.as_str())
    .bind(to.as_str())
    .bind(reason)
    .bind(tracking)
    .fetch_optional(&mut *conn)
    .await
    .map_err(HandlerError::retry)?;
    Ok(match updated {
        Some(row) => Moved::Now(from_row(&row).map_err(HandlerError::reject)?),
        None => match load(conn, order_id).await.map_err(HandlerError::retry)? {
            None => Moved::Missing,
            Some(o) if o.state == to => Moved::Already(o),
            Some(o) => Moved::Refused(o),
        },
    })
}

async fn load(conn: &mut AnyConnection, order_id: Uuid) -> Result<Option<Order>, BoxError> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM orders WHERE order_id = $1"))
        .bind(order_id.to_string())
        .fetch_optional(conn)
        .await?
        .map(|r| from_row(&r))
        .transpose()
}

fn check(customer: &str, lines: &[OrderLine]) -> Result<(), PlaceError> {
    let invalid = |why: &str| Err(PlaceError::Invalid(why.to_owned()));
    if customer.trim().is_empty() {
        return invalid("customer is empty");
    }
    if lines.is_empty() {
        return invalid("an order needs at least one line");
    }
    if lines.len() > 100 {
        return invalid("at most 100 lines");
    }
    for line in lines {
        if line.sku.trim().is_empty() {
            return invalid("a line has an empty sku");
        }
        if line.quantity == 0 || line.quantity > 1000 {
            return invalid("quantity must be 1 to 1000");
        }
        if line.unit_price_cents > 10_000_000 {
            return invalid("unit price over 100000.00");
        }
    }
    Ok(())
}

fn from_row(row: &AnyRow) -> Result<Order, BoxError> {
    let order_id: String = row.try_get("order_id")?;
    let lines: String = row.try_get("lines")?;
    let state: String = row.try_get("state")?;
    Ok(Order {
        order_id: order_id.parse()?,
        customer: row.try_get("customer")?,
        lines: serde_json::from_str(&lines)?,
        total_cents: unsigned(row.try_get("total_cents")?)?,
        state: OrderState::parse(&state)?,
        reason: row.try_get("reason")?,
        tracking_number: row.try_get("tracking_number")?,
    })
}
