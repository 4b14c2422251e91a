//! Replicas in PostgreSQL tables, and the owner's side of a snapshot in PostgreSQL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dbps_core::{BatchHandler, Envelope, HandlerError, Registry};
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row as _};

use super::digest::{self, BucketDigest};
use super::{Change, Collapsed, Decoder, Projection, ReplicaSide, SnapshotPage, SnapshotRecord, SnapshotSource};
use crate::error::{CacheError, Result};

/// The replica's version table (`dbps_replica_versions`), a migration component for
/// `dbps_migrate::PgMigrations` (name it `dbps_replica`). Batches also record their
/// messages in the inbox, so the service runs `dbps_core::inbox::pg::MIGRATOR` too.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/replica");

/// A source that is never asked: a replica without one counts gaps but does not re-fetch.
#[derive(Debug, Clone, Copy)]
pub enum NoSource {}

impl SnapshotSource for NoSource {
    async fn page(&self, _: Option<&str>, _: usize) -> Result<SnapshotPage> {
        match *self {}
    }
    async fn get(&self, _: &str) -> Result<Option<SnapshotRecord>> {
        match *self {}
    }
    async fn digests(&self) -> Result<Vec<BucketDigest>> {
        match *self {}
    }
    async fn entries(&self, _: &[u16]) -> Result<Vec<(String, i64)>> {
        match *self {}
    }
}

/// Builds a [`PgReplica`].
pub struct PgReplicaBuilder<P, S = NoSource> {
    pool: PgPool,
    name: String,
    projection: P,
    table: Option<String>,
    aggregate_column: String,
    sequence_column: String,
    conflict_key: Vec<String>,
    max_batch: usize,
    registry: Registry,
    source: Option<S>,
}

impl<P, S> fmt::Debug for PgReplicaBuilder<P, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReplicaBuilder")
            .field("name", &self.name)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<P: Projection, S: SnapshotSource> PgReplicaBuilder<P, S> {
    /// The table the rows go to (default: the replica's name). It may be
    /// schema-qualified (`schema.table`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// The column that holds the aggregate's id (default `aggregate_id`). One aggregate
    /// may have several rows (a one-to-many map); they are replaced together.
    pub fn aggregate_column(mut self, column: impl Into<String>) -> Self {
        self.aggregate_column = column.into();
        self
    }

    /// The column that holds the aggregate's sequence of each row (default
    /// `source_sequence`); the reconciler compares it with the source.
    pub fn sequence_column(mut self, column: impl Into<String>) -> Self {
        self.sequence_column = column.into();
        self
    }

    /// The table's unique key, when it is not the aggregate column (a one-to-many map such
    /// as `customer_email_index (email)`): a row whose key another aggregate still holds
    /// takes it over (`on conflict (key) do update`).
    pub fn conflict_key<I: IntoIterator<Item = C>, C: Into<String>>(mut self, columns: I) -> Self {
        self.conflict_key = columns.into_iter().map(Into::into).collect();
        self
    }

    /// The most events applied in one transaction (default 512).
    pub fn max_batch(mut self, max: usize) -> Self {
        self.max_batch = max;
        self
    }

    /// The registry that decodes (and upcasts) the events.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Re-fetch an aggregate from its owner when its events show a gap.
    pub fn refetch_from<T: SnapshotSource>(self, source: T) -> PgReplicaBuilder<P, T> {
        PgReplicaBuilder {
            pool: self.pool,
            name: self.name,
            projection: self.projection,
            table: self.table,
            aggregate_column: self.aggregate_column,
            sequence_column: self.sequence_column,
            conflict_key: self.conflict_key,
            max_batch: self.max_batch,
            registry: self.registry,
            source: Some(source),
        }
    }

    /// Checks the settings and builds the replica.
    pub fn build(self) -> Result<PgReplica<P, S>> {
        if self.name.is_empty() {
            return Err(CacheError::InvalidConfig {
                setting: "replica name",
                reason: String::from("must not be empty"),
            });
        }
        if self.max_batch == 0 {
            return Err(CacheError::InvalidConfig {
                setting: "max_batch",
                reason: String::from("must be at least 1"),
            });
        }
        let target = PgTarget::new(
            self.name.clone(),
            quote_path(self.table.as_deref().unwrap_or(&self.name))?,
            &self.aggregate_column,
            &self.sequence_column,
            &self.conflict_key,
        )?;
        Ok(PgReplica {
            inner: Arc::new(Inner {
                pool: self.pool,
                consumer: format!("replica:{}", self.name),
                name: self.name,
                projection: self.projection,
                decoder: Decoder::new(self.registry),
                target,
                max_batch: self.max_batch,
                source: self.source,
            }),
        })
    }
}

