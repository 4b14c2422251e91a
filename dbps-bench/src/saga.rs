//! The `saga` scenario: three-step sagas through real participants on real Kafka, beside
//! the server's raw commit rate, in the same run.
//!
//! Phases (`D` is `--duration`):
//!
//! 1. raw commits: eight tasks commit one-row inserts for `D/4` (`raw_pg_commit_tps`);
//! 2. maximum rate: `--starters` tasks start sagas, each in its own transaction, keeping at
//!    most `--in-flight` unfinished; after `D/8` of that, for `D/2`, counted are the sagas
//!    completed and the
//!    transitions recorded in that window, and the transactions of the orchestrator
//!    (one per transition) and of the participants (one per command);
//! 3. latency: sagas started at 25 % and then 50 % of that rate, open loop, `D/4` each;
//!    start → completed from the instance's own timestamps (both the server's clock);
//! 4. idle: the relay and the consumers stop, a fresh deadline scanner runs alone for
//!    10 s and reports its scans (one query each).
//!
//! The orchestrator, three participants (`inventory`, `orders`, `billing`, each a
//! `Participant` behind `PgInbox` in a `ConsumerRunner`), the reply consumer, the deadline
//! scanner and one relay share the scratch database and this process.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use dbps_core::inbox::pg::PgInbox;
use dbps_core::kafka::{ConsumerRunner, KafkaConfig, KafkaPublisher, TopicNaming, TopicSpec, ensure_topics};
use dbps_core::{CancellationToken, Envelope, HandlerError, Message, message_set};
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use dbps_saga::{Command, CommandHandler, Definition, Orchestrator, Participant, Reply, Step};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;
use tokio::task::JoinHandle;

use crate::outbox::write_json;
use crate::progress;
use crate::report::{Target, table, thousands};
use crate::servers::{Scratch, Servers, delete_topics, git_commit};

/// Options of the `saga` scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long the timed phases run together (plus 10 s idle).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Tasks starting sagas in the maximum-rate phase.
    #[arg(long, default_value_t = 8)]
    starters: usize,
    /// Unfinished sagas at most in the maximum-rate phase.
    #[arg(long, default_value_t = 2_000)]
    in_flight: u64,
    /// Partitions of the command and reply topics.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Writes the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

const SERVICES: [&str; 3] = ["inventory", "orders", "billing"];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    order: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done {
    step: u8,
}

macro_rules! commands {
    ($($name:ident = $type:literal),*) => {
        $(
            #[derive(Debug, Clone, Serialize, Deserialize)]
            struct $name(Work);
            impl Message for $name {
                const TYPE: &'static str = $type;
            }
        )*
    };
}

commands!(Reserve = "bench.Reserve", Order = "bench.Order", Bill = "bench.Bill");

impl Message for Done {
    const TYPE: &'static str = "bench.Done";
}

message_set! {
    enum Commands { Reserve(Reserve), Order(Order), Bill(Bill) }
}

/// The saga's data.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    order: u64,
    done: u8,
}

fn definition() -> Definition<Data> {
    // Every step succeeds here, so no step needs a compensation.
    let step = |name: &'static str, make: fn(Work) -> Result<Command, dbps_saga::SagaError>| {
        Step::<Data>::new(name)
            .command(move |d: &Data| make(Work { order: d.order }))
            .on_success(|d: &mut Data, r: Done| d.done = r.step)
            .timeout(Duration::from_secs(60))
    };
    Definition::new("bench-order", 1)
        .step(step("reserve", |w| Command::to("inventory", &Reserve(w))))
        .step(step("order", |w| Command::to("orders", &Order(w))))
        .step(step("bill", |w| Command::to("billing", &Bill(w))))
}

/// A participant whose effect is one row per command.
struct Effect;

