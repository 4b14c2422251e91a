//! The reports: SQL over the warehouse's views, each read in one repeatable-read
//! transaction with its freshness, the views it reads locked first (see `snapshot`).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use dbps_service::http::Problem;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::warehouse::{
    DimProduct, FactQuote, FactQuoteStatus, FactStockLevel, FactStockMovement, FactStockOut, NEW, ORDERED,
    PENDING_STOCK, STOCK_DELTAS, TABLES, Table,
};

/// The month a quote was created, from the calendar dimension (or computed, for a day
/// outside it).
const MONTH: &str = "coalesce(d.month_key, to_char(q.created_date, 'YYYY-MM'))";

/// The quotes created from `$1` to `$2` (days; either may be null: open) as `q`, with
/// their newest status (`s`, if any) and their day in the calendar dimension (`d`).
const QUOTES_IN_RANGE: &str = "from fact_quote q \
     left join fact_quote_status s on s.quote_id = q.quote_id \
     left join dim_date d on d.date_key = q.created_date \
     where ($1::date is null or q.created_date >= $1) and ($2::date is null or q.created_date <= $2)";

/// The views the quote reports read.
const QUOTE_VIEWS: [&str; 2] = [FactQuote::NAME, FactQuoteStatus::NAME];

/// The month of a stock movement, from the calendar dimension (or computed, for a day
/// outside it).
const MOVEMENT_MONTH: &str = "coalesce(d.month_key, to_char(m.changed_date, 'YYYY-MM'))";

/// Most rows of the stock-outs report.
const MAX_LIMIT: i64 = 1000;
/// Rows of the stock-outs report when no limit is given.
const DEFAULT_LIMIT: i64 = 100;

/// How fresh a report is: for each table it reads, the version its view serves and the
/// newest event it has applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Freshness {
    /// When the report was read (the database's clock).
    pub as_of: DateTime<Utc>,
    /// The source time of the newest event any of the tables has applied.
    pub newest_event_at: Option<DateTime<Utc>>,
    /// The largest of the tables' lags (seconds from an event's source time to its
    /// application, for each table's newest event).
    pub lag_seconds: Option<f64>,
    /// Per table.
    pub sources: Vec<SourceFreshness>,
}

/// How fresh one table of a report is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFreshness {
    /// The table (its view).
    pub table: String,
    /// The version its view serves (`None`: not built yet).
    pub version: Option<u32>,
    /// The source time (the event's `occurred_at`) of the newest event it applied.
    pub newest_event_at: Option<DateTime<Utc>>,
    /// When that event was applied.
    pub applied_at: Option<DateTime<Utc>>,
    /// Seconds from the newest event's source time to its application.
    pub lag_seconds: Option<f64>,
}

/// `GET /reports/pipeline-value`: quotes and their value by status or by month created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineValue {
    /// `status` or `month`.
    pub group: String,
    /// The first day of quotes counted, when the request set one.
    pub from: Option<NaiveDate>,
    /// The last day of quotes counted, when the request set one.
    pub to: Option<NaiveDate>,
    /// Per status (by name) or per month (ascending).
    pub rows: Vec<ValueRow>,
    /// Quotes in all.
    pub quotes: i64,
    /// Their value in all, in cents.
    pub value_cents: i64,
    /// How fresh the figures are.
    pub freshness: Freshness,
}

/// One group of the pipeline value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueRow {
    /// The status (`New` for a quote no status change was seen for), by status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The month created (`YYYY-MM`, UTC), by month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<String>,
    /// Quotes.
    pub quotes: i64,
    /// Their value (the lines' quantity × unit price), in cents.
    pub value_cents: i64,
}

/// `GET /reports/conversion`: how many quotes became orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    /// The first day of quotes counted, when the request set one.
    pub from: Option<NaiveDate>,
    /// The last day of quotes counted, when the request set one.
    pub to: Option<NaiveDate>,
    /// Quotes created.
    pub created: i64,
    /// Of those, quotes ordered.
    pub ordered: i64,
    /// `ordered / created` (`None` without quotes).
    pub ratio: Option<f64>,
    /// The value of the quotes created, in cents.
    pub created_value_cents: i64,
    /// The value of the quotes ordered, in cents.
    pub ordered_value_cents: i64,
    /// Per month created (ascending), with `group=month`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub months: Option<Vec<ConversionRow>>,
    /// How fresh the figures are.
    pub freshness: Freshness,
}

