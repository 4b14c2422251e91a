//! The `saga-kill` scenario: sagas started at a steady rate while the orchestrator, the
//! participants and the relays are killed with SIGKILL at random and restarted; then the
//! system settles and the checker (`saga_check.rs`) counts.
//!
//! Four services, each with a database of its own (outbox, inbox and its own tables):
//! `quote` (the orchestrator, two processes, each also starting half of the sagas),
//! `inventory`, `orders` and `billing` (one participant process each), and one relay per
//! database. Commands and replies go through 8-partition topics under the run's prefix.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, SecondsFormat, Utc};
use dbps_core::kafka::{TopicNaming, TopicSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::procs::Worker;
use crate::saga::{
    COMPENSATION_ATTEMPTS, COMPENSATION_BACKOFF, COMPENSATION_TIMEOUT, ORCHESTRATOR, PARTICIPANTS, STEP_TIMEOUT,
};
use crate::saga_check::{self, SagaCheckInput, SagaCounts};
use crate::scenarios::ScenarioArgs;
use crate::stack::{Servers, git_commit};

const NAME: &str = "saga-kill";
/// Sagas started at full size.
const SAGAS: u64 = 10_000;
/// Over this long.
const LOAD_SECONDS: f64 = 200.0;
/// Kills at least.
const MIN_KILLS: u32 = 20;
/// Seconds between kills.
const KILL_INTERVAL_S: Range<f64> = 2.0..7.0;
/// Orchestrator processes (each starts its share of the sagas).
const ORCHESTRATORS: u32 = 2;
/// Sagas refused at step 2.
const REJECT_FRACTION: f64 = 0.2;
/// Sagas whose step 3 is not answered (half applied, half ignored).
const TIMEOUT_FRACTION: f64 = 0.1;
/// How long the bill step waits for its reply.
const BILL_TIMEOUT: Duration = Duration::from_secs(3);
/// Partitions of the command and reply topics.
const PARTITIONS: i32 = 8;
/// How long a wait may go without progress while the system settles.
const SETTLE_STALL: Duration = Duration::from_secs(180);

/// What a worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Orchestrator,
    Participant,
    Relay,
}

impl Kind {
    const ALL: [Self; 3] = [Self::Orchestrator, Self::Participant, Self::Relay];

    fn name(self) -> &'static str {
        match self {
            Self::Orchestrator => "orchestrator",
            Self::Participant => "participant",
            Self::Relay => "relay",
        }
    }
}

/// A service's database.
struct Db {
    service: &'static str,
    name: String,
    pool: PgPool,
}

/// What the settling waits for.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Sagas running or compensating.
    Sagas,
    /// Outbox rows not yet published.
    Outboxes,
    /// Messages enqueued that their consumer's inbox has not taken.
    Inboxes,
}

impl Wait {
    fn what(self) -> &'static str {
        match self {
            Self::Sagas => "the sagas to end",
            Self::Outboxes => "the outboxes to drain",
            Self::Inboxes => "every command and reply to reach its inbox",
        }
    }
}

/// Runs the scenario, prints its table and writes its JSON. Returns whether it passed.
pub(crate) async fn run(args: ScenarioArgs) -> Result<bool> {
    ensure!(args.aggregates.is_none(), "{NAME} takes no --aggregates");
    let sagas = args.events.unwrap_or(SAGAS);
    ensure!(sagas > 0, "--events (sagas) must be at least 1");
    let load_seconds = args.seconds.unwrap_or(LOAD_SECONDS);
    ensure!(load_seconds > 0.0, "--seconds must be positive");
    let seed = args.seed.unwrap_or_else(rand::random);
    let servers = Servers {
        postgres_url: args.postgres_url.clone(),
        brokers: args.kafka_brokers.clone(),
        stack_script: args.stack_script.clone(),
    };
    let mut run = SagaRun::setup(servers, seed, sagas, load_seconds, args.faults.unwrap_or(MIN_KILLS)).await?;
    println!(
        "dbps-chaos {NAME}: seed {seed}, run {}, logs in {}",
        run.id,
        run.dir.display()
    );
    let report = match run.execute().await {
        Ok(report) => report,
        Err(error) => {
            run.stop_all().await;
            println!(
                "dbps-chaos {NAME}: the harness failed: {error:#}\nkept for inspection: {}",
                run.kept()
            );
            return Err(error);
        }
    };
    report.print();
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    if report.passed && !args.keep {
        run.cleanup().await;
    } else {
        println!("kept: {}", run.kept());
    }
    Ok(report.passed)
}

