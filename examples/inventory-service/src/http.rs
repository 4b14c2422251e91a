//! The HTTP edge: products, deliveries, the cached stock check and reservations.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dbps_cache::redis::Lookup;
use dbps_service::http::{Fields, Problem};
use example_contracts::inventory::{PRODUCT_AGGREGATE, ProductChanged};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::stock::{STOCK_COLUMNS, change_stock, record_movement};
use crate::{App, CACHE_HEADER, MAX_PRODUCTS};

/// Largest request body.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// Longest SKU, in characters.
const MAX_SKU: usize = 64;
/// Longest name, in characters.
const MAX_NAME: usize = 200;
/// The most goods one request may bring in (stock on hand of a new product, a delivery).
const MAX_QUANTITY: i64 = 1_000_000_000;

/// A product as the API shows it (also the reference data other services load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Product {
    /// Id.
    pub id: Uuid,
    /// Stock-keeping unit, unique.
    pub sku: String,
    /// Name.
    pub name: String,
    /// Unit price, in cents.
    pub unit_price_cents: i64,
    /// Version, the `version` of its `ProductChanged` events.
    pub version: i64,
}

/// A product's stock: `GET /products/{id}/stock`, also the value the Redis cache holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Stock {
    /// The product.
    pub product_id: Uuid,
    /// Goods in the warehouse.
    pub on_hand: i64,
    /// Goods held for quotes.
    pub reserved: i64,
    /// `on_hand - reserved`: what a new quote can have; never negative.
    pub available: i64,
    /// Version of the stock row, incremented by every change (the `version` of its
    /// `StockLevelChanged` events).
    pub version: i64,
}

/// Body of `POST /products`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// Stock-keeping unit: 1 to 64 characters, unique.
    pub sku: String,
    /// Name: 1 to 200 characters.
    pub name: String,
    /// Unit price, in cents; not negative.
    pub unit_price_cents: i64,
    /// Goods on hand to start with; not negative.
    pub on_hand: i64,
}

/// Body of `POST /products/{id}/deliveries`: goods received.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// How many; above zero.
    pub quantity: i64,
}

/// A quote's reservation: `GET /quotes/{quote_id}/reservation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The quote.
    pub quote_id: Uuid,
    /// One line per product, in product-id order.
    pub lines: Vec<ReservationLine>,
}

/// One product of a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ReservationLine {
    /// The product.
    pub product_id: Uuid,
    /// How many.
    pub quantity: i64,
    /// `reserved`, `confirmed` (shipped) or `released`.
    pub state: String,
    /// When it entered that state.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// A database or outbox failure: `503`, logged without the request's data.
fn unavailable(error: &(dyn std::error::Error + 'static)) -> Problem {
    tracing::error!(error = %dbps_core::ErrorChain(error), "request failed");
    Problem::unavailable()
}

fn db(error: sqlx::Error) -> Problem {
    // numeric_value_out_of_range: a stock level beyond what a bigint holds.
    if error.as_database_error().and_then(|e| e.code()).as_deref() == Some("22003") {
        return Problem::new(StatusCode::UNPROCESSABLE_ENTITY).detail("the stock would exceed the largest level");
    }
    unavailable(&error)
}

fn outbox_error(error: dbps_outbox::OutboxError) -> Problem {
    unavailable(&error)
}

/// A quantity field: 1 to [`MAX_QUANTITY`] (0 too when `zero` is allowed).
fn quantity(fields: &mut Fields, field: &str, value: i64, zero: bool) {
    let least = i64::from(!zero);
    if value < least {
        fields.invalid(
            field,
            if zero {
                "must not be negative"
            } else {
                "must be above zero"
            },
        );
    } else if value > MAX_QUANTITY {
        fields.invalid(field, format!("must be at most {MAX_QUANTITY}"));
    }
}

pub(crate) async fn create_product(
    State(app): State<App>,
    Json(body): Json<CreateProduct>,
) -> Result<Response, Problem> {
    let mut fields = Fields::new();
    let sku = fields.text("sku", &body.sku, MAX_SKU);
    let name = fields.text("name", &body.name, MAX_NAME);
    if body.unit_price_cents < 0 {
        fields.invalid("unit_price_cents", "must not be negative");
    }
    quantity(&mut fields, "on_hand", body.on_hand, true);
    fields.finish()?;

    let mut tx = app.pool.begin().await.map_err(db)?;
    let product: Option<Product> = sqlx::query_as(
        "insert into products (id, sku, name, unit_price_cents) values ($1, $2, $3, $4)
         on conflict (sku) do nothing
         returning id, sku, name, unit_price_cents, version",
    )
    .bind(Uuid::now_v7())
    .bind(sku)
    .bind(name)
    .bind(body.unit_price_cents)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let Some(product) = product else {
        return Err(Problem::new(StatusCode::CONFLICT)
            .detail(format!("a product with SKU {sku} exists"))
            .with("sku", sku));
    };
    let stock: Stock = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into inventory (product_id, on_hand) values ($1, $2) returning {STOCK_COLUMNS}"
    )))
    .bind(product.id)
    .bind(body.on_hand)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    if body.on_hand > 0 {
        record_movement(&mut tx, product.id, body.on_hand, "received", None)
            .await
            .map_err(db)?;
    }
    let changed = ProductChanged {
        product_id: product.id,
        sku: product.sku.clone(),
        name: product.name.clone(),
        unit_price_cents: product.unit_price_cents,
        version: product.version,
    };
    app.events
        .emit(&mut tx, PRODUCT_AGGREGATE, product.id, &changed, None)
        .await
        .map_err(outbox_error)?;
    app.events
        .stock_level(&mut tx, &stock, None)
        .await
        .map_err(outbox_error)?;
    tx.commit().await.map_err(db)?;
    tracing::info!(product = %product.id, "product created");

    let mut response = (StatusCode::CREATED, Json(&product)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/products/{}", product.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

pub(crate) async fn get_product(State(app): State<App>, Path(id): Path<Uuid>) -> Result<Json<Product>, Problem> {
    sqlx::query_as("select id, sku, name, unit_price_cents, version from products where id = $1")
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .map_err(db)?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("product {id}")))
}

