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
