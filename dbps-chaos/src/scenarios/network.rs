//! The network scenarios: PostgreSQL restarted under the relays and the writers, and
//! connections reset, slowed down or turned half-open through Toxiproxy.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;

use super::{Run, Scenario, seconds};
use crate::checker::Check;
use crate::toxiproxy::{Proxy, Stream, Toxiproxy, via};

/// The timeouts the half-open scenario gives its components, deliberately shorter than
/// the faults it injects, so that only the components' own timeouts can end a wait.
pub(super) const HALF_OPEN_TIMEOUT_MS: u64 = 5_000;
/// How long the server keeps a silent relay's lease session in the network scenarios.
pub(super) const LEASE_IDLE_TIMEOUT_MS: u64 = 20_000;
/// librdkafka's client-side request timeout for the relays' producers in the
/// half-open scenario.
pub(super) const KAFKA_SOCKET_TIMEOUT_MS: u64 = 10_000;

/// Where the network scenarios' Toxiproxy and proxied Kafka listener are.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct NetArgs {
    /// Toxiproxy's API (`scripts/stack.sh start toxiproxy`; `scripts/stack.sh env` sets it).
    #[arg(long, env = "DBPS_TOXIPROXY_URL", default_value = "http://127.0.0.1:28474")]
    pub(crate) toxiproxy_url: String,
    /// The broker's listener for proxied clients, which the Kafka proxy forwards to.
    #[arg(long, env = "DBPS_KAFKA_PROXIED_UPSTREAM", default_value = "127.0.0.1:29094")]
    pub(crate) kafka_proxied_upstream: String,
    /// The port that listener advertises, where the Kafka proxy listens.
    #[arg(long, env = "DBPS_KAFKA_PROXIED_PORT", default_value_t = 29095)]
    pub(crate) kafka_proxied_port: u16,
}

/// The proxies of a run: one per relay and per consumer to PostgreSQL, one shared by the
/// writers, and one shared by the relays to Kafka.
pub(super) struct Net {
    toxi: Toxiproxy,
    writers_pg: Proxy,
    relays_pg: Vec<Proxy>,
    consumers_pg: Vec<Proxy>,
    kafka: Proxy,
}

/// A connection path a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    WritersPg,
    RelayPg(usize),
    ConsumerPg(usize),
    RelaysKafka,
}

impl Target {
    fn name(self) -> String {
        match self {
            Self::WritersPg => String::from("writers<->postgres"),
            Self::RelayPg(i) => format!("relay-{i}<->postgres"),
            Self::ConsumerPg(i) => format!("consumer-{i}<->postgres"),
            Self::RelaysKafka => String::from("relays<->kafka"),
        }
    }
}

/// One injected fault, as the orchestrator timed it.
#[derive(Debug, Clone)]
pub(super) struct Window {
    what: String,
    started: DateTime<Utc>,
    /// When the fault ended (for a restart: when the server was ready again).
    ended: DateTime<Utc>,
    /// Restarts: how long the stop took, and the shutdown mode.
    detail: Value,
}

impl Net {
    pub(super) async fn setup(
        args: &NetArgs,
        postgres_url: &str,
        id: &str,
        relays: u32,
        consumers: u32,
    ) -> Result<Self> {
        let toxi = Toxiproxy::connect(&args.toxiproxy_url).await?;
        let options = PgConnectOptions::from_str(postgres_url).context("DBPS_POSTGRES_URL")?;
        let pg = format!("{}:{}", options.get_host(), options.get_port());
        let local = "127.0.0.1:0";
        let writers_pg = toxi.proxy(&format!("chaos-{id}-writers-pg"), local, &pg).await?;
        let mut relays_pg = Vec::new();
        for i in 0..relays {
            relays_pg.push(toxi.proxy(&format!("chaos-{id}-relay-{i}-pg"), local, &pg).await?);
        }
        let mut consumers_pg = Vec::new();
        for i in 0..consumers {
            consumers_pg.push(toxi.proxy(&format!("chaos-{id}-consumer-{i}-pg"), local, &pg).await?);
        }
        // The broker advertises the proxy's address on its proxied listener, so every
        // connection of the relays' producers goes through this one proxy.
        let kafka = toxi
            .proxy(
                "chaos-relays-kafka",
                &format!("127.0.0.1:{}", args.kafka_proxied_port),
                &args.kafka_proxied_upstream,
            )
            .await
            .context(
                "the Kafka proxy (is the broker's proxied listener configured? scripts/stack.sh restarts it with one)",
            )?;
        Ok(Self {
            toxi,
            writers_pg,
            relays_pg,
            consumers_pg,
            kafka,
        })
    }

