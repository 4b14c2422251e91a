//! Idempotent effects on MongoDB.
//!
//! Which to use:
//!
//! | effect | deployment | use |
//! |---|---|---|
//! | creates one document per message (an email, a notification) | any | [`insert_once`] |
//! | updates the aggregate's own copy (a replica, a read model) | any | [`update_once`] |
//! | touches several documents | replica set or sharded cluster | [`MongoTransactionalInbox`] |
//!
//! The first two need no multi-document transaction, so they work on standalone servers
//! and on MongoDB-protocol servers without transactions: the guard and the effect are one
//! single-document write, which MongoDB applies atomically.
//!
//! FerretDB 1.x does not apply concurrent updates of one document atomically (it reads,
//! changes and writes back the whole document), so there two [`update_once`] calls racing
//! on one document can both pass the guard. Handle one aggregate's messages from one
//! partition (the consumer runner does) and they never race; `insert_once` is safe either
//! way, because it relies on the unique `_id`.

use mongodb::bson::{Bson, Document, doc};
use mongodb::{Client, ClientSession, Collection, Database};

use crate::classify::is_duplicate_key;
use crate::envelope::Envelope;
use crate::error::{Error, Result};

/// The field [`update_once`] keeps the last applied sequence number in.
pub const SEQUENCE_FIELD: &str = "_dbps_sequence";

/// Whether a guarded write changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The effect was applied now.
    Applied,
    /// The message (or a newer one of the same aggregate) was applied before; nothing
    /// changed.
    Duplicate,
}

/// Inserts `document` with `_id` set to the message id, unless a document with that id
/// exists: a redelivered message hits the unique `_id` and is reported as a duplicate.
pub async fn insert_once(
    collection: &Collection<Document>,
    message: &Envelope,
    mut document: Document,
) -> Result<Applied> {
    document.insert("_id", message.id.as_str());
    match collection.insert_one(document).await {
        Ok(_) => Ok(Applied::Applied),
        Err(error) if is_duplicate_key(&error) => Ok(Applied::Duplicate),
        Err(source) => Err(Error::Mongo {
            operation: "insert once",
            source,
        }),
    }
}

/// Applies `update` to the document `_id = id` only if the message's sequence number is
/// newer than the one the document last recorded, and records it: an update guarded by
/// the aggregate's version. Duplicates and stale (reordered) messages change nothing, so a
/// copy never goes back to an older version. With `upsert`, a missing document is created.
///
/// `update` is an update document (`{"$set": {...}}`); the guard adds its own `$set` of
/// [`SEQUENCE_FIELD`]. The message must carry a sequence number.
pub async fn update_once(
    collection: &Collection<Document>,
    id: impl Into<Bson>,
    message: &Envelope,
    mut update: Document,
    upsert: bool,
) -> Result<Applied> {
    let sequence = message
        .sequence
        .ok_or(Error::MissingAttribute { attribute: "sequence" })?;
    let id = id.into();
    let filter = doc! {
        "_id": id,
        "$or": [
            { SEQUENCE_FIELD: { "$lt": sequence } },
            { SEQUENCE_FIELD: { "$exists": false } },
        ],
    };
    let set = match update.get_mut("$set") {
        Some(Bson::Document(set)) => set,
        Some(_) => {
            return Err(Error::InvalidArgument {
                argument: "update_once update",
                reason: String::from("$set must be a document"),
            });
        }
        None => {
            update.insert("$set", Document::new());
            update.get_document_mut("$set").map_err(|_| Error::InvalidArgument {
                argument: "update_once update",
                reason: String::from("$set could not be added"),
            })?
        }
    };
    set.insert(SEQUENCE_FIELD, sequence);
    match collection.update_one(filter, update).upsert(upsert).await {
        Ok(result) if result.modified_count > 0 || result.upserted_id.is_some() => Ok(Applied::Applied),
        Ok(_) => Ok(Applied::Duplicate),
        // The document exists with a newer sequence: the upsert's insert collides on _id.
        Err(error) if upsert && is_duplicate_key(&error) => Ok(Applied::Duplicate),
        Err(source) => Err(Error::Mongo {
            operation: "update once",
            source,
        }),
    }
}

/// An inbox collection written in the same multi-document transaction as the effect,
/// for effects that touch several documents. Needs a replica set or a sharded cluster.
#[derive(Debug, Clone)]
pub struct MongoTransactionalInbox {
    client: Client,
    inbox: Collection<Document>,
    consumer: String,
}

impl MongoTransactionalInbox {
    /// An inbox for `consumer` in `database.dbps_inbox`. Fails fast with
    /// [`Error::TransactionsUnsupported`] when the deployment cannot run transactions.
    pub async fn new(client: Client, database: &Database, consumer: impl Into<String>) -> Result<Self> {
        let hello = client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|source| Error::Mongo {
                operation: "hello",
                source,
            })?;
        let replica_set = hello.get_str("setName").is_ok();
        let sharded = hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
        if !(replica_set || sharded) {
            return Err(Error::TransactionsUnsupported);
        }
        Ok(Self {
            client,
            inbox: database.collection("dbps_inbox"),
            consumer: consumer.into(),
        })
    }

    /// Runs `effect` and records the message in one transaction, unless the message was
    /// recorded before. `effect` must do all its work through the session it is given.
    pub async fn apply<F>(&self, message: &Envelope, effect: F) -> Result<Applied>
    where
        F: for<'s> AsyncFnOnce(&'s mut ClientSession) -> Result<(), mongodb::error::Error>,
    {
        let mongo = |operation| move |source| Error::Mongo { operation, source };
        let mut session = self.client.start_session().await.map_err(mongo("start session"))?;
        session.start_transaction().await.map_err(mongo("start transaction"))?;
        let record = doc! {
            "_id": { "consumer": &self.consumer, "message_id": &message.id },
            "received_at": mongodb::bson::DateTime::now(),
        };
        match self.inbox.insert_one(record).session(&mut session).await {
            Ok(_) => {}
            Err(error) if is_duplicate_key(&error) => {
                session.abort_transaction().await.map_err(mongo("abort transaction"))?;
                return Ok(Applied::Duplicate);
            }
            Err(source) => {
                return Err(Error::Mongo {
                    operation: "record message",
                    source,
                });
            }
        }
        if let Err(source) = effect(&mut session).await {
            let _ = session.abort_transaction().await;
            return Err(Error::Mongo {
                operation: "apply effect",
                source,
            });
        }
        session
            .commit_transaction()
            .await
            .map_err(mongo("commit transaction"))?;
        Ok(Applied::Applied)
    }
}
