//! Writing messages into the MongoDB outbox.

use std::time::{Duration, Instant};

use dbps_core::kafka::TopicNaming;
use dbps_core::{Envelope, Message, MessageKind, PayloadLimits, TraceContext};
use mongodb::bson::{self, Bson, Document, doc, oid::ObjectId};
use mongodb::{Client, ClientSession, Collection, Database};

use super::entry::{MongoMessageId, encode, id_string, new_key, partition};
use super::locks::{DocumentLocks, Locking};
use super::{
    OUTBOX_COLLECTION, OUTBOX_FIELD, PARTITION_FIELD, PENDING_FIELD, POSITION_FIELD, RESERVED_PREFIX, SEQUENCE_FIELD,
    is_replicated, mongo,
};
use crate::error::{OutboxError, Result};

/// A message checked and ready to be written with a document: built by
/// [`MongoOutbox::event`] or [`MongoOutbox::message`], which refuse oversize payloads,
/// invalid topic names and reserved header names before anything is written.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    topic: String,
    envelope: Envelope,
}

impl OutboxMessage {
    /// The topic the message will be published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The message. Its aggregate id is empty until it is written with a document, and
    /// its sequence number is given when it is written.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}

/// One message stored by a write.
#[derive(Debug, Clone, PartialEq)]
pub struct Enqueued {
    /// Where the message waits (what [`super::MongoOutboxStore::replay`] and
    /// [`super::MongoOutboxStore::discard`] take, should it be parked).
    pub id: MongoMessageId,
    /// The message id.
    pub message_id: String,
    /// The aggregate sequence number given to the message (events only).
    pub sequence: Option<i64>,
}

/// What [`MongoOutbox::insert_with_events`] and [`MongoOutbox::update_with_events`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The document's `_id` (generated for an inserted document that had none).
    pub document: Bson,
    /// The messages stored with it, in the order given.
    pub enqueued: Vec<Enqueued>,
}

/// Writes a document and its messages in one single-document write, which MongoDB
/// applies atomically on every deployment (no transaction needed).
///
/// ```no_run
/// # use dbps_outbox::mongo::MongoOutbox;
/// # use mongodb::bson::{Document, doc};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct TenderPriced { price: u64 }
/// # impl dbps_core::Message for TenderPriced { const TYPE: &'static str = "tender.TenderPriced"; }
/// # async fn price(tenders: mongodb::Collection<Document>) -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = MongoOutbox::new("tender");
/// let priced = outbox.event("tender", &TenderPriced { price: 1200 })?; // checked now
/// let written = outbox
///     .update_with_events(&tenders, doc! { "_id": "t-7", "state": "open" }, doc! { "$set": { "price": 1200 } }, [priced])
///     .await?; // the price and the event, or neither
/// # Ok(()) }
/// ```
///
/// The document is the aggregate: its `_id` (in string form, see
/// [`MongoMessageId`]) is the aggregate id of its events and their Kafka key, and its
/// events get consecutive sequence numbers in the order the writes were applied. A write
/// reads the document's outbox position and writes only if no other write changed it
/// meanwhile (and tries again otherwise), so concurrent writers on one document never
/// give two events the same number or publish them out of order. On servers that do not
/// isolate concurrent updates of a document (FerretDB 1.x), it takes the document's lock
/// first (see [`DocumentLocks`]); holding it, a write filtered on `_id` alone leaves the
/// position out of its filter during the first half of the lock's life. Every writer of
/// a collection must use the same [`DocumentLocks`] mode.
#[derive(Debug, Clone)]
pub struct MongoOutbox {
    service: String,
    naming: TopicNaming,
    limits: PayloadLimits,
    max_attempts: u32,
    locking: Locking,
}

