//! The MongoDB outbox: [`MongoOutbox`] writes messages together with the aggregate's
//! document, [`MongoOutboxStore`] is what the relay drains.
//!
//! # Two ways to write
//!
//! | deployment | writer | where the messages wait |
//! |---|---|---|
//! | any (standalone, replica set, sharded, the local MongoDB-protocol server) | [`MongoOutbox`] | in the aggregate's own document, written by the same single-document update |
//! | replica set or sharded cluster | [`MongoTransactionalOutbox`] | in the [`OUTBOX_COLLECTION`] collection, written in the caller's transaction |
//!
//! MongoDB applies a write to one document atomically on every deployment, so
//! [`MongoOutbox`] needs no multi-document transaction: the business change and its
//! events are one update, they are stored together or not at all. Use the transactional
//! writer only when one business change touches several documents; asking for it on a
//! deployment without transactions fails at once with
//! [`OutboxError::TransactionsUnsupported`].
//!
//! ```no_run
//! use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
//! use dbps_outbox::Relay;
//! use dbps_outbox::mongo::{MongoOutbox, MongoOutboxStore};
//! use mongodb::bson::{Document, doc};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct EmailQueued { to: String }
//! # impl dbps_core::Message for EmailQueued { const TYPE: &'static str = "email.EmailQueued"; }
//! # #[derive(serde::Serialize, serde::Deserialize)] struct EmailSent { id: String }
//! # impl dbps_core::Message for EmailSent { const TYPE: &'static str = "email.EmailSent"; }
//!
//! # async fn demo(client: mongodb::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let db = client.database("email");
//! let emails = db.collection::<Document>("emails");
//!
//! // Writing: the document and its events in one single-document write.
//! let outbox = MongoOutbox::new("email");
//! let queued = outbox.event("email", &EmailQueued { to: "ada@example.com".into() })?;
//! let written = outbox
//!     .insert_with_events(&emails, doc! { "_id": "e-1", "to": "ada@example.com", "state": "queued" }, [queued])
//!     .await?;
//! assert_eq!(written.enqueued[0].sequence, Some(1));
//!
//! // An update carries its events the same way; a filter that matches nothing writes
//! // nothing and stores no event.
//! let sent = outbox.event("email", &EmailSent { id: "e-1".into() })?;
//! outbox
//!     .update_with_events(&emails, doc! { "_id": "e-1", "state": "queued" }, doc! { "$set": { "state": "sent" } }, [sent])
//!     .await?;
//!
//! // Relaying: any number of instances, each with its own store value.
//! let store = MongoOutboxStore::new(db.clone()).collection("emails");
//! store.create_indexes().await?; // once, with the service's migrations
//! let publisher = KafkaPublisher::builder(KafkaConfig::new("127.0.0.1:9092").set("message.timeout.ms", "0")).build()?;
//! let relay = Relay::builder(store, publisher).build()?;
//! relay.run(dbps_core::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```
//!
//! # What a document carries
//!
//! The writer adds these fields to the aggregate's document (all start with
//! `_dbps_outbox`, and a write that touches them itself is refused):
//!
//! | field | meaning |
//! |---|---|
//! | `_dbps_outbox` | the unpublished messages: `{key: entry}`, each entry with its `position` |
//! | `_dbps_outbox_pending` | when the oldest unpublished message was written; absent when there is none (indexed, sparse) |
//! | `_dbps_outbox_pos` | the last position given to a message of this document (write order) |
//! | `_dbps_outbox_seq` | the last sequence number given to an event of this document |
//! | `_dbps_outbox_partition` | the lease partition: a hash of the document id |
//! | `_dbps_outbox_parked` | messages Kafka refused permanently, with their reasons |
//! | `_dbps_outbox_published`, `_dbps_outbox_published_at` | published messages, under [`Retention::Keep`] |
//!
//! # Servers that lose concurrent updates
//!
//! MongoDB applies each update of a document atomically, also when two arrive at once.
//! FerretDB 1.x (the local stack's server) does not: of two concurrent updates of one
//! document, one can silently overwrite the other. There, with the default
//! [`DocumentLocks::Auto`], every outbox write to a document (the writer's and the
//! relay's) first takes the document's lock in [`LOCKS_COLLECTION`], so the outbox keeps
//! its guarantees; writes that bypass the outbox stay exposed to the server's lost
//! updates.
//!
//! # Guarantees
//!
//! - **Atomic**: the messages are part of the document's own write.
//! - **Ordered per aggregate**: a write reads `_dbps_outbox_pos` and writes only if it is
//!   unchanged (retrying otherwise; on servers that need locks, a writer holding the
//!   document's lock may skip that check while the lock is surely its own), so positions
//!   and sequence numbers of one document follow the order in which its writes were
//!   applied; the relay publishes a document's messages in position order, and one relay
//!   at a time owns a document's partition.
//! - **At least once**: a message is removed from the document only after Kafka
//!   acknowledged it, and only that message (by its key), never the whole outbox.
//! - **Nothing silently dropped**: a message Kafka refuses permanently moves to
//!   `_dbps_outbox_parked` with its reason, listed by [`MongoOutboxStore::parked`].

