//! The orchestrator: instances in the service's own PostgreSQL, each transition and the
//! commands it sends in one transaction, replies through the inbox, deadlines claimed with
//! `FOR UPDATE SKIP LOCKED`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dbps_core::inbox::pg::TxHandler;
use dbps_core::kafka::TopicNaming;
use dbps_core::{CancellationToken, Envelope, HandlerError, MessageKind, Registry};
use dbps_outbox::pg::PgOutbox;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool, Row as _};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::definition::{Command, Compensated, CompensationFailed, Definition, Outcome, Saga};
use crate::error::{Result, SagaError, pg};
use crate::machine::{self, CompensationPolicy, Input, Plan, Position, SagaState, Send as Outgoing, Shape};

/// The orchestrator's tables (`dbps_saga_instances`, `dbps_saga_history`), a migration
/// component (name it `dbps_saga`). Replies pass the inbox, so the service migrates
/// `dbps_inbox` too, and it sends commands through the outbox (`dbps_outbox`).
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/saga");

/// One saga instance as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct SagaInstance {
    /// The saga's id (also the correlation id of its commands and replies).
    pub id: Uuid,
    /// The saga type.
    pub saga_type: String,
    /// The definition version it runs under.
    pub version: u32,
    /// Where it is.
    #[serde(serialize_with = "state_name")]
    pub state: SagaState,
    /// Its data.
    pub data: Value,
    /// The step running or being compensated (index).
    pub step: usize,
    /// The attempt of that step's command or compensation, from 0.
    pub attempt: u32,
    /// The message id of the command whose reply it waits for.
    pub awaiting: Option<String>,
    /// For a step that awaits an event: the key the event must carry.
    pub await_key: Option<String>,
    /// When the wait times out.
    pub deadline: Option<DateTime<Utc>>,
    /// The last failure (a step's refusal, a timeout, a compensation's failure).
    pub last_error: Option<String>,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last moved.
    pub updated_at: DateTime<Utc>,
    /// Bumped by every transition.
    pub lock_version: i64,
    /// While a parallel group runs or is compensated (and after it ended the saga): its
    /// branches, in the definition's order.
    pub branches: Vec<Branch>,
}

/// A branch of a parallel group, as its saga records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Branch {
    /// The branch's step name.
    pub name: String,
    /// Where it is.
    pub state: BranchState,
    /// The message id of the command or compensation whose reply it waits for.
    pub awaiting: Option<String>,
}

/// Where a branch of a parallel group is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BranchState {
    /// Its command was sent; its reply is awaited.
    Sent,
    /// It replied with success.
    Succeeded,
    /// It replied with failure: it did nothing, nothing to undo.
    Failed,
    /// Its compensation was sent; the acknowledgement is awaited.
    Compensating,
    /// It was compensated (or had nothing to undo).
    Compensated,
}

impl Branch {
    fn new(name: &str, state: BranchState) -> Self {
        Self {
            name: name.to_owned(),
            state,
            awaiting: None,
        }
    }
}

fn state_name<S: serde::Serializer>(state: &SagaState, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(state.as_str())
}

const COLUMNS: &str = "id, saga_type, version, state, data, step, attempt, awaiting, await_key, deadline, \
                       last_error, created_at, updated_at, lock_version, branches";

