//! The customer service of the dbps example system.
//!
//! It owns the `customers`, `customer_addresses`, `customer_contacts` and
//! `machine_history` tables in its own PostgreSQL database, provisioned and migrated by
//! dbps' migration runner (`customer_owner` runs the migrations, `customer_app` serves
//! requests and cannot run DDL). It serves:
//!
//! - `POST /customers` — creates a customer and enqueues `customer.CustomerCreated`;
//! - `PUT /customers/{id}` — changes it and enqueues `customer.CustomerUpdated`;
//! - `GET /customers/{id}` and `GET /health`.
//!
//! Each change and its event commit in one transaction through the outbox; a relay in
//! the same process publishes the events to `customer.customer.events`, keyed by the
//! customer id, with the customer's version as the aggregate sequence number. It is the
//! source of truth that the quote service's `customer_cache` and the email service's
//! `customer_email_index` replicate.

pub mod events;

use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicNaming, TopicSpec, ensure_topics};
use dbps_migrate::{Password, PgService};
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::events::{CustomerCreated, CustomerUpdated};

/// The service's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The aggregate type of customers (and the middle of the events topic's name).
pub const AGGREGATE: &str = "customer";

/// Provisions the service's database and roles, applies the outbox's and the service's
/// migrations as the owner role, and returns a pool connected as the runtime role.
pub async fn prepare(
    admin: &PgConnectOptions,
    service: &PgService,
    owner_password: &Password,
    runtime_password: &Password,
) -> anyhow::Result<PgPool> {
    service
        .provision(admin, owner_password, runtime_password)
        .await
        .context("provisioning the database")?;
    let report = service
        .migrations()
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component(service.service().as_str(), &MIGRATOR)
        .run(&service.owner_options(admin, owner_password))
        .await
        .context("migrating the database")?;
    tracing::info!(applied = report.applied_count(), "database migrated");
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(service.runtime_options(admin, runtime_password))
        .await
        .context("connecting as the runtime role")?;
    Ok(pool)
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    pool: PgPool,
    outbox: PgOutbox,
    topic: String,
}

impl App {
    /// The service over `pool`, publishing customer events to `topic`.
    pub fn new(pool: PgPool, topic: impl Into<String>) -> Self {
        let topic = topic.into();
        let naming = TopicNaming::new().events_pattern(topic.clone());
        Self {
            pool,
            outbox: PgOutbox::new("customer").naming(naming),
            topic,
        }
    }

    /// The events topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/customers", post(create_customer))
            .route("/customers/{id}", get(get_customer).put(update_customer))
            .with_state(self.clone())
    }

    /// Creates the events topic if it does not exist.
    pub async fn ensure_topic(&self, kafka: &KafkaConfig) -> anyhow::Result<()> {
        ensure_topics(kafka, &[TopicSpec::new(&self.topic, 3)])
            .await
            .context("creating the events topic")?;
        Ok(())
    }

    /// Runs the outbox relay until `shutdown` completes.
    pub async fn relay(&self, kafka: &KafkaConfig, shutdown: dbps_core::CancellationToken) -> anyhow::Result<()> {
        // No message timeout: during a broker outage the relay waits instead of failing.
        let publisher = KafkaPublisher::builder(kafka.clone().set("message.timeout.ms", "0")).build()?;
        let relay = Relay::builder(PgOutboxStore::new(self.pool.clone()), publisher).build()?;
        let summary = relay.run(shutdown).await?;
        tracing::info!(published = summary.published, parked = summary.parked, "relay stopped");
        Ok(())
    }
}

/// A customer as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Customer {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
    /// Email address.
    pub email: String,
    /// Version, incremented by every change (the events' sequence number).
    pub version: i64,
}

/// Body of `POST /customers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateCustomer {
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
    /// Email address.
    pub email: String,
}

/// Body of `PUT /customers/{id}`: the fields to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateCustomer {
    /// New name.
    pub name: Option<String>,
    /// New tax number.
    pub tax_number: Option<String>,
    /// New email address.
    pub email: Option<String>,
}

