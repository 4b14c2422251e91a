//! Projections in PostgreSQL tables, read from Kafka by the projection itself.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use dbps_core::CancellationToken;
use dbps_core::kafka::KafkaConfig;
use sqlx::migrate::Migrator;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool};

use super::reader::{
    BatchEffect, Common, IDLE_CHECK, Partition, Record, Runner, advance, behind, common_builder_methods,
    rebuild_unless_serving, retrying,
};
use super::{ReadModel, RebuildReport, RunSummary};
use crate::error::{CacheError, Result};
use crate::replica::{PgTarget, collapse, quote};

/// The projections' state and checkpoint tables (`dbps_projection_state`,
/// `dbps_projection_checkpoints`), a migration component for `dbps_migrate::PgMigrations`
/// (name it `dbps_projection`). Projections keep their aggregates' sequences in the
/// replicas' version table, so the service runs `dbps_cache::replica::MIGRATOR` too.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/projection");

/// Builds a [`PgProjection`].
pub struct PgProjectionBuilder<R> {
    pool: PgPool,
    model: R,
    aggregate_column: String,
    sequence_column: String,
    conflict_key: Vec<String>,
    common: Common,
}

impl<R> fmt::Debug for PgProjectionBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgProjectionBuilder")
            .field("aggregate_column", &self.aggregate_column)
            .field("max_batch", &self.common.max_batch)
            .finish_non_exhaustive()
    }
}

impl<R: ReadModel> PgProjectionBuilder<R> {
    /// The column that holds the aggregate's id (default `aggregate_id`).
    pub fn aggregate_column(mut self, column: impl Into<String>) -> Self {
        self.aggregate_column = column.into();
        self
    }

    /// The column that holds the aggregate's sequence of each row (default
    /// `source_sequence`).
    pub fn sequence_column(mut self, column: impl Into<String>) -> Self {
        self.sequence_column = column.into();
        self
    }

    /// The table's unique key, when it is not the aggregate column (one aggregate, many
    /// rows): a row whose key another aggregate still holds takes it over.
    pub fn conflict_key<I: IntoIterator<Item = C>, C: Into<String>>(mut self, columns: I) -> Self {
        self.conflict_key = columns.into_iter().map(Into::into).collect();
        self
    }

    common_builder_methods!("transaction");

    /// Checks the declaration and the settings and builds the projection.
    pub fn build(self) -> Result<PgProjection<R>> {
        let name = self.model.name().to_owned();
        let view = quote("projection name", &name)?;
        let topics = self.model.topics();
        self.common.check(self.model.version(), &topics)?;
        // `check` made sure it fits.
        let version = i32::try_from(self.model.version()).unwrap_or(i32::MAX);
        let label = format!("{name}_v{version}");
        let table = quote("projection table", &label)?;
        let target = PgTarget::new(
            format!("projection:{label}"),
            table.clone(),
            &self.aggregate_column,
            &self.sequence_column,
            &self.conflict_key,
        )?;
        let runner = Runner::new(self.common, &name, self.model.version(), topics);
        Ok(PgProjection {
            inner: Arc::new(Inner {
                pool: self.pool,
                model: self.model,
                name,
                version,
                view,
                quoted_table: table,
                target,
                runner,
            }),
        })
    }
}