impl SagaInstance {
    fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self> {
        let state: String = row.get("state");
        Ok(Self {
            id: row.get("id"),
            saga_type: row.get("saga_type"),
            version: u32::try_from(row.get::<i32, _>("version")).unwrap_or_default(),
            state: SagaState::parse(&state).ok_or_else(|| SagaError::InvalidConfig {
                setting: "saga state",
                reason: format!("unknown state {state:?} in the database"),
            })?,
            data: row.get("data"),
            step: usize::try_from(row.get::<i32, _>("step")).unwrap_or_default(),
            attempt: u32::try_from(row.get::<i32, _>("attempt")).unwrap_or_default(),
            awaiting: row.get("awaiting"),
            await_key: row.get("await_key"),
            deadline: row.get("deadline"),
            last_error: row.get("last_error"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            lock_version: row.get("lock_version"),
            branches: row
                .get::<Option<Value>, _>("branches")
                .map(serde_json::from_value)
                .transpose()
                .map_err(SagaError::Data)?
                .unwrap_or_default(),
        })
    }

    fn position(&self) -> Position {
        Position {
            state: self.state,
            step: self.step,
            attempt: self.attempt,
        }
    }
}

/// Builds an [`Orchestrator`].
pub struct OrchestratorBuilder {
    pool: PgPool,
    service: String,
    naming: TopicNaming,
    sagas: HashMap<(&'static str, u32), Arc<dyn Saga>>,
    policy: CompensationPolicy,
    poll_interval: Duration,
    registry: Registry,
    error: Option<SagaError>,
}

impl fmt::Debug for OrchestratorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrchestratorBuilder")
            .field("service", &self.service)
            .field("sagas", &self.sagas.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl OrchestratorBuilder {
    /// Registers a saga definition (several versions of one type may be registered).
    pub fn register<D: Serialize + DeserializeOwned + Send + Sync + 'static>(
        mut self,
        definition: Definition<D>,
    ) -> Self {
        if let Err(error) = definition.validate() {
            self.error.get_or_insert(error);
            return self;
        }
        let key = (Saga::name(&definition), Saga::version(&definition));
        if self.sagas.insert(key, Arc::new(definition)).is_some() {
            self.error.get_or_insert(SagaError::InvalidConfig {
                setting: "saga definition",
                reason: format!("{} v{} is registered twice", key.0, key.1),
            });
        }
        self
    }

    /// The topic naming of commands and replies (default: `{service}.commands`,
    /// `{service}.replies`).
    pub fn naming(mut self, naming: TopicNaming) -> Self {
        self.naming = naming;
        self
    }

    /// How compensations are retried: `attempts` before the saga is stuck (default 5),
    /// the first backoff (default 1 s, doubled per attempt, at most 5 min) and how long a
    /// compensation waits for its acknowledgement (default 30 s).
    pub fn compensation(mut self, attempts: u32, backoff: Duration, timeout: Duration) -> Self {
        self.policy = CompensationPolicy {
            attempts,
            backoff,
            timeout,
            max_backoff: self.policy.max_backoff,
        };
        self
    }

    /// How often an idle deadline scanner looks for due deadlines (default 1 s: one query
    /// per second). A saga started in this process wakes it at once.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The registry that decodes (and upcasts) replies.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Checks the settings and builds the orchestrator.
    pub fn build(self) -> Result<Orchestrator> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.sagas.is_empty() {
            return Err(SagaError::InvalidConfig {
                setting: "sagas",
                reason: String::from("no saga definition registered"),
            });
        }
        if self.policy.attempts == 0 || self.policy.timeout.is_zero() || self.poll_interval.is_zero() {
            return Err(SagaError::InvalidConfig {
                setting: "compensation / poll interval",
                reason: String::from("attempts, timeout and poll interval must be above zero"),
            });
        }
        let reply_topic = self.naming.replies(&self.service).map_err(SagaError::Message)?;
        let mut latest: HashMap<&'static str, u32> = HashMap::new();
        for &(name, version) in self.sagas.keys() {
            let newest = latest.entry(name).or_insert(version);
            *newest = (*newest).max(version);
        }
        Ok(Orchestrator {
            inner: Arc::new(Inner {
                outbox: PgOutbox::new(self.service.clone()).naming(self.naming.clone()),
                pool: self.pool,
                service: self.service,
                naming: self.naming,
                reply_topic,
                sagas: self.sagas,
                latest,
                policy: self.policy,
                poll_interval: self.poll_interval,
                registry: self.registry,
                wake: tokio::sync::Notify::new(),
            }),
        })
    }
}

/// Runs sagas: starts them, moves them on replies and deadlines, and lets operators see
/// and unblock them.
///
/// - [`start`](Self::start) runs in the caller's transaction: the instance and its first
///   command commit with the caller's own changes, or not at all.
/// - [`replies`](Self::replies) is the handler of the reply topic, for a
///   [`PgInbox`](dbps_core::inbox::pg::PgInbox) in a consumer runner: each reply moves its
///   saga once, in the inbox's transaction, with the commands the move sends.
/// - [`run`](Self::run) claims due deadlines (`FOR UPDATE SKIP LOCKED`), so several
///   processes share them without moving a saga twice.
///
/// A reply is applied only if it answers the command the saga waits for (its causation
/// id): duplicates, replies to an earlier attempt and replies that arrive after a timeout
/// or after compensation started are counted (`dbps_saga_late_replies_total`) and change
/// nothing.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    service: String,
    outbox: PgOutbox,
    naming: TopicNaming,
    reply_topic: String,
    sagas: HashMap<(&'static str, u32), Arc<dyn Saga>>,
    latest: HashMap<&'static str, u32>,
    policy: CompensationPolicy,
    poll_interval: Duration,
    registry: Registry,
    wake: tokio::sync::Notify,
}

impl fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Orchestrator")
            .field("service", &self.inner.service)
            .field("reply_topic", &self.inner.reply_topic)
            .finish_non_exhaustive()
    }
}

/// The shape of a definition, for the state machine.
struct ShapeOf<'a>(&'a dyn Saga);

