//! The `replica` scenario's parts: the owner's writers, the replica consumers, the
//! replayer that publishes old events again, the watcher, and the checks.
//!
//! The owner is a `chaos_customers` table whose `version` is the sequence of each
//! customer's latest event: every change commits the row and its event (through
//! `PgOutbox`) in one transaction, so the outbox's sequence number of the event is the
//! row's version. The replica is `dbps_cache::replica::PgReplica` in a database of its
//! own, fed by `ConsumerRunner` processes that are killed at random. A replayer publishes
//! events that were already published — and superseded — again, under fresh ids, straight
//! to the topic; a watcher polls the replica table throughout. At the end every replica
//! row is compared with its source row, with SQL only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dbps_cache::replica::{Change, PgReplica, PgSnapshotSource, Projection, Reconciler};
use dbps_core::kafka::{ConsumerRunner, KafkaConfig, KafkaPublisher, TopicNaming};
use dbps_core::{CancellationToken, Envelope, HandlerError, Message, MessageKind};
use dbps_outbox::pg::PgOutbox;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

use crate::model::{
    CUSTOMER, CustomerChanged, CustomerDeleted, CustomerEvents, REPLAY_HEADER, REPLICA_NAME, REPLICA_SCHEMA, SERVICE,
    customer_id,
};
use crate::workers::{connect, shutdown_requested, shutdown_signal};

// ---------------------------------------------------------------------------------------
// The replica
// ---------------------------------------------------------------------------------------

/// What the replica keeps of a customer: its name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CustomerProjection;

/// A customer in the owner's snapshot (`to_jsonb` of its `chaos_customers` row).
#[derive(Debug, Deserialize)]
pub(crate) struct CustomerState {
    name: String,
}

#[derive(Serialize)]
struct ReplicaRow<'a> {
    name: &'a str,
}

impl Projection for CustomerProjection {
    type Events = CustomerEvents;
    type Snapshot = CustomerState;

    fn project(&self, event: CustomerEvents, envelope: &Envelope) -> Result<Change, HandlerError> {
        match event {
            CustomerEvents::Changed(changed) => {
                if changed.id != envelope.aggregate_id {
                    return Err(HandlerError::permanent(format!(
                        "payload customer {} under key {}",
                        changed.id, envelope.aggregate_id
                    )));
                }
                Ok(Change::row(&ReplicaRow { name: &changed.name })?)
            }
            CustomerEvents::Deleted(_) => Ok(Change::Delete),
        }
    }

    fn snapshot(&self, state: CustomerState) -> Result<Change, HandlerError> {
        Ok(Change::row(&ReplicaRow { name: &state.name })?)
    }
}

/// The replica as the consumers and the reconciler build it.
fn build_replica(pool: PgPool) -> Result<PgReplica<CustomerProjection>> {
    PgReplica::builder(pool, REPLICA_NAME, CustomerProjection)
        .aggregate_column("id")
        .build()
        .context("build the replica")
}

