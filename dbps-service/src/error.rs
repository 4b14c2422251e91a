//! The errors of a service's start-up and run.

/// A boxed error of a service's own task.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a service could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A variable the service needs is not set.
    #[error("{var} is not set")]
    MissingVar {
        /// The variable.
        var: String,
    },
    /// A variable is set but cannot be used.
    #[error("{var} is not usable: {reason}")]
    InvalidVar {
        /// The variable.
        var: String,
        /// Why (never its value when it is a secret).
        reason: String,
    },
    /// Provisioning or migrating the service's database failed, or its name is invalid.
    #[error("the service's database could not be prepared")]
    Migrate(#[source] dbps_migrate::MigrateError),
    /// Kafka could not be configured or reached.
    #[error("kafka")]
    Kafka(#[source] dbps_core::Error),
    /// The HTTP server could not listen on its address.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// One of the service's long-running parts failed; the others were stopped.
    #[error("{task} failed")]
    Task {
        /// The part (`relay`, `consumer <group>`, `http`, or a name of the service's own).
        task: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// One of the service's long-running parts ended although nobody asked it to stop;
    /// the others were stopped.
    #[error("{task} ended unexpectedly")]
    Ended {
        /// The part.
        task: String,
    },
    /// Parts did not finish within the shutdown grace period and were abandoned (as in a
    /// crash: what they had in flight is done again by the next instance).
    #[error("{} did not stop within {grace:?}", .tasks.join(", "))]
    ShutdownTimedOut {
        /// The parts still running.
        tasks: Vec<String>,
        /// The grace period.
        grace: std::time::Duration,
    },
}

/// Results of dbps-service.
pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
