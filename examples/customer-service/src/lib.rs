//! The customer service of the dbps example system.
//!
//! It owns the `customers`, `customer_addresses`, `customer_contacts` and
//! `machine_history` tables in its own PostgreSQL database, provisioned and migrated at
//! start (`customer_owner` runs the migrations, `customer_app` serves requests and cannot
//! run DDL).
//!
//! # Endpoints
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /customers` | [`CreateCustomer`] | `201`, the [`Customer`], `ETag` and `Location` |
//! | `GET /customers?limit=&after=` | | `200`, a [`CustomerPage`] |
//! | `GET /customers/search?q=&limit=` | | `200`, [`search::SearchResults`]; `503` when search cannot answer |
//! | `GET /customers/{id}` | | `200`, the [`CustomerView`], `ETag`; `304` on a matching `If-None-Match` |
//! | `PUT /customers/{id}` | [`UpdateCustomer`] | `200`, the [`Customer`], `ETag` |
//! | `POST /customers/{id}/addresses` | [`NewAddress`] | `201`, the [`Address`], `ETag` |
//! | `GET /customers/{id}/addresses` | | `200`, `[Address, ...]` |
//! | `POST /customers/{id}/contacts` | [`NewContact`] | `201`, the [`Contact`], `ETag` |
//! | `GET /customers/{id}/contacts` | | `200`, `[Contact, ...]` |
//! | `GET /customers/{id}/machines` | | `200`, `[Machine, ...]` |
//! | `GET /snapshot/customers...` | | the replicas' snapshot ([`snapshot`]) |
//! | `GET /health`, `GET /metrics` | | liveness, Prometheus metrics |
//!
//! In JSON:
//!
//! - a [`Customer`] is `{"id", "name", "tax_number", "email", "version"}`;
//! - a [`CustomerView`] is a customer's fields with `"addresses": [Address, ...]`,
//!   `"contacts": [Contact, ...]` and `"machines": [Machine, ...]`, each oldest first;
//! - a [`CustomerPage`] is `{"customers": [Customer, ...], "next": "<id>" or null}`:
//!   customers in id order, `limit` 1 to 500 (default 50), `next` the `after` of the
//!   following page, `null` on the last one;
//! - an [`Address`] is `{"id", "kind": "billing" | "shipping" | "site", "street", "city",
//!   "postal_code", "country"}` (`country` an assigned ISO 3166-1 alpha-2 code);
//! - a [`Contact`] is `{"id", "name", "email": "..." | null, "phone": "..." | null}`;
//! - a [`Machine`] is `{"machine", "installed_at"}`.
//!
//! # Versions and events
//!
//! Every change of a customer — created, changed, an address or a contact added, a machine
//! recorded — raises its version by one and enqueues one event in the same transaction
//! through the outbox: `customer.CustomerCreated`, then `customer.CustomerUpdated` for each
//! further change, each carrying the customer's id, name, tax number, email and new
//! version, with its addresses and machine history as they are then (an added address,
//! contact or machine changes none of the four fields; the event says the customer is at a
//! new version). The relay publishes them to `customer.customer.events`, keyed by the customer
//! id, each with the customer's version as its sequence number. The version is the `ETag`;
//! `PUT` and the `POST`s of addresses and contacts honour `If-Match: "<version>"` (`412` if
//! the customer changed since).
//!
//! It is the source of truth that the quote service's `customer_cache` and the email
//! service's `customer_email_index` replicate: from the events, and, to fill a new replica
//! or repair one, from the paged snapshot at [`SNAPSHOT_PATH`] (see [`snapshot`] for the
//! routes and the record's JSON).
//!
//! # Commands
//!
//! It consumes commands from `customer.commands`: `customer.RecordMachineInstalled`
//! (sent when a machine is delivered) adds a row to the customer's machine history,
//! exactly once however often Kafka delivers it — the effect, the new version, its event
//! and the inbox record commit together.
//!
//! # Search
//!
//! `GET /customers/search?q=<text>` finds customers by the words of their name, email,
//! addresses and machines (every word must occur somewhere), best match first, from an
//! OpenSearch projection of the service's own events that runs beside the relay (see
//! [`search`]). The answer says how fresh the index is:
//! `{"results": [...], "as_of": "<source time of the newest applied event>", "lag_ms": n}`.
//! The cluster is [`Settings::opensearch_url`] (`DBPS_OPENSEARCH_URL`); without it, or when
//! OpenSearch cannot answer, search is a `503` problem.
//!
//! Every client mistake is a 4xx `application/problem+json` answer, found before anything
//! is written; logs carry ids, never a customer's name or address.

mod countries;
mod details;
pub mod events;
pub mod search;
pub mod snapshot;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dbps_core::inbox::pg::{PgInbox, TypedTxHandler};
use dbps_core::kafka::{HandlerError, TopicSpec};
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

pub use crate::details::{Address, AddressKind, Contact, Machine, NewAddress, NewContact};
use crate::events::{CustomerCommand, CustomerCreated, CustomerUpdated, RecordMachineInstalled};
pub use crate::snapshot::SNAPSHOT_PATH;

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
/// Customers in a page of `GET /customers` unless the request says otherwise.
const DEFAULT_PAGE: u32 = 50;
/// Most customers in a page of `GET /customers`.
const MAX_PAGE: u32 = 500;

/// The migration components of the service's database, in order: the framework's tables,
/// then the service's own.
pub fn components() -> [(&'static str, &'static Migrator); 3] {
    [
        ("dbps_outbox", &dbps_outbox::pg::MIGRATOR),
        ("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR),
        (SERVICE, &MIGRATOR),
    ]
}

/// How long the search projection waits before it starts again after a transient
/// failure that ended its run.
const SEARCH_RESTART: std::time::Duration = std::time::Duration::from_secs(1);

/// The service's settings beyond [`dbps_service::ServiceConfig`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Settings {
    /// The OpenSearch cluster of customer search (`http://host:port`); without it,
    /// `GET /customers/search` answers `503`.
    pub opensearch_url: Option<String>,
    /// The prefix of the search indices' names (default `<service name>-`).
    pub search_index_prefix: Option<String>,
}

impl Settings {
    /// From the environment: `DBPS_OPENSEARCH_URL` and `CUSTOMER_SEARCH_INDEX_PREFIX`
    /// (both optional).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            opensearch_url: var("DBPS_OPENSEARCH_URL"),
            search_index_prefix: var("CUSTOMER_SEARCH_INDEX_PREFIX"),
        }
    }

    /// Searches in the OpenSearch cluster at `url`.
    pub fn opensearch(mut self, url: impl Into<String>) -> Self {
        self.opensearch_url = Some(url.into());
        self
    }

    /// Names the search indices with `prefix`.
    pub fn search_index_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.search_index_prefix = Some(prefix.into());
        self
    }
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    pool: PgPool,
    outbox: PgOutbox,
    snapshot: dbps_cache::replica::PgSnapshotSource,
    search: Option<dbps_cache::projection::OsProjection<search::CustomerSearch>>,
}

