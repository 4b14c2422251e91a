//! The PostgreSQL inbox: each effect applied once, against the real servers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{StockChanged, TestResult, consumer, eventually, start};
use dbps_core::CancellationToken;
use dbps_core::Envelope;
use dbps_core::inbox::pg::{self, PgInbox, TxHandler};
use dbps_core::kafka::{Handler, HandlerError, KafkaConfig, KafkaPublisher};
use sqlx::{PgConnection, PgPool};

/// Adds the event's quantity to a running total: applied twice, the total is wrong.
#[derive(Default)]
struct AddToStock {
    calls: AtomicUsize,
    fail_after_write: bool,
}

impl TxHandler for AddToStock {
    async fn handle(&self, conn: &mut PgConnection, message: &Envelope) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let event: StockChanged = serde_json::from_str(message.payload_json()).map_err(HandlerError::permanent)?;
        sqlx::query(
            "insert into stock (sku, on_hand, applied) values ($1, $2, 1)
             on conflict (sku) do update set on_hand = stock.on_hand + excluded.on_hand, applied = stock.applied + 1",
        )
        .bind(&event.sku)
        .bind(event.on_hand)
        .execute(&mut *conn)
        .await?;
        if self.fail_after_write {
            return Err(HandlerError::transient("crashed after writing"));
        }
        Ok(())
    }
}

async fn setup() -> Result<dbps_testkit::TestPostgres, Box<dyn std::error::Error + Send + Sync>> {
    let db = dbps_testkit::postgres().await?;
    pg::MIGRATOR.run(db.pool()).await?;
    sqlx::query("create table stock (sku text primary key, on_hand bigint not null, applied int not null)")
        .execute(db.pool())
        .await?;
    Ok(db)
}

async fn stock(pool: &PgPool, sku: &str) -> Result<(i64, i32), sqlx::Error> {
    sqlx::query_as("select on_hand, applied from stock where sku = $1")
        .bind(sku)
        .fetch_one(pool)
        .await
}

fn event(sku: &str, quantity: i64) -> Result<Envelope, dbps_core::Error> {
    common::stock_changed(sku, quantity)
}

#[tokio::test]
async fn message_delivered_twice_is_applied_once() -> TestResult {
    let db = setup().await?;
    let inbox = PgInbox::new(db.pool().clone(), "stock-totals", AddToStock::default());
    let message = event("sku-1", 5)?;
    assert!(inbox.apply(&message).await?);
    assert!(!inbox.apply(&message).await?, "the second delivery is a duplicate");
    assert_eq!(stock(db.pool(), "sku-1").await?, (5, 1));

    // Another consumer name is another effect: it applies the message itself.
    let other = PgInbox::new(db.pool().clone(), "stock-audit", AddToStock::default());
    assert!(other.apply(&message).await?);
    Ok(())
}

#[tokio::test]
async fn concurrent_duplicates_apply_once() -> TestResult {
    let db = setup().await?;
    let inbox = Arc::new(PgInbox::new(db.pool().clone(), "stock-totals", AddToStock::default()));
    let message = event("sku-1", 3)?;
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let inbox = Arc::clone(&inbox);
            let message = message.clone();
            tokio::spawn(async move { inbox.apply(&message).await })
        })
        .collect();
    let mut applied = 0;
    for attempt in attempts {
        applied += usize::from(attempt.await??);
    }
    assert_eq!(applied, 1);
    assert_eq!(stock(db.pool(), "sku-1").await?, (3, 1));
    Ok(())
}

#[tokio::test]
async fn failed_effect_rolls_back_its_inbox_record() -> TestResult {
    let db = setup().await?;
    let failing = PgInbox::new(
        db.pool().clone(),
        "stock-totals",
        AddToStock {
            fail_after_write: true,
            ..Default::default()
        },
    );
    let message = event("sku-1", 4)?;
    let error = failing.apply(&message).await.unwrap_err();
    assert!(error.is_transient());
    let (records,): (i64,) = sqlx::query_as("select count(*) from dbps_inbox")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(records, 0, "the inbox record rolled back with the effect");
    assert!(stock(db.pool(), "sku-1").await.is_err(), "the effect rolled back");

    let working = PgInbox::new(db.pool().clone(), "stock-totals", AddToStock::default());
    assert!(working.apply(&message).await?, "the retry applies it");
    assert_eq!(stock(db.pool(), "sku-1").await?, (4, 1));
    Ok(())
}

#[tokio::test]
async fn old_records_are_purged() -> TestResult {
    let db = setup().await?;
    sqlx::query(
        "insert into dbps_inbox (consumer, message_id, received_at)
         select 'c', 'old-' || g, now() - interval '8 days' from generate_series(1, 30) g
         union all select 'c', 'new-' || g, now() from generate_series(1, 5) g",
    )
    .execute(db.pool())
    .await?;
    let purged = pg::purge_older_than(db.pool(), Duration::from_secs(7 * 24 * 3600)).await?;
    assert_eq!(purged, 30);
    let (left,): (i64,) = sqlx::query_as("select count(*) from dbps_inbox")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(left, 5);
    Ok(())
}

