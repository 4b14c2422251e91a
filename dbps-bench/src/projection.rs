//! The `projection` scenario: projections rebuilt from a topic's history, into
//! PostgreSQL (`dbps_cache::projection::PgProjection`) and into OpenSearch
//! (`dbps_cache::projection::OsProjection`, bulk requests), beside a consumer that reads
//! the same topic and writes nothing, in the same run.
//!
//! Phases:
//!
//! 1. a backlog of `--backlog` events over `--aggregates` customers is published to a
//!    topic;
//! 2. apply rates, ABBA-like: raw consume (a consumer runner whose handler writes
//!    nothing), a PostgreSQL projection and an OpenSearch projection rebuilt from the
//!    backlog, then both projections again and a last raw consume. Each rebuild is the
//!    first version of a projection of its own, so it starts from an empty table or index
//!    and no serving version has to hand over; the clock covers the whole rebuild
//!    (reading, applying, checkpointing, switching the view or alias);
//! 3. growth: the topic is filled up to `--rebuild-events` events (1,000,000 by default)
//!    and one more projection of each kind is built from all of them: the rebuild
//!    time a user waits for when a read model changes shape.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dbps_cache::projection::{
    Change, DocChange, OsProjection, PgProjection, ReadModel, RebuildProgress, RebuildReport, SearchModel,
};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_core::{CancellationToken, Envelope, HandlerError};
use serde::Serialize;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPool;

use crate::outbox::write_json;
use crate::progress;
use crate::replica::{Counting, CustomerEvents, NoWrites, checkpoint, drain, publish_backlog};
use crate::report::{Target, table, thousands};
use crate::servers::{Scratch, Servers, env_var, git_commit};

/// Options of the `projection` scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Events in the backlog of the apply phase.
    #[arg(long, default_value_t = 100_000)]
    backlog: u64,
    /// Customers the events are about.
    #[arg(long, default_value_t = 10_000)]
    aggregates: u64,
    /// Events the growth phase rebuilds from (the backlog is filled up to this many).
    #[arg(long, default_value_t = 1_000_000)]
    rebuild_events: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Writes the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The customers' read model, in PostgreSQL: `<name>_v1` behind the view `<name>`.
struct Customers {
    name: String,
    topic: String,
}

impl ReadModel for Customers {
    type Events = CustomerEvents;

    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> u32 {
        1
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    fn create_table(&self, table: &str) -> String {
        format!(
            "create table {table} (aggregate_id text primary key, name text not null, \
             tax_number text not null, source_sequence bigint not null)"
        )
    }

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
        let CustomerEvents::Changed(changed) = event;
        Ok(Change::row(&changed)?)
    }
}

/// The customers' search documents, in OpenSearch: `<prefix><name>_v1` behind the alias
/// `<prefix><name>`.
struct CustomerSearch {
    name: String,
    topic: String,
}