impl App {
    /// Prepares the service's database and starts its relay and its command consumer on
    /// `service` (both create their topics if they are missing), without customer search.
    /// Serve [`App::router`] with it next.
    pub async fn start(service: &mut Service) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_with(service, Settings::default()).await
    }

    /// [`App::start`], and with an OpenSearch URL in `settings` the search projection
    /// beside the relay.
    pub async fn start_with(
        service: &mut Service,
        settings: Settings,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let pool = service.postgres(&components()).await?;
        let naming = service.naming();
        // Topics are named after the service's configured name (`customer`, or a test's
        // unique one), as its outbox names them.
        let name = service.name().to_string();

        let events = naming.events(&name, AGGREGATE)?;
        let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?)
            .create_topics([TopicSpec::new(events.clone(), 3)])
            .build()?;
        service.run_relay(relay);

        let search = match &settings.opensearch_url {
            Some(url) => {
                let prefix = settings
                    .search_index_prefix
                    .clone()
                    .unwrap_or_else(|| format!("{}-", name.to_lowercase()));
                // Its reader's group is the service's own (`customer.projection-…`).
                let projection = search::projection(url, &prefix, &events, &service.group("projection-"))?;
                run_search(service, projection.clone())?;
                Some(projection)
            }
            None => {
                tracing::info!("no DBPS_OPENSEARCH_URL: customer search is off");
                None
            }
        };

        let group = service.group(COMMANDS_CONSUMER);
        let inbox = PgInbox::new(
            pool.clone(),
            group.clone(),
            Typed::new(MachineHistory::new(service.outbox())),
        );
        service.consume(&group, &naming.commands(&name)?, inbox)?;

        Ok(Self {
            snapshot: snapshot::snapshot_source(pool.clone())?,
            pool,
            outbox: service.outbox(),
            search,
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/customers", post(create_customer).get(list_customers))
            .route("/customers/search", get(search::search))
            .route("/customers/{id}", get(get_customer).put(update_customer))
            .route(
                "/customers/{id}/addresses",
                post(details::add_address).get(details::get_addresses),
            )
            .route(
                "/customers/{id}/contacts",
                post(details::add_contact).get(details::get_contacts),
            )
            .route("/customers/{id}/machines", get(details::get_machines))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
            .nest(SNAPSHOT_PATH, snapshot::routes(self.snapshot.clone()))
    }
}

