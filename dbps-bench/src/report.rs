//! The outbox scenario's results: the JSON object and the tables printed at the end.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of a histogram recorded in microseconds, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Percentiles {
    pub(crate) fn of_micros(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50: ms(0.5),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        }
    }
}

/// Commit → consumer latency at one offered load.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyPoint {
    /// Offered load as a fraction of `write_tps_with_outbox`.
    pub(crate) load_fraction: f64,
    /// Events per second the writers were asked for.
    pub(crate) offered_eps: f64,
    /// Events per second they committed.
    pub(crate) achieved_eps: f64,
    /// Events whose latency was measured.
    pub(crate) samples: u64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    /// Where the clock stops.
    pub(crate) measured_to: &'static str,
    /// The first part: commit → the relay handing the event to the producer (the Kafka
    /// record's CreateTime, which has millisecond resolution).
    pub(crate) commit_to_send_ms: Percentiles,
    /// The second part: producer → consumer (linger, broker, fetch).
    pub(crate) send_to_consumer_ms: Percentiles,
    /// How busy all cores were meanwhile (everything on the machine).
    pub(crate) machine_busy_pct: Option<f64>,
}

impl LatencyPoint {
    /// The point of one load: what was offered and achieved, and the percentiles of
    /// `latencies` (microseconds) in milliseconds.
    pub(crate) fn new(
        load: (f64, f64, f64),
        latencies: &crate::probes::Latencies,
        measured_to: &'static str,
        machine_busy_pct: Option<f64>,
    ) -> Self {
        let (load_fraction, offered_eps, achieved_eps) = load;
        let total = Percentiles::of_micros(&latencies.total);
        Self {
            load_fraction,
            offered_eps,
            achieved_eps,
            samples: latencies.total.len(),
            p50: total.p50,
            p99: total.p99,
            p999: total.p999,
            max: total.max,
            measured_to,
            commit_to_send_ms: Percentiles::of_micros(&latencies.to_send),
            send_to_consumer_ms: Percentiles::of_micros(&latencies.from_send),
            machine_busy_pct,
        }
    }

    /// One line for the progress log.
    pub(crate) fn summary(&self) -> String {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
            self.p50, self.p99, self.p999
        )
    }
}

/// One relay round, timed step by step with the relay's own store and publisher.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoundProfile {
    pub(crate) events: usize,
    /// `PgOutboxStore::fetch` (select of the batch, decoding into envelopes).
    pub(crate) fetch_ms: f64,
    /// `KafkaPublisher::publish_batch` (encode, send, wait for every acknowledgement).
    pub(crate) publish_ms: f64,
    /// `PgOutboxStore::mark_published` (delete of the batch's rows).
    pub(crate) mark_ms: f64,
}

impl RoundProfile {
    pub(crate) fn total_ms(&self) -> f64 {
        self.fetch_ms + self.publish_ms + self.mark_ms
    }
}

/// Share of PostgreSQL backend samples in each state and wait event.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WaitShare {
    pub(crate) wait: String,
    pub(crate) share: f64,
}

/// What one variant of the business transaction cost, per committed transaction.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WriteCost {
    pub(crate) variant: &'static str,
    pub(crate) tx_per_s: f64,
    /// CPU time of the writers' PostgreSQL backends.
    pub(crate) backend_cpu_us_per_tx: Option<f64>,
    /// CPU time of the harness process (writers, and the relay and consumer where they run).
    pub(crate) harness_cpu_us_per_tx: Option<f64>,
    /// CPU time of the whole machine (PostgreSQL's other processes, Kafka, other work).
    pub(crate) machine_cpu_us_per_tx: Option<f64>,
    /// How busy all cores were.
    pub(crate) machine_busy_pct: Option<f64>,
    /// WAL the server wrote.
    pub(crate) wal_bytes_per_tx: f64,
    /// The writers' client-side transaction time (BEGIN to the reply to COMMIT).
    pub(crate) tx_ms: Percentiles,
}

/// The drain phase in detail.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainDetail {
    /// Events waiting when the relay started.
    pub(crate) backlog_events: u64,
    /// Time to enqueue the backlog (through `PgOutbox`, several events per transaction).
    pub(crate) fill_s: f64,
    /// Relay start → backlog empty and every event seen by the consumer.
    pub(crate) relay_s: f64,
    /// Raw producer, run before and after the relay: first send → last acknowledgement.
    pub(crate) raw_acked_s: Vec<f64>,
    /// Raw producer, run before and after the relay: first send → every record seen by
    /// the consumer (what `raw_producer_eps` is computed from).
    pub(crate) raw_consumed_s: Vec<f64>,
    /// Relay rounds timed step by step before the relay started.
    pub(crate) rounds: Vec<RoundProfile>,
}