impl SearchModel for CustomerSearch {
    type Events = CustomerEvents;

    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> u32 {
        1
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    fn mappings(&self) -> serde_json::Value {
        serde_json::json!({
            "settings": { "number_of_shards": 1, "number_of_replicas": 0 },
            "mappings": { "properties": {
                "name": { "type": "text" },
                "tax_number": { "type": "keyword" },
            }}
        })
    }

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<DocChange, HandlerError> {
        let CustomerEvents::Changed(changed) = event;
        Ok(DocChange::index(&changed)?)
    }
}

/// Everything the scenario measured.
#[derive(Debug, Serialize)]
struct ProjectionReport {
    scenario: &'static str,
    raw_consume_eps: f64,
    pg_apply_eps: f64,
    pg_vs_raw_consume: f64,
    os_apply_eps: f64,
    os_vs_raw_consume: f64,
    rebuild_events: u64,
    pg_rebuild_s: f64,
    pg_rebuild_eps: f64,
    os_rebuild_s: f64,
    os_rebuild_eps: f64,
    backlog: u64,
    aggregates: u64,
    partitions: i32,
    wall_time_s: f64,
    cores: usize,
    git_commit: String,
    date: String,
    targets: Vec<Target>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.aggregates >= 1 && args.backlog >= args.aggregates && args.rebuild_events >= args.backlog,
        "needs 1 <= --aggregates <= --backlog <= --rebuild-events"
    );
    let wall = Instant::now();
    let servers = Servers::from_env()?;
    let search = Search::from_env()?;
    let scratch = Scratch::create(&servers, args.partitions).await?;
    let result = measure(&args, &servers, &scratch, &search).await;
    scratch.remove().await;
    search.remove().await;
    let mut report = result?;
    report.wall_time_s = wall.elapsed().as_secs_f64();
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

async fn measure(
    args: &Args,
    servers: &Servers,
    scratch: &Scratch,
    search: &Search,
) -> anyhow::Result<ProjectionReport> {
    let setup = progress::spinner("set up");
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("bench")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_replica", &dbps_cache::replica::MIGRATOR)
        .component("dbps_projection", &dbps_cache::projection::MIGRATOR)
        .run(&scratch.options)
        .await
        .context("migrations")?;
    let pool = scratch.pool(8, "dbps-bench").await?;
    progress::done(&setup, "set up", &format!("{} partitions", args.partitions));

    // 1. The backlog.
    let kafka = KafkaConfig::new(&servers.brokers);
    let publisher = KafkaPublisher::builder(kafka.clone()).build()?;
    let topic = scratch.topics.raw.clone();
    let mut sequences = vec![0i64; usize::try_from(args.aggregates)?];
    publish_backlog(&publisher, &topic, 0..args.backlog, &mut sequences).await?;

    // 2. Apply rates.
    let mut raw = Vec::new();
    let mut pg = Vec::new();
    let mut os = Vec::new();
    let mut run = 0;
    for (n, phase) in ["raw", "pg", "os", "os", "pg", "raw"].into_iter().enumerate() {
        let label = format!("{phase} {}", n + 1);
        match phase {
            "raw" => {
                checkpoint(&pool).await?;
                raw.push(drain(servers, scratch, &topic, Counting::new(NoWrites)?, args.backlog, &label).await?);
            }
            "pg" => {
                run += 1;
                let (took, report) = rebuild_pg(&pool, &kafka, &topic, run, args.backlog, &label).await?;
                expect_rebuilt(&report, args.backlog)?;
                pg.push(args.backlog as f64 / took.as_secs_f64());
            }
            _ => {
                run += 1;
                let (took, report) = rebuild_os(search, &kafka, &topic, run, args.backlog, &label).await?;
                expect_rebuilt(&report, args.backlog)?;
                os.push(args.backlog as f64 / took.as_secs_f64());
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (raw_consume_eps, pg_apply_eps, os_apply_eps) = (mean(&raw), mean(&pg), mean(&os));

    // 3. Growth.
    publish_backlog(&publisher, &topic, args.backlog..args.rebuild_events, &mut sequences).await?;
    run += 1;
    let (pg_took, report) = rebuild_pg(
        &pool,
        &kafka,
        &topic,
        run,
        args.rebuild_events,
        &format!("pg rebuild {}", thousands(args.rebuild_events as f64)),
    )
    .await?;
    expect_rebuilt(&report, args.rebuild_events)?;
    let held: i64 = sqlx::query_scalar(AssertSqlSafe(format!("select count(*) from bench_customers_{run}")))
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        u64::try_from(held)? == args.aggregates,
        "the rebuilt projection holds {held} customers"
    );
    let pg_rebuild_s = pg_took.as_secs_f64();
    let (os_took, report) = rebuild_os(
        search,
        &kafka,
        &topic,
        run,
        args.rebuild_events,
        &format!("os rebuild {}", thousands(args.rebuild_events as f64)),
    )
    .await?;
    expect_rebuilt(&report, args.rebuild_events)?;
    let documents = search.count(&format!("bench_customers_{run}")).await?;
    anyhow::ensure!(
        documents == args.aggregates,
        "the rebuilt search projection holds {documents} customers"
    );
    let os_rebuild_s = os_took.as_secs_f64();

    let targets = vec![
        Target::at_least("pg_vs_raw_consume", pg_apply_eps / raw_consume_eps.max(1e-9), 0.25),
        Target::at_most("pg_rebuild_s", pg_rebuild_s, 120.0),
        Target::at_most("os_rebuild_s", os_rebuild_s, 300.0),
    ];
    Ok(ProjectionReport {
        scenario: "projection",
        raw_consume_eps,
        pg_apply_eps,
        pg_vs_raw_consume: pg_apply_eps / raw_consume_eps.max(1e-9),
        os_apply_eps,
        os_vs_raw_consume: os_apply_eps / raw_consume_eps.max(1e-9),
        rebuild_events: args.rebuild_events,
        pg_rebuild_s,
        pg_rebuild_eps: args.rebuild_events as f64 / pg_rebuild_s.max(1e-9),
        os_rebuild_s,
        os_rebuild_eps: args.rebuild_events as f64 / os_rebuild_s.max(1e-9),
        backlog: args.backlog,
        aggregates: args.aggregates,
        partitions: args.partitions,
        wall_time_s: 0.0,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        git_commit: git_commit(),
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        targets,
    })
}

/// Builds the PostgreSQL projection `bench_customers_<run>` from `topic`; returns how long
/// it took and what it reported.
async fn rebuild_pg(
    pool: &PgPool,
    kafka: &KafkaConfig,
    topic: &str,
    run: u32,
    total: u64,
    label: &str,
) -> anyhow::Result<(Duration, RebuildReport)> {
    checkpoint(pool).await?;
    let bar = Arc::new(progress::counted(label, total));
    let shown = Arc::clone(&bar);
    let projection = PgProjection::builder(
        pool.clone(),
        Customers {
            name: format!("bench_customers_{run}"),
            topic: topic.to_owned(),
        },
    )
    .max_batch(2048)
    .on_progress(move |p| shown.set_position(p.replayed))
    .build()?;
    let started = Instant::now();
    let report = projection.rebuild(kafka, &CancellationToken::new()).await?;
    let took = started.elapsed();
    progress::done(
        &bar,
        label,
        &format!("{}/s", thousands(total as f64 / took.as_secs_f64())),
    );
    Ok((took, report))
}

/// Builds the OpenSearch projection `bench_customers_<run>` from `topic`; returns how long
/// it took and what it reported.
async fn rebuild_os(
    search: &Search,
    kafka: &KafkaConfig,
    topic: &str,
    run: u32,
    total: u64,
    label: &str,
) -> anyhow::Result<(Duration, RebuildReport)> {
    let bar = Arc::new(progress::counted(label, total));
    let shown = Arc::clone(&bar);
    let projection = OsProjection::builder(
        &search.url,
        CustomerSearch {
            name: format!("bench_customers_{run}"),
            topic: topic.to_owned(),
        },
    )
    .index_prefix(&search.prefix)
    .max_batch(2048)
    .on_progress(move |p: RebuildProgress| shown.set_position(p.replayed))
    .build()?;
    let started = Instant::now();
    let report = projection.rebuild(kafka, &CancellationToken::new()).await?;
    let took = started.elapsed();
    progress::done(
        &bar,
        label,
        &format!("{}/s", thousands(total as f64 / took.as_secs_f64())),
    );
    Ok((took, report))
}

/// The OpenSearch cluster (`DBPS_OPENSEARCH_URL`) and this run's index prefix; the run's
/// indices are deleted by [`Search::remove`].
struct Search {
    url: String,
    prefix: String,
    http: reqwest::Client,
}

impl Search {
    fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            url: env_var("DBPS_OPENSEARCH_URL")?.trim_end_matches('/').to_owned(),
            prefix: format!("dbps-bench-{}-", crate::servers::run_suffix()),
            http: reqwest::Client::new(),
        })
    }

