//! The quote service of the dbps example system.
//!
//! It owns the `quotes`, `quote_line_items` and `machine_configurations` tables in its own
//! PostgreSQL database (provisioned and migrated at start: `quote_owner` migrates,
//! `quote_app` serves and cannot read any other service's tables), and keeps
//! `customer_cache {id, name, tax_number}`, a replica of the customer service's events,
//! backfilled from that service's snapshot endpoint. It serves:
//!
//! - `POST /quotes` — creates a quote with its line items and machine configurations in
//!   **one local transaction**, with its `quote.QuoteCreated` event (outbox) and the stock
//!   check saga that awaits the inventory's answer;
//! - `GET /quotes/{id}` — the quote, its status (and why), and its customer's name from
//!   the replica;
//! - `GET /quotes/{id}/customer` — the customer's details fresh from the customer service
//!   (through a circuit breaker), or from the replica with `may_be_stale: true` when that
//!   service cannot be asked;
//! - `POST /quotes/{id}/accept` — starts the order saga: confirm the stock reservation
//!   (inventory) → create the purchase order (purchase-order service) → "Ordered"; a
//!   rejected or timed-out purchase order releases the reservation;
//! - `/health` and `/metrics`.
//!
//! `POST`s honour an `Idempotency-Key` header: a duplicate gets the first answer.
//!
//! The flows and their states are in [`sagas`]. Statuses: `New` → `Awaiting Stock` →
//! `Stock Reserved` or `Pending Stock` (the sales rep's notification is requested, as
//! `quote.SalesRepNotificationRequested`); after acceptance `Ordering` → `Ordered` or
//! `Order Failed`. Every change of status is published as `quote.QuoteStatusChanged`
//! (status, reason, value, version, purchase order) on `<quote>.quote.events`, keyed by
//! the quote id, in the transaction of the change.

pub mod customers;
pub mod products;
pub mod sagas;

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dbps_core::inbox::pg::PgInbox;
use dbps_core::kafka::TopicSpec;
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use dbps_saga::Orchestrator;
use dbps_service::Service;
use dbps_service::client::ServiceClient;
use dbps_service::http::idempotency::{self, Idempotency};
use dbps_service::http::{Fields, Problem};
use example_contracts::inventory::{PRODUCT_AGGREGATE, RESERVATION_AGGREGATE};
use example_contracts::quote::{AGGREGATE, QuoteCreated, QuoteLine};
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::customers::CustomerDetails;
use crate::sagas::{Order, Participants, StockCheck};

/// The service's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The service's name, the root of its database, roles, topics and groups.
pub const SERVICE: &str = example_contracts::services::QUOTE;

/// Largest request body.
const MAX_BODY: usize = 64 * 1024;
/// Most lines on one quote.
const MAX_LINES: usize = 100;
/// Most machine configurations on one quote.
const MAX_MACHINES: usize = 20;

/// The migration components of the service's database, in order: the framework's tables,
/// then the service's own.
pub fn components() -> [(&'static str, &'static Migrator); 6] {
    [
        ("dbps_outbox", &dbps_outbox::pg::MIGRATOR),
        ("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR),
        ("dbps_saga", &dbps_saga::MIGRATOR),
        ("dbps_replica", &dbps_cache::replica::MIGRATOR),
        (idempotency::COMPONENT, &idempotency::MIGRATOR),
        (SERVICE, &MIGRATOR),
    ]
}

/// What the quote service needs to know of the others, and its timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The customer service's name (its events topic).
    pub customer: String,
    /// The customer service's base URL (REST reads and the replica's snapshot).
    pub customer_url: String,
    /// The inventory service's name (its commands, reservation and product events).
    pub inventory: String,
    /// The inventory service's base URL (its product catalogue).
    pub inventory_url: String,
    /// The purchase-order service's name (its commands).
    pub purchase_order: String,
    /// How long a quote waits for the inventory's answer.
    pub stock_timeout: Duration,
    /// How long an order step waits for its participant.
    pub order_step_timeout: Duration,
    /// How often a compensation is tried before the saga is stuck, and the first backoff.
    pub compensation_attempts: u32,
    /// The first backoff between compensation attempts (doubled each time).
    pub compensation_backoff: Duration,
}

