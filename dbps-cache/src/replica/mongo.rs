//! Replicas in MongoDB collections, on the single-document path (no transactions, so
//! FerretDB and standalone servers work).

use std::fmt;
use std::sync::Arc;

use dbps_core::classify::is_duplicate_key;
use dbps_core::{BatchHandler, Envelope, HandlerError, Registry};
use futures::TryStreamExt as _;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::{Collection, Database};

use super::digest::{self, BucketDigest};
use super::{Change, Collapsed, Decoder, Projection, ReplicaSide, SnapshotRecord};
use crate::error::{CacheError, Result};

/// The collection of aggregate versions and tombstones, shared by a database's replicas.
const VERSIONS: &str = "dbps_replica_versions";

/// Builds a [`MongoReplica`].
pub struct MongoReplicaBuilder<P> {
    database: Database,
    name: String,
    projection: P,
    collection: Option<String>,
    aggregate_field: String,
    sequence_field: String,
    max_batch: usize,
    registry: Registry,
}

impl<P> fmt::Debug for MongoReplicaBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoReplicaBuilder")
            .field("name", &self.name)
            .field("collection", &self.collection)
            .finish_non_exhaustive()
    }
}

impl<P: Projection> MongoReplicaBuilder<P> {
    /// The collection the documents go to (default: the replica's name).
    pub fn collection(mut self, collection: impl Into<String>) -> Self {
        self.collection = Some(collection.into());
        self
    }

    /// The field that holds the aggregate's id (default `aggregate_id`).
    pub fn aggregate_field(mut self, field: impl Into<String>) -> Self {
        self.aggregate_field = field.into();
        self
    }

    /// The field that holds the aggregate's sequence (default `source_sequence`).
    pub fn sequence_field(mut self, field: impl Into<String>) -> Self {
        self.sequence_field = field.into();
        self
    }

    /// The most events handed over at once (default 256).
    pub fn max_batch(mut self, max: usize) -> Self {
        self.max_batch = max;
        self
    }

    /// The registry that decodes (and upcasts) the events.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Checks the settings and builds the replica.
    pub fn build(self) -> Result<MongoReplica<P>> {
        for (setting, value) in [
            ("replica name", &self.name),
            ("aggregate field", &self.aggregate_field),
            ("sequence field", &self.sequence_field),
        ] {
            if value.is_empty() || value.starts_with('$') || value.contains('.') {
                return Err(CacheError::InvalidConfig {
                    setting,
                    reason: format!("{value:?} is not a plain field or collection name"),
                });
            }
        }
        if self.max_batch == 0 {
            return Err(CacheError::InvalidConfig {
                setting: "max_batch",
                reason: String::from("must be at least 1"),
            });
        }
        let collection = self.collection.as_deref().unwrap_or(&self.name);
        Ok(MongoReplica {
            inner: Arc::new(Inner {
                versions: self.database.collection(VERSIONS),
                target: self.database.collection(collection),
                name: self.name,
                projection: self.projection,
                decoder: Decoder::new(self.registry),
                aggregate_field: self.aggregate_field,
                sequence_field: self.sequence_field,
                max_batch: self.max_batch,
            }),
        })
    }
}

/// A replica in a MongoDB collection: a [`BatchHandler`] for the consumer runner.
///
/// Each aggregate's changes are written document by document in an order that makes a
/// crash at any point safe to repeat: the new documents first (each guarded by its own
/// sequence), then the aggregate's older documents removed, then its version advanced.
/// An event is stale when the version already holds its sequence, so a redelivery after
/// the version moved changes nothing, and a tombstone stops a late update.
///
/// A document's `_id` is the row's `_id` field when the projection sets one (a
/// one-to-many map, such as one entry per email address), the aggregate's id otherwise.
pub struct MongoReplica<P> {
    inner: Arc<Inner<P>>,
}

struct Inner<P> {
    name: String,
    versions: Collection<Document>,
    target: Collection<Document>,
    projection: P,
    decoder: Decoder,
    aggregate_field: String,
    sequence_field: String,
    max_batch: usize,
}

impl<P> Clone for MongoReplica<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P> fmt::Debug for MongoReplica<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoReplica")
            .field("name", &self.inner.name)
            .field("collection", &self.inner.target.name())
            .finish_non_exhaustive()
    }
}

fn mongo(operation: &'static str) -> impl FnOnce(mongodb::error::Error) -> CacheError {
    move |source| CacheError::Mongo { operation, source }
}

/// Treats a duplicate key as "a newer document is there": the guarded write lost.
fn unless_newer<T>(result: mongodb::error::Result<T>, operation: &'static str) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(error) if is_duplicate_key(&error) => Ok(false),
        Err(source) => Err(CacheError::Mongo { operation, source }),
    }
}

