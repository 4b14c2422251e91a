//! Event-driven replicas: another service's data, kept in this service's own database by
//! that service's events, that never goes back in time.
//!
//! A replica is a declaration: a [`Projection`] says what an event (or a snapshot record)
//! means as rows, and a target keeps them — [`PgReplica`] (feature `postgres`) in a table,
//! `MongoReplica` (feature `mongodb`) in a collection. The target does the subtle parts:
//!
//! - **Guarded by the aggregate's sequence number.** Each aggregate's newest applied
//!   sequence is kept; a duplicate, reordered or late event (one whose sequence is not
//!   newer) changes nothing and is counted as stale.
//! - **State, not facts.** A replica refuses [`Change::Append`] (fact rows per event,
//!   which projections keep) with [`CacheError::AppendNotSupported`].
//! - **Tombstones.** A delete removes the aggregate's rows and keeps its sequence, so a
//!   late update cannot bring it back. Tombstones are purged after a horizon
//!   ([`PgReplica::purge_tombstones`]).
//! - **Gaps** (a jump in an aggregate's sequence) are logged and counted, and with a
//!   [`SnapshotSource`] the record is re-fetched from its owner.
//! - **Batches.** On PostgreSQL, what arrived together is applied in one transaction with
//!   a fixed number of statements, with the inbox.
//! - **Backfill then stream.** A new replica fills itself from the owner's paged snapshot
//!   ([`PgReplica::backfill`], [`http::snapshot_router`]) while it consumes the stream;
//!   the sequence guard makes the order irrelevant.
//! - **Lag** (source time → applied) is a histogram, `dbps_replica_lag_seconds`.
//!
//! [`Reconciler`] compares a replica with its source by digests of `(id, sequence)` per
//! bucket of ids, lists only the buckets that differ, reports drift and can repair it.
//!
//! Metrics, labelled by `replica`: `dbps_replica_applied_total`,
//! `dbps_replica_stale_total`, `dbps_replica_duplicates_total`, `dbps_replica_gaps_total`,
//! `dbps_replica_refetched_total`, `dbps_replica_lag_seconds`, and from the reconciler
//! `dbps_replica_drift{kind=missing|extra|stale}` and `dbps_replica_repaired_total`.
// Without a target (PostgreSQL or MongoDB) the shared decoding and batching are unused.
#![cfg_attr(not(any(feature = "postgres", feature = "mongodb")), allow(dead_code))]

use std::collections::BTreeMap;
use std::fmt;

use dbps_core::{Envelope, HandlerError, MessageSet, Registry};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{CacheError, Result};

mod digest;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "mongodb")]
mod mongo;
#[cfg(feature = "postgres")]
mod pg;
mod reconcile;

pub use digest::{BucketDigest, DIGEST_BUCKETS, bucket_of, entry_hash};
#[cfg(feature = "mongodb")]
pub use mongo::{MongoReplica, MongoReplicaBuilder};
#[cfg(feature = "postgres")]
pub use pg::{MIGRATOR, NoSource, PgReplica, PgReplicaBuilder, PgSnapshotSource};
#[cfg(feature = "postgres")]
pub(crate) use pg::{PgTarget, quote};
pub use reconcile::{DriftReport, Reconciler, ReplicaSide};

/// One row of a replica: column (or field) names and JSON values. PostgreSQL converts the
/// values to the columns' types (`jsonb_populate_recordset`).
pub type Row = Map<String, Value>;

