//! The independent checker: reads the databases with SQL and the topics with its own
//! Kafka consumer — never through the code under test — and counts.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::PgPool;

use crate::model::{POISON_HEADER, REPLAY_HEADER};

/// What to check.
#[derive(Debug)]
pub(crate) struct CheckInput<'a> {
    /// The service database (committed events, the outbox).
    pub(crate) service: &'a PgPool,
    /// The consumer's database, when the scenario ran consumers.
    pub(crate) consumer: Option<&'a PgPool>,
    /// Kafka bootstrap servers.
    pub(crate) brokers: &'a str,
    /// The events topic.
    pub(crate) topic: &'a str,
    /// The consumers' dead-letter topic.
    pub(crate) dlq: Option<&'a str>,
    /// Id and key of each malformed record the harness produced straight to the topic.
    pub(crate) malformed: &'a [(String, String)],
}

/// The counts. Those listed by [`Counts::must_be_zero`] fail the run when they are not.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Counts {
    /// Events committed (rows of `committed_events`).
    pub(crate) committed: u64,
    /// Of those, committed after waiting before COMMIT.
    pub(crate) committed_late: u64,
    /// Transactions rolled back (their events must never appear).
    pub(crate) rolled_back: u64,
    /// Distinct committed events found on the topic.
    pub(crate) published_unique: u64,
    /// Records on the topic, duplicates and injected poison included.
    pub(crate) topic_records: u64,
    /// Records on the topic that repeat an event already there (at-least-once).
    pub(crate) topic_duplicates: u64,
    /// Records the harness published again on purpose, under fresh ids (the `replica`
    /// scenario's replayer); not counted as published events.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) replayed_records: u64,
    /// Committed, non-poison events not delivered: missing from the topic or, when
    /// consumers ran, never applied.
    pub(crate) lost: u64,
    /// Committed, non-poison events missing from the topic.
    pub(crate) lost_on_topic: u64,
    /// Committed, non-poison events never applied by the consumers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) lost_in_effects: Option<u64>,
    /// Sum of the order checks below.
    pub(crate) order_violations: u64,
    /// An event of an aggregate first appearing on the topic after a later one of the
    /// same aggregate.
    pub(crate) order_violations_topic: u64,
    /// An event first applied after a later one of the same aggregate.
    pub(crate) order_violations_applied: u64,
    /// Sequence numbers of an aggregate whose commit timestamps are not increasing.
    pub(crate) commit_order_violations: u64,
    /// Committed sequence numbers of an aggregate that are not exactly 1, 2, 3, ...
    pub(crate) committed_sequence_gaps: u64,
    /// Records whose `ce_sequence` differs from the sequence the writer's transaction saw.
    pub(crate) sequence_mismatches: u64,
    /// Aggregates found in more than one partition.
    pub(crate) key_partition_splits: u64,
    /// Rolled-back events found on the topic.
    pub(crate) rolled_back_published: u64,
    /// Records on the topic that are neither committed, rolled back nor injected.
    pub(crate) phantom_published: u64,
    /// Records without a `ce_id` that the harness did not inject.
    pub(crate) unidentified_records: u64,
    /// Committed events that took a lower outbox id than an event committed before
    /// them: each is a chance for a relay that trusts "last id" to skip it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) overtaken_commits: Option<u64>,
    /// Rows of `effects` (applications).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) effects_applied: Option<u64>,
    /// Applications beyond the first of one event.
    pub(crate) effect_duplicates: u64,
    /// Applications of events that were never committed.
    pub(crate) phantom_effects: u64,
    /// `effect_totals` disagreeing with the rows of `effects`.
    pub(crate) effect_counter_mismatch: u64,
    /// Outbox rows still waiting to be published after the run settled.
    pub(crate) outbox_pending: u64,
    /// Outbox rows parked.
    pub(crate) parked: u64,
    /// Poison records injected: oversize events through the outbox and malformed
    /// records straight to the topic.
    pub(crate) poison_injected: u64,
    /// Oversize events committed through the outbox.
    pub(crate) poison_oversize: u64,
    /// Malformed records produced to the topic.
    pub(crate) poison_malformed: u64,
    /// Injected records found parked in the outbox.
    pub(crate) poison_parked: u64,
    /// Injected records found on the dead-letter topic.
    pub(crate) poison_dead_lettered: u64,
    /// Injected records neither parked nor dead-lettered.
    pub(crate) poison_unaccounted: u64,
    /// Healthy events found on the dead-letter topic.
    pub(crate) healthy_dead_lettered: u64,
    /// Aggregates that carried a poison record (an oversize event or a malformed record).
    pub(crate) poisoned_keys: u64,
    /// Healthy events of those aggregates.
    pub(crate) poisoned_keys_events: u64,
    /// Of those, delivered (on the topic and, when consumers ran, applied).
    pub(crate) poisoned_keys_events_delivered: u64,
    /// Records on the dead-letter topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dlq_records: Option<u64>,
    /// Commit → broker append time of each event's first publication, median (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publish_latency_p50_ms: Option<i64>,
    /// The same, 99th percentile (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publish_latency_p99_ms: Option<i64>,
    /// The same, maximum (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publish_latency_max_ms: Option<i64>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl Counts {
    /// The counts that must be zero, with their values.
    pub(crate) fn must_be_zero(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("lost", self.lost),
            ("order_violations", self.order_violations),
            ("rolled_back_published", self.rolled_back_published),
            ("effect_duplicates", self.effect_duplicates),
            ("phantom_published", self.phantom_published),
            ("phantom_effects", self.phantom_effects),
            ("unidentified_records", self.unidentified_records),
            ("key_partition_splits", self.key_partition_splits),
            ("effect_counter_mismatch", self.effect_counter_mismatch),
            ("outbox_pending", self.outbox_pending),
            ("poison_unaccounted", self.poison_unaccounted),
            ("healthy_dead_lettered", self.healthy_dead_lettered),
        ]
    }
}

