//! PostgreSQL projections against the real stack: the sequence guard under shuffled and
//! duplicated delivery, checkpoints across restarts, a blue-green rebuild into a new
//! version while live writes go on, what readers see at the switch, and append-only fact
//! tables (one row per event).

mod common;

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::TestResult;
use common::owner::{Customer, CustomerChanged, CustomerEvents, Owner};
use common::projection::{Error, ProgressLog, Watch, assert_handover, publish, scrambled};
use dbps_cache::CacheError;
use dbps_cache::projection::{Change, PgProjection, ReadModel, RebuildReport, RunSummary, lock_views};
use dbps_cache::replica::{PgReplica, Projection};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_core::{CancellationToken, Envelope, HandlerError};
use sqlx::PgPool;
use tokio::task::JoinHandle;

/// How a [`CustomerList`] keeps its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// One row per customer, replaced by each change and removed by a delete.
    Latest,
    /// One row per `CustomerChanged` (the customer's name history), appended; a delete
    /// adds no fact.
    History,
    /// As `History`, but a delete is a `Change::Delete` (refused beside appends).
    MixedHistory,
}

/// `<name>_v1 (aggregate_id, name, source_sequence)` (rows `Latest`), or
/// `<name>_v1 (aggregate_id, source_sequence, name)` keyed by both (rows `History`);
/// version 2 adds `email_count`, which only the events carry.
#[derive(Debug, Clone)]
struct CustomerList {
    name: &'static str,
    version: u32,
    topic: String,
    rows: Rows,
}

impl CustomerList {
    fn new(name: &'static str, version: u32, topic: &str) -> Self {
        Self {
            name,
            version,
            topic: topic.to_owned(),
            rows: Rows::Latest,
        }
    }

    fn history(name: &'static str, version: u32, topic: &str) -> Self {
        Self {
            rows: Rows::History,
            ..Self::new(name, version, topic)
        }
    }
}

impl ReadModel for CustomerList {
    type Events = CustomerEvents;

    fn name(&self) -> &str {
        self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    fn create_table(&self, table: &str) -> String {
        let extra = if self.version >= 2 {
            ", email_count integer not null"
        } else {
            ""
        };
        if self.rows == Rows::Latest {
            format!(
                "create table {table} (aggregate_id uuid primary key, name text not null, \
                 source_sequence bigint not null{extra})"
            )
        } else {
            format!(
                "create table {table} (aggregate_id uuid not null, source_sequence bigint not null, \
                 name text not null{extra}, primary key (aggregate_id, source_sequence))"
            )
        }
    }

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
        match (event, self.rows) {
            (CustomerEvents::Changed(CustomerChanged(customer)), rows) => {
                let mut row = serde_json::json!({ "name": customer.name });
                if self.version >= 2 {
                    row["email_count"] = serde_json::json!(customer.emails.len());
                }
                Ok(if rows == Rows::Latest {
                    Change::row(&row)?
                } else {
                    Change::append(&row)?
                })
            }
            (CustomerEvents::Deleted(_), Rows::Latest | Rows::MixedHistory) => Ok(Change::Delete),
            (CustomerEvents::Deleted(_), Rows::History) => Ok(Change::append_rows::<serde_json::Value>([])?),
        }
    }
}

async fn setup() -> Result<(dbps_testkit::TestPostgres, dbps_testkit::TestKafka, Owner), Error> {
    let db = dbps_testkit::postgres().await?;
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("report")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("dbps_replica", &dbps_cache::replica::MIGRATOR)
        .component("dbps_projection", &dbps_cache::projection::MIGRATOR)
        .run(&sqlx::postgres::PgConnectOptions::from_str(db.url())?)
        .await?;
    let owner = Owner::create(db.pool().clone()).await?;
    let kafka = dbps_testkit::kafka().await?;
    Ok((db, kafka, owner))
}

/// Runs `projection` in a task until `stop`.
fn running<M: ReadModel>(
    projection: &PgProjection<M>,
    config: &KafkaConfig,
    stop: &CancellationToken,
) -> JoinHandle<Result<RunSummary, CacheError>> {
    let (projection, config, stop) = (projection.clone(), config.clone(), stop.clone());
    tokio::spawn(async move { projection.run(&config, stop).await })
}