    /// The documents the alias `name` (after the prefix) serves, after a refresh.
    async fn count(&self, name: &str) -> anyhow::Result<u64> {
        let alias = format!("{}/{}{name}", self.url, self.prefix);
        self.http
            .post(format!("{alias}/_refresh"))
            .send()
            .await?
            .error_for_status()?;
        let body: serde_json::Value = self
            .http
            .get(format!("{alias}/_count"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        body["count"].as_u64().with_context(|| format!("no count in {body}"))
    }

    /// Deletes the run's indices (and their aliases). Failures are reported, not returned.
    async fn remove(&self) {
        let url = format!("{}/{}*", self.url, self.prefix);
        let deleted = self
            .http
            .delete(&url)
            .query(&[("expand_wildcards", "all")])
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        if let Err(error) = deleted {
            eprintln!(
                "warning: could not delete the benchmark indices {}*: {error}",
                self.prefix
            );
        }
    }
}

fn expect_rebuilt(report: &RebuildReport, total: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        report.switched && report.replayed == total,
        "the rebuild replayed {} of {total} records (switched: {})",
        report.replayed,
        report.switched
    );
    Ok(())
}

fn render(r: &ProjectionReport) -> String {
    let mut out = format!(
        "dbps-bench projection · {} · commit {} · {} cores · {} partitions · run took {:.0} s\n\n",
        r.date, r.git_commit, r.cores, r.partitions, r.wall_time_s
    );
    let target = |metric: &str| {
        r.targets
            .iter()
            .find(|t| t.metric == metric)
            .map(|t| format!("{} {} {}", t.op, t.limit, if t.met { "met" } else { "missed" }))
            .unwrap_or_default()
    };
    let rows = vec![
        vec![
            format!(
                "rebuild {} events into PostgreSQL, events/s",
                thousands(r.backlog as f64)
            ),
            thousands(r.pg_apply_eps),
            format!(
                "raw consume {}/s ({:.2})",
                thousands(r.raw_consume_eps),
                r.pg_vs_raw_consume
            ),
            target("pg_vs_raw_consume"),
        ],
        vec![
            format!(
                "rebuild {} events into OpenSearch (bulk), events/s",
                thousands(r.backlog as f64)
            ),
            thousands(r.os_apply_eps),
            format!(
                "raw consume {}/s ({:.2})",
                thousands(r.raw_consume_eps),
                r.os_vs_raw_consume
            ),
            String::new(),
        ],
        vec![
            format!(
                "rebuild {} events into PostgreSQL, s",
                thousands(r.rebuild_events as f64)
            ),
            format!("{:.1}", r.pg_rebuild_s),
            format!("{}/s", thousands(r.pg_rebuild_eps)),
            target("pg_rebuild_s"),
        ],
        vec![
            format!(
                "rebuild {} events into OpenSearch, s",
                thousands(r.rebuild_events as f64)
            ),
            format!("{:.1}", r.os_rebuild_s),
            format!("{}/s", thousands(r.os_rebuild_eps)),
            target("os_rebuild_s"),
        ],
    ];
    out.push_str(&table(&["measure", "value", "beside", "target"], &rows));
    out
}