pub(crate) async fn list_products(State(app): State<App>) -> Result<Json<Vec<Product>>, Problem> {
    let products =
        sqlx::query_as("select id, sku, name, unit_price_cents, version from products order by sku limit $1")
            .bind(MAX_PRODUCTS)
            .fetch_all(&app.pool)
            .await
            .map_err(db)?;
    Ok(Json(products))
}

pub(crate) async fn receive_delivery(
    State(app): State<App>,
    Path(id): Path<Uuid>,
    Json(body): Json<Delivery>,
) -> Result<Json<Stock>, Problem> {
    let mut fields = Fields::new();
    quantity(&mut fields, "quantity", body.quantity, false);
    fields.finish()?;

    let mut tx = app.pool.begin().await.map_err(db)?;
    let stock = change_stock(&mut tx, id, body.quantity, 0)
        .await
        .map_err(db)?
        .ok_or_else(|| Problem::not_found(format!("product {id}")))?;
    record_movement(&mut tx, id, body.quantity, "received", None)
        .await
        .map_err(db)?;
    app.events
        .stock_level(&mut tx, &stock, None)
        .await
        .map_err(outbox_error)?;
    tx.commit().await.map_err(db)?;
    tracing::info!(product = %id, version = stock.version, "delivery received");
    // The StockLevelChanged event invalidates the cached level too; doing it now as well
    // spares this instance's next reader the wait for it.
    if let Err(error) = app.stock.invalidate(&id.to_string()).await {
        tracing::debug!(product = %id, error = %dbps_core::ErrorChain(&error), "stock cache not invalidated; the event will");
    }
    Ok(Json(stock))
}

async fn load_stock(pool: &PgPool, id: Uuid) -> Result<Stock, Problem> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {STOCK_COLUMNS} from inventory where product_id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db)?
    .ok_or_else(|| Problem::not_found(format!("product {id}")))
}

pub(crate) async fn get_stock(State(app): State<App>, Path(id): Path<Uuid>) -> Result<Response, Problem> {
    let key = id.to_string();
    let (stock, served) = match app.stock.lookup(&key).await {
        Lookup::Hit(stock) => (stock, "hit"),
        Lookup::Miss(generation) => {
            let stock = load_stock(&app.pool, id).await?;
            // Refused if an invalidation came in since the lookup; a failed fill only
            // costs the next reader a miss.
            let _ = app.stock.fill(&key, &stock, &generation).await;
            (stock, "miss")
        }
        // Redis is down or slow: the database answers, and nothing is cached.
        Lookup::Unavailable => (load_stock(&app.pool, id).await?, "miss"),
    };
    Ok(([(CACHE_HEADER, served)], Json(stock)).into_response())
}

pub(crate) async fn get_reservation(
    State(app): State<App>,
    Path(quote_id): Path<Uuid>,
) -> Result<Json<Reservation>, Problem> {
    let lines: Vec<ReservationLine> = sqlx::query_as(
        "select product_id, quantity, state, at from stock_reservations where quote_id = $1 order by product_id",
    )
    .bind(quote_id)
    .fetch_all(&app.pool)
    .await
    .map_err(db)?;
    if lines.is_empty() {
        return Err(Problem::not_found(format!("a reservation of quote {quote_id}")));
    }
    Ok(Json(Reservation { quote_id, lines }))
}