/// The counts, and the broker append times of every record on the topic (sorted, in
/// milliseconds since the epoch) for timing questions.
#[derive(Debug)]
pub(crate) struct Check {
    pub(crate) counts: Counts,
    pub(crate) append_times_ms: Vec<i64>,
    /// Each published event's commit time and its commit → append latency (the first
    /// record of it on the topic), both in milliseconds, sorted by commit time.
    pub(crate) latencies_by_commit_ms: Vec<(i64, i64)>,
}

impl Check {
    /// The first broker append time at or after `t`.
    pub(crate) fn first_append_at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = t.timestamp_millis();
        let i = self.append_times_ms.partition_point(|&a| a < t);
        self.append_times_ms
            .get(i)
            .and_then(|&ms| DateTime::from_timestamp_millis(ms))
    }
}

struct Committed {
    aggregate: String,
    sequence: i64,
    outbox_id: i64,
    commit: Option<DateTime<Utc>>,
    poison: bool,
}

/// One record as the checker sees it.
#[derive(Debug)]
struct Record {
    partition: i32,
    append_ms: Option<i64>,
    key: Option<String>,
    id: Option<String>,
    sequence: Option<i64>,
    poison: Option<String>,
    /// The original message's id, for a record the harness published again.
    replay: Option<String>,
}

