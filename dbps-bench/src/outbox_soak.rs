//! The `outbox-soak` scenario: the PostgreSQL outbox under a steady load for a long time,
//! to show that nothing creeps: commit → consumer latency per interval, and the outbox
//! table's and indexes' size, live and dead rows and autovacuum runs at the end of every
//! interval.
//!
//! 1. the maximum write rate with the outbox (relay running) is measured for `--probe`;
//! 2. writers then offer `--load` of it (open loop, rate-limited) for `--duration`, in
//!    intervals of `--interval`, the relay running throughout;
//! 3. at the end the consumer catches up, and each interval's latencies are computed
//!    from the commit timestamps of the events the consumer saw during it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde::Serialize;

use crate::observer::Sighting;
use crate::outbox::{self, SetUp, write_json};
use crate::probes::commit_latencies;
use crate::progress;
use crate::report::{LatencyPoint, Target, table, thousands};
use crate::servers::{Scratch, Servers, git_commit};
use crate::workload::{Load, Transaction};

/// Options of the `outbox-soak` scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long the steady load runs.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// One row of the report per interval.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// The offered load, as a fraction of the maximum write rate measured first.
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    /// How long the maximum write rate is measured.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    probe: Duration,
    /// Writes the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Concurrent writers, each on its own connection.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Messages the relay fetches and publishes per round.
    #[arg(long, default_value_t = 2000)]
    batch_size: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Distinct orders (aggregates) the writers update.
    #[arg(long, default_value_t = 20_000)]
    keys: i64,
}

/// One interval of the soak.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Interval {
    /// 1-based.
    pub(crate) n: usize,
    pub(crate) achieved_eps: f64,
    /// Commit → consumer latency of the events the consumer saw during the interval.
    pub(crate) latency_ms: LatencyPoint,
    /// At the end of the interval: `pg_table_size` and `pg_indexes_size` of `dbps_outbox`.
    pub(crate) table_bytes: i64,
    pub(crate) index_bytes: i64,
    /// The statistics collector's live and dead rows of `dbps_outbox`.
    pub(crate) live_rows: i64,
    pub(crate) dead_rows: i64,
    /// Autovacuum runs on `dbps_outbox` so far.
    pub(crate) autovacuums: i64,
    /// `pg_table_size('dbps_outbox_sequences')`.
    pub(crate) sequences_bytes: i64,
}

/// Everything the soak measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakReport {
    pub(crate) scenario: &'static str,
    pub(crate) git_commit: String,
    pub(crate) date: String,
    pub(crate) cores: usize,
    pub(crate) postgres_version: String,
    pub(crate) payload_bytes: usize,
    pub(crate) writers: usize,
    pub(crate) relay_batch_size: usize,
    /// The maximum write rate with the outbox, relay running (`--probe`).
    pub(crate) max_write_tps: f64,
    pub(crate) load_fraction: f64,
    pub(crate) offered_eps: f64,
    pub(crate) duration_s: f64,
    pub(crate) intervals: Vec<Interval>,
    /// p99 of the last interval over the median of the intervals' p99 (target ≤ 1.5).
    pub(crate) last_p99_vs_median: f64,
    /// Largest outbox size (table and indexes) in the second half over the largest in
    /// the first half (target ≤ 1.5).
    pub(crate) size_second_vs_first_half: f64,
    pub(crate) targets: Vec<Target>,
    pub(crate) wall_time_s: f64,
}