/// What an event or a snapshot record means for a replica.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Change {
    /// The aggregate's rows as of this sequence. They replace every row kept for the
    /// aggregate (none is allowed: the aggregate then has no row here).
    Rows(Vec<Row>),
    /// The aggregate was deleted: its rows go and a tombstone keeps its sequence.
    Delete,
    /// The event does not change this replica's rows (another field changed). The
    /// aggregate's sequence still advances, so that the next event is not taken for a
    /// gap.
    Unchanged,
    /// Rows that record this event as a fact of its own (one row per event: a movement, a
    /// payment, a status reached), added to the aggregate's rows instead of replacing
    /// them. Only PostgreSQL projections take it (`PgProjection`); a replica refuses it
    /// with [`CacheError::AppendNotSupported`].
    ///
    /// - **Insert only.** The rows are inserted; the aggregate's other rows stay.
    /// - **Idempotent.** They are inserted with `on conflict (key) do nothing`, where the
    ///   key is the target's conflict key, or by default (aggregate column, sequence
    ///   column), which the projection fills in. The table must have a unique constraint
    ///   on that key. An event applied twice (redelivered, re-published, replayed after a
    ///   crash before the checkpoint) inserts nothing the second time. An event of several
    ///   rows needs a conflict key that tells its rows apart (such as
    ///   `(aggregate_id, source_sequence, line_no)`).
    /// - **Order-insensitive.** An older event that arrives late is inserted all the same
    ///   (it happened); it is never stale, and no gap is reported.
    /// - **The version moves to the newest.** The aggregate's sequence in
    ///   `dbps_replica_versions` becomes the largest applied and never goes back.
    /// - **Not collapsed.** In a batch, every append is inserted, not only the newest.
    /// - **One kind per aggregate.** An aggregate's events are all appends, or all of
    ///   the replacing kinds (`Rows`, `Delete`, `Unchanged`): a batch that mixes them for
    ///   one aggregate, or an append to a deleted aggregate, is refused with
    ///   [`CacheError::MixedChanges`]. For an event that adds no fact, return an empty
    ///   append ([`Change::append_rows`] of nothing), which only moves the version.
    Append(Vec<Row>),
}

impl Change {
    /// One row, from any serializable value that serializes to a JSON object.
    pub fn row<T: Serialize>(value: &T) -> Result<Self> {
        Ok(Self::Rows(vec![to_row(value)?]))
    }

    /// Several rows (a one-to-many map, such as one entry per email address).
    pub fn rows<'a, T: Serialize + 'a>(values: impl IntoIterator<Item = &'a T>) -> Result<Self> {
        values
            .into_iter()
            .map(to_row)
            .collect::<Result<Vec<_>>>()
            .map(Self::Rows)
    }

    /// One fact row of this event, added to the aggregate's rows ([`Change::Append`]).
    pub fn append<T: Serialize>(value: &T) -> Result<Self> {
        Ok(Self::Append(vec![to_row(value)?]))
    }

    /// Several fact rows of this event (none: the event adds no fact), added to the
    /// aggregate's rows ([`Change::Append`]).
    pub fn append_rows<'a, T: Serialize + 'a>(values: impl IntoIterator<Item = &'a T>) -> Result<Self> {
        values
            .into_iter()
            .map(to_row)
            .collect::<Result<Vec<_>>>()
            .map(Self::Append)
    }

    /// Whether this is an append ([`Change::Append`]).
    pub fn is_append(&self) -> bool {
        matches!(self, Self::Append(_))
    }
}

fn to_row<T: Serialize>(value: &T) -> Result<Row> {
    match serde_json::to_value(value) {
        Ok(Value::Object(row)) => Ok(row),
        Ok(other) => Err(CacheError::InvalidConfig {
            setting: "replica row",
            reason: format!("a row must serialize to a JSON object, not {other}"),
        }),
        Err(source) => Err(CacheError::Codec {
            key: String::from("replica row"),
            source,
        }),
    }
}

/// What a replica keeps of another service's aggregates: how an event and a snapshot
/// record become rows.
///
/// ```
/// use dbps_cache::replica::{Change, Projection};
/// use dbps_core::{Envelope, HandlerError, Message, message_set};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct CustomerChanged { pub name: String, pub tax_number: String }
/// impl Message for CustomerChanged { const TYPE: &'static str = "customer.CustomerChanged"; }
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct CustomerDeleted {}
/// impl Message for CustomerDeleted { const TYPE: &'static str = "customer.CustomerDeleted"; }
///
/// message_set! {
///     pub enum CustomerEvents { Changed(CustomerChanged), Deleted(CustomerDeleted) }
/// }
///
/// /// Quote's `customer_cache (id, name, tax_number, source_sequence)`.
/// struct CustomerCache;
///
/// #[derive(Serialize)]
/// struct CacheRow<'a> { name: &'a str, tax_number: &'a str }
///
/// impl Projection for CustomerCache {
///     type Events = CustomerEvents;
///     type Snapshot = CustomerChanged;
///
///     fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
///         match event {
///             CustomerEvents::Changed(c) => self.snapshot(c),
///             CustomerEvents::Deleted(_) => Ok(Change::Delete),
///         }
///     }
///
///     fn snapshot(&self, c: CustomerChanged) -> Result<Change, HandlerError> {
///         Ok(Change::row(&CacheRow { name: &c.name, tax_number: &c.tax_number })
///             .map_err(HandlerError::permanent)?)
///     }
/// }
/// ```
pub trait Projection: Send + Sync + 'static {
    /// The events the replica understands. Other types on the topic are skipped (counted
    /// as `dbps_replica_ignored_total`) but still advance nothing.
    type Events: MessageSet;
    /// The state of one aggregate in the owner's snapshot (backfill, re-fetch, repair).
    type Snapshot: DeserializeOwned + Send;

    /// What `event` means for the replica. The replica fills in the aggregate column and
    /// the sequence column of each row itself.
    fn project(&self, event: Self::Events, envelope: &Envelope) -> Result<Change, HandlerError>;

    /// What a snapshot record means for the replica.
    fn snapshot(&self, state: Self::Snapshot) -> Result<Change, HandlerError>;
}

