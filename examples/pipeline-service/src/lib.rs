//! The pipeline service of the dbps example system: reporting across services.
//!
//! No service may read another's database, and a report across them (the value of the
//! sales pipeline, the conversion of quotes into orders, the products that keep quotes
//! waiting for stock) is not any one service's question. The system's answer is a data
//! warehouse of its own, fed by a batch ETL over the event history and kept current by the
//! event stream: this service.
//!
//! It owns a PostgreSQL database (provisioned and migrated at start like the other
//! services': `pipeline_owner` migrates, `pipeline_app` serves) holding a star schema
//! ([`warehouse`]): the dimensions `dim_customer`, `dim_product` and the generated
//! calendar `dim_date`, and the facts `fact_quote`, `fact_quote_line`,
//! `fact_quote_status`, `fact_stock_level`, `fact_stock_movement` and `fact_stock_out`.
//! Each dimension and fact is a projection (`dbps_cache::projection::PgProjection`) of the
//! other services' events: a versioned table `<table>_v<n>` behind the view `<table>`,
//! its read positions checkpointed in the transaction of each batch. Most tables are
//! guarded by the source aggregate's sequence number (duplicated, late and reordered
//! events change nothing); the stock movements are appended instead, one row per
//! `StockLevelChanged`, each inserted once however often and in whatever order it
//! arrives, so that they keep every product's history of stock levels.
//!
//! # Consumes
//!
//! Reading each topic itself, from its checkpoints (no consumer group):
//!
//! - `<customer>.customer.events`: `customer.CustomerCreated`, `customer.CustomerUpdated`;
//! - `<quote>.quote.events`: `quote.QuoteCreated`, `quote.QuoteStatusChanged`;
//! - `<inventory>.product.events`: `inventory.ProductChanged`, `inventory.StockLevelChanged`;
//! - `<inventory>.reservation.events`: `inventory.StockReservationFailed`,
//!   `inventory.StockReserved`.
//!
//! It publishes nothing.
//!
//! # Serves
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /reports/pipeline-value?group=status\|month[&from=YYYY-MM-DD][&to=YYYY-MM-DD]` | [`PipelineValue`]: count and value of quotes by status or by month created |
//! | `GET /reports/conversion[?group=total\|month][&from=...][&to=...]` | [`Conversion`]: quotes created, ordered, ratio (per month created) |
//! | `GET /reports/stock-outs[?limit=N]` | [`StockOuts`]: per product short in a reservation, its quotes and units short |
//! | `GET /reports/stock-movements[?product_id=...][&from=YYYY-MM-DD][&to=YYYY-MM-DD]` | [`StockMovements`]: per product and month, its stock movements, units in and out (computed from consecutive levels) and the last level |
//! | `GET /reports/freshness` | [`Freshness`] of every table |
//! | `GET /search/quotes[?q=text][&status=...][&customer_id=...][&size=N]` | [`QuoteSearchResult`]: quotes from the OpenSearch quotes index ([`search`]), with aggregations by status and by customer; `503` when no OpenSearch is configured |
//! | `GET /health`, `GET /metrics` | liveness, Prometheus metrics (the projections' lag, progress, ...) |
//!
//! Every report carries its [`Freshness`]: per table it reads, the serving version, the
//! source time of the newest event applied, when it was applied and the lag between the
//! two. A report is read in one repeatable-read transaction, so its figures and its
//! freshness agree. A bad parameter is a `400` problem listing each
//! (`{"parameter", "detail"}` in `errors`); a report asked before the warehouse's first
//! build is a `503` problem.
//!
//! # Batch ETL: the rebuild
//!
//! `pipeline-service rebuild [--version N]` (or [`Warehouse::rebuild`]) builds every
//! table into a new version from the beginning of its topics while the running service
//! goes on serving and applying the stream, then switches each view to its new table in
//! one transaction; the running service's projections of the old version stop at the
//! switch and it goes on with the new version. Between rebuilds the stream keeps the
//! warehouse current. A rebuild needs the topics' whole history (no deletion by
//! retention; no compaction, which would drop a quote's `QuoteCreated`).
//!
//! # Roles
//!
//! The projections create tables and views as they build new versions, which the
//! runtime role may not (it has no `CREATE` on the schema); the warehouse is therefore
//! written through a pool of the owner role ([`Settings::writer`]), and the reports are
//! read through the runtime role's pool (`SELECT` on the owner's tables and views).
//!
//! # Configuration
//!
//! Besides `dbps_service::ServiceConfig`'s variables (`DBPS_POSTGRES_URL`,
//! `DBPS_KAFKA_BROKERS`, `PIPELINE_DB_OWNER_PASSWORD`, `PIPELINE_DB_RUNTIME_PASSWORD`,
//! `PIPELINE_HTTP_ADDR`, `DBPS_TOPIC_PREFIX`, ...), [`Settings::from_env`] reads
//! [`CUSTOMER_SERVICE_VAR`], [`QUOTE_SERVICE_VAR`], [`INVENTORY_SERVICE_VAR`] (the
//! services whose events it follows, by default their canonical names) and
//! [`VERSION_VAR`] (the least version of the warehouse to serve, default 1); with
//! [`OPENSEARCH_URL_VAR`] (`DBPS_OPENSEARCH_URL`) set it keeps the quotes index there,
//! under [`SEARCH_PREFIX_VAR`] (default `pipeline-`).

mod reports;
pub mod search;
pub mod warehouse;

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use dbps_migrate::{Password, PgService};
use dbps_service::{Service, ServiceConfig, ServiceError};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use crate::reports::{
    Conversion, ConversionRow, Freshness, PipelineValue, SourceFreshness, StockMovementRow, StockMovements,
    StockOutRow, StockOuts, ValueRow,
};
pub use crate::search::{Bucket, QuoteDocument, QuoteSearchResult, SearchFreshness, SearchSettings};
pub use crate::warehouse::{RebuildSummary, SEARCH_INDEX, TABLES, TableRebuild, Topics, Warehouse};

/// The service's own migrations (the calendar dimension `dim_date`).
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The service's name, the root of its database, roles and variables.
pub const SERVICE: &str = "pipeline";

/// The variable naming the customer service whose events are followed.
pub const CUSTOMER_SERVICE_VAR: &str = "PIPELINE_CUSTOMER_SERVICE";
/// The variable naming the quote service whose events are followed.
pub const QUOTE_SERVICE_VAR: &str = "PIPELINE_QUOTE_SERVICE";
/// The variable naming the inventory service whose events are followed.
pub const INVENTORY_SERVICE_VAR: &str = "PIPELINE_INVENTORY_SERVICE";
/// The variable with the least version of the warehouse the service serves (default 1):
/// raising it makes the service rebuild into that version at start.
pub const VERSION_VAR: &str = "PIPELINE_WAREHOUSE_VERSION";

/// The variable with the OpenSearch cluster's URL: set, the pipeline keeps the quotes
/// index there too.
pub const OPENSEARCH_URL_VAR: &str = "DBPS_OPENSEARCH_URL";
/// The variable with the prefix of the quotes index's names (default `pipeline-`).
pub const SEARCH_PREFIX_VAR: &str = "PIPELINE_SEARCH_INDEX_PREFIX";

/// Connections of the pool that writes the warehouse (one per table at a time, and the
/// rebuild's).
const WRITER_CONNECTIONS: u32 = 10;

/// The migration components of the service's database, in order: the framework's tables
/// (the projections' sequence guard and their state and checkpoints), then the service's
/// own.
pub fn components() -> [(&'static str, &'static Migrator); 3] {
    [
        ("dbps_replica", &dbps_cache::replica::MIGRATOR),
        ("dbps_projection", &dbps_cache::projection::MIGRATOR),
        (SERVICE, &MIGRATOR),
    ]
}

/// What the pipeline needs to know: the services it follows, the version it serves, and
/// how it writes the warehouse.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The customer service's name (its events topic).
    pub customer: String,
    /// The quote service's name.
    pub quote: String,
    /// The inventory service's name (its product and reservation events).
    pub inventory: String,
    /// The least version of the warehouse to serve (at least 1).
    pub version: u32,
    /// The connection of the role that writes the warehouse: the service's owner role,
    /// which may create the tables and views of new versions.
    pub writer: PgConnectOptions,
    /// Where the quotes index is kept (`None`: no search).
    pub search: Option<SearchSettings>,
}

impl Settings {
    /// The canonical peers ([`example_contracts::services`]), version 1, writing through
    /// `writer`.
    pub fn new(writer: PgConnectOptions) -> Self {
        use example_contracts::services;
        Self {
            customer: services::CUSTOMER.to_owned(),
            quote: services::QUOTE.to_owned(),
            inventory: services::INVENTORY.to_owned(),
            version: 1,
            writer,
            search: None,
        }
    }

    /// From the environment of the service `config` describes: the owner role's
    /// connection from `DBPS_POSTGRES_URL` and `<NAME>_DB_OWNER_PASSWORD`, and
    /// [`CUSTOMER_SERVICE_VAR`], [`QUOTE_SERVICE_VAR`], [`INVENTORY_SERVICE_VAR`],
    /// [`VERSION_VAR`] when set, and the quotes index's [`OPENSEARCH_URL_VAR`] and
    /// [`SEARCH_PREFIX_VAR`].
    pub fn from_env(config: &ServiceConfig) -> Result<Self, ServiceError> {
        Self::from_lookup(config, |var| std::env::var(var).ok())
    }

    fn from_lookup(config: &ServiceConfig, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ServiceError> {
        let get = |var: &str| lookup(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let missing = |var: &str| ServiceError::MissingVar { var: var.to_owned() };
        let invalid = |var: &str, reason: String| ServiceError::InvalidVar {
            var: var.to_owned(),
            reason,
        };
        let server_var = "DBPS_POSTGRES_URL";
        let server: PgConnectOptions = get(server_var)
            .ok_or_else(|| missing(server_var))?
            .parse()
            // sqlx's message does not repeat the URL, so no password can leak here.
            .map_err(|e: sqlx::Error| invalid(server_var, e.to_string()))?;
        let owner_var = format!("{}_DB_OWNER_PASSWORD", config.name().as_str().to_ascii_uppercase());
        let owner = Password::new(get(&owner_var).ok_or_else(|| missing(&owner_var))?)
            .map_err(|e| invalid(&owner_var, e.to_string()))?;
        let writer = PgService::new(config.name().clone()).owner_options(&server, &owner);
        let mut settings = Self::new(writer);
        for (var, slot) in [
            (CUSTOMER_SERVICE_VAR, &mut settings.customer),
            (QUOTE_SERVICE_VAR, &mut settings.quote),
            (INVENTORY_SERVICE_VAR, &mut settings.inventory),
        ] {
            if let Some(name) = get(var) {
                *slot = name;
            }
        }
        settings.search = get(OPENSEARCH_URL_VAR).map(|url| SearchSettings {
            url,
            index_prefix: get(SEARCH_PREFIX_VAR).unwrap_or_else(|| format!("{SERVICE}-")),
        });
        if let Some(version) = get(VERSION_VAR) {
            settings.version = version
                .parse::<u32>()
                .ok()
                .filter(|v| (1..=i32::MAX.unsigned_abs()).contains(v))
                .ok_or_else(|| invalid(VERSION_VAR, format!("{version:?} is not a version (1, 2, ...)")))?;
        }
        Ok(settings)
    }

    /// The topics of the followed services under `naming`.
    pub fn topics(&self, naming: &dbps_core::kafka::TopicNaming) -> dbps_core::Result<Topics> {
        Topics::new(naming, &self.customer, &self.quote, &self.inventory)
    }
}

/// The service's database prepared as at every start (provisioned, migrated), with the
/// warehouse writer: what both the service and the rebuild command start from.
///
/// Returns the runtime role's pool (the reports' reads) and the [`Warehouse`], whose
/// source topics exist once this returns.
pub async fn prepare(
    service: &Service,
    settings: &Settings,
) -> Result<(PgPool, Warehouse), Box<dyn std::error::Error + Send + Sync>> {
    let reads = service.postgres(&components()).await?;
    let writer = PgPoolOptions::new()
        .max_connections(WRITER_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(settings.writer.clone())
        .await?;
    // The projections read in groups of the service's own (`pipeline.projection-…`).
    let mut warehouse =
        Warehouse::new(writer, settings.topics(&service.naming())?).group_prefix(service.group("projection-"));
    if let Some(search) = &settings.search {
        warehouse = warehouse.search(search.clone());
    }
    warehouse.ensure_topics(service.kafka()?).await?;
    Ok((reads, warehouse))
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    reads: PgPool,
    warehouse: Warehouse,
    search: search::SearchState,
}

impl App {
    /// Prepares the service's database ([`prepare`]) and starts keeping the warehouse
    /// current on `service` ([`Warehouse::keep_current`], at least at
    /// [`Settings::version`]: a first start builds every table from the topics' history).
    /// Serve [`App::router`] next.
    pub async fn start(
        service: &mut Service,
        settings: Settings,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let (reads, warehouse) = prepare(service, &settings).await?;
        let kafka = service.kafka()?.clone();
        let keeper = warehouse.clone();
        let version = settings.version;
        service.run("warehouse", move |stop| async move {
            keeper.keep_current(&kafka, version, stop).await
        });
        let search = warehouse.quote_index(version)?;
        Ok(Self {
            reads,
            warehouse,
            search,
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/reports/pipeline-value", get(reports::pipeline_value))
            .route("/reports/conversion", get(reports::conversion))
            .route("/reports/stock-outs", get(reports::stock_outs))
            .route("/reports/stock-movements", get(reports::stock_movements))
            .route("/reports/freshness", get(reports::freshness))
            .with_state(self.reads.clone())
            .merge(
                Router::new()
                    .route("/search/quotes", get(search::search_quotes))
                    .with_state(self.search.clone()),
            )
    }

    /// The warehouse (its rebuild, its serving versions).
    pub fn warehouse(&self) -> &Warehouse {
        &self.warehouse
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ServiceError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        let config = ServiceConfig::new(SERVICE)?;
        Settings::from_lookup(&config, |var| vars.get(var).cloned())
    }

    const BASE: [(&str, &str); 2] = [
        ("DBPS_POSTGRES_URL", "postgres://admin:secret@db:5432/postgres"),
        ("PIPELINE_DB_OWNER_PASSWORD", "owner-pw"),
    ];

    #[test]
    fn defaults_to_the_canonical_services_and_version_1_writing_as_the_owner() {
        let s = settings(&BASE).expect("valid");
        assert_eq!(
            (s.customer.as_str(), s.quote.as_str(), s.inventory.as_str()),
            ("customer", "quote", "inventory")
        );
        assert_eq!(s.version, 1);
        assert_eq!(s.writer.get_username(), "pipeline_owner");
        assert_eq!(s.writer.get_database(), Some("pipeline"));
        assert_eq!(s.search, None);
    }

    #[test]
    fn reads_the_peers_and_the_version() {
        let mut vars = BASE.to_vec();
        vars.extend([
            (QUOTE_SERVICE_VAR, "quote_eu"),
            (INVENTORY_SERVICE_VAR, " stock "),
            (VERSION_VAR, "3"),
        ]);
        let s = settings(&vars).expect("valid");
        assert_eq!(
            (s.customer.as_str(), s.quote.as_str(), s.inventory.as_str()),
            ("customer", "quote_eu", "stock")
        );
        assert_eq!(s.version, 3);
    }

    #[test]
    fn bad_or_missing_variables_are_named() {
        let mut vars = BASE.to_vec();
        vars.push((VERSION_VAR, "0"));
        let error = settings(&vars).expect_err("version 0").to_string();
        assert!(error.contains(VERSION_VAR), "{error}");
        let error = settings(&BASE[..1]).expect_err("no owner password").to_string();
        assert!(error.contains("PIPELINE_DB_OWNER_PASSWORD"), "{error}");
        let error = settings(&[]).expect_err("no server").to_string();
        assert!(error.contains("DBPS_POSTGRES_URL"), "{error}");
    }
}
