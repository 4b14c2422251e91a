//! Helpers shared by dbps-cache's integration tests.
#![allow(dead_code, unreachable_pub)]

use dbps_core::kafka::{ConsumerRunner, Handler, KafkaConfig, KafkaPublisher};
use dbps_core::{CancellationToken, Envelope};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Runs `handler` in a consumer runner over a fresh topic, publishes `events` to it, waits
/// until the runner has committed them all, and stops it.
pub async fn consume<H: Handler>(handler: H, events: &[Envelope]) -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("events", 1).await?;
    let dlq = kafka.create_topic("dlq", 1).await?;
    let group = kafka.group_id("cache");
    let runner = ConsumerRunner::builder(KafkaConfig::new(kafka.brokers()), &group, handler)
        .topic(&topic)
        .dead_letter_topic(&dlq)
        .build()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(runner.run(stop.clone()));
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
    for event in events {
        publisher.publish(&topic, event).await?;
    }
    kafka.caught_up(&group, &topic).await?;
    stop.cancel();
    task.await??;
    Ok(())
}

pub mod owner;
pub mod projection;

/// A topic filled with events, consumed by runners spawned on it (one group).
pub struct Stream {
    kafka: dbps_testkit::TestKafka,
    topic: String,
    dlq: String,
    group: String,
    stop: CancellationToken,
}

impl Stream {
    /// A fresh topic (two partitions) holding `events`.
    pub async fn start(events: &[Envelope]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let kafka = dbps_testkit::kafka().await?;
        let topic = kafka.create_topic("events", 2).await?;
        let dlq = kafka.create_topic("dlq", 1).await?;
        let group = kafka.group_id("replica");
        let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
        for event in events {
            publisher.publish(&topic, event).await?;
        }
        Ok(Self {
            kafka,
            topic,
            dlq,
            group,
            stop: CancellationToken::new(),
        })
    }

    /// Runs `handler` in a runner of the stream's group.
    pub fn spawn<H: dbps_core::BatchHandler>(
        &self,
        handler: H,
    ) -> tokio::task::JoinHandle<dbps_core::Result<dbps_core::kafka::RunSummary>> {
        let runner = ConsumerRunner::builder(KafkaConfig::new(self.kafka.brokers()), &self.group, handler)
            .topic(&self.topic)
            .dead_letter_topic(&self.dlq)
            .build()
            .expect("valid runner");
        tokio::spawn(runner.run(self.stop.clone()))
    }

    /// Waits until the group committed every event.
    pub async fn caught_up(&self) -> Result<(), dbps_testkit::Error> {
        self.kafka.caught_up(&self.group, &self.topic).await
    }

    /// Stops the runners.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Runs `handler` over a fresh topic holding `events` until it has committed them all.
pub async fn consume_batched<H: dbps_core::BatchHandler>(handler: H, events: &[Envelope]) -> TestResult {
    let stream = Stream::start(events).await?;
    let task = stream.spawn(handler);
    stream.caught_up().await?;
    stream.stop();
    task.await??;
    Ok(())
}
