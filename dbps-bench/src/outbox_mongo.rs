//! The `outbox-mongo` scenario: the MongoDB outbox and its relay, beside plain writes of
//! the same documents to the same server.
//!
//! Phases, in this order (`D` is `--duration`):
//!
//! 1. warm-up: a few seconds of each write, relay running;
//! 2. the baseline: the server's raw insert rate, new order documents by `insert_one`
//!    into a collection of their own, for `D/2`;
//! 3. updates of the existing orders without and with the outbox in four slices of
//!    `D/4`, in the order ABBA: `update_one` against `MongoOutbox::update_with_events`
//!    with one event; the relay runs (and keeps up) during the with-outbox slices, which
//!    also give the sustained end-to-end rate;
//! 4. write → consumer latency at 25 % (for `D/3`) and 50 % (for `D`) of the
//!    with-outbox update rate, writers rate-limited (open loop), relay running;
//! 5. drain: a backlog of `--drain-events` events written with the relay stopped, by
//!    `MongoOutbox::insert_with_events` of new orders carrying 10 events each; the raw
//!    producer, the relay draining the backlog, the raw producer again.
//!
//! The server has no commit timestamps to read back, so a write's moment is when its
//! writer received the acknowledgement, on this machine's clock (the consumer's too).
//!
//! The outbox's aggregates are a fixed set of orders (`--keys`), updated over and over,
//! rather than an ever-growing collection: on FerretDB 1.x every query other than an
//! `_id` lookup reads the whole collection, so a growing collection would make each
//! phase slower than the one before.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicNaming};
use dbps_outbox::mongo::{DocumentLocks, MongoOutbox, MongoOutboxStore, PENDING_FIELD};
use mongodb::bson::{self, Document, doc};
use mongodb::{Client, Collection, Database};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::baseline::{PUBLISHER_LINGER_MS, RawProducer};
use crate::cpu;
use crate::observer::{Observer, unix_micros};
use crate::outbox::{RelayControl, time_drain, write_json};
use crate::probes::{sampling, split_latencies};
use crate::progress;
use crate::report::{LatencyPoint, Percentiles, table, thousands};
use crate::servers::{Topics, env_var, git_commit, run_suffix};
use crate::workload::{AGGREGATE, Documents, LoadResult, STATUSES, Writer, drive};

/// Options of the `outbox-mongo` scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long the main measurements run: the update comparison and the latency point
    /// at half load run this long; the other phases are shorter. A run takes about
    /// 3 × this plus the drain.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Writes the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Messages the relay fetches and publishes per round.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// `linger.ms` of the relay's publisher and of the raw producer (default: the
    /// publisher's own, 5 ms).
    #[arg(long)]
    linger_ms: Option<u32>,
    /// The relay's shortest polling delay where the server has no change streams (the
    /// store's default is 100 ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    poll_min: Option<Duration>,
    /// Events in the backlog the relay drains (10 per new order), and records the raw
    /// producer sends.
    #[arg(long, default_value_t = 5_000)]
    drain_events: u64,
    /// Partitions of each benchmark topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Orders that exist before the run, which the writers update.
    #[arg(long, default_value_t = 200)]
    keys: i64,
}

/// How long to wait for the consumer or the relay before the harness gives up.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(300);
/// The collection of the orders (the outbox's aggregates).
const ORDERS: &str = "orders";
/// The collection the raw insert baseline writes to.
const RAW_ORDERS: &str = "raw_orders";
/// Events per new order in the drain's backlog.
const FILL_EVENTS_PER_DOC: u64 = 10;
/// Loads of the latency phase, as fractions of the with-outbox update rate, and how
/// long each runs as a fraction of `--duration`.
const SWEEP: [(f64, f64); 2] = [(0.25, 1.0 / 3.0), (HEADLINE_LOAD, 1.0)];
/// The load the headline latency is taken at: half of the maximum update rate.
const HEADLINE_LOAD: f64 = 0.50;
/// Warm-up per write kind.
const WARM_UP: Duration = Duration::from_secs(3);

