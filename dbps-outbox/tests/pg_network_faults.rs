//! The relay when its database stops answering without closing the connection (a
//! half-open connection: a partition, a dead host, a stuck proxy), against the real
//! PostgreSQL and Kafka through a [`FaultyLink`].
//!
//! A relay holds its partitions through advisory locks on one session. If that session
//! silently stops answering, the relay must notice within its own timeout and close the
//! connection, so the server ends the session and the other relays take the partitions;
//! and if the relay itself vanished without closing anything, the server must end the
//! session within the lease's idle timeout. Before either bound the partitions stayed
//! held (and their messages unpublished) until TCP gave up: hours.

mod common;

use std::time::{Duration, Instant};

use common::{TestResult, TestStore, assert_in_order, fast, read, start_relay, summarise};
use dbps_core::Message;
use dbps_outbox::OutboxStore;
use dbps_outbox::pg::{MIGRATOR, PgOutbox, PgOutboxStore};
use dbps_testkit::{FaultyLink, TestPostgres, eventually};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StockCounted {
    sku: String,
    count: i64,
}

impl Message for StockCounted {
    const TYPE: &'static str = "stock.StockCounted";
}

/// A fault link to the test's PostgreSQL server, and a pool through it.
async fn linked_pool(db: &TestPostgres) -> Result<(FaultyLink, PgPool), Box<dyn std::error::Error + Send + Sync>> {
    let link = db.faulty_link().await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&link.url(db.url()))
        .await?;
    Ok((link, pool))
}

/// Commits `count` events of distinct aggregates (spread over every lease partition).
async fn enqueue(db: &TestPostgres, topic: &str, count: i64) -> TestResult {
    let outbox = PgOutbox::new("stock");
    let mut tx = db.pool().begin().await?;
    for n in 0..count {
        let sku = format!("sku-{n}");
        let event = StockCounted {
            sku: sku.clone(),
            count: n,
        };
        let envelope = dbps_core::Envelope::event("stock", "item", &sku, &event)?;
        outbox.enqueue(&mut tx, topic, envelope).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Relay members and partition locks held in the test's database.
async fn held(db: &TestPostgres) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "select count(*) filter (where objid < 1000000 and classid = x'64627074'::int::oid), count(*)
         from pg_locks where locktype = 'advisory' and granted
           and database = (select oid from pg_database where datname = current_database())",
    )
    .fetch_one(db.pool())
    .await
}

