//! The errors of dbps-saga.

/// Errors of saga definitions, the orchestrator and participants.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// A definition or setting is invalid.
    #[error("invalid saga configuration: {setting}: {reason}")]
    InvalidConfig {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No definition of this saga type is registered.
    #[error("saga type {saga:?} is not registered")]
    UnknownSaga {
        /// The saga type.
        saga: String,
    },
    /// An instance was started under a version this orchestrator does not have; it is
    /// left untouched until a process that has it handles it.
    #[error("saga {saga:?} version {version} is not registered here")]
    UnknownVersion {
        /// The saga type.
        saga: String,
        /// The instance's version.
        version: u32,
    },
    /// No saga instance has this id.
    #[error("saga {id} does not exist")]
    NotFound {
        /// The id.
        id: String,
    },
    /// A reply is not one of the types its step expects.
    #[error("saga {saga:?} step {step:?}: unexpected reply type {message_type:?}")]
    UnexpectedReply {
        /// The saga type.
        saga: String,
        /// The step.
        step: String,
        /// The reply's type.
        message_type: String,
    },
    /// A reply has no usable correlation id (the saga's id).
    #[error("reply {message_id} carries no saga id")]
    Uncorrelated {
        /// The reply's message id.
        message_id: String,
    },
    /// An operator asked for something the instance's state does not allow.
    #[error("saga {id} is {state}: {action} is not possible")]
    WrongState {
        /// The instance.
        id: String,
        /// Its state.
        state: String,
        /// What was asked.
        action: &'static str,
    },
    /// A command has no reply topic.
    #[error("command {message_id} has no reply_to topic")]
    NoReplyTopic {
        /// The command's message id.
        message_id: String,
    },
    /// Saga data, a message or a reply could not be encoded or decoded.
    #[error("saga message could not be encoded or decoded")]
    Message(#[source] dbps_core::Error),
    /// Saga data could not be encoded or decoded.
    #[error("saga data could not be encoded or decoded")]
    Data(#[source] serde_json::Error),
    /// A database statement failed.
    #[error("postgres {operation} failed")]
    Postgres {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The outbox refused a command or reply.
    #[error("outbox refused a saga message")]
    Outbox(#[source] dbps_outbox::OutboxError),
}

impl SagaError {
    /// Whether retrying later may succeed (the database or the outbox was unavailable).
    pub fn is_transient(&self) -> bool {
        use dbps_core::classify::Classify as _;
        match self {
            Self::Postgres { source, .. } => source.is_transient(),
            Self::Outbox(source) => source.is_transient(),
            _ => false,
        }
    }
}

impl From<SagaError> for dbps_core::HandlerError {
    fn from(error: SagaError) -> Self {
        if error.is_transient() {
            Self::transient(error)
        } else {
            Self::permanent(error)
        }
    }
}

pub(crate) fn pg(operation: &'static str) -> impl FnOnce(sqlx::Error) -> SagaError {
    move |source| SagaError::Postgres { operation, source }
}

/// Results of dbps-saga.
pub type Result<T, E = SagaError> = std::result::Result<T, E>;