impl MongoOutbox {
    /// The outbox of `service` (the CloudEvents source of its messages), with the default
    /// topic naming and payload limits.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            naming: TopicNaming::default(),
            limits: PayloadLimits::default(),
            max_attempts: 100,
            locking: Locking::new(DocumentLocks::Auto),
        }
    }

    /// Uses another topic naming.
    pub fn naming(mut self, naming: TopicNaming) -> Self {
        self.naming = naming;
        self
    }

    /// Uses other payload limits.
    pub fn limits(mut self, limits: PayloadLimits) -> Self {
        self.limits = limits;
        self
    }

    /// How often a write is tried while other writers keep changing the same document's
    /// outbox (default 100) before it fails with
    /// [`OutboxError::Contention`].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Whether writes take a per-document lock first (default
    /// [`DocumentLocks::Auto`]: only on servers that do not isolate concurrent updates of
    /// one document, such as FerretDB 1.x). Give the relay's store the same setting.
    pub fn document_locks(mut self, locks: DocumentLocks) -> Self {
        self.locking = Locking::new(locks);
        self
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// An event about the document it will be written with, for the events topic of
    /// `aggregate_type` (`<service>.<aggregate type>.events` by default).
    ///
    /// # Errors
    ///
    /// [`OutboxError::Message`] when the payload is over the limits or the topic name or a
    /// header name is invalid.
    pub fn event<M: Message>(&self, aggregate_type: &str, event: &M) -> Result<OutboxMessage> {
        let envelope = Envelope::event(&self.service, aggregate_type, "", event).map_err(OutboxError::Message)?;
        let topic = self
            .naming
            .events(&self.service, aggregate_type)
            .map_err(OutboxError::Message)?;
        self.message(&topic, envelope)
    }

    /// Any message (an event, a command or a reply) for `topic`. An empty aggregate id is
    /// filled in with the document's id when the message is written; an event with an
    /// aggregate type must be about that document.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Message`] when the payload is over the limits or the topic name or a
    /// header name is invalid.
    pub fn message(&self, topic: &str, mut envelope: Envelope) -> Result<OutboxMessage> {
        dbps_core::kafka::validate_topic_name(topic).map_err(OutboxError::Message)?;
        self.limits
            .check(envelope.payload_json())
            .map_err(OutboxError::Message)?;
        // Reserved header names are refused now rather than by the relay, after the write.
        dbps_core::wire::check_headers(&envelope.headers).map_err(OutboxError::Message)?;
        if envelope.trace.traceparent.is_none() {
            envelope.trace = TraceContext::current().unwrap_or_else(TraceContext::new_root);
        }
        Ok(OutboxMessage {
            topic: topic.to_owned(),
            envelope,
        })
    }

    /// Inserts `document` with `messages` in its outbox, in one write. A document without
    /// `_id` gets an `ObjectId`.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Mongo`] when the insert fails (a duplicate `_id`, say): then neither
    /// the document nor any message was stored. [`OutboxError::InvalidWrite`] when the document
    /// has fields of its own that start with `_dbps_outbox`.
    pub async fn insert_with_events(
        &self,
        collection: &Collection<Document>,
        mut document: Document,
        messages: impl IntoIterator<Item = OutboxMessage>,
    ) -> Result<Written> {
        if let Some(field) = document.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
            return Err(reserved(field));
        }
        let messages: Vec<OutboxMessage> = messages.into_iter().collect();
        let id = match document.get("_id") {
            Some(id) => id.clone(),
            None => {
                let id = Bson::ObjectId(ObjectId::new());
                document.insert("_id", id.clone());
                id
            }
        };
        let aggregate = id_string(&id);
        let staged = self.stage(collection.name(), &id, Some(&aggregate), messages, 0, 0)?;
        let count = staged.enqueued.len();
        if count > 0 {
            let outbox: Document = staged
                .entries
                .into_iter()
                .map(|(k, e)| (k, Bson::Document(e)))
                .collect();
            document.insert(OUTBOX_FIELD, outbox);
            document.insert(PENDING_FIELD, staged.written_at);
            document.insert(POSITION_FIELD, staged.position);
            document.insert(SEQUENCE_FIELD, staged.sequence);
            document.insert(PARTITION_FIELD, partition(&aggregate));
        }
        collection
            .insert_one(document)
            .await
            .map_err(mongo("insert with events"))?;
        self.count(count);
        Ok(Written {
            document: id,
            enqueued: staged.enqueued,
        })
    }

    /// Applies `update` to the document `filter` matches and stores `messages` in its
    /// outbox, in one write. `update` is an update document with operators (`$set`,
    /// `$inc`, `$push`, ...); the outbox adds its own `$set` and `$min`.
    ///
    /// # Errors
    ///
    /// - [`OutboxError::NoDocument`] when no document matches `filter`: nothing was
    ///   written.
    /// - [`OutboxError::Contention`] when other writers changed the document's outbox on
    ///   every attempt: nothing was written; try again later.
    /// - [`OutboxError::Mongo`] when the server refuses the update (a `$inc` of a text
    ///   field, say): nothing was written.
    /// - [`OutboxError::InvalidWrite`] when `update` is a replacement document or touches a
    ///   field that starts with `_dbps_outbox`; [`OutboxError::Message`] when an event
    ///   names another aggregate than the document.
    pub async fn update_with_events(
        &self,
        collection: &Collection<Document>,
        filter: Document,
        update: Document,
        messages: impl IntoIterator<Item = OutboxMessage>,
    ) -> Result<Written> {
        check_update(&update)?;
        let messages: Vec<OutboxMessage> = messages.into_iter().collect();
        let database = collection.client().database(&collection.namespace().db);
        let Some(locks) = self.locking.locks(collection.client(), &database).await? else {
            return self.write_update(collection, filter, update, messages, None).await;
        };
        // The server does not isolate concurrent updates: take the document's lock, and
        // write only that document.
        let id = match filter.get("_id") {
            Some(id) if !matches!(id, Bson::Document(d) if d.keys().any(|k| k.starts_with('$'))) => id.clone(),
            _ => collection
                .find_one(filter.clone())
                .projection(doc! { "_id": 1 })
                .await
                .map_err(mongo("read outbox position"))?
                .and_then(|d| d.get("_id").cloned())
                .ok_or_else(|| OutboxError::NoDocument {
                    collection: collection.name().to_owned(),
                })?,
        };
        let (key, trusted_until) = locks.lock(collection.name(), &id).await?;
        // Every outbox write to the document waits for its lock, so while the lock holds
        // the position cannot change under this writer: a filter on the id alone then
        // needs no position guard. (On these servers only a filter that is exactly
        // `{_id: <string or ObjectId>}` is looked up by index; any other reads the whole
        // collection.) Past `trusted_until` the guard is back, in case the lock expired.
        let id_only = filter.len() == 1 && filter.get("_id") == Some(&id);
        let (filter, unguarded_until) = if id_only {
            (filter, Some(trusted_until))
        } else {
            (doc! { "$and": [filter, { "_id": id }] }, None)
        };
        let result = self
            .write_update(collection, filter, update, messages, unguarded_until)
            .await;
        if let Err(error) = locks.unlock(&key).await {
            // The write's outcome stands; the lock expires on its own.
            tracing::warn!(%error, lock = %key, "could not release an outbox document lock");
        }
        result
    }

    /// [`Self::update_with_events`] once the document is known (and locked where locks
    /// are needed): read the position, write if unchanged. The write's filter carries the
    /// position read, except before `unguarded_until`, which only a writer holding the
    /// document's lock may give.
    async fn write_update(
        &self,
        collection: &Collection<Document>,
        filter: Document,
        update: Document,
        messages: Vec<OutboxMessage>,
        unguarded_until: Option<Instant>,
    ) -> Result<Written> {
        let name = collection.name();
        let projection = doc! { "_id": 1, POSITION_FIELD: 1, SEQUENCE_FIELD: 1 };
        let mut last = Bson::Null;
        for attempt in 1..=self.max_attempts {
            let Some(current) = collection
                .find_one(filter.clone())
                .projection(projection.clone())
                .await
                .map_err(mongo("read outbox position"))?
            else {
                return Err(OutboxError::NoDocument {
                    collection: name.to_owned(),
                });
            };
            let id = current.get("_id").cloned().unwrap_or(Bson::Null);
            let position = counter(&current, POSITION_FIELD)?;
            let sequence = counter(&current, SEQUENCE_FIELD)?.unwrap_or(0);
            let aggregate = id_string(&id);
            last.clone_from(&id);
            let staged = self.stage(
                name,
                &id,
                Some(&aggregate),
                messages.clone(),
                position.unwrap_or(0),
                sequence,
            )?;
            // The guard: this document, still matching the caller's filter, with the outbox
            // position read above. A write that changed the position in between makes this
            // one match nothing, and it is tried again on the new position.
            let guard = unguarded_until.is_none_or(|until| Instant::now() >= until);
            let guarded = if guard {
                let position = match position {
                    Some(position) => Bson::Int64(position),
                    None => Bson::Document(doc! { "$exists": false }),
                };
                doc! { "$and": [filter.clone(), { "_id": id.clone(), POSITION_FIELD: position }] }
            } else {
                filter.clone()
            };
            let count = staged.enqueued.len();
            let mut update = update.clone();
            if count > 0 {
                let set = operator(&mut update, "$set")?;
                for (key, entry) in staged.entries {
                    set.insert(format!("{OUTBOX_FIELD}.{key}"), entry);
                }
                set.insert(POSITION_FIELD, staged.position);
                set.insert(SEQUENCE_FIELD, staged.sequence);
                set.insert(PARTITION_FIELD, partition(&aggregate));
                // The oldest unpublished write of the document: kept if older.
                operator(&mut update, "$min")?.insert(PENDING_FIELD, staged.written_at);
            }
            let result = collection
                .update_one(guarded, update)
                .await
                .map_err(mongo("update with events"))?;
            if result.matched_count > 0 {
                self.count(count);
                return Ok(Written {
                    document: id,
                    enqueued: staged.enqueued,
                });
            }
            metrics::counter!("dbps_outbox_write_conflicts_total", "service" => self.service.clone()).increment(1);
            if attempt >= 3 {
                // Many writers on one document: spread them out a little.
                let jitter = rand::random_range(0..=u64::from(attempt.min(20)));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
        }
        Err(OutboxError::Contention {
            collection: name.to_owned(),
            document: id_string(&last),
            attempts: self.max_attempts,
        })
    }

    /// The transactional outbox for replica sets and sharded clusters: messages go to
    /// the [`OUTBOX_COLLECTION`] collection of `database`, in the caller's transaction.
    ///
    /// # Errors
    ///
    /// [`OutboxError::TransactionsUnsupported`] at once when the deployment (a standalone
    /// server, or a MongoDB-protocol server without transactions) cannot run
    /// multi-document transactions. Use [`MongoOutbox`] itself there.
    pub async fn transactional(self, client: &Client, database: &Database) -> Result<MongoTransactionalOutbox> {
        if !is_replicated(client).await? {
            return Err(OutboxError::TransactionsUnsupported);
        }
        Ok(MongoTransactionalOutbox {
            outbox: self,
            collection: database.collection(OUTBOX_COLLECTION),
        })
    }

    /// Gives `messages` their positions (after `position`), sequence numbers (after
    /// `sequence`, events only) and keys. With `aggregate` (a document's outbox), messages
    /// without aggregate id become about that document, and events about another
    /// aggregate are refused.
    fn stage(
        &self,
        collection: &str,
        document: &Bson,
        aggregate: Option<&str>,
        messages: Vec<OutboxMessage>,
        mut position: i64,
        mut sequence: i64,
    ) -> Result<Staged> {
        let written_at = bson::DateTime::now();
        let mut entries = Vec::with_capacity(messages.len());
        let mut enqueued = Vec::with_capacity(messages.len());
        for OutboxMessage { topic, mut envelope } in messages {
            let sequenced = envelope.kind == MessageKind::Event && envelope.aggregate_type.is_some();
            match aggregate {
                Some(aggregate) if envelope.aggregate_id.is_empty() => aggregate.clone_into(&mut envelope.aggregate_id),
                Some(aggregate) if sequenced && envelope.aggregate_id != aggregate => {
                    return Err(OutboxError::Message(dbps_core::Error::InvalidAttribute {
                        attribute: "subject",
                        reason: format!(
                            "an event about {:?} cannot be stored with document {aggregate:?}: \
                             a document's events are about the document",
                            envelope.aggregate_id
                        ),
                    }));
                }
                None if envelope.aggregate_id.is_empty() => {
                    return Err(OutboxError::Message(dbps_core::Error::InvalidAttribute {
                        attribute: "subject",
                        reason: String::from("a message needs an aggregate id (its Kafka key)"),
                    }));
                }
                _ => {}
            }
            if sequenced {
                sequence += 1;
                envelope.sequence = Some(sequence);
            }
            position += 1;
            let key = new_key();
            entries.push((key.clone(), encode(&envelope, &topic, position, written_at)));
            enqueued.push(Enqueued {
                id: MongoMessageId {
                    collection: collection.to_owned(),
                    document: document.clone(),
                    key,
                },
                message_id: envelope.id,
                sequence: envelope.sequence,
            });
        }
        Ok(Staged {
            entries,
            enqueued,
            position,
            sequence,
            written_at,
        })
    }

    fn count(&self, messages: usize) {
        metrics::counter!("dbps_outbox_enqueued_total", "service" => self.service.clone())
            .increment(u64::try_from(messages).unwrap_or(u64::MAX));
    }
}