/// Runs the scenario, prints its table and writes the JSON.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    if args.writers == 0 || args.batch_size == 0 || args.partitions < 1 || args.keys < args.writers as i64 {
        bail!("--writers, --batch-size and --partitions must be positive, and --keys at least --writers");
    }
    if args.duration < Duration::from_secs(4) || args.drain_events < FILL_EVENTS_PER_DOC {
        bail!("--duration must be at least 4s and --drain-events at least {FILL_EVENTS_PER_DOC}");
    }
    let started = Instant::now();
    let uri = env_var("DBPS_MONGODB_URI")?;
    let brokers = env_var("DBPS_KAFKA_BROKERS")?;
    let client = Client::with_uri_str(&uri)
        .await
        .map_err(|_| anyhow!("DBPS_MONGODB_URI is not a valid MongoDB connection string"))?;
    let suffix = run_suffix();
    let database = client.database(&format!("dbps_bench_{suffix}"));
    let topics = Topics::create(&brokers, &suffix, args.partitions).await?;
    eprintln!(
        "dbps-bench outbox-mongo: database {}, topics {} and {}",
        database.name(),
        topics.events,
        topics.raw
    );
    let result = tokio::select! {
        result = measure(&args, &brokers, &database, &topics) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let bar = progress::spinner("removing database and topics");
    if let Err(error) = database.drop().await {
        eprintln!("warning: could not drop database {}: {error}", database.name());
    }
    topics.remove().await;
    bar.finish_and_clear();
    let mut report = result?;
    report.wall_time_s = started.elapsed().as_secs_f64();

    println!("{}", report.render());
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// What one kind of write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// `insert_one` of a new order document into [`RAW_ORDERS`].
    Insert,
    /// `update_one` of an existing order: status, amount, time and version.
    Update,
    /// The same update with one `OrderChanged` by `MongoOutbox::update_with_events`.
    UpdateWithOutbox,
    /// A new order with [`FILL_EVENTS_PER_DOC`] `OrderChanged` events by
    /// `MongoOutbox::insert_with_events`, for the drain's backlog.
    Fill,
}

impl Write {
    fn events(self) -> u64 {
        match self {
            Self::Insert | Self::Update => 0,
            Self::UpdateWithOutbox => 1,
            Self::Fill => FILL_EVENTS_PER_DOC,
        }
    }
}

/// What the writers share.
#[derive(Debug, Clone)]
struct Shared {
    orders: Collection<Document>,
    raw_orders: Collection<Document>,
    outbox: MongoOutbox,
    json: Arc<Documents>,
    /// The same documents as BSON, built once.
    bson: Arc<Vec<Document>>,
    writers: i64,
    keys: i64,
    /// The number of the next new order (orders below `keys` exist from the start).
    next_id: Arc<AtomicI64>,
    /// The next event number, carried in the payload's `xid` field.
    next_event: Arc<AtomicU64>,
    /// Events written through the outbox since the start of the run.
    events_written: Arc<AtomicU64>,
}

impl Shared {
    /// Order ids are strings, like most applications' ids (and the only kind, with
    /// object ids, that FerretDB 1.x looks up by index).
    fn key(id: i64) -> String {
        format!("order-{id:07}")
    }

    fn order(&self, id: i64) -> Document {
        let n = id.unsigned_abs();
        let body = &self.bson[usize::try_from(n).unwrap_or(0) % self.bson.len()];
        doc! {
            "_id": Self::key(id),
            "customer_id": id % 997,
            "status": STATUSES[usize::try_from(n % 4).unwrap_or(0)],
            "amount_cents": id * 37 % 100_000,
            "currency": "EUR",
            "version": 1_i64,
            "updated_at": bson::DateTime::now(),
            "document": body.clone(),
        }
    }

    fn change(rng: &mut StdRng) -> Document {
        doc! {
            "$set": {
                "status": STATUSES[rng.random_range(0..STATUSES.len())],
                "amount_cents": rng.random_range(0..100_000_i64),
                "updated_at": bson::DateTime::now(),
            },
            "$inc": { "version": 1_i64 },
        }
    }

