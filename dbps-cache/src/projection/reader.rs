//! What every projection target shares: reading the topics by assignment from
//! checkpoints, the positions a batch moves on, the metrics of applied batches and of a
//! rebuild's progress, and retrying transient failures.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, decode_record};
use dbps_core::{CancellationToken, Envelope, HandlerError, MessageSet, Registry};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{RebuildProgress, RebuildReport, RunSummary};
use crate::error::{CacheError, Result};
use crate::replica::{Decoder, Projected, record_lag_as};

/// The librdkafka properties of a [`KafkaConfig`] that the projection's reader takes
/// over (connection and security; the reader sets its own consumer properties).
const PASSED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
];

/// How long a projection that receives nothing waits before it checks whether a newer
/// version serves.
pub(crate) const IDLE_CHECK: Duration = Duration::from_secs(1);

/// How long a transient failure waits before the batch is tried again.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The callback of `on_progress`.
pub(crate) type ProgressFn = Arc<dyn Fn(RebuildProgress) + Send + Sync>;

/// A topic partition.
pub(crate) type Partition = (String, i32);

/// Per topic partition, the offset of the next record to apply.
pub(crate) type Positions = BTreeMap<Partition, i64>;

/// The settings every projection's builder has.
pub(crate) struct Common {
    pub(crate) max_batch: usize,
    pub(crate) registry: Registry,
    pub(crate) on_progress: Option<ProgressFn>,
    pub(crate) group_prefix: String,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            max_batch: 512,
            registry: Registry::new(),
            on_progress: None,
            group_prefix: String::from("dbps-projection-"),
        }
    }
}

impl Common {
    /// Checks the settings and a declaration's version and topics.
    pub(crate) fn check(&self, version: u32, topics: &[String]) -> Result<()> {
        let invalid = |setting, reason: String| CacheError::InvalidConfig { setting, reason };
        if version == 0 || i32::try_from(version).is_err() {
            return Err(invalid(
                "projection version",
                format!("{version} is not between 1 and {}", i32::MAX),
            ));
        }
        if topics.is_empty() || topics.iter().any(String::is_empty) {
            return Err(invalid(
                "projection topics",
                String::from("a projection reads at least one topic, and topics have names"),
            ));
        }
        if self.max_batch == 0 {
            return Err(invalid("max_batch", String::from("must be at least 1")));
        }
        Ok(())
    }
}

/// What every projection's runner keeps: its label, topics and settings.
pub(crate) struct Runner {
    /// `<name>_v<version>`: the metrics' label.
    pub(crate) label: String,
    pub(crate) version: u32,
    pub(crate) topics: Vec<String>,
    pub(crate) max_batch: usize,
    decoder: Decoder,
    on_progress: Option<ProgressFn>,
    group_prefix: String,
}

impl Runner {
    /// The runner of version `version` of projection `name`, with checked settings.
    pub(crate) fn new(common: Common, name: &str, version: u32, topics: Vec<String>) -> Self {
        Self {
            label: format!("{name}_v{version}"),
            version,
            topics,
            max_batch: common.max_batch,
            decoder: Decoder::new(common.registry),
            on_progress: common.on_progress,
            group_prefix: common.group_prefix,
        }
    }

    /// Decodes `envelope` into `E` and makes it a change with `project`; `Ok(None)` for a
    /// type outside `E` (counted as ignored).
    pub(crate) fn project<E: MessageSet, C>(
        &self,
        envelope: &Envelope,
        project: impl FnOnce(E, &Envelope) -> Result<C, HandlerError>,
    ) -> Result<Option<Projected<C>>> {
        self.decoder
            .project_with::<E, C>(
                "dbps_projection_ignored_total",
                ("projection", &self.label),
                envelope,
                project,
            )
            .map_err(|source| CacheError::Projection {
                projection: self.label.clone(),
                source,
            })
    }

