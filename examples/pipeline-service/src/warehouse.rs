//! The warehouse: a star schema whose dimensions and facts are projections of the other
//! services' events (`dbps_cache::projection`), each in versioned tables
//! (`<table>_v<n>`) behind a view (`<table>`) that the reports read.
//!
//! | view | one row per | from (topic) | aggregate that guards it | key |
//! |---|---|---|---|---|
//! | `dim_customer` | customer | `customer.CustomerCreated`, `customer.CustomerUpdated` (`<customer>.customer.events`) | the customer | `customer_id` |
//! | `dim_product` | product | `inventory.ProductChanged` (`<inventory>.product.events`) | the product | `product_id` |
//! | `fact_quote` | quote | `quote.QuoteCreated` (`<quote>.quote.events`) | the quote | `quote_id` |
//! | `fact_quote_line` | line of a quote | `quote.QuoteCreated` | the quote | `(quote_id, line_no)` |
//! | `fact_quote_status` | quote | `quote.QuoteStatusChanged` (`<quote>.quote.events`) | the quote | `quote_id` |
//! | `fact_stock_level` | product | `inventory.StockLevelChanged` (`<inventory>.product.events`) | the product | `product_id` |
//! | `fact_stock_movement` | `StockLevelChanged` event (appended) | `inventory.StockLevelChanged` (`<inventory>.product.events`) | the product (appends: every event is kept) | `(product_id, source_sequence)` |
//! | `fact_stock_out` | product short in a quote's reservation | `inventory.StockReservationFailed` and `inventory.StockReserved` (`<inventory>.reservation.events`) | the reservation (keyed by the quote id) | `(quote_id, product_id)` |
//!
//! The time dimension `dim_date` is a generated calendar (a migration, not a projection):
//! facts carry the UTC day of their event as a `date` that joins its `date_key`.
//!
//! **Which events a table follows decides what its sequence guard means.** The guard keeps,
//! per aggregate, the newest sequence a table applied, and an event replaces all of its
//! aggregate's rows. A table therefore follows only the event types that carry its whole
//! row: `fact_quote` and `fact_quote_line` only `QuoteCreated` (sequence 1 of the quote),
//! so a status change that arrives first cannot make the creation look stale;
//! `fact_quote_status` only `QuoteStatusChanged` (the newest status by the quote's
//! sequence wins, whatever the order of delivery); `dim_product` only `ProductChanged` and
//! `fact_stock_level` only `StockLevelChanged`, although both share the product's
//! sequence. Events of other types on a table's topic are skipped by that table.
//!
//! A history of every event of an aggregate is kept with appends instead
//! (`Change::Append`): `fact_stock_movement` holds one row per `StockLevelChanged` of a
//! product, inserted once whatever the order and the number of deliveries (its key is
//! the product and the event's sequence), and never replaced by a newer event. The
//! change from the product's previous level is not stored: events can arrive out of
//! order, so the reports compute it when they read, over the stock version order (see
//! [`STOCK_DELTAS`]). `fact_stock_level` keeps each product's current level.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbps_cache::CacheError;
use dbps_cache::projection::{
    Change, OsProjection, PgProjection, ReadModel, RebuildProgress, RebuildReport, RunSummary,
};
use dbps_core::kafka::{KafkaConfig, TopicNaming, TopicSpec};
use dbps_core::{CancellationToken, Envelope, HandlerError, message_set};
use example_contracts::inventory::{
    PRODUCT_AGGREGATE, ProductChanged, RESERVATION_AGGREGATE, StockLevelChanged, StockReservationFailed, StockReserved,
};
use example_contracts::quote::{QuoteCreated, QuoteStatusChanged};
use example_customer_service::AddressKind;
use example_customer_service::events::CustomerEvent;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::search::{QuoteIndex, QuoteSearch, SearchSettings};

