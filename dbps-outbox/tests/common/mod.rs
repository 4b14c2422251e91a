//! Helpers shared by the outbox's integration tests: relays started in the background,
//! and an independent reader of what reached Kafka.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dbps_core::CancellationToken;
use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_outbox::{Backlog, OutboxError, OutboxStore, Pending, Relay, RelaySummary, Retention};
use dbps_testkit::{TestKafka, TopicReader};
use rdkafka::message::OwnedMessage;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub const DEADLINE: Duration = Duration::from_secs(90);

pub fn publisher(brokers: &str) -> Result<KafkaPublisher, dbps_core::Error> {
    KafkaPublisher::builder(KafkaConfig::new(brokers)).build()
}

/// Starts `relay` in the background; cancel the token to stop it gracefully.
pub fn start_relay<S: OutboxStore>(
    relay: Relay<S>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<RelaySummary, OutboxError>>,
) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    (stop, task)
}

pub fn fast<S: OutboxStore>(store: S, brokers: &str) -> Result<Relay<S>, Box<dyn std::error::Error + Send + Sync>> {
    fast_in_batches(store, brokers, 500)
}

/// [`fast`] with another batch size (a small one makes the relay overlap many rounds).
pub fn fast_in_batches<S: OutboxStore>(
    store: S,
    brokers: &str,
    batch_size: usize,
) -> Result<Relay<S>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(Relay::builder(store, publisher(brokers)?)
        .batch_size(batch_size)
        .rebalance_interval(Duration::from_millis(200))
        .retry_delay(Duration::from_millis(50))
        .build()?)
}

/// Runs `relay` until `count` records reached `topic`, stops it, and returns its summary
/// and every record it published (duplicates included).
pub async fn drain<S: OutboxStore>(
    relay: Relay<S>,
    kafka: &TestKafka,
    topic: &str,
    count: usize,
) -> Result<(RelaySummary, Vec<OwnedMessage>), Box<dyn std::error::Error + Send + Sync>> {
    let (stop, task) = start_relay(relay);
    let reader = read(kafka, topic, count).await?;
    stop.cancel();
    let summary = task.await??;
    Ok((summary, reader.finish().await?))
}

/// A reader of `topic` once `count` records have reached it. Stop the relays, then
/// [`TopicReader::finish`] reads everything else they published: duplicates show up
/// without waiting for a quiet period.
pub async fn read(kafka: &TestKafka, topic: &str, count: usize) -> Result<TopicReader, dbps_testkit::Error> {
    let mut reader = kafka.reader(topic)?;
    reader.wait_for(count).await?;
    Ok(reader)
}

pub use dbps_testkit::header;

/// (aggregate id, sequence, message id) of each record, in topic order per partition.
pub fn summarise(records: &[OwnedMessage]) -> Vec<(String, i64, String)> {
    records
        .iter()
        .map(|r| {
            (
                header(r, "ce_subject").unwrap_or_default().to_owned(),
                header(r, "ce_sequence").and_then(|s| s.parse().ok()).unwrap_or(-1),
                header(r, "ce_id").unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Every aggregate's sequence numbers arrive as 1, 2, 3, ... (duplicates allowed only as
/// repeats of what came before).
pub fn assert_in_order(records: &[(String, i64, String)]) {
    let mut highest: BTreeMap<&str, i64> = BTreeMap::new();
    for (aggregate, sequence, _) in records {
        let top = highest.entry(aggregate).or_insert(0);
        assert!(
            *sequence <= *top + 1,
            "{aggregate}: sequence {sequence} after {top}: a gap"
        );
        if *sequence == *top + 1 {
            *top = *sequence;
        }
    }
}

/// What a [`TestStore`] saw: the partitions its relay held, and each message it fetched.
#[derive(Default)]
pub struct Seen {
    /// The partitions held after the last join or rebalance.
    pub partitions: Vec<i32>,
    /// Each fetched message: its id, its partition, and the partitions held at the fetch.
    pub fetched: Vec<(String, i32, Vec<i32>)>,
    /// Fetches that left out messages in flight (the relay fetched ahead).
    pub fetched_ahead: usize,
}

/// What a [`TestStore`] does besides delegating.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only records.
    Record,
    /// "Crashes" instead of marking: the relay stops right after the broker's
    /// acknowledgement, and fetches nothing more.
    CrashBeforeMark,
    /// Holds each mark until [`TestStore::release_marks`].
    HoldMarks,
    /// Panics on the first fetch.
    PanicOnFetch,
}

/// Delegates to a real store, recording what its relay held and fetched (see [`Seen`]),
/// and misbehaves on demand (see the constructors).
#[derive(Clone)]
pub struct TestStore<S> {
    pub inner: S,
    mode: Mode,
    crashed: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Seen>>,
    changed: Arc<tokio::sync::Notify>,
    marks: Arc<tokio::sync::Semaphore>,
}

impl<S: OutboxStore> TestStore<S> {
    pub fn recording(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Record,
            crashed: Arc::new(AtomicBool::new(false)),
            seen: Arc::default(),
            changed: Arc::default(),
            marks: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }

    /// "Crashes" instead of marking: the relay stops right after the broker's
    /// acknowledgement, and fetches nothing more.
    pub fn crash_before_mark(inner: S) -> Self {
        Self {
            mode: Mode::CrashBeforeMark,
            ..Self::recording(inner)
        }
    }

    /// Holds every mark until [`TestStore::release_marks`]; [`TestStore::marking`] waits
    /// until one is held.
    pub fn hold_marks(inner: S) -> Self {
        Self {
            mode: Mode::HoldMarks,
            ..Self::recording(inner)
        }
    }

    /// Panics on the first fetch.
    pub fn panic_on_fetch(inner: S) -> Self {
        Self {
            mode: Mode::PanicOnFetch,
            ..Self::recording(inner)
        }
    }

    /// Waits until a mark is held (the batch is published, not yet marked).
    pub async fn marking(&self) -> Result<(), String> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.crashed() {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .map_err(|_| String::from("the relay never marked a batch"))
    }

    /// Lets the held marks (and all later ones) through.
    pub fn release_marks(&self) {
        self.marks.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }

    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// What the relay held and fetched so far.
    pub fn seen<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.seen.lock().expect("seen"))
    }

    /// Waits (up to [`DEADLINE`]) until the relay holds `count` partitions.
    pub async fn holding(&self, count: usize) -> Result<(), String> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.seen(|s| s.partitions.len()) == count {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait).await.map_err(|_| {
            format!(
                "the relay never held {count} partitions: {:?}",
                self.seen(|s| s.partitions.clone())
            )
        })
    }

    fn note_partitions(&self, lease: &S::Lease) {
        self.seen.lock().expect("seen").partitions = self.inner.partitions(lease);
        self.changed.notify_waiters();
    }
}