    /// A reader of the topics from `checkpoints` (see [`Reader::start`]).
    pub(crate) async fn reader(&self, kafka: &KafkaConfig, checkpoints: Positions) -> Result<Started> {
        let group = format!("{}{}-{:016x}", self.group_prefix, self.label, rand::random::<u64>());
        Reader::start(kafka, &group, &self.topics, checkpoints).await
    }

    /// Reports a rebuild's progress: the gauge `dbps_projection_rebuild_progress` and the
    /// builder's `on_progress`.
    pub(crate) fn report_progress(&self, replayed: u64, total: u64) {
        let progress = RebuildProgress {
            version: self.version,
            replayed,
            total,
        };
        metrics::gauge!("dbps_projection_rebuild_progress", "projection" => self.label.clone())
            .set(progress.fraction());
        if let Some(report) = &self.on_progress {
            report(progress);
        }
    }

    /// The report of a rebuild of this version while `previous` serves, and whether
    /// there is anything to do (not when this version or a newer one serves).
    pub(crate) fn rebuild_report(&self, previous: Option<u32>) -> (RebuildReport, bool) {
        let report = RebuildReport {
            version: self.version,
            previous,
            replayed: 0,
            switched: false,
        };
        (report, previous.is_none_or(|serving| serving < self.version))
    }
}

/// The builder methods of [`Common`]'s settings (the builder has a field `common`);
/// `$unit` says what one batch is applied in.
macro_rules! common_builder_methods {
    ($unit:literal) => {
        #[doc = concat!("The most records applied in one ", $unit, " (default 512).")]
        pub fn max_batch(mut self, max: usize) -> Self {
            self.common.max_batch = max;
            self
        }

        /// The registry that decodes (and upcasts) the events.
        pub fn registry(mut self, registry: dbps_core::Registry) -> Self {
            self.common.registry = registry;
            self
        }

        /// The prefix of the consumer group each reader of the projection uses (default
        /// `dbps-projection-`; the group is `<prefix><name>_v<version>-<random>`). The
        /// reader never commits, but Kafka asks for a group; under ACLs give the
        /// service's own group prefix (`customer.projection-`), which it may use.
        pub fn group_prefix(mut self, prefix: impl Into<String>) -> Self {
            self.common.group_prefix = prefix.into();
            self
        }

        /// Called after every batch a rebuild replays (and once more at the switch).
        pub fn on_progress(mut self, report: impl Fn(super::RebuildProgress) + Send + Sync + 'static) -> Self {
            self.common.on_progress = Some(std::sync::Arc::new(report));
            self
        }
    };
}
pub(crate) use common_builder_methods;

/// The start of a projection's run, given the version that serves: `Ok(None)` when this
/// version serves (from the start, or after `rebuild` switched to it) and goes on live,
/// else the summary to stop with. `serving_after` is asked when the rebuild did not switch.
pub(crate) async fn rebuild_unless_serving(
    version: u32,
    serving: Option<u32>,
    shutdown: &CancellationToken,
    rebuild: impl Future<Output = Result<RebuildReport>>,
    serving_after: impl Future<Output = Result<Option<u32>>>,
) -> Result<(RunSummary, bool)> {
    let mut summary = RunSummary {
        records: 0,
        superseded_by: None,
    };
    match serving {
        Some(serving) if serving > version => {
            summary.superseded_by = Some(serving);
            return Ok((summary, false));
        }
        Some(serving) if serving == version => {}
        _ => {
            let report = rebuild.await?;
            summary.records += report.replayed;
            // Not switched: stopped, or another instance switched (to this version, which
            // then goes on live here too, or to a newer one).
            if !report.switched {
                match serving_after.await? {
                    Some(serving) if serving == version && !shutdown.is_cancelled() => {}
                    serving => {
                        summary.superseded_by = serving.filter(|s| *s > version);
                        return Ok((summary, false));
                    }
                }
            }
        }
    }
    Ok((summary, true))
}

/// One record read from a topic: its position and, when it could be decoded, its
/// envelope. An undecodable record still moves the checkpoint on.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) partition: Partition,
    pub(crate) offset: i64,
    pub(crate) envelope: Option<Envelope>,
}