/// The views of the warehouse's tables (dimensions, then facts), in the order they are
/// rebuilt and reported.
pub const TABLES: [&str; 8] = [
    DimCustomer::NAME,
    DimProduct::NAME,
    FactQuote::NAME,
    FactQuoteLine::NAME,
    FactQuoteStatus::NAME,
    FactStockLevel::NAME,
    FactStockMovement::NAME,
    FactStockOut::NAME,
];

/// The stock movements with the change each made: `fact_stock_movement`'s columns plus
/// `delta`, the available stock after the movement minus after the product's previous
/// one in stock version order (its first known level counts from zero). Computed when
/// read, so that a movement that arrived late still counts against the right neighbour.
pub const STOCK_DELTAS: &str = "select m.*, m.available - coalesce(lag(m.available) over      (partition by m.product_id order by m.stock_version, m.source_sequence), 0) as delta      from fact_stock_movement m";

/// The name the quotes index goes by in a [`RebuildSummary`] and in progress reports.
pub const SEARCH_INDEX: &str = "search:quotes";

/// Partitions of a source topic the warehouse creates because it is missing (its owner
/// creates it the same way).
const TOPIC_PARTITIONS: i32 = dbps_service::CONSUMED_TOPIC_PARTITIONS;

/// How long a table's projection waits after a transient failure before it starts again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The status of a quote that is `Ordered` (the conversion).
pub const ORDERED: &str = "Ordered";

/// The status of a quote whose stock could not be reserved.
pub const PENDING_STOCK: &str = "Pending Stock";

/// The status of a quote no status change was seen for yet.
pub const NEW: &str = "New";

message_set! {
    /// What `fact_quote` and `fact_quote_line` follow on the quote events.
    #[derive(Debug, Clone)]
    pub enum QuoteCreations {
        /// A quote was created.
        Created(QuoteCreated),
    }
}

message_set! {
    /// What `fact_quote_status` follows on the quote events.
    #[derive(Debug, Clone)]
    pub enum QuoteStatuses {
        /// A quote's status changed.
        Changed(QuoteStatusChanged),
    }
}

message_set! {
    /// What `dim_product` follows on the product events.
    #[derive(Debug, Clone)]
    pub enum ProductChanges {
        /// A product was created or changed.
        Changed(ProductChanged),
    }
}

message_set! {
    /// What `fact_stock_level` follows on the product events.
    #[derive(Debug, Clone)]
    pub enum StockLevels {
        /// A product's available stock changed.
        Changed(StockLevelChanged),
    }
}

message_set! {
    /// What `fact_stock_out` follows on the reservation events: the inventory's answer to
    /// a quote.
    #[derive(Debug, Clone)]
    pub enum ReservationAnswers {
        /// Every line was reserved: nothing is short.
        Reserved(StockReserved),
        /// Some products were short.
        Failed(StockReservationFailed),
    }
}

/// The topics the warehouse reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// `<customer>.customer.events`.
    pub customers: String,
    /// `<quote>.quote.events`.
    pub quotes: String,
    /// `<inventory>.product.events`.
    pub products: String,
    /// `<inventory>.reservation.events`.
    pub reservations: String,
}

impl Topics {
    /// The topics of the services named `customer`, `quote` and `inventory` under `naming`.
    pub fn new(naming: &TopicNaming, customer: &str, quote: &str, inventory: &str) -> dbps_core::Result<Self> {
        Ok(Self {
            customers: naming.events(customer, example_customer_service::AGGREGATE)?,
            quotes: naming.events(quote, example_contracts::quote::AGGREGATE)?,
            products: naming.events(inventory, PRODUCT_AGGREGATE)?,
            reservations: naming.events(inventory, RESERVATION_AGGREGATE)?,
        })
    }

    fn all(&self) -> [&str; 4] {
        [&self.customers, &self.quotes, &self.products, &self.reservations]
    }
}

/// One table of the warehouse: its projection's declaration, its name and key columns.
pub trait Table: ReadModel + Sized {
    /// The view (and stem of the versioned tables).
    const NAME: &'static str;
    /// The column that holds the aggregate's id.
    const AGGREGATE: &'static str;
    /// The table's unique key when an aggregate has several rows (empty: the aggregate
    /// column).
    const CONFLICT_KEY: &'static [&'static str];

    /// Version `version` of the table, reading `topics`.
    fn declare(version: u32, topics: &Topics) -> Self;
}

