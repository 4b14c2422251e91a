//! A Redis cache-aside that a slow loader cannot make stale, and a rate limiter shared by
//! every instance of a service.
//!
//! Run with: `scripts/stack.sh up && eval "$(scripts/stack.sh env)" && cargo run -p example-redis-cache`
#![allow(clippy::print_stdout)] // An example talks to its reader.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use dbps_cache::redis::{Lookup, Quota, RateLimiter, RedisCache};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stock {
    sku: String,
    on_hand: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = redis::Client::open(std::env::var("DBPS_REDIS_URL")?)?;
    let conn = redis::aio::ConnectionManager::new(client).await?;
    let run = std::process::id();
    let cache: RedisCache<Stock> = RedisCache::builder(conn.clone(), format!("example:{run}:stock:")).build()?;

    // The "database": stock on hand of sku-1.
    let database = AtomicI64::new(10);
    let load = || async {
        let on_hand = database.load(Ordering::SeqCst);
        Ok::<_, anyhow::Error>(Stock {
            sku: "sku-1".into(),
            on_hand,
        })
    };
    println!(
        "first read (a miss, loaded): {:?}",
        cache.get_or_load("sku-1", load).await?
    );

    // A loader reads the database, then the stock changes and the change invalidates the
    // key, then the loader tries to store what it read: refused.
    cache.invalidate("sku-1").await?;
    let Lookup::Miss(generation) = cache.lookup("sku-1").await else {
        anyhow::bail!("an invalidated key misses");
    };
    let read_before_the_change = load().await?;
    database.store(7, Ordering::SeqCst);
    cache.invalidate("sku-1").await?;
    let stored = cache.fill("sku-1", &read_before_the_change, &generation).await?;
    println!("stale fill after the invalidation stored: {stored}");
    let fresh = cache.get_or_load("sku-1", load).await?;
    println!("next read: {fresh:?}");
    anyhow::ensure!(!stored && fresh.on_hand == 7, "the cache served a stale value");

    // Five requests a minute per key, shared by every instance that uses this namespace.
    let limiter = RateLimiter::new(
        conn,
        format!("example:{run}:limit:"),
        Quota::new(5, Duration::from_secs(60))?,
    );
    let mut allowed = 0;
    for _ in 0..8 {
        allowed += u32::from(limiter.check("api-key-1").await?.allowed);
    }
    println!("rate limiter: {allowed} of 8 requests allowed (quota 5 per minute)");
    anyhow::ensure!(allowed == 5, "the limiter admitted {allowed}");
    Ok(())
}
