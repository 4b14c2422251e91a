//! Per-document write locks, for servers that do not isolate concurrent updates of one
//! document.
//!
//! MongoDB applies each update to a document atomically: two concurrent updates of one
//! document both take effect. FerretDB 1.x (the local stack's server)
//! reads the document, applies the update in memory and writes the whole document back,
//! without isolation: of two concurrent updates, one may silently overwrite the other,
//! although both were acknowledged. An outbox write that is overwritten loses its state
//! change and its events together, but a relay could publish an event before its write is
//! overwritten, and the relay's own marking adds writers to every aggregate document. So
//! on such servers every outbox write to a document (writers and relays alike) first
//! takes the document's lock: a document in [`LOCKS_COLLECTION`] whose `_id` names the
//! locked document, taken by an insert (which the unique `_id` makes atomic everywhere)
//! and deleted afterwards. A lock left by a crashed holder expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dbps_core::classify::is_duplicate_key;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::{Client, Collection, Database};
use tokio::sync::OnceCell;

use super::mongo;
use crate::error::{OutboxError, Result};

/// The collection holding the per-document write locks (only on servers that need them).
pub const LOCKS_COLLECTION: &str = "dbps_outbox_locks";

/// Whether outbox writes to a document take a per-document lock first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DocumentLocks {
    /// Only on servers known not to isolate concurrent updates of one document (FerretDB
    /// 1.x, detected with `buildInfo`); MongoDB needs none. The default.
    #[default]
    Auto,
    /// Always, for another server with the same weakness.
    Always,
    /// Never.
    Never,
}

impl DocumentLocks {
    /// Whether outbox writes take per-document locks, in this mode, on the server behind
    /// `client` (for [`DocumentLocks::Auto`], asked with `buildInfo`).
    ///
    /// # Errors
    ///
    /// [`OutboxError::Mongo`] when `buildInfo` fails.
    pub async fn needed(self, client: &Client) -> Result<bool> {
        match self {
            Self::Always => Ok(true),
            Self::Never => Ok(false),
            Self::Auto => is_ferretdb_v1(client).await,
        }
    }
}

/// How long a lock lives before another writer may break it: far longer than one write
/// takes, so only a crashed holder's lock is ever broken.
const LOCK_TTL: Duration = Duration::from_secs(10);

/// How long after taking a lock its holder may rely on it: half its life, which leaves
/// room for a stall between a check and the write it allows, and for clock differences
/// between hosts.
const LOCK_TRUSTED: Duration = Duration::from_secs(5);
/// How long a writer waits for a lock before giving up with a contention error.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How often a relay's turn that is still running renews the locks it holds, well within
/// [`LOCK_TRUSTED`].
const LOCK_RENEW: Duration = Duration::from_millis(1_500);

/// Decides once (per writer or store) whether locks are needed, and takes them.
#[derive(Debug, Clone)]
pub(crate) struct Locking {
    mode: DocumentLocks,
    needed: Arc<OnceCell<bool>>,
}

impl Locking {
    pub(crate) fn new(mode: DocumentLocks) -> Self {
        Self {
            mode,
            needed: Arc::new(OnceCell::new()),
        }
    }

    /// The locks of `database` if the server behind `client` needs them.
    pub(crate) async fn locks(&self, client: &Client, database: &Database) -> Result<Option<Locks>> {
        let needed = *self.needed.get_or_try_init(|| self.mode.needed(client)).await?;
        Ok(needed.then(|| Locks::new(database)))
    }
}

/// Whether the server is FerretDB 1.x, which loses concurrent updates of one document
/// (see the module docs) and deadlocks on `update` commands of many statements (see
/// [`super::store`]).
pub(crate) async fn is_ferretdb_v1(client: &Client) -> Result<bool> {
    let info = client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await
        .map_err(mongo("buildInfo"))?;
    let ferretdb_v1 = info.get_str("ferretdbVersion").is_ok_and(|v| v.starts_with("v1."));
    if ferretdb_v1 {
        tracing::debug!("server does not isolate concurrent document updates: outbox writes take document locks");
    }
    Ok(ferretdb_v1)
}

