//! The `outbox` scenario: the PostgreSQL outbox and its relay, beside the same business
//! transaction without the outbox, a raw Kafka producer and the server's raw commit rate.
//!
//! Phases, in this order (`D` is `--duration`):
//!
//! 1. warm-up, sampling PostgreSQL's wait events: the business transaction without, then
//!    with the outbox (relay running);
//! 2. raw commit rate: one-row autocommitted inserts for `D/2`;
//! 3. write rate without and with the outbox in eight slices of `D/4`, in the order
//!    ABBAABBA so that drift during the run hits both alike; the relay runs (and keeps
//!    up) during the with-outbox slices only, which also give the sustained end-to-end
//!    rate; CPU and WAL per transaction are read around every slice;
//! 4. diagnostics (relay stopped), `D/4` each: the business transaction with only the
//!    outbox's NOTIFY inside it, with the NOTIFY after its commit, and with the outbox
//!    row but no NOTIFY;
//! 5. commit → consumer latency at 10, 25, 50 and 75 % of the with-outbox rate, writers
//!    rate-limited (open loop); the 50 % point runs for `D`, the others for `D/3`;
//! 6. drain: a backlog of `--drain-events` enqueued with the relay stopped; three relay
//!    rounds timed step by step; the raw producer, the relay draining the backlog, the
//!    raw producer again;
//! 7. idle: whole relay lifetimes of 1 s and of 1 s plus `--idle`, counted by the
//!    server; the difference is the idle relay's cost.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use dbps_core::CancellationToken;
use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicNaming};
use dbps_outbox::pg::{MIGRATOR, PgOutbox, PgOutboxStore};
use dbps_outbox::{OutboxError, OutboxStore, Relay, RelaySummary};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};
use tokio::task::JoinHandle;

use crate::baseline::RawProducer;
use crate::cpu;
use crate::observer::Observer;
use crate::probes::{Probe, Variant, commit_latencies, quiet_transactions, sampling, with_wait_sampling};
use crate::progress;
use crate::report::{
    DrainDetail, GrowthDetail, IdleDetail, LatencyPoint, OutboxReport, RoundProfile, Settings, Target, WaitEvents,
    WriteCost,
};
use crate::servers::{Scratch, Servers, git_commit};
use crate::workload::{Documents, Load, SCHEMA, Transaction, Writers};

/// Options of the `outbox` scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long the main measurements run: each variant of the write-rate comparison and
    /// the latency point at half load run this long; the other phases are shorter. A run
    /// takes about 7 × this plus half a minute.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Writes the results as one JSON object to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Draws commit → consumer latency against offered load into this SVG file.
    #[arg(long)]
    pub(crate) chart: Option<PathBuf>,
    /// Concurrent writers, each on its own connection.
    #[arg(long, default_value_t = 8)]
    pub(crate) writers: usize,
    /// Messages the relay fetches and publishes per round.
    #[arg(long, default_value_t = 2000)]
    pub(crate) batch_size: usize,
    /// `linger.ms` of the relay's publisher and of the raw producer (default: the
    /// publisher's own, 5 ms).
    #[arg(long)]
    pub(crate) linger_ms: Option<u32>,
    /// Events in the backlog the relay drains (and records the raw producer sends).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) drain_events: u64,
    /// Events in the large backlog drained after the drain phase, timed per tenth and
    /// compared with the drain phase's rate (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) growth_events: u64,
    /// Partitions of each benchmark topic.
    #[arg(long, default_value_t = 8)]
    pub(crate) partitions: i32,
    /// Distinct orders (aggregates) the writers update.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) keys: i64,
    /// How long the idle relay is watched (a multiple of the relay's 10 s rebalance
    /// interval counts its periodic work fairly).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub(crate) idle: Duration,
}

/// How long to wait for the consumer or the relay before the harness gives up.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(180);
/// Application names, so that `pg_stat_activity` tells the writers and the relay apart.
const WRITER_APP: &str = "dbps-bench-writer";
const RELAY_APP: &str = "dbps-bench-relay";
/// Loads of the latency sweep, as fractions of the with-outbox write rate.
const SWEEP: [f64; 4] = [0.10, 0.25, 0.50, 0.75];
/// The load the latency target applies to: half of the maximum sustainable write rate.
const HEADLINE_LOAD: f64 = 0.50;
const TARGET_P99_MS: f64 = 20.0;
/// The latency target at the sweep's lowest load (10 %).
const TARGET_LOW_LOAD_P99_MS: f64 = 12.0;
/// Relay rounds timed step by step before the drain.
const PROFILE_ROUNDS: usize = 3;
/// Events per transaction when the drain's backlog is enqueued.
const FILL_EVENTS_PER_TX: u64 = 200;

