//! The `replica` scenario: a PostgreSQL replica (`dbps_cache::replica::PgReplica`) beside
//! the same consumer runner that writes nothing, in the same run.
//!
//! Phases (`D` is `--duration`):
//!
//! 1. raw commits: eight tasks commit one-row inserts for `D/4` (`raw_pg_commit_tps`);
//! 2. apply from a backlog: `--backlog` events over `--aggregates` customers are on a
//!    topic; a runner with a handler that writes nothing (A) and a runner with the
//!    replica (B) each read all of it, ABBA, each with a fresh group and an empty replica.
//!    The clock starts at the first handled batch, so the group join is not counted, and
//!    each run starts after a `CHECKPOINT`;
//! 3. lag at half load: writers update customers and write their events with the outbox
//!    for `D/4` flat out, then at half that rate for `D/2` while the relay publishes and
//!    two runners consume the topic: one that writes nothing (the outbox's own commit →
//!    consumer latency) and the replica (commit → row committed in the replica). Both
//!    clocks start at the event's `occurred_at`, taken in the writing transaction (the
//!    phase starts after a `CHECKPOINT`);
//! 4. reconcile: `--reconcile-records` customers and a replica holding the same, compared
//!    by the reconciler (clean), then with 100 records damaged (50 rows removed, 50 set
//!    back) compared and repaired.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use dbps_cache::replica::{Change, PgReplica, PgSnapshotSource, Projection, Reconciler};
use dbps_core::kafka::{ConsumerRunner, KafkaConfig, KafkaPublisher, RunSummary, TopicNaming};
use dbps_core::{BatchHandler, CancellationToken, Envelope, HandlerError, Message, message_set};
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use hdrhistogram::Histogram;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use tokio::task::JoinHandle;

use crate::outbox::write_json;
use crate::progress;
use crate::report::{Target, table, thousands};
use crate::servers::{Scratch, Servers, git_commit};

/// Options of the `replica` scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long the timed phases run together.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Events in the backlog of the apply phase.
    #[arg(long, default_value_t = 100_000)]
    backlog: u64,
    /// Customers the events are about.
    #[arg(long, default_value_t = 10_000)]
    aggregates: u64,
    /// Records the reconciler compares.
    #[arg(long, default_value_t = 100_000)]
    reconcile_records: u64,
    /// Partitions of the topics.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Writers in the lag phase.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Writes the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

const SCHEMA: &str = "
create table bench_customers (id bigint primary key, name text not null, tax_number text not null, version bigint not null);
create table bench_customer_cache (id bigint primary key, name text not null, tax_number text, source_sequence bigint not null);
create table bench_commits (x integer not null);
";

/// A customer's state, as its events carry it (about 60 bytes of JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CustomerChanged {
    pub(crate) name: String,
    pub(crate) tax_number: String,
}

impl Message for CustomerChanged {
    const TYPE: &'static str = "customer.CustomerChanged";
}

message_set! {
    pub(crate) enum CustomerEvents { Changed(CustomerChanged) }
}

/// Quote's customer cache: name and tax number.
struct CustomerCache;

impl Projection for CustomerCache {
    type Events = CustomerEvents;
    type Snapshot = CustomerChanged;

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
        let CustomerEvents::Changed(changed) = event;
        self.snapshot(changed)
    }

    fn snapshot(&self, changed: CustomerChanged) -> Result<Change, HandlerError> {
        Ok(Change::row(&changed)?)
    }
}

/// A handler that writes nothing: the runner's own cost.
#[derive(Clone, Copy)]
pub(crate) struct NoWrites;

impl BatchHandler for NoWrites {
    fn max_batch(&self) -> usize {
        512
    }

    async fn handle_batch(&self, _: &[Envelope]) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Counts what a handler finished and, while recording, how long after its
/// `occurred_at` each message was done.
#[derive(Clone)]
pub(crate) struct Counting<B> {
    inner: B,
    done: Arc<AtomicU64>,
    recording: Arc<AtomicBool>,
    lag: Arc<std::sync::Mutex<Histogram<u64>>>,
}

impl<B> Counting<B> {
    pub(crate) fn new(inner: B) -> anyhow::Result<Self> {
        Ok(Self {
            inner,
            done: Arc::new(AtomicU64::new(0)),
            recording: Arc::new(AtomicBool::new(false)),
            lag: Arc::new(std::sync::Mutex::new(Histogram::new(3)?)),
        })
    }

