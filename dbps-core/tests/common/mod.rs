//! Shared helpers of dbps-core's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use dbps_core::kafka::{ConsumerRunner, ConsumerRunnerBuilder, KafkaConfig, RunSummary};
use dbps_core::{CancellationToken, Envelope, Message};
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockChanged {
    pub sku: String,
    pub on_hand: i64,
}

impl Message for StockChanged {
    const TYPE: &'static str = "inventory.StockChanged";
}

/// A test's Kafka namespace with a topic of `partitions` partitions, a dead-letter topic
/// and a consumer group name.
pub struct Topics {
    pub kafka: dbps_testkit::TestKafka,
    pub topic: String,
    pub dlq: String,
    pub group: String,
}

impl Topics {
    /// A runner of `handler` in this group over this topic and dead-letter topic.
    pub fn consumer<H: dbps_core::BatchHandler>(&self, handler: H) -> ConsumerRunnerBuilder<H> {
        consumer(self.kafka.brokers(), &self.group, &self.topic, &self.dlq, handler)
    }

    /// Publishes `envelopes` to this topic.
    pub async fn publish(&self, envelopes: &[Envelope]) -> TestResult {
        publish_all(self.kafka.brokers(), &self.topic, envelopes).await
    }
}

pub async fn topics(name: &str, partitions: i32) -> Result<Topics, Box<dyn std::error::Error + Send + Sync>> {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic(name, partitions).await?;
    let dlq = kafka.create_topic("dlq", 1).await?;
    let group = kafka.group_id("g");
    Ok(Topics {
        kafka,
        topic,
        dlq,
        group,
    })
}

/// Publishes `envelopes` to `topic`, failing on the first refusal.
pub async fn publish_all(brokers: &str, topic: &str, envelopes: &[Envelope]) -> TestResult {
    let publisher = dbps_core::kafka::KafkaPublisher::builder(KafkaConfig::new(brokers)).build()?;
    for result in publisher.publish_batch(envelopes.iter().map(|e| (topic, e))).await {
        result?;
    }
    Ok(())
}

/// A runner of `handler` in `group` over `topic`, dead-lettering to `dead_letters`; finish
/// it with further settings and `build()`.
pub fn consumer<H: dbps_core::BatchHandler>(
    brokers: &str,
    group: impl Into<String>,
    topic: &str,
    dead_letters: &str,
    handler: H,
) -> ConsumerRunnerBuilder<H> {
    ConsumerRunner::builder(KafkaConfig::new(brokers), group, handler)
        .topic(topic)
        .dead_letter_topic(dead_letters)
}

/// Starts a runner in the background; cancel the token to stop it gracefully.
pub fn start<H: dbps_core::BatchHandler>(
    runner: ConsumerRunner<H>,
) -> (CancellationToken, JoinHandle<Result<RunSummary, dbps_core::Error>>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(runner.run(stop.clone()));
    (stop, task)
}

/// A `StockChanged` event of `sku` with `on_hand`, without a sequence number.
pub fn stock_changed(sku: &str, on_hand: i64) -> Result<Envelope, dbps_core::Error> {
    Envelope::event(
        "inventory",
        "stock",
        sku,
        &StockChanged {
            sku: sku.into(),
            on_hand,
        },
    )
}

/// Reads `count` records from the start of `topic` with a throw-away group.
pub async fn read_records(
    brokers: &str,
    topic: &str,
    count: usize,
) -> Result<Vec<OwnedMessage>, Box<dyn std::error::Error + Send + Sync>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut stream = consumer.stream();
    let mut records = Vec::with_capacity(count);
    while records.len() < count {
        let next = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .map_err(|_| format!("only {} of {count} records arrived on {topic}", records.len()))?;
        let message = next.ok_or("stream ended")??;
        records.push(message.detach());
    }
    Ok(records)
}

/// [`dbps_testkit::eventually`] with the tests' error type, so checks may use `?` on any
/// error and `Ok(condition)` needs no annotation.
pub async fn eventually<F, Fut>(what: &str, check: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, Box<dyn std::error::Error + Send + Sync>>>,
{
    Ok(dbps_testkit::eventually(what, check).await?)
}

#[allow(unused_imports)]
pub use dbps_testkit::header;

pub fn payload_json(message: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(message.payload().unwrap_or_default()).unwrap_or(serde_json::Value::Null)
}