/// Runs the search projection until the service stops, starting it again after a
/// transient failure (OpenSearch or Kafka unreachable, the events topic not created yet).
fn run_search(
    service: &mut Service,
    projection: dbps_cache::projection::OsProjection<search::CustomerSearch>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let kafka = service.kafka()?.clone();
    service.run("customer search", move |shutdown| async move {
        loop {
            match projection.run(&kafka, shutdown.clone()).await {
                Ok(summary) => {
                    tracing::info!(records = summary.records, superseded_by = ?summary.superseded_by, "customer search stopped");
                    return Ok(());
                }
                Err(error) if error.is_transient() && !shutdown.is_cancelled() => {
                    tracing::warn!(%error, "customer search failed; starting again");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(SEARCH_RESTART) => {}
                    }
                }
                Err(error) if shutdown.is_cancelled() => {
                    tracing::info!(%error, "customer search stopped");
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
        }
    });
    Ok(())
}

/// Records delivered machines in the customer's history, inside the inbox's transaction.
/// A recorded machine is a change of the customer: its version goes up and
/// `customer.CustomerUpdated` (with the machine history) is enqueued in the same
/// transaction.
#[derive(Debug, Clone)]
pub struct MachineHistory {
    outbox: PgOutbox,
}

impl MachineHistory {
    /// The handler, enqueueing its events in `outbox`.
    pub fn new(outbox: PgOutbox) -> Self {
        Self { outbox }
    }
}

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
        let customer: Option<Customer> = sqlx::query_as(
            "update customers set version = version + 1, updated_at = now() where id = $1
             returning id, name, tax_number, email, version",
        )
        .bind(customer_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(customer) = customer else {
            // Retrying cannot make an unknown customer appear: dead-letter it.
            return Err(HandlerError::permanent(format!("no customer {customer_id}")));
        };
        sqlx::query("insert into machine_history (id, customer_id, machine, installed_at) values ($1, $2, $3, $4)")
            .bind(Uuid::now_v7())
            .bind(customer_id)
            .bind(&machine)
            .bind(installed_at)
            .execute(&mut *conn)
            .await?;
        let event = details::updated(conn, &customer).await?;
        self.outbox
            .enqueue_event(conn, AGGREGATE, &customer_id.to_string(), &event)
            .await
            .map_err(|error| {
                if error.is_transient() {
                    HandlerError::transient(error)
                } else {
                    HandlerError::permanent(error)
                }
            })?;
        tracing::info!(customer = %customer_id, message_id = %envelope.id, version = customer.version, "machine recorded");
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

/// `GET /customers/{id}`: the customer with its addresses, contacts and machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerView {
    /// The customer.
    #[serde(flatten)]
    pub customer: Customer,
    /// Its addresses, oldest first.
    #[serde(default)]
    pub addresses: Vec<Address>,
    /// Its contacts, oldest first.
    #[serde(default)]
    pub contacts: Vec<Contact>,
    /// Its machine history, oldest first.
    pub machines: Vec<Machine>,
}

/// `GET /customers?limit=&after=`: a page of customers in id order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerPage {
    /// The customers of this page.
    pub customers: Vec<Customer>,
    /// The id to ask the next page `after`; `None` on the last page.
    pub next: Option<Uuid>,
}

