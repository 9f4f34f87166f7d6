//! The orders module: takes orders, follows them to confirmed and shipped,
//! or cancelled. Talks to the other modules only through events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use seambus::{Bus, Context, HandlerError, Module, PublishOptions, Received};
use serde::{Deserialize, Serialize};
use tiny_store_inventory_contract::StockRejected;
use tiny_store_orders_contract::{
    OrderCancelled, OrderConfirmed, OrderLine, OrderPlaced, OrderPlacedV1,
};
use tiny_store_payments_contract::{PaymentCaptured, PaymentFailed};
use tiny_store_platform::{lock, open_pool, BoxError, Started, Storage};
use tiny_store_shipments_contract::OrderShipped;
use tokio::sync::watch;
use uuid::Uuid;

/// The module's name on the bus.
pub const MODULE: &str = "orders";

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
    /// Storing or publishing failed; trying again can help.
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

/// The orders module.
#[derive(Clone)]
pub struct Orders {
    inner: Arc<Inner>,
}

struct Inner {
    module: Module,
    store: Store,
    /// Bumped whenever an order reaches a final state.
    settled: watch::Sender<u64>,
}

enum Store {
    Memory(Mutex<HashMap<Uuid, Order>>),
    Postgres(Pool),
}

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS orders (
    order_id uuid PRIMARY KEY,
    customer text NOT NULL,
    lines text NOT NULL,
    total_cents bigint NOT NULL,
    state text NOT NULL,
    reason text,
    tracking_number text,
    placed_at timestamptz NOT NULL DEFAULT now()
);";

/// What a transition did.
enum Moved {
    /// The order moved to the new state.
    Now(Order),
    /// It was in the new state already (a redelivery).
    Already(Order),
    /// It is in a state the transition does not start from.
    Refused(Order),
    /// No such order.
    Missing,
}