impl Settings {
    /// The canonical peers, the customer service at `customer_url` and the inventory at
    /// `inventory_url`, with the default timeouts (stock answer 30 s, order steps 10 s,
    /// compensations 10 attempts from 1 s).
    pub fn new(customer_url: impl Into<String>, inventory_url: impl Into<String>) -> Self {
        use example_contracts::services;
        Self {
            customer: services::CUSTOMER.to_owned(),
            customer_url: customer_url.into(),
            inventory: services::INVENTORY.to_owned(),
            inventory_url: inventory_url.into(),
            purchase_order: services::PURCHASE_ORDER.to_owned(),
            stock_timeout: Duration::from_secs(30),
            order_step_timeout: Duration::from_secs(10),
            compensation_attempts: 10,
            compensation_backoff: Duration::from_secs(1),
        }
    }

    /// From the environment: `QUOTE_CUSTOMER_URL` and `QUOTE_INVENTORY_URL` (required), and
    /// optionally
    /// `QUOTE_CUSTOMER_SERVICE`, `QUOTE_INVENTORY_SERVICE`, `QUOTE_PURCHASE_ORDER_SERVICE`
    /// (the peers' names), `QUOTE_STOCK_TIMEOUT_SECS`, `QUOTE_ORDER_STEP_TIMEOUT_SECS`.
    pub fn from_env() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let customer_url = var("QUOTE_CUSTOMER_URL").ok_or("QUOTE_CUSTOMER_URL is not set")?;
        let inventory_url = var("QUOTE_INVENTORY_URL").ok_or("QUOTE_INVENTORY_URL is not set")?;
        let mut settings = Self::new(customer_url, inventory_url);
        if let Some(name) = var("QUOTE_CUSTOMER_SERVICE") {
            settings.customer = name;
        }
        if let Some(name) = var("QUOTE_INVENTORY_SERVICE") {
            settings.inventory = name;
        }
        if let Some(name) = var("QUOTE_PURCHASE_ORDER_SERVICE") {
            settings.purchase_order = name;
        }
        let secs = |name: &str| -> Result<Option<Duration>, Box<dyn std::error::Error + Send + Sync>> {
            var(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map(Duration::from_secs)
                        .map_err(|e| format!("{name}: {e}").into())
                })
                .transpose()
        };
        if let Some(timeout) = secs("QUOTE_STOCK_TIMEOUT_SECS")? {
            settings.stock_timeout = timeout;
        }
        if let Some(timeout) = secs("QUOTE_ORDER_STEP_TIMEOUT_SECS")? {
            settings.order_step_timeout = timeout;
        }
        Ok(settings)
    }
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    pool: PgPool,
    outbox: PgOutbox,
    orchestrator: Orchestrator,
    customers: customers::Directory,
    products: products::Catalogue,
    keys: Idempotency,
}

impl App {
    /// Prepares the service's database and starts its parts on `service`: the relay, the
    /// saga orchestrator (its reply consumer and deadline scanner), the consumer of the
    /// inventory's reservation events, the customer replica (stream and backfill). Serve
    /// [`App::router`] next.
    pub async fn start(
        service: &mut Service,
        settings: Settings,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let pool = service.postgres(&components()).await?;
        let naming = service.naming();
        let name = service.name().to_string();
        let outbox = service.outbox();

        let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?)
            .create_topics([
                TopicSpec::new(naming.events(&name, AGGREGATE)?, 3),
                TopicSpec::new(naming.commands(&settings.inventory)?, 3),
                TopicSpec::new(naming.commands(&settings.purchase_order)?, 3),
            ])
            .build()?;
        service.run_relay(relay);

        let participants = Participants {
            inventory: settings.inventory.clone(),
            purchase_order: settings.purchase_order.clone(),
        };
        let orchestrator = Orchestrator::builder(pool.clone(), name.clone())
            .naming(naming.clone())
            .register(sagas::stock_check(outbox.clone(), settings.stock_timeout))
            .register(sagas::order(&outbox, &participants, settings.order_step_timeout))
            .compensation(
                settings.compensation_attempts,
                settings.compensation_backoff,
                settings.order_step_timeout,
            )
            .build()?;
        let scanner = orchestrator.clone();
        service.run("saga deadlines", move |token| async move {
            scanner.run(token).await.map(|_| ())
        });

        // Replies to the order saga's commands.
        let group = service.group("saga-replies");
        let replies = PgInbox::new(pool.clone(), group.clone(), orchestrator.replies()).batched(32);
        service.consume(&group, &naming.replies(&name)?, replies)?;