/// The declaration of one version of a table: its version and the topic it reads.
macro_rules! table {
    ($(#[$meta:meta])* $ty:ident, $name:literal, $topic:ident, $aggregate:literal, [$($key:literal),*]) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $ty {
            version: u32,
            topic: String,
        }

        impl Table for $ty {
            const NAME: &'static str = $name;
            const AGGREGATE: &'static str = $aggregate;
            const CONFLICT_KEY: &'static [&'static str] = &[$($key),*];

            fn declare(version: u32, topics: &Topics) -> Self {
                Self { version, topic: topics.$topic.clone() }
            }
        }
    };
}

/// `name`, `version` and `topics` of a [`ReadModel`] declared with `table!`.
macro_rules! declared {
    () => {
        fn name(&self) -> &str {
            <Self as Table>::NAME
        }

        fn version(&self) -> u32 {
            self.version
        }

        fn topics(&self) -> Vec<String> {
            vec![self.topic.clone()]
        }
    };
}

table!(
    /// `dim_customer`: a customer's name, tax number, country (its billing address's, else
    /// its first address's), how many addresses and installed machines it has, and its
    /// version (its email and contacts stay with the customer service).
    DimCustomer, "dim_customer", customers, "customer_id", []
);
table!(
    /// `dim_product`: a product's SKU, name, list price and version.
    DimProduct, "dim_product", products, "product_id", []
);
table!(
    /// `fact_quote`: one row per quote — its customer, when it was created (and the day,
    /// for `dim_date`), its lines, units and value (the lines' quantity × unit price).
    FactQuote, "fact_quote", quotes, "quote_id", []
);
table!(
    /// `fact_quote_line`: one row per line of a quote — product, quantity, unit price and
    /// value, with the quote's customer and day.
    FactQuoteLine, "fact_quote_line", quotes, "quote_id", ["quote_id", "line_no"]
);
table!(
    /// `fact_quote_status`: one row per quote that changed status — its newest status (and
    /// reason), when it changed, the quote's value and version, and for an `Ordered` quote
    /// when it was ordered and its purchase order.
    FactQuoteStatus, "fact_quote_status", quotes, "quote_id", []
);
table!(
    /// `fact_stock_level`: one row per product — its available stock as of its newest
    /// `StockLevelChanged`, the stock's version and the time of that change.
    FactStockLevel, "fact_stock_level", products, "product_id", []
);
table!(
    /// `fact_stock_movement`: one row per `StockLevelChanged` — the product, the stock's
    /// version, the available stock after it, and when it happened (and the day). Rows
    /// are appended (`Change::Append`), keyed by the product and the event's sequence: a
    /// duplicate inserts nothing, a late event is still inserted.
    FactStockMovement, "fact_stock_movement", products, "product_id", []
);
table!(
    /// `fact_stock_out`: one row per product a quote's reservation was short of —
    /// requested, available and short units, when the reservation failed.
    FactStockOut, "fact_stock_out", reservations, "quote_id", ["quote_id", "product_id"]
);

/// The UTC day of `at`, as the facts' date key.
fn day(at: DateTime<Utc>) -> String {
    at.date_naive().to_string()
}

impl ReadModel for DimCustomer {
    type Events = CustomerEvent;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (customer_id uuid primary key, name text not null, tax_number text not null, \
             country text, address_count integer not null, machine_count integer not null, \
             version bigint not null, updated_at timestamptz not null, source_sequence bigint not null); \
             create index on {table} (country)"
        )
    }

    fn project(&self, event: CustomerEvent, envelope: &Envelope) -> Result<Change, HandlerError> {
        let (name, tax_number, version, addresses, machines) = match event {
            CustomerEvent::Created(c) => (c.name, c.tax_number, c.version, c.addresses, c.machines.len()),
            CustomerEvent::Updated(c) => (c.name, c.tax_number, c.version, c.addresses, c.machines.len()),
        };
        // The customer's country: its (oldest) billing address's, else its oldest address's.
        let country = addresses
            .iter()
            .find(|a| a.kind == AddressKind::Billing)
            .or_else(|| addresses.first())
            .map(|a| a.country.clone());
        Ok(Change::row(&json!({
            "name": name,
            "tax_number": tax_number,
            "country": country,
            "address_count": addresses.len(),
            "machine_count": machines,
            "version": version,
            "updated_at": envelope.occurred_at,
        }))?)
    }
}

