//! L3, module extraction: `--modules orders,inventory,payments` serves the
//! shop in one process, `--modules shipments` ships in another, the two
//! sharing a broker route for the events that cross between them. The
//! shipments process is stopped for a while (cleanly, then by a crash) and
//! started again: every order placed in the first process is still shipped
//! by the second, once (the shipments process keeps its data in its
//! PostgreSQL schema, so a redelivery after a crash finds the shipment it
//! made). And the L3 configuration files as shipped (NATS between the two
//! processes, each module's data in an SQLite file, no PostgreSQL) ship
//! every order exactly once when the shipments process is killed in the
//! middle of the flow and started again.

mod common;

use std::collections::HashSet;

use common::server::Server;
use serde_json::{json, Value};

/// The routes of both processes: the events between the shop and the
/// shipments module go through the broker, the rest stay in-process.
fn routes(broker: &str) -> String {
    format!("orders.order_confirmed={broker}, shipments.*={broker}")
}

async fn place_orders(shop: &Server, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let order = shop
            .place(
                "/orders",
                json!({
                    "customer": format!("customer-{i}"),
                    "lines": [{ "sku": "mug", "quantity": 1, "unit_price_cents": 1200 }],
                }),
            )
            .await;
        ids.push(order["order_id"].as_str().unwrap().to_owned());
    }
    ids
}

/// `tiny-store <first> serve`, with stock for every order.
fn serve(first: &[&str], env: &[(&str, &str)]) -> Server {
    let rest = ["serve", "--addr", "127.0.0.1:0", "--stock", "1000"];
    let args: Vec<&str> = first.iter().chain(&rest).copied().collect();
    Server::spawn(&args, env)
}

/// Every order in `placed` ends shipped under its own tracking number,
/// and `shipments` (order id, tracking number: the shipments module's
/// table) holds one shipment per order, the one the order knows.
async fn shipped_once(shop: &Server, placed: &[String], shipments: &[(String, String)]) {
    let mut tracking = HashSet::new();
    for id in placed {
        let order = shop.settled(id).await;
        assert_eq!(order["state"], "shipped", "{order}");
        tracking.insert(order["tracking_number"].as_str().unwrap().to_owned());
    }
    // A number is never reused.
    assert_eq!(tracking.len(), placed.len(), "a tracking number per order");
    assert_eq!(
        shipments.len(),
        placed.len(),
        "one shipment per order: {shipments:?}"
    );
    for order in states(shop, placed).await {
        let id = order["order_id"].as_str().unwrap();
        let row = shipments.iter().find(|r| r.0 == id).unwrap();
        assert_eq!(order["tracking_number"].as_str(), Some(row.1.as_str()));
    }
}

async fn states(shop: &Server, ids: &[String]) -> Vec<Value> {
    let mut orders = Vec::new();
    for id in ids {
        orders.push(shop.order(id).await);
    }
    orders
}

