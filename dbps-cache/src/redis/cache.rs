//! Cache-aside over Redis that a slow loader cannot make stale.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dbps_core::{Envelope, Handler, HandlerError};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands as _, Script};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

use crate::error::{CacheError, Result};

/// Stores a loaded value only if the key's generation is still the one the loader saw:
/// an invalidation since then makes the value stale, and it is dropped.
const FILL: &str = r"
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Deletes the value and moves the key to its next generation, in one step.
const INVALIDATE: &str = r"
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
";

/// The generation of a key a lookup saw: a fill with it succeeds only if no invalidation
/// came in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation(String);

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<V> {
    /// The cached value.
    Hit(V),
    /// No value; load it and [`RedisCache::fill`] it with this generation.
    Miss(Generation),
    /// Redis did not answer in time or failed: load the value and do not fill.
    Unavailable,
}

/// Builds a [`RedisCache`].
#[derive(Debug)]
pub struct RedisCacheBuilder<V> {
    conn: ConnectionManager,
    namespace: String,
    settings: Settings,
    _value: PhantomData<fn() -> V>,
}

/// How a cache keeps its values.
#[derive(Debug, Clone, Copy)]
struct Settings {
    ttl: Duration,
    jitter: f64,
    timeout: Duration,
    generation_ttl: Duration,
}

impl<V> RedisCacheBuilder<V> {
    /// How long a value stays cached (default 5 minutes), plus up to 10 % at random so
    /// that values cached together do not expire together: the bound on staleness should
    /// an invalidation ever be lost. A key's generation is kept ten times as long (at
    /// least a day), longer than any load takes.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self.settings.generation_ttl = (ttl * 10).max(Duration::from_secs(24 * 3600));
        self
    }

    /// How long a read or a fill may wait for Redis before the cache answers from the
    /// loader instead (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Checks the settings and builds the cache.
    pub fn build(self) -> Result<RedisCache<V>> {
        let invalid = |setting, reason: &str| {
            Err(CacheError::InvalidConfig {
                setting,
                reason: reason.to_owned(),
            })
        };
        if self.namespace.is_empty() || self.namespace.contains(['{', '}']) {
            return invalid("namespace", "must be non-empty and without braces");
        }
        let settings = self.settings;
        if settings.ttl.is_zero() || settings.timeout.is_zero() {
            return invalid("ttl, timeout", "must be positive");
        }
        let metrics = Metrics::new(&self.namespace);
        Ok(RedisCache {
            inner: Arc::new(Inner {
                conn: self.conn,
                namespace: self.namespace,
                settings,
                flights: Mutex::new(HashMap::new()),
                metrics,
                fill: Script::new(FILL),
                invalidate: Script::new(INVALIDATE),
            }),
            _value: PhantomData,
        })
    }
}

/// A cache-aside over Redis for values of type `V` (serde JSON), under a namespace of
/// its own (`inventory:stock:`), that never puts back a value read before an
/// invalidation.
///
/// Each key has a *generation* next to its value. A lookup that misses returns the
/// generation it saw; the loaded value is stored only if the generation is unchanged, in
/// one Lua script, and [`RedisCache::invalidate`] deletes the value and moves the
/// generation on, also in one script. So a loader that read the database before a change
/// and writes after its invalidation is refused: the interleaving that makes plain
/// "delete on change" caches serve stale data until the TTL cannot happen.
///
/// - **Single flight**: concurrent misses of one key in this process run the loader
///   once; the others wait for its value.
/// - **Redis down or slow**: a read that does not answer within the timeout falls
///   through to the loader (and is not filled); a request never fails because the cache
///   is gone. Counted in `dbps_cache_errors_total`.
/// - **TTL with jitter** bounds staleness should an invalidation ever be lost.
///
/// Metrics, labelled by `cache` (the namespace): `dbps_cache_hits_total`,
/// `dbps_cache_misses_total`, `dbps_cache_loads_total`, `dbps_cache_load_seconds`,
/// `dbps_cache_stale_fills_total` (fills refused after an invalidation),
/// `dbps_cache_invalidations_total`, `dbps_cache_errors_total{op}`.
pub struct RedisCache<V> {
    inner: Arc<Inner<V>>,
    _value: PhantomData<fn() -> V>,
}

struct Inner<V> {
    conn: ConnectionManager,
    namespace: String,
    settings: Settings,
    flights: Mutex<HashMap<String, Arc<OnceCell<V>>>>,
    fill: Script,
    invalidate: Script,
    metrics: Metrics,
}