/// A replica in a PostgreSQL table: a [`BatchHandler`] for the consumer runner.
///
/// Each batch is one transaction of a fixed number of statements, whatever its size: the
/// inbox insert, a locking read of the aggregates' versions, the guarded version upsert,
/// and one delete, one insert and one update of the rows. The table holds the
/// projection's columns plus the aggregate column and the sequence column, which the
/// replica fills in.
///
/// ```no_run
/// # use dbps_cache::replica::{Change, Projection};
/// # struct CustomerCache;
/// # impl Projection for CustomerCache {
/// #     type Events = Events; type Snapshot = serde_json::Value;
/// #     fn project(&self, _: Events, _: &dbps_core::Envelope) -> Result<Change, dbps_core::HandlerError> { Ok(Change::Delete) }
/// #     fn snapshot(&self, _: serde_json::Value) -> Result<Change, dbps_core::HandlerError> { Ok(Change::Delete) }
/// # }
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)] struct Deleted {}
/// # impl dbps_core::Message for Deleted { const TYPE: &'static str = "customer.Deleted"; }
/// # dbps_core::message_set! { enum Events { Deleted(Deleted) } }
/// # async fn example(pool: sqlx::PgPool, kafka: dbps_core::kafka::KafkaConfig) -> Result<(), Box<dyn std::error::Error>> {
/// use dbps_cache::replica::PgReplica;
/// use dbps_core::kafka::ConsumerRunner;
///
/// let replica = PgReplica::builder(pool, "customer_cache", CustomerCache)
///     .aggregate_column("id")
///     .build()?;
/// let runner = ConsumerRunner::builder(kafka, "quote.customer-cache", replica)
///     .topic("customer.customer.events")
///     .build()?;
/// runner.run(dbps_core::CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct PgReplica<P, S = NoSource> {
    inner: Arc<Inner<P, S>>,
}

struct Inner<P, S> {
    pool: PgPool,
    name: String,
    consumer: String,
    projection: P,
    decoder: Decoder,
    target: PgTarget,
    max_batch: usize,
    source: Option<S>,
}

impl<P, S> Clone for PgReplica<P, S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P, S> fmt::Debug for PgReplica<P, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReplica")
            .field("name", &self.inner.name)
            .field("table", &self.inner.target.table)
            .field("max_batch", &self.inner.max_batch)
            .finish_non_exhaustive()
    }
}

/// What applying some changes did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub(crate) advanced: usize,
    pub(crate) stale: usize,
    pub(crate) gaps: Vec<String>,
}

impl<P: Projection> PgReplica<P> {
    /// A builder for the replica `name` (its table by default), kept by `projection`.
    pub fn builder(pool: PgPool, name: impl Into<String>, projection: P) -> PgReplicaBuilder<P> {
        PgReplicaBuilder {
            pool,
            name: name.into(),
            projection,
            table: None,
            aggregate_column: String::from("aggregate_id"),
            sequence_column: String::from("source_sequence"),
            conflict_key: Vec::new(),
            max_batch: 512,
            registry: Registry::new(),
            source: None,
        }
    }
}

