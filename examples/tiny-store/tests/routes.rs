//! One scenario, every route configuration: the same module code runs all
//! in-process (inline and queued), with one flow on a broker, and with
//! every event on NATS, RabbitMQ, Kafka or the SQL transport (an SQLite
//! file, and PostgreSQL). Each run must end with every
//! order shipped or cancelled, and the books (stock and money) balancing.

mod common;

use std::time::Duration;

use tiny_store::simulate::{self, Plan};
use tiny_store::Shop;
use tiny_store_orders::OrderState;

async fn scenario(test: &str, routes: &str, orders: usize) {
    scenario_with(test, routes, orders, |_| {}).await;
}

async fn scenario_with(
    test: &str,
    routes: &str,
    orders: usize,
    adjust: impl FnOnce(&mut tiny_store::Settings),
) {
    let mut settings = common::settings(test, routes);
    adjust(&mut settings);
    for transport in settings.routing().transports() {
        if !common::broker_ready(transport) {
            return;
        }
    }
    let shop = Shop::start(&settings).await.expect("start the shop");
    let plan = Plan {
        timeout: Duration::from_secs(180),
        ..Plan::new(orders)
    };
    let initial = simulate::seed(&shop, &plan).await.unwrap();
    let report = simulate::run(&shop, &plan, |_| {}).await.unwrap();
    let audit = simulate::audit(&shop, &initial, &report).await.unwrap();
    let summary = shop.summary();
    shop.shutdown(Duration::from_secs(10)).await.unwrap();
    shop.delete_broker_state().await.unwrap();

    assert!(report.all_settled(), "{routes}: {report:?}");
    assert!(audit.problems.is_empty(), "{routes}: {:#?}", audit.problems);
    // The scenario exercised every path: shipped orders, both kinds of
    // cancellation, and the v1 (upcast) checkout.
    assert!(report.count(OrderState::Shipped) > 0, "{routes}");
    let reasons: Vec<&str> = report
        .orders
        .iter()
        .filter_map(|o| o.reason.as_deref())
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("out of stock")),
        "{routes}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("payment failed")),
        "{routes}"
    );
    assert!(report.legacy > 0);
    let legacy_shipped = report.orders.iter().any(|o| {
        o.customer == tiny_store_orders_contract::LEGACY_CUSTOMER && o.state == OrderState::Shipped
    });
    assert!(
        legacy_shipped,
        "{routes}: a v1 order was upcast and shipped"
    );
    // Nothing went to a dead letter.
    for module in tiny_store::MODULES {
        let (handled, _, dead) = summary.totals(module);
        assert!(handled > 0, "{routes}: {module} handled nothing");
        assert_eq!(dead, 0, "{routes}: {module} dead-lettered\n{summary}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_in_process_queued() {
    scenario("queued", "", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_in_process_inline() {
    scenario("inline", "*=in-process:inline", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flow_on_nats() {
    scenario(
        "one_flow",
        "orders.order_confirmed=nats, shipments.*=nats",
        150,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_on_nats() {
    scenario("nats", "*=nats", 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_on_rabbitmq() {
    scenario("rabbitmq", "*=rabbitmq", 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_on_kafka() {
    scenario("kafka", "*=kafka", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_durable_on_sqlite() {
    let file = std::env::temp_dir().join(format!("tiny-store-{}.db", std::process::id()));
    scenario_with("sqlite", "*=sql", 150, |s| {
        common::set(s, "sql", "url", format!("sqlite://{}", file.display()));
    })
    .await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_durable_on_postgres() {
    scenario_with("sqlpg", "*=sql", 150, |s| {
        common::set(s, "sql", "url", common::database_url());
    })
    .await;
}
