//! The saga state machine, free of I/O: given where an instance is and what happened, where
//! it goes and what it sends.

use std::fmt;
use std::time::Duration;

/// Where a saga instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SagaState {
    /// A step's command was sent; its reply is awaited.
    Running,
    /// A step's compensation was sent; its acknowledgement is awaited.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was compensated.
    Compensated,
    /// A compensation kept failing; an operator retries it or resolves the saga.
    Stuck,
}

impl SagaState {
    /// The state's name in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Stuck => "stuck",
        }
    }

    /// Parses a state's name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "compensated" => Self::Compensated,
            "stuck" => Self::Stuck,
            _ => return None,
        })
    }

    /// Completed or compensated: nothing more happens.
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the machine needs to know of a definition.
pub(crate) trait Shape {
    fn steps(&self) -> usize;
    /// The step's name, for the reasons the machine writes.
    fn name(&self, step: usize) -> &str;
    /// Whether the step is a parallel group.
    fn is_group(&self, step: usize) -> bool;
    fn has_compensation(&self, step: usize) -> bool;
    fn timeout(&self, step: usize) -> Duration;
    fn retries(&self, step: usize) -> u32;
}

/// How compensations are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompensationPolicy {
    /// Attempts before the saga is stuck (at least 1).
    pub(crate) attempts: u32,
    /// How long a compensation waits for its acknowledgement.
    pub(crate) timeout: Duration,
    /// The first retry's delay; doubled per attempt, at most `max_backoff`.
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
}

impl CompensationPolicy {
    fn delay(&self, attempt: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff)
    }
}

/// Where an instance is: its state, step and attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) state: SagaState,
    pub(crate) step: usize,
    pub(crate) attempt: u32,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// The awaited reply says the step (or compensation) succeeded.
    Succeeded,
    /// The awaited reply says it failed.
    Failed(String),
    /// The deadline passed without the awaited reply.
    TimedOut,
    /// An operator retries a stuck saga's compensation.
    Retry,
}

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Send {
    Command(usize),
    Compensation(usize),
}

/// The outcome of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) to: Position,
    pub(crate) send: Option<Send>,
    /// When the new position times out (`None`: it does not wait).
    pub(crate) wait: Option<Duration>,
    pub(crate) error: Option<String>,
}

/// The first position of a saga: its first step's command sent.
pub(crate) fn start(shape: &impl Shape) -> Plan {
    Plan {
        to: Position {
            state: SagaState::Running,
            step: 0,
            attempt: 0,
        },
        send: Some(Send::Command(0)),
        wait: Some(shape.timeout(0)),
        error: None,
    }
}

/// Compensates the steps before `below`, the newest first; compensated when none has a
/// compensation.
fn compensate_below(shape: &impl Shape, policy: &CompensationPolicy, below: usize, error: Option<String>) -> Plan {
    match (0..below).rev().find(|&step| shape.has_compensation(step)) {
        Some(step) => Plan {
            to: Position {
                state: SagaState::Compensating,
                step,
                attempt: 0,
            },
            send: Some(Send::Compensation(step)),
            wait: Some(policy.timeout),
            error,
        },
        None => Plan {
            to: Position {
                state: SagaState::Compensated,
                step: below.saturating_sub(1),
                attempt: 0,
            },
            send: None,
            wait: None,
            error,
        },
    }
}