impl<P: Projection, S: SnapshotSource> PgReplica<P, S> {
    /// The replica's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Applies events in one transaction, as the consumer runner does with a batch.
    /// Returns how many aggregates advanced.
    pub async fn apply(&self, events: &[Envelope]) -> Result<usize, HandlerError> {
        let inner = &self.inner;
        let mut tx = inner.pool.begin().await?;
        // One round trip records the messages in the inbox and locks the versions of their
        // aggregates.
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let aggregates: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
        let rows = sqlx::query(
            "with fresh as (insert into dbps_inbox (consumer, message_id) select $1, unnest($2::text[]) \
             on conflict do nothing returning message_id), \
             held as (select aggregate_id, sequence, deleted from dbps_replica_versions \
             where replica = $3 and aggregate_id = any($4) for update) \
             select true, message_id, 0::int8, false from fresh \
             union all select false, aggregate_id, sequence, deleted from held",
        )
        .bind(&inner.consumer)
        .bind(&ids)
        .bind(&inner.name)
        .bind(&aggregates)
        .fetch_all(&mut *tx)
        .await?;
        let mut fresh = BTreeSet::new();
        let mut held = HashMap::new();
        for row in rows {
            if row.get::<bool, _>(0) {
                fresh.insert(row.get::<String, _>(1));
            } else {
                held.insert(row.get::<String, _>(1), (row.get::<i64, _>(2), row.get::<bool, _>(3)));
            }
        }
        let duplicates = events.len() - fresh.len();
        if duplicates > 0 {
            metrics::counter!("dbps_replica_duplicates_total", "replica" => inner.name.clone())
                .increment(duplicates as u64);
        }
        let mut projected = Vec::with_capacity(fresh.len());
        for event in events.iter().filter(|e| fresh.contains(&e.id)) {
            if let Some(change) = inner.decoder.project(&inner.name, &inner.projection, event)? {
                projected.push(change);
            }
        }
        let collapsed = super::collapse(projected);
        let source_times: Vec<_> = collapsed.values().flat_map(|c| c.source_times.clone()).collect();
        let applied = self.apply_collapsed(&mut tx, collapsed, false, Some(held)).await?;
        tx.commit().await?;
        super::record_lag(&inner.name, &source_times);
        // The batch is committed: a failed re-fetch is logged, not retried with the batch
        // (a retry would find its events applied); the reconciler repairs what stays.
        if let Err(error) = self.refetch(&applied.gaps).await {
            tracing::warn!(replica = %inner.name, %error, "re-fetching after a gap failed");
        }
        Ok(applied.advanced)
    }

