use crate::server::Backend;

/// Errors returned by the testkit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No server for a backend: its variable is unset and no container could be started.
    #[error(
        "no {backend} server for this test: {var} is not set and testcontainers could not start one ({reason}); \
         run `scripts/stack.sh up` and `eval \"$(scripts/stack.sh env)\"`, or set {var} to your own server"
    )]
    NoServer {
        /// The backend that is missing.
        backend: Backend,
        /// The environment variable that would name it.
        var: &'static str,
        /// Why no container could be started.
        reason: String,
    },
    /// A secured endpoint of the local stack is not named by the environment.
    #[error(
        "no secured server for this test: {var} is not set; run `scripts/stack.sh up` and `eval \"$(scripts/stack.sh env)\"`"
    )]
    NoSecureServer {
        /// The variable that is missing.
        var: &'static str,
    },
    /// An environment variable is set but does not hold a usable address.
    #[error("{var} is not a valid {backend} address: {reason}")]
    InvalidAddress {
        /// The backend whose address is wrong.
        backend: Backend,
        /// The environment variable holding it.
        var: &'static str,
        /// What is wrong with it (never the password).
        reason: String,
    },
    /// PostgreSQL rejected a statement or could not be reached.
    #[cfg(feature = "postgres")]
    #[error("postgres test database {database}")]
    Postgres {
        /// The database the test was setting up.
        database: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Kafka rejected a request or could not be reached.
    #[cfg(feature = "kafka")]
    #[error("kafka test topic {topic}")]
    Kafka {
        /// The topic the test was setting up.
        topic: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// MongoDB rejected a request or could not be reached.
    #[cfg(feature = "mongodb")]
    #[error("mongodb test database {database}")]
    Mongo {
        /// The database the test was setting up.
        database: String,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// Redis rejected a request or could not be reached.
    #[cfg(feature = "redis")]
    #[error("redis test connection")]
    Redis(#[source] ::redis::RedisError),
    /// Mailpit's HTTP API could not be reached or answered with an error.
    #[cfg(feature = "smtp")]
    #[error("mailpit: {what}")]
    Mailpit {
        /// The request that failed.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// OpenSearch could not be reached or answered with an error.
    #[cfg(feature = "opensearch")]
    #[error("opensearch: {what}")]
    OpenSearch {
        /// The request that failed.
        what: String,
        /// Why it failed (for an error status: the status and the server's reply).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An address a mail query named is not one of the test's own.
    #[cfg(feature = "smtp")]
    #[error(
        "{address} is not an address of this test (its addresses end in +{tag}@{domain}): use TestMailpit::recipient"
    )]
    ForeignAddress {
        /// The address asked about.
        address: String,
        /// The test's tag.
        tag: String,
        /// The test addresses' domain.
        domain: &'static str,
    },
    /// Provisioning or migrating a test service failed.
    #[cfg(feature = "service")]
    #[error("test service {service}")]
    Service {
        /// The service's name.
        service: String,
        /// The migration runner's error.
        #[source]
        source: Box<dbps_migrate::MigrateError>,
    },
    /// A condition a test waited for did not hold before the deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    TimedOut {
        /// What the test waited for.
        what: String,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// A local port for a [`crate::FaultyLink`] could not be opened.
    #[error("fault link: {0}")]
    Link(#[source] std::io::Error),
    /// The check a test waited with failed.
    #[error("waiting for {what} failed")]
    Check {
        /// What the test waited for.
        what: String,
        /// The check's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Lets tests use `?` on their own queries against a [`crate::TestPostgres`] pool.
#[cfg(feature = "postgres")]
impl From<sqlx::Error> for Error {
    fn from(source: sqlx::Error) -> Self {
        Self::Postgres {
            database: String::from("(query)"),
            source,
        }
    }
}

/// Results of the testkit.
pub type Result<T, E = Error> = std::result::Result<T, E>;
