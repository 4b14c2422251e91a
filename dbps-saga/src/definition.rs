//! Saga definitions: typed data, steps in order, each a command to a participant with the
//! replies that mean success or failure, a compensation, a timeout and a retry count.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dbps_core::{Envelope, Message, Registry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::PgConnection;

use crate::error::{Result, SagaError};

/// A command to send: the participant service (its command topic) and the message.
#[derive(Debug, Clone)]
pub struct Command {
    pub(crate) service: String,
    pub(crate) message_type: &'static str,
    pub(crate) schema_version: u32,
    pub(crate) payload: Box<RawValue>,
}

impl Command {
    /// `message` for the participant `service`; it goes to that service's command topic.
    pub fn to<M: Message>(service: impl Into<String>, message: &M) -> Result<Self> {
        Ok(Self {
            service: service.into(),
            message_type: M::TYPE,
            schema_version: M::VERSION,
            payload: serde_json::value::to_raw_value(message).map_err(SagaError::Data)?,
        })
    }
}

/// The reply a participant sends when it compensated a step (also when there was nothing
/// to undo: compensations are idempotent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Compensated {}

impl Message for Compensated {
    const TYPE: &'static str = "dbps.saga.Compensated";
}

/// The reply a participant sends when it could not compensate a step yet; the
/// orchestrator retries with backoff and, after its attempts, marks the saga `stuck`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CompensationFailed {
    /// Why.
    pub reason: String,
}

impl Message for CompensationFailed {
    const TYPE: &'static str = "dbps.saga.CompensationFailed";
}

type CommandFn<D> = Arc<dyn Fn(&D) -> Result<Command> + Send + Sync>;
type ApplyFn<D> = Arc<dyn Fn(&mut D, &Registry, &Envelope) -> Result<()> + Send + Sync>;
type KeyFn<D> = Arc<dyn Fn(&D) -> String + Send + Sync>;

/// A step run in the orchestrator's own transaction (a local step), or its compensation.
///
/// It runs in the transaction of the transition that reached it, with the saga's data;
/// `Ok(true)` is success, `Ok(false)` failure (the saga compensates), an error rolls the
/// whole transition back (a reply is retried by the runner, a timeout by the scanner).
pub trait LocalStep<D>: Send + Sync + 'static {
    /// Runs the step.
    fn run<'a>(&'a self, conn: &'a mut PgConnection, data: &'a mut D) -> BoxFuture<'a, Result<bool>>;
}

/// The boxed future of a [`LocalStep`]: `Box::pin(async move { ... })`.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type EventKeyFn = Arc<dyn Fn(&Registry, &Envelope) -> Result<String> + Send + Sync>;

/// What a step that awaits an event listens for.
struct Awaits<D> {
    /// The saga's correlation key, from its data.
    key: Option<KeyFn<D>>,
    /// Event types, how to read the key from each, and (for successes) what it records.
    events: Vec<(&'static str, EventKeyFn, Option<ApplyFn<D>>)>,
}

/// One step of a saga.
pub struct Step<D> {
    name: &'static str,
    command: Option<CommandFn<D>>,
    local: Option<Arc<dyn LocalStep<D>>>,
    local_compensation: Option<Arc<dyn LocalStep<D>>>,
    awaits: Option<Awaits<D>>,
    compensation: Option<CommandFn<D>>,
    success: Vec<(&'static str, ApplyFn<D>)>,
    failure: BTreeSet<&'static str>,
    timeout: Duration,
    retries: u32,
    /// A parallel group's branches (empty for any other step).
    branches: Vec<Step<D>>,
}

impl<D> fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("success", &self.success.iter().map(|(t, _)| *t).collect::<Vec<_>>())
            .field("failure", &self.failure)
            .field("compensates", &self.compensation.is_some())
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("branches", &self.branches)
            .finish_non_exhaustive()
    }
}

