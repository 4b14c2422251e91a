//! The Kafka publisher and topic provisioning against the real broker.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{StockChanged, TestResult, read_records};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicOutcome, TopicSpec, ensure_topics};
use dbps_core::{Envelope, Error, MessageKind, TraceContext, wire};
use rdkafka::Message as _;
use rdkafka::message::Headers;

fn stock(sku: &str, on_hand: i64) -> StockChanged {
    StockChanged {
        sku: sku.into(),
        on_hand,
    }
}

#[tokio::test]
async fn published_envelope_arrives_as_a_cloudevent_and_decodes_unchanged() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("inventory.stock.events", 3).await?;
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;

    let mut envelope = Envelope::event("inventory", "stock", "sku-1", &stock("sku-1", 7))?;
    envelope.sequence = Some(42);
    envelope.correlation_id = Some("quote-9".into());
    envelope.trace = TraceContext::new_root();
    envelope.headers = BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]);
    let delivery = publisher.publish(&topic, &envelope).await?;
    assert!(delivery.offset >= 0);

    let records = read_records(kafka.brokers(), &topic, 1).await?;
    let record = &records[0];
    assert_eq!(record.key(), Some(&b"sku-1"[..]), "key is the aggregate id");
    assert_eq!(record.partition(), delivery.partition);
    assert_eq!(common::header(record, "ce_specversion"), Some("1.0"));
    assert_eq!(common::header(record, "ce_type"), Some("inventory.StockChanged"));
    assert_eq!(common::header(record, "ce_sequence"), Some("42"));
    assert_eq!(common::header(record, "content-type"), Some("application/json"));
    assert_eq!(
        common::header(record, "traceparent"),
        envelope.trace.traceparent.as_deref()
    );
    assert_eq!(
        common::payload_json(record),
        serde_json::json!({"sku": "sku-1", "on_hand": 7})
    );

    let headers: Vec<(&str, Option<&[u8]>)> = record
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    let decoded = wire::decode(record.key(), headers, record.payload(), None)?;
    assert_eq!(
        decoded.occurred_at.timestamp_micros(),
        envelope.occurred_at.timestamp_micros()
    );
    let mut decoded = decoded;
    decoded.occurred_at = envelope.occurred_at;
    assert_eq!(decoded, envelope);
    assert_eq!(envelope.kind, MessageKind::Event);
    Ok(())
}

/// A batch is complete when it is handed over: it goes out at once, not after
/// `linger.ms` (set here to 20 s, so that waiting for it would time the test out).
#[tokio::test]
async fn a_batch_does_not_wait_for_linger() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("linger", 2).await?;
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers()).set("linger.ms", "20000")).build()?;
    for round in 0..3 {
        let envelopes: Vec<Envelope> = (0..10)
            .map(|i| Envelope::event("inventory", "stock", format!("sku-{i}"), &stock("sku", round)))
            .collect::<Result<_, Error>>()?;
        let results = tokio::time::timeout(
            Duration::from_secs(10),
            publisher.publish_batch(envelopes.iter().map(|e| (topic.as_str(), e))),
        )
        .await
        .map_err(|_| format!("round {round}: the batch waited for linger.ms"))?;
        for result in results {
            result?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn batch_reports_each_delivery_and_keeps_per_key_order() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("batch", 4).await?;
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
    let envelopes: Vec<Envelope> = (0..200)
        .map(|i| {
            let sku = format!("sku-{}", i % 5);
            let mut e = Envelope::event("inventory", "stock", sku.clone(), &stock(&sku, i))?;
            e.sequence = Some(i / 5);
            Ok(e)
        })
        .collect::<Result<_, Error>>()?;
    let results = publisher
        .publish_batch(envelopes.iter().map(|e| (topic.as_str(), e)))
        .await;
    assert_eq!(results.len(), 200);
    let deliveries: Vec<_> = results.into_iter().collect::<Result<_, _>>()?;

    // Per key: one partition, offsets increasing in the order handed over.
    for key in 0..5 {
        let of_key: Vec<_> = deliveries
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 5 == key)
            .map(|(_, d)| *d)
            .collect();
        assert!(
            of_key
                .windows(2)
                .all(|w| w[0].partition == w[1].partition && w[0].offset < w[1].offset)
        );
    }
    let records = read_records(kafka.brokers(), &topic, 200).await?;
    let mut last_sequence: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    for record in &records {
        let sequence: i64 = common::header(record, "ce_sequence").ok_or("no sequence")?.parse()?;
        let key = record.key().ok_or("no key")?.to_vec();
        if let Some(previous) = last_sequence.insert(key, sequence) {
            assert_eq!(sequence, previous + 1, "per-key order broken");
        }
    }
    Ok(())
}