/// One aggregate in an owner's snapshot: its id, its sequence and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The aggregate's sequence number when the state was read.
    pub sequence: i64,
    /// The state, as the owner serves it.
    pub state: Value,
}

/// One page of an owner's snapshot, in aggregate-id order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SnapshotPage {
    /// The records of this page.
    pub records: Vec<SnapshotRecord>,
    /// The id to ask the next page after; `None` on the last page.
    pub next: Option<String>,
}

/// Where a replica's data comes from: the owning service's paged snapshot, one record by
/// id, and digests of `(id, sequence)` for reconciliation. [`PgSnapshotSource`] serves it
/// from the owner's table; [`http::HttpSource`] reads it from the owner's REST endpoints
/// ([`http::snapshot_router`]).
pub trait SnapshotSource: Send + Sync {
    /// Up to `limit` records with ids after `after`, in id order.
    fn page(&self, after: Option<&str>, limit: usize) -> impl Future<Output = Result<SnapshotPage>> + Send;

    /// One record, `None` if the owner does not have it (any more).
    fn get(&self, aggregate_id: &str) -> impl Future<Output = Result<Option<SnapshotRecord>>> + Send;

    /// Count and digest of `(id, sequence)` for each of the [`DIGEST_BUCKETS`] buckets.
    fn digests(&self) -> impl Future<Output = Result<Vec<BucketDigest>>> + Send;

    /// `(id, sequence)` of every record in the given buckets.
    fn entries(&self, buckets: &[u16]) -> impl Future<Output = Result<Vec<(String, i64)>>> + Send;
}

/// The event-type registry and decoding shared by the targets.
pub(crate) struct Decoder {
    registry: Registry,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

/// What one event asks of the replica, decoded and projected.
#[derive(Debug)]
pub(crate) struct Projected<C = Change> {
    pub(crate) aggregate_id: String,
    pub(crate) sequence: i64,
    pub(crate) change: C,
    pub(crate) source_time: chrono::DateTime<chrono::Utc>,
}

impl Decoder {
    pub(crate) fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// Projects `envelope`; `Ok(None)` for a type the projection does not know.
    pub(crate) fn project<P: Projection>(
        &self,
        replica: &str,
        projection: &P,
        envelope: &Envelope,
    ) -> Result<Option<Projected>, HandlerError> {
        self.project_with(
            "dbps_replica_ignored_total",
            ("replica", replica),
            envelope,
            |event, envelope| projection.project(event, envelope),
        )
    }

