//! The `saga-kill` scenario's checker. Like the other checks it uses none of the code
//! under test: it reads the four databases with SQL (`quotes`, `dbps_saga_instances`,
//! `dbps_saga_history`, each participant's `effects` and live tables, the outboxes and
//! inboxes) and the topics with its own Kafka consumer, and knows the saga's rules only
//! from the scenario's own description of its steps (`saga::STEPS`).

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::checker::topic_ids;
use crate::saga::{COMPENSATION_ATTEMPTS, INITIAL_STOCK, Intent, STEPS, StepSpec};

/// The reply a participant sends when it compensated a step.
const COMPENSATED: &str = "reply dbps.saga.Compensated";
/// The reply a participant sends when it could not compensate a step yet.
const COMPENSATION_FAILED: &str = "reply dbps.saga.CompensationFailed";

/// The databases and topics of a run.
#[derive(Debug)]
pub(crate) struct SagaCheckInput<'a> {
    /// The orchestrating service's database.
    pub(crate) quote: &'a PgPool,
    /// Each participant's name, database and command topic, in step order.
    pub(crate) participants: Vec<(&'a str, &'a PgPool, &'a str)>,
    /// The orchestrator's reply topic.
    pub(crate) replies: &'a str,
    /// The dead-letter topic every consumer group uses.
    pub(crate) dlq: &'a str,
    /// Kafka bootstrap servers.
    pub(crate) brokers: &'a str,
}

/// The counts. Those listed by [`SagaCounts::must_be_zero`] fail the run when they are not.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct SagaCounts {
    /// Quotes committed, each with the saga started in its transaction.
    pub(crate) sagas_started: u64,
    /// Saga instances.
    pub(crate) instances: u64,
    /// Quotes without their saga, and sagas without their quote.
    pub(crate) unmatched_quotes: u64,
    pub(crate) completed: u64,
    pub(crate) compensated: u64,
    /// Compensated sagas by what made them compensate: `refused at <step>`,
    /// `timeout at <step>`.
    pub(crate) compensated_by: BTreeMap<String, u64>,
    pub(crate) running: u64,
    pub(crate) compensating: u64,
    pub(crate) stuck: u64,
    /// Stuck sagas by their last error.
    pub(crate) stuck_reasons: BTreeMap<String, u64>,
    /// Sagas neither completed nor compensated after the run settled (running,
    /// compensating or stuck).
    pub(crate) not_terminal: u64,
    /// Per intent (how the saga was meant to end), how it ended.
    pub(crate) outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    /// Sagas that ended in a way their intent rules out: a refused or unanswered saga
    /// completed, or a saga refused at a step that never refuses it.
    pub(crate) impossible_outcomes: u64,
    /// Rows of `dbps_saga_history`.
    pub(crate) transitions: u64,
    /// Transitions caused by a reply.
    pub(crate) reply_transitions: u64,
    /// Transitions caused by a deadline.
    pub(crate) timeout_transitions: u64,
    /// Compensations sent again (after a timeout or a refusal).
    pub(crate) compensation_retries: u64,
    /// A transition that happened twice: a message that moved a saga twice (or two
    /// sagas), a second terminal transition, or a transition repeated where the machine
    /// allows it once.
    pub(crate) double_transitions: u64,
    /// Transitions that do not follow from the one before by the saga's rules.
    pub(crate) invalid_transitions: u64,
    /// Sagas whose history does not end in their current state.
    pub(crate) history_state_mismatch: u64,
    /// Replies the orchestrator's inbox took.
    pub(crate) replies_received: u64,
    /// Of those, replies that moved no saga (late, or for a saga that had moved on).
    pub(crate) late_replies: u64,
    /// Rows of the participants' `effects`.
    pub(crate) effects: u64,
    /// Steps applied and compensations that undid something, beyond the first for one
    /// saga and step.
    pub(crate) double_effects: u64,
    /// Compensated sagas that left something behind: a step applied more often than
    /// undone, or a live row (reservation, purchase order, bill).
    pub(crate) uncompensated: u64,
    /// The same, per step.
    pub(crate) uncompensated_steps: BTreeMap<String, u64>,
    /// Completed sagas whose steps are not each applied once and kept.
    pub(crate) completed_incomplete: u64,
    /// Units of stock missing or extra: the stock taken from the items against the
    /// reservations that exist.
    pub(crate) stock_mismatch: u64,
    /// Effects of sagas that do not exist.
    pub(crate) phantom_effects: u64,
    /// Compensations that undid a step.
    pub(crate) undone: u64,
    /// Compensations that found nothing to undo (the step never happened).
    pub(crate) nothing_to_undo: u64,
    /// Bills applied without a reply, and bills ignored, as the sagas asked.
    pub(crate) bills_unanswered: u64,
    /// Commands the orchestrator enqueued, and replies the participants enqueued.
    pub(crate) commands_enqueued: u64,
    pub(crate) replies_enqueued: u64,
    /// Records on the command and reply topics.
    pub(crate) topic_records: u64,
    /// Records that repeat one already there (at-least-once).
    pub(crate) topic_duplicates: u64,
    /// Enqueued messages missing from their topic.
    pub(crate) lost: u64,
    /// Records on the topics that no outbox enqueued.
    pub(crate) phantom_published: u64,
    /// Messages on their topic that the consumer's inbox never took.
    pub(crate) unapplied: u64,
    /// Outbox rows not yet published, in the four databases.
    pub(crate) outbox_pending: u64,
    /// Outbox rows parked.
    pub(crate) parked: u64,
    /// Records on the dead-letter topic.
    pub(crate) dead_lettered: u64,
    /// Start to end of completed sagas (ms): median, 99th percentile, maximum.
    pub(crate) completed_ms_p50: Option<i64>,
    pub(crate) completed_ms_p99: Option<i64>,
    pub(crate) completed_ms_max: Option<i64>,
    /// The same for compensated sagas.
    pub(crate) compensated_ms_p50: Option<i64>,
    pub(crate) compensated_ms_p99: Option<i64>,
    pub(crate) compensated_ms_max: Option<i64>,
}