impl CommandHandler<Commands> for Effect {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: Commands,
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        let (step, work) = match command {
            Commands::Reserve(Reserve(w)) => (1u8, w),
            Commands::Order(Order(w)) => (2, w),
            Commands::Bill(Bill(w)) => (3, w),
        };
        sqlx::query("insert into bench_effects (order_id, step, saga) values ($1, $2, $3)")
            .bind(i64::try_from(work.order).unwrap_or(i64::MAX))
            .bind(i16::from(step))
            .bind(&envelope.aggregate_id)
            .execute(&mut *conn)
            .await?;
        Reply::new(&Done { step })
    }
}

/// p50, p99 and p99.9 in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Millis {
    p50: f64,
    p99: f64,
    p999: f64,
}

#[derive(Debug, Serialize)]
struct LatencyAt {
    load: &'static str,
    sagas_per_s: f64,
    latency_ms: Millis,
    sagas: u64,
}

/// Everything the scenario measured.
#[derive(Debug, Serialize)]
struct SagaReport {
    scenario: &'static str,
    sagas_per_s: f64,
    transitions_per_s: f64,
    raw_pg_commit_tps: f64,
    commits_per_s: f64,
    db_commits_per_s: f64,
    commit_efficiency: f64,
    latency_ms: Millis,
    latency: Vec<LatencyAt>,
    idle_queries_per_s: f64,
    starters: usize,
    in_flight: u64,
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
    let prefix = scratch.topics.raw.trim_end_matches("raw").to_owned();
    let naming = TopicNaming::new().with_prefix(&prefix);
    let mut topics: Vec<String> = SERVICES.iter().map(|s| naming.commands(s)).collect::<Result<_, _>>()?;
    topics.push(naming.replies("quote")?);
    let result = measure(&args, &servers, &scratch, &naming, &topics).await;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    delete_topics(&servers.brokers, &names).await;
    scratch.remove().await;
    let mut report = result?;
    report.wall_time_s = wall.elapsed().as_secs_f64();
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

struct Parts {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Parts {
    fn spawn<T, E>(&mut self, run: impl Future<Output = Result<T, E>> + Send + 'static)
    where
        T: Send + 'static,
        E: Into<anyhow::Error> + Send + 'static,
    {
        self.tasks
            .push(tokio::spawn(async move { run.await.map(|_| ()).map_err(Into::into) }));
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

async fn measure(
    args: &Args,
    servers: &Servers,
    scratch: &Scratch,
    naming: &TopicNaming,
    topics: &[String],
) -> anyhow::Result<SagaReport> {
    let setup = progress::spinner("set up");
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("bench")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("dbps_saga", &dbps_saga::MIGRATOR)
        .run(&scratch.options)
        .await
        .context("migrations")?;
    // Each part has a pool of its own, as each service would.
    let pool = scratch.pool(u32::try_from(args.starters)? + 2, "dbps-bench").await?;
    let part_size = u32::try_from(args.partitions)? + 1;
    let part_pool = |app: &'static str| scratch.pool(part_size, app);
    sqlx::raw_sql(
        "create table bench_effects (order_id bigint not null, step smallint not null, saga text not null);
         create table bench_commits (x integer not null);",
    )
    .execute(&pool)
    .await?;
    let config = KafkaConfig::new(&servers.brokers);
    let specs: Vec<TopicSpec> = topics.iter().map(|t| TopicSpec::new(t, args.partitions)).collect();
    ensure_topics(&config, &specs).await?;
    let orchestrator_pool = part_pool("orchestrator").await?;
    let orchestrator = Orchestrator::builder(orchestrator_pool.clone(), "quote")
        .naming(naming.clone())
        .register(definition())
        .build()?;
    let mut parts = Parts {
        stop: CancellationToken::new(),
        tasks: Vec::new(),
    };
    let relay = Relay::builder(
        PgOutboxStore::new(part_pool("relay").await?),
        KafkaPublisher::builder(config.clone()).build()?,
    )
    .build()?;
    parts.spawn(relay.run(parts.stop.clone()));
    let group = |name: &str| format!("{}-{name}", scratch.database);
    let dlq = &scratch.topics.dead_letters;
    // Replies and commands are applied in batches: one commit for what arrived together.
    let replies = PgInbox::new(orchestrator_pool, "quote", orchestrator.replies()).batched(64);
    let consumer = runner(&config, group("quote"), &topics[3], dlq, replies)?;
    parts.spawn(consumer.run(parts.stop.clone()));
    for (service, topic) in SERVICES.iter().zip(topics) {
        let participant = Participant::new(PgOutbox::new(*service).naming(naming.clone()), Effect);
        let handler = PgInbox::new(part_pool(service).await?, *service, participant).batched(64);
        let consumer = runner(&config, group(service), topic, dlq, handler)?;
        parts.spawn(consumer.run(parts.stop.clone()));
    }
    let scanner_stop = CancellationToken::new();
    let scanner = tokio::spawn(orchestrator.clone().run(scanner_stop.clone()));
    progress::done(
        &setup,
        "set up",
        &format!("{} partitions, 3 participants", args.partitions),
    );

    // Warm-up: the consumer groups join, the pipeline runs.
    let started = Arc::new(AtomicU64::new(0));
    let shape = Load {
        starters: args.starters,
        in_flight: args.in_flight,
    };
    start_load(&orchestrator, &pool, &shape, None, Duration::from_secs(5), &started).await?;
    wait_idle(&pool, Duration::from_secs(120)).await?;

    // 1. Raw commits.
    let raw_pg_commit_tps = crate::replica::raw_commits(&pool, args.duration / 4).await?;

    // 2. Maximum rate.
    let label = "sagas, flat out";
    let bar = progress::timed(label, args.duration / 2);
    // The load runs D/8 before the counted window, so that the window sees the steady
    // state (the in-flight limit reached), not the pipeline filling up.
    let settle = args.duration / 8;
    let load = {
        let (orchestrator, pool, started) = (orchestrator.clone(), pool.clone(), Arc::clone(&started));
        let (starters, in_flight, window) = (args.starters, args.in_flight, settle + args.duration / 2);
        tokio::spawn(async move {
            let shape = Load { starters, in_flight };
            start_load(&orchestrator, &pool, &shape, None, window, &started).await
        })
    };
    tokio::time::sleep(settle).await;
    let before = counts(&pool).await?;
    let window = Instant::now();
    tokio::time::sleep(args.duration / 2).await;
    let elapsed = window.elapsed().as_secs_f64();
    let after = counts(&pool).await?;
    load.await??;
    let sagas_per_s = (after.completed - before.completed) as f64 / elapsed;
    let transitions_per_s = (after.transitions - before.transitions) as f64 / elapsed;
    // Logical transactions: each transition of the orchestrator and each command a
    // participant applied is atomic on its own; batching commits several at once.
    let commits_per_s =
        ((after.transitions - before.transitions) + (after.participant - before.participant)) as f64 / elapsed;
    let db_commits_per_s = (after.database - before.database) as f64 / elapsed;
    progress::done(
        &bar,
        label,
        &format!(
            "{}/s completed, {} transitions/s",
            thousands(sagas_per_s),
            thousands(transitions_per_s)
        ),
    );
    wait_idle(&pool, Duration::from_secs(300)).await?;

    // 3. Latency at 25 % and 50 %.
    let mut latency = Vec::new();
    for (load, share) in [("25 %", 0.25), ("50 %", 0.5)] {
        let label = format!("latency at {load}");
        let bar = progress::timed(&label, args.duration / 4);
        let from: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("select now()").fetch_one(&pool).await?;
        let rate = sagas_per_s * share;
        start_load(&orchestrator, &pool, &shape, Some(rate), args.duration / 4, &started).await?;
        wait_idle(&pool, Duration::from_secs(300)).await?;
        let (ms, sagas) = latencies(&pool, from).await?;
        progress::done(
            &bar,
            &label,
            &format!("{}/s: p50 {:.1} ms, p99 {:.1} ms", thousands(rate), ms.p50, ms.p99),
        );
        latency.push(LatencyAt {
            load,
            sagas_per_s: rate,
            latency_ms: ms,
            sagas,
        });
    }

    // 4. Idle: the relay and the consumers stop; a fresh scanner runs alone for 10 s and
    // says how many scans (one query each) it made.
    parts.stop().await?;
    scanner_stop.cancel();
    scanner.await??;
    let label = "idle scanner";
    let bar = progress::timed(label, Duration::from_secs(10));
    let idle_stop = CancellationToken::new();
    let idle = tokio::spawn(orchestrator.clone().run(idle_stop.clone()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    idle_stop.cancel();
    let summary = idle.await??;
    anyhow::ensure!(summary.timed_out == 0, "a saga timed out while idle");
    let idle_queries_per_s = summary.scans as f64 / 10.0;
    progress::done(&bar, label, &format!("{idle_queries_per_s:.1} queries/s"));

    let half = latency.last().map(|l| l.latency_ms).unwrap_or_default();
    let commit_efficiency = commits_per_s / raw_pg_commit_tps.max(1e-9);
    let targets = vec![
        Target::at_least("transitions_per_s", transitions_per_s, 2_000.0),
        Target::at_least("commit_efficiency", commit_efficiency, 0.25),
        Target::at_most("latency_p99_ms_at_half_load", half.p99, 100.0),
        Target::at_most("idle_queries_per_s", idle_queries_per_s, 1.0),
    ];
    Ok(SagaReport {
        scenario: "saga",
        sagas_per_s,
        transitions_per_s,
        raw_pg_commit_tps,
        commits_per_s,
        db_commits_per_s,
        commit_efficiency,
        latency_ms: half,
        latency,
        idle_queries_per_s,
        starters: args.starters,
        in_flight: args.in_flight,
        partitions: args.partitions,
        duration_s: args.duration.as_secs_f64(),
        wall_time_s: 0.0,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        git_commit: git_commit(),
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        targets,
    })
}

fn runner<B: dbps_core::BatchHandler>(
    config: &KafkaConfig,
    group: String,
    topic: &str,
    dead_letters: &str,
    handler: B,
) -> anyhow::Result<ConsumerRunner<B>> {
    Ok(ConsumerRunner::builder(config.clone(), group, handler)
        .topic(topic)
        .dead_letter_topic(dead_letters)
        .build()?)
}

struct Counts {
    completed: i64,
    transitions: i64,
    participant: i64,
    /// Every transaction the database committed (relay, scanner and starters included).
    database: i64,
}

async fn counts(pool: &PgPool) -> anyhow::Result<Counts> {
    let (completed, transitions, participant, database): (i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from dbps_saga_instances where state = 'completed'),
                (select count(*) from dbps_saga_history),
                (select count(*) from dbps_inbox where consumer <> 'quote'),
                (select xact_commit from pg_stat_database where datname = current_database())",
    )
    .fetch_one(pool)
    .await?;
    Ok(Counts {
        completed,
        transitions,
        participant,
        database,
    })
}

/// Waits until no saga is running.
async fn wait_idle(pool: &PgPool, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let open: i64 = sqlx::query_scalar("select count(*) from dbps_saga_instances where state <> 'completed'")
            .fetch_one(pool)
            .await?;
        if open == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{open} sagas still open after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts sagas for `duration`: flat out with at most `--in-flight` open (`rate` None),
/// or at `rate` per second in all (open loop).
/// How sagas are started.
struct Load {
    starters: usize,
    in_flight: u64,
}

async fn start_load(
    orchestrator: &Orchestrator,
    pool: &PgPool,
    args: &Load,
    rate: Option<f64>,
    duration: Duration,
    started: &Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let end = Instant::now() + duration;
    let open = Arc::new(AtomicU64::new(0));
    // Flat out, a watcher keeps the count of open sagas for the in-flight limit.
    let watch_stop = CancellationToken::new();
    let watcher = rate.is_none().then(|| {
        let (pool, open, stop) = (pool.clone(), Arc::clone(&open), watch_stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let n: i64 = sqlx::query_scalar("select count(*) from dbps_saga_instances where state <> 'completed'")
                    .fetch_one(&pool)
                    .await?;
                open.store(u64::try_from(n).unwrap_or(0), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, sqlx::Error>(())
        })
    });
    let mut tasks = Vec::new();
    for _ in 0..args.starters {
        let (orchestrator, pool, started, open) = (
            orchestrator.clone(),
            pool.clone(),
            Arc::clone(started),
            Arc::clone(&open),
        );
        let in_flight = args.in_flight;
        let period = rate.map(|r| Duration::from_secs_f64(args.starters as f64 / r.max(0.1)));
        tasks.push(tokio::spawn(async move {
            let mut ticks = period.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while Instant::now() < end {
                match ticks.as_mut() {
                    Some(ticks) => {
                        ticks.tick().await;
                    }
                    None if open.load(Ordering::SeqCst) >= in_flight => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    None => {}
                }
                let order = started.fetch_add(1, Ordering::SeqCst);
                let mut tx = pool.begin().await?;
                orchestrator
                    .start(&mut tx, "bench-order", &Data { order, done: 0 })
                    .await?;
                tx.commit().await?;
                open.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    watch_stop.cancel();
    if let Some(watcher) = watcher {
        watcher.await??;
    }
    Ok(())
}

/// Start → completed of the sagas started since `from`.
async fn latencies(pool: &PgPool, from: chrono::DateTime<chrono::Utc>) -> anyhow::Result<(Millis, u64)> {
    let micros: Vec<i64> = sqlx::query_scalar(
        "select (extract(epoch from updated_at - created_at) * 1000000)::bigint from dbps_saga_instances
         where state = 'completed' and created_at >= $1",
    )
    .bind(from)
    .fetch_all(pool)
    .await?;
    let mut histogram = Histogram::<u64>::new(3)?;
    for m in &micros {
        histogram.record(u64::try_from(*m).unwrap_or(0))?;
    }
    let at = |q| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok((
        Millis {
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
        },
        micros.len() as u64,
    ))
}

fn render(r: &SagaReport) -> String {
    let mut out = format!(
        "dbps-bench saga · {} · commit {} · {} cores · --duration {}s · {} starters · {} partitions · run took {:.0} s\n\n",
        r.date, r.git_commit, r.cores, r.duration_s, r.starters, r.partitions, r.wall_time_s
    );
    let target = |metric: &str| {
        r.targets
            .iter()
            .find(|t| t.metric == metric)
            .map(|t| format!("{} {} {}", t.op, t.limit, if t.met { "met" } else { "missed" }))
            .unwrap_or_default()
    };
    let mut rows = vec![
        vec![
            String::from("sagas completed, /s"),
            thousands(r.sagas_per_s),
            String::from("3 steps, 4 transitions each"),
            String::new(),
        ],
        vec![
            String::from("state transitions, /s"),
            thousands(r.transitions_per_s),
            String::new(),
            target("transitions_per_s"),
        ],
        vec![
            String::from("orchestrator + participant transactions, /s"),
            thousands(r.commits_per_s),
            format!(
                "raw commits {}/s ({:.2})",
                thousands(r.raw_pg_commit_tps),
                r.commit_efficiency
            ),
            target("commit_efficiency"),
        ],
        vec![
            String::from("database commits (all, batched), /s"),
            thousands(r.db_commits_per_s),
            String::from("relay, scanner, starters included"),
            String::new(),
        ],
    ];
    for at in &r.latency {
        rows.push(vec![
            format!("start → completed at {} ({}/s), ms", at.load, thousands(at.sagas_per_s)),
            format!(
                "p50 {:.1} / p99 {:.1} / p99.9 {:.1}",
                at.latency_ms.p50, at.latency_ms.p99, at.latency_ms.p999
            ),
            format!("{} sagas", at.sagas),
            if at.load == "50 %" {
                target("latency_p99_ms_at_half_load")
            } else {
                String::new()
            },
        ]);
    }
    rows.push(vec![
        String::from("idle scanner, queries/s"),
        format!("{:.1}", r.idle_queries_per_s),
        String::new(),
        target("idle_queries_per_s"),
    ]);
    out.push_str(&table(&["measure", "value", "beside", "target"], &rows));
    out
}