impl<D: Send + Sync + 'static> Step<D> {
    /// A step named `name` (unique within its saga), timing out after 30 s, not re-sent.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            command: None,
            local: None,
            local_compensation: None,
            awaits: None,
            compensation: None,
            success: Vec::new(),
            failure: BTreeSet::new(),
            timeout: Duration::from_secs(30),
            retries: 0,
            branches: Vec::new(),
        }
    }

    /// A parallel group named `name`: the commands of its [`branch`](Self::branch)es are
    /// sent at once, and the group succeeds when every branch has replied with success.
    /// When one branch fails, the others are compensated (those that succeeded, and those
    /// not answered yet: a branch's compensation reaches its participant after its
    /// command, on the same partition) and then the steps before the group, in reverse.
    ///
    /// The group's [`timeout`](Self::timeout) and [`retries`](Self::retries) apply to it
    /// as a whole: a retry sends again the commands of the branches that did not answer.
    pub fn parallel(name: &'static str) -> Self {
        Self::new(name)
    }

    /// Adds a branch to a parallel group: a step that sends a command (not a local step,
    /// an awaited event or a group), with its replies and compensation. Its own timeout
    /// and retries are not used: the group's are.
    pub fn branch(mut self, branch: Step<D>) -> Self {
        self.branches.push(branch);
        self
    }

    /// The command the step sends, made from the saga's data.
    pub fn command(mut self, command: impl Fn(&D) -> Result<Command> + Send + Sync + 'static) -> Self {
        self.command = Some(Arc::new(command));
        self
    }

    /// Instead of sending a command, the step runs `step` in the orchestrator's own
    /// transaction (a local step: mark the quote `Pending Stock`, say), then moves on.
    pub fn local(mut self, step: impl LocalStep<D>) -> Self {
        self.local = Some(Arc::new(step));
        self
    }

    /// Undoes a local step, in the orchestrator's own transaction.
    pub fn compensate_locally(mut self, step: impl LocalStep<D>) -> Self {
        self.local_compensation = Some(Arc::new(step));
        self
    }

    /// Instead of sending a command, the step awaits an event (the ADR's event-driven
    /// flow: `QuoteCreated` → `StockReserved` or `StockReservationFailed`). `key` is the
    /// saga's correlation key, from its data; [`on_event`](Self::on_event) and
    /// [`on_failure_event`](Self::on_failure_event) say which events end the wait and
    /// where their key is. The step's timeout is the event's deadline. Events are handed
    /// to the orchestrator by [`Orchestrator::events`](crate::Orchestrator::events).
    pub fn awaits(mut self, key: impl Fn(&D) -> String + Send + Sync + 'static) -> Self {
        self.awaiting().key = Some(Arc::new(key));
        self
    }

    fn awaiting(&mut self) -> &mut Awaits<D> {
        self.awaits.get_or_insert_with(|| Awaits {
            key: None,
            events: Vec::new(),
        })
    }

    /// An event of type `M` whose key (`key`) matches ends the wait with success;
    /// `apply` records what it says.
    pub fn on_event<M: Message>(
        mut self,
        key: impl Fn(&M) -> String + Send + Sync + 'static,
        apply: impl Fn(&mut D, M) + Send + Sync + 'static,
    ) -> Self {
        let key = Arc::new(key);
        let read_key = {
            let key = Arc::clone(&key);
            Arc::new(move |registry: &Registry, event: &Envelope| {
                let message = registry.decode::<M>(event).map_err(SagaError::Message)?;
                Ok(key(&message))
            })
        };
        let apply: ApplyFn<D> = Arc::new(move |data, registry, event| {
            let message = registry.decode::<M>(event).map_err(SagaError::Message)?;
            apply(data, message);
            Ok(())
        });
        self.awaiting().events.push((M::TYPE, read_key, Some(apply)));
        self
    }

    /// An event of type `M` whose key matches ends the wait with failure.
    pub fn on_failure_event<M: Message>(mut self, key: impl Fn(&M) -> String + Send + Sync + 'static) -> Self {
        let read_key: EventKeyFn = Arc::new(move |registry, event| {
            let message = registry.decode::<M>(event).map_err(SagaError::Message)?;
            Ok(key(&message))
        });
        self.awaiting().events.push((M::TYPE, read_key, None));
        self
    }

    /// A reply of type `M` means success; `apply` records what it says in the saga's data.
    pub fn on_success<M: Message>(mut self, apply: impl Fn(&mut D, M) + Send + Sync + 'static) -> Self {
        self.success.push((
            M::TYPE,
            Arc::new(move |data, registry, reply| {
                let message = registry.decode::<M>(reply).map_err(SagaError::Message)?;
                apply(data, message);
                Ok(())
            }),
        ));
        self
    }

    /// A reply of type `M` means the step failed: the saga compensates the steps before it.
    pub fn on_failure<M: Message>(mut self) -> Self {
        self.failure.insert(M::TYPE);
        self
    }

    /// The command that undoes the step, sent in reverse order when a later step fails.
    /// The participant answers [`Compensated`] (also when there is nothing to undo) or
    /// [`CompensationFailed`].
    pub fn compensate(mut self, command: impl Fn(&D) -> Result<Command> + Send + Sync + 'static) -> Self {
        self.compensation = Some(Arc::new(command));
        self
    }

    /// How long the step waits for its reply (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times the command is sent again after a timeout before the step counts
    /// as failed (default 0). A command sent again has a new message id, so the inbox does
    /// not recognise it: participants must be idempotent for it.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
}