    /// The brokers a relay bootstraps from: the Kafka proxy.
    pub(super) fn relay_brokers(&self) -> String {
        self.kafka.listen.to_string()
    }

    pub(super) fn writer_url(&self, url: &str) -> String {
        via(url, self.writers_pg.listen)
    }

    pub(super) fn relay_url(&self, url: &str, relay: usize) -> String {
        self.relays_pg
            .get(relay)
            .map_or_else(|| url.to_owned(), |p| via(url, p.listen))
    }

    pub(super) fn consumer_url(&self, url: &str, consumer: usize) -> String {
        self.consumers_pg
            .get(consumer)
            .map_or_else(|| url.to_owned(), |p| via(url, p.listen))
    }

    fn proxies(&self, target: Target) -> Vec<&Proxy> {
        match target {
            Target::WritersPg => vec![&self.writers_pg],
            Target::RelayPg(i) => self.relays_pg.get(i).into_iter().collect(),
            Target::ConsumerPg(i) => self.consumers_pg.get(i).into_iter().collect(),
            Target::RelaysKafka => vec![&self.kafka],
        }
    }

    /// Removes every proxy of the run.
    pub(super) async fn teardown(&self) {
        let names = std::iter::once(&self.writers_pg)
            .chain(&self.relays_pg)
            .chain(&self.consumers_pg)
            .chain(std::iter::once(&self.kafka))
            .map(|p| p.name.clone());
        for name in names {
            if let Err(error) = self.toxi.delete(&name).await {
                println!("could not delete proxy {name}: {error:#}");
            }
        }
    }
}

/// The toxic a scenario injects: Toxiproxy's type, the streams it acts on, its
/// attributes, and how long it stays (seconds).
fn toxic(scenario: Scenario) -> (&'static str, &'static [Stream], Value, std::ops::Range<f64>) {
    match scenario {
        // RST on every connection through the proxy, as soon as the toxic is there.
        Scenario::NetReset => ("reset_peer", &[Stream::Upstream], json!({ "timeout": 0 }), 0.2..1.0),
        // 200 ms ± 100 ms on every answer.
        Scenario::NetLatency => (
            "latency",
            &[Stream::Downstream],
            json!({ "latency": 200, "jitter": 100 }),
            5.0..8.0,
        ),
        // Nothing passes either way and nothing is closed: a half-open connection.
        _ => (
            "timeout",
            &[Stream::Upstream, Stream::Downstream],
            json!({ "timeout": 0 }),
            12.0..16.0,
        ),
    }
}

impl Run {
    fn targets(&self) -> Vec<Vec<Target>> {
        let relays = (0..self.relays.len()).map(Target::RelayPg);
        let consumers = (0..self.consumers.len()).map(Target::ConsumerPg);
        match self.scenario {
            Scenario::NetReset => relays
                .chain(consumers)
                .chain(std::iter::once(Target::RelaysKafka))
                .map(|t| vec![t])
                .collect(),
            Scenario::NetLatency => vec![
                vec![Target::RelaysKafka],
                vec![Target::WritersPg],
                vec![Target::RelaysKafka, Target::WritersPg],
            ],
            _ => relays
                .chain(consumers)
                .chain([Target::RelaysKafka, Target::WritersPg])
                .map(|t| vec![t])
                .collect(),
        }
    }