async fn extraction(broker: &str) {
    let settings = common::settings("extract", &routes(broker));
    if !common::broker_ready(broker) {
        return;
    }
    let common::Brokers {
        nats_url,
        rabbitmq_url,
        ..
    } = common::brokers();
    let database = common::database_url();
    let Some(db) = common::postgres(&database).await else {
        return;
    };
    let routes = routes(broker);
    let env = [
        ("SEAMBUS_ROUTES", routes.as_str()),
        ("TINY_STORE_NAMESPACE", settings.namespace.as_str()),
        ("SEAMBUS_NATS_URL", nats_url.as_str()),
        ("SEAMBUS_RABBITMQ_URL", rabbitmq_url.as_str()),
    ];
    // The extracted module first: its queue must exist before the first
    // confirmation is published (RabbitMQ refuses an unroutable event).
    let mut shipping_env = env.to_vec();
    shipping_env.push(("TINY_STORE_DATABASE_URL", database.as_str()));
    let shipping_env = &shipping_env[..];
    // No command: a process without the orders module just handles events.
    let mut shipping = Server::spawn(&["--modules", "shipments"], shipping_env);
    let mut shop = serve(&["--modules", "orders,inventory,payments"], &env);

    let mut placed = place_orders(&shop, 10).await;
    for id in &placed {
        assert_eq!(shop.settled(id).await["state"], "shipped", "order {id}");
    }

    // Stopped cleanly: orders are confirmed, and wait on the broker.
    shipping.stop_cleanly();
    let waiting = place_orders(&shop, 10).await;
    for id in &waiting {
        shop.wait_state(id, "confirmed").await;
    }
    placed.extend(waiting);
    let mut shipping = Server::spawn(&["--modules", "shipments", "run"], shipping_env);

    // Crashed while orders flow (once the first of them has shipped): what
    // it held unacknowledged comes back to the next process.
    let flowing = place_orders(&shop, 10).await;
    shop.wait_state(&flowing[0], "shipped").await;
    shipping.crash();
    placed.extend(flowing);
    let _shipping = Server::spawn(&["--modules", "shipments", "run"], shipping_env);

    assert_eq!(placed.len(), 30);
    for id in &placed {
        shop.settled(id).await;
    }
    // Shipped once, in the shipments schema.
    let schema = format!("{}_shipments", settings.namespace);
    let query = format!("SELECT order_id, tracking_number FROM {schema}.shipments");
    let rows: Vec<(String, String)> = sqlx::query_as(&query).fetch_all(&db).await.unwrap();
    shipped_once(&shop, &placed, &rows).await;
    shop.stop_cleanly();
    drop(_shipping);
    common::drop_schema(&db, &schema).await;
    let mut reset = Server::spawn(&["reset"], &env);
    reset.wait_for_line("tiny-store: broker state of namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipments_extracted_over_nats() {
    extraction("nats").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipments_extracted_over_rabbitmq() {
    extraction("rabbitmq").await;
}

/// `config/<name>` of this example.
fn config(name: &str) -> String {
    format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Counts the dead-lettered events of module `module` in a `/stats` text
/// (the `(all)` line's third number).
fn dead_of(stats: &str, module: &str) -> u64 {
    let line = stats
        .lines()
        .find(|l| l.starts_with(module) && l.contains("(all)"))
        .unwrap_or_else(|| panic!("no `{module} (all)` line in {stats}"));
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .nth(2)
        .unwrap_or_else(|| panic!("no dead count in `{line}`"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipments_extracted_as_shipped_killed_mid_flow_ships_once() {
    let settings = common::settings("extract_l3", "");
    if !common::broker_ready("nats") {
        return;
    }
    let nats_url = common::brokers().nats_url;
    let data = tempfile::tempdir().expect("a temporary directory");
    let dir = data.path().display().to_string();
    let env = [
        ("TINY_STORE_NAMESPACE", settings.namespace.as_str()),
        ("SEAMBUS_NATS_URL", nats_url.as_str()),
        // Where the files go (the shipped configs say `tiny-store-data`).
        ("TINY_STORE_DATA_DIR", dir.as_str()),
    ];
    let (shop_config, shipping_config) = (config("l3-shop.toml"), config("l3-shipments.toml"));
    let shipping_args = ["--config", shipping_config.as_str(), "run"];
    let mut shipping = Server::spawn(&shipping_args, &env);
    let shop = serve(&["--config", &shop_config], &env);
    let mut placed = place_orders(&shop, 5).await;
    for id in &placed {
        assert_eq!(shop.settled(id).await["state"], "shipped", "order {id}");
    }

    // Killed while confirmations flow: what it did is on disk, what it
    // held comes back to the next process, whose inbox skips what the
    // first one committed.
    let (url, http) = (shop.url("/orders"), shop.http.clone());
    let (ids, mut late) = tokio::sync::mpsc::unbounded_channel();
    let flowing = tokio::spawn(async move {
        for i in 0..30 {
            let body = json!({
                "customer": format!("late-{i}"),
                "lines": [{ "sku": "mug", "quantity": 1, "unit_price_cents": 1200 }],
            });
            let resp = http.post(&url).json(&body).send().await.expect("POST");
            let order: Value = resp.json().await.expect("an order");
            let _ = ids.send(order["order_id"].as_str().unwrap().to_owned());
        }
    });
    let first = late.recv().await.expect("a late order");
    shop.wait_state(&first, "shipped").await;
    shipping.crash();
    flowing.await.expect("placing");
    placed.push(first);
    while let Some(id) = late.recv().await {
        placed.push(id);
    }
    let _shipping = Server::spawn(&shipping_args, &env);

    for id in &placed {
        shop.settled(id).await;
    }
    // Shipped once, in the shipments process's own file.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{dir}/shipments.db"))
        .await
        .expect("open shipments.db");
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, tracking_number FROM shipments")
            .fetch_all(&pool)
            .await
            .unwrap();
    shipped_once(&shop, &placed, &rows).await;
    // No second shipment was announced (orders would dead-letter it).
    let stats = shop.get("/stats").await.text().await.unwrap();
    assert_eq!(dead_of(&stats, "orders"), 0, "{stats}");
    drop(shop);
    let mut reset = Server::spawn(&["--config", &shop_config, "reset"], &env);
    reset.wait_for_line("tiny-store: broker state of namespace");
}