/// The transition from `at` on `input`; `None` when the input does not apply (a final
/// saga, a retry of a saga that is not stuck).
pub(crate) fn next(shape: &impl Shape, policy: &CompensationPolicy, at: Position, input: Input) -> Option<Plan> {
    match (at.state, input) {
        (SagaState::Running, Input::Succeeded) if at.step + 1 < shape.steps() => Some(Plan {
            to: Position {
                state: SagaState::Running,
                step: at.step + 1,
                attempt: 0,
            },
            send: Some(Send::Command(at.step + 1)),
            wait: Some(shape.timeout(at.step + 1)),
            error: None,
        }),
        (SagaState::Running, Input::Succeeded) => Some(Plan {
            to: Position {
                state: SagaState::Completed,
                ..at
            },
            send: None,
            wait: None,
            error: None,
        }),
        // A branch of a parallel group said no: the group's other branches are undone
        // (the orchestrator knows which branch failed and leaves it), then the steps before.
        (SagaState::Running, Input::Failed(reason)) if shape.is_group(at.step) => {
            Some(compensate_below(shape, policy, at.step + 1, Some(reason)))
        }
        // The step said no: it did nothing, the steps before it are undone.
        (SagaState::Running, Input::Failed(reason)) => Some(compensate_below(shape, policy, at.step, Some(reason))),
        (SagaState::Running, Input::TimedOut) if at.attempt < shape.retries(at.step) => Some(Plan {
            to: Position {
                attempt: at.attempt + 1,
                ..at
            },
            send: Some(Send::Command(at.step)),
            wait: Some(shape.timeout(at.step)),
            error: None,
        }),
        // Nobody knows whether the step happened: it is compensated too (compensations
        // are idempotent and answer `Compensated` when there is nothing to undo).
        (SagaState::Running, Input::TimedOut) => Some(compensate_below(
            shape,
            policy,
            at.step + 1,
            Some(format!("step {} timed out", shape.name(at.step))),
        )),
        (SagaState::Compensating, Input::Succeeded) => Some(compensate_below(shape, policy, at.step, None)),
        (SagaState::Compensating, Input::Failed(reason)) => Some(retry_compensation(policy, at, reason)),
        (SagaState::Compensating, Input::TimedOut) => Some(retry_compensation(
            policy,
            at,
            format!("compensation of step {} timed out", shape.name(at.step)),
        )),
        (SagaState::Stuck, Input::Retry) => Some(Plan {
            to: Position {
                state: SagaState::Compensating,
                step: at.step,
                attempt: 0,
            },
            send: Some(Send::Compensation(at.step)),
            wait: Some(policy.timeout),
            error: None,
        }),
        _ => None,
    }
}

