//! The business transaction and the writers that run it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use dbps_core::{Envelope, Message, TraceContext};
use dbps_outbox::pg::PgOutbox;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection, Postgres};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// The aggregate type of the benchmark's events.
pub(crate) const AGGREGATE: &str = "order";

/// The service's own tables: an order with a handful of columns and its JSON document,
/// and a one-column table for the raw commit rate.
pub(crate) const SCHEMA: &str = "
create table bench_orders (
    id           bigint      primary key,
    customer_id  bigint      not null,
    status       text        not null,
    amount_cents bigint      not null,
    currency     text        not null,
    version      integer     not null default 1,
    updated_at   timestamptz not null,
    document     jsonb       not null
);
create table bench_commits (x integer not null);
create table bench_bare (id bigserial primary key, payload json not null);
";

/// Creates or updates the order and returns the id of the writing transaction, whose
/// commit timestamp the latency measurement looks up later, and the order's version.
const UPSERT_ORDER: &str = "
insert into bench_orders as o (id, customer_id, status, amount_cents, currency, updated_at, document)
values ($1, $2, $3, $4, 'EUR', now(), $5::jsonb)
on conflict (id) do update set customer_id = excluded.customer_id, status = excluded.status,
    amount_cents = excluded.amount_cents, updated_at = excluded.updated_at,
    document = excluded.document, version = o.version + 1
returning pg_current_xact_id()::text::bigint, version::bigint";

/// The notification the outbox sends when it enqueues (same channel, empty payload).
const NOTIFY: &str = "select pg_notify('dbps_outbox', '')";

/// The event each business transaction enqueues.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderChanged {
    /// The writing transaction's id (first, so that a reader finds it early).
    pub(crate) xid: u64,
    pub(crate) order_id: i64,
    pub(crate) customer_id: i64,
    pub(crate) status: String,
    pub(crate) amount_cents: i64,
    /// The order's document, about 1 KB of JSON.
    pub(crate) document: Box<RawValue>,
}

impl Message for OrderChanged {
    const TYPE: &'static str = "bench.OrderChanged";
}

pub(crate) const STATUSES: [&str; 4] = ["draft", "priced", "confirmed", "shipped"];

/// Order documents of about 1 KB: a customer, an address and order lines.
#[derive(Debug)]
pub(crate) struct Documents(Vec<Box<RawValue>>);

impl Documents {
    pub(crate) fn generate(count: usize) -> anyhow::Result<Self> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut docs = Vec::with_capacity(count);
        for n in 0..count {
            let mut lines = Vec::new();
            let mut doc = serde_json::Value::Null;
            // Add order lines until the document passes 1,000 bytes.
            while serde_json::to_string(&doc)?.len() < 1000 {
                lines.push(serde_json::json!({
                    "sku": format!("SKU-{:05}", rng.random_range(0..100_000)),
                    "description": "Stainless steel hex bolt M8 x 40, DIN 933, box of 100",
                    "quantity": rng.random_range(1..50),
                    "unit_price": format!("{}.{:02}", rng.random_range(1..500), rng.random_range(0..100)),
                }));
                doc = serde_json::json!({
                    "order_no": format!("SO-{n:06}"),
                    "customer": {
                        "name": "Ada Lovelace Engineering Ltd",
                        "email": "purchasing@ada-engineering.example",
                        "tax_number": "GB123456789",
                    },
                    "shipping": {
                        "street": "12 Analytical Engine Lane",
                        "city": "London",
                        "postcode": "EC1A 1BB",
                        "country": "GB",
                    },
                    "lines": lines,
                    "notes": "Deliver to goods-in, weekdays 08:00-16:00.",
                });
            }
            docs.push(RawValue::from_string(serde_json::to_string(&doc)?)?);
        }
        Ok(Self(docs))
    }

    pub(crate) fn get(&self, n: u64) -> &RawValue {
        let index = usize::try_from(n).unwrap_or(0) % self.0.len();
        &self.0[index]
    }

    /// The mean size of an event's JSON payload.
    pub(crate) fn mean_payload_bytes(&self) -> anyhow::Result<usize> {
        let sizes = (0..self.0.len() as i64)
            .map(|i| {
                Ok(
                    Envelope::event("bench", AGGREGATE, i.to_string(), &self.event(1_000_000, i))?
                        .payload_json()
                        .len(),
                )
            })
            .collect::<anyhow::Result<Vec<usize>>>()?;
        Ok(sizes.iter().sum::<usize>() / sizes.len().max(1))
    }

    /// An event about order `id` carrying one of the documents, as the writers build it.
    pub(crate) fn event(&self, xid: u64, id: i64) -> OrderChanged {
        let n = id.unsigned_abs();
        OrderChanged {
            xid,
            order_id: id,
            customer_id: id % 997,
            status: STATUSES[usize::try_from(n % 4).unwrap_or(0)].to_owned(),
            amount_cents: id * 37 % 100_000,
            document: self.get(n).to_owned(),
        }
    }
}