/// The conversion of the quotes created in one month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionRow {
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// Quotes created that month.
    pub created: i64,
    /// Of those, quotes ordered (whenever).
    pub ordered: i64,
    /// `ordered / created`.
    pub ratio: Option<f64>,
}

/// `GET /reports/stock-outs`: the products quotes could not get.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockOuts {
    /// Per product, most units short first.
    pub rows: Vec<StockOutRow>,
    /// How fresh the figures are.
    pub freshness: Freshness,
}

/// One product short in quotes' reservations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockOutRow {
    /// The product.
    pub product_id: Uuid,
    /// Its SKU (`None` while the product dimension does not know it).
    pub sku: Option<String>,
    /// Its name.
    pub name: Option<String>,
    /// Quotes whose reservation failed because of it.
    pub quotes: i64,
    /// Of those, the quotes whose status is `Pending Stock` now.
    pub quotes_pending_stock: i64,
    /// Units short: requested minus available, added up over those quotes.
    pub units_short: i64,
    /// Its available stock now (`None` while no stock level was seen).
    pub available_now: Option<i64>,
}

/// `GET /reports/stock-movements`: how each product's stock moved, per month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockMovements {
    /// The product asked for, when the request named one.
    pub product_id: Option<Uuid>,
    /// The first day of movements counted, when the request set one.
    pub from: Option<NaiveDate>,
    /// The last day of movements counted, when the request set one.
    pub to: Option<NaiveDate>,
    /// Per product and month (`YYYY-MM`, UTC), by product id then month.
    pub rows: Vec<StockMovementRow>,
    /// How fresh the figures are.
    pub freshness: Freshness,
}

/// One product's stock movements in one month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockMovementRow {
    /// The product.
    pub product_id: Uuid,
    /// `YYYY-MM` (UTC) of the movements.
    pub month: String,
    /// Changes of its stock level (`StockLevelChanged` events).
    pub movements: i64,
    /// Units the level rose by, added up over the movements that raised it (the first
    /// known level counts from zero).
    pub units_in: i64,
    /// Units the level fell by, added up over the movements that lowered it.
    pub units_out: i64,
    /// The available stock after the month's last movement (by stock version).
    pub last_level: i64,
}

/// The query of a report: its raw parameters, checked by the report.
type Params = Query<Vec<(String, String)>>;

/// Checks a report's parameters, collecting every mistake.
#[derive(Debug, Default)]
struct Checked {
    errors: Vec<serde_json::Value>,
}

impl Checked {
    fn invalid(&mut self, parameter: &str, detail: impl Into<String>) {
        self.errors
            .push(serde_json::json!({ "parameter": parameter, "detail": detail.into() }));
    }

    /// The parameters, each at most once and each one of `known`.
    fn single<'a>(&mut self, params: &'a [(String, String)], known: &[&str]) -> Vec<(&'a str, &'a str)> {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (name, value) in params {
            if !known.contains(&name.as_str()) {
                self.invalid(name, format!("unknown parameter; known: {}", known.join(", ")));
            } else if seen.iter().any(|(n, _)| n == name) {
                self.invalid(name, "given more than once");
            } else {
                seen.push((name, value));
            }
        }
        seen
    }

    fn date(&mut self, parameter: &str, value: Option<&str>) -> Option<NaiveDate> {
        let value = value?;
        match NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d") {
            Ok(date) => Some(date),
            Err(_) => {
                self.invalid(parameter, "must be a date, YYYY-MM-DD");
                None
            }
        }
    }

    fn range(&mut self, from: Option<&str>, to: Option<&str>) -> (Option<NaiveDate>, Option<NaiveDate>) {
        let (from, to) = (self.date("from", from), self.date("to", to));
        if let (Some(from), Some(to)) = (from, to)
            && from > to
        {
            self.invalid("to", "must not be before from");
        }
        (from, to)
    }

    fn finish(self) -> Result<(), Problem> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(Problem::new(StatusCode::BAD_REQUEST)
            .title("Invalid report parameters")
            .detail("the report's parameters are invalid")
            .with("errors", self.errors))
    }
}