impl SagaCounts {
    /// The counts that must be zero, with their values.
    pub(crate) fn must_be_zero(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("not_terminal", self.not_terminal),
            ("double_effects", self.double_effects),
            ("uncompensated", self.uncompensated),
            ("double_transitions", self.double_transitions),
            ("invalid_transitions", self.invalid_transitions),
            ("history_state_mismatch", self.history_state_mismatch),
            ("completed_incomplete", self.completed_incomplete),
            ("impossible_outcomes", self.impossible_outcomes),
            ("stock_mismatch", self.stock_mismatch),
            ("phantom_effects", self.phantom_effects),
            ("unmatched_quotes", self.unmatched_quotes),
            ("lost", self.lost),
            ("phantom_published", self.phantom_published),
            ("unapplied", self.unapplied),
            ("outbox_pending", self.outbox_pending),
            ("parked", self.parked),
            ("dead_lettered", self.dead_lettered),
        ]
    }

    /// Name and printed value of every count, in table order.
    pub(crate) fn rows(&self) -> Vec<(String, String)> {
        let ms = |v: Option<i64>| v.map_or_else(|| String::from("-"), |v| format!("{v} ms"));
        let mut rows: Vec<(String, String)> = vec![
            ("sagas_started".into(), self.sagas_started.to_string()),
            ("instances".into(), self.instances.to_string()),
            ("unmatched_quotes".into(), self.unmatched_quotes.to_string()),
            ("completed".into(), self.completed.to_string()),
            ("compensated".into(), self.compensated.to_string()),
        ];
        for (cause, n) in &self.compensated_by {
            rows.push((format!("  {cause}"), n.to_string()));
        }
        rows.extend([
            ("running".into(), self.running.to_string()),
            ("compensating".into(), self.compensating.to_string()),
            ("stuck".into(), self.stuck.to_string()),
        ]);
        for (reason, n) in &self.stuck_reasons {
            rows.push((format!("  {reason}"), n.to_string()));
        }
        let plain = |name: &str, value: String| (name.to_owned(), value);
        rows.extend([
            plain("not_terminal", self.not_terminal.to_string()),
            plain("impossible_outcomes", self.impossible_outcomes.to_string()),
            plain("transitions", self.transitions.to_string()),
            plain("reply_transitions", self.reply_transitions.to_string()),
            plain("timeout_transitions", self.timeout_transitions.to_string()),
            plain("compensation_retries", self.compensation_retries.to_string()),
            plain("double_transitions", self.double_transitions.to_string()),
            plain("invalid_transitions", self.invalid_transitions.to_string()),
            plain("history_state_mismatch", self.history_state_mismatch.to_string()),
            plain("replies_received", self.replies_received.to_string()),
            plain("late_replies", self.late_replies.to_string()),
            plain("effects", self.effects.to_string()),
            plain("double_effects", self.double_effects.to_string()),
            plain("uncompensated", self.uncompensated.to_string()),
        ]);
        for (step, n) in &self.uncompensated_steps {
            rows.push((format!("  {step}"), n.to_string()));
        }
        rows.extend([
            plain("completed_incomplete", self.completed_incomplete.to_string()),
            plain("stock_mismatch", self.stock_mismatch.to_string()),
            plain("phantom_effects", self.phantom_effects.to_string()),
            plain("undone", self.undone.to_string()),
            plain("nothing_to_undo", self.nothing_to_undo.to_string()),
            plain("bills_unanswered", self.bills_unanswered.to_string()),
            plain("commands_enqueued", self.commands_enqueued.to_string()),
            plain("replies_enqueued", self.replies_enqueued.to_string()),
            plain("topic_records", self.topic_records.to_string()),
            plain("topic_duplicates", self.topic_duplicates.to_string()),
            plain("lost", self.lost.to_string()),
            plain("phantom_published", self.phantom_published.to_string()),
            plain("unapplied", self.unapplied.to_string()),
            plain("outbox_pending", self.outbox_pending.to_string()),
            plain("parked", self.parked.to_string()),
            plain("dead_lettered", self.dead_lettered.to_string()),
            plain("completed_ms_p50", ms(self.completed_ms_p50)),
            plain("completed_ms_p99", ms(self.completed_ms_p99)),
            plain("completed_ms_max", ms(self.completed_ms_max)),
            plain("compensated_ms_p50", ms(self.compensated_ms_p50)),
            plain("compensated_ms_p99", ms(self.compensated_ms_p99)),
            plain("compensated_ms_max", ms(self.compensated_ms_max)),
        ]);
        rows
    }
}