/// Runs the scenario, prints its tables and writes the JSON and the chart.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.writers == 0 || args.batch_size == 0 || args.partitions < 1 || args.keys < args.writers as i64 {
        bail!("--writers, --batch-size and --partitions must be positive, and --keys at least --writers");
    }
    if args.duration < Duration::from_secs(4) || args.idle < Duration::from_secs(2) {
        bail!("--duration must be at least 4s and --idle at least 2s");
    }
    let started = Instant::now();
    let servers = Servers::from_env()?;
    let scratch = Scratch::create(&servers, args.partitions).await?;
    eprintln!(
        "dbps-bench outbox: database {}, topics {} and {}",
        scratch.database, scratch.topics.events, scratch.topics.raw
    );
    let result = tokio::select! {
        result = measure(&args, &servers, &scratch) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let bar = progress::spinner("removing database and topics");
    scratch.remove().await;
    bar.finish_and_clear();
    let mut report = result?;
    report.wall_time_s = started.elapsed().as_secs_f64();

    println!("{}", report.render());
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.chart {
        create_parent(path)?;
        let subtitle = format!(
            "{} · commit {} · {} cores · {} writers · relay batch {} · linger.ms {} · {} B payload",
            report.date,
            report.git_commit,
            report.cores,
            report.settings.writers,
            report.settings.relay_batch_size,
            report.settings.linger_ms,
            report.payload_bytes
        );
        crate::chart::latency_svg(path, &report.latency_sweep, TARGET_P99_MS, &subtitle)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path` (creating its folder) and says so on stderr.
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    create_parent(path)?;
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
        }
        _ => Ok(()),
    }
}

/// A running relay: how to stop it, and its task.
type Running = (CancellationToken, JoinHandle<Result<RelaySummary, OutboxError>>);

/// Starts and stops relays on one store, sharing one publisher (as a service's relay
/// task would across restarts).
pub(crate) struct RelayControl<S> {
    store: S,
    publisher: KafkaPublisher,
    batch_size: usize,
    running: Option<Running>,
}

impl<S: OutboxStore + Clone + 'static> RelayControl<S> {
    pub(crate) fn new(store: S, publisher: KafkaPublisher, batch_size: usize) -> Self {
        Self {
            store,
            publisher,
            batch_size,
            running: None,
        }
    }

    /// Starts a relay with the library's defaults except the batch size.
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let relay = Relay::builder(self.store.clone(), self.publisher.clone())
            .batch_size(self.batch_size)
            .build()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.run(stop.clone()));
        self.running = Some((stop, task));
        Ok(())
    }

    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            task.await.context("relay task panicked")?.context("relay failed")?;
        }
        Ok(())
    }
}

/// Everything the phases share.
pub(crate) struct Bench<'a> {
    args: &'a Args,
    servers: &'a Servers,
    scratch: &'a Scratch,
    /// On the server's own database (the admin URL's): statistics and commit timestamps,
    /// so that these queries are not counted against the run's database.
    pub(crate) admin: PgPool,
    /// On the run's database, for the harness's own queries.
    pub(crate) db: PgPool,
    writers_pool: PgPool,
    pub(crate) writers: Writers,
    docs: Arc<Documents>,
    pub(crate) observer: Observer,
    publisher: KafkaPublisher,
    relay_pool: PgPool,
    pub(crate) relay: RelayControl<PgOutboxStore>,
}

impl Bench<'_> {
    /// Waits until the consumer has seen every event committed so far and the outbox is
    /// empty (the relay deletes a batch after its acknowledgements). Returns how long
    /// the consumer took.
    pub(crate) async fn catch_up(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let target = self.writers.events_committed();
        self.observer.wait_for_events(target, CATCH_UP_DEADLINE).await?;
        let consumed = started.elapsed();
        loop {
            let left: i64 = sqlx::query_scalar("select count(*) from dbps_outbox")
                .fetch_one(&self.db)
                .await?;
            if left == 0 {
                return Ok(consumed);
            }
            if started.elapsed() > CATCH_UP_DEADLINE {
                bail!("{left} events still in the outbox after {CATCH_UP_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs one unlimited load of `transaction` for `duration` and reports its rate.
    pub(crate) async fn flat_out(
        &self,
        label: &str,
        transaction: Transaction,
        duration: Duration,
    ) -> anyhow::Result<f64> {
        let bar = progress::timed(label, duration);
        let result = self
            .writers
            .run(
                Load {
                    transaction,
                    rate: None,
                    duration,
                },
                &bar,
            )
            .await?;
        progress::done(&bar, label, &format!("{:.0} tx/s", result.per_second()));
        Ok(result.per_second())
    }
}

/// What [`setup`] learnt about the run.
pub(crate) struct SetUp {
    pub(crate) postgres_version: String,
    pub(crate) payload_bytes: usize,
}

/// Creates the run's tables, writers, observer, publisher and (stopped) relay.
pub(crate) async fn setup<'a>(
    args: &'a Args,
    servers: &'a Servers,
    scratch: &'a Scratch,
) -> anyhow::Result<(Bench<'a>, SetUp)> {
    let setup = progress::spinner("setting up");
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(servers.admin.clone())
        .await?;
    let commit_ts: String = sqlx::query_scalar("show track_commit_timestamp")
        .fetch_one(&admin)
        .await?;
    if commit_ts != "on" {
        bail!("PostgreSQL runs with track_commit_timestamp={commit_ts}; the latency measurement needs it on");
    }
    let postgres_version: String = sqlx::query_scalar("show server_version").fetch_one(&admin).await?;
    let db = scratch.pool(2, "dbps-bench").await?;
    MIGRATOR.run(&db).await.context("outbox migrations")?;
    db.execute(sqlx::raw_sql(SCHEMA)).await.context("business tables")?;
    let writers_pool = scratch.pool(u32::try_from(args.writers + 1)?, WRITER_APP).await?;
    let naming = TopicNaming::new().events_pattern(scratch.topics.events.clone());
    let docs = Arc::new(Documents::generate(64)?);
    let writers = Writers::new(
        writers_pool.clone(),
        PgOutbox::new("bench").naming(naming),
        scratch.topics.events.clone(),
        docs.clone(),
        args.writers,
        args.keys,
    );
    let payload_bytes = docs.mean_payload_bytes()?;
    let observer = Observer::start(
        &servers.brokers,
        &scratch.topics.events,
        &scratch.topics.raw,
        args.partitions,
    )?;
    let mut kafka = KafkaConfig::new(&servers.brokers);
    if let Some(linger) = args.linger_ms {
        kafka = kafka.set("linger.ms", linger.to_string());
    }
    let publisher = KafkaPublisher::builder(kafka).build()?;
    let relay_pool = scratch.pool(4, RELAY_APP).await?;
    let relay = RelayControl::new(
        PgOutboxStore::new(relay_pool.clone()),
        publisher.clone(),
        args.batch_size,
    );
    let bench = Bench {
        args,
        servers,
        scratch,
        admin,
        db,
        writers_pool,
        writers,
        docs,
        observer,
        publisher,
        relay_pool,
        relay,
    };
    progress::done(
        &setup,
        "set up",
        &format!("{payload_bytes} B event payload, PostgreSQL {postgres_version}"),
    );
    Ok((
        bench,
        SetUp {
            postgres_version,
            payload_bytes,
        },
    ))
}

async fn measure(args: &Args, servers: &Servers, scratch: &Scratch) -> anyhow::Result<OutboxReport> {
    let (
        mut bench,
        SetUp {
            postgres_version,
            payload_bytes,
        },
    ) = setup(args, servers, scratch).await?;

    let write_wait_events = warm_up(&mut bench).await?;
    let d = args.duration;
    let raw_pg_commit_tps = bench
        .flat_out("raw commits (one-row inserts)", Transaction::OneRowInsert, d / 2)
        .await?;
    let rates = write_rates(&mut bench).await?;
    let mut write_profile = vec![rates.without, rates.with, rates.versioned, rates.bare];
    write_profile.extend(write_diagnostics(&mut bench).await?);
    let write_tps_without_outbox = write_profile[0].tx_per_s;
    let write_tps_with_outbox = write_profile[1].tx_per_s;
    let write_tps_with_versioned_outbox = write_profile[2].tx_per_s;
    let write_tps_bare_insert = write_profile[3].tx_per_s;
    let latency_sweep = latency_sweep(&mut bench, write_tps_with_outbox).await?;
    let latency_ms = latency_sweep
        .iter()
        .find(|p| p.load_fraction == HEADLINE_LOAD)
        .cloned()
        .ok_or_else(|| anyhow!("no latency point at half load"))?;
    let drain = drain(&mut bench).await?;
    let growth = if args.growth_events > 0 {
        Some(growth(&mut bench, drain.backlog_events as f64 / drain.relay_s).await?)
    } else {
        None
    };
    let idle = idle(bench).await?;

    let write_overhead_pct = (write_tps_without_outbox - write_tps_with_outbox) / write_tps_without_outbox * 100.0;
    let relay_drain_eps = drain.backlog_events as f64 / drain.relay_s;
    let raw_producer_eps = 2.0 * args.drain_events as f64 / drain.raw_consumed_s.iter().sum::<f64>();
    let relay_vs_raw_ratio = relay_drain_eps / raw_producer_eps;
    let idle_queries_per_s = idle.transactions as f64 / idle.window_s;
    let with_vs_bare_insert = write_tps_with_outbox / write_tps_bare_insert;
    let versioned_vs_bare_insert = write_tps_with_versioned_outbox / write_tps_bare_insert;
    let mut targets = vec![
        Target::at_least("with_vs_bare_insert", with_vs_bare_insert, 0.9),
        Target::at_least("versioned_vs_bare_insert", versioned_vs_bare_insert, 0.9),
        Target::at_least("relay_drain_eps", relay_drain_eps, 20_000.0),
        Target::at_least("relay_vs_raw_ratio", relay_vs_raw_ratio, 0.6),
        Target::at_most("latency_ms.p99", latency_ms.p99, TARGET_P99_MS),
        Target::at_most("idle_queries_per_s", idle_queries_per_s, 1.0),
    ];
    if let Some(low) = latency_sweep.first() {
        targets.push(Target::at_most(
            "latency_low_load_ms.p99",
            low.p99,
            TARGET_LOW_LOAD_P99_MS,
        ));
    }
    if let Some(g) = &growth {
        targets.push(Target::at_least("growth_vs_small_backlog", g.vs_small_backlog, 0.8));
    }
    Ok(OutboxReport {
        scenario: "outbox",
        write_tps_without_outbox,
        write_tps_with_outbox,
        write_tps_bare_insert,
        with_vs_bare_insert,
        write_tps_with_versioned_outbox,
        versioned_vs_bare_insert,
        write_overhead_pct,
        raw_producer_eps,
        relay_drain_eps,
        relay_vs_raw_ratio,
        latency_ms,
        idle_queries_per_s,
        payload_bytes,
        raw_pg_commit_tps,
        sustained_eps: rates.sustained_eps,
        duration_s: d.as_secs_f64(),
        wall_time_s: 0.0,
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        git_commit: git_commit(),
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        settings: Settings {
            writers: args.writers,
            relay_batch_size: args.batch_size,
            linger_ms: args.linger_ms.unwrap_or(crate::baseline::PUBLISHER_LINGER_MS),
            drain_events: args.drain_events,
            partitions: args.partitions,
            keys: args.keys,
            postgres_version,
        },
        targets,
        latency_sweep,
        sustained_max_lag_events: rates.max_lag,
        write_profile,
        write_wait_events,
        drain,
        growth,
        idle,
    })
}

/// Phase 1: both variants once, sampling where the writers' backends spend their time.
async fn warm_up(b: &mut Bench<'_>) -> anyhow::Result<WaitEvents> {
    let warm = (b.args.duration / 4).clamp(Duration::from_secs(2), Duration::from_secs(5));
    let mut waits = Vec::with_capacity(2);
    for transaction in [Transaction::Business, Transaction::BusinessWithOutbox] {
        let label = if transaction == Transaction::Business {
            "warm-up without outbox"
        } else {
            "warm-up with outbox"
        };
        if transaction == Transaction::BusinessWithOutbox {
            b.relay.start()?;
        }
        let bar = progress::timed(label, warm);
        let load = Load {
            transaction,
            rate: None,
            duration: warm,
        };
        let (result, shares) = with_wait_sampling(&b.admin, WRITER_APP, b.writers.run(load, &bar)).await?;
        b.catch_up().await?;
        progress::done(&bar, label, &format!("{:.0} tx/s", result.per_second()));
        waits.push(shares);
    }
    b.relay.stop().await?;
    let with_outbox = waits.pop().unwrap_or_default();
    let without_outbox = waits.pop().unwrap_or_default();
    Ok(WaitEvents {
        without_outbox,
        with_outbox,
    })
}

/// What phase 3 measured.
struct WriteRates {
    without: WriteCost,
    with: WriteCost,
    versioned: WriteCost,
    bare: WriteCost,
    sustained_eps: f64,
    max_lag: u64,
}

/// Phase 3: without the outbox (A), with it (B), with it taking the sequence number from
/// the order's version (V), and with a bare insert of the event in its place (C, the
/// floor any outbox pays), alternating ABVCCVBA twice.
async fn write_rates(b: &mut Bench<'_>) -> anyhow::Result<WriteRates> {
    let mut without = Variant::new("without outbox")?;
    let mut with = Variant::new("with outbox (relay running)")?;
    let mut versioned = Variant::new("with outbox, versioned events (relay running)")?;
    let mut bare = Variant::new("bare insert of the event (the floor)")?;
    let (mut sustained_events, mut sustained_time, mut max_lag) = (0u64, Duration::ZERO, 0u64);
    let slice = b.args.duration / 4;
    let (a, bb, v, c) = (
        Transaction::Business,
        Transaction::BusinessWithOutbox,
        Transaction::BusinessWithVersionedOutbox,
        Transaction::BusinessBareInsert,
    );
    let order = [a, bb, v, c, c, v, bb, a, a, bb, v, c, c, v, bb, a];
    for (n, transaction) in order.into_iter().enumerate() {
        let with_outbox = transaction.enqueues();
        let what = match transaction {
            Transaction::BusinessWithOutbox => "with outbox",
            Transaction::BusinessWithVersionedOutbox => "with outbox, versioned",
            Transaction::BusinessBareInsert => "bare insert",
            _ => "without outbox",
        };
        let label = format!("slice {}/{} {what}", n + 1, order.len());
        let bar = progress::timed(&label, slice);
        if with_outbox {
            b.relay.start()?;
        } else {
            b.relay.stop().await?;
        }
        let load = Load {
            transaction,
            rate: None,
            duration: slice,
        };
        let probe = Probe::start(&b.admin, WRITER_APP).await?;
        let (writers, observer) = (&b.writers, &b.observer);
        let result = sampling(writers.run(load, &bar), Duration::from_millis(50), async || {
            max_lag = max_lag.max(writers.events_committed().saturating_sub(observer.events_seen()));
            Ok(())
        })
        .await?;
        let cost = probe.finish(&b.admin).await?;
        if with_outbox {
            // The writers have stopped; for the end-to-end rate the slice ends when the
            // consumer has seen its last event.
            let tail = b.catch_up().await?;
            sustained_events += result.committed;
            sustained_time += result.elapsed + tail;
            if transaction == Transaction::BusinessWithOutbox {
                with.add(&result, cost)?;
            } else {
                versioned.add(&result, cost)?;
            }
            let summary = format!(
                "{:.0} tx/s, consumer caught up {:.0} ms later",
                result.per_second(),
                tail.as_secs_f64() * 1e3
            );
            progress::done(&bar, &label, &summary);
        } else {
            if transaction == Transaction::BusinessBareInsert {
                bare.add(&result, cost)?;
            } else {
                without.add(&result, cost)?;
            }
            progress::done(&bar, &label, &format!("{:.0} tx/s", result.per_second()));
        }
    }
    Ok(WriteRates {
        without: without.cost(),
        with: with.cost(),
        versioned: versioned.cost(),
        bare: bare.cost(),
        sustained_eps: sustained_events as f64 / sustained_time.as_secs_f64(),
        max_lag,
    })
}

/// Phase 4: variants that locate the write overhead (relay stopped).
async fn write_diagnostics(b: &mut Bench<'_>) -> anyhow::Result<Vec<WriteCost>> {
    b.relay.stop().await?;
    let slice = b.args.duration / 4;
    let mut costs = Vec::with_capacity(3);
    for (label, name, transaction) in [
        (
            "diagnostic: NOTIFY in the tx",
            "NOTIFY inside the transaction, no outbox row",
            Transaction::BusinessNotifyInTx,
        ),
        (
            "diagnostic: NOTIFY after commit",
            "NOTIFY after the commit, no outbox row",
            Transaction::BusinessNotifyAfterCommit,
        ),
        (
            "diagnostic: outbox row, no NOTIFY",
            "outbox row without NOTIFY (copied statement)",
            Transaction::BusinessOutboxRowWithoutNotify,
        ),
    ] {
        let bar = progress::timed(label, slice);
        let mut variant = Variant::new(name)?;
        let probe = Probe::start(&b.admin, WRITER_APP).await?;
        let result = b
            .writers
            .run(
                Load {
                    transaction,
                    rate: None,
                    duration: slice,
                },
                &bar,
            )
            .await?;
        variant.add(&result, probe.finish(&b.admin).await?)?;
        progress::done(&bar, label, &format!("{:.0} tx/s", result.per_second()));
        costs.push(variant.cost());
    }
    // The copied statement's rows are not the outbox's and are never published.
    sqlx::query("delete from dbps_outbox").execute(&b.db).await?;
    Ok(costs)
}

/// Phase 5: commit → consumer latency at fractions of the with-outbox write rate.
async fn latency_sweep(b: &mut Bench<'_>, max_rate: f64) -> anyhow::Result<Vec<LatencyPoint>> {
    b.relay.start()?;
    let mut sweep = Vec::with_capacity(SWEEP.len());
    for fraction in SWEEP {
        let duration = if fraction == HEADLINE_LOAD {
            b.args.duration
        } else {
            b.args.duration / 3
        };
        let offered = max_rate * fraction;
        let label = format!("latency at {:.0} % ({offered:.0} ev/s)", fraction * 100.0);
        let bar = progress::timed(&label, duration);
        b.observer.start_recording();
        let load = Load {
            transaction: Transaction::BusinessWithOutbox,
            rate: Some(offered),
            duration,
        };
        let cpu_before = cpu::sample(&[]);
        let result = b.writers.run(load, &bar).await?;
        let cpu = cpu_before
            .zip(cpu::sample(&[]))
            .map(|(before, after)| cpu::usage(&before, &after));
        b.catch_up().await?;
        let sightings = b.observer.stop_recording();
        if (sightings.len() as u64) < result.committed {
            bail!(
                "{} events committed at {label} but {} seen",
                result.committed,
                sightings.len()
            );
        }
        let latencies = commit_latencies(&b.admin, &sightings).await?;
        let point = LatencyPoint::new(
            (fraction, offered, result.per_second()),
            &latencies,
            "consumer receipt",
            cpu.map(|c| c.machine_busy_pct()),
        );
        progress::done(&bar, &label, &point.summary());
        sweep.push(point);
    }
    Ok(sweep)
}

/// Phase 6: the relay drains a backlog, between two runs of the raw producer.
async fn drain(b: &mut Bench<'_>) -> anyhow::Result<DrainDetail> {
    b.relay.stop().await?;
    let events = b.args.drain_events;
    let profiled = (PROFILE_ROUNDS * b.args.batch_size) as u64;
    let label = "enqueueing the backlog";
    let bar = progress::counted(label, events + profiled);
    let fill = b
        .writers
        .fill_backlog(events + profiled, FILL_EVENTS_PER_TX, &bar)
        .await?;
    let summary = format!(
        "{} events in {:.1} s ({:.0} events/s through PgOutbox, {FILL_EVENTS_PER_TX} per transaction)",
        events + profiled,
        fill.as_secs_f64(),
        (events + profiled) as f64 / fill.as_secs_f64()
    );
    progress::done(&bar, label, &summary);

    let label = "relay rounds, timed step by step";
    let bar = progress::spinner(label);
    let rounds = profile_rounds(&b.relay_pool, &b.publisher, b.args.batch_size).await?;
    let summary = rounds
        .iter()
        .map(|r| {
            format!(
                "fetch {:.1} + publish {:.1} + delete {:.1} ms",
                r.fetch_ms, r.publish_ms, r.mark_ms
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    progress::done(&bar, label, &summary);

    let linger = b.args.linger_ms.unwrap_or(crate::baseline::PUBLISHER_LINGER_MS);
    let raw = RawProducer::new(
        &b.servers.brokers,
        &b.scratch.topics.raw,
        &b.docs,
        events,
        linger,
        &b.observer,
    )
    .await?;
    let mut raw_runs = vec![raw.run_logged(&b.observer, 1, 2).await?];

    let backlog: i64 = sqlx::query_scalar("select count(*) from dbps_outbox")
        .fetch_one(&b.db)
        .await?;
    let backlog = u64::try_from(backlog)?;
    if backlog < events {
        bail!("the backlog holds {backlog} events, fewer than {events}");
    }
    b.relay.start()?;
    let relay_s = time_drain(&b.observer, backlog, b.catch_up()).await?;
    raw_runs.push(raw.run_logged(&b.observer, 2, 2).await?);

    Ok(DrainDetail {
        backlog_events: backlog,
        fill_s: fill.as_secs_f64(),
        relay_s: relay_s.as_secs_f64(),
        raw_acked_s: raw_runs.iter().map(|r| r.acked.as_secs_f64()).collect(),
        raw_consumed_s: raw_runs.iter().map(|r| r.consumed.as_secs_f64()).collect(),
        rounds,
    })
}

/// Phase 6b: the relay drains a large backlog; its rate, per tenth of the backlog too,
/// beside the drain phase's (`small_backlog_eps`).
async fn growth(b: &mut Bench<'_>, small_backlog_eps: f64) -> anyhow::Result<GrowthDetail> {
    b.relay.stop().await?;
    let events = b.args.growth_events;
    let label = "enqueueing the large backlog";
    let bar = progress::counted(label, events);
    let fill = b.writers.fill_backlog(events, FILL_EVENTS_PER_TX, &bar).await?;
    let summary = format!("{events} events in {:.1} s", fill.as_secs_f64());
    progress::done(&bar, label, &summary);
    let (table_bytes, index_bytes): (i64, i64) =
        sqlx::query_as("select pg_table_size('dbps_outbox'), pg_indexes_size('dbps_outbox')")
            .fetch_one(&b.db)
            .await?;
    let backlog = u64::try_from(
        sqlx::query_scalar::<_, i64>("select count(*) from dbps_outbox")
            .fetch_one(&b.db)
            .await?,
    )?;
    let label = "relay draining the large backlog";
    let bar = progress::counted(label, backlog);
    let seen_before = b.observer.events_seen();
    let tenth = (backlog / 10).max(1);
    let mut crossed: Vec<Duration> = Vec::with_capacity(10);
    let probe = Probe::start(&b.admin, RELAY_APP).await?;
    let started = Instant::now();
    b.relay.start()?;
    let observer = &b.observer;
    sampling(b.catch_up(), Duration::from_millis(20), async || {
        let seen = observer.events_seen().saturating_sub(seen_before);
        bar.set_position(seen);
        while crossed.len() < 10 && seen >= tenth * (crossed.len() as u64 + 1) {
            crossed.push(started.elapsed());
        }
        Ok(())
    })
    .await?;
    let relay_s = started.elapsed();
    let cost = probe.finish(&b.admin).await?;
    let cpu = cost.cpu();
    let cores = |seconds: f64| seconds / relay_s.as_secs_f64();
    while crossed.len() < 10 {
        crossed.push(relay_s);
    }
    let mut tenths_eps = Vec::with_capacity(10);
    let mut previous = Duration::ZERO;
    for at in crossed {
        tenths_eps.push(tenth as f64 / (at - previous).as_secs_f64().max(1e-3));
        previous = at;
    }
    let relay_eps = backlog as f64 / relay_s.as_secs_f64();
    let summary = format!(
        "{:.0} events/s ({backlog} events in {:.2} s)",
        relay_eps,
        relay_s.as_secs_f64()
    );
    progress::done(&bar, label, &summary);
    Ok(GrowthDetail {
        backlog_events: backlog,
        fill_s: fill.as_secs_f64(),
        table_bytes,
        index_bytes,
        relay_s: relay_s.as_secs_f64(),
        relay_eps,
        small_backlog_eps,
        vs_small_backlog: relay_eps / small_backlog_eps,
        tenths_eps,
        machine_busy_pct: cpu.map(crate::cpu::Usage::machine_busy_pct),
        relay_backends_cores: cpu.map(|c| cores(c.backends_s)),
        harness_cores: cpu.map(|c| cores(c.harness_s)),
    })
}

/// Times a relay, started just before, draining a backlog of `backlog` events until
/// `caught_up` completes, with a bar of the events the observer has seen meanwhile.
pub(crate) async fn time_drain(
    observer: &Observer,
    backlog: u64,
    caught_up: impl Future<Output = anyhow::Result<Duration>>,
) -> anyhow::Result<Duration> {
    let label = "relay draining the backlog";
    let bar = progress::counted(label, backlog);
    let seen_before = observer.events_seen();
    let started = Instant::now();
    sampling(caught_up, Duration::from_millis(200), async || {
        bar.set_position(observer.events_seen().saturating_sub(seen_before));
        Ok(())
    })
    .await?;
    let relay_s = started.elapsed();
    let summary = format!(
        "{:.0} events/s ({backlog} events in {:.2} s)",
        backlog as f64 / relay_s.as_secs_f64(),
        relay_s.as_secs_f64()
    );
    progress::done(&bar, label, &summary);
    Ok(relay_s)
}

/// Times relay rounds step by step, with the relay's own store and publisher: what
/// `Relay` does in a round, with a clock between the steps.
async fn profile_rounds(
    pool: &PgPool,
    publisher: &KafkaPublisher,
    batch_size: usize,
) -> anyhow::Result<Vec<RoundProfile>> {
    let store = PgOutboxStore::new(pool.clone());
    let mut lease = store.join().await?;
    store.rebalance(&mut lease).await?;
    let mut profiles = Vec::with_capacity(PROFILE_ROUNDS);
    for _ in 0..PROFILE_ROUNDS {
        let t0 = Instant::now();
        let batch = store.fetch(&mut lease, batch_size).await?;
        let t1 = Instant::now();
        let results = publisher
            .publish_batch(batch.iter().map(|p| (p.topic.as_str(), &p.envelope)))
            .await;
        let t2 = Instant::now();
        let mut ids = Vec::with_capacity(batch.len());
        for (pending, result) in batch.iter().zip(results) {
            result.with_context(|| format!("publishing outbox row {}", pending.id))?;
            ids.push(pending.id);
        }
        store.mark_published(&ids).await?;
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        profiles.push(RoundProfile {
            events: batch.len(),
            fetch_ms: ms(t0, t1),
            publish_ms: ms(t1, t2),
            mark_ms: ms(t2, t3),
        });
    }
    store.leave(lease).await?;
    Ok(profiles)
}

/// Phase 7: what an idle relay costs the database.
///
/// Whole relay lifetimes are counted, because a backend's counts reach the server late
/// unless it exits: with nothing else connected to the run's database, a fresh relay
/// runs for 1 s and then for 1 s plus the window, each time until its connections have
/// gone; the difference is the idle relay's cost over the window, its start-up
/// excluded. The tables are vacuumed first, so that autovacuum has no reason to run.
async fn idle(b: Bench<'_>) -> anyhow::Result<IdleDetail> {
    let Bench {
        args,
        scratch,
        admin,
        db,
        writers_pool,
        observer,
        publisher,
        relay_pool,
        mut relay,
        ..
    } = b;
    relay.stop().await?;
    relay_pool.close().await;
    let label = "idle relay: vacuum, disconnect";
    let bar = progress::spinner(label);
    let mut conn = scratch.options.clone().connect().await?;
    conn.execute(sqlx::raw_sql(AssertSqlSafe(String::from(
        "vacuum (analyze) dbps_outbox, dbps_outbox_sequences, bench_orders, bench_commits",
    ))))
    .await?;
    conn.close().await?;
    writers_pool.close().await;
    db.close().await;
    progress::done(&bar, label, "done");

    let short = Duration::from_secs(1);
    let label = "idle relay: counting queries";
    let bar = progress::timed(label, short * 2 + args.idle);
    let mut autovacuum = false;
    let mut lifetime = async |duration: Duration| -> anyhow::Result<i64> {
        let before = quiet_transactions(&admin, &scratch.database).await?;
        let pool = scratch.pool(4, RELAY_APP).await?;
        let mut relay = RelayControl::new(PgOutboxStore::new(pool.clone()), publisher.clone(), args.batch_size);
        relay.start()?;
        let started = Instant::now();
        while started.elapsed() < duration {
            let workers: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where datname = $1 and backend_type = 'autovacuum worker'",
            )
            .bind(&scratch.database)
            .fetch_one(&admin)
            .await?;
            autovacuum |= workers > 0;
            bar.inc(100);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay.stop().await?;
        pool.close().await;
        Ok(quiet_transactions(&admin, &scratch.database).await? - before)
    };
    let short_count = lifetime(short).await?;
    let long_count = lifetime(short + args.idle).await?;
    let transactions = long_count - short_count;
    let summary = format!(
        "{:.2} queries/s (relay lifetimes of {:.0} s and {:.0} s: {short_count} and {long_count} transactions)",
        transactions as f64 / args.idle.as_secs_f64(),
        short.as_secs_f64(),
        (short + args.idle).as_secs_f64()
    );
    progress::done(&bar, label, &summary);
    observer.check()?;
    observer.stop();
    Ok(IdleDetail {
        window_s: args.idle.as_secs_f64(),
        transactions,
        short_lifetime_transactions: short_count,
        long_lifetime_transactions: long_count,
        autovacuum_in_window: autovacuum,
    })
}
