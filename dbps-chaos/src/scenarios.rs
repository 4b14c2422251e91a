//! The scenarios: set up, load, inject faults, settle, check, report, clean up.

mod network;

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use dbps_core::Message as _;
use dbps_core::kafka::TopicSpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::checker::{self, CheckInput};
use crate::model::{
    CONSUMER_SCHEMA, INBOX_CONSUMER, MONGO_ORDERS, OrderChanged, POISON_HEADER, REPLICA_SOURCE_SCHEMA, SERVICE_SCHEMA,
    aggregate_id,
};
use crate::procs::Worker;
use crate::replica::{self, Replayer, ReplicaCounts, Watcher};
use crate::report::Report;
use crate::stack::{Servers, git_commit};

/// A fault-injection scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    RelayKill,
    MongoRelayKill,
    Gap,
    ConsumerKill,
    BrokerRestart,
    Poison,
    Replica,
    PgRestart,
    NetReset,
    NetLatency,
    HalfOpen,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::RelayKill => "relay-kill",
            Self::MongoRelayKill => "mongo-relay-kill",
            Self::Gap => "gap",
            Self::ConsumerKill => "consumer-kill",
            Self::BrokerRestart => "broker-restart",
            Self::Poison => "poison",
            Self::Replica => "replica",
            Self::PgRestart => "pg-restart",
            Self::NetReset => "net-reset",
            Self::NetLatency => "net-latency",
            Self::HalfOpen => "half-open",
        }
    }

    /// Whether the scenario's workers reach the servers through Toxiproxy.
    fn proxied(self) -> bool {
        matches!(self, Self::NetReset | Self::NetLatency | Self::HalfOpen)
    }

    /// The scenario's load and faults at full size.
    fn plan(self) -> Plan {
        let base = Plan {
            events: 50_000,
            load_seconds: None,
            writer_processes: 2,
            writer_concurrency: 4,
            aggregates: 1000,
            late_fraction: 0.0,
            late_max_ms: 0,
            rollback_fraction: 0.0,
            poison_every: 0,
            relays: 1,
            relay_args: Vec::new(),
            worker_args: Vec::new(),
            consumers: 0,
            min_faults: 0,
            kill_interval_s: 1.0..6.0,
            replay_fraction: 0.0,
            delete_every: 0,
        };
        match self {
            Self::RelayKill => Plan {
                events: 60_000,
                load_seconds: Some(100.0),
                relays: 2,
                min_faults: 20,
                kill_interval_s: 1.0..6.0,
                ..base
            },
            // The MongoDB-protocol server of the local stack takes about 140 outbox
            // writes a second (docs/benchmarks.md), so the load is smaller.
            Self::MongoRelayKill => Plan {
                events: 8_000,
                load_seconds: Some(100.0),
                aggregates: 200,
                relays: 2,
                min_faults: 20,
                kill_interval_s: 1.0..6.0,
                ..base
            },
            Self::Gap => Plan {
                events: 200_000,
                writer_processes: 4,
                writer_concurrency: 8,
                aggregates: 2000,
                late_fraction: 0.10,
                late_max_ms: 2000,
                rollback_fraction: 0.01,
                relays: 2,
                ..base
            },
            Self::ConsumerKill => Plan {
                events: 50_000,
                load_seconds: Some(120.0),
                consumers: 2,
                min_faults: 20,
                kill_interval_s: 2.0..7.0,
                ..base
            },
            Self::BrokerRestart => Plan {
                events: 40_000,
                load_seconds: Some(80.0),
                relay_args: vec![String::from("--message-timeout-ms"), String::from("0")],
                consumers: 1,
                min_faults: 1,
                ..base
            },
            Self::Poison => Plan {
                events: 200_000,
                poison_every: 10_000,
                relay_args: vec![String::from("--message-max-bytes"), String::from("100000")],
                consumers: 2,
                ..base
            },
            // Relays reach PostgreSQL again after each restart by themselves; their lease
            // sessions end with the server.
            Self::PgRestart => Plan {
                events: 50_000,
                load_seconds: Some(160.0),
                relays: 2,
                relay_args: network_relay_args(false),
                consumers: 1,
                min_faults: 10,
                ..base
            },
            Self::NetReset => Plan {
                events: 60_000,
                load_seconds: Some(150.0),
                relays: 2,
                relay_args: network_relay_args(false),
                consumers: 2,
                min_faults: 30,
                ..base
            },
            Self::NetLatency => Plan {
                events: 50_000,
                load_seconds: Some(150.0),
                relays: 2,
                relay_args: network_relay_args(false),
                consumers: 1,
                min_faults: 10,
                ..base
            },
            // Every component's own timeout is shorter than the silence it meets.
            Self::HalfOpen => Plan {
                events: 50_000,
                load_seconds: Some(200.0),
                relays: 2,
                relay_args: network_relay_args(true),
                worker_args: vec![
                    String::from("--inbox-timeout-ms"),
                    network::HALF_OPEN_TIMEOUT_MS.to_string(),
                    String::from("--tx-timeout-ms"),
                    network::HALF_OPEN_TIMEOUT_MS.to_string(),
                ],
                consumers: 2,
                min_faults: 10,
                ..base
            },
            // `events` counts the updates; each customer's create and the deletes of one
            // customer in `delete_every` come on top.
            Self::Replica => Plan {
                events: 50_000,
                load_seconds: Some(120.0),
                consumers: 2,
                min_faults: 20,
                kill_interval_s: 2.0..7.0,
                replay_fraction: 0.08,
                delete_every: 50,
                ..base
            },
        }
    }
}

/// The relays' settings in the restart and network scenarios: a lease session the server
/// ends after `LEASE_IDLE_TIMEOUT_MS` of silence, and (half-open) the short statement and
/// Kafka request timeouts.
fn network_relay_args(half_open: bool) -> Vec<String> {
    let mut args = vec![
        String::from("--lease-idle-timeout-ms"),
        network::LEASE_IDLE_TIMEOUT_MS.to_string(),
    ];
    if half_open {
        args.extend([
            String::from("--store-timeout-ms"),
            network::HALF_OPEN_TIMEOUT_MS.to_string(),
            String::from("--kafka-set"),
            format!("socket.timeout.ms={}", network::KAFKA_SOCKET_TIMEOUT_MS),
        ]);
    }
    args
}

