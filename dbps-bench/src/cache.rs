//! The `cache` scenario: dbps-cache's Redis pieces beside plain Redis commands through
//! the same client, in the same run.
//!
//! Phases (`D` is `--duration`):
//!
//! 1. hit reads: `--keys` values cached, then in eight slices of `D/8`, ABBA ABBA, plain `GET`s
//!    of the same values (A) against `RedisCache::get_or_load` hits (B), `--tasks`
//!    concurrent readers of uniformly random keys on one multiplexed connection;
//! 2. hit ratio under Zipf(1.0) over the same number of keys, an empty cache with a short
//!    TTL (`--zipf-ttl`), for `D/2`;
//! 3. invalidation → first fresh read: a value changes and its key is invalidated while
//!    readers read it; the time until a reader first gets the new value, 200 times;
//! 4. limiter: `RateLimiter::check` decisions (a quota no key reaches) against `EVALSHA`
//!    of a script that returns at once, `D/4` each.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use dbps_cache::redis::{Quota, RateLimiter, RedisCache};
use hdrhistogram::Histogram;
use rand::Rng;
use rand_distr::{Distribution, Zipf};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::outbox::write_json;
use crate::progress;
use crate::report::{Target, table, thousands};
use crate::servers::{env_var, git_commit, run_suffix};

/// Options of the `cache` scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long the main measurements run.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Concurrent readers.
    #[arg(long, default_value_t = 16)]
    tasks: usize,
    /// TTL of the Zipf phase's values.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    zipf_ttl: Duration,
    /// Writes the results as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A cached value: a product's stock, about 200 bytes of JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stock {
    sku: String,
    on_hand: i64,
    warehouse: String,
    reserved: i64,
    note: String,
}

fn stock(key: u64, on_hand: i64) -> Stock {
    Stock {
        sku: format!("sku-{key}"),
        on_hand,
        warehouse: String::from("north"),
        reserved: 3,
        note: "x".repeat(120),
    }
}

/// p50 and p99 in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
struct Micros {
    p50: f64,
    p99: f64,
}

/// p50 and p99 in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
struct Millis {
    p50: f64,
    p99: f64,
}

/// Everything the scenario measured.
#[derive(Debug, Serialize)]
struct CacheReport {
    scenario: &'static str,
    hit_reads_per_s: f64,
    raw_get_per_s: f64,
    hit_ratio_vs_raw: f64,
    latency_us: Micros,
    raw_get_latency_us: Micros,
    zipf_hit_ratio: f64,
    zipf_reads: u64,
    invalidate_to_fresh_ms: Millis,
    limiter_per_s: f64,
    raw_evalsha_per_s: f64,
    limiter_vs_raw_ratio: f64,
    keys: u64,
    tasks: usize,
    duration_s: f64,
    wall_time_s: f64,
    cores: usize,
    git_commit: String,
    date: String,
    targets: Vec<Target>,
}

/// Rate and latency of one timed loop.
struct Measured {
    per_second: f64,
    latency: Histogram<u64>,
}

impl Measured {
    fn empty() -> anyhow::Result<Self> {
        Ok(Self {
            per_second: 0.0,
            latency: Histogram::new(3)?,
        })
    }

    fn add(&mut self, other: &Self) -> anyhow::Result<()> {
        self.per_second += other.per_second;
        self.latency.add(&other.latency)?;
        Ok(())
    }

    fn micros(&self) -> Micros {
        Micros {
            p50: self.latency.value_at_quantile(0.5) as f64,
            p99: self.latency.value_at_quantile(0.99) as f64,
        }
    }
}

