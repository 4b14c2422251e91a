//! The consumer that watches both benchmark topics: it counts what arrives and, while
//! recording, notes when each outbox event was seen.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, Timestamp, TopicPartitionList};
use serde::Deserialize;

/// An outbox event seen by the consumer: the number its payload carries in `xid` (the
/// writing transaction's id in the `outbox` scenario, an event number in `outbox-mongo`),
/// when the relay handed it to the producer (the record's CreateTime, milliseconds) and
/// when it arrived (microseconds), both since the Unix epoch on this machine's clock,
/// the clock PostgreSQL stamps commits with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sighting {
    pub(crate) xid: u64,
    pub(crate) produced_unix_ms: Option<i64>,
    pub(crate) seen_unix_us: i64,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    recording: AtomicBool,
    events_seen: AtomicU64,
    raw_seen: AtomicU64,
    sightings: Mutex<Vec<Sighting>>,
    failure: Mutex<Option<String>>,
}

/// A consumer on a thread of its own, assigned every partition of both topics from the
/// beginning (no group rebalance to wait for).
#[derive(Debug)]
pub(crate) struct Observer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Only the transaction id is read out of each payload.
#[derive(Deserialize)]
struct Probe {
    xid: u64,
}

impl Observer {
    pub(crate) fn start(brokers: &str, events_topic: &str, raw_topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("dbps-bench-observer-{}", uuid::Uuid::now_v7().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // A fetch returns as soon as a record arrives; this only bounds idle fetches.
            .set("fetch.wait.max.ms", "100")
            .create()
            .context("creating the observing consumer")?;
        let mut assignment = TopicPartitionList::new();
        for topic in [events_topic, raw_topic] {
            for partition in 0..partitions {
                assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment).context("assigning the benchmark topics")?;
        let shared = Arc::new(Shared::default());
        let events_topic = events_topic.to_owned();
        let thread = std::thread::Builder::new().name("dbps-bench-observer".into()).spawn({
            let shared = shared.clone();
            move || observe(&consumer, &events_topic, &shared)
        })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Outbox events seen so far.
    pub(crate) fn events_seen(&self) -> u64 {
        self.shared.events_seen.load(Ordering::Acquire)
    }

    /// Waits until `target` outbox events have been seen, failing after `deadline` or
    /// when the consumer thread failed.
    pub(crate) async fn wait_for_events(&self, target: u64, deadline: Duration) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        while self.events_seen() < target {
            self.check()?;
            if started.elapsed() > deadline {
                return Err(anyhow!(
                    "the consumer saw {} of {target} events within {deadline:?}",
                    self.events_seen()
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Raw-producer records seen so far.
    pub(crate) fn raw_seen(&self) -> u64 {
        self.shared.raw_seen.load(Ordering::Acquire)
    }

    /// Starts noting when each outbox event arrives.
    pub(crate) fn start_recording(&self) {
        self.lock_sightings().clear();
        self.shared.recording.store(true, Ordering::Release);
    }

    /// Stops noting arrivals and returns what was noted.
    pub(crate) fn stop_recording(&self) -> Vec<Sighting> {
        self.shared.recording.store(false, Ordering::Release);
        std::mem::take(&mut *self.lock_sightings())
    }

    /// Fails if the consumer thread hit an error.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        match self
            .shared
            .failure
            .lock()
            .map_err(|_| anyhow!("observer state poisoned"))?
            .as_ref()
        {
            Some(failure) => Err(anyhow!("the observing consumer failed: {failure}")),
            None => Ok(()),
        }
    }

    fn lock_sightings(&self) -> std::sync::MutexGuard<'_, Vec<Sighting>> {
        self.shared
            .sightings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops the consumer thread.
    pub(crate) fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Microseconds since the Unix epoch on this machine's clock.
pub(crate) fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn observe(consumer: &BaseConsumer, events_topic: &str, shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let seen_unix_us = unix_micros();
        let message = match result {
            Ok(message) => message,
            Err(error) if dbps_core::classify::Classify::is_transient(&error) => {
                tracing::warn!(%error, "observing consumer: transient error");
                continue;
            }
            Err(error) => {
                if let Ok(mut failure) = shared.failure.lock() {
                    *failure = Some(error.to_string());
                }
                return;
            }
        };
        if message.topic() != events_topic {
            shared.raw_seen.fetch_add(1, Ordering::AcqRel);
            continue;
        }
        if shared.recording.load(Ordering::Acquire) {
            match message.payload().map(serde_json::from_slice::<Probe>) {
                Some(Ok(probe)) => {
                    if let Ok(mut sightings) = shared.sightings.lock() {
                        let produced_unix_ms = match message.timestamp() {
                            Timestamp::CreateTime(ms) => Some(ms),
                            _ => None,
                        };
                        sightings.push(Sighting {
                            xid: probe.xid,
                            produced_unix_ms,
                            seen_unix_us,
                        });
                    }
                }
                other => {
                    let reason = match other {
                        Some(Err(error)) => error.to_string(),
                        _ => String::from("empty payload"),
                    };
                    if let Ok(mut failure) = shared.failure.lock() {
                        *failure = Some(format!("unreadable event at offset {}: {reason}", message.offset()));
                    }
                    return;
                }
            }
        }
        shared.events_seen.fetch_add(1, Ordering::AcqRel);
    }
}
