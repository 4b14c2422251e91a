//! Relay membership and partition leases, as documents with an expiry.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use dbps_core::classify::is_duplicate_key;
use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ChangeStreamEvent;
use mongodb::{Collection, Database};
use rand::seq::SliceRandom;

use super::{LEASES_COLLECTION, PARTITIONS, mongo};
use crate::error::Result;

/// One relay instance's claim on part of the MongoDB outbox: its membership, the
/// partitions it leases and how it waits for new messages.
pub struct MongoLease {
    pub(crate) member: String,
    pub(crate) owned: BTreeSet<i32>,
    /// When the renewal that the current leases count from started.
    pub(crate) renewed_at: Option<Instant>,
    pub(crate) wake: Wake,
    /// The collection the next fetch starts with, so that a full batch from one
    /// collection does not starve the others.
    pub(crate) next_collection: usize,
    /// Where to release the leases when the lease is dropped without
    /// [`OutboxStore::leave`](crate::OutboxStore::leave).
    pub(crate) release: Option<Leases>,
}

/// A relay stopped by its shutdown future (or a task that was aborted) drops its lease
/// without leaving: the leases are released in the background, as PostgreSQL's advisory
/// locks go with their connection, so that other relays take over at once instead of
/// after the time to live. A process that dies releases nothing; its leases expire.
impl Drop for MongoLease {
    fn drop(&mut self) {
        let Some(leases) = self.release.take() else {
            return;
        };
        let member = std::mem::take(&mut self.member);
        let owned = std::mem::take(&mut self.owned);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = leases.leave(&member, &owned).await {
                    tracing::warn!(%error, %member, "could not release the relay's leases; they expire");
                }
            });
        }
    }
}

impl MongoLease {
    /// The relay instance's member id.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The partitions this relay leases now.
    pub fn partitions(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    /// Whether new messages wake this relay through a change stream (replica sets and
    /// sharded clusters) rather than by polling.
    pub fn change_stream(&self) -> bool {
        matches!(self.wake, Wake::Stream(_))
    }
}

impl fmt::Debug for MongoLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoLease")
            .field("member", &self.member)
            .field("owned", &self.owned)
            .field("renewed_at", &self.renewed_at)
            .field("change_stream", &self.change_stream())
            .finish_non_exhaustive()
    }
}

/// How a relay learns of new messages.
pub(crate) enum Wake {
    /// Polling, with the delay before the next look: short after messages were found,
    /// growing while none are.
    Poll { delay: Duration },
    /// A change stream over the registered collections.
    Stream(Box<ChangeStream<ChangeStreamEvent<Document>>>),
}

/// The lease documents of one outbox (one set of registered collections).
///
/// - A member document `{_id: "<scope>#m<member>", scope, kind: "member", expires_at}` per
///   live relay, renewed with its leases; the live ones decide the fair share.
/// - A partition document `{_id: "<scope>#p<n>", scope, kind: "partition", partition,
///   owner, expires_at}` per leased partition. It is taken by one atomic upsert that
///   matches only an expired lease or the relay's own: a live lease of another relay
///   makes the upsert collide on `_id`.
#[derive(Debug, Clone)]
pub(crate) struct Leases {
    collection: Collection<Document>,
    scope: String,
    ttl: Duration,
}

impl Leases {
    pub(crate) fn new(database: &Database, scope: String, ttl: Duration) -> Self {
        Self {
            collection: database.collection(LEASES_COLLECTION),
            scope,
            ttl,
        }
    }

    fn partition_id(&self, partition: i32) -> String {
        format!("{}#p{partition}", self.scope)
    }

    fn member_id(&self, member: &str) -> String {
        format!("{}#m{member}", self.scope)
    }

    fn expiry(&self, from: bson::DateTime) -> bson::DateTime {
        let ttl = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        bson::DateTime::from_millis(from.timestamp_millis().saturating_add(ttl))
    }

    /// Whether the leases still count. A relay stops using them a third of the time to
    /// live before they expire, so that another relay, which takes them only after they
    /// expired by its own clock, never publishes a partition at the same time (clocks
    /// may differ by up to that margin).
    pub(crate) fn valid(&self, lease: &MongoLease) -> bool {
        lease
            .renewed_at
            .is_some_and(|t| t.elapsed() < self.ttl.saturating_sub(self.ttl / 3))
    }

    /// Whether a third of the time to live has passed since the last renewal.
    pub(crate) fn renewal_due(&self, lease: &MongoLease) -> bool {
        lease.renewed_at.is_none_or(|t| t.elapsed() >= self.ttl / 3)
    }