/// Creates the replica's tables in its database: the inbox and the version table through
/// `dbps-migrate`, then the replica table.
pub(crate) async fn migrate_replica_database(pool: &PgPool) -> Result<()> {
    let mut conn = pool.acquire().await.context("connect to the replica database")?;
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("chaos_replica")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("dbps_replica", &dbps_cache::replica::MIGRATOR)
        .run_on(&mut conn)
        .await
        .context("inbox and replica migrations")?;
    sqlx::raw_sql(REPLICA_SCHEMA)
        .execute(&mut *conn)
        .await
        .context("replica schema")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writer (a worker process)
// ---------------------------------------------------------------------------------------

/// Options of a customer writer process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CustomerWriterArgs {
    /// The service (owner's) database.
    #[arg(long, env = "DBPS_CHAOS_DB_URL", hide_env_values = true)]
    db_url: String,
    /// The events topic.
    #[arg(long)]
    topic: String,
    /// This writer's number.
    #[arg(long, default_value_t = 0)]
    writer_id: u32,
    /// Writer processes in all: writer `i` owns the customers `n` with `n % writers == i`.
    #[arg(long, default_value_t = 1)]
    writers: u32,
    /// Concurrent transactions (one connection each).
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Customers in all (this writer creates, updates and deletes its share).
    #[arg(long, default_value_t = 1000)]
    customers: u32,
    /// Updates to commit, after the customers are created.
    #[arg(long)]
    updates: u64,
    /// Updates per second for this process (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Customer `n` is deleted when `n % delete_every == delete_every - 1` (0: none).
    #[arg(long, default_value_t = 50)]
    delete_every: u32,
    /// The deletes happen when this fraction of the updates has been taken.
    #[arg(long, default_value_t = 0.9)]
    delete_at: f64,
    /// Seed of this writer's random choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

struct CustomerWriter {
    args: CustomerWriterArgs,
    pool: PgPool,
    outbox: PgOutbox,
    /// The customers this writer owns.
    owned: Vec<u32>,
    next_create: AtomicU64,
    next_slot: AtomicU64,
    delete_slot: u64,
    deleted: AtomicBool,
    /// When the updates began (they are paced from there).
    updates_started: OnceLock<tokio::time::Instant>,
    created: AtomicU64,
    updated: AtomicU64,
    gone: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
}

impl CustomerWriter {
    fn doomed(&self, n: u32) -> bool {
        let every = self.args.delete_every;
        every > 0 && n % every == every - 1
    }

    /// Enqueues `event` in `tx` and records it as committed (if `tx` commits): the
    /// business rows the checker and the replayer read.
    async fn enqueue<M: Message>(
        &self,
        tx: &mut PgConnection,
        id: &str,
        expected_sequence: i64,
        event: &M,
    ) -> Result<()> {
        let enqueued = self
            .outbox
            .enqueue_event(tx, CUSTOMER, id, event)
            .await
            .context("enqueue")?;
        if enqueued.sequence != Some(expected_sequence) {
            // The row's version and the event's sequence must be the same number.
            self.mismatches.fetch_add(1, Ordering::SeqCst);
            eprintln!(
                "customer writer {}: {id} is at version {expected_sequence} but its event got sequence {:?}",
                self.args.writer_id, enqueued.sequence
            );
        }
        sqlx::query(
            "insert into committed_events (message_id, aggregate_id, sequence, outbox_id, writer)
             values ($1, $2, $3, $4, $5)",
        )
        .bind(&enqueued.message_id)
        .bind(id)
        .bind(enqueued.sequence.unwrap_or(-1))
        .bind(enqueued.id)
        .bind(i32::try_from(self.args.writer_id).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .context("insert committed_events")?;
        sqlx::query("insert into source_events (message_id, message_type, payload) values ($1, $2, $3)")
            .bind(&enqueued.message_id)
            .bind(M::TYPE)
            .bind(serde_json::to_value(event)?)
            .execute(&mut *tx)
            .await
            .context("insert source_events")?;
        Ok(())
    }

    async fn create(&self, n: u32) -> Result<()> {
        let id = customer_id(n);
        let name = format!("{id} created by writer {}", self.args.writer_id);
        let mut tx = self.pool.begin().await.context("begin")?;
        let inserted =
            sqlx::query("insert into chaos_customers (id, name, version) values ($1, $2, 1) on conflict do nothing")
                .bind(&id)
                .bind(&name)
                .execute(&mut *tx)
                .await
                .context("insert customer")?
                .rows_affected();
        if inserted == 0 {
            // Created before (a retried create whose commit went through).
            tx.rollback().await.context("rollback")?;
            return Ok(());
        }
        self.enqueue(&mut tx, &id, 1, &CustomerChanged { id: id.clone(), name })
            .await?;
        tx.commit().await.context("commit")?;
        self.created.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Renames customer `n`. Returns false if it is gone (deleted): nothing is written.
    async fn update(&self, n: u32, slot: u64) -> Result<bool> {
        let id = customer_id(n);
        let name = format!("{id} renamed by writer {} in slot {slot}", self.args.writer_id);
        let mut tx = self.pool.begin().await.context("begin")?;
        // The row lock taken here orders this update against a concurrent delete: after
        // the delete, no row is found and no event is written.
        let version: Option<i64> = sqlx::query_scalar(
            "update chaos_customers set name = $2, version = version + 1 where id = $1 returning version",
        )
        .bind(&id)
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await
        .context("update customer")?;
        let Some(version) = version else {
            tx.rollback().await.context("rollback")?;
            return Ok(false);
        };
        self.enqueue(&mut tx, &id, version, &CustomerChanged { id: id.clone(), name })
            .await?;
        tx.commit().await.context("commit")?;
        Ok(true)
    }

    async fn delete(&self, n: u32) -> Result<()> {
        let id = customer_id(n);
        let mut tx = self.pool.begin().await.context("begin")?;
        let version: Option<i64> = sqlx::query_scalar("delete from chaos_customers where id = $1 returning version")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await
            .context("delete customer")?;
        let Some(version) = version else {
            // Deleted before (a retried delete whose commit went through).
            tx.rollback().await.context("rollback")?;
            return Ok(());
        };
        self.enqueue(&mut tx, &id, version + 1, &CustomerDeleted { id: id.clone() })
            .await?;
        sqlx::query("insert into deleted_customers (id, sequence) values ($1, $2)")
            .bind(&id)
            .bind(version + 1)
            .execute(&mut *tx)
            .await
            .context("insert deleted_customers")?;
        tx.commit().await.context("commit")?;
        self.deletes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Deletes this writer's doomed customers, once.
    async fn delete_doomed(&self) {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return;
        }
        for &n in self.owned.iter().filter(|&&n| self.doomed(n)) {
            while let Err(error) = self.delete(n).await {
                self.errors.fetch_add(1, Ordering::SeqCst);
                eprintln!("customer writer {}: delete: {error:#}", self.args.writer_id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        println!(
            "customer writer {}: deleted {} customers",
            self.args.writer_id,
            self.deletes.load(Ordering::SeqCst)
        );
    }

    async fn create_task(&self) {
        loop {
            let i = self.next_create.fetch_add(1, Ordering::SeqCst);
            let Some(&n) = usize::try_from(i).ok().and_then(|i| self.owned.get(i)) else {
                return;
            };
            while let Err(error) = self.create(n).await {
                self.errors.fetch_add(1, Ordering::SeqCst);
                eprintln!("customer writer {}: create: {error:#}", self.args.writer_id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn update_task(&self, task: u32) {
        let args = &self.args;
        let stream = (u64::from(args.writer_id) << 32) | u64::from(task);
        let mut rng = StdRng::seed_from_u64(args.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        loop {
            let slot = self.next_slot.fetch_add(1, Ordering::SeqCst);
            if slot >= args.updates {
                return;
            }
            if args.rate > 0.0 {
                #[allow(clippy::cast_precision_loss)] // slot counts stay far below 2^52
                let due = Duration::from_secs_f64(slot as f64 / args.rate);
                let started = *self.updates_started.get_or_init(tokio::time::Instant::now);
                tokio::time::sleep_until(started + due).await;
            }
            if slot == self.delete_slot {
                self.delete_doomed().await;
            }
            // Each slot ends in exactly one committed update of a live customer.
            loop {
                let n = self.owned[rng.random_range(0..self.owned.len())];
                if self.deleted.load(Ordering::SeqCst) && self.doomed(n) {
                    continue;
                }
                match self.update(n, slot).await {
                    Ok(true) => {
                        self.updated.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Ok(false) => {
                        self.gone.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(error) => {
                        self.errors.fetch_add(1, Ordering::SeqCst);
                        eprintln!("customer writer {} task {task}: {error:#}", args.writer_id);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// Creates this writer's customers, then commits its updates (paced), deleting its doomed
/// customers on the way; one event per transaction.
pub(crate) async fn writer(args: CustomerWriterArgs) -> Result<()> {
    ensure!(
        args.writers > 0 && args.concurrency > 0 && args.writer_id < args.writers,
        "need writers, concurrency and a writer id below --writers"
    );
    ensure!(
        (0.0..=1.0).contains(&args.delete_at),
        "--delete-at must be between 0 and 1"
    );
    let owned: Vec<u32> = (0..args.customers)
        .filter(|n| n % args.writers == args.writer_id)
        .collect();
    let every = args.delete_every;
    ensure!(
        owned.iter().any(|&n| every == 0 || n % every != every - 1),
        "writer {} owns no customer that stays (--delete-every {every})",
        args.writer_id
    );
    let started = Instant::now();
    let pool = connect(&args.db_url, args.concurrency + 2).await?;
    let naming = TopicNaming::new().events_pattern(args.topic.clone());
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let delete_slot = (args.updates as f64 * args.delete_at) as u64;
    let writer = Arc::new(CustomerWriter {
        outbox: PgOutbox::new(SERVICE).naming(naming),
        pool,
        owned,
        next_create: AtomicU64::new(0),
        next_slot: AtomicU64::new(0),
        delete_slot,
        deleted: AtomicBool::new(false),
        updates_started: OnceLock::new(),
        created: AtomicU64::new(0),
        updated: AtomicU64::new(0),
        gone: AtomicU64::new(0),
        deletes: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        args,
    });
    let work = async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..writer.args.concurrency {
            let writer = Arc::clone(&writer);
            tasks.spawn(async move { writer.create_task().await });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.context("create task panicked")?;
        }
        println!(
            "customer writer {}: created {} customers in {:.1} s",
            writer.args.writer_id,
            writer.created.load(Ordering::SeqCst),
            started.elapsed().as_secs_f64()
        );
        // The updates are paced from here.
        writer.updates_started.get_or_init(tokio::time::Instant::now);
        for task in 0..writer.args.concurrency {
            let writer = Arc::clone(&writer);
            tasks.spawn(async move { writer.update_task(task).await });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.context("update task panicked")?;
        }
        // With no update slot at the delete point (tiny runs), delete now.
        writer.delete_doomed().await;
        Ok::<_, anyhow::Error>(())
    };
    let shutdown = shutdown_signal();
    tokio::select! {
        done = work => done?,
        () = shutdown => {
            println!("customer writer {}: stopped early", writer.args.writer_id);
            return Ok(());
        }
    }
    let mismatches = writer.mismatches.load(Ordering::SeqCst);
    println!(
        "customer writer {}: created {}, updated {} (picked a deleted customer {} times), deleted {}, errors {}, sequence mismatches {mismatches} in {:.1} s",
        writer.args.writer_id,
        writer.created.load(Ordering::SeqCst),
        writer.updated.load(Ordering::SeqCst),
        writer.gone.load(Ordering::SeqCst),
        writer.deletes.load(Ordering::SeqCst),
        writer.errors.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64()
    );
    if mismatches > 0 {
        bail!("{mismatches} events got a sequence other than their customer's version");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Replica consumer (a worker process)
// ---------------------------------------------------------------------------------------

/// Options of a replica consumer process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ReplicaConsumerArgs {
    /// The replica's database.
    #[arg(long, env = "DBPS_CHAOS_DB_URL", hide_env_values = true)]
    db_url: String,
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// This member's name, for its log lines.
    #[arg(long, default_value = "replica")]
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
}

/// Runs `ConsumerRunner` with `PgReplica` until asked to stop.
pub(crate) async fn consumer(args: ReplicaConsumerArgs) -> Result<()> {
    let pool = connect(&args.db_url, 10).await?;
    let heartbeat = (args.session_timeout_ms / 4).max(500);
    let config = KafkaConfig::new(&args.brokers)
        .set("session.timeout.ms", args.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", heartbeat.to_string());
    let runner = ConsumerRunner::builder(config, &args.group, build_replica(pool)?)
        .topic(&args.topic)
        .dead_letter_topic(&args.dlq)
        .build()
        .context("build consumer runner")?;
    tracing::info!(consumer = %args.name, "replica consumer started");
    let summary = runner.run(shutdown_requested()).await.context("consumer")?;
    println!(
        "{}: handled {}, dead-lettered {} (graceful stop)",
        args.name, summary.handled, summary.dead_lettered
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Replayer (in the orchestrator)
// ---------------------------------------------------------------------------------------

/// Events already published, whose customer has a newer committed event (or was deleted),
/// and none of whose customer's events is still waiting in the outbox: published again,
/// each lands on the topic after a newer event of its customer.
const SUPERSEDED: &str = "
    with pending as (
        select distinct aggregate_id from dbps_outbox where published_at is null and parked_at is null
    )
    select c.message_id, c.aggregate_id, c.sequence, e.message_type, e.payload::text,
           coalesce(s.version, d.sequence) as current
    from committed_events c
    join source_events e on e.message_id = c.message_id
    left join chaos_customers s on s.id = c.aggregate_id
    left join deleted_customers d on d.id = c.aggregate_id
    where c.sequence < coalesce(s.version, d.sequence)
      and c.aggregate_id not in (select aggregate_id from pending)";

/// The same, `$2` events of each deleted customer at most.
const SUPERSEDED_OF_DELETED: &str = "
    with pending as (
        select distinct aggregate_id from dbps_outbox where published_at is null and parked_at is null
    ), candidates as (
        select c.message_id, c.aggregate_id, c.sequence, e.message_type, e.payload::text as payload,
               d.sequence as current,
               row_number() over (partition by c.aggregate_id order by random()) as n
        from committed_events c
        join source_events e on e.message_id = c.message_id
        join deleted_customers d on d.id = c.aggregate_id
        where c.sequence < d.sequence
          and c.aggregate_id not in (select aggregate_id from pending)
    )
    select message_id, aggregate_id, sequence, message_type, payload, current
    from candidates where n <= $2 order by random() limit $1";

type Candidate = (String, String, i64, String, String, i64);

/// Publishes events again, under fresh ids, with their original sequence and payload,
/// straight to the topic with `KafkaPublisher` (not through the outbox). Each is recorded
/// in `replayed_events`.
pub(crate) struct Replayer {
    service: PgPool,
    publisher: KafkaPublisher,
    topic: String,
    /// Records published again so far.
    pub(crate) replayed: u64,
}

impl Replayer {
    pub(crate) fn new(service: PgPool, brokers: &str, topic: &str) -> Result<Self> {
        let publisher = KafkaPublisher::builder(KafkaConfig::new(brokers))
            .build()
            .context("build the replayer's publisher")?;
        Ok(Self {
            service,
            publisher,
            topic: topic.to_owned(),
            replayed: 0,
        })
    }

    /// Publishes up to `count` random superseded events again. Returns how many.
    pub(crate) async fn replay(&mut self, count: i64) -> Result<u64> {
        let candidates: Vec<Candidate> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("{SUPERSEDED} order by random() limit $1")))
                .bind(count)
                .fetch_all(&self.service)
                .await
                .context("choose events to replay")?;
        self.publish(candidates).await
    }

    /// Publishes up to `per_customer` superseded events of each deleted customer again
    /// (at most `count` in all). Returns how many.
    pub(crate) async fn replay_deleted(&mut self, count: i64, per_customer: i64) -> Result<u64> {
        let candidates: Vec<Candidate> = sqlx::query_as(SUPERSEDED_OF_DELETED)
            .bind(count)
            .bind(per_customer)
            .fetch_all(&self.service)
            .await
            .context("choose events of deleted customers to replay")?;
        self.publish(candidates).await
    }

    async fn publish(&mut self, candidates: Vec<Candidate>) -> Result<u64> {
        if candidates.is_empty() {
            return Ok(0);
        }
        let mut envelopes = Vec::with_capacity(candidates.len());
        for (original, aggregate, sequence, message_type, payload, _) in &candidates {
            let payload = serde_json::value::RawValue::from_string(payload.clone())?;
            let mut envelope = Envelope::raw(MessageKind::Event, message_type.clone(), payload);
            envelope.source = SERVICE.to_owned();
            envelope.aggregate_type = Some(CUSTOMER.to_owned());
            envelope.aggregate_id.clone_from(aggregate);
            envelope.sequence = Some(*sequence);
            envelope.headers.insert(REPLAY_HEADER.to_owned(), original.clone());
            envelopes.push(envelope);
        }
        let batch: Vec<(&str, &Envelope)> = envelopes.iter().map(|e| (self.topic.as_str(), e)).collect();
        let results = self.publisher.publish_batch(batch).await;
        let mut ids = Vec::new();
        let (mut originals, mut aggregates, mut sequences, mut currents) = (vec![], vec![], vec![], vec![]);
        let mut failed = None;
        for ((envelope, result), (original, aggregate, sequence, _, _, current)) in
            envelopes.iter().zip(results).zip(&candidates)
        {
            match result {
                Ok(_) => {
                    ids.push(envelope.id.as_str());
                    originals.push(original.as_str());
                    aggregates.push(aggregate.as_str());
                    sequences.push(*sequence);
                    currents.push(*current);
                }
                Err(error) => failed = Some(error),
            }
        }
        // What reached the topic is recorded even if some of the batch failed.
        sqlx::query(
            "insert into replayed_events (message_id, original_id, aggregate_id, sequence, current_sequence)
             select * from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])",
        )
        .bind(&ids)
        .bind(&originals)
        .bind(&aggregates)
        .bind(&sequences)
        .bind(&currents)
        .execute(&self.service)
        .await
        .context("record replayed events")?;
        self.replayed += ids.len() as u64;
        if let Some(error) = failed {
            return Err(error).context("publish a replayed event");
        }
        Ok(ids.len() as u64)
    }

    /// While the load runs: every second, publishes enough superseded events again to
    /// keep the replayed records at `fraction` of the committed events. Returns itself
    /// when `stop` is cancelled.
    pub(crate) async fn during_load(mut self, fraction: f64, stop: CancellationToken) -> Result<Self> {
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(self),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let committed: i64 = sqlx::query_scalar("select count(*) from committed_events")
                .fetch_one(&self.service)
                .await
                .context("count committed events")?;
            #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
            let target = (committed as f64 * fraction).ceil() as i64;
            let due = target - i64::try_from(self.replayed).unwrap_or(i64::MAX);
            if due > 0 {
                self.replay(due.min(1000)).await?;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Watcher (in the orchestrator)
// ---------------------------------------------------------------------------------------

/// What the watcher saw.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Watched {
    /// Reads of the whole replica table.
    pub(crate) polls: u64,
    /// A record whose sequence was lower than at the read before.
    pub(crate) regressions: u64,
    /// A record that was gone (deleted) and came back.
    pub(crate) resurrections: u64,
    /// Records seen to go (deletes applied).
    pub(crate) deletions: u64,
    /// Reads that failed.
    pub(crate) errors: u64,
}

/// Polls the replica table until stopped.
pub(crate) struct Watcher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Watched>,
}

impl Watcher {
    pub(crate) fn spawn(replica: PgPool) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(replica, stop.clone()));
        Self { stop, task }
    }

    pub(crate) async fn stop(self) -> Result<Watched> {
        self.stop.cancel();
        self.task.await.context("the watcher panicked")
    }
}

async fn watch(replica: PgPool, stop: CancellationToken) -> Watched {
    let mut observer = Observer::default();
    loop {
        // One statement: one snapshot of the table.
        let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as("select id, source_sequence from customer_replica")
            .fetch_all(&replica)
            .await;
        match rows {
            Ok(rows) => observer.observe(&rows),
            Err(error) => {
                observer.seen.errors += 1;
                tracing::warn!(%error, "watcher read failed");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return observer.seen,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The watcher's memory: each record's sequence at the last read, and the records gone.
#[derive(Debug, Default)]
struct Observer {
    seen: Watched,
    last: HashMap<String, i64>,
    gone: HashSet<String>,
}

impl Observer {
    /// One read of the whole table: `(id, sequence)` of every row.
    fn observe(&mut self, rows: &[(String, i64)]) {
        self.seen.polls += 1;
        let mut present: HashSet<&str> = HashSet::with_capacity(rows.len());
        for (id, sequence) in rows {
            present.insert(id);
            if self.gone.remove(id) {
                self.seen.resurrections += 1;
                tracing::error!(%id, sequence, "a deleted record came back");
            }
            if let Some(&before) = self.last.get(id)
                && *sequence < before
            {
                self.seen.regressions += 1;
                tracing::error!(%id, before, now = sequence, "a record went back in time");
            }
            self.last.insert(id.clone(), *sequence);
        }
        for id in self.last.keys() {
            if !present.contains(id.as_str()) && self.gone.insert(id.clone()) {
                self.seen.deletions += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------

/// The reconciler's report, as counts.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Reconciled {
    pub(crate) source_records: i64,
    pub(crate) replica_records: i64,
    pub(crate) differing_buckets: usize,
    pub(crate) missing: usize,
    pub(crate) extra: usize,
    pub(crate) stale: usize,
    pub(crate) ahead: usize,
    pub(crate) clean: bool,
    pub(crate) took_ms: u128,
}

/// The replica scenario's counts. Those listed by [`ReplicaCounts::must_be_zero`] fail
/// the run when they are not.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct ReplicaCounts {
    /// Customers created.
    pub(crate) aggregates: u64,
    /// Committed updates (changes after the create).
    pub(crate) updates: u64,
    /// Customers deleted.
    pub(crate) deletes: u64,
    /// Rows of the owner's table at the end.
    pub(crate) source_records: u64,
    /// Rows of the replica table at the end.
    pub(crate) replica_records: u64,
    /// Records the replayer published again, each after a newer event of its customer.
    pub(crate) redelivered: u64,
    /// Those, in percent of the committed events.
    pub(crate) redelivered_pct: f64,
    /// Of those, events of deleted customers published again after the delete committed.
    pub(crate) redelivered_after_delete: u64,
    /// How far behind its customer's sequence a replayed event was, at most.
    pub(crate) redelivered_max_behind: i64,
    /// Messages in the replica's inbox (committed and replayed events applied or skipped).
    pub(crate) inbox_records: u64,
    /// Committed or replayed events missing from the replica's inbox.
    pub(crate) unapplied: u64,
    /// Sum of the five below.
    pub(crate) drift: u64,
    /// Source rows with no replica row.
    pub(crate) drift_missing: u64,
    /// Replica rows of customers the source never had.
    pub(crate) drift_extra: u64,
    /// Replica rows at an older sequence than the source row.
    pub(crate) drift_stale: u64,
    /// Replica rows at a newer sequence than the source row.
    pub(crate) drift_ahead: u64,
    /// Replica rows at the source's sequence but with another name.
    pub(crate) drift_name: u64,
    /// Deleted customers present in the replica.
    pub(crate) resurrected: u64,
    /// Deleted customers whose tombstone holds the delete's sequence.
    pub(crate) tombstones: u64,
    /// What the watcher saw during the run.
    pub(crate) watcher: Watched,
    /// `dbps_cache::replica::Reconciler` against the owner's table, after the run.
    pub(crate) reconcile: Reconciled,
}

impl ReplicaCounts {
    /// The counts that must be zero, with their values.
    pub(crate) fn must_be_zero(&self) -> Vec<(&'static str, u64)> {
        let reconcile = self.reconcile.missing + self.reconcile.extra + self.reconcile.stale;
        vec![
            ("drift", self.drift),
            ("regressions", self.watcher.regressions),
            ("resurrected", self.resurrected),
            ("resurrections_seen", self.watcher.resurrections),
            ("unapplied", self.unapplied),
            ("reconcile_drift", reconcile as u64),
        ]
    }

    /// Name and printed value of every count, in table order.
    pub(crate) fn rows(&self) -> Vec<(&'static str, String)> {
        let r = &self.reconcile;
        let w = &self.watcher;
        vec![
            ("aggregates", self.aggregates.to_string()),
            ("updates", self.updates.to_string()),
            ("deletes", self.deletes.to_string()),
            ("source_records", self.source_records.to_string()),
            ("replica_records", self.replica_records.to_string()),
            ("redelivered", self.redelivered.to_string()),
            ("redelivered_pct", format!("{:.2} %", self.redelivered_pct)),
            ("redelivered_after_delete", self.redelivered_after_delete.to_string()),
            ("redelivered_max_behind", self.redelivered_max_behind.to_string()),
            ("inbox_records", self.inbox_records.to_string()),
            ("unapplied", self.unapplied.to_string()),
            ("drift", self.drift.to_string()),
            ("drift_missing", self.drift_missing.to_string()),
            ("drift_extra", self.drift_extra.to_string()),
            ("drift_stale", self.drift_stale.to_string()),
            ("drift_ahead", self.drift_ahead.to_string()),
            ("drift_name", self.drift_name.to_string()),
            ("regressions", w.regressions.to_string()),
            ("resurrected", self.resurrected.to_string()),
            ("resurrections_seen", w.resurrections.to_string()),
            ("tombstones", self.tombstones.to_string()),
            ("watcher_polls", w.polls.to_string()),
            ("watcher_deletions_seen", w.deletions.to_string()),
            ("watcher_errors", w.errors.to_string()),
            ("reconcile_drift", (r.missing + r.extra + r.stale).to_string()),
            (
                "reconcile",
                format!(
                    "{} source / {} replica records, {} differing buckets, missing {} extra {} stale {} ahead {}, {} ms",
                    r.source_records,
                    r.replica_records,
                    r.differing_buckets,
                    r.missing,
                    r.extra,
                    r.stale,
                    r.ahead,
                    r.took_ms
                ),
            ),
        ]
    }
}

/// `id → (name, sequence)` of a table's rows.
type Rows = HashMap<String, (String, i64)>;

/// Compares the replica's rows with the source's: drift, and deleted customers back.
fn compare(source: &Rows, deleted: &HashMap<String, i64>, replica: &Rows, c: &mut ReplicaCounts) {
    c.deletes = deleted.len() as u64;
    c.source_records = source.len() as u64;
    c.replica_records = replica.len() as u64;
    for (id, (name, version)) in source {
        match replica.get(id) {
            None => c.drift_missing += 1,
            Some((_, sequence)) if sequence < version => c.drift_stale += 1,
            Some((_, sequence)) if sequence > version => c.drift_ahead += 1,
            Some((held, _)) if held != name => c.drift_name += 1,
            Some(_) => {}
        }
    }
    for id in replica.keys() {
        if deleted.contains_key(id) {
            c.resurrected += 1;
        } else if !source.contains_key(id) {
            c.drift_extra += 1;
        }
    }
    c.drift = c.drift_missing + c.drift_extra + c.drift_stale + c.drift_ahead + c.drift_name;
}

/// Compares every replica row with the owner's table, with SQL only, and runs the
/// reconciler.
pub(crate) async fn check(service: &PgPool, replica_pool: &PgPool, watched: Watched) -> Result<ReplicaCounts> {
    let mut c = ReplicaCounts {
        watcher: watched,
        ..ReplicaCounts::default()
    };
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(service)
            .await
            .map(|n| u64::try_from(n).unwrap_or(0))
            .with_context(|| format!("count: {sql}"))
    };
    c.aggregates = count("select count(*) from committed_events where sequence = 1").await?;
    c.updates = count(
        "select count(*) from committed_events c join source_events e using (message_id)
         where c.sequence > 1 and e.message_type = 'chaos.CustomerChanged'",
    )
    .await?;
    c.redelivered = count("select count(*) from replayed_events").await?;
    c.redelivered_after_delete = count(
        "select count(*) from replayed_events r join deleted_customers d on d.id = r.aggregate_id
         where r.replayed_at > d.deleted_at",
    )
    .await?;
    let committed = count("select count(*) from committed_events").await?;
    if committed > 0 {
        #[allow(clippy::cast_precision_loss)] // counts of a run
        let pct = c.redelivered as f64 * 100.0 / committed as f64;
        c.redelivered_pct = (pct * 100.0).round() / 100.0;
    }
    c.redelivered_max_behind =
        sqlx::query_scalar("select coalesce(max(current_sequence - sequence), 0)::bigint from replayed_events")
            .fetch_one(service)
            .await?;

    let source: Rows = sqlx::query_as("select id, name, version from chaos_customers")
        .fetch_all(service)
        .await
        .context("read chaos_customers")?
        .into_iter()
        .map(|(id, name, version): (String, String, i64)| (id, (name, version)))
        .collect();
    let deleted: HashMap<String, i64> = sqlx::query_as("select id, sequence from deleted_customers")
        .fetch_all(service)
        .await
        .context("read deleted_customers")?
        .into_iter()
        .collect();
    let replica: Rows = sqlx::query_as("select id, name, source_sequence from customer_replica")
        .fetch_all(replica_pool)
        .await
        .context("read customer_replica")?
        .into_iter()
        .map(|(id, name, sequence): (String, String, i64)| (id, (name, sequence)))
        .collect();
    compare(&source, &deleted, &replica, &mut c);

    // Every committed and replayed event must have reached the replica (applied, or
    // skipped as stale, in the inbox's transaction).
    let inbox: HashSet<String> = sqlx::query_scalar("select message_id from dbps_inbox")
        .fetch_all(replica_pool)
        .await
        .context("read dbps_inbox")?
        .into_iter()
        .collect();
    c.inbox_records = inbox.len() as u64;
    let expected: Vec<String> =
        sqlx::query_scalar("select message_id from committed_events union all select message_id from replayed_events")
            .fetch_all(service)
            .await
            .context("read committed and replayed ids")?;
    c.unapplied = expected.iter().filter(|id| !inbox.contains(*id)).count() as u64;

    let tombstones: Vec<(String, i64)> =
        sqlx::query_as("select aggregate_id, sequence from dbps_replica_versions where replica = $1 and deleted")
            .bind(REPLICA_NAME)
            .fetch_all(replica_pool)
            .await
            .context("read dbps_replica_versions")?;
    c.tombstones = tombstones
        .iter()
        .filter(|(id, sequence)| deleted.get(id) == Some(sequence))
        .count() as u64;

    let source = PgSnapshotSource::new(service.clone(), "chaos_customers", "id", "version")?;
    let report = Reconciler::new(source, build_replica(replica_pool.clone())?)
        .run()
        .await
        .context("reconcile")?;
    c.reconcile = Reconciled {
        source_records: report.source_records,
        replica_records: report.replica_records,
        differing_buckets: report.differing_buckets,
        missing: report.missing.len(),
        extra: report.extra.len(),
        stale: report.stale.len(),
        ahead: report.ahead.len(),
        clean: report.is_clean(),
        took_ms: report.took.as_millis(),
    };
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(entries: &[(&str, &str, i64)]) -> Rows {
        entries
            .iter()
            .map(|(id, name, sequence)| ((*id).to_owned(), ((*name).to_owned(), *sequence)))
            .collect()
    }

    #[test]
    fn every_kind_of_drift_is_counted() {
        let source = rows(&[
            ("a", "A3", 3),
            ("b", "B2", 2),
            ("c", "C5", 5),
            ("d", "D1", 1),
            ("e", "E4", 4),
        ]);
        let deleted: HashMap<String, i64> = [(String::from("x"), 7), (String::from("y"), 2)].into();
        let replica = rows(&[
            ("a", "A3", 3),    // equal
            ("b", "B1", 1),    // stale
            ("c", "C6", 6),    // ahead
            ("d", "other", 1), // same sequence, another name
            ("x", "X6", 6),    // deleted, back
            ("z", "Z1", 1),    // never in the source
        ]);
        let mut c = ReplicaCounts::default();
        compare(&source, &deleted, &replica, &mut c);
        assert_eq!(
            (
                c.drift_missing,
                c.drift_stale,
                c.drift_ahead,
                c.drift_name,
                c.drift_extra
            ),
            (1, 1, 1, 1, 1),
            "e is missing"
        );
        assert_eq!(c.drift, 5);
        assert_eq!(c.resurrected, 1);
        assert_eq!((c.source_records, c.replica_records, c.deletes), (5, 6, 2));

        let mut clean = ReplicaCounts::default();
        compare(&source, &deleted, &source, &mut clean);
        assert_eq!((clean.drift, clean.resurrected), (0, 0));
    }

    #[test]
    fn the_watcher_sees_records_go_back_and_come_back() {
        let read = |entries: &[(&str, i64)]| -> Vec<(String, i64)> {
            entries.iter().map(|(id, s)| ((*id).to_owned(), *s)).collect()
        };
        let mut observer = Observer::default();
        observer.observe(&read(&[("a", 1), ("b", 1)]));
        observer.observe(&read(&[("a", 3), ("b", 2)]));
        observer.observe(&read(&[("a", 3)]));
        assert_eq!(observer.seen.deletions, 1);
        assert_eq!((observer.seen.regressions, observer.seen.resurrections), (0, 0));
        // a goes back to 2; b, deleted, is back.
        observer.observe(&read(&[("a", 2), ("b", 2)]));
        assert_eq!(observer.seen.regressions, 1);
        assert_eq!(observer.seen.resurrections, 1);
        assert_eq!(observer.seen.polls, 4);
    }
}
