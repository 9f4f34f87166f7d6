//! `tiny-store simulate`: places orders, waits until each is shipped or
//! cancelled, and checks that stock and money balance.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tiny_store_inventory::Level;
use tiny_store_orders::{Order, OrderState};
use tiny_store_orders_contract::OrderLine;
use tiny_store_payments::Payment;
use tiny_store_platform::BoxError;
use uuid::Uuid;

use crate::{Shop, StockCounts};

/// What the shop sells: SKU and unit price in cents.
pub const CATALOGUE: [(&str, u64); 8] = [
    ("pen", 300),
    ("poster", 900),
    ("mug", 1_200),
    ("book", 1_900),
    ("t-shirt", 2_500),
    ("lamp", 7_900),
    ("chair", 14_900),
    ("desk", 29_900),
];

/// A simulation run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How many orders to place.
    pub orders: usize,
    /// Seed of the order generator: the same seed places the same orders.
    pub seed: u64,
    /// Orders placed at once.
    pub concurrency: usize,
    /// Units of each SKU in stock at the start (some orders will find none).
    pub stock_per_sku: u64,
    /// Every n-th order goes through the legacy checkout (`OrderPlaced` v1).
    pub legacy_every: usize,
    /// How long to wait for every order to settle.
    pub timeout: Duration,
}

impl Plan {
    /// `orders` orders with defaults that give shipped orders, stock
    /// rejections, declined payments and legacy orders.
    pub fn new(orders: usize) -> Self {
        Self {
            orders,
            seed: 7,
            concurrency: 16,
            stock_per_sku: (orders as u64 * 3 / 8).max(4),
            legacy_every: 5,
            timeout: Duration::from_secs(120),
        }
    }
}

/// What happened, as this process saw it.
#[derive(Debug)]
pub struct Report {
    /// Orders placed (ids).
    pub placed: Vec<Uuid>,
    /// Of which through the legacy checkout.
    pub legacy: usize,
    /// Orders as they ended (or stood at the timeout).
    pub orders: Vec<Order>,
    /// From the first order to the last settled.
    pub elapsed: Duration,
}

impl Report {
    /// How many orders are in `state`.
    pub fn count(&self, state: OrderState) -> usize {
        self.orders.iter().filter(|o| o.state == state).count()
    }

    /// Whether every placed order is shipped or cancelled.
    pub fn all_settled(&self) -> bool {
        self.orders.len() == self.placed.len() && self.orders.iter().all(|o| o.state.is_final())
    }
}

/// Progress of a run, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// `n` orders placed so far.
    Placed(usize),
    /// `n` orders shipped or cancelled so far.
    Settled(usize),
}

/// Puts `plan.stock_per_sku` free units of every SKU in stock; returns the
/// levels after that (the starting point of the audit).
pub async fn seed(shop: &Shop, plan: &Plan) -> Result<StockCounts, BoxError> {
    let inventory = shop
        .inventory
        .as_ref()
        .ok_or("seeding stock needs the inventory module in this process")?;
    for (sku, _) in CATALOGUE {
        inventory.restock(sku, plan.stock_per_sku).await?;
    }
    inventory.levels().await
}

/// Puts `units` free units of every SKU of the catalogue in stock, except
/// the SKUs in stock already (a restarted shop keeps its stock).
pub async fn stock_new(shop: &Shop, units: u64) -> Result<(), BoxError> {
    let inventory = shop
        .inventory
        .as_ref()
        .ok_or("stocking needs the inventory module in this process")?;
    for (sku, _) in CATALOGUE {
        inventory.stock_new(sku, units).await?;
    }
    Ok(())
}

/// Waits until every order in the database is shipped or cancelled (or
/// `timeout`), then checks the books against a start of `units` free
/// units of every SKU of the catalogue (as `serve --stock units` makes
/// them): `tiny-store check`, after a crash say.
pub async fn check(
    shop: &Shop,
    units: u64,
    timeout: Duration,
) -> Result<(Report, Audit), BoxError> {
    let orders = shop
        .orders
        .as_ref()
        .ok_or("checking needs the orders module in this process")?;
    let started = Instant::now();
    let all = orders.all().await?;
    let legacy = all
        .iter()
        .filter(|o| o.customer == tiny_store_orders_contract::LEGACY_CUSTOMER)
        .count();
    let placed: Vec<Uuid> = all.iter().map(|o| o.order_id).collect();
    let settled = orders.wait_settled(&placed, timeout, |_| {}).await?;
    let report = Report {
        legacy,
        orders: settled,
        elapsed: started.elapsed(),
        placed,
    };
    let initial = CATALOGUE
        .iter()
        .map(|(sku, _)| {
            let start = Level {
                available: units,
                reserved: 0,
            };
            ((*sku).to_owned(), start)
        })
        .collect();
    let audit = audit(shop, &initial, &report).await?;
    Ok((report, audit))
}

