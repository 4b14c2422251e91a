//! The purchase-order service of the dbps example system.
//!
//! It owns the `purchase_orders`, `purchase_order_lines` and `credit_limits` tables in its
//! own PostgreSQL database, provisioned and migrated at start (`purchase_order_owner` runs
//! the migrations, `purchase_order_app` serves requests and cannot run DDL). No other
//! service reads them: they learn about purchase orders from its replies.
//!
//! # Consumes
//!
//! The quote saga's commands on `purchase_order.commands`
//! ([`PurchaseOrderCommand`]), as a saga participant ([`dbps_saga::Participant`] through a
//! [`PgInbox`]): each command is handled once however often Kafka delivers it, and its
//! effect, its inbox record and its reply (through the outbox, to the command's `reply_to`
//! topic, with the command's correlation id) commit in one transaction.
//!
//! - `purchase_order.CreatePurchaseOrder` creates the quote's purchase order and answers
//!   `purchase_order.PurchaseOrderCreated`, or answers
//!   `purchase_order.PurchaseOrderRejected { reason }` and writes nothing when a business
//!   rule says no: the order's value is over the customer's credit limit (its row in
//!   `credit_limits`, else [`Settings::default_limit_cents`]); its value is not above
//!   zero; it has no lines, or a line whose quantity is not above zero or whose price is
//!   negative; or the quote's purchase order was cancelled. A quote has one purchase
//!   order: the command sent again (under a new message id, after a timeout) answers
//!   `PurchaseOrderCreated` with the order that exists.
//! - `purchase_order.CancelPurchaseOrder`, the compensation, cancels the quote's open
//!   purchase order and answers `dbps.saga.Compensated` — also when there is none, or it
//!   was cancelled already.
//!
//! A command that cannot be decoded or has no `reply_to` is dead-lettered to
//! `purchase_order.commands.dlq`. The service publishes no events of its own: its relay
//! carries the replies, to topics the senders create.
//!
//! # Serves
//!
//! - `PUT /credit-limits/{customer_id}` `{"limit_cents": 500000}` — sets a customer's
//!   credit limit (at least zero);
//! - `GET /credit-limits/{customer_id}` — the limit in force: the customer's own, or the
//!   default (`"is_default": true`);
//! - `GET /purchase-orders/{id}` — a purchase order with its lines;
//! - `GET /purchase-orders?quote_id=...` — the purchase order of a quote;
//! - `/health` and `/metrics`.
//!
//! Every client mistake is a 4xx `application/problem+json` answer, found before anything
//! is written; logs carry ids, never amounts or reasons in words.
//!
//! # Configuration
//!
//! Besides `dbps_service::ServiceConfig`'s variables (`PURCHASE_ORDER_DB_OWNER_PASSWORD`,
//! `PURCHASE_ORDER_DB_RUNTIME_PASSWORD`, `PURCHASE_ORDER_HTTP_ADDR`, ...), [`Settings`]
//! reads [`DEFAULT_LIMIT_VAR`]: the credit limit of customers without one of their own,
//! in cents ([`DEFAULT_LIMIT_CENTS`] when unset).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use dbps_core::inbox::pg::PgInbox;
use dbps_core::{Envelope, HandlerError};
use dbps_outbox::Relay;
use dbps_outbox::pg::PgOutboxStore;
use dbps_saga::{CommandHandler, Compensated, Participant, Reply};
use dbps_service::http::{Fields, Problem};
use dbps_service::{Service, ServiceError};
use example_contracts::purchase_order::{
    CancelPurchaseOrder, CreatePurchaseOrder, PurchaseOrderCommand, PurchaseOrderCreated, PurchaseOrderRejected,
};
use example_contracts::quote::QuoteLine;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;
use uuid::Uuid;

/// The service's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The service's name, the root of its database, roles, topics and groups.
pub const SERVICE: &str = example_contracts::services::PURCHASE_ORDER;

/// The consumer of `purchase_order.commands` (its group, and its inbox consumer, is
/// `purchase_order.commands`).
pub const COMMANDS_CONSUMER: &str = "commands";

/// The variable [`Settings::from_env`] reads the default credit limit from, in cents.
pub const DEFAULT_LIMIT_VAR: &str = "PURCHASE_ORDER_DEFAULT_LIMIT_CENTS";

/// The default credit limit when [`DEFAULT_LIMIT_VAR`] is unset: 10,000.00.
pub const DEFAULT_LIMIT_CENTS: i64 = 1_000_000;

/// Largest request body.
const MAX_BODY: usize = 16 * 1024;