    /// Injects the scenario's toxic on a random connection path at random moments while
    /// the writers run, and until the minimum number of faults is reached.
    pub(super) async fn toxic_loop(&mut self) -> Result<Vec<Window>> {
        let (kind, streams, attributes, hold) = toxic(self.scenario);
        let choices = self.targets();
        let mut windows = Vec::new();
        // A steady start, for the baseline latency.
        self.watch(Duration::from_secs(10)).await?;
        while self.writers_running() || self.faults < u64::from(self.plan.min_faults) {
            let targets = choices[self.rng.random_range(0..choices.len())].clone();
            let held = Duration::from_secs_f64(self.rng.random_range(hold.clone()));
            let names: Vec<String> = targets.iter().map(|t| t.name()).collect();
            let net = self.net.as_ref().context("the network scenarios need their proxies")?;
            let started = Utc::now();
            let mut added = Vec::new();
            for &target in &targets {
                for proxy in net.proxies(target) {
                    for (n, &stream) in streams.iter().enumerate() {
                        let name = format!("fault-{n}");
                        net.toxi
                            .add_toxic(proxy, &name, kind, stream, attributes.clone())
                            .await?;
                        added.push((proxy.clone(), name));
                    }
                }
            }
            self.faults += 1;
            println!(
                "[{:>6.1}s] {kind} on {} for {:.1} s",
                self.started.elapsed().as_secs_f64(),
                names.join(" and "),
                held.as_secs_f64()
            );
            let watched = self.watch(held).await;
            let net = self.net.as_ref().context("the network scenarios need their proxies")?;
            for (proxy, name) in &added {
                net.toxi.remove_toxic(proxy, name).await?;
            }
            let ended = Utc::now();
            watched?;
            windows.push(Window {
                what: names.join(" and "),
                started,
                ended,
                detail: json!({ "toxic": kind }),
            });
            let gap = match self.scenario {
                Scenario::NetReset => self.rng.random_range(1.5..4.0),
                Scenario::NetLatency => self.rng.random_range(6.0..9.0),
                _ => self.rng.random_range(4.0..8.0),
            };
            self.watch(Duration::from_secs_f64(gap)).await?;
        }
        Ok(windows)
    }

    /// Stops PostgreSQL (fast and immediate shutdowns in turn), keeps it down for a few
    /// seconds and starts it again, while the writers, the relays and the consumers run.
    pub(super) async fn restart_loop(&mut self) -> Result<Vec<Window>> {
        let mut windows = Vec::new();
        self.watch(Duration::from_secs(10)).await?;
        while self.writers_running() || self.faults < u64::from(self.plan.min_faults) {
            let mode = if self.faults.is_multiple_of(2) {
                "fast"
            } else {
                "immediate"
            };
            let down = Duration::from_secs_f64(self.rng.random_range(2.0..5.0));
            println!(
                "[{:>6.1}s] stopping PostgreSQL ({mode} shutdown) for {:.1} s",
                self.started.elapsed().as_secs_f64(),
                down.as_secs_f64()
            );
            let started = Utc::now();
            if let Err(error) = self.servers.stack(&["stop", "postgres", mode]).await {
                let _ = self.servers.stack(&["start", "postgres"]).await;
                return Err(error);
            }
            let stopped = Utc::now();
            self.faults += 1;
            let waited = self.watch(down).await;
            let start_requested = Utc::now();
            let restarted = self.servers.stack(&["start", "postgres"]).await;
            let ready = Utc::now();
            waited?;
            restarted?;
            println!(
                "[{:>6.1}s] PostgreSQL ready again (start took {:.1} s)",
                self.started.elapsed().as_secs_f64(),
                seconds(ready - start_requested)
            );
            windows.push(Window {
                what: format!("postgres {mode} shutdown"),
                started,
                ended: ready,
                detail: json!({
                    "mode": mode,
                    "stop_s": seconds(stopped - started),
                    "down_s": seconds(ready - stopped),
                }),
            });
            let gap = self.rng.random_range(6.0..10.0);
            self.watch(Duration::from_secs_f64(gap)).await?;
        }
        Ok(windows)
    }