impl ReadModel for DimProduct {
    type Events = ProductChanges;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (product_id uuid primary key, sku text not null, name text not null, \
             unit_price_cents bigint not null, version bigint not null, updated_at timestamptz not null, \
             source_sequence bigint not null)"
        )
    }

    fn project(&self, event: ProductChanges, envelope: &Envelope) -> Result<Change, HandlerError> {
        let ProductChanges::Changed(product) = event;
        Ok(Change::row(&json!({
            "sku": product.sku,
            "name": product.name,
            "unit_price_cents": product.unit_price_cents,
            "version": product.version,
            "updated_at": envelope.occurred_at,
        }))?)
    }
}

/// A line's value: quantity × unit price (saturating: a value too large for the column
/// is not an event to stop the warehouse for).
fn line_value(quantity: i64, unit_price_cents: i64) -> i64 {
    quantity.saturating_mul(unit_price_cents)
}

impl ReadModel for FactQuote {
    type Events = QuoteCreations;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (quote_id uuid primary key, customer_id uuid not null, \
             created_at timestamptz not null, created_date date not null, line_count integer not null, \
             units bigint not null, value_cents bigint not null, source_sequence bigint not null); \
             create index on {table} (created_date); create index on {table} (customer_id)"
        )
    }

    fn project(&self, event: QuoteCreations, envelope: &Envelope) -> Result<Change, HandlerError> {
        let QuoteCreations::Created(quote) = event;
        let value = quote.lines.iter().fold(0i64, |sum, l| {
            sum.saturating_add(line_value(l.quantity, l.unit_price_cents))
        });
        let units = quote.lines.iter().fold(0i64, |sum, l| sum.saturating_add(l.quantity));
        Ok(Change::row(&json!({
            "customer_id": quote.customer_id,
            "created_at": envelope.occurred_at,
            "created_date": day(envelope.occurred_at),
            "line_count": quote.lines.len(),
            "units": units,
            "value_cents": value,
        }))?)
    }
}

impl ReadModel for FactQuoteLine {
    type Events = QuoteCreations;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (quote_id uuid not null, line_no integer not null, product_id uuid not null, \
             customer_id uuid not null, created_date date not null, quantity bigint not null, \
             unit_price_cents bigint not null, value_cents bigint not null, source_sequence bigint not null, \
             primary key (quote_id, line_no)); create index on {table} (product_id)"
        )
    }

    fn project(&self, event: QuoteCreations, envelope: &Envelope) -> Result<Change, HandlerError> {
        let QuoteCreations::Created(quote) = event;
        let rows: Vec<serde_json::Value> = quote
            .lines
            .iter()
            .enumerate()
            .map(|(n, line)| {
                json!({
                    "line_no": n + 1,
                    "product_id": line.product_id,
                    "customer_id": quote.customer_id,
                    "created_date": day(envelope.occurred_at),
                    "quantity": line.quantity,
                    "unit_price_cents": line.unit_price_cents,
                    "value_cents": line_value(line.quantity, line.unit_price_cents),
                })
            })
            .collect();
        Ok(Change::rows(&rows)?)
    }
}