async fn migrated() -> Result<(TestPostgres, dbps_testkit::TestKafka), Box<dyn std::error::Error + Send + Sync>> {
    let db = dbps_testkit::postgres().await?;
    MIGRATOR.run(db.pool()).await?;
    Ok((db, dbps_testkit::kafka().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_database_stops_answering_gives_its_partitions_up_within_its_timeout() -> TestResult {
    let (db, kafka) = migrated().await?;
    let topic = kafka.create_topic("stock.item.events", 1).await?;
    let (link, pool) = linked_pool(&db).await?;

    // Relay A, through the link, alone: it takes all 32 partitions.
    let store_a = PgOutboxStore::new(pool).timeout(Duration::from_secs(1));
    let (stop_a, relay_a) = start_relay(fast(store_a, kafka.brokers())?);
    eventually("relay A to hold every partition", || async {
        Ok::<_, sqlx::Error>(held(&db).await? == (32, 33))
    })
    .await?;

    // Its connections go silent; relay B (direct) starts, and events are committed.
    link.freeze();
    let frozen_at = Instant::now();
    let (stop_b, relay_b) = start_relay(fast(PgOutboxStore::new(db.pool().clone()), kafka.brokers())?);
    enqueue(&db, &topic, 40).await?;

    // A's statements time out, A closes its lease connection, the server ends the
    // session, and B takes the partitions and publishes everything.
    let reader = read(&kafka, &topic, 40).await?;
    let moved_after = frozen_at.elapsed();
    assert!(
        moved_after < Duration::from_secs(30),
        "the partitions moved only after {moved_after:?}"
    );
    assert!(!relay_a.is_finished(), "relay A must keep retrying, not stop");

    // The link answers again: A rejoins and takes its share back.
    link.thaw();
    eventually("relay A to rejoin and share the partitions", || async {
        let (partitions, locks) = held(&db).await?;
        Ok::<_, sqlx::Error>(partitions == 32 && locks == 34)
    })
    .await?;
    stop_a.cancel();
    stop_b.cancel();
    relay_a.await??;
    relay_b.await??;
    let records = reader.finish().await?;
    assert!(records.len() >= 40);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_vanished_without_closing_loses_its_partitions_within_the_lease_idle_timeout() -> TestResult {
    let (db, kafka) = migrated().await?;
    let topic = kafka.create_topic("stock.item.events", 1).await?;
    let (link, pool) = linked_pool(&db).await?;

    // A relay instance takes every partition, then its host vanishes: nothing it sent
    // arrives any more, and it never closes its connection (the lease is kept alive).
    let store_a = PgOutboxStore::new(pool).lease_idle_timeout(Duration::from_secs(2));
    let mut lease = store_a.join().await?;
    store_a.rebalance(&mut lease).await?;
    assert_eq!(store_a.partitions(&lease).len(), 32);
    link.freeze();
    let vanished_at = Instant::now();

    let (stop_b, relay_b) = start_relay(fast(PgOutboxStore::new(db.pool().clone()), kafka.brokers())?);
    enqueue(&db, &topic, 40).await?;
    let reader = read(&kafka, &topic, 40).await?;
    let moved_after = vanished_at.elapsed();
    assert!(
        moved_after < Duration::from_secs(30),
        "the partitions moved only after {moved_after:?}"
    );
    stop_b.cancel();
    relay_b.await??;
    reader.finish().await?;
    drop(lease);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_lease_session_ended_mid_batch_fetches_nothing_of_the_partitions_another_relay_took() -> TestResult
{
    let (db, kafka) = migrated().await?;
    let topic = kafka.create_topic("stock.item.events", 1).await?;
    enqueue(&db, &topic, 20).await?;

    // Relay A holds every partition; its first batch is on Kafka and its mark is held.
    let store_a = TestStore::hold_marks(PgOutboxStore::new(db.pool().clone()));
    let (stop_a, relay_a) = start_relay(fast(store_a.clone(), kafka.brokers())?);
    store_a.marking().await?;
    let first_batch: std::collections::BTreeSet<String> =
        store_a.seen(|s| s.fetched.iter().map(|(id, _, _)| id.clone()).collect());
    assert_eq!(first_batch.len(), 20);

    // The window: the server ends A's lease session (a reset connection, a failover, an
    // operator) while A is between the broker's acknowledgement and its mark.
    let ended: i64 = sqlx::query_scalar(
        "select count(pg_terminate_backend(pid)) from pg_locks
         where locktype = 'advisory' and granted and classid = x'64627073'::int::oid
           and database = (select oid from pg_database where datname = current_database())",
    )
    .fetch_one(db.pool())
    .await?;
    assert_eq!(ended, 1, "relay A's lease session");

    // Relay B takes every partition, publishes what A had not marked, and the next event
    // of each aggregate.
    let store_b = TestStore::recording(PgOutboxStore::new(db.pool().clone()));
    let (stop_b, relay_b) = start_relay(fast(store_b.clone(), kafka.brokers())?);
    store_b.holding(32).await?;
    enqueue(&db, &topic, 20).await?;
    let reader = read(&kafka, &topic, 60).await?;

    // A's mark goes through; whatever A fetches from now on comes from a new session
    // and from partitions it took from B by rebalancing.
    store_a.release_marks();
    eventually("relay A to rejoin and take a share", || async {
        Ok::<_, String>(store_a.seen(|s| !s.partitions.is_empty() && s.partitions.len() < 32))
    })
    .await?;
    stop_a.cancel();
    stop_b.cancel();
    relay_a.await??;
    relay_b.await??;

    // Only A's first batch was fetched by both: A fetched nothing while B held its
    // partitions, and every fetch of A's was of a partition it held at the time.
    let fetched_a: Vec<(String, i32, Vec<i32>)> = store_a.seen(|s| s.fetched.clone());
    let fetched_b: std::collections::BTreeSet<String> =
        store_b.seen(|s| s.fetched.iter().map(|(id, _, _)| id.clone()).collect());
    for (id, partition, held) in &fetched_a[20..] {
        assert!(
            held.contains(partition),
            "relay A fetched {id} of partition {partition} while holding {held:?}"
        );
        assert!(
            !fetched_b.contains(id),
            "relay A fetched {id}, which relay B fetched too"
        );
    }
    assert!(first_batch.is_subset(&fetched_b), "B publishes what A had not marked");

    // Per aggregate the topic stays in order; the first batch appears twice at most.
    let records = summarise(&reader.finish().await?);
    assert_in_order(&records);
    let ids: std::collections::BTreeSet<&str> = records.iter().map(|(_, _, id)| id.as_str()).collect();
    assert_eq!(ids.len(), 40, "every event published");
    Ok(())
}
