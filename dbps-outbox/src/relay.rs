//! The relay: moves committed messages from an outbox store to Kafka.

use std::time::{Duration, Instant};

use dbps_core::kafka::KafkaPublisher;
use tracing::Instrument;

use crate::error::{OutboxError, Result};
use crate::store::{OutboxStore, Pending};

/// What a relay did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelaySummary {
    /// Messages published (and marked).
    pub published: u64,
    /// Messages parked.
    pub parked: u64,
}

/// Builds a [`Relay`].
#[derive(Debug)]
pub struct RelayBuilder<S> {
    relay: Relay<S>,
}

impl<S: OutboxStore> RelayBuilder<S> {
    /// Messages fetched and published per round (default 500).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.relay.batch_size = batch_size.max(1);
        self
    }

    /// How long an idle relay waits for a commit notification before it looks anyway
    /// (default 2 s). Notifications make new messages leave within milliseconds; the poll
    /// only covers notifications lost while the listening connection reconnected.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.relay.poll_interval = interval;
        self
    }

    /// How often the relay rebalances partitions with the other relays and reports its
    /// backlog metrics (default 10 s).
    pub fn rebalance_interval(mut self, interval: Duration) -> Self {
        self.relay.rebalance_interval = interval;
        self
    }

    /// How long to wait after a failed round (database or broker trouble) before the
    /// next (default 500 ms).
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.relay.retry_delay = delay;
        self
    }

    /// Builds the relay.
    pub fn build(self) -> Relay<S> {
        self.relay
    }
}

/// Publishes every committed outbox message to Kafka, at least once, in commit order per
/// aggregate.
///
/// - Wakes on commit (LISTEN/NOTIFY for PostgreSQL) and polls only as a fallback, so an
///   idle relay costs well under one query per second and a new message leaves within
///   milliseconds.
/// - Reads rows that are not yet published (never "everything after the last id"), so a
///   transaction that commits late, with a lower id, is published when it commits.
/// - Marks (or deletes) a message only after the broker acknowledged it. A relay that
///   dies between the acknowledgement and the mark publishes the message again when it
///   restarts: a duplicate the consumers' inbox absorbs.
/// - Parks a message Kafka refuses permanently (too large, invalid topic) with the
///   reason; the store's policy decides whether its aggregate's later messages wait.
/// - Several relays share the outbox by partition leases (see the store).
///
/// Metrics: `dbps_outbox_published_total`, `dbps_outbox_parked_total`,
/// `dbps_outbox_backlog`, `dbps_outbox_oldest_unpublished_seconds`, `dbps_outbox_parked`,
/// `dbps_outbox_batch_seconds`.
#[derive(Debug)]
pub struct Relay<S> {
    store: S,
    publisher: KafkaPublisher,
    batch_size: usize,
    poll_interval: Duration,
    rebalance_interval: Duration,
    retry_delay: Duration,
}

impl<S: OutboxStore> Relay<S> {
    /// A builder for a relay from `store` to Kafka through `publisher`.
    ///
    /// Give the relay a publisher whose `message.timeout.ms` is `0` (no timeout) to have
    /// it wait out broker outages instead of failing rounds; either way nothing is lost.
    pub fn builder(store: S, publisher: KafkaPublisher) -> RelayBuilder<S> {
        RelayBuilder {
            relay: Self {
                store,
                publisher,
                batch_size: 500,
                poll_interval: Duration::from_secs(2),
                rebalance_interval: Duration::from_secs(10),
                retry_delay: Duration::from_millis(500),
            },
        }
    }

    /// The store this relay drains.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs until `shutdown` completes. A round in flight when it does is abandoned:
    /// its messages stay unmarked and are published again by the next relay (at least
    /// once).
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<RelaySummary> {
        let mut summary = RelaySummary::default();
        tokio::pin!(shutdown);
        loop {
            let session = async {
                let lease = self.store.join().await?;
                self.session(lease, &mut summary).await
            };
            tokio::select! {
                () = &mut shutdown => return Ok(summary),
                result = session => {
                    let error = match result {
                        Ok(never) => match never {},
                        Err(error) => error,
                    };
                    tracing::warn!(%error, "relay session failed; rejoining");
                    metrics::counter!("dbps_outbox_relay_errors_total").increment(1);
                }
            }
            tokio::select! {
                () = &mut shutdown => return Ok(summary),
                () = tokio::time::sleep(self.retry_delay) => {}
            }
        }
    }

