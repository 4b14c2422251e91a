//! The Redis cache against the real server: forced load/invalidate interleavings, a
//! stampede, TTL expiry, Redis stopped and started under reads, and invalidation by
//! events through the consumer runner.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

mod common;

use common::TestResult;
use dbps_cache::redis::{Invalidate, Lookup, RedisCache};
use dbps_core::{Envelope, Message};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stock {
    sku: String,
    on_hand: i64,
}

fn stock(on_hand: i64) -> Stock {
    Stock {
        sku: String::from("sku-1"),
        on_hand,
    }
}

async fn cache(redis: &dbps_testkit::TestRedis) -> Result<RedisCache<Stock>, dbps_cache::CacheError> {
    RedisCache::builder(redis.connection(), redis.key("stock:")).build()
}

#[tokio::test]
async fn a_fill_after_an_invalidation_is_refused() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let cache = cache(&redis).await?;

    // load reads the database → the value changes and is invalidated → load writes.
    let Lookup::Miss(generation) = cache.lookup("sku-1").await else {
        panic!("an empty cache misses");
    };
    cache.invalidate("sku-1").await?;
    assert!(
        !cache.fill("sku-1", &stock(10), &generation).await?,
        "the stale fill is refused"
    );
    assert!(matches!(cache.lookup("sku-1").await, Lookup::Miss(_)));

    // Without an invalidation in between, the fill is kept; a later invalidation removes
    // it, and only a load that starts after the invalidation can fill again.
    let Lookup::Miss(generation) = cache.lookup("sku-1").await else {
        panic!("still empty");
    };
    assert!(cache.fill("sku-1", &stock(7), &generation).await?);
    assert_eq!(cache.lookup("sku-1").await, Lookup::Hit(stock(7)));
    cache.invalidate("sku-1").await?;
    assert!(!cache.fill("sku-1", &stock(7), &generation).await?);
    let Lookup::Miss(fresh) = cache.lookup("sku-1").await else {
        panic!("invalidated");
    };
    assert!(cache.fill("sku-1", &stock(8), &fresh).await?);
    assert_eq!(cache.lookup("sku-1").await, Lookup::Hit(stock(8)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_read_before_an_invalidation_never_leaves_its_value_behind() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let cache = cache(&redis).await?;
    let database = Arc::new(std::sync::Mutex::new(stock(1)));
    let read = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());

    // The slow loader reads the old row, then waits.
    let slow = {
        let (cache, database, read, release) = (
            cache.clone(),
            Arc::clone(&database),
            Arc::clone(&read),
            Arc::clone(&release),
        );
        tokio::spawn(async move {
            cache
                .get_or_load("sku-1", || async move {
                    let old = database.lock().map_err(|_| "poisoned")?.clone();
                    read.notify_one();
                    release.notified().await;
                    Ok::<_, &str>(old)
                })
                .await
        })
    };
    read.notified().await;
    // The row changes and its event invalidates the key, while the loader still holds
    // the old row.
    *database.lock().map_err(|_| "poisoned")? = stock(2);
    cache.invalidate("sku-1").await?;
    release.notify_one();
    assert_eq!(slow.await??, stock(1), "the slow caller gets what it read");

    // Nobody else does: the next read loads the new row.
    let loads = AtomicUsize::new(0);
    let fresh = cache
        .get_or_load("sku-1", || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(database.lock().map_err(|_| "poisoned")?.clone())
        })
        .await?;
    assert_eq!((fresh, loads.load(Ordering::SeqCst)), (stock(2), 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_of_a_thousand_misses_runs_the_loader_once() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let cache = cache(&redis).await?;
    let loads = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Barrier::new(1000));
    let readers: Vec<_> = (0..1000)
        .map(|_| {
            let (cache, loads, gate) = (cache.clone(), Arc::clone(&loads), Arc::clone(&gate));
            tokio::spawn(async move {
                gate.wait().await;
                cache
                    .get_or_load("sku-1", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // A query that takes a while: the others arrive meanwhile.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, &str>(stock(5))
                    })
                    .await
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await??, stock(5));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn values_expire_with_their_ttl() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let cache = RedisCache::<Stock>::builder(redis.connection(), redis.key("stock:"))
        .ttl(Duration::from_millis(200))
        .build()?;
    cache.get_or_load("sku-1", || async { Ok::<_, &str>(stock(3)) }).await?;
    assert_eq!(cache.lookup("sku-1").await, Lookup::Hit(stock(3)));
    dbps_testkit::eventually("the value to expire", || async {
        Ok::<_, std::convert::Infallible>(matches!(cache.lookup("sku-1").await, Lookup::Miss(_)))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_keep_answering_while_redis_is_stopped_and_cache_again_once_it_is_back() -> TestResult {
    let mut server = dbps_testkit::redis_process().await?;
    let client = redis::Client::open(server.url())?;
    let conn = redis::aio::ConnectionManager::new(client).await?;
    let cache = RedisCache::<Stock>::builder(conn, "inventory:stock:").build()?;
    let loads = AtomicUsize::new(0);
    let load = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok::<_, &str>(stock(9))
    };

    assert_eq!(cache.get_or_load("sku-1", load).await?, stock(9));
    assert_eq!(cache.get_or_load("sku-1", load).await?, stock(9));
    assert_eq!(loads.load(Ordering::SeqCst), 1, "the second read was a hit");

    server.stop();
    for _ in 0..20 {
        let started = std::time::Instant::now();
        assert_eq!(cache.get_or_load("sku-1", load).await?, stock(9));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a read waits at most the timeout"
        );
    }
    assert_eq!(loads.load(Ordering::SeqCst), 21, "every read went to the loader");
    assert!(cache.invalidate("sku-1").await.is_err_and(|e| e.is_transient()));

    server.start().await?;
    dbps_testkit::eventually("the cache to fill again", || async {
        cache.get_or_load("sku-1", load).await?;
        Ok::<_, &str>(matches!(cache.lookup("sku-1").await, Lookup::Hit(_)))
    })
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StockChanged {
    sku: String,
    on_hand: i64,
}

impl Message for StockChanged {
    const TYPE: &'static str = "inventory.StockChanged";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owning_services_events_invalidate_the_keys_they_change() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let cache = cache(&redis).await?;
    cache.get_or_load("sku-1", || async { Ok::<_, &str>(stock(4)) }).await?;
    assert_eq!(cache.lookup("sku-1").await, Lookup::Hit(stock(4)));

    let invalidate = Invalidate::new(cache.clone(), |event: &Envelope| vec![event.aggregate_id.clone()]);
    let changed = StockChanged {
        sku: String::from("sku-1"),
        on_hand: 3,
    };
    common::consume(invalidate, &[Envelope::event("inventory", "stock", "sku-1", &changed)?]).await?;
    assert!(matches!(cache.lookup("sku-1").await, Lookup::Miss(_)));
    Ok(())
}
