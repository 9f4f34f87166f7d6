//! `tiny-store serve`: a small HTTP API in front of the orders module.
//!
//! | Method and path | What |
//! |---|---|
//! | `POST /orders` | place an order: `{"customer": "ann", "lines": [{"sku": "mug", "quantity": 2, "unit_price_cents": 1200}]}` -> 201 and the order |
//! | `POST /legacy/orders` | the old checkout: `{"sku": "mug", "quantity": 1, "unit_price_cents": 1200}` (publishes `OrderPlaced` v1) |
//! | `GET /orders/{id}` | an order and its state (`placed`, `confirmed`, `shipped`, `cancelled`) |
//! | `GET /stock` | stock levels (when inventory runs in this process) |
//! | `GET /stats` | the per-module summary, as text |
//! | `GET /health` | `ok` |
//!
//! Errors are JSON, `{"error": "..."}`, with 400 (not JSON), 415 (no JSON
//! content type), 422 (JSON of the wrong shape, or an order that cannot
//! be), 404 (no such order, or the module runs elsewhere) or 503 (the
//! database failed: neither the order nor its event was stored, see
//! [`Orders::place`]; a retry places a new order).
//!
//! Orders move on by events: a new order answers `placed`, and reaches
//! `shipped` or `cancelled` shortly after. Stock held for a cancelled order
//! comes back by a later event, just after the order reads `cancelled`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tiny_store_orders::{Orders, PlaceError};
use tiny_store_orders_contract::OrderLine;
use uuid::Uuid;

use crate::Shop;

/// Body of `POST /orders`.
#[derive(Debug, Deserialize)]
pub struct PlaceOrder {
    /// Who orders.
    pub customer: String,
    /// What.
    pub lines: Vec<OrderLine>,
}

/// Body of `POST /legacy/orders`.
#[derive(Debug, Deserialize)]
pub struct LegacyOrder {
    /// The one SKU.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in cents.
    pub unit_price_cents: u64,
}

/// The API's routes over a running shop.
pub fn router(shop: Arc<Shop>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/orders", post(place))
        .route("/legacy/orders", post(place_legacy))
        .route("/orders/{id}", get(order))
        .route("/stock", get(stock))
        .route(
            "/stats",
            get(|State(shop): State<Arc<Shop>>| async move { shop.summary().to_string() }),
        )
        .with_state(shop)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // 400 bad JSON, 415 not JSON, 422 JSON of the wrong shape.
        Self(r.status(), r.body_text())
    }
}

impl From<PlaceError> for ApiError {
    fn from(e: PlaceError) -> Self {
        let status = match e {
            PlaceError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, e.to_string())
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn orders(shop: &Shop) -> Result<&Orders, ApiError> {
    shop.orders.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "the orders module does not run in this process".into(),
        )
    })
}

async fn place(
    State(shop): State<Arc<Shop>>,
    body: Result<Json<PlaceOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let orders = orders(&shop)?;
    let order = orders.place(&req.customer, req.lines).await?;
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

async fn place_legacy(
    State(shop): State<Arc<Shop>>,
    body: Result<Json<LegacyOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let orders = orders(&shop)?;
    let order = orders
        .place_legacy(&req.sku, req.quantity, req.unit_price_cents)
        .await?;
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

async fn order(
    State(shop): State<Arc<Shop>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not an order id"),
        )
    })?;
    match orders(&shop)?.get(id).await.map_err(internal)? {
        Some(o) => Ok(Json(o).into_response()),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no order {id}"))),
    }
}

async fn stock(State(shop): State<Arc<Shop>>) -> Result<Response, ApiError> {
    let inventory = shop.inventory.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "the inventory module does not run in this process".into(),
        )
    })?;
    Ok(Json(inventory.levels().await.map_err(internal)?).into_response())
}