impl<P: Projection> MongoReplica<P> {
    /// A builder for the replica `name` (its collection by default).
    pub fn builder(database: Database, name: impl Into<String>, projection: P) -> MongoReplicaBuilder<P> {
        MongoReplicaBuilder {
            database,
            name: name.into(),
            projection,
            collection: None,
            aggregate_field: String::from("aggregate_id"),
            sequence_field: String::from("source_sequence"),
            max_batch: 256,
            registry: Registry::new(),
        }
    }

    /// The replica's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn version_id(&self, aggregate_id: &str) -> String {
        format!("{}\u{1f}{aggregate_id}", self.inner.name)
    }

    /// The sequence the replica holds for an aggregate and whether it is a tombstone.
    pub async fn version(&self, aggregate_id: &str) -> Result<Option<(i64, bool)>> {
        let found = self
            .inner
            .versions
            .find_one(doc! { "_id": self.version_id(aggregate_id) })
            .await
            .map_err(mongo("read version"))?;
        Ok(found.map(|d| {
            (
                d.get_i64("sequence").unwrap_or(0),
                d.get_bool("deleted").unwrap_or(false),
            )
        }))
    }

    /// Applies events, aggregate by aggregate. Returns how many aggregates advanced.
    pub async fn apply(&self, events: &[Envelope]) -> Result<usize, HandlerError> {
        let inner = &self.inner;
        let mut projected = Vec::with_capacity(events.len());
        for event in events {
            if let Some(change) = inner.decoder.project(&inner.name, &inner.projection, event)? {
                projected.push(change);
            }
        }
        let collapsed = super::collapse(projected);
        // Refused before anything is written.
        if collapsed.values().any(Collapsed::is_append) {
            return Err(HandlerError::permanent(CacheError::AppendNotSupported {
                replica: inner.name.clone(),
            }));
        }
        let mut advanced = 0;
        for (id, change) in collapsed {
            let source_times = change.source_times.clone();
            if self.apply_one(&id, change, false).await? {
                advanced += 1;
                super::record_lag(&inner.name, &source_times);
            }
        }
        Ok(advanced)
    }

    /// Applies snapshot records (backfill, repair).
    async fn apply_records(&self, records: &[SnapshotRecord], repair: bool) -> Result<usize, HandlerError> {
        let mut advanced = 0;
        let projected = records
            .iter()
            .map(|record| Decoder::project_snapshot(&self.inner.projection, record))
            .collect::<Result<Vec<_>, _>>()?;
        for (id, change) in super::collapse(projected) {
            if self.apply_one(&id, change, repair).await? {
                advanced += 1;
            }
        }
        Ok(advanced)
    }

    /// Fills the replica from its owner's snapshot, like
    /// [`PgReplica::backfill`](super::PgReplica::backfill).
    pub async fn backfill<T: super::SnapshotSource>(
        &self,
        source: &T,
        page_size: usize,
    ) -> Result<(u64, u64), HandlerError> {
        let (mut read, mut advanced) = (0u64, 0u64);
        let mut after: Option<String> = None;
        loop {
            let page = source.page(after.as_deref(), page_size.max(1)).await?;
            read += page.records.len() as u64;
            advanced += self.apply_records(&page.records, false).await? as u64;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        Ok((read, advanced))
    }

    async fn apply_one(&self, aggregate_id: &str, change: Collapsed, repair: bool) -> Result<bool> {
        let inner = &self.inner;
        // A replica keeps the owner's state: facts belong in a projection.
        if change.is_append() {
            return Err(CacheError::AppendNotSupported {
                replica: inner.name.clone(),
            });
        }
        let labels = [("replica", inner.name.clone())];
        let (agg, seq) = (inner.aggregate_field.as_str(), inner.sequence_field.as_str());
        let current = self.version(aggregate_id).await?;
        let newer = match current {
            None => true,
            Some((held, _)) if repair => change.sequence >= held,
            Some((held, _)) => change.sequence > held,
        };
        if !newer {
            metrics::counter!("dbps_replica_stale_total", &labels).increment(1);
            return Ok(false);
        }
        if change.gap_after(current.map(|(s, _)| s)) {
            tracing::warn!(replica = %inner.name, %aggregate_id, held = ?current.map(|(s, _)| s), sequences = ?change.sequences, "sequence gap");
            metrics::counter!("dbps_replica_gaps_total", &labels).increment(1);
        }
        let sequence = change.sequence;
        let older = if repair { "$lte" } else { "$lt" };
        let deleted = match &change.change {
            Some(Change::Rows(rows)) => {
                let single = rows.len() == 1;
                for row in rows {
                    let mut document = bson::to_document(row).map_err(|e| CacheError::InvalidConfig {
                        setting: "replica row",
                        reason: e.to_string(),
                    })?;
                    let id = match document.remove("_id") {
                        Some(id) => id,
                        None if single => Bson::String(aggregate_id.to_owned()),
                        None => {
                            return Err(CacheError::InvalidConfig {
                                setting: "replica row",
                                reason: String::from("several rows for one aggregate need an _id each"),
                            });
                        }
                    };
                    document.insert("_id", id.clone());
                    document.insert(agg, aggregate_id);
                    document.insert(seq, sequence);
                    let written = inner
                        .target
                        .replace_one(doc! { "_id": id, seq: { "$lte": sequence } }, document)
                        .upsert(true)
                        .await;
                    unless_newer(written, "write replica document")?;
                }
                inner
                    .target
                    .delete_many(doc! { agg: aggregate_id, seq: { "$lt": sequence } })
                    .await
                    .map_err(mongo("remove older documents"))?;
                false
            }
            Some(Change::Delete) => {
                inner
                    .target
                    .delete_many(doc! { agg: aggregate_id, seq: { "$lte": sequence } })
                    .await
                    .map_err(mongo("delete replica documents"))?;
                true
            }
            // Appends were refused above.
            Some(Change::Unchanged | Change::Append(_)) | None => {
                inner
                    .target
                    .update_many(
                        doc! { agg: aggregate_id, seq: { "$lt": sequence } },
                        doc! { "$set": { seq: sequence } },
                    )
                    .await
                    .map_err(mongo("advance replica documents"))?;
                current.is_some_and(|(_, deleted)| deleted)
            }
        };
        let version = inner
            .versions
            .update_one(
                doc! { "_id": self.version_id(aggregate_id), "sequence": { older: sequence } },
                doc! { "$set": {
                    "replica": &inner.name,
                    "aggregate_id": aggregate_id,
                    "sequence": sequence,
                    "deleted": deleted,
                    "updated_at": bson::DateTime::now(),
                } },
            )
            .upsert(true)
            .await;
        let advanced = unless_newer(version, "advance version")?;
        if advanced {
            metrics::counter!("dbps_replica_applied_total", &labels).increment(1);
        } else {
            metrics::counter!("dbps_replica_stale_total", &labels).increment(1);
        }
        Ok(advanced)
    }

    /// `(aggregate id, sequence)` of every document.
    async fn all_entries(&self) -> Result<Vec<(String, i64)>> {
        let (agg, seq) = (&self.inner.aggregate_field, &self.inner.sequence_field);
        let mut cursor = self
            .inner
            .target
            .find(doc! {})
            .projection(doc! { agg: 1, seq: 1 })
            .await
            .map_err(mongo("list replica documents"))?;
        let mut entries = std::collections::BTreeSet::new();
        while let Some(document) = cursor.try_next().await.map_err(mongo("list replica documents"))? {
            let id = match document.get(agg) {
                Some(Bson::String(id)) => id.clone(),
                Some(other) => other.to_string(),
                None => continue,
            };
            let sequence = match document.get(seq) {
                Some(Bson::Int64(s)) => *s,
                Some(Bson::Int32(s)) => i64::from(*s),
                _ => -1,
            };
            entries.insert((id, sequence));
        }
        Ok(entries.into_iter().collect())
    }
}