/// A saga type at one version: its steps in order.
///
/// An instance keeps the version it started with and finishes under that version's
/// steps, so register the older version beside the new one until its instances end.
pub struct Definition<D> {
    name: &'static str,
    version: u32,
    steps: Vec<Step<D>>,
}

impl<D> fmt::Debug for Definition<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Definition")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .finish()
    }
}

impl<D: Serialize + DeserializeOwned + Send + Sync + 'static> Definition<D> {
    /// The saga type `name` at `version`, with no step yet.
    pub fn new(name: &'static str, version: u32) -> Self {
        Self {
            name,
            version,
            steps: Vec::new(),
        }
    }

    /// Adds the next step.
    pub fn step(mut self, step: Step<D>) -> Self {
        self.steps.push(step);
        self
    }

    /// Checks the definition: at least one step, unique names, a command and at least one
    /// success reply per step, a timeout above zero.
    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |reason: String| SagaError::InvalidConfig {
            setting: "saga definition",
            reason: format!("{} v{}: {reason}", self.name, self.version),
        };
        if self.steps.is_empty() {
            return Err(invalid(String::from("has no step")));
        }
        let mut names = BTreeSet::new();
        for step in &self.steps {
            if !names.insert(step.name) {
                return Err(invalid(format!("two steps are named {:?}", step.name)));
            }
            if !step.branches.is_empty() {
                self.validate_group(step, &mut names).map_err(invalid)?;
                continue;
            }
            let kinds = usize::from(step.command.is_some())
                + usize::from(step.awaits.is_some())
                + usize::from(step.local.is_some());
            if kinds > 1 {
                return Err(invalid(format!(
                    "step {:?} may either send a command, await an event or run locally, not both",
                    step.name
                )));
            }
            if step.compensation.is_some() && step.local_compensation.is_some() {
                return Err(invalid(format!("step {:?} has two compensations", step.name)));
            }
            match (&step.command, &step.awaits) {
                _ if step.local.is_some() => {}
                (None, None) => return Err(invalid(format!("step {:?} has no command", step.name))),
                (Some(_), None) if step.success.is_empty() => {
                    return Err(invalid(format!("step {:?} has no success reply", step.name)));
                }
                (None, Some(awaits)) if !awaits.events.iter().any(|(_, _, apply)| apply.is_some()) => {
                    return Err(invalid(format!("step {:?} awaits no success event", step.name)));
                }
                (None, Some(awaits)) if awaits.key.is_none() => {
                    return Err(invalid(format!(
                        "step {:?} awaits events without a key (`awaits`)",
                        step.name
                    )));
                }
                _ => {}
            }
            if step.timeout.is_zero() {
                return Err(invalid(format!("step {:?} has a zero timeout", step.name)));
            }
        }
        Ok(())
    }

    /// A parallel group: nothing of its own but a timeout and retries; at least two
    /// branches, each a command with a success reply.
    fn validate_group(&self, group: &Step<D>, names: &mut BTreeSet<&'static str>) -> Result<(), String> {
        let name = group.name;
        if group.command.is_some()
            || group.local.is_some()
            || group.awaits.is_some()
            || group.compensation.is_some()
            || group.local_compensation.is_some()
            || !group.success.is_empty()
            || !group.failure.is_empty()
        {
            return Err(format!(
                "parallel group {name:?} has a command, replies or a compensation of its own: its branches do"
            ));
        }
        if group.branches.len() < 2 {
            return Err(format!("parallel group {name:?} has fewer than two branches"));
        }
        if group.timeout.is_zero() {
            return Err(format!("parallel group {name:?} has a zero timeout"));
        }
        for branch in &group.branches {
            if !names.insert(branch.name) {
                return Err(format!("two steps are named {:?}", branch.name));
            }
            if branch.command.is_none()
                || branch.local.is_some()
                || branch.awaits.is_some()
                || branch.local_compensation.is_some()
                || !branch.branches.is_empty()
            {
                return Err(format!(
                    "branch {:?} of {name:?} must send a command (not run locally, await an event or be a group)",
                    branch.name
                ));
            }
            if branch.success.is_empty() {
                return Err(format!("branch {:?} of {name:?} has no success reply", branch.name));
            }
        }
        Ok(())
    }

    /// A step, or a branch of a parallel group.
    fn at(&self, step: usize, branch: Option<usize>) -> Option<&Step<D>> {
        let step = self.steps.get(step)?;
        match branch {
            None => Some(step),
            Some(branch) => step.branches.get(branch),
        }
    }
}