    /// Decodes `envelope` into `E` and makes it a change with `project`; `Ok(None)` (and
    /// one more on the `ignored` counter) for a type outside `E`.
    pub(crate) fn project_with<E: MessageSet, C>(
        &self,
        ignored: &'static str,
        (label, owner): (&'static str, &str),
        envelope: &Envelope,
        project: impl FnOnce(E, &Envelope) -> Result<C, HandlerError>,
    ) -> Result<Option<Projected<C>>, HandlerError> {
        if !E::TYPES.contains(&envelope.message_type.as_str()) {
            metrics::counter!(ignored, label => owner.to_owned()).increment(1);
            return Ok(None);
        }
        let Some(sequence) = envelope.sequence else {
            return Err(HandlerError::permanent(CacheError::NoSequence {
                replica: owner.to_owned(),
                message_id: envelope.id.clone(),
            }));
        };
        let event = E::decode(&self.registry, envelope).map_err(HandlerError::permanent)?;
        let change = project(event, envelope)?;
        Ok(Some(Projected {
            aggregate_id: envelope.aggregate_id.clone(),
            sequence,
            change,
            source_time: envelope.occurred_at,
        }))
    }

    /// Projects a snapshot record.
    pub(crate) fn project_snapshot<P: Projection>(
        projection: &P,
        record: &SnapshotRecord,
    ) -> Result<Projected, HandlerError> {
        let state: P::Snapshot = serde_json::from_value(record.state.clone()).map_err(|source| {
            HandlerError::permanent(CacheError::Codec {
                key: record.aggregate_id.clone(),
                source,
            })
        })?;
        Ok(Projected {
            aggregate_id: record.aggregate_id.clone(),
            sequence: record.sequence,
            change: projection.snapshot(state)?,
            source_time: chrono::Utc::now(),
        })
    }
}

/// The net effect of one aggregate's events in a batch: the newest sequence, the last
/// change that replaces rows (if any), every append, and whether the sequences had a gap.
#[derive(Debug)]
pub(crate) struct Collapsed {
    pub(crate) sequence: i64,
    /// The newest `Rows` or `Delete`; `None`: only `Unchanged` or `Append` events.
    pub(crate) change: Option<Change>,
    /// Every `Append` of the batch, in sequence order: its sequence and rows.
    pub(crate) appends: Vec<(i64, Vec<Row>)>,
    /// Whether appends and the other kinds were mixed for this aggregate.
    pub(crate) mixed: bool,
    pub(crate) sequences: Vec<i64>,
    pub(crate) source_times: Vec<chrono::DateTime<chrono::Utc>>,
}

/// Groups projected events by aggregate, in sequence order. Of the replacing kinds only
/// the newest change counts; appends are all kept.
pub(crate) fn collapse(events: Vec<Projected>) -> BTreeMap<String, Collapsed> {
    let mut by_aggregate: BTreeMap<String, Vec<Projected>> = BTreeMap::new();
    for event in events {
        by_aggregate.entry(event.aggregate_id.clone()).or_default().push(event);
    }
    by_aggregate
        .into_iter()
        .map(|(id, mut events)| {
            events.sort_by_key(|e| e.sequence);
            events.dedup_by_key(|e| e.sequence);
            let sequences = events.iter().map(|e| e.sequence).collect();
            let source_times = events.iter().map(|e| e.source_time).collect();
            let sequence = events.last().map_or(0, |e| e.sequence);
            let appending = events.iter().filter(|e| e.change.is_append()).count();
            let mixed = appending > 0 && appending < events.len();
            let mut appends = Vec::with_capacity(appending);
            let mut change = None;
            for event in events {
                match event.change {
                    Change::Append(rows) => appends.push((event.sequence, rows)),
                    Change::Unchanged => {}
                    other => change = Some(other),
                }
            }
            (
                id,
                Collapsed {
                    sequence,
                    change,
                    appends,
                    mixed,
                    sequences,
                    source_times,
                },
            )
        })
        .collect()
}

impl Collapsed {
    /// Whether the aggregate's events in the batch are appends.
    pub(crate) fn is_append(&self) -> bool {
        !self.appends.is_empty()
    }