/// Rebuilds `projection` in a task (until `stop`).
fn rebuilding<M: ReadModel>(
    projection: &PgProjection<M>,
    config: &KafkaConfig,
    stop: &CancellationToken,
) -> JoinHandle<Result<RebuildReport, CacheError>> {
    let (projection, config, stop) = (projection.clone(), config.clone(), stop.clone());
    tokio::spawn(async move { projection.rebuild(&config, &stop).await })
}

/// Whether `error` says that a table does not exist (as a view before its first switch).
fn no_such_table(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("42P01"))
}

/// A read-only repeatable-read transaction.
async fn repeatable_read(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Creates the topic `topic` (`partitions`) holding a first history of the owner's (see
/// [`history`]); the topic's name, the configuration to read it, and the events.
async fn published(
    kafka: &dbps_testkit::TestKafka,
    owner: &Owner,
    topic: &str,
    partitions: i32,
    prefix: &str,
    count: usize,
    rounds: usize,
) -> Result<(String, KafkaConfig, Vec<Envelope>), Error> {
    let topic = kafka.create_topic(topic, partitions).await?;
    let events = history(owner, prefix, count, rounds).await?;
    publish(kafka, &topic, &events).await?;
    Ok((topic, KafkaConfig::new(kafka.brokers()), events))
}

/// `id → (name, sequence)` read through the view `name`.
async fn view(pool: &PgPool, name: &str) -> Result<BTreeMap<String, (String, i64)>, sqlx::Error> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select aggregate_id::text, name, source_sequence from {name}"
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, name, seq)| (id, (name, seq))).collect())
}

