//! Helpers shared by the outbox's integration tests: relays started in the background,
//! and an independent reader of what reached Kafka.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_outbox::{Backlog, OutboxError, OutboxStore, Pending, Relay, RelaySummary, Retention};
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use tokio::sync::oneshot;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub const DEADLINE: Duration = Duration::from_secs(90);

pub fn publisher(brokers: &str) -> Result<KafkaPublisher, dbps_core::Error> {
    KafkaPublisher::builder(KafkaConfig::new(brokers)).build()
}

pub fn start_relay<S: OutboxStore>(
    relay: Relay<S>,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<RelaySummary, OutboxError>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

pub fn fast<S: OutboxStore>(store: S, brokers: &str) -> Result<Relay<S>, dbps_core::Error> {
    Ok(Relay::builder(store, publisher(brokers)?)
        .rebalance_interval(Duration::from_millis(200))
        .retry_delay(Duration::from_millis(50))
        .build())
}

/// Reads records until `count` arrived, then keeps reading for `settle` to catch extras.
pub async fn read(
    brokers: &str,
    topic: &str,
    count: usize,
    settle: Duration,
) -> Result<Vec<OwnedMessage>, Box<dyn std::error::Error + Send + Sync>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("check-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut stream = consumer.stream();
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while records.len() < count {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| format!("only {} of {count} records arrived", records.len()))?;
        records.push(next.ok_or("stream ended")??.detach());
    }
    while let Ok(Some(next)) = tokio::time::timeout(settle, stream.next()).await {
        records.push(next?.detach());
    }
    Ok(records)
}

pub fn header<'a>(record: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    record
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

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

/// Delegates to a real store but "crashes" instead of marking: the relay stops right
/// after the broker's acknowledgement, and fetches nothing more.
#[derive(Clone)]
pub struct CrashBeforeMark<S> {
    pub inner: S,
    pub crashed: Arc<AtomicBool>,
}

impl<S: OutboxStore> CrashBeforeMark<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            crashed: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }
}

impl<S: OutboxStore> OutboxStore for CrashBeforeMark<S> {
    type Lease = S::Lease;
    type Id = S::Id;

    fn retention_policy(&self) -> Retention {
        self.inner.retention_policy()
    }
    async fn join(&self) -> dbps_outbox::Result<Self::Lease> {
        self.inner.join().await
    }
    async fn rebalance(&self, lease: &mut Self::Lease) -> dbps_outbox::Result<()> {
        self.inner.rebalance(lease).await
    }
    fn owns_any(&self, lease: &Self::Lease) -> bool {
        self.inner.owns_any(lease)
    }
    async fn fetch(&self, lease: &mut Self::Lease, limit: usize) -> dbps_outbox::Result<Vec<Pending<S::Id>>> {
        if self.crashed() {
            return Ok(Vec::new());
        }
        self.inner.fetch(lease, limit).await
    }
    async fn mark_published(&self, _ids: &[S::Id]) -> dbps_outbox::Result<()> {
        self.crashed.store(true, Ordering::SeqCst);
        std::future::pending().await
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
