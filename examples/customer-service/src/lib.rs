//! The customer service of the dbps example system.
//!
//! It owns the `customers`, `customer_addresses`, `customer_contacts` and
//! `machine_history` tables in its own PostgreSQL database, provisioned and migrated at
//! start (`customer_owner` runs the migrations, `customer_app` serves requests and cannot
//! run DDL). It serves:
//!
//! - `POST /customers` — creates a customer and enqueues `customer.CustomerCreated`;
//! - `PUT /customers/{id}` — changes it and enqueues `customer.CustomerUpdated`; with
//!   `If-Match: "<version>"` only if nobody changed it since that version (else `412`);
//! - `GET /customers/{id}` — the customer with its version as `ETag` and its machines;
//! - `/health` and `/metrics`.
//!
//! Each change and its event commit in one transaction through the outbox; the relay
//! publishes them to `customer.customer.events`, keyed by the customer id, each with the
//! customer's version as its sequence number. It is the source of truth that the quote
//! service's `customer_cache` and the email service's `customer_email_index` replicate.
//!
//! It also consumes commands from `customer.commands`: `customer.RecordMachineInstalled`
//! (sent when a machine is delivered) adds a row to the customer's machine history,
//! exactly once however often Kafka delivers it — the effect and the inbox record commit
//! together.
//!
//! Every client mistake is a 4xx `application/problem+json` answer, found before anything
//! is written; logs carry ids, never a customer's name or address.

pub mod events;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dbps_core::inbox::pg::{PgInbox, TypedTxHandler};
use dbps_core::kafka::{ConsumerRunner, HandlerError, TopicSpec};
use dbps_core::{Envelope, Typed};
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use dbps_service::Service;
use dbps_service::http::{Fields, IfMatch, Problem, etag, version_conflict};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::events::{CustomerCommand, CustomerCreated, CustomerUpdated, RecordMachineInstalled};

/// The service's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The service's name, the root of its database, roles, topics and groups.
pub const SERVICE: &str = "customer";

/// The aggregate type of customers (and the middle of the events topic's name).
pub const AGGREGATE: &str = "customer";

/// The consumer of `customer.commands` (its group is `customer.commands`).
pub const COMMANDS_CONSUMER: &str = "commands";

/// Longest name, in characters.
const MAX_NAME: usize = 200;
/// Longest tax number, in characters.
const MAX_TAX_NUMBER: usize = 64;
/// Largest request body.
const MAX_BODY: usize = 64 * 1024;

