//! The PostgreSQL outbox and its relay, against the real PostgreSQL and Kafka.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{
    TestResult, TestStore, assert_fetched_only_held_partitions, assert_in_order, drain, fast, fast_in_batches,
    publisher, read, start_relay, summarise,
};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicNaming};
use dbps_core::{Envelope, Message, PayloadLimits};
use dbps_outbox::pg::{Enqueued, MIGRATOR, PgOutbox, PgOutboxStore, PoisonPolicy, Retention};
use dbps_outbox::{Backlog, OutboxError, OutboxStore, Relay};
use dbps_testkit::eventually;
use rdkafka::Message as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct QuoteChanged {
    quote_id: String,
    note: String,
}

impl Message for QuoteChanged {
    const TYPE: &'static str = "quote.QuoteChanged";
}

struct Fixture {
    db: dbps_testkit::TestPostgres,
    kafka: dbps_testkit::TestKafka,
    outbox: PgOutbox,
    topic: String,
}

/// A database with the outbox tables and a topic for the quote aggregate's events.
async fn fixture(partitions: i32) -> Result<Fixture, Box<dyn std::error::Error + Send + Sync>> {
    let db = dbps_testkit::postgres().await?;
    MIGRATOR.run(db.pool()).await?;
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("quote.quote.events", partitions).await?;
    let naming = TopicNaming::new().events_pattern(topic.clone());
    Ok(Fixture {
        db,
        kafka,
        outbox: PgOutbox::new("quote").naming(naming),
        topic,
    })
}

impl Fixture {
    /// Commits one transaction with a `QuoteChanged` per `(aggregate, note)`, in order.
    async fn commit<const N: usize>(
        &self,
        changes: [(&str, &str); N],
    ) -> Result<[Enqueued; N], Box<dyn std::error::Error + Send + Sync>> {
        let mut tx = self.db.pool().begin().await?;
        let mut enqueued = Vec::with_capacity(N);
        for (aggregate, note) in changes {
            enqueued.push(
                self.outbox
                    .enqueue_event(&mut tx, "quote", aggregate, &change(aggregate, note))
                    .await?,
            );
        }
        tx.commit().await?;
        Ok(enqueued.try_into().map_err(|_| "one enqueued message per change")?)
    }
}