/// Waits until the view `name` holds exactly the owner's customers.
async fn converged(pool: &PgPool, owner: &Owner, name: &str) -> Result<(), Error> {
    dbps_testkit::eventually(&format!("{name} to hold the owner's customers"), || async {
        // The view does not exist before the first switch.
        match view(pool, name).await {
            Ok(seen) => Ok::<_, sqlx::Error>(seen == owner.names().await?),
            Err(e) if no_such_table(&e) => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await?;
    Ok(())
}

/// Creates `count` customers and renames each `rounds` times; returns their events in
/// order.
async fn history(owner: &Owner, prefix: &str, count: usize, rounds: usize) -> Result<Vec<Envelope>, sqlx::Error> {
    let mut events = Vec::new();
    let mut ids = Vec::new();
    for n in 0..count {
        let created = owner.upsert(Customer::new(&format!("{prefix}{n}"))).await?;
        ids.push(created.aggregate_id.clone());
        events.push(created);
    }
    for round in 0..rounds {
        for id in &ids {
            events.push(owner.rename(id, &format!("{prefix}-{round}")).await?);
        }
    }
    Ok(events)
}

#[tokio::test]
async fn shuffled_and_duplicated_events_give_the_same_read_model_as_in_order_once() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let mut events = history(&owner, "s", 30, 8).await?;
    // Some customers are deleted; a late rename after a delete must not bring one back.
    for event in events.iter().take(5).cloned().collect::<Vec<_>>() {
        events.push(owner.delete(&event.aggregate_id).await?);
    }
    let in_order = kafka.create_topic("in-order", 2).await?;
    let shuffled = kafka.create_topic("shuffled", 2).await?;
    publish(&kafka, &in_order, &events).await?;
    publish(&kafka, &shuffled, &scrambled(&events)).await?;

    let config = KafkaConfig::new(kafka.brokers());
    let stop = CancellationToken::new();
    let mut runs = Vec::new();
    for (name, topic) in [("list_in_order", &in_order), ("list_shuffled", &shuffled)] {
        let projection = PgProjection::builder(db.pool().clone(), CustomerList::new(name, 1, topic))
            .max_batch(16)
            .build()?;
        runs.push(running(&projection, &config, &stop));
    }
    converged(db.pool(), &owner, "list_in_order").await?;
    converged(db.pool(), &owner, "list_shuffled").await?;
    stop.cancel();
    for run in runs {
        run.await??;
    }
    let (once, shuffled) = (
        view(db.pool(), "list_in_order").await?,
        view(db.pool(), "list_shuffled").await?,
    );
    assert_eq!(once.len(), 25);
    assert_eq!(once, shuffled);
    let tombstones: i64 = sqlx::query_scalar(
        "select count(*) from dbps_replica_versions where replica = 'projection:list_shuffled_v1' and deleted",
    )
    .fetch_one(db.pool())
    .await?;
    assert_eq!(tombstones, 5, "the deleted customers keep their tombstones");
    Ok(())
}

#[tokio::test]
async fn a_restarted_projection_resumes_from_its_checkpoint() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let (topic, config, first) = published(&kafka, &owner, "events", 1, "r", 20, 4).await?;
    let list = CustomerList::new("list", 1, &topic);
    let projection = PgProjection::builder(db.pool().clone(), list.clone()).build()?;

    let stop = CancellationToken::new();
    let run = running(&projection, &config, &stop);
    converged(db.pool(), &owner, "list").await?;
    stop.cancel();
    let summary = run.await??;
    assert_eq!(summary.records, 100);
    assert_eq!(
        projection.checkpoints().await?,
        BTreeMap::from([((topic.clone(), 0), 100)])
    );

    // While it is down, more events arrive; a new instance takes up where it stopped.
    let mut more = Vec::new();
    for (n, event) in first.iter().take(20).enumerate() {
        more.push(owner.rename(&event.aggregate_id, &format!("later-{n}")).await?);
    }
    publish(&kafka, &topic, &more).await?;
    let projection = PgProjection::builder(db.pool().clone(), list).build()?;
    let stop = CancellationToken::new();
    let run = running(&projection, &config, &stop);
    converged(db.pool(), &owner, "list").await?;
    dbps_testkit::eventually("the checkpoint to reach the end", || async {
        Ok::<_, dbps_cache::CacheError>(projection.checkpoints().await?.get(&(topic.clone(), 0)) == Some(&120))
    })
    .await?;
    stop.cancel();
    let summary = run.await??;
    assert_eq!(
        summary.records, 20,
        "only the records after the checkpoint are read again"
    );
    Ok(())
}

#[tokio::test]
async fn a_rebuild_into_v2_during_live_writes_switches_atomically_without_gaps_or_regressions() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let (topic, config, past) = published(&kafka, &owner, "events", 2, "p", 60, 10).await?;
    let v1 = PgProjection::builder(db.pool().clone(), CustomerList::new("customer_list", 1, &topic))
        .max_batch(32)
        .build()?;
    let stop = CancellationToken::new();
    let v1_run = running(&v1, &config, &stop);
    converged(db.pool(), &owner, "customer_list").await?;
    assert_eq!(v1.serving_version().await?, Some(1));

    // A reader polls the view through the rebuild and the switch.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (pool, watching) = (db.pool().clone(), Arc::clone(&watching));
        async move {
            let mut watch = Watch::default();
            while watching.load(Ordering::SeqCst) {
                let rows = view(&pool, "customer_list").await?;
                watch.read(rows.len() as u64);
                for (id, (_, seq)) in rows {
                    watch.version(id, seq);
                }
                let columns: i64 = sqlx::query_scalar(
                    "select count(*) from information_schema.columns \
                     where table_name = 'customer_list' and column_name = 'email_count'",
                )
                .fetch_one(&pool)
                .await?;
                watch.saw_v2 |= columns > 0;
            }
            Ok::<_, sqlx::Error>(watch)
        }
    });

    // Live writes go on: new customers and renames, published as they happen.
    let writer = tokio::spawn({
        let (owner, topic, ids) = (
            owner.clone(),
            topic.clone(),
            past.iter().take(60).map(|e| e.aggregate_id.clone()).collect::<Vec<_>>(),
        );
        let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
        async move {
            for round in 0..40 {
                let mut events = vec![owner.upsert(Customer::new(&format!("live{round}"))).await?];
                for id in ids.iter().skip(round % 3).step_by(3) {
                    events.push(owner.rename(id, &format!("live-{round}")).await?);
                }
                for event in &events {
                    publisher.publish(&topic, event).await?;
                }
            }
            Ok::<_, Error>(())
        }
    });

    let progress = ProgressLog::default();
    let v2 = PgProjection::builder(db.pool().clone(), CustomerList::new("customer_list", 2, &topic))
        .max_batch(32)
        .on_progress(progress.recorder())
        .build()?;
    let v2_run = running(&v2, &config, &stop);

    // The old version notices that it is superseded and stops on its own.
    let v1_summary = v1_run.await??;
    assert_eq!(v1_summary.superseded_by, Some(2));
    assert_eq!(v2.serving_version().await?, Some(2));
    writer.await??;
    // After the switch, the live writes reach the view through v2.
    converged(db.pool(), &owner, "customer_list").await?;
    watching.store(false, Ordering::SeqCst);
    let watch = watcher.await??;
    stop.cancel();
    let v2_summary = v2_run.await??;
    assert_eq!(v2_summary.superseded_by, None);

    assert!(watch.reads > 0);
    assert_eq!(watch.count_drops, 0, "the view never lost rows: {watch:?}");
    assert_eq!(watch.regressions, 0, "no record went back in time: {watch:?}");
    assert!(watch.saw_v2, "the view serves v2's column");
    // Every customer's v2-only column is there and derived from its events.
    let missing: i64 = sqlx::query_scalar(
        "select count(*) from customer_list l join customers c on c.id = l.aggregate_id \
         where l.email_count <> jsonb_array_length(c.emails)",
    )
    .fetch_one(db.pool())
    .await?;
    assert_eq!(missing, 0);
    let served: i64 = sqlx::query_scalar("select count(*) from customer_list")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(served, 100);
    assert_handover(&v1.checkpoints().await?, &v2.checkpoints().await?, &progress, 660);
    Ok(())
}