/// The cache's metric handles, registered once: a hit costs an increment, not a lookup
/// in the recorder's registry.
struct Metrics {
    hits: metrics::Counter,
    misses: metrics::Counter,
    loads: metrics::Counter,
    load_seconds: metrics::Histogram,
    stale_fills: metrics::Counter,
    invalidations: metrics::Counter,
}

impl Metrics {
    fn new(cache: &str) -> Self {
        let label = || [("cache", cache.to_owned())];
        Self {
            hits: metrics::counter!("dbps_cache_hits_total", &label()),
            misses: metrics::counter!("dbps_cache_misses_total", &label()),
            loads: metrics::counter!("dbps_cache_loads_total", &label()),
            load_seconds: metrics::histogram!("dbps_cache_load_seconds", &label()),
            stale_fills: metrics::counter!("dbps_cache_stale_fills_total", &label()),
            invalidations: metrics::counter!("dbps_cache_invalidations_total", &label()),
        }
    }
}

impl<V> Clone for RedisCache<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _value: PhantomData,
        }
    }
}

impl<V> std::fmt::Debug for RedisCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("namespace", &self.inner.namespace)
            .field("ttl", &self.inner.settings.ttl)
            .field("timeout", &self.inner.settings.timeout)
            .finish_non_exhaustive()
    }
}

impl<V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> RedisCache<V> {
    /// A builder for a cache over `conn`, its keys starting with `namespace`
    /// (`<service>:<what>:`).
    pub fn builder(conn: ConnectionManager, namespace: impl Into<String>) -> RedisCacheBuilder<V> {
        RedisCacheBuilder {
            conn,
            namespace: namespace.into(),
            settings: Settings {
                ttl: Duration::from_secs(300),
                jitter: 0.1,
                timeout: Duration::from_millis(50),
                generation_ttl: Duration::from_secs(24 * 3600),
            },
            _value: PhantomData,
        }
    }

    /// The Redis keys of `key`: its value and its generation. The key sits in braces, a
    /// hash tag, so both land on one cluster slot, as one script needs.
    pub fn redis_keys(&self, key: &str) -> [String; 2] {
        let value = self.value_key(key);
        let generation = format!("{value}:gen");
        [value, generation]
    }

    fn value_key(&self, key: &str) -> String {
        let mut value = String::with_capacity(self.inner.namespace.len() + key.len() + 2);
        value.push_str(&self.inner.namespace);
        value.push('{');
        value.push_str(key);
        value.push('}');
        value
    }

    /// The value of `key`: from Redis, or from `load` on a miss (once for all concurrent
    /// misses of the key in this process), which is then cached unless an invalidation
    /// came in between. A failing `load` is returned as is and nothing is cached.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
    {
        let generation = match self.lookup(key).await {
            Lookup::Hit(value) => return Ok(value),
            Lookup::Miss(generation) => Some(generation),
            Lookup::Unavailable => None,
        };
        let flight = Arc::clone(
            self.inner
                .flights
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(key.to_owned())
                .or_default(),
        );
        let loaded = flight
            .get_or_try_init(|| async {
                let started = Instant::now();
                let value = load().await?;
                self.inner.metrics.loads.increment(1);
                self.inner.metrics.load_seconds.record(started.elapsed().as_secs_f64());
                if let Some(generation) = &generation {
                    // A refused or failed fill only costs a later miss.
                    let _ = self.fill(key, &value, generation).await;
                }
                Ok(value)
            })
            .await
            .cloned();
        let mut flights = self
            .inner
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if flights.get(key).is_some_and(|current| Arc::ptr_eq(current, &flight)) {
            flights.remove(key);
        }
        loaded
    }