impl<P: Projection> BatchHandler for MongoReplica<P> {
    fn max_batch(&self) -> usize {
        self.inner.max_batch
    }

    async fn handle_batch(&self, messages: &[Envelope]) -> Result<(), HandlerError> {
        self.apply(messages).await.map(|_| ())
    }
}

impl<P: Projection> ReplicaSide for MongoReplica<P> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn digests(&self) -> Result<Vec<BucketDigest>> {
        let entries = self.all_entries().await?;
        Ok(digest::digests_of(entries.iter().map(|(id, s)| (id.as_str(), *s))))
    }

    async fn entries(&self, buckets: &[u16]) -> Result<Vec<(String, i64)>> {
        let mut entries = self.all_entries().await?;
        entries.retain(|(id, _)| buckets.contains(&digest::bucket_of(id)));
        Ok(entries)
    }

    async fn repair(&self, records: &[SnapshotRecord]) -> Result<usize> {
        self.apply_records(records, true).await.map_err(|e| CacheError::Repair {
            replica: self.inner.name.clone(),
            source: Box::new(e),
        })
    }

    async fn remove(&self, aggregate_ids: &[String]) -> Result<usize> {
        let inner = &self.inner;
        let removed = inner
            .target
            .delete_many(doc! { inner.aggregate_field.as_str(): { "$in": aggregate_ids } })
            .await
            .map_err(mongo("remove extra documents"))?
            .deleted_count;
        for id in aggregate_ids {
            inner
                .versions
                .update_one(
                    doc! { "_id": self.version_id(id) },
                    doc! { "$set": { "deleted": true, "updated_at": bson::DateTime::now() } },
                )
                .await
                .map_err(mongo("mark removed"))?;
        }
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }
}
