//! Sagas that always finish: a distributed transaction across services that each own
//! their database, as steps with compensations, run by an orchestrator whose state lives
//! in the orchestrating service's own PostgreSQL.
//!
//! - A [`Definition`] names a saga type and version and lists its [`Step`]s: each sends a
//!   [`Command`] to a participant service, names the replies that mean success (which may
//!   update the saga's data) or failure, has a compensation, a timeout and a retry count.
//! - The [`Orchestrator`] starts sagas in the caller's transaction, moves each on its
//!   replies (through the inbox, in the same transaction as the commands the move sends,
//!   through the outbox) and on its deadlines (claimed with `FOR UPDATE SKIP LOCKED`, so
//!   several processes share them). A failed or timed-out step compensates the completed
//!   steps in reverse order; a compensation is retried with backoff and, after its
//!   attempts, the saga is `stuck`, visible to an operator who retries or resolves it.
//! - A [`Participant`] handles a command once (inbox), applies its effect and writes the
//!   reply through the outbox, in one transaction.
//!
//! Every transition is recorded in `dbps_saga_history`. Metrics, labelled by `saga`:
//! `dbps_saga_started_total`, `dbps_saga_completed_total`, `dbps_saga_compensated_total`,
//! `dbps_saga_stuck_total`, `dbps_saga_transitions_total`, `dbps_saga_transition_seconds`,
//! `dbps_saga_late_replies_total` (in flight: started − completed − compensated).
//!
//! ```no_run
//! use std::time::Duration;
//! use dbps_saga::{Command, Definition, Orchestrator, Step};
//! # use dbps_core::Message;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct ReserveStock { quote: String }
//! # impl Message for ReserveStock { const TYPE: &'static str = "inventory.ReserveStock"; }
//! # #[derive(serde::Serialize, serde::Deserialize)] struct ReleaseStock { quote: String }
//! # impl Message for ReleaseStock { const TYPE: &'static str = "inventory.ReleaseStock"; }
//! # #[derive(serde::Serialize, serde::Deserialize)] struct StockReserved { reservation: String }
//! # impl Message for StockReserved { const TYPE: &'static str = "inventory.StockReserved"; }
//! # #[derive(serde::Serialize, serde::Deserialize)] struct StockShort {}
//! # impl Message for StockShort { const TYPE: &'static str = "inventory.StockShort"; }
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct QuoteSaga { quote: String, reservation: Option<String> }
//!
//! let definition = Definition::<QuoteSaga>::new("quote-order", 1).step(
//!     Step::<QuoteSaga>::new("reserve-stock")
//!         .command(|d| Command::to("inventory", &ReserveStock { quote: d.quote.clone() }))
//!         .on_success(|d, r: StockReserved| d.reservation = Some(r.reservation))
//!         .on_failure::<StockShort>()
//!         .compensate(|d| Command::to("inventory", &ReleaseStock { quote: d.quote.clone() }))
//!         .timeout(Duration::from_secs(10)),
//! );
//! let orchestrator = Orchestrator::builder(pool.clone(), "quote").register(definition).build()?;
//! let mut tx = pool.begin().await?;
//! let id = orchestrator
//!     .start(&mut tx, "quote-order", &QuoteSaga { quote: "q-1".into(), reservation: None })
//!     .await?;
//! tx.commit().await?;
//! # let _ = id; Ok(()) }
//! ```
//!
//! A step may also await an event instead of a reply ([`Step::awaits`]), matched by a
//! correlation key, with the step's timeout as its deadline: the ADR's event-driven flow
//! (`QuoteCreated` → `StockReserved` / `StockReservationFailed`) as a persisted state
//! machine. The orchestrator's [`events`](Orchestrator::events) handler takes those events.
//!
//! A step may also run in the orchestrator's own transaction ([`Step::local`], a
//! [`LocalStep`]) and be compensated there ([`Step::compensate_locally`]).
//!
//! On MongoDB (feature `mongodb`), a `MongoParticipant` records a command's effect as one
//! new document that carries the reply in its outbox: one atomic insert, no transaction.
//!
//! A step may also be a parallel group ([`Step::parallel`] with [`Step::branch`]es): the
//! branches' commands leave at once, the group succeeds when all succeeded, and when one
//! fails the others are compensated, then the steps before the group.

mod definition;
mod error;
mod machine;
#[cfg(feature = "mongodb")]
mod mongo;
mod orchestrator;
mod participant;

pub use definition::{BoxFuture, Command, Compensated, CompensationFailed, Definition, LocalStep, Step};
pub use error::{Result, SagaError};
pub use machine::SagaState;
#[cfg(feature = "mongodb")]
pub use mongo::{MongoCommandHandler, MongoParticipant};
pub use orchestrator::{
    Branch, BranchState, DeadlineSummary, Events, MIGRATOR, Orchestrator, OrchestratorBuilder, Replies, SagaInstance,
};
pub use participant::{CommandHandler, Participant, Reply};
