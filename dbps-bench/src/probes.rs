//! Measurements taken from the server's side: where backends wait, CPU and WAL per
//! transaction, transaction counters, commit timestamps.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use sqlx::postgres::PgPool;

use crate::cpu;
use crate::observer::Sighting;
use crate::report::{Percentiles, WaitShare, WriteCost};
use crate::workload::LoadResult;

/// How long to wait for the server to settle before the harness gives up.
const QUIET_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `work` while calling `sample` every `period`.
pub(crate) async fn sampling<T>(
    work: impl Future<Output = anyhow::Result<T>>,
    period: Duration,
    mut sample: impl AsyncFnMut() -> anyhow::Result<()>,
) -> anyhow::Result<T> {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = tick.tick() => sample().await?,
        }
    }
}

/// Runs `work` while sampling, every 25 ms, the state and wait event of the backends
/// whose `application_name` is `application`.
pub(crate) async fn with_wait_sampling<T>(
    admin: &PgPool,
    application: &str,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Vec<WaitShare>)> {
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    let result = sampling(work, Duration::from_millis(25), async || {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "select state || ':' || coalesce(wait_event_type || '/' || wait_event, 'CPU'), count(*)
               from pg_stat_activity
              where application_name = $1 and state is not null
              group by 1",
        )
        .bind(application)
        .fetch_all(admin)
        .await?;
        for (wait, n) in rows {
            *counts.entry(wait).or_default() += n;
        }
        Ok(())
    })
    .await?;
    let total = counts.values().sum::<i64>().max(1) as f64;
    let mut shares: Vec<WaitShare> = counts
        .into_iter()
        .map(|(wait, n)| WaitShare {
            wait,
            share: n as f64 / total,
        })
        .collect();
    shares.sort_by(|a, b| b.share.total_cmp(&a.share));
    Ok((result, shares))
}

/// CPU and WAL counters taken before a load, to be compared after it.
pub(crate) struct Probe {
    application: String,
    pids: Vec<i32>,
    wal: i64,
    cpu: Option<cpu::Sample>,
}

/// What a load cost: CPU (where `/proc` can be read) and WAL written (by the whole
/// server, so other databases' writes count too).
pub(crate) struct Cost {
    cpu: Option<cpu::Usage>,
    wal_bytes: i64,
}

impl Cost {
    /// CPU used meanwhile, where `/proc` can be read.
    pub(crate) fn cpu(&self) -> Option<&cpu::Usage> {
        self.cpu.as_ref()
    }
}

impl Probe {
    /// Reads the counters of the backends named `application` and of the machine.
    pub(crate) async fn start(admin: &PgPool, application: &str) -> anyhow::Result<Self> {
        let pids = backend_pids(admin, application).await?;
        let wal = wal_position(admin).await?;
        let cpu = cpu::sample(&pids);
        Ok(Self {
            application: application.to_owned(),
            pids,
            wal,
            cpu,
        })
    }

    /// Reads them again and returns the difference.
    pub(crate) async fn finish(mut self, admin: &PgPool) -> anyhow::Result<Cost> {
        // Connections opened meanwhile count from their start.
        self.pids.extend(backend_pids(admin, &self.application).await?);
        self.pids.sort_unstable();
        self.pids.dedup();
        let after = cpu::sample(&self.pids);
        let wal = wal_position(admin).await?;
        let cpu = self
            .cpu
            .as_ref()
            .zip(after.as_ref())
            .map(|(before, after)| cpu::usage(before, after));
        Ok(Cost {
            cpu,
            wal_bytes: wal - self.wal,
        })
    }
}

async fn backend_pids(admin: &PgPool, application: &str) -> anyhow::Result<Vec<i32>> {
    Ok(
        sqlx::query_scalar("select pid from pg_stat_activity where application_name = $1")
            .bind(application)
            .fetch_all(admin)
            .await?,
    )
}

async fn wal_position(admin: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("select (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(admin)
            .await?,
    )
}

/// The loads of one variant of the business transaction, and what they cost.
pub(crate) struct Variant {
    name: &'static str,
    committed: u64,
    elapsed: Duration,
    tx_micros: Histogram<u64>,
    cpu: Option<cpu::Usage>,
    wal_bytes: i64,
}

impl Variant {
    pub(crate) fn new(name: &'static str) -> anyhow::Result<Self> {
        Ok(Self {
            name,
            committed: 0,
            elapsed: Duration::ZERO,
            tx_micros: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            cpu: Some(cpu::Usage::default()),
            wal_bytes: 0,
        })
    }

    pub(crate) fn add(&mut self, result: &LoadResult, cost: Cost) -> anyhow::Result<()> {
        self.committed += result.committed;
        self.elapsed += result.elapsed;
        self.tx_micros.add(&result.tx_micros)?;
        self.cpu = self.cpu.zip(cost.cpu).map(|(mut total, cost)| {
            total.add(cost);
            total
        });
        self.wal_bytes += cost.wal_bytes;
        Ok(())
    }

