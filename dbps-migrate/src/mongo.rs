//! MongoDB: versioned migrations written as Rust functions, under a lock with an expiry.
//!
//! ```no_run
//! # async fn example(db: mongodb::Database) -> Result<(), dbps_migrate::MigrateError> {
//! use dbps_migrate::MongoMigrations;
//! use mongodb::IndexModel;
//! use mongodb::bson::doc;
//! use mongodb::options::IndexOptions;
//!
//! let report = MongoMigrations::new(db)
//!     .migration(1, "backfill email index", |db| async move {
//!         db.collection::<mongodb::bson::Document>("customer_email_index")
//!             .update_many(doc! { "email": { "$exists": false } }, doc! { "$set": { "email": "" } })
//!             .await?;
//!         Ok(())
//!     })
//!     .index(
//!         "customer_email_index",
//!         IndexModel::builder()
//!             .keys(doc! { "email": 1 })
//!             .options(IndexOptions::builder().unique(true).build())
//!             .build(),
//!     )
//!     .run()
//!     .await?;
//! println!("applied {} migrations", report.applied.len());
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! - Applied migrations are recorded in the collection `dbps_migrations` as
//!   `{_id: <version>, name, applied_at, owner}`, after the migration's function returned
//!   `Ok`. A recorded version whose declared name differs is refused
//!   ([`MigrateError::Changed`]); a recorded version no longer declared is refused
//!   ([`MigrateError::Missing`]).
//! - A run holds the lock document `{_id: "lock", owner, expires_at}` in the same
//!   collection. It is taken with one atomic upsert that matches only an expired lock (or
//!   one this runner holds), so a runner that crashed blocks the others for at most the lock's
//!   time to live; it is renewed every third of that time while the run goes on, and
//!   deleted at the end. A runner whose lock was taken over stops before its next migration
//!   ([`MigrateError::LockLost`]).
//! - Declared indexes are created after the migrations (creating an existing index with the
//!   same options is a no-op).
//!
//! MongoDB migrations are not transactional (the local stack's server has no multi-document
//! transactions): a migration that fails part-way, or whose record could not be written, runs
//! again next time. Write them so that running twice is harmless (`$set` rather than `$inc`,
//! upserts, `create_index`). Lock expiry compares the runners' clocks; keep them in sync
//! (NTP) and the time to live well above the expected clock skew.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use futures::future::BoxFuture;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::{Collection, Database, IndexModel};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use dbps_core::classify::is_duplicate_key;

use crate::MigrationInfo;
use crate::error::{MigrateError, Result};

/// The error a migration function may return: anything that converts with `?`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The collection holding the migration records and the lock document.
pub const MIGRATIONS_COLLECTION: &str = "dbps_migrations";

/// The `_id` of the lock document.
pub const LOCK_ID: &str = "lock";

type MigrationFn = Box<dyn Fn(Database) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// One declared migration.
struct MongoMigration {
    version: i64,
    name: String,
    run: MigrationFn,
}

/// The migrations of one MongoDB database, applied once each under a lock.
///
/// See the [module documentation](self) for how the record and the lock work.
pub struct MongoMigrations {
    db: Database,
    migrations: Vec<MongoMigration>,
    indexes: Vec<(String, IndexModel)>,
    lock_ttl: Duration,
    lock_wait: Duration,
    owner: String,
}

impl fmt::Debug for MongoMigrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let migrations: Vec<(i64, &str)> = self.migrations.iter().map(|m| (m.version, m.name.as_str())).collect();
        f.debug_struct("MongoMigrations")
            .field("database", &self.db.name())
            .field("migrations", &migrations)
            .field("indexes", &self.indexes.len())
            .field("lock_ttl", &self.lock_ttl)
            .field("lock_wait", &self.lock_wait)
            .field("owner", &self.owner)
            .finish()
    }
}

