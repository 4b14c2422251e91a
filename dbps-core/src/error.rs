//! The errors of dbps-core.

/// Errors of envelopes, the wire format, Kafka and the inbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The payload is larger than the configured limit.
    #[error("payload is {size} bytes, over the {limit} byte limit")]
    PayloadTooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload nests arrays and objects deeper than the configured limit.
    #[error("payload nests {depth} levels deep, over the limit of {limit}")]
    PayloadTooDeep {
        /// The depth reached (counting stops just past the limit).
        depth: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A message could not be serialised to JSON.
    #[error("message could not be encoded as json")]
    Encode(#[source] serde_json::Error),
    /// A payload is not valid JSON or does not match the type it is decoded into.
    #[error("payload of {message_type} v{version} could not be decoded")]
    Decode {
        /// The message type.
        message_type: String,
        /// The payload's schema version.
        version: u32,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// No Rust type is registered for this message type.
    #[error("unknown message type {message_type}")]
    UnknownType {
        /// The message type.
        message_type: String,
    },
    /// The type is known, but neither its current version nor an upcaster matches.
    #[error("unknown schema version {version} of {message_type} (current is {current})")]
    UnknownVersion {
        /// The message type.
        message_type: String,
        /// The version the message carries.
        version: u32,
        /// The version the registered type has.
        current: u32,
    },
    /// An upcaster refused a payload.
    #[error("upcasting {message_type} from v{from} failed: {reason}")]
    Upcast {
        /// The message type.
        message_type: String,
        /// The version the upcaster starts from.
        from: u32,
        /// Why it failed.
        reason: String,
    },
    /// A message was decoded into a type whose message type differs.
    #[error("message is a {actual}, not a {expected}")]
    WrongType {
        /// The type asked for.
        expected: &'static str,
        /// The type the message has.
        actual: String,
    },
    /// A required CloudEvents attribute is missing from a Kafka message.
    #[error("message lacks the required attribute {attribute}")]
    MissingAttribute {
        /// The attribute's CloudEvents name.
        attribute: &'static str,
    },
    /// An attribute is present but not valid.
    #[error("attribute {attribute} is invalid: {reason}")]
    InvalidAttribute {
        /// The attribute's CloudEvents name.
        attribute: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting of a builder or a configuration is invalid. Nothing was started.
    #[error("invalid configuration: {setting}: {reason}")]
    InvalidConfig {
        /// The setting (`batch_size`, `group_id`, `enable.auto.commit`, ...).
        setting: String,
        /// What is wrong with its value, and what to do instead.
        reason: String,
    },
    /// A topic name breaks Kafka's rules.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic {
        /// The rejected name.
        topic: String,
        /// The rule it breaks.
        reason: String,
    },
    /// Topics a component needs do not exist, and it was not asked to create them.
    #[error(
        "topics {} do not exist: create them (ensure_topics, or the builder's create_topics) before starting",
        .topics.join(", ")
    )]
    MissingTopics {
        /// The topics that do not exist.
        topics: Vec<String>,
    },
    /// An argument of a call is not usable. Nothing was written.
    #[error("invalid {argument}: {reason}")]
    InvalidArgument {
        /// The argument.
        argument: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A thread could not be started.
    #[error("could not start the {what} thread")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Kafka refused or failed a request.
    #[cfg(feature = "kafka")]
    #[error("kafka {operation} failed")]
    Kafka {
        /// What was being done (`produce to orders.events`, `create topic x`, ...).
        operation: String,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// Kafka refused this client's principal: a missing ACL on a topic or group, or
    /// failed authentication. Every later request would be refused the same way, so a
    /// relay or a consumer runner stops on it instead of parking or dead-lettering
    /// messages. Never transient.
    #[cfg(feature = "kafka")]
    #[error(transparent)]
    Refused(Box<Refusal>),
    /// PostgreSQL rejected a statement or could not be reached.
    #[cfg(feature = "postgres")]
    #[error("postgres {operation} failed")]
    Postgres {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// MongoDB rejected a request or could not be reached.
    #[cfg(feature = "mongodb")]
    #[error("mongodb {operation} failed")]
    Mongo {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// The MongoDB deployment does not support multi-document transactions.
    #[cfg(feature = "mongodb")]
    #[error(
        "the mongodb deployment does not support transactions (a replica set or sharded cluster is needed); \
         use the non-transactional mode"
    )]
    TransactionsUnsupported,
    /// A message was not sent because an earlier message with the same key in its batch
    /// failed; sending it would have broken the key's order. Send it again later.
    #[error("message with key {key} held back after an earlier message with that key failed")]
    HeldBack {
        /// The message key (aggregate id).
        key: String,
    },
    /// The consumer runner or publisher was shut down.
    #[error("shut down")]
    ShutDown,
}

/// Who Kafka refused, what, and why ([`Error::Refused`]).
#[cfg(feature = "kafka")]
#[derive(Debug, thiserror::Error)]
#[error("kafka refused {principal} to {operation}: {reason}")]
#[non_exhaustive]
pub struct Refusal {
    /// The principal the client presents (`User:quote`), from its configuration.
    pub principal: String,
    /// What was refused (`produce to customer.customer.events`).
    pub operation: String,
    /// Why, for a person: which ACL or credential to check.
    pub reason: String,
    /// The client's error.
    #[source]
    pub source: rdkafka::error::KafkaError,
}

impl Error {
    /// Whether retrying the same call later may succeed (backend errors are judged by
    /// [`Classify`](crate::classify::Classify)).
    pub fn is_transient(&self) -> bool {
        #[allow(unused_imports)]
        use crate::classify::Classify as _;
        match self {
            #[cfg(feature = "kafka")]
            Self::Kafka { source, .. } => source.is_transient(),
            #[cfg(feature = "kafka")]
            Self::Refused { .. } => false,
            #[cfg(feature = "postgres")]
            Self::Postgres { source, .. } => source.is_transient(),
            #[cfg(feature = "mongodb")]
            Self::Mongo { source, .. } => source.is_transient(),
            Self::HeldBack { .. } => true,
            _ => false,
        }
    }

    #[cfg_attr(not(any(feature = "kafka", feature = "postgres")), allow(dead_code))]
    pub(crate) fn config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// An error and its causes on one line, `outer: inner: innermost` — for logs and for the
/// reasons stored with parked or dead-lettered messages.
///
/// ```
/// let io = std::io::Error::other("connection reset");
/// let error = dbps_core::Error::Spawn { what: "poll", source: io };
/// assert_eq!(
///     dbps_core::ErrorChain(&error).to_string(),
///     "could not start the poll thread: connection reset"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(inner) = cause {
            write!(f, ": {inner}")?;
            cause = inner.source();
        }
        Ok(())
    }
}

/// Results of dbps-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
