//! Caches for services that own their data and copy other services': none of them can
//! serve a value older than one it has already replaced.
//!
//! - [`redis::RedisCache`] (feature `redis`): cache-aside over Redis. A loader that read
//!   the database before an invalidation cannot store its stale value after it: each key
//!   has a generation, checked and changed atomically by Lua scripts. Concurrent misses of
//!   a key run its loader once; Redis down or slow means answers from the loader, never
//!   errors. [`redis::Invalidate`] invalidates keys when the owning service's events
//!   arrive (a consumer-runner handler).
//! - [`reference::ReferenceData`]: another service's reference data (products, machine
//!   configurations) in process, loaded as a versioned snapshot, kept current by its
//!   events, reloaded when a version jump shows that events were missed.
//! - [`redis::RateLimiter`] (feature `redis`): GCRA in Redis, one script per decision,
//!   shared by every instance of a service, with axum middleware that answers `429` with
//!   the standard `RateLimit-*` and `Retry-After` headers.
//! - [`redis::RedisSessionStore`] (feature `redis`): a tower-sessions store over the
//!   workspace's Redis client; sessions survive restarts and expire in Redis.
//!
//! - [`replica`]: another service's data in this service's own database (feature
//!   `postgres` for tables, `mongodb` for collections), kept by its events, guarded by
//!   each aggregate's sequence number so it never goes back in time, with backfill from
//!   the owner's snapshot and a reconciler that finds and repairs drift.
//!
//! - [`projection`]: read models fed by events in versioned tables behind a view
//!   (feature `postgres`) or in versioned OpenSearch indices behind an alias (feature
//!   `opensearch`), with checkpoints per topic partition and a blue-green rebuild from the
//!   event history that switches the view or the alias atomically.
//!
//! `docs/caching.md` says when to use a replica, the Redis cache or reference data.
//!
//! ```no_run
//! # async fn example(conn: redis::aio::ConnectionManager, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use dbps_cache::redis::RedisCache;
//!
//! let stock: RedisCache<i64> = RedisCache::builder(conn, "inventory:stock:").build()?;
//! let on_hand = stock
//!     .get_or_load("sku-1", || async {
//!         sqlx::query_scalar::<_, i64>("select on_hand from inventory where sku = 'sku-1'")
//!             .fetch_one(&pool)
//!             .await
//!     })
//!     .await?;
//! // When the stock changes (its event arrives), the next read loads it again.
//! stock.invalidate("sku-1").await?;
//! # let _ = on_hand; Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! - `redis` (default): the Redis cache, its invalidation handler, the rate limiter with
//!   its middleware and the session store.
//! - `postgres` (default): replicas in PostgreSQL tables, the owner's snapshot from a
//!   table, and projections (which read Kafka themselves).
//! - `mongodb`: replicas in MongoDB collections.
//! - `http` (default): the owner's snapshot endpoints (axum) and their client (reqwest).
//! - `opensearch` (default): search projections in OpenSearch (`OsProjection`), over its
//!   REST API with reqwest; it adds no crate to the other default features.

mod error;
pub mod projection;
#[cfg(feature = "redis")]
pub mod redis;
pub mod reference;
pub mod replica;

pub use error::{CacheError, Result};