fn get<'a>(params: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    params.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

fn failed(error: sqlx::Error) -> Problem {
    if let sqlx::Error::Database(db) = &error
        && db.code().as_deref() == Some("42P01")
    {
        // A view does not exist: the warehouse's first build has not switched it yet.
        return Problem::unavailable()
            .title("The warehouse is being built")
            .detail("the warehouse has not been built from the event history yet; retry later");
    }
    tracing::error!(%error, "report failed");
    Problem::unavailable()
}

/// A read-only transaction that sees one snapshot of every table, with the views it
/// reads (`views`) locked before its first query.
///
/// A view is resolved when a statement is parsed, but the transaction reads with the
/// snapshot of its first statement: without the lock, a report whose snapshot predates
/// a table's switch to a new version could read the new version's table as of that
/// snapshot, when it was behind. The lock waits for a switch in progress and holds the
/// next one off until the report ends, so the snapshot is from after the switches of the
/// versions read.
async fn snapshot(pool: &PgPool, views: &[&str]) -> Result<Transaction<'static, Postgres>, Problem> {
    let mut tx = pool.begin().await.map_err(failed)?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    match dbps_cache::projection::lock_views(&mut tx, views).await {
        Ok(()) => Ok(tx),
        Err(dbps_cache::CacheError::Postgres { source, .. }) => Err(failed(source)),
        Err(error) => {
            tracing::error!(%error, "report failed");
            Err(Problem::unavailable())
        }
    }
}

/// Ends a report's transaction `tx`: the freshness of `tables` as of its snapshot, then the
/// commit.
async fn finish(mut tx: Transaction<'static, Postgres>, tables: &[&str]) -> Result<Freshness, Problem> {
    let freshness = freshness_of(&mut tx, tables).await.map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(freshness)
}

/// The freshness of `tables`, in the caller's snapshot.
async fn freshness_of(conn: &mut PgConnection, tables: &[&str]) -> Result<Freshness, sqlx::Error> {
    /// Table, serving version, newest source time, when applied, now.
    type Row = (
        String,
        Option<i32>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "select t.name, s.serving_version, v.source_time, v.updated_at, now() \
             from unnest($1::text[]) with ordinality as t(name, n) \
             left join dbps_projection_state s on s.projection = t.name \
             left join lateral ( \
                 select source_time, updated_at from dbps_replica_versions \
                 where replica = 'projection:' || t.name || '_v' || s.serving_version \
                 order by source_time desc nulls last limit 1 \
             ) v on true \
             order by t.n",
    )
    .bind(tables)
    .fetch_all(conn)
    .await?;
    let as_of = rows.first().map_or_else(Utc::now, |r| r.4);
    let sources: Vec<SourceFreshness> = rows
        .into_iter()
        .map(|(table, version, newest, applied, _)| SourceFreshness {
            table,
            version: version.map(i32::unsigned_abs),
            newest_event_at: newest,
            applied_at: applied,
            lag_seconds: newest
                .zip(applied)
                .map(|(n, a)| (a - n).num_milliseconds() as f64 / 1000.0),
        })
        .collect();
    Ok(Freshness {
        as_of,
        newest_event_at: sources.iter().filter_map(|s| s.newest_event_at).max(),
        lag_seconds: sources.iter().filter_map(|s| s.lag_seconds).reduce(f64::max),
        sources,
    })
}

fn ratio(ordered: i64, created: i64) -> Option<f64> {
    (created > 0).then(|| ordered as f64 / created as f64)
}