impl Orders {
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
                settled: watch::Sender::new(0),
            }),
        })
    }

    /// Subscribes to what the module reacts to.
    pub async fn start(&self) -> seambus::Result<Started> {
        let m = &self.inner.module;
        let subscriptions = vec![
            m.subscribe(self.on(|this, e: Received<StockRejected>| async move {
                let reason = format!("out of stock: {}", e.reason);
                this.cancel(e.order_id, reason).await
            }))
            .await?,
            m.subscribe(self.on(|this, e: Received<PaymentFailed>| async move {
                let reason = format!("payment failed: {}", e.reason);
                this.cancel(e.order_id, reason).await
            }))
            .await?,
            m.subscribe(self.on(|this, e: Received<PaymentCaptured>| async move {
                this.confirm(e.order_id).await
            }))
            .await?,
            m.subscribe(self.on(|this, e: Received<OrderShipped>| async move {
                this.shipped(e.order_id, &e.tracking_number).await
            }))
            .await?,
        ];
        Ok(Started {
            module: MODULE,
            subscriptions,
        })
    }

    /// Places an order: stores it, then publishes `OrderPlaced` (v2), and
    /// returns it as stored.
    ///
    /// There is no outbox: when the publish fails (the error says so), the
    /// order stays `placed` and nothing else happens to it. A production
    /// shop would store the event with the order in one transaction and
    /// publish from that table.
    pub async fn place(&self, customer: &str, lines: Vec<OrderLine>) -> Result<Order, PlaceError> {
        check(customer, &lines)?;
        let order = self.store_new(customer, lines).await?;
        let event = OrderPlaced {
            order_id: order.order_id,
            customer: order.customer.clone(),
            lines: order.lines.clone(),
        };
        self.publish(order.order_id, event)
            .await
            .map_err(|e| PlaceError::Unavailable(e.into()))?;
        Ok(order)
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
        check(
            tiny_store_orders_contract::LEGACY_CUSTOMER,
            std::slice::from_ref(&line),
        )?;
        let order = self
            .store_new(tiny_store_orders_contract::LEGACY_CUSTOMER, vec![line])
            .await?;
        let event = OrderPlacedV1 {
            order_id: order.order_id,
            sku: sku.to_owned(),
            quantity,
            unit_price_cents,
        };
        self.publish(order.order_id, event)
            .await
            .map_err(|e| PlaceError::Unavailable(e.into()))?;
        Ok(order)
    }

    /// One order.
    pub async fn get(&self, order_id: Uuid) -> Result<Option<Order>, BoxError> {
        match &self.inner.store {
            Store::Memory(m) => Ok(lock(m).get(&order_id).cloned()),
            Store::Postgres(pool) => {
                let row = pool
                    .get()
                    .await?
                    .query_opt(
                        "SELECT order_id, customer, lines, total_cents, state, reason, tracking_number \
                         FROM orders WHERE order_id = $1",
                        &[&order_id],
                    )
                    .await?;
                row.map(|r| from_row(&r)).transpose()
            }
        }
    }

    /// Every order.
    pub async fn all(&self) -> Result<Vec<Order>, BoxError> {
        match &self.inner.store {
            Store::Memory(m) => Ok(lock(m).values().cloned().collect()),
            Store::Postgres(pool) => pool
                .get()
                .await?
                .query(
                    "SELECT order_id, customer, lines, total_cents, state, reason, tracking_number \
                     FROM orders",
                    &[],
                )
                .await?
                .iter()
                .map(from_row)
                .collect(),
        }
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
        let mut changes = self.inner.settled.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = usize::MAX;
        loop {
            changes.mark_unchanged();
            let mut orders = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(o) = self.get(*id).await? {
                    orders.push(o);
                }
            }
            let settled = orders.iter().filter(|o| o.state.is_final()).count();
            if settled != last {
                on_progress(settled);
                last = settled;
            }
            if settled == ids.len() {
                return Ok(orders);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(orders),
            }
        }
    }

    fn on<E, F, Fut>(&self, f: F) -> impl Fn(Received<E>, Context) -> Fut + Send + Sync + 'static
    where
        E: seambus::Event,
        F: Fn(Self, Received<E>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let this = self.clone();
        move |e, _ctx| f(this.clone(), e)
    }

    async fn publish<E: seambus::Event>(&self, order_id: Uuid, event: E) -> seambus::Result<Uuid> {
        self.inner
            .module
            .publish_with(event, PublishOptions::new().key(order_id.to_string()))
            .await
    }

    async fn store_new(&self, customer: &str, lines: Vec<OrderLine>) -> Result<Order, PlaceError> {
        let order = Order {
            order_id: Uuid::now_v7(),
            customer: customer.to_owned(),
            total_cents: lines.iter().map(OrderLine::total_cents).sum(),
            lines,
            state: OrderState::Placed,
            reason: None,
            tracking_number: None,
        };
        match &self.inner.store {
            Store::Memory(m) => {
                lock(m).insert(order.order_id, order.clone());
            }
            Store::Postgres(pool) => {
                let lines = serde_json::to_string(&order.lines)
                    .map_err(|e| PlaceError::Unavailable(e.into()))?;
                let client = pool
                    .get()
                    .await
                    .map_err(|e| PlaceError::Unavailable(e.into()))?;
                client
                    .execute(
                        "INSERT INTO orders (order_id, customer, lines, total_cents, state) \
                         VALUES ($1, $2, $3, $4, 'placed')",
                        &[
                            &order.order_id,
                            &order.customer,
                            &lines,
                            &cents(order.total_cents),
                        ],
                    )
                    .await
                    .map_err(|e| PlaceError::Unavailable(e.into()))?;
            }
        }
        Ok(order)
    }

    async fn cancel(&self, order_id: Uuid, reason: String) -> Result<(), HandlerError> {
        match self
            .transition(
                order_id,
                OrderState::Placed,
                OrderState::Cancelled,
                Some(&reason),
                None,
            )
            .await?
        {
            Moved::Now(_) | Moved::Already(_) => {
                // Published again on a redelivery: the first publish may
                // not have happened. Subscribers are idempotent.
                self.publish(order_id, OrderCancelled { order_id, reason })
                    .await
                    .map_err(HandlerError::retry)?;
                Ok(())
            }
            Moved::Refused(o) => {
                tracing::warn!(%order_id, state = ?o.state, "cancel ignored");
                Ok(())
            }
            Moved::Missing => Err(HandlerError::reject(format!("no order {order_id}"))),
        }
    }

    async fn confirm(&self, order_id: Uuid) -> Result<(), HandlerError> {
        match self
            .transition(
                order_id,
                OrderState::Placed,
                OrderState::Confirmed,
                None,
                None,
            )
            .await?
        {
            Moved::Now(o) | Moved::Already(o) => {
                let event = OrderConfirmed {
                    order_id,
                    customer: o.customer,
                    lines: o.lines,
                };
                self.publish(order_id, event)
                    .await
                    .map_err(HandlerError::retry)?;
                Ok(())
            }
            Moved::Refused(o) => {
                tracing::warn!(%order_id, state = ?o.state, "confirmation ignored");
                Ok(())
            }
            Moved::Missing => Err(HandlerError::reject(format!("no order {order_id}"))),
        }
    }

    async fn shipped(&self, order_id: Uuid, tracking: &str) -> Result<(), HandlerError> {
        match self
            .transition(
                order_id,
                OrderState::Confirmed,
                OrderState::Shipped,
                None,
                Some(tracking),
            )
            .await?
        {
            Moved::Now(_) | Moved::Already(_) => Ok(()),
            Moved::Refused(o) => {
                tracing::warn!(%order_id, state = ?o.state, "shipment of an unconfirmed order");
                Ok(())
            }
            Moved::Missing => Err(HandlerError::reject(format!("no order {order_id}"))),
        }
    }

    async fn transition(
        &self,
        order_id: Uuid,
        from: OrderState,
        to: OrderState,
        reason: Option<&str>,
        tracking: Option<&str>,
    ) -> Result<Moved, HandlerError> {
        let moved = match &self.inner.store {
            Store::Memory(m) => {
                let mut orders = lock(m);
                match orders.get_mut(&order_id) {
                    None => Moved::Missing,
                    Some(o) if o.state == to => Moved::Already(o.clone()),
                    Some(o) if o.state != from => Moved::Refused(o.clone()),
                    Some(o) => {
                        o.state = to;
                        if let Some(r) = reason {
                            o.reason = Some(r.to_owned());
                        }
                        if let Some(t) = tracking {
                            o.tracking_number = Some(t.to_owned());
                        }
                        Moved::Now(o.clone())
                    }
                }
            }
            Store::Postgres(pool) => {
                let client = pool.get().await.map_err(HandlerError::retry)?;
                let updated = client
                    .query_opt(
                        "UPDATE orders SET state = $3, reason = coalesce($4, reason), \
                         tracking_number = coalesce($5, tracking_number) \
                         WHERE order_id = $1 AND state = $2 \
                         RETURNING order_id, customer, lines, total_cents, state, reason, tracking_number",
                        &[&order_id, &from.as_str(), &to.as_str(), &reason, &tracking],
                    )
                    .await
                    .map_err(HandlerError::retry)?;
                // One pooled connection at a time: `get` takes its own.
                drop(client);
                match updated {
                    Some(row) => Moved::Now(from_row(&row).map_err(HandlerError::reject)?),
                    None => match self.get(order_id).await.map_err(HandlerError::retry)? {
                        None => Moved::Missing,
                        Some(o) if o.state == to => Moved::Already(o),
                        Some(o) => Moved::Refused(o),
                    },
                }
            }
        };
        if let Moved::Now(o) = &moved {
            if o.state.is_final() {
                self.inner.settled.send_modify(|n| *n += 1);
            }
        }
        Ok(moved)
    }
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

/// Cents as PostgreSQL `bigint` (amounts are checked far below its limit).
fn cents(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_row(row: &tokio_postgres::Row) -> Result<Order, BoxError> {
    let lines: String = row.try_get("lines")?;
    let total: i64 = row.try_get("total_cents")?;
    let state: String = row.try_get("state")?;
    Ok(Order {
        order_id: row.try_get("order_id")?,
        customer: row.try_get("customer")?,
        lines: serde_json::from_str(&lines)?,
        total_cents: u64::try_from(total)?,
        state: OrderState::parse(&state)?,
        reason: row.try_get("reason")?,
        tracking_number: row.try_get("tracking_number")?,
    })
}
