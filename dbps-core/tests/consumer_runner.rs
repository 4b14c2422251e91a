//! The consumer runner against the real broker: retries, dead letters, order, commits.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{StockChanged, TestResult, consumer, eventually, header, publish_all, read_records, start, topics};
use dbps_core::kafka::{
    ConsumerRunner, Handler, HandlerError, KafkaConfig, RetryPolicy, RunSummary, dead_letter_header,
};
use dbps_core::{Envelope, Message as _, Registry};
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn fast_retries() -> RetryPolicy {
    RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(50), 5).expect("a valid policy")
}

fn event(sku: &str, sequence: i64) -> Result<Envelope, dbps_core::Error> {
    let mut e = common::stock_changed(sku, sequence)?;
    e.sequence = Some(sequence);
    Ok(e)
}

/// Records what it handled, per aggregate, and fails on demand.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, i64)>>,
    attempts: Mutex<HashMap<String, usize>>,
    /// Message ids that fail transiently this many times before succeeding.
    flaky: Mutex<HashMap<String, usize>>,
    /// Aggregate ids that always fail permanently.
    poison: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    delay: Option<Duration>,
}

impl Handler for Recorder {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let result = self.handle_inner(message).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl Recorder {
    async fn handle_inner(&self, message: &Envelope) -> Result<(), HandlerError> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        let attempt = {
            let mut attempts = self.attempts.lock().expect("lock");
            let n = attempts.entry(message.id.clone()).or_default();
            *n += 1;
            *n
        };
        if self.poison.lock().expect("lock").contains(&message.aggregate_id) {
            return Err(HandlerError::permanent(format!(
                "{} violates a business rule",
                message.aggregate_id
            )));
        }
        if self
            .flaky
            .lock()
            .expect("lock")
            .get(&message.id)
            .is_some_and(|fails| attempt <= *fails)
        {
            return Err(HandlerError::transient(format!("database busy (attempt {attempt})")));
        }
        self.seen
            .lock()
            .expect("lock")
            .push((message.aggregate_id.clone(), message.sequence.unwrap_or(-1)));
        Ok(())
    }