/// Runs the scenario, prints its table and writes the JSON.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.writers == 0 || args.batch_size == 0 || args.partitions < 1 || args.keys < args.writers as i64 {
        bail!("--writers, --batch-size and --partitions must be positive, and --keys at least --writers");
    }
    if !(0.0 < args.load && args.load <= 1.0) {
        bail!("--load must be in (0, 1]");
    }
    if args.interval < Duration::from_secs(5)
        || args.duration < args.interval * 2
        || args.probe < Duration::from_secs(4)
    {
        bail!("--interval must be at least 5s, --duration at least two intervals and --probe at least 4s");
    }
    let started = Instant::now();
    let commit = git_commit();
    let servers = Servers::from_env()?;
    let scratch = Scratch::create(&servers, args.partitions).await?;
    eprintln!(
        "dbps-bench outbox-soak: database {}, topic {}",
        scratch.database, scratch.topics.events
    );
    let result = tokio::select! {
        result = soak(&args, &servers, &scratch) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let bar = progress::spinner("removing database and topics");
    scratch.remove().await;
    bar.finish_and_clear();
    let mut report = result?;
    report.git_commit = commit;
    report.wall_time_s = started.elapsed().as_secs_f64();
    println!("{}", render(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

async fn soak(args: &Args, servers: &Servers, scratch: &Scratch) -> anyhow::Result<SoakReport> {
    let bench_args = outbox::Args {
        duration: args.probe,
        json: None,
        chart: None,
        writers: args.writers,
        batch_size: args.batch_size,
        linger_ms: None,
        drain_events: 0,
        growth_events: 0,
        partitions: args.partitions,
        keys: args.keys,
        idle: Duration::from_secs(2),
    };
    let (
        mut b,
        SetUp {
            postgres_version,
            payload_bytes,
        },
    ) = outbox::setup(&bench_args, servers, scratch).await?;
    b.relay.start()?;
    let max_write_tps = b
        .flat_out(
            "maximum write rate with the outbox",
            Transaction::BusinessWithOutbox,
            args.probe,
        )
        .await?;
    b.catch_up().await?;
    let offered_eps = max_write_tps * args.load;
    let count = usize::try_from(args.duration.as_nanos() / args.interval.as_nanos())?;
    let mut sightings: Vec<Vec<Sighting>> = Vec::with_capacity(count);
    let mut rows = Vec::with_capacity(count);
    b.observer.start_recording();
    for n in 1..=count {
        let label = format!("interval {n}/{count} at {offered_eps:.0} ev/s");
        let bar = progress::timed(&label, args.interval);
        let load = Load {
            transaction: Transaction::BusinessWithOutbox,
            rate: Some(offered_eps),
            duration: args.interval,
        };
        let result = b.writers.run(load, &bar).await?;
        // What the consumer saw during the interval; the recording goes on at once.
        let seen = b.observer.stop_recording();
        b.observer.start_recording();
        let size: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "select pg_table_size('dbps_outbox'), pg_indexes_size('dbps_outbox'), n_live_tup, n_dead_tup,
                    autovacuum_count, pg_table_size('dbps_outbox_sequences')
             from pg_stat_user_tables where relname = 'dbps_outbox'",
        )
        .fetch_one(&b.db)
        .await?;
        progress::done(
            &bar,
            &label,
            &format!(
                "{:.0} tx/s, {} events seen, outbox {} kB + {} kB of indexes, {} dead rows",
                result.per_second(),
                seen.len(),
                size.0 / 1000,
                size.1 / 1000,
                size.3
            ),
        );
        rows.push((result.per_second(), size));
        sightings.push(seen);
    }
    b.catch_up().await?;
    if let Some(last) = sightings.last_mut() {
        last.extend(b.observer.stop_recording());
    }
    b.relay.stop().await?;

    let label = "latencies from commit timestamps";
    let bar = progress::spinner(label);
    let mut intervals = Vec::with_capacity(count);
    for (n, (seen, (achieved_eps, size))) in sightings.iter().zip(rows).enumerate() {
        let latencies = commit_latencies(&b.admin, seen).await?;
        intervals.push(Interval {
            n: n + 1,
            achieved_eps,
            latency_ms: LatencyPoint::new(
                (args.load, offered_eps, achieved_eps),
                &latencies,
                "consumer receipt",
                None,
            ),
            table_bytes: size.0,
            index_bytes: size.1,
            live_rows: size.2,
            dead_rows: size.3,
            autovacuums: size.4,
            sequences_bytes: size.5,
        });
    }
    progress::done(&bar, label, "done");

    let mut p99s: Vec<f64> = intervals.iter().map(|i| i.latency_ms.p99).collect();
    p99s.sort_by(f64::total_cmp);
    let median = p99s[p99s.len() / 2];
    let last_p99_vs_median = intervals.last().map_or(0.0, |i| i.latency_ms.p99) / median;
    let half = intervals.len() / 2;
    let largest = |part: &[Interval]| part.iter().map(|i| i.table_bytes + i.index_bytes).max().unwrap_or(0) as f64;
    let size_second_vs_first_half = largest(&intervals[half..]) / largest(&intervals[..half]).max(1.0);
    let targets = vec![
        Target::at_most("last_p99_vs_median", last_p99_vs_median, 1.5),
        Target::at_most("size_second_vs_first_half", size_second_vs_first_half, 1.5),
    ];
    Ok(SoakReport {
        scenario: "outbox-soak",
        git_commit: String::new(),
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        postgres_version,
        payload_bytes,
        writers: args.writers,
        relay_batch_size: args.batch_size,
        max_write_tps,
        load_fraction: args.load,
        offered_eps,
        duration_s: args.duration.as_secs_f64(),
        intervals,
        last_p99_vs_median,
        size_second_vs_first_half,
        targets,
        wall_time_s: 0.0,
    })
}

/// The table printed at the end of a run (Markdown, pasted as is into the docs).
fn render(r: &SoakReport) -> String {
    let mut out = format!(
        "dbps-bench outbox-soak · {} · commit {} · {} cores · PostgreSQL {} · {} writers · relay batch {} · payload {} B · \
         {:.0} % of {} tx/s = {} ev/s for {:.0} min · run took {:.0} s\n\n",
        r.date,
        r.git_commit,
        r.cores,
        r.postgres_version,
        r.writers,
        r.relay_batch_size,
        r.payload_bytes,
        r.load_fraction * 100.0,
        thousands(r.max_write_tps),
        thousands(r.offered_eps),
        r.duration_s / 60.0,
        r.wall_time_s,
    );
    let rows: Vec<Vec<String>> = r
        .intervals
        .iter()
        .map(|i| {
            vec![
                i.n.to_string(),
                thousands(i.achieved_eps),
                thousands(i.latency_ms.samples as f64),
                format!("{:.1}", i.latency_ms.p50),
                format!("{:.1}", i.latency_ms.p99),
                format!("{:.1}", i.latency_ms.max),
                thousands(i.table_bytes as f64 / 1000.0),
                thousands(i.index_bytes as f64 / 1000.0),
                thousands(i.live_rows as f64),
                thousands(i.dead_rows as f64),
                i.autovacuums.to_string(),
                thousands(i.sequences_bytes as f64 / 1000.0),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "interval",
            "tx/s",
            "events seen",
            "p50 ms",
            "p99 ms",
            "max ms",
            "outbox kB",
            "indexes kB",
            "live rows",
            "dead rows",
            "autovacuums",
            "sequences kB",
        ],
        &rows,
    ));
    out.push('\n');
    for t in &r.targets {
        out.push_str(&format!(
            "{} = {:.2} (target {} {}): {}\n",
            t.metric,
            t.value,
            t.op,
            t.limit,
            if t.met { "met" } else { "missed" }
        ));
    }
    out
}