    /// Runs `write` with every writer for `duration` (or until `limit` writes in all),
    /// at `rate` writes per second; with `acks`, notes when each event's write was
    /// acknowledged.
    async fn run(
        &self,
        write: Write,
        rate: Option<f64>,
        duration: Duration,
        limit: Option<u64>,
        acks: Option<&Acks>,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<LoadResult> {
        let claimed = Arc::new(AtomicU64::new(0));
        let writers = (0..self.writers)
            .map(|writer| MongoWriter {
                shared: self.clone(),
                write,
                rng: StdRng::seed_from_u64(writer.unsigned_abs() ^ 0x5eed),
                writer,
                limit: limit.map(|limit| (limit, claimed.clone())),
                acks: acks.cloned(),
            })
            .collect();
        drive(writers, rate, duration, bar).await
    }
}

/// When each event's write was acknowledged: event number → microseconds since the
/// Unix epoch.
type Acks = Arc<Mutex<HashMap<u64, i64>>>;

/// One writer: a task on the shared client (the driver pools connections).
struct MongoWriter {
    shared: Shared,
    write: Write,
    rng: StdRng,
    writer: i64,
    /// The total to write across writers, and how many are claimed.
    limit: Option<(u64, Arc<AtomicU64>)>,
    acks: Option<Acks>,
}

impl Writer for MongoWriter {
    async fn write(&mut self) -> anyhow::Result<bool> {
        if let Some((limit, claimed)) = &self.limit
            && claimed.fetch_add(1, Ordering::AcqRel) >= *limit
        {
            return Ok(false);
        }
        let s = &self.shared;
        let id = match self.write {
            Write::Insert | Write::Fill => s.next_id.fetch_add(1, Ordering::AcqRel),
            // Each writer updates the orders congruent to its number, so writers never
            // wait for each other's documents (the rate measured is the write path's).
            Write::Update | Write::UpdateWithOutbox => {
                let slots = (s.keys / s.writers).max(1);
                self.rng.random_range(0..slots) * s.writers + self.writer
            }
        };
        let count = self.write.events();
        let first = s.next_event.fetch_add(count, Ordering::AcqRel);
        let messages = (first..first + count)
            .map(|number| s.outbox.event(AGGREGATE, &s.json.event(number, id)))
            .collect::<Result<Vec<_>, _>>()?;
        let filter = || doc! { "_id": Shared::key(id) };
        match self.write {
            Write::Insert => {
                s.raw_orders.insert_one(s.order(id)).await?;
            }
            Write::Update => {
                s.orders.update_one(filter(), Shared::change(&mut self.rng)).await?;
            }
            Write::UpdateWithOutbox => {
                let change = Shared::change(&mut self.rng);
                s.outbox
                    .update_with_events(&s.orders, filter(), change, messages)
                    .await?;
            }
            Write::Fill => {
                s.outbox.insert_with_events(&s.orders, s.order(id), messages).await?;
            }
        }
        if count > 0 {
            s.events_written.fetch_add(count, Ordering::AcqRel);
            if let Some(acks) = &self.acks {
                let at = unix_micros();
                let mut acks = acks.lock().map_err(|_| anyhow!("acknowledgement map poisoned"))?;
                acks.extend((first..first + count).map(|number| (number, at)));
            }
        }
        Ok(true)
    }
}

/// One kind of write, measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WriteRate {
    pub(crate) variant: &'static str,
    pub(crate) writes_per_s: f64,
    /// The writers' client-side time per write (request to acknowledgement).
    pub(crate) write_ms: Percentiles,
    /// How busy all cores were meanwhile.
    pub(crate) machine_busy_pct: Option<f64>,
}