impl<D: Serialize + DeserializeOwned + Send + Sync + 'static> Definition<D> {
    /// Makes a step's command or compensation from the saga's data.
    fn make(
        &self,
        step: usize,
        branch: Option<usize>,
        data: &Value,
        pick: impl Fn(&Step<D>) -> Option<&CommandFn<D>>,
        what: &str,
    ) -> Result<Command> {
        let make = self
            .at(step, branch)
            .and_then(pick)
            .ok_or_else(|| SagaError::InvalidConfig {
                setting: "saga step",
                reason: format!("{} step {step} has no {what}", self.name),
            })?;
        let data: D = serde_json::from_value(data.clone()).map_err(SagaError::Data)?;
        make(&data)
    }
}

/// What a reply to a step's command means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure(String),
}

/// A definition with its data type erased: the orchestrator keeps data as JSON.
pub(crate) trait Saga: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    fn steps(&self) -> usize;
    fn step_name(&self, step: usize) -> &'static str;
    /// A parallel group's branch count (0: not a group).
    fn branches(&self, step: usize) -> usize;
    fn branch_name(&self, step: usize, branch: usize) -> &'static str;
    /// Whether the step (for a group: any branch) has a compensation.
    fn has_compensation(&self, step: usize) -> bool;
    fn branch_has_compensation(&self, step: usize, branch: usize) -> bool;
    /// Whether the step (or its compensation) runs locally.
    fn is_local(&self, step: usize, compensation: bool) -> bool;
    /// Runs a local step (`compensation`: its local compensation); `None` when the step
    /// (or its compensation) is not local.
    fn run_local<'a>(
        &'a self,
        step: usize,
        compensation: bool,
        conn: &'a mut PgConnection,
        data: &'a mut Value,
    ) -> Option<BoxFuture<'a, Result<bool>>>;
    fn timeout(&self, step: usize) -> Duration;
    fn retries(&self, step: usize) -> u32;
    /// The command of a step or of a group's branch.
    fn command(&self, step: usize, branch: Option<usize>, data: &Value) -> Result<Command>;
    fn compensation(&self, step: usize, branch: Option<usize>, data: &Value) -> Result<Command>;
    /// Classifies a reply to the command of a step or branch and, on success, applies it
    /// to the data.
    fn reply(
        &self,
        step: usize,
        branch: Option<usize>,
        data: &mut Value,
        registry: &Registry,
        reply: &Envelope,
    ) -> Result<Outcome>;
    /// For a step that awaits an event: the key the instance waits under.
    fn await_key(&self, step: usize, data: &Value) -> Result<Option<String>>;
    /// The steps that await events of this type, with the key the event carries for each.
    fn listeners(&self, registry: &Registry, event: &Envelope) -> Result<Vec<(usize, String)>>;
    /// Classifies an awaited event and, on success, applies it to the data.
    fn event(&self, step: usize, data: &mut Value, registry: &Registry, event: &Envelope) -> Result<Outcome>;
}

/// The key an instance awaiting `step` of `saga` waits under.
pub(crate) fn await_key(saga: &str, step: &str, key: &str) -> String {
    format!("{saga}\u{1f}{step}\u{1f}{key}")
}