/// What one transaction of a load does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transaction {
    /// `insert into bench_commits (x) values (1)`, autocommitted: the server's raw
    /// commit rate.
    OneRowInsert,
    /// Upsert of one order (its 1 KB document included), in its own transaction.
    Business,
    /// The same, plus `PgOutbox::enqueue_event` of one `OrderChanged` in the transaction.
    BusinessWithOutbox,
    /// The same, with `PgOutbox::enqueue_versioned_event`: the event's sequence number is
    /// the order's version, which the upsert returns, instead of the sequences table's.
    /// (The two share the benchmark's orders, whose sequence numbers nobody checks here;
    /// a service uses one route per aggregate type.)
    BusinessWithVersionedOutbox,
    /// The floor any outbox pays: the business transaction plus one plain `INSERT` of the
    /// same event's JSON into a table with only a `bigserial` primary key
    /// (`write_tps_bare_insert`).
    BusinessBareInsert,
    /// Diagnostic: the business transaction plus `pg_notify` on the outbox's channel
    /// inside it (what the enqueue sends), without the outbox insert.
    BusinessNotifyInTx,
    /// Diagnostic: the business transaction, then `pg_notify` on the outbox's channel in
    /// a statement of its own after the commit.
    BusinessNotifyAfterCommit,
    /// Diagnostic: the business transaction plus the outbox row written by a copy of the
    /// insert in `PgOutbox::enqueue`'s statement (sequence upsert and outbox insert)
    /// without any notification logic: what the row alone costs. Not the outbox's code:
    /// its rows are deleted afterwards and never published.
    BusinessOutboxRowWithoutNotify,
}

impl Transaction {
    /// Whether it enqueues an event through the outbox (which the relay publishes).
    pub(crate) fn enqueues(self) -> bool {
        matches!(self, Self::BusinessWithOutbox | Self::BusinessWithVersionedOutbox)
    }
}

/// The insert of `PgOutbox::enqueue`'s statement (dbps-outbox/src/pg/writer.rs) without
/// its notification part, for [`Transaction::BusinessOutboxRowWithoutNotify`] only.
const ENQUEUE_WITHOUT_NOTIFY: &str = r#"
with seq as (
    insert into dbps_outbox_sequences as s (aggregate_type, aggregate_id, last_sequence)
    select $7, $8, 1
    on conflict (aggregate_type, aggregate_id) do update set last_sequence = s.last_sequence + 1
    returning last_sequence
), row as (
    insert into dbps_outbox (topic, message_id, kind, message_type, schema_version, source,
        aggregate_type, aggregate_id, sequence, occurred_at, correlation_id, causation_id,
        reply_to, traceparent, tracestate, headers, payload)
    select $1, $2, $3, $4, $5, $6, $7, $8, seq.last_sequence, $10, $11,
        $12, $13, $14, $15, $16, $17::json
    from seq
    returning id, sequence
)
select id, sequence from row"#;

/// A load to run: which transaction, at what rate (unlimited when `None`), how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) transaction: Transaction,
    pub(crate) rate: Option<f64>,
    pub(crate) duration: Duration,
}

/// What a load achieved.
#[derive(Debug)]
pub(crate) struct LoadResult {
    /// Transactions committed.
    pub(crate) committed: u64,
    /// From the start until the last writer stopped.
    pub(crate) elapsed: Duration,
    /// Client-side time of each transaction (BEGIN to COMMIT's reply), in microseconds.
    pub(crate) tx_micros: Histogram<u64>,
}

impl LoadResult {
    pub(crate) fn per_second(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64()
    }
}

/// `writers` concurrent tasks, each on its own pooled connection, running a load.
#[derive(Debug, Clone)]
pub(crate) struct Writers {
    pool: PgPool,
    outbox: PgOutbox,
    events_topic: String,
    docs: Arc<Documents>,
    writers: usize,
    keys: i64,
    /// Events committed through the outbox since the start of the run.
    events_committed: Arc<AtomicU64>,
}

impl Writers {
    pub(crate) fn new(
        pool: PgPool,
        outbox: PgOutbox,
        events_topic: String,
        docs: Arc<Documents>,
        writers: usize,
        keys: i64,
    ) -> Self {
        Self {
            pool,
            outbox,
            events_topic,
            docs,
            writers: writers.max(1),
            keys: keys.max(1),
            events_committed: Arc::default(),
        }
    }