/// Messages ready to be written with a document.
struct Staged {
    /// `(key, entry)` in position order.
    entries: Vec<(String, Document)>,
    enqueued: Vec<Enqueued>,
    /// The document's last position after the write.
    position: i64,
    /// The document's last sequence number after the write.
    sequence: i64,
    written_at: bson::DateTime,
}

/// Writes messages into the [`OUTBOX_COLLECTION`] collection inside the caller's
/// multi-document transaction. Built by [`MongoOutbox::transactional`], which fails on
/// deployments without transactions.
///
/// ```no_run
/// # use dbps_outbox::mongo::MongoOutbox;
/// # use mongodb::bson::{Document, doc};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct TenderAwarded { supplier: String }
/// # impl dbps_core::Message for TenderAwarded { const TYPE: &'static str = "tender.TenderAwarded"; }
/// # async fn award(client: mongodb::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let db = client.database("tender");
/// let outbox = MongoOutbox::new("tender").transactional(&client, &db).await?;
/// let mut session = client.start_session().await?;
/// session.start_transaction().await?;
/// db.collection::<Document>("tenders")
///     .update_one(doc! { "_id": "t-7" }, doc! { "$set": { "state": "awarded" } })
///     .session(&mut session)
///     .await?;
/// db.collection::<Document>("bids")
///     .update_many(doc! { "tender": "t-7" }, doc! { "$set": { "open": false } })
///     .session(&mut session)
///     .await?;
/// outbox
///     .enqueue_event(&mut session, "tender", "t-7", &TenderAwarded { supplier: "s-1".into() })
///     .await?;
/// session.commit_transaction().await?; // both collections and the event, or nothing
/// # Ok(()) }
/// ```
///
/// Each aggregate has one document in the collection, `_id: {type, id}`, holding its
/// unpublished messages like an aggregate document does with [`MongoOutbox`]; writing
/// it makes a second transaction on the same aggregate fail with a write conflict
/// (labelled `TransientTransactionError`: retry the transaction), so sequence numbers
/// follow commit order. The session must be in a transaction: the driver does not let
/// the outbox check that, and outside one the message would be stored on its own.
#[derive(Debug, Clone)]
pub struct MongoTransactionalOutbox {
    outbox: MongoOutbox,
    collection: Collection<Document>,
}