/// Reads everything and counts.
pub(crate) async fn check(input: &CheckInput<'_>) -> Result<Check> {
    let mut c = Counts::default();

    // --- What was committed, in the service's database. --------------------------------
    type CommittedRow = (String, String, i64, i64, i32, Option<String>, Option<DateTime<Utc>>);
    let rows: Vec<CommittedRow> = sqlx::query_as(
        "select message_id, aggregate_id, sequence, outbox_id, late_ms, poison, pg_xact_commit_timestamp(xmin)
         from committed_events",
    )
    .fetch_all(input.service)
    .await
    .context("read committed_events")?;
    let mut committed: HashMap<String, Committed> = HashMap::with_capacity(rows.len());
    for (id, aggregate, sequence, outbox_id, late_ms, poison, commit) in rows {
        c.committed_late += u64::from(late_ms > 0);
        committed.insert(
            id,
            Committed {
                aggregate,
                sequence,
                outbox_id,
                commit,
                poison: poison.is_some(),
            },
        );
    }
    c.committed = committed.len() as u64;
    let rolled_back: HashSet<String> = sqlx::query_scalar("select message_id from rolled_back_events")
        .fetch_all(input.service)
        .await
        .context("read rolled_back_events")?
        .into_iter()
        .collect();
    c.rolled_back = rolled_back.len() as u64;
    check_commit_order(&committed, &mut c);

    let parked: HashSet<String> = sqlx::query_scalar("select message_id from dbps_outbox where parked_at is not null")
        .fetch_all(input.service)
        .await
        .context("read parked outbox rows")?
        .into_iter()
        .collect();
    c.parked = parked.len() as u64;
    let pending: i64 =
        sqlx::query_scalar("select count(*) from dbps_outbox where published_at is null and parked_at is null")
            .fetch_one(input.service)
            .await
            .context("count pending outbox rows")?;
    c.outbox_pending = u64::try_from(pending).unwrap_or(0);

    // --- The topic, read from the beginning with a consumer of our own. ------------------
    let records = read_topic(input.brokers, input.topic).await?;
    let mut append_times_ms: Vec<i64> = records.iter().filter_map(|r| r.append_ms).collect();
    append_times_ms.sort_unstable();
    let (published, mut latencies_by_commit_ms) = count_topic(&records, &committed, &rolled_back, &mut c);
    latencies_by_commit_ms.sort_unstable();
    let mut latencies: Vec<i64> = latencies_by_commit_ms.iter().map(|&(_, l)| l).collect();
    if !latencies.is_empty() {
        latencies.sort_unstable();
        let at = |q: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let i = ((latencies.len() - 1) as f64 * q).round() as usize;
            latencies[i]
        };
        c.publish_latency_p50_ms = Some(at(0.5));
        c.publish_latency_p99_ms = Some(at(0.99));
        c.publish_latency_max_ms = latencies.last().copied();
    }

    // --- The consumer's effects, in its own database. ------------------------------------
    let mut applied: Option<HashSet<String>> = None;
    if let Some(pool) = input.consumer {
        let rows: Vec<(String, String, Option<i64>)> =
            sqlx::query_as("select message_id, aggregate_id, sequence from effects order by id")
                .fetch_all(pool)
                .await
                .context("read effects")?;
        let seen = count_effects(rows, &committed, &mut c);
        let counted: i64 = sqlx::query_scalar("select coalesce(sum(applied), 0)::bigint from effect_totals")
            .fetch_one(pool)
            .await
            .context("read effect_totals")?;
        c.effect_counter_mismatch = u64::try_from(counted)
            .unwrap_or(0)
            .abs_diff(c.effects_applied.unwrap_or(0));
        applied = Some(seen);
    }

    // --- Dead letters and poison. --------------------------------------------------------
    let mut dead_ids: HashSet<String> = HashSet::new();
    let mut dead_poison: HashSet<String> = HashSet::new();
    if let Some(dlq) = input.dlq {
        let dead = read_topic(input.brokers, dlq).await?;
        c.dlq_records = Some(dead.len() as u64);
        for record in dead {
            if let Some(poison) = record.poison {
                dead_poison.insert(poison);
            } else if let Some(id) = record.id {
                if committed.get(&id).is_some_and(|e| !e.poison) {
                    c.healthy_dead_lettered += 1;
                }
                dead_ids.insert(id);
            }
        }
    }
    let mut poisoned_keys: HashSet<&str> = input.malformed.iter().map(|(_, key)| key.as_str()).collect();
    for (id, event) in &committed {
        if !event.poison {
            continue;
        }
        poisoned_keys.insert(&event.aggregate);
        c.poison_oversize += 1;
        if parked.contains(id) {
            c.poison_parked += 1;
        } else if dead_ids.contains(id) {
            c.poison_dead_lettered += 1;
        } else {
            c.poison_unaccounted += 1;
        }
    }
    for (id, _) in input.malformed {
        c.poison_malformed += 1;
        if dead_poison.contains(id) {
            c.poison_dead_lettered += 1;
        } else {
            c.poison_unaccounted += 1;
        }
    }
    c.poison_injected = c.poison_oversize + c.poison_malformed;

    // --- Loss. ----------------------------------------------------------------------------
    let mut lost_in_effects = 0;
    for (id, event) in &committed {
        if event.poison {
            continue;
        }
        let on_topic = published.contains(id.as_str());
        let was_applied = applied.as_ref().is_none_or(|a| a.contains(id));
        c.lost_on_topic += u64::from(!on_topic);
        lost_in_effects += u64::from(!was_applied);
        c.lost += u64::from(!on_topic || !was_applied);
        if poisoned_keys.contains(event.aggregate.as_str()) {
            c.poisoned_keys_events += 1;
            c.poisoned_keys_events_delivered += u64::from(on_topic && was_applied);
        }
    }
    c.poisoned_keys = poisoned_keys.len() as u64;
    if applied.is_some() {
        c.lost_in_effects = Some(lost_in_effects);
    }
    c.order_violations = c.order_violations_topic
        + c.order_violations_applied
        + c.commit_order_violations
        + c.committed_sequence_gaps
        + c.sequence_mismatches;
    Ok(Check {
        counts: c,
        append_times_ms,
        latencies_by_commit_ms,
    })
}

