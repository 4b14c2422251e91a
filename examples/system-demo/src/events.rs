//! The messages that pass between the services, as a Kafka consumer of its own sees them.
//!
//! The watcher subscribes with a group of its own (new each run, reading from the end of
//! each topic), decodes each record as the services' consumers do and prints those that
//! belong to this run — their key (or correlation id) is an id the narrator has named —
//! as they arrive. Messages that arrive before their id is named wait until it is, so a
//! saga's first command is shown even when it overtakes the HTTP answer that names the
//! saga.
//!
//! It also tells when another service's consumer group has caught up on a topic (its
//! committed offsets reached the topic's end): the group's consumer commits only what it
//! applied, so a replica fed by the group holds everything published before.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dbps_core::kafka::TopicNaming;
use example_contracts::inventory::{PRODUCT_AGGREGATE, RESERVATION_AGGREGATE};
use example_contracts::services;
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, DefaultConsumerContext};
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use serde_json::Value;

use crate::out;
use crate::services::{Blamed as _, Svc};

/// How long the consumer may take to be assigned every partition.
const ASSIGN_DEADLINE: Duration = Duration::from_secs(60);
/// No message of the run for this long: the flow's messages have all passed.
const QUIET: Duration = Duration::from_millis(600);
/// The longest a flow waits for quiet.
const QUIET_AT_MOST: Duration = Duration::from_secs(5);

/// The most messages kept waiting (most of them of other runs, never named).
const MAX_WAITING: usize = 10_000;

/// A message of this run.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// The message's id (a notification's `Message-ID` is derived from its request's).
    pub(crate) id: String,
    pub(crate) topic: String,
    pub(crate) message_type: String,
    pub(crate) key: String,
    correlation: Option<String>,
    pub(crate) payload: Value,
}

#[derive(Debug, Default)]
struct State {
    /// Ids the narrator knows, and how it names them.
    names: HashMap<String, String>,
    /// Messages of this run, in the order they arrived.
    seen: Vec<Seen>,
    /// Messages not shown yet, in the order they arrived: those whose key is not (yet) a
    /// known id, and those that came while the narrator held the output.
    waiting: Vec<Seen>,
    /// While the narrator makes a call and shows it, messages wait (they are its effects
    /// and are shown after it).
    held: bool,
    /// When the last message of this run arrived.
    last: Option<Instant>,
}

impl State {
    fn known(&self, message: &Seen) -> bool {
        self.names.contains_key(&message.key)
            || message.correlation.as_ref().is_some_and(|c| self.names.contains_key(c))
    }

    fn name(&self, id: &str) -> String {
        self.names.get(id).cloned().unwrap_or_else(|| out::short(id))
    }

    /// Shows, in the order they came, the waiting messages of the run (unless the output
    /// is held).
    fn flush(&mut self) {
        if self.held {
            return;
        }
        let waiting = std::mem::take(&mut self.waiting);
        let (ours, others): (Vec<Seen>, Vec<Seen>) = waiting.into_iter().partition(|m| self.known(m));
        self.waiting = others;
        for message in ours {
            self.show(message);
        }
    }

    /// Prints a message of the run and keeps it.
    fn show(&mut self, message: Seen) {
        let key = self.name(&message.key);
        out::kafka(&message.topic, &message.message_type, &key, &self.describe(&message));
        self.seen.push(message);
        self.last = Some(Instant::now());
    }