/// The idle measurement in detail.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleDetail {
    pub(crate) window_s: f64,
    /// Transactions (commits and rollbacks) the server counted in the scratch database
    /// during the window: the long relay lifetime's count minus the short one's.
    pub(crate) transactions: i64,
    /// A relay lifetime of 1 s (start-up and shut-down).
    pub(crate) short_lifetime_transactions: i64,
    /// A relay lifetime of 1 s plus the window.
    pub(crate) long_lifetime_transactions: i64,
    /// Whether autovacuum or autoanalyze ran on the scratch tables during the window (its
    /// transactions would be counted too).
    pub(crate) autovacuum_in_window: bool,
}

/// One target and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub(crate) metric: &'static str,
    pub(crate) value: f64,
    pub(crate) limit: f64,
    /// `<=` or `>=`.
    pub(crate) op: &'static str,
    pub(crate) met: bool,
}

impl Target {
    pub(crate) fn at_most(metric: &'static str, value: f64, limit: f64) -> Self {
        Self {
            metric,
            value,
            limit,
            op: "<=",
            met: value <= limit,
        }
    }

    pub(crate) fn at_least(metric: &'static str, value: f64, limit: f64) -> Self {
        Self {
            metric,
            value,
            limit,
            op: ">=",
            met: value >= limit,
        }
    }
}

/// The run's settings.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    pub(crate) writers: usize,
    pub(crate) relay_batch_size: usize,
    /// `linger.ms` of the relay's publisher and of the raw producer.
    pub(crate) linger_ms: u32,
    pub(crate) drain_events: u64,
    pub(crate) partitions: i32,
    pub(crate) keys: i64,
    pub(crate) postgres_version: String,
}

/// Everything the outbox scenario measured, headline figures first.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct OutboxReport {
    pub(crate) scenario: &'static str,
    pub(crate) write_tps_without_outbox: f64,
    pub(crate) write_tps_with_outbox: f64,
    /// The floor: the business transaction plus a bare insert of the event's JSON.
    pub(crate) write_tps_bare_insert: f64,
    /// `write_tps_with_outbox / write_tps_bare_insert` (target ≥ 0.9).
    pub(crate) with_vs_bare_insert: f64,
    /// The business transaction with `PgOutbox::enqueue_versioned_event` (the order's
    /// version as the sequence number, no sequences table).
    pub(crate) write_tps_with_versioned_outbox: f64,
    /// `write_tps_with_versioned_outbox / write_tps_bare_insert`.
    pub(crate) versioned_vs_bare_insert: f64,
    pub(crate) write_overhead_pct: f64,
    pub(crate) raw_producer_eps: f64,
    pub(crate) relay_drain_eps: f64,
    pub(crate) relay_vs_raw_ratio: f64,
    pub(crate) latency_ms: LatencyPoint,
    pub(crate) idle_queries_per_s: f64,
    pub(crate) payload_bytes: usize,
    pub(crate) raw_pg_commit_tps: f64,
    pub(crate) sustained_eps: f64,
    /// `--duration`: how long each main measurement ran.
    pub(crate) duration_s: f64,
    /// The whole run, set-up and clean-up included.
    pub(crate) wall_time_s: f64,
    pub(crate) cores: usize,
    pub(crate) git_commit: String,
    pub(crate) date: String,
    pub(crate) settings: Settings,
    pub(crate) targets: Vec<Target>,
    pub(crate) latency_sweep: Vec<LatencyPoint>,
    /// Largest number of committed events not yet seen by the consumer while writers ran
    /// flat out with the relay (sampled every 50 ms).
    pub(crate) sustained_max_lag_events: u64,
    /// The business transaction's variants, and what each cost per transaction.
    pub(crate) write_profile: Vec<WriteCost>,
    pub(crate) write_wait_events: WaitEvents,
    pub(crate) drain: DrainDetail,
    /// The large backlog's drain (`--growth-events`), if it ran.
    pub(crate) growth: Option<GrowthDetail>,
    pub(crate) idle: IdleDetail,
}