/// One version of a projection in a PostgreSQL table, with the reader that keeps it.
///
/// [`run`](Self::run) is the projection's life: if its version does not serve yet, it is
/// [rebuilt](Self::rebuild) from the beginning of the topics while the serving version
/// goes on, then the view is switched to it; from then on it applies new records as they
/// arrive, each batch in one transaction with its checkpoints, until it is stopped or a
/// newer version takes the view over.
///
/// Readers query the view `<name>`. One statement sees one version, complete; a
/// transaction that reads several projection views, or one in several statements under
/// `REPEATABLE READ`, first locks them with [`lock_views`].
///
/// ```no_run
/// # use dbps_cache::projection::{Change, ReadModel};
/// # struct Orders;
/// # impl ReadModel for Orders {
/// #     type Events = Events;
/// #     fn name(&self) -> &str { "orders" }
/// #     fn version(&self) -> u32 { 2 }
/// #     fn topics(&self) -> Vec<String> { vec![String::from("order.order.events")] }
/// #     fn create_table(&self, table: &str) -> String { format!("create table {table} ()") }
/// #     fn project(&self, _: Events, _: &dbps_core::Envelope) -> Result<Change, dbps_core::HandlerError> { Ok(Change::Delete) }
/// # }
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)] struct Deleted {}
/// # impl dbps_core::Message for Deleted { const TYPE: &'static str = "order.Deleted"; }
/// # dbps_core::message_set! { enum Events { Deleted(Deleted) } }
/// # async fn example(pool: sqlx::PgPool, kafka: dbps_core::kafka::KafkaConfig) -> Result<(), Box<dyn std::error::Error>> {
/// use dbps_cache::projection::PgProjection;
///
/// let orders = PgProjection::builder(pool, Orders)
///     .on_progress(|p| tracing::info!(replayed = p.replayed, total = p.total, "rebuilding orders"))
///     .build()?;
/// // Rebuilds `orders_v2` if it does not serve yet, switches the view `orders` to it,
/// // then keeps it current.
/// let summary = orders.run(&kafka, dbps_core::CancellationToken::new()).await?;
/// # let _ = summary; Ok(()) }
/// ```
pub struct PgProjection<R> {
    inner: Arc<Inner<R>>,
}

struct Inner<R> {
    pool: PgPool,
    model: R,
    name: String,
    version: i32,
    view: String,
    quoted_table: String,
    target: PgTarget,
    runner: Runner,
}

impl<R> Clone for PgProjection<R> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<R> fmt::Debug for PgProjection<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgProjection")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("topics", &self.inner.runner.topics)
            .finish_non_exhaustive()
    }
}

/// Locks projection views (plain or `schema.name` identifiers, quoted here) in `ACCESS
/// SHARE` mode for the rest of the caller's transaction: the way to read several views
/// consistently, or one view in several statements under `REPEATABLE READ`.
///
/// PostgreSQL resolves a view when a statement is parsed, with the catalog as of then,
/// but a `REPEATABLE READ` transaction reads every statement with the snapshot of its
/// first one. A transaction whose snapshot predates a switch and that resolves a view
/// after it reads the new version's table as of that older snapshot, when the new
/// version may have been far behind (a row count can drop, a row go back). Locking the
/// views first, before the transaction's first query (`LOCK TABLE` takes no snapshot),
/// closes that: the lock waits for a switch in progress and then holds the next one off
/// until the transaction ends, and locking a view also locks the tables its query reads.
/// Every statement of the transaction then reads the versions that served when the lock
/// was granted, with a snapshot from after their switches. A switch waits for such
/// transactions (and the old version's batches wait for the switch), so keep them short.
///
/// Call it first in the transaction (after `SET TRANSACTION`); outside a transaction
/// block PostgreSQL refuses the lock. The views are locked in the order of their quoted
/// names, whatever the order given, so that transactions locking overlapping sets do not
/// deadlock through switches waiting on them. Nothing is done for an empty list.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("set transaction isolation level repeatable read, read only")
///     .execute(&mut *tx)
///     .await?;
/// dbps_cache::projection::lock_views(&mut tx, &["orders", "order_lines"]).await?;
/// let orders: i64 = sqlx::query_scalar("select count(*) from orders").fetch_one(&mut *tx).await?;
/// let lines: i64 = sqlx::query_scalar("select count(*) from order_lines").fetch_one(&mut *tx).await?;
/// tx.commit().await?;
/// # let _ = (orders, lines); Ok(()) }
/// ```
pub async fn lock_views<S: AsRef<str>>(conn: &mut PgConnection, views: &[S]) -> Result<()> {
    if views.is_empty() {
        return Ok(());
    }
    let mut quoted = views
        .iter()
        .map(|view| {
            let parts = view
                .as_ref()
                .split('.')
                .map(|part| quote("projection view", part))
                .collect::<Result<Vec<_>>>()?;
            if parts.len() > 2 {
                return Err(CacheError::InvalidConfig {
                    setting: "projection view",
                    reason: format!("{:?} has more than a schema and a name", view.as_ref()),
                });
            }
            Ok(parts.join("."))
        })
        .collect::<Result<Vec<_>>>()?;
    // One order for every caller: two transactions locking the same views never wait for
    // each other through switches waiting on both.
    quoted.sort();
    quoted.dedup();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "lock table {} in access share mode",
        quoted.join(", ")
    )))
    .execute(conn)
    .await
    .map_err(pg("lock the projection views"))?;
    Ok(())
}