impl WriteRate {
    /// The rate over `runs` of one variant, with their percentiles and mean busyness.
    fn of(variant: &'static str, runs: &[LoadResult], busy: &[Option<f64>]) -> anyhow::Result<Self> {
        let mut micros = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for run in runs {
            micros.add(&run.tx_micros)?;
        }
        let committed: u64 = runs.iter().map(|r| r.committed).sum();
        let elapsed: Duration = runs.iter().map(|r| r.elapsed).sum();
        let busy: Vec<f64> = busy.iter().flatten().copied().collect();
        Ok(Self {
            variant,
            writes_per_s: committed as f64 / elapsed.as_secs_f64(),
            write_ms: Percentiles::of_micros(&micros),
            machine_busy_pct: (!busy.is_empty()).then(|| busy.iter().sum::<f64>() / busy.len() as f64),
        })
    }
}

/// The drain phase in detail.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MongoDrain {
    /// Events waiting when the relay started (10 per document).
    pub(crate) backlog_events: u64,
    /// Time to write the backlog through `MongoOutbox::insert_with_events`, 10 events
    /// per new order.
    pub(crate) fill_s: f64,
    /// Relay start → no document with a pending event, and every event seen by the
    /// consumer.
    pub(crate) relay_s: f64,
    /// Raw producer, run before and after the relay: first send → every record seen.
    pub(crate) raw_consumed_s: Vec<f64>,
}

/// The run's settings.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MongoSettings {
    pub(crate) writers: usize,
    pub(crate) relay_batch_size: usize,
    pub(crate) linger_ms: u32,
    /// The relay's shortest polling delay (no change streams on the server); `None`:
    /// the store's default.
    pub(crate) poll_min_ms: Option<f64>,
    pub(crate) drain_events: u64,
    pub(crate) partitions: i32,
    pub(crate) keys: i64,
    /// The server, from `buildInfo`.
    pub(crate) server: String,
    /// Whether outbox writes take per-document locks on this server.
    pub(crate) document_locks: bool,
}

/// Everything the scenario measured, headline figures first.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MongoReport {
    pub(crate) scenario: &'static str,
    pub(crate) raw_insert_per_s: f64,
    pub(crate) relay_drain_eps: f64,
    /// Drain rate over the raw insert rate: whether one relay keeps up with what the
    /// server can write.
    pub(crate) drain_vs_raw_insert_ratio: f64,
    /// Write → consumer at half of the maximum with-outbox update rate.
    pub(crate) latency_ms: LatencyPoint,
    pub(crate) update_per_s: f64,
    pub(crate) update_with_outbox_per_s: f64,
    pub(crate) update_overhead_pct: f64,
    pub(crate) raw_producer_eps: f64,
    pub(crate) drain_vs_raw_producer_ratio: f64,
    pub(crate) sustained_eps: f64,
    pub(crate) payload_bytes: usize,
    pub(crate) duration_s: f64,
    pub(crate) wall_time_s: f64,
    pub(crate) cores: usize,
    pub(crate) git_commit: String,
    pub(crate) date: String,
    pub(crate) settings: MongoSettings,
    pub(crate) writes: Vec<WriteRate>,
    pub(crate) latency_sweep: Vec<LatencyPoint>,
    pub(crate) drain: MongoDrain,
}

