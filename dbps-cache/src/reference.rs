//! Reference data: another service's small, slowly changing tables (products, machine
//! configurations), held in process, refreshed by its events.

use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dbps_core::{Envelope, Handler, HandlerError};

use crate::error::{CacheError, Result};

/// One item of a snapshot: its key, its version (the owning aggregate's sequence number)
/// and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<K, V> {
    /// The key.
    pub key: K,
    /// The version: the sequence number of the event that produced this value.
    pub version: i64,
    /// The value.
    pub value: V,
}

/// What [`ReferenceData::apply`] did with an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The next version of the item: applied.
    Applied,
    /// A version already held, or older: ignored (a duplicate or a late event).
    Stale,
    /// A version jump (events missed): everything was reloaded from the source.
    Reloaded,
}

/// A version and the value (`None` once the item was deleted: a tombstone, so that a late
/// update cannot bring it back).
#[derive(Debug, Clone)]
struct Versioned<V> {
    version: i64,
    value: Option<V>,
}

/// Loads a full, versioned snapshot from the owning service.
type Loader<K, V> =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, std::result::Result<Vec<Item<K, V>>, BoxError>> + Send + Sync>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Another service's reference data, in process (a `moka` cache), kept current by its
/// events and never older than the versions it has seen.
///
/// - **Start**: [`ReferenceData::reload`] loads the full snapshot (each item with its
///   version) from the owning service.
/// - **Events** ([`ReferenceData::apply`], or [`ReferenceUpdates`] in a consumer runner):
///   the next version of an item is applied; a duplicate or an older version is ignored; a
///   jump in versions means events were missed, and the whole snapshot is reloaded. A
///   deletion leaves a tombstone with its version, so a late update cannot resurrect it.
/// - **TTL**: items expire after the time to live; reading an expired or unknown item
///   reloads the snapshot (once, however many readers ask at the same time).
///
/// Metrics, labelled by `data` (the name): `dbps_reference_reloads_total{reason}`
/// (`start`, `gap`, `miss`) and `dbps_reference_updates_total{outcome}`.
pub struct ReferenceData<K, V> {
    name: String,
    items: moka::future::Cache<K, Versioned<V>>,
    loader: Loader<K, V>,
    reloading: tokio::sync::Mutex<()>,
    reloads: AtomicU64,
}

impl<K, V> std::fmt::Debug for ReferenceData<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceData")
            .field("name", &self.name)
            .field("items", &self.items.entry_count())
            .finish_non_exhaustive()
    }
}