// ---------------------------------------------------------------------------------------
// The history, walked by the saga's rules
// ---------------------------------------------------------------------------------------

/// One row of `dbps_saga_history`.
#[derive(Debug, Clone)]
pub(crate) struct Transition {
    pub(crate) step: i32,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) cause: String,
    pub(crate) message_id: Option<String>,
}

/// What the walk of one saga's history found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Walk {
    pub(crate) double: u64,
    pub(crate) invalid: u64,
    /// The state the history ends in.
    pub(crate) end: String,
    /// What made the saga compensate: `refused at <step>` or `timeout at <step>`.
    pub(crate) compensated_by: Option<String>,
    pub(crate) compensation_retries: u64,
    pub(crate) replies: u64,
    pub(crate) timeouts: u64,
}

fn terminal(state: &str) -> bool {
    matches!(state, "completed" | "compensated")
}

fn reply(message_type: &str) -> String {
    format!("reply {message_type}")
}

/// Whether `t` may follow a saga at `state`, `step`, `attempt` (of the compensation of
/// that step) by the saga's rules: steps run in order; a refusal compensates the steps
/// before the refusing one, newest first; a timeout (no step is sent again) compensates
/// the timed-out step and those before it; a compensation is acknowledged, or sent again
/// until `attempts` sends, then the saga is stuck.
fn allowed(steps: &[StepSpec], attempts: u32, state: &str, step: i32, attempt: u32, t: &Transition) -> bool {
    let last = i32::try_from(steps.len()).unwrap_or(i32::MAX) - 1;
    let spec = usize::try_from(step).ok().and_then(|s| steps.get(s));
    let by_reply = t.message_id.is_some() && t.cause.starts_with("reply ");
    let by_timeout = t.message_id.is_none() && t.cause == "timeout";
    let success = spec.is_some_and(|s| t.cause == reply(s.success)) && by_reply;
    let refused = spec.is_some_and(|s| s.failure.is_some_and(|f| t.cause == reply(f))) && by_reply;
    let acknowledged = t.cause == COMPENSATED && by_reply;
    let not_acknowledged = (t.cause == COMPENSATION_FAILED && by_reply) || by_timeout;
    match (state, t.to.as_str()) {
        ("new", "running") => t.step == 0 && t.cause == "started" && t.message_id.is_none(),
        ("running", "running") => success && step < last && t.step == step + 1,
        ("running", "completed") => success && step == last && t.step == step,
        ("running", "compensating") => (refused && step >= 1 && t.step == step - 1) || (by_timeout && t.step == step),
        ("running", "compensated") => refused && step == 0 && t.step == 0,
        ("compensating", "compensating") => {
            (acknowledged && step >= 1 && t.step == step - 1)
                || (not_acknowledged && t.step == step && attempt + 1 < attempts)
        }
        ("compensating", "compensated") => acknowledged && step == 0 && t.step == 0,
        ("compensating", "stuck") => not_acknowledged && t.step == step && attempt + 1 >= attempts,
        _ => false,
    }
}