/// The lock collection of one database.
#[derive(Debug, Clone)]
pub(crate) struct Locks {
    collection: Collection<Document>,
    owner: String,
}

impl Locks {
    fn new(database: &Database) -> Self {
        Self {
            collection: database.collection(LOCKS_COLLECTION),
            owner: uuid::Uuid::now_v7().simple().to_string(),
        }
    }

    /// The lock id of document `id` of `collection`.
    pub(crate) fn key(collection: &str, id: &Bson) -> String {
        format!("{collection}/{}", id.clone().into_relaxed_extjson())
    }

    fn lock_document(&self, key: &str) -> Document {
        let ttl = i64::try_from(LOCK_TTL.as_millis()).unwrap_or(i64::MAX);
        let expires_at = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis().saturating_add(ttl));
        doc! { "_id": key, "owner": &self.owner, "expires_at": expires_at }
    }

    /// Takes the lock of document `id` of `collection`, waiting while another writer
    /// holds it; returns the lock's key and the moment until which the holder may rely on
    /// it (after that, another writer may already have broken it).
    pub(crate) async fn lock(&self, collection: &str, id: &Bson) -> Result<(String, Instant)> {
        let key = Self::key(collection, id);
        let started = Instant::now();
        let mut attempt = 0_u32;
        loop {
            // Before the insert: the lock's expiry is computed from a moment no earlier.
            let taken = Instant::now();
            match self.collection.insert_one(self.lock_document(&key)).await {
                Ok(_) => return Ok((key, taken + LOCK_TRUSTED)),
                Err(error) if is_duplicate_key(&error) => {}
                Err(source) => return Err(mongo("lock document")(source)),
            }
            self.break_if_expired(&key).await?;
            attempt += 1;
            if started.elapsed() > LOCK_WAIT {
                return Err(OutboxError::Contention {
                    collection: collection.to_owned(),
                    document: id.to_string(),
                    attempts: attempt,
                });
            }
            backoff(attempt).await;
        }
    }

    /// Takes as many of the locks `keys` as are free now; returns those taken.
    async fn try_lock_many(&self, keys: &[String]) -> Result<Vec<String>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let documents: Vec<Document> = keys.iter().map(|k| self.lock_document(k)).collect();
        match self.collection.insert_many(documents).ordered(false).await {
            Ok(_) => Ok(keys.to_vec()),
            Err(error) => {
                let ErrorKind::InsertMany(failure) = error.kind.as_ref() else {
                    return Err(mongo("lock documents")(error));
                };
                if failure.write_concern_error.is_some() {
                    return Err(mongo("lock documents")(error));
                }
                let failed = failure.write_errors.as_deref().unwrap_or_default();
                if failed.iter().any(|e| e.code != 11000) {
                    return Err(mongo("lock documents")(error));
                }
                let mut taken = Vec::with_capacity(keys.len());
                for (index, key) in keys.iter().enumerate() {
                    if failed.iter().any(|e| e.index == index) {
                        self.break_if_expired(key).await?;
                    } else {
                        taken.push(key.clone());
                    }
                }
                Ok(taken)
            }
        }
    }

    /// Takes every lock of `keys` in turns: `work` runs on the keys taken in each turn,
    /// which are released after it, so a turn never waits while holding locks.
    ///
    /// A turn never outlives its locks: while `work` runs, the locks are renewed every
    /// [`LOCK_RENEW`], and `work` checks its [`Hold`] before each write after its first.
    /// A lock another writer broke meanwhile (this process stalled for longer than the
    /// lock's life) ends the hold, and the turn's next check fails instead of writing.
    pub(crate) async fn with_each<F, Fut>(&self, collection: &str, keys: Vec<String>, mut work: F) -> Result<()>
    where
        F: FnMut(Vec<String>, Hold) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let started = Instant::now();
        let mut left = keys;
        let mut attempt = 0_u32;
        while !left.is_empty() {
            // Before the insert: the locks' expiry is computed from a moment no earlier.
            let taken_at = Instant::now();
            let taken = self.try_lock_many(&left).await?;
            if !taken.is_empty() {
                let hold = Hold::until(collection, taken_at + LOCK_TRUSTED);
                let result = {
                    let work = work(taken.clone(), hold.clone());
                    tokio::pin!(work);
                    tokio::select! {
                        result = &mut work => result,
                        never = self.keep(&taken, &hold) => match never {},
                    }
                };
                self.unlock_many(&taken).await?;
                result?;
                left.retain(|k| !taken.contains(k));
            }
            if left.is_empty() {
                break;
            }
            attempt += 1;
            if started.elapsed() > LOCK_WAIT {
                return Err(OutboxError::Contention {
                    collection: collection.to_owned(),
                    document: left.join(", "),
                    attempts: attempt,
                });
            }
            backoff(attempt).await;
        }
        Ok(())
    }

    /// Renews the locks `keys` every [`LOCK_RENEW`] and extends `hold` after each renewal
    /// that found them all still this holder's; runs until dropped.
    async fn keep(&self, keys: &[String], hold: &Hold) -> std::convert::Infallible {
        let ttl = i64::try_from(LOCK_TTL.as_millis()).unwrap_or(i64::MAX);
        loop {
            tokio::time::sleep(LOCK_RENEW).await;
            let renewed_at = Instant::now();
            let expires_at = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis().saturating_add(ttl));
            let renewed = self
                .collection
                .update_many(
                    doc! { "_id": { "$in": keys }, "owner": &self.owner },
                    doc! { "$set": { "expires_at": expires_at } },
                )
                .await;
            match renewed {
                Ok(result) if usize::try_from(result.matched_count).is_ok_and(|n| n == keys.len()) => {
                    hold.extend(renewed_at + LOCK_TRUSTED);
                }
                Ok(result) => {
                    metrics::counter!("dbps_outbox_document_locks_lost_total").increment(1);
                    tracing::error!(
                        held = keys.len(),
                        still_held = result.matched_count,
                        "outbox document locks expired and were taken by another writer during a relay turn: the turn stops writing"
                    );
                    hold.lose();
                }
                // The hold is not extended: it runs out on its own unless a later renewal
                // succeeds.
                Err(error) => tracing::warn!(%error, "could not renew outbox document locks"),
            }
        }
    }

    /// Releases the lock `key`.
    pub(crate) async fn unlock(&self, key: &str) -> Result<()> {
        self.collection
            .delete_one(doc! { "_id": key, "owner": &self.owner })
            .await
            .map_err(mongo("unlock document"))?;
        Ok(())
    }

    async fn unlock_many(&self, keys: &[String]) -> Result<()> {
        self.collection
            .delete_many(doc! { "_id": { "$in": keys }, "owner": &self.owner })
            .await
            .map_err(mongo("unlock documents"))?;
        Ok(())
    }

    /// Deletes the lock `key` if it expired (its holder crashed).
    async fn break_if_expired(&self, key: &str) -> Result<()> {
        let result = self
            .collection
            .delete_one(doc! { "_id": key, "expires_at": { "$lt": bson::DateTime::now() } })
            .await
            .map_err(mongo("break expired lock"))?;
        if result.deleted_count > 0 {
            tracing::warn!(lock = key, "broke an expired outbox document lock");
        }
        Ok(())
    }
}