/// What a batch did, for the metrics recorded once it is stored.
#[derive(Debug, Default)]
pub(crate) struct BatchEffect {
    pub(crate) advanced: usize,
    pub(crate) stale: usize,
    pub(crate) source_times: Vec<chrono::DateTime<chrono::Utc>>,
}

impl BatchEffect {
    /// Adds the batch to the projection's metrics (labelled `projection = label`).
    pub(crate) fn record(&self, label: &str) {
        let labels = [("projection", label.to_owned())];
        metrics::counter!("dbps_projection_applied_total", &labels).increment(self.advanced as u64);
        metrics::counter!("dbps_projection_stale_total", &labels).increment(self.stale as u64);
        record_lag_as("dbps_projection_lag_seconds", ("projection", label), &self.source_times);
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `shutdown` is cancelled, waiting
/// between transient failures.
pub(crate) async fn retrying<T, F, Fut>(label: &str, shutdown: &CancellationToken, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    loop {
        match attempt().await {
            Err(error) if error.is_transient() && !shutdown.is_cancelled() => {
                tracing::warn!(projection = %label, %error, "a step of the projection failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Err(error),
                    () = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
            result => return result,
        }
    }
}

/// Whether some partition's position is before its target.
pub(crate) fn behind(positions: &Positions, targets: &Positions) -> bool {
    targets
        .iter()
        .any(|(partition, target)| positions.get(partition).copied().unwrap_or(0) < *target)
}

/// Moves the positions past the records of a batch.
pub(crate) fn advance(positions: &mut Positions, batch: &[Record]) {
    for record in batch {
        let position = positions.entry(record.partition.clone()).or_insert(0);
        *position = (*position).max(record.offset + 1);
    }
}

/// A reader placed at its starting positions.
pub(crate) struct Started {
    pub(crate) reader: Reader,
    /// The low and high watermarks of every partition read.
    pub(crate) watermarks: BTreeMap<Partition, (i64, i64)>,
    /// Where the reader starts: the checkpoints, else each partition's low watermark.
    pub(crate) positions: Positions,
}

impl Started {
    /// The records between the positions and the high watermarks at the start.
    pub(crate) fn ends(&self) -> (Positions, u64) {
        let ends: Positions = self
            .watermarks
            .iter()
            .map(|(p, (_, high))| (p.clone(), *high))
            .collect();
        let total = ends
            .iter()
            .map(|(p, end)| u64::try_from(end - self.positions.get(p).copied().unwrap_or(0)).unwrap_or(0))
            .sum();
        (ends, total)
    }
}

/// Reads a projection's topics from given offsets, with partitions assigned (no consumer
/// group coordination, nothing committed to Kafka).
pub(crate) struct Reader {
    consumer: Arc<StreamConsumer>,
}

impl Reader {
    /// Opens a reader of `topics` and assigns it the partitions from `checkpoints` (each
    /// partition without one from its low watermark).
    pub(crate) async fn start(
        kafka: &KafkaConfig,
        group: &str,
        topics: &[String],
        checkpoints: Positions,
    ) -> Result<Started> {
        let reader = Self::open(kafka, group)?;
        let watermarks = reader.watermarks(topics).await?;
        let mut positions = checkpoints;
        for (partition, (low, _)) in &watermarks {
            positions.entry(partition.clone()).or_insert(*low);
        }
        reader.assign(&positions)?;
        Ok(Started {
            reader,
            watermarks,
            positions,
        })
    }

    fn open(kafka: &KafkaConfig, group: &str) -> Result<Self> {
        let mut config = ClientConfig::new();
        for key in PASSED_PROPERTIES {
            if let Some(value) = kafka.get(key) {
                config.set(*key, value);
            }
        }
        // A group of its own that never commits: the checkpoints are in the store.
        let consumer: StreamConsumer = config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(kafka_error("create the reader"))?;
        Ok(Self {
            consumer: Arc::new(consumer),
        })
    }

    /// The low and high watermarks of every partition of `topics`; an error (transient,
    /// like every Kafka error here) while a topic has no partitions yet.
    async fn watermarks(&self, topics: &[String]) -> Result<BTreeMap<Partition, (i64, i64)>> {
        let consumer = Arc::clone(&self.consumer);
        let topics = topics.to_vec();
        let read = tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let mut found = BTreeMap::new();
            for topic in &topics {
                let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
                let partitions: Vec<_> = metadata.topics().iter().flat_map(|t| t.partitions()).collect();
                if partitions.is_empty() {
                    // Not created yet: the caller tries again later.
                    return Err(rdkafka::error::KafkaError::MetadataFetch(
                        rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                    ));
                }
                for partition in partitions {
                    let marks = consumer.fetch_watermarks(topic, partition.id(), timeout)?;
                    found.insert((topic.clone(), partition.id()), marks);
                }
            }
            Ok::<_, rdkafka::error::KafkaError>(found)
        })
        .await;
        match read {
            Ok(found) => found.map_err(kafka_error("read watermarks")),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    fn assign(&self, positions: &Positions) -> Result<()> {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in positions {
            list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(kafka_error("assign partitions"))?;
        }
        self.consumer.assign(&list).map_err(kafka_error("assign partitions"))
    }

    /// The next records (at most `max`), `None` once `shutdown` is cancelled. Waits for
    /// the first record, or with `idle` that long at most (then the batch is empty).
    pub(crate) async fn next_batch(
        &self,
        max: usize,
        shutdown: &CancellationToken,
        idle: Option<Duration>,
    ) -> Result<Option<Vec<Record>>> {
        let idle = async {
            match idle {
                Some(idle) => tokio::time::sleep(idle).await,
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = idle => return Ok(Some(Vec::new())),
            message = self.consumer.recv() => message.map_err(kafka_error("read a record"))?.detach(),
        };
        let mut batch = vec![record(&first)];
        while batch.len() < max {
            match tokio::time::timeout(Duration::from_millis(5), self.consumer.recv()).await {
                Ok(message) => batch.push(record(&message.map_err(kafka_error("read a record"))?.detach())),
                Err(_) => break,
            }
        }
        Ok(Some(batch))
    }
}

fn record(message: &rdkafka::message::OwnedMessage) -> Record {
    let envelope = match decode_record(message) {
        Ok(envelope) => Some(envelope),
        Err(error) => {
            tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), %error, "skipping an undecodable record");
            None
        }
    };
    Record {
        partition: (message.topic().to_owned(), message.partition()),
        offset: message.offset(),
        envelope,
    }
}

fn kafka_error(operation: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> CacheError {
    move |source| CacheError::Kafka { operation, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            partition: (topic.to_owned(), partition),
            offset,
            envelope: None,
        }
    }

    #[test]
    fn positions_advance_past_each_partitions_newest_record() {
        let mut positions = BTreeMap::from([((String::from("a"), 0), 3)]);
        advance(&mut positions, &[at("a", 0, 5), at("a", 0, 4), at("a", 1, 0)]);
        assert_eq!(positions[&(String::from("a"), 0)], 6);
        assert_eq!(positions[&(String::from("a"), 1)], 1);
        let targets = BTreeMap::from([((String::from("a"), 0), 6), ((String::from("a"), 1), 2)]);
        assert!(behind(&positions, &targets));
        advance(&mut positions, &[at("a", 1, 1)]);
        assert!(!behind(&positions, &targets));
        assert!(behind(&positions, &BTreeMap::from([((String::from("b"), 0), 1)])));
    }

    #[test]
    fn progress_is_a_fraction() {
        let p = |replayed, total| RebuildProgress {
            version: 2,
            replayed,
            total,
        };
        assert_eq!(p(0, 0).fraction(), 1.0);
        assert_eq!(p(5, 10).fraction(), 0.5);
        assert_eq!(p(12, 10).fraction(), 1.0);
    }
}