/// The migration components of the service's database, in order: the framework's tables,
/// then the service's own.
pub fn components() -> [(&'static str, &'static Migrator); 3] {
    [
        ("dbps_outbox", &dbps_outbox::pg::MIGRATOR),
        ("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR),
        (SERVICE, &MIGRATOR),
    ]
}

/// The service's own settings (its servers and secrets are `dbps_service::ServiceConfig`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The credit limit of a customer without a row in `credit_limits`, in cents (at
    /// least zero).
    pub default_limit_cents: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_limit_cents: DEFAULT_LIMIT_CENTS,
        }
    }
}

impl Settings {
    /// The settings from the environment: [`DEFAULT_LIMIT_VAR`], or
    /// [`DEFAULT_LIMIT_CENTS`] when it is unset or empty. A value that is not a whole
    /// number of cents of at least zero is an error naming the variable.
    pub fn from_env() -> Result<Self, ServiceError> {
        Self::from_value(std::env::var(DEFAULT_LIMIT_VAR).ok().as_deref())
    }

    /// The settings from the value of [`DEFAULT_LIMIT_VAR`], if set.
    pub fn from_value(default_limit_cents: Option<&str>) -> Result<Self, ServiceError> {
        let Some(value) = default_limit_cents.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Self::default());
        };
        let invalid = |reason: String| ServiceError::InvalidVar {
            var: DEFAULT_LIMIT_VAR.to_owned(),
            reason,
        };
        let cents: i64 = value
            .parse()
            .map_err(|e| invalid(format!("{e} (expected a whole number of cents, e.g. 1000000)")))?;
        if cents < 0 {
            return Err(invalid(String::from("a credit limit cannot be below zero")));
        }
        Ok(Self {
            default_limit_cents: cents,
        })
    }
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    pool: PgPool,
    settings: Settings,
}

impl App {
    /// Prepares the service's database and starts its relay and its command consumer (the
    /// saga participant) on `service`; the consumer creates its command and dead-letter
    /// topics if they are missing. Serve [`App::router`] with it next.
    pub async fn start(
        service: &mut Service,
        settings: Settings,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let pool = service.postgres(&components()).await?;
        let naming = service.naming();
        // Topics are named after the service's configured name (`purchase_order`, or a
        // test's unique one).
        let name = service.name().to_string();

        // The relay publishes the replies, to the topics their commands named.
        let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?).build()?;
        service.run_relay(relay);

        let group = service.group(COMMANDS_CONSUMER);
        let participant = Participant::new(service.outbox(), PurchaseOrders::new(settings));
        let inbox = PgInbox::new(pool.clone(), group.clone(), participant);
        service.consume(&group, &naming.commands(&name)?, inbox)?;

        Ok(Self { pool, settings })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/credit-limits/{customer_id}",
                get(get_credit_limit).put(put_credit_limit),
            )
            .route("/purchase-orders", get(find_purchase_order))
            .route("/purchase-orders/{id}", get(get_purchase_order))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }
}

/// The saga participant's handler: creates and cancels purchase orders inside the inbox's
/// transaction, and says what it did in the reply.
#[derive(Debug, Clone)]
pub struct PurchaseOrders {
    settings: Settings,
}

impl PurchaseOrders {
    /// The handler, with `settings`' default credit limit.
    pub fn new(settings: Settings) -> Self {
        Self { settings }
    }

