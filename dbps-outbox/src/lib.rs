//! The transactional outbox: a service's state change and the messages it implies commit
//! together, and a relay gets every committed message onto Kafka — in order per
//! aggregate, at least once, never skipping a late commit.
//!
//! ```no_run
//! use dbps_core::CancellationToken;
//! use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
//! use dbps_migrate::{PgMigrations, ServiceName};
//! use dbps_outbox::Relay;
//! use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct CustomerCreated { id: String }
//! # impl dbps_core::Message for CustomerCreated { const TYPE: &'static str = "customer.CustomerCreated"; }
//!
//! # async fn demo(pool: sqlx::PgPool, owner: sqlx::postgres::PgConnectOptions) -> Result<(), Box<dyn std::error::Error>> {
//! // At every deployment, as the service's owner role: the outbox's tables are one
//! // component of the service's migrations (dbps-migrate; dbps-service does this at start).
//! PgMigrations::new(ServiceName::new("customer")?)
//!     .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
//!     .run(&owner)
//!     .await?;
//!
//! // Writing: inside the service's transaction.
//! let outbox = PgOutbox::new("customer");
//! let mut tx = pool.begin().await?;
//! // ... insert the customer through `tx` ...
//! outbox.enqueue_event(&mut tx, "customer", "c-1", &CustomerCreated { id: "c-1".into() }).await?;
//! tx.commit().await?;
//!
//! // Relaying: in the same process or another one, any number of instances.
//! let publisher = KafkaPublisher::builder(KafkaConfig::new("127.0.0.1:9092").set("message.timeout.ms", "0")).build()?;
//! let relay = Relay::builder(PgOutboxStore::new(pool.clone()), publisher).build()?;
//! let shutdown = CancellationToken::new(); // cancelled on SIGTERM: the relay finishes its batch and leaves
//! relay.run(shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! - `postgres` (default): [`pg::PgOutbox`] and [`pg::PgOutboxStore`].
//! - `mongodb`: `mongo::MongoOutbox` (events in the aggregate's own document, no
//!   transactions needed), `mongo::MongoTransactionalOutbox` and `mongo::MongoOutboxStore`.
//!
//! # Guarantees
//!
//! - **Atomic**: messages are rows in the service's database, written in its transaction.
//!   A rolled-back transaction publishes nothing.
//! - **At least once**: a message is deleted (or marked) only after Kafka acknowledged it.
//! - **Gap-safe**: the relay reads every unpublished row, not "rows after the last id",
//!   so a transaction that took a lower id but committed later is not skipped.
//! - **Ordered per aggregate**: sequence numbers follow commit order (the aggregate's
//!   sequence row is locked until commit), the relay publishes in id order, and relays
//!   share the outbox by hash partitions of the aggregate id.
//! - **Nothing silently dropped**: a message Kafka refuses permanently is parked with its
//!   reason, listed by [`pg::PgOutboxStore::parked`], replayable after a fix.
//! - **Bounded**: published rows are deleted at once by default ([`pg::Retention`]).

mod error;
mod relay;
mod store;

#[cfg(feature = "mongodb")]
pub mod mongo;
#[cfg(feature = "postgres")]
pub mod pg;

pub use error::{OutboxError, Result};
pub use relay::{Relay, RelayBuilder, RelaySummary};
pub use store::{Backlog, OutboxStore, Pending, PoisonPolicy, Retention};
