use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::KafkaConfig;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::wire;

/// Where the broker stored a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// Properties the publisher sets and a user may not change: without them a retried send
/// could duplicate or reorder messages, or be acknowledged before it is durable.
const REQUIRED: [(&str, &str); 2] = [("enable.idempotence", "true"), ("acks", "all")];

/// Defaults a user may override.
///
/// - `socket.timeout.ms` bounds every request on the client side (librdkafka's default
///   is 60 s): a broker connection that stops answering without closing (half-open) is
///   given up and reconnected after 30 s, within the message timeout, instead of a minute.
/// - `reconnect.backoff.max.ms`: librdkafka doubles the wait before reconnecting to a
///   broker after each failed attempt, and starts again from `reconnect.backoff.ms` only
///   once the last attempt is older than this maximum. With its default of 10 s, a
///   connection reset every few seconds made the producer wait up to 10 s before each
///   reconnect, and publishing stalled that long (`dbps-chaos net-reset`); 1 s keeps a
///   relay's stall after a reset around a second.
const DEFAULTS: [(&str, &str); 6] = [
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("message.timeout.ms", "30000"),
    ("socket.timeout.ms", "30000"),
    ("reconnect.backoff.max.ms", "1000"),
    ("queue.buffering.max.messages", "200000"),
];

/// Publishes envelopes to Kafka with an idempotent producer (`enable.idempotence=true`,
/// `acks=all`), in the CloudEvents binary content mode of [`crate::wire`].
///
/// Every send reports its own [`Delivery`] or error; errors are classified by
/// [`Error::is_transient`] so that callers retry only what can succeed later. Messages to
/// one partition are delivered in the order they were handed over, also across retries
/// inside the producer.
///
/// Cheap to clone: clones share one producer.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer<super::AuthContext>,
    /// The producer's login failures (see [`super::AuthMemory`]).
    auth: Arc<super::AuthMemory>,
    config: KafkaConfig,
    enqueue_timeout: Duration,
    /// Whether a flush runs (see [`KafkaPublisher::publish_batch`]).
    flushing: Arc<AtomicBool>,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`KafkaPublisher`].
#[derive(Debug, Clone)]
pub struct KafkaPublisherBuilder {
    config: KafkaConfig,
    enqueue_timeout: Duration,
}

impl KafkaPublisherBuilder {
    /// How long a send may wait for room in the producer's queue (default 30 s).
    pub fn enqueue_timeout(mut self, timeout: Duration) -> Self {
        self.enqueue_timeout = timeout;
        self
    }