/// Counts what is on the topic: each committed event once, duplicates, order per
/// aggregate (by first appearance), events that must not be there. Returns the ids seen
/// and each event's commit time and commit → append latency, in milliseconds.
fn count_topic<'r>(
    records: &'r [Record],
    committed: &HashMap<String, Committed>,
    rolled_back: &HashSet<String>,
    c: &mut Counts,
) -> (HashSet<&'r str>, Vec<(i64, i64)>) {
    c.topic_records = records.len() as u64;
    let mut published: HashSet<&str> = HashSet::with_capacity(records.len());
    let mut highest: HashMap<&str, i64> = HashMap::new();
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut latencies: Vec<(i64, i64)> = Vec::new();
    for record in records {
        if record.poison.is_some() {
            continue;
        }
        if let Some(original) = record.replay.as_deref() {
            // Published again on purpose under a fresh id: the original must be a
            // committed event.
            c.replayed_records += 1;
            if !committed.contains_key(original) {
                c.phantom_published += 1;
            }
            continue;
        }
        let Some(id) = record.id.as_deref() else {
            c.unidentified_records += 1;
            continue;
        };
        if !published.insert(id) {
            // A repeat of an event already on the topic: at-least-once, allowed.
            c.topic_duplicates += 1;
            continue;
        }
        if rolled_back.contains(id) {
            c.rolled_back_published += 1;
            continue;
        }
        let Some(event) = committed.get(id) else {
            c.phantom_published += 1;
            continue;
        };
        c.published_unique += 1;
        if record.sequence != Some(event.sequence) || record.key.as_deref() != Some(event.aggregate.as_str()) {
            c.sequence_mismatches += 1;
        }
        let aggregate = event.aggregate.as_str();
        if *partition_of.entry(aggregate).or_insert(record.partition) != record.partition {
            c.key_partition_splits += 1;
        }
        let top = highest.entry(aggregate).or_insert(0);
        if event.sequence < *top {
            // First seen after a later event of its aggregate: out of order.
            c.order_violations_topic += 1;
        }
        *top = (*top).max(event.sequence);
        if let (Some(append), Some(commit)) = (record.append_ms, event.commit) {
            latencies.push((commit.timestamp_millis(), append - commit.timestamp_millis()));
        }
    }
    (published, latencies)
}

