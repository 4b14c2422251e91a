//! Real servers for integration tests: PostgreSQL, Apache Kafka, MongoDB and Redis.
//!
//! dbps tests every backend behaviour against the real server, and so can the services
//! built on it. Add this crate as a dev-dependency and ask for the backends a test needs:
//!
//! ```no_run
//! # async fn example() -> Result<(), dbps_testkit::Error> {
//! let pg = dbps_testkit::postgres().await?; // a fresh database, dropped afterwards
//! let (n,): (i32,) = sqlx::query_as("select 1").fetch_one(pg.pool()).await?;
//! assert_eq!(n, 1);
//!
//! let kafka = dbps_testkit::kafka().await?;
//! let topic = kafka.create_topic("orders", 3).await?; // unique name, deleted afterwards
//! # let _ = topic;
//! # Ok(()) }
//! ```
//!
//! # Where the servers come from
//!
//! Each backend is resolved once per test binary, in this order:
//!
//! 1. its environment variable, when set: `DBPS_POSTGRES_URL` (a superuser or a role
//!    that may create databases), `DBPS_KAFKA_BROKERS`, `DBPS_MONGODB_URI`,
//!    `DBPS_REDIS_URL`. `scripts/stack.sh env` prints them for the local stack;
//! 2. otherwise a container started with testcontainers, where a Docker engine is
//!    reachable. Containers are shared by the tests of one binary and removed when the
//!    binary exits;
//! 3. otherwise the call fails with [`Error::NoServer`], whose message says to run
//!    `scripts/stack.sh up`. A test that needs a server never skips silently.
//!
//! # Isolation
//!
//! Servers are shared, data is not: every call returns a handle with its own namespace,
//! removed when the handle is dropped (also when the test panics):
//!
//! | backend | handle | namespace |
//! |---|---|---|
//! | PostgreSQL | [`TestPostgres`] | a fresh database |
//! | Kafka | [`TestKafka`] | topic names with a unique prefix |
//! | MongoDB | [`TestMongo`] | a fresh database |
//! | Redis | [`TestRedis`] | a unique key prefix |
//!
//! Tests in one binary can therefore run in parallel without seeing each other's data.

mod error;
mod kafka;
mod mongo;
mod postgres;
mod redis;
mod server;

pub use error::{Error, Result};
pub use kafka::{TestKafka, kafka};
pub use mongo::{TestMongo, mongo};
pub use postgres::{TestPostgres, postgres};
pub use redis::{TestRedis, redis};
pub use server::Backend;

/// A name unique to this call, usable in database, topic and key names.
fn unique_suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Runs `cleanup` to completion on a thread of its own with its own runtime.
///
/// Handles are dropped in whatever context a test ends in: inside a runtime that is about
/// to stop, or while unwinding from a panic. A fresh thread with a fresh runtime is the
/// one place where an async cleanup can always finish, so drop impls send their work here
/// and wait for it.
fn run_cleanup<F>(what: &str, cleanup: F)
where
    F: std::future::Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    let joined = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(cleanup)
    })
    .join();
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => tracing::warn!(%reason, "dbps-testkit could not remove {what}"),
        Err(_) => tracing::warn!("dbps-testkit cleanup of {what} panicked"),
    }
}
