//! One answer, for every dbps crate, to "may this backend error go away if I try again?".
//!
//! Retries everywhere in dbps — the relay's rounds, the consumer runner's handler retries,
//! the migration runner's connection, the saga orchestrator — ask [`Classify::is_transient`]
//! of the driver's error, so that PostgreSQL, MongoDB and Kafka errors are judged the same
//! way wherever they surface. Handlers get the same answer through
//! `From<sqlx::Error>` / `From<mongodb::error::Error>` for [`HandlerError`](crate::HandlerError).
//!
//! **Transient** means the request itself was fine and the trouble lies with the
//! connection, the server's state or its load: a lost connection, a server that is
//! shutting down or starting, too many connections, a serialisation failure or deadlock, a
//! lock or statement timeout, a primary that stepped down. **Permanent** means sending the
//! same request again cannot help: bad SQL, a missing table, a violated constraint, refused
//! credentials, a pool that was closed on purpose, an invalid message.
//!
//! ```
//! # #[cfg(feature = "postgres")] {
//! use dbps_core::classify::Classify as _;
//!
//! assert!(sqlx::Error::PoolTimedOut.is_transient());
//! assert!(!sqlx::Error::PoolClosed.is_transient()); // closed on purpose: it never reopens
//! assert!(!sqlx::Error::RowNotFound.is_transient());
//! # }
//! ```

/// Whether a backend error may go away when the same request is sent again later.
pub trait Classify {
    /// Whether retrying the same request later may succeed.
    fn is_transient(&self) -> bool;
}

/// SQLSTATE classes and codes of PostgreSQL errors that say nothing against the statement:
/// the connection broke, the server is busy, restarting or out of a resource, or the
/// transaction lost a race it may win next time.
///
/// | code | meaning |
/// |---|---|
/// | `08…` | connection exception |
/// | `53…` | insufficient resources (`53300` too many connections, `53200` out of memory, `53100` disk full) |
/// | `57P01`, `57P02`, `57P03` | admin shutdown, crash shutdown, cannot connect now (starting up) |
/// | `57014` | query canceled (a statement timeout) |
/// | `55P03` | lock not available (a lock timeout) |
/// | `40001`, `40P01` | serialization failure, deadlock detected |
/// | `40003` | statement completion unknown |
/// | `25006` | read-only transaction (a standby that has not been promoted yet, after a failover) |
/// | `58000`, `58030` | system error, I/O error |
pub const TRANSIENT_SQLSTATES: &[&str] = &[
    "08*", "53*", "57P01", "57P02", "57P03", "57014", "55P03", "40001", "40P01", "40003", "25006", "58000", "58030",
];

/// Whether a SQLSTATE is in [`TRANSIENT_SQLSTATES`].
pub fn is_transient_sqlstate(code: &str) -> bool {
    TRANSIENT_SQLSTATES
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(class) => code.starts_with(class),
            None => code == *pattern,
        })
}

#[cfg(feature = "postgres")]
impl Classify for sqlx::Error {
    fn is_transient(&self) -> bool {
        match self {
            Self::Io(_) | Self::Tls(_) | Self::PoolTimedOut | Self::WorkerCrashed => true,
            // Bytes that made no sense on the connection: a connection garbled or cut by
            // the network or a proxy (a reply to a request sent before a fault), which a
            // new connection fixes. Pointed at a server that is not PostgreSQL at all, the
            // retries keep logging the same error.
            Self::Protocol(_) => true,
            Self::Database(database) => database.code().is_some_and(|code| is_transient_sqlstate(&code)),
            // A closed pool was closed on purpose and never reopens; everything else is
            // about the statement, the types or the configuration.
            _ => false,
        }
    }
}

/// The SQLSTATE of a PostgreSQL error (`42501` for a missing privilege, `42P01` for a
/// missing table, ...), if the error came from the server.
#[cfg(feature = "postgres")]
pub fn sqlstate(error: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    error.as_database_error()?.code()
}

/// MongoDB server error codes that say the request may succeed later: the node is
/// shutting down, stepped down or unreachable, or the operation lost a write conflict or
/// ran out of time.
pub const TRANSIENT_MONGO_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

#[cfg(feature = "mongodb")]
impl Classify for mongodb::error::Error {
    fn is_transient(&self) -> bool {
        use mongodb::error::{
            ErrorKind, RETRYABLE_ERROR, RETRYABLE_WRITE_ERROR, SYSTEM_OVERLOADED_ERROR, TRANSIENT_TRANSACTION_ERROR,
            WriteFailure,
        };
        let labelled = [
            RETRYABLE_WRITE_ERROR,
            RETRYABLE_ERROR,
            TRANSIENT_TRANSACTION_ERROR,
            SYSTEM_OVERLOADED_ERROR,
        ]
        .iter()
        .any(|label| self.contains_label(label));
        labelled
            || match self.kind.as_ref() {
                ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. } => true,
                ErrorKind::Command(error) => TRANSIENT_MONGO_CODES.contains(&error.code),
                ErrorKind::Write(WriteFailure::WriteConcernError(error)) => TRANSIENT_MONGO_CODES.contains(&error.code),
                ErrorKind::Write(WriteFailure::WriteError(error)) => TRANSIENT_MONGO_CODES.contains(&error.code),
                _ => false,
            }
    }
}