/// The relay draining a large backlog, timed per slice of it, beside the drain phase's
/// rate.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GrowthDetail {
    /// Events waiting when the relay started.
    pub(crate) backlog_events: u64,
    /// Time to enqueue them (through `PgOutbox`, several events per transaction).
    pub(crate) fill_s: f64,
    /// Outbox table and index size when the relay started, in bytes.
    pub(crate) table_bytes: i64,
    pub(crate) index_bytes: i64,
    /// Relay start → backlog empty and every event seen by the consumer.
    pub(crate) relay_s: f64,
    /// `backlog_events / relay_s`.
    pub(crate) relay_eps: f64,
    /// The drain phase's rate (its smaller backlog), from the same run.
    pub(crate) small_backlog_eps: f64,
    /// `relay_eps / small_backlog_eps` (target ≥ 0.8).
    pub(crate) vs_small_backlog: f64,
    /// Events per second over each tenth of the backlog, as the consumer saw them: the
    /// first while the table is full, the last while it empties.
    pub(crate) tenths_eps: Vec<f64>,
    /// Where the CPU went while the relay drained (where `/proc` can be read): all cores'
    /// busy share, and the cores used by the relay's PostgreSQL backends and by this
    /// process (relay and consumer).
    pub(crate) machine_busy_pct: Option<f64>,
    pub(crate) relay_backends_cores: Option<f64>,
    pub(crate) harness_cores: Option<f64>,
}

/// Where PostgreSQL's backends of the scratch database were, sampled during the warm-up.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WaitEvents {
    pub(crate) without_outbox: Vec<WaitShare>,
    pub(crate) with_outbox: Vec<WaitShare>,
}