impl MongoReport {
    /// The table printed at the end of a run (Markdown, pasted as is into the docs).
    pub(crate) fn render(&self) -> String {
        let s = &self.settings;
        let mut out = format!(
            "dbps-bench outbox-mongo · {} · commit {} · {} cores · {} · document locks {} · --duration {}s · {} writers · relay batch {} · poll min {} · linger.ms {} · payload {} B · run took {:.0} s\n\n",
            self.date,
            self.git_commit,
            self.cores,
            s.server,
            if s.document_locks { "on" } else { "off" },
            self.duration_s,
            s.writers,
            s.relay_batch_size,
            s.poll_min_ms
                .map_or_else(|| String::from("default"), |ms| format!("{ms:.0} ms")),
            s.linger_ms,
            self.payload_bytes,
            self.wall_time_s,
        );
        let ratio = |a: f64, b: f64| format!("{:.2}", a / b);
        let l = &self.latency_ms;
        let mut rows: Vec<Vec<String>> = Vec::new();
        rows.push(vec![
            "relay drain, events/s".into(),
            thousands(self.relay_drain_eps),
            format!("{} raw inserts/s", thousands(self.raw_insert_per_s)),
            format!("{:.2}", self.drain_vs_raw_insert_ratio),
        ]);
        rows.push(vec![
            "relay drain, events/s".into(),
            thousands(self.relay_drain_eps),
            format!("{} raw producer", thousands(self.raw_producer_eps)),
            format!("{:.2}", self.drain_vs_raw_producer_ratio),
        ]);
        rows.push(vec![
            format!("write → consumer p99, ms (at {:.0} % load)", l.load_fraction * 100.0),
            format!("{:.1} (p50 {:.1})", l.p99, l.p50),
            "–".into(),
            "–".into(),
        ]);
        rows.push(vec![
            "update rate, writes/s".into(),
            format!("{} with outbox", thousands(self.update_with_outbox_per_s)),
            format!("{} without outbox", thousands(self.update_per_s)),
            ratio(self.update_with_outbox_per_s, self.update_per_s),
        ]);
        rows.push(vec![
            "sustained end to end, events/s".into(),
            thousands(self.sustained_eps),
            format!("{} raw updates/s", thousands(self.update_per_s)),
            ratio(self.sustained_eps, self.update_per_s),
        ]);
        out.push_str(&table(&["metric", "dbps", "baseline (same run)", "ratio"], &rows));

        out.push_str("\nWrites, per write (client side, request to acknowledgement):\n\n");
        let mut rows: Vec<Vec<String>> = Vec::new();
        for w in &self.writes {
            rows.push(vec![
                w.variant.into(),
                thousands(w.writes_per_s),
                format!("{:.2}", w.write_ms.p50),
                format!("{:.2}", w.write_ms.p99),
                w.machine_busy_pct.map_or_else(|| "–".into(), |p| format!("{p:.0} %")),
            ]);
        }
        out.push_str(&table(
            &["variant", "writes/s", "p50 ms", "p99 ms", "machine busy"],
            &rows,
        ));

        out.push_str("\nWrite → consumer latency, ms (write → relay's send, send → consumer):\n\n");
        let mut rows: Vec<Vec<String>> = Vec::new();
        for p in &self.latency_sweep {
            rows.push(vec![
                format!("{:.0} %", p.load_fraction * 100.0),
                thousands(p.achieved_eps),
                thousands(p.samples as f64),
                format!("{:.1}", p.p50),
                format!("{:.1}", p.p99),
                format!("{:.1}", p.p999),
                format!("{:.1}", p.max),
                format!("{:.1}", p.commit_to_send_ms.p50),
                format!("{:.1}", p.commit_to_send_ms.p99),
                format!("{:.1}", p.send_to_consumer_ms.p99),
            ]);
        }
        out.push_str(&table(
            &[
                "load",
                "events/s",
                "samples",
                "p50",
                "p99",
                "p99.9",
                "max",
                "to send p50",
                "to send p99",
                "send → consumer p99",
            ],
            &rows,
        ));
        let d = &self.drain;
        out.push_str(&format!(
            "\nDrain: {} events written in {:.1} s with the relay stopped, then drained in {:.2} s; raw producer runs {}.\n",
            thousands(d.backlog_events as f64),
            d.fill_s,
            d.relay_s,
            d.raw_consumed_s
                .iter()
                .map(|s| format!("{s:.2} s"))
                .collect::<Vec<_>>()
                .join(" and ")
        ));
        out
    }
}

/// Everything the phases share.
struct Bench<'a> {
    args: &'a Args,
    brokers: &'a str,
    topics: &'a Topics,
    writers: Shared,
    observer: Observer,
    relay: RelayControl<MongoOutboxStore>,
}