/// The query of `GET /customers`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListCustomers {
    /// Most customers in the page: 1 to 500, default 50.
    pub limit: Option<u32>,
    /// Only customers whose id comes after this one (the previous page's `next`).
    pub after: Option<Uuid>,
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
pub(crate) fn unavailable(error: &dyn std::error::Error) -> Problem {
    tracing::error!(%error, "request failed");
    Problem::unavailable()
}

pub(crate) fn db(error: sqlx::Error) -> Problem {
    unavailable(&error)
}

/// The outbox refuses an event for what it is (over the payload limits) — a client's
/// data made it so: `422`; anything else is the database: `503`.
pub(crate) fn outbox_error(error: dbps_outbox::OutboxError) -> Problem {
    match error {
        dbps_outbox::OutboxError::Message(refused) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY).detail(format!("the change cannot be recorded: {refused}"))
        }
        other => unavailable(&other),
    }
}

/// The customer with its version as `ETag`.
pub(crate) fn with_etag(status: StatusCode, customer: impl Serialize, version: i64) -> Response {
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
    // The row is locked: no address or machine is added meanwhile.
    let addresses = details::load_addresses(&mut tx, id).await.map_err(db)?;
    let machines = details::load_machines(&mut tx, id).await.map_err(db)?;
    let customer = store(
        tx,
        &app.outbox,
        "update customers set name = $2, tax_number = $3, email = $4, version = version + 1, updated_at = now()
         where id = $1 returning id, name, tax_number, email, version",
        &changed,
        |c: &Customer| CustomerUpdated::with_details(c, addresses, machines),
    )
    .await?;
    tracing::info!(%id, version = customer.version, "customer updated");
    let version = customer.version;
    Ok(with_etag(StatusCode::OK, customer, version))
}

async fn get_customer(State(app): State<App>, Path(id): Path<Uuid>, headers: HeaderMap) -> Result<Response, Problem> {
    // One consistent state: the version (the ETag) and the addresses and contacts it
    // covers.
    let mut tx = details::snapshot_read(&app).await?;
    let customer: Customer = sqlx::query_as("select id, name, tax_number, email, version from customers where id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .ok_or_else(|| Problem::not_found(format!("customer {id}")))?;
    let tag = etag(customer.version);
    if headers.get(header::IF_NONE_MATCH) == Some(&tag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response());
    }
    let addresses = details::addresses(&mut tx, id).await?;
    let contacts = details::contacts(&mut tx, id).await?;
    let machines = details::machines(&mut tx, id).await?;
    tx.commit().await.map_err(db)?;
    let version = customer.version;
    let view = CustomerView {
        customer,
        addresses,
        contacts,
        machines,
    };
    Ok(with_etag(StatusCode::OK, view, version))
}

async fn list_customers(
    State(app): State<App>,
    Query(query): Query<ListCustomers>,
) -> Result<Json<CustomerPage>, Problem> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        let mut fields = Fields::new();
        fields.invalid("limit", format!("must be 1 to {MAX_PAGE}"));
        fields.finish()?;
    }
    // One more than asked tells whether there is a next page. Ids are UUIDv7, never the
    // nil UUID, so the first page is the one after it: always a range scan of the key.
    let mut customers: Vec<Customer> = sqlx::query_as(
        "select id, name, tax_number, email, version from customers
         where id > coalesce($1, '00000000-0000-0000-0000-000000000000'::uuid) order by id limit $2",
    )
    .bind(query.after)
    .bind(i64::from(limit) + 1)
    .fetch_all(&app.pool)
    .await
    .map_err(db)?;
    let more = customers.len() > limit as usize;
    customers.truncate(limit as usize);
    let next = more.then(|| customers.last().map(|c| c.id)).flatten();
    Ok(Json(CustomerPage { customers, next }))
}
