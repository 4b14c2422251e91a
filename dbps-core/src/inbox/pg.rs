//! The PostgreSQL inbox.

use std::fmt;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::{Connection as _, PgConnection, PgPool};

use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::handler::{Handler, HandlerError, MessageSet, Typed};

/// The inbox table's migrations (`dbps_inbox`). Compose them with the service's own in
/// the migration runner.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/inbox");

/// A handler whose effect runs inside the inbox's transaction.
///
/// Everything done through `conn` commits together with the inbox record, or not at
/// all. Do not commit or roll back yourself; return an error to roll back.
pub trait TxHandler: Send + Sync + 'static {
    /// Applies the message's effect.
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: &Envelope,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A [`TxHandler`] for the decoded messages of a [`MessageSet`]: wrap it in [`Typed`] and
/// the `Typed` in a [`PgInbox`].
pub trait TypedTxHandler<S: MessageSet>: Send + Sync + 'static {
    /// Applies one decoded message's effect through `conn`, inside the inbox's transaction.
    fn handle(
        &self,
        conn: &mut PgConnection,
        message: S,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<S: MessageSet, H: TypedTxHandler<S>> TxHandler for Typed<S, H> {
    async fn handle(&self, conn: &mut PgConnection, envelope: &Envelope) -> Result<(), HandlerError> {
        match self.decode(envelope)? {
            Some(message) => self.handler.handle(conn, message, envelope).await,
            None => Ok(()),
        }
    }
}

/// Applies each message's effect exactly once, by recording `(consumer, message id)` in
/// `dbps_inbox` in the same transaction as the effect.
///
/// A message delivered again finds its record and is skipped (its offset is then
/// committed as usual). Two deliveries racing each other — after a rebalance, say — are
/// serialised by the table's primary key: the second waits for the first to commit, then
/// skips.
///
/// ```no_run
/// use dbps_core::inbox::pg::{PgInbox, TxHandler};
/// use dbps_core::kafka::{ConsumerRunner, HandlerError, KafkaConfig};
/// use dbps_core::Envelope;
///
/// struct CacheCustomer;
///
/// impl TxHandler for CacheCustomer {
///     async fn handle(&self, conn: &mut sqlx::PgConnection, message: &Envelope) -> Result<(), HandlerError> {
///         sqlx::query("insert into customer_cache (id) values ($1) on conflict do nothing")
///             .bind(&message.aggregate_id)
///             .execute(conn)
///             .await?; // sqlx errors become transient or permanent handler errors
///         Ok(())
///     }
/// }
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), dbps_core::Error> {
/// let handler = PgInbox::new(pool, "quote-customer-cache", CacheCustomer);
/// let runner = ConsumerRunner::builder(KafkaConfig::new("127.0.0.1:9092"), "quote-service", handler)
///     .topic("customer.customer.events")
///     .build()?;
/// runner.run(dbps_core::CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct PgInbox<H> {
    pool: PgPool,
    consumer: String,
    handler: H,
    timeout: Duration,
}

/// How long one message's (or one batch's) transaction may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl<H> fmt::Debug for PgInbox<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgInbox")
            .field("consumer", &self.consumer)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<H: TxHandler> PgInbox<H> {
    /// An inbox for `consumer` (a name unique per effect, stable across deployments)
    /// around `handler`.
    pub fn new(pool: PgPool, consumer: impl Into<String>, handler: H) -> Self {
        Self {
            pool,
            consumer: consumer.into(),
            handler,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long applying one message (or one batch, see [`PgInbox::batched`]) may take,
    /// from taking a connection to the commit (default 30 s). When it runs out the
    /// transaction is abandoned, the connection is closed rather than returned to the
    /// pool (it may be half-open: a database that stopped answering without closing it),
    /// and the failure is transient, so the runner retries. Keep it above the slowest
    /// handler's time; see [`crate::pg::bounded`].
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The wrapped handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The consumer name the records are kept under.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Applies `message` unless it was applied before. Returns whether it was applied now.
    pub async fn apply(&self, message: &Envelope) -> Result<bool, HandlerError> {
        crate::pg::bounded(&self.pool, self.timeout, async |conn: &mut PgConnection| {
            let mut tx = conn.begin().await?;
            let inserted =
                sqlx::query("insert into dbps_inbox (consumer, message_id) values ($1, $2) on conflict do nothing")
                    .bind(&self.consumer)
                    .bind(&message.id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            if inserted == 0 {
                tx.rollback().await?;
                metrics::counter!("dbps_inbox_duplicates_total", "consumer" => self.consumer.clone()).increment(1);
                tracing::debug!(consumer = %self.consumer, message_id = %message.id, "duplicate skipped");
                return Ok(false);
            }
            self.handler.handle(&mut tx, message).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }
}

impl<H: TxHandler> Handler for PgInbox<H> {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        self.apply(message).await.map(|_| ())
    }
}

impl<H: TxHandler> PgInbox<H> {
    /// The same inbox applying up to `max_batch` messages of a partition in one
    /// transaction: one commit per batch instead of one per message, where commits are
    /// what bounds the rate.
    pub fn batched(self, max_batch: usize) -> BatchedInbox<H> {
        BatchedInbox {
            inbox: self,
            max_batch: max_batch.max(1),
        }
    }
}

/// A [`PgInbox`] that applies what arrived together in one transaction; a
/// [`BatchHandler`](crate::BatchHandler) for the consumer runner. Each message is still
/// recorded and applied once, in offset order. A batch is all or nothing: when one
/// message's handler fails, the transaction rolls back and the runner retries the batch,
/// or hands its messages over one at a time (so only the failing one is dead-lettered).
#[derive(Debug)]
pub struct BatchedInbox<H> {
    inbox: PgInbox<H>,
    max_batch: usize,
}

impl<H: TxHandler> crate::BatchHandler for BatchedInbox<H> {
    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn handle_batch(&self, messages: &[Envelope]) -> Result<(), HandlerError> {
        let inbox = &self.inbox;
        crate::pg::bounded(&inbox.pool, inbox.timeout, async |conn: &mut PgConnection| {
            let mut tx = conn.begin().await?;
            let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
            let fresh: std::collections::HashSet<String> = sqlx::query_scalar(
                "insert into dbps_inbox (consumer, message_id) select $1, unnest($2::text[]) \
                 on conflict do nothing returning message_id",
            )
            .bind(&inbox.consumer)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            let mut seen = std::collections::HashSet::new();
            for message in messages {
                // A message twice in one batch (a producer's retry) is applied once.
                if !fresh.contains(&message.id) || !seen.insert(message.id.as_str()) {
                    metrics::counter!("dbps_inbox_duplicates_total", "consumer" => inbox.consumer.clone()).increment(1);
                    continue;
                }
                inbox.handler.handle(&mut tx, message).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}

/// Deletes inbox records older than `window`, returning how many. Run it periodically;
/// the window must exceed the longest time a message can be redelivered after it was
/// first handled (Kafka retention of the consumed topics is a safe bound).
pub async fn purge_older_than(pool: &PgPool, window: Duration) -> Result<u64> {
    let window = sqlx::postgres::types::PgInterval::try_from(window)
        .map_err(|e| Error::config("inbox purge window", e.to_string()))?;
    let result = sqlx::query("delete from dbps_inbox where received_at < now() - $1")
        .bind(window)
        .execute(pool)
        .await
        .map_err(|source| Error::Postgres {
            operation: "purge inbox",
            source,
        })?;
    Ok(result.rows_affected())
}
