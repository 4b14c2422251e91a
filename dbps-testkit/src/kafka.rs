use std::collections::BTreeMap;
use std::time::Duration;

use dbps_core::classify::Classify as _;
use dbps_core::kafka::TopicNaming;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;

use crate::error::{Error, Result};
use crate::server::{self, Backend};
use crate::wait::{DEADLINE, wait_for};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Kafka bootstrap servers and a topic-name prefix unique to one test. Every topic whose
/// name starts with the prefix — created through this handle, by a relay or a consumer
/// runner (their dead-letter topics included), or by the test itself — is deleted when
/// the handle is dropped.
pub struct TestKafka {
    brokers: &'static str,
    prefix: String,
    admin: AdminClient<DefaultClientContext>,
}

impl std::fmt::Debug for TestKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKafka")
            .field("brokers", &self.brokers)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Connects an admin client to the shared Kafka broker with a fresh topic prefix.
pub async fn kafka() -> Result<TestKafka> {
    let brokers = server::address(Backend::Kafka).await?;
    let admin = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(kafka_error("(admin)"))?;
    Ok(TestKafka {
        brokers,
        prefix: format!("dbps-t-{}-", crate::unique_suffix()),
        admin,
    })
}

fn kafka_error(topic: &str) -> impl FnOnce(KafkaError) -> Error {
    let topic = topic.to_owned();
    move |source| Error::Kafka { topic, source }
}

impl TestKafka {
    /// The bootstrap servers, for `bootstrap.servers`.
    pub fn brokers(&self) -> &str {
        self.brokers
    }

    /// This test's topic-name prefix (for a service's `DBPS_TOPIC_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` inside this test's namespace, without creating the topic.
    pub fn topic_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A consumer group id unique to this test.
    pub fn group_id(&self, name: &str) -> String {
        format!("{}group-{name}", self.prefix)
    }

    /// The default topic naming inside this test's namespace: events, commands, replies
    /// and dead-letter topics all get the prefix, so a service under test uses its real
    /// naming and still shares nothing with other tests.
    pub fn naming(&self) -> TopicNaming {
        TopicNaming::new().with_prefix(&self.prefix)
    }

    /// Creates the topic `name` (inside this test's namespace) with `partitions`
    /// partitions and returns its full name.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<String> {
        let topic = self.topic_name(name);
        self.create_topics(&[(&topic, partitions)]).await?;
        Ok(topic)
    }

    /// Creates topics by their full names (which must carry this test's prefix, as
    /// [`TestKafka::naming`] gives them).
    pub async fn create_topics(&self, topics: &[(&str, i32)]) -> Result<()> {
        for (topic, _) in topics {
            if !topic.starts_with(&self.prefix) {
                return Err(Error::Kafka {
                    topic: (*topic).to_owned(),
                    source: KafkaError::AdminOpCreation(format!(
                        "{topic} is outside this test's namespace {}",
                        self.prefix
                    )),
                });
            }
        }
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(topic, partitions)| NewTopic::new(topic, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics(&new, &options)
            .await
            .map_err(kafka_error(topics.first().map_or("", |t| t.0)))?;
        for result in results {
            result.map_err(|(topic, code)| kafka_error(&topic)(KafkaError::AdminOp(code)))?;
        }
        for (topic, partitions) in topics {
            self.wait_until_visible(topic, *partitions).await?;
        }
        Ok(())
    }

    /// Waits until the broker's metadata shows `topic` with `partitions` partitions, each
    /// with a leader. The controller acknowledges a creation before every broker's
    /// metadata has it, and a consumer that subscribes to a topic its metadata does not
    /// show yet does not join its group until its next full metadata refresh (minutes).
    async fn wait_until_visible(&self, topic: &str, partitions: i32) -> Result<()> {
        let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
        loop {
            let client: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", self.brokers)
                .create()
                .map_err(kafka_error(topic))?;
            let name = topic.to_owned();
            let visible = blocking(topic, move || {
                let metadata = client.fetch_metadata(Some(&name), Duration::from_secs(5))?;
                Ok(metadata.topics().iter().any(|t| {
                    t.error().is_none()
                        && i32::try_from(t.partitions().len()).is_ok_and(|n| n == partitions)
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                }))
            })
            .await?;
            if visible {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(kafka_error(topic)(KafkaError::AdminOpCreation(format!(
                    "{topic} was created but its metadata did not show its {partitions} partitions within {} s",
                    ADMIN_TIMEOUT.as_secs()
                ))));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A reader of `topic` from its beginning, with a group of its own that commits
    /// nothing: it sees what reached the topic, independently of the code under test.
    pub fn reader(&self, topic: &str) -> Result<TopicReader> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers)
            .set("group.id", self.group_id(&format!("reader-{}", crate::unique_suffix())))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka_error(topic))?;
        consumer.subscribe(&[topic]).map_err(kafka_error(topic))?;
        Ok(TopicReader {
            brokers: self.brokers,
            topic: topic.to_owned(),
            consumer,
            records: Vec::new(),
        })
    }

    /// Waits until consumer group `group` has committed every record of `topic` that was
    /// there when the wait began: the group has caught up.
    pub async fn caught_up(&self, group: &str, topic: &str) -> Result<()> {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka_error(topic))?;
        let ends = blocking(topic, {
            let topic = topic.to_owned();
            move || high_watermarks(&client, &topic).map(|ends| (client, ends))
        })
        .await?;
        let (client, ends) = ends;
        let client = std::sync::Arc::new(client);
        let what = format!("group {group} to catch up on {topic}");
        wait_for(&what, || {
            let client = std::sync::Arc::clone(&client);
            let ends = ends.clone();
            let topic = topic.to_owned();
            async move {
                blocking(&topic.clone(), move || {
                    let mut list = TopicPartitionList::new();
                    for partition in ends.keys() {
                        list.add_partition(&topic, *partition);
                    }
                    let committed = match client.committed_offsets(list, Duration::from_secs(10)) {
                        Ok(committed) => committed,
                        // A coordinator moving or not yet known: look again.
                        Err(error) if error.is_transient() => return Ok(false),
                        Err(error) => return Err(error),
                    };
                    // An empty partition has nothing to commit.
                    Ok(ends.iter().all(|(partition, end)| {
                        *end == 0
                            || committed
                                .find_partition(&topic, *partition)
                                .and_then(|p| p.offset().to_raw())
                                .is_some_and(|offset| offset >= *end)
                    }))
                })
                .await
                .map(|done| done.then_some(()))
            }
        })
        .await
    }
}

