//! The participant's side on MongoDB, on the single-document path: the effect is one new
//! document, keyed by the command's message id, that carries the reply in its own outbox,
//! so the effect, the reply and the record that the command was applied are one atomic
//! insert. No multi-document transaction is needed (FerretDB, standalone servers).

use std::fmt;
use std::marker::PhantomData;

use dbps_core::classify::is_duplicate_key;
use dbps_core::{Envelope, Handler, HandlerError, MessageSet, Registry};
use dbps_outbox::OutboxError;
use dbps_outbox::mongo::MongoOutbox;
use mongodb::Collection;
use mongodb::bson::Document;

use crate::error::SagaError;
use crate::participant::Reply;

/// What a MongoDB participant does with the commands it understands: the document that
/// records the effect (a reservation, a purchase order) and the reply.
pub trait MongoCommandHandler<S: MessageSet>: Send + Sync + 'static {
    /// Handles `command`. The returned document is inserted with `_id` set to the
    /// command's message id, and the reply in its outbox.
    fn handle(
        &self,
        command: S,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(Document, Reply), HandlerError>> + Send;
}

/// A saga participant for MongoDB services: a [`Handler`] for the consumer runner on the
/// service's command topic. A command delivered twice finds its document (duplicate
/// `_id`) and is skipped: its reply left with the first. The collection must be one the
/// service's `MongoOutboxStore` relays.
pub struct MongoParticipant<S, H> {
    outbox: MongoOutbox,
    collection: Collection<Document>,
    handler: H,
    registry: Registry,
    _set: PhantomData<fn() -> S>,
}

impl<S, H> fmt::Debug for MongoParticipant<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoParticipant")
            .field("service", &self.outbox.service())
            .field("collection", &self.collection.name())
            .finish_non_exhaustive()
    }
}

impl<S: MessageSet, H: MongoCommandHandler<S>> MongoParticipant<S, H> {
    /// A participant writing its effects to `collection` and its replies through `outbox`.
    pub fn new(outbox: MongoOutbox, collection: Collection<Document>, handler: H) -> Self {
        Self {
            outbox,
            collection,
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

    /// Applies `command` once; `false` when it was applied before.
    pub async fn apply(&self, command: &Envelope) -> Result<bool, HandlerError> {
        let reply_to = command.reply_to.clone().ok_or_else(|| {
            HandlerError::permanent(SagaError::NoReplyTopic {
                message_id: command.id.clone(),
            })
        })?;
        let decoded = S::decode(&self.registry, command).map_err(HandlerError::permanent)?;
        let (mut document, reply) = self.handler.handle(decoded, command).await?;
        document.insert("_id", command.id.as_str());
        let envelope = reply.envelope(command, self.outbox.service());
        let message = self
            .outbox
            .message(&reply_to, envelope)
            .map_err(|e| HandlerError::from(SagaError::Outbox(e)))?;
        match self
            .outbox
            .insert_with_events(&self.collection, document, [message])
            .await
        {
            Ok(_) => Ok(true),
            Err(OutboxError::Mongo { source, .. }) if is_duplicate_key(&source) => {
                metrics::counter!("dbps_saga_duplicate_commands_total", "service" => self.outbox.service().to_owned())
                    .increment(1);
                Ok(false)
            }
            Err(error) => Err(SagaError::Outbox(error).into()),
        }
    }
}

impl<S: MessageSet, H: MongoCommandHandler<S>> Handler for MongoParticipant<S, H> {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        self.apply(message).await.map(|_| ())
    }
}