/// Walks one saga's history, oldest first. Each row counts once at most: as a double
/// (a message id seen before, a second terminal transition, or a row repeated that the
/// machine allows once), else as invalid if it does not follow from the row before.
pub(crate) fn walk(history: &[Transition], steps: &[StepSpec], attempts: u32, ids: &mut HashSet<String>) -> Walk {
    let mut w = Walk {
        end: String::from("new"),
        ..Walk::default()
    };
    let mut step = -1;
    let mut attempt = 0;
    let mut terminals = 0;
    let mut rows: HashSet<(i32, &str, &str, &str)> = HashSet::new();
    for t in history {
        let repeatable = t.from == "compensating" && t.to == "compensating" && t.step == step;
        let seen_id = t.message_id.as_ref().is_some_and(|id| !ids.insert(id.clone()));
        let seen_row = !rows.insert((t.step, &t.from, &t.to, &t.cause)) && !repeatable;
        terminals += u32::from(terminal(&t.to));
        if seen_id || seen_row || (terminal(&t.to) && terminals > 1) {
            w.double += 1;
        } else if t.from != w.end || !allowed(steps, attempts, &w.end, step, attempt, t) {
            w.invalid += 1;
        }
        if t.message_id.is_some() {
            w.replies += 1;
        } else if t.cause == "timeout" {
            w.timeouts += 1;
        }
        if w.end == "running" && (t.to == "compensating" || t.to == "compensated") && w.compensated_by.is_none() {
            let name = usize::try_from(step)
                .ok()
                .and_then(|s| steps.get(s))
                .map_or("?", |s| s.name);
            let why = if t.cause == "timeout" { "timeout" } else { "refused" };
            w.compensated_by = Some(format!("{why} at {name}"));
        }
        if repeatable {
            attempt += 1;
            w.compensation_retries += 1;
        } else {
            attempt = 0;
        }
        step = t.step;
        w.end.clone_from(&t.to);
    }
    w
}

// ---------------------------------------------------------------------------------------
// Effects
// ---------------------------------------------------------------------------------------

/// What the participants did for one saga and step.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepEffects {
    pub(crate) done: u32,
    pub(crate) undone: u32,
    pub(crate) nothing: u32,
    pub(crate) refused: u32,
    pub(crate) ignored: u32,
    /// Whether the step's live row (reservation, purchase order, bill) exists.
    pub(crate) live: bool,
}

/// Per saga, per step (in `STEPS` order).
pub(crate) type Effects = HashMap<String, [StepEffects; 3]>;

/// Counts double effects, what compensated sagas left behind, and completed sagas whose
/// effects are not each applied once and kept.
pub(crate) fn judge_effects(effects: &Effects, states: &HashMap<String, String>, c: &mut SagaCounts) {
    for (saga, steps) in effects {
        for s in steps {
            c.double_effects += u64::from(s.done.saturating_sub(1)) + u64::from(s.undone.saturating_sub(1));
            c.undone += u64::from(s.undone);
            c.nothing_to_undo += u64::from(s.nothing);
        }
        match states.get(saga).map(String::as_str) {
            None => c.phantom_effects += 1,
            Some("compensated") => {
                let mut left = false;
                for (spec, s) in STEPS.iter().zip(steps) {
                    if s.done > s.undone || s.live {
                        left = true;
                        *c.uncompensated_steps.entry(spec.name.to_owned()).or_default() += 1;
                    }
                }
                c.uncompensated += u64::from(left);
            }
            Some("completed") => {
                c.completed_incomplete += u64::from(!steps.iter().all(|s| s.done == 1 && s.undone == 0 && s.live));
            }
            Some(_) => {}
        }
    }
    // A completed saga with no effect at all.
    c.completed_incomplete += states
        .iter()
        .filter(|(saga, state)| *state == "completed" && !effects.contains_key(*saga))
        .count() as u64;
}

// ---------------------------------------------------------------------------------------
// Reading and counting
// ---------------------------------------------------------------------------------------

type InstanceRow = (
    Uuid,
    String,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
);