/// Counts the consumers' effects, in the order they were applied: duplicates, order per
/// aggregate (by first application), effects of events never committed. Returns the ids
/// applied.
fn count_effects(
    rows: Vec<(String, String, Option<i64>)>,
    committed: &HashMap<String, Committed>,
    c: &mut Counts,
) -> HashSet<String> {
    c.effects_applied = Some(rows.len() as u64);
    let mut seen: HashSet<String> = HashSet::with_capacity(rows.len());
    let mut highest: HashMap<String, i64> = HashMap::new();
    for (id, aggregate, sequence) in rows {
        if seen.contains(&id) {
            c.effect_duplicates += 1;
            continue;
        }
        if !committed.contains_key(&id) {
            c.phantom_effects += 1;
        }
        let sequence = sequence.unwrap_or(-1);
        let top = highest.entry(aggregate).or_insert(0);
        if sequence < *top {
            c.order_violations_applied += 1;
        }
        *top = (*top).max(sequence);
        seen.insert(id);
    }
    seen
}

/// Per aggregate, sequence numbers must be 1, 2, 3, ... and their commits must follow
/// each other in that order. Also counts commits overtaken by a higher outbox id.
fn check_commit_order(committed: &HashMap<String, Committed>, c: &mut Counts) {
    type Commits = Vec<(i64, Option<DateTime<Utc>>)>;
    let mut by_aggregate: HashMap<&str, Commits> = HashMap::new();
    for event in committed.values() {
        by_aggregate
            .entry(&event.aggregate)
            .or_default()
            .push((event.sequence, event.commit));
    }
    for events in by_aggregate.values_mut() {
        events.sort_unstable_by_key(|(sequence, _)| *sequence);
        for (i, (sequence, _)) in events.iter().enumerate() {
            if i64::try_from(i + 1).ok() != Some(*sequence) {
                c.committed_sequence_gaps += 1;
            }
        }
        for pair in events.windows(2) {
            if let ((_, Some(a)), (_, Some(b))) = (pair[0], pair[1])
                && b < a
            {
                c.commit_order_violations += 1;
            }
        }
    }
    // Walk from the highest outbox id down, remembering the earliest commit above.
    let mut by_id: Vec<(i64, Option<DateTime<Utc>>)> = committed.values().map(|e| (e.outbox_id, e.commit)).collect();
    if by_id.iter().all(|(_, commit)| commit.is_some()) {
        by_id.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
        let mut earliest_above: Option<DateTime<Utc>> = None;
        let mut overtaken = 0;
        for (_, commit) in by_id {
            let commit = commit.unwrap_or_default();
            if earliest_above.is_some_and(|e| e < commit) {
                overtaken += 1;
            }
            earliest_above = Some(earliest_above.map_or(commit, |e| e.min(commit)));
        }
        c.overtaken_commits = Some(overtaken);
    }
}

/// How many records a topic holds (high minus low watermark, over its partitions).
pub(crate) async fn topic_size(brokers: &str, topic: &str) -> Result<i64> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        const TIMEOUT: Duration = Duration::from_secs(10);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "dbps-chaos-watermarks")
            .create()
            .context("create watermark client")?;
        let metadata = consumer.fetch_metadata(Some(&topic), TIMEOUT)?;
        let mut size = 0;
        for t in metadata.topics() {
            for partition in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(&topic, partition.id(), TIMEOUT)?;
                size += high - low;
            }
        }
        Ok(size)
    })
    .await
    .context("watermark reader panicked")?
}

/// The `ce_id` of every record on a topic, in the order read (`None` for a record
/// without one).
pub(crate) async fn topic_ids(brokers: &str, topic: &str) -> Result<Vec<Option<String>>> {
    Ok(read_topic(brokers, topic).await?.into_iter().map(|r| r.id).collect())
}

/// Reads a topic from its low to its high watermark, every partition, with a consumer
/// of its own (no group offsets are used or committed).
async fn read_topic(brokers: &str, topic: &str) -> Result<Vec<Record>> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic_blocking(&brokers, &topic))
        .await
        .context("topic reader panicked")?
}