    /// Applies snapshot records (backfill, re-fetch, repair). A record replaces the rows
    /// of its aggregate unless the replica already holds a newer sequence; with `repair`,
    /// also when it holds the same one (rows damaged by hand).
    async fn apply_records(&self, records: &[SnapshotRecord], repair: bool) -> Result<Applied, HandlerError> {
        let projected = records
            .iter()
            .map(|record| Decoder::project_snapshot(&self.inner.projection, record))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.inner.pool.begin().await?;
        let applied = self
            .apply_collapsed(&mut tx, super::collapse(projected), repair, None)
            .await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Fills the replica from its owner's snapshot, page by page, while the consumer may
    /// already be applying the stream: a record older than what the stream applied is
    /// skipped. Returns how many records were read and how many aggregates they advanced.
    pub async fn backfill<T: SnapshotSource>(&self, source: &T, page_size: usize) -> Result<(u64, u64), HandlerError> {
        let (mut read, mut advanced) = (0u64, 0u64);
        let mut after: Option<String> = None;
        loop {
            let page = source.page(after.as_deref(), page_size.max(1)).await?;
            read += page.records.len() as u64;
            if !page.records.is_empty() {
                advanced += self.apply_records(&page.records, false).await?.advanced as u64;
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        tracing::info!(replica = %self.inner.name, read, advanced, "backfill finished");
        Ok((read, advanced))
    }

    /// Re-fetches aggregates whose events had a gap.
    async fn refetch(&self, ids: &[String]) -> Result<(), HandlerError> {
        let Some(source) = &self.inner.source else {
            return Ok(());
        };
        for id in ids {
            if let Some(record) = source.get(id).await? {
                self.apply_records(std::slice::from_ref(&record), false).await?;
                metrics::counter!("dbps_replica_refetched_total", "replica" => self.inner.name.clone()).increment(1);
            }
        }
        Ok(())
    }

    /// Deletes tombstones older than `horizon`; returns how many. After that, an event
    /// older than the delete would bring its aggregate back: choose a horizon longer than
    /// any redelivery (the topic's retention, at least).
    pub async fn purge_tombstones(&self, horizon: Duration) -> Result<u64> {
        let horizon = sqlx::postgres::types::PgInterval::try_from(horizon).map_err(|e| CacheError::InvalidConfig {
            setting: "tombstone horizon",
            reason: e.to_string(),
        })?;
        let purged =
            sqlx::query("delete from dbps_replica_versions where replica = $1 and deleted and updated_at < now() - $2")
                .bind(&self.inner.name)
                .bind(horizon)
                .execute(&self.inner.pool)
                .await
                .map_err(pg("purge tombstones"))?
                .rows_affected();
        Ok(purged)
    }

    /// The sequence the replica holds for an aggregate and whether it is a tombstone.
    pub async fn version(&self, aggregate_id: &str) -> Result<Option<(i64, bool)>> {
        sqlx::query_as("select sequence, deleted from dbps_replica_versions where replica = $1 and aggregate_id = $2")
            .bind(&self.inner.name)
            .bind(aggregate_id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg("read version"))
    }

    async fn apply_collapsed(
        &self,
        conn: &mut PgConnection,
        collapsed: BTreeMap<String, Collapsed>,
        repair: bool,
        held: Option<HashMap<String, (i64, bool)>>,
    ) -> Result<Applied, HandlerError> {
        let inner = &self.inner;
        // A replica keeps the owner's state: facts belong in a projection.
        if collapsed.values().any(Collapsed::is_append) {
            return Err(HandlerError::permanent(CacheError::AppendNotSupported {
                replica: inner.name.clone(),
            }));
        }
        let applied = inner.target.apply_collapsed(conn, collapsed, repair, held).await?;
        let labels = [("replica", inner.name.clone())];
        metrics::counter!("dbps_replica_applied_total", &labels).increment(applied.advanced as u64);
        metrics::counter!("dbps_replica_stale_total", &labels).increment(applied.stale as u64);
        metrics::counter!("dbps_replica_gaps_total", &labels).increment(applied.gaps.len() as u64);
        Ok(applied)
    }
}

/// A table kept by sequence-guarded changes: the part of a replica that writes, shared
/// with projections (whose tables carry their version).
#[derive(Debug, Clone)]
pub(crate) struct PgTarget {
    /// The key of the aggregates' versions in `dbps_replica_versions`.
    pub(crate) name: String,
    pub(crate) table: String,
    pub(crate) aggregate_key: String,
    pub(crate) aggregate_column: String,
    pub(crate) sequence_key: String,
    pub(crate) sequence_column: String,
    pub(crate) conflict_key: Vec<String>,
}

impl PgTarget {
    /// A target writing `table` (quoted) with its versions kept under `name`.
    pub(crate) fn new(
        name: String,
        table: String,
        aggregate_key: &str,
        sequence_key: &str,
        conflict_key: &[String],
    ) -> Result<Self> {
        Ok(Self {
            name,
            table,
            aggregate_column: quote("aggregate column", aggregate_key)?,
            aggregate_key: aggregate_key.to_owned(),
            sequence_column: quote("sequence column", sequence_key)?,
            sequence_key: sequence_key.to_owned(),
            conflict_key: conflict_key
                .iter()
                .map(|c| quote("conflict key", c))
                .collect::<Result<Vec<_>>>()?,
        })
    }

    /// Applies the collapsed changes under the sequence guard: an aggregate advances only
    /// when its new sequence is newer than the one held (with `repair`, also when equal).
    /// Appends are inserted whatever the sequence held (idempotent by the table's key),
    /// and move the held sequence to the newest. `held` is the versions already read and
    /// locked in this transaction.
    pub(crate) async fn apply_collapsed(
        &self,
        conn: &mut PgConnection,
        collapsed: BTreeMap<String, Collapsed>,
        repair: bool,
        held: Option<HashMap<String, (i64, bool)>>,
    ) -> Result<Applied> {
        let inner = self;
        let failed = pg("apply changes");
        let mut applied = Applied::default();
        if collapsed.is_empty() {
            return Ok(applied);
        }
        if let Some((id, _)) = collapsed.iter().find(|(_, c)| c.mixed) {
            return Err(self.mixed(id));
        }
        let ids: Vec<&str> = collapsed.keys().map(String::as_str).collect();
        let current: HashMap<String, (i64, bool)> = if let Some(held) = held {
            held
        } else {
            sqlx::query(
                "select aggregate_id, sequence, deleted from dbps_replica_versions \
             where replica = $1 and aggregate_id = any($2) for update",
            )
            .bind(&inner.name)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(failed)?
            .into_iter()
            .map(|row| (row.get::<String, _>(0), (row.get::<i64, _>(1), row.get::<bool, _>(2))))
            .collect()
        };

        let (mut v_ids, mut v_seqs, mut v_deleted, mut v_times) = (vec![], vec![], vec![], vec![]);
        for (id, change) in &collapsed {
            let now = current.get(id).copied();
            if change.is_append() {
                // Facts are never stale: the version only moves to the newest (the guard
                // of the upsert below keeps it from going back).
                if now.is_some_and(|(_, deleted)| deleted) {
                    return Err(self.mixed(id));
                }
            } else {
                let newer = match now {
                    None => true,
                    Some((sequence, _)) if repair => change.sequence >= sequence,
                    Some((sequence, _)) => change.sequence > sequence,
                };
                if !newer {
                    applied.stale += 1;
                    continue;
                }
                if change.gap_after(now.map(|(s, _)| s)) {
                    tracing::warn!(replica = %inner.name, aggregate_id = %id, held = ?now.map(|(s, _)| s), sequences = ?change.sequences, "sequence gap");
                    applied.gaps.push(id.clone());
                }
            }
            let deleted = match &change.change {
                Some(Change::Delete) => true,
                Some(_) => false,
                None => now.is_some_and(|(_, deleted)| deleted),
            };
            v_ids.push(id.as_str());
            v_seqs.push(change.sequence);
            v_deleted.push(deleted);
            v_times.push(change.source_times.last().copied());
        }
        let guard = if repair { "<=" } else { "<" };
        let advanced: BTreeSet<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "insert into dbps_replica_versions (replica, aggregate_id, sequence, deleted, source_time) \
             select $1, a, s, d, t from unnest($2::text[], $3::int8[], $4::bool[], $5::timestamptz[]) as u(a, s, d, t) \
             on conflict (replica, aggregate_id) do update set sequence = excluded.sequence, \
             deleted = excluded.deleted, source_time = excluded.source_time, updated_at = now() \
             where dbps_replica_versions.sequence {guard} excluded.sequence returning aggregate_id"
        )))
        .bind(&inner.name)
        .bind(&v_ids)
        .bind(&v_seqs)
        .bind(&v_deleted)
        .bind(&v_times)
        .fetch_all(&mut *conn)
        .await
        .map_err(pg("apply changes"))?
        .into_iter()
        .collect();
        let replacing = v_ids
            .iter()
            .filter(|id| !collapsed.get(**id).is_some_and(Collapsed::is_append))
            .count();
        let replaced_now = advanced
            .iter()
            .filter(|id| !collapsed.get(*id).is_some_and(Collapsed::is_append))
            .count();
        applied.stale += replacing - replaced_now;
        applied.advanced = replaced_now;

        let (mut replaced, mut rows, mut resequenced, mut appended) = (vec![], vec![], vec![], vec![]);
        // Append events with rows: (aggregate, sequence).
        let mut facts: BTreeSet<(String, i64)> = BTreeSet::new();
        for (id, change) in &collapsed {
            if !change.is_append() {
                continue;
            }
            for (sequence, new_rows) in &change.appends {
                if !new_rows.is_empty() {
                    facts.insert((id.clone(), *sequence));
                }
                for row in new_rows {
                    let mut row = row.clone();
                    row.insert(inner.aggregate_key.clone(), Value::from(id.clone()));
                    row.insert(inner.sequence_key.clone(), Value::from(*sequence));
                    appended.push(Value::Object(row));
                }
            }
        }
        for (id, change) in collapsed.into_iter().filter(|(id, _)| advanced.contains(id)) {
            if change.is_append() {
                continue;
            }
            let key = |row: &mut serde_json::Map<String, Value>| {
                row.insert(inner.aggregate_key.clone(), Value::from(id.clone()));
                row.insert(inner.sequence_key.clone(), Value::from(change.sequence));
            };
            match change.change {
                Some(Change::Rows(new_rows)) => {
                    let mut marker = serde_json::Map::new();
                    key(&mut marker);
                    replaced.push(Value::Object(marker));
                    for mut row in new_rows {
                        key(&mut row);
                        rows.push(Value::Object(row));
                    }
                }
                Some(Change::Delete) => {
                    let mut marker = serde_json::Map::new();
                    key(&mut marker);
                    replaced.push(Value::Object(marker));
                }
                // Appends were handled above.
                Some(Change::Unchanged | Change::Append(_)) | None => {
                    let mut marker = serde_json::Map::new();
                    key(&mut marker);
                    resequenced.push(Value::Object(marker));
                }
            }
        }
        let (table, agg, seq) = (&inner.table, &inner.aggregate_column, &inner.sequence_column);
        if !replaced.is_empty() {
            sqlx::query(AssertSqlSafe(format!(
                "delete from {table} t using jsonb_populate_recordset(null::{table}, $1) r where t.{agg} = r.{agg}"
            )))
            .bind(Value::Array(replaced))
            .execute(&mut *conn)
            .await
            .map_err(pg("apply changes"))?;
        }
        if !rows.is_empty() {
            let list = column_list(&rows)?;
            let on_conflict = if inner.conflict_key.is_empty() {
                String::new()
            } else {
                let sets: Vec<String> = list.iter().map(|c| format!("{c} = excluded.{c}")).collect();
                format!(
                    " on conflict ({}) do update set {}",
                    inner.conflict_key.join(", "),
                    sets.join(", ")
                )
            };
            let list = list.join(", ");
            sqlx::query(AssertSqlSafe(format!(
                "insert into {table} ({list}) select {list} from jsonb_populate_recordset(null::{table}, $1){on_conflict}"
            )))
            .bind(Value::Array(rows))
            .execute(&mut *conn)
            .await
            .map_err(pg("apply changes"))?;
        }
        if !appended.is_empty() {
            let list = column_list(&appended)?.join(", ");
            let key = if inner.conflict_key.is_empty() {
                format!("{agg}, {seq}")
            } else {
                inner.conflict_key.join(", ")
            };
            let inserted: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
                "insert into {table} ({list}) select {list} from jsonb_populate_recordset(null::{table}, $1) \
                 on conflict ({key}) do nothing returning {agg}::text, {seq}::int8"
            )))
            .bind(Value::Array(appended))
            .fetch_all(&mut *conn)
            .await
            .map_err(pg("append rows"))?;
            let inserted: BTreeSet<(String, i64)> = inserted.into_iter().collect();
            // An event none of whose rows was inserted was applied before.
            applied.stale += facts.difference(&inserted).count();
            let grown: BTreeSet<&str> = inserted.iter().map(|(id, _)| id.as_str()).collect();
            applied.advanced += grown.len();
        }
        if !resequenced.is_empty() {
            sqlx::query(AssertSqlSafe(format!(
                "update {table} t set {seq} = r.{seq} from jsonb_populate_recordset(null::{table}, $1) r where t.{agg} = r.{agg}"
            )))
            .bind(Value::Array(resequenced))
            .execute(&mut *conn)
            .await
            .map_err(pg("apply changes"))?;
        }
        Ok(applied)
    }

    fn mixed(&self, aggregate_id: &str) -> CacheError {
        CacheError::MixedChanges {
            target: self.name.clone(),
            aggregate_id: aggregate_id.to_owned(),
        }
    }
}