/// The migration components of the service's database, in order: the framework's tables,
/// then the service's own.
pub fn components() -> [(&'static str, &'static Migrator); 3] {
    [
        ("dbps_outbox", &dbps_outbox::pg::MIGRATOR),
        ("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR),
        (SERVICE, &MIGRATOR),
    ]
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    pool: PgPool,
    outbox: PgOutbox,
}

impl App {
    /// Prepares the service's database and starts its relay and its command consumer on
    /// `service` (both create their topics if they are missing). Serve [`App::router`]
    /// with it next.
    pub async fn start(service: &mut Service) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let pool = service.postgres(&components()).await?;
        let naming = service.naming();
        // Topics are named after the service's configured name (`customer`, or a test's
        // unique one), as its outbox names them.
        let name = service.name().to_string();

        let events = naming.events(&name, AGGREGATE)?;
        let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?)
            .create_topics([TopicSpec::new(events, 3)])
            .build()?;
        service.run_relay(relay);

        let group = service.group(COMMANDS_CONSUMER);
        let inbox = PgInbox::new(pool.clone(), group.clone(), Typed::new(MachineHistory));
        let runner = ConsumerRunner::builder(service.kafka()?.clone(), &group, inbox)
            .topic(naming.commands(&name)?)
            .dead_letter_topic(naming.dead_letter(&group)?)
            .create_topics(|name| TopicSpec::new(name, 3))
            .build()?;
        service.run_consumer(runner);

        Ok(Self {
            pool,
            outbox: service.outbox(),
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/customers", post(create_customer))
            .route("/customers/{id}", get(get_customer).put(update_customer))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }
}

/// Records delivered machines in the customer's history, inside the inbox's transaction.
#[derive(Debug)]
pub struct MachineHistory;

impl TypedTxHandler<CustomerCommand> for MachineHistory {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: CustomerCommand,
        envelope: &Envelope,
    ) -> Result<(), HandlerError> {
        let CustomerCommand::RecordMachineInstalled(RecordMachineInstalled {
            customer_id,
            machine,
            installed_at,
        }) = command;
        let inserted = sqlx::query(
            "insert into machine_history (id, customer_id, machine, installed_at)
             select $1, id, $3, $4 from customers where id = $2",
        )
        .bind(Uuid::now_v7())
        .bind(customer_id)
        .bind(&machine)
        .bind(installed_at)
        .execute(conn)
        .await?
        .rows_affected();
        if inserted == 0 {
            // Retrying cannot make an unknown customer appear: dead-letter it.
            return Err(HandlerError::permanent(format!("no customer {customer_id}")));
        }
        tracing::info!(customer = %customer_id, message_id = %envelope.id, "machine recorded");
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

/// A machine in a customer's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Machine {
    /// The machine.
    pub machine: String,
    /// When it was installed.
    pub installed_at: chrono::DateTime<chrono::Utc>,
}

/// `GET /customers/{id}`: the customer and its machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerView {
    /// The customer.
    #[serde(flatten)]
    pub customer: Customer,
    /// Its machine history, oldest first.
    pub machines: Vec<Machine>,
}

/// Body of `POST /customers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
    /// Email address.
    pub email: String,
}

/// Body of `PUT /customers/{id}`: the fields to change, at least one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateCustomer {
    /// New name.
    pub name: Option<String>,
    /// New tax number.
    pub tax_number: Option<String>,
    /// New email address.
    pub email: Option<String>,
    /// The version the change was made from (like `If-Match`).
    pub version: Option<i64>,
}

/// A database or outbox failure: `503`, logged without the request's data.
fn unavailable(error: &dyn std::error::Error) -> Problem {
    tracing::error!(%error, "request failed");
    Problem::unavailable()
}

fn db(error: sqlx::Error) -> Problem {
    unavailable(&error)
}

/// The outbox refuses an event for what it is (over the payload limits) — a client's
/// data made it so: `422`; anything else is the database: `503`.
fn outbox_error(error: dbps_outbox::OutboxError) -> Problem {
    match error {
        dbps_outbox::OutboxError::Message(refused) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY).detail(format!("the change cannot be recorded: {refused}"))
        }
        other => unavailable(&other),
    }
}

/// The customer with its version as `ETag`.
fn with_etag(status: StatusCode, customer: impl Serialize, version: i64) -> Response {
    (status, [(header::ETAG, etag(version))], Json(customer)).into_response()
}

/// Writes `customer` with `sql` (an insert or an update binding id, name, tax number and
/// email, returning the row) and the event `event` makes of the result, in one
/// transaction.
async fn store<E: dbps_core::Message>(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    outbox: &PgOutbox,
    sql: &'static str,
    customer: &Customer,
    event: impl FnOnce(&Customer) -> E,
) -> Result<Customer, Problem> {
    let stored: Customer = sqlx::query_as(sql)
        .bind(customer.id)
        .bind(&customer.name)
        .bind(&customer.tax_number)
        .bind(&customer.email)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    outbox
        .enqueue_event(&mut tx, AGGREGATE, &stored.id.to_string(), &event(&stored))
        .await
        .map_err(outbox_error)?;
    tx.commit().await.map_err(db)?;
    Ok(stored)
}

