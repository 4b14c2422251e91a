//! Delivery and checks shared by the projection tests (PostgreSQL and OpenSearch).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use dbps_cache::projection::RebuildProgress;
use dbps_core::Envelope;
use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use rand::seq::SliceRandom as _;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Publishes `events` to `topic`, in order.
pub async fn publish(kafka: &dbps_testkit::TestKafka, topic: &str, events: &[Envelope]) -> Result<(), Error> {
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
    for result in publisher.publish_batch(events.iter().map(|e| (topic, e))).await {
        result?;
    }
    Ok(())
}

/// Every event at least once, a third twice, and a tenth re-published under a new message
/// id, all in random order.
pub fn scrambled(events: &[Envelope]) -> Vec<Envelope> {
    let mut delivered = events.to_vec();
    delivered.extend(events.iter().step_by(3).cloned());
    delivered.extend(events.iter().step_by(10).map(|e| {
        let mut again = e.clone();
        again.id = uuid::Uuid::now_v7().to_string();
        again
    }));
    delivered.shuffle(&mut rand::rng());
    delivered
}

/// What a reader polling a projection (its view or alias) through a rebuild saw.
#[derive(Debug, Default)]
pub struct Watch {
    pub reads: u64,
    pub count_drops: u64,
    pub regressions: u64,
    /// Whether it read anything only version 2 has.
    pub saw_v2: bool,
    last_count: u64,
    seen: BTreeMap<String, i64>,
}

impl Watch {
    /// One read, which found `count` records.
    pub fn read(&mut self, count: u64) {
        self.reads += 1;
        if count < self.last_count {
            self.count_drops += 1;
        }
        self.last_count = count;
    }

    /// The record `id` read at `version`.
    pub fn version(&mut self, id: String, version: i64) {
        let last = self.seen.entry(id).or_default();
        if version < *last {
            self.regressions += 1;
        }
        *last = version;
    }
}

/// The progress a rebuild reported, in order.
#[derive(Debug, Clone, Default)]
pub struct ProgressLog(Arc<Mutex<Vec<RebuildProgress>>>);

impl ProgressLog {
    /// A report for `on_progress` that records into this log.
    pub fn recorder(&self) -> impl Fn(RebuildProgress) + Send + Sync + 'static {
        let log = Arc::clone(&self.0);
        move |p| log.lock().expect("progress").push(p)
    }

    /// What was reported so far.
    pub fn reported(&self) -> Vec<RebuildProgress> {
        self.0.lock().expect("progress").clone()
    }
}

/// Checks a rebuild's handover: v2 holds everything v1 had applied when it stopped (no
/// gap), and the progress was reported, grew, and ended complete over at least
/// `min_total` records.
pub fn assert_handover(
    v1_at: &BTreeMap<(String, i32), i64>,
    v2_at: &BTreeMap<(String, i32), i64>,
    progress: &ProgressLog,
    min_total: u64,
) {
    for (partition, offset) in v1_at {
        assert!(v2_at.get(partition).is_some_and(|o| o >= offset), "{v1_at:?} {v2_at:?}");
    }
    let progress = progress.reported();
    assert!(progress.len() > 1, "{progress:?}");
    assert!(
        progress.windows(2).all(|w| w[0].replayed <= w[1].replayed),
        "{progress:?}"
    );
    let last = progress.last().expect("progress");
    assert!(last.total >= min_total && last.fraction() == 1.0, "{last:?}");
}