impl Shape for ShapeOf<'_> {
    fn steps(&self) -> usize {
        self.0.steps()
    }
    fn name(&self, step: usize) -> &str {
        self.0.step_name(step)
    }
    fn is_group(&self, step: usize) -> bool {
        self.0.branches(step) > 0
    }
    fn has_compensation(&self, step: usize) -> bool {
        self.0.has_compensation(step)
    }
    fn timeout(&self, step: usize) -> Duration {
        self.0.timeout(step)
    }
    fn retries(&self, step: usize) -> u32 {
        self.0.retries(step)
    }
}

/// What a transition left.
struct Moved {
    state: SagaState,
    /// Whether it waits for a reply or an event (a local step and a group compensation
    /// with nothing to undo move on at once).
    waits: bool,
    /// A parallel group's branches.
    branches: Vec<Branch>,
}

fn transition_span(saga: &dyn Saga, instance: &SagaInstance, plan: &Plan, cause: &str) -> tracing::Span {
    tracing::info_span!(
        "dbps.saga.transition",
        saga = saga.name(),
        saga_id = %instance.id,
        from = instance.state.as_str(),
        to = plan.to.state.as_str(),
        step = saga.step_name(plan.to.step),
        cause,
    )
}

fn branches_json(branches: &[Branch]) -> Result<Option<Value>> {
    if branches.is_empty() {
        return Ok(None);
    }
    serde_json::to_value(branches).map(Some).map_err(SagaError::Data)
}

/// Appends a transition to the saga's history.
async fn record_history(
    conn: &mut PgConnection,
    id: Uuid,
    step: usize,
    from: &str,
    to: SagaState,
    cause: &str,
    caused_by: Option<&Envelope>,
) -> Result<()> {
    sqlx::query(
        "insert into dbps_saga_history (saga_id, step, from_state, to_state, cause, message_id) \
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(i32::try_from(step).unwrap_or(i32::MAX))
    .bind(from)
    .bind(to.as_str())
    .bind(cause)
    .bind(caused_by.map(|e| e.id.as_str()))
    .execute(&mut *conn)
    .await
    .map_err(pg("record saga history"))?;
    Ok(())
}

/// What a deadline scanner did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadlineSummary {
    /// Sagas moved on by a timeout.
    pub timed_out: u64,
    /// Transient failures retried.
    pub retried: u64,
    /// Scans for due deadlines (one query each; a due saga adds its own transaction).
    pub scans: u64,
}

impl Orchestrator {
    /// A builder for the orchestrator of `service`, keeping its sagas in `pool`.
    pub fn builder(pool: PgPool, service: impl Into<String>) -> OrchestratorBuilder {
        OrchestratorBuilder {
            pool,
            service: service.into(),
            naming: TopicNaming::new(),
            sagas: HashMap::new(),
            policy: CompensationPolicy {
                attempts: 5,
                timeout: Duration::from_secs(30),
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(300),
            },
            poll_interval: Duration::from_secs(1),
            registry: Registry::new(),
            error: None,
        }
    }

    /// The topic replies to this orchestrator's commands go to.
    pub fn reply_topic(&self) -> &str {
        &self.inner.reply_topic
    }

    fn saga(&self, saga_type: &str, version: u32) -> Result<Arc<dyn Saga>> {
        self.inner
            .sagas
            .iter()
            .find(|((name, v), _)| *name == saga_type && *v == version)
            .map(|(_, saga)| Arc::clone(saga))
            .ok_or_else(|| SagaError::UnknownVersion {
                saga: saga_type.to_owned(),
                version,
            })
    }

    /// Starts a saga of type `saga` (its newest registered version) with `data`, in the
    /// caller's transaction: the instance and its first command commit with the caller's
    /// changes. Returns the saga's id.
    pub async fn start<D: Serialize>(&self, conn: &mut PgConnection, saga: &str, data: &D) -> Result<Uuid> {
        let inner = &self.inner;
        let version = *inner
            .latest
            .get(saga)
            .ok_or_else(|| SagaError::UnknownSaga { saga: saga.to_owned() })?;
        let definition = self.saga(saga, version)?;
        let data = serde_json::to_value(data).map_err(SagaError::Data)?;
        let id = Uuid::now_v7();
        let plan = machine::start(&ShapeOf(definition.as_ref()));
        sqlx::query(
            "insert into dbps_saga_instances (id, saga_type, version, state, data, step) values ($1, $2, $3, 'running', $4, 0)",
        )
        .bind(id)
        .bind(definition.name())
        .bind(i32::try_from(version).unwrap_or(i32::MAX))
        .bind(&data)
        .execute(&mut *conn)
        .await
        .map_err(pg("start saga"))?;
        let instance = SagaInstance {
            id,
            saga_type: definition.name().to_owned(),
            version,
            state: SagaState::Running,
            data,
            step: 0,
            attempt: 0,
            awaiting: None,
            await_key: None,
            deadline: None,
            last_error: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            lock_version: 0,
            branches: Vec::new(),
        };
        self.apply(conn, &instance, definition.as_ref(), plan, "started", None)
            .await?;
        metrics::counter!("dbps_saga_started_total", "saga" => definition.name()).increment(1);
        inner.wake.notify_one();
        Ok(id)
    }