/// A consumer that handled messages but never committed their offsets dies; the group's
/// next consumer gets every message again, and the inbox absorbs each duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_dropped_before_committing_redelivers_and_effects_apply_once() -> TestResult {
    let db = setup().await?;
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("stock.events", 3).await?;
    let dlq = kafka.create_topic("dlq", 1).await?;
    let group = kafka.group_id("stock-totals");
    let messages: Vec<Envelope> = (0..60)
        .map(|i| event(&format!("sku-{}", i % 6), 1))
        .collect::<Result<_, _>>()?;
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
    for result in publisher
        .publish_batch(messages.iter().map(|m| (topic.as_str(), m)))
        .await
    {
        result?;
    }

    let first = Arc::new(PgInbox::new(db.pool().clone(), "stock-totals", AddToStock::default()));
    let runner = consumer(kafka.brokers(), &group, &topic, &dlq, Arc::clone(&first))
        .commit_interval(Duration::from_secs(3600))
        .build()?;
    let crashed = tokio::spawn(runner.run(CancellationToken::new()));
    let pool = db.pool().clone();
    eventually("all 60 effects applied", || {
        let pool = pool.clone();
        async move {
            let (total,): (Option<i64>,) = sqlx::query_as("select sum(on_hand)::bigint from stock")
                .fetch_one(&pool)
                .await?;
            Ok(total == Some(60))
        }
    })
    .await?;
    // The crash: the run future is dropped with nothing committed.
    crashed.abort();
    let _ = crashed.await;

    let second = Arc::new(Counting {
        inner: PgInbox::new(db.pool().clone(), "stock-totals", AddToStock::default()),
        delivered: AtomicUsize::new(0),
    });
    let runner = consumer(kafka.brokers(), &group, &topic, &dlq, Arc::clone(&second)).build()?;
    let (stop, task) = start(runner);
    eventually("every message redelivered", || async {
        Ok(second.delivered.load(Ordering::SeqCst) >= 60)
    })
    .await?;
    stop.cancel();
    let summary = task.await??;
    assert_eq!(summary.handled, 60, "all redelivered and acknowledged");
    assert_eq!(
        second.inner_calls(),
        0,
        "every redelivery was a duplicate the inbox skipped"
    );

    let (total, applied): (Option<i64>, Option<i64>) =
        sqlx::query_as("select sum(on_hand)::bigint, sum(applied)::bigint from stock")
            .fetch_one(db.pool())
            .await?;
    assert_eq!((total, applied), (Some(60), Some(60)), "each effect exactly once");
    let (records,): (i64,) = sqlx::query_as("select count(*) from dbps_inbox")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(records, 60);
    Ok(())
}

/// Counts the deliveries that reached the inner handler and succeeded.
struct Counting<H> {
    inner: H,
    delivered: AtomicUsize,
}

impl<H: Handler> Handler for Counting<H> {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        self.inner.handle(message).await?;
        self.delivered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Counting<PgInbox<AddToStock>> {
    fn inner_calls(&self) -> usize {
        self.inner.handler().calls.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_batched_inbox_applies_each_message_once_and_a_failing_batch_not_at_all() -> TestResult {
    use dbps_core::BatchHandler as _;
    let db = setup().await?;
    let inbox = PgInbox::new(db.pool().clone(), "stock-batched", AddToStock::default()).batched(16);
    assert_eq!(inbox.max_batch(), 16);
    let (a, b) = (event("sku-1", 5)?, event("sku-1", 2)?);
    // A message twice in one batch, then the batch again: each applied once.
    inbox.handle_batch(&[a.clone(), b.clone(), a.clone()]).await?;
    inbox.handle_batch(&[b.clone(), a.clone()]).await?;
    assert_eq!(stock(db.pool(), "sku-1").await?, (7, 2));

    // A batch whose handler fails: its effect and its inbox record roll back together.
    let failing = PgInbox::new(
        db.pool().clone(),
        "stock-batched",
        AddToStock {
            fail_after_write: true,
            ..AddToStock::default()
        },
    )
    .batched(16);
    let c = event("sku-2", 1)?;
    assert!(failing.handle_batch(std::slice::from_ref(&c)).await.is_err());
    let recorded: i64 = sqlx::query_scalar("select count(*) from dbps_inbox where message_id = $1")
        .bind(&c.id)
        .fetch_one(db.pool())
        .await?;
    assert_eq!(recorded, 0, "the inbox record rolled back with the effect");
    let none: Option<(i64, i32)> = sqlx::query_as("select on_hand, applied from stock where sku = 'sku-2'")
        .fetch_optional(db.pool())
        .await?;
    assert_eq!(none, None);
    // Applied by a healthy handler afterwards, once.
    inbox.handle_batch(&[c.clone(), event("sku-2", 3)?]).await?;
    assert_eq!(stock(db.pool(), "sku-2").await?, (4, 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_whose_database_stops_answering_fails_transiently_within_its_timeout_and_keeps_no_dead_connection()
-> TestResult {
    let db = setup().await?;
    let link = db.faulty_link().await?;
    // Two connections: a dead connection returned to the pool would take one for good.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&link.url(db.url()))
        .await?;
    let inbox = PgInbox::new(pool, "stock", AddToStock::default()).timeout(Duration::from_secs(1));
    inbox.apply(&event("sku-1", 1)?).await?;

    // The database stops answering without closing anything.
    link.freeze();
    for n in 0..2 {
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(20), inbox.apply(&event(&format!("sku-{n}"), 1)?)).await;
        let error = outcome
            .map_err(|_| "the inbox hung on a silent database")?
            .expect_err("nothing answered");
        assert!(error.is_transient(), "a timeout is retried: {error}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    // It answers again: every connection of the pool works, none waits on a dead one.
    link.thaw();
    for n in 0..4 {
        let outcome =
            tokio::time::timeout(Duration::from_secs(20), inbox.apply(&event(&format!("sku-a{n}"), 1)?)).await;
        assert!(outcome.map_err(|_| "the inbox hung after the database came back")??);
    }
    assert_eq!(stock(db.pool(), "sku-a3").await?, (1, 1));
    Ok(())
}