/// Places the plan's orders and waits until they settle (or the timeout).
pub async fn run(
    shop: &Shop,
    plan: &Plan,
    on_progress: impl Fn(Progress),
) -> Result<Report, BoxError> {
    let orders = shop
        .orders
        .as_ref()
        .ok_or("placing orders needs the orders module in this process")?;
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let requests: Vec<(String, Vec<OrderLine>, bool)> = (0..plan.orders)
        .map(|i| {
            let customer = if i % 23 == 22 {
                format!("{}{i}", tiny_store_payments::BLOCKED_PREFIX)
            } else {
                format!("customer-{}", i % 40)
            };
            let lines = (0..rng.usize(1..=3))
                .map(|_| {
                    let (sku, price) = CATALOGUE[rng.usize(..CATALOGUE.len())];
                    OrderLine {
                        sku: sku.to_owned(),
                        quantity: rng.u32(1..=3),
                        unit_price_cents: price,
                    }
                })
                .collect();
            let legacy = plan.legacy_every > 0 && i % plan.legacy_every == plan.legacy_every - 1;
            (customer, lines, legacy)
        })
        .collect();
    let legacy = requests.iter().filter(|r| r.2).count();
    let started = Instant::now();
    let mut placed = Vec::with_capacity(plan.orders);
    let mut results = futures_util::stream::iter(requests)
        .map(|(customer, lines, legacy)| async move {
            if legacy {
                let l = &lines[0];
                orders
                    .place_legacy(&l.sku, l.quantity, l.unit_price_cents)
                    .await
            } else {
                orders.place(&customer, lines).await
            }
        })
        .buffer_unordered(plan.concurrency.max(1));
    while let Some(result) = results.next().await {
        placed.push(result?.order_id);
        on_progress(Progress::Placed(placed.len()));
    }
    let settled = orders
        .wait_settled(&placed, plan.timeout, |n| on_progress(Progress::Settled(n)))
        .await?;
    Ok(Report {
        legacy,
        orders: settled,
        elapsed: started.elapsed(),
        placed,
    })
}

/// The books of a run that had all four modules in this process.
#[derive(Debug, Default)]
pub struct Audit {
    /// Every rule that does not hold; empty when the books balance.
    pub problems: Vec<String>,
    /// Money captured by payments, in cents.
    pub captured_cents: u64,
    /// The value of the shipped orders, in cents.
    pub shipped_value_cents: u64,
    /// Units that left the warehouse, by SKU.
    pub shipped_units: BTreeMap<String, u64>,
}

/// Checks the books: every order settled; every shipped order paid in full
/// and shipped once; no cancelled order paid or holding stock; stock at the
/// start = free + held, and held = shipped units.
pub async fn audit(shop: &Shop, initial: &StockCounts, report: &Report) -> Result<Audit, BoxError> {
    let (Some(inventory), Some(payments), Some(shipments)) =
        (&shop.inventory, &shop.payments, &shop.shipments)
    else {
        return Err("the audit needs inventory, payments and shipments in this process".into());
    };
    // A cancellation releases the stock by a later event: wait for it.
    let cancelled: Vec<_> = report
        .orders
        .iter()
        .filter(|o| o.state == OrderState::Cancelled)
        .map(|o| o.order_id)
        .collect();
    let mut a = Audit::default();
    let holding = inventory
        .wait_released(&cancelled, Duration::from_secs(60))
        .await?;
    if holding > 0 {
        a.problems
            .push(format!("{holding} cancelled orders still hold stock"));
    }
    let levels = inventory.levels().await?;
    // Only this run's orders (a database may hold earlier runs).
    let mut paid = payments.payments().await?;
    paid.retain(|id, _| report.placed.contains(id));
    let mut shipped = shipments.shipments().await?;
    shipped.retain(|id, _| report.placed.contains(id));
    if !report.all_settled() {
        let open = report.placed.len()
            - report.count(OrderState::Shipped)
            - report.count(OrderState::Cancelled);
        a.problems
            .push(format!("{open} orders neither shipped nor cancelled"));
    }
    for o in &report.orders {
        match o.state {
            OrderState::Shipped => {
                a.shipped_value_cents += o.total_cents;
                for l in &o.lines {
                    *a.shipped_units.entry(l.sku.clone()).or_default() += u64::from(l.quantity);
                }
                if paid.get(&o.order_id) != Some(&Payment::Captured(o.total_cents)) {
                    a.problems
                        .push(format!("shipped order {} not paid in full", o.order_id));
                }
                if shipped.get(&o.order_id) != o.tracking_number.as_ref() {
                    a.problems
                        .push(format!("order {} and its shipment disagree", o.order_id));
                }
            }
            OrderState::Cancelled => {
                if matches!(paid.get(&o.order_id), Some(Payment::Captured(_))) {
                    a.problems
                        .push(format!("cancelled order {} was charged", o.order_id));
                }
                if shipped.contains_key(&o.order_id) {
                    a.problems
                        .push(format!("cancelled order {} was shipped", o.order_id));
                }
            }
            _ => {}
        }
    }
    a.captured_cents = paid
        .values()
        .map(|p| match p {
            Payment::Captured(c) => *c,
            Payment::Declined(_) => 0,
        })
        .sum();
    if a.captured_cents != a.shipped_value_cents {
        a.problems.push(format!(
            "captured {} cents but shipped goods worth {}",
            a.captured_cents, a.shipped_value_cents
        ));
    }
    if shipped.len() != report.count(OrderState::Shipped) {
        a.problems.push(format!(
            "{} shipments for {} shipped orders",
            shipped.len(),
            report.count(OrderState::Shipped)
        ));
    }
    for (sku, start) in initial {
        let now = levels.get(sku).copied().unwrap_or_default();
        let out = a.shipped_units.get(sku).copied().unwrap_or(0);
        let units = |l: Level| l.available + l.reserved;
        if units(now) != units(*start) || now.reserved != start.reserved + out {
            a.problems.push(format!(
                "{sku}: started {start:?}, now {now:?}, {out} shipped"
            ));
        }
    }
    Ok(a)
}