/// Runs `op` from `tasks` concurrent loops for `duration`: operations per second and
/// their latency in microseconds.
async fn timed<F, Fut>(tasks: usize, duration: Duration, op: F) -> anyhow::Result<Measured>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let loops: Vec<_> = (0..tasks)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new(3)?;
                let mut done = 0_u64;
                while started.elapsed() < duration {
                    let one = Instant::now();
                    op(done).await?;
                    latency.record(u64::try_from(one.elapsed().as_micros()).unwrap_or(u64::MAX))?;
                    done += 1;
                }
                Ok::<_, anyhow::Error>((done, latency))
            })
        })
        .collect();
    let mut total = 0;
    let mut latency = Histogram::new(3)?;
    for handle in loops {
        let (done, part) = handle.await??;
        total += done;
        latency.add(&part)?;
    }
    Ok(Measured {
        per_second: total as f64 / started.elapsed().as_secs_f64(),
        latency,
    })
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let wall = Instant::now();
    let url = env_var("DBPS_REDIS_URL")?;
    let conn = ConnectionManager::new(redis::Client::open(url.as_str()).context("DBPS_REDIS_URL")?)
        .await
        .context("connecting to Redis")?;
    let namespace = format!("dbps-bench:{}:", run_suffix());
    let result = measure(&args, conn.clone(), &namespace).await;
    // Remove the run's keys whatever happened.
    let mut cleanup = conn.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}*"))
        .query_async(&mut cleanup)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut cleanup).await;
    }
    let mut report = result?;
    report.wall_time_s = wall.elapsed().as_secs_f64();
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