    /// Looks `key` up: its value, or the generation to fill it with after a load.
    ///
    /// A hit costs one `GET`. On a miss the generation is read next: an invalidation
    /// between the two reads gives the newer generation, and the load that follows reads
    /// the database after it, so the fill is still safe.
    pub async fn lookup(&self, key: &str) -> Lookup<V> {
        let value_key = self.value_key(key);
        let mut conn = self.inner.conn.clone();
        let text: Option<Vec<u8>> = match self.bounded("lookup", conn.get(&value_key)).await {
            Ok(text) => text,
            Err(_) => return Lookup::Unavailable,
        };
        if let Some(text) = text {
            match serde_json::from_slice(&text) {
                Ok(value) => {
                    self.inner.metrics.hits.increment(1);
                    return Lookup::Hit(value);
                }
                Err(source) => {
                    // A value of an older shape: treat it as missing; the fill replaces it.
                    let error = CacheError::Codec {
                        key: key.to_owned(),
                        source,
                    };
                    tracing::warn!(key, error = %dbps_core::ErrorChain(&error), "cached value unreadable");
                }
            }
        }
        self.inner.metrics.misses.increment(1);
        match self
            .bounded("lookup", conn.get::<_, Option<String>>(format!("{value_key}:gen")))
            .await
        {
            Ok(generation) => Lookup::Miss(Generation(generation.unwrap_or_else(|| String::from("0")))),
            Err(_) => Lookup::Unavailable,
        }
    }

    /// Caches `value` for `key` unless the key was invalidated since the lookup that saw
    /// `generation`. Returns whether it was stored.
    pub async fn fill(&self, key: &str, value: &V, generation: &Generation) -> Result<bool> {
        let text = serde_json::to_string(value).map_err(|source| CacheError::Codec {
            key: key.to_owned(),
            source,
        })?;
        let [value_key, generation_key] = self.redis_keys(key);
        let ttl_ms = self.ttl_with_jitter().as_millis().max(1);
        let mut conn = self.inner.conn.clone();
        let mut invocation = self.inner.fill.key(&value_key);
        invocation
            .key(&generation_key)
            .arg(&generation.0)
            .arg(text)
            .arg(u64::try_from(ttl_ms).unwrap_or(u64::MAX));
        let stored: i64 = self.bounded("fill", invocation.invoke_async(&mut conn)).await?;
        if stored == 0 {
            self.inner.metrics.stale_fills.increment(1);
            tracing::debug!(key, "fill refused: the key was invalidated while it was loaded");
        }
        Ok(stored == 1)
    }

    /// Removes `key`'s value and refuses every fill of a load that began before.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let [value_key, generation_key] = self.redis_keys(key);
        let mut conn = self.inner.conn.clone();
        let mut invocation = self.inner.invalidate.key(&value_key);
        invocation
            .key(&generation_key)
            .arg(u64::try_from(self.inner.settings.generation_ttl.as_millis()).unwrap_or(u64::MAX));
        let _: i64 = self.bounded("invalidate", invocation.invoke_async(&mut conn)).await?;
        self.inner.metrics.invalidations.increment(1);
        Ok(())
    }

    fn ttl_with_jitter(&self) -> Duration {
        let extra = rand::random::<f64>() * self.inner.settings.jitter;
        self.inner.settings.ttl.mul_f64(1.0 + extra)
    }

    /// Runs a Redis call with the cache's timeout, counting failures.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let result = match tokio::time::timeout(self.inner.settings.timeout, call).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(source)) => CacheError::Redis { operation, source },
            Err(_) => CacheError::Timeout {
                operation,
                timeout: self.inner.settings.timeout,
            },
        };
        metrics::counter!("dbps_cache_errors_total", "cache" => self.inner.namespace.clone(), "op" => operation)
            .increment(1);
        tracing::debug!(cache = %self.inner.namespace, error = %dbps_core::ErrorChain(&result), "redis unavailable; answering from the loader");
        Err(result)
    }
}

/// A consumer-runner handler that invalidates a cache's keys when the owning service's
/// events arrive: `keys` names the keys a message makes stale (none for messages that
/// concern no cached value).
///
/// An invalidation Redis cannot take now is a transient failure: the runner retries it,
/// and the TTL bounds staleness if it never gets through.
pub struct Invalidate<V, F> {
    cache: RedisCache<V>,
    keys: F,
}

impl<V, F> std::fmt::Debug for Invalidate<V, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidate")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl<V, F> Invalidate<V, F>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    F: Fn(&Envelope) -> Vec<String> + Send + Sync + 'static,
{
    /// Invalidates `keys(message)` of `cache` for each message.
    pub fn new(cache: RedisCache<V>, keys: F) -> Self {
        Self { cache, keys }
    }
}

impl<V, F> Handler for Invalidate<V, F>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    F: Fn(&Envelope) -> Vec<String> + Send + Sync + 'static,
{
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        for key in (self.keys)(message) {
            self.cache.invalidate(&key).await.map_err(|error| {
                if error.is_transient() {
                    HandlerError::transient(error)
                } else {
                    HandlerError::permanent(error)
                }
            })?;
        }
        Ok(())
    }
}