    /// The events newer than `current`, and whether their sequences leave a gap after it.
    /// An aggregate seen for the first time has no gap (a replica may start mid-stream,
    /// and backfill fills the rest).
    pub(crate) fn gap_after(&self, current: Option<i64>) -> bool {
        let Some(current) = current else {
            return false;
        };
        (current + 1..)
            .zip(self.sequences.iter().filter(|&&s| s > current))
            .any(|(expected, &sequence)| sequence != expected)
    }
}

/// Records the lag of applied events.
pub(crate) fn record_lag(replica: &str, source_times: &[chrono::DateTime<chrono::Utc>]) {
    record_lag_as("dbps_replica_lag_seconds", ("replica", replica), source_times);
}

/// Records the lag of applied events in histogram `name`, labelled `label = owner`.
pub(crate) fn record_lag_as(
    name: &'static str,
    (label, owner): (&'static str, &str),
    source_times: &[chrono::DateTime<chrono::Utc>],
) {
    let now = chrono::Utc::now();
    for time in source_times {
        let lag = (now - *time).to_std().unwrap_or_default();
        metrics::histogram!(name, label => owner.to_owned()).record(lag.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn projected(id: &str, sequence: i64, change: Change) -> Projected {
        Projected {
            aggregate_id: id.to_owned(),
            sequence,
            change,
            source_time: chrono::Utc::now(),
        }
    }

    fn rows(name: &str) -> Change {
        let mut row = Row::new();
        row.insert("name".into(), Value::from(name));
        Change::Rows(vec![row])
    }

    #[test]
    fn collapse_keeps_the_newest_change_per_aggregate() {
        let collapsed = collapse(vec![
            projected("a", 3, rows("a3")),
            projected("b", 1, rows("b1")),
            projected("a", 2, rows("a2")),
            projected("a", 4, Change::Unchanged),
            projected("a", 3, rows("a3")),
        ]);
        let a = &collapsed["a"];
        assert_eq!(a.sequence, 4);
        assert_eq!(a.change, Some(rows("a3")));
        assert_eq!(a.sequences, vec![2, 3, 4]);
        assert_eq!(collapsed["b"].change, Some(rows("b1")));
    }

    #[test]
    fn a_delete_wins_over_earlier_rows() {
        let collapsed = collapse(vec![projected("a", 1, rows("a1")), projected("a", 2, Change::Delete)]);
        assert_eq!(collapsed["a"].change, Some(Change::Delete));
    }

    #[test]
    fn gaps_are_jumps_after_the_current_sequence() {
        let c = collapse(vec![projected("a", 4, rows("x")), projected("a", 5, rows("y"))]);
        assert!(!c["a"].gap_after(Some(3)));
        assert!(c["a"].gap_after(Some(2)));
        assert!(!c["a"].gap_after(Some(4)), "4 is stale, 5 follows it");
        assert!(!c["a"].gap_after(None));
        let holes = collapse(vec![projected("a", 2, rows("x")), projected("a", 4, rows("y"))]);
        assert!(holes["a"].gap_after(Some(1)));
    }

    fn append(name: &str) -> Change {
        Change::append(&serde_json::json!({ "name": name })).expect("an object")
    }

    #[test]
    fn collapse_keeps_every_append_in_sequence_order() {
        let collapsed = collapse(vec![
            projected("a", 3, append("a3")),
            projected("b", 1, append("b1")),
            projected("a", 1, append("a1")),
            projected("a", 2, append("a2")),
            projected("a", 3, append("a3")),
        ]);
        let a = &collapsed["a"];
        assert!(a.is_append() && !a.mixed);
        assert_eq!((a.sequence, a.change.as_ref()), (3, None));
        let names: Vec<(i64, &Value)> = a.appends.iter().map(|(s, rows)| (*s, &rows[0]["name"])).collect();
        assert_eq!(
            names,
            vec![
                (1, &Value::from("a1")),
                (2, &Value::from("a2")),
                (3, &Value::from("a3"))
            ]
        );
        assert_eq!(collapsed["b"].appends.len(), 1);
    }

    #[test]
    fn an_empty_append_is_an_append_and_mixing_kinds_is_flagged() {
        let empty = Change::append_rows::<Value>([]).expect("no rows");
        assert_eq!(empty, Change::Append(Vec::new()));
        let c = collapse(vec![projected("a", 1, empty)]);
        assert!(c["a"].is_append() && !c["a"].mixed);
        for other in [rows("x"), Change::Delete, Change::Unchanged] {
            let c = collapse(vec![projected("a", 1, append("a1")), projected("a", 2, other.clone())]);
            assert!(c["a"].mixed, "{other:?}");
        }
        let c = collapse(vec![
            projected("a", 1, rows("a1")),
            projected("a", 2, Change::Unchanged),
        ]);
        assert!(!c["a"].mixed && !c["a"].is_append());
    }

    #[test]
    fn rows_must_be_objects() {
        assert!(Change::append(&5).is_err());
        assert!(Change::append_rows(&[1, 2]).is_err());
        assert!(Change::row(&5).is_err());
        assert!(matches!(Change::row(&serde_json::json!({"a": 1})), Ok(Change::Rows(r)) if r.len() == 1));
    }
}