fn read_topic_blocking(brokers: &str, topic: &str) -> Result<Vec<Record>> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("dbps-chaos-checker-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .context("create checker consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("metadata of {topic}"))?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("topic {topic} not found");
    };
    if let Some(error) = meta.error() {
        bail!("topic {topic}: {error:?}");
    }
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in meta.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), TIMEOUT)
            .with_context(|| format!("watermarks of {topic}/{}", partition.id()))?;
        if high > low {
            ends.insert(partition.id(), high);
            assignment.add_partition_offset(topic, partition.id(), Offset::Offset(low))?;
        }
    }
    let expected: i64 = ends.values().sum();
    consumer.assign(&assignment).context("assign partitions")?;
    let mut records = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    let started = Instant::now();
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                let Some(&end) = ends.get(&message.partition()) else {
                    continue;
                };
                if message.offset() >= end {
                    continue;
                }
                if message.offset() + 1 >= end {
                    ends.remove(&message.partition());
                }
                records.push(record(&message));
                last_progress = Instant::now();
            }
            Some(Err(error)) => tracing::warn!(%error, "checker consumer error"),
            None => {}
        }
        if last_progress.elapsed() > Duration::from_secs(60) {
            bail!(
                "reading {topic} stalled after {} of about {expected} records ({:.0} s)",
                records.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(records)
}

fn record(message: &BorrowedMessage<'_>) -> Record {
    let mut id = None;
    let mut sequence = None;
    let mut poison = None;
    let mut replay = None;
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            let value = header.value.and_then(|v| std::str::from_utf8(v).ok());
            match header.key {
                "ce_id" => id = value.map(str::to_owned),
                "ce_sequence" => sequence = value.and_then(|v| v.parse().ok()),
                POISON_HEADER => poison = value.map(str::to_owned),
                REPLAY_HEADER => replay = value.map(str::to_owned),
                _ => {}
            }
        }
    }
    Record {
        partition: message.partition(),
        append_ms: message.timestamp().to_millis(),
        key: message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_owned),
        id,
        sequence,
        poison,
        replay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(ms)
    }

    /// Events `a-1`.. of aggregate `a` with sequences 1.. committed 10 ms apart, and the
    /// same for `b` (ids `b-1`..).
    fn committed() -> HashMap<String, Committed> {
        let mut map = HashMap::new();
        let mut outbox_id = 0;
        for aggregate in ["a", "b"] {
            for sequence in 1..=3 {
                outbox_id += 1;
                map.insert(
                    format!("{aggregate}-{sequence}"),
                    Committed {
                        aggregate: aggregate.to_owned(),
                        sequence,
                        outbox_id,
                        commit: at(outbox_id * 10),
                        poison: false,
                    },
                );
            }
        }
        map
    }

    fn record(id: &str) -> Record {
        let (aggregate, sequence) = id.split_once('-').unwrap_or((id, "0"));
        Record {
            partition: i32::from(aggregate == "b"),
            append_ms: Some(1000),
            key: Some(aggregate.to_owned()),
            id: Some(id.to_owned()),
            sequence: sequence.parse().ok(),
            poison: None,
            replay: None,
        }
    }

    fn topic(ids: &[&str]) -> Counts {
        let records: Vec<Record> = ids.iter().map(|id| record(id)).collect();
        let rolled_back: HashSet<String> = [String::from("a-9")].into();
        let mut c = Counts::default();
        let _ = count_topic(&records, &committed(), &rolled_back, &mut c);
        c
    }

    #[test]
    fn republished_tail_is_duplicates_not_disorder() {
        // A relay killed after the broker's ack but before marking sends 2 and 3 again.
        let c = topic(&["a-1", "b-1", "a-2", "a-3", "a-2", "a-3", "b-2", "b-3"]);
        assert_eq!(c.published_unique, 6);
        assert_eq!(c.topic_duplicates, 2);
        assert_eq!(c.order_violations_topic, 0);
        assert_eq!(c.sequence_mismatches, 0);
    }

    #[test]
    fn an_event_first_seen_after_a_later_one_is_a_violation() {
        let c = topic(&["a-1", "a-3", "a-2", "b-1", "b-2", "b-3"]);
        assert_eq!(c.order_violations_topic, 1);
        assert_eq!(c.published_unique, 6);
    }

    #[test]
    fn rolled_back_unknown_unidentified_and_moved_records_are_counted() {
        let mut no_id = record("a-1");
        no_id.id = None;
        let mut wrong_sequence = record("b-2");
        wrong_sequence.sequence = Some(7);
        let mut other_partition = record("b-3");
        other_partition.partition = 5;
        let mut injected = record("a-2");
        injected.poison = Some(String::from("p-1"));
        injected.id = None;
        let records = vec![
            record("a-1"),
            record("a-9"),
            record("zz-1"),
            no_id,
            record("b-1"),
            wrong_sequence,
            other_partition,
            injected,
        ];
        let rolled_back: HashSet<String> = [String::from("a-9")].into();
        let mut c = Counts::default();
        let (published, _) = count_topic(&records, &committed(), &rolled_back, &mut c);
        assert_eq!(c.rolled_back_published, 1);
        assert_eq!(c.phantom_published, 1);
        assert_eq!(c.unidentified_records, 1, "the injected record is not unidentified");
        assert_eq!(c.sequence_mismatches, 1);
        assert_eq!(c.key_partition_splits, 1);
        assert_eq!(c.published_unique, 4);
        assert!(!published.contains("a-2"));
    }

    #[test]
    fn replayed_records_are_neither_events_nor_disorder() {
        // a-1 published again after a-3 under a fresh id: counted as replayed, not as a
        // duplicate, a phantom or an order violation; a replay of an unknown event is a
        // phantom.
        let replay = |id: &str, original: &str| {
            let mut r = record(original);
            r.id = Some(id.to_owned());
            r.replay = Some(original.to_owned());
            r
        };
        let records = vec![
            record("a-1"),
            record("a-2"),
            record("a-3"),
            replay("r-1", "a-1"),
            replay("r-2", "zz-1"),
        ];
        let mut c = Counts::default();
        let (published, _) = count_topic(&records, &committed(), &HashSet::new(), &mut c);
        assert_eq!(c.replayed_records, 2);
        assert_eq!(c.published_unique, 3);
        assert_eq!(c.topic_duplicates, 0);
        assert_eq!(c.order_violations_topic, 0);
        assert_eq!(c.phantom_published, 1);
        assert!(!published.contains("r-1"));
    }

    #[test]
    fn effects_count_duplicates_and_order_of_first_application() {
        let row = |id: &str, sequence: i64| (id.to_owned(), id[..1].to_owned(), Some(sequence));
        let rows = vec![
            row("a-1", 1),
            row("a-2", 2),
            row("a-2", 2),
            row("b-2", 2),
            row("b-1", 1),
            row("x-1", 1),
        ];
        let mut c = Counts::default();
        let applied = count_effects(rows, &committed(), &mut c);
        assert_eq!(c.effects_applied, Some(6));
        assert_eq!(c.effect_duplicates, 1);
        assert_eq!(c.order_violations_applied, 1);
        assert_eq!(c.phantom_effects, 1);
        assert_eq!(applied.len(), 5);
    }

    #[test]
    fn committed_sequences_must_be_contiguous_and_follow_commit_order() {
        let mut events = committed();
        let mut c = Counts::default();
        check_commit_order(&events, &mut c);
        assert_eq!((c.committed_sequence_gaps, c.commit_order_violations), (0, 0));
        assert_eq!(c.overtaken_commits, Some(0));

        // a-2 commits after a-3, and b-3 goes missing: a gap.
        if let Some(event) = events.get_mut("a-2") {
            event.commit = at(35);
        }
        events.remove("b-3");
        let mut c = Counts::default();
        check_commit_order(&events, &mut c);
        assert_eq!(c.commit_order_violations, 1);
        assert_eq!(c.committed_sequence_gaps, 0, "a missing last sequence is not a gap");
        // a-2 (outbox id 2) committed after a-3 (outbox id 3): overtaken.
        assert_eq!(c.overtaken_commits, Some(1));

        events.remove("a-1");
        let mut c = Counts::default();
        check_commit_order(&events, &mut c);
        assert_eq!(
            c.committed_sequence_gaps, 2,
            "a starts at 2: both of its events are off"
        );
    }
}