#[tokio::test]
async fn message_over_the_size_limit_is_a_permanent_error() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("small", 1).await?;
    // A producer whose message.max.bytes is small refuses the message before sending,
    // with the same error code the broker uses.
    let publisher =
        KafkaPublisher::builder(KafkaConfig::new(kafka.brokers()).set("message.max.bytes", "2000")).build()?;
    let big = Envelope::event("inventory", "stock", "sku-1", &stock(&"x".repeat(5000), 1))?;
    let error = publisher
        .publish(&topic, &big)
        .await
        .expect_err("too large for the producer");
    assert!(matches!(error, Error::Kafka { .. }), "{error:?}");
    assert!(!error.is_transient(), "size errors must not be retried: {error}");

    // In a batch, the same key's later message is held back (sending it would put it on
    // the topic before the failed one); other keys still go out.
    let same_key = Envelope::event("inventory", "stock", "sku-1", &stock("sku-1", 1))?;
    let other_key = Envelope::event("inventory", "stock", "sku-2", &stock("sku-2", 1))?;
    let results = publisher
        .publish_batch([
            (topic.as_str(), &big),
            (topic.as_str(), &same_key),
            (topic.as_str(), &other_key),
        ])
        .await;
    assert!(results[0].as_ref().is_err_and(|e| !e.is_transient()));
    assert!(
        matches!(&results[1], Err(Error::HeldBack { key }) if key == "sku-1"),
        "{:?}",
        results[1]
    );
    assert!(
        results[1].as_ref().is_err_and(Error::is_transient),
        "held back messages are sent again later"
    );
    assert!(results[2].is_ok(), "other keys still go out");
    Ok(())
}

#[tokio::test]
async fn oversize_payload_is_refused_before_anything_is_sent() -> TestResult {
    let error = Envelope::event("inventory", "stock", "sku-1", &stock(&"x".repeat(1024 * 1024), 1)).unwrap_err();
    assert!(
        matches!(error, Error::PayloadTooLarge { limit: 921_600, .. }),
        "{error:?}"
    );
    Ok(())
}

#[tokio::test]
async fn publisher_refuses_settings_that_break_idempotence() -> TestResult {
    for (key, value) in [("acks", "1"), ("enable.idempotence", "false")] {
        let error = KafkaPublisher::builder(KafkaConfig::new("127.0.0.1:1").set(key, value))
            .build()
            .unwrap_err();
        assert!(
            matches!(error, Error::InvalidConfig { ref setting, .. } if setting == key),
            "{error:?}"
        );
    }
    let publisher = KafkaPublisher::builder(KafkaConfig::new("127.0.0.1:1").set("sasl.password", "hunter2")).build()?;
    assert!(!format!("{publisher:?}").contains("hunter2"));
    Ok(())
}

#[tokio::test]
async fn topics_are_provisioned_idempotently() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let name = kafka.topic_name("customer.customer.events");
    let spec = TopicSpec::new(&name, 6)
        .retention(Duration::from_secs(7 * 24 * 3600))
        .config("cleanup.policy", "delete");
    let config = KafkaConfig::new(kafka.brokers());
    assert_eq!(
        ensure_topics(&config, std::slice::from_ref(&spec)).await?,
        vec![TopicOutcome::Created]
    );
    assert_eq!(
        ensure_topics(&config, std::slice::from_ref(&spec)).await?,
        vec![TopicOutcome::Existed]
    );

    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()?;
    let metadata = rdkafka::consumer::Consumer::fetch_metadata(&consumer, Some(&name), Duration::from_secs(10))?;
    assert_eq!(metadata.topics()[0].partitions().len(), 6);

    // Clean up: the testkit only deletes topics it created itself.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()?;
    admin
        .delete_topics(&[&name], &rdkafka::admin::AdminOptions::new())
        .await?;

    let bad = ensure_topics(&config, &[TopicSpec::new("no spaces allowed", 1)])
        .await
        .unwrap_err();
    assert!(matches!(bad, Error::InvalidTopic { .. }));
    Ok(())
}