async fn measure(args: &Args, conn: ConnectionManager, namespace: &str) -> anyhow::Result<CacheReport> {
    let keys = args.keys;
    let cache: RedisCache<Stock> = RedisCache::builder(conn.clone(), format!("{namespace}cache:"))
        .ttl(Duration::from_secs(3600))
        .build()?;

    // Fill both: the cache through its own path, the plain keys with SET.
    let bar = progress::counted("filling", keys);
    for key in 0..keys {
        let name = key.to_string();
        cache
            .get_or_load(&name, || async { Ok::<_, anyhow::Error>(stock(key, 1)) })
            .await?;
        let mut c = conn.clone();
        let _: () = redis::cmd("SET")
            .arg(format!("{namespace}raw:{key}"))
            .arg(serde_json::to_string(&stock(key, 1))?)
            .query_async(&mut c)
            .await?;
        bar.inc(1);
    }
    progress::done(&bar, "filling", &format!("{keys} keys"));

    // 1. ABBA ABBA: plain GET against cache hits, in short slices so that the machine's
    // drift falls on both alike.
    let slice = args.duration / 8;
    let raw_get = |conn: ConnectionManager, namespace: String| {
        move |_| {
            let (mut conn, namespace) = (conn.clone(), namespace.clone());
            async move {
                let key = rand::rng().random_range(0..keys);
                let value: Option<String> = redis::cmd("GET")
                    .arg(format!("{namespace}raw:{key}"))
                    .query_async(&mut conn)
                    .await?;
                anyhow::ensure!(value.is_some(), "raw key {key} missing");
                Ok(())
            }
        }
    };
    let misses = Arc::new(AtomicU64::new(0));
    let hit = |cache: RedisCache<Stock>, misses: Arc<AtomicU64>| {
        move |_| {
            let (cache, misses) = (cache.clone(), Arc::clone(&misses));
            let key = rand::rng().random_range(0..keys);
            async move { read(&cache, key, &misses).await }
        }
    };
    let (mut raw, mut hits) = (Measured::empty()?, Measured::empty()?);
    for (label, is_raw) in [
        ("raw GET", true),
        ("cache hits", false),
        ("cache hits", false),
        ("raw GET", true),
    ] {
        let bar = progress::timed(label, slice);
        let measured = if is_raw {
            timed(args.tasks, slice, raw_get(conn.clone(), namespace.to_owned())).await?
        } else {
            timed(args.tasks, slice, hit(cache.clone(), Arc::clone(&misses))).await?
        };
        progress::done(&bar, label, &format!("{:.0}/s", measured.per_second));
        if is_raw { &mut raw } else { &mut hits }.add(&measured)?;
    }
    raw.per_second /= 4.0;
    hits.per_second /= 4.0;
    anyhow::ensure!(misses.load(Ordering::Relaxed) == 0, "the hit phase missed");

    // 2. Zipf(1.0) over the keys, an empty cache with a short TTL.
    let zipf_cache: RedisCache<Stock> = RedisCache::builder(conn.clone(), format!("{namespace}zipf:"))
        .ttl(args.zipf_ttl)
        .build()?;
    let zipf = Zipf::new(keys as f64, 1.0).context("zipf")?;
    let loads = Arc::new(AtomicU64::new(0));
    let bar = progress::timed("zipf reads", args.duration / 2);
    let reads = {
        let (cache, loads) = (zipf_cache.clone(), Arc::clone(&loads));
        timed(args.tasks, args.duration / 2, move |_| {
            let (cache, loads) = (cache.clone(), Arc::clone(&loads));
            let key = zipf.sample(&mut rand::rng()) as u64;
            async move { read(&cache, key, &loads).await }
        })
        .await?
    };
    let zipf_reads = (reads.per_second * (args.duration / 2).as_secs_f64()) as u64;
    let zipf_hit_ratio = 1.0 - loads.load(Ordering::Relaxed) as f64 / zipf_reads.max(1) as f64;
    progress::done(&bar, "zipf reads", &format!("hit ratio {zipf_hit_ratio:.3}"));

    // 3. Invalidation → first fresh read.
    let fresh = invalidate_to_fresh(&cache, args.tasks.min(4)).await?;

    // 4. Limiter decisions against a no-op EVALSHA.
    let limiter = Arc::new(RateLimiter::new(
        conn.clone(),
        format!("{namespace}limit:"),
        Quota::new(u32::MAX, Duration::from_secs(1))?,
    ));
    let slice = args.duration / 4;
    let bar = progress::timed("limiter", slice);
    let limited = timed(args.tasks, slice, move |_| {
        let limiter = Arc::clone(&limiter);
        async move {
            let decision = limiter
                .check(&format!("client-{}", rand::rng().random_range(0..1000)))
                .await?;
            anyhow::ensure!(decision.allowed, "a limit no key reaches was reached");
            Ok(())
        }
    })
    .await?;
    progress::done(&bar, "limiter", &format!("{:.0}/s", limited.per_second));
    let noop = Arc::new(redis::Script::new("return 1"));
    let bar = progress::timed("raw EVALSHA", slice);
    let evalsha = {
        let conn = conn.clone();
        timed(args.tasks, slice, move |_| {
            let (noop, mut conn) = (Arc::clone(&noop), conn.clone());
            async move {
                let one: i64 = noop
                    .key(format!("{}", rand::rng().random_range(0..1000)))
                    .invoke_async(&mut conn)
                    .await?;
                anyhow::ensure!(one == 1, "the no-op script answered {one}");
                Ok(())
            }
        })
        .await?
    };
    progress::done(&bar, "raw EVALSHA", &format!("{:.0}/s", evalsha.per_second));

    let hit_ratio_vs_raw = hits.per_second / raw.per_second;
    Ok(CacheReport {
        scenario: "cache",
        hit_reads_per_s: hits.per_second,
        raw_get_per_s: raw.per_second,
        hit_ratio_vs_raw,
        latency_us: hits.micros(),
        raw_get_latency_us: raw.micros(),
        zipf_hit_ratio,
        zipf_reads,
        invalidate_to_fresh_ms: fresh,
        limiter_per_s: limited.per_second,
        raw_evalsha_per_s: evalsha.per_second,
        limiter_vs_raw_ratio: limited.per_second / evalsha.per_second,
        keys,
        tasks: args.tasks,
        duration_s: args.duration.as_secs_f64(),
        wall_time_s: 0.0,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        git_commit: git_commit(),
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        targets: vec![Target::at_least("hit_ratio_vs_raw", hit_ratio_vs_raw, 0.9)],
    })
}