impl<K, V> ReferenceData<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Reference data `name`, loaded by `loader` (the owning service's snapshot), whose
    /// items expire after `ttl`. Call [`ReferenceData::reload`] at start.
    pub fn new<F, Fut>(name: impl Into<String>, ttl: Duration, loader: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Vec<Item<K, V>>, BoxError>> + Send + 'static,
    {
        Self {
            name: name.into(),
            items: moka::future::Cache::builder().time_to_live(ttl).build(),
            loader: Arc::new(move || Box::pin(loader())),
            reloading: tokio::sync::Mutex::new(()),
            reloads: AtomicU64::new(0),
        }
    }

    /// Loads the full snapshot and replaces what is held (versions held that are newer
    /// than the snapshot's are kept: an event may have overtaken the snapshot). Returns
    /// the number of items loaded.
    pub async fn reload(&self) -> Result<usize> {
        self.reload_because("start").await
    }

    async fn reload_because(&self, reason: &'static str) -> Result<usize> {
        let _only_one = self.reloading.lock().await;
        self.reload_locked(reason).await
    }

    /// Reloads; the caller holds `reloading`.
    async fn reload_locked(&self, reason: &'static str) -> Result<usize> {
        let items = (self.loader)().await.map_err(|source| CacheError::Load {
            name: self.name.clone(),
            source,
        })?;
        let count = items.len();
        for item in items {
            let newer_held = self
                .items
                .get(&item.key)
                .await
                .is_some_and(|held| held.version > item.version);
            if !newer_held {
                let versioned = Versioned {
                    version: item.version,
                    value: Some(item.value),
                };
                self.items.insert(item.key, versioned).await;
            }
        }
        self.reloads.fetch_add(1, Ordering::SeqCst);
        metrics::counter!("dbps_reference_reloads_total", "data" => self.name.clone(), "reason" => reason).increment(1);
        tracing::info!(data = %self.name, items = count, reason, "reference data loaded");
        Ok(count)
    }

    /// The current value of `key`, reloading the snapshot if it is not held (expired, or
    /// new); `None` if the source has no such item or it was deleted.
    pub async fn get(&self, key: &K) -> Result<Option<V>> {
        if let Some(held) = self.items.get(key).await {
            return Ok(held.value);
        }
        // One reload for all the readers that missed together: whoever gets the lock
        // after another reader's reload finds it done.
        let seen = self.reloads.load(Ordering::SeqCst);
        let _only_one = self.reloading.lock().await;
        if self.reloads.load(Ordering::SeqCst) == seen {
            self.reload_locked("miss").await?;
        }
        Ok(self.items.get(key).await.and_then(|held| held.value))
    }

    /// Whether `key` is held now (not expired), without loading anything.
    pub async fn holds(&self, key: &K) -> bool {
        self.items.get(key).await.is_some()
    }

    /// Applies version `version` of `key` (`None`: the item was deleted).
    pub async fn apply(&self, key: K, version: i64, value: Option<V>) -> Result<Applied> {
        let held = self.items.get(&key).await.map(|held| held.version);
        let applied = match held {
            Some(held) if version <= held => Applied::Stale,
            Some(held) if version == held + 1 => {
                self.items.insert(key, Versioned { version, value }).await;
                Applied::Applied
            }
            None if version == 1 => {
                self.items.insert(key, Versioned { version, value }).await;
                Applied::Applied
            }
            // A jump: events were missed (or the item expired); the snapshot has them.
            _ => {
                tracing::warn!(data = %self.name, version, held = ?held, "gap in reference data versions; reloading");
                self.reload_because("gap").await?;
                // The event may be newer than the snapshot.
                let after = self.items.get(&key).await.map(|held| held.version);
                if after.is_none_or(|after| version > after) {
                    self.items.insert(key, Versioned { version, value }).await;
                }
                Applied::Reloaded
            }
        };
        let outcome = match applied {
            Applied::Applied => "applied",
            Applied::Stale => "stale",
            Applied::Reloaded => "reloaded",
        };
        metrics::counter!("dbps_reference_updates_total", "data" => self.name.clone(), "outcome" => outcome)
            .increment(1);
        Ok(applied)
    }
}

/// A consumer-runner handler that keeps a [`ReferenceData`] current: `read` turns a
/// message into `(key, version, value)` — `None` for messages that concern no item, a
/// `None` value for a deletion.
pub struct ReferenceUpdates<K, V, F> {
    data: Arc<ReferenceData<K, V>>,
    read: F,
}

impl<K, V, F> std::fmt::Debug for ReferenceUpdates<K, V, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceUpdates")
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl<K, V, F> ReferenceUpdates<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: Fn(&Envelope) -> std::result::Result<Option<(K, i64, Option<V>)>, HandlerError> + Send + Sync + 'static,
{
    /// Updates `data` from each message `read` understands.
    pub fn new(data: Arc<ReferenceData<K, V>>, read: F) -> Self {
        Self { data, read }
    }
}

impl<K, V, F> Handler for ReferenceUpdates<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: Fn(&Envelope) -> std::result::Result<Option<(K, i64, Option<V>)>, HandlerError> + Send + Sync + 'static,
{
    async fn handle(&self, message: &Envelope) -> std::result::Result<(), HandlerError> {
        if let Some((key, version, value)) = (self.read)(message)? {
            // A reload that fails (the source unreachable) is retried by the runner.
            self.data
                .apply(key, version, value)
                .await
                .map_err(HandlerError::transient)?;
        }
        Ok(())
    }
}