/// Whether the serving version allows a batch of this version to commit.
enum Gate {
    Open,
    Superseded(u32),
}

impl<R: ReadModel> PgProjection<R> {
    /// A builder for the projection `model` declares.
    pub fn builder(pool: PgPool, model: R) -> PgProjectionBuilder<R> {
        PgProjectionBuilder {
            pool,
            model,
            aggregate_column: String::from("aggregate_id"),
            sequence_column: String::from("source_sequence"),
            conflict_key: Vec::new(),
            common: Common::default(),
        }
    }

    /// The projection's name (its view).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The version this projection writes.
    pub fn version(&self) -> u32 {
        self.inner.version.unsigned_abs()
    }

    /// This version's table, `<name>_v<version>` (unquoted).
    pub fn table(&self) -> &str {
        &self.inner.runner.label
    }

    /// The version the view serves, `None` before the first switch.
    pub async fn serving_version(&self) -> Result<Option<u32>> {
        let version: Option<Option<i32>> =
            sqlx::query_scalar("select serving_version from dbps_projection_state where projection = $1")
                .bind(&self.inner.name)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(pg("read serving version"))?;
        Ok(version.flatten().map(i32::unsigned_abs))
    }

    /// This version's checkpoints: per topic partition, the offset of the next record to
    /// apply.
    pub async fn checkpoints(&self) -> Result<BTreeMap<(String, i32), i64>> {
        let mut conn = self.inner.pool.acquire().await.map_err(pg("read checkpoints"))?;
        checkpoints_of(&mut conn, &self.inner.name, self.inner.version)
            .await
            .map_err(pg("read checkpoints"))
    }