    async fn create(
        &self,
        conn: &mut PgConnection,
        order: CreatePurchaseOrder,
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        let quote_id = order.quote_id;
        if let Some(reply) = existing(conn, quote_id, envelope).await? {
            return reply;
        }
        if let Some((rule, reason)) = malformed(&order) {
            return reject(quote_id, envelope, rule, reason);
        }
        let limit = credit_limit(conn, order.customer_id, self.settings).await?;
        if order.total_cents > limit.limit_cents {
            let reason = format!(
                "the order's value of {} is over the customer's credit limit of {}",
                money(order.total_cents),
                money(limit.limit_cents)
            );
            return reject(quote_id, envelope, "credit_limit", reason);
        }

        let inserted: Option<Uuid> = sqlx::query_scalar(
            "insert into purchase_orders (id, quote_id, customer_id, total_cents) values ($1, $2, $3, $4)
             on conflict (quote_id) do nothing
             returning id",
        )
        .bind(Uuid::now_v7())
        .bind(quote_id)
        .bind(order.customer_id)
        .bind(order.total_cents)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(id) = inserted else {
            // Another transaction created the quote's order since the first look (it
            // committed, or the insert would still wait for it): answer with that one.
            return match existing(conn, quote_id, envelope).await? {
                Some(reply) => reply,
                None => Err(HandlerError::transient(format!(
                    "the purchase order of quote {quote_id} is neither new nor found"
                ))),
            };
        };
        let (products, quantities, prices): (Vec<Uuid>, Vec<i64>, Vec<i64>) = order
            .lines
            .iter()
            .map(|l| (l.product_id, l.quantity, l.unit_price_cents))
            .collect();
        sqlx::query(
            "insert into purchase_order_lines (purchase_order_id, line_no, product_id, quantity, unit_price_cents)
             select $1, line_no::integer, product_id, quantity, unit_price_cents
             from unnest($2::uuid[], $3::bigint[], $4::bigint[])
                  with ordinality as line (product_id, quantity, unit_price_cents, line_no)",
        )
        .bind(id)
        .bind(&products)
        .bind(&quantities)
        .bind(&prices)
        .execute(&mut *conn)
        .await?;
        tracing::info!(
            purchase_order = %id,
            quote = %quote_id,
            customer = %order.customer_id,
            message_id = %envelope.id,
            "purchase order created"
        );
        Reply::new(&PurchaseOrderCreated {
            purchase_order_id: id,
            quote_id,
        })
    }

    async fn cancel(
        &self,
        conn: &mut PgConnection,
        CancelPurchaseOrder { quote_id }: CancelPurchaseOrder,
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        let cancelled: Option<Uuid> = sqlx::query_scalar(
            "update purchase_orders set state = 'cancelled', cancelled_at = now()
             where quote_id = $1 and state = 'open'
             returning id",
        )
        .bind(quote_id)
        .fetch_optional(&mut *conn)
        .await?;
        match cancelled {
            Some(id) => tracing::info!(
                purchase_order = %id,
                quote = %quote_id,
                message_id = %envelope.id,
                "purchase order cancelled"
            ),
            // Compensations are idempotent: nothing to undo is undone.
            None => tracing::info!(quote = %quote_id, message_id = %envelope.id, "no open purchase order to cancel"),
        }
        Reply::new(&Compensated {})
    }
}

impl CommandHandler<PurchaseOrderCommand> for PurchaseOrders {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: PurchaseOrderCommand,
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        match command {
            PurchaseOrderCommand::Create(order) => self.create(conn, order, envelope).await,
            PurchaseOrderCommand::Cancel(cancel) => self.cancel(conn, cancel, envelope).await,
        }
    }
}

/// The answer to a `CreatePurchaseOrder` for a quote that has a purchase order already:
/// `PurchaseOrderCreated` with it while it is open, `PurchaseOrderRejected` once it was
/// cancelled (a quote gets one purchase order, ever).
async fn existing(
    conn: &mut PgConnection,
    quote_id: Uuid,
    envelope: &Envelope,
) -> Result<Option<Result<Reply, HandlerError>>, HandlerError> {
    let found: Option<(Uuid, String)> = sqlx::query_as("select id, state from purchase_orders where quote_id = $1")
        .bind(quote_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.map(|(id, state)| {
        if state == "open" {
            tracing::info!(
                purchase_order = %id,
                quote = %quote_id,
                message_id = %envelope.id,
                "purchase order exists already"
            );
            Reply::new(&PurchaseOrderCreated {
                purchase_order_id: id,
                quote_id,
            })
        } else {
            let reason = format!("the quote's purchase order {id} was cancelled");
            reject(quote_id, envelope, "cancelled", reason)
        }
    }))
}

/// The rule a command breaks whatever the customer's limit (its name for the log, and the
/// reason in words), if any.
fn malformed(order: &CreatePurchaseOrder) -> Option<(&'static str, String)> {
    if order.lines.is_empty() {
        return Some(("no_lines", String::from("the order has no lines")));
    }
    if order.total_cents <= 0 {
        return Some((
            "total",
            format!("the order's value must be above zero, not {}", money(order.total_cents)),
        ));
    }
    for (number, line) in (1..).zip(&order.lines) {
        if line.quantity <= 0 {
            return Some((
                "quantity",
                format!(
                    "line {number} has a quantity of {}; it must be above zero",
                    line.quantity
                ),
            ));
        }
        if line.unit_price_cents < 0 {
            return Some(("unit_price", format!("line {number} has a negative unit price")));
        }
    }
    None
}