    /// The interesting fields of a message, with ids replaced by their names.
    fn describe(&self, message: &Seen) -> String {
        let p = &message.payload;
        let text = |field: &str| p[field].as_str().unwrap_or_default().to_owned();
        let id = |field: &str| self.name(p[field].as_str().unwrap_or_default());
        let lines = |field: &str| {
            p[field]
                .as_array()
                .map(|lines| {
                    lines
                        .iter()
                        .map(|l| {
                            format!(
                                "{} x {}",
                                l["quantity"].as_i64().unwrap_or_default(),
                                self.name(l["product_id"].as_str().unwrap_or_default())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        let short_type = message.message_type.rsplit('.').next().unwrap_or_default();
        match short_type {
            "CustomerCreated" | "CustomerUpdated" => format!("name {:?} <{}>", text("name"), text("email")),
            "ProductChanged" => format!(
                "{}, {}",
                text("name"),
                out::money(p["unit_price_cents"].as_i64().unwrap_or(0))
            ),
            "StockLevelChanged" => format!("available {}", p["available"]),
            "QuoteCreated" | "StockReserved" => lines("lines"),
            "StockReservationFailed" => p["missing"]
                .as_array()
                .map(|missing| {
                    missing
                        .iter()
                        .map(|m| {
                            format!(
                                "{}: {} of {} available",
                                self.name(m["product_id"].as_str().unwrap_or_default()),
                                m["available"],
                                m["requested"]
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            "SalesRepNotificationRequested" => format!("to {}: {}", text("sales_rep"), self.rename(&text("reason"))),
            "ConfirmReservation" | "ReleaseReservation" | "CancelPurchaseOrder" | "ReservationConfirmed" => {
                format!("quote {}", id("quote_id"))
            }
            "CreatePurchaseOrder" => format!(
                "quote {}, {}",
                id("quote_id"),
                out::money(p["total_cents"].as_i64().unwrap_or_default())
            ),
            "PurchaseOrderCreated" => format!("quote {}, purchase order {}", id("quote_id"), id("purchase_order_id")),
            "PurchaseOrderRejected" | "ReservationNotConfirmed" => {
                format!("quote {}: {}", id("quote_id"), self.rename(&text("reason")))
            }
            "EmailAssigned" => format!("from {} to {}", text("address"), id("customer_id")),
            "QuoteStatusChanged" => match p["reason"].as_str() {
                Some(reason) => format!("{:?}: {}", text("status"), self.rename(reason)),
                None => format!("{:?}", text("status")),
            },
            _ => String::new(),
        }
    }

    /// `text` with every known id replaced by its name.
    fn rename(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (id, name) in &self.names {
            if text.contains(id.as_str()) {
                text = text.replace(id.as_str(), name);
            }
        }
        text
    }
}

/// The watcher: a consumer on its own thread, and what it saw.
#[derive(Debug)]
pub(crate) struct Watcher {
    brokers: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// How many partitions the consumer fetches from (their start offset is known).
    fetching: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The topics' naming: under `DBPS_TOPIC_PREFIX`, as the services name them.
fn naming() -> TopicNaming {
    let prefix = std::env::var("DBPS_TOPIC_PREFIX").unwrap_or_default();
    TopicNaming::new().with_prefix(prefix.trim())
}

/// The customer service's events topic, which the replicas follow.
pub(crate) fn customer_topic() -> anyhow::Result<String> {
    Ok(naming().events(services::CUSTOMER, "customer")?)
}

/// The topics of the example system.
pub(crate) fn topics() -> anyhow::Result<Vec<String>> {
    let naming = naming();
    Ok(vec![
        customer_topic()?,
        naming.events(services::QUOTE, example_contracts::quote::AGGREGATE)?,
        naming.events(services::INVENTORY, RESERVATION_AGGREGATE)?,
        naming.events(services::INVENTORY, PRODUCT_AGGREGATE)?,
        naming.commands(services::INVENTORY)?,
        naming.commands(services::PURCHASE_ORDER)?,
        naming.replies(services::QUOTE)?,
        naming.events(services::EMAIL, "email")?,
    ])
}

impl Watcher {
    /// Waits until the services created `topics`, subscribes to them in group `group`
    /// and waits until every partition is assigned and fetching from its end.
    pub(crate) async fn start(brokers: &str, group: &str, topics: &[String]) -> anyhow::Result<Self> {
        let fetching = Arc::new(AtomicUsize::new(0));
        let consumer: BaseConsumer<Watching> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("auto.offset.reset", "latest")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("statistics.interval.ms", "200")
            .create_with_context(Watching {
                fetching: Arc::clone(&fetching),
            })
            .context("creating the Kafka consumer")?;
        let consumer = Arc::new(consumer);
        // The services create their topics as their parts start, which may be a moment
        // after they answer `/health`; a subscription sees a topic created later only at
        // its next metadata refresh, so it waits for all of them.
        let partitions = {
            let consumer = Arc::clone(&consumer);
            let topics = topics.to_vec();
            tokio::task::spawn_blocking(move || count_partitions(&consumer, &topics)).await??
        };
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).context("subscribing")?;

        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (consumer, state, stop) = (Arc::clone(&consumer), Arc::clone(&state), Arc::clone(&stop));
            std::thread::Builder::new()
                .name(String::from("kafka-watcher"))
                .spawn(move || consume(&consumer, &state, &stop))?
        };
        let watcher = Self {
            brokers: brokers.to_owned(),
            state,
            stop,
            fetching,
            thread: Some(thread),
        };
        let deadline = Instant::now() + ASSIGN_DEADLINE;
        loop {
            let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
            if assigned >= partitions {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the Kafka consumer was assigned {assigned} of {partitions} partitions within {} s",
                    ASSIGN_DEADLINE.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A partition reads from its end once librdkafka looked the end up; a message
        // written before that would be missed, so the first flow waits for every partition
        // to be fetching (librdkafka's statistics say so).
        loop {
            let fetching = watcher.fetching.load(Ordering::Relaxed);
            if fetching >= partitions {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the Kafka consumer fetches {fetching} of its {partitions} partitions after {} s",
                    ASSIGN_DEADLINE.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        out::action(
            "kafka",
            &format!("watching {} topics", topics.len()),
            &format!("group {group}, {partitions} partitions assigned"),
        );
        Ok(watcher)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Names an id: messages keyed by it (or correlated to it) belong to this run and are
    /// shown with the name. Those that already came are shown now (or when the output is
    /// released).
    pub(crate) fn name(&self, id: impl ToString, name: impl Into<String>) {
        let mut state = self.lock();
        state.names.insert(id.to_string(), name.into());
        state.flush();
    }

    /// Holds the messages that arrive from now until the guard is dropped: the narrator
    /// shows a call first, then the messages it caused.
    pub(crate) fn hold(&self) -> Held {
        self.lock().held = true;
        Held {
            state: Arc::clone(&self.state),
        }
    }

    /// Where the messages of a flow begin: for [`Watcher::expect`].
    pub(crate) fn mark(&self) -> usize {
        self.lock().seen.len()
    }

    /// The name of an id, or its short form.
    pub(crate) fn named(&self, id: &str) -> String {
        self.lock().name(id)
    }

    /// `text` with every known id replaced by its name.
    pub(crate) fn rename(&self, text: &str) -> String {
        self.lock().rename(text)
    }

    /// Waits until a message of each `(type, key)` passed since `mark`. On failure, names
    /// the service that should have sent the first missing one.
    pub(crate) async fn expect(&self, mark: usize, wanted: &[(&str, &str)], within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let missing: Vec<(String, String)> = {
                let state = self.lock();
                wanted
                    .iter()
                    .filter(|(kind, key)| {
                        !state.seen[mark.min(state.seen.len())..]
                            .iter()
                            .any(|m| m.message_type == *kind && m.key == *key)
                    })
                    .map(|(kind, key)| ((*kind).to_owned(), state.name(key)))
                    .collect()
            };
            let Some((kind, key)) = missing.first() else {
                return Ok(());
            };
            if Instant::now() > deadline {
                let list: Vec<String> = missing.iter().map(|(k, n)| format!("{k} ({n})")).collect();
                let sender = wanted
                    .iter()
                    .find(|(k, _)| k == kind)
                    .map_or(Svc::Quote, |(k, _)| sender(k));
                return Err(anyhow::anyhow!(
                    "no {kind} message for {key} within {} s (missing: {})",
                    within.as_secs(),
                    list.join(", ")
                ))
                .blame(sender);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The messages of the run so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Waits until no message of this run came for a moment, so that the stragglers of a
    /// flow are shown under it, not under the next heading.
    pub(crate) async fn settle(&self) {
        let started = Instant::now();
        loop {
            let last = self.lock().last;
            let quiet = last.is_none_or(|at| at.elapsed() >= QUIET);
            if quiet && started.elapsed() >= QUIET || started.elapsed() >= QUIET_AT_MOST {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until consumer group `group` (another service's) has committed, on every
    /// partition of `topic`, the offsets the topic ends at now: everything published to the
    /// topic so far has been applied by that consumer. Returns how long it took.
    pub(crate) async fn caught_up(&self, group: &str, topic: &str, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let client: BaseConsumer<DefaultConsumerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .context("creating a Kafka client to read committed offsets")?;
        let client = Arc::new(client);
        let ends = {
            let (client, topic) = (Arc::clone(&client), topic.to_owned());
            tokio::task::spawn_blocking(move || high_watermarks(&client, &topic)).await??
        };
        loop {
            let behind = {
                let (client, topic, ends) = (Arc::clone(&client), topic.to_owned(), ends.clone());
                tokio::task::spawn_blocking(move || behind(&client, &topic, &ends)).await??
            };
            if behind == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!(
                    "group {group} is still {behind} message(s) behind on {topic} after {} s",
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the consumer.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The consumer's context: counts, from librdkafka's statistics, the partitions it fetches.
struct Watching {
    fetching: Arc<AtomicUsize>,
}

impl ClientContext for Watching {
    fn stats(&self, statistics: Statistics) {
        let fetching = statistics
            .topics
            .values()
            .flat_map(|topic| topic.partitions.values())
            .filter(|p| p.partition >= 0 && p.fetch_state == "active")
            .count();
        self.fetching.store(fetching, Ordering::Relaxed);
    }
}

impl ConsumerContext for Watching {}

/// Waits until every topic exists; returns how many partitions they have in all.
fn count_partitions(consumer: &BaseConsumer<Watching>, topics: &[String]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + ASSIGN_DEADLINE;
    loop {
        let mut total = 0;
        let mut missing = Vec::new();
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .with_context(|| format!("reading the metadata of {topic}"))?;
            match metadata.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => total += t.partitions().len(),
                _ => missing.push(topic.as_str()),
            }
        }
        if missing.is_empty() {
            return Ok(total);
        }
        if Instant::now() > deadline {
            bail!(
                "the services did not create {} within {} s",
                missing.join(", "),
                ASSIGN_DEADLINE.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long a Kafka read that failed transiently (a leader not known yet, a coordinator
/// moving) is asked again before the demo gives up.
const RETRY_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `read` until it succeeds, fails permanently or [`RETRY_DEADLINE`] passes.
fn retrying<T>(
    what: impl Fn() -> String,
    read: impl Fn() -> Result<T, rdkafka::error::KafkaError>,
) -> anyhow::Result<T> {
    use dbps_core::classify::Classify as _;
    let deadline = Instant::now() + RETRY_DEADLINE;
    loop {
        match read() {
            Err(error) if error.is_transient() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            read => return read.with_context(what),
        }
    }
}

/// The end (offset of the next record) of each partition of `topic`.
fn high_watermarks(client: &BaseConsumer<DefaultConsumerContext>, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let metadata = retrying(
        || format!("reading the metadata of {topic}"),
        || client.fetch_metadata(Some(topic), Duration::from_secs(10)),
    )?;
    let mut ends = BTreeMap::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (_, high) = retrying(
            || format!("reading the end of {topic}/{}", partition.id()),
            || client.fetch_watermarks(topic, partition.id(), Duration::from_secs(10)),
        )?;
        ends.insert(partition.id(), high);
    }
    Ok(ends)
}

/// How many messages before `ends` the group's committed offsets of `topic` are.
fn behind(
    client: &BaseConsumer<DefaultConsumerContext>,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
) -> anyhow::Result<i64> {
    let mut list = TopicPartitionList::new();
    for partition in ends.keys() {
        list.add_partition(topic, *partition);
    }
    let committed = retrying(
        || format!("reading the committed offsets on {topic}"),
        || client.committed_offsets(list.clone(), Duration::from_secs(10)),
    )?;
    Ok(ends
        .iter()
        .map(|(partition, end)| {
            let at = committed
                .find_partition(topic, *partition)
                .and_then(|p| p.offset().to_raw())
                .filter(|offset| *offset >= 0)
                .unwrap_or(0);
            (end - at).max(0)
        })
        .sum())
}

/// Holds the watcher's output while it lives (see [`Watcher::hold`]).
#[derive(Debug)]
pub(crate) struct Held {
    state: Arc<Mutex<State>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.held = false;
        state.flush();
    }
}

/// The service that sends messages of this type (the quote service sends the commands of
/// its sagas; a reply's type names the participant that answered).
fn sender(message_type: &str) -> Svc {
    match message_type.split('.').next().unwrap_or_default() {
        "customer" => Svc::Customer,
        "inventory"
            if matches!(
                message_type,
                "inventory.ConfirmReservation" | "inventory.ReleaseReservation"
            ) =>
        {
            Svc::Quote
        }
        "inventory" => Svc::Inventory,
        "purchase_order"
            if matches!(
                message_type,
                "purchase_order.CreatePurchaseOrder" | "purchase_order.CancelPurchaseOrder"
            ) =>
        {
            Svc::Quote
        }
        "purchase_order" => Svc::PurchaseOrder,
        "email" => Svc::Email,
        _ => Svc::Quote,
    }
}

/// The consumer's loop: decode, keep and show the messages of this run.
fn consume(consumer: &BaseConsumer<Watching>, state: &Mutex<State>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let Ok(record) = result else {
            // Transient consumer errors (a broker reconnecting) are retried by librdkafka.
            continue;
        };
        let record = record.detach();
        let Ok(envelope) = dbps_core::kafka::decode_record(&record) else {
            continue;
        };
        let message = Seen {
            id: envelope.id.clone(),
            topic: record.topic().to_owned(),
            message_type: envelope.message_type.clone(),
            key: envelope.aggregate_id.clone(),
            correlation: envelope.correlation_id.clone(),
            payload: serde_json::from_str(envelope.payload_json()).unwrap_or(Value::Null),
        };
        let mut state = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.waiting.len() >= MAX_WAITING {
            // Messages of other runs, never named: the oldest go.
            state.waiting.drain(..MAX_WAITING / 10);
        }
        state.waiting.push(message);
        state.flush();
    }
}