/// The quoted columns of `rows`, in name order.
fn column_list(rows: &[Value]) -> Result<Vec<String>> {
    let mut columns: BTreeSet<&str> = BTreeSet::new();
    for row in rows {
        if let Value::Object(map) = row {
            columns.extend(map.keys().map(String::as_str));
        }
    }
    columns.into_iter().map(|c| quote("row column", c)).collect()
}

impl<P: Projection, S: SnapshotSource + 'static> BatchHandler for PgReplica<P, S> {
    fn max_batch(&self) -> usize {
        self.inner.max_batch
    }

    async fn handle_batch(&self, messages: &[Envelope]) -> Result<(), HandlerError> {
        self.apply(messages).await.map(|_| ())
    }
}

impl<P: Projection, S: SnapshotSource + 'static> ReplicaSide for PgReplica<P, S> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn digests(&self) -> Result<Vec<BucketDigest>> {
        let inner = &self.inner;
        let sql = format!(
            "select {bucket} as bucket, count(*), coalesce(bit_xor({hash}), 0) from \
             (select distinct {agg}::text as id, {seq} as seq from {table}) e group by 1",
            bucket = digest::sql_bucket("id"),
            hash = digest::sql_hash("id", "seq"),
            agg = inner.target.aggregate_column,
            seq = inner.target.sequence_column,
            table = inner.target.table,
        );
        digests_query(&inner.pool, &sql).await
    }

    async fn entries(&self, buckets: &[u16]) -> Result<Vec<(String, i64)>> {
        let inner = &self.inner;
        let sql = format!(
            "select distinct {agg}::text, {seq} from {table} where {bucket} = any($1)",
            agg = inner.target.aggregate_column,
            seq = inner.target.sequence_column,
            table = inner.target.table,
            bucket = digest::sql_bucket(&format!("{}::text", inner.target.aggregate_column)),
        );
        entries_query(&inner.pool, &sql, buckets).await
    }

    async fn repair(&self, records: &[SnapshotRecord]) -> Result<usize> {
        let applied = self
            .apply_records(records, true)
            .await
            .map_err(|e| CacheError::Repair {
                replica: self.inner.name.clone(),
                source: Box::new(e),
            })?;
        Ok(applied.advanced)
    }

    async fn remove(&self, aggregate_ids: &[String]) -> Result<usize> {
        let inner = &self.inner;
        let mut tx = inner.pool.begin().await.map_err(pg("remove extra records"))?;
        let markers: Vec<Value> = aggregate_ids
            .iter()
            .map(|id| serde_json::json!({ &inner.target.aggregate_key: id }))
            .collect();
        let removed = sqlx::query(AssertSqlSafe(format!(
            "delete from {table} t using jsonb_populate_recordset(null::{table}, $1) r where t.{agg} = r.{agg}",
            table = inner.target.table,
            agg = inner.target.aggregate_column
        )))
        .bind(Value::Array(markers))
        .execute(&mut *tx)
        .await
        .map_err(pg("remove extra records"))?
        .rows_affected();
        sqlx::query(
            "update dbps_replica_versions set deleted = true, updated_at = now() \
             where replica = $1 and aggregate_id = any($2)",
        )
        .bind(&inner.name)
        .bind(aggregate_ids)
        .execute(&mut *tx)
        .await
        .map_err(pg("remove extra records"))?;
        tx.commit().await.map_err(pg("remove extra records"))?;
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }
}

