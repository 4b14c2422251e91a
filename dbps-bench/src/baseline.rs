//! The drain's baseline: a raw rdkafka producer sending the records the relay sends.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use dbps_core::{Envelope, TraceContext};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::observer::Observer;
use crate::workload::{AGGREGATE, Documents};

/// `KafkaPublisher`'s default `linger.ms`.
pub(crate) const PUBLISHER_LINGER_MS: u32 = 5;

/// How long to wait for the consumer before the harness gives up.
const DEADLINE: Duration = Duration::from_secs(180);

/// A producer with `KafkaPublisher`'s settings: the ones it enforces (`acks=all`,
/// `enable.idempotence=true`) and its defaults (lz4, 30 s message timeout, a queue of
/// 200,000 messages), with the relay's `linger.ms`.
pub(crate) struct RawProducer {
    producer: FutureProducer,
    topic: String,
    envelopes: Vec<Envelope>,
}

/// One raw producer run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRun {
    /// First send → last acknowledgement.
    pub(crate) acked: Duration,
    /// First send → the consumer has seen every record.
    pub(crate) consumed: Duration,
}

impl RawProducer {
    /// A producer for `topic` with `count` envelopes like the outbox's events (same
    /// payloads, sequence and trace headers), built before anything is timed.
    pub(crate) async fn new(
        brokers: &str,
        topic: &str,
        docs: &Documents,
        count: u64,
        linger_ms: u32,
        observer: &Observer,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger_ms.to_string())
            .set("compression.type", "lz4")
            .set("message.timeout.ms", "30000")
            .set("queue.buffering.max.messages", "200000")
            .create()
            .context("creating the raw producer")?;
        let envelopes = (0..count)
            .map(|i| {
                let id = i64::try_from(i)?;
                let mut envelope = Envelope::event("bench", AGGREGATE, id.to_string(), &docs.event(1_000_000 + i, id))?;
                envelope.sequence = Some(1);
                envelope.trace = TraceContext::new_root();
                Ok(envelope)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let raw = Self {
            producer,
            topic: topic.to_owned(),
            envelopes,
        };
        // One record first, so that connecting and the idempotent producer's set-up are
        // not timed (the relay's publisher is warm too).
        if let Some(first) = raw.envelopes.first() {
            let target = observer.raw_seen() + 1;
            raw.send(first)?
                .await
                .map_err(|_| anyhow!("raw producer shut down"))?
                .map_err(|(e, _)| e)?;
            let started = Instant::now();
            while observer.raw_seen() < target {
                observer.check()?;
                if started.elapsed() > DEADLINE {
                    bail!("the consumer did not see the raw producer's first record");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok(raw)
    }

    /// Sends every envelope, encoded as `KafkaPublisher` encodes it, as fast as the
    /// producer takes them; waits for the acknowledgements and for `observer` to see
    /// them all.
    pub(crate) async fn run(&self, observer: &Observer) -> anyhow::Result<RawRun> {
        let count = self.envelopes.len() as u64;
        let target = observer.raw_seen() + count;
        let started = Instant::now();
        let mut deliveries = Vec::with_capacity(self.envelopes.len());
        for (n, envelope) in self.envelopes.iter().enumerate() {
            deliveries.push(self.send(envelope)?);
            if n % 1000 == 999 {
                // Sending never waits; let the runtime's other tasks in now and then.
                tokio::task::yield_now().await;
            }
        }
        for delivery in deliveries {
            delivery
                .await
                .map_err(|_| anyhow!("raw producer shut down"))?
                .map_err(|(e, _)| e)?;
        }
        let acked = started.elapsed();
        while observer.raw_seen() < target {
            observer.check()?;
            if started.elapsed() > DEADLINE {
                bail!(
                    "the consumer saw {} of {count} raw records",
                    count - (target - observer.raw_seen())
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(RawRun {
            acked,
            consumed: started.elapsed(),
        })
    }

    /// [`Self::run`] with a progress line, as run `n` of `of`.
    pub(crate) async fn run_logged(&self, observer: &Observer, n: usize, of: usize) -> anyhow::Result<RawRun> {
        let label = format!("raw producer, run {n}/{of}");
        let bar = crate::progress::spinner(&label);
        let run = self.run(observer).await?;
        let records = self.envelopes.len();
        let summary = format!(
            "{:.0} events/s ({records} records; all acknowledged after {:.2} s)",
            records as f64 / run.consumed.as_secs_f64(),
            run.acked.as_secs_f64()
        );
        crate::progress::done(&bar, &label, &summary);
        Ok(run)
    }

    fn send(&self, envelope: &Envelope) -> anyhow::Result<DeliveryFuture> {
        let encoded = dbps_core::wire::encode(envelope)?;
        let mut headers = OwnedHeaders::new_with_capacity(encoded.headers.len());
        for (name, value) in &encoded.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&self.topic)
            .key(encoded.key)
            .payload(encoded.value)
            .headers(headers);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
}
