//! The processes the scenarios run, kill and restart: writers, relays and consumers (the
//! `replica` scenario's customer writers and replica consumers are in `replica.rs`).
//!
//! Each is started by the orchestrator as `dbps-chaos worker <role> ...`, with the
//! database URL in `DBPS_CHAOS_DB_URL` (so that the password stays out of `ps`). A worker
//! stops gracefully when its standard input closes, which also stops it when the
//! orchestrator itself dies.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use dbps_core::Envelope;
use dbps_core::Message as _;
use dbps_core::inbox::pg::{PgInbox, TxHandler};
use dbps_core::kafka::{ConsumerRunner, HandlerError, KafkaConfig, KafkaPublisher, TopicNaming};
use dbps_outbox::Relay;
use dbps_outbox::mongo::{MongoOutbox, MongoOutboxStore};
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgConnection;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::model::{AGGREGATE_TYPE, INBOX_CONSUMER, MONGO_ORDERS, OrderChanged, SERVICE, aggregate_id};

/// A worker process's role.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Role {
    /// Commits events through the outbox, one per transaction.
    Writer(WriterArgs),
    /// Runs one outbox relay.
    Relay(RelayArgs),
    /// Runs one consumer-group member that applies effects through the inbox.
    Consumer(ConsumerArgs),
    /// Creates, updates and deletes customers, one event per transaction (replica).
    CustomerWriter(crate::replica::CustomerWriterArgs),
    /// Runs one consumer-group member that keeps the customer replica (replica).
    Replica(crate::replica::ReplicaConsumerArgs),
    /// Runs the saga orchestrator: reply consumer, deadline scanner and starter (saga-kill).
    SagaOrchestrator(crate::saga::OrchestratorArgs),
    /// Runs one saga participant's command consumer (saga-kill).
    SagaParticipant(crate::saga::ParticipantArgs),
}

/// Runs a worker until it is done or its standard input closes.
pub(crate) async fn run(role: Role) -> Result<()> {
    match role {
        Role::Writer(args) => writer(args).await,
        Role::Relay(args) => relay(args).await,
        Role::Consumer(args) => consumer(args).await,
        Role::CustomerWriter(args) => crate::replica::writer(args).await,
        Role::Replica(args) => crate::replica::consumer(args).await,
        Role::SagaOrchestrator(args) => crate::saga::orchestrator(args).await,
        Role::SagaParticipant(args) => crate::saga::participant(args).await,
    }
}

/// Completes when standard input reaches its end (the orchestrator closed it, or died),
/// or on SIGINT / SIGTERM.
pub(crate) fn shutdown_requested() -> dbps_core::CancellationToken {
    let token = dbps_core::CancellationToken::new();
    let cancel = token.clone();
    let requested = shutdown_signal();
    tokio::spawn(async move {
        requested.await;
        cancel.cancel();
    });
    token
}

pub(crate) fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buffer = [0_u8; 64];
        while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
    async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = on_close => {}
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
    }
}

pub(crate) async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(60))
        .connect(url)
        .await
        .context("connect to the database")
}

// ---------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------

/// Options of a writer process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WriterArgs {
    /// The service database.
    #[arg(long, env = "DBPS_CHAOS_DB_URL", hide_env_values = true)]
    db_url: String,
    /// The events topic.
    #[arg(long)]
    topic: String,
    /// This writer's number.
    #[arg(long, default_value_t = 0)]
    writer_id: u32,
    /// Concurrent transactions (one connection each).
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Events to commit.
    #[arg(long)]
    events: u64,
    /// Events per second for this process (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Number of aggregates the events are spread over.
    #[arg(long, default_value_t = 1000)]
    aggregates: u32,
    /// Fraction of transactions that wait before COMMIT.
    #[arg(long, default_value_t = 0.0)]
    late_fraction: f64,
    /// Longest wait before COMMIT, in milliseconds.
    #[arg(long, default_value_t = 0)]
    late_max_ms: u64,
    /// Fraction of transactions that roll back.
    #[arg(long, default_value_t = 0.0)]
    rollback_fraction: f64,
    /// Make every Nth event of this writer oversize (0: none).
    #[arg(long, default_value_t = 0)]
    oversize_every: u64,
    /// Payload padding of an oversize event, in bytes.
    #[arg(long, default_value_t = 300_000)]
    oversize_bytes: usize,
    /// Seed of this writer's random choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the events through the MongoDB outbox of this database (on the server of
    /// `DBPS_CHAOS_MONGODB_URI`) instead of the PostgreSQL one; `committed_events` is then
    /// written after each acknowledged write.
    #[arg(long, requires = "mongodb_uri")]
    mongodb_database: Option<String>,
    /// The MongoDB server.
    #[arg(long, env = "DBPS_CHAOS_MONGODB_URI", hide_env_values = true)]
    mongodb_uri: Option<String>,
    /// How long one transaction may take, from taking a connection to the commit; a
    /// transaction that gets no answer in time is abandoned on a closed connection and
    /// tried again.
    #[arg(long, default_value_t = 30_000)]
    tx_timeout_ms: u64,
}