/// Reads everything and counts.
pub(crate) async fn check(input: &SagaCheckInput<'_>) -> Result<SagaCounts> {
    let mut c = SagaCounts::default();
    let quote = input.quote;

    // --- Sagas and quotes. ----------------------------------------------------------------
    let instances: Vec<InstanceRow> = sqlx::query_as(
        "select id, state, data->>'intent', last_error, created_at, updated_at from dbps_saga_instances",
    )
    .fetch_all(quote)
    .await
    .context("read dbps_saga_instances")?;
    c.instances = instances.len() as u64;
    let quotes: Vec<(Uuid, String)> = sqlx::query_as("select saga_id, intent from quotes")
        .fetch_all(quote)
        .await
        .context("read quotes")?;
    c.sagas_started = quotes.len() as u64;
    let intent_of: HashMap<Uuid, String> = quotes.into_iter().collect();
    let mut states: HashMap<String, String> = HashMap::with_capacity(instances.len());
    let (mut completed_ms, mut compensated_ms) = (Vec::new(), Vec::new());
    for (id, state, intent, last_error, created, updated) in &instances {
        match state.as_str() {
            "completed" => {
                c.completed += 1;
                completed_ms.push((*updated - *created).num_milliseconds());
            }
            "compensated" => {
                c.compensated += 1;
                compensated_ms.push((*updated - *created).num_milliseconds());
            }
            "running" => c.running += 1,
            "compensating" => c.compensating += 1,
            "stuck" => {
                c.stuck += 1;
                let reason = last_error.clone().unwrap_or_else(|| String::from("(no error)"));
                *c.stuck_reasons.entry(reason).or_default() += 1;
            }
            _ => {}
        }
        if intent_of.get(id) != intent.as_ref() {
            c.unmatched_quotes += 1;
        }
        states.insert(id.to_string(), state.clone());
    }
    c.unmatched_quotes += intent_of
        .keys()
        .filter(|id| !states.contains_key(&id.to_string()))
        .count() as u64;
    c.not_terminal = c.running + c.compensating + c.stuck;
    (c.completed_ms_p50, c.completed_ms_p99, c.completed_ms_max) = percentiles(&mut completed_ms);
    (c.compensated_ms_p50, c.compensated_ms_p99, c.compensated_ms_max) = percentiles(&mut compensated_ms);

    // --- The history. ---------------------------------------------------------------------
    let rows: Vec<(Uuid, i32, String, String, String, Option<String>)> = sqlx::query_as(
        "select saga_id, step, from_state, to_state, cause, message_id from dbps_saga_history order by saga_id, id",
    )
    .fetch_all(quote)
    .await
    .context("read dbps_saga_history")?;
    c.transitions = rows.len() as u64;
    let mut histories: HashMap<Uuid, Vec<Transition>> = HashMap::new();
    for (saga, step, from, to, cause, message_id) in rows {
        histories.entry(saga).or_default().push(Transition {
            step,
            from,
            to,
            cause,
            message_id,
        });
    }
    let mut ids = HashSet::new();
    let mut caused_by: HashMap<Uuid, Option<String>> = HashMap::new();
    for (id, state, ..) in &instances {
        let history = histories.remove(id).unwrap_or_default();
        let w = walk(&history, &STEPS, COMPENSATION_ATTEMPTS, &mut ids);
        c.double_transitions += w.double;
        c.invalid_transitions += w.invalid;
        c.reply_transitions += w.replies;
        c.timeout_transitions += w.timeouts;
        c.compensation_retries += w.compensation_retries;
        if w.end != *state {
            c.history_state_mismatch += 1;
            tracing::error!(saga = %id, history = ?history, state, "history ends elsewhere");
        }
        if w.double > 0 || w.invalid > 0 {
            tracing::error!(saga = %id, history = ?history, "double or invalid transitions");
        }
        if state == "compensated" {
            let cause = w.compensated_by.clone().unwrap_or_else(|| String::from("?"));
            *c.compensated_by.entry(cause).or_default() += 1;
        }
        caused_by.insert(*id, w.compensated_by);
    }
    // History of sagas that do not exist (the foreign key forbids it).
    c.invalid_transitions += histories.values().map(|h| h.len() as u64).sum::<u64>();
    for (id, state, intent, ..) in &instances {
        let intent = intent.clone().unwrap_or_else(|| String::from("?"));
        let outcome = match state.as_str() {
            "compensated" => format!(
                "compensated ({})",
                caused_by
                    .get(id)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| String::from("?"))
            ),
            other => other.to_owned(),
        };
        if impossible(&intent, &outcome) {
            c.impossible_outcomes += 1;
            tracing::error!(saga = %id, intent, outcome, "impossible outcome");
        }
        *c.outcomes.entry(intent).or_default().entry(outcome).or_default() += 1;
    }
    c.replies_received = count(quote, "select count(*) from dbps_inbox").await?;
    c.late_replies = c.replies_received.saturating_sub(c.reply_transitions);

    // --- Effects and live state. ------------------------------------------------------------
    let mut effects: Effects = HashMap::new();
    for (index, (service, pool, _)) in input.participants.iter().enumerate() {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("select saga_id, kind, count(*) from effects group by saga_id, kind")
                .fetch_all(*pool)
                .await
                .with_context(|| format!("read the effects of {service}"))?;
        for (saga, kind, n) in rows {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            let entry = &mut effects.entry(saga).or_default()[index];
            match kind.as_str() {
                "do" => entry.done += n,
                "undo" => entry.undone += n,
                "nothing-to-undo" => entry.nothing += n,
                "refused" => entry.refused += n,
                "ignored" => entry.ignored += n,
                _ => {}
            }
        }
        c.effects += count(pool, "select count(*) from effects").await?;
        let live = match *service {
            "inventory" => "select saga_id from reservations",
            "orders" => "select saga_id from purchase_orders",
            _ => "select saga_id from bills",
        };
        let live: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(live))
            .fetch_all(*pool)
            .await
            .with_context(|| format!("read the live rows of {service}"))?;
        for saga in live {
            effects.entry(saga).or_default()[index].live = true;
        }
        if *service == "inventory" {
            let (taken, reserved): (i64, i64) = sqlx::query_as(
                "select (select coalesce(sum($1 - available), 0)::bigint from stock),
                        (select coalesce(sum(qty), 0)::bigint from reservations)",
            )
            .bind(INITIAL_STOCK)
            .fetch_one(*pool)
            .await
            .context("read stock and reservations")?;
            c.stock_mismatch = taken.abs_diff(reserved);
        }
        if *service == "billing" {
            c.bills_unanswered = count(
                pool,
                "select count(*) from effects e where kind = 'ignored' or (kind = 'do' and not exists
                     (select 1 from dbps_outbox o where o.causation_id = e.message_id))",
            )
            .await?;
        }
    }
    judge_effects(&effects, &states, &mut c);

    // --- Messages: outboxes, topics, inboxes. ------------------------------------------------
    let pools: Vec<&PgPool> = std::iter::once(quote)
        .chain(input.participants.iter().map(|(_, pool, _)| *pool))
        .collect();
    for pool in &pools {
        c.outbox_pending += count(
            pool,
            "select count(*) from dbps_outbox where published_at is null and parked_at is null",
        )
        .await?;
        c.parked += count(pool, "select count(*) from dbps_outbox where parked_at is not null").await?;
    }
    for (service, pool, topic) in &input.participants {
        let sent = outbox_ids(quote, Some(topic)).await?;
        let received = inbox_ids(pool).await?;
        c.commands_enqueued += sent.len() as u64;
        count_topic(input.brokers, topic, &sent, &received, &mut c)
            .await
            .with_context(|| format!("the commands to {service}"))?;
    }
    let mut sent = HashSet::new();
    for (_, pool, _) in &input.participants {
        sent.extend(outbox_ids(pool, None).await?);
    }
    c.replies_enqueued = sent.len() as u64;
    let received = inbox_ids(quote).await?;
    count_topic(input.brokers, input.replies, &sent, &received, &mut c)
        .await
        .context("the replies")?;
    c.dead_lettered = topic_ids(input.brokers, input.dlq).await?.len() as u64;
    Ok(c)
}