async fn create_customer(State(app): State<App>, Json(body): Json<CreateCustomer>) -> Result<Response, Problem> {
    let mut fields = Fields::new();
    let name = fields.text("name", &body.name, MAX_NAME);
    let tax_number = fields.text("tax_number", &body.tax_number, MAX_TAX_NUMBER);
    let email = fields.email("email", &body.email);
    fields.finish()?;

    let draft = Customer {
        id: Uuid::now_v7(),
        name: name.to_owned(),
        tax_number: tax_number.to_owned(),
        email: email.to_owned(),
        version: 1,
    };
    let tx = app.pool.begin().await.map_err(db)?;
    let customer = store(
        tx,
        &app.outbox,
        "insert into customers (id, name, tax_number, email) values ($1, $2, $3, $4)
         returning id, name, tax_number, email, version",
        &draft,
        |c: &Customer| CustomerCreated::from(c),
    )
    .await?;
    tracing::info!(id = %customer.id, "customer created");
    let version = customer.version;
    let mut response = with_etag(StatusCode::CREATED, customer.clone(), version);
    if let Ok(location) = format!("/customers/{}", customer.id).parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn update_customer(
    State(app): State<App>,
    Path(id): Path<Uuid>,
    IfMatch(if_match): IfMatch,
    Json(body): Json<UpdateCustomer>,
) -> Result<Response, Problem> {
    let mut fields = Fields::new();
    let name = fields.optional_text("name", body.name.as_deref(), MAX_NAME);
    let tax_number = fields.optional_text("tax_number", body.tax_number.as_deref(), MAX_TAX_NUMBER);
    let email = fields.optional_email("email", body.email.as_deref());
    if name.is_none() && tax_number.is_none() && email.is_none() {
        fields.invalid("body", "name, tax_number or email must be given");
    }
    if let (Some(header), Some(body)) = (if_match, body.version)
        && header != body
    {
        fields.invalid("version", "differs from If-Match");
    }
    fields.finish()?;
    let expected = if_match.or(body.version);

    let mut tx = app.pool.begin().await.map_err(db)?;
    // The row lock taken here orders concurrent updates of one customer, so versions and
    // event sequence numbers agree.
    let current: Customer =
        sqlx::query_as("select id, name, tax_number, email, version from customers where id = $1 for update")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
            .ok_or_else(|| Problem::not_found(format!("customer {id}")))?;
    if let Some(expected) = expected
        && expected != current.version
    {
        return Err(version_conflict(expected, current.version));
    }
    let changed = Customer {
        name: name.map_or_else(|| current.name.clone(), str::to_owned),
        tax_number: tax_number.map_or_else(|| current.tax_number.clone(), str::to_owned),
        email: email.map_or_else(|| current.email.clone(), str::to_owned),
        ..current.clone()
    };
    if changed == current {
        // Nothing changes: no new version, no event.
        return Ok(with_etag(StatusCode::OK, current.clone(), current.version));
    }
    let customer = store(
        tx,
        &app.outbox,
        "update customers set name = $2, tax_number = $3, email = $4, version = version + 1, updated_at = now()
         where id = $1 returning id, name, tax_number, email, version",
        &changed,
        |c: &Customer| CustomerUpdated::from(c),
    )
    .await?;
    tracing::info!(%id, version = customer.version, "customer updated");
    let version = customer.version;
    Ok(with_etag(StatusCode::OK, customer, version))
}

async fn get_customer(State(app): State<App>, Path(id): Path<Uuid>, headers: HeaderMap) -> Result<Response, Problem> {
    let customer: Customer = sqlx::query_as("select id, name, tax_number, email, version from customers where id = $1")
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .map_err(db)?
        .ok_or_else(|| Problem::not_found(format!("customer {id}")))?;
    let tag = etag(customer.version);
    if headers.get(header::IF_NONE_MATCH) == Some(&tag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
    }
    let machines: Vec<Machine> = sqlx::query_as(
        "select machine, installed_at from machine_history where customer_id = $1 order by installed_at, id",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .map_err(db)?;
    let version = customer.version;
    Ok(with_etag(StatusCode::OK, CustomerView { customer, machines }, version))
}
