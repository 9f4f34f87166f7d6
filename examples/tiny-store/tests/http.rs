//! The HTTP API over real HTTP: each test starts its own `tiny-store serve`
//! process (in-process routes, in-memory storage, 5 units of every SKU in
//! the catalogue), talks to it with `reqwest`, then stops it with SIGTERM
//! and checks that it stopped cleanly.

mod common;

use common::server::{Server, STOCK};
use serde_json::{json, Value};

/// The `error` of a JSON error response with the expected status.
async fn error_of(resp: reqwest::Response, want: reqwest::StatusCode, what: &str) -> String {
    let status = resp.status();
    let text = resp.text().await.expect("a response body");
    assert_eq!(status, want, "{what}: {text}");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {text}"));
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no string `error` in {body}"))
        .to_owned()
}

fn order_id(order: &Value) -> &str {
    order["order_id"].as_str().expect("order_id")
}

fn reason(order: &Value) -> &str {
    order["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("a cancelled order without a reason: {order}"))
}

#[tokio::test]
async fn a_valid_order_is_created_then_shipped() {
    let mut server = Server::start("shipped");
    let placed = server
        .place(
            "/orders",
            json!({
                "customer": "ann",
                "lines": [
                    { "sku": "mug", "quantity": 2, "unit_price_cents": 1200 },
                    { "sku": "pen", "quantity": 1, "unit_price_cents": 300 }
                ]
            }),
        )
        .await;
    assert_eq!(placed["customer"], "ann", "{placed}");
    assert_eq!(placed["total_cents"], 2 * 1200 + 300, "{placed}");

    let order = server.settled(order_id(&placed)).await;
    assert_eq!(order["state"], "shipped", "{order}");
    assert_eq!(order["order_id"], placed["order_id"]);
    assert!(
        order["tracking_number"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "a shipped order without a tracking number: {order}"
    );
    assert!(order["reason"].is_null(), "{order}");

    let stock = server.stock().await;
    assert_eq!(
        stock["mug"],
        json!({ "available": STOCK - 2, "reserved": 2 }),
        "{stock}"
    );
    assert_eq!(
        stock["pen"],
        json!({ "available": STOCK - 1, "reserved": 1 }),
        "{stock}"
    );
    server.stop_cleanly();
}

#[tokio::test]
async fn an_order_over_the_stock_is_cancelled_and_takes_nothing() {
    let mut server = Server::start("out_of_stock");
    let placed = server
        .place(
            "/orders",
            json!({
                "customer": "bob",
                "lines": [
                    { "sku": "pen", "quantity": 1, "unit_price_cents": 300 },
                    { "sku": "book", "quantity": STOCK + 1, "unit_price_cents": 1900 }
                ]
            }),
        )
        .await;
    let order = server.settled(order_id(&placed)).await;
    assert_eq!(order["state"], "cancelled", "{order}");
    assert!(reason(&order).contains("out of stock"), "{order}");
    assert!(reason(&order).contains("book"), "{order}");

    // All lines or none: the pen line was not taken either.
    let stock = server.stock().await;
    for sku in ["pen", "book"] {
        assert_eq!(
            stock[sku],
            json!({ "available": STOCK, "reserved": 0 }),
            "{sku}: {stock}"
        );
    }
    server.stop_cleanly();
}

#[tokio::test]
async fn an_order_of_an_unknown_sku_is_cancelled_out_of_stock() {
    let mut server = Server::start("unknown_sku");
    let placed = server
        .place(
            "/orders",
            json!({
                "customer": "cat",
                "lines": [{ "sku": "no-such-thing", "quantity": 1, "unit_price_cents": 100 }]
            }),
        )
        .await;
    let order = server.settled(order_id(&placed)).await;
    assert_eq!(order["state"], "cancelled", "{order}");
    assert!(reason(&order).contains("out of stock"), "{order}");
    server.stop_cleanly();
}

#[tokio::test]
async fn a_blocked_card_cancels_the_order_and_releases_the_stock() {
    let mut server = Server::start("blocked_card");
    let placed = server
        .place(
            "/orders",
            json!({
                "customer": "blocked-dan",
                "lines": [{ "sku": "lamp", "quantity": 2, "unit_price_cents": 7900 }]
            }),
        )
        .await;
    let order = server.settled(order_id(&placed)).await;
    assert_eq!(order["state"], "cancelled", "{order}");
    assert!(reason(&order).contains("payment failed"), "{order}");
    // The payment failed, so the stock had been reserved: it must come back.
    server.stock_restored("lamp").await;
    server.stop_cleanly();
}

#[tokio::test]
async fn an_order_over_the_card_limit_cancels_and_releases_the_stock() {
    let mut server = Server::start("card_limit");
    let unit = 29_900;
    let quantity = 2;
    assert!(
        unit * quantity > tiny_store_payments::CARD_LIMIT_CENTS,
        "the order must be over the card limit"
    );
    let placed = server
        .place(
            "/orders",
            json!({
                "customer": "eve",
                "lines": [{ "sku": "desk", "quantity": quantity, "unit_price_cents": unit }]
            }),
        )
        .await;
    let order = server.settled(order_id(&placed)).await;
    assert_eq!(order["state"], "cancelled", "{order}");
    assert!(reason(&order).contains("payment failed"), "{order}");
    server.stock_restored("desk").await;
    server.stop_cleanly();
}

#[tokio::test]
async fn a_legacy_order_is_upcast_and_shipped() {
    let mut server = Server::start("legacy");
    let placed = server
        .place(
            "/legacy/orders",
            json!({ "sku": "poster", "quantity": 3, "unit_price_cents": 900 }),
        )
        .await;
    assert_eq!(
        placed["customer"],
        tiny_store_orders_contract::LEGACY_CUSTOMER,
        "{placed}"
    );
    assert_eq!(placed["total_cents"], 3 * 900, "{placed}");
    // Inventory, payments and shipments subscribe to `OrderPlaced` v2 only:
    // the order ships only if the v1 event was upcast on the way.
    let order = server.settled(order_id(&placed)).await;
    assert_eq!(order["state"], "shipped", "{order}");
    let stock = server.stock().await;
    assert_eq!(
        stock["poster"],
        json!({ "available": STOCK - 3, "reserved": 3 }),
        "{stock}"
    );
    server.stop_cleanly();
}

#[tokio::test]
async fn bad_input_gets_a_json_error_with_the_right_status() {
    use reqwest::StatusCode;
    let mut server = Server::start("bad_input");

    let malformed = server.post_raw("/orders", "{\"customer\": \"ann\", ").await;
    error_of(malformed, StatusCode::BAD_REQUEST, "malformed JSON").await;

    let legacy_malformed = server.post_raw("/legacy/orders", "not json").await;
    error_of(
        legacy_malformed,
        StatusCode::BAD_REQUEST,
        "malformed legacy JSON",
    )
    .await;

    let wrong_shape = server
        .post_json("/orders", &json!({ "customer": "ann", "lines": [{ "sku": "mug", "quantity": -1, "unit_price_cents": 1 }] }))
        .await;
    error_of(
        wrong_shape,
        StatusCode::UNPROCESSABLE_ENTITY,
        "negative quantity",
    )
    .await;
    let missing = server
        .post_json("/orders", &json!({ "customer": "ann" }))
        .await;
    error_of(missing, StatusCode::UNPROCESSABLE_ENTITY, "no lines field").await;

    let no_lines = server
        .post_json("/orders", &json!({ "customer": "ann", "lines": [] }))
        .await;
    let e = error_of(no_lines, StatusCode::UNPROCESSABLE_ENTITY, "empty lines").await;
    assert!(e.contains("line"), "{e}");

    let zero = server
        .post_json(
            "/orders",
            &json!({
                "customer": "ann",
                "lines": [{ "sku": "mug", "quantity": 0, "unit_price_cents": 1200 }]
            }),
        )
        .await;
    let e = error_of(zero, StatusCode::UNPROCESSABLE_ENTITY, "quantity 0").await;
    assert!(e.contains("quantity"), "{e}");

    let too_many = server
        .post_json(
            "/orders",
            &json!({
                "customer": "ann",
                "lines": [{ "sku": "mug", "quantity": 1001, "unit_price_cents": 1200 }]
            }),
        )
        .await;
    error_of(too_many, StatusCode::UNPROCESSABLE_ENTITY, "quantity 1001").await;

    let no_customer = server
        .post_json(
            "/orders",
            &json!({
                "customer": "  ",
                "lines": [{ "sku": "mug", "quantity": 1, "unit_price_cents": 1200 }]
            }),
        )
        .await;
    error_of(
        no_customer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "blank customer",
    )
    .await;

    let legacy_zero = server
        .post_json(
            "/legacy/orders",
            &json!({ "sku": "mug", "quantity": 0, "unit_price_cents": 1200 }),
        )
        .await;
    error_of(
        legacy_zero,
        StatusCode::UNPROCESSABLE_ENTITY,
        "legacy quantity 0",
    )
    .await;

    let not_an_id = server.get("/orders/not-a-uuid").await;
    error_of(not_an_id, StatusCode::BAD_REQUEST, "GET /orders/not-a-uuid").await;

    let mut bytes = [0u8; 16];
    bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    let unknown = uuid::Builder::from_random_bytes(bytes).into_uuid();
    assert_eq!(unknown.get_version_num(), 4);
    let missing = server.get(&format!("/orders/{unknown}")).await;
    let e = error_of(missing, StatusCode::NOT_FOUND, "GET an unknown order").await;
    assert!(e.contains(&unknown.to_string()), "{e}");

    // None of that placed an order or touched the stock.
    let stock = server.stock().await;
    let levels = stock.as_object().expect("stock is a JSON object");
    assert!(!levels.is_empty(), "no stock at all: {stock}");
    for (sku, level) in levels {
        assert_eq!(
            *level,
            json!({ "available": STOCK, "reserved": 0 }),
            "{sku}: {stock}"
        );
    }
    server.stop_cleanly();
}

#[tokio::test]
async fn health_and_stats() {
    let mut server = Server::start("health_stats");
    let health = server.get("/health").await;
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    assert_eq!(health.text().await.expect("a body"), "ok");

    let stats = server.get("/stats").await;
    assert_eq!(stats.status(), reqwest::StatusCode::OK);
    let text = stats.text().await.expect("a body");
    assert!(text.contains("handled"), "{text}");
    for module in ["orders", "inventory", "payments", "shipments"] {
        assert!(text.contains(module), "no `{module}` in /stats:\n{text}");
    }
    server.stop_cleanly();
}

#[tokio::test]
async fn sigterm_stops_the_server_gracefully() {
    let mut server = Server::start("sigterm");
    // Serving, then asked to stop.
    let health = server.get("/health").await;
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    let (status, stdout) = server.stop();
    assert!(
        status.success(),
        "tiny-store exited with {status} after SIGTERM; stdout: {stdout:#?}"
    );
    let stopped = stdout
        .iter()
        .position(|l| l == "tiny-store: stopped")
        .unwrap_or_else(|| panic!("no `tiny-store: stopped` after SIGTERM; stdout: {stdout:#?}"));
    assert_eq!(
        stopped,
        stdout.len() - 1,
        "`tiny-store: stopped` is not the last line: {stdout:#?}"
    );
    // The per-module summary is printed on the way out.
    assert!(stdout.iter().any(|l| l.contains("handled")), "{stdout:#?}");
    // And nothing listens any more.
    let gone = server.http.get(server.url("/health")).send().await;
    assert!(gone.is_err(), "still answering after it stopped: {gone:?}");
}
