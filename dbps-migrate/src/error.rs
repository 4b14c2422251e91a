//! The error type of the migration runner.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the migration runner, the provisioning and the name checks.
///
/// Messages are lowercase and name what failed. They never contain a password: names and
/// versions only, and backend errors are kept as the [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A name is not a valid identifier. Nothing was sent to a server.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidIdentifier {
        /// What the name was for (`service name`, `schema name`, `component name`, …).
        what: &'static str,
        /// The rejected name, cut short if it is long.
        value: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A password cannot be used. The message does not show it.
    #[error("invalid password: {reason}")]
    InvalidPassword {
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// The same component was added twice to one runner.
    #[error("component {component} is listed twice")]
    DuplicateComponent {
        /// The component's name.
        component: String,
    },
    /// A MongoDB migration version is declared twice, or is not positive.
    #[error("migration version {version} is {reason}")]
    InvalidVersion {
        /// The version.
        version: i64,
        /// What is wrong with it (`declared twice`, `not positive`).
        reason: &'static str,
    },
    /// A migration that was applied has changed since: its checksum (PostgreSQL) or its
    /// name (MongoDB) differs from the recorded one. Nothing was applied.
    #[error(
        "migration {version} of {component} was changed after it was applied: refusing to migrate \
         (restore the applied migration and add a new one)"
    )]
    Changed {
        /// The component (PostgreSQL) or database (MongoDB) the migration belongs to.
        component: String,
        /// The migration's version.
        version: i64,
    },
    /// A migration recorded as applied is not among the known migrations. Nothing was applied.
    #[error("migration {version} of {component} was applied but is missing from the known migrations")]
    Missing {
        /// The component (PostgreSQL) or database (MongoDB) the migration belongs to.
        component: String,
        /// The migration's version.
        version: i64,
    },
    /// A migration failed part-way in an earlier run and is recorded as dirty; it must be
    /// repaired by hand.
    #[error("migration {version} of {component} failed part-way in an earlier run and is marked dirty")]
    Dirty {
        /// The component the migration belongs to.
        component: String,
        /// The migration's version.
        version: i64,
    },
    /// The statements of a PostgreSQL migration failed; its transaction was rolled back.
    #[cfg(feature = "postgres")]
    #[error("migration {version} of {component} failed")]
    MigrationFailed {
        /// The component the migration belongs to.
        component: String,
        /// The migration's version.
        version: i64,
        /// The server's error.
        #[source]
        source: sqlx::Error,
    },
    /// sqlx's migrator failed in a way without a more specific variant.
    #[cfg(feature = "postgres")]
    #[error("migrator of {component} failed")]
    Migrator {
        /// The component being migrated.
        component: String,
        /// sqlx's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A MongoDB migration function returned an error.
    #[cfg(feature = "mongodb")]
    #[error("migration {version} ({name}) of {database} failed")]
    MongoMigrationFailed {
        /// The database being migrated.
        database: String,
        /// The migration's version.
        version: i64,
        /// The migration's name.
        name: String,
        /// The function's error.
        #[source]
        source: crate::mongo::BoxError,
    },
    /// A file holding a secret could not be read. The message names the file only.
    #[error("secret file {} could not be read", path.display())]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Migration files could not be read.
    #[error("migrations in {} could not be read", path.display())]
    Source {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Another runner held the migration lock for longer than the runner was willing to wait.
    #[error("timed out after {waited:?} waiting for the migration lock of {target}")]
    LockTimeout {
        /// What the lock protects (`service customer`, `mongodb database email`).
        target: String,
        /// How long this runner waited.
        waited: Duration,
    },
    /// The MongoDB migration lock expired and was taken by another runner while this one
    /// was still migrating (the lock could not be renewed in time). Stopped before the next
    /// migration.
    #[error("lost the migration lock of {target} to another runner")]
    LockLost {
        /// What the lock protects.
        target: String,
    },
    /// PostgreSQL could not be reached or rejected a statement of the runner itself.
    #[cfg(feature = "postgres")]
    #[error("postgres could not {action}")]
    Postgres {
        /// What the runner was doing (`connect to database customer`, `create role customer_app`).
        action: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Kafka refused or did not answer an administrative request (a SCRAM credential,
    /// an ACL). The message names the principal and what was asked; never a secret.
    #[cfg(feature = "kafka")]
    #[error("kafka could not {action}: {message}")]
    Kafka {
        /// What was asked (`provision User:quote`).
        action: String,
        /// Kafka's error code, when it gave one.
        code: Option<rdkafka::error::RDKafkaErrorCode>,
        /// Kafka's message.
        message: String,
    },
    /// Redis refused or did not answer an administrative command (an ACL user).
    #[cfg(feature = "redis")]
    #[error("redis could not {action}")]
    Redis {
        /// What was asked (`provision the ACL user quote`).
        action: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// MongoDB could not be reached or rejected a request of the runner itself.
    #[cfg(feature = "mongodb")]
    #[error("mongodb could not {action}")]
    Mongo {
        /// What the runner was doing.
        action: String,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
}

impl MigrateError {
    /// Whether retrying the same call later may succeed: the server was unreachable or
    /// busy, or another runner held the lock. Changed or missing migrations, invalid names
    /// and failing migration statements are not transient.
    pub fn is_transient(&self) -> bool {
        #[allow(unused_imports)]
        use dbps_core::classify::Classify as _;
        match self {
            Self::LockTimeout { .. } | Self::LockLost { .. } => true,
            #[cfg(feature = "postgres")]
            Self::Postgres { source, .. } | Self::MigrationFailed { source, .. } => source.is_transient(),
            #[cfg(feature = "postgres")]
            Self::Migrator {
                source: sqlx::migrate::MigrateError::Execute(source),
                ..
            } => source.is_transient(),
            #[cfg(feature = "mongodb")]
            Self::Mongo { source, .. } => source.is_transient(),
            #[cfg(feature = "kafka")]
            Self::Kafka { code, .. } => crate::kafka::is_transient(*code),
            #[cfg(feature = "redis")]
            Self::Redis { source, .. } => source.is_io_error() || source.is_timeout() || source.is_connection_dropped(),
            _ => false,
        }
    }

    /// The SQLSTATE code of the PostgreSQL error behind this one, if there is one
    /// (`42501` for a missing privilege, `42P07` for a table that already exists, …).
    #[cfg(feature = "postgres")]
    pub fn sqlstate(&self) -> Option<String> {
        let source = match self {
            Self::Postgres { source, .. } | Self::MigrationFailed { source, .. } => source,
            Self::Migrator {
                source: sqlx::migrate::MigrateError::Execute(source),
                ..
            } => source,
            _ => return None,
        };
        source.as_database_error()?.code().map(|code| code.into_owned())
    }
}

/// Results of the migration runner.
pub type Result<T, E = MigrateError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_failed() {
        let error = MigrateError::Changed {
            component: "customer".into(),
            version: 3,
        };
        assert!(error.to_string().starts_with("migration 3 of customer was changed"));
        assert!(!error.is_transient());
        let error = MigrateError::LockTimeout {
            target: "service customer".into(),
            waited: Duration::from_secs(2),
        };
        assert_eq!(
            error.to_string(),
            "timed out after 2s waiting for the migration lock of service customer"
        );
        assert!(error.is_transient());
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn io_errors_are_transient() {
        let error = MigrateError::Postgres {
            action: "connect to database customer".into(),
            source: sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        assert!(error.is_transient());
        assert_eq!(error.to_string(), "postgres could not connect to database customer");
        let error = MigrateError::Postgres {
            action: "read".into(),
            source: sqlx::Error::RowNotFound,
        };
        assert!(!error.is_transient());
    }
}