impl Bench<'_> {
    /// Waits until the consumer has seen every event written so far and no document has
    /// an unpublished event. Returns how long the consumer took.
    async fn catch_up(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let target = self.writers.events_written.load(Ordering::Acquire);
        self.observer.wait_for_events(target, CATCH_UP_DEADLINE).await?;
        let consumed = started.elapsed();
        loop {
            let left = self
                .writers
                .orders
                .count_documents(doc! { PENDING_FIELD: { "$exists": true } })
                .await?;
            if left == 0 {
                return Ok(consumed);
            }
            if started.elapsed() > CATCH_UP_DEADLINE {
                bail!("{left} documents still have unpublished events after {CATCH_UP_DEADLINE:?}");
            }
            // Counting reads the whole collection on FerretDB: not too often.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `write` flat out for `duration`, starting the relay for outbox writes and
    /// stopping it otherwise; returns the result and how busy the machine was.
    async fn slice(
        &mut self,
        label: &str,
        write: Write,
        duration: Duration,
    ) -> anyhow::Result<(LoadResult, Option<f64>)> {
        if write.events() > 0 {
            self.relay.start()?;
        } else {
            self.relay.stop().await?;
        }
        let bar = progress::timed(label, duration);
        let before = cpu::sample(&[]);
        let result = self.writers.run(write, None, duration, None, None, &bar).await?;
        let busy = cpu::busy_pct_since(before.as_ref());
        progress::done(&bar, label, &format!("{:.0} writes/s", result.per_second()));
        Ok((result, busy))
    }
}

async fn measure(args: &Args, brokers: &str, database: &Database, topics: &Topics) -> anyhow::Result<MongoReport> {
    let setup = progress::spinner("setting up");
    let info = database
        .client()
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await
        .context("buildInfo")?;
    let server = match (info.get_str("ferretdbVersion"), info.get_str("version")) {
        (Ok(ferret), Ok(version)) => format!("FerretDB {ferret} (MongoDB {version} protocol)"),
        (_, Ok(version)) => format!("MongoDB {version}"),
        _ => String::from("unknown server"),
    };
    let document_locks = DocumentLocks::Auto.needed(database.client()).await?;
    let mut store = MongoOutboxStore::new(database.clone()).collection(ORDERS);
    if let Some(min) = args.poll_min {
        // The longest delay stays the store's default, 1 s.
        store = store.polling(min, Duration::from_secs(1));
    }
    store.create_indexes().await.context("outbox indexes")?;
    let naming = TopicNaming::new().events_pattern(topics.events.clone());
    let json = Arc::new(Documents::generate(64)?);
    let bson = (0..64)
        .map(|n| {
            let value: serde_json::Value = serde_json::from_str(json.get(n).get())?;
            Ok(bson::to_document(&value)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let writers = Shared {
        orders: database.collection(ORDERS),
        raw_orders: database.collection(RAW_ORDERS),
        outbox: MongoOutbox::new("bench").naming(naming),
        json: json.clone(),
        bson: Arc::new(bson),
        writers: i64::try_from(args.writers)?,
        keys: args.keys,
        next_id: Arc::new(AtomicI64::new(args.keys)),
        next_event: Arc::new(AtomicU64::new(0)),
        events_written: Arc::default(),
    };
    // The orders the update phase changes.
    for chunk in (0..args.keys).collect::<Vec<_>>().chunks(500) {
        writers
            .orders
            .insert_many(chunk.iter().map(|&id| writers.order(id)))
            .await
            .context("inserting the orders")?;
    }
    let payload_bytes = json.mean_payload_bytes()?;
    let observer = Observer::start(brokers, &topics.events, &topics.raw, args.partitions)?;
    let mut kafka = KafkaConfig::new(brokers);
    if let Some(linger) = args.linger_ms {
        kafka = kafka.set("linger.ms", linger.to_string());
    }
    let publisher = KafkaPublisher::builder(kafka).build()?;
    let relay = RelayControl::new(store, publisher, args.batch_size);
    let mut bench = Bench {
        args,
        brokers,
        topics,
        writers,
        observer,
        relay,
    };
    progress::done(
        &setup,
        "set up",
        &format!(
            "{payload_bytes} B event payload, {server}, {} orders, document locks {}",
            args.keys,
            if document_locks { "on" } else { "off" }
        ),
    );

    for (label, write) in [
        ("warm-up: update with outbox", Write::UpdateWithOutbox),
        ("warm-up: update", Write::Update),
        ("warm-up: insert", Write::Insert),
    ] {
        bench.slice(label, write, WARM_UP).await?;
        if write.events() > 0 {
            bench.catch_up().await?;
        }
    }
    let (raw_inserts, busy) = bench.slice("raw inserts", Write::Insert, args.duration / 2).await?;
    let raw_insert = WriteRate::of("insert_one (baseline)", &[raw_inserts], &[busy])?;
    let (updates, (events, time)) = compare(&mut bench).await?;
    let sustained_eps = events as f64 / time.as_secs_f64();
    let latency_sweep = latency_sweep(&mut bench, updates[1].writes_per_s).await?;
    let latency_ms = latency_sweep
        .iter()
        .find(|p| p.load_fraction == HEADLINE_LOAD)
        .cloned()
        .ok_or_else(|| anyhow!("no latency point at half load"))?;
    let drain = drain(&mut bench).await?;
    bench.relay.stop().await?;
    bench.observer.check()?;
    bench.observer.stop();

    let raw_insert_per_s = raw_insert.writes_per_s;
    let relay_drain_eps = drain.backlog_events as f64 / drain.relay_s;
    let raw_producer_eps = 2.0 * drain.backlog_events as f64 / drain.raw_consumed_s.iter().sum::<f64>();
    let overhead = (updates[0].writes_per_s - updates[1].writes_per_s) / updates[0].writes_per_s * 100.0;
    Ok(MongoReport {
        scenario: "outbox-mongo",
        raw_insert_per_s,
        relay_drain_eps,
        drain_vs_raw_insert_ratio: relay_drain_eps / raw_insert_per_s,
        latency_ms,
        update_per_s: updates[0].writes_per_s,
        update_with_outbox_per_s: updates[1].writes_per_s,
        update_overhead_pct: overhead,
        raw_producer_eps,
        drain_vs_raw_producer_ratio: relay_drain_eps / raw_producer_eps,
        sustained_eps,
        payload_bytes,
        duration_s: args.duration.as_secs_f64(),
        wall_time_s: 0.0,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        git_commit: git_commit(),
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        settings: MongoSettings {
            writers: args.writers,
            relay_batch_size: args.batch_size,
            linger_ms: args.linger_ms.unwrap_or(PUBLISHER_LINGER_MS),
            poll_min_ms: args.poll_min.map(|min| min.as_secs_f64() * 1e3),
            drain_events: args.drain_events,
            partitions: args.partitions,
            keys: args.keys,
            server,
            document_locks,
        },
        writes: [vec![raw_insert], updates].concat(),
        latency_sweep,
        drain,
    })
}

/// Phase 3: updates without and with the outbox, alternating ABBA in slices of `D/4`.
/// Returns both rates, and the events and time of the with-outbox slices up to the
/// consumer's catching up.
async fn compare(b: &mut Bench<'_>) -> anyhow::Result<(Vec<WriteRate>, (u64, Duration))> {
    let slice = b.args.duration / 4;
    let mut runs: [(Vec<LoadResult>, Vec<Option<f64>>); 2] = Default::default();
    let (mut events, mut time) = (0u64, Duration::ZERO);
    for (n, outbox) in [false, true, true, false].into_iter().enumerate() {
        let write = if outbox { Write::UpdateWithOutbox } else { Write::Update };
        let label = format!("update {}/4 {} outbox", n + 1, if outbox { "with" } else { "without" });
        let (result, busy) = b.slice(&label, write, slice).await?;
        if outbox {
            let tail = b.catch_up().await?;
            events += result.committed;
            time += result.elapsed + tail;
        }
        let run = &mut runs[usize::from(outbox)];
        run.0.push(result);
        run.1.push(busy);
    }
    let [(plain, plain_busy), (with, with_busy)] = runs;
    let rates = vec![
        WriteRate::of("update_one", &plain, &plain_busy)?,
        WriteRate::of("update_with_events (1 event)", &with, &with_busy)?,
    ];
    Ok((rates, (events, time)))
}

/// Phase 4: write → consumer latency at fractions of the with-outbox update rate.
async fn latency_sweep(b: &mut Bench<'_>, max_rate: f64) -> anyhow::Result<Vec<LatencyPoint>> {
    b.relay.start()?;
    let mut sweep = Vec::with_capacity(SWEEP.len());
    for (fraction, share) in SWEEP {
        let duration = b.args.duration.mul_f64(share);
        let offered = max_rate * fraction;
        let label = format!("latency at {:.0} % ({offered:.0} ev/s)", fraction * 100.0);
        let bar = progress::timed(&label, duration);
        let acks: Acks = Arc::default();
        b.observer.start_recording();
        let before = cpu::sample(&[]);
        let result = b
            .writers
            .run(
                Write::UpdateWithOutbox,
                Some(offered),
                duration,
                None,
                Some(&acks),
                &bar,
            )
            .await?;
        let busy = cpu::busy_pct_since(before.as_ref());
        b.catch_up().await?;
        let sightings = b.observer.stop_recording();
        if (sightings.len() as u64) < result.committed {
            bail!(
                "{} events written at {label} but {} seen",
                result.committed,
                sightings.len()
            );
        }
        let acks = std::mem::take(&mut *acks.lock().map_err(|_| anyhow!("acknowledgement map poisoned"))?);
        let latencies = split_latencies(&acks, &sightings)?;
        let point = LatencyPoint::new(
            (fraction, offered, result.per_second()),
            &latencies,
            "consumer receipt, from the write's acknowledgement",
            busy,
        );
        progress::done(&bar, &label, &point.summary());
        sweep.push(point);
    }
    Ok(sweep)
}

/// Phase 5: the relay drains a backlog, between two runs of the raw producer.
async fn drain(b: &mut Bench<'_>) -> anyhow::Result<MongoDrain> {
    b.relay.stop().await?;
    let documents = b.args.drain_events.div_ceil(FILL_EVENTS_PER_DOC);
    let events = documents * FILL_EVENTS_PER_DOC;
    let label = "writing the backlog";
    let bar = progress::counted(label, events);
    let started = Instant::now();
    let counter = async {
        b.writers
            .run(
                Write::Fill,
                None,
                Duration::from_secs(86_400),
                Some(documents),
                None,
                &indicatif::ProgressBar::hidden(),
            )
            .await
    };
    let written = &b.writers.events_written;
    let base = written.load(Ordering::Acquire);
    let fill = sampling(counter, Duration::from_millis(200), async || {
        bar.set_position(written.load(Ordering::Acquire) - base);
        Ok(())
    })
    .await?;
    let fill_s = started.elapsed();
    progress::done(
        &bar,
        label,
        &format!(
            "{events} events in {} documents in {:.1} s ({:.0} documents/s through MongoOutbox)",
            fill.committed,
            fill_s.as_secs_f64(),
            fill.per_second()
        ),
    );

    let raw = RawProducer::new(
        b.brokers,
        &b.topics.raw,
        &b.writers.json,
        events,
        b.args.linger_ms.unwrap_or(PUBLISHER_LINGER_MS),
        &b.observer,
    )
    .await?;
    let before = raw.run_logged(&b.observer, 1, 2).await?;
    b.relay.start()?;
    let relay_s = time_drain(&b.observer, events, b.catch_up()).await?;
    let after = raw.run_logged(&b.observer, 2, 2).await?;
    let raw_consumed_s = vec![before.consumed.as_secs_f64(), after.consumed.as_secs_f64()];
    Ok(MongoDrain {
        backlog_events: events,
        fill_s: fill_s.as_secs_f64(),
        relay_s: relay_s.as_secs_f64(),
        raw_consumed_s,
    })
}