struct SagaRun {
    servers: Servers,
    seed: u64,
    rng: StdRng,
    id: String,
    dir: PathBuf,
    /// The orchestrating service's database first, then the participants' in step order.
    dbs: Vec<Db>,
    prefix: String,
    topics: Vec<String>,
    dlq: String,
    sagas: u64,
    load_seconds: f64,
    min_kills: u32,
    workers: Vec<(Kind, Worker)>,
    kills: u64,
    started: Instant,
    started_at: DateTime<Utc>,
    /// The commit at the start (the executable was built from the tree then, not later).
    commit: String,
    unexpected_exits: Vec<String>,
    failures: Vec<String>,
    last_progress: Instant,
}

impl SagaRun {
    async fn setup(servers: Servers, seed: u64, sagas: u64, load_seconds: f64, min_kills: u32) -> Result<Self> {
        let started = Instant::now();
        let started_at = Utc::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let id = format!("{:08x}", rng.random::<u32>());
        let dir = std::env::temp_dir().join(format!("dbps-chaos-{NAME}-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut dbs = Vec::new();
        for service in std::iter::once(ORCHESTRATOR).chain(PARTICIPANTS) {
            let name = format!("chaos_saga_kill_{id}_{service}");
            let pool = servers.create_database(&name, 4).await?;
            crate::saga::migrate(&pool, service).await?;
            dbs.push(Db { service, name, pool });
        }
        let prefix = format!("chaos.{NAME}.{id}.");
        let naming = TopicNaming::new().with_prefix(&prefix);
        let mut topics = vec![naming.replies(ORCHESTRATOR)?];
        for service in PARTICIPANTS {
            topics.push(naming.commands(service)?);
        }
        let dlq = format!("{prefix}dlq");
        let mut specs: Vec<TopicSpec> = topics
            .iter()
            .map(|t| TopicSpec::new(t, PARTITIONS).config("message.timestamp.type", "LogAppendTime"))
            .collect();
        specs.push(TopicSpec::new(&dlq, 1));
        servers.create_topics(&specs).await?;
        Ok(Self {
            servers,
            seed,
            rng,
            id,
            dir,
            dbs,
            prefix,
            topics,
            dlq,
            sagas,
            load_seconds,
            min_kills,
            workers: Vec::new(),
            kills: 0,
            started,
            started_at,
            commit: git_commit(),
            unexpected_exits: Vec::new(),
            failures: Vec::new(),
            last_progress: Instant::now(),
        })
    }

    fn quote(&self) -> &PgPool {
        &self.dbs[0].pool
    }

    fn participants(&self) -> &[Db] {
        &self.dbs[1..]
    }

    fn kept(&self) -> String {
        let names: Vec<&str> = self.dbs.iter().map(|d| d.name.as_str()).collect();
        format!(
            "databases {}, topics {} {}, logs {}",
            names.join(" "),
            self.topics.join(" "),
            self.dlq,
            self.dir.display()
        )
    }

    fn rate(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // saga counts stay far below 2^52
        let sagas = self.sagas as f64;
        sagas / self.load_seconds
    }

    async fn execute(&mut self) -> Result<SagaReport> {
        self.start_workers()?;
        self.kill_loop().await?;
        println!(
            "[{:>6.1}s] {} sagas started, {} kills; waiting for the sagas to end",
            self.elapsed(),
            self.started_sagas().await?,
            self.kills
        );
        for wait in [Wait::Sagas, Wait::Outboxes, Wait::Inboxes] {
            self.wait_until_zero(wait).await?;
        }
        for (_, worker) in &mut self.workers {
            if !worker.stop(Duration::from_secs(30)).await? {
                self.failures
                    .push(format!("{} did not stop gracefully within 30 s", worker.name()));
            }
        }
        self.progress(true).await;
        println!("checking: reading the databases and the topics directly ...");
        let participants: Vec<(&str, &PgPool, &str)> = self
            .participants()
            .iter()
            .zip(&self.topics[1..])
            .map(|(db, topic)| (db.service, &db.pool, topic.as_str()))
            .collect();
        let counts = saga_check::check(&SagaCheckInput {
            quote: self.quote(),
            participants,
            replies: &self.topics[0],
            dlq: &self.dlq,
            brokers: &self.servers.brokers,
        })
        .await?;
        Ok(self.report(counts))
    }

    // --- Workers ---------------------------------------------------------------------------

    fn start_workers(&mut self) -> Result<()> {
        let env = |db: &Db| vec![(String::from("DBPS_CHAOS_DB_URL"), self.servers.database_url(&db.name))];
        let kafka = |service: &str| {
            vec![
                String::from("--brokers"),
                self.servers.brokers.clone(),
                String::from("--prefix"),
                self.prefix.clone(),
                String::from("--group"),
                format!("chaos-{NAME}-{}-{service}", self.id),
                String::from("--dlq"),
                self.dlq.clone(),
            ]
        };
        let mut workers = Vec::new();
        for db in &self.dbs {
            let name = format!("relay-{}", db.service);
            let args = vec![
                String::from("relay"),
                String::from("--brokers"),
                self.servers.brokers.clone(),
                String::from("--name"),
                name.clone(),
                String::from("--keep-published"),
            ];
            workers.push((Kind::Relay, Worker::new(&name, args, env(db), &self.dir)));
        }
        for db in self.participants() {
            let mut args = vec![String::from("saga-participant")];
            args.extend(kafka(db.service));
            args.extend([String::from("--service"), db.service.to_owned()]);
            workers.push((Kind::Participant, Worker::new(db.service, args, env(db), &self.dir)));
        }
        let rate = self.rate() / f64::from(ORCHESTRATORS);
        for i in 0..ORCHESTRATORS {
            let name = format!("orchestrator-{i}");
            let mut args = vec![String::from("saga-orchestrator")];
            args.extend(kafka(ORCHESTRATOR));
            args.extend([
                String::from("--name"),
                name.clone(),
                String::from("--starter"),
                i.to_string(),
                String::from("--starters"),
                ORCHESTRATORS.to_string(),
                String::from("--sagas"),
                self.sagas.to_string(),
                String::from("--rate"),
                format!("{rate:.3}"),
                String::from("--reject-fraction"),
                REJECT_FRACTION.to_string(),
                String::from("--timeout-fraction"),
                TIMEOUT_FRACTION.to_string(),
                String::from("--bill-timeout-ms"),
                BILL_TIMEOUT.as_millis().to_string(),
                String::from("--seed"),
                self.seed.to_string(),
            ]);
            workers.push((
                Kind::Orchestrator,
                Worker::new(&name, args, env(&self.dbs[0]), &self.dir),
            ));
        }
        for (_, worker) in &mut workers {
            worker.start()?;
        }
        self.workers = workers;
        Ok(())
    }

    /// Notices workers that exited by themselves (none should) and restarts them.
    fn reap(&mut self) -> Result<()> {
        for (_, worker) in &mut self.workers {
            if let Some(status) = worker.poll_exit()? {
                println!(
                    "{} exited by itself ({status}); restarting it. Its log ends:\n{}",
                    worker.name(),
                    worker.log_tail(20)
                );
                self.unexpected_exits.push(format!("{} ({status})", worker.name()));
                worker.start()?;
            }
        }
        Ok(())
    }

    /// Waits `duration`, watching the workers and printing progress.
    async fn watch(&mut self, duration: Duration) -> Result<()> {
        let until = Instant::now() + duration;
        loop {
            self.reap()?;
            self.progress(false).await;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(200))).await;
        }
    }

