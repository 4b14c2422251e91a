//! The errors of dbps-cache.

/// Errors of the caches, the rate limiter and the session store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Redis refused a request or could not be reached.
    #[cfg(feature = "redis")]
    #[error("redis {operation} failed")]
    Redis {
        /// What was being done (`lookup`, `fill`, `invalidate`, `rate limit`, ...).
        operation: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis did not answer within the configured timeout.
    #[error("redis {operation} did not answer within {timeout:?}")]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// The timeout.
        timeout: std::time::Duration,
    },
    /// A cached value could not be encoded or decoded.
    #[error("cached value of {key} could not be encoded or decoded")]
    Codec {
        /// The cache key.
        key: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A setting is invalid.
    #[error("invalid cache configuration: {setting}: {reason}")]
    InvalidConfig {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A PostgreSQL statement of a replica failed.
    #[cfg(feature = "postgres")]
    #[error("postgres {operation} failed")]
    Postgres {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A MongoDB operation of a replica failed.
    #[cfg(feature = "mongodb")]
    #[error("mongodb {operation} failed")]
    Mongo {
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// A request to a snapshot endpoint failed or answered with an error status.
    #[cfg(feature = "http")]
    #[error("snapshot request {url} failed")]
    Http {
        /// The URL asked.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// An event for a replica carries no aggregate sequence number, so it cannot be
    /// ordered against the others.
    #[error("replica {replica}: message {message_id} has no aggregate sequence number")]
    NoSequence {
        /// The replica.
        replica: String,
        /// The message.
        message_id: String,
    },
    /// A replica's projection returned an append (`Change::Append`): a replica keeps the
    /// owner's state, replaced under the sequence guard, not a history of facts. Only a
    /// PostgreSQL projection (`PgProjection`) takes appends.
    #[error("replica {replica}: appends are not supported by replicas; keep facts in a projection")]
    AppendNotSupported {
        /// The replica.
        replica: String,
    },
    /// Appends and the replacing kinds of change (`Rows`, `Delete`, `Unchanged`) were
    /// mixed for one aggregate of a table: in one batch, or an append to a deleted
    /// aggregate.
    #[error("{target}: aggregate {aggregate_id} mixes appends with other kinds of change")]
    MixedChanges {
        /// The target (`projection:<name>_v<version>`).
        target: String,
        /// The aggregate.
        aggregate_id: String,
    },
    /// Repairing a replica from its source failed.
    #[error("replica {replica}: repair failed")]
    Repair {
        /// The replica.
        replica: String,
        /// The failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading a projection's topics from Kafka failed.
    #[cfg(any(feature = "postgres", feature = "opensearch"))]
    #[error("kafka {operation} failed")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A request to OpenSearch failed: it could not be sent, timed out, or was answered
    /// with an error status. The body of the answer is not kept (it may quote documents);
    /// `kind` is OpenSearch's error type when it gave one.
    #[cfg(feature = "opensearch")]
    #[error("opensearch {operation} failed{}{}", status.map(|s| format!(" with status {s}")).unwrap_or_default(), kind.as_deref().map(|k| format!(" ({k})")).unwrap_or_default())]
    OpenSearch {
        /// What was being done.
        operation: &'static str,
        /// The HTTP status, `None` when no answer came.
        status: Option<u16>,
        /// OpenSearch's error type (`index_not_found_exception`, ...), when it said.
        kind: Option<String>,
        /// The client's error, when the request itself failed.
        #[source]
        source: Option<reqwest::Error>,
    },
    /// Items of a `_bulk` request to a search projection were refused (version conflicts
    /// are not: they are stale events).
    #[cfg(feature = "opensearch")]
    #[error("projection {projection}: {failed} document(s) refused, first {id} with status {status} ({kind})")]
    OpenSearchItems {
        /// The projection (`name_v<version>`).
        projection: String,
        /// How many items were refused.
        failed: usize,
        /// The first refused document's id.
        id: String,
        /// Its status.
        status: u16,
        /// OpenSearch's error type for it (`mapper_parsing_exception`, ...).
        kind: String,
        /// Whether every refusal is one that may pass later (429, 5xx).
        transient: bool,
    },
    /// Events could not be applied to a projection.
    #[error("projection {projection}: applying events failed")]
    Projection {
        /// The projection (`name_v<version>`).
        projection: String,
        /// The failure.
        #[source]
        source: dbps_core::HandlerError,
    },
    /// Loading reference data from its source failed.
    #[error("reference data {name} could not be loaded")]
    Load {
        /// The reference data's name.
        name: String,
        /// The loader's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl CacheError {
    /// Whether retrying later may succeed: Redis unreachable, slow or restarting.
    pub fn is_transient(&self) -> bool {
        #[allow(unused_imports)]
        use dbps_core::classify::Classify as _;
        match self {
            #[cfg(feature = "redis")]
            Self::Redis { source, .. } => source.is_transient(),
            #[cfg(feature = "postgres")]
            Self::Postgres { source, .. } => source.is_transient(),
            #[cfg(feature = "mongodb")]
            Self::Mongo { source, .. } => source.is_transient(),
            #[cfg(feature = "http")]
            Self::Http { source, .. } => !source.status().is_some_and(|s| s.is_client_error()),
            #[cfg(any(feature = "postgres", feature = "opensearch"))]
            Self::Kafka { .. } => true,
            #[cfg(feature = "opensearch")]
            Self::OpenSearch { status, .. } => status.is_none_or(|s| s == 429 || s >= 500),
            #[cfg(feature = "opensearch")]
            Self::OpenSearchItems { transient, .. } => *transient,
            Self::Projection { source, .. } => source.is_transient(),
            Self::Timeout { .. } | Self::Load { .. } => true,
            _ => false,
        }
    }
}

impl From<CacheError> for dbps_core::HandlerError {
    fn from(error: CacheError) -> Self {
        if error.is_transient() {
            Self::transient(error)
        } else {
            Self::permanent(error)
        }
    }
}

/// Results of dbps-cache.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;
