//! The relay's side of the MongoDB outbox.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};
use tokio::sync::OnceCell;

use super::entry::{MongoMessageId, decode_all};
use super::lease::{Leases, MongoLease, Wake};
use super::locks::{DocumentLocks, Hold, Locking, Locks, is_ferretdb_v1};
use super::{
    OUTBOX_FIELD, PARKED_FIELD, PARTITION_FIELD, PARTITIONS, PENDING_FIELD, POSITION_FIELD, PUBLISHED_AT_FIELD,
    PUBLISHED_FIELD, is_replicated, mongo,
};
use crate::error::{OutboxError, Result};
use crate::store::{Backlog, OutboxStore, Pending, PoisonPolicy, Retention};

/// The relay's side of the MongoDB outbox: drains the outboxes of the documents of the
/// registered collections.
///
/// ```no_run
/// # use dbps_outbox::mongo::{MongoOutboxStore, OUTBOX_COLLECTION, PoisonPolicy};
/// # async fn relay(db: mongodb::Database) -> Result<(), Box<dyn std::error::Error>> {
/// let store = MongoOutboxStore::new(db)
///     .collection("emails")
///     .collection(OUTBOX_COLLECTION) // where MongoTransactionalOutbox writes, if used
///     .poison_policy(PoisonPolicy::HoldAggregate);
/// store.create_indexes().await?;
/// # Ok(()) }
/// ```
///
/// - **Finding work**: documents with `_dbps_outbox_pending` (a sparse index) in the
///   relay's partitions, oldest first; their messages in position order.
/// - **Marking**: acknowledged messages are removed by key (`$unset` of
///   `_dbps_outbox.<key>`), never by replacing the outbox, so messages written meanwhile
///   stay. The pending mark goes only when the outbox is empty at that moment.
/// - **Several relays**: relays share 32 hash partitions of the document id through lease
///   documents with an expiry in [`super::LEASES_COLLECTION`] (see the module docs and
///   ADR 0006). Each takes a fair share, gives up its excess when another joins, and
///   takes over the leases of a relay that stopped renewing them once they expired. A
///   relay stops fetching a partition a third of the lease time before its lease
///   expires unless it renewed it.
/// - **Wake-up**: a change stream where the deployment offers one (replica sets, sharded
///   clusters); otherwise polling, every 100 ms while messages keep coming and backing
///   off to 1 s when idle (see [`MongoOutboxStore::polling`]).
#[derive(Debug, Clone)]
pub struct MongoOutboxStore {
    database: Database,
    collections: Vec<String>,
    retention: Retention,
    poison: PoisonPolicy,
    lease_ttl: Duration,
    poll_min: Duration,
    poll_max: Duration,
    change_streams: bool,
    locking: Locking,
    ferretdb_v1: Arc<OnceCell<bool>>,
}

/// How many statements one `update` command carries on FerretDB 1.x. That server keeps a
/// PostgreSQL connection of its pool (50) for each statement of a command until the whole
/// command is done, and each statement's write needs one more: once the commands in
/// progress hold every connection, they all wait for one forever, and the server answers
/// nothing after. Measured on FerretDB 1.24: one command of 48 statements passes, one of
/// 60 hangs. 8 leaves room for several relays and the writers (two connections each).
const FERRETDB_STATEMENTS_PER_COMMAND: usize = 8;

/// How many documents a relay locks and writes at a time where writes take locks: those
/// of one command (each document's write has two statements).
const LOCKED_DOCUMENTS_PER_TURN: usize = FERRETDB_STATEMENTS_PER_COMMAND / 2;

/// How many statements one `update` command carries elsewhere (MongoDB allows 100,000).
const STATEMENTS_PER_COMMAND: usize = 1_000;

impl MongoOutboxStore {
    /// A store over `database`, with no collection registered yet, deleting published
    /// messages and letting later messages of a parked one's document flow.
    pub fn new(database: Database) -> Self {
        Self {
            database,
            collections: Vec::new(),
            retention: Retention::default(),
            poison: PoisonPolicy::default(),
            lease_ttl: Duration::from_secs(30),
            poll_min: Duration::from_millis(100),
            poll_max: Duration::from_secs(1),
            change_streams: true,
            locking: Locking::new(DocumentLocks::Auto),
            ferretdb_v1: Arc::new(OnceCell::new()),
        }
    }