    /// Per fault: when publishing and the commit → publish latency were back, and the
    /// workers' evidence of detecting the fault by their own timeouts.
    pub(super) fn fault_results(&mut self, windows: &[Window], check: &Check) {
        let latencies = &check.latencies_by_commit_ms;
        let baseline = windows.first().map(|w| {
            let before: Vec<i64> = latencies
                .iter()
                .take_while(|&&(commit, _)| commit < w.started.timestamp_millis())
                .map(|&(_, l)| l)
                .collect();
            percentile(before, 0.99)
        });
        let baseline_p99 = baseline.flatten().unwrap_or(50);
        // "Recovered": every event committed within a second had a latency within this.
        let threshold = (3 * baseline_p99).max(250);
        let mut entries = Vec::new();
        let mut worst_recovery: f64 = 0.0;
        for window in windows {
            let end = window.ended.timestamp_millis();
            let first_publish = check
                .first_append_at_or_after(window.ended)
                .map(|t| seconds(t - window.ended));
            let recovered = recovered_after(latencies, end, threshold);
            let during: Vec<i64> = latencies
                .iter()
                .filter(|&&(c, _)| c >= window.started.timestamp_millis() && c < end)
                .map(|&(_, l)| l)
                .collect();
            // Recovery is judged only where the load went on long enough after the fault.
            let load_after = latencies.last().is_some_and(|&(commit, _)| commit >= end + 15_000);
            if let Some(r) = recovered {
                worst_recovery = worst_recovery.max(r);
            } else if load_after {
                self.failures.push(format!(
                    "latency did not recover within 60 s after the fault on {} ended",
                    window.what
                ));
            }
            entries.push(json!({
                "fault": window.what,
                "at_s": seconds(window.started - self.started_at),
                "lasted_s": seconds(window.ended - window.started),
                "detail": window.detail,
                "p99_latency_of_commits_during_ms": percentile(during, 0.99),
                "first_publish_after_end_s": first_publish,
                "latency_recovered_after_s": recovered,
                "load_after": load_after,
            }));
        }
        self.results.insert(String::from("faults"), Value::Array(entries));
        self.results
            .insert(String::from("baseline_p99_latency_ms"), json!(baseline_p99));
        self.results
            .insert(String::from("recovered_threshold_ms"), json!(threshold));
        self.results.insert(
            String::from("worst_recovery_s"),
            json!((worst_recovery * 100.0).round() / 100.0),
        );
        let count = |workers: &[crate::procs::Worker], needle: &str| -> usize {
            workers.iter().map(|w| w.log_count(needle)).sum()
        };
        let timeouts = "no answer from PostgreSQL within";
        self.results.insert(
            String::from("detected_by_own_timeouts"),
            json!({
                "relays": count(&self.relays, timeouts),
                "consumers": count(&self.consumers, timeouts),
                "writers": count(&self.writers, timeouts),
            }),
        );
        self.results.insert(
            String::from("relay_rounds_failed_and_retried"),
            json!(count(&self.relays, "relay round failed")),
        );
        self.results.insert(
            String::from("relay_partition_takeovers"),
            json!(count(&self.relays, "relay took partitions")),
        );
        let restarts: u32 = self
            .relays
            .iter()
            .chain(&self.consumers)
            .map(|w| w.starts().saturating_sub(1))
            .sum();
        self.results
            .insert(String::from("worker_restarts_needed"), json!(restarts));
        if restarts > 0 {
            self.failures.push(format!(
                "{restarts} relay or consumer processes had to be restarted; they must recover by themselves"
            ));
        }
    }
}

/// Seconds after `end_ms` until the first one-second bucket of commits whose latencies
/// are all within `threshold_ms` (None: not within 60 s).
fn recovered_after(latencies: &[(i64, i64)], end_ms: i64, threshold_ms: i64) -> Option<f64> {
    let start = latencies.partition_point(|&(commit, _)| commit < end_ms);
    let mut bucket_start = end_ms;
    let mut i = start;
    while bucket_start < end_ms + 60_000 {
        let bucket_end = bucket_start + 1000;
        let mut any = false;
        let mut within = true;
        while let Some(&(commit, latency)) = latencies.get(i) {
            if commit >= bucket_end {
                break;
            }
            any = true;
            within &= latency <= threshold_ms;
            i += 1;
        }
        if any && within {
            #[allow(clippy::cast_precision_loss)] // milliseconds of a run
            return Some((bucket_start - end_ms) as f64 / 1000.0);
        }
        if i >= latencies.len() {
            return None;
        }
        bucket_start = bucket_end;
    }
    None
}

fn percentile(mut values: Vec<i64>, q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values.get(i).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_is_the_first_second_of_commits_within_the_threshold() {
        // Commits every 100 ms after the end at 10 s; slow until 12.5 s.
        let latencies: Vec<(i64, i64)> = (0..60)
            .map(|n| {
                let commit = 10_000 + n * 100;
                (commit, if commit < 12_500 { 900 } else { 40 })
            })
            .collect();
        assert_eq!(recovered_after(&latencies, 10_000, 250), Some(3.0));
        assert_eq!(recovered_after(&latencies, 10_000, 1000), Some(0.0));
        assert_eq!(recovered_after(&latencies[..20], 10_000, 250), None);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(vec![], 0.99), None);
        assert_eq!(percentile(vec![5, 1, 3], 0.5), Some(3));
        assert_eq!(percentile((1..=100).collect(), 0.99), Some(99));
    }
}