impl MongoTransactionalOutbox {
    /// The writer's configuration.
    pub fn outbox(&self) -> &MongoOutbox {
        &self.outbox
    }

    /// Enqueues an event about `aggregate_type`/`aggregate_id` in the session's
    /// transaction, for the aggregate's events topic.
    ///
    /// # Errors
    ///
    /// As [`MongoTransactionalOutbox::enqueue`].
    pub async fn enqueue_event<M: Message>(
        &self,
        session: &mut ClientSession,
        aggregate_type: &str,
        aggregate_id: &str,
        event: &M,
    ) -> Result<Enqueued> {
        let outbox = &self.outbox;
        let envelope =
            Envelope::event(&outbox.service, aggregate_type, aggregate_id, event).map_err(OutboxError::Message)?;
        let topic = outbox
            .naming
            .events(&outbox.service, aggregate_type)
            .map_err(OutboxError::Message)?;
        self.enqueue(session, &topic, envelope).await
    }

    /// Enqueues any message for `topic` in the session's transaction. Events with an
    /// aggregate type get the next sequence number of their aggregate.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Message`] for an oversize payload, an invalid topic or header name or
    /// an empty aggregate id (nothing written); [`OutboxError::Mongo`] when the server
    /// refuses the write, for example with a write conflict to retry the transaction on.
    pub async fn enqueue(&self, session: &mut ClientSession, topic: &str, envelope: Envelope) -> Result<Enqueued> {
        let message = self.outbox.message(topic, envelope)?;
        let aggregate_id = message.envelope.aggregate_id.clone();
        let id = Bson::Document(doc! {
            "type": message.envelope.aggregate_type.as_deref().unwrap_or(""),
            "id": &aggregate_id,
        });
        let current = self
            .collection
            .find_one(doc! { "_id": id.clone() })
            .projection(doc! { POSITION_FIELD: 1, SEQUENCE_FIELD: 1 })
            .session(&mut *session)
            .await
            .map_err(mongo("read outbox position"))?;
        let (position, sequence) = match &current {
            Some(current) => (
                counter(current, POSITION_FIELD)?.unwrap_or(0),
                counter(current, SEQUENCE_FIELD)?.unwrap_or(0),
            ),
            None => (0, 0),
        };
        let mut staged = self
            .outbox
            .stage(OUTBOX_COLLECTION, &id, None, vec![message], position, sequence)?;
        let mut set = doc! {
            POSITION_FIELD: staged.position,
            SEQUENCE_FIELD: staged.sequence,
            PARTITION_FIELD: partition(&aggregate_id),
        };
        for (key, entry) in std::mem::take(&mut staged.entries) {
            set.insert(format!("{OUTBOX_FIELD}.{key}"), entry);
        }
        // The read above and this write are in one transaction: another transaction that
        // wrote the document since makes this write conflict, and the caller retries.
        self.collection
            .update_one(
                doc! { "_id": id },
                doc! { "$set": set, "$min": { PENDING_FIELD: staged.written_at } },
            )
            .upsert(true)
            .session(&mut *session)
            .await
            .map_err(mongo("enqueue"))?;
        self.outbox.count(1);
        staged
            .enqueued
            .pop()
            .ok_or_else(|| OutboxError::InvalidWrite("nothing was staged".into()))
    }
}