    /// Rebuilds this version from the beginning of its topics and switches the view to
    /// it, while the serving version (if any) goes on being written.
    ///
    /// The fresh table `<name>_v<version>` is created (or, after an interrupted rebuild,
    /// taken up where its checkpoints are), every record up to the end offsets at the
    /// start is replayed into it, and then the records that arrived meanwhile, until it
    /// has caught up with the serving version's checkpoints. Then the switch: one
    /// transaction locks the serving version's state (no batch of the old version commits
    /// after it) and reads its checkpoints; the last records up to them are applied and
    /// committed in a second transaction, on another connection; then the first
    /// transaction switches the view (`create or replace view`), makes this version the
    /// serving one and commits. A statement that reads the view sees the old version or
    /// the new one, complete. A transaction that reads several views, or one view in
    /// several statements under `REPEATABLE READ`, locks them first: see [`lock_views`].
    ///
    /// The switch holds two connections of the pool at once.
    ///
    /// Nothing is done (`switched == false`) when this version or a newer one serves
    /// already, or when `shutdown` stops the rebuild before the switch.
    pub async fn rebuild(&self, kafka: &KafkaConfig, shutdown: &CancellationToken) -> Result<RebuildReport> {
        let inner = &self.inner;
        self.prepare().await?;
        let previous = self.serving_version().await?;
        let (mut report, needed) = inner.runner.rebuild_report(previous);
        if !needed {
            return Ok(report);
        }
        self.create_table().await?;
        let started = inner.runner.reader(kafka, self.checkpoints().await?).await?;
        let (ends, mut total) = started.ends();
        let (reader, watermarks, mut positions) = (started.reader, started.watermarks, started.positions);
        tracing::info!(projection = %inner.runner.label, ?previous, total, "rebuild started");
        self.report_progress(0, total);

        // Replay up to the end offsets at the start, then up to the serving version's
        // checkpoints, each batch in a transaction of its own.
        let mut targets = ends;
        loop {
            if !behind(&positions, &targets) {
                let mut serving = self.serving_checkpoints(previous).await?;
                serving.retain(|partition, _| watermarks.contains_key(partition));
                if !behind(&positions, &serving) {
                    break;
                }
                targets = serving;
            }
            let Some(batch) = reader.next_batch(inner.runner.max_batch, shutdown, None).await? else {
                return Ok(report);
            };
            let count = batch.len() as u64;
            self.apply_retrying(&batch, false, shutdown).await?;
            advance(&mut positions, &batch);
            report.replayed += count;
            total = total.max(report.replayed);
            self.report_progress(report.replayed, total);
        }

        // The switch. Transaction A locks the serving version's state so that none of its
        // batches commits any more and reads its checkpoints, now fixed; transaction B, on
        // a connection of its own, applies this version's last records up to them and
        // commits; only then does A point the view at this version and commit. A statement
        // resolves the view when it is parsed, with the catalog as of then, but reads with
        // a snapshot taken just before: a statement that resolves the view to this version
        // asked for the view's lock after A replaced the view, so its snapshot is from
        // after B's commit and it sees this version complete (had A applied the last
        // records itself, such a statement would read this version without them). B's
        // connection is taken before A locks anything, so that the switch never waits for
        // the pool while it holds the old version out.
        let mut apply_conn = inner.pool.acquire().await.map_err(pg("begin the switch"))?;
        let mut tx = inner.pool.begin().await.map_err(pg("begin the switch"))?;
        let serving: Option<Option<i32>> =
            sqlx::query_scalar("select serving_version from dbps_projection_state where projection = $1 for update")
                .bind(&inner.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(pg("lock the projection's state"))?;
        let serving = serving.flatten();
        if serving.map(i32::unsigned_abs) != previous {
            // Another instance switched meanwhile.
            tracing::info!(projection = %inner.runner.label, ?serving, "another instance switched the view");
            return Ok(report);
        }
        // Only the partitions this version reads count (the old one may have read others).
        let mut targets = match serving {
            Some(version) => checkpoints_of(&mut tx, &inner.name, version)
                .await
                .map_err(pg("read the serving checkpoints"))?,
            None => BTreeMap::new(),
        };
        targets.retain(|partition, _| watermarks.contains_key(partition));
        // B writes only this version's rows, versions and checkpoints: nothing A holds
        // (the state row, read access to the checkpoints), and nothing a batch of the old
        // version waiting for the state row holds (the state row is the first thing its
        // transaction asks for).
        if behind(&positions, &targets) {
            let mut last = apply_conn.begin().await.map_err(pg("begin the last records"))?;
            let mut effects = Vec::new();
            while behind(&positions, &targets) {
                let Some(batch) = reader.next_batch(inner.runner.max_batch, shutdown, None).await? else {
                    return Ok(report);
                };
                effects.push(self.apply_in(&mut last, &batch).await?);
                advance(&mut positions, &batch);
                report.replayed += batch.len() as u64;
            }
            last.commit().await.map_err(pg("commit the last records"))?;
            for effect in &effects {
                self.record(effect);
            }
        }
        drop(apply_conn);
        self.switch_view(&mut tx).await?;
        sqlx::query("update dbps_projection_state set serving_version = $2, switched_at = now() where projection = $1")
            .bind(&inner.name)
            .bind(inner.version)
            .execute(&mut *tx)
            .await
            .map_err(pg("record the serving version"))?;
        tx.commit().await.map_err(pg("commit the switch"))?;
        report.switched = true;
        self.report_progress(report.replayed, total.max(report.replayed));
        tracing::info!(projection = %inner.runner.label, ?previous, replayed = report.replayed, "view switched");
        Ok(report)
    }

    /// Runs the projection until `shutdown` or until a newer version serves: rebuilds
    /// this version first if it does not serve yet ([`rebuild`](Self::rebuild)), then
    /// applies new records from its checkpoints.
    pub async fn run(&self, kafka: &KafkaConfig, shutdown: CancellationToken) -> Result<RunSummary> {
        let inner = &self.inner;
        self.prepare().await?;
        let (mut summary, live) = rebuild_unless_serving(
            self.version(),
            self.serving_version().await?,
            &shutdown,
            self.rebuild(kafka, &shutdown),
            self.serving_version(),
        )
        .await?;
        if !live {
            return Ok(summary);
        }
        let started = inner.runner.reader(kafka, self.checkpoints().await?).await?;
        let (reader, positions) = (started.reader, started.positions);
        tracing::info!(projection = %inner.runner.label, ?positions, "applying from the checkpoints");
        while let Some(batch) = reader
            .next_batch(inner.runner.max_batch, &shutdown, Some(IDLE_CHECK))
            .await?
        {
            if batch.is_empty() {
                // Idle: a newer version may have taken the view over.
                if let Some(serving) = self.serving_version().await?.filter(|s| *s > self.version()) {
                    tracing::info!(projection = %inner.runner.label, serving, "a newer version serves; stopping");
                    summary.superseded_by = Some(serving);
                    break;
                }
                continue;
            }
            if let Gate::Superseded(serving) = self.apply_retrying(&batch, true, &shutdown).await? {
                tracing::info!(projection = %inner.runner.label, serving, "a newer version serves; stopping");
                summary.superseded_by = Some(serving);
                break;
            }
            summary.records += batch.len() as u64;
        }
        Ok(summary)
    }

    /// Creates the state row of the projection.
    async fn prepare(&self) -> Result<()> {
        sqlx::query("insert into dbps_projection_state (projection) values ($1) on conflict do nothing")
            .bind(&self.inner.name)
            .execute(&self.inner.pool)
            .await
            .map_err(pg("create the projection's state"))?;
        Ok(())
    }

    /// Creates this version's table unless it exists.
    async fn create_table(&self) -> Result<()> {
        let inner = &self.inner;
        let mut tx = inner.pool.begin().await.map_err(pg("create the table"))?;
        // Two instances rebuilding at once create the table once.
        sqlx::query("select pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("dbps_projection:{}", inner.runner.label))
            .execute(&mut *tx)
            .await
            .map_err(pg("create the table"))?;
        let exists: Option<String> = sqlx::query_scalar("select to_regclass($1)::text")
            .bind(&inner.quoted_table)
            .fetch_one(&mut *tx)
            .await
            .map_err(pg("create the table"))?;
        if exists.is_none() {
            sqlx::raw_sql(AssertSqlSafe(inner.model.create_table(&inner.quoted_table)))
                .execute(&mut *tx)
                .await
                .map_err(pg("create the table"))?;
        }
        tx.commit().await.map_err(pg("create the table"))?;
        Ok(())
    }

    /// Points the view at this version's table. `create or replace view` keeps the view
    /// (and what depends on it) when the new version only adds columns at the end; a
    /// version of another shape replaces the view. Either way in the caller's transaction.
    async fn switch_view(&self, conn: &mut PgConnection) -> Result<()> {
        let (view, table) = (&self.inner.view, &self.inner.quoted_table);
        sqlx::raw_sql("savepoint dbps_projection_view")
            .execute(&mut *conn)
            .await
            .map_err(pg("switch the view"))?;
        let replaced = sqlx::raw_sql(AssertSqlSafe(format!(
            "create or replace view {view} as select * from {table}"
        )))
        .execute(&mut *conn)
        .await;
        if let Err(error) = replaced {
            tracing::info!(projection = %self.inner.runner.label, %error, "the view changes shape; replacing it");
            sqlx::raw_sql(AssertSqlSafe(format!(
                "rollback to savepoint dbps_projection_view; drop view if exists {view}; \
                 create view {view} as select * from {table}"
            )))
            .execute(&mut *conn)
            .await
            .map_err(pg("switch the view"))?;
        }
        Ok(())
    }

    /// The serving version's checkpoints (none when nothing serves).
    async fn serving_checkpoints(&self, serving: Option<u32>) -> Result<BTreeMap<Partition, i64>> {
        let Some(serving) = serving.and_then(|s| i32::try_from(s).ok()) else {
            return Ok(BTreeMap::new());
        };
        let mut conn = self.inner.pool.acquire().await.map_err(pg("read checkpoints"))?;
        checkpoints_of(&mut conn, &self.inner.name, serving)
            .await
            .map_err(pg("read checkpoints"))
    }

    /// Applies a batch in a transaction of its own, retrying transient failures until
    /// `shutdown`. With `gated`, the batch commits only while this version serves.
    async fn apply_retrying(&self, batch: &[Record], gated: bool, shutdown: &CancellationToken) -> Result<Gate> {
        retrying(&self.inner.runner.label, shutdown, || self.apply(batch, gated)).await
    }

    async fn apply(&self, batch: &[Record], gated: bool) -> Result<Gate> {
        let inner = &self.inner;
        let mut tx = inner.pool.begin().await.map_err(pg("begin a batch"))?;
        if gated {
            let serving: Option<Option<i32>> =
                sqlx::query_scalar("select serving_version from dbps_projection_state where projection = $1 for share")
                    .bind(&inner.name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(pg("read serving version"))?;
            if let Some(serving) = serving.flatten().filter(|s| *s > inner.version) {
                return Ok(Gate::Superseded(serving.unsigned_abs()));
            }
        }
        let effect = self.apply_in(&mut tx, batch).await?;
        tx.commit().await.map_err(pg("commit a batch"))?;
        self.record(&effect);
        Ok(Gate::Open)
    }

    /// Applies a batch and moves the checkpoints on, in the caller's transaction.
    async fn apply_in(&self, conn: &mut PgConnection, batch: &[Record]) -> Result<BatchEffect> {
        let inner = &self.inner;
        let mut projected = Vec::with_capacity(batch.len());
        for envelope in batch.iter().filter_map(|r| r.envelope.as_ref()) {
            let change = inner
                .runner
                .project::<R::Events, _>(envelope, |event, envelope| inner.model.project(event, envelope))?;
            projected.extend(change);
        }
        let collapsed = collapse(projected);
        let source_times = collapsed.values().flat_map(|c| c.source_times.clone()).collect();
        let applied = inner.target.apply_collapsed(conn, collapsed, false, None).await?;

        let mut next: BTreeMap<&Partition, i64> = BTreeMap::new();
        for record in batch {
            let offset = next.entry(&record.partition).or_insert(0);
            *offset = (*offset).max(record.offset + 1);
        }
        let topics: Vec<&str> = next.keys().map(|(t, _)| t.as_str()).collect();
        let partitions: Vec<i32> = next.keys().map(|(_, p)| *p).collect();
        let offsets: Vec<i64> = next.values().copied().collect();
        sqlx::query(
            "insert into dbps_projection_checkpoints (projection, version, topic, partition, next_offset) \
             select $1, $2, t, p, o from unnest($3::text[], $4::int4[], $5::int8[]) as u(t, p, o) \
             on conflict (projection, version, topic, partition) do update \
             set next_offset = greatest(dbps_projection_checkpoints.next_offset, excluded.next_offset), \
             updated_at = now()",
        )
        .bind(&inner.name)
        .bind(inner.version)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .execute(&mut *conn)
        .await
        .map_err(pg("record checkpoints"))?;
        Ok(BatchEffect {
            advanced: applied.advanced,
            stale: applied.stale,
            source_times,
        })
    }

    fn record(&self, effect: &BatchEffect) {
        effect.record(&self.inner.runner.label);
    }

    fn report_progress(&self, replayed: u64, total: u64) {
        self.inner.runner.report_progress(replayed, total);
    }
}

async fn checkpoints_of(
    conn: &mut PgConnection,
    projection: &str,
    version: i32,
) -> Result<BTreeMap<Partition, i64>, sqlx::Error> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "select topic, partition, next_offset from dbps_projection_checkpoints \
         where projection = $1 and version = $2",
    )
    .bind(projection)
    .bind(version)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

fn pg(operation: &'static str) -> impl FnOnce(sqlx::Error) -> CacheError {
    move |source| CacheError::Postgres { operation, source }
}