impl MongoMigrations {
    /// Migrations of `db`, none declared yet. The lock lives 30 seconds unless renewed and
    /// a run waits up to 10 minutes for it.
    pub fn new(db: Database) -> Self {
        Self {
            db,
            migrations: Vec::new(),
            indexes: Vec::new(),
            lock_ttl: Duration::from_secs(30),
            lock_wait: Duration::from_secs(600),
            owner: format!("dbps-{}-{}", std::process::id(), uuid::Uuid::now_v7().simple()),
        }
    }

    /// Declares migration `version` (positive, unique; applied in ascending order) named
    /// `name`. Its function gets the database and runs only if the version is not recorded.
    pub fn migration<F, Fut>(mut self, version: i64, name: &str, migration: F) -> Self
    where
        F: Fn(Database) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.migrations.push(MongoMigration {
            version,
            name: name.to_owned(),
            run: Box::new(move |db| Box::pin(migration(db))),
        });
        self
    }

    /// Declares an index on `collection`, ensured after the migrations of every run.
    pub fn index(mut self, collection: &str, index: IndexModel) -> Self {
        self.indexes.push((collection.to_owned(), index));
        self
    }

    /// How long the lock stays valid without renewal (30 seconds by default, at least one
    /// second). A crashed runner blocks the others this long.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// How long a run waits for another runner's lock before failing with
    /// [`MigrateError::LockTimeout`] (10 minutes by default).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// The name this runner writes into the lock document (by default `dbps-<pid>-<uuid>`,
    /// unique per runner).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Takes the lock, applies every migration not yet recorded, ensures the declared
    /// indexes and releases the lock.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidVersion`] before anything is sent; [`MigrateError::Changed`] or
    /// [`MigrateError::Missing`] before anything is applied; [`MigrateError::LockTimeout`],
    /// [`MigrateError::LockLost`], [`MigrateError::MongoMigrationFailed`] and
    /// [`MigrateError::Mongo`] otherwise.
    pub async fn run(&self) -> Result<MongoReport> {
        let order = self.validated()?;
        let lock = Lock::acquire(self).await?;
        let result = self.apply_locked(&order, &lock).await;
        lock.release().await;
        result
    }

    /// Reports the applied, pending, changed and missing migrations and who holds the lock.
    /// Changes nothing.
    pub async fn status(&self) -> Result<MongoStatus> {
        let order = self.validated()?;
        let records = self.records().await?;
        let mut status = self.compare(&order, &records);
        let lock = self
            .collection()
            .find_one(doc! { "_id": LOCK_ID })
            .await
            .map_err(self.mongo_error("read the migration lock"))?;
        if let Some(lock) = lock {
            status.lock_owner = lock.get_str("owner").ok().map(str::to_owned);
            status.lock_expires_at = lock.get_datetime("expires_at").ok().map(|d| d.to_system_time());
        }
        Ok(status)
    }

    fn collection(&self) -> Collection<Document> {
        self.db.collection(MIGRATIONS_COLLECTION)
    }

    fn target(&self) -> String {
        format!("mongodb database {}", self.db.name())
    }

    fn mongo_error(&self, action: &str) -> impl FnOnce(mongodb::error::Error) -> MigrateError {
        let action = format!("{action} of database {}", self.db.name());
        move |source| MigrateError::Mongo { action, source }
    }

    /// The declared migrations in version order, after checking the versions.
    fn validated(&self) -> Result<Vec<&MongoMigration>> {
        let mut seen = HashSet::new();
        for migration in &self.migrations {
            if migration.version <= 0 {
                return Err(MigrateError::InvalidVersion {
                    version: migration.version,
                    reason: "not positive",
                });
            }
            if !seen.insert(migration.version) {
                return Err(MigrateError::InvalidVersion {
                    version: migration.version,
                    reason: "declared twice",
                });
            }
        }
        let mut order: Vec<&MongoMigration> = self.migrations.iter().collect();
        order.sort_by_key(|m| m.version);
        Ok(order)
    }

    /// The recorded migrations: version → name.
    async fn records(&self) -> Result<BTreeMap<i64, String>> {
        let documents: Vec<Document> = self
            .collection()
            .find(doc! {})
            .await
            .map_err(self.mongo_error("read the migration records"))?
            .try_collect()
            .await
            .map_err(self.mongo_error("read the migration records"))?;
        let mut records = BTreeMap::new();
        for document in documents {
            let version = match document.get("_id") {
                Some(Bson::Int64(version)) => *version,
                Some(Bson::Int32(version)) => i64::from(*version),
                // The lock document, or something that is not ours.
                _ => continue,
            };
            let name = document.get_str("name").unwrap_or_default().to_owned();
            records.insert(version, name);
        }
        Ok(records)
    }

    fn compare(&self, order: &[&MongoMigration], records: &BTreeMap<i64, String>) -> MongoStatus {
        let mut status = MongoStatus {
            database: self.db.name().to_owned(),
            applied: Vec::new(),
            pending: Vec::new(),
            changed: Vec::new(),
            missing: Vec::new(),
            lock_owner: None,
            lock_expires_at: None,
        };
        for (version, name) in records {
            status.applied.push(MigrationInfo::new(*version, name.clone()));
            match order.iter().find(|m| m.version == *version) {
                Some(declared) if declared.name != *name => status.changed.push(*version),
                Some(_) => {}
                None => status.missing.push(*version),
            }
        }
        status.pending = order
            .iter()
            .filter(|m| !records.contains_key(&m.version))
            .map(|m| MigrationInfo::new(m.version, m.name.clone()))
            .collect();
        status
    }

    async fn apply_locked(&self, order: &[&MongoMigration], lock: &Lock) -> Result<MongoReport> {
        let records = self.records().await?;
        let status = self.compare(order, &records);
        let database = self.db.name().to_owned();
        if let Some(&version) = status.changed.first() {
            return Err(MigrateError::Changed {
                component: database,
                version,
            });
        }
        if let Some(&version) = status.missing.first() {
            return Err(MigrateError::Missing {
                component: database,
                version,
            });
        }
        let mut applied = Vec::new();
        for migration in order.iter().filter(|m| !records.contains_key(&m.version)) {
            if lock.is_lost() {
                return Err(MigrateError::LockLost { target: self.target() });
            }
            tracing::info!(database = %database, version = migration.version, name = %migration.name, "applying mongodb migration");
            (migration.run)(self.db.clone())
                .await
                .map_err(|source| MigrateError::MongoMigrationFailed {
                    database: database.clone(),
                    version: migration.version,
                    name: migration.name.clone(),
                    source,
                })?;
            self.collection()
                .insert_one(doc! {
                    "_id": migration.version,
                    "name": &migration.name,
                    "applied_at": DateTime::now(),
                    "owner": &self.owner,
                })
                .await
                .map_err(self.mongo_error(&format!("record migration {}", migration.version)))?;
            applied.push(MigrationInfo::new(migration.version, migration.name.clone()));
        }
        for (collection, index) in &self.indexes {
            ensure_index(&self.db, collection, index.clone()).await?;
        }
        Ok(MongoReport {
            database,
            applied,
            indexes: self.indexes.len(),
        })
    }
}