    /// Registers a collection whose documents carry outboxes. Every relay of the outbox
    /// must register the same collections (they are the scope of its leases).
    pub fn collection(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.collections.contains(&name) {
            self.collections.push(name);
        }
        self
    }

    /// Sets what happens to published messages.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Sets what happens to the messages after a parked one.
    pub fn poison_policy(mut self, poison: PoisonPolicy) -> Self {
        self.poison = poison;
        self
    }

    /// How long a partition lease lasts without renewal (default 30 s, at least 1 s). A
    /// relay that dies blocks its partitions this long; a relay renews its leases every
    /// third of it. Keep it well above the clock difference between relay hosts.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Polling bounds where no change stream is available: after messages were found the
    /// relay looks again after `min` (default 100 ms); each empty look doubles the delay
    /// up to `max` (default 1 s). The relay's own poll interval caps both.
    pub fn polling(mut self, min: Duration, max: Duration) -> Self {
        self.poll_min = min;
        self.poll_max = max.max(min);
        self
    }

    /// Whether to use a change stream where the deployment offers one (default `true`);
    /// `false` polls everywhere.
    pub fn change_streams(mut self, enabled: bool) -> Self {
        self.change_streams = enabled;
        self
    }

    /// Whether the relay's writes to a document take its lock first; must match the
    /// writers' [`MongoOutbox::document_locks`](super::MongoOutbox::document_locks)
    /// (default [`DocumentLocks::Auto`] on both).
    pub fn document_locks(mut self, locks: DocumentLocks) -> Self {
        self.locking = Locking::new(locks);
        self
    }

    /// The configured retention.
    pub fn retention_policy(&self) -> Retention {
        self.retention
    }

    /// The registered collections.
    pub fn collections(&self) -> &[String] {
        &self.collections
    }

    /// The indexes the relay's queries use: a sparse index on `_dbps_outbox_pending` in
    /// each registered collection. Declare them with the service's migrations
    /// (`MongoMigrations::index`) or create them with [`Self::create_indexes`].
    pub fn indexes(&self) -> Vec<(String, IndexModel)> {
        self.collections
            .iter()
            .map(|name| {
                let index = IndexModel::builder()
                    .keys(doc! { PENDING_FIELD: 1 })
                    .options(
                        IndexOptions::builder()
                            .name(String::from("dbps_outbox_pending"))
                            .sparse(true)
                            .build(),
                    )
                    .build();
                (name.clone(), index)
            })
            .collect()
    }

    /// Creates [`Self::indexes`] where they are missing.
    pub async fn create_indexes(&self) -> Result<()> {
        for (name, index) in self.indexes() {
            self.handle(&name)
                .create_index(index)
                .await
                .map_err(mongo("create index"))?;
        }
        Ok(())
    }

    /// Parked messages with their reasons, oldest parking first.
    pub async fn parked(&self) -> Result<Vec<(Pending<MongoMessageId>, String)>> {
        let mut parked = Vec::new();
        for name in &self.collections {
            let documents: Vec<Document> = self
                .handle(name)
                .find(doc! { PARKED_FIELD: { "$exists": true } })
                .projection(doc! { PARKED_FIELD: 1 })
                .await
                .map_err(mongo("list parked"))?
                .try_collect()
                .await
                .map_err(mongo("list parked"))?;
            for document in documents {
                let id = document.get("_id").cloned().unwrap_or(Bson::Null);
                let Ok(entries) = document.get_document(PARKED_FIELD) else {
                    continue;
                };
                let mut meta = BTreeMap::new();
                for (key, entry) in entries {
                    if let Bson::Document(entry) = entry {
                        let reason = entry.get_str("reason").unwrap_or_default().to_owned();
                        let at = entry.get_datetime("parked_at").copied().unwrap_or(bson::DateTime::MIN);
                        meta.insert(key.clone(), (at, reason));
                    }
                }
                for pending in decode_all(name, &id, entries)? {
                    let (at, reason) = meta
                        .remove(&pending.id.key)
                        .unwrap_or((bson::DateTime::MIN, String::new()));
                    parked.push((at, pending, reason));
                }
            }
        }
        // A stable sort keeps position order within a document parked at one instant.
        parked.sort_by_key(|(at, _, _)| *at);
        Ok(parked
            .into_iter()
            .map(|(_, pending, reason)| (pending, reason))
            .collect())
    }

