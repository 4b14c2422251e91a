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
    #[error("postgres test database {database}")]
    Postgres {
        /// The database the test was setting up.
        database: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Kafka rejected a request or could not be reached.
    #[error("kafka test topic {topic}")]
    Kafka {
        /// The topic the test was setting up.
        topic: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// MongoDB rejected a request or could not be reached.
    #[error("mongodb test database {database}")]
    Mongo {
        /// The database the test was setting up.
        database: String,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// Redis rejected a request or could not be reached.
    #[error("redis test connection")]
    Redis(#[source] ::redis::RedisError),
}

/// Lets tests use `?` on their own queries against a [`crate::TestPostgres`] pool.
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
