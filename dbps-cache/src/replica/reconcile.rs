//! Consistency monitoring: a replica compared with its source by digests, then by entries
//! only in the buckets that differ.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dbps_core::CancellationToken;
use serde::Serialize;

use super::digest::{BucketDigest, DIGEST_BUCKETS};
use super::{SnapshotRecord, SnapshotSource};
use crate::error::Result;

/// The replica's side of a reconciliation: its digests and entries, computed from the
/// rows it holds (not from its version table, so damaged rows show), and the means to
/// repair them. `PgReplica` and `MongoReplica`
/// implement it.
///
/// The reconciler expects every live aggregate of the source to have at least one row in
/// the replica: one-to-one replicas, or maps where each aggregate has an entry.
pub trait ReplicaSide: Send + Sync {
    /// The replica's name, for reports and metrics.
    fn name(&self) -> &str;

    /// Count and digest of `(aggregate id, sequence)` of the rows, per bucket.
    fn digests(&self) -> impl Future<Output = Result<Vec<BucketDigest>>> + Send;

    /// `(aggregate id, sequence)` of the rows in some buckets (an aggregate with rows of
    /// several sequences is listed once per sequence).
    fn entries(&self, buckets: &[u16]) -> impl Future<Output = Result<Vec<(String, i64)>>> + Send;

    /// Replaces the rows of these aggregates with the records' state unless the replica
    /// holds a newer sequence. Returns how many aggregates were rewritten.
    fn repair(&self, records: &[SnapshotRecord]) -> impl Future<Output = Result<usize>> + Send;

    /// Removes the rows of aggregates the source does not have, leaving tombstones.
    fn remove(&self, aggregate_ids: &[String]) -> impl Future<Output = Result<usize>> + Send;
}

/// What a reconciliation found (and repaired).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DriftReport {
    /// The replica.
    pub replica: String,
    /// Records in the source.
    pub source_records: i64,
    /// Distinct `(aggregate, sequence)` entries in the replica.
    pub replica_records: i64,
    /// Buckets whose count or digest differed, so whose entries were listed.
    pub differing_buckets: usize,
    /// In the source, not in the replica.
    pub missing: Vec<String>,
    /// In the replica, not in the source (deleted there, the delete never applied here).
    pub extra: Vec<String>,
    /// In both, the replica's sequence older than the source's (or several sequences).
    pub stale: Vec<String>,
    /// In both, the replica's newer: an event applied after the source was read. Not
    /// drift; listed so that a report adds up.
    pub ahead: Vec<String>,
    /// Aggregates rewritten from the source by the repair.
    pub repaired: usize,
    /// Extra aggregates removed by the repair.
    pub removed: usize,
    /// How long the comparison (and repair) took (seconds, in JSON).
    #[serde(rename = "took_s", serialize_with = "seconds")]
    pub took: Duration,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

impl DriftReport {
    /// No missing, extra or stale record.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.stale.is_empty()
    }
}

/// Compares a replica with its source and, if asked, repairs it.
///
/// The comparison reads one digest per bucket of ids from each side (two queries), then
/// lists `(id, sequence)` only in the buckets that differ, so a clean comparison costs
/// the same few queries whatever the size. A repair re-fetches missing and stale records
/// from the source and applies them through the replica's sequence guard, so it never
/// moves a record back; extra records are removed, leaving tombstones.
///
/// Metrics: `dbps_replica_drift{replica, kind=missing|extra|stale}` (gauges, the last
/// run's counts), `dbps_replica_repaired_total{replica}`.
#[derive(Debug)]
pub struct Reconciler<S, R> {
    source: S,
    replica: R,
    repair: bool,
}

impl<S: SnapshotSource, R: ReplicaSide> Reconciler<S, R> {
    /// A reconciler that reports drift without repairing it.
    pub fn new(source: S, replica: R) -> Self {
        Self {
            source,
            replica,
            repair: false,
        }
    }

    /// Repairs the drift it finds.
    pub fn repair(mut self, repair: bool) -> Self {
        self.repair = repair;
        self
    }

    /// One comparison (and repair, if asked).
    pub async fn run(&self) -> Result<DriftReport> {
        let started = Instant::now();
        let (source, replica) = tokio::try_join!(self.source.digests(), self.replica.digests())?;
        let mut report = DriftReport {
            replica: self.replica.name().to_owned(),
            source_records: source.iter().map(|d| d.count).sum(),
            replica_records: replica.iter().map(|d| d.count).sum(),
            ..DriftReport::default()
        };
        let differing: Vec<u16> = (0..DIGEST_BUCKETS)
            .filter(|&b| source.get(usize::from(b)) != replica.get(usize::from(b)))
            .collect();
        report.differing_buckets = differing.len();
        if !differing.is_empty() {
            let (source_entries, replica_entries) =
                tokio::try_join!(self.source.entries(&differing), self.replica.entries(&differing))?;
            let source_entries: BTreeMap<String, i64> = source_entries.into_iter().collect();
            let mut held: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            for (id, sequence) in replica_entries {
                held.entry(id).or_default().push(sequence);
            }
            for (id, &sequence) in &source_entries {
                match held.get(id).map(Vec::as_slice) {
                    None => report.missing.push(id.clone()),
                    Some([held]) if *held == sequence => {}
                    Some([held]) if *held > sequence => report.ahead.push(id.clone()),
                    Some(_) => report.stale.push(id.clone()),
                }
            }
            report.extra = held
                .keys()
                .filter(|id| !source_entries.contains_key(*id))
                .cloned()
                .collect();
        }
        if self.repair && !report.is_clean() {
            let mut records = Vec::new();
            let mut gone = report.extra.clone();
            for id in report.missing.iter().chain(&report.stale) {
                match self.source.get(id).await? {
                    Some(record) => records.push(record),
                    None => gone.push(id.clone()),
                }
            }
            for chunk in records.chunks(500) {
                report.repaired += self.replica.repair(chunk).await?;
            }
            if !gone.is_empty() {
                report.removed = self.replica.remove(&gone).await?;
            }
            metrics::counter!("dbps_replica_repaired_total", "replica" => report.replica.clone())
                .increment((report.repaired + report.removed) as u64);
        }
        report.took = started.elapsed();
        for (kind, count) in [
            ("missing", report.missing.len()),
            ("extra", report.extra.len()),
            ("stale", report.stale.len()),
        ] {
            metrics::gauge!("dbps_replica_drift", "replica" => report.replica.clone(), "kind" => kind)
                .set(count as f64);
        }
        if report.is_clean() {
            tracing::debug!(replica = %report.replica, records = report.source_records, took = ?report.took, "replica consistent");
        } else {
            tracing::warn!(
                replica = %report.replica,
                missing = report.missing.len(),
                extra = report.extra.len(),
                stale = report.stale.len(),
                repaired = report.repaired,
                removed = report.removed,
                "replica drift"
            );
        }
        Ok(report)
    }

    /// Runs [`run`](Self::run) every `interval` until `shutdown` is cancelled. A failed
    /// run is logged and the schedule goes on.
    pub async fn run_every(&self, interval: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.run().await {
                tracing::error!(replica = %self.replica.name(), error = %dbps_core::ErrorChain(&error), "reconciliation failed");
            }
        }
    }
}