impl<D: Serialize + DeserializeOwned + Send + Sync + 'static> Saga for Definition<D> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn steps(&self) -> usize {
        self.steps.len()
    }
    fn step_name(&self, step: usize) -> &'static str {
        self.steps.get(step).map_or("?", |s| s.name)
    }
    fn branches(&self, step: usize) -> usize {
        self.steps.get(step).map_or(0, |s| s.branches.len())
    }
    fn branch_name(&self, step: usize, branch: usize) -> &'static str {
        self.at(step, Some(branch)).map_or("?", |s| s.name)
    }
    fn has_compensation(&self, step: usize) -> bool {
        self.steps.get(step).is_some_and(|s| {
            s.compensation.is_some()
                || s.local_compensation.is_some()
                || s.branches.iter().any(|b| b.compensation.is_some())
        })
    }
    fn branch_has_compensation(&self, step: usize, branch: usize) -> bool {
        self.at(step, Some(branch)).is_some_and(|b| b.compensation.is_some())
    }

    fn is_local(&self, step: usize, compensation: bool) -> bool {
        self.steps.get(step).is_some_and(|s| {
            if compensation {
                s.local_compensation.is_some()
            } else {
                s.local.is_some()
            }
        })
    }

    fn run_local<'a>(
        &'a self,
        step: usize,
        compensation: bool,
        conn: &'a mut PgConnection,
        data: &'a mut Value,
    ) -> Option<BoxFuture<'a, Result<bool>>> {
        let step = self.steps.get(step)?;
        let local = if compensation {
            &step.local_compensation
        } else {
            &step.local
        };
        let local = Arc::clone(local.as_ref()?);
        Some(Box::pin(async move {
            let mut typed: D = serde_json::from_value(data.clone()).map_err(SagaError::Data)?;
            let succeeded = local.run(conn, &mut typed).await?;
            *data = serde_json::to_value(&typed).map_err(SagaError::Data)?;
            Ok(succeeded)
        }))
    }
    fn timeout(&self, step: usize) -> Duration {
        self.steps.get(step).map_or(Duration::from_secs(30), |s| s.timeout)
    }
    fn retries(&self, step: usize) -> u32 {
        self.steps.get(step).map_or(0, |s| s.retries)
    }

    fn command(&self, step: usize, branch: Option<usize>, data: &Value) -> Result<Command> {
        self.make(step, branch, data, |s| s.command.as_ref(), "command")
    }

    fn compensation(&self, step: usize, branch: Option<usize>, data: &Value) -> Result<Command> {
        self.make(step, branch, data, |s| s.compensation.as_ref(), "compensation")
    }

    fn await_key(&self, step: usize, data: &Value) -> Result<Option<String>> {
        let Some(awaits) = self.steps.get(step).and_then(|s| s.awaits.as_ref()) else {
            return Ok(None);
        };
        let Some(key) = &awaits.key else {
            return Ok(None);
        };
        let data: D = serde_json::from_value(data.clone()).map_err(SagaError::Data)?;
        Ok(Some(await_key(self.name, self.step_name(step), &key(&data))))
    }

    fn listeners(&self, registry: &Registry, event: &Envelope) -> Result<Vec<(usize, String)>> {
        let mut found = Vec::new();
        for (index, step) in self.steps.iter().enumerate() {
            let Some(awaits) = &step.awaits else { continue };
            for (message_type, read_key, _) in &awaits.events {
                if *message_type == event.message_type {
                    found.push((index, await_key(self.name, step.name, &read_key(registry, event)?)));
                }
            }
        }
        Ok(found)
    }

    fn event(&self, step: usize, data: &mut Value, registry: &Registry, event: &Envelope) -> Result<Outcome> {
        let unexpected = || SagaError::UnexpectedReply {
            saga: self.name.to_owned(),
            step: self.step_name(step).to_owned(),
            message_type: event.message_type.clone(),
        };
        let awaits = self
            .steps
            .get(step)
            .and_then(|s| s.awaits.as_ref())
            .ok_or_else(unexpected)?;
        let (_, _, apply) = awaits
            .events
            .iter()
            .find(|(t, _, _)| *t == event.message_type)
            .ok_or_else(unexpected)?;
        let Some(apply) = apply else {
            return Ok(Outcome::Failure(format!(
                "{} received {}",
                self.step_name(step),
                event.message_type
            )));
        };
        let mut typed: D = serde_json::from_value(data.clone()).map_err(SagaError::Data)?;
        apply(&mut typed, registry, event)?;
        *data = serde_json::to_value(&typed).map_err(SagaError::Data)?;
        Ok(Outcome::Success)
    }

    fn reply(
        &self,
        step: usize,
        branch: Option<usize>,
        data: &mut Value,
        registry: &Registry,
        reply: &Envelope,
    ) -> Result<Outcome> {
        let unexpected = || SagaError::UnexpectedReply {
            saga: self.name.to_owned(),
            step: branch
                .map_or_else(|| self.step_name(step), |b| self.branch_name(step, b))
                .to_owned(),
            message_type: reply.message_type.clone(),
        };
        let step = self.at(step, branch).ok_or_else(unexpected)?;
        if step.failure.contains(reply.message_type.as_str()) {
            return Ok(Outcome::Failure(format!(
                "{} replied {}",
                step.name, reply.message_type
            )));
        }
        let (_, apply) = step
            .success
            .iter()
            .find(|(t, _)| *t == reply.message_type)
            .ok_or_else(unexpected)?;
        let mut typed: D = serde_json::from_value(data.clone()).map_err(SagaError::Data)?;
        apply(&mut typed, registry, reply)?;
        *data = serde_json::to_value(&typed).map_err(SagaError::Data)?;
        Ok(Outcome::Success)
    }
}
