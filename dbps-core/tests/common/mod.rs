//! Shared helpers of dbps-core's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use dbps_core::Message;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use serde::{Deserialize, Serialize};

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

pub fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

pub fn payload_json(message: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(message.payload().unwrap_or_default()).unwrap_or(serde_json::Value::Null)
}