    /// Records the member, renews its leases and keeps only those still its own.
    pub(crate) async fn renew(&self, lease: &mut MongoLease) -> Result<()> {
        let started = Instant::now();
        let expires_at = self.expiry(bson::DateTime::now());
        self.collection
            .update_one(
                doc! { "_id": self.member_id(&lease.member) },
                doc! { "$set": { "scope": &self.scope, "kind": "member", "expires_at": expires_at } },
            )
            .upsert(true)
            .await
            .map_err(mongo("renew relay membership"))?;
        if !lease.owned.is_empty() {
            let ids: Vec<String> = lease.owned.iter().map(|p| self.partition_id(*p)).collect();
            self.collection
                .update_many(
                    doc! { "_id": { "$in": &ids }, "owner": &lease.member },
                    doc! { "$set": { "expires_at": expires_at } },
                )
                .await
                .map_err(mongo("renew partition leases"))?;
            let still: BTreeSet<i32> = self
                .collection
                .find(doc! { "_id": { "$in": &ids }, "owner": &lease.member })
                .projection(doc! { "partition": 1 })
                .await
                .map_err(mongo("read partition leases"))?
                .try_collect::<Vec<Document>>()
                .await
                .map_err(mongo("read partition leases"))?
                .iter()
                .filter_map(|d| d.get_i32("partition").ok())
                .collect();
            let lost = lease.owned.len() - still.len();
            if lost > 0 {
                tracing::warn!(
                    member = %lease.member,
                    lost,
                    "relay lost partition leases that expired before it renewed them"
                );
            }
            lease.owned = still;
        }
        lease.renewed_at = Some(started);
        Ok(())
    }

    /// Renews, then takes the fair share of partitions (`ceil(partitions / live relays)`)
    /// or gives up the excess.
    pub(crate) async fn rebalance(&self, lease: &mut MongoLease) -> Result<()> {
        self.renew(lease).await?;
        let now = bson::DateTime::now();
        let members = self
            .collection
            .count_documents(doc! { "scope": &self.scope, "kind": "member", "expires_at": { "$gt": now } })
            .await
            .map_err(mongo("count relays"))?
            .max(1);
        let target = usize::try_from(u64::from(PARTITIONS).div_ceil(members)).unwrap_or(1);
        if lease.owned.len() > target {
            let released: Vec<i32> = lease
                .owned
                .iter()
                .rev()
                .take(lease.owned.len() - target)
                .copied()
                .collect();
            let ids: Vec<String> = released.iter().map(|p| self.partition_id(*p)).collect();
            self.collection
                .delete_many(doc! { "_id": { "$in": ids }, "owner": &lease.member })
                .await
                .map_err(mongo("release partitions"))?;
            for partition in &released {
                lease.owned.remove(partition);
            }
            tracing::info!(
                member = %lease.member,
                released = released.len(),
                owned = lease.owned.len(),
                "relay released partitions"
            );
        } else if lease.owned.len() < target {
            let held: Vec<Document> = self
                .collection
                .find(doc! { "scope": &self.scope, "kind": "partition", "expires_at": { "$gt": now } })
                .projection(doc! { "partition": 1 })
                .await
                .map_err(mongo("read partition leases"))?
                .try_collect()
                .await
                .map_err(mongo("read partition leases"))?;
            let held: BTreeSet<i32> = held.iter().filter_map(|d| d.get_i32("partition").ok()).collect();
            let mut free: Vec<i32> = (0..i32::try_from(PARTITIONS).unwrap_or(0))
                .filter(|p| !held.contains(p) && !lease.owned.contains(p))
                .collect();
            free.shuffle(&mut rand::rng());
            let expires_at = self.expiry(now);
            let mut taken = 0_usize;
            for partition in free {
                if lease.owned.len() >= target {
                    break;
                }
                if self.take(&lease.member, partition, now, expires_at).await? {
                    lease.owned.insert(partition);
                    taken += 1;
                }
            }
            if taken > 0 {
                tracing::info!(member = %lease.member, taken, owned = lease.owned.len(), "relay took partitions");
            }
        }
        // Member documents of relays that died: their time to live passed long ago.
        let stale = bson::DateTime::from_millis(
            now.timestamp_millis()
                .saturating_sub(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)),
        );
        self.collection
            .delete_many(doc! { "scope": &self.scope, "kind": "member", "expires_at": { "$lt": stale } })
            .await
            .map_err(mongo("forget dead relays"))?;
        Ok(())
    }

    /// Takes `partition` if its lease is free or expired.
    async fn take(
        &self,
        member: &str,
        partition: i32,
        now: bson::DateTime,
        expires_at: bson::DateTime,
    ) -> Result<bool> {
        let result = self
            .collection
            .update_one(
                doc! {
                    "_id": self.partition_id(partition),
                    "$or": [{ "expires_at": { "$lt": now } }, { "owner": member }],
                },
                doc! { "$set": {
                    "scope": &self.scope,
                    "kind": "partition",
                    "partition": partition,
                    "owner": member,
                    "expires_at": expires_at,
                } },
            )
            .upsert(true)
            .await;
        match result {
            Ok(result) => Ok(result.matched_count > 0 || result.upserted_id.is_some()),
            // Another relay holds a live lease: the upsert's insert met its `_id`.
            Err(error) if is_duplicate_key(&error) => Ok(false),
            Err(source) => Err(mongo("take partition")(source)),
        }
    }

    /// Releases every lease of the relay and its membership.
    pub(crate) async fn leave(&self, member: &str, owned: &BTreeSet<i32>) -> Result<()> {
        let ids: Vec<String> = owned.iter().map(|p| self.partition_id(*p)).collect();
        self.collection
            .delete_many(doc! { "_id": { "$in": ids }, "owner": member })
            .await
            .map_err(mongo("release partitions"))?;
        self.collection
            .delete_one(doc! { "_id": self.member_id(member) })
            .await
            .map_err(mongo("leave relays"))?;
        Ok(())
    }
}