/// Backends of the test's database waiting for a lock on `relation`.
async fn waiting_for(pool: &PgPool, relation: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from pg_locks where relation = to_regclass($1) and not granted")
        .bind(relation)
        .fetch_one(pool)
        .await
}

/// The rows of the view `name`, in the caller's transaction.
async fn count_in(conn: &mut sqlx::PgConnection, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {name}")))
        .fetch_one(conn)
        .await
}

/// Runs version 1 of the customer list `name` until it holds the owner's customers.
async fn serve_v1(
    db: &dbps_testkit::TestPostgres,
    owner: &Owner,
    config: &KafkaConfig,
    name: &'static str,
    topic: &str,
) -> Result<(), Error> {
    let v1 = PgProjection::builder(db.pool().clone(), CustomerList::new(name, 1, topic)).build()?;
    let stop = CancellationToken::new();
    let run = running(&v1, config, &stop);
    converged(db.pool(), owner, name).await?;
    stop.cancel();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn a_statement_that_waits_for_the_switch_reads_the_new_version_with_its_last_records() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let (topic, config, _) = published(&kafka, &owner, "events", 1, "w", 20, 2).await?;
    let name = "waiting_list";
    serve_v1(&db, &owner, &config, name, &topic).await?;

    // A reader of the view: the switch will wait for it to end before it replaces the view.
    let mut holder = db.pool().begin().await?;
    assert_eq!(count_in(&mut holder, name).await?, 20);
    // A batch of v1 in flight (it holds the state row in share mode), which the switch
    // waits for: v1 applies new records while v2's switch waits.
    let mut batch = db.pool().begin().await?;
    sqlx::query("select serving_version from dbps_projection_state where projection = $1 for share")
        .bind(name)
        .fetch_one(&mut *batch)
        .await?;
    let v2 = PgProjection::builder(db.pool().clone(), CustomerList::new(name, 2, &topic)).build()?;
    let stop = CancellationToken::new();
    let rebuild = rebuilding(&v2, &config, &stop);
    dbps_testkit::eventually("the switch to wait for the batch of v1", || async {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = current_database() \
             and pid <> pg_backend_pid() and wait_event_type = 'Lock' and query like '%for update%'",
        )
        .fetch_one(db.pool())
        .await?;
        Ok::<_, sqlx::Error>(waiting == 1)
    })
    .await?;
    // Five new customers, which the batch of v1 applies (it moves v1's checkpoint past
    // them): the switch applies them to v2 as its last records.
    let mut more = Vec::new();
    for n in 0..5 {
        more.push(owner.upsert(Customer::new(&format!("last{n}"))).await?);
    }
    publish(&kafka, &topic, &more).await?;
    sqlx::query(
        "update dbps_projection_checkpoints set next_offset = next_offset + 5 \
         where projection = $1 and version = 1",
    )
    .bind(name)
    .execute(&mut *batch)
    .await?;
    batch.commit().await?;
    dbps_testkit::eventually("the switch to wait for the reader of the view", || async {
        Ok::<_, sqlx::Error>(waiting_for(db.pool(), name).await? == 1)
    })
    .await?;

    // A repeatable-read statement on the view now takes its snapshot and waits for the
    // switch; it reads the view once the switch has committed, as v2.
    let reader = tokio::spawn({
        let pool = db.pool().clone();
        async move {
            let mut tx = repeatable_read(&pool).await?;
            let count = count_in(&mut tx, name).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(count)
        }
    });
    dbps_testkit::eventually("the reader to wait for the switch", || async {
        Ok::<_, sqlx::Error>(waiting_for(db.pool(), name).await? == 2)
    })
    .await?;
    assert!(!rebuild.is_finished(), "the switch waits for the reader of the view");
    assert!(!reader.is_finished(), "the statement waits for the switch");
    holder.commit().await?;
    let report = rebuild.await??;
    assert!(report.switched, "{report:?}");
    let count = reader.await??;
    assert_eq!(
        count, 25,
        "the reader that waited for the switch sees v2 with the records the switch applied last"
    );
    let mut conn = db.pool().acquire().await?;
    assert_eq!(count_in(&mut conn, name).await?, 25);
    let email_counts: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(email_count) from {name}")))
        .fetch_one(&mut *conn)
        .await?;
    assert_eq!(email_counts, 25, "the view serves v2");
    Ok(())
}

