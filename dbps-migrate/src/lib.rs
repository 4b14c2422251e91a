//! Per-service migrations, database provisioning and least-privilege roles.
//!
//! Each service owns its database and changes its schema on its own schedule. This crate
//! makes that one call per service, from the service's own start-up or from a deployment
//! script:
//!
//! - **PostgreSQL** ([`pg`], feature `postgres`): [`PgService`] provisions, idempotently and
//!   from an administrative connection, the service's database, a schema, an *owner* role
//!   that runs migrations and a *runtime* role the service connects with, which can read
//!   and write the service's tables but cannot change their definition or reach another
//!   service's database. [`PgMigrations`] runs sqlx migrations for the service and for any
//!   number of framework components (inbox, outbox, saga state, replicas) in one call,
//!   under an advisory lock, each component with its own history table, and refuses to run
//!   when an applied migration was changed.
//! - **MongoDB** (`mongo`, feature `mongodb`): `MongoMigrations` applies versioned
//!   migrations written as Rust functions, recorded in a `dbps_migrations` collection and
//!   guarded by a lock document with an expiry, and ensures declared indexes.
//! - **Kafka** ([`kafka`], feature `kafka`): [`kafka::KafkaAccess`] provisions a service's
//!   SCRAM user and ACLs on the shared cluster: write only its own topics (and the
//!   commands it declares), read only the topics it declares, use only its own consumer
//!   groups.
//! - **Redis** ([`redis`], feature `redis`): [`redis::RedisAccess`] provisions a service's
//!   ACL user, limited to its key prefix and the commands dbps uses.
//! - The `dbps-migrate` command (feature `cli`) exposes `provision`, `up` and `status` to
//!   scripts.
//!
//! The crates that own tables (`dbps-core`'s inbox, `dbps-outbox`, `dbps-saga`,
//! `dbps-cache`) export their migrations as `MIGRATOR` statics; a service composes them with
//! its own as components of one [`PgMigrations`] run.
//!
//! Every name that reaches SQL is a validated [`ServiceName`] or [`Identifier`]
//! (`[a-z][a-z0-9_]*`, length-limited): a name outside that alphabet is a typed error before
//! any connection is opened. Passwords are [`Password`]s, whose `Debug` is redacted.
//!
//! # Example
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn example(admin: sqlx::postgres::PgConnectOptions) -> Result<(), dbps_migrate::MigrateError> {
//! use dbps_migrate::{Password, PgService, ServiceName};
//!
//! // The service's own migrations, embedded at compile time; in a service this reads
//! // `static MIGRATOR: Migrator = sqlx::migrate!("migrations");`.
//! # static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/fixtures/pg/customer_v1");
//!
//! let service = PgService::new(ServiceName::new("customer")?);
//! let owner_password = Password::new(std::env::var("OWNER_PASSWORD").unwrap_or_default())?;
//! let runtime_password = Password::new(std::env::var("RUNTIME_PASSWORD").unwrap_or_default())?;
//!
//! // Once per environment (idempotent): database, schema, roles and grants.
//! service.provision(&admin, &owner_password, &runtime_password).await?;
//!
//! // At every deployment: the framework's tables and the service's own, as the owner role.
//! let report = service
//!     .migrations()
//!     .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
//!     .component("customer", &MIGRATOR)
//!     .run(&service.owner_options(&admin, &owner_password))
//!     .await?;
//! println!("applied {} migrations", report.applied_count());
//!
//! // The service itself connects as the runtime role.
//! let _runtime = service.runtime_options(&admin, &runtime_password);
//! # Ok(()) }
//! ```
//!
//! See `docs/migrations.md` for the guide and `docs/adr/0003-migrations-per-service.md` for
//! the decisions behind this design.

mod error;
mod ident;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mongodb")]
pub mod mongo;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;

pub use error::{MigrateError, Result};
pub use ident::{Identifier, Password, ServiceName};
#[cfg(feature = "mongodb")]
pub use mongo::MongoMigrations;
#[cfg(feature = "postgres")]
pub use pg::{PgMigrations, PgService};

/// One migration: its version and its description (PostgreSQL) or name (MongoDB).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationInfo {
    /// The version, unique within its component.
    pub version: i64,
    /// What the migration does, from its file name or its declaration.
    pub description: String,
}

impl MigrationInfo {
    #[cfg_attr(not(any(feature = "postgres", feature = "mongodb")), allow(dead_code))]
    pub(crate) fn new(version: i64, description: impl Into<String>) -> Self {
        Self {
            version,
            description: description.into(),
        }
    }
}

impl fmt::Display for MigrationInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.version, self.description)
    }
}

/// A 32-bit FNV-1a hash: stable across builds and platforms, used to derive lock keys.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in bytes {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::fnv1a32;

    #[test]
    fn fnv1a32_matches_reference_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }
}