/// `1234567.8` → `1,234,568`.
pub(crate) fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return String::from("–");
    }
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 { format!("-{out}") } else { out }
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn yes(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

/// A Markdown table, padded so that it also reads well in a terminal.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

impl OutboxReport {
    fn target(&self, metric: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.metric == metric)
    }

    /// The tables printed at the end of a run (Markdown, pasted as is into the docs).
    pub(crate) fn render(&self) -> String {
        let met = |metric: &str| self.target(metric).is_some_and(|t| t.met);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "dbps-bench outbox · {} · commit {} · {} cores · PostgreSQL {} · --duration {}s · {} writers · relay batch {} · linger.ms {} · payload {} B · run took {:.0} s\n",
            self.date,
            self.git_commit,
            self.cores,
            self.settings.postgres_version,
            self.duration_s,
            self.settings.writers,
            self.settings.relay_batch_size,
            self.settings.linger_ms,
            self.payload_bytes,
            self.wall_time_s,
        );
        let l = &self.latency_ms;
        let rows = vec![
            vec![
                "write rate, tx/s".into(),
                format!("{} with outbox", thousands(self.write_tps_with_outbox)),
                format!("{} bare insert", thousands(self.write_tps_bare_insert)),
                format!("{:.3}", self.with_vs_bare_insert),
                "≥ 0.9 of the bare insert".into(),
                yes(met("with_vs_bare_insert")).into(),
            ],
            vec![
                "write rate, versioned events, tx/s".into(),
                format!("{} with outbox", thousands(self.write_tps_with_versioned_outbox)),
                format!("{} bare insert", thousands(self.write_tps_bare_insert)),
                format!("{:.3}", self.versioned_vs_bare_insert),
                "≥ 0.9 of the bare insert".into(),
                yes(met("versioned_vs_bare_insert")).into(),
            ],
            vec![
                "write rate without any event, tx/s".into(),
                thousands(self.write_tps_without_outbox),
                "–".into(),
                format!("{:.3}", self.write_tps_with_outbox / self.write_tps_without_outbox),
                format!("outbox costs {:.1} %", self.write_overhead_pct),
                "–".into(),
            ],
            vec![
                "relay drain, events/s".into(),
                thousands(self.relay_drain_eps),
                format!("{} raw producer", thousands(self.raw_producer_eps)),
                format!("{:.2}", self.relay_vs_raw_ratio),
                "≥ 20,000 and ratio ≥ 0.6".into(),
                yes(met("relay_drain_eps") && met("relay_vs_raw_ratio")).into(),
            ],
            vec![
                format!("commit → consumer p50, ms (at {:.0} % load)", l.load_fraction * 100.0),
                ms(l.p50),
                "–".into(),
                "–".into(),
                "–".into(),
                "–".into(),
            ],
            vec![
                format!("commit → consumer p99, ms (at {:.0} % load)", l.load_fraction * 100.0),
                ms(l.p99),
                "–".into(),
                "–".into(),
                "≤ 20".into(),
                yes(met("latency_ms.p99")).into(),
            ],
            vec![
                format!("commit → consumer p99.9, ms (at {:.0} % load)", l.load_fraction * 100.0),
                ms(l.p999),
                "–".into(),
                "–".into(),
                "–".into(),
                "–".into(),
            ],
            vec![
                "idle relay, queries/s".into(),
                format!("{:.2}", self.idle_queries_per_s),
                "–".into(),
                "–".into(),
                "≤ 1".into(),
                yes(met("idle_queries_per_s")).into(),
            ],
            vec![
                "sustained end to end, events/s".into(),
                thousands(self.sustained_eps),
                format!("{} raw commits/s", thousands(self.raw_pg_commit_tps)),
                format!("{:.2}", self.sustained_eps / self.raw_pg_commit_tps),
                "–".into(),
                "–".into(),
            ],
        ];
        let mut rows = rows;
        if let Some(low) = self.latency_sweep.first() {
            rows.insert(
                rows.len() - 3,
                vec![
                    format!("commit → consumer p99, ms (at {:.0} % load)", low.load_fraction * 100.0),
                    ms(low.p99),
                    "–".into(),
                    "–".into(),
                    "≤ 12".into(),
                    yes(met("latency_low_load_ms.p99")).into(),
                ],
            );
        }
        if let Some(g) = &self.growth {
            rows.push(vec![
                format!("drain of {} events, events/s", thousands(g.backlog_events as f64)),
                thousands(g.relay_eps),
                format!(
                    "{} ({} events)",
                    thousands(g.small_backlog_eps),
                    thousands(self.drain.backlog_events as f64)
                ),
                format!("{:.2}", g.vs_small_backlog),
                "≥ 0.8 of the smaller backlog's".into(),
                yes(met("growth_vs_small_backlog")).into(),
            ]);
        }
        out.push_str(&table(
            &["metric", "dbps", "baseline (same run)", "ratio", "target", "ok?"],
            &rows,
        ));

        let _ = writeln!(
            out,
            "\nLatency against offered load (commit timestamp → consumer receipt; offered = fraction of the with-outbox write rate):\n"
        );
        let sweep: Vec<Vec<String>> = self
            .latency_sweep
            .iter()
            .map(|p| {
                vec![
                    format!("{:.0} %", p.load_fraction * 100.0),
                    thousands(p.offered_eps),
                    thousands(p.achieved_eps),
                    thousands(p.samples as f64),
                    ms(p.p50),
                    ms(p.p99),
                    ms(p.p999),
                    ms(p.max),
                    format!("{} / {}", ms(p.commit_to_send_ms.p50), ms(p.commit_to_send_ms.p99)),
                    format!("{} / {}", ms(p.send_to_consumer_ms.p50), ms(p.send_to_consumer_ms.p99)),
                    p.machine_busy_pct
                        .map_or_else(|| String::from("–"), |b| format!("{b:.0} %")),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "load",
                "offered ev/s",
                "achieved ev/s",
                "events",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "commit → send p50 / p99",
                "send → consumer p50 / p99",
                "machine busy",
            ],
            &sweep,
        ));

        let _ = writeln!(
            out,
            "\nWhere the write time goes, per committed transaction (variants below the second are diagnostics, relay stopped). \
             Largest consumer lag while writing flat out with the relay: {} events.\n",
            thousands(self.sustained_max_lag_events as f64),
        );
        let opt = |v: Option<f64>| v.map_or_else(|| String::from("–"), thousands);
        let costs: Vec<Vec<String>> = self
            .write_profile
            .iter()
            .map(|c| {
                vec![
                    c.variant.to_owned(),
                    thousands(c.tx_per_s),
                    format!("{} / {}", ms(c.tx_ms.p50), ms(c.tx_ms.p99)),
                    opt(c.backend_cpu_us_per_tx),
                    opt(c.harness_cpu_us_per_tx),
                    opt(c.machine_cpu_us_per_tx),
                    c.machine_busy_pct
                        .map_or_else(|| String::from("–"), |p| format!("{p:.0} %")),
                    thousands(c.wal_bytes_per_tx),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "business transaction",
                "tx/s",
                "tx p50 / p99 ms",
                "PG backend CPU µs",
                "harness CPU µs",
                "machine CPU µs",
                "machine busy",
                "WAL bytes",
            ],
            &costs,
        ));

        let d = &self.drain;
        let _ = writeln!(
            out,
            "\nDrain: {} events enqueued in {:.1} s through PgOutbox; the relay drained them in {:.2} s; \
             the raw producer sent as many in {} s (before and after the relay; all acknowledged after {} s).\n\
             Relay rounds timed step by step (batch {}):\n",
            thousands(d.backlog_events as f64),
            d.fill_s,
            d.relay_s,
            d.raw_consumed_s
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(" and "),
            d.raw_acked_s
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(" and "),
            self.settings.relay_batch_size,
        );
        let rounds: Vec<Vec<String>> = d
            .rounds
            .iter()
            .map(|r| {
                let total = r.total_ms();
                vec![
                    thousands(r.events as f64),
                    format!("{} ({:.0} %)", ms(r.fetch_ms), 100.0 * r.fetch_ms / total),
                    format!("{} ({:.0} %)", ms(r.publish_ms), 100.0 * r.publish_ms / total),
                    format!("{} ({:.0} %)", ms(r.mark_ms), 100.0 * r.mark_ms / total),
                    ms(total),
                    thousands(r.events as f64 / total * 1000.0),
                ]
            })
            .collect();
        out.push_str(&table(
            &["events", "fetch ms", "publish ms", "delete ms", "round ms", "events/s"],
            &rounds,
        ));

        if let Some(g) = &self.growth {
            let _ = writeln!(
                out,
                "\nLarge backlog: {} events enqueued in {:.1} s (outbox table {} MB, indexes {} MB); the relay drained them in {:.2} s. \
                 Events/s per tenth of the backlog, as the consumer saw them: {}. \
                 Meanwhile the machine was {} busy; the relay's PostgreSQL backends used {} cores, the harness (relay and consumer) {}.",
                thousands(g.backlog_events as f64),
                g.fill_s,
                thousands(g.table_bytes as f64 / 1e6),
                thousands(g.index_bytes as f64 / 1e6),
                g.relay_s,
                g.tenths_eps
                    .iter()
                    .map(|e| thousands(*e))
                    .collect::<Vec<_>>()
                    .join(", "),
                g.machine_busy_pct
                    .map_or_else(|| String::from("–"), |p| format!("{p:.0} %")),
                g.relay_backends_cores
                    .map_or_else(|| String::from("–"), |c| format!("{c:.2}")),
                g.harness_cores.map_or_else(|| String::from("–"), |c| format!("{c:.2}")),
            );
        }
        let shares = |v: &[WaitShare]| {
            v.iter()
                .take(6)
                .map(|w| format!("{} {:.0} %", w.wait, w.share * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "\nPostgreSQL backends of the run's database, sampled during the warm-up (state:wait event):\n\
             - without outbox: {}\n- with outbox: {}",
            shares(&self.write_wait_events.without_outbox),
            shares(&self.write_wait_events.with_outbox),
        );
        let i = &self.idle;
        let _ = writeln!(
            out,
            "\nIdle: {} transactions in {:.0} s on the run's database with the relay running and nothing to publish \
             (a relay living 1 s cost {}, one living {:.0} s more {}){}.",
            i.transactions,
            i.window_s,
            i.short_lifetime_transactions,
            i.window_s,
            i.long_lifetime_transactions,
            if i.autovacuum_in_window {
                " (autovacuum ran during the window and is included)"
            } else {
                ""
            },
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(-20_000.0), "-20,000");
        assert_eq!(thousands(f64::NAN), "–");
    }

    #[test]
    fn table_pads_columns() {
        let rendered = table(&["a", "bb"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(rendered, "| a    | bb |\n| ---- | -- |\n| long | x  |\n");
    }

    #[test]
    fn targets_compare_in_their_direction() {
        assert!(Target::at_most("x", 5.0, 5.0).met);
        assert!(!Target::at_most("x", 5.1, 5.0).met);
        assert!(Target::at_least("x", 0.5, 0.5).met);
        assert!(!Target::at_least("x", 0.49, 0.5).met);
    }
}
