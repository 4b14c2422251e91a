//! The start-up of a dbps service, written once.
//!
//! Every service of a database-per-service system starts the same way: read its
//! configuration, provision and migrate its own database, connect as its runtime role,
//! run the outbox relay and its consumers, serve HTTP with health and metrics, and stop
//! all of it cleanly on SIGTERM. This crate is that sequence as a few explicit calls — not
//! a framework that owns `main` or hides tokio:
//!
//! ```no_run
//! use dbps_outbox::Relay;
//! use dbps_outbox::pg::PgOutboxStore;
//! use dbps_service::{Service, ServiceConfig};
//!
//! # static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../dbps-migrate/tests/fixtures/pg/customer_v1");
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     dbps_service::init_tracing();
//!     let mut service = Service::new(ServiceConfig::from_env("orders")?);
//!     // Its own database: provisioned, migrated as the owner, used as the runtime role.
//!     let pool = service
//!         .postgres(&[("dbps_outbox", &dbps_outbox::pg::MIGRATOR), ("orders", &MIGRATOR)])
//!         .await?;
//!     // The relay publishes what the handlers write through `service.outbox()`.
//!     let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?).build()?;
//!     service.run_relay(relay);
//!     let router = axum::Router::new(); // the service's own routes, with `pool` as state
//!     service.serve(router).await?; // until SIGTERM; then everything stops cleanly
//!     Ok(())
//! }
//! ```
//!
//! # One name, and the names derived from it
//!
//! A service has one name (`orders`, a [`ServiceName`](dbps_migrate::ServiceName)); the
//! others follow from it unless set explicitly:
//!
//! | what | name | from |
//! |---|---|---|
//! | database and schema | `orders` | `PgService` |
//! | owner and runtime roles | `orders_owner`, `orders_app` | `PgService` |
//! | message source (CloudEvents `source`) | `orders` | [`Service::outbox`] |
//! | an aggregate's event topic | `orders.order.events` | [`Service::naming`] |
//! | commands to it, its replies | `orders.commands`, `orders.replies` | [`Service::naming`] |
//! | a consumer group, and its inbox consumer name | `orders.<consumer>` | [`Service::group`] |
//! | that consumer's dead-letter topic | `orders.<consumer>.dlq` | `TopicNaming::dead_letter` |
//! | its secrets | `ORDERS_DB_OWNER_PASSWORD`, ... | [`ServiceConfig::from_env`] |
//!
//! The binary's name (`orders-service`) is free.
//!
//! # The HTTP edge
//!
//! [`http`] gives every client mistake one shape — a 4xx RFC 9457 problem — checked before
//! anything is written, optimistic concurrency with `If-Match`, and `Idempotency-Key` for
//! `POST` endpoints ([`http::idempotency`]).
//!
//! # Calling other services
//!
//! [`client::ServiceClient`] calls another service's REST API: a deadline per request,
//! retries of idempotent calls, a circuit breaker per target, problems as typed errors,
//! the trace context and metrics.
//!
//! # Logs and metrics
//!
//! [`init_tracing`] logs to standard error with `RUST_LOG`, or [`DEFAULT_LOG_FILTER`]
//! when it is unset. `/metrics` renders every dbps metric (`dbps_outbox_*`,
//! `dbps_consumer_*`, ...) and the service's own in the Prometheus text format.

pub mod client;
mod config;
mod error;
pub mod http;
mod service;

pub use config::ServiceConfig;
pub use error::{BoxError, Result, ServiceError};
pub use service::{CONSUMED_TOPIC_PARTITIONS, Service};

/// The log filter a service uses when `RUST_LOG` is not set: the service and dbps at
/// `info`; sqlx and librdkafka, whose `info` lines are per statement or per connection,
/// at `warn`.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,rdkafka=warn,librdkafka=warn";

/// Logs to standard error, filtered by `RUST_LOG` or [`DEFAULT_LOG_FILTER`]. Call it once,
/// first thing in `main`; a second call leaves the first subscriber in place.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