mod entry;
mod lease;
mod locks;
mod store;
mod writer;

/// The policies are shared by every store; they are re-exported here for convenience.
pub use crate::store::{PoisonPolicy, Retention};
pub use entry::{MongoMessageId, partition};
pub use lease::MongoLease;
pub use locks::{DocumentLocks, LOCKS_COLLECTION};
pub use store::MongoOutboxStore;
pub use writer::{Enqueued, MongoOutbox, MongoTransactionalOutbox, OutboxMessage, Written};

use mongodb::bson::doc;

use crate::error::OutboxError;

/// The collection the transactional writer stores messages in, one document per
/// aggregate. Register it with [`MongoOutboxStore::collection`] to relay it.
pub const OUTBOX_COLLECTION: &str = "dbps_outbox";

/// The collection relays keep their membership and partition leases in.
pub const LEASES_COLLECTION: &str = "dbps_outbox_leases";

/// The number of lease partitions. Fixed: it is part of what writers store.
pub const PARTITIONS: u32 = 32;

/// The unpublished messages of a document: `{key: entry}`.
pub const OUTBOX_FIELD: &str = "_dbps_outbox";
/// When the oldest unpublished message of a document was written; absent when none is.
pub const PENDING_FIELD: &str = "_dbps_outbox_pending";
/// The last position given to a message of a document.
pub const POSITION_FIELD: &str = "_dbps_outbox_pos";
/// The last sequence number given to an event of a document.
pub const SEQUENCE_FIELD: &str = "_dbps_outbox_seq";
/// The lease partition of a document.
pub const PARTITION_FIELD: &str = "_dbps_outbox_partition";
/// Parked messages of a document: `{key: entry with reason and parked_at}`.
pub const PARKED_FIELD: &str = "_dbps_outbox_parked";
/// Published messages kept under [`Retention::Keep`]: `{key: entry}`.
pub const PUBLISHED_FIELD: &str = "_dbps_outbox_published";
/// When a document's messages were last published, under [`Retention::Keep`].
pub const PUBLISHED_AT_FIELD: &str = "_dbps_outbox_published_at";

/// Every field the outbox owns starts with this.
const RESERVED_PREFIX: &str = "_dbps_outbox";

/// Maps a driver error to the outbox error for `operation`.
pub(crate) fn mongo(operation: &'static str) -> impl FnOnce(mongodb::error::Error) -> OutboxError {
    move |source| OutboxError::Mongo { operation, source }
}

/// Whether the deployment behind `client` is a replica set or a sharded cluster, the
/// deployments that run multi-document transactions and change streams. Asked with
/// `hello`, the same check as `dbps_core::inbox::mongo::MongoTransactionalInbox::new`.
pub(crate) async fn is_replicated(client: &mongodb::Client) -> crate::Result<bool> {
    let hello = client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .map_err(mongo("hello"))?;
    let replica_set = hello.get_str("setName").is_ok();
    let sharded = hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
    Ok(replica_set || sharded)
}