    pub(crate) fn per_second(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn cost(&self) -> WriteCost {
        let per_tx_us = |seconds: f64| seconds * 1e6 / self.committed as f64;
        WriteCost {
            variant: self.name,
            tx_per_s: self.per_second(),
            backend_cpu_us_per_tx: self.cpu.map(|c| per_tx_us(c.backends_s)),
            harness_cpu_us_per_tx: self.cpu.map(|c| per_tx_us(c.harness_s)),
            machine_cpu_us_per_tx: self.cpu.map(|c| per_tx_us(c.machine_busy_s)),
            machine_busy_pct: self.cpu.map(|c| c.machine_busy_pct()),
            wal_bytes_per_tx: self.wal_bytes as f64 / self.committed as f64,
            tx_ms: Percentiles::of_micros(&self.tx_micros),
        }
    }
}

/// The database's transaction counter (commits and rollbacks) once nothing is connected
/// to it and the counter has not moved for a second.
///
/// Every statement outside an explicit transaction counts as one. A backend reports its
/// counts to the server at most once a second and, when idle, up to 10 s late — but
/// always when it exits. So a count taken when every backend has gone is complete.
pub(crate) async fn quiet_transactions(admin: &PgPool, database: &str) -> anyhow::Result<i64> {
    let started = Instant::now();
    let mut last: Option<(i64, Instant)> = None;
    loop {
        let (connected, count): (i64, i64) = sqlx::query_as(
            "select (select count(*) from pg_stat_activity where datname = $1),
                    (select xact_commit + xact_rollback from pg_stat_database where datname = $1)",
        )
        .bind(database)
        .fetch_one(admin)
        .await?;
        match last {
            Some((previous, since)) if connected == 0 && previous == count => {
                if since.elapsed() >= Duration::from_secs(1) {
                    return Ok(count);
                }
            }
            _ => last = Some((count, Instant::now())),
        }
        if started.elapsed() > QUIET_DEADLINE {
            bail!("database {database} did not go quiet within {QUIET_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Latency histograms (microseconds) of one load: the whole way, and split where the
/// relay handed the event to the producer.
pub(crate) struct Latencies {
    pub(crate) total: Histogram<u64>,
    pub(crate) to_send: Histogram<u64>,
    pub(crate) from_send: Histogram<u64>,
}

/// Commit → consumer latencies of the sighted events, from each transaction's commit
/// timestamp (`track_commit_timestamp`) to the consumer's clock when the event arrived.
pub(crate) async fn commit_latencies(admin: &PgPool, sightings: &[Sighting]) -> anyhow::Result<Latencies> {
    let mut xids: Vec<i64> = sightings
        .iter()
        .map(|s| i64::try_from(s.xid).unwrap_or(i64::MAX))
        .collect();
    xids.sort_unstable();
    xids.dedup();
    let mut committed: HashMap<u64, i64> = HashMap::with_capacity(xids.len());
    for chunk in xids.chunks(20_000) {
        let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(
            "select x, (extract(epoch from pg_xact_commit_timestamp(x::text::xid8::xid)) * 1000000)::bigint
               from unnest($1::int8[]) x",
        )
        .bind(chunk)
        .fetch_all(admin)
        .await
        .context("reading commit timestamps")?;
        for (xid, at) in rows {
            let at = at.ok_or_else(|| anyhow!("transaction {xid} has no commit timestamp"))?;
            committed.insert(xid.unsigned_abs(), at);
        }
    }
    split_latencies(&committed, sightings)
}

/// Latencies of the sighted events from the moments in `committed` (microseconds since
/// the Unix epoch, by the event's `xid`) to the consumer's clock when the event arrived,
/// split where the relay handed the event to the producer.
pub(crate) fn split_latencies(committed: &HashMap<u64, i64>, sightings: &[Sighting]) -> anyhow::Result<Latencies> {
    let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
    let mut latencies = Latencies {
        total: histogram()?,
        to_send: histogram()?,
        from_send: histogram()?,
    };
    // Both ends read this machine's wall clock; a later moment cannot precede an earlier
    // one by more than the clock's resolution, so differences are clamped at 1 µs.
    let record =
        |h: &mut Histogram<u64>, micros: i64| h.saturating_record(u64::try_from(micros.max(1)).unwrap_or(u64::MAX));
    for sighting in sightings {
        let at = *committed
            .get(&sighting.xid)
            .ok_or_else(|| anyhow!("no commit time for {}", sighting.xid))?;
        record(&mut latencies.total, sighting.seen_unix_us - at);
        if let Some(ms) = sighting.produced_unix_ms {
            // CreateTime is truncated to the millisecond: take the middle of it.
            let sent = ms * 1000 + 500;
            record(&mut latencies.to_send, sent - at);
            record(&mut latencies.from_send, sighting.seen_unix_us - sent);
        }
    }
    Ok(latencies)
}
