//! Errors of the outbox.

/// Errors returned by the outbox stores and the relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The database could not be reached or rejected the statement.
    #[cfg(feature = "postgres")]
    #[error("outbox store {operation} failed")]
    Store {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The outbox tables are missing.
    #[error(
        "outbox table {table} missing: run the migrations (dbps_outbox::pg::MIGRATOR as a component of the service's PgMigrations)"
    )]
    MissingTable {
        /// The missing table.
        table: String,
    },
    /// A message was refused before it was written (payload limits, reserved headers,
    /// an invalid topic name).
    #[error("message refused")]
    Message(#[source] dbps_core::Error),
    /// Kafka failed.
    #[error("publishing failed")]
    Publish(#[source] dbps_core::Error),
    /// A stored row could not be turned back into an envelope.
    #[error("outbox row {id} is corrupt: {reason}")]
    Corrupt {
        /// The row's id.
        id: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// No parked message has this id.
    #[error("no parked outbox message with id {id}")]
    NotParked {
        /// The id asked for.
        id: i64,
    },
    /// A setting of the outbox, its store or its relay is invalid. Nothing was started.
    #[error("invalid outbox configuration: {setting}: {reason}")]
    InvalidConfig {
        /// The setting (`batch_size`, `retention`, `collections`, ...).
        setting: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A write's arguments are not usable (a replacement document where an update is
    /// needed, a reserved field, headers that are not JSON). Nothing was written.
    #[error("invalid outbox write: {0}")]
    InvalidWrite(String),
    /// The stream that wakes the relay ended; the relay rejoins.
    #[error("the outbox's {0} ended")]
    StreamEnded(&'static str),
    /// MongoDB could not be reached or rejected the request.
    #[cfg(feature = "mongodb")]
    #[error("outbox store mongodb {operation} failed")]
    Mongo {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// MongoDB refused statements of a write; the others of the same command may have
    /// been applied.
    #[cfg(feature = "mongodb")]
    #[error("outbox store mongodb {operation}: the server refused statements: {errors}")]
    WriteRefused {
        /// What was being done.
        operation: &'static str,
        /// The write errors as the server reported them.
        errors: String,
    },
    /// The transactional MongoDB outbox was asked for on a deployment without
    /// multi-document transactions.
    #[cfg(feature = "mongodb")]
    #[error(
        "the mongodb deployment does not support transactions (a replica set or sharded cluster is needed): \
         use MongoOutbox, which writes the events with the aggregate's own document"
    )]
    TransactionsUnsupported,
    /// No document matched the filter of a write that carried messages: nothing was
    /// written, no message was stored.
    #[cfg(feature = "mongodb")]
    #[error("no document in {collection} matches the filter: nothing was written")]
    NoDocument {
        /// The collection written to.
        collection: String,
    },
    /// Other writers kept changing the document's outbox while this write was retried:
    /// nothing was written. Retrying later may succeed.
    #[cfg(feature = "mongodb")]
    #[error("document {document} of {collection} kept changing during {attempts} attempts: nothing was written")]
    Contention {
        /// The collection written to.
        collection: String,
        /// The document's id.
        document: String,
        /// How many times the write was tried.
        attempts: u32,
    },
    /// A relay's turn outlived the document locks it held (the process stalled for longer
    /// than a lock lives, and another writer took them): it stopped before its next write.
    /// Retrying later succeeds.
    #[cfg(feature = "mongodb")]
    #[error("the outbox document locks of a relay turn on {collection} expired: the turn stopped writing")]
    LockExpired {
        /// The collection whose documents were locked.
        collection: String,
    },
    /// A stored MongoDB outbox entry could not be turned back into an envelope.
    #[cfg(feature = "mongodb")]
    #[error("outbox entry {id} is corrupt: {reason}")]
    CorruptEntry {
        /// The entry (`collection/document/key`).
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No parked MongoDB outbox entry has this id.
    #[cfg(feature = "mongodb")]
    #[error("no parked outbox entry {id}")]
    NotParkedEntry {
        /// The entry asked for (`collection/document/key`).
        id: String,
    },
}

impl OutboxError {
    /// Whether retrying the same call later may succeed (database errors are judged by
    /// [`dbps_core::classify`]).
    pub fn is_transient(&self) -> bool {
        #[allow(unused_imports)]
        use dbps_core::classify::Classify as _;
        match self {
            #[cfg(feature = "postgres")]
            Self::Store { source, .. } => source.is_transient(),
            Self::Publish(e) => e.is_transient(),
            #[cfg(feature = "mongodb")]
            Self::Mongo { source, .. } => source.is_transient(),
            #[cfg(feature = "mongodb")]
            Self::Contention { .. } | Self::LockExpired { .. } => true,
            Self::StreamEnded(_) => true,
            _ => false,
        }
    }
}

#[cfg(feature = "postgres")]
pub(crate) fn store(operation: &'static str) -> impl FnOnce(sqlx::Error) -> OutboxError {
    move |source| match &source {
        // undefined_table: `relation "dbps_outbox_wake" does not exist`.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => OutboxError::MissingTable {
            table: db.message().split('"').nth(1).unwrap_or("dbps_outbox").to_owned(),
        },
        _ => OutboxError::Store { operation, source },
    }
}

/// Results of the outbox.
pub type Result<T, E = OutboxError> = std::result::Result<T, E>;
