//! Projections: read models fed by events, in versioned tables or indices that can be
//! rebuilt from the event history when their shape changes.
//!
//! A projection is a declaration ([`ReadModel`]): a name, a version, the topics it reads,
//! the table of a version, and what each event means as rows. A search projection is a
//! [`SearchModel`]: the same, with an index's mappings and whole documents
//! ([`DocChange`]) instead; `OsProjection` (feature `opensearch`) keeps it in OpenSearch
//! indices behind an alias, guarded by external versions (see its documentation).
//! [`PgProjection`] (feature `postgres`) keeps a read model in PostgreSQL:
//!
//! - **Versioned tables behind a view.** Version `n` of projection `orders` lives in the
//!   table `orders_v<n>`; readers query the view `orders`, which points at the serving
//!   version.
//! - **Guarded by the aggregate's sequence number**, like a replica (it shares the
//!   replica's guard and its `dbps_replica_versions` table): a duplicate, late or
//!   reordered event changes nothing and is counted as stale.
//! - **Or appended, for facts.** A [`Change::Append`] inserts the event's own rows (one
//!   row per event: a movement, a payment) beside the aggregate's others, once, by the
//!   table's unique key: a duplicate inserts nothing, and a late event is inserted all
//!   the same (see [`Change::Append`] for the rules).
//! - **Checkpoints.** Each batch is applied in one transaction that also records, per
//!   topic partition, the offset of the next record to apply. The projection reads its
//!   topics itself, from its checkpoints, so it knows where it is without a consumer
//!   group; a restart resumes where the last committed batch ended.
//! - **Blue-green rebuild.** A new version fills its fresh table by replaying its topics
//!   from the beginning while the old version keeps serving, catches up with the old
//!   version's checkpoints, and then switches the view: one transaction holds the old
//!   version's batches out, a second one applies and commits the new version's last
//!   events up to the old version's checkpoints, and then the first replaces the view.
//!   From then on the new version is the one written; the old version's runner sees that
//!   it is superseded and stops.
//! - **Reading several views, or one view in several statements.** A transaction that
//!   needs them consistent locks the views first, before its first query
//!   ([`lock_views`]): a view is resolved when a statement is parsed, so a transaction
//!   whose snapshot predates a switch could otherwise read the new version as of that
//!   older snapshot.
//!
//! Metrics, labelled by `projection` (`<name>_v<version>`):
//! `dbps_projection_applied_total`, `dbps_projection_stale_total`,
//! `dbps_projection_ignored_total`, `dbps_projection_lag_seconds` (source time → applied)
//! and `dbps_projection_rebuild_progress` (replayed / total, 0 to 1).
//!
//! `docs/projections.md` says when to use a projection rather than a replica.

use dbps_core::{Envelope, HandlerError, MessageSet};

pub use crate::replica::{Change, Row};

#[cfg(feature = "opensearch")]
mod os;
#[cfg(feature = "postgres")]
mod pg;
#[cfg(any(feature = "postgres", feature = "opensearch"))]
mod reader;
#[cfg(feature = "opensearch")]
mod search;

#[cfg(feature = "opensearch")]
pub use os::{Freshness, OsProjection, OsProjectionBuilder, ProjectionStatus};
#[cfg(feature = "postgres")]
pub use pg::{MIGRATOR, PgProjection, PgProjectionBuilder, lock_views};
#[cfg(feature = "opensearch")]
pub use search::{DocChange, SearchModel};

/// A versioned read model: what a projection reads and how its events become rows.
///
/// A change of shape (a new column, a different key, another meaning of an event) is a
/// new version with its own table, filled by a rebuild from the event history.
///
/// ```
/// use dbps_cache::projection::{Change, ReadModel};
/// use dbps_core::{Envelope, HandlerError, Message, message_set};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct OrderPlaced { pub customer: String, pub total_cents: i64 }
/// impl Message for OrderPlaced { const TYPE: &'static str = "order.OrderPlaced"; }
///
/// message_set! { pub enum OrderEvents { Placed(OrderPlaced) } }
///
/// /// `orders_v1 (aggregate_id, customer, total_cents, source_sequence)`.
/// struct Orders;
///
/// impl ReadModel for Orders {
///     type Events = OrderEvents;
///
///     fn name(&self) -> &str { "orders" }
///     fn version(&self) -> u32 { 1 }
///     fn topics(&self) -> Vec<String> { vec![String::from("order.order.events")] }
///
///     fn create_table(&self, table: &str) -> String {
///         format!("create table {table} (aggregate_id text primary key, customer text not null, \
///                  total_cents bigint not null, source_sequence bigint not null)")
///     }
///
///     fn project(&self, event: OrderEvents, _: &Envelope) -> Result<Change, HandlerError> {
///         match event {
///             OrderEvents::Placed(o) => Ok(Change::row(&serde_json::json!({
///                 "customer": o.customer, "total_cents": o.total_cents,
///             }))?),
///         }
///     }
/// }
/// ```
pub trait ReadModel: Send + Sync + 'static {
    /// The events the projection understands. Other types on its topics are skipped
    /// (counted as `dbps_projection_ignored_total`).
    type Events: MessageSet;

    /// The projection's name: the name of its view, and the stem of its tables' names.
    /// A plain SQL identifier.
    fn name(&self) -> &str;

    /// The version (at least 1) this declaration describes. Its table is
    /// `<name>_v<version>`.
    fn version(&self) -> u32;

    /// The topics the projection reads.
    fn topics(&self) -> Vec<String>;

    /// The SQL that creates this version's table, named `table` (already quoted). The
    /// table holds the projection's columns plus the aggregate column and the sequence
    /// column, which the projection fills in. It may create indexes too.
    fn create_table(&self, table: &str) -> String;

    /// What `event` means for the read model. The projection fills in the aggregate
    /// column and the sequence column of each row itself.
    fn project(&self, event: Self::Events, envelope: &Envelope) -> Result<Change, HandlerError>;
}

/// How far a rebuild is: records replayed into the new version so far, of the total
/// known (the end offsets when it started, plus what arrived while it ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebuildProgress {
    /// The version being built.
    pub version: u32,
    /// Records replayed so far.
    pub replayed: u64,
    /// Records to replay, as far as known now.
    pub total: u64,
}

impl RebuildProgress {
    /// `replayed / total`, from 0 to 1 (1 when there is nothing to replay).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            (self.replayed as f64 / self.total as f64).min(1.0)
        }
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebuildReport {
    /// The version built.
    pub version: u32,
    /// The version that served before the switch (`None`: the projection had none).
    pub previous: Option<u32>,
    /// Records replayed into the new version.
    pub replayed: u64,
    /// Whether the view now points at the new version. `false` when the rebuild was
    /// stopped before the switch (it resumes from its checkpoints when started again),
    /// or when this version or a newer one already served.
    pub switched: bool,
}

/// How a projection's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunSummary {
    /// Records this run applied (replayed and live).
    pub records: u64,
    /// `Some(version)` when the run stopped because a newer version serves the view.
    pub superseded_by: Option<u32>,
}