async fn digests_query(pool: &PgPool, sql: &str) -> Result<Vec<BucketDigest>> {
    let rows = sqlx::query(AssertSqlSafe(sql.to_owned()))
        .fetch_all(pool)
        .await
        .map_err(pg("digest"))?;
    let found = rows
        .into_iter()
        .map(|row| BucketDigest {
            bucket: u16::try_from(row.get::<i32, _>(0)).unwrap_or_default(),
            count: row.get(1),
            digest: row.get(2),
        })
        .collect();
    Ok(digest::complete(found))
}

async fn entries_query(pool: &PgPool, sql: &str, buckets: &[u16]) -> Result<Vec<(String, i64)>> {
    let buckets: Vec<i32> = buckets.iter().map(|&b| i32::from(b)).collect();
    sqlx::query_as(AssertSqlSafe(sql.to_owned()))
        .bind(&buckets)
        .fetch_all(pool)
        .await
        .map_err(pg("list entries"))
}

/// The owner's side of a snapshot, read from its PostgreSQL table: each record's state is
/// the row as JSON (`to_jsonb`), or what a custom SQL expression over the row alias `t`
/// makes of it ([`PgSnapshotSource::state`]).
#[derive(Debug, Clone)]
pub struct PgSnapshotSource {
    pool: PgPool,
    table: String,
    id_key: String,
    id_column: String,
    sequence_column: String,
    state: String,
}

