//! The messaging spine of dbps: what every other dbps crate builds on.
//!
//! A system that gives each service its own database can no longer share a transaction
//! between services. What the services share instead are messages, and this crate defines
//! and moves them:
//!
//! - [`Envelope`]: one envelope for events, commands and replies, with event id (UUIDv7),
//!   type and schema version, source service, aggregate type, id and per-aggregate
//!   sequence number, correlation and causation ids and W3C trace context.
//! - [`Message`] and [`Registry`]: Rust types tied to a message type and schema version,
//!   with upcasters for older versions; an unknown type or version is a typed error.
//! - [`PayloadLimits`]: a maximum size and JSON nesting depth checked before anything is
//!   written.
//! - [`wire`]: the CloudEvents 1.0 Kafka protocol binding in binary content mode, so that
//!   services in other languages read dbps messages and dbps reads theirs.
//! - `kafka` (feature `kafka`): topic naming and provisioning, the idempotent
//!   [`KafkaPublisher`](kafka::KafkaPublisher) and the [`ConsumerRunner`](kafka::ConsumerRunner),
//!   which commits an offset only after its message was handled or dead-lettered.
//! - `inbox`: idempotent consumers whose de-duplication record commits with the effect
//!   (feature `postgres`), and event-id-guarded updates for MongoDB (feature `mongodb`).
//!
//! # Example
//!
//! ```
//! use dbps_core::{Envelope, Message, MessageKind, Registry};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct CustomerCreated {
//!     id: String,
//!     name: String,
//! }
//!
//! impl Message for CustomerCreated {
//!     const TYPE: &'static str = "customer.CustomerCreated";
//! }
//!
//! let created = CustomerCreated { id: "c-1".into(), name: "Ada".into() };
//! let envelope = Envelope::event("customer", "customer", "c-1", &created)?;
//! assert_eq!(envelope.kind, MessageKind::Event);
//!
//! let mut registry = Registry::new();
//! registry.register::<CustomerCreated>();
//! let decoded: CustomerCreated = registry.decode(&envelope)?;
//! assert_eq!(decoded, created);
//! # Ok::<(), dbps_core::Error>(())
//! ```
//!
//! # Feature flags
//!
//! - `postgres` (default): the PostgreSQL inbox and migration runner (sqlx).
//! - `kafka` (default): topics, `KafkaPublisher` and `ConsumerRunner` (rdkafka).
//! - `mongodb`: idempotent updates and migrations for MongoDB.
//! - `opentelemetry`: messages take their W3C trace context from the current `tracing`
//!   span ([`TraceContext::current`]), and the consumer runner's span per message
//!   continues the writer's trace. Without it, trace context still travels with every
//!   message (`traceparent`, `tracestate`) and is recorded on the consumer's span.
//!
//! # Guarantees
//!
//! - Every message carries its aggregate's sequence number (events), so consumers can
//!   detect gaps and ignore stale versions.
//! - The consumer runner is at-least-once: an offset is committed only after the message's
//!   handler succeeded or the message went to the dead-letter topic. Combined with the
//!   inbox, each effect is applied exactly once.
//! - Messages of one partition (so of one aggregate) are handled in order; partitions are
//!   handled concurrently.
//! - Nothing is dropped silently: undecodable messages and permanent handler failures go
//!   to the dead-letter topic with the reason and their origin.
//!
//! This crate is deliberately small and slow to change: the other dbps crates depend on
//! it, and it depends on none of them.

pub mod classify;
mod envelope;
mod error;
mod handler;
mod limits;
mod registry;
pub mod wire;

#[cfg(any(feature = "postgres", feature = "mongodb"))]
pub mod inbox;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "postgres")]
pub mod pg;

pub use envelope::{Envelope, MessageKind, TraceContext};
#[cfg(feature = "kafka")]
pub use error::Refusal;
pub use error::{Error, ErrorChain, Result};
pub use handler::{BatchHandler, Handler, HandlerError, MessageSet, OtherTypes, Typed, TypedHandler};
pub use limits::PayloadLimits;
pub use registry::{Message, Registry};
/// The shutdown signal of every long-running dbps part (relay, consumer runner, saga
/// orchestrator, replica projector): cancel it and each finishes its unit of work in
/// flight, commits it, releases its leases and returns its summary. Re-exported so that
/// services and dbps agree on its version.
pub use tokio_util::sync::CancellationToken;