    /// Creates the producer. Fails if a property is invalid or contradicts idempotence.
    pub fn build(self) -> Result<KafkaPublisher> {
        for (key, required) in REQUIRED {
            if let Some(value) = self.config.get(key).filter(|v| !v.eq_ignore_ascii_case(required)) {
                return Err(Error::config(
                    key.to_owned(),
                    format!("{value} contradicts the idempotent publisher, which needs {key}={required}"),
                ));
            }
        }
        let mut client = self.config.client_config(&DEFAULTS);
        for (key, value) in REQUIRED {
            client.set(key, value);
        }
        let auth = Arc::new(super::AuthMemory::default());
        let context = super::AuthContext {
            auth: Arc::clone(&auth),
        };
        let producer: FutureProducer<super::AuthContext> = client
            .create_with_context(context)
            .map_err(|source| super::creation_error("create producer", source))?;
        Ok(KafkaPublisher {
            producer,
            auth,
            config: self.config,
            enqueue_timeout: self.enqueue_timeout,
            flushing: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl KafkaPublisher {
    /// A builder for a publisher to the cluster `config` describes.
    pub fn builder(config: KafkaConfig) -> KafkaPublisherBuilder {
        KafkaPublisherBuilder {
            config,
            enqueue_timeout: Duration::from_secs(30),
        }
    }

    /// Publishes one envelope to `topic` and waits for the broker's acknowledgement.
    pub async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<Delivery> {
        let pending = self.enqueue(topic, envelope).await?;
        settle(&self.config, Some(&*self.auth), topic, pending.await)
    }

    /// Publishes a batch and waits for every acknowledgement. The results are in the
    /// order of `messages`; messages for one partition are sent in that order.
    ///
    /// When a message cannot be handed to the producer (it is too large, say), the later
    /// messages of the batch with the same key are not sent either and report
    /// [`Error::HeldBack`]: sending them would put them on the topic before the failed
    /// one.
    ///
    /// A batch is complete when it is handed over, so it does not wait `linger.ms` for
    /// more messages: the producer is flushed (librdkafka ignores `linger.ms` while a
    /// flush runs), on a blocking thread, one flush at a time per producer.
    pub async fn publish_batch<'a, I>(&self, messages: I) -> Vec<Result<Delivery>>
    where
        I: IntoIterator<Item = (&'a str, &'a Envelope)>,
    {
        let mut failed_keys: Vec<&str> = Vec::new();
        let mut pending = Vec::new();
        for (topic, envelope) in messages {
            let key = envelope.aggregate_id.as_str();
            if failed_keys.contains(&key) {
                pending.push((topic, Err(Error::HeldBack { key: key.to_owned() })));
                continue;
            }
            let enqueued = self.enqueue(topic, envelope).await;
            if enqueued.is_err() {
                failed_keys.push(key);
            }
            pending.push((topic, enqueued));
        }
        if pending.iter().any(|(_, enqueued)| enqueued.is_ok()) {
            self.flush_in_background();
        }
        // Everything is in flight already; awaiting in order costs nothing extra.
        let mut results = Vec::with_capacity(pending.len());
        for (topic, enqueued) in pending {
            results.push(match enqueued {
                Ok(delivery) => settle(&self.config, Some(&*self.auth), topic, delivery.await),
                Err(error) => Err(error),
            });
        }
        results
    }

    /// Sends what is queued without waiting for `linger.ms`, unless a flush runs already
    /// (it sends what is queued meanwhile too: librdkafka ignores `linger.ms` for as long
    /// as a flush runs).
    fn flush_in_background(&self) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let producer = self.producer.clone();
        let flushing = Arc::clone(&self.flushing);
        let timeout = self.enqueue_timeout;
        tokio::task::spawn_blocking(move || {
            super::flush::flush_queued(&producer, timeout);
            flushing.store(false, Ordering::Release);
        });
    }

    /// Publishes a raw record (used for dead letters, whose value may not be JSON).
    pub(crate) async fn publish_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<Delivery> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        let pending = self.send(topic, record).await?;
        settle(&self.config, Some(&*self.auth), topic, pending.await)
    }

    /// Waits until every message handed over so far was acknowledged or failed.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer
            .flush(Timeout::After(timeout))
            .map_err(|source| Error::Kafka {
                operation: String::from("flush"),
                source,
            })
    }

    /// The configuration this publisher was built from (secrets redacted in `Debug`).
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    async fn enqueue(&self, topic: &str, envelope: &Envelope) -> Result<DeliveryFuture> {
        let encoded = wire::encode(envelope)?;
        let mut headers = OwnedHeaders::new_with_capacity(encoded.headers.len());
        for (name, value) in &encoded.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let record = FutureRecord::to(topic)
            .key(encoded.key)
            .payload(encoded.value)
            .headers(headers);
        self.send(topic, record).await
    }

    /// Hands a record to the producer, waiting for room while its queue is full.
    async fn send<K, P>(&self, topic: &str, mut record: FutureRecord<'_, K, P>) -> Result<DeliveryFuture>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let deadline = tokio::time::Instant::now() + self.enqueue_timeout;
        loop {
            match self.producer.send_result(record) {
                Ok(future) => return Ok(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if tokio::time::Instant::now() < deadline =>
                {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((source, _)) => {
                    let auth = Some(&*self.auth);
                    return Err(super::kafka_error(
                        &self.config,
                        auth,
                        format!("produce to {topic}"),
                        source,
                    ));
                }
            }
        }
    }
}

type DeliveryOutcome =
    std::result::Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>;

fn settle(
    config: &KafkaConfig,
    auth: Option<&super::AuthMemory>,
    topic: &str,
    outcome: DeliveryOutcome,
) -> Result<Delivery> {
    match outcome {
        Ok(Ok(delivery)) => {
            // Acknowledged: whatever login failure was remembered is over.
            if let Some(auth) = auth {
                auth.clear();
            }
            Ok(Delivery {
                partition: delivery.partition,
                offset: delivery.offset,
            })
        }
        Ok(Err((source, _))) => Err(super::kafka_error(config, auth, format!("produce to {topic}"), source)),
        Err(_) => Err(Error::ShutDown),
    }
}