    fn seen_count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_is_retried_and_succeeds() -> TestResult {
    let t = topics("events", 1).await?;
    let envelopes = vec![event("sku-1", 1)?, event("sku-1", 2)?];
    let recorder = Arc::new(Recorder::default());
    recorder.flaky.lock().expect("lock").insert(envelopes[0].id.clone(), 3);
    t.publish(&envelopes).await?;

    let runner = t.consumer(Arc::clone(&recorder)).retry(fast_retries()).build()?;
    let (stop, task) = start(runner);
    eventually("both messages handled", || async { Ok(recorder.seen_count() == 2) }).await?;
    stop.cancel();
    let summary = task.await??;

    assert_eq!(
        *recorder.seen.lock().expect("lock"),
        vec![("sku-1".to_owned(), 1), ("sku-1".to_owned(), 2)]
    );
    assert_eq!(
        recorder.attempts.lock().expect("lock")[&envelopes[0].id],
        4,
        "three failures, then success"
    );
    assert_eq!(
        summary,
        RunSummary {
            handled: 2,
            dead_lettered: 0
        }
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_and_undecodable_message_go_to_the_dead_letter_topic() -> TestResult {
    let t = topics("events", 1).await?;

    // In partition order: a poison event, a record no CloudEvents reader accepts, a
    // healthy event, and one whose retries run out.
    let poison = event("sku-poison", 1)?;
    t.publish(std::slice::from_ref(&poison)).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", t.kafka.brokers())
        .create()?;
    producer
        .send(
            FutureRecord::to(&t.topic)
                .key("sku-raw")
                .payload("not json at all")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "origin",
                    value: Some("legacy-system"),
                })),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let healthy = event("sku-ok", 1)?;
    let exhausted = event("sku-ok", 2)?;
    t.publish(&[healthy.clone(), exhausted.clone()]).await?;

    let recorder = Arc::new(Recorder::default());
    recorder.poison.lock().expect("lock").push("sku-poison".into());
    recorder
        .flaky
        .lock()
        .expect("lock")
        .insert(exhausted.id.clone(), usize::MAX);
    let runner = t.consumer(Arc::clone(&recorder)).retry(fast_retries()).build()?;
    let (stop, task) = start(runner);
    let dead = read_records(t.kafka.brokers(), &t.dlq, 3).await?;
    stop.cancel();
    let summary = task.await??;

    assert_eq!(
        *recorder.seen.lock().expect("lock"),
        vec![("sku-ok".to_owned(), 1)],
        "the next message still flows"
    );
    assert_eq!(
        summary,
        RunSummary {
            handled: 1,
            dead_lettered: 3
        }
    );

    let first = &dead[0];
    assert_eq!(
        header(first, "ce_id"),
        Some(poison.id.as_str()),
        "original headers are kept"
    );
    assert_eq!(header(first, dead_letter_header::TOPIC), Some(t.topic.as_str()));
    assert_eq!(header(first, dead_letter_header::PARTITION), Some("0"));
    assert_eq!(header(first, dead_letter_header::OFFSET), Some("0"));
    assert!(header(first, dead_letter_header::REASON).is_some_and(|r| r.contains("violates a business rule")));
    assert_eq!(first.key(), Some(&b"sku-poison"[..]));

    let raw = &dead[1];
    assert_eq!(
        raw.payload(),
        Some(&b"not json at all"[..]),
        "the original bytes are kept"
    );
    assert_eq!(header(raw, "origin"), Some("legacy-system"));
    assert_eq!(header(raw, dead_letter_header::OFFSET), Some("1"));
    let reason = header(raw, dead_letter_header::REASON).unwrap_or_default();
    assert!(
        reason.contains("undecodable") && reason.contains("specversion"),
        "{reason}"
    );

    let third = &dead[2];
    assert_eq!(header(third, "ce_id"), Some(exhausted.id.as_str()));
    assert!(
        header(third, dead_letter_header::REASON).is_some_and(|r| r.contains("retries exhausted after 6 attempts"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_while_partitions_run_concurrently() -> TestResult {
    let t = topics("events", 4).await?;
    let keys = 16;
    let per_key = 25;
    let envelopes: Vec<Envelope> = (0..per_key)
        .flat_map(|seq| (0..keys).map(move |k| event(&format!("sku-{k}"), seq)))
        .collect::<Result<_, _>>()?;
    t.publish(&envelopes).await?;

    let recorder = Arc::new(Recorder {
        delay: Some(Duration::from_millis(2)),
        ..Recorder::default()
    });
    let runner = t.consumer(Arc::clone(&recorder)).build()?;
    let (stop, task) = start(runner);
    eventually("all messages handled", || async {
        Ok(recorder.seen_count() == envelopes.len())
    })
    .await?;
    stop.cancel();
    task.await??;

    let mut per_aggregate: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, seq) in recorder.seen.lock().expect("lock").iter() {
        per_aggregate.entry(key.clone()).or_default().push(*seq);
    }
    assert_eq!(per_aggregate.len(), keys);
    for (key, sequences) in &per_aggregate {
        assert_eq!(*sequences, (0..per_key).collect::<Vec<_>>(), "order of {key}");
    }
    assert!(
        recorder.max_in_flight.load(Ordering::SeqCst) > 1,
        "partitions were handled one at a time"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_commits_so_the_next_runner_starts_after_it() -> TestResult {
    let t = topics("events", 2).await?;
    let first: Vec<Envelope> = (0..20)
        .map(|i| event(&format!("sku-{}", i % 3), i))
        .collect::<Result<_, _>>()?;
    t.publish(&first).await?;

    let a = Arc::new(Recorder::default());
    // A long commit interval: only the graceful stop commits.
    let runner = t
        .consumer(Arc::clone(&a))
        .commit_interval(Duration::from_secs(3600))
        .build()?;
    let (stop, task) = start(runner);
    eventually("first batch handled", || async { Ok(a.seen_count() == 20) }).await?;
    stop.cancel();
    task.await??;

    let sentinel = event("sku-sentinel", 0)?;
    t.publish(std::slice::from_ref(&sentinel)).await?;
    let b = Arc::new(Recorder::default());
    let runner = t.consumer(Arc::clone(&b)).build()?;
    let (stop, task) = start(runner);
    eventually("sentinel handled", || async { Ok(b.seen_count() >= 1) }).await?;
    stop.cancel();
    task.await??;
    assert_eq!(
        *b.seen.lock().expect("lock"),
        vec![("sku-sentinel".to_owned(), 0)],
        "nothing handled twice"
    );
    Ok(())
}

#[tokio::test]
async fn runner_configuration_errors_are_typed() -> TestResult {
    let config = KafkaConfig::new("127.0.0.1:1");
    let recorder = Arc::new(Recorder::default());
    let no_topic = ConsumerRunner::builder(config.clone(), "g", Arc::clone(&recorder))
        .build()
        .unwrap_err();
    assert!(matches!(no_topic, dbps_core::Error::InvalidConfig { ref setting, .. } if setting == "topics"));
    let bad_topic = ConsumerRunner::builder(config.clone(), "g", Arc::clone(&recorder))
        .topic("a b")
        .build()
        .unwrap_err();
    assert!(matches!(bad_topic, dbps_core::Error::InvalidTopic { .. }));
    let auto_commit = ConsumerRunner::builder(config.set("enable.auto.commit", "true"), "g", recorder)
        .topic("t")
        .build()
        .unwrap_err();
    assert!(
        matches!(auto_commit, dbps_core::Error::InvalidConfig { ref setting, .. } if setting == "enable.auto.commit")
    );
    Ok(())
}

#[tokio::test]
async fn unknown_type_is_a_typed_error_for_the_handler_to_dead_letter() -> TestResult {
    let registry = Registry::new();
    let envelope = event("sku-1", 1)?;
    let error = registry.check(&envelope).unwrap_err();
    assert!(matches!(error, dbps_core::Error::UnknownType { ref message_type } if message_type == StockChanged::TYPE));
    let handler_error: HandlerError = error.into();
    assert!(
        !handler_error.is_transient(),
        "unknown types are dead-lettered, not retried"
    );
    Ok(())
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct StockReserved {
    sku: String,
    quantity: i64,
}

impl dbps_core::Message for StockReserved {
    const TYPE: &'static str = "inventory.StockReserved";
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct PriceChanged {
    sku: String,
}

impl dbps_core::Message for PriceChanged {
    const TYPE: &'static str = "inventory.PriceChanged";
}

dbps_core::message_set! {
    /// The stock events this test's handler follows.
    #[derive(Debug)]
    enum StockEvent {
        Changed(StockChanged),
        Reserved(StockReserved),
    }
}

/// Applies stock events by variant.
#[derive(Default)]
struct StockView {
    on_hand: Mutex<BTreeMap<String, i64>>,
}

impl dbps_core::TypedHandler<StockEvent> for StockView {
    async fn handle(&self, event: StockEvent, _envelope: &Envelope) -> Result<(), HandlerError> {
        let mut on_hand = self.on_hand.lock().map_err(|_| HandlerError::permanent("poisoned"))?;
        match event {
            StockEvent::Changed(changed) => {
                on_hand.insert(changed.sku, changed.on_hand);
            }
            StockEvent::Reserved(reserved) => *on_hand.entry(reserved.sku).or_default() -= reserved.quantity,
        }
        Ok(())
    }
}

/// One topic, several event types: a typed handler gets each as its variant, and a type
/// outside its set is dead-lettered (by default) or skipped (when asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_handler_dispatches_by_type_and_dead_letters_or_ignores_the_others() -> TestResult {
    use dbps_core::{OtherTypes, Typed};

    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("events", 1).await?;
    let reserved = Envelope::event(
        "inventory",
        "stock",
        "sku-1",
        &StockReserved {
            sku: "sku-1".into(),
            quantity: 3,
        },
    )?;
    let priced = Envelope::event("inventory", "stock", "sku-1", &PriceChanged { sku: "sku-1".into() })?;
    publish_all(kafka.brokers(), &topic, &[event("sku-1", 10)?, reserved, priced]).await?;

    for others in [OtherTypes::DeadLetter, OtherTypes::Ignore] {
        let dlq = kafka.create_topic(&format!("dlq-{others:?}"), 1).await?;
        let group = kafka.group_id(&format!("{others:?}"));
        let typed = Arc::new(Typed::new(StockView::default()).other_types(others));
        let runner = consumer(kafka.brokers(), &group, &topic, &dlq, Arc::clone(&typed)).build()?;
        let (stop, task) = start(runner);
        kafka.caught_up(&group, &topic).await?;
        stop.cancel();
        let summary = task.await??;

        let on_hand = typed.handler().on_hand.lock().map_err(|_| "poisoned")?.clone();
        assert_eq!(on_hand, BTreeMap::from([("sku-1".to_owned(), 7)]), "{others:?}");
        let dead = usize::from(others == OtherTypes::DeadLetter);
        assert_eq!(summary.dead_lettered, dead as u64, "{others:?}");
        assert_eq!(read_records(kafka.brokers(), &dlq, dead).await?.len(), dead);
    }
    Ok(())
}