    async fn stop_all(&mut self) {
        for (_, worker) in &mut self.workers {
            let _ = worker.stop(Duration::from_secs(10)).await;
        }
    }

    fn kills_of(&self, kind: Kind) -> u32 {
        self.workers
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, w)| w.kills())
            .sum()
    }

    // --- Faults ----------------------------------------------------------------------------

    /// Kills a random kind of worker — one process of it or, one time in five, all of them
    /// — every 2–7 s, and restarts them 0–1 s later; until the sagas are started, the
    /// minimum number of kills is reached and every kind was killed at least once.
    async fn kill_loop(&mut self) -> Result<()> {
        let mut best = 0;
        let mut last_growth = Instant::now();
        loop {
            let started = self.started_sagas().await?;
            let every_kind = self.min_kills == 0 || Kind::ALL.iter().all(|&k| self.kills_of(k) > 0);
            if started >= self.sagas && self.kills >= u64::from(self.min_kills) && every_kind {
                return Ok(());
            }
            if started > best {
                best = started;
                last_growth = Instant::now();
            } else if started < self.sagas && last_growth.elapsed() > SETTLE_STALL {
                self.failures.push(format!(
                    "the starters started no saga for {} s ({started} of {})",
                    SETTLE_STALL.as_secs(),
                    self.sagas
                ));
                return Ok(());
            }
            let wait = self.rng.random_range(KILL_INTERVAL_S);
            self.watch(Duration::from_secs_f64(wait)).await?;
            let kind = Kind::ALL[self.rng.random_range(0..Kind::ALL.len())];
            let of_kind: Vec<usize> = (0..self.workers.len()).filter(|&i| self.workers[i].0 == kind).collect();
            let chosen = if of_kind.len() > 1 && self.rng.random_bool(0.2) {
                of_kind
            } else {
                vec![of_kind[self.rng.random_range(0..of_kind.len())]]
            };
            let mut names = Vec::new();
            for &i in &chosen {
                self.workers[i].1.kill().await?;
                names.push(self.workers[i].1.name().to_owned());
            }
            self.kills += chosen.len() as u64;
            println!("[{:>6.1}s] SIGKILL {}", self.elapsed(), names.join(", "));
            let down = self.rng.random_range(0.0..1.0);
            self.watch(Duration::from_secs_f64(down)).await?;
            for &i in &chosen {
                self.workers[i].1.start()?;
            }
        }
    }

    // --- Measurements ------------------------------------------------------------------------

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    async fn started_sagas(&self) -> Result<u64> {
        count(self.quote(), "select count(*) from quotes").await
    }

    async fn remaining(&self, wait: Wait) -> Result<u64> {
        match wait {
            Wait::Sagas => {
                count(
                    self.quote(),
                    "select count(*) from dbps_saga_instances where state in ('running', 'compensating')",
                )
                .await
            }
            Wait::Outboxes => {
                let mut pending = 0;
                for db in &self.dbs {
                    pending += count(
                        &db.pool,
                        "select count(*) from dbps_outbox where published_at is null and parked_at is null",
                    )
                    .await?;
                }
                Ok(pending)
            }
            Wait::Inboxes => {
                let mut replies_sent = 0;
                let mut commands_taken = 0;
                for db in self.participants() {
                    replies_sent += count(&db.pool, "select count(*) from dbps_outbox").await?;
                    commands_taken += count(&db.pool, "select count(*) from dbps_inbox").await?;
                }
                let commands_sent = count(self.quote(), "select count(*) from dbps_outbox").await?;
                let replies_taken = count(self.quote(), "select count(*) from dbps_inbox").await?;
                Ok(commands_sent.abs_diff(commands_taken) + replies_sent.abs_diff(replies_taken))
            }
        }
    }

    /// Polls until nothing remains; gives up after `SETTLE_STALL` without progress (the
    /// checker then counts what is missing).
    async fn wait_until_zero(&mut self, wait: Wait) -> Result<()> {
        println!("[{:>6.1}s] waiting for {}", self.elapsed(), wait.what());
        let mut best = u64::MAX;
        let mut last_progress = Instant::now();
        loop {
            let left = self.remaining(wait).await?;
            if left == 0 {
                return Ok(());
            }
            if left < best {
                best = left;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > SETTLE_STALL {
                self.failures.push(format!(
                    "gave up waiting for {}: {left} left, no progress for {} s",
                    wait.what(),
                    SETTLE_STALL.as_secs()
                ));
                return Ok(());
            }
            self.watch(Duration::from_millis(500)).await?;
        }
    }

    async fn progress(&mut self, force: bool) {
        if !force && self.last_progress.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last_progress = Instant::now();
        let states: Vec<(String, i64)> =
            sqlx::query_as("select state, count(*) from dbps_saga_instances group by state")
                .fetch_all(self.quote())
                .await
                .unwrap_or_default();
        let of = |state: &str| states.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
        let show = |v: Result<u64>| v.map_or_else(|_| String::from("?"), |v| v.to_string());
        let started = show(self.started_sagas().await);
        let pending = show(self.remaining(Wait::Outboxes).await);
        println!(
            "[{:>6.1}s] started {started:>6}  completed {:>6}  compensated {:>5}  stuck {}  in flight {:>4}  outbox pending {pending:>5}  kills {}",
            self.elapsed(),
            of("completed"),
            of("compensated"),
            of("stuck"),
            of("running") + of("compensating"),
            self.kills
        );
    }

    // --- Result ------------------------------------------------------------------------------

    fn report(&mut self, counts: SagaCounts) -> SagaReport {
        let mut failures = std::mem::take(&mut self.failures);
        for (name, value) in counts.must_be_zero() {
            if value != 0 {
                failures.push(format!("{name} = {value}, must be 0"));
            }
        }
        if counts.sagas_started < self.sagas {
            failures.push(format!(
                "started {} sagas, the scenario needs {}",
                counts.sagas_started, self.sagas
            ));
        }
        if self.kills < u64::from(self.min_kills) {
            failures.push(format!(
                "killed {} processes, the scenario needs {}",
                self.kills, self.min_kills
            ));
        }
        for exit in &self.unexpected_exits {
            failures.push(format!("unexpected exit: {exit}"));
        }
        let kills_by_role: BTreeMap<String, u64> = Kind::ALL
            .iter()
            .map(|&k| (k.name().to_owned(), u64::from(self.kills_of(k))))
            .collect();
        let mut results = serde_json::Map::new();
        results.insert(String::from("kills_by_role"), json!(kills_by_role));
        let absorbed: usize = self
            .workers
            .iter()
            .filter(|(k, _)| *k != Kind::Relay)
            .map(|(_, w)| w.log_count("duplicate skipped"))
            .sum();
        results.insert(String::from("redeliveries_absorbed_by_inbox"), json!(absorbed));
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|(_, w)| json!({ "worker": w.name(), "starts": w.starts(), "kills": w.kills(), "unexpected_exits": w.unexpected_exits() }))
            .collect();
        results.insert(String::from("workers"), Value::Array(workers));
        let mut settings = serde_json::Map::new();
        settings.insert(String::from("sagas"), json!(self.sagas));
        settings.insert(String::from("rate_per_s"), json!(format!("{:.0}", self.rate())));
        settings.insert(
            String::from("mix"),
            json!(format!(
                "{:.0}% complete, {:.0}% refused at step 2, {:.0}% unanswered at step 3",
                (1.0 - REJECT_FRACTION - TIMEOUT_FRACTION) * 100.0,
                REJECT_FRACTION * 100.0,
                TIMEOUT_FRACTION * 100.0
            )),
        );
        settings.insert(String::from("bill_timeout_s"), json!(BILL_TIMEOUT.as_secs()));
        settings.insert(String::from("step_timeout_s"), json!(STEP_TIMEOUT.as_secs()));
        settings.insert(
            String::from("compensation"),
            json!(format!(
                "{COMPENSATION_ATTEMPTS} attempts, backoff {} s doubling, timeout {} s",
                COMPENSATION_BACKOFF.as_secs(),
                COMPENSATION_TIMEOUT.as_secs()
            )),
        );
        settings.insert(String::from("orchestrators"), json!(ORCHESTRATORS));
        settings.insert(String::from("participants"), json!(PARTICIPANTS.len()));
        settings.insert(String::from("relays"), json!(self.dbs.len()));
        settings.insert(String::from("min_kills"), json!(self.min_kills));
        settings.insert(
            String::from("kill_interval_s"),
            json!(format!("{}-{}", KILL_INTERVAL_S.start, KILL_INTERVAL_S.end)),
        );
        settings.insert(String::from("topic_partitions"), json!(PARTITIONS));
        SagaReport {
            scenario: NAME.to_owned(),
            passed: failures.is_empty(),
            failures,
            sagas_started: counts.sagas_started,
            completed: counts.completed,
            compensated: counts.compensated,
            stuck: counts.stuck,
            not_terminal: counts.not_terminal,
            double_effects: counts.double_effects,
            uncompensated: counts.uncompensated,
            double_transitions: counts.double_transitions,
            faults_injected: self.kills,
            duration_s: (self.elapsed() * 10.0).round() / 10.0,
            git_commit: self.commit.clone(),
            started_at: self.started_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            seed: self.seed,
            cores: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            settings,
            results,
            counts,
        }
    }

    async fn cleanup(&mut self) {
        for db in &self.dbs {
            db.pool.close().await;
        }
        for db in &self.dbs {
            if let Err(error) = self.servers.drop_database(&db.name).await {
                println!("could not drop database {}: {error:#}", db.name);
            }
        }
        let mut topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        topics.push(&self.dlq);
        if let Err(error) = self.servers.delete_topics(&topics).await {
            println!("could not delete topics: {error:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .with_context(|| format!("count: {sql}"))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The scenario's result: printed as a table, written as JSON.
#[derive(Debug, Serialize)]
struct SagaReport {
    scenario: String,
    passed: bool,
    failures: Vec<String>,
    sagas_started: u64,
    completed: u64,
    compensated: u64,
    stuck: u64,
    not_terminal: u64,
    double_effects: u64,
    uncompensated: u64,
    double_transitions: u64,
    faults_injected: u64,
    duration_s: f64,
    git_commit: String,
    started_at: String,
    seed: u64,
    cores: usize,
    settings: serde_json::Map<String, Value>,
    results: serde_json::Map<String, Value>,
    counts: SagaCounts,
}

impl SagaReport {
    fn print(&self) {
        println!();
        println!(
            "== dbps-chaos {} == started {} · git {} · seed {} · {} cores · {:.1} s",
            self.scenario, self.started_at, self.git_commit, self.seed, self.cores, self.duration_s
        );
        let settings: Vec<String> = self.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("settings: {}", settings.join(" "));
        println!();
        println!("{:<32} {:>12}  must be", "count", "value");
        println!("{} {}  {}", "-".repeat(32), "-".repeat(12), "-".repeat(8));
        let zero: Vec<&str> = self.counts.must_be_zero().iter().map(|(name, _)| *name).collect();
        for (name, value) in self.counts.rows() {
            let rule = if zero.contains(&name.as_str()) {
                if value == "0" { "0  ok" } else { "0  FAILED" }
            } else {
                ""
            };
            println!("{name:<32} {value:>12}  {rule}");
        }
        println!("{:<32} {:>12}", "faults_injected", self.faults_injected);
        println!();
        println!("{:<48} {:>12}", "intent -> outcome", "sagas");
        println!("{} {}", "-".repeat(48), "-".repeat(12));
        for (intent, outcomes) in &self.counts.outcomes {
            for (outcome, n) in outcomes {
                println!("{:<48} {n:>12}", format!("{intent} -> {outcome}"));
            }
        }
        if !self.results.is_empty() {
            println!();
            for (name, value) in &self.results {
                println!("{name:<32} {value:>12}");
            }
        }
        println!();
        if self.passed {
            println!("RESULT: PASS ({})", self.scenario);
        } else {
            println!("RESULT: FAIL ({})", self.scenario);
            for failure in &self.failures {
                println!("  - {failure}");
            }
        }
    }

    fn write_json(&self, path: &std::path::Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
    }
}
