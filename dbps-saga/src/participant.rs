//! The participant's side: handle a command once (inbox), apply its effect and write the
//! reply through the outbox, all in one transaction.

use std::fmt;
use std::marker::PhantomData;

use dbps_core::inbox::pg::TxHandler;
use dbps_core::{Envelope, HandlerError, Message, MessageKind, MessageSet, Registry};
use dbps_outbox::pg::PgOutbox;
use serde_json::value::RawValue;
use sqlx::PgConnection;

use crate::error::SagaError;

/// A reply to a command: any message (a step's success or failure, [`Compensated`],
/// [`CompensationFailed`]).
///
/// [`Compensated`]: crate::Compensated
/// [`CompensationFailed`]: crate::CompensationFailed
#[derive(Debug, Clone)]
pub struct Reply {
    message_type: &'static str,
    schema_version: u32,
    payload: Box<RawValue>,
}

impl Reply {
    /// The reply's envelope: caused by `command` (same correlation, its trace continued),
    /// from `service`, about the command's aggregate (the saga).
    pub(crate) fn envelope(self, command: &Envelope, service: &str) -> Envelope {
        let mut envelope = Envelope::raw(MessageKind::Reply, self.message_type, self.payload).caused_by(command);
        envelope.schema_version = self.schema_version;
        envelope.source = service.to_owned();
        envelope.aggregate_id.clone_from(&command.aggregate_id);
        envelope
    }

    /// `message` as the reply.
    pub fn new<M: Message>(message: &M) -> Result<Self, HandlerError> {
        Ok(Self {
            message_type: M::TYPE,
            schema_version: M::VERSION,
            payload: serde_json::value::to_raw_value(message)
                .map_err(|e| HandlerError::permanent(SagaError::Data(e)))?,
        })
    }
}

/// What a participant does with the commands it understands, inside the inbox's
/// transaction: apply the effect (or refuse) and say so in the reply.
pub trait CommandHandler<S: MessageSet>: Send + Sync + 'static {
    /// Handles `command`; the returned reply is written through the outbox in the same
    /// transaction. An error rolls everything back (retried or dead-lettered by its kind).
    fn handle(
        &self,
        conn: &mut PgConnection,
        command: S,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<Reply, HandlerError>> + Send;
}

/// A saga participant for PostgreSQL services: a [`TxHandler`] for a
/// [`PgInbox`](dbps_core::inbox::pg::PgInbox) on the service's command topic. Each command
/// is applied once, and its reply leaves through the outbox with the effect.
pub struct Participant<S, H> {
    service: String,
    outbox: PgOutbox,
    handler: H,
    registry: Registry,
    _set: PhantomData<fn() -> S>,
}

impl<S, H> fmt::Debug for Participant<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Participant")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl<S: MessageSet, H: CommandHandler<S>> Participant<S, H> {
    /// The participant `service`, writing replies through `outbox`.
    pub fn new(outbox: PgOutbox, handler: H) -> Self {
        Self {
            service: outbox.service().to_owned(),
            outbox,
            handler,
            registry: Registry::new(),
            _set: PhantomData,
        }
    }

    /// The registry that decodes (and upcasts) commands.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }
}

impl<S: MessageSet, H: CommandHandler<S>> TxHandler for Participant<S, H> {
    async fn handle(&self, conn: &mut PgConnection, command: &Envelope) -> Result<(), HandlerError> {
        let reply_to = command.reply_to.clone().ok_or_else(|| {
            HandlerError::permanent(SagaError::NoReplyTopic {
                message_id: command.id.clone(),
            })
        })?;
        let decoded = S::decode(&self.registry, command).map_err(HandlerError::permanent)?;
        let envelope = self
            .handler
            .handle(conn, decoded, command)
            .await?
            .envelope(command, &self.service);
        self.outbox
            .enqueue(conn, &reply_to, envelope)
            .await
            .map_err(|e| HandlerError::from(SagaError::Outbox(e)))?;
        Ok(())
    }
}