impl<S: OutboxStore> OutboxStore for TestStore<S> {
    type Lease = S::Lease;
    type Id = S::Id;

    fn retention_policy(&self) -> Retention {
        self.inner.retention_policy()
    }
    async fn join(&self) -> dbps_outbox::Result<Self::Lease> {
        let lease = self.inner.join().await?;
        self.note_partitions(&lease);
        Ok(lease)
    }
    async fn rebalance(&self, lease: &mut Self::Lease) -> dbps_outbox::Result<()> {
        self.inner.rebalance(lease).await?;
        self.note_partitions(lease);
        Ok(())
    }
    fn owns_any(&self, lease: &Self::Lease) -> bool {
        self.inner.owns_any(lease)
    }
    fn partitions(&self, lease: &Self::Lease) -> Vec<i32> {
        self.inner.partitions(lease)
    }
    async fn fetch(&self, lease: &mut Self::Lease, limit: usize) -> dbps_outbox::Result<Vec<Pending<S::Id>>> {
        self.fetch_excluding(lease, limit, &[]).await
    }
    fn overlaps_rounds(&self) -> bool {
        self.inner.overlaps_rounds()
    }
    async fn fetch_excluding(
        &self,
        lease: &mut Self::Lease,
        limit: usize,
        in_flight: &[S::Id],
    ) -> dbps_outbox::Result<Vec<Pending<S::Id>>> {
        assert!(self.mode != Mode::PanicOnFetch, "a store that panics on fetch");
        if self.mode == Mode::CrashBeforeMark && self.crashed() {
            return Ok(Vec::new());
        }
        let batch = self.inner.fetch_excluding(lease, limit, in_flight).await?;
        let held = self.inner.partitions(lease);
        let mut seen = self.seen.lock().expect("seen");
        seen.fetched
            .extend(batch.iter().map(|p| (p.envelope.id.clone(), p.partition, held.clone())));
        seen.fetched_ahead += usize::from(!in_flight.is_empty());
        drop(seen);
        Ok(batch)
    }
    async fn mark_published(&self, ids: &[S::Id]) -> dbps_outbox::Result<()> {
        match self.mode {
            Mode::CrashBeforeMark => {
                self.crashed.store(true, Ordering::SeqCst);
                self.changed.notify_waiters();
                std::future::pending().await
            }
            Mode::HoldMarks => {
                self.crashed.store(true, Ordering::SeqCst);
                self.changed.notify_waiters();
                let _permit = self.marks.acquire().await.expect("the semaphore is never closed");
                self.inner.mark_published(ids).await
            }
            Mode::Record | Mode::PanicOnFetch => self.inner.mark_published(ids).await,
        }
    }
    async fn park(&self, id: &S::Id, reason: &str) -> dbps_outbox::Result<()> {
        self.inner.park(id, reason).await
    }
    async fn wait_for_commit(&self, lease: &mut Self::Lease, timeout: Duration) -> dbps_outbox::Result<bool> {
        self.inner.wait_for_commit(lease, timeout).await
    }
    async fn purge_published(&self, older_than: Duration) -> dbps_outbox::Result<u64> {
        self.inner.purge_published(older_than).await
    }
    async fn backlog(&self) -> dbps_outbox::Result<Backlog> {
        self.inner.backlog().await
    }
    async fn leave(&self, lease: Self::Lease) -> dbps_outbox::Result<()> {
        self.inner.leave(lease).await
    }
}

/// Asserts that every message each relay fetched belonged to a partition it held at the
/// time, and that no message was fetched by both.
pub fn assert_fetched_only_held_partitions<S: OutboxStore>(relays: &[&TestStore<S>]) {
    let mut by_relay = Vec::new();
    for (n, relay) in relays.iter().enumerate() {
        let ids: std::collections::BTreeSet<String> = relay.seen(|seen| {
            for (id, partition, held) in &seen.fetched {
                assert!(
                    held.contains(partition),
                    "relay {n} fetched {id} of partition {partition} while holding {held:?}"
                );
            }
            seen.fetched.iter().map(|(id, _, _)| id.clone()).collect()
        });
        by_relay.push(ids);
    }
    for (a, ids_a) in by_relay.iter().enumerate() {
        for ids_b in &by_relay[a + 1..] {
            assert!(ids_a.is_disjoint(ids_b), "a message was fetched by two relays");
        }
    }
}