/// `PurchaseOrderRejected` for `quote_id`, logged with the rule's name (not the reason,
/// which carries amounts).
fn reject(quote_id: Uuid, envelope: &Envelope, rule: &'static str, reason: String) -> Result<Reply, HandlerError> {
    tracing::info!(quote = %quote_id, message_id = %envelope.id, rule, "purchase order rejected");
    Reply::new(&PurchaseOrderRejected { quote_id, reason })
}

/// Cents as an amount with two decimals and thousands separators: `1,000,000.00`.
fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let units = (cents.unsigned_abs() / 100).to_string();
    let mut grouped = String::with_capacity(units.len() + units.len() / 3);
    for (i, digit) in units.chars().enumerate() {
        if i > 0 && (units.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    format!("{sign}{grouped}.{:02}", cents.unsigned_abs() % 100)
}

/// The credit limit in force for `customer_id`.
async fn credit_limit(conn: &mut PgConnection, customer_id: Uuid, settings: Settings) -> sqlx::Result<CreditLimit> {
    let own: Option<i64> = sqlx::query_scalar("select limit_cents from credit_limits where customer_id = $1")
        .bind(customer_id)
        .fetch_optional(conn)
        .await?;
    Ok(CreditLimit {
        customer_id,
        limit_cents: own.unwrap_or(settings.default_limit_cents),
        is_default: own.is_none(),
    })
}

/// A customer's credit limit as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditLimit {
    /// The customer.
    pub customer_id: Uuid,
    /// The largest order value the customer may place, in cents.
    pub limit_cents: i64,
    /// Whether it is the configured default (the customer has no limit of its own).
    pub is_default: bool,
}

/// Body of `PUT /credit-limits/{customer_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetCreditLimit {
    /// The limit, in cents; at least zero.
    pub limit_cents: i64,
}

/// The state of a purchase order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PurchaseOrderState {
    /// Created, in force.
    Open,
    /// Cancelled by its saga's compensation.
    Cancelled,
}

/// A purchase order as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseOrder {
    /// Id.
    pub id: Uuid,
    /// The quote it was created for (one purchase order per quote).
    pub quote_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Its value, in cents.
    pub total_cents: i64,
    /// Open or cancelled.
    pub state: PurchaseOrderState,
    /// Its lines, in the quote's order.
    pub lines: Vec<QuoteLine>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was cancelled, if it was.
    pub cancelled_at: Option<DateTime<Utc>>,
}

/// The query of `GET /purchase-orders`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurchaseOrderQuery {
    /// The quote whose purchase order is wanted.
    pub quote_id: Uuid,
}

/// A database failure: `503`, logged without the request's data.
fn db(error: sqlx::Error) -> Problem {
    tracing::error!(%error, "request failed");
    Problem::unavailable()
}

async fn get_credit_limit(State(app): State<App>, Path(customer_id): Path<Uuid>) -> Result<Response, Problem> {
    let mut conn = app.pool.acquire().await.map_err(db)?;
    let limit = credit_limit(&mut conn, customer_id, app.settings).await.map_err(db)?;
    Ok(Json(limit).into_response())
}

async fn put_credit_limit(
    State(app): State<App>,
    Path(customer_id): Path<Uuid>,
    Json(body): Json<SetCreditLimit>,
) -> Result<Response, Problem> {
    let mut fields = Fields::new();
    if body.limit_cents < 0 {
        fields.invalid("limit_cents", "must be at least zero");
    }
    fields.finish()?;
    let limit_cents: i64 = sqlx::query_scalar(
        "insert into credit_limits (customer_id, limit_cents) values ($1, $2)
         on conflict (customer_id) do update set limit_cents = excluded.limit_cents, updated_at = now()
         returning limit_cents",
    )
    .bind(customer_id)
    .bind(body.limit_cents)
    .fetch_one(&app.pool)
    .await
    .map_err(db)?;
    tracing::info!(customer = %customer_id, "credit limit set");
    Ok(Json(CreditLimit {
        customer_id,
        limit_cents,
        is_default: false,
    })
    .into_response())
}

async fn get_purchase_order(State(app): State<App>, Path(id): Path<Uuid>) -> Result<Response, Problem> {
    let order = load(&app.pool, By::Id(id))
        .await?
        .ok_or_else(|| Problem::not_found(format!("purchase order {id}")))?;
    Ok((StatusCode::OK, Json(order)).into_response())
}

async fn find_purchase_order(
    State(app): State<App>,
    Query(PurchaseOrderQuery { quote_id }): Query<PurchaseOrderQuery>,
) -> Result<Response, Problem> {
    let order = load(&app.pool, By::Quote(quote_id))
        .await?
        .ok_or_else(|| Problem::not_found(format!("the purchase order of quote {quote_id}")))?;
    Ok((StatusCode::OK, Json(order)).into_response())
}