impl PgSnapshotSource {
    /// The snapshot of `table`, whose aggregates are identified by `id_column` and
    /// versioned by `sequence_column`.
    pub fn new(pool: PgPool, table: &str, id_column: &str, sequence_column: &str) -> Result<Self> {
        Ok(Self {
            pool,
            table: quote_path(table)?,
            id_key: id_column.to_owned(),
            id_column: quote("id column", id_column)?,
            sequence_column: quote("sequence column", sequence_column)?,
            state: String::from("to_jsonb(t)"),
        })
    }

    /// The SQL expression (over the row alias `t`) that makes a record's state, for
    /// example `jsonb_build_object('name', t.name)`.
    pub fn state(mut self, expression: impl Into<String>) -> Self {
        self.state = expression.into();
        self
    }

    fn record(row: &sqlx::postgres::PgRow) -> SnapshotRecord {
        SnapshotRecord {
            aggregate_id: row.get(0),
            sequence: row.get(1),
            state: row.get(2),
        }
    }
}

impl SnapshotSource for PgSnapshotSource {
    async fn page(&self, after: Option<&str>, limit: usize) -> Result<SnapshotPage> {
        let (table, id, seq, state) = (&self.table, &self.id_column, &self.sequence_column, &self.state);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            // The id is converted to the column's type by its JSON form, so the page is
            // an index range scan whatever the id's type.
            Some(after) => {
                sqlx::query(AssertSqlSafe(format!(
                    "select t.{id}::text, t.{seq}, {state} from {table} t \
                     where t.{id} > (jsonb_populate_record(null::{table}, $1)).{id} order by t.{id} limit $2"
                )))
                .bind(serde_json::json!({ &self.id_key: after }))
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "select t.{id}::text, t.{seq}, {state} from {table} t order by t.{id} limit $1"
                )))
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(pg("read snapshot page"))?;
        let records: Vec<SnapshotRecord> = rows.iter().map(Self::record).collect();
        let next = (i64::try_from(records.len()).unwrap_or(i64::MAX) == limit)
            .then(|| records.last().map(|r| r.aggregate_id.clone()))
            .flatten();
        Ok(SnapshotPage { records, next })
    }

    async fn get(&self, aggregate_id: &str) -> Result<Option<SnapshotRecord>> {
        let (table, id, seq, state) = (&self.table, &self.id_column, &self.sequence_column, &self.state);
        let row = sqlx::query(AssertSqlSafe(format!(
            "select t.{id}::text, t.{seq}, {state} from {table} t \
             where t.{id} = (jsonb_populate_record(null::{table}, $1)).{id}"
        )))
        .bind(serde_json::json!({ &self.id_key: aggregate_id }))
        .fetch_optional(&self.pool)
        .await
        .map_err(pg("read snapshot record"))?;
        Ok(row.as_ref().map(Self::record))
    }

    async fn digests(&self) -> Result<Vec<BucketDigest>> {
        let sql = format!(
            "select {bucket}, count(*), coalesce(bit_xor({hash}), 0) from {table} group by 1",
            bucket = digest::sql_bucket(&format!("{}::text", self.id_column)),
            hash = digest::sql_hash(&format!("{}::text", self.id_column), &self.sequence_column),
            table = self.table,
        );
        digests_query(&self.pool, &sql).await
    }

    async fn entries(&self, buckets: &[u16]) -> Result<Vec<(String, i64)>> {
        let sql = format!(
            "select {id}::text, {seq} from {table} where {bucket} = any($1)",
            id = self.id_column,
            seq = self.sequence_column,
            table = self.table,
            bucket = digest::sql_bucket(&format!("{}::text", self.id_column)),
        );
        entries_query(&self.pool, &sql, buckets).await
    }
}