fn retry_compensation(policy: &CompensationPolicy, at: Position, reason: String) -> Plan {
    if at.attempt + 1 >= policy.attempts {
        return Plan {
            to: Position {
                state: SagaState::Stuck,
                ..at
            },
            send: None,
            wait: None,
            error: Some(format!("{reason}; gave up after {} attempts", policy.attempts)),
        };
    }
    // Sent again after a backoff: the deadline is the backoff, then the timeout.
    Plan {
        to: Position {
            attempt: at.attempt + 1,
            ..at
        },
        send: Some(Send::Compensation(at.step)),
        wait: Some(policy.delay(at.attempt) + policy.timeout),
        error: Some(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three steps; the second has no compensation; one retry on timeout.
    struct Three;

    impl Shape for Three {
        fn steps(&self) -> usize {
            3
        }
        fn name(&self, step: usize) -> &str {
            ["first", "second", "third"][step]
        }
        fn is_group(&self, _: usize) -> bool {
            false
        }
        fn has_compensation(&self, step: usize) -> bool {
            step != 1
        }
        fn timeout(&self, _: usize) -> Duration {
            Duration::from_secs(5)
        }
        fn retries(&self, _: usize) -> u32 {
            1
        }
    }

    const POLICY: CompensationPolicy = CompensationPolicy {
        attempts: 3,
        timeout: Duration::from_secs(5),
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
    };

    fn at(state: SagaState, step: usize, attempt: u32) -> Position {
        Position { state, step, attempt }
    }

    fn go(at: Position, input: Input) -> Plan {
        next(&Three, &POLICY, at, input).expect("a transition")
    }

    #[test]
    fn success_runs_every_step_then_completes() {
        assert_eq!(start(&Three).send, Some(Send::Command(0)));
        let second = go(at(SagaState::Running, 0, 0), Input::Succeeded);
        assert_eq!(
            (second.to, second.send),
            (at(SagaState::Running, 1, 0), Some(Send::Command(1)))
        );
        let done = go(at(SagaState::Running, 2, 0), Input::Succeeded);
        assert_eq!(
            (done.to.state, done.send, done.wait),
            (SagaState::Completed, None, None)
        );
    }

    #[test]
    fn a_failed_step_compensates_the_earlier_ones_newest_first_skipping_those_without() {
        let plan = go(at(SagaState::Running, 2, 0), Input::Failed("no".into()));
        // Step 1 has no compensation: step 0 is next.
        assert_eq!(
            (plan.to, plan.send),
            (at(SagaState::Compensating, 0, 0), Some(Send::Compensation(0)))
        );
        let done = go(plan.to, Input::Succeeded);
        assert_eq!(done.to.state, SagaState::Compensated);
        // Failing at the first step: nothing to undo.
        assert_eq!(
            go(at(SagaState::Running, 0, 0), Input::Failed("no".into())).to.state,
            SagaState::Compensated
        );
    }

    #[test]
    fn a_failed_branch_compensates_its_own_group_then_the_earlier_steps() -> Result<(), &'static str> {
        /// `Three` whose last step is a parallel group.
        struct Grouped;
        impl Shape for Grouped {
            fn steps(&self) -> usize {
                Three.steps()
            }
            fn name(&self, step: usize) -> &str {
                ["first", "second", "third"][step]
            }
            fn is_group(&self, step: usize) -> bool {
                step == 2
            }
            fn has_compensation(&self, step: usize) -> bool {
                Three.has_compensation(step)
            }
            fn timeout(&self, step: usize) -> Duration {
                Three.timeout(step)
            }
            fn retries(&self, step: usize) -> u32 {
                Three.retries(step)
            }
        }
        // A failing branch leaves siblings to undo in the group itself.
        let plan = next(
            &Grouped,
            &POLICY,
            at(SagaState::Running, 2, 0),
            Input::Failed("no".into()),
        )
        .ok_or("stays")?;
        assert_eq!(
            (plan.to, plan.send),
            (at(SagaState::Compensating, 2, 0), Some(Send::Compensation(2)))
        );
        let then = next(&Grouped, &POLICY, plan.to, Input::Succeeded).ok_or("stays")?;
        assert_eq!(then.send, Some(Send::Compensation(0)));
        Ok(())
    }

    #[test]
    fn a_timeout_resends_then_compensates_the_timed_out_step_too() {
        let again = go(at(SagaState::Running, 2, 0), Input::TimedOut);
        assert_eq!(
            (again.to, again.send),
            (at(SagaState::Running, 2, 1), Some(Send::Command(2)))
        );
        let undo = go(again.to, Input::TimedOut);
        assert_eq!(
            (undo.to, undo.send),
            (at(SagaState::Compensating, 2, 0), Some(Send::Compensation(2)))
        );
    }

    #[test]
    fn a_failing_compensation_backs_off_then_sticks_and_an_operator_retry_resumes_it() {
        let first = go(at(SagaState::Compensating, 2, 0), Input::Failed("busy".into()));
        assert_eq!(first.to, at(SagaState::Compensating, 2, 1));
        assert_eq!(first.wait, Some(Duration::from_secs(1 + 5)));
        let second = go(first.to, Input::TimedOut);
        assert_eq!(second.wait, Some(Duration::from_secs(2 + 5)));
        let stuck = go(second.to, Input::Failed("busy".into()));
        assert_eq!((stuck.to.state, stuck.send), (SagaState::Stuck, None));
        assert!(stuck.error.is_some_and(|e| e.contains("3 attempts")));
        let resumed = go(stuck.to, Input::Retry);
        assert_eq!(
            (resumed.to, resumed.send),
            (at(SagaState::Compensating, 2, 0), Some(Send::Compensation(2)))
        );
    }

    #[test]
    fn final_sagas_and_misplaced_inputs_do_not_move() {
        for state in [SagaState::Completed, SagaState::Compensated] {
            for input in [
                Input::Succeeded,
                Input::Failed("x".into()),
                Input::TimedOut,
                Input::Retry,
            ] {
                assert_eq!(next(&Three, &POLICY, at(state, 1, 0), input), None);
            }
        }
        assert_eq!(next(&Three, &POLICY, at(SagaState::Running, 0, 0), Input::Retry), None);
        assert_eq!(
            next(&Three, &POLICY, at(SagaState::Stuck, 0, 0), Input::Succeeded),
            None
        );
    }

    #[test]
    fn states_round_trip_their_names() {
        for state in [
            SagaState::Running,
            SagaState::Compensating,
            SagaState::Completed,
            SagaState::Compensated,
            SagaState::Stuck,
        ] {
            assert_eq!(SagaState::parse(state.as_str()), Some(state));
        }
        assert_eq!(SagaState::parse("lost"), None);
    }
}