/// A purchase order's row.
#[derive(sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    quote_id: Uuid,
    customer_id: Uuid,
    total_cents: i64,
    state: String,
    created_at: DateTime<Utc>,
    cancelled_at: Option<DateTime<Utc>>,
}

/// How a purchase order is looked up.
#[derive(Clone, Copy)]
enum By {
    /// Its id.
    Id(Uuid),
    /// Its quote's id.
    Quote(Uuid),
}

/// The purchase order looked up `by`, with its lines.
async fn load(pool: &PgPool, by: By) -> Result<Option<PurchaseOrder>, Problem> {
    let (sql, key) = match by {
        By::Id(id) => (
            "select id, quote_id, customer_id, total_cents, state, created_at, cancelled_at
             from purchase_orders where id = $1",
            id,
        ),
        By::Quote(quote_id) => (
            "select id, quote_id, customer_id, total_cents, state, created_at, cancelled_at
             from purchase_orders where quote_id = $1",
            quote_id,
        ),
    };
    let query = sqlx::query_as(sql).bind(key);
    let Some(row): Option<OrderRow> = query.fetch_optional(pool).await.map_err(db)? else {
        return Ok(None);
    };
    let lines: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "select product_id, quantity, unit_price_cents from purchase_order_lines
         where purchase_order_id = $1 order by line_no",
    )
    .bind(row.id)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    let state = match row.state.as_str() {
        "open" => PurchaseOrderState::Open,
        "cancelled" => PurchaseOrderState::Cancelled,
        other => {
            tracing::error!(purchase_order = %row.id, state = other, "unknown purchase order state");
            return Err(Problem::unavailable());
        }
    };
    Ok(Some(PurchaseOrder {
        id: row.id,
        quote_id: row.quote_id,
        customer_id: row.customer_id,
        total_cents: row.total_cents,
        state,
        lines: lines
            .into_iter()
            .map(|(product_id, quantity, unit_price_cents)| QuoteLine {
                product_id,
                quantity,
                unit_price_cents,
            })
            .collect(),
        created_at: row.created_at,
        cancelled_at: row.cancelled_at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_written_with_two_decimals_and_grouped_thousands() {
        assert_eq!(money(1_000_000), "10,000.00");
        assert_eq!(money(50_001), "500.01");
        assert_eq!(money(5), "0.05");
        assert_eq!(money(0), "0.00");
        assert_eq!(money(-123_456_789), "-1,234,567.89");
        assert_eq!(money(i64::MIN), "-92,233,720,368,547,758.08");
    }

    #[test]
    fn the_default_limit_comes_from_its_variable_or_is_ten_thousand() {
        assert_eq!(Settings::from_value(None).ok(), Some(Settings::default()));
        assert_eq!(Settings::default().default_limit_cents, 1_000_000);
        assert_eq!(Settings::from_value(Some("  ")).ok(), Some(Settings::default()));
        assert_eq!(
            Settings::from_value(Some(" 250000 ")).ok(),
            Some(Settings {
                default_limit_cents: 250_000
            })
        );
        for bad in ["-1", "10.5", "lots"] {
            let error = Settings::from_value(Some(bad)).unwrap_err();
            assert!(
                matches!(&error, ServiceError::InvalidVar { var, .. } if var == DEFAULT_LIMIT_VAR),
                "{bad}: {error:?}"
            );
        }
    }

    #[test]
    fn commands_that_break_a_rule_whatever_the_limit_are_found() {
        let line = |quantity, unit_price_cents| QuoteLine {
            product_id: Uuid::nil(),
            quantity,
            unit_price_cents,
        };
        let order = |lines: Vec<QuoteLine>, total_cents| CreatePurchaseOrder {
            quote_id: Uuid::nil(),
            customer_id: Uuid::nil(),
            lines,
            total_cents,
        };
        assert_eq!(malformed(&order(vec![line(2, 500)], 1_000)), None);
        let rule = |o: &CreatePurchaseOrder| malformed(o).map(|(rule, _)| rule);
        assert_eq!(rule(&order(vec![], 1_000)), Some("no_lines"));
        assert_eq!(rule(&order(vec![line(2, 500)], 0)), Some("total"));
        assert_eq!(rule(&order(vec![line(2, 500)], -5)), Some("total"));
        assert_eq!(rule(&order(vec![line(1, 5), line(0, 500)], 5)), Some("quantity"));
        assert_eq!(rule(&order(vec![line(1, -5)], 5)), Some("unit_price"));
    }
}
