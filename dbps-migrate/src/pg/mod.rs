//! PostgreSQL: provisioning of a service's database and roles, and its migration runner.
//!
//! # Layout of a service
//!
//! For a service `customer`, [`PgService`] provisions (names derived from the validated
//! service name; database and schema can be overridden):
//!
//! | object | name | what it may do |
//! |---|---|---|
//! | database | `customer` | `CONNECT` revoked from `PUBLIC` |
//! | owner role | `customer_owner` | owns the database and the schemas; runs the migrations |
//! | runtime role | `customer_app` | `CONNECT`; `USAGE` on the schema; `SELECT`, `INSERT`, `UPDATE`, `DELETE` on its tables and `USAGE`, `SELECT` on its sequences; no `CREATE`, no `TEMP` |
//! | schema | `customer` | the service's tables; both roles have it as `search_path` |
//! | schema | `dbps_migrations` | one history table per component, owned by the owner role; the runtime role cannot read it |
//!
//! The runtime role's table privileges come from `ALTER DEFAULT PRIVILEGES FOR ROLE
//! customer_owner IN SCHEMA customer`, so every table a migration creates — the service's
//! own and the framework's — is usable by the service without a grant in the migration.
//!
//! # Migrations
//!
//! [`PgMigrations`] composes named components, each a sqlx [`Migrator`] (embedded with
//! [`sqlx::migrate!`] or read at run time with [`migrator_from_dir`]), and applies them in the
//! order given. Each component keeps its history in `dbps_migrations.<component>` (sqlx's
//! table format), so the versions of two components never collide. A run holds a
//! session-level advisory lock derived from the service name
//! ([`PgMigrations::advisory_lock_key`]) for its whole duration, so instances that start
//! together apply each migration once; it checks every component's history before applying
//! anything and refuses with [`MigrateError::Changed`] when an applied migration's checksum
//! differs from its source.
//!
//! [`MigrateError::Changed`]: crate::MigrateError::Changed
//! [`Migrator`]: sqlx::migrate::Migrator

mod provision;
mod runner;

use std::path::Path;

use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection};

pub use provision::{PgService, ProvisionReport};
pub use runner::{ComponentReport, ComponentStatus, MigrationReport, PgMigrations, ServiceStatus};

use crate::error::{MigrateError, Result};

/// The schema that holds one migration history table per component.
pub const HISTORY_SCHEMA: &str = "dbps_migrations";

/// Reads the migrations in `dir` (files named `<VERSION>_<DESCRIPTION>.sql`, as sqlx expects)
/// into a [`Migrator`], for migrations that are not embedded at compile time.
///
/// # Errors
///
/// [`MigrateError::Source`] if the directory cannot be read or a file name is malformed.
pub async fn migrator_from_dir(dir: impl AsRef<Path>) -> Result<Migrator> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(MigrateError::Source {
            path: dir.to_owned(),
            source: "not a directory".into(),
        });
    }
    Migrator::new(dir.to_owned())
        .await
        .map_err(|error| MigrateError::Source {
            path: dir.to_owned(),
            source: Box::new(error),
        })
}

/// Opens a connection, naming the database and role (never the password) if it fails.
///
/// The server's notices below a warning (`relation already exists, skipping` for every
/// idempotent statement of a re-run) are not sent: they are expected, and sqlx would log
/// each one.
async fn connect(options: &PgConnectOptions) -> Result<PgConnection> {
    let options = options.clone().options([("client_min_messages", "warning")]);
    PgConnection::connect_with(&options)
        .await
        .map_err(|source| MigrateError::Postgres {
            action: format!(
                "connect to database {} as {}",
                options.get_database().unwrap_or(options.get_username()),
                options.get_username()
            ),
            source,
        })
}

/// Maps a driver error to [`MigrateError::Postgres`] with what the runner was doing.
fn pg_error(action: impl Into<String>) -> impl FnOnce(sqlx::Error) -> MigrateError {
    let action = action.into();
    move |source| MigrateError::Postgres { action, source }
}
