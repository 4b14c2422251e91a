//! What the consumer runner and the inbox call for each message.

use std::fmt;
use std::sync::Arc;

#[allow(unused_imports)]
use crate::classify::Classify;
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::registry::Registry;

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
        write!(f, "{kind} handler failure: {}", crate::ErrorChain(self.source.as_ref()))
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

/// Database errors are classified by [`Classify`]: connection trouble, restarts, lock and
/// statement timeouts, deadlocks and serialisation failures are retried; everything else
/// (a violated constraint, bad SQL, a missing table) is dead-lettered. So handlers use `?`.
#[cfg(feature = "postgres")]
impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        Self {
            transient: error.is_transient(),
            source: Box::new(error),
        }
    }
}

/// MongoDB errors are classified by [`Classify`], as database errors are.
#[cfg(feature = "mongodb")]
impl From<mongodb::error::Error> for HandlerError {
    fn from(error: mongodb::error::Error) -> Self {
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

/// Handles the messages of one partition a batch at a time: what arrived together is
/// applied together, for example in one database transaction, so that the apply rate is
/// not one commit per message. The consumer runner calls it with up to
/// [`max_batch`](Self::max_batch) messages of one partition, in offset order.
///
/// Every [`Handler`] is a batch handler of one message, so the runner takes either.
///
/// A batch is all or nothing: on `Ok` the runner commits past its last message; on a
/// transient error it retries the whole batch with backoff; on a permanent error (or
/// exhausted retries) it hands the batch's messages over again one at a time, so that
/// only the message that fails on its own goes to the dead-letter topic.
pub trait BatchHandler: Send + Sync + 'static {
    /// The most messages handed over in one call (at least 1).
    fn max_batch(&self) -> usize;

    /// Handles `messages` (one partition's, in offset order) as one unit.
    fn handle_batch(&self, messages: &[Envelope]) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<H: Handler> BatchHandler for H {
    fn max_batch(&self) -> usize {
        1
    }

    async fn handle_batch(&self, messages: &[Envelope]) -> Result<(), HandlerError> {
        for message in messages {
            self.handle(message).await?;
        }
        Ok(())
    }
}

/// A closed set of message types a handler understands, as an enum with one variant per
/// type; declared with [`message_set!`](crate::message_set). A topic that carries several
/// types (`CustomerCreated`, `CustomerUpdated`) is handled by one [`TypedHandler`] that
/// matches on the enum, instead of a handler per type.
pub trait MessageSet: Sized + Send + 'static {
    /// The message types of the set.
    const TYPES: &'static [&'static str];

    /// Decodes an envelope into the variant of its type ([`Error::UnknownType`] for a type
    /// outside the set, [`Error::Decode`] for a payload that does not match its type).
    fn decode(registry: &Registry, envelope: &Envelope) -> Result<Self>;
}

/// Declares an enum of message types and implements [`MessageSet`] for it.
///
/// ```
/// use dbps_core::{Message, message_set};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize)] pub struct CustomerCreated { pub name: String }
/// # impl Message for CustomerCreated { const TYPE: &'static str = "customer.CustomerCreated"; }
/// # #[derive(Debug, Serialize, Deserialize)] pub struct CustomerUpdated { pub name: String }
/// # impl Message for CustomerUpdated { const TYPE: &'static str = "customer.CustomerUpdated"; }
///
/// message_set! {
///     /// What the customer service says about customers.
///     #[derive(Debug)]
///     pub enum CustomerEvent {
///         Created(CustomerCreated),
///         Updated(CustomerUpdated),
///     }
/// }
/// ```
#[macro_export]
macro_rules! message_set {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident($ty:ty)),+ $(,)? }) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$vmeta])* #[allow(missing_docs)] $variant($ty)),+
        }

        impl $crate::MessageSet for $name {
            const TYPES: &'static [&'static str] = &[$(<$ty as $crate::Message>::TYPE),+];

            fn decode(registry: &$crate::Registry, envelope: &$crate::Envelope) -> $crate::Result<Self> {
                $(
                    if envelope.message_type == <$ty as $crate::Message>::TYPE {
                        return registry.decode::<$ty>(envelope).map(Self::$variant);
                    }
                )+
                Err($crate::Error::UnknownType {
                    message_type: envelope.message_type.clone(),
                })
            }
        }
    };
}

/// Handles the decoded messages of a [`MessageSet`]; wrap it in [`Typed`] to run it.
pub trait TypedHandler<S: MessageSet>: Send + Sync + 'static {
    /// Handles one decoded message; `envelope` carries its id, aggregate, sequence and
    /// trace.
    fn handle(&self, message: S, envelope: &Envelope) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// What [`Typed`] does with a message whose type is not in its set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OtherTypes {
    /// Fail it permanently, so the runner dead-letters it (the default: nothing is dropped
    /// without a trace).
    #[default]
    DeadLetter,
    /// Skip it, counted in `dbps_consumer_ignored_total{type}`: for consumers that follow
    /// a topic but care about some of its types only (a replica of two fields, say).
    Ignore,
}

/// Runs a [`TypedHandler`] (or, with the inbox, a `TypedTxHandler`): decodes each message
/// into its [`MessageSet`] through a [`Registry`] (which upcasts older versions) and calls
/// the handler with the variant. A payload that does not match its type is a permanent
/// failure; a type outside the set is dead-lettered or ignored ([`OtherTypes`]).
pub struct Typed<S, H> {
    pub(crate) handler: H,
    pub(crate) registry: Registry,
    pub(crate) others: OtherTypes,
    _set: std::marker::PhantomData<fn() -> S>,
}

impl<S, H> fmt::Debug for Typed<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed")
            .field("registry", &self.registry)
            .field("others", &self.others)
            .finish_non_exhaustive()
    }
}

impl<S: MessageSet, H> Typed<S, H> {
    /// `handler` for the types of `S`, decoding current versions (no upcasters).
    pub fn new(handler: H) -> Self {
        Self {
            handler,
            registry: Registry::new(),
            others: OtherTypes::default(),
            _set: std::marker::PhantomData,
        }
    }

    /// Decodes through `registry`, whose upcasters bring older versions up to date.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// What to do with types outside the set (default: dead-letter).
    pub fn other_types(mut self, others: OtherTypes) -> Self {
        self.others = others;
        self
    }

    /// The wrapped handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Decodes `envelope`: `Ok(None)` for a type outside the set that is ignored.
    pub(crate) fn decode(&self, envelope: &Envelope) -> Result<Option<S>, HandlerError> {
        match S::decode(&self.registry, envelope) {
            Ok(message) => Ok(Some(message)),
            Err(Error::UnknownType { .. }) if self.others == OtherTypes::Ignore => {
                metrics::counter!("dbps_consumer_ignored_total", "type" => envelope.message_type.clone()).increment(1);
                tracing::debug!(message_type = %envelope.message_type, message_id = %envelope.id, "message type ignored");
                Ok(None)
            }
            Err(error) => Err(HandlerError::permanent(error)),
        }
    }
}

impl<S: MessageSet, H: TypedHandler<S>> Handler for Typed<S, H> {
    async fn handle(&self, envelope: &Envelope) -> Result<(), HandlerError> {
        match self.decode(envelope)? {
            Some(message) => self.handler.handle(message, envelope).await,
            None => Ok(()),
        }
    }
}