#[tokio::test]
async fn a_repeatable_read_reader_that_locks_the_views_first_reads_one_version_throughout() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let (topic, config, _) = published(&kafka, &owner, "events", 1, "l", 20, 2).await?;
    let name = "locked_list";
    serve_v1(&db, &owner, &config, name, &topic).await?;

    // Two readers whose snapshots are taken before the rebuild (by a first query on
    // another table); one locked the view before that query.
    let mut locked = repeatable_read(db.pool()).await?;
    lock_views(&mut locked, &[name]).await?;
    let mut unlocked = repeatable_read(db.pool()).await?;
    for tx in [&mut locked, &mut unlocked] {
        let _: i64 = sqlx::query_scalar("select count(*) from dbps_projection_state")
            .fetch_one(&mut **tx)
            .await?;
    }

    let v2 = PgProjection::builder(db.pool().clone(), CustomerList::new(name, 2, &topic)).build()?;
    let stop = CancellationToken::new();
    let rebuild = rebuilding(&v2, &config, &stop);
    // The switch waits for the reader that locked the view.
    dbps_testkit::eventually("the switch to wait for the locked reader (or end)", || async {
        Ok::<_, sqlx::Error>(rebuild.is_finished() || waiting_for(db.pool(), name).await? == 1)
    })
    .await?;
    assert!(
        !rebuild.is_finished(),
        "the switch went ahead of a reader that locked the view"
    );
    assert_eq!(
        count_in(&mut locked, name).await?,
        20,
        "the locked reader reads v1, which serves until it ends"
    );
    locked.commit().await?;
    assert!(rebuild.await??.switched);

    // The reader that did not lock resolves the view to v2 now, but reads it as of its
    // snapshot, from before v2 was filled: what the lock is there for.
    assert_eq!(count_in(&mut unlocked, name).await?, 0);
    unlocked.commit().await?;
    // A reader that locks after the switch reads v2, complete.
    let mut after = repeatable_read(db.pool()).await?;
    lock_views(&mut after, &[name]).await?;
    assert_eq!(count_in(&mut after, name).await?, 20);
    after.commit().await?;

    // Names are quoted (a schema may be given) or refused; nothing to lock is nothing done.
    let mut tx = db.pool().begin().await?;
    lock_views(&mut tx, &[format!("public.{name}")]).await?;
    lock_views::<&str>(&mut tx, &[]).await?;
    let refused = lock_views(&mut tx, &["x; drop table y"]).await.expect_err("refused");
    assert!(matches!(refused, CacheError::InvalidConfig { .. }), "{refused:?}");
    let missing = lock_views(&mut tx, &["no_such_view"]).await.expect_err("missing");
    assert!(
        matches!(&missing, CacheError::Postgres { source: sqlx::Error::Database(e), .. } if e.code().as_deref() == Some("42P01")),
        "{missing:?}"
    );
    tx.rollback().await?;
    Ok(())
}