    fn lag_ms(&self) -> Millis {
        let lag = self.lag.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = |q| lag.value_at_quantile(q) as f64 / 1000.0;
        Millis {
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

impl<B: BatchHandler> BatchHandler for Counting<B> {
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }

    async fn handle_batch(&self, messages: &[Envelope]) -> Result<(), HandlerError> {
        self.inner.handle_batch(messages).await?;
        if self.recording.load(Ordering::Relaxed) {
            let now = chrono::Utc::now();
            let mut lag = self.lag.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for message in messages {
                let micros = (now - message.occurred_at).num_microseconds().unwrap_or(0).max(0);
                let _ = lag.record(u64::try_from(micros).unwrap_or(0));
            }
        }
        self.done.fetch_add(messages.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// p50, p99 and p99.9 in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Millis {
    p50: f64,
    p99: f64,
    p999: f64,
}

/// Everything the scenario measured.
#[derive(Debug, Serialize)]
struct ReplicaReport {
    scenario: &'static str,
    apply_eps: f64,
    raw_consume_eps: f64,
    apply_vs_raw_consume: f64,
    raw_pg_commit_tps: f64,
    lag_ms: Millis,
    outbox_consumer_lag_ms: Millis,
    lag_p99_beyond_outbox_ms: f64,
    lag_load_events_per_s: f64,
    max_outbox_write_per_s: f64,
    reconcile_clean_s: f64,
    reconcile_drift_s: f64,
    reconcile_records: u64,
    drift_found: usize,
    drift_repaired: usize,
    backlog: u64,
    aggregates: u64,
    partitions: i32,
    duration_s: f64,
    wall_time_s: f64,
    cores: usize,
    git_commit: String,
    date: String,
    targets: Vec<Target>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let wall = Instant::now();
    let servers = Servers::from_env()?;
    let scratch = Scratch::create(&servers, args.partitions).await?;
    let result = measure(&args, &servers, &scratch).await;
    scratch.remove().await;
    let mut report = result?;
    report.wall_time_s = wall.elapsed().as_secs_f64();
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// Runs `handler` over `topic` in a fresh group until `total` messages are done; returns
/// messages per second from the first handled batch on.
pub(crate) async fn drain<B: BatchHandler + Clone>(
    servers: &Servers,
    scratch: &Scratch,
    topic: &str,
    handler: Counting<B>,
    total: u64,
    label: &str,
) -> anyhow::Result<f64> {
    let group = format!("{}-{}", scratch.database, rand::rng().random::<u32>());
    let (stop, task) = spawn_runner(servers, scratch, topic, &group, handler.clone())?;
    let bar = progress::counted(label, total);
    let mut first: Option<(Instant, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = handler.done.load(Ordering::SeqCst);
        bar.set_position(done);
        if first.is_none() && done > 0 {
            first = Some((Instant::now(), done));
        }
        if done >= total {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{label}: only {done} of {total} after 10 minutes"
        );
        anyhow::ensure!(!task.is_finished(), "{label}: the runner stopped early");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let finished = Instant::now();
    stop.cancel();
    task.await??;
    let (started, at_start) = first.unwrap_or((finished, 0));
    let rate = (total - at_start) as f64 / (finished - started).as_secs_f64().max(1e-6);
    progress::done(&bar, label, &format!("{}/s", thousands(rate)));
    Ok(rate)
}

fn spawn_runner<B: BatchHandler>(
    servers: &Servers,
    scratch: &Scratch,
    topic: &str,
    group: &str,
    handler: B,
) -> anyhow::Result<(CancellationToken, JoinHandle<dbps_core::Result<RunSummary>>)> {
    let runner = ConsumerRunner::builder(KafkaConfig::new(&servers.brokers), group, handler)
        .topic(topic)
        .dead_letter_topic(&scratch.topics.dead_letters)
        .max_queued_per_partition(4096)
        .build()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(runner.run(stop.clone()));
    Ok((stop, task))
}

fn replica(pool: &PgPool) -> anyhow::Result<PgReplica<CustomerCache>> {
    Ok(PgReplica::builder(pool.clone(), "bench_customer_cache", CustomerCache)
        .aggregate_column("id")
        .build()?)
}

/// Empties the replica and writes every dirty page out (`CHECKPOINT`), so that each
/// timed phase starts from the same state: otherwise the checkpoint that the previous
/// phase's writes make due lands in the next one, with its full-page writes.
async fn reset_replica(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("truncate bench_customer_cache, dbps_inbox, dbps_replica_versions")
        .execute(pool)
        .await?;
    checkpoint(pool).await
}

pub(crate) async fn checkpoint(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("checkpoint")
        .execute(pool)
        .await
        .context("CHECKPOINT (the bench's role needs superuser or pg_checkpoint)")?;
    Ok(())
}

async fn measure(args: &Args, servers: &Servers, scratch: &Scratch) -> anyhow::Result<ReplicaReport> {
    let setup = progress::spinner("set up");
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("bench")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("dbps_replica", &dbps_cache::replica::MIGRATOR)
        .run(&scratch.options)
        .await
        .context("migrations")?;
    let pool = scratch.pool(u32::try_from(args.writers)? + 8, "dbps-bench").await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await.context("bench tables")?;
    progress::done(&setup, "set up", &format!("{} partitions", args.partitions));

    // 1. Raw commits.
    let raw_pg_commit_tps = raw_commits(&pool, args.duration / 4).await?;

    // 2. The backlog, then ABBA.
    let publisher = KafkaPublisher::builder(KafkaConfig::new(&servers.brokers)).build()?;
    let mut sequences = vec![0i64; usize::try_from(args.aggregates)?];
    publish_backlog(&publisher, &scratch.topics.raw, 0..args.backlog, &mut sequences).await?;
    let raw_topic = scratch.topics.raw.clone();
    let mut raw_rates = Vec::new();
    let mut apply_rates = Vec::new();
    for (n, apply) in [false, true, true, false].into_iter().enumerate() {
        if apply {
            reset_replica(&pool).await?;
            let rate = drain(
                servers,
                scratch,
                &raw_topic,
                Counting::new(replica(&pool)?)?,
                args.backlog,
                &format!("apply {}", n + 1),
            )
            .await?;
            apply_rates.push(rate);
        } else {
            checkpoint(&pool).await?;
            let rate = drain(
                servers,
                scratch,
                &raw_topic,
                Counting::new(NoWrites)?,
                args.backlog,
                &format!("raw consume {}", n + 1),
            )
            .await?;
            raw_rates.push(rate);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (apply_eps, raw_consume_eps) = (mean(&apply_rates), mean(&raw_rates));
    let held: i64 = sqlx::query_scalar("select count(*) from bench_customer_cache")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        u64::try_from(held)? == args.aggregates.min(args.backlog),
        "the replica holds {held} customers"
    );

    // 3. Lag at half load.
    reset_replica(&pool).await?;
    let (max_write, lag, outbox_lag, load) = lag_phase(args, servers, scratch, &pool).await?;

    // 4. Reconcile.
    let (clean_s, drift_s, found, repaired) = reconcile_phase(args, &pool).await?;

    let lag_beyond = lag.p99 - outbox_lag.p99;
    let targets = vec![
        Target::at_least("apply_eps", apply_eps, 20_000.0),
        Target::at_most("lag_p99_beyond_outbox_ms", lag_beyond, 25.0),
        Target::at_most("reconcile_clean_s", clean_s, 2.0),
    ];
    Ok(ReplicaReport {
        scenario: "replica",
        apply_eps,
        raw_consume_eps,
        apply_vs_raw_consume: apply_eps / raw_consume_eps.max(1e-9),
        raw_pg_commit_tps,
        lag_ms: lag,
        outbox_consumer_lag_ms: outbox_lag,
        lag_p99_beyond_outbox_ms: lag_beyond,
        lag_load_events_per_s: load,
        max_outbox_write_per_s: max_write,
        reconcile_clean_s: clean_s,
        reconcile_drift_s: drift_s,
        reconcile_records: args.reconcile_records,
        drift_found: found,
        drift_repaired: repaired,
        backlog: args.backlog,
        aggregates: args.aggregates,
        partitions: args.partitions,
        duration_s: args.duration.as_secs_f64(),
        wall_time_s: 0.0,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        git_commit: git_commit(),
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        targets,
    })
}

/// Publishes the events `numbers` (event `n` is about customer `n % sequences.len()`,
/// whose sequence it takes from `sequences`) to `topic`, a thousand at a time.
pub(crate) async fn publish_backlog(
    publisher: &KafkaPublisher,
    topic: &str,
    numbers: std::ops::Range<u64>,
    sequences: &mut [i64],
) -> anyhow::Result<()> {
    let count = numbers.end - numbers.start;
    let bar = progress::counted("backlog", count);
    let aggregates = sequences.len() as u64;
    let mut batch = Vec::with_capacity(1000);
    for n in numbers.clone() {
        let customer = n % aggregates;
        let slot = &mut sequences[usize::try_from(customer)?];
        *slot += 1;
        let mut event = Envelope::event("customer", "customer", customer.to_string(), &changed(n))?;
        event.sequence = Some(*slot);
        batch.push(event);
        if batch.len() == 1000 || n + 1 == numbers.end {
            for result in publisher.publish_batch(batch.iter().map(|e| (topic, e))).await {
                result?;
            }
            bar.inc(batch.len() as u64);
            batch.clear();
        }
    }
    progress::done(&bar, "backlog", &format!("{} events", thousands(count as f64)));
    Ok(())
}

pub(crate) fn changed(n: u64) -> CustomerChanged {
    CustomerChanged {
        name: format!("Customer {n}"),
        tax_number: format!("DE{:09}", n % 1_000_000_000),
    }
}

pub(crate) async fn raw_commits(pool: &PgPool, duration: Duration) -> anyhow::Result<f64> {
    let bar = progress::timed("raw commits (one-row inserts)", duration);
    let end = Instant::now() + duration;
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (pool, count) = (pool.clone(), Arc::clone(&count));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                sqlx::query("insert into bench_commits values (1)")
                    .execute(&pool)
                    .await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, sqlx::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let tps = count.load(Ordering::Relaxed) as f64 / duration.as_secs_f64();
    progress::done(
        &bar,
        "raw commits (one-row inserts)",
        &format!("{} tx/s", thousands(tps)),
    );
    Ok(tps)
}

/// One customer update with its event, in one transaction.
async fn write_one(pool: &PgPool, outbox: &PgOutbox, id: i64, n: u64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let event = changed(n);
    sqlx::query(
        "insert into bench_customers (id, name, tax_number, version) values ($1, $2, $3, 1)
         on conflict (id) do update set name = excluded.name, tax_number = excluded.tax_number,
         version = bench_customers.version + 1",
    )
    .bind(id)
    .bind(&event.name)
    .bind(&event.tax_number)
    .execute(&mut *tx)
    .await?;
    outbox
        .enqueue_event(&mut tx, "customer", &id.to_string(), &event)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Writers for `duration`, flat out (`rate` None) or at `rate` writes per second in all.
async fn write_load(
    args: &Args,
    pool: &PgPool,
    outbox: &PgOutbox,
    rate: Option<f64>,
    duration: Duration,
    written: &Arc<AtomicU64>,
) -> anyhow::Result<f64> {
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let (pool, outbox, written) = (pool.clone(), outbox.clone(), Arc::clone(written));
        let aggregates = i64::try_from(args.aggregates)?;
        let period = rate.map(|r| Duration::from_secs_f64(args.writers as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut ticks = period.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut n = w as u64;
            while Instant::now() < end {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                let id = rand::rng().random_range(0..aggregates);
                write_one(&pool, &outbox, id, n).await?;
                written.fetch_add(1, Ordering::SeqCst);
                n += 1;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let before = written.load(Ordering::SeqCst);
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok((written.load(Ordering::SeqCst) - before) as f64 / started.elapsed().as_secs_f64())
}

async fn lag_phase(
    args: &Args,
    servers: &Servers,
    scratch: &Scratch,
    pool: &PgPool,
) -> anyhow::Result<(f64, Millis, Millis, f64)> {
    let topic = scratch.topics.events.clone();
    let outbox = PgOutbox::new("customer").naming(TopicNaming::new().events_pattern(topic.clone()));
    let publisher = KafkaPublisher::builder(KafkaConfig::new(&servers.brokers)).build()?;
    let relay = Relay::builder(PgOutboxStore::new(pool.clone()), publisher).build()?;
    let relay_stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(relay_stop.clone()));
    let plain = Counting::new(NoWrites)?;
    let applied = Counting::new(replica(pool)?)?;
    let group = |name: &str| format!("{}-{name}", scratch.database);
    let (plain_stop, plain_task) = spawn_runner(servers, scratch, &topic, &group("plain"), plain.clone())?;
    let (replica_stop, replica_task) = spawn_runner(servers, scratch, &topic, &group("replica"), applied.clone())?;

    let written = Arc::new(AtomicU64::new(0));
    let label = "outbox writes, flat out";
    let bar = progress::timed(label, args.duration / 4);
    let max_write = write_load(args, pool, &outbox, None, args.duration / 4, &written).await?;
    progress::done(&bar, label, &format!("{}/s", thousands(max_write)));
    // Both consumers catch up before the recorded window.
    let caught_up = |target: u64| {
        let (plain, applied) = (plain.clone(), applied.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while plain.done.load(Ordering::SeqCst) < target || applied.done.load(Ordering::SeqCst) < target {
                anyhow::ensure!(Instant::now() < deadline, "the consumers did not catch up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
    };
    caught_up(written.load(Ordering::SeqCst)).await?;
    plain.recording.store(true, Ordering::SeqCst);
    applied.recording.store(true, Ordering::SeqCst);
    let label = "half load, lag recorded";
    let bar = progress::timed(label, args.duration / 2);
    let load = write_load(args, pool, &outbox, Some(max_write / 2.0), args.duration / 2, &written).await?;
    caught_up(written.load(Ordering::SeqCst)).await?;
    plain.recording.store(false, Ordering::SeqCst);
    applied.recording.store(false, Ordering::SeqCst);
    let (lag, outbox_lag) = (applied.lag_ms(), plain.lag_ms());
    progress::done(
        &bar,
        label,
        &format!(
            "{}/s: replica p99 {:.1} ms, outbox consumer p99 {:.1} ms",
            thousands(load),
            lag.p99,
            outbox_lag.p99
        ),
    );
    for (stop, task) in [(plain_stop, plain_task), (replica_stop, replica_task)] {
        stop.cancel();
        task.await??;
    }
    relay_stop.cancel();
    relay_task.await??;
    Ok((max_write, lag, outbox_lag, load))
}

async fn reconcile_phase(args: &Args, pool: &PgPool) -> anyhow::Result<(f64, f64, usize, usize)> {
    let label = "reconcile";
    let bar = progress::spinner(label);
    let records = i64::try_from(args.reconcile_records)?;
    sqlx::raw_sql("truncate bench_customers, bench_customer_cache, dbps_replica_versions")
        .execute(pool)
        .await?;
    sqlx::query(
        "insert into bench_customers select n, 'Customer ' || n, 'DE' || n, 1 + n % 7 from generate_series(1, $1) n",
    )
    .bind(records)
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into bench_customer_cache select id, name, tax_number, version from bench_customers;
         ",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into dbps_replica_versions (replica, aggregate_id, sequence)
         select 'bench_customer_cache', id::text, version from bench_customers",
    )
    .execute(pool)
    .await?;
    sqlx::raw_sql("analyze bench_customers; analyze bench_customer_cache")
        .execute(pool)
        .await?;
    let source = PgSnapshotSource::new(pool.clone(), "bench_customers", "id", "version")?;
    let clean = Reconciler::new(source.clone(), replica(pool)?);
    // One run to warm the caches, then the timed one.
    clean.run().await?;
    let report = clean.run().await?;
    anyhow::ensure!(
        report.is_clean(),
        "an identical replica was reported as drifted: {report:?}"
    );
    let clean_s = report.took.as_secs_f64();
    sqlx::query("delete from bench_customer_cache where id % 2000 = 1")
        .execute(pool)
        .await?;
    sqlx::query("update bench_customer_cache set source_sequence = 0 where id % 2000 = 2")
        .execute(pool)
        .await?;
    let drifted = Reconciler::new(source, replica(pool)?).repair(true).run().await?;
    let found = drifted.missing.len() + drifted.stale.len() + drifted.extra.len();
    anyhow::ensure!(
        u64::try_from(found)? == 2 * args.reconcile_records.div_ceil(2000).min(args.reconcile_records),
        "expected the damaged records, found {found}"
    );
    let drift_s = drifted.took.as_secs_f64();
    progress::done(
        &bar,
        label,
        &format!(
            "{} records: clean {clean_s:.2} s; {found} drifted found and repaired in {drift_s:.2} s",
            thousands(records as f64)
        ),
    );
    Ok((clean_s, drift_s, found, drifted.repaired + drifted.removed))
}

fn render(r: &ReplicaReport) -> String {
    let mut out = format!(
        "dbps-bench replica · {} · commit {} · {} cores · --duration {}s · {} partitions · run took {:.0} s\n\n",
        r.date, r.git_commit, r.cores, r.duration_s, r.partitions, r.wall_time_s
    );
    let target = |metric: &str| {
        r.targets
            .iter()
            .find(|t| t.metric == metric)
            .map(|t| {
                format!(
                    "{} {} {}",
                    t.op,
                    thousands(t.limit),
                    if t.met { "met" } else { "missed" }
                )
            })
            .unwrap_or_default()
    };
    let rows = vec![
        vec![
            String::from("apply from a backlog, events/s"),
            thousands(r.apply_eps),
            format!(
                "raw consume {}/s ({:.2})",
                thousands(r.raw_consume_eps),
                r.apply_vs_raw_consume
            ),
            target("apply_eps"),
        ],
        vec![
            String::from("raw PostgreSQL commits, tx/s"),
            thousands(r.raw_pg_commit_tps),
            String::new(),
            String::new(),
        ],
        vec![
            String::from("commit → replica row, p50 / p99 / p99.9 ms"),
            format!("{:.1} / {:.1} / {:.1}", r.lag_ms.p50, r.lag_ms.p99, r.lag_ms.p999),
            format!(
                "outbox → consumer {:.1} / {:.1} / {:.1}",
                r.outbox_consumer_lag_ms.p50, r.outbox_consumer_lag_ms.p99, r.outbox_consumer_lag_ms.p999
            ),
            String::new(),
        ],
        vec![
            String::from("replica p99 beyond the outbox's, ms"),
            format!("{:.1}", r.lag_p99_beyond_outbox_ms),
            format!(
                "at {}/s (half of {}/s)",
                thousands(r.lag_load_events_per_s),
                thousands(r.max_outbox_write_per_s)
            ),
            target("lag_p99_beyond_outbox_ms"),
        ],
        vec![
            format!("reconcile {} records, clean, s", thousands(r.reconcile_records as f64)),
            format!("{:.2}", r.reconcile_clean_s),
            String::new(),
            target("reconcile_clean_s"),
        ],
        vec![
            String::from("reconcile with drift, find + repair, s"),
            format!("{:.2}", r.reconcile_drift_s),
            format!("{} drifted, {} repaired", r.drift_found, r.drift_repaired),
            String::new(),
        ],
    ];
    out.push_str(&table(&["measure", "value", "beside", "target"], &rows));
    out
}