    /// Carries out a plan: sends its command, moves the instance, records the history.
    /// A local step runs at once, in this transaction, and moves the saga on (several in a
    /// row run one after another); so does a group's compensation that has nothing to undo.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        instance: &SagaInstance,
        saga: &dyn Saga,
        plan: Plan,
        cause: &str,
        caused_by: Option<&Envelope>,
    ) -> Result<SagaState> {
        let mut moved = self
            .apply_plan(conn, instance, saga, plan.clone(), cause, caused_by)
            .instrument(transition_span(saga, instance, &plan, cause))
            .await?;
        let mut at = plan;
        let mut current = instance.clone();
        loop {
            let (step, compensation) = match at.send {
                Some(Outgoing::Command(step)) => (step, false),
                Some(Outgoing::Compensation(step)) => (step, true),
                None => return Ok(moved.state),
            };
            if moved.waits {
                return Ok(moved.state);
            }
            current.state = at.to.state;
            current.step = at.to.step;
            current.attempt = at.to.attempt;
            current.branches = std::mem::take(&mut moved.branches);
            let (input, cause) = match saga.run_local(step, compensation, conn, &mut current.data) {
                Some(run) => match run.await? {
                    true => (Input::Succeeded, "local step"),
                    false => (
                        Input::Failed(format!("local step {} failed", saga.step_name(step))),
                        "local step",
                    ),
                },
                None => (Input::Succeeded, "nothing to undo"),
            };
            let Some(next) = machine::next(&ShapeOf(saga), &self.inner.policy, current.position(), input) else {
                return Ok(moved.state);
            };
            moved = self
                .apply_plan(conn, &current, saga, next.clone(), cause, caused_by)
                .instrument(transition_span(saga, &current, &next, cause))
                .await?;
            at = next;
        }
    }

    async fn apply_plan(
        &self,
        conn: &mut PgConnection,
        instance: &SagaInstance,
        saga: &dyn Saga,
        plan: Plan,
        cause: &str,
        caused_by: Option<&Envelope>,
    ) -> Result<Moved> {
        let started = Instant::now();
        // A parallel group's branches are kept while the saga stays on the group's step.
        let mut branches = if plan.to.step == instance.step {
            instance.branches.clone()
        } else {
            Vec::new()
        };
        let (awaiting, await_key) = match plan.send {
            None => (None, None),
            Some(Outgoing::Command(step)) if saga.is_local(step, false) => (None, None),
            Some(Outgoing::Compensation(step)) if saga.is_local(step, true) => (None, None),
            Some(Outgoing::Command(step)) if saga.branches(step) > 0 => {
                self.send_branches(conn, instance, saga, step, &mut branches, false, caused_by)
                    .await?;
                (None, None)
            }
            Some(Outgoing::Compensation(step)) if saga.branches(step) > 0 => {
                self.send_branches(conn, instance, saga, step, &mut branches, true, caused_by)
                    .await?;
                (None, None)
            }
            Some(Outgoing::Command(step)) => match saga.await_key(step, &instance.data)? {
                // The step awaits an event: nothing to send, a key to wait under.
                Some(key) => (None, Some(key)),
                None => {
                    let command = saga.command(step, None, &instance.data)?;
                    (Some(self.send(conn, instance, command, caused_by).await?), None)
                }
            },
            Some(Outgoing::Compensation(step)) => {
                let command = saga.compensation(step, None, &instance.data)?;
                (Some(self.send(conn, instance, command, caused_by).await?), None)
            }
        };
        let waits = awaiting.is_some() || await_key.is_some() || branches.iter().any(|b| b.awaiting.is_some());
        let wait_ms = plan.wait.map(|w| i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
        sqlx::query(
            "update dbps_saga_instances set state = $2, step = $3, attempt = $4, awaiting = $5, \
             deadline = now() + $6 * interval '1 millisecond', last_error = coalesce($7, last_error), data = $8, \
             await_key = $9, branches = $10, updated_at = now(), lock_version = lock_version + 1 where id = $1",
        )
        .bind(instance.id)
        .bind(plan.to.state.as_str())
        .bind(i32::try_from(plan.to.step).unwrap_or(i32::MAX))
        .bind(i32::try_from(plan.to.attempt).unwrap_or(i32::MAX))
        .bind(&awaiting)
        .bind(wait_ms)
        .bind(&plan.error)
        .bind(&instance.data)
        .bind(&await_key)
        .bind(branches_json(&branches)?)
        .execute(&mut *conn)
        .await
        .map_err(pg("move saga"))?;
        let from = if cause == "started" {
            "new"
        } else {
            instance.state.as_str()
        };
        record_history(conn, instance.id, plan.to.step, from, plan.to.state, cause, caused_by).await?;
        let labels = [("saga", saga.name())];
        metrics::counter!("dbps_saga_transitions_total", &labels).increment(1);
        metrics::histogram!("dbps_saga_transition_seconds", &labels).record(started.elapsed().as_secs_f64());
        if plan.to.state != instance.state {
            match plan.to.state {
                SagaState::Completed => metrics::counter!("dbps_saga_completed_total", &labels).increment(1),
                SagaState::Compensated => metrics::counter!("dbps_saga_compensated_total", &labels).increment(1),
                SagaState::Stuck => {
                    metrics::counter!("dbps_saga_stuck_total", &labels).increment(1);
                    tracing::error!(saga_id = %instance.id, error = ?plan.error, "saga stuck: an operator must retry or resolve it");
                }
                _ => {}
            }
        }
        tracing::debug!(attempt = plan.to.attempt, "saga moved");
        Ok(Moved {
            state: plan.to.state,
            waits,
            branches,
        })
    }

    /// Sends a parallel group's commands (`compensate`: its compensations) to the branches
    /// that still need them: on a first send every branch; on a retry those that did not
    /// answer. A group compensated after it completed has no branch record: every branch
    /// succeeded then. A branch without a compensation has nothing to undo.
    #[allow(clippy::too_many_arguments)]
    async fn send_branches(
        &self,
        conn: &mut PgConnection,
        instance: &SagaInstance,
        saga: &dyn Saga,
        step: usize,
        branches: &mut Vec<Branch>,
        compensate: bool,
        caused_by: Option<&Envelope>,
    ) -> Result<()> {
        if branches.is_empty() {
            let state = if compensate {
                BranchState::Succeeded
            } else {
                BranchState::Sent
            };
            *branches = (0..saga.branches(step))
                .map(|b| Branch::new(saga.branch_name(step, b), state))
                .collect();
        }
        for (index, branch) in branches.iter_mut().enumerate() {
            let command = match (compensate, branch.state) {
                (false, BranchState::Sent) => saga.command(step, Some(index), &instance.data)?,
                (true, BranchState::Sent | BranchState::Succeeded | BranchState::Compensating)
                    if saga.branch_has_compensation(step, index) =>
                {
                    branch.state = BranchState::Compensating;
                    saga.compensation(step, Some(index), &instance.data)?
                }
                (true, BranchState::Sent | BranchState::Succeeded | BranchState::Compensating) => {
                    branch.state = BranchState::Compensated;
                    branch.awaiting = None;
                    continue;
                }
                _ => continue,
            };
            branch.awaiting = Some(self.send(conn, instance, command, caused_by).await?);
        }
        Ok(())
    }

    /// Enqueues a command of `instance` through the outbox; returns its message id.
    async fn send(
        &self,
        conn: &mut PgConnection,
        instance: &SagaInstance,
        command: Command,
        caused_by: Option<&Envelope>,
    ) -> Result<String> {
        let inner = &self.inner;
        let mut envelope = Envelope::raw(MessageKind::Command, command.message_type, command.payload);
        envelope.schema_version = command.schema_version;
        envelope.source.clone_from(&inner.service);
        envelope.aggregate_id = instance.id.to_string();
        if let Some(cause) = caused_by {
            envelope = envelope.caused_by(cause);
        } else {
            envelope.trace = dbps_core::TraceContext::current().unwrap_or_else(dbps_core::TraceContext::new_root);
        }
        envelope.correlation_id = Some(instance.id.to_string());
        envelope.reply_to = Some(inner.reply_topic.clone());
        let topic = inner.naming.commands(&command.service).map_err(SagaError::Message)?;
        let enqueued = inner
            .outbox
            .enqueue(conn, &topic, envelope)
            .await
            .map_err(SagaError::Outbox)?;
        Ok(enqueued.message_id)
    }

    async fn load(&self, conn: &mut PgConnection, id: Uuid, lock: &str) -> Result<Option<SagaInstance>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "select {COLUMNS} from dbps_saga_instances where id = $1 {lock}"
        )))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(pg("read saga"))?;
        row.as_ref().map(SagaInstance::from_row).transpose()
    }

    /// Moves a saga on a reply, in the caller's transaction (the inbox's).
    pub async fn handle_reply(&self, conn: &mut PgConnection, reply: &Envelope) -> Result<()> {
        let uncorrelated = || SagaError::Uncorrelated {
            message_id: reply.id.clone(),
        };
        let id: Uuid = reply
            .correlation_id
            .as_deref()
            .and_then(|c| c.parse().ok())
            .ok_or_else(uncorrelated)?;
        let mut instance = self
            .load(conn, id, "for update")
            .await?
            .ok_or_else(|| SagaError::NotFound { id: id.to_string() })?;
        if instance.awaiting.is_none() || instance.awaiting != reply.causation_id {
            let branch = reply.causation_id.as_ref().and_then(|cause| {
                instance
                    .branches
                    .iter()
                    .position(|b| b.awaiting.as_ref() == Some(cause))
            });
            if let Some(branch) = branch {
                return self.handle_branch_reply(conn, instance, branch, reply).await;
            }
            metrics::counter!("dbps_saga_late_replies_total", "saga" => instance.saga_type.clone()).increment(1);
            tracing::debug!(saga_id = %id, reply = %reply.id, state = %instance.state, "late or duplicate reply ignored");
            return Ok(());
        }
        let saga = self.saga(&instance.saga_type, instance.version)?;
        let input = match instance.state {
            SagaState::Running => {
                match saga.reply(instance.step, None, &mut instance.data, &self.inner.registry, reply)? {
                    Outcome::Success => Input::Succeeded,
                    Outcome::Failure(reason) => Input::Failed(reason),
                }
            }
            SagaState::Compensating if reply.message_type == <Compensated as dbps_core::Message>::TYPE => {
                Input::Succeeded
            }
            SagaState::Compensating if reply.message_type == <CompensationFailed as dbps_core::Message>::TYPE => {
                let failed: CompensationFailed = self.inner.registry.decode(reply).map_err(SagaError::Message)?;
                Input::Failed(failed.reason)
            }
            _ => {
                return Err(SagaError::UnexpectedReply {
                    saga: instance.saga_type.clone(),
                    step: saga.step_name(instance.step).to_owned(),
                    message_type: reply.message_type.clone(),
                });
            }
        };
        let cause = format!("reply {}", reply.message_type);
        if let Some(plan) = machine::next(&ShapeOf(saga.as_ref()), &self.inner.policy, instance.position(), input) {
            self.apply(conn, &instance, saga.as_ref(), plan, &cause, Some(reply))
                .await?;
        }
        Ok(())
    }

    /// A reply to one branch of a parallel group: the branch records it, and the saga moves
    /// once the group is decided (every branch succeeded, one failed, every compensation
    /// acknowledged, or one compensation failed).
    async fn handle_branch_reply(
        &self,
        conn: &mut PgConnection,
        mut instance: SagaInstance,
        index: usize,
        reply: &Envelope,
    ) -> Result<()> {
        let saga = self.saga(&instance.saga_type, instance.version)?;
        let step = instance.step;
        let cause = format!("reply {} to {}", reply.message_type, saga.branch_name(step, index));
        let unexpected = || SagaError::UnexpectedReply {
            saga: instance.saga_type.clone(),
            step: saga.branch_name(step, index).to_owned(),
            message_type: reply.message_type.clone(),
        };
        let is = |message_type: &str| reply.message_type == message_type;
        let compensated = is(<Compensated as dbps_core::Message>::TYPE);
        let failed_compensation = is(<CompensationFailed as dbps_core::Message>::TYPE);
        let (state, input) = match instance.state {
            SagaState::Running => {
                match saga.reply(step, Some(index), &mut instance.data, &self.inner.registry, reply)? {
                    Outcome::Success => (BranchState::Succeeded, None),
                    Outcome::Failure(reason) => (BranchState::Failed, Some(Input::Failed(reason))),
                }
            }
            SagaState::Compensating | SagaState::Stuck if compensated => (BranchState::Compensated, None),
            SagaState::Compensating | SagaState::Stuck if failed_compensation => {
                let failed: CompensationFailed = self.inner.registry.decode(reply).map_err(SagaError::Message)?;
                let input = (instance.state == SagaState::Compensating).then_some(Input::Failed(failed.reason));
                (BranchState::Compensating, input)
            }
            _ => return Err(unexpected()),
        };
        let branch = instance.branches.get_mut(index).ok_or_else(unexpected)?;
        branch.state = state;
        branch.awaiting = None;
        let decided = match instance.state {
            SagaState::Running => instance.branches.iter().all(|b| b.state == BranchState::Succeeded),
            SagaState::Compensating => !instance.branches.iter().any(|b| {
                matches!(
                    b.state,
                    BranchState::Compensating | BranchState::Sent | BranchState::Succeeded
                )
            }),
            _ => false,
        };
        let input = input.or(decided.then_some(Input::Succeeded));
        let plan = input
            .and_then(|input| machine::next(&ShapeOf(saga.as_ref()), &self.inner.policy, instance.position(), input));
        match plan {
            Some(plan) => {
                self.apply(conn, &instance, saga.as_ref(), plan, &cause, Some(reply))
                    .await?;
            }
            // The group waits for its other branches: the branch's answer is recorded.
            None => {
                sqlx::query(
                    "update dbps_saga_instances set branches = $2, data = $3, updated_at = now(), \
                     lock_version = lock_version + 1 where id = $1",
                )
                .bind(instance.id)
                .bind(branches_json(&instance.branches)?)
                .bind(&instance.data)
                .execute(&mut *conn)
                .await
                .map_err(pg("record a branch's reply"))?;
                record_history(
                    conn,
                    instance.id,
                    step,
                    instance.state.as_str(),
                    instance.state,
                    &cause,
                    Some(reply),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// The handler of the reply topic, for a [`PgInbox`](dbps_core::inbox::pg::PgInbox).
    pub fn replies(&self) -> Replies {
        Replies(self.clone())
    }

    /// Moves the sagas that await `event` (a step built with
    /// [`Step::awaits`](crate::Step::awaits)) and whose key it carries, in the caller's
    /// transaction (the inbox's). Returns how many moved; an event no saga awaits (any
    /// more: after a timeout, say) moves none and is counted in
    /// `dbps_saga_unawaited_events_total`.
    pub async fn handle_event(&self, conn: &mut PgConnection, event: &Envelope) -> Result<usize> {
        let mut moved = 0;
        for saga in self.inner.sagas.values() {
            for (step, key) in saga.listeners(&self.inner.registry, event)? {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "select {COLUMNS} from dbps_saga_instances where await_key = $1 and state = 'running' \
                     and version = $2 and step = $3 order by id for update"
                )))
                .bind(&key)
                .bind(i32::try_from(saga.version()).unwrap_or(i32::MAX))
                .bind(i32::try_from(step).unwrap_or(i32::MAX))
                .fetch_all(&mut *conn)
                .await
                .map_err(pg("find awaiting sagas"))?;
                for row in &rows {
                    let mut instance = SagaInstance::from_row(row)?;
                    let input = match saga.event(step, &mut instance.data, &self.inner.registry, event)? {
                        Outcome::Success => Input::Succeeded,
                        Outcome::Failure(reason) => Input::Failed(reason),
                    };
                    let cause = format!("event {}", event.message_type);
                    if let Some(plan) =
                        machine::next(&ShapeOf(saga.as_ref()), &self.inner.policy, instance.position(), input)
                    {
                        self.apply(conn, &instance, saga.as_ref(), plan, &cause, Some(event))
                            .await?;
                        moved += 1;
                    }
                }
            }
        }
        if moved == 0 {
            metrics::counter!("dbps_saga_unawaited_events_total", "type" => event.message_type.clone()).increment(1);
        }
        Ok(moved)
    }

    /// The handler of the topics whose events steps await, for a
    /// [`PgInbox`](dbps_core::inbox::pg::PgInbox).
    pub fn events(&self) -> Events {
        Events(self.clone())
    }

    /// Claims due deadlines until `shutdown` is cancelled: each due saga moves on by its
    /// timeout once, in its own transaction. An idle scanner runs one query per poll
    /// interval; a saga started in this process wakes it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<DeadlineSummary> {
        let mut summary = DeadlineSummary::default();
        let mut failures = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Ok(summary);
            }
            summary.scans += 1;
            let pause = match self.claim_due(&shutdown).await {
                Ok(0) => {
                    failures = 0;
                    self.inner.poll_interval
                }
                Ok(moved) => {
                    failures = 0;
                    summary.timed_out += moved;
                    continue;
                }
                Err(error) if error.is_transient() => {
                    failures += 1;
                    summary.retried += 1;
                    tracing::warn!(error = %dbps_core::ErrorChain(&error), "saga deadline scan failed; retrying");
                    self.inner.poll_interval.saturating_mul(failures.min(30))
                }
                Err(error) => return Err(error),
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(summary),
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Moves the sagas whose deadline passed; returns how many moved.
    async fn claim_due(&self, shutdown: &CancellationToken) -> Result<u64> {
        let pool = &self.inner.pool;
        let due: Vec<Uuid> = sqlx::query_scalar(
            "select id from dbps_saga_instances where state in ('running', 'compensating') and deadline <= now() \
             order by deadline limit 64",
        )
        .fetch_all(pool)
        .await
        .map_err(pg("find due sagas"))?;
        let mut moved = 0;
        for id in due {
            if shutdown.is_cancelled() {
                break;
            }
            let mut tx = pool.begin().await.map_err(pg("begin"))?;
            // Another process may hold it, or have moved it since: skip it then.
            let Some(instance) = self
                .load(
                    &mut tx,
                    id,
                    "and state in ('running', 'compensating') and deadline <= now() for update skip locked",
                )
                .await?
            else {
                continue;
            };
            let saga = match self.saga(&instance.saga_type, instance.version) {
                Ok(saga) => saga,
                Err(error) => {
                    tracing::warn!(saga_id = %id, %error, "due saga left untouched");
                    continue;
                }
            };
            let shape = ShapeOf(saga.as_ref());
            if let Some(plan) = machine::next(&shape, &self.inner.policy, instance.position(), Input::TimedOut) {
                self.apply(&mut tx, &instance, saga.as_ref(), plan, "timeout", None)
                    .await?;
                moved += 1;
            }
            tx.commit().await.map_err(pg("commit"))?;
        }
        Ok(moved)
    }

    /// One saga.
    pub async fn get(&self, id: Uuid) -> Result<Option<SagaInstance>> {
        let mut conn = self.inner.pool.acquire().await.map_err(pg("connect"))?;
        self.load(&mut conn, id, "").await
    }

    /// Sagas in `state`, oldest change first, at most `limit`.
    pub async fn in_state(&self, state: SagaState, limit: i64) -> Result<Vec<SagaInstance>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "select {COLUMNS} from dbps_saga_instances where state = $1 order by updated_at limit $2"
        )))
        .bind(state.as_str())
        .bind(limit)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(pg("list sagas"))?;
        rows.iter().map(SagaInstance::from_row).collect()
    }

    /// Sagas that need a look: stuck, or waiting past their deadline, for longer than
    /// `for_longer_than`.
    pub async fn overdue(&self, for_longer_than: Duration) -> Result<Vec<SagaInstance>> {
        let ms = i64::try_from(for_longer_than.as_millis()).unwrap_or(i64::MAX);
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "select {COLUMNS} from dbps_saga_instances where \
             (state = 'stuck' and updated_at < now() - $1 * interval '1 millisecond') or \
             (state in ('running', 'compensating') and deadline < now() - $1 * interval '1 millisecond') \
             order by updated_at"
        )))
        .bind(ms)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(pg("list overdue sagas"))?;
        rows.iter().map(SagaInstance::from_row).collect()
    }

    /// Retries a stuck saga's compensation (after an operator fixed its cause).
    pub async fn retry(&self, id: Uuid) -> Result<()> {
        self.operate(id, "retry", |saga, policy, instance| {
            machine::next(&ShapeOf(saga), policy, instance.position(), Input::Retry)
        })
        .await
    }

    /// Marks a stuck saga compensated by hand, with the operator's `note` as its last
    /// error (the operator undid what was left).
    pub async fn resolve(&self, id: Uuid, note: &str) -> Result<()> {
        let note = format!("resolved by an operator: {note}");
        self.operate(id, "resolve", move |_, _, instance| {
            (instance.state == SagaState::Stuck).then(|| Plan {
                to: Position {
                    state: SagaState::Compensated,
                    ..instance.position()
                },
                send: None,
                wait: None,
                error: Some(note.clone()),
            })
        })
        .await
    }

    async fn operate(
        &self,
        id: Uuid,
        action: &'static str,
        plan: impl Fn(&dyn Saga, &CompensationPolicy, &SagaInstance) -> Option<Plan>,
    ) -> Result<()> {
        let mut tx = self.inner.pool.begin().await.map_err(pg("begin"))?;
        let instance = self
            .load(&mut tx, id, "for update")
            .await?
            .ok_or_else(|| SagaError::NotFound { id: id.to_string() })?;
        let saga = self.saga(&instance.saga_type, instance.version)?;
        let plan = plan(saga.as_ref(), &self.inner.policy, &instance).ok_or_else(|| SagaError::WrongState {
            id: id.to_string(),
            state: instance.state.to_string(),
            action,
        })?;
        self.apply(&mut tx, &instance, saga.as_ref(), plan, action, None)
            .await?;
        tx.commit().await.map_err(pg("commit"))?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// The history of a saga, oldest first: `(step, from, to, cause)`.
    pub async fn history(&self, id: Uuid) -> Result<Vec<(usize, String, String, String)>> {
        let rows: Vec<(i32, String, String, String)> = sqlx::query_as(
            "select step, from_state, to_state, cause from dbps_saga_history where saga_id = $1 order by id",
        )
        .bind(id)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(pg("read saga history"))?;
        Ok(rows
            .into_iter()
            .map(|(step, from, to, cause)| (usize::try_from(step).unwrap_or_default(), from, to, cause))
            .collect())
    }
}

/// The event handler of an [`Orchestrator`] (see [`Orchestrator::events`]).
#[derive(Debug, Clone)]
pub struct Events(Orchestrator);

impl TxHandler for Events {
    async fn handle(&self, conn: &mut PgConnection, message: &Envelope) -> Result<(), HandlerError> {
        self.0.handle_event(conn, message).await?;
        Ok(())
    }
}

/// The reply handler of an [`Orchestrator`] (see [`Orchestrator::replies`]).
#[derive(Debug, Clone)]
pub struct Replies(Orchestrator);

impl TxHandler for Replies {
    async fn handle(&self, conn: &mut PgConnection, message: &Envelope) -> Result<(), HandlerError> {
        Ok(self.0.handle_reply(conn, message).await?)
    }
}