/// Errors of the API, as HTTP responses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such customer.
    #[error("customer {0} not found")]
    NotFound(Uuid),
    /// The database failed.
    #[error("database unavailable")]
    Database(#[from] sqlx::Error),
    /// The outbox refused the event or failed.
    #[error("event could not be recorded")]
    Outbox(#[from] dbps_outbox::OutboxError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Database(_) | Self::Outbox(_) => {
                tracing::error!(error = ?self, "request failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}

fn validate(name: Option<&str>, tax_number: Option<&str>, email: Option<&str>) -> Result<(), ApiError> {
    if name.is_some_and(|n| n.trim().is_empty() || n.len() > 200) {
        return Err(ApiError::Invalid("name must have 1 to 200 characters".into()));
    }
    if tax_number.is_some_and(|t| t.trim().is_empty() || t.len() > 64) {
        return Err(ApiError::Invalid("tax_number must have 1 to 64 characters".into()));
    }
    if email.is_some_and(|e| !e.get(1..).is_some_and(|rest| rest.contains('@'))) {
        return Err(ApiError::Invalid("email must be an address".into()));
    }
    Ok(())
}

async fn create_customer(
    State(app): State<App>,
    Json(body): Json<CreateCustomer>,
) -> Result<(StatusCode, Json<Customer>), ApiError> {
    validate(Some(&body.name), Some(&body.tax_number), Some(&body.email))?;
    let mut tx = app.pool.begin().await?;
    let customer: Customer = sqlx::query_as(
        "insert into customers (id, name, tax_number, email) values ($1, $2, $3, $4)
         returning id, name, tax_number, email, version",
    )
    .bind(Uuid::now_v7())
    .bind(body.name.trim())
    .bind(body.tax_number.trim())
    .bind(body.email.trim())
    .fetch_one(&mut *tx)
    .await?;
    let event = CustomerCreated::from(&customer);
    app.outbox
        .enqueue_event(&mut tx, AGGREGATE, &customer.id.to_string(), &event)
        .await?;
    tx.commit().await?;
    tracing::info!(id = %customer.id, "customer created");
    Ok((StatusCode::CREATED, Json(customer)))
}

async fn update_customer(
    State(app): State<App>,
    Path(id): Path<Uuid>,
    Json(body): Json<UpdateCustomer>,
) -> Result<Json<Customer>, ApiError> {
    validate(body.name.as_deref(), body.tax_number.as_deref(), body.email.as_deref())?;
    let mut tx = app.pool.begin().await?;
    // The row lock taken here also orders concurrent updates of one customer, so versions
    // and event sequence numbers agree.
    let customer: Option<Customer> = sqlx::query_as(
        "update customers set name = coalesce($2, name), tax_number = coalesce($3, tax_number),
             email = coalesce($4, email), version = version + 1, updated_at = now()
         where id = $1 returning id, name, tax_number, email, version",
    )
    .bind(id)
    .bind(body.name.as_deref().map(str::trim))
    .bind(body.tax_number.as_deref().map(str::trim))
    .bind(body.email.as_deref().map(str::trim))
    .fetch_optional(&mut *tx)
    .await?;
    let customer = customer.ok_or(ApiError::NotFound(id))?;
    let event = CustomerUpdated::from(&customer);
    app.outbox
        .enqueue_event(&mut tx, AGGREGATE, &customer.id.to_string(), &event)
        .await?;
    tx.commit().await?;
    tracing::info!(%id, version = customer.version, "customer updated");
    Ok(Json(customer))
}

async fn get_customer(State(app): State<App>, Path(id): Path<Uuid>) -> Result<Json<Customer>, ApiError> {
    let customer: Option<Customer> =
        sqlx::query_as("select id, name, tax_number, email, version from customers where id = $1")
            .bind(id)
            .fetch_optional(&app.pool)
            .await?;
    customer.map(Json).ok_or(ApiError::NotFound(id))
}

/// How long the binary waits for in-flight requests at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