#[tokio::test]
async fn invalid_declarations_are_typed_errors() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/none")
        .expect("lazy pool");
    let list = CustomerList::new;
    let bad = |model: CustomerList| {
        PgProjection::builder(pool.clone(), model)
            .build()
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(bad(list("x; drop table y", 1, "t")).contains("identifier"));
    assert!(bad(list("x", 0, "t")).contains("version"));
    assert!(bad(list("x", 1, "")).contains("topics"));
    let projection = PgProjection::builder(pool, list("orders", 3, "t"))
        .build()
        .expect("valid");
    assert_eq!((projection.table(), projection.version()), ("orders_v3", 3));
}

/// `(id, sequence) → name` of every `CustomerChanged` among `events`, each once.
fn facts(events: &[Envelope]) -> BTreeMap<(String, i64), String> {
    let registry = dbps_core::Registry::new();
    events
        .iter()
        .filter_map(|e| match dbps_core::MessageSet::decode(&registry, e) {
            Ok(CustomerEvents::Changed(CustomerChanged(c))) => {
                Some(((e.aggregate_id.clone(), e.sequence.expect("sequenced")), c.name))
            }
            _ => None,
        })
        .collect()
}

/// `(id, sequence) → name` of every row of `table`, and how many rows there are.
async fn fact_rows(pool: &PgPool, table: &str) -> Result<(BTreeMap<(String, i64), String>, usize), sqlx::Error> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select aggregate_id::text, source_sequence, name from {table}"
    )))
    .fetch_all(pool)
    .await?;
    let count = rows.len();
    Ok((
        rows.into_iter().map(|(id, seq, name)| ((id, seq), name)).collect(),
        count,
    ))
}