/// Runs a blocking librdkafka call off the test's runtime threads.
async fn blocking<T: Send + 'static>(
    topic: &str,
    call: impl FnOnce() -> std::result::Result<T, KafkaError> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(kafka_error(topic)),
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// The high watermark (offset of the next record) of each partition of `topic`.
///
/// Shortly after a topic is created, a broker may still answer that it does not lead a
/// partition, or does not know the topic, until its metadata catches up: such transient
/// answers are asked again, for up to [`ADMIN_TIMEOUT`].
fn high_watermarks<C: rdkafka::consumer::ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
) -> std::result::Result<BTreeMap<i32, i64>, KafkaError> {
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        match read_high_watermarks(client, topic) {
            Err(error) if error.is_transient() && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            ends => return ends,
        }
    }
}

fn read_high_watermarks<C: rdkafka::consumer::ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
) -> std::result::Result<BTreeMap<i32, i64>, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut ends = BTreeMap::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (_, high) = client.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
        ends.insert(partition.id(), high);
    }
    Ok(ends)
}

/// The value of header `name` of a record read from Kafka, as text.
pub fn header<'a>(record: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::message::Headers as _;
    record
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// What reached one topic, read from its beginning (see [`TestKafka::reader`]).
pub struct TopicReader {
    brokers: &'static str,
    topic: String,
    consumer: StreamConsumer,
    records: Vec<OwnedMessage>,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader")
            .field("topic", &self.topic)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl TopicReader {
    /// Reads until at least `count` records have arrived in all (up to [`DEADLINE`]).
    pub async fn wait_for(&mut self, count: usize) -> Result<&[OwnedMessage]> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.records.len() < count {
            self.next(deadline, count).await?;
        }
        Ok(&self.records)
    }

    /// Reads everything the topic holds now: until each partition's position reaches the
    /// high watermark it had when this call began. Stop the producers first to see every
    /// record they will ever write — duplicates included — without waiting for a quiet
    /// period.
    pub async fn to_end(&mut self) -> Result<&[OwnedMessage]> {
        let ends = {
            let client: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", self.brokers)
                .create()
                .map_err(kafka_error(&self.topic))?;
            let topic = self.topic.clone();
            blocking(&self.topic, move || high_watermarks(&client, &topic)).await?
        };
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            for record in &self.records {
                let slot = next.entry(record.partition()).or_default();
                *slot = (*slot).max(record.offset() + 1);
            }
            if ends
                .iter()
                .all(|(partition, end)| next.get(partition).copied().unwrap_or(0) >= *end)
            {
                return Ok(&self.records);
            }
            let wanted = usize::try_from(ends.values().sum::<i64>()).unwrap_or(usize::MAX);
            self.next(deadline, wanted).await?;
        }
    }

    /// Reads to the end ([`TopicReader::to_end`]) and returns every record read.
    pub async fn finish(mut self) -> Result<Vec<OwnedMessage>> {
        self.to_end().await?;
        Ok(self.records)
    }

    /// The records read so far, in the order they arrived (per partition, offset order).
    pub fn records(&self) -> &[OwnedMessage] {
        &self.records
    }

    /// The records read so far.
    pub fn into_records(self) -> Vec<OwnedMessage> {
        self.records
    }

    async fn next(&mut self, deadline: tokio::time::Instant, wanted: usize) -> Result<()> {
        let mut stream = self.consumer.stream();
        loop {
            let next = tokio::time::timeout_at(deadline, stream.next())
                .await
                .map_err(|_| Error::TimedOut {
                    what: format!("{wanted} records on {} (got {})", self.topic, self.records.len()),
                    after: DEADLINE,
                })?
                .ok_or_else(|| kafka_error(&self.topic)(KafkaError::NoMessageReceived))?;
            match next {
                Ok(record) => {
                    self.records.push(record.detach());
                    return Ok(());
                }
                // A topic the code under test has not created yet, a broker restarting:
                // keep reading.
                Err(error) if error.is_transient() => {}
                Err(error) => return Err(kafka_error(&self.topic)(error)),
            }
        }
    }
}

impl Drop for TestKafka {
    fn drop(&mut self) {
        let brokers = self.brokers;
        let prefix = std::mem::take(&mut self.prefix);
        crate::run_cleanup("kafka test topics", async move {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()
                .map_err(|e| e.to_string())?;
            let metadata = admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let names: Vec<String> = metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|name| name.starts_with(&prefix))
                .collect();
            if names.is_empty() {
                return Ok(());
            }
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
            admin.delete_topics(&names, &options).await.map_err(|e| e.to_string())?;
            Ok(())
        });
    }
}