        // The inventory's answers to `QuoteCreated`, awaited by the stock check saga.
        let group = service.group("stock-answers");
        let answers = PgInbox::new(pool.clone(), group.clone(), orchestrator.events()).batched(32);
        service.consume(
            &group,
            &naming.events(&settings.inventory, RESERVATION_AGGREGATE)?,
            answers,
        )?;

        // The customer replica: the stream, and a backfill from the owner's snapshot.
        let group = service.group("customer-cache");
        service.consume(
            &group,
            &naming.events(&settings.customer, example_customer_service::AGGREGATE)?,
            customers::replica(&pool)?,
        )?;
        let directory = customers::Directory::new(pool.clone(), &settings)?;

        // The product catalogue: loaded from the inventory when needed, kept current by
        // its product events.
        let inventory = ServiceClient::builder("inventory", &settings.inventory_url).build()?;
        let catalogue = products::catalogue(inventory);
        let group = service.group("product-catalogue");
        service.consume(
            &group,
            &naming.events(&settings.inventory, PRODUCT_AGGREGATE)?,
            products::updates(&catalogue),
        )?;
        let backfill = directory.clone();
        service.run("customer backfill", move |token| async move {
            backfill.backfill(token).await
        });

        // `Idempotency-Key`s are kept a day, purged hourly.
        let keys = Idempotency::new(pool.clone());
        let purge = keys.clone();
        service.run("idempotency purge", move |stop| {
            purge.purge_periodically(Duration::from_secs(3600), stop)
        });

        Ok(Self {
            pool,
            outbox,
            orchestrator,
            customers: directory,
            products: catalogue,
            keys,
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/quotes", post(create_quote))
            .route("/quotes/{id}", get(get_quote))
            .route("/quotes/{id}/customer", get(get_customer))
            .route("/quotes/{id}/accept", post(accept_quote))
            .layer(self.keys.clone())
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }

    /// The orchestrator of the service's sagas (for operators and tests).
    pub fn orchestrator(&self) -> &Orchestrator {
        &self.orchestrator
    }
}

/// Body of `POST /quotes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateQuote {
    /// The customer (known to the customer service).
    pub customer_id: Uuid,
    /// The sales rep's email address.
    pub sales_rep: String,
    /// The lines: at least one.
    pub lines: Vec<LineRequest>,
    /// Machines configured for the customer.
    #[serde(default)]
    pub machine_configurations: Vec<MachineConfiguration>,
}

/// A line of `POST /quotes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    /// The product: one of the inventory's.
    pub product_id: Uuid,
    /// How many; above zero.
    pub quantity: i64,
    /// The unit price, in cents; the product's list price when left out.
    #[serde(default)]
    pub unit_price_cents: Option<i64>,
}

/// A machine configured on a quote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// The machine (model).
    pub machine: String,
    /// Its options.
    #[serde(default)]
    pub options: serde_json::Value,
}

/// A quote as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuoteView {
    /// Id.
    pub id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// The customer's name and tax number from the replica (`None` while it has not
    /// arrived).
    pub customer: Option<CustomerDetails>,
    /// The sales rep.
    pub sales_rep: String,
    /// `New`, `Awaiting Stock`, `Stock Reserved`, `Pending Stock`, `Ordering`, `Ordered`
    /// or `Order Failed`.
    pub status: String,
    /// Why it is `Pending Stock` or `Order Failed`.
    pub status_reason: Option<String>,
    /// Its value, in cents.
    pub total_cents: i64,
    /// Its lines.
    pub lines: Vec<QuoteLine>,
    /// Its machine configurations.
    pub machine_configurations: Vec<MachineConfiguration>,
    /// The purchase order, once ordered.
    pub purchase_order_id: Option<Uuid>,
    /// The stock check saga.
    pub stock_saga: Option<Uuid>,
    /// The order saga, once accepted.
    pub order_saga: Option<Uuid>,
    /// Version, incremented by every change.
    pub version: i64,
}