/// Waits until `table` holds exactly `expected`, one row each.
async fn holds_facts(pool: &PgPool, table: &str, expected: &BTreeMap<(String, i64), String>) -> Result<(), Error> {
    dbps_testkit::eventually(&format!("{table} to hold one row per event"), || async {
        match fact_rows(pool, table).await {
            Ok((rows, count)) => Ok::<_, sqlx::Error>(&rows == expected && count == expected.len()),
            Err(e) if no_such_table(&e) => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await?;
    let (rows, count) = fact_rows(pool, table).await?;
    assert_eq!((&rows, count), (expected, expected.len()), "{table}");
    Ok(())
}

#[tokio::test]
async fn a_fact_projection_holds_one_row_per_event_whatever_the_delivery_and_after_a_rebuild() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let mut events = history(&owner, "f", 20, 6).await?;
    for event in events.iter().take(4).cloned().collect::<Vec<_>>() {
        events.push(owner.delete(&event.aggregate_id).await?);
    }
    let expected = facts(&events);
    assert_eq!(expected.len(), 140);
    let topic = kafka.create_topic("facts", 2).await?;
    publish(&kafka, &topic, &scrambled(&events)).await?;

    let config = KafkaConfig::new(kafka.brokers());
    let stop = CancellationToken::new();
    let v1 = PgProjection::builder(db.pool().clone(), CustomerList::history("name_history", 1, &topic))
        .max_batch(16)
        .build()?;
    let v1_run = running(&v1, &config, &stop);
    holds_facts(db.pool(), "name_history", &expected).await?;
    // The version of each customer is its newest sequence, whatever came last.
    let mut newest: BTreeMap<String, i64> = BTreeMap::new();
    for event in &events {
        let held = newest.entry(event.aggregate_id.clone()).or_default();
        *held = (*held).max(event.sequence.expect("sequenced"));
    }
    dbps_testkit::eventually("the versions to reach the newest sequences", || async {
        let versions: Vec<(String, i64, bool)> = sqlx::query_as(
            "select aggregate_id, sequence, deleted from dbps_replica_versions \
             where replica = 'projection:name_history_v1'",
        )
        .fetch_all(db.pool())
        .await?;
        Ok::<_, sqlx::Error>(
            versions.iter().all(|(_, _, deleted)| !deleted)
                && versions
                    .into_iter()
                    .map(|(id, seq, _)| (id, seq))
                    .collect::<BTreeMap<_, _>>()
                    == newest,
        )
    })
    .await?;

    // A rebuild into v2 replays the history into a fresh table: the same facts, once.
    let v2 = PgProjection::builder(db.pool().clone(), CustomerList::history("name_history", 2, &topic))
        .max_batch(16)
        .build()?;
    let v2_run = running(&v2, &config, &stop);
    assert_eq!(v1_run.await??.superseded_by, Some(2));
    assert_eq!(v2.serving_version().await?, Some(2));
    holds_facts(db.pool(), "name_history", &expected).await?;
    holds_facts(db.pool(), "name_history_v2", &expected).await?;
    let counted: i64 = sqlx::query_scalar("select count(*) from name_history where email_count = 1")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(counted, 140);
    stop.cancel();
    v2_run.await??;
    Ok(())
}

#[tokio::test]
async fn a_fact_projection_re_reading_from_an_older_checkpoint_inserts_no_duplicate() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let (topic, config, mut events) = published(&kafka, &owner, "facts", 1, "c", 10, 3).await?;
    let model = CustomerList::history("names", 1, &topic);
    let projection = PgProjection::builder(db.pool().clone(), model.clone())
        .max_batch(8)
        .build()?;
    let stop = CancellationToken::new();
    let run = running(&projection, &config, &stop);
    holds_facts(db.pool(), "names", &facts(&events)).await?;
    stop.cancel();
    assert_eq!(run.await??.records, 40);

    // As after a crash between applying and recording the checkpoint (or a checkpoint
    // restored from an older backup): the next run reads from an earlier offset, and the
    // events it applied already come again, with new ones after them.
    sqlx::query("update dbps_projection_checkpoints set next_offset = 5 where projection = 'names'")
        .execute(db.pool())
        .await?;
    let mut more = Vec::new();
    for event in events.iter().take(10) {
        more.push(owner.rename(&event.aggregate_id, "later").await?);
    }
    publish(&kafka, &topic, &more).await?;
    events.extend(more);
    let projection = PgProjection::builder(db.pool().clone(), model).max_batch(8).build()?;
    let stop = CancellationToken::new();
    let run = running(&projection, &config, &stop);
    dbps_testkit::eventually("the checkpoint to reach the end", || async {
        Ok::<_, CacheError>(projection.checkpoints().await?.get(&(topic.clone(), 0)) == Some(&50))
    })
    .await?;
    holds_facts(db.pool(), "names", &facts(&events)).await?;
    stop.cancel();
    assert_eq!(run.await??.records, 45, "read again from offset 5");
    Ok(())
}

#[tokio::test]
async fn mixing_appends_with_other_changes_and_appending_to_a_replica_are_typed_errors() -> TestResult {
    let (db, kafka, owner) = setup().await?;
    let topic = kafka.create_topic("mixed", 1).await?;
    let created = owner.upsert(Customer::new("Mix")).await?;
    let deleted = owner.delete(&created.aggregate_id).await?;
    // The delete first: in one batch the mix is refused, in two the append finds the
    // tombstone.
    publish(&kafka, &topic, &[deleted, created.clone()]).await?;
    let model = CustomerList {
        rows: Rows::MixedHistory,
        ..CustomerList::history("mixed", 1, &topic)
    };
    let projection = PgProjection::builder(db.pool().clone(), model).build()?;
    let config = KafkaConfig::new(kafka.brokers());
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        projection.run(&config, CancellationToken::new()),
    )
    .await?;
    assert!(
        matches!(&ended, Err(CacheError::MixedChanges { aggregate_id, .. }) if *aggregate_id == created.aggregate_id),
        "{ended:?}"
    );
    // The refused record was not applied: the checkpoint stays before it.
    let checkpoint = projection.checkpoints().await?.get(&(topic.clone(), 0)).copied();
    assert!(checkpoint.unwrap_or(0) <= 1, "{checkpoint:?}");

    // A replica keeps the owner's state; it refuses facts before writing anything.
    sqlx::raw_sql("create table fact_replica (aggregate_id uuid, source_sequence bigint, name text)")
        .execute(db.pool())
        .await?;
    let replica = PgReplica::builder(db.pool().clone(), "fact_replica", Appending).build()?;
    let error = replica.apply(&[created]).await.expect_err("refused");
    assert!(!error.is_transient());
    assert!(error.to_string().contains("append"), "{error}");
    let kept: i64 = sqlx::query_scalar("select count(*) from fact_replica")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(kept, 0);
    Ok(())
}

/// A replica's projection that (wrongly) appends.
struct Appending;

impl Projection for Appending {
    type Events = CustomerEvents;
    type Snapshot = Customer;

    fn project(&self, _: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
        Ok(Change::append(&serde_json::json!({ "name": "x" }))?)
    }

    fn snapshot(&self, _: Customer) -> Result<Change, HandlerError> {
        Ok(Change::Delete)
    }
}
