//! Deadlines on PostgreSQL round trips.
//!
//! A connection whose peer stops answering without closing it (a half-open connection:
//! a dead host, a partition, a stuck proxy) makes a query wait until the operating
//! system gives up on it, which takes minutes to hours; a pool then hands the same dead
//! connection out again. The parts of dbps that hold a connection while working (the
//! inbox, the relay) bound each unit of work instead, and close a connection that did
//! not answer in time, so the server's session ends with it (and with it any advisory
//! lock the session held). The timeout is an I/O error of kind
//! [`TimedOut`](std::io::ErrorKind::TimedOut), so [`crate::classify`] counts it as
//! transient and callers retry.

use std::time::Duration;

use sqlx::PgConnection;
use sqlx::postgres::PgPool;

/// The error of a round trip that got no answer within `limit`.
pub fn timed_out(limit: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from PostgreSQL within {limit:?}; the connection was closed"),
    ))
}

/// Runs `work` on one connection of `pool`, taking the connection and doing the work
/// within `limit` together.
///
/// If the time runs out, the work is dropped (an open transaction with it), the
/// connection is closed instead of going back to the pool, and the result is
/// [`timed_out`]. A connection that was half-open is gone then; the server ends its
/// session when it sees the connection close, or, if nothing reaches it, when its own
/// timeouts fire.
///
/// # Errors
///
/// What `work` returns, a failure to take a connection, or the timeout.
pub async fn bounded<T, E>(
    pool: &PgPool,
    limit: Duration,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<sqlx::Error>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut conn = match tokio::time::timeout_at(deadline, pool.acquire()).await {
        Ok(conn) => conn?,
        Err(_) => return Err(timed_out(limit).into()),
    };
    let outcome = tokio::time::timeout_at(deadline, work(&mut conn)).await;
    match outcome {
        Ok(result) => result,
        Err(_) => {
            // Not back to the pool: its next user would wait on it too. Dropping the
            // detached connection closes its socket without another round trip.
            drop(conn.detach());
            Err(timed_out(limit).into())
        }
    }
}

/// Runs one round trip (or a few) on `conn` within `limit`. On a timeout the connection
/// is left in an unknown state: the caller must drop it.
///
/// # Errors
///
/// What `work` returns, or the timeout.
pub async fn within<T>(limit: Duration, work: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(timed_out(limit)))
}