impl ReadModel for FactQuoteStatus {
    type Events = QuoteStatuses;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (quote_id uuid primary key, customer_id uuid not null, status text not null, \
             reason text, value_cents bigint not null, quote_version bigint not null, purchase_order_id uuid, \
             changed_at timestamptz not null, changed_date date not null, ordered_at timestamptz, \
             ordered_date date, source_sequence bigint not null); create index on {table} (status)"
        )
    }

    fn project(&self, event: QuoteStatuses, envelope: &Envelope) -> Result<Change, HandlerError> {
        let QuoteStatuses::Changed(changed) = event;
        // `Ordered` is final: the newest status of an ordered quote is its order.
        let ordered = (changed.status == ORDERED).then_some(envelope.occurred_at);
        Ok(Change::row(&json!({
            "customer_id": changed.customer_id,
            "status": changed.status,
            "reason": changed.reason,
            "value_cents": changed.total_cents,
            "quote_version": changed.version,
            "purchase_order_id": changed.purchase_order_id,
            "changed_at": envelope.occurred_at,
            "changed_date": day(envelope.occurred_at),
            "ordered_at": ordered,
            "ordered_date": ordered.map(day),
        }))?)
    }
}

impl ReadModel for FactStockLevel {
    type Events = StockLevels;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (product_id uuid primary key, available bigint not null, \
             stock_version bigint not null, changed_at timestamptz not null, changed_date date not null, \
             source_sequence bigint not null)"
        )
    }

    fn project(&self, event: StockLevels, envelope: &Envelope) -> Result<Change, HandlerError> {
        let StockLevels::Changed(level) = event;
        Ok(Change::row(&json!({
            "available": level.available,
            "stock_version": level.version,
            "changed_at": envelope.occurred_at,
            "changed_date": day(envelope.occurred_at),
        }))?)
    }
}

impl ReadModel for FactStockMovement {
    type Events = StockLevels;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (product_id uuid not null, source_sequence bigint not null, \
             stock_version bigint not null, available bigint not null, changed_at timestamptz not null, \
             changed_date date not null, primary key (product_id, source_sequence)); \
             create index on {table} (product_id, stock_version); create index on {table} (changed_date)"
        )
    }

    fn project(&self, event: StockLevels, envelope: &Envelope) -> Result<Change, HandlerError> {
        let StockLevels::Changed(level) = event;
        Ok(Change::append(&json!({
            "stock_version": level.version,
            "available": level.available,
            "changed_at": envelope.occurred_at,
            "changed_date": day(envelope.occurred_at),
        }))?)
    }
}

impl ReadModel for FactStockOut {
    type Events = ReservationAnswers;

    declared!();

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (quote_id uuid not null, product_id uuid not null, requested bigint not null, \
             available bigint not null, units_short bigint not null, failed_at timestamptz not null, \
             failed_date date not null, source_sequence bigint not null, primary key (quote_id, product_id)); \
             create index on {table} (product_id)"
        )
    }

    fn project(&self, event: ReservationAnswers, envelope: &Envelope) -> Result<Change, HandlerError> {
        let failed = match event {
            // The quote's answer is a reservation: none of its products is short.
            ReservationAnswers::Reserved(_) => return Ok(Change::Rows(Vec::new())),
            ReservationAnswers::Failed(failed) => failed,
        };
        // One row per product, however the inventory listed it.
        let mut short: BTreeMap<Uuid, (i64, i64)> = BTreeMap::new();
        for missing in &failed.missing {
            let entry = short.entry(missing.product_id).or_insert((0, missing.available));
            entry.0 = entry.0.saturating_add(missing.requested);
            entry.1 = entry.1.min(missing.available);
        }
        let rows: Vec<serde_json::Value> = short
            .into_iter()
            .map(|(product_id, (requested, available))| {
                json!({
                    "product_id": product_id,
                    "requested": requested,
                    "available": available,
                    "units_short": requested.saturating_sub(available).max(0),
                    "failed_at": envelope.occurred_at,
                    "failed_date": day(envelope.occurred_at),
                })
            })
            .collect();
        Ok(Change::rows(&rows)?)
    }
}

type ProgressFn = Arc<dyn Fn(&str, RebuildProgress) + Send + Sync>;