fn change(quote: &str, note: &str) -> QuoteChanged {
    QuoteChanged {
        quote_id: quote.into(),
        note: note.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transaction_publishes_nothing_and_committed_one_exactly_its_events() -> TestResult {
    let f = fixture(1).await?;
    let mut tx = f.db.pool().begin().await?;
    f.outbox
        .enqueue_event(&mut tx, "quote", "q-rolled-back", &change("q-rolled-back", "never"))
        .await?;
    tx.rollback().await?;

    let [a, b] = f.commit([("q-1", "created"), ("q-1", "priced")]).await?;
    assert_eq!((a.sequence, b.sequence), (Some(1), Some(2)));

    let (summary, records) = drain(
        fast(PgOutboxStore::new(f.db.pool().clone()), f.kafka.brokers())?,
        &f.kafka,
        &f.topic,
        2,
    )
    .await?;

    let seen = summarise(&records);
    assert_eq!(
        seen,
        vec![
            ("q-1".into(), 1, a.message_id.clone()),
            ("q-1".into(), 2, b.message_id.clone())
        ]
    );
    assert_eq!(summary.published, 2);
    let (left,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(f.db.pool())
        .await?;
    assert_eq!(left, 0, "published rows are deleted by default");
    let payload: serde_json::Value = serde_json::from_slice(records[1].payload().unwrap_or_default())?;
    assert_eq!(payload["note"], "priced");
    Ok(())
}

/// The classic BIGSERIAL gap: writers hold transactions open before COMMIT (taking ids
/// early, becoming visible late) while others commit and some roll back. The relay runs
/// throughout. The published set equals the committed set, in sequence order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commits_and_rollbacks_publish_exactly_the_committed_set_in_order() -> TestResult {
    // In batches of 3 the relay fetches ahead and marks behind nearly every round.
    for batch_size in [500, 3] {
        late_commits_and_rollbacks_in_batches_of(batch_size).await?;
    }
    Ok(())
}

async fn late_commits_and_rollbacks_in_batches_of(batch_size: usize) -> TestResult {
    let f = fixture(3).await?;
    let store = TestStore::recording(PgOutboxStore::new(f.db.pool().clone()));
    let (stop, relay) = start_relay(fast_in_batches(store.clone(), f.kafka.brokers(), batch_size)?);

    let writers = 16;
    let per_writer = 25;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pool = f.db.pool().clone();
        let outbox = f.outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for i in 0..per_writer {
                let aggregate = format!("q-{}", (w * 7 + i) % 10);
                let mut tx = pool.begin().await?;
                let enqueued = outbox
                    .enqueue_event(&mut tx, "quote", &aggregate, &change(&aggregate, "x"))
                    .await?;
                match (w + i) % 10 {
                    // Roll back one in ten.
                    0 => tx.rollback().await?,
                    // Hold one in five open before COMMIT.
                    1 | 2 => {
                        tokio::time::sleep(Duration::from_millis(50 + 20 * u64::try_from(i % 5).unwrap_or(0))).await;
                        tx.commit().await?;
                        committed.push(enqueued.message_id);
                    }
                    _ => {
                        tx.commit().await?;
                        committed.push(enqueued.message_id);
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(committed)
        }));
    }
    let mut committed = BTreeSet::new();
    for task in tasks {
        committed.extend(task.await??);
    }
    let reader = read(&f.kafka, &f.topic, committed.len()).await?;
    stop.cancel();
    relay.await??;
    let records = reader.finish().await?;

    let seen = summarise(&records);
    let published: BTreeSet<String> = seen.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(published.len(), seen.len(), "no duplicates in a run without crashes");
    assert_eq!(published, committed, "published set = committed set");
    assert_in_order(&seen);
    // Sequences per aggregate are contiguous: rolled-back transactions did not burn one.
    let mut per_aggregate: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (aggregate, sequence, _) in &seen {
        per_aggregate.entry(aggregate.clone()).or_default().push(*sequence);
    }
    for (aggregate, sequences) in per_aggregate {
        let expected: Vec<i64> = (1..=i64::try_from(sequences.len())?).collect();
        assert_eq!(sequences, expected, "{aggregate} in batches of {batch_size}");
    }
    if batch_size == 3 {
        assert!(store.seen(|s| s.fetched_ahead) > 0, "the relay fetched ahead");
    }
    Ok(())
}

/// Two relays split the partitions before anything is written; each then publishes
/// exactly the messages of the partitions it holds, in order, and nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_outbox_without_loss_or_reordering() -> TestResult {
    let f = fixture(4).await?;
    let store_a = TestStore::recording(PgOutboxStore::new(f.db.pool().clone()));
    let store_b = TestStore::recording(PgOutboxStore::new(f.db.pool().clone()));
    let (stop_a, relay_a) = start_relay(fast(store_a.clone(), f.kafka.brokers())?);
    store_a.holding(32).await?;
    let (stop_b, relay_b) = start_relay(fast(store_b.clone(), f.kafka.brokers())?);
    // The first relay gives up half at its next rebalance, and the second takes them.
    store_a.holding(16).await?;
    store_b.holding(16).await?;

    // One aggregate per lease partition, so that both relays have work.
    let aggregates: Vec<String> = sqlx::query_scalar(
        "select min(a) from (select 'q-' || i as a from generate_series(0, 999) i) x
         group by (hashtext(a) & 2147483647) % 32",
    )
    .fetch_all(f.db.pool())
    .await?;
    assert_eq!(aggregates.len(), 32);
    let mut committed = BTreeSet::new();
    for round in 0..20 {
        let mut tx = f.db.pool().begin().await?;
        for aggregate in &aggregates {
            let e = f
                .outbox
                .enqueue_event(&mut tx, "quote", aggregate, &change(aggregate, &round.to_string()))
                .await?;
            committed.insert(e.message_id);
        }
        tx.commit().await?;
    }
    let reader = read(&f.kafka, &f.topic, committed.len()).await?;
    stop_a.cancel();
    stop_b.cancel();
    let (a, b) = (relay_a.await??, relay_b.await??);
    let records = reader.finish().await?;

    let seen = summarise(&records);
    let published: BTreeSet<String> = seen.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(published, committed);
    assert_in_order(&seen);
    assert_fetched_only_held_partitions(&[&store_a, &store_b]);
    // Each relay published the 20 messages of each of its 16 partitions' aggregate.
    assert_eq!((a.published, b.published), (320, 320), "{a:?} {b:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_stopped_between_ack_and_mark_republishes_and_loses_nothing() -> TestResult {
    let f = fixture(1).await?;
    let mut committed = Vec::new();
    let notes: [String; 10] = std::array::from_fn(|i| i.to_string());
    committed.extend(
        f.commit(notes.each_ref().map(|n| ("q-1", n.as_str())))
            .await?
            .map(|e| e.message_id),
    );

    let crashing = TestStore::crash_before_mark(PgOutboxStore::new(f.db.pool().clone()));
    let (_stop, relay) = start_relay(fast(crashing.clone(), f.kafka.brokers())?);
    let first = read(&f.kafka, &f.topic, 10).await?.finish().await?;
    assert!(crashing.crashed(), "acknowledged, not marked");
    // The crash: the relay's task dies with its lease connection.
    relay.abort();
    let _ = relay.await;
    let (left,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(f.db.pool())
        .await?;
    assert_eq!(left, 10, "nothing was marked");

    let (_, all) = drain(
        fast(PgOutboxStore::new(f.db.pool().clone()), f.kafka.brokers())?,
        &f.kafka,
        &f.topic,
        20,
    )
    .await?;

    let seen = summarise(&all);
    assert_eq!(seen.len(), 20, "every message twice: once before the crash, once after");
    let ids: Vec<String> = seen.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(ids[..10], committed[..]);
    assert_eq!(ids[10..], committed[..], "the restart republished in order");
    assert_eq!(summarise(&first)[..10], seen[..10]);
    let (left,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(f.db.pool())
        .await?;
    assert_eq!(left, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_poison_event_does_not_block_other_aggregates_and_replays_after_the_fix() -> TestResult {
    // In batches of 1, the event after the poison is fetched ahead while the poison is
    // on its way to Kafka; it must not go out once the poison is parked.
    for (policy, batch_size) in [
        (PoisonPolicy::Continue, 500),
        (PoisonPolicy::HoldAggregate, 500),
        (PoisonPolicy::Continue, 1),
        (PoisonPolicy::HoldAggregate, 1),
    ] {
        let f = fixture(1).await?;
        let big = "x".repeat(20_000);
        let [_, poison, after, other] = f
            .commit([("q-big", "ok"), ("q-big", &big), ("q-big", "after"), ("q-other", "ok")])
            .await?;

        // A producer limited to 10 kB refuses the 20 kB event permanently.
        let small =
            KafkaPublisher::builder(KafkaConfig::new(f.kafka.brokers()).set("message.max.bytes", "10000")).build()?;
        let store = PgOutboxStore::new(f.db.pool().clone()).poison_policy(policy);
        let relay = Relay::builder(store.clone(), small)
            .batch_size(batch_size)
            .rebalance_interval(Duration::from_millis(200))
            .build()?;
        let (stop, task) = start_relay(relay);
        let expected_now = if policy == PoisonPolicy::Continue { 3 } else { 2 };
        let reader = read(&f.kafka, &f.topic, expected_now).await?;
        stop.cancel();
        let summary = task.await??;
        let records = reader.finish().await?;
        assert_eq!(summary.parked, 1, "{policy:?} in batches of {batch_size}");
        let ids: BTreeSet<String> = summarise(&records).into_iter().map(|(_, _, id)| id).collect();
        assert!(ids.contains(&other.message_id), "other aggregates flow ({policy:?})");
        assert_eq!(
            ids.contains(&after.message_id),
            policy == PoisonPolicy::Continue,
            "{policy:?} in batches of {batch_size}"
        );
        assert!(!ids.contains(&poison.message_id));

        let parked = store.parked().await?;
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].0.envelope.id, poison.message_id);
        assert!(parked[0].1.contains("produce to"), "reason recorded: {}", parked[0].1);
        assert_eq!(store.backlog().await?.parked, 1);

        // The fix: a producer that accepts it. Replay, and it goes out (before the held
        // event, under HoldAggregate).
        store.replay(parked[0].0.id).await?;
        let (_, all) = drain(fast(store.clone(), f.kafka.brokers())?, &f.kafka, &f.topic, 4).await?;
        let seen = summarise(&all);
        assert_eq!(seen.len(), 4, "{policy:?}");
        if policy == PoisonPolicy::HoldAggregate {
            assert_in_order(&seen);
        }
        assert!(store.parked().await?.is_empty());
        assert!(matches!(
            store.replay(parked[0].0.id).await,
            Err(OutboxError::NotParked { .. })
        ));
    }
    Ok(())
}

#[tokio::test]
async fn kept_rows_are_purged_by_retention() -> TestResult {
    let f = fixture(1).await?;
    let store = PgOutboxStore::new(f.db.pool().clone()).retention(Retention::Keep(Duration::from_secs(3600)));
    let [a, b] = f.commit([("q-1", "a"), ("q-1", "b")]).await?;
    store.mark_published(&[a.id, b.id]).await?;
    sqlx::query("update dbps_outbox set published_at = now() - interval '2 hours' where id = $1")
        .bind(a.id)
        .execute(f.db.pool())
        .await?;
    assert_eq!(store.purge_published(Duration::from_secs(3600)).await?, 1);
    let (left,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(f.db.pool())
        .await?;
    assert_eq!(left, 1);
    assert_eq!(
        store.backlog().await?,
        Backlog {
            pending: 0,
            oldest_age: None,
            parked: 0
        }
    );
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() -> TestResult {
    let f = fixture(1).await?;
    let strict = f.outbox.clone().limits(PayloadLimits::new(100, 4)?);
    let mut tx = f.db.pool().begin().await?;
    let error = strict
        .enqueue_event(&mut tx, "quote", "q-1", &change("q-1", &"x".repeat(200)))
        .await
        .unwrap_err();
    assert!(
        matches!(error, OutboxError::Message(dbps_core::Error::PayloadTooLarge { .. })),
        "{error:?}"
    );
    let envelope = Envelope::event("quote", "quote", "q-1", &change("q-1", "x"))?;
    let error = f
        .outbox
        .enqueue(&mut tx, "not a topic!", envelope.clone())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        OutboxError::Message(dbps_core::Error::InvalidTopic { .. })
    ));
    let mut spoofed = envelope;
    spoofed.headers.insert("ce_id".into(), "x".into());
    let error = f.outbox.enqueue(&mut tx, "quote.commands", spoofed).await.unwrap_err();
    assert!(matches!(
        error,
        OutboxError::Message(dbps_core::Error::InvalidAttribute {
            attribute: "headers",
            ..
        })
    ));
    tx.commit().await?;
    let (rows,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(f.db.pool())
        .await?;
    assert_eq!(rows, 0);

    // Without the migrations, the error says what to do.
    let bare = dbps_testkit::postgres().await?;
    let mut tx = bare.pool().begin().await?;
    let error = f
        .outbox
        .enqueue_event(&mut tx, "quote", "q-1", &change("q-1", "x"))
        .await
        .unwrap_err();
    assert!(matches!(error, OutboxError::MissingTable { .. }), "{error:?}");
    assert!(error.to_string().contains("run the migrations"));
    Ok(())
}

#[tokio::test]
async fn commands_and_replies_go_to_their_explicit_topic_unsequenced() -> TestResult {
    let f = fixture(1).await?;
    let command = Envelope::command("quote", "q-1", "quote.replies", &change("q-1", "reserve"))?;
    let mut tx = f.db.pool().begin().await?;
    let enqueued = f.outbox.enqueue(&mut tx, &f.topic, command).await?;
    tx.commit().await?;
    assert_eq!(enqueued.sequence, None);
    let (kind, reply_to): (String, Option<String>) =
        sqlx::query_as("select kind, reply_to from dbps_outbox where id = $1")
            .bind(enqueued.id)
            .fetch_one(f.db.pool())
            .await?;
    assert_eq!((kind.as_str(), reply_to.as_deref()), ("command", Some("quote.replies")));
    Ok(())
}

#[tokio::test]
async fn versioned_events_take_the_callers_version_and_leave_the_sequences_table_alone() -> TestResult {
    let f = fixture(1).await?;
    sqlx::query("create table quotes (id text primary key, version bigint not null)")
        .execute(f.db.pool())
        .await?;
    let mut committed = Vec::new();
    for note in ["a", "b", "c"] {
        let mut tx = f.db.pool().begin().await?;
        let version: i64 = sqlx::query_scalar(
            "insert into quotes as q (id, version) values ('q-1', 1)
             on conflict (id) do update set version = q.version + 1 returning version",
        )
        .fetch_one(&mut *tx)
        .await?;
        let enqueued = f
            .outbox
            .enqueue_versioned_event(&mut tx, "quote", "q-1", version, &change("q-1", note))
            .await?;
        assert_eq!(enqueued.sequence, Some(version));
        tx.commit().await?;
        committed.push(enqueued.message_id);
    }
    let (sequences,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox_sequences")
        .fetch_one(f.db.pool())
        .await?;
    assert_eq!(sequences, 0, "no sequences row for versioned events");

    // A version below 1 is refused and nothing is written.
    let mut tx = f.db.pool().begin().await?;
    let error = f
        .outbox
        .enqueue_versioned_event(&mut tx, "quote", "q-1", 0, &change("q-1", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, OutboxError::InvalidWrite(ref reason) if reason.contains("versions start at 1")),
        "{error:?}"
    );
    tx.commit().await?;

    let (_, records) = drain(
        fast(PgOutboxStore::new(f.db.pool().clone()), f.kafka.brokers())?,
        &f.kafka,
        &f.topic,
        3,
    )
    .await?;
    let seen = summarise(&records);
    assert_eq!(
        seen,
        vec![
            ("q-1".to_owned(), 1, committed[0].clone()),
            ("q-1".to_owned(), 2, committed[1].clone()),
            ("q-1".to_owned(), 3, committed[2].clone()),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_fetch_ahead_leaves_out_the_messages_in_flight_and_keeps_id_order() -> TestResult {
    let f = fixture(1).await?;
    let enqueued = f
        .commit([("q-1", "a"), ("q-2", "a"), ("q-1", "b"), ("q-3", "a"), ("q-2", "b")])
        .await?;
    let ids: Vec<i64> = enqueued.iter().map(|e| e.id).collect();
    let store = PgOutboxStore::new(f.db.pool().clone());
    assert!(store.overlaps_rounds());
    let mut lease = store.join().await?;
    store.rebalance(&mut lease).await?;
    let fetched = |batch: Vec<dbps_outbox::Pending>| batch.into_iter().map(|p| p.id).collect::<Vec<_>>();
    let ahead = store.fetch_excluding(&mut lease, 10, &[ids[0], ids[2]]).await?;
    assert_eq!(fetched(ahead), vec![ids[1], ids[3], ids[4]]);
    let ahead = store.fetch_excluding(&mut lease, 2, &[ids[1]]).await?;
    assert_eq!(
        fetched(ahead),
        vec![ids[0], ids[2]],
        "the limit applies after leaving out"
    );
    assert_eq!(fetched(store.fetch(&mut lease, 10).await?), ids);
    store.leave(lease).await?;
    Ok(())
}

/// Inserts `count` outbox rows of aggregate `q-1` in one statement.
async fn insert_rows(conn: &mut sqlx::PgConnection, count: i32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into dbps_outbox (topic, message_id, kind, message_type, schema_version, source,
             aggregate_type, aggregate_id, sequence, occurred_at, payload)
         select 'quote.quote.events', gen_random_uuid()::text, 'event', 'quote.QuoteChanged', 1, 'quote',
             'quote', 'q-1', i, now(), json_build_object('quote_id', 'q-1', 'note', repeat('x', 500))
         from generate_series(1, $1) i",
    )
    .bind(count)
    .execute(conn)
    .await?;
    Ok(())
}

/// (sequential scans, index scans) of `dbps_outbox` the statistics have counted so far.
async fn scans(pool: &sqlx::PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as("select seq_scan, coalesce(idx_scan, 0) from pg_stat_user_tables where relname = 'dbps_outbox'")
        .fetch_one(pool)
        .await
}

/// The relay's fetch reads the pending index in id order whatever the planner's
/// estimates say. (Seen in the benchmark: an outbox last analyzed while nearly empty,
/// then holding a backlog, was sorted whole on every fetch.) Here the database's cost
/// settings make a plain session sort; the relay's session still reads the index.
#[tokio::test]
async fn the_fetch_reads_the_index_whatever_the_estimates_say() -> TestResult {
    let f = fixture(1).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"alter database "{}" set random_page_cost = 10000"#,
        f.db.name()
    )))
    .execute(f.db.pool())
    .await?;
    // New connections take the setting.
    let pool = sqlx::PgPool::connect(f.db.url()).await?;
    let mut conn = pool.acquire().await?;
    insert_rows(&mut conn, 5_000).await?;
    sqlx::query("analyze dbps_outbox").execute(&mut *conn).await?;
    let plan: Vec<String> = sqlx::query_scalar(
        "explain select * from dbps_outbox where published_at is null and parked_at is null order by id limit 2000",
    )
    .fetch_all(&mut *conn)
    .await?;
    assert!(
        plan.iter().any(|line| line.contains("Sort")),
        "the premise: a plain session sorts: {plan:#?}"
    );
    sqlx::query("select pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await?;
    drop(conn);
    let (seq_before, idx_before) = scans(&pool).await?;

    let store = PgOutboxStore::new(pool.clone());
    let mut lease = store.join().await?;
    store.rebalance(&mut lease).await?;
    let batch = store.fetch(&mut lease, 2000).await?;
    assert_eq!(batch.len(), 2000);
    assert!(batch.windows(2).all(|w| w[0].id < w[1].id), "in id order");
    // Leaving closes the lease session, whose statistics reach the server as it exits.
    store.leave(lease).await?;
    eventually("the fetch's scan to be counted", || async {
        let (seq, idx) = scans(&pool).await?;
        Ok::<_, sqlx::Error>(seq > seq_before || idx > idx_before)
    })
    .await?;
    assert_eq!(scans(&pool).await?.0, seq_before, "no sequential scan of the outbox");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_row_is_parked_instead_of_stopping_the_relay() -> TestResult {
    let f = fixture(1).await?;
    let [bad, good] = f.commit([("q-1", "a"), ("q-2", "b")]).await?;
    // Damage one row behind the outbox's back: a kind no envelope has.
    sqlx::query("update dbps_outbox set kind = 'gossip' where id = $1")
        .bind(bad.id)
        .execute(f.db.pool())
        .await?;

    let store = PgOutboxStore::new(f.db.pool().clone());
    let (_, records) = drain(fast(store.clone(), f.kafka.brokers())?, &f.kafka, &f.topic, 1).await?;
    assert_eq!(
        summarise(&records).into_iter().map(|(_, _, id)| id).collect::<Vec<_>>(),
        vec![good.message_id]
    );
    let parked = store.parked().await;
    // Listing fails on the same corrupt row: the operator sees it in the error.
    assert!(
        matches!(parked, Err(OutboxError::Corrupt { id, .. }) if id == bad.id),
        "{parked:?}"
    );
    let (reason,): (Option<String>,) = sqlx::query_as("select park_reason from dbps_outbox where id = $1")
        .bind(bad.id)
        .fetch_one(f.db.pool())
        .await?;
    assert!(reason.is_some_and(|r| r.contains("corrupt row") && r.contains("gossip")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_purges_kept_rows_once_their_retention_ends() -> TestResult {
    let f = fixture(1).await?;
    let store = PgOutboxStore::new(f.db.pool().clone()).retention(Retention::Keep(Duration::from_secs(2)));
    let mut tx = f.db.pool().begin().await?;
    for i in 0..3 {
        f.outbox
            .enqueue_event(&mut tx, "quote", "q-1", &change("q-1", &i.to_string()))
            .await?;
    }
    tx.commit().await?;
    let (stop, relay) = start_relay(fast(store.clone(), f.kafka.brokers())?);
    read(&f.kafka, &f.topic, 3).await?;
    let (kept,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox where published_at is not null")
        .fetch_one(f.db.pool())
        .await?;
    assert_eq!(kept, 3, "published rows are kept for their retention");
    eventually("kept rows to be purged", || async {
        let (left,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
            .fetch_one(f.db.pool())
            .await?;
        Ok::<_, sqlx::Error>(left == 0)
    })
    .await?;
    stop.cancel();
    relay.await??;
    Ok(())
}

/// With polling and rebalancing an hour apart, only the commit notification can wake the
/// relay: an idle relay is woken by the first commit, and again after it went back to
/// sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_is_woken_by_commits_alone() -> TestResult {
    let f = fixture(1).await?;
    let relay = Relay::builder(PgOutboxStore::new(f.db.pool().clone()), publisher(f.kafka.brokers())?)
        .poll_interval(Duration::from_secs(3600))
        .rebalance_interval(Duration::from_secs(3600))
        .build()?;
    let (stop, task) = start_relay(relay);
    let asleep = || async {
        let (sleeping,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox_wake where sleeping")
            .fetch_one(f.db.pool())
            .await?;
        Ok::<_, sqlx::Error>(sleeping == 32)
    };
    let mut expected = 0;
    for round in 0..2 {
        // Wait until the relay (which owns every partition) has marked itself asleep.
        eventually("the relay to go to sleep", &asleep).await?;
        let mut tx = f.db.pool().begin().await?;
        for i in 0..5 {
            f.outbox
                .enqueue_event(&mut tx, "quote", "q-1", &change("q-1", &format!("{round}-{i}")))
                .await?;
        }
        tx.commit().await?;
        expected += 5;
        let records = read(&f.kafka, &f.topic, expected).await?.finish().await?;
        assert_eq!(records.len(), expected);
    }
    stop.cancel();
    task.await??;
    Ok(())
}
