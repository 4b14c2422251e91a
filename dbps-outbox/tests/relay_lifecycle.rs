//! The relay's lifecycle against the real PostgreSQL and Kafka: a graceful stop finishes
//! the batch in flight and leaves, transient trouble is retried, a permanent error stops
//! the relay at once, a panic stays a panic, and a missing topic is waited for, never a
//! reason to park.
//!
//! Dropping the `run` future is a crash: `pg_outbox.rs`'s
//! `relay_stopped_between_ack_and_mark_republishes_and_loses_nothing` aborts a relay
//! between the broker's acknowledgement and the mark, and the next relay publishes the
//! batch again.

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::{TestResult, TestStore, fast, publisher, read, start_relay};
use dbps_core::Message;
use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicSpec, missing_topics};
use dbps_outbox::pg::{MIGRATOR, PgOutbox, PgOutboxStore};
use dbps_outbox::{OutboxError, Relay};
use dbps_testkit::eventually;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PriceChanged {
    sku: String,
    cents: i64,
}

impl Message for PriceChanged {
    const TYPE: &'static str = "catalog.PriceChanged";
}

async fn enqueue(db: &dbps_testkit::TestPostgres, outbox: &PgOutbox, topic: &str, count: i64) -> TestResult {
    let mut tx = db.pool().begin().await?;
    for cents in 0..count {
        let price = PriceChanged {
            sku: String::from("sku-1"),
            cents,
        };
        let envelope = dbps_core::Envelope::event("catalog", "product", "sku-1", &price)?;
        outbox.enqueue(&mut tx, topic, envelope).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A database with the outbox's tables, and Kafka.
async fn migrated()
-> Result<(dbps_testkit::TestPostgres, dbps_testkit::TestKafka), Box<dyn std::error::Error + Send + Sync>> {
    let db = dbps_testkit::postgres().await?;
    MIGRATOR.run(db.pool()).await?;
    Ok((db, dbps_testkit::kafka().await?))
}

/// Advisory locks held in the test's database (the relays' membership and partitions).
async fn advisory_locks(db: &dbps_testkit::TestPostgres) -> Result<i64, sqlx::Error> {
    let (locks,): (i64,) = sqlx::query_as(
        "select count(*) from pg_locks where locktype = 'advisory'
           and database = (select oid from pg_database where datname = current_database())",
    )
    .fetch_one(db.pool())
    .await?;
    Ok(locks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_finishes_the_batch_in_flight_marks_it_and_releases_the_leases() -> TestResult {
    let (db, kafka) = migrated().await?;
    let topic = kafka.create_topic("catalog.product.events", 1).await?;
    let outbox = PgOutbox::new("catalog");
    enqueue(&db, &outbox, &topic, 10).await?;

    let store = TestStore::hold_marks(PgOutboxStore::new(db.pool().clone()));
    let (stop, relay) = start_relay(fast(store.clone(), kafka.brokers())?);
    // The batch is on Kafka and its mark is held: the stop comes mid-batch.
    store.marking().await?;
    stop.cancel();
    assert!(!relay.is_finished(), "the relay waits for its batch");
    store.release_marks();
    let summary = relay.await??;

    assert_eq!(summary.published, 10, "the batch in flight was finished");
    let (left,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(left, 0, "and marked: nothing is published twice");
    assert_eq!(read(&kafka, &topic, 10).await?.finish().await?.len(), 10);
    // Leaving closed the lease's connection: its advisory locks are gone.
    eventually("the relay's leases to be released", || async {
        Ok::<_, sqlx::Error>(advisory_locks(&db).await? == 0)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_outbox_table_stops_the_relay_with_an_error_that_says_what_to_fix() -> TestResult {
    let db = dbps_testkit::postgres().await?; // no migrations
    let kafka = dbps_testkit::kafka().await?;
    let relay = fast(PgOutboxStore::new(db.pool().clone()), kafka.brokers())?;
    let error = tokio::time::timeout(Duration::from_secs(30), relay.run(dbps_core::CancellationToken::new()))
        .await?
        .unwrap_err();
    assert!(
        matches!(error, OutboxError::MissingTable { ref table } if table.starts_with("dbps_outbox")),
        "{error:?}"
    );
    assert!(!error.is_transient());
    assert!(error.to_string().contains("run the migrations"), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_stop_the_relay_at_once() -> TestResult {
    let db = dbps_testkit::postgres().await?;
    let kafka = dbps_testkit::kafka().await?;
    let wrong = PgConnectOptions::from_str(db.url())?
        .username("dbps_no_such_role")
        .password("wrong");
    let pool = PgPoolOptions::new().connect_lazy_with(wrong);
    let relay = fast(PgOutboxStore::new(pool), kafka.brokers())?;
    let error = tokio::time::timeout(Duration::from_secs(30), relay.run(dbps_core::CancellationToken::new()))
        .await?
        .unwrap_err();
    let OutboxError::Store { source, .. } = &error else {
        panic!("expected a store error: {error:?}");
    };
    // invalid_password (28P01) or, for a role that does not exist, invalid_authorization.
    let code = source.as_database_error().and_then(|e| e.code()).unwrap_or_default();
    assert!(code.starts_with("28"), "{error:?}");
    assert!(!error.is_transient());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_are_retried_counted_and_lose_nothing() -> TestResult {
    let (db, kafka) = migrated().await?;
    let topic = kafka.create_topic("catalog.product.events", 1).await?;
    let outbox = PgOutbox::new("catalog");
    let (stop, relay) = start_relay(fast(PgOutboxStore::new(db.pool().clone()), kafka.brokers())?);

    enqueue(&db, &outbox, &topic, 5).await?;
    read(&kafka, &topic, 5).await?;
    // Every other session on the database dies: the relay's lease and listening
    // connections among them, as in a failover.
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()",
    )
    .execute(db.pool())
    .await?;
    enqueue(&db, &outbox, &topic, 5).await?;
    let reader = read(&kafka, &topic, 10).await?;
    stop.cancel();
    let summary = relay.await??;
    let records = reader.finish().await?;

    assert_eq!(records.len(), 10, "nothing lost, nothing twice");
    assert_eq!(summary.published, 10);
    assert!(summary.retried >= 1, "the broken session was retried: {summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_topic_does_not_exist_waits_for_it_and_is_never_parked() -> TestResult {
    let (db, kafka) = migrated().await?;
    let topic = kafka.topic_name("catalog.product.events"); // not created yet
    let outbox = PgOutbox::new("catalog");
    enqueue(&db, &outbox, &topic, 1).await?;

    // The producer gives up on an unknown topic after 300 ms instead of 30 s, so the relay
    // meets the error several times while the test waits.
    let impatient =
        KafkaPublisher::builder(KafkaConfig::new(kafka.brokers()).set("topic.metadata.propagation.max.ms", "300"))
            .build()?;
    let store = TestStore::recording(PgOutboxStore::new(db.pool().clone()));
    let relay = Relay::builder(store.clone(), impatient)
        .retry_delay(Duration::from_millis(50))
        .max_retry_delay(Duration::from_millis(200))
        .build()?;
    let (stop, task) = start_relay(relay);
    eventually("the relay to try the message three times", || async {
        Ok::<_, std::convert::Infallible>(store.seen(|seen| seen.fetched.len()) >= 3)
    })
    .await?;
    let (parked,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox where parked_at is not null")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(parked, 0, "a missing topic is no reason to park");

    // Once the topic exists, the message goes out.
    kafka.create_topics(&[(&topic, 1)]).await?;
    let reader = read(&kafka, &topic, 1).await?;
    stop.cancel();
    let summary = task.await??;
    assert_eq!(reader.finish().await?.len(), 1);
    assert_eq!((summary.published, summary.parked), (1, 0));
    assert!(summary.retried >= 2, "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_creates_the_topics_it_is_given_before_it_publishes() -> TestResult {
    let (db, kafka) = migrated().await?;
    let topic = kafka.naming().events("catalog", "product")?;
    let config = KafkaConfig::new(kafka.brokers());
    assert_eq!(
        missing_topics(&config, std::slice::from_ref(&topic)).await?,
        vec![topic.clone()]
    );

    let outbox = PgOutbox::new("catalog").naming(kafka.naming());
    let mut tx = db.pool().begin().await?;
    let price = PriceChanged {
        sku: String::from("sku-9"),
        cents: 999,
    };
    outbox.enqueue_event(&mut tx, "product", "sku-9", &price).await?;
    tx.commit().await?;

    let relay = Relay::builder(PgOutboxStore::new(db.pool().clone()), publisher(kafka.brokers())?)
        .create_topics([TopicSpec::new(&topic, 3)])
        .build()?;
    let (stop, task) = start_relay(relay);
    let reader = read(&kafka, &topic, 1).await?;
    stop.cancel();
    task.await??;
    assert_eq!(reader.finish().await?.len(), 1);
    assert!(missing_topics(&config, &[topic]).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_the_relay_reaches_the_caller_as_a_panic() -> TestResult {
    let (db, kafka) = migrated().await?;
    let store = TestStore::panic_on_fetch(PgOutboxStore::new(db.pool().clone()));
    let (_stop, task) = start_relay(fast(store, kafka.brokers())?);
    let error = task.await.unwrap_err();
    assert!(error.is_panic(), "{error:?}");
    Ok(())
}

#[tokio::test]
async fn the_builder_refuses_settings_that_cannot_work() -> TestResult {
    let db = dbps_testkit::postgres().await?;
    let kafka = dbps_testkit::kafka().await?;
    let store = PgOutboxStore::new(db.pool().clone());
    let zero = Relay::builder(store.clone(), publisher(kafka.brokers())?)
        .batch_size(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            zero,
            OutboxError::InvalidConfig {
                setting: "batch_size",
                ..
            }
        ),
        "{zero:?}"
    );
    let backwards = Relay::builder(store.clone(), publisher(kafka.brokers())?)
        .retry_delay(Duration::from_secs(5))
        .max_retry_delay(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            backwards,
            OutboxError::InvalidConfig {
                setting: "max_retry_delay",
                ..
            }
        ),
        "{backwards:?}"
    );
    let bad_topic = Relay::builder(store, publisher(kafka.brokers())?)
        .create_topics([TopicSpec::new("no spaces", 1)])
        .build()
        .unwrap_err();
    assert!(
        matches!(bad_topic, OutboxError::Message(dbps_core::Error::InvalidTopic { .. })),
        "{bad_topic:?}"
    );
    Ok(())
}