    pub(crate) fn events_committed(&self) -> u64 {
        self.events_committed.load(Ordering::Acquire)
    }

    /// Runs `load` and reports what it achieved, updating `bar` (length in milliseconds)
    /// as it goes.
    pub(crate) async fn run(&self, load: Load, bar: &ProgressBar) -> anyhow::Result<LoadResult> {
        let writers = self.writers;
        let mut tasks = Vec::with_capacity(writers);
        for writer in 0..writers {
            tasks.push(PgWriter {
                this: self.clone(),
                conn: self.pool.acquire().await.context("writer connection")?,
                rng: StdRng::seed_from_u64(writer as u64 ^ 0x5eed),
                writer: writer as i64,
                transaction: load.transaction,
            });
        }
        drive(tasks, load.rate, load.duration, bar).await
    }

    async fn transact(&self, conn: &mut PgConnection, transaction: Transaction, id: i64) -> anyhow::Result<()> {
        match transaction {
            Transaction::OneRowInsert => {
                sqlx::query("insert into bench_commits (x) values (1)")
                    .execute(&mut *conn)
                    .await?;
            }
            Transaction::Business
            | Transaction::BusinessWithOutbox
            | Transaction::BusinessWithVersionedOutbox
            | Transaction::BusinessBareInsert
            | Transaction::BusinessNotifyInTx
            | Transaction::BusinessNotifyAfterCommit
            | Transaction::BusinessOutboxRowWithoutNotify => {
                let doc = self.docs.get(id.unsigned_abs());
                let mut tx = conn.begin().await?;
                let (xid, version): (i64, i64) = sqlx::query_as(UPSERT_ORDER)
                    .bind(id)
                    .bind(id % 997)
                    .bind(STATUSES[usize::try_from(id % 4).unwrap_or(0)])
                    .bind(id * 37 % 100_000)
                    .bind(doc.get())
                    .fetch_one(&mut *tx)
                    .await?;
                if transaction == Transaction::BusinessWithOutbox {
                    let event = self.docs.event(xid.unsigned_abs(), id);
                    self.outbox
                        .enqueue_event(&mut tx, AGGREGATE, &id.to_string(), &event)
                        .await?;
                }
                if transaction == Transaction::BusinessWithVersionedOutbox {
                    let event = self.docs.event(xid.unsigned_abs(), id);
                    self.outbox
                        .enqueue_versioned_event(&mut tx, AGGREGATE, &id.to_string(), version, &event)
                        .await?;
                }
                if transaction == Transaction::BusinessBareInsert {
                    let event = serde_json::to_string(&self.docs.event(xid.unsigned_abs(), id))?;
                    sqlx::query("insert into bench_bare (payload) values ($1::json)")
                        .bind(event)
                        .execute(&mut *tx)
                        .await?;
                }
                if transaction == Transaction::BusinessNotifyInTx {
                    sqlx::query(NOTIFY).execute(&mut *tx).await?;
                }
                if transaction == Transaction::BusinessOutboxRowWithoutNotify {
                    let event = self.docs.event(xid.unsigned_abs(), id);
                    let mut envelope = Envelope::event(self.outbox.service(), AGGREGATE, id.to_string(), &event)?;
                    envelope.trace = TraceContext::new_root();
                    let _: (i64, Option<i64>) = sqlx::query_as(ENQUEUE_WITHOUT_NOTIFY)
                        .bind(&self.events_topic)
                        .bind(&envelope.id)
                        .bind(envelope.kind.as_str())
                        .bind(&envelope.message_type)
                        .bind(i32::try_from(envelope.schema_version)?)
                        .bind(&envelope.source)
                        .bind(&envelope.aggregate_type)
                        .bind(&envelope.aggregate_id)
                        .bind(envelope.sequence)
                        .bind(envelope.occurred_at)
                        .bind(&envelope.correlation_id)
                        .bind(&envelope.causation_id)
                        .bind(&envelope.reply_to)
                        .bind(&envelope.trace.traceparent)
                        .bind(&envelope.trace.tracestate)
                        .bind(None::<serde_json::Value>)
                        .bind(envelope.payload_json())
                        .fetch_one(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                if transaction == Transaction::BusinessNotifyAfterCommit {
                    sqlx::query(NOTIFY).execute(&mut *conn).await?;
                }
            }
        }
        Ok(())
    }

    /// Enqueues `total` events through `PgOutbox::enqueue_event`, `per_tx` per
    /// transaction, from all writers at once (the relay is stopped meanwhile). Returns
    /// how long it took.
    pub(crate) async fn fill_backlog(&self, total: u64, per_tx: u64, bar: &ProgressBar) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let claimed = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let writers = self.writers as i64;
        for writer in 0..writers {
            let this = self.clone();
            let (claimed, done) = (claimed.clone(), done.clone());
            tasks.spawn(async move {
                let mut conn = this.pool.acquire().await.context("writer connection")?;
                let slots = (this.keys / writers).max(1);
                let mut next_slot = 0i64;
                loop {
                    let first = claimed.fetch_add(per_tx, Ordering::AcqRel);
                    if first >= total {
                        break;
                    }
                    let count = per_tx.min(total - first);
                    let mut tx = conn.begin().await?;
                    let xid: i64 = sqlx::query_scalar("select pg_current_xact_id()::text::bigint")
                        .fetch_one(&mut *tx)
                        .await?;
                    // Distinct aggregates of this writer's keys, so transactions never
                    // wait for each other's sequence rows.
                    for _ in 0..count {
                        let id = (next_slot % slots) * writers + writer;
                        next_slot += 1;
                        let event = this.docs.event(xid.unsigned_abs(), id);
                        this.outbox
                            .enqueue_event(&mut tx, AGGREGATE, &id.to_string(), &event)
                            .await?;
                    }
                    tx.commit().await?;
                    this.events_committed.fetch_add(count, Ordering::AcqRel);
                    done.fetch_add(count, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                next = tasks.join_next() => match next {
                    Some(result) => result.context("writer task panicked")??,
                    None => break,
                },
                _ = tick.tick() => bar.set_position(done.load(Ordering::Relaxed)),
            }
        }
        bar.set_position(done.load(Ordering::Relaxed));
        Ok(started.elapsed())
    }
}

/// One writer of [`Writers::run`], on its own connection.
struct PgWriter {
    this: Writers,
    conn: PoolConnection<Postgres>,
    rng: StdRng,
    writer: i64,
    transaction: Transaction,
}

impl Writer for PgWriter {
    async fn write(&mut self) -> anyhow::Result<bool> {
        // Each writer owns the keys congruent to its number, so writers never wait for
        // each other's row locks (the rate measured is the write path's).
        let writers = self.this.writers as i64;
        let slots = (self.this.keys / writers).max(1);
        let id = self.rng.random_range(0..slots) * writers + self.writer;
        self.this.transact(&mut self.conn, self.transaction, id).await?;
        if self.transaction.enqueues() {
            self.this.events_committed.fetch_add(1, Ordering::AcqRel);
        }
        Ok(true)
    }
}

/// One of the concurrent writers a load runs.
pub(crate) trait Writer: Send + 'static {
    /// Writes once; `false` when the writer has nothing left to write.
    fn write(&mut self) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// Runs `writers` concurrently for `duration` (or until each has nothing left to write),
/// at `rate` writes per second in all (unlimited when `None`), and reports what they
/// achieved, updating `bar` (length in milliseconds) as it goes.
pub(crate) async fn drive<W: Writer>(
    writers: Vec<W>,
    rate: Option<f64>,
    duration: Duration,
    bar: &ProgressBar,
) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let start = tokio::time::Instant::from_std(started);
    let end = start + duration;
    let committed = Arc::new(AtomicU64::new(0));
    let count = writers.len();
    let mut tasks = JoinSet::new();
    for (n, mut writer) in writers.into_iter().enumerate() {
        let committed = committed.clone();
        tasks.spawn(async move {
            let mut micros = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut ticker = rate.map(|rate| {
                // Writer `w` of `n` fires at start + w/rate, then every n/rate.
                let period = Duration::from_secs_f64(count as f64 / rate);
                let first = start + Duration::from_secs_f64(n as f64 / rate);
                let mut ticker = tokio::time::interval_at(first, period);
                // Open loop: a late write does not lower the offered rate.
                ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
                ticker
            });
            loop {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                if tokio::time::Instant::now() >= end {
                    break;
                }
                let t0 = Instant::now();
                if !writer.write().await? {
                    break;
                }
                micros.saturating_record(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                committed.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(micros)
        });
    }
    let mut tx_micros = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                Some(result) => tx_micros.add(result.context("writer task panicked")??)?,
                None => break,
            },
            _ = tick.tick() => {
                let elapsed = started.elapsed();
                bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                let done = committed.load(Ordering::Relaxed);
                bar.set_message(format!("{done} writes, {:.0}/s", done as f64 / elapsed.as_secs_f64().max(1e-3)));
            }
        }
    }
    Ok(LoadResult {
        committed: committed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        tx_micros,
    })
}