fn internal(error: impl std::fmt::Display) -> Problem {
    tracing::error!(%error, "request failed");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn create_quote(State(app): State<App>, body: Json<CreateQuote>) -> Result<Response, Problem> {
    let Json(request) = body;
    let mut fields = Fields::new();
    let sales_rep = fields.email("sales_rep", &request.sales_rep).to_owned();
    if request.lines.is_empty() {
        fields.invalid("lines", "a quote has at least one line");
    }
    if request.lines.len() > MAX_LINES {
        fields.invalid("lines", format!("at most {MAX_LINES} lines"));
    }
    for (n, line) in request.lines.iter().enumerate() {
        if line.quantity <= 0 {
            fields.invalid(&format!("lines[{n}].quantity"), "must be above zero");
        }
        if line.unit_price_cents.is_some_and(|p| p < 0) {
            fields.invalid(&format!("lines[{n}].unit_price_cents"), "must not be negative");
        }
    }
    if request.machine_configurations.len() > MAX_MACHINES {
        fields.invalid("machine_configurations", format!("at most {MAX_MACHINES}"));
    }
    for (n, machine) in request.machine_configurations.iter().enumerate() {
        fields.text(&format!("machine_configurations[{n}].machine"), &machine.machine, 200);
        if !(machine.options.is_object() || machine.options.is_null()) {
            fields.invalid(&format!("machine_configurations[{n}].options"), "must be an object");
        }
    }
    // Every product must be the inventory's; a line without a price takes its list price.
    let mut lines = Vec::with_capacity(request.lines.len());
    for (n, line) in request.lines.iter().enumerate() {
        let product = app.products.get(&line.product_id).await.map_err(|error| {
            tracing::warn!(%error, "product catalogue unavailable");
            Problem::unavailable().detail("the inventory's product catalogue cannot be loaded")
        })?;
        match product {
            Some(product) => lines.push(QuoteLine {
                product_id: line.product_id,
                quantity: line.quantity,
                unit_price_cents: line.unit_price_cents.unwrap_or(product.unit_price_cents),
            }),
            None => fields.invalid(
                &format!("lines[{n}].product_id"),
                format!("no product {}", line.product_id),
            ),
        }
    }
    fields.finish()?;
    let total = lines
        .iter()
        .try_fold(0i64, |sum, l| {
            l.quantity
                .checked_mul(l.unit_price_cents)
                .and_then(|v| sum.checked_add(v))
        })
        .ok_or_else(|| Problem::new(StatusCode::UNPROCESSABLE_ENTITY).detail("the quote's total is too large"))?;
    // The customer must exist: the replica knows it, or the customer service does.
    app.customers.require(request.customer_id).await?;

    let id = Uuid::now_v7();
    let mut tx = app.pool.begin().await.map_err(internal)?;
    sqlx::query("insert into quotes (id, customer_id, sales_rep, status, total_cents) values ($1, $2, $3, 'New', $4)")
        .bind(id)
        .bind(request.customer_id)
        .bind(&sales_rep)
        .bind(total)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    for (n, line) in lines.iter().enumerate() {
        sqlx::query(
            "insert into quote_line_items (quote_id, line_no, product_id, quantity, unit_price_cents) values ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(i32::try_from(n + 1).unwrap_or(i32::MAX))
        .bind(line.product_id)
        .bind(line.quantity)
        .bind(line.unit_price_cents)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    }
    for machine in &request.machine_configurations {
        let options = if machine.options.is_null() {
            serde_json::json!({})
        } else {
            machine.options.clone()
        };
        sqlx::query("insert into machine_configurations (id, quote_id, machine, options) values ($1, $2, $3, $4)")
            .bind(Uuid::now_v7())
            .bind(id)
            .bind(&machine.machine)
            .bind(options)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
    }
    let created = QuoteCreated {
        quote_id: id,
        customer_id: request.customer_id,
        sales_rep: sales_rep.clone(),
        lines: lines.clone(),
    };
    app.outbox
        .enqueue_event(&mut tx, AGGREGATE, &id.to_string(), &created)
        .await
        .map_err(internal)?;
    let check = StockCheck {
        quote_id: id,
        customer_id: request.customer_id,
        sales_rep,
        answer: None,
    };
    let saga = app
        .orchestrator
        .start(&mut tx, sagas::STOCK_SAGA, &check)
        .await
        .map_err(internal)?;
    sqlx::query("update quotes set stock_saga = $2 where id = $1")
        .bind(id)
        .bind(saga)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    tracing::info!(quote = %id, "quote created");
    let view = load(&app, id)
        .await?
        .ok_or_else(|| internal("the new quote vanished"))?;
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, format!("/quotes/{id}"))],
        Json(view),
    )
        .into_response())
}

/// A quote row.
#[derive(sqlx::FromRow)]
struct QuoteRow {
    id: Uuid,
    customer_id: Uuid,
    sales_rep: String,
    status: String,
    status_reason: Option<String>,
    total_cents: i64,
    purchase_order_id: Option<Uuid>,
    stock_saga: Option<Uuid>,
    order_saga: Option<Uuid>,
    version: i64,
}