/// A counter field of a document: absent, or an integer.
fn counter(document: &Document, field: &str) -> Result<Option<i64>> {
    match document.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Int64(i)) => Ok(Some(*i)),
        Some(Bson::Int32(i)) => Ok(Some(i64::from(*i))),
        Some(other) => Err(OutboxError::InvalidWrite(format!(
            "{field} holds a {:?}; it belongs to the outbox and must not be written by others",
            other.element_type()
        ))),
    }
}

/// The update operator `name` of `update` (created if missing).
fn operator<'a>(update: &'a mut Document, name: &str) -> Result<&'a mut Document> {
    if !update.contains_key(name) {
        update.insert(name, Document::new());
    }
    update
        .get_document_mut(name)
        .map_err(|_| OutboxError::InvalidWrite(format!("{name} of the update must be a document")))
}

/// Refuses replacement documents and updates that touch the outbox's own fields.
fn check_update(update: &Document) -> Result<()> {
    if update.is_empty() || update.keys().any(|k| !k.starts_with('$')) {
        return Err(OutboxError::InvalidWrite(String::from(
            "update_with_events needs an update document with operators ($set, $inc, ...), not a replacement",
        )));
    }
    for (op, fields) in update {
        let Bson::Document(fields) = fields else {
            return Err(OutboxError::InvalidWrite(format!(
                "{op} of the update must be a document"
            )));
        };
        for (path, value) in fields {
            if path.starts_with(RESERVED_PREFIX) {
                return Err(reserved(path));
            }
            // $rename's targets are paths too.
            if let Bson::String(target) = value
                && op == "$rename"
                && target.starts_with(RESERVED_PREFIX)
            {
                return Err(reserved(target));
            }
        }
    }
    Ok(())
}

fn reserved(field: &str) -> OutboxError {
    OutboxError::InvalidWrite(format!(
        "{field} belongs to the outbox (fields starting with {RESERVED_PREFIX}); a write may not set it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_must_use_operators_and_leave_the_outbox_fields_alone() {
        assert!(check_update(&doc! { "$set": { "state": "sent" }, "$inc": { "n": 1 } }).is_ok());
        for bad in [
            doc! {},
            doc! { "state": "sent" },
            doc! { "$set": { "_dbps_outbox_seq": 0 } },
            doc! { "$unset": { "_dbps_outbox": "" } },
            doc! { "$rename": { "state": "_dbps_outbox_pending" } },
            doc! { "$set": 1 },
        ] {
            assert!(
                matches!(check_update(&bad), Err(OutboxError::InvalidWrite(_))),
                "{bad} was accepted"
            );
        }
    }
}