/// `GET /reports/pipeline-value`.
pub(crate) async fn pipeline_value(
    State(pool): State<PgPool>,
    Query(params): Params,
) -> Result<Json<PipelineValue>, Problem> {
    let mut checked = Checked::default();
    let params = checked.single(&params, &["group", "from", "to"]);
    let group = get(&params, "group").unwrap_or("status").trim().to_owned();
    if group != "status" && group != "month" {
        checked.invalid("group", "must be status or month");
    }
    let (from, to) = checked.range(get(&params, "from"), get(&params, "to"));
    checked.finish()?;

    let mut tx = snapshot(&pool, &QUOTE_VIEWS).await?;
    let key = if group == "status" {
        format!("coalesce(s.status, '{NEW}')")
    } else {
        String::from(MONTH)
    };
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {key} as key, count(*)::int8, coalesce(sum(q.value_cents), 0)::int8 \
         {QUOTES_IN_RANGE} group by 1 order by {key} collate \"C\""
    )))
    .bind(from)
    .bind(to)
    .fetch_all(&mut *tx)
    .await
    .map_err(failed)?;
    let freshness = finish(tx, &QUOTE_VIEWS).await?;
    let by_status = group == "status";
    Ok(Json(PipelineValue {
        from,
        to,
        quotes: rows.iter().map(|r| r.1).sum(),
        value_cents: rows.iter().map(|r| r.2).sum(),
        rows: rows
            .into_iter()
            .map(|(key, quotes, value_cents)| ValueRow {
                status: by_status.then(|| key.clone()),
                month: (!by_status).then_some(key),
                quotes,
                value_cents,
            })
            .collect(),
        group,
        freshness,
    }))
}

/// `GET /reports/conversion`.
pub(crate) async fn conversion(State(pool): State<PgPool>, Query(params): Params) -> Result<Json<Conversion>, Problem> {
    let mut checked = Checked::default();
    let params = checked.single(&params, &["group", "from", "to"]);
    let group = get(&params, "group").unwrap_or("total").trim().to_owned();
    if group != "total" && group != "month" {
        checked.invalid("group", "must be total or month");
    }
    let (from, to) = checked.range(get(&params, "from"), get(&params, "to"));
    checked.finish()?;

    let mut tx = snapshot(&pool, &QUOTE_VIEWS).await?;
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {MONTH}, count(*)::int8, \
         (count(*) filter (where s.status = $3))::int8, coalesce(sum(q.value_cents), 0)::int8, \
         coalesce(sum(q.value_cents) filter (where s.status = $3), 0)::int8 \
         {QUOTES_IN_RANGE} group by 1 order by {MONTH} collate \"C\""
    )))
    .bind(from)
    .bind(to)
    .bind(ORDERED)
    .fetch_all(&mut *tx)
    .await
    .map_err(failed)?;
    let freshness = finish(tx, &QUOTE_VIEWS).await?;
    let created: i64 = rows.iter().map(|r| r.1).sum();
    let ordered: i64 = rows.iter().map(|r| r.2).sum();
    Ok(Json(Conversion {
        from,
        to,
        created,
        ordered,
        ratio: ratio(ordered, created),
        created_value_cents: rows.iter().map(|r| r.3).sum(),
        ordered_value_cents: rows.iter().map(|r| r.4).sum(),
        months: (group == "month").then(|| {
            rows.iter()
                .map(|(month, created, ordered, _, _)| ConversionRow {
                    month: month.clone(),
                    created: *created,
                    ordered: *ordered,
                    ratio: ratio(*ordered, *created),
                })
                .collect()
        }),
        freshness,
    }))
}