    /// One membership: rounds until an error ends it.
    async fn session(&self, mut lease: S::Lease, summary: &mut RelaySummary) -> Result<std::convert::Infallible> {
        let mut last_rebalance: Option<Instant> = None;
        loop {
            if last_rebalance.is_none_or(|t| t.elapsed() >= self.rebalance_interval) {
                self.store.rebalance(&mut lease).await?;
                self.purge().await;
                self.report_backlog().await;
                last_rebalance = Some(Instant::now());
            }
            if !self.store.owns_any(&lease) {
                let wait = self.rebalance_interval.min(self.poll_interval);
                self.store.wait_for_commit(&mut lease, wait).await?;
                continue;
            }
            let batch = self.store.fetch(&mut lease, self.batch_size).await?;
            let drained = batch.len() < self.batch_size;
            if !batch.is_empty() {
                let span = tracing::debug_span!("dbps.relay.batch", size = batch.len());
                let (published, parked) = self.publish(batch).instrument(span).await?;
                summary.published += published;
                summary.parked += parked;
            }
            if drained {
                // Nothing more is waiting: sleep until a commit is announced (one that
                // committed while this round ran has been announced already), but come
                // back for the next rebalance in time.
                let until_rebalance =
                    last_rebalance.map_or(Duration::ZERO, |t| self.rebalance_interval.saturating_sub(t.elapsed()));
                self.store
                    .wait_for_commit(&mut lease, self.poll_interval.min(until_rebalance))
                    .await?;
            }
        }
    }

    /// Publishes one batch and marks what the broker acknowledged.
    async fn publish(&self, batch: Vec<Pending<S::Id>>) -> Result<(u64, u64)> {
        let started = Instant::now();
        let messages: Vec<(&str, &dbps_core::Envelope)> =
            batch.iter().map(|p| (p.topic.as_str(), &p.envelope)).collect();
        let results = self.publisher.publish_batch(messages).await;
        let mut acknowledged = Vec::with_capacity(batch.len());
        let mut parked = 0;
        let mut transient = None;
        for (pending, result) in batch.iter().zip(results) {
            match result {
                Ok(_) => acknowledged.push(pending.id.clone()),
                // Stays in the outbox: it goes out after the failed message of its aggregate
                // was parked (or is held with it, under `PoisonPolicy::HoldAggregate`).
                Err(dbps_core::Error::HeldBack { .. }) => {}
                Err(error) if error.is_transient() => {
                    transient.get_or_insert(error);
                }
                Err(error) => {
                    let reason = error_chain(&error);
                    tracing::error!(
                        id = ?pending.id,
                        message_id = %pending.envelope.id,
                        topic = %pending.topic,
                        aggregate_id = %pending.envelope.aggregate_id,
                        %reason,
                        "outbox message parked"
                    );
                    self.store.park(&pending.id, &reason).await?;
                    metrics::counter!("dbps_outbox_parked_total").increment(1);
                    parked += 1;
                }
            }
        }
        self.store.mark_published(&acknowledged).await?;
        let published = acknowledged.len() as u64;
        metrics::counter!("dbps_outbox_published_total").increment(published);
        metrics::histogram!("dbps_outbox_batch_seconds").record(started.elapsed().as_secs_f64());
        if let Some(error) = transient {
            // The unacknowledged messages stay in the outbox and go out in a later round.
            return Err(OutboxError::Publish(error));
        }
        Ok((published, parked))
    }

    /// Deletes published messages past their retention (only under `Retention::Keep`).
    async fn purge(&self) {
        if let crate::Retention::Keep(keep) = self.store.retention_policy() {
            match self.store.purge_published(keep).await {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "published outbox messages purged"),
                Err(error) => tracing::warn!(%error, "could not purge published outbox messages"),
            }
        }
    }

    async fn report_backlog(&self) {
        match self.store.backlog().await {
            Ok(backlog) => {
                metrics::gauge!("dbps_outbox_backlog").set(backlog.pending as f64);
                metrics::gauge!("dbps_outbox_parked").set(backlog.parked as f64);
                metrics::gauge!("dbps_outbox_oldest_unpublished_seconds")
                    .set(backlog.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
            }
            Err(error) => tracing::warn!(%error, "could not measure the outbox backlog"),
        }
    }
}

/// The error and its causes on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