fn pg(operation: &'static str) -> impl FnOnce(sqlx::Error) -> CacheError {
    move |source| CacheError::Postgres { operation, source }
}

/// Quotes a plain identifier (letters, digits, `_`, not starting with a digit).
pub(crate) fn quote(setting: &'static str, name: &str) -> Result<String> {
    let mut chars = name.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63;
    if plain {
        Ok(format!("\"{name}\""))
    } else {
        Err(CacheError::InvalidConfig {
            setting,
            reason: format!("{name:?} is not a plain SQL identifier (letters, digits, _; at most 63)"),
        })
    }
}

/// Quotes `table` or `schema.table`.
fn quote_path(path: &str) -> Result<String> {
    path.split('.')
        .map(|part| quote("table", part))
        .collect::<Result<Vec<_>>>()
        .and_then(|parts| match parts.len() {
            1 | 2 => Ok(parts.join(".")),
            _ => Err(CacheError::InvalidConfig {
                setting: "table",
                reason: format!("{path:?} has more than a schema and a name"),
            }),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked_and_quoted() {
        assert_eq!(quote("c", "name").ok().as_deref(), Some("\"name\""));
        assert!(quote("c", "na\"me").is_err());
        assert!(quote("c", "1x").is_err());
        assert!(quote("c", "").is_err());
        assert_eq!(
            quote_path("quote.customer_cache").ok().as_deref(),
            Some("\"quote\".\"customer_cache\"")
        );
        assert!(quote_path("a.b.c").is_err());
    }
}