    /// Puts a parked message back in line (after the cause was fixed): the relay publishes
    /// it again. It keeps its position, so it goes out before later messages of its
    /// document that are still waiting.
    pub async fn replay(&self, id: &MongoMessageId) -> Result<()> {
        let collection = self.handle(&id.collection);
        let path = format!("{PARKED_FIELD}.{}", id.key);
        let mut entry = self.parked_entry(id).await?;
        entry.remove("reason");
        entry.remove("parked_at");
        let mut set = Document::new();
        set.insert(format!("{OUTBOX_FIELD}.{}", id.key), entry);
        let mut filter = doc! { "_id": id.document.clone() };
        filter.insert(path.clone(), doc! { "$exists": true });
        let mut unset = Document::new();
        unset.insert(path, "");
        let update = doc! { "$unset": unset, "$set": set, "$min": { PENDING_FIELD: bson::DateTime::now() } };
        let (collection, filter, update) = (&collection, &filter, &update);
        self.write_documents(&id.collection, vec![id.document.clone()], |_, hold| async move {
            let result = collection
                .update_one(filter.clone(), update.clone())
                .await
                .map_err(mongo("replay"))?;
            if result.matched_count == 0 {
                return Err(OutboxError::NotParkedEntry { id: id.to_string() });
            }
            hold.check()?;
            self.forget_empty_parked(collection, &id.document).await
        })
        .await?;
        tracing::info!(%id, "parked outbox message replayed");
        Ok(())
    }

    /// Deletes a parked message for good (an operator decided it must not be published).
    pub async fn discard(&self, id: &MongoMessageId) -> Result<()> {
        let collection = self.handle(&id.collection);
        let path = format!("{PARKED_FIELD}.{}", id.key);
        let mut filter = doc! { "_id": id.document.clone() };
        filter.insert(path.clone(), doc! { "$exists": true });
        let mut unset = Document::new();
        unset.insert(path, "");
        let (collection, filter, update) = (&collection, &filter, &doc! { "$unset": unset });
        self.write_documents(&id.collection, vec![id.document.clone()], |_, hold| async move {
            let result = collection
                .update_one(filter.clone(), update.clone())
                .await
                .map_err(mongo("discard"))?;
            if result.matched_count == 0 {
                return Err(OutboxError::NotParkedEntry { id: id.to_string() });
            }
            hold.check()?;
            self.forget_empty_parked(collection, &id.document).await
        })
        .await?;
        tracing::warn!(%id, "parked outbox message discarded");
        Ok(())
    }

    fn handle(&self, name: &str) -> Collection<Document> {
        self.database.collection(name)
    }