/// 200 times: readers read one key in a loop; the value changes in the "database" and
/// the key is invalidated; the clock runs from the invalidation's start until a reader
/// first gets the new value.
async fn invalidate_to_fresh(cache: &RedisCache<Stock>, readers: usize) -> anyhow::Result<Millis> {
    const ROUNDS: u64 = 200;
    let database = Arc::new(AtomicI64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(i64, Instant)>();
    let tasks: Vec<_> = (0..readers)
        .map(|_| {
            let (cache, database, stop, seen) =
                (cache.clone(), Arc::clone(&database), Arc::clone(&stop), seen_tx.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let value = cache
                        .get_or_load("fresh", || async {
                            Ok::<_, anyhow::Error>(stock(0, database.load(Ordering::SeqCst)))
                        })
                        .await?;
                    let _ = seen.send((value.on_hand, Instant::now()));
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    let bar = progress::counted("invalidate → fresh", ROUNDS);
    let mut latency = Histogram::<u64>::new(3)?;
    for round in 2..ROUNDS as i64 + 2 {
        database.store(round, Ordering::SeqCst);
        let invalidated = Instant::now();
        cache.invalidate("fresh").await?;
        loop {
            let (value, at) = seen_rx.recv().await.context("readers stopped")?;
            if value == round && at >= invalidated {
                latency.record(u64::try_from((at - invalidated).as_micros()).unwrap_or(u64::MAX))?;
                break;
            }
        }
        bar.inc(1);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let result = Millis {
        p50: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99: latency.value_at_quantile(0.99) as f64 / 1000.0,
    };
    progress::done(&bar, "invalidate → fresh", &format!("p50 {:.2} ms", result.p50));
    Ok(result)
}

/// One read of `key` through `cache`, counting the loads (misses).
async fn read(cache: &RedisCache<Stock>, key: u64, loads: &AtomicU64) -> anyhow::Result<()> {
    cache
        .get_or_load(&key.to_string(), || async move {
            loads.fetch_add(1, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(stock(key, 1))
        })
        .await?;
    Ok(())
}

fn render(r: &CacheReport) -> String {
    let mut out = format!(
        "dbps-bench cache · {} · commit {} · {} cores · --duration {}s · {} keys · {} tasks · run took {:.0} s\n\n",
        r.date, r.git_commit, r.cores, r.duration_s, r.keys, r.tasks, r.wall_time_s
    );
    let rows = vec![
        vec![
            String::from("cache-aside hit reads"),
            format!("{}/s", thousands(r.hit_reads_per_s)),
            format!("raw `GET`: {}/s", thousands(r.raw_get_per_s)),
            format!("{:.2}", r.hit_ratio_vs_raw),
            String::from(">= 0.90"),
        ],
        vec![
            String::from("hit latency p50 / p99"),
            format!("{:.0} / {:.0} µs", r.latency_us.p50, r.latency_us.p99),
            format!(
                "raw: {:.0} / {:.0} µs",
                r.raw_get_latency_us.p50, r.raw_get_latency_us.p99
            ),
            String::new(),
            String::new(),
        ],
        vec![
            String::from("hit ratio, Zipf(1.0)"),
            format!("{:.3}", r.zipf_hit_ratio),
            format!(
                "{} reads, {} keys",
                thousands(r.zipf_reads as f64),
                thousands(r.keys as f64)
            ),
            String::new(),
            String::new(),
        ],
        vec![
            String::from("invalidation → fresh read p50 / p99"),
            format!(
                "{:.2} / {:.2} ms",
                r.invalidate_to_fresh_ms.p50, r.invalidate_to_fresh_ms.p99
            ),
            String::new(),
            String::new(),
            String::new(),
        ],
        vec![
            String::from("limiter decisions"),
            format!("{}/s", thousands(r.limiter_per_s)),
            format!("raw no-op `EVALSHA`: {}/s", thousands(r.raw_evalsha_per_s)),
            format!("{:.2}", r.limiter_vs_raw_ratio),
            String::new(),
        ],
    ];
    out.push_str(&table(
        &["figure", "dbps", "baseline (same run)", "ratio", "target"],
        &rows,
    ));
    out
}