/// Options every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScenarioArgs {
    /// Write the result as a JSON object to PATH.
    #[arg(long, value_name = "PATH")]
    pub(crate) json: Option<PathBuf>,
    /// Seed of the random choices (kill moments, victims, keys); printed when chosen.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Events to commit, instead of the scenario's full size.
    #[arg(long)]
    pub(crate) events: Option<u64>,
    /// Faults to inject at least, instead of the scenario's minimum (kills, restarts).
    #[arg(long)]
    pub(crate) faults: Option<u32>,
    /// Aggregates the events are spread over, instead of the scenario's number.
    #[arg(long)]
    pub(crate) aggregates: Option<u32>,
    /// Spread the load over this many seconds, instead of the scenario's time (for a quick
    /// run of a paced scenario).
    #[arg(long)]
    pub(crate) seconds: Option<f64>,
    /// Keep the databases, topics and worker logs of a passing run.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Administrative PostgreSQL URL (eval "$(scripts/stack.sh env)" sets it).
    #[arg(long, env = "DBPS_POSTGRES_URL", hide_env_values = true)]
    pub(crate) postgres_url: String,
    /// Kafka bootstrap servers (eval "$(scripts/stack.sh env)" sets them).
    #[arg(long, env = "DBPS_KAFKA_BROKERS")]
    pub(crate) kafka_brokers: String,
    /// MongoDB connection string, for mongo-relay-kill (eval "$(scripts/stack.sh env)"
    /// sets it).
    #[arg(long, env = "DBPS_MONGODB_URI", hide_env_values = true)]
    mongodb_uri: Option<String>,
    /// The stack script the broker-restart and pg-restart scenarios stop and start the
    /// servers with.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack.sh"))]
    pub(crate) stack_script: PathBuf,
    #[command(flatten)]
    pub(crate) net: network::NetArgs,
}

/// Load, workers and faults of a scenario.
#[derive(Debug, Clone)]
struct Plan {
    events: u64,
    /// Spread the events over this long (None: as fast as the writers go).
    load_seconds: Option<f64>,
    writer_processes: u32,
    writer_concurrency: u32,
    aggregates: u32,
    late_fraction: f64,
    late_max_ms: u64,
    rollback_fraction: f64,
    /// One poison record per this many events (half oversize, half malformed).
    poison_every: u64,
    relays: u32,
    relay_args: Vec<String>,
    /// Further arguments for the writers and consumers (their timeouts).
    worker_args: Vec<String>,
    consumers: u32,
    min_faults: u32,
    kill_interval_s: Range<f64>,
    /// Publish this fraction of the committed events again, later, under fresh ids
    /// (replica).
    replay_fraction: f64,
    /// Delete one customer in this many, near the end of the load (replica; 0: none).
    delete_every: u32,
}

/// How long the system may go without progress while settling.
const SETTLE_STALL: Duration = Duration::from_secs(120);
/// The least share of the committed events `replica` publishes again, in percent.
const MIN_REDELIVERED_PCT: f64 = 5.0;
/// How long the broker stays down in `broker-restart`.
const OUTAGE: Duration = Duration::from_secs(15);

