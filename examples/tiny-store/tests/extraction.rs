//! L3, module extraction: `--modules orders,inventory,payments` serves the
//! shop in one process, `--modules shipments` ships in another, the two
//! sharing a broker route for the events that cross between them. The
//! shipments process is stopped for a while (cleanly, then by a crash) and
//! started again: every order placed in the first process is still shipped
//! by the second, once (the shipments process keeps its data in its
//! PostgreSQL schema, so a redelivery after a crash finds the shipment it
//! made).

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

async fn states(shop: &Server, ids: &[String]) -> Vec<Value> {
    let mut orders = Vec::new();
    for id in ids {
        orders.push(shop.order(id).await);
    }
    orders
}

async fn extraction(broker: &str) {
    let settings = common::settings("extract", &routes(broker));
    if !common::broker_ready(broker, &settings) {
        return;
    }
    let database = common::database_url();
    let Some(db) = common::postgres(&database).await else {
        return;
    };
    let routes = routes(broker);
    let env = [
        ("SEAMBUS_ROUTES", routes.as_str()),
        ("TINY_STORE_NAMESPACE", settings.namespace.as_str()),
        ("SEAMBUS_NATS_URL", settings.brokers.nats_url.as_str()),
        (
            "SEAMBUS_RABBITMQ_URL",
            settings.brokers.rabbitmq_url.as_str(),
        ),
    ];
    // The extracted module first: its queue must exist before the first
    // confirmation is published (RabbitMQ refuses an unroutable event).
    let mut shipping_env = env.to_vec();
    shipping_env.push(("TINY_STORE_DATABASE_URL", database.as_str()));
    let shipping_env = &shipping_env[..];
    // No command: a process without the orders module just handles events.
    let mut shipping = Server::spawn(&["--modules", "shipments"], shipping_env);
    let mut shop = Server::spawn(
        &[
            "--modules",
            "orders,inventory,payments",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--stock",
            "1000",
        ],
        &env,
    );

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

    let mut tracking = HashSet::new();
    for id in &placed {
        let order = shop.settled(id).await;
        assert_eq!(order["state"], "shipped", "{order}");
        tracking.insert(order["tracking_number"].as_str().unwrap().to_owned());
    }
    assert_eq!(placed.len(), 30);
    // Every order has its own shipment (a number is never reused).
    assert_eq!(tracking.len(), placed.len());
    // Shipped once: one shipment per order, the one the order knows.
    let schema = format!("{}_shipments", settings.namespace);
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT order_id, tracking_number FROM {schema}.shipments"
    ))
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(rows.len(), placed.len(), "one shipment per order");
    for order in states(&shop, &placed).await {
        let id = order["order_id"].as_str().unwrap();
        let row = rows.iter().find(|r| r.0 == id).unwrap();
        assert_eq!(order["tracking_number"].as_str(), Some(row.1.as_str()));
    }
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
