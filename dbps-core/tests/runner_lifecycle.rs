//! The consumer runner's lifecycle against the real broker: topics checked (or created)
//! at start, a graceful stop that finishes and commits the message in flight, a panic
//! that stays a panic, permanent errors that stop it at once and an unreachable broker
//! that is waited for.
//!
//! Dropping the `run` future is a crash: `inbox_pg.rs`'s
//! `consumer_dropped_before_committing_redelivers_and_effects_apply_once` drops a runner
//! with handled but uncommitted messages, and the next one receives them again.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{StockChanged, TestResult, eventually, publish_all, start, topics};
use dbps_core::kafka::{ConsumerRunner, Handler, HandlerError, KafkaConfig, TopicSpec, missing_topics};
use dbps_core::{CancellationToken, Envelope, Error};

fn event(sku: &str, on_hand: i64) -> Result<Envelope, Error> {
    common::stock_changed(sku, on_hand)
}

/// Counts what it handled; blocks on the message with `on_hand == block_at` until
/// released, and panics on the one with `on_hand == panic_at`.
struct Gate {
    handled: AtomicUsize,
    blocked: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    block_at: Option<i64>,
    panic_at: Option<i64>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            handled: AtomicUsize::new(0),
            blocked: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
            block_at: None,
            panic_at: None,
        }
    }
}

impl Handler for Gate {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        let stock: StockChanged = serde_json::from_str(message.payload_json()).map_err(HandlerError::permanent)?;
        assert!(
            Some(stock.on_hand) != self.panic_at,
            "the handler panics on {}",
            stock.on_hand
        );
        if Some(stock.on_hand) == self.block_at {
            self.blocked.notify_one();
            let _permit = self.release.acquire().await.map_err(HandlerError::permanent)?;
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_stop_the_runner_at_start_unless_it_may_create_them() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let naming = kafka.naming();
    let topic = naming.events("inventory", "stock")?;
    let group = kafka.group_id("stock-view");
    let dead_letters = naming.dead_letter(&group)?;
    let config = KafkaConfig::new(kafka.brokers());

    let runner = ConsumerRunner::builder(config.clone(), &group, Gate::default())
        .topic(&topic)
        .dead_letter_topic(&dead_letters)
        .build()?;
    let error = tokio::time::timeout(Duration::from_secs(30), runner.run(CancellationToken::new()))
        .await?
        .unwrap_err();
    assert!(
        matches!(&error, Error::MissingTopics { topics } if *topics == [topic.clone(), dead_letters.clone()]),
        "{error:?}"
    );
    assert!(!error.is_transient());
    assert!(error.to_string().contains("create them"), "{error}");

    let gate = Arc::new(Gate::default());
    let runner = ConsumerRunner::builder(config.clone(), &group, Arc::clone(&gate))
        .topic(&topic)
        .dead_letter_topic(&dead_letters)
        .create_topics(|name| TopicSpec::new(name, 2))
        .build()?;
    let (stop, task) = start(runner);
    eventually("the runner to create its topics", || async {
        Ok(missing_topics(&config, &[topic.clone(), dead_letters.clone()])
            .await?
            .is_empty())
    })
    .await?;
    publish_all(kafka.brokers(), &topic, &[event("sku-1", 1)?]).await?;
    eventually("the message to be handled", || async {
        Ok(gate.handled.load(Ordering::SeqCst) == 1)
    })
    .await?;
    stop.cancel();
    assert_eq!(task.await??.handled, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_finishes_the_message_in_flight_and_commits_it() -> TestResult {
    let t = topics("stock", 1).await?;
    t.publish(&[event("sku-1", 1)?, event("sku-1", 2)?]).await?;

    let gate = Arc::new(Gate {
        block_at: Some(2),
        ..Gate::default()
    });
    // Offsets are committed only at the stop.
    let runner = t
        .consumer(Arc::clone(&gate))
        .commit_interval(Duration::from_secs(3600))
        .build()?;
    let (stop, task) = start(runner);
    tokio::time::timeout(Duration::from_secs(60), gate.blocked.notified()).await?;
    stop.cancel();
    assert!(!task.is_finished(), "the runner waits for the message in flight");
    gate.release.add_permits(1);
    let summary = task.await??;

    assert_eq!(summary.handled, 2, "the message in flight was finished");
    // Both offsets were committed: the group has caught up with the topic.
    t.kafka.caught_up(&t.group, &t.topic).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_reported_as_a_panic_and_its_message_is_not_committed() -> TestResult {
    let t = topics("stock", 1).await?;
    let messages = [event("sku-1", 1)?, event("sku-1", 2)?, event("sku-1", 3)?];
    t.publish(&messages).await?;

    let panicking = Arc::new(Gate {
        panic_at: Some(2),
        ..Gate::default()
    });
    let runner = t.consumer(Arc::clone(&panicking)).build()?;
    let error = tokio::spawn(runner.run(CancellationToken::new())).await.unwrap_err();
    assert!(error.is_panic(), "{error:?}");
    assert_eq!(panicking.handled.load(Ordering::SeqCst), 1);

    // The next runner of the group starts at the message that panicked.
    let healthy = Arc::new(Gate::default());
    let runner = t.consumer(Arc::clone(&healthy)).build()?;
    let (stop, task) = start(runner);
    t.kafka.caught_up(&t.group, &t.topic).await?;
    stop.cancel();
    task.await??;
    assert_eq!(healthy.handled.load(Ordering::SeqCst), 2, "messages 2 and 3, not 1");
    Ok(())
}

#[tokio::test]
async fn invalid_client_configuration_is_refused_before_the_runner_starts() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("stock", 1).await?;
    let config = KafkaConfig::new(kafka.brokers()).set("session.timeout.ms", "not a number");
    let error = ConsumerRunner::builder(config, kafka.group_id("g"), Gate::default())
        .topic(&topic)
        .dead_letter_topic(&topic)
        .build()
        .unwrap_err();
    assert!(
        matches!(error, Error::InvalidConfig { ref setting, .. } if setting == "session.timeout.ms"),
        "{error:?}"
    );
    assert!(!error.is_transient(), "{error:?}");

    // A misspelt secret property: named, its value (a password) not shown.
    let config = KafkaConfig::new(kafka.brokers()).set("sasl.pasword", "hunter2-secret");
    let error = ConsumerRunner::builder(config, kafka.group_id("g"), Gate::default())
        .topic(&topic)
        .dead_letter_topic(&topic)
        .build()
        .unwrap_err();
    let shown = format!("{} {error:?}", dbps_core::ErrorChain(&error));
    assert!(shown.contains("sasl.pasword"), "{shown}");
    assert!(!shown.contains("hunter2-secret"), "{shown}");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_broker_is_waited_for_until_the_shutdown() -> TestResult {
    // Nothing listens on port 1: every look at the topics fails, transiently.
    let runner = ConsumerRunner::builder(KafkaConfig::new("127.0.0.1:1"), "g", Gate::default())
        .topic("stock")
        .build()?;
    let (stop, task) = start(runner);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "a transient error does not end the run");
    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(10), task).await???;
    assert_eq!(summary.handled, 0);
    Ok(())
}