async fn load(app: &App, id: Uuid) -> Result<Option<QuoteView>, Problem> {
    let Some(row) = sqlx::query_as::<_, QuoteRow>(
        "select id, customer_id, sales_rep, status, status_reason, total_cents, purchase_order_id, stock_saga, \
         order_saga, version from quotes where id = $1",
    )
    .bind(id)
    .fetch_optional(&app.pool)
    .await
    .map_err(internal)?
    else {
        return Ok(None);
    };
    let lines: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "select product_id, quantity, unit_price_cents from quote_line_items where quote_id = $1 order by line_no",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .map_err(internal)?;
    let machines: Vec<(String, serde_json::Value)> =
        sqlx::query_as("select machine, options from machine_configurations where quote_id = $1 order by id")
            .bind(id)
            .fetch_all(&app.pool)
            .await
            .map_err(internal)?;
    let mut status_reason = row.status_reason;
    // An order that failed says why: the saga's last error (a rejection, a timeout).
    if row.status == "Order Failed"
        && status_reason.is_none()
        && let Some(saga) = row.order_saga
    {
        status_reason = app
            .orchestrator
            .get(saga)
            .await
            .map_err(internal)?
            .and_then(|s| s.last_error);
    }
    Ok(Some(QuoteView {
        id: row.id,
        customer_id: row.customer_id,
        customer: customers::cached(&app.pool, row.customer_id).await.map_err(internal)?,
        sales_rep: row.sales_rep,
        status: row.status,
        status_reason,
        total_cents: row.total_cents,
        lines: lines
            .into_iter()
            .map(|(product_id, quantity, unit_price_cents)| QuoteLine {
                product_id,
                quantity,
                unit_price_cents,
            })
            .collect(),
        machine_configurations: machines
            .into_iter()
            .map(|(machine, options)| MachineConfiguration { machine, options })
            .collect(),
        purchase_order_id: row.purchase_order_id,
        stock_saga: row.stock_saga,
        order_saga: row.order_saga,
        version: row.version,
    }))
}

fn quote_id(raw: &str) -> Result<Uuid, Problem> {
    raw.parse().map_err(|_| Problem::not_found(format!("quote {raw}")))
}

async fn get_quote(State(app): State<App>, Path(id): Path<String>) -> Result<Json<QuoteView>, Problem> {
    let id = quote_id(&id)?;
    load(&app, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("quote {id}")))
}

async fn get_customer(State(app): State<App>, Path(id): Path<String>) -> Result<Json<CustomerDetails>, Problem> {
    let id = quote_id(&id)?;
    let customer: Option<Uuid> = sqlx::query_scalar("select customer_id from quotes where id = $1")
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .map_err(internal)?;
    let customer = customer.ok_or_else(|| Problem::not_found(format!("quote {id}")))?;
    Ok(Json(app.customers.fresh(customer).await?))
}

async fn accept_quote(State(app): State<App>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = quote_id(&id)?;
    let mut tx = app.pool.begin().await.map_err(internal)?;
    let row: Option<(String, Uuid, i64)> =
        sqlx::query_as("select status, customer_id, total_cents from quotes where id = $1 for update")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(internal)?;
    let (status, customer_id, total_cents) = row.ok_or_else(|| Problem::not_found(format!("quote {id}")))?;
    if status != "Stock Reserved" {
        return Err(Problem::new(StatusCode::CONFLICT)
            .title("The quote cannot be accepted")
            .detail(format!(
                "the quote is {status:?}; only a quote with its stock reserved can be accepted"
            ))
            .with("status", status));
    }
    let lines: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "select product_id, quantity, unit_price_cents from quote_line_items where quote_id = $1 order by line_no",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .map_err(internal)?;
    let order = Order {
        quote_id: id,
        customer_id,
        lines: lines
            .into_iter()
            .map(|(product_id, quantity, unit_price_cents)| QuoteLine {
                product_id,
                quantity,
                unit_price_cents,
            })
            .collect(),
        total_cents,
        purchase_order_id: None,
    };
    let saga = app
        .orchestrator
        .start(&mut tx, sagas::ORDER_SAGA, &order)
        .await
        .map_err(internal)?;
    sqlx::query("update quotes set order_saga = $2 where id = $1")
        .bind(id)
        .bind(saga)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    tracing::info!(quote = %id, saga = %saga, "quote accepted");
    let view = load(&app, id).await?.ok_or_else(|| internal("the quote vanished"))?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}