/// The warehouse's tables as projections in one PostgreSQL database, written through a
/// pool whose role may create tables and views (the versions of the tables are created as
/// they are built).
#[derive(Clone)]
pub struct Warehouse {
    pool: PgPool,
    topics: Topics,
    max_batch: usize,
    progress: Option<ProgressFn>,
    search: Option<QuoteIndex>,
    /// The prefix of the projections' consumer groups.
    group_prefix: String,
}

impl fmt::Debug for Warehouse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Warehouse")
            .field("topics", &self.topics)
            .field("max_batch", &self.max_batch)
            .field("search", &self.search)
            .finish_non_exhaustive()
    }
}

/// One table's part of a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRebuild {
    /// The table's view.
    pub table: &'static str,
    /// What its projection's rebuild did.
    pub report: RebuildReport,
}

/// What a rebuild of the warehouse did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildSummary {
    /// The version built.
    pub version: u32,
    /// Each table's rebuild, in [`TABLES`] order, then the quotes index's
    /// ([`SEARCH_INDEX`]) when the warehouse keeps one.
    pub tables: Vec<TableRebuild>,
}

impl RebuildSummary {
    /// Whether every table's view now serves the new version.
    pub fn switched(&self) -> bool {
        self.tables.iter().all(|t| t.report.switched)
    }

    /// Records replayed into the new version, in all.
    pub fn replayed(&self) -> u64 {
        self.tables.iter().map(|t| t.report.replayed).sum()
    }
}

/// The [`Follow`] of `$projection` (a `PgProjection` or an `OsProjection`): its serving
/// version, and its run with `$kafka` until `$shutdown`.
macro_rules! follow_of {
    ($projection:expr, $kafka:expr, $shutdown:expr) => {{
        let projection = $projection;
        Follow {
            serving: Box::pin({
                let projection = projection.clone();
                async move { projection.serving_version().await }
            }),
            run: Box::pin({
                let (kafka, shutdown) = ($kafka.clone(), $shutdown.clone());
                async move { projection.run(&kafka, shutdown).await }
            }),
        }
    }};
}

impl Warehouse {
    /// The warehouse in the database of `pool` (a role that may create tables and views in
    /// its schema), fed from `topics`.
    pub fn new(pool: PgPool, topics: Topics) -> Self {
        Self {
            pool,
            topics,
            max_batch: 512,
            progress: None,
            search: None,
            group_prefix: String::from("dbps-projection-"),
        }
    }

    /// The prefix of the consumer groups its projections read in (default
    /// `dbps-projection-`): under ACLs, one the service may use (`pipeline.projection-`).
    pub fn group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// Keeps the quotes index ([`crate::search`]) in the OpenSearch cluster `settings`
    /// name too, in the same versions as the tables.
    pub fn search(mut self, settings: SearchSettings) -> Self {
        self.search = Some(QuoteIndex::new(settings, self.topics.quotes.clone()));
        self
    }

    /// The quotes index's projection of `version`, if the warehouse keeps one.
    pub(crate) fn quote_index(&self, version: u32) -> Result<Option<OsProjection<QuoteSearch>>, CacheError> {
        self.search
            .as_ref()
            .map(|index| index.projection(version, self.max_batch, &self.group_prefix, None::<fn(RebuildProgress)>))
            .transpose()
    }

    /// The most records applied in one transaction (default 512).
    pub fn max_batch(mut self, max: usize) -> Self {
        self.max_batch = max;
        self
    }

    /// Called with the table's name after every batch a rebuild replays.
    pub fn on_progress(mut self, report: impl Fn(&str, RebuildProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(report));
        self
    }

    /// The topics it reads.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Creates the source topics that do not exist yet, so that the projections see every
    /// partition from the start (a projection reads the partitions it finds when it
    /// starts).
    pub async fn ensure_topics(&self, kafka: &KafkaConfig) -> dbps_core::Result<()> {
        let specs: Vec<TopicSpec> = self
            .topics
            .all()
            .into_iter()
            .map(|t| TopicSpec::new(t, TOPIC_PARTITIONS))
            .collect();
        dbps_core::kafka::ensure_topics(kafka, &specs).await?;
        Ok(())
    }