/// `GET /reports/stock-outs`.
pub(crate) async fn stock_outs(State(pool): State<PgPool>, Query(params): Params) -> Result<Json<StockOuts>, Problem> {
    let mut checked = Checked::default();
    let params = checked.single(&params, &["limit"]);
    let limit = match get(&params, "limit").map(|v| v.trim().parse::<i64>()) {
        None => DEFAULT_LIMIT,
        Some(Ok(limit)) if (1..=MAX_LIMIT).contains(&limit) => limit,
        Some(_) => {
            checked.invalid("limit", format!("must be a whole number from 1 to {MAX_LIMIT}"));
            DEFAULT_LIMIT
        }
    };
    checked.finish()?;

    let views = [
        FactStockOut::NAME,
        DimProduct::NAME,
        FactQuoteStatus::NAME,
        FactStockLevel::NAME,
    ];
    let mut tx = snapshot(&pool, &views).await?;
    type Row = (Uuid, Option<String>, Option<String>, i64, i64, i64, Option<i64>);
    let rows: Vec<Row> = sqlx::query_as(
        "select o.product_id, p.sku, p.name, count(*)::int8, \
         (count(*) filter (where s.status = $1))::int8, coalesce(sum(o.units_short), 0)::int8, l.available \
         from fact_stock_out o \
         left join dim_product p on p.product_id = o.product_id \
         left join fact_quote_status s on s.quote_id = o.quote_id \
         left join fact_stock_level l on l.product_id = o.product_id \
         group by o.product_id, p.sku, p.name, l.available \
         order by 6 desc, 4 desc, o.product_id limit $2",
    )
    .bind(PENDING_STOCK)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(failed)?;
    let freshness = finish(tx, &views).await?;
    Ok(Json(StockOuts {
        rows: rows
            .into_iter()
            .map(
                |(product_id, sku, name, quotes, quotes_pending_stock, units_short, available_now)| StockOutRow {
                    product_id,
                    sku,
                    name,
                    quotes,
                    quotes_pending_stock,
                    units_short,
                    available_now,
                },
            )
            .collect(),
        freshness,
    }))
}

/// `GET /reports/stock-movements`.
pub(crate) async fn stock_movements(
    State(pool): State<PgPool>,
    Query(params): Params,
) -> Result<Json<StockMovements>, Problem> {
    let mut checked = Checked::default();
    let params = checked.single(&params, &["product_id", "from", "to"]);
    let product_id = match get(&params, "product_id").map(|v| v.trim().parse::<Uuid>()) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            checked.invalid("product_id", "must be a product id (a UUID)");
            None
        }
    };
    let (from, to) = checked.range(get(&params, "from"), get(&params, "to"));
    checked.finish()?;

    let mut tx = snapshot(&pool, &[FactStockMovement::NAME]).await?;
    // The changes are computed over each product's whole history, then the range
    // chooses the movements counted: the first one in the range still counts from the
    // level before it.
    let rows: Vec<(Uuid, String, i64, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select m.product_id, {MOVEMENT_MONTH}, \
         count(*)::int8, coalesce(sum(m.delta) filter (where m.delta > 0), 0)::int8, \
         coalesce(-sum(m.delta) filter (where m.delta < 0), 0)::int8, \
         (array_agg(m.available order by m.stock_version desc, m.source_sequence desc))[1]::int8 \
         from ({STOCK_DELTAS}) m \
         left join dim_date d on d.date_key = m.changed_date \
         where ($1::uuid is null or m.product_id = $1) \
         and ($2::date is null or m.changed_date >= $2) and ($3::date is null or m.changed_date <= $3) \
         group by 1, 2 order by 1, {MOVEMENT_MONTH} collate \"C\""
    )))
    .bind(product_id)
    .bind(from)
    .bind(to)
    .fetch_all(&mut *tx)
    .await
    .map_err(failed)?;
    let freshness = finish(tx, &[FactStockMovement::NAME]).await?;
    Ok(Json(StockMovements {
        product_id,
        from,
        to,
        rows: rows
            .into_iter()
            .map(
                |(product_id, month, movements, units_in, units_out, last_level)| StockMovementRow {
                    product_id,
                    month,
                    movements,
                    units_in,
                    units_out,
                    last_level,
                },
            )
            .collect(),
        freshness,
    }))
}

/// `GET /reports/freshness`: every table's.
pub(crate) async fn freshness(State(pool): State<PgPool>, Query(params): Params) -> Result<Json<Freshness>, Problem> {
    let mut checked = Checked::default();
    checked.single(&params, &[]);
    checked.finish()?;
    // Only the state tables are read: no view to lock.
    let tx = snapshot(&pool, &[]).await?;
    Ok(Json(finish(tx, &TABLES).await?))
}
