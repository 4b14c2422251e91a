//! The relay: moves committed messages from an outbox store to Kafka.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use dbps_core::kafka::{KafkaPublisher, TopicSpec, ensure_topics};
use dbps_core::{CancellationToken, ErrorChain};
use tracing::Instrument;

use crate::error::{OutboxError, Result};
use crate::store::{OutboxStore, Pending};

/// What a relay did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelaySummary {
    /// Messages published (and marked).
    pub published: u64,
    /// Messages parked.
    pub parked: u64,
    /// Transient failures that were retried (database or broker trouble).
    pub retried: u64,
}

/// Builds a [`Relay`].
#[derive(Debug)]
pub struct RelayBuilder<S> {
    relay: Relay<S>,
}

impl<S: OutboxStore> RelayBuilder<S> {
    /// Messages fetched and published per round (default 500; at least 1).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.relay.batch_size = batch_size;
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

    /// How long to wait after the first failed round (database or broker trouble) before
    /// the next (default 500 ms). Further failures in a row wait twice as long each time,
    /// with jitter, up to [`RelayBuilder::max_retry_delay`].
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.relay.retry_delay = delay;
        self
    }

    /// The longest wait between two failed rounds (default 10 s).
    pub fn max_retry_delay(mut self, delay: Duration) -> Self {
        self.relay.max_retry_delay = delay;
        self
    }

    /// Topics the relay creates, if they do not exist yet, before it publishes anything
    /// (the service's own event and command topics). A message whose topic does not exist
    /// is never parked: it waits, with an error in the log naming the topic, until the
    /// topic is created.
    pub fn create_topics(mut self, topics: impl IntoIterator<Item = TopicSpec>) -> Self {
        self.relay.create_topics.extend(topics);
        self
    }

    /// Checks the settings and builds the relay.
    pub fn build(self) -> Result<Relay<S>> {
        let relay = self.relay;
        let invalid = |setting, reason: &str| {
            Err(OutboxError::InvalidConfig {
                setting,
                reason: reason.to_owned(),
            })
        };
        if relay.batch_size == 0 {
            return invalid("batch_size", "must be at least 1");
        }
        for (setting, value) in [
            ("poll_interval", relay.poll_interval),
            ("rebalance_interval", relay.rebalance_interval),
            ("retry_delay", relay.retry_delay),
        ] {
            if value.is_zero() {
                return invalid(setting, "must be positive");
            }
        }
        if relay.max_retry_delay < relay.retry_delay {
            return invalid("max_retry_delay", "must be at least retry_delay");
        }
        for topic in &relay.create_topics {
            dbps_core::kafka::validate_topic_name(&topic.name).map_err(OutboxError::Message)?;
        }
        Ok(relay)
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
/// - Parks a message Kafka refuses for what it is (too large, an invalid record or topic
///   name) with the reason; the store's policy decides whether its aggregate's later
///   messages wait. A message whose topic does not exist waits for the topic instead.
/// - Several relays share the outbox by partition leases (see the store).
///
/// # Lifecycle
///
/// [`Relay::run`] follows the contract of every long-running dbps part:
///
/// - it runs until its [`CancellationToken`] is cancelled; then it stops taking work,
///   finishes the batch in flight (published *and* marked), leaves (releasing its leases
///   so that other relays take over at once) and returns its [`RelaySummary`];
/// - transient trouble (the database or the broker unreachable, a failover) is retried
///   with exponential backoff and counted in `dbps_outbox_relay_errors_total`; a
///   permanent error (the outbox table missing, refused credentials or authorisation)
///   returns `Err` at once, with a message that says what to fix;
/// - dropping the `run` future behaves as a crash: the batch in flight stays unmarked
///   and is published again by whichever relay takes its partitions;
/// - a panic inside is not caught: it reaches the caller as a panic.
///
/// Metrics: `dbps_outbox_published_total`, `dbps_outbox_parked_total`,
/// `dbps_outbox_relay_errors_total`, `dbps_outbox_backlog`,
/// `dbps_outbox_oldest_unpublished_seconds`, `dbps_outbox_parked`,
/// `dbps_outbox_batch_seconds`.
#[derive(Debug)]
pub struct Relay<S> {
    store: S,
    publisher: KafkaPublisher,
    batch_size: usize,
    poll_interval: Duration,
    rebalance_interval: Duration,
    retry_delay: Duration,
    max_retry_delay: Duration,
    create_topics: Vec<TopicSpec>,
}

/// What publishing one batch came to.
struct Published<Id> {
    /// The messages Kafka acknowledged, in batch order.
    acknowledged: Vec<Id>,
    /// How many were parked.
    parked: u64,
    /// The first failure that leaves messages in the outbox (transient) or stops the
    /// relay (permanent).
    failed: Option<dbps_core::Error>,
    /// Whether every message of the batch was acknowledged.
    complete: bool,
}

/// How a session ended.
enum SessionEnd {
    /// The shutdown token was cancelled; the lease was left.
    Shutdown,
    /// A round failed.
    Failed(OutboxError),
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
                max_retry_delay: Duration::from_secs(10),
                create_topics: Vec::new(),
            },
        }
    }

    /// The store this relay drains.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs until `shutdown` is cancelled or a permanent error stops it (see the
    /// lifecycle in the type's documentation).
    pub async fn run(self, shutdown: CancellationToken) -> Result<RelaySummary> {
        let mut summary = RelaySummary::default();
        let mut backoff = self.backoff();
        if !self.create_topics.is_empty() {
            loop {
                match ensure_topics(self.publisher.config(), &self.create_topics).await {
                    Ok(_) => break,
                    Err(error) if error.is_transient() => {
                        if self
                            .pause(&shutdown, &mut backoff, &mut summary, &OutboxError::Publish(error))
                            .await
                        {
                            return Ok(summary);
                        }
                    }
                    Err(error) => return Err(OutboxError::Publish(error)),
                }
            }
            backoff = self.backoff();
        }
        loop {
            let lease = tokio::select! {
                () = shutdown.cancelled() => return Ok(summary),
                joined = self.store.join() => joined,
            };
            let end = match lease {
                Ok(lease) => self.session(lease, &shutdown, &mut summary, &mut backoff).await,
                Err(error) => SessionEnd::Failed(error),
            };
            match end {
                SessionEnd::Shutdown => return Ok(summary),
                SessionEnd::Failed(error) if error.is_transient() => {
                    if self.pause(&shutdown, &mut backoff, &mut summary, &error).await {
                        return Ok(summary);
                    }
                }
                SessionEnd::Failed(error) => {
                    tracing::error!(error = %ErrorChain(&error), "relay stopped by a permanent error");
                    return Err(error);
                }
            }
        }
    }

    /// Logs and counts a transient failure and waits for the next delay; true if the
    /// shutdown token was cancelled meanwhile.
    async fn pause(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut ExponentialBackoff,
        summary: &mut RelaySummary,
        error: &OutboxError,
    ) -> bool {
        let delay = backoff.next().unwrap_or(self.max_retry_delay);
        summary.retried += 1;
        metrics::counter!("dbps_outbox_relay_errors_total").increment(1);
        tracing::warn!(error = %ErrorChain(error), ?delay, "relay round failed; retrying");
        tokio::select! {
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(delay) => false,
        }
    }

    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(self.retry_delay)
            .with_max_delay(self.max_retry_delay)
            .without_max_times()
            .with_jitter()
            .build()
    }

    /// One membership: rounds until the shutdown token is cancelled (then leaves) or an
    /// error ends it (then drops the lease, which releases it).
    async fn session(
        &self,
        mut lease: S::Lease,
        shutdown: &CancellationToken,
        summary: &mut RelaySummary,
        backoff: &mut ExponentialBackoff,
    ) -> SessionEnd {
        match self.rounds(&mut lease, shutdown, summary, backoff).await {
            Ok(()) => {
                if let Err(error) = self.store.leave(lease).await {
                    // The lease's connection is gone either way; its locks or leases go
                    // with it or expire.
                    tracing::warn!(%error, "relay could not leave cleanly");
                }
                SessionEnd::Shutdown
            }
            Err(error) => SessionEnd::Failed(error),
        }
    }

    /// Rounds until the shutdown token is cancelled (`Ok`) or one fails.
    ///
    /// On a store that [overlaps rounds](OutboxStore::overlaps_rounds), a full batch is
    /// published while the next one is fetched (leaving out what is in flight) and while
    /// the previous one is marked: at most one batch on its way to Kafka, one fetched
    /// ahead and one being marked. Order per aggregate holds because a batch goes out only
    /// after every message of the one before it was acknowledged; when a batch is not
    /// acknowledged in full (a failure, a parked or held-back message), the batch fetched
    /// ahead is dropped unsent and its messages are read again.
    async fn rounds(
        &self,
        lease: &mut S::Lease,
        shutdown: &CancellationToken,
        summary: &mut RelaySummary,
        backoff: &mut ExponentialBackoff,
    ) -> Result<()> {
        let overlap = self.store.overlaps_rounds();
        let mut last_rebalance: Option<Instant> = None;
        // Acknowledged messages whose mark is still to be written: it overlaps the next
        // round or the wait for commits, and is done before a rebalance and before the
        // session ends.
        let mut unmarked: Vec<S::Id> = Vec::new();
        // A batch fetched while the previous one was on its way to Kafka.
        let mut ahead: Option<Vec<Pending<S::Id>>> = None;
        while !shutdown.is_cancelled() {
            if last_rebalance.is_none_or(|t| t.elapsed() >= self.rebalance_interval) {
                // A partition changes hands only when nothing of it is in flight.
                self.mark(&mut unmarked, summary).await?;
                ahead = None;
                self.store.rebalance(lease).await?;
                self.purge().await;
                self.report_backlog().await;
                last_rebalance = Some(Instant::now());
            }
            if !self.store.owns_any(lease) {
                let wait = self.rebalance_interval.min(self.poll_interval);
                self.wait(lease, shutdown, wait).await?;
                continue;
            }
            // The unit of work: fetch, publish, mark. Once fetched, a batch is finished
            // even if the shutdown token is cancelled meanwhile (a batch fetched ahead
            // was not sent yet, and is dropped).
            let batch = match ahead.take() {
                Some(batch) => batch,
                None => self.store.fetch_excluding(lease, self.batch_size, &unmarked).await?,
            };
            let drained = batch.len() < self.batch_size;
            if !batch.is_empty() {
                let fetch_ahead = overlap && !drained;
                let in_flight: Vec<S::Id> = if fetch_ahead {
                    batch
                        .iter()
                        .map(|p| p.id.clone())
                        .chain(unmarked.iter().cloned())
                        .collect()
                } else {
                    Vec::new()
                };
                let span = tracing::debug_span!("dbps.relay.batch", size = batch.len());
                let next = async {
                    if fetch_ahead {
                        self.store
                            .fetch_excluding(lease, self.batch_size, &in_flight)
                            .await
                            .map(Some)
                    } else {
                        Ok(None)
                    }
                };
                let (outcome, next, marked) = tokio::join!(
                    self.publish(&batch).instrument(span),
                    next,
                    self.mark(&mut unmarked, summary)
                );
                marked?;
                let outcome = outcome?;
                unmarked = outcome.acknowledged;
                summary.parked += outcome.parked;
                if !overlap || !outcome.complete || next.is_err() {
                    self.mark(&mut unmarked, summary).await?;
                }
                if let Some(error) = outcome.failed {
                    // The unacknowledged messages stay in the outbox and go out in a later
                    // round (transient), or wait for the cause to be fixed (permanent).
                    return Err(OutboxError::Publish(error));
                }
                // A round that went through ends a run of failures.
                *backoff = self.backoff();
                // Sent only after this batch was acknowledged in full; otherwise its
                // messages are read again behind what stayed in the outbox.
                ahead = if outcome.complete { next? } else { None };
            }
            if drained {
                // Nothing more is waiting: sleep until a commit is announced (one that
                // committed while this round ran has been announced already), but come
                // back for the next rebalance in time. The last mark is written meanwhile.
                let until_rebalance =
                    last_rebalance.map_or(Duration::ZERO, |t| self.rebalance_interval.saturating_sub(t.elapsed()));
                let (marked, woken) = tokio::join!(
                    self.mark(&mut unmarked, summary),
                    self.wait(lease, shutdown, self.poll_interval.min(until_rebalance))
                );
                marked?;
                woken?;
            }
        }
        self.mark(&mut unmarked, summary).await
    }

    /// Waits for a commit, or until the shutdown token is cancelled.
    async fn wait(&self, lease: &mut S::Lease, shutdown: &CancellationToken, timeout: Duration) -> Result<()> {
        tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            woken = self.store.wait_for_commit(lease, timeout) => woken.map(|_| ()),
        }
    }

    /// Marks acknowledged messages as published and counts them; `ids` is empty after.
    async fn mark(&self, ids: &mut Vec<S::Id>, summary: &mut RelaySummary) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.store.mark_published(ids).await?;
        let published = ids.len() as u64;
        summary.published += published;
        metrics::counter!("dbps_outbox_published_total").increment(published);
        ids.clear();
        Ok(())
    }

    /// Publishes one batch and parks what Kafka refused for what it is; the caller marks
    /// what was acknowledged.
    async fn publish(&self, batch: &[Pending<S::Id>]) -> Result<Published<S::Id>> {
        let started = Instant::now();
        let messages: Vec<(&str, &dbps_core::Envelope)> =
            batch.iter().map(|p| (p.topic.as_str(), &p.envelope)).collect();
        let results = self.publisher.publish_batch(messages).await;
        let mut outcome = Published {
            acknowledged: Vec::with_capacity(batch.len()),
            parked: 0,
            failed: None,
            complete: true,
        };
        for (pending, result) in batch.iter().zip(results) {
            match result {
                Ok(_) => {
                    outcome.acknowledged.push(pending.id.clone());
                    continue;
                }
                // Stays in the outbox: it goes out after the failed message of its aggregate
                // was parked (or is held with it, under `PoisonPolicy::HoldAggregate`).
                Err(dbps_core::Error::HeldBack { .. }) => {}
                Err(error) if error.is_transient() => {
                    if is_missing_topic(&error) {
                        tracing::error!(
                            topic = %pending.topic,
                            message_id = %pending.envelope.id,
                            "topic does not exist: the message waits until it is created (Relay::builder(..).create_topics, or ensure_topics)"
                        );
                    }
                    outcome.failed.get_or_insert(error);
                }
                // Refused credentials or authorisation: every message would fail the same
                // way, so none is parked and the relay stops.
                Err(error) if !is_message_fault(&error) => {
                    outcome.failed = Some(error);
                    outcome.complete = false;
                    break;
                }
                Err(error) => {
                    let reason = ErrorChain(&error).to_string();
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
                    outcome.parked += 1;
                }
            }
            outcome.complete = false;
        }
        metrics::histogram!("dbps_outbox_batch_seconds").record(started.elapsed().as_secs_f64());
        Ok(outcome)
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

/// Whether Kafka refused the message for what it is (too large, an invalid record or
/// topic name, a policy), so that parking it lets the others through; other permanent
/// refusals (credentials, authorisation, configuration) would hit every message.
fn is_message_fault(error: &dbps_core::Error) -> bool {
    match error {
        dbps_core::Error::Kafka { source, .. } => dbps_core::classify::is_message_fault(source),
        // Refused authorisation or authentication: about who sends, not what.
        dbps_core::Error::Refused { .. } => false,
        // Refused before it reached Kafka (an invalid topic name, say): about the message.
        _ => true,
    }
}

fn is_missing_topic(error: &dbps_core::Error) -> bool {
    matches!(error, dbps_core::Error::Kafka { source, .. } if dbps_core::classify::is_missing_topic(source))
}