/// Creates `index` on `collection` of `db` unless it exists with the same options.
///
/// # Errors
///
/// [`MigrateError::Mongo`], for example when an index of the same name exists with other
/// options, or a unique index meets duplicates.
pub async fn ensure_index(db: &Database, collection: &str, index: IndexModel) -> Result<()> {
    db.collection::<Document>(collection)
        .create_index(index)
        .await
        .map(|_| ())
        .map_err(|source| MigrateError::Mongo {
            action: format!("create an index on {}.{collection}", db.name()),
            source,
        })
}

/// A held migration lock and the task that renews it.
struct Lock {
    collection: Collection<Document>,
    owner: String,
    lost: Arc<AtomicBool>,
    /// Dropping the sender (also when the run's future is dropped) stops the renewal.
    stop: Option<oneshot::Sender<()>>,
    renewal: Option<JoinHandle<()>>,
}

impl Lock {
    /// Takes the lock of `migrations`' database, waiting up to its `lock_wait`.
    async fn acquire(migrations: &MongoMigrations) -> Result<Self> {
        let collection = migrations.collection();
        let owner = migrations.owner.clone();
        let ttl = migrations.lock_ttl;
        let started = tokio::time::Instant::now();
        let deadline = started + migrations.lock_wait;
        let poll = Duration::from_millis(200).min(ttl / 4);
        loop {
            if try_take(&collection, &owner, ttl)
                .await
                .map_err(migrations.mongo_error("take the migration lock"))?
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MigrateError::LockTimeout {
                    target: migrations.target(),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(poll).await;
        }
        tracing::debug!(database = %migrations.db.name(), owner = %owner, "took the mongodb migration lock");

        let lost = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = oneshot::channel();
        let renewal = tokio::spawn(renew(collection.clone(), owner.clone(), ttl, lost.clone(), stopped));
        Ok(Self {
            collection,
            owner,
            lost,
            stop: Some(stop),
            renewal: Some(renewal),
        })
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Stops the renewal and deletes the lock document if it is still this runner's.
    async fn release(mut self) {
        drop(self.stop.take());
        if let Some(renewal) = self.renewal.take() {
            let _ = renewal.await;
        }
        let deleted = self
            .collection
            .delete_one(doc! { "_id": LOCK_ID, "owner": &self.owner })
            .await;
        if let Err(error) = deleted {
            // The lock expires by itself; the next runner waits at most its time to live.
            tracing::warn!(%error, "could not release the mongodb migration lock");
        }
    }
}

/// Takes the lock if it is free, expired or already `owner`'s; `false` if another runner
/// holds it.
async fn try_take(collection: &Collection<Document>, owner: &str, ttl: Duration) -> mongodb::error::Result<bool> {
    let now = DateTime::now();
    let taken = collection
        .find_one_and_update(
            doc! {
                "_id": LOCK_ID,
                "$or": [ { "expires_at": { "$lt": now } }, { "owner": owner } ],
            },
            doc! { "$set": { "owner": owner, "expires_at": expiry(now, ttl), "taken_at": now } },
        )
        .upsert(true)
        .await;
    match taken {
        Ok(_) => Ok(true),
        // The filter matched nothing because another runner holds a live lock, so the upsert
        // tried to insert a second document with `_id: "lock"`.
        Err(error) if is_duplicate_key(&error) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Renews the lock every third of its time to live until stopped; marks it lost when it was
/// taken over or could not be renewed before it expired.
async fn renew(
    collection: Collection<Document>,
    owner: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut valid_until = tokio::time::Instant::now() + ttl;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            () = tokio::time::sleep(ttl / 3) => {}
        }
        let now = DateTime::now();
        let renewed = collection
            .update_one(
                doc! { "_id": LOCK_ID, "owner": &owner },
                doc! { "$set": { "expires_at": expiry(now, ttl) } },
            )
            .await;
        match renewed {
            Ok(result) if result.matched_count == 1 => valid_until = tokio::time::Instant::now() + ttl,
            Ok(_) => {
                tracing::warn!(owner = %owner, "the mongodb migration lock was taken over");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "could not renew the mongodb migration lock");
                if tokio::time::Instant::now() >= valid_until {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

fn expiry(now: DateTime, ttl: Duration) -> DateTime {
    let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_add(ttl))
}

/// What a run applied.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MongoReport {
    /// The database.
    pub database: String,
    /// The migrations this run applied, in order.
    pub applied: Vec<MigrationInfo>,
    /// How many declared indexes were ensured.
    pub indexes: usize,
}

/// The migration state of a MongoDB database.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MongoStatus {
    /// The database.
    pub database: String,
    /// The recorded migrations, in version order.
    pub applied: Vec<MigrationInfo>,
    /// The declared migrations not recorded yet, in version order.
    pub pending: Vec<MigrationInfo>,
    /// Recorded migrations whose declared name differs from the recorded one.
    pub changed: Vec<i64>,
    /// Recorded migrations that are not declared.
    pub missing: Vec<i64>,
    /// Who holds the lock, if a lock document exists (it may have expired).
    pub lock_owner: Option<String>,
    /// When that lock expires.
    pub lock_expires_at: Option<std::time::SystemTime>,
}