    /// The version each table's view serves (`None`: not built yet), by table.
    pub async fn serving_versions(&self) -> Result<BTreeMap<String, Option<u32>>, sqlx::Error> {
        let rows: Vec<(String, Option<i32>)> =
            sqlx::query_as("select projection, serving_version from dbps_projection_state where projection = any($1)")
                .bind(TABLES.as_slice())
                .fetch_all(&self.pool)
                .await?;
        let serving: BTreeMap<String, Option<i32>> = rows.into_iter().collect();
        Ok(TABLES
            .iter()
            .map(|t| {
                let version = serving.get(*t).copied().flatten().map(i32::unsigned_abs);
                ((*t).to_owned(), version)
            })
            .collect())
    }

    /// The version a rebuild without one builds: one above the newest that serves (1 when
    /// none does).
    pub async fn next_version(&self) -> Result<u32, sqlx::Error> {
        let newest = self.serving_versions().await?.into_values().flatten().max();
        Ok(newest.map_or(1, |v| v.saturating_add(1)))
    }

    fn projection<T: Table>(&self, version: u32) -> Result<PgProjection<T>, CacheError> {
        let mut builder = PgProjection::builder(self.pool.clone(), T::declare(version, &self.topics))
            .aggregate_column(T::AGGREGATE)
            .max_batch(self.max_batch)
            .group_prefix(&self.group_prefix);
        if !T::CONFLICT_KEY.is_empty() {
            builder = builder.conflict_key(T::CONFLICT_KEY.iter().copied());
        }
        if let Some(progress) = &self.progress {
            let progress = Arc::clone(progress);
            builder = builder.on_progress(move |p| progress(T::NAME, p));
        }
        builder.build()
    }

    /// Rebuilds every table into `version` (by default [`Warehouse::next_version`]) from
    /// the beginning of its topics and switches each table's view to it, while the
    /// serving versions go on being written by the running service (see
    /// `PgProjection::rebuild`: blue-green, no gap, an atomic switch per table). The
    /// tables are rebuilt concurrently; a running service's projections of the old version
    /// stop at their table's switch and [`Warehouse::keep_current`] goes on with the new
    /// one. A table that serves `version` or a newer one already is left alone (not
    /// switched). Stopped by `shutdown` before its switch, a table's rebuild resumes from
    /// its checkpoints when started again.
    pub async fn rebuild(
        &self,
        kafka: &KafkaConfig,
        version: Option<u32>,
        shutdown: &CancellationToken,
    ) -> Result<RebuildSummary, CacheError> {
        let version = match version {
            Some(version) => version,
            None => self.next_version().await.map_err(|source| CacheError::Postgres {
                operation: "read the serving versions",
                source,
            })?,
        };
        tracing::info!(version, "rebuilding the warehouse");
        let tables = async {
            tokio::try_join!(
                self.rebuild_table::<DimCustomer>(kafka, version, shutdown),
                self.rebuild_table::<DimProduct>(kafka, version, shutdown),
                self.rebuild_table::<FactQuote>(kafka, version, shutdown),
                self.rebuild_table::<FactQuoteLine>(kafka, version, shutdown),
                self.rebuild_table::<FactQuoteStatus>(kafka, version, shutdown),
                self.rebuild_table::<FactStockLevel>(kafka, version, shutdown),
                self.rebuild_table::<FactStockMovement>(kafka, version, shutdown),
                self.rebuild_table::<FactStockOut>(kafka, version, shutdown),
            )
        };
        let search = async {
            let Some(index) = &self.search else {
                return Ok(None);
            };
            let progress = self
                .progress
                .clone()
                .map(|progress| move |p: RebuildProgress| progress(SEARCH_INDEX, p));
            let report = index
                .projection(version, self.max_batch, &self.group_prefix, progress)?
                .rebuild(kafka, shutdown)
                .await?;
            Ok::<_, CacheError>(Some(TableRebuild {
                table: SEARCH_INDEX,
                report,
            }))
        };
        let ((a, b, c, d, e, f, g, h), search) = tokio::try_join!(tables, search)?;
        let mut tables = vec![a, b, c, d, e, f, g, h];
        tables.extend(search);
        Ok(RebuildSummary { version, tables })
    }