/// Whether a saga meant to end as `intent` may have ended as `outcome`. Faults may make
/// any step time out (so any saga may end compensated by a timeout), but only an amount
/// over the limit is refused, and a bill that is not answered never completes.
fn impossible(intent: &str, outcome: &str) -> bool {
    let refused = outcome.starts_with("compensated (refused");
    match intent {
        i if i == Intent::Complete.as_str() => refused,
        i if i == Intent::Reject.as_str() => {
            outcome == "completed" || (refused && outcome != "compensated (refused at purchase-order)")
        }
        i if i == Intent::TimeoutApplied.as_str() || i == Intent::TimeoutIgnored.as_str() => {
            outcome == "completed" || refused
        }
        _ => true,
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .with_context(|| format!("count: {sql}"))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

async fn outbox_ids(pool: &PgPool, topic: Option<&str>) -> Result<HashSet<String>> {
    let ids: Vec<String> =
        sqlx::query_scalar("select message_id from dbps_outbox where $1::text is null or topic = $1")
            .bind(topic)
            .fetch_all(pool)
            .await
            .context("read outbox ids")?;
    Ok(ids.into_iter().collect())
}

async fn inbox_ids(pool: &PgPool) -> Result<HashSet<String>> {
    let ids: Vec<String> = sqlx::query_scalar("select message_id from dbps_inbox")
        .fetch_all(pool)
        .await
        .context("read inbox ids")?;
    Ok(ids.into_iter().collect())
}

/// Reads `topic` and counts its records against what was sent to it and what its
/// consumer's inbox took.
async fn count_topic(
    brokers: &str,
    topic: &str,
    sent: &HashSet<String>,
    received: &HashSet<String>,
    c: &mut SagaCounts,
) -> Result<()> {
    let records = topic_ids(brokers, topic).await?;
    c.topic_records += records.len() as u64;
    let mut seen: HashSet<&str> = HashSet::with_capacity(records.len());
    for id in &records {
        match id.as_deref() {
            None => c.phantom_published += 1,
            Some(id) if !seen.insert(id) => c.topic_duplicates += 1,
            Some(id) if !sent.contains(id) => c.phantom_published += 1,
            Some(id) => c.unapplied += u64::from(!received.contains(id)),
        }
    }
    c.lost += sent.iter().filter(|id| !seen.contains(id.as_str())).count() as u64;
    Ok(())
}

/// Median, 99th percentile and maximum.
fn percentiles(values: &mut [i64]) -> (Option<i64>, Option<i64>, Option<i64>) {
    if values.is_empty() {
        return (None, None, None);
    }
    values.sort_unstable();
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((values.len() - 1) as f64 * q).round() as usize;
        values[i]
    };
    (Some(at(0.5)), Some(at(0.99)), values.last().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(step: i32, from: &str, to: &str, cause: &str, id: Option<&str>) -> Transition {
        Transition {
            step,
            from: from.to_owned(),
            to: to.to_owned(),
            cause: cause.to_owned(),
            message_id: id.map(str::to_owned),
        }
    }

    fn completed() -> Vec<Transition> {
        vec![
            t(0, "new", "running", "started", None),
            t(
                1,
                "running",
                "running",
                "reply chaos.inventory.StockReserved",
                Some("r1"),
            ),
            t(2, "running", "running", "reply chaos.orders.PoCreated", Some("r2")),
            t(2, "running", "completed", "reply chaos.billing.Billed", Some("r3")),
        ]
    }

    fn run(history: &[Transition]) -> Walk {
        walk(history, &STEPS, 3, &mut HashSet::new())
    }

    #[test]
    fn the_three_endings_are_valid_paths() {
        let w = run(&completed());
        assert_eq!((w.double, w.invalid, w.end.as_str(), w.replies), (0, 0, "completed", 3));

        let refused = [
            t(0, "new", "running", "started", None),
            t(
                1,
                "running",
                "running",
                "reply chaos.inventory.StockReserved",
                Some("r1"),
            ),
            t(
                0,
                "running",
                "compensating",
                "reply chaos.orders.PoRejected",
                Some("r2"),
            ),
            t(0, "compensating", "compensated", COMPENSATED, Some("r3")),
        ];
        let w = run(&refused);
        assert_eq!((w.double, w.invalid, w.end.as_str()), (0, 0, "compensated"));
        assert_eq!(w.compensated_by.as_deref(), Some("refused at purchase-order"));

        // The bill times out; its compensation times out once and is sent again.
        let timed_out = [
            t(0, "new", "running", "started", None),
            t(
                1,
                "running",
                "running",
                "reply chaos.inventory.StockReserved",
                Some("r1"),
            ),
            t(2, "running", "running", "reply chaos.orders.PoCreated", Some("r2")),
            t(2, "running", "compensating", "timeout", None),
            t(2, "compensating", "compensating", "timeout", None),
            t(1, "compensating", "compensating", COMPENSATED, Some("r3")),
            t(0, "compensating", "compensating", COMPENSATED, Some("r4")),
            t(0, "compensating", "compensated", COMPENSATED, Some("r5")),
        ];
        let w = run(&timed_out);
        assert_eq!((w.double, w.invalid, w.end.as_str()), (0, 0, "compensated"));
        assert_eq!(w.compensated_by.as_deref(), Some("timeout at bill"));
        assert_eq!((w.compensation_retries, w.timeouts), (1, 2));
    }

    #[test]
    fn a_reply_applied_twice_or_a_second_ending_is_a_double_transition() {
        // The same reply moves the saga twice.
        let mut twice = completed();
        twice.insert(
            2,
            t(
                2,
                "running",
                "running",
                "reply chaos.inventory.StockReserved",
                Some("r1"),
            ),
        );
        assert_eq!(run(&twice).double, 1);
        // A timeout after the saga completed.
        let mut after = completed();
        after.push(t(2, "completed", "compensating", "timeout", None));
        let w = run(&after);
        assert_eq!((w.double, w.invalid), (0, 1));
        // Completed twice.
        let mut again = completed();
        again.push(t(2, "running", "completed", "reply chaos.billing.Billed", Some("r4")));
        assert_eq!(run(&again).double, 1);
        // One reply moving two sagas.
        let mut ids = HashSet::new();
        assert_eq!(walk(&completed(), &STEPS, 3, &mut ids).double, 0);
        assert_eq!(walk(&completed(), &STEPS, 3, &mut ids).double, 3);
    }

    #[test]
    fn transitions_the_rules_do_not_allow_are_invalid() {
        // Step 2 skipped.
        let skipped = [
            t(0, "new", "running", "started", None),
            t(
                2,
                "running",
                "running",
                "reply chaos.inventory.StockReserved",
                Some("r1"),
            ),
        ];
        assert_eq!(run(&skipped).invalid, 1);
        // A refusal that compensates the refusing step itself.
        let own = [
            t(0, "new", "running", "started", None),
            t(
                1,
                "running",
                "running",
                "reply chaos.inventory.StockReserved",
                Some("r1"),
            ),
            t(
                1,
                "running",
                "compensating",
                "reply chaos.orders.PoRejected",
                Some("r2"),
            ),
        ];
        assert_eq!(run(&own).invalid, 1);
        // A timeout that skips the timed-out step's compensation, and a step sent again.
        let skips = [
            t(0, "new", "running", "started", None),
            t(0, "running", "running", "timeout", None),
            t(
                1,
                "running",
                "running",
                "reply chaos.inventory.StockReserved",
                Some("r1"),
            ),
            t(2, "running", "running", "reply chaos.orders.PoCreated", Some("r2")),
            t(1, "running", "compensating", "timeout", None),
        ];
        assert_eq!(run(&skips).invalid, 2);
        // Stuck before the attempts are used up, and a compensation retried too often.
        let early = [
            t(0, "new", "running", "started", None),
            t(0, "running", "compensating", "timeout", None),
            t(0, "compensating", "stuck", "timeout", None),
        ];
        assert_eq!(run(&early).invalid, 1);
        let late = [
            t(0, "new", "running", "started", None),
            t(0, "running", "compensating", "timeout", None),
            t(0, "compensating", "compensating", "timeout", None),
            t(0, "compensating", "compensating", COMPENSATION_FAILED, Some("f1")),
            t(0, "compensating", "compensating", "timeout", None),
        ];
        assert_eq!(run(&late).invalid, 1);
        // A row whose from-state is not where the saga was.
        let jump = [
            t(0, "new", "running", "started", None),
            t(0, "compensating", "compensated", COMPENSATED, Some("r1")),
        ];
        assert_eq!(run(&jump).invalid, 1);
    }

    #[test]
    fn effects_left_behind_or_applied_twice_are_counted() {
        let done = StepEffects {
            done: 1,
            live: true,
            ..StepEffects::default()
        };
        let undone = StepEffects {
            done: 1,
            undone: 1,
            ..StepEffects::default()
        };
        let nothing = StepEffects {
            nothing: 1,
            ..StepEffects::default()
        };
        let effects: Effects = [
            (String::from("ok"), [done, done, done]),
            (String::from("comp"), [undone, undone, nothing]),
            // The bill was applied after its refund found nothing.
            (
                String::from("late-bill"),
                [undone, undone, StepEffects { nothing: 1, ..done }],
            ),
            // Reserved twice.
            (String::from("twice"), [StepEffects { done: 2, ..done }, done, done]),
            // Completed, but the purchase order is gone.
            (String::from("hollow"), [done, undone, done]),
            (String::from("ghost"), [done, done, done]),
        ]
        .into();
        let states: HashMap<String, String> = [
            ("ok", "completed"),
            ("comp", "compensated"),
            ("late-bill", "compensated"),
            ("twice", "completed"),
            ("hollow", "completed"),
            ("never-applied", "completed"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        let mut c = SagaCounts::default();
        judge_effects(&effects, &states, &mut c);
        assert_eq!(c.double_effects, 1);
        assert_eq!(c.uncompensated, 1);
        assert_eq!(c.uncompensated_steps.get("bill"), Some(&1));
        assert_eq!(c.completed_incomplete, 3, "twice, hollow and never-applied");
        assert_eq!(c.phantom_effects, 1);
        assert_eq!((c.undone, c.nothing_to_undo), (5, 2));
    }

    #[test]
    fn outcomes_an_intent_rules_out() {
        assert!(!impossible("complete", "completed"));
        assert!(!impossible("complete", "compensated (timeout at bill)"));
        assert!(impossible("complete", "compensated (refused at purchase-order)"));
        assert!(!impossible("reject", "compensated (refused at purchase-order)"));
        assert!(impossible("reject", "completed"));
        assert!(impossible("timeout-ignored", "completed"));
        assert!(!impossible("timeout-applied", "compensated (timeout at bill)"));
        assert!(!impossible("complete", "stuck"));
    }
}