struct WriterShared {
    args: WriterArgs,
    pool: PgPool,
    outbox: PgOutbox,
    mongo: Option<MongoWriter>,
    next_slot: AtomicU64,
    started: tokio::time::Instant,
}

/// The MongoDB outbox a writer writes through, and its aggregates' collection.
struct MongoWriter {
    outbox: MongoOutbox,
    orders: Collection<Document>,
}

/// Connects to the database `--mongodb-database` names, when it does.
async fn mongo_database(uri: Option<&str>, database: Option<&str>) -> Result<Option<mongodb::Database>> {
    let (Some(uri), Some(database)) = (uri, database) else {
        return Ok(None);
    };
    let client = mongodb::Client::with_uri_str(uri).await.context("connect to MongoDB")?;
    Ok(Some(client.database(database)))
}

#[derive(Debug, Default)]
struct WriterStats {
    committed: u64,
    rolled_back: u64,
    late: u64,
    errors: u64,
}

enum TxOutcome {
    Committed { late: bool },
    RolledBack,
}

async fn writer(args: WriterArgs) -> Result<()> {
    for (name, p) in [
        ("--late-fraction", args.late_fraction),
        ("--rollback-fraction", args.rollback_fraction),
    ] {
        ensure!((0.0..=1.0).contains(&p), "{name} must be between 0 and 1");
    }
    ensure!(
        args.aggregates > 0 && args.concurrency > 0,
        "need aggregates and concurrency"
    );
    let started = Instant::now();
    let pool = connect(&args.db_url, args.concurrency + 2).await?;
    let naming = TopicNaming::new().events_pattern(args.topic.clone());
    ensure!(
        args.mongodb_database.is_none() || (args.late_fraction == 0.0 && args.rollback_fraction == 0.0),
        "MongoDB writes have no transaction to hold open or roll back"
    );
    let mongo = mongo_database(args.mongodb_uri.as_deref(), args.mongodb_database.as_deref())
        .await?
        .map(|db| MongoWriter {
            outbox: MongoOutbox::new(SERVICE).naming(naming.clone()),
            orders: db.collection(MONGO_ORDERS),
        });
    let shared = Arc::new(WriterShared {
        outbox: PgOutbox::new(SERVICE).naming(naming),
        mongo,
        pool,
        next_slot: AtomicU64::new(0),
        started: tokio::time::Instant::now(),
        args,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..shared.args.concurrency {
        let shared = Arc::clone(&shared);
        tasks.spawn(async move { writer_task(&shared, task).await });
    }
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut total = WriterStats::default();
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(stats) => {
                    let stats = stats.context("writer task panicked")?;
                    total.committed += stats.committed;
                    total.rolled_back += stats.rolled_back;
                    total.late += stats.late;
                    total.errors += stats.errors;
                }
                None => break,
            },
            () = &mut shutdown => {
                tasks.abort_all();
                println!("writer {}: stopped early", shared.args.writer_id);
                return Ok(());
            }
        }
    }
    println!(
        "writer {}: committed {} (late {}), rolled back {}, errors {} in {:.1} s",
        shared.args.writer_id,
        total.committed,
        total.late,
        total.rolled_back,
        total.errors,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn writer_task(shared: &WriterShared, task: u32) -> WriterStats {
    let args = &shared.args;
    let stream = (u64::from(args.writer_id) << 32) | u64::from(task);
    let mut rng = StdRng::seed_from_u64(args.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut stats = WriterStats::default();
    // MongoDB aggregates this task has created (it writes only its own, see `mongo_write`).
    let mut created = std::collections::HashSet::new();
    loop {
        let slot = shared.next_slot.fetch_add(1, Ordering::SeqCst);
        if slot >= args.events {
            return stats;
        }
        if args.rate > 0.0 {
            #[allow(clippy::cast_precision_loss)] // slot counts stay far below 2^52
            let due = Duration::from_secs_f64(slot as f64 / args.rate);
            tokio::time::sleep_until(shared.started + due).await;
        }
        let oversize = args.oversize_every > 0 && slot % args.oversize_every == args.oversize_every / 2;
        // Each slot ends in exactly one committed event; rollbacks and errors try again.
        loop {
            let outcome = match &shared.mongo {
                Some(mongo) => mongo_write(shared, mongo, &mut rng, task, slot, &mut created).await,
                None => transaction(shared, &mut rng, slot, oversize).await,
            };
            match outcome {
                Ok(TxOutcome::Committed { late }) => {
                    stats.committed += 1;
                    stats.late += u64::from(late);
                    break;
                }
                Ok(TxOutcome::RolledBack) => stats.rolled_back += 1,
                Err(error) => {
                    stats.errors += 1;
                    eprintln!("writer {} task {task}: {error:#}", args.writer_id);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn transaction(shared: &WriterShared, rng: &mut StdRng, slot: u64, oversize: bool) -> Result<TxOutcome> {
    let args = &shared.args;
    let aggregate = aggregate_id(rng.random_range(0..args.aggregates));
    let late_ms = if args.late_max_ms > 0 && rng.random_bool(args.late_fraction) {
        rng.random_range(0..=args.late_max_ms)
    } else {
        0
    };
    let rollback = rng.random_bool(args.rollback_fraction);
    let event = OrderChanged {
        order_id: aggregate.clone(),
        writer: args.writer_id,
        slot,
        padding: if oversize {
            "x".repeat(args.oversize_bytes)
        } else {
            String::new()
        },
    };
    let limit = Duration::from_millis(args.tx_timeout_ms + late_ms);
    // The whole transaction is bounded (as a service's request handler would be), so a
    // database that stops answering costs a timeout, never a stuck writer.
    let outcome = dbps_core::pg::bounded(&shared.pool, limit, async |conn: &mut PgConnection| {
        use sqlx::Connection as _;
        let mut tx = conn.begin().await.context("begin")?;
        let enqueued = shared
            .outbox
            .enqueue_event(&mut tx, AGGREGATE_TYPE, &aggregate, &event)
            .await
            .context("enqueue")?;
        sqlx::query(
            "insert into committed_events (message_id, aggregate_id, sequence, outbox_id, writer, late_ms, poison)
             values ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&enqueued.message_id)
        .bind(&aggregate)
        .bind(enqueued.sequence.unwrap_or(-1))
        .bind(enqueued.id)
        .bind(i32::try_from(args.writer_id).unwrap_or(i32::MAX))
        .bind(i32::try_from(late_ms).unwrap_or(i32::MAX))
        .bind(oversize.then_some("oversize"))
        .execute(&mut *tx)
        .await
        .context("insert committed_events")?;
        if late_ms > 0 {
            // The aggregate's sequence row stays locked meanwhile, and the outbox id taken
            // above is lower than those of transactions that commit during the wait.
            tokio::time::sleep(Duration::from_millis(late_ms)).await;
        }
        if rollback {
            tx.rollback().await.context("rollback")?;
            return Ok::<_, anyhow::Error>(Some(enqueued.message_id));
        }
        tx.commit().await.context("commit")?;
        Ok(None)
    })
    .await?;
    if let Some(message_id) = outcome {
        sqlx::query("insert into rolled_back_events (message_id, aggregate_id) values ($1, $2)")
            .bind(&message_id)
            .bind(&aggregate)
            .execute(&shared.pool)
            .await
            .context("record rollback")?;
        return Ok(TxOutcome::RolledBack);
    }
    Ok(TxOutcome::Committed { late: late_ms > 0 })
}

/// One event through the MongoDB outbox: the aggregate's first event creates its document
/// (`insert_with_events`), later ones update it (`update_with_events`). Then the event is
/// recorded in `committed_events`.
///
/// Each writer task writes aggregates of its own, one write at a time, so the order in
/// which `committed_events` rows commit is the order of each aggregate's writes (the
/// checker compares the two). A write whose outcome is unknown (an error after the server
/// may have applied it) would leave an event the checker does not know of: it counts as
/// unknown on the topic, never as lost.
async fn mongo_write(
    shared: &WriterShared,
    mongo: &MongoWriter,
    rng: &mut StdRng,
    task: u32,
    slot: u64,
    created: &mut std::collections::HashSet<String>,
) -> Result<TxOutcome> {
    let args = &shared.args;
    let per_task = (args.aggregates / args.concurrency).max(1);
    let aggregate = format!(
        "{}-w{}-t{task}",
        aggregate_id(rng.random_range(0..per_task)),
        args.writer_id
    );
    let event = OrderChanged {
        order_id: aggregate.clone(),
        writer: args.writer_id,
        slot,
        padding: String::new(),
    };
    let message = mongo.outbox.event(AGGREGATE_TYPE, &event).context("event")?;
    let written = if created.contains(&aggregate) {
        mongo
            .outbox
            .update_with_events(
                &mongo.orders,
                doc! { "_id": &aggregate },
                doc! { "$inc": { "writes": 1 } },
                [message],
            )
            .await
            .context("update with events")?
    } else {
        let written = mongo
            .outbox
            .insert_with_events(&mongo.orders, doc! { "_id": &aggregate, "writes": 1 }, [message])
            .await
            .context("insert with events")?;
        created.insert(aggregate.clone());
        written
    };
    let enqueued = written.enqueued.first().context("the write enqueued no message")?;
    sqlx::query(
        "insert into committed_events (message_id, aggregate_id, sequence, outbox_id, writer)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(&enqueued.message_id)
    .bind(&aggregate)
    .bind(enqueued.sequence.unwrap_or(-1))
    .bind(i64::try_from((u64::from(args.writer_id) << 40) | slot).unwrap_or(i64::MAX))
    .bind(i32::try_from(args.writer_id).unwrap_or(i32::MAX))
    .execute(&shared.pool)
    .await
    .context("insert committed_events")?;
    Ok(TxOutcome::Committed { late: false })
}

// ---------------------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------------------

/// Options of a relay process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RelayArgs {
    /// The service database.
    #[arg(long, env = "DBPS_CHAOS_DB_URL", hide_env_values = true)]
    db_url: String,
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// This relay's name, for its log lines.
    #[arg(long, default_value = "relay")]
    name: String,
    /// Messages per round.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Fallback poll interval, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    poll_ms: u64,
    /// Rebalance interval, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    rebalance_ms: u64,
    /// Delay after a failed round, in milliseconds.
    #[arg(long, default_value_t = 200)]
    retry_ms: u64,
    /// The publisher's `message.timeout.ms` (0: wait out broker outages).
    #[arg(long)]
    message_timeout_ms: Option<u64>,
    /// The publisher's `message.max.bytes` (records above it are refused and parked).
    #[arg(long)]
    message_max_bytes: Option<u64>,
    /// Relay the MongoDB outbox of this database (on the server of
    /// `DBPS_CHAOS_MONGODB_URI`) instead of the PostgreSQL one.
    #[arg(long, requires = "mongodb_uri")]
    mongodb_database: Option<String>,
    /// The MongoDB server.
    #[arg(long, env = "DBPS_CHAOS_MONGODB_URI", hide_env_values = true)]
    mongodb_uri: Option<String>,
    /// Lease time of the MongoDB store's partitions, in milliseconds (how long a killed
    /// relay's partitions wait for another relay).
    #[arg(long, default_value_t = 5000)]
    lease_ms: u64,
    /// Keep published rows (marked published) instead of deleting them, so the checker
    /// can compare the outbox with the topics (PostgreSQL outbox only).
    #[arg(long)]
    keep_published: bool,
    /// How long one of the relay's statements may go unanswered (`PgOutboxStore::timeout`).
    #[arg(long, default_value_t = 30_000)]
    store_timeout_ms: u64,
    /// How long the server keeps a silent relay's lease session
    /// (`PgOutboxStore::lease_idle_timeout`).
    #[arg(long, default_value_t = 60_000)]
    lease_idle_timeout_ms: u64,
    /// Further producer properties, as `key=value` (the network scenarios' timeouts).
    #[arg(long = "kafka-set", value_name = "KEY=VALUE")]
    kafka_set: Vec<String>,
}

async fn relay(args: RelayArgs) -> Result<()> {
    let mut config = KafkaConfig::new(&args.brokers);
    if let Some(timeout) = args.message_timeout_ms {
        config = config.set("message.timeout.ms", timeout.to_string());
    }
    if let Some(max) = args.message_max_bytes {
        config = config.set("message.max.bytes", max.to_string());
    }
    for setting in &args.kafka_set {
        let (key, value) = setting
            .split_once('=')
            .with_context(|| format!("--kafka-set {setting}: expected KEY=VALUE"))?;
        config = config.set(key, value);
    }
    let publisher = KafkaPublisher::builder(config).build().context("build publisher")?;
    let summary = match mongo_database(args.mongodb_uri.as_deref(), args.mongodb_database.as_deref()).await? {
        Some(db) => {
            let store = MongoOutboxStore::new(db)
                .collection(MONGO_ORDERS)
                .lease_ttl(Duration::from_millis(args.lease_ms));
            run_relay(&args, Relay::builder(store, publisher)).await?
        }
        None => {
            let pool = connect(&args.db_url, 4).await?;
            let mut store = PgOutboxStore::new(pool)
                .timeout(Duration::from_millis(args.store_timeout_ms))
                .lease_idle_timeout(Duration::from_millis(args.lease_idle_timeout_ms));
            if args.keep_published {
                store = store.retention(dbps_outbox::Retention::Keep(Duration::from_secs(7 * 24 * 3600)));
            }
            run_relay(&args, Relay::builder(store, publisher)).await?
        }
    };
    println!(
        "{}: published {}, parked {} (graceful stop)",
        args.name, summary.published, summary.parked
    );
    Ok(())
}

async fn run_relay<S: dbps_outbox::OutboxStore>(
    args: &RelayArgs,
    builder: dbps_outbox::RelayBuilder<S>,
) -> Result<dbps_outbox::RelaySummary> {
    let relay = builder
        .batch_size(args.batch_size)
        .poll_interval(Duration::from_millis(args.poll_ms))
        .rebalance_interval(Duration::from_millis(args.rebalance_ms))
        .retry_delay(Duration::from_millis(args.retry_ms))
        .build()?;
    tracing::info!(relay = %args.name, "relay started");
    relay.run(shutdown_requested()).await.context("relay")
}

// ---------------------------------------------------------------------------------------
// Consumer
// ---------------------------------------------------------------------------------------

/// Options of a consumer process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsumerArgs {
    /// The consumer's own database.
    #[arg(long, env = "DBPS_CHAOS_DB_URL", hide_env_values = true)]
    db_url: String,
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// This member's name, for its log lines.
    #[arg(long, default_value = "consumer")]
    name: String,
    /// The events topic.
    #[arg(long)]
    topic: String,
    /// The dead-letter topic.
    #[arg(long)]
    dlq: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// `session.timeout.ms`: how soon the group notices a killed member.
    #[arg(long, default_value_t = 6000)]
    session_timeout_ms: u64,
    /// How long one message's inbox transaction may take (`PgInbox::timeout`).
    #[arg(long, default_value_t = 30_000)]
    inbox_timeout_ms: u64,
}

/// The effect: one row per application, and a per-aggregate counter, in the inbox's
/// transaction.
struct ApplyEffect;

impl TxHandler for ApplyEffect {
    async fn handle(&self, conn: &mut PgConnection, message: &Envelope) -> Result<(), HandlerError> {
        if message.message_type != OrderChanged::TYPE {
            return Err(HandlerError::permanent(format!(
                "unknown message type {}",
                message.message_type
            )));
        }
        let event: OrderChanged = serde_json::from_str(message.payload.get()).map_err(HandlerError::permanent)?;
        if event.order_id != message.aggregate_id {
            return Err(HandlerError::permanent(format!(
                "payload order {} under key {}",
                event.order_id, message.aggregate_id
            )));
        }
        sqlx::query("insert into effects (message_id, aggregate_id, sequence) values ($1, $2, $3)")
            .bind(&message.id)
            .bind(&message.aggregate_id)
            .bind(message.sequence)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "insert into effect_totals as t (aggregate_id, applied, last_sequence) values ($1, 1, $2)
             on conflict (aggregate_id) do update set applied = t.applied + 1, last_sequence = excluded.last_sequence",
        )
        .bind(&message.aggregate_id)
        .bind(message.sequence)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

async fn consumer(args: ConsumerArgs) -> Result<()> {
    let pool = connect(&args.db_url, 10).await?;
    let heartbeat = (args.session_timeout_ms / 4).max(500);
    let config = KafkaConfig::new(&args.brokers)
        .set("session.timeout.ms", args.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", heartbeat.to_string());
    let handler = PgInbox::new(pool, INBOX_CONSUMER, ApplyEffect).timeout(Duration::from_millis(args.inbox_timeout_ms));
    let runner = ConsumerRunner::builder(config, &args.group, handler)
        .topic(&args.topic)
        .dead_letter_topic(&args.dlq)
        .build()
        .context("build consumer runner")?;
    tracing::info!(consumer = %args.name, "consumer started");
    let summary = runner.run(shutdown_requested()).await.context("consumer")?;
    println!(
        "{}: handled {}, dead-lettered {} (graceful stop)",
        args.name, summary.handled, summary.dead_lettered
    );
    Ok(())
}