/// What a turn of [`Locks::with_each`] may rely on: until when its locks are its own.
/// Without locks (a server that needs none) it always holds.
#[derive(Debug, Clone)]
pub(crate) struct Hold {
    locked: Option<(Arc<str>, TrustedUntil)>,
}

/// Until when a turn's locks are its own; `None` once it lost them. Shared between the
/// turn and its renewals.
type TrustedUntil = Arc<std::sync::Mutex<Option<Instant>>>;

impl Hold {
    /// A hold without locks.
    pub(crate) fn unlocked() -> Self {
        Self { locked: None }
    }

    fn until(collection: &str, trusted_until: Instant) -> Self {
        Self {
            locked: Some((collection.into(), Arc::new(std::sync::Mutex::new(Some(trusted_until))))),
        }
    }

    fn extend(&self, trusted_until: Instant) {
        if let Some((_, until)) = &self.locked {
            let mut until = until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(at) = until.as_mut() {
                *at = (*at).max(trusted_until);
            }
        }
    }

    fn lose(&self) {
        if let Some((_, until)) = &self.locked {
            *until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }

    /// `Ok` while the turn may still write under its locks; [`OutboxError::LockExpired`]
    /// (transient: the relay retries the round) once it may not.
    pub(crate) fn check(&self) -> Result<()> {
        let Some((collection, until)) = &self.locked else {
            return Ok(());
        };
        let until = *until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match until {
            Some(until) if Instant::now() < until => Ok(()),
            _ => Err(OutboxError::LockExpired {
                collection: collection.to_string(),
            }),
        }
    }
}

/// A short, growing, jittered pause between attempts to take a lock: writes hold locks
/// for a few milliseconds.
async fn backoff(attempt: u32) {
    let ceiling = u64::from(attempt.min(10)) * 2;
    let pause = rand::random_range(1..=ceiling.max(1));
    tokio::time::sleep(Duration::from_millis(pause)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// A turn that runs longer than a lock lives keeps its lock: another writer waits
    /// for the turn to end instead of breaking the lock as expired.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_turn_keeps_its_lock_until_it_ends() -> TestResult {
        let mongo = dbps_testkit::mongo().await?;
        let (relay, writer) = (Locks::new(mongo.database()), Locks::new(mongo.database()));
        let document = Bson::String("a".into());
        let turn = LOCK_TTL + Duration::from_secs(2);
        let ended = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let held = {
            let ended = Arc::clone(&ended);
            let keys = vec![Locks::key("tenders", &document)];
            tokio::spawn(async move {
                relay
                    .with_each("tenders", keys, |_, hold| {
                        let ended = Arc::clone(&ended);
                        async move {
                            tokio::time::sleep(turn).await;
                            // Renewed all along: still trusted after longer than a lock lives.
                            hold.check()?;
                            *ended.lock().expect("ended") = Some(Instant::now());
                            Ok(())
                        }
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (key, _) = writer.lock("tenders", &document).await?;
        let taken = Instant::now();
        held.await??;
        let ended = ended.lock().expect("ended").ok_or("the turn never ended")?;
        assert!(taken >= ended, "the writer took the lock while the turn still ran");
        writer.unlock(&key).await?;
        Ok(())
    }

    /// A turn whose process stalled for longer than its locks live (no renewal ran), and
    /// whose lock another writer broke meanwhile, writes nothing more: its hold fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_turn_that_outlived_its_lock_stops_writing() -> TestResult {
        let mongo = dbps_testkit::mongo().await?;
        let (relay, writer) = (Locks::new(mongo.database()), Locks::new(mongo.database()));
        let document = Bson::String("b".into());
        let keys = vec![Locks::key("tenders", &document)];
        let writer_task = {
            let document = document.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (key, _) = writer.lock("tenders", &document).await?;
                writer.unlock(&key).await?;
                Ok::<_, OutboxError>(Instant::now())
            })
        };
        let checked = relay
            .with_each("tenders", keys, |_, hold| async move {
                hold.check()?;
                // A stall of the whole thread: neither this turn nor its renewals run.
                tokio::task::block_in_place(|| std::thread::sleep(LOCK_TTL + Duration::from_secs(1)));
                hold.check()
            })
            .await;
        assert!(
            matches!(checked, Err(OutboxError::LockExpired { ref collection }) if collection == "tenders"),
            "{checked:?}"
        );
        // The other writer broke the expired lock and wrote meanwhile.
        writer_task.await??;
        assert!(checked.is_err_and(|e| e.is_transient()));
        Ok(())
    }

    #[test]
    fn a_hold_without_locks_always_holds() {
        assert!(Hold::unlocked().check().is_ok());
        let hold = Hold::until("c", Instant::now() + Duration::from_secs(60));
        assert!(hold.check().is_ok());
        hold.lose();
        assert!(matches!(hold.check(), Err(OutboxError::LockExpired { .. })));
        let past = Hold::until("c", Instant::now());
        assert!(past.check().is_err());
        past.extend(Instant::now() + Duration::from_secs(60));
        assert!(past.check().is_ok(), "a renewal extends the hold");
    }
}