/// Runs a scenario, prints its table and writes its JSON. Returns whether it passed.
pub(crate) async fn run(scenario: Scenario, args: ScenarioArgs) -> Result<bool> {
    let mut plan = scenario.plan();
    if let Some(events) = args.events {
        plan.events = events;
    }
    if let Some(faults) = args.faults {
        plan.min_faults = faults;
    }
    if let Some(aggregates) = args.aggregates {
        anyhow::ensure!(aggregates > 0, "--aggregates must be at least 1");
        plan.aggregates = aggregates;
    }
    if let Some(seconds) = args.seconds {
        anyhow::ensure!(seconds > 0.0, "--seconds must be positive");
        plan.load_seconds = Some(seconds);
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let servers = Servers {
        postgres_url: args.postgres_url.clone(),
        brokers: args.kafka_brokers.clone(),
        stack_script: args.stack_script.clone(),
    };
    let mongo = if scenario == Scenario::MongoRelayKill {
        let uri = args
            .mongodb_uri
            .clone()
            .context("mongo-relay-kill needs DBPS_MONGODB_URI (eval \"$(scripts/stack.sh env)\")")?;
        let client = mongodb::Client::with_uri_str(&uri)
            .await
            .context("DBPS_MONGODB_URI is not a valid MongoDB connection string")?;
        Some((uri, client))
    } else {
        None
    };
    let mut run = Run::setup(scenario, plan, servers, seed, mongo).await?;
    if scenario.proxied() {
        let net = network::Net::setup(
            &args.net,
            &args.postgres_url,
            &run.id,
            run.plan.relays,
            run.plan.consumers,
        )
        .await;
        match net {
            Ok(net) => run.net = Some(net),
            Err(error) => {
                run.cleanup().await;
                return Err(error);
            }
        }
    }
    println!(
        "dbps-chaos {}: seed {seed}, run {}, logs in {}",
        scenario.name(),
        run.id,
        run.dir.display()
    );
    let outcome = run.execute().await;
    let report = match outcome {
        Ok(report) => report,
        Err(error) => {
            run.stop_all().await;
            run.restore_stack().await;
            println!(
                "dbps-chaos {}: the harness failed: {error:#}\nkept for inspection: databases {}, topics {} {}, logs {}",
                scenario.name(),
                run.database_names().join(" "),
                run.topic,
                run.dlq,
                run.dir.display()
            );
            return Err(error);
        }
    };
    run.restore_stack().await;
    report.print();
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    if report.passed && !args.keep {
        run.cleanup().await;
    } else {
        println!(
            "kept: databases {}, topics {} {}, logs {}",
            run.database_names().join(" "),
            run.topic,
            run.dlq,
            run.dir.display()
        );
    }
    Ok(report.passed)
}

/// A broker outage as the orchestrator timed it.
#[derive(Debug, Clone, Copy)]
struct Outage {
    stop_requested: DateTime<Utc>,
    stopped: DateTime<Utc>,
    start_requested: DateTime<Utc>,
    ready: DateTime<Utc>,
}

struct Run {
    scenario: Scenario,
    plan: Plan,
    servers: Servers,
    seed: u64,
    rng: StdRng,
    id: String,
    dir: PathBuf,
    service_db: String,
    service: PgPool,
    consumer_db: Option<String>,
    consumer: Option<PgPool>,
    /// The MongoDB server's URI and the run's database there (mongo-relay-kill): the
    /// writers write through the MongoDB outbox and the relays relay it.
    mongo: Option<(String, mongodb::Database)>,
    topic: String,
    dlq: String,
    group: String,
    started: Instant,
    started_at: DateTime<Utc>,
    writers: Vec<Worker>,
    relays: Vec<Worker>,
    consumers: Vec<Worker>,
    faults: u64,
    malformed: Vec<(String, String)>,
    malformed_kinds: Vec<&'static str>,
    producer: Option<FutureProducer>,
    unexpected_exits: Vec<String>,
    failures: Vec<String>,
    results: serde_json::Map<String, Value>,
    last_progress: Instant,
    /// The proxies of the network scenarios.
    net: Option<network::Net>,
}

impl Run {
    async fn setup(
        scenario: Scenario,
        plan: Plan,
        servers: Servers,
        seed: u64,
        mongo: Option<(String, mongodb::Client)>,
    ) -> Result<Self> {
        let started = Instant::now();
        let started_at = Utc::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let id = format!("{:08x}", rng.random::<u32>());
        let underscored = scenario.name().replace('-', "_");
        let dir = std::env::temp_dir().join(format!("dbps-chaos-{}-{id}", scenario.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

        let service_db = format!("chaos_{underscored}_{id}");
        let service = servers.create_database(&service_db, 4).await?;
        dbps_outbox::pg::MIGRATOR
            .run(&service)
            .await
            .context("outbox migrations")?;
        sqlx::raw_sql(SERVICE_SCHEMA)
            .execute(&service)
            .await
            .context("service schema")?;
        if scenario == Scenario::Replica {
            sqlx::raw_sql(REPLICA_SOURCE_SCHEMA)
                .execute(&service)
                .await
                .context("owner schema")?;
        }
        let (consumer_db, consumer) = if plan.consumers > 0 {
            let name = format!("{service_db}_consumer");
            let pool = servers.create_database(&name, 4).await?;
            if scenario == Scenario::Replica {
                replica::migrate_replica_database(&pool).await?;
            } else {
                dbps_core::inbox::pg::MIGRATOR
                    .run(&pool)
                    .await
                    .context("inbox migrations")?;
                sqlx::raw_sql(CONSUMER_SCHEMA)
                    .execute(&pool)
                    .await
                    .context("consumer schema")?;
            }
            (Some(name), Some(pool))
        } else {
            (None, None)
        };
        let mongo = match mongo {
            Some((uri, client)) => {
                let db = client.database(&service_db);
                dbps_outbox::mongo::MongoOutboxStore::new(db.clone())
                    .collection(MONGO_ORDERS)
                    .create_indexes()
                    .await
                    .context("MongoDB outbox indexes")?;
                Some((uri, db))
            }
            None => None,
        };
        let topic = format!("chaos.{}.{id}.orders", scenario.name());
        let dlq = format!("chaos.{}.{id}.dlq", scenario.name());
        // The broker stamps each record with its append time, so the checker can tell
        // when a record really reached Kafka (publish latency, broker-restart resume).
        servers
            .create_topics(&[
                TopicSpec::new(&topic, 8).config("message.timestamp.type", "LogAppendTime"),
                TopicSpec::new(&dlq, 1).config("message.timestamp.type", "LogAppendTime"),
            ])
            .await?;
        let group = format!("chaos-{}-{id}", scenario.name());
        Ok(Self {
            scenario,
            plan,
            servers,
            seed,
            rng,
            id,
            dir,
            service_db,
            service,
            consumer_db,
            consumer,
            mongo,
            topic,
            dlq,
            group,
            started,
            started_at,
            writers: Vec::new(),
            relays: Vec::new(),
            consumers: Vec::new(),
            faults: 0,
            malformed: Vec::new(),
            malformed_kinds: Vec::new(),
            producer: None,
            unexpected_exits: Vec::new(),
            failures: Vec::new(),
            results: serde_json::Map::new(),
            last_progress: Instant::now(),
            net: None,
        })
    }

    fn database_names(&self) -> Vec<String> {
        std::iter::once(self.service_db.clone())
            .chain(self.consumer_db.clone())
            .collect()
    }

    async fn execute(&mut self) -> Result<Report> {
        self.start_workers()?;
        let mut outages = Vec::new();
        let mut windows = Vec::new();
        match self.scenario {
            Scenario::PgRestart => windows = self.restart_loop().await?,
            Scenario::NetReset | Scenario::NetLatency | Scenario::HalfOpen => windows = self.toxic_loop().await?,
            Scenario::RelayKill | Scenario::MongoRelayKill | Scenario::ConsumerKill => self.kill_loop().await?,
            Scenario::Replica => return self.execute_replica().await,
            Scenario::Gap => self.wait_for_writers().await?,
            Scenario::BrokerRestart => {
                // Steady load first, then the broker goes away for a while and comes back.
                self.watch(Duration::from_secs(15)).await?;
                for _ in 0..self.plan.min_faults.max(1) {
                    outages.push(self.restart_broker().await?);
                    self.watch(Duration::from_secs(10)).await?;
                }
                self.wait_for_writers().await?;
            }
            Scenario::Poison => self.poison_loop().await?,
        }
        self.settle().await?;
        for worker in self.relays.iter_mut().chain(self.consumers.iter_mut()) {
            if !worker.stop(Duration::from_secs(30)).await? {
                self.failures
                    .push(format!("{} did not stop gracefully within 30 s", worker.name()));
            }
        }
        self.progress(true).await;
        println!("checking: reading the databases and the topics directly ...");
        let check = checker::check(&CheckInput {
            service: &self.service,
            consumer: self.consumer.as_ref(),
            brokers: &self.servers.brokers,
            topic: &self.topic,
            dlq: Some(&self.dlq),
            malformed: &self.malformed,
        })
        .await?;
        let mut counts = check.counts.clone();
        if let Some((_, db)) = &self.mongo {
            // The checker reads the PostgreSQL outbox, which this scenario does not use.
            let orders = db.collection::<mongodb::bson::Document>(MONGO_ORDERS);
            let exists = |field: &str| {
                let mut filter = mongodb::bson::Document::new();
                filter.insert(field, mongodb::bson::doc! { "$exists": true });
                filter
            };
            counts.outbox_pending = orders
                .count_documents(exists(dbps_outbox::mongo::PENDING_FIELD))
                .await
                .context("count pending MongoDB outboxes")?;
            counts.parked = orders
                .count_documents(exists(dbps_outbox::mongo::PARKED_FIELD))
                .await
                .context("count parked MongoDB messages")?;
            // Overtaking is about PostgreSQL outbox ids, which MongoDB writes do not have.
            counts.overtaken_commits = None;
        }
        if self.scenario == Scenario::BrokerRestart {
            self.broker_results(&outages, &check).await?;
        }
        if !windows.is_empty() {
            self.fault_results(&windows, &check);
        }
        if !self.consumers.is_empty() {
            let absorbed: usize = self.consumers.iter().map(|c| c.log_count("duplicate skipped")).sum();
            self.results
                .insert(String::from("redeliveries_absorbed_by_inbox"), json!(absorbed));
        }
        if self.scenario == Scenario::Gap {
            self.faults = check.counts.committed_late + check.counts.rolled_back;
        }
        if self.scenario == Scenario::Poison {
            let kinds: Vec<Value> = self.malformed_kinds.iter().map(|k| json!(k)).collect();
            self.results
                .insert(String::from("malformed_kinds"), Value::Array(kinds));
        }
        Ok(self.report(counts, None))
    }

    /// The replica scenario: the load with consumer kills and replays, a watcher on the
    /// replica table, then late replays of deleted customers' events once their deletes
    /// are applied, and the checks.
    async fn execute_replica(&mut self) -> Result<Report> {
        let replica_pool = self
            .consumer
            .clone()
            .context("the replica scenario needs its replica database")?;
        let watcher = Watcher::spawn(replica_pool.clone());
        let replayer = Replayer::new(self.service.clone(), &self.servers.brokers, &self.topic)?;
        let stop = dbps_core::CancellationToken::new();
        let replaying = tokio::spawn(replayer.during_load(self.plan.replay_fraction, stop.clone()));
        let killed = self.kill_loop().await;
        stop.cancel();
        let mut replayer = replaying.await.context("the replayer panicked")??;
        killed?;
        println!(
            "[{:>6.1}s] load done; {} records published again so far",
            self.started.elapsed().as_secs_f64(),
            replayer.replayed
        );
        self.settle().await?;
        // Every delete is applied now: old events of the deleted customers arrive after it.
        let deleted: i64 = sqlx::query_scalar("select count(*) from deleted_customers")
            .fetch_one(&self.service)
            .await?;
        let late = replayer.replay_deleted(deleted * 10, 10).await?;
        let committed = u64::try_from(self.committed().await?).unwrap_or(0);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let target = (committed as f64 * self.plan.replay_fraction).ceil() as u64;
        let mut topped = 0;
        while replayer.replayed < target {
            let n = replayer
                .replay(i64::try_from(target - replayer.replayed).unwrap_or(i64::MAX))
                .await?;
            if n == 0 {
                break;
            }
            topped += n;
        }
        println!(
            "[{:>6.1}s] published {late} old events of {deleted} deleted customers again, and {topped} others; {} in all",
            self.started.elapsed().as_secs_f64(),
            replayer.replayed
        );
        self.wait_until_zero("the replicas to apply the late records", |run| {
            Box::pin(async move {
                let expected = run.expected_applied().await?;
                let applied = run.applied().await?.unwrap_or(0);
                Ok((expected - applied).max(0))
            })
        })
        .await?;
        for worker in self.relays.iter_mut().chain(self.consumers.iter_mut()) {
            if !worker.stop(Duration::from_secs(30)).await? {
                self.failures
                    .push(format!("{} did not stop gracefully within 30 s", worker.name()));
            }
        }
        let watched = watcher.stop().await?;
        self.progress(true).await;
        println!("checking: reading the databases and the topics directly, then reconciling ...");
        let check = checker::check(&CheckInput {
            service: &self.service,
            consumer: None,
            brokers: &self.servers.brokers,
            topic: &self.topic,
            dlq: Some(&self.dlq),
            malformed: &self.malformed,
        })
        .await?;
        let replica = replica::check(&self.service, &replica_pool, watched).await?;
        if check.counts.replayed_records != replica.redelivered {
            self.failures.push(format!(
                "{} records published again, {} found on the topic",
                replica.redelivered, check.counts.replayed_records
            ));
        }
        if let Some(dead) = check.counts.dlq_records.filter(|&n| n > 0) {
            self.failures.push(format!("{dead} records dead-lettered"));
        }
        // The replica logs each jump in an aggregate's sequences; partitions keep each
        // customer's events in order, so none is expected.
        let gaps: usize = self.consumers.iter().map(|c| c.log_count("sequence gap")).sum();
        self.results.insert(String::from("sequence_gaps_logged"), json!(gaps));
        Ok(self.report(check.counts, Some(replica)))
    }

    fn report(&mut self, counts: checker::Counts, replica: Option<ReplicaCounts>) -> Report {
        let mut failures = std::mem::take(&mut self.failures);
        for (name, value) in counts.must_be_zero() {
            if value != 0 {
                failures.push(format!("{name} = {value}, must be 0"));
            }
        }
        if let Some(replica) = &replica {
            for (name, value) in replica.must_be_zero() {
                if value != 0 {
                    failures.push(format!("{name} = {value}, must be 0"));
                }
            }
            if replica.updates < self.plan.events {
                failures.push(format!(
                    "committed {} updates, the scenario needs {}",
                    replica.updates, self.plan.events
                ));
            }
            if replica.redelivered_pct < MIN_REDELIVERED_PCT {
                failures.push(format!(
                    "published {} % of the events again, the scenario needs {MIN_REDELIVERED_PCT} %",
                    replica.redelivered_pct
                ));
            }
            if self.plan.delete_every > 0 && replica.redelivered_after_delete == 0 {
                failures.push(String::from(
                    "no event of a deleted customer was published again after its delete",
                ));
            }
        }
        if counts.committed < self.plan.events {
            failures.push(format!(
                "committed {} events, the scenario needs {}",
                counts.committed, self.plan.events
            ));
        }
        if self.faults < u64::from(self.plan.min_faults) {
            failures.push(format!(
                "injected {} faults, the scenario needs {}",
                self.faults, self.plan.min_faults
            ));
        }
        if self.scenario == Scenario::Poison && counts.poison_injected == 0 {
            failures.push(String::from("no poison record was injected"));
        }
        for exit in &self.unexpected_exits {
            failures.push(format!("unexpected exit: {exit}"));
        }
        let restarts: Vec<Value> = self
            .relays
            .iter()
            .chain(&self.consumers)
            .map(|w| json!({ "worker": w.name(), "starts": w.starts(), "kills": w.kills(), "unexpected_exits": w.unexpected_exits() }))
            .collect();
        self.results.insert(String::from("workers"), Value::Array(restarts));
        let plan = &self.plan;
        let mut settings = serde_json::Map::new();
        settings.insert(String::from("events"), json!(plan.events));
        settings.insert(
            String::from("writers"),
            json!(format!("{}x{}", plan.writer_processes, plan.writer_concurrency)),
        );
        settings.insert(
            String::from("rate_per_s"),
            json!(self.rate().map_or_else(|| String::from("max"), |r| format!("{r:.0}"))),
        );
        settings.insert(String::from("aggregates"), json!(plan.aggregates));
        if plan.late_fraction > 0.0 {
            settings.insert(String::from("late_fraction"), json!(plan.late_fraction));
            settings.insert(String::from("late_max_ms"), json!(plan.late_max_ms));
        }
        if plan.rollback_fraction > 0.0 {
            settings.insert(String::from("rollback_fraction"), json!(plan.rollback_fraction));
        }
        if plan.poison_every > 0 {
            settings.insert(String::from("poison_every"), json!(plan.poison_every));
        }
        if plan.replay_fraction > 0.0 {
            settings.insert(String::from("replay_fraction"), json!(plan.replay_fraction));
        }
        if plan.delete_every > 0 {
            settings.insert(String::from("delete_every"), json!(plan.delete_every));
        }
        settings.insert(String::from("relays"), json!(plan.relays));
        if !plan.relay_args.is_empty() {
            settings.insert(String::from("relay_args"), json!(plan.relay_args.join(" ")));
        }
        settings.insert(String::from("consumers"), json!(plan.consumers));
        if !plan.worker_args.is_empty() {
            settings.insert(String::from("worker_args"), json!(plan.worker_args.join(" ")));
        }
        if plan.min_faults > 0
            && matches!(
                self.scenario,
                Scenario::RelayKill | Scenario::MongoRelayKill | Scenario::ConsumerKill | Scenario::Replica
            )
        {
            settings.insert(String::from("min_kills"), json!(plan.min_faults));
            settings.insert(
                String::from("kill_interval_s"),
                json!(format!("{}-{}", plan.kill_interval_s.start, plan.kill_interval_s.end)),
            );
        }
        settings.insert(String::from("topic_partitions"), json!(8));
        Report {
            scenario: self.scenario.name().to_owned(),
            passed: failures.is_empty(),
            failures,
            committed: counts.committed,
            published_unique: counts.published_unique,
            lost: counts.lost,
            topic_duplicates: counts.topic_duplicates,
            effect_duplicates: counts.effect_duplicates,
            order_violations: counts.order_violations,
            rolled_back_published: counts.rolled_back_published,
            faults_injected: self.faults,
            duration_s: (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            git_commit: git_commit(),
            started_at: self.started_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            seed: self.seed,
            cores: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            settings,
            results: std::mem::take(&mut self.results),
            counts,
            replica,
        }
    }

    /// Total events per second, if the load is paced.
    fn rate(&self) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)] // event counts stay far below 2^52
        self.plan.load_seconds.map(|s| self.plan.events as f64 / s)
    }

    // --- Workers ---------------------------------------------------------------------------

    fn start_workers(&mut self) -> Result<()> {
        let service_url = self.servers.database_url(&self.service_db);
        for i in 0..self.plan.relays {
            let mut args = vec![
                String::from("relay"),
                String::from("--brokers"),
                self.servers.brokers.clone(),
                String::from("--name"),
                format!("relay-{i}"),
            ];
            args.extend(self.plan.relay_args.iter().cloned());
            args.extend(self.mongo_args());
            let url = self
                .net
                .as_ref()
                .map_or_else(|| service_url.clone(), |net| net.relay_url(&service_url, i as usize));
            if let Some(net) = &self.net {
                args[2] = net.relay_brokers();
            }
            let mut worker = Worker::new(&format!("relay-{i}"), args, self.worker_env(&url), &self.dir);
            worker.start()?;
            self.relays.push(worker);
        }
        if let Some(consumer_db) = &self.consumer_db {
            let consumer_url = self.servers.database_url(consumer_db);
            let role = if self.scenario == Scenario::Replica {
                "replica"
            } else {
                "consumer"
            };
            for i in 0..self.plan.consumers {
                let mut args = vec![
                    String::from(role),
                    String::from("--brokers"),
                    self.servers.brokers.clone(),
                    String::from("--name"),
                    format!("consumer-{i}"),
                    String::from("--topic"),
                    self.topic.clone(),
                    String::from("--dlq"),
                    self.dlq.clone(),
                    String::from("--group"),
                    self.group.clone(),
                ];
                if role == "consumer" {
                    args.extend(worker_arg(&self.plan.worker_args, "--inbox-timeout-ms"));
                }
                let url = self.net.as_ref().map_or_else(
                    || consumer_url.clone(),
                    |net| net.consumer_url(&consumer_url, i as usize),
                );
                let mut worker = Worker::new(
                    &format!("consumer-{i}"),
                    args,
                    vec![(String::from("DBPS_CHAOS_DB_URL"), url)],
                    &self.dir,
                );
                worker.start()?;
                self.consumers.push(worker);
            }
        }
        let processes = u64::from(self.plan.writer_processes.max(1));
        let rate = self.rate();
        for i in 0..self.plan.writer_processes.max(1) {
            let share = self.plan.events / processes + u64::from(u64::from(i) < self.plan.events % processes);
            // Each writer makes one in `poison_every * 2` of its own events oversize; the
            // other half of the poison is malformed records the orchestrator produces.
            let oversize_every = if self.plan.poison_every > 0 {
                (self.plan.poison_every * 2).min(share.max(1))
            } else {
                0
            };
            #[allow(clippy::cast_precision_loss)] // small counts
            let writer_rate = rate.map_or(0.0, |r| r / processes as f64);
            if self.scenario == Scenario::Replica {
                let args = vec![
                    String::from("customer-writer"),
                    String::from("--topic"),
                    self.topic.clone(),
                    String::from("--writer-id"),
                    i.to_string(),
                    String::from("--writers"),
                    processes.to_string(),
                    String::from("--concurrency"),
                    self.plan.writer_concurrency.to_string(),
                    String::from("--customers"),
                    self.plan.aggregates.to_string(),
                    String::from("--updates"),
                    share.to_string(),
                    String::from("--rate"),
                    format!("{writer_rate:.3}"),
                    String::from("--delete-every"),
                    self.plan.delete_every.to_string(),
                    String::from("--seed"),
                    self.rng.random::<u64>().to_string(),
                ];
                let mut worker = Worker::new(&format!("writer-{i}"), args, self.worker_env(&service_url), &self.dir);
                worker.start()?;
                self.writers.push(worker);
                continue;
            }
            let mut args = vec![
                String::from("writer"),
                String::from("--topic"),
                self.topic.clone(),
                String::from("--writer-id"),
                i.to_string(),
                String::from("--concurrency"),
                self.plan.writer_concurrency.to_string(),
                String::from("--events"),
                share.to_string(),
                String::from("--rate"),
                format!("{writer_rate:.3}"),
                String::from("--aggregates"),
                self.plan.aggregates.to_string(),
                String::from("--late-fraction"),
                self.plan.late_fraction.to_string(),
                String::from("--late-max-ms"),
                self.plan.late_max_ms.to_string(),
                String::from("--rollback-fraction"),
                self.plan.rollback_fraction.to_string(),
                String::from("--oversize-every"),
                oversize_every.to_string(),
                String::from("--seed"),
                self.rng.random::<u64>().to_string(),
            ];
            args.extend(self.mongo_args());
            args.extend(worker_arg(&self.plan.worker_args, "--tx-timeout-ms"));
            let url = self
                .net
                .as_ref()
                .map_or_else(|| service_url.clone(), |net| net.writer_url(&service_url));
            let mut worker = Worker::new(&format!("writer-{i}"), args, self.worker_env(&url), &self.dir);
            worker.start()?;
            self.writers.push(worker);
        }
        Ok(())
    }

    /// The arguments that point a writer or relay at the MongoDB outbox, if the scenario
    /// uses it.
    fn mongo_args(&self) -> Vec<String> {
        self.mongo
            .iter()
            .flat_map(|(_, db)| [String::from("--mongodb-database"), db.name().to_owned()])
            .collect()
    }

    /// A writer's or relay's environment: the service database's URL and, if the
    /// scenario uses it, the MongoDB server's (kept out of `ps`).
    fn worker_env(&self, service_url: &str) -> Vec<(String, String)> {
        std::iter::once((String::from("DBPS_CHAOS_DB_URL"), service_url.to_owned()))
            .chain(
                self.mongo
                    .iter()
                    .map(|(uri, _)| (String::from("DBPS_CHAOS_MONGODB_URI"), uri.clone())),
            )
            .collect()
    }

    /// Notices workers that exited by themselves: writers are done (or failed); relays
    /// and consumers must not exit, and are restarted when they do.
    fn reap(&mut self) -> Result<()> {
        for worker in &mut self.writers {
            if let Some(status) = worker.poll_exit()?
                && !status.success()
            {
                println!(
                    "{} failed ({status}); its log ends:\n{}",
                    worker.name(),
                    worker.log_tail(20)
                );
                self.unexpected_exits.push(format!("{} ({status})", worker.name()));
            }
        }
        for worker in self.relays.iter_mut().chain(self.consumers.iter_mut()) {
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

    fn writers_running(&self) -> bool {
        self.writers.iter().any(Worker::is_running)
    }

    async fn wait_for_writers(&mut self) -> Result<()> {
        while self.writers_running() {
            self.watch(Duration::from_millis(500)).await?;
        }
        Ok(())
    }

    async fn stop_all(&mut self) {
        for worker in self
            .writers
            .iter_mut()
            .chain(self.relays.iter_mut())
            .chain(self.consumers.iter_mut())
        {
            let _ = worker.stop(Duration::from_secs(10)).await;
        }
    }

    // --- Measurements during the run ----------------------------------------------------------

    async fn committed(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("select count(*) from committed_events")
            .fetch_one(&self.service)
            .await?)
    }

    async fn healthy_committed(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("select count(*) from committed_events where poison is null")
                .fetch_one(&self.service)
                .await?,
        )
    }

    async fn pending(&self) -> Result<i64> {
        if let Some((_, db)) = &self.mongo {
            let pending = db
                .collection::<mongodb::bson::Document>(MONGO_ORDERS)
                .count_documents(mongodb::bson::doc! { dbps_outbox::mongo::PENDING_FIELD: { "$exists": true } })
                .await?;
            return Ok(i64::try_from(pending).unwrap_or(i64::MAX));
        }
        Ok(
            sqlx::query_scalar("select count(*) from dbps_outbox where published_at is null and parked_at is null")
                .fetch_one(&self.service)
                .await?,
        )
    }

    /// The messages the consumers must have handled once the system settled: every
    /// healthy committed event and (replica) every record published again.
    async fn expected_applied(&self) -> Result<i64> {
        if self.scenario == Scenario::Replica {
            let replayed: i64 = sqlx::query_scalar("select count(*) from replayed_events")
                .fetch_one(&self.service)
                .await?;
            return Ok(self.committed().await? + replayed);
        }
        self.healthy_committed().await
    }

    async fn applied(&self) -> Result<Option<i64>> {
        let Some(pool) = &self.consumer else {
            return Ok(None);
        };
        if self.scenario == Scenario::Replica {
            // The replica's inbox is the only one in its database.
            return Ok(Some(
                sqlx::query_scalar("select count(*) from dbps_inbox")
                    .fetch_one(pool)
                    .await?,
            ));
        }
        Ok(Some(
            sqlx::query_scalar("select count(*) from dbps_inbox where consumer = $1")
                .bind(INBOX_CONSUMER)
                .fetch_one(pool)
                .await?,
        ))
    }

    async fn progress(&mut self, force: bool) {
        if !force && self.last_progress.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last_progress = Instant::now();
        // Bounded: while a server is down (pg-restart) the line shows `?` and the
        // orchestrator keeps its schedule.
        async fn bounded<T>(query: impl Future<Output = Result<T>>) -> Result<T> {
            tokio::time::timeout(Duration::from_secs(1), query)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer")))
        }
        let show = |v: Result<i64>| v.map_or_else(|_| String::from("?"), |v| v.to_string());
        let committed = show(bounded(self.committed()).await);
        let pending = show(bounded(self.pending()).await);
        let applied = match bounded(self.applied()).await {
            Ok(Some(n)) => format!("  applied {n:>7}"),
            Ok(None) => String::new(),
            Err(_) => String::from("  applied ?"),
        };
        println!(
            "[{:>6.1}s] committed {committed:>7}  outbox pending {pending:>6}{applied}  faults {}",
            self.started.elapsed().as_secs_f64(),
            self.faults
        );
    }

    // --- Faults ---------------------------------------------------------------------------------

    /// Kills relays (relay-kill) or consumers (consumer-kill, replica) with SIGKILL at random
    /// moments while the writers run, and until the minimum number of kills is reached.
    async fn kill_loop(&mut self) -> Result<()> {
        let consumers = matches!(self.scenario, Scenario::ConsumerKill | Scenario::Replica);
        loop {
            if !self.writers_running() && self.faults >= u64::from(self.plan.min_faults) {
                return Ok(());
            }
            let wait = self.rng.random_range(self.plan.kill_interval_s.clone());
            self.watch(Duration::from_secs_f64(wait)).await?;
            let victims = if consumers {
                &mut self.consumers
            } else {
                &mut self.relays
            };
            // Usually one process; now and then all of them at once.
            let all = victims.len() > 1 && self.rng.random_bool(0.2);
            let chosen: Vec<usize> = if all {
                (0..victims.len()).collect()
            } else {
                vec![self.rng.random_range(0..victims.len())]
            };
            let mut names = Vec::new();
            for &i in &chosen {
                victims[i].kill().await?;
                names.push(victims[i].name().to_owned());
            }
            self.faults += chosen.len() as u64;
            println!(
                "[{:>6.1}s] SIGKILL {}",
                self.started.elapsed().as_secs_f64(),
                names.join(", ")
            );
            let down = self.rng.random_range(0.0..1.0);
            self.watch(Duration::from_secs_f64(down)).await?;
            let victims = if consumers {
                &mut self.consumers
            } else {
                &mut self.relays
            };
            for &i in &chosen {
                victims[i].start()?;
            }
        }
    }

    /// Stops the broker under load, keeps the writers going, starts it again.
    async fn restart_broker(&mut self) -> Result<Outage> {
        let stop_requested = Utc::now();
        println!(
            "[{:>6.1}s] stopping the Kafka broker (scripts/stack.sh stop kafka)",
            self.started.elapsed().as_secs_f64()
        );
        if let Err(error) = self.servers.broker("stop").await {
            // Whatever state it is in, leave the stack with a running broker.
            let _ = self.servers.broker("start").await;
            return Err(error);
        }
        let stopped = Utc::now();
        self.faults += 1;
        println!(
            "[{:>6.1}s] broker stopped; writers keep committing for {} s",
            self.started.elapsed().as_secs_f64(),
            OUTAGE.as_secs()
        );
        let waited = self.watch(OUTAGE).await;
        let start_requested = Utc::now();
        let started = self.servers.broker("start").await;
        let ready = Utc::now();
        waited?;
        started?;
        println!(
            "[{:>6.1}s] broker ready again (scripts/stack.sh start kafka took {:.1} s)",
            self.started.elapsed().as_secs_f64(),
            seconds(ready - start_requested)
        );
        Ok(Outage {
            stop_requested,
            stopped,
            start_requested,
            ready,
        })
    }

    async fn broker_results(&mut self, outages: &[Outage], check: &checker::Check) -> Result<()> {
        let mut entries = Vec::new();
        for outage in outages {
            let committed_during: i64 = sqlx::query_scalar(
                "select count(*) from committed_events where pg_xact_commit_timestamp(xmin) between $1 and $2",
            )
            .bind(outage.stopped)
            .bind(outage.ready)
            .fetch_one(&self.service)
            .await?;
            let first = check.first_append_at_or_after(outage.start_requested);
            let resume = first.map(|f| seconds(f - outage.ready));
            let resume_after_start = first.map(|f| seconds(f - outage.start_requested));
            // When the consumer applied its first event after the broker came back.
            let applied_again: Option<DateTime<Utc>> = match &self.consumer {
                Some(pool) => {
                    sqlx::query_scalar("select min(applied_at) from effects where applied_at >= $1")
                        .bind(outage.start_requested)
                        .fetch_one(pool)
                        .await?
                }
                None => None,
            };
            match resume {
                None => self
                    .failures
                    .push(String::from("nothing was published after the broker came back")),
                Some(s) => println!("relay published again {s:.2} s after the broker was ready"),
            }
            entries.push(json!({
                "stop_s": seconds(outage.stopped - outage.stop_requested),
                "down_s": seconds(outage.ready - outage.stopped),
                "start_s": seconds(outage.ready - outage.start_requested),
                "committed_while_down": committed_during,
                "first_publish_after_ready_s": resume,
                "first_publish_after_start_s": resume_after_start,
                "first_apply_after_ready_s": applied_again.map(|a| seconds(a - outage.ready)),
            }));
            if let Some(s) = resume {
                self.results
                    .insert(String::from("resume_after_ready_s"), json!((s * 100.0).round() / 100.0));
            }
        }
        self.results.insert(String::from("outages"), Value::Array(entries));
        let relay_failures: usize = self.relays.iter().map(|r| r.log_count("relay session failed")).sum();
        let relay_restarts: u32 = self.relays.iter().map(|r| r.starts().saturating_sub(1)).sum();
        let consumer_errors: usize = self.consumers.iter().map(|c| c.log_count("consumer error")).sum();
        self.results
            .insert(String::from("relay_session_failures_logged"), json!(relay_failures));
        self.results
            .insert(String::from("relay_process_restarts"), json!(relay_restarts));
        self.results
            .insert(String::from("consumer_errors_logged"), json!(consumer_errors));
        if relay_restarts > 0 {
            self.failures
                .push(String::from("the relay had to be restarted; it must resume by itself"));
        }
        Ok(())
    }

    /// Runs the writers (whose oversize events are half of the poison) and produces the
    /// other half, malformed records, straight to the topic as the load passes each
    /// `poison_every * 2` events.
    async fn poison_loop(&mut self) -> Result<()> {
        let spacing = self.plan.poison_every * 2;
        let count = (self.plan.events / spacing).max(1);
        let threshold = |j: u64| spacing / 2 + j * spacing;
        let mut next = 0;
        while self.writers_running() {
            self.watch(Duration::from_millis(500)).await?;
            let committed = u64::try_from(self.committed().await?).unwrap_or(0);
            while next < count && committed >= threshold(next) {
                self.inject_malformed().await?;
                next += 1;
            }
        }
        while next < count {
            self.inject_malformed().await?;
            next += 1;
        }
        Ok(())
    }

    /// Produces one malformed record to the events topic with a plain producer, under the
    /// key of a healthy aggregate.
    async fn inject_malformed(&mut self) -> Result<()> {
        const KINDS: [&str; 4] = ["missing-id", "invalid-json", "unknown-type", "non-utf8-header"];
        if self.producer.is_none() {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &self.servers.brokers)
                .set("acks", "all")
                .create()
                .context("create the poison producer")?;
            self.producer = Some(producer);
        }
        let kind = KINDS[self.malformed.len() % KINDS.len()];
        let id = format!("poison-{}", uuid::Uuid::now_v7());
        let key = aggregate_id(self.rng.random_range(0..self.plan.aggregates));
        let ce_type: &[u8] = match kind {
            "unknown-type" => b"chaos.NeverHeardOf",
            "non-utf8-header" => &[0xff, 0xfe, 0x80],
            _ => OrderChanged::TYPE.as_bytes(),
        };
        let mut headers = vec![
            (POISON_HEADER, id.as_bytes()),
            ("ce_specversion", b"1.0".as_slice()),
            ("ce_source", b"chaos-injector".as_slice()),
            ("ce_type", ce_type),
            ("content-type", b"application/json".as_slice()),
        ];
        if kind != "missing-id" {
            headers.push(("ce_id", id.as_bytes()));
        }
        let headers = headers.into_iter().fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
        let payload = if kind == "invalid-json" {
            format!(r#"{{"order_id": "{key}", "writer": "#)
        } else {
            serde_json::to_string(&OrderChanged {
                order_id: key.clone(),
                writer: 9999,
                slot: self.malformed.len() as u64,
                padding: String::new(),
            })?
        };
        let record = FutureRecord::to(&self.topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        let producer = self.producer.as_ref().context("poison producer")?;
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(error, _)| error)
            .context("produce a malformed record")?;
        println!(
            "[{:>6.1}s] injected a malformed record ({kind}) under key {key}",
            self.started.elapsed().as_secs_f64()
        );
        self.malformed.push((id, key));
        self.malformed_kinds.push(kind);
        self.faults += 1;
        Ok(())
    }

    // --- Settling and cleaning up -------------------------------------------------------------

    /// Lets the system finish: writers done, outbox drained, consumers caught up, dead
    /// letters written. Each wait gives up after `SETTLE_STALL` without progress; the
    /// checker then reports what is missing.
    async fn settle(&mut self) -> Result<()> {
        self.wait_for_writers().await?;
        let oversize: i64 = sqlx::query_scalar("select count(*) from committed_events where poison is not null")
            .fetch_one(&self.service)
            .await?;
        self.faults += u64::try_from(oversize).unwrap_or(0);
        println!(
            "[{:>6.1}s] writers done; waiting for the relays to drain the outbox",
            self.started.elapsed().as_secs_f64()
        );
        self.wait_until_zero("the outbox to drain", |run| Box::pin(run.pending()))
            .await?;
        if self.consumer.is_some() {
            println!(
                "[{:>6.1}s] waiting for the consumers to apply every event",
                self.started.elapsed().as_secs_f64()
            );
            self.wait_until_zero("the consumers to catch up", |run| {
                Box::pin(async move {
                    let expected = run.expected_applied().await?;
                    let applied = run.applied().await?.unwrap_or(0);
                    Ok((expected - applied).max(0))
                })
            })
            .await?;
        }
        if !self.malformed.is_empty() {
            let expected = i64::try_from(self.malformed.len()).unwrap_or(i64::MAX);
            self.wait_until_zero("the dead letters", |run| {
                Box::pin(async move {
                    let size = checker::topic_size(&run.servers.brokers, &run.dlq).await?;
                    Ok((expected - size).max(0))
                })
            })
            .await?;
        }
        Ok(())
    }

    /// Polls `remaining` until it reaches zero; gives up after `SETTLE_STALL` without it
    /// going down.
    async fn wait_until_zero<F>(&mut self, what: &str, remaining: F) -> Result<()>
    where
        F: for<'a> Fn(&'a Run) -> std::pin::Pin<Box<dyn Future<Output = Result<i64>> + 'a>>,
    {
        let mut best = i64::MAX;
        let mut last_progress = Instant::now();
        loop {
            let left = remaining(self).await?;
            if left == 0 {
                return Ok(());
            }
            if left < best {
                best = left;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > SETTLE_STALL {
                self.failures.push(format!(
                    "gave up waiting for {what}: {left} left, no progress for {} s",
                    SETTLE_STALL.as_secs()
                ));
                return Ok(());
            }
            self.watch(Duration::from_millis(500)).await?;
        }
    }

    /// Leaves the stack as the scenario found it: proxies removed, FerretDB (stopped
    /// with PostgreSQL by pg-restart) started again.
    async fn restore_stack(&mut self) {
        if let Some(net) = self.net.take() {
            net.teardown().await;
        }
        if self.scenario == Scenario::PgRestart
            && let Err(error) = self.servers.stack(&["start", "ferretdb"]).await
        {
            println!("could not start FerretDB again: {error:#}");
        }
    }

    async fn cleanup(&mut self) {
        self.service.close().await;
        if let Some(pool) = &self.consumer {
            pool.close().await;
        }
        for name in self.database_names() {
            if let Err(error) = self.servers.drop_database(&name).await {
                println!("could not drop database {name}: {error:#}");
            }
        }
        if let Some((_, db)) = &self.mongo
            && let Err(error) = db.drop().await
        {
            println!("could not drop MongoDB database {}: {error:#}", db.name());
        }
        if let Err(error) = self.servers.delete_topics(&[&self.topic, &self.dlq]).await {
            println!("could not delete topics: {error:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `flag value` pair of `args` for `flag`, if there is one.
fn worker_arg(args: &[String], flag: &str) -> Vec<String> {
    args.chunks(2)
        .filter(|pair| pair.len() == 2 && pair[0] == flag)
        .flatten()
        .cloned()
        .collect()
}

fn seconds(delta: chrono::TimeDelta) -> f64 {
    #[allow(clippy::cast_precision_loss)] // milliseconds of a run fit in f64
    let ms = delta.num_milliseconds() as f64;
    ms / 1000.0
}