/// Whether a MongoDB error is a duplicate-key error (code 11000).
#[cfg(feature = "mongodb")]
pub fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    const DUPLICATE_KEY: i32 = 11000;
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .is_some_and(|w| w.iter().any(|e| e.code == DUPLICATE_KEY)),
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Kafka: permanent are a message that is too large or invalid, an invalid topic name,
/// refused authorisation or authentication, an unsupported request and invalid
/// configuration. Everything else — timeouts, unreachable brokers, a full queue, leader
/// elections and a topic that does not exist (yet) — is transient: Kafka itself counts
/// `UNKNOWN_TOPIC_OR_PARTITION` as retriable, and an outbox message must wait for its
/// topic to be created, never be parked for it.
#[cfg(feature = "kafka")]
impl Classify for rdkafka::error::KafkaError {
    fn is_transient(&self) -> bool {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
        match self {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Subscription(_) => false,
            other => !matches!(
                other.rdkafka_error_code(),
                Some(
                    C::MessageSizeTooLarge
                        | C::InvalidMessageSize
                        | C::MessageBatchTooLarge
                        | C::InvalidTopic
                        | C::TopicAuthorizationFailed
                        | C::ClusterAuthorizationFailed
                        | C::GroupAuthorizationFailed
                        | C::TransactionalIdAuthorizationFailed
                        | C::SaslAuthenticationFailed
                        | C::Authentication
                        | C::InvalidMessage
                        | C::InvalidRecord
                        | C::InvalidRequiredAcks
                        | C::InvalidArgument
                        | C::PolicyViolation
                        | C::UnsupportedVersion
                        | C::UnsupportedCompressionType
                )
            ),
        }
    }
}

/// Whether Kafka refused a message for what it is — too large, an invalid record or topic
/// name, against a policy — rather than for who sent it or how the client is configured.
/// A relay parks such a message and carries on; any other permanent refusal would hit
/// every message, so it stops instead.
#[cfg(feature = "kafka")]
pub fn is_message_fault(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidTopic
                | C::PolicyViolation
                | C::UnsupportedCompressionType
        )
    )
}

/// Redis: transient is what the client itself would retry — a dropped or refused
/// connection, a timeout, a server loading its data set or failing over, a cluster
/// redirection; permanent are refused credentials, a wrong reply type, invalid
/// configuration and script errors.
#[cfg(feature = "redis")]
impl Classify for redis::RedisError {
    fn is_transient(&self) -> bool {
        !matches!(self.kind(), redis::ErrorKind::AuthenticationFailed)
            && !matches!(self.retry_method(), redis::RetryMethod::NoRetry)
    }
}

/// Whether a Kafka error says a topic does not exist.
#[cfg(feature = "kafka")]
pub fn is_missing_topic(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(C::UnknownTopic | C::UnknownTopicOrPartition)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        let table = [
            // Connection trouble, load and restarts.
            ("08000", true),
            ("08006", true),
            ("08P01", true),
            ("53300", true),
            ("53200", true),
            ("53100", true),
            ("57P01", true),
            ("57P02", true),
            ("57P03", true),
            // Timeouts and lost races.
            ("57014", true),
            ("55P03", true),
            ("40001", true),
            ("40P01", true),
            ("40003", true),
            ("25006", true),
            ("58030", true),
            // The statement, the schema or the credentials.
            ("42P01", false), // undefined table: run the migrations
            ("42501", false), // insufficient privilege
            ("42601", false), // syntax error
            ("23505", false), // unique violation
            ("23503", false), // foreign key violation
            ("22P02", false), // invalid text representation
            ("22021", false), // character not in repertoire (a NUL byte)
            ("28P01", false), // invalid password
            ("28000", false), // invalid authorization
            ("3D000", false), // database does not exist
            ("57000", false), // operator intervention (not a shutdown)
            ("58P01", false), // undefined file
            ("XX000", false), // internal error
        ];
        for (code, transient) in table {
            assert_eq!(is_transient_sqlstate(code), transient, "{code}");
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn sqlx_errors() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(sqlx::Error::Io(io).is_transient());
        assert!(sqlx::Error::PoolTimedOut.is_transient());
        assert!(sqlx::Error::WorkerCrashed.is_transient());
        assert!(!sqlx::Error::PoolClosed.is_transient());
        assert!(!sqlx::Error::RowNotFound.is_transient());
        assert!(sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into()).is_transient());
        assert!(!sqlx::Error::Configuration("bad url".into()).is_transient());
    }

    #[cfg(feature = "mongodb")]
    #[test]
    fn mongo_errors() {
        use mongodb::error::Error;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(Error::from(io).is_transient());
        assert!(Error::from(std::io::ErrorKind::TimedOut).is_transient());
        assert!(!Error::custom("an application's own error").is_transient());
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_errors() {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
        for code in [
            C::MessageTimedOut,
            C::AllBrokersDown,
            C::QueueFull,
            C::NotLeaderForPartition,
            C::NotEnoughReplicas,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
        ] {
            assert!(KafkaError::MessageProduction(code).is_transient(), "{code:?}");
        }
        for code in [
            C::MessageSizeTooLarge,
            C::InvalidTopic,
            C::TopicAuthorizationFailed,
            C::SaslAuthenticationFailed,
            C::InvalidRecord,
        ] {
            assert!(!KafkaError::MessageProduction(code).is_transient(), "{code:?}");
        }
        assert!(is_missing_topic(&KafkaError::MessageProduction(
            C::UnknownTopicOrPartition
        )));
        assert!(!is_missing_topic(&KafkaError::MessageProduction(C::MessageTimedOut)));
    }
}