    async fn rebuild_table<T: Table>(
        &self,
        kafka: &KafkaConfig,
        version: u32,
        shutdown: &CancellationToken,
    ) -> Result<TableRebuild, CacheError> {
        let report = self.projection::<T>(version)?.rebuild(kafka, shutdown).await?;
        Ok(TableRebuild { table: T::NAME, report })
    }

    /// Keeps every table (and the quotes index) current until `shutdown`, each in a task
    /// of its own, at least at `version`: a table that serves an older version (or none)
    /// is rebuilt into `version` first; one that serves a newer version (after a rebuild)
    /// runs that one. When a rebuild switches a table to a newer version, its projection
    /// goes on with it.
    pub async fn keep_current(
        &self,
        kafka: &KafkaConfig,
        version: u32,
        shutdown: CancellationToken,
    ) -> Result<(), CacheError> {
        let search = async {
            if self.search.is_none() {
                return Ok(());
            }
            follow(SEARCH_INDEX, version, &shutdown, |version| {
                let projection = self.quote_index(version)?.ok_or_else(|| CacheError::InvalidConfig {
                    setting: "search",
                    reason: String::from("no quotes index"),
                })?;
                Ok(follow_of!(projection, kafka, shutdown))
            })
            .await
        };
        tokio::try_join!(
            self.keep::<DimCustomer>(kafka, version, &shutdown),
            self.keep::<DimProduct>(kafka, version, &shutdown),
            self.keep::<FactQuote>(kafka, version, &shutdown),
            self.keep::<FactQuoteLine>(kafka, version, &shutdown),
            self.keep::<FactQuoteStatus>(kafka, version, &shutdown),
            self.keep::<FactStockLevel>(kafka, version, &shutdown),
            self.keep::<FactStockMovement>(kafka, version, &shutdown),
            self.keep::<FactStockOut>(kafka, version, &shutdown),
            search,
        )?;
        Ok(())
    }

    async fn keep<T: Table>(
        &self,
        kafka: &KafkaConfig,
        base: u32,
        shutdown: &CancellationToken,
    ) -> Result<(), CacheError> {
        follow(T::NAME, base, shutdown, |version| {
            Ok(follow_of!(self.projection::<T>(version)?, kafka, shutdown))
        })
        .await
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, CacheError>> + Send>>;

/// One version of a projection to follow: which version serves, and its run.
struct Follow {
    serving: BoxFuture<Option<u32>>,
    run: BoxFuture<RunSummary>,
}

/// Runs a projection from version `base` on until `shutdown`: a newer serving version is
/// followed (also when a rebuild switches to one while it runs), transient failures start
/// it again after a pause.
async fn follow(
    name: &str,
    base: u32,
    shutdown: &CancellationToken,
    version_of: impl Fn(u32) -> Result<Follow, CacheError>,
) -> Result<(), CacheError> {
    let mut version = base;
    while !shutdown.is_cancelled() {
        let Follow { serving, run } = version_of(version)?;
        let ran = match serving.await {
            Ok(Some(serving)) if serving > version => {
                version = serving;
                continue;
            }
            Ok(_) => run.await,
            Err(error) => Err(error),
        };
        match ran {
            Ok(summary) => match summary.superseded_by {
                Some(newer) if !shutdown.is_cancelled() => {
                    tracing::info!(
                        table = name,
                        from = version,
                        to = newer,
                        "a rebuilt version serves; following it"
                    );
                    version = newer;
                }
                _ => break,
            },
            Err(error) if error.is_transient() => {
                tracing::warn!(table = name, %error, "the projection failed; starting it again");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(RESTART_DELAY) => {}
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
