//! Real servers for integration tests: PostgreSQL, Apache Kafka, MongoDB, Redis, an SMTP
//! server (Mailpit) and OpenSearch.
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
//!    `DBPS_REDIS_URL`, and for Mailpit both `DBPS_SMTP_URL` (`smtp://host:port`) and
//!    `DBPS_MAILPIT_URL` (its HTTP API, `http://host:port`), and `DBPS_OPENSEARCH_URL`
//!    (`http://host:port`). `scripts/stack.sh env` prints
//!    them for the local stack;
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
//! | Mailpit | [`TestMailpit`] | addresses with a unique tag, `name+<tag>@example.test` |
//! | OpenSearch | [`TestOpenSearch`] | index and alias names with a unique prefix |
//!
//! Tests in one binary can therefore run in parallel without seeing each other's data.
//!
//! # Services, topics and waiting
//!
//! - `service()` (feature `service`) provisions a service the way production does — its
//!   own database, owner and runtime roles, the migration components it names — and
//!   removes all of it when the `TestService` drops, also after a failed assertion.
//! - [`TestKafka::naming`] gives the default topic naming under the test's prefix, so a
//!   service under test keeps its real topic names; every topic with the prefix (dead
//!   letters included) is deleted with the handle. [`TestKafka::reader`] reads what
//!   reached a topic, up to a count or to the end, and [`TestKafka::caught_up`] waits until
//!   a consumer group has committed everything.
//! - [`TestMailpit`] reads back what a service sent over SMTP: the messages that reached
//!   an address, one message's bodies and attachments, its raw source, and
//!   [`TestMailpit::wait_for`] a number of messages, with a deadline.
//! - [`eventually`] and [`wait_for`] poll a condition with a deadline: no sleeps.
//! - [`FaultyLink`] sits between a client and a real server and turns the connections
//!   half-open (nothing answers, nothing closes) or cuts them, to test timeouts.
//!
//! # Feature flags
//!
//! Each backend is a feature, so a service's tests compile only the clients they use:
//! `postgres`, `kafka`, `mongodb`, `redis`, `smtp` (Mailpit), `opensearch` (all six by
//! default) and
//! `service` (a provisioned service per test, through `dbps-migrate`).

mod error;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "smtp")]
mod mailpit;
#[cfg(feature = "mongodb")]
mod mongo;
mod net;
#[cfg(feature = "opensearch")]
mod opensearch;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod secure;
mod server;
#[cfg(feature = "service")]
mod service;
mod wait;

pub use error::{Error, Result};
#[cfg(feature = "kafka")]
pub use kafka::{TestKafka, TopicReader, header, kafka};
#[cfg(feature = "smtp")]
pub use mailpit::{MAIL_DOMAIN, MailAttachment, MailContent, MailMessage, TestMailpit, mailpit};
#[cfg(feature = "mongodb")]
pub use mongo::{TestMongo, mongo};
pub use net::FaultyLink;
#[cfg(feature = "opensearch")]
pub use opensearch::{TestOpenSearch, opensearch};
#[cfg(feature = "postgres")]
pub use postgres::{TestPostgres, postgres};
#[cfg(feature = "redis")]
pub use redis::{RedisProcess, TestRedis, redis, redis_process};
pub use secure::{SecureStack, secure};
pub use server::{Backend, MAILPIT_API_VAR};
#[cfg(feature = "service")]
pub use service::{TestService, TestServiceBuilder, service};
pub use wait::{DEADLINE, eventually, wait_for};

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