    /// Runs `write` on `documents` of collection `name`, under their locks on servers that
    /// need them (see [`DocumentLocks`]); `write` gets the documents it may touch, in one
    /// or several turns (of at most [`LOCKED_DOCUMENTS_PER_TURN`] under locks), and a
    /// [`Hold`] to check before each write after its first.
    async fn write_documents<F, Fut>(&self, name: &str, documents: Vec<Bson>, mut write: F) -> Result<()>
    where
        F: FnMut(Vec<Bson>, Hold) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        if documents.is_empty() {
            return Ok(());
        }
        let Some(locks) = self.locking.locks(self.database.client(), &self.database).await? else {
            return write(documents, Hold::unlocked()).await;
        };
        let keyed: Vec<(String, Bson)> = documents.into_iter().map(|d| (Locks::key(name, &d), d)).collect();
        // A few documents at a time, so that a writer waiting for one of them waits for
        // one command, not for the whole batch.
        for group in keyed.chunks(LOCKED_DOCUMENTS_PER_TURN) {
            let keys = group.iter().map(|(k, _)| k.clone()).collect();
            locks
                .with_each(name, keys, |taken, hold| {
                    let turn = group
                        .iter()
                        .filter(|(k, _)| taken.contains(k))
                        .map(|(_, d)| d.clone())
                        .collect();
                    write(turn, hold)
                })
                .await?;
        }
        Ok(())
    }

    fn leases(&self) -> Leases {
        // The registered collections, sorted, are the scope: relays of the same outbox
        // share leases, relays of different outboxes in one database do not collide.
        let mut names = self.collections.clone();
        names.sort();
        Leases::new(&self.database, names.join(","), self.lease_ttl)
    }

    async fn parked_entry(&self, id: &MongoMessageId) -> Result<Document> {
        let path = format!("{PARKED_FIELD}.{}", id.key);
        let mut projection = Document::new();
        projection.insert(path, 1);
        let document = self
            .handle(&id.collection)
            .find_one(doc! { "_id": id.document.clone() })
            .projection(projection)
            .await
            .map_err(mongo("read parked"))?;
        document
            .as_ref()
            .and_then(|d| d.get_document(PARKED_FIELD).ok())
            .and_then(|p| p.get_document(&id.key).ok())
            .cloned()
            .ok_or_else(|| OutboxError::NotParkedEntry { id: id.to_string() })
    }

    /// Runs `statements` (`{q, u}` pairs) in order as `update` commands on collection
    /// `name`: one per [`STATEMENTS_PER_COMMAND`], on FerretDB 1.x one per
    /// [`FERRETDB_STATEMENTS_PER_COMMAND`], each after the first only once `hold` still
    /// holds; a statement's write error fails the whole.
    async fn update_each(
        &self,
        name: &str,
        statements: Vec<Document>,
        operation: &'static str,
        hold: &Hold,
    ) -> Result<()> {
        if statements.is_empty() {
            return Ok(());
        }
        let client = self.database.client();
        let per_command = if *self.ferretdb_v1.get_or_try_init(|| is_ferretdb_v1(client)).await? {
            FERRETDB_STATEMENTS_PER_COMMAND
        } else {
            STATEMENTS_PER_COMMAND
        };
        // One command after the other, so statements keep their order.
        for (i, statements) in statements.chunks(per_command).enumerate() {
            if i > 0 {
                hold.check()?;
            }
            let reply = self
                .database
                .run_command(doc! { "update": name, "updates": statements, "ordered": true })
                .await
                .map_err(mongo(operation))?;
            if let Ok(errors) = reply.get_array("writeErrors")
                && !errors.is_empty()
            {
                return Err(OutboxError::WriteRefused {
                    operation,
                    errors: errors
                        .iter()
                        .map(|e| {
                            e.as_document()
                                .and_then(|e| e.get_str("errmsg").ok())
                                .unwrap_or("unknown")
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
        }
        Ok(())
    }

    /// The statement that removes the outbox and the pending mark of `document` if its
    /// outbox is empty when it runs. A message written meanwhile makes the outbox
    /// non-empty, and the document keeps both. It selects the document by its `_id`,
    /// which every server answers from the `_id` index (with `_id` beside other fields
    /// too; FerretDB 1.x reads the whole collection for `_id: {$in: …}` or `$and`).
    fn forget_if_empty(document: &Bson) -> Document {
        doc! {
            "q": { "_id": document.clone(), OUTBOX_FIELD: {} },
            "u": { "$unset": { OUTBOX_FIELD: "", PENDING_FIELD: "" } },
        }
    }

    /// Removes the outbox and the pending mark of those `documents` of collection `name`
    /// whose outbox is empty or gone now, with two statements each.
    async fn forget_empty_outboxes(&self, name: &str, documents: &[Bson], hold: &Hold) -> Result<()> {
        let mut statements = Vec::with_capacity(documents.len() * 2);
        for document in documents {
            statements.push(Self::forget_if_empty(document));
            statements.push(doc! {
                "q": { "_id": document.clone(), OUTBOX_FIELD: { "$exists": false } },
                "u": { "$unset": { PENDING_FIELD: "" } },
            });
        }
        self.update_each(name, statements, "clear drained outboxes", hold).await
    }

    /// Removes the parked map of `document` if it is empty, so that
    /// [`PoisonPolicy::HoldAggregate`] lets the document's messages flow again.
    async fn forget_empty_parked(&self, collection: &Collection<Document>, document: &Bson) -> Result<()> {
        collection
            .update_one(
                doc! { "_id": document.clone(), PARKED_FIELD: {} },
                doc! { "$unset": { PARKED_FIELD: "" } },
            )
            .await
            .map_err(mongo("clear parked"))?;
        Ok(())
    }

    async fn open_change_stream(&self) -> Result<Wake> {
        let mut updated = Document::new();
        updated.insert(
            format!("updateDescription.updatedFields.{POSITION_FIELD}"),
            doc! { "$exists": true },
        );
        // Writers always change the position; marking, parking and lease renewals never
        // do, so the relay is not woken by its own writes.
        let pipeline = [doc! { "$match": {
            "ns.coll": { "$in": &self.collections },
            "$or": [{ "operationType": { "$in": ["insert", "replace"] } }, updated],
        } }];
        let stream = self
            .database
            .watch()
            .pipeline(pipeline)
            .await
            .map_err(mongo("open change stream"))?;
        Ok(Wake::Stream(Box::new(stream)))
    }
}

impl OutboxStore for MongoOutboxStore {
    type Lease = MongoLease;
    type Id = MongoMessageId;

    fn retention_policy(&self) -> Retention {
        self.retention
    }

    async fn join(&self) -> Result<MongoLease> {
        if self.collections.is_empty() {
            return Err(OutboxError::InvalidConfig {
                setting: "collections",
                reason: String::from("no collection registered with the store (MongoOutboxStore::collection)"),
            });
        }
        let wake = if self.change_streams && is_replicated(&self.database.client().clone()).await? {
            self.open_change_stream().await?
        } else {
            Wake::Poll { delay: self.poll_min }
        };
        let mut lease = MongoLease {
            member: uuid::Uuid::now_v7().simple().to_string(),
            owned: Default::default(),
            renewed_at: None,
            wake,
            next_collection: 0,
            release: Some(self.leases()),
        };
        self.leases().renew(&mut lease).await?;
        tracing::debug!(member = %lease.member, change_stream = lease.change_stream(), "relay joined");
        Ok(lease)
    }

    async fn rebalance(&self, lease: &mut MongoLease) -> Result<()> {
        self.leases().rebalance(lease).await
    }

    fn owns_any(&self, lease: &MongoLease) -> bool {
        !lease.owned.is_empty()
    }

    fn partitions(&self, lease: &MongoLease) -> Vec<i32> {
        lease.partitions()
    }

    async fn fetch(&self, lease: &mut MongoLease, limit: usize) -> Result<Vec<Pending<MongoMessageId>>> {
        let leases = self.leases();
        if leases.renewal_due(lease) {
            leases.renew(lease).await?;
        }
        if lease.owned.is_empty() || !leases.valid(lease) {
            return Ok(Vec::new());
        }
        let mut filter = doc! { PENDING_FIELD: { "$exists": true } };
        if lease.owned.len() < usize::try_from(PARTITIONS).unwrap_or(usize::MAX) {
            let owned: Vec<i32> = lease.owned.iter().copied().collect();
            filter.insert(PARTITION_FIELD, doc! { "$in": owned });
        }
        if self.poison == PoisonPolicy::HoldAggregate {
            filter.insert(PARKED_FIELD, doc! { "$exists": false });
        }
        let mut batch = Vec::new();
        let count = self.collections.len();
        for i in 0..count {
            let remaining = limit.saturating_sub(batch.len());
            if remaining == 0 {
                break;
            }
            let name = &self.collections[(lease.next_collection + i) % count];
            let collection = self.handle(name);
            // At most `remaining` documents: each holds at least one message.
            let documents: Vec<Document> = collection
                .find(filter.clone())
                .sort(doc! { PENDING_FIELD: 1 })
                .limit(i64::try_from(remaining).unwrap_or(i64::MAX))
                .projection(doc! { OUTBOX_FIELD: 1 })
                .await
                .map_err(mongo("fetch"))?
                .try_collect()
                .await
                .map_err(mongo("fetch"))?;
            let mut drained = Vec::new();
            for document in documents {
                let id = document.get("_id").cloned().unwrap_or(Bson::Null);
                match document.get_document(OUTBOX_FIELD) {
                    Ok(outbox) if !outbox.is_empty() => {
                        // A prefix of the document's messages in position order: the rest
                        // follow in a later batch, still in order.
                        let room = limit.saturating_sub(batch.len());
                        batch.extend(decode_all(name, &id, outbox)?.into_iter().take(room));
                    }
                    // Marked published, but the relay stopped before clearing the mark.
                    _ => drained.push(id),
                }
            }
            self.write_documents(name, drained, |documents, hold| async move {
                self.forget_empty_outboxes(name, &documents, &hold).await
            })
            .await?;
        }
        lease.next_collection = (lease.next_collection + 1) % count;
        if !batch.is_empty()
            && let Wake::Poll { delay } = &mut lease.wake
        {
            *delay = self.poll_min;
        }
        Ok(batch)
    }

    /// For each document, a statement that removes its acknowledged messages and one that
    /// removes its outbox if that is empty now, each selecting the document by its `_id`,
    /// which every server answers from the `_id` index (FerretDB 1.x reads the whole
    /// collection for `_id: {$in: …}`, as one `update_many` over the batch would need);
    /// sent as one command per collection, on FerretDB 1.x one per lock turn.
    async fn mark_published(&self, ids: &[MongoMessageId]) -> Result<()> {
        let mut by_collection: BTreeMap<&str, Vec<(Bson, Document)>> = BTreeMap::new();
        for id in ids {
            let documents = by_collection.entry(&id.collection).or_default();
            let at = match documents.iter().position(|(d, _)| *d == id.document) {
                Some(at) => at,
                None => {
                    documents.push((id.document.clone(), Document::new()));
                    documents.len() - 1
                }
            };
            let path = format!("{OUTBOX_FIELD}.{}", id.key);
            match self.retention {
                Retention::Delete => documents[at].1.insert(path, ""),
                Retention::Keep(_) => documents[at].1.insert(path, format!("{PUBLISHED_FIELD}.{}", id.key)),
            };
        }
        for (name, documents) in by_collection {
            let ids: Vec<Bson> = documents.iter().map(|(d, _)| d.clone()).collect();
            let documents = &documents;
            self.write_documents(name, ids, |turn, hold| async move {
                let mut statements = Vec::with_capacity(turn.len() * 2);
                for (document, paths) in documents.iter().filter(|(d, _)| turn.contains(d)) {
                    // Keys are unique in the collection, so this removes the document's own
                    // acknowledged messages and nothing else (a message written meanwhile
                    // has another key).
                    let update = match self.retention {
                        Retention::Delete => doc! { "$unset": paths.clone() },
                        Retention::Keep(_) => {
                            doc! { "$rename": paths.clone(), "$set": { PUBLISHED_AT_FIELD: bson::DateTime::now() } }
                        }
                    };
                    statements.push(doc! { "q": { "_id": document.clone() }, "u": update });
                    statements.push(Self::forget_if_empty(document));
                }
                self.update_each(name, statements, "mark published", &hold).await
            })
            .await?;
        }
        Ok(())
    }

    async fn park(&self, id: &MongoMessageId, reason: &str) -> Result<()> {
        let collection = self.handle(&id.collection);
        let path = format!("{OUTBOX_FIELD}.{}", id.key);
        let mut projection = Document::new();
        projection.insert(path.clone(), 1);
        let document = collection
            .find_one(doc! { "_id": id.document.clone() })
            .projection(projection)
            .await
            .map_err(mongo("read message to park"))?;
        let Some(mut entry) = document
            .as_ref()
            .and_then(|d| d.get_document(OUTBOX_FIELD).ok())
            .and_then(|o| o.get_document(&id.key).ok())
            .cloned()
        else {
            // Already published or parked by an earlier round.
            return Ok(());
        };
        entry.insert("reason", reason);
        entry.insert("parked_at", bson::DateTime::now());
        let mut filter = doc! { "_id": id.document.clone() };
        filter.insert(path.clone(), doc! { "$exists": true });
        let mut unset = Document::new();
        unset.insert(path, "");
        let mut set = Document::new();
        set.insert(format!("{PARKED_FIELD}.{}", id.key), entry);
        // One statement moves the message: it is in the outbox or parked, never both or
        // neither. The next clears the outbox if that was its last message.
        let statements = vec![
            doc! { "q": filter, "u": { "$unset": unset, "$set": set } },
            Self::forget_if_empty(&id.document),
        ];
        let statements = &statements;
        self.write_documents(&id.collection, vec![id.document.clone()], |_, hold| async move {
            self.update_each(&id.collection, statements.clone(), "park", &hold)
                .await
        })
        .await
    }

    async fn wait_for_commit(&self, lease: &mut MongoLease, timeout: Duration) -> Result<bool> {
        match &mut lease.wake {
            Wake::Poll { delay } => {
                tokio::time::sleep((*delay).min(timeout)).await;
                *delay = delay.saturating_mul(2).min(self.poll_max);
                Ok(false)
            }
            Wake::Stream(stream) => match tokio::time::timeout(timeout, stream.next()).await {
                Ok(Some(Ok(_))) => {
                    // Several writes may have been reported meanwhile; one fetch sees them
                    // all. (The driver keeps a getMore in flight across dropped polls.)
                    while let Some(Some(Ok(_))) = stream.next().now_or_never() {}
                    Ok(true)
                }
                Ok(Some(Err(source))) => Err(mongo("watch")(source)),
                Ok(None) => Err(OutboxError::StreamEnded("change stream")),
                Err(_) => Ok(false),
            },
        }
    }

    async fn purge_published(&self, older_than: Duration) -> Result<u64> {
        let age = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let cutoff = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis().saturating_sub(age));
        let mut purged = 0_u64;
        for name in &self.collections {
            let collection = self.handle(name);
            let documents: Vec<Document> = collection
                .find(doc! { PUBLISHED_AT_FIELD: { "$lt": cutoff } })
                .projection(doc! { PUBLISHED_FIELD: 1 })
                .await
                .map_err(mongo("purge"))?
                .try_collect()
                .await
                .map_err(mongo("purge"))?;
            if documents.is_empty() {
                continue;
            }
            let ids: Vec<Bson> = documents.iter().filter_map(|d| d.get("_id").cloned()).collect();
            let result = collection
                .update_many(
                    doc! { "_id": { "$in": ids }, PUBLISHED_AT_FIELD: { "$lt": cutoff } },
                    doc! { "$unset": { PUBLISHED_FIELD: "", PUBLISHED_AT_FIELD: "" } },
                )
                .await
                .map_err(mongo("purge"))?;
            if result.modified_count > 0 {
                purged += documents
                    .iter()
                    .map(|d| d.get_document(PUBLISHED_FIELD).map_or(0, |p| p.len() as u64))
                    .sum::<u64>();
            }
        }
        Ok(purged)
    }

    async fn backlog(&self) -> Result<Backlog> {
        let mut backlog = Backlog::default();
        let mut oldest: Option<bson::DateTime> = None;
        for name in &self.collections {
            let collection = self.handle(name);
            let mut pending = collection
                .find(doc! { PENDING_FIELD: { "$exists": true } })
                .projection(doc! { OUTBOX_FIELD: 1, PENDING_FIELD: 1 })
                .await
                .map_err(mongo("backlog"))?;
            while let Some(document) = pending.try_next().await.map_err(mongo("backlog"))? {
                let count = document.get_document(OUTBOX_FIELD).map_or(0, Document::len);
                if count > 0
                    && let Ok(since) = document.get_datetime(PENDING_FIELD)
                {
                    oldest = Some(oldest.map_or(*since, |o| o.min(*since)));
                }
                backlog.pending += count as u64;
            }
            let mut parked = collection
                .find(doc! { PARKED_FIELD: { "$exists": true } })
                .projection(doc! { PARKED_FIELD: 1 })
                .await
                .map_err(mongo("backlog"))?;
            while let Some(document) = parked.try_next().await.map_err(mongo("backlog"))? {
                backlog.parked += document.get_document(PARKED_FIELD).map_or(0, |p| p.len() as u64);
            }
        }
        backlog.oldest_age = oldest.map(|since| {
            let age = bson::DateTime::now()
                .timestamp_millis()
                .saturating_sub(since.timestamp_millis());
            Duration::from_millis(u64::try_from(age).unwrap_or(0))
        });
        Ok(backlog)
    }

    async fn leave(&self, mut lease: MongoLease) -> Result<()> {
        lease.release = None;
        let (member, owned) = (lease.member.clone(), lease.owned.clone());
        // The change stream closes with its cursor.
        drop(lease);
        self.leases().leave(&member, &owned).await
    }
}
