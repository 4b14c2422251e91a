//! The seam between the relay and the database it drains.

use std::time::Duration;

use dbps_core::Envelope;

use crate::error::Result;

/// What happens to messages once Kafka acknowledged them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Delete them at once (the default): the outbox holds only its backlog.
    #[default]
    Delete,
    /// Keep them marked as published, and delete them once they are this old (for audits
    /// and replays). The relay purges them at every rebalance.
    Keep(Duration),
}

/// What happens to an aggregate's later messages when one of its messages is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoisonPolicy {
    /// Later messages keep flowing (the default). Consumers see the parked message's
    /// sequence number missing and can wait for the replay or raise an alarm.
    #[default]
    Continue,
    /// Later messages of the same aggregate wait until the parked one is replayed or
    /// discarded, so consumers never see them out of order. Other aggregates keep flowing.
    HoldAggregate,
}

/// A committed message waiting to be published.
#[derive(Debug, Clone)]
pub struct Pending<Id = i64> {
    /// The store's id of the message.
    pub id: Id,
    /// The topic to publish to.
    pub topic: String,
    /// The lease partition of the message's aggregate: the relay that holds this
    /// partition publishes it.
    pub partition: i32,
    /// The message.
    pub envelope: Envelope,
}

/// How many messages wait, and for how long, for metrics and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Messages committed and not yet published (parked ones excluded).
    pub pending: u64,
    /// Age of the oldest of them.
    pub oldest_age: Option<Duration>,
    /// Messages parked because Kafka refused them permanently.
    pub parked: u64,
}

/// A store the relay drains: PostgreSQL here, MongoDB in its own module.
///
/// A relay instance works through a [`OutboxStore::Lease`]: its share of the outbox
/// (hash partitions of the aggregate ids), which it renews and rebalances with the other
/// relays of the same service, and through which it waits for new commits.
pub trait OutboxStore: Send + Sync + 'static {
    /// One relay instance's claim on part of the outbox.
    type Lease: Send;

    /// How the store identifies a stored message.
    type Id: Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static;

    /// Joins the relays of this outbox.
    fn join(&self) -> impl Future<Output = Result<Self::Lease>> + Send;

    /// Takes this relay's fair share of partitions and gives up the excess. Called
    /// between batches, so a partition changes hands only when nothing of it is in flight.
    fn rebalance(&self, lease: &mut Self::Lease) -> impl Future<Output = Result<()>> + Send;

    /// Whether this relay currently owns any partition.
    fn owns_any(&self, lease: &Self::Lease) -> bool;

    /// The lease partitions this relay holds now, in ascending order (for operators and
    /// tests; the relay itself asks only [`OutboxStore::owns_any`]).
    fn partitions(&self, lease: &Self::Lease) -> Vec<i32>;

    /// Up to `limit` unpublished, unparked messages of the owned partitions, in commit
    /// order per aggregate.
    fn fetch(
        &self,
        lease: &mut Self::Lease,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Pending<Self::Id>>>> + Send;

    /// Like [`OutboxStore::fetch`], leaving out `in_flight`: messages of earlier batches
    /// that are on their way to Kafka or acknowledged and not marked yet. A store that
    /// does this in its query says so with [`OutboxStore::overlaps_rounds`]; the default
    /// fetches and drops them.
    fn fetch_excluding(
        &self,
        lease: &mut Self::Lease,
        limit: usize,
        in_flight: &[Self::Id],
    ) -> impl Future<Output = Result<Vec<Pending<Self::Id>>>> + Send {
        async move {
            let mut batch = self.fetch(lease, limit).await?;
            if !in_flight.is_empty() {
                batch.retain(|pending| !in_flight.contains(&pending.id));
            }
            Ok(batch)
        }
    }

    /// Whether the relay may overlap its rounds on this store: fetch the next batch
    /// (through [`OutboxStore::fetch_excluding`]) while the current one is on its way to
    /// Kafka, and mark a batch while the next one is published. Default `false`: fetch,
    /// publish and mark one after the other.
    fn overlaps_rounds(&self) -> bool {
        false
    }

    /// Records that Kafka acknowledged these messages.
    fn mark_published(&self, ids: &[Self::Id]) -> impl Future<Output = Result<()>> + Send;

    /// Parks a message that Kafka refused permanently, with the reason.
    fn park(&self, id: &Self::Id, reason: &str) -> impl Future<Output = Result<()>> + Send;

    /// Waits until a commit may have added messages, or `timeout` passes. Returns
    /// whether it was woken by a commit.
    fn wait_for_commit(&self, lease: &mut Self::Lease, timeout: Duration) -> impl Future<Output = Result<bool>> + Send;

    /// How long published messages are kept; the relay purges older ones at every
    /// rebalance.
    fn retention_policy(&self) -> Retention {
        Retention::Delete
    }

    /// Deletes published messages kept longer than the retention.
    fn purge_published(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;

    /// The current backlog.
    fn backlog(&self) -> impl Future<Output = Result<Backlog>> + Send;

    /// Leaves, releasing the lease so other relays take over at once.
    fn leave(&self, lease: Self::Lease) -> impl Future<Output = Result<()>> + Send;
}
