//! What the consumer runner and the inbox call for each message.

use std::fmt;
use std::sync::Arc;

use crate::envelope::Envelope;
use crate::error::Error;

/// Boxed error of a handler.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a handler could not handle a message.
#[derive(Debug)]
pub struct HandlerError {
    transient: bool,
    source: BoxError,
}

impl HandlerError {
    /// A failure that may go away (a database restart, a lock timeout): the message is
    /// retried with backoff.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            transient: true,
            source: source.into(),
        }
    }

    /// A failure that retrying cannot fix (an invalid payload, a violated rule): the
    /// message goes to the dead-letter topic.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            transient: false,
            source: source.into(),
        }
    }

    /// Whether the runner retries the message.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.transient { "transient" } else { "permanent" };
        write!(f, "{kind} handler failure: {}", self.source)?;
        let mut cause = self.source.source();
        while let Some(inner) = cause {
            write!(f, ": {inner}")?;
            cause = inner.source();
        }
        Ok(())
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// dbps errors keep their own classification.
impl From<Error> for HandlerError {
    fn from(error: Error) -> Self {
        Self {
            transient: error.is_transient(),
            source: Box::new(error),
        }
    }
}

/// Handles the messages of the runner's topics.
///
/// The runner calls `handle` for one message of a partition at a time, in offset order,
/// and commits the offset only after it returned `Ok` (or the message was dead-lettered).
/// A handler that changes state should do so idempotently: with
/// [`PgInbox`](crate::inbox::pg::PgInbox) the effect and the de-duplication record
/// commit in one transaction.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn handle(&self, message: &Envelope) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A shared handler handles as the handler it shares, so one handler (and its state) can
/// serve a runner and be inspected elsewhere.
impl<H: Handler> Handler for Arc<H> {
    fn handle(&self, message: &Envelope) -> impl Future<Output = Result<(), HandlerError>> + Send {
        H::handle(self, message)
    }
}
