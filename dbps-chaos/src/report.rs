//! The result of a scenario: printed as a table, written as JSON.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::checker::Counts;
use crate::replica::ReplicaCounts;

/// One scenario's result. The first keys are the ones every result carries; `counts`
/// has every count the checker made, `results` what is particular to the scenario.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) passed: bool,
    pub(crate) failures: Vec<String>,
    pub(crate) committed: u64,
    pub(crate) published_unique: u64,
    pub(crate) lost: u64,
    pub(crate) topic_duplicates: u64,
    pub(crate) effect_duplicates: u64,
    pub(crate) order_violations: u64,
    pub(crate) rolled_back_published: u64,
    pub(crate) faults_injected: u64,
    pub(crate) duration_s: f64,
    pub(crate) git_commit: String,
    pub(crate) started_at: String,
    pub(crate) seed: u64,
    pub(crate) cores: usize,
    pub(crate) settings: serde_json::Map<String, Value>,
    pub(crate) results: serde_json::Map<String, Value>,
    pub(crate) counts: Counts,
    /// The replica scenario's comparison of the replica with its source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) replica: Option<ReplicaCounts>,
}

impl Report {
    /// Prints the table.
    pub(crate) fn print(&self) {
        println!();
        println!(
            "== dbps-chaos {} == started {} · git {} · seed {} · {} cores · {:.1} s",
            self.scenario, self.started_at, self.git_commit, self.seed, self.cores, self.duration_s
        );
        let settings: Vec<String> = self.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("settings: {}", settings.join(" "));
        println!();
        println!("{:<32} {:>12}  must be", "count", "value");
        println!("{} {}  {}", "-".repeat(32), "-".repeat(12), "-".repeat(8));
        let zero: Vec<&str> = self.counts.must_be_zero().iter().map(|(name, _)| *name).collect();
        for (name, value) in rows(&self.counts) {
            let rule = if zero.contains(&name) {
                if value == "0" { "0  ok" } else { "0  FAILED" }
            } else {
                ""
            };
            println!("{name:<32} {value:>12}  {rule}");
        }
        println!("{:<32} {:>12}", "faults_injected", self.faults_injected);
        if let Some(replica) = &self.replica {
            println!();
            println!("{:<32} {:>12}  must be", "replica", "value");
            println!("{} {}  {}", "-".repeat(32), "-".repeat(12), "-".repeat(8));
            let zero: Vec<&str> = replica.must_be_zero().iter().map(|(name, _)| *name).collect();
            for (name, value) in replica.rows() {
                let rule = if zero.contains(&name) {
                    if value == "0" { "0  ok" } else { "0  FAILED" }
                } else {
                    ""
                };
                println!("{name:<32} {value:>12}  {rule}");
            }
        }
        if !self.results.is_empty() {
            println!();
            for (name, value) in &self.results {
                println!("{name:<32} {value:>12}");
            }
        }
        println!();
        if self.passed {
            println!("RESULT: PASS ({})", self.scenario);
        } else {
            println!("RESULT: FAIL ({})", self.scenario);
            for failure in &self.failures {
                println!("  - {failure}");
            }
        }
    }

    /// Writes the JSON object to `path`.
    pub(crate) fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
    }
}

fn rows(c: &Counts) -> Vec<(&'static str, String)> {
    let opt = |v: Option<u64>| v.map_or_else(|| String::from("-"), |v| v.to_string());
    let ms = |v: Option<i64>| v.map_or_else(|| String::from("-"), |v| format!("{v} ms"));
    let mut rows = vec![
        ("committed", c.committed.to_string()),
        ("committed_late", c.committed_late.to_string()),
        ("rolled_back", c.rolled_back.to_string()),
        ("published_unique", c.published_unique.to_string()),
        ("topic_records", c.topic_records.to_string()),
        ("topic_duplicates", c.topic_duplicates.to_string()),
        ("replayed_records", c.replayed_records.to_string()),
        ("effects_applied", opt(c.effects_applied)),
        ("lost", c.lost.to_string()),
        ("lost_on_topic", c.lost_on_topic.to_string()),
        ("lost_in_effects", opt(c.lost_in_effects)),
        ("order_violations", c.order_violations.to_string()),
        ("order_violations_topic", c.order_violations_topic.to_string()),
        ("order_violations_applied", c.order_violations_applied.to_string()),
        ("commit_order_violations", c.commit_order_violations.to_string()),
        ("committed_sequence_gaps", c.committed_sequence_gaps.to_string()),
        ("sequence_mismatches", c.sequence_mismatches.to_string()),
        ("key_partition_splits", c.key_partition_splits.to_string()),
        ("overtaken_commits", opt(c.overtaken_commits)),
        ("rolled_back_published", c.rolled_back_published.to_string()),
        ("phantom_published", c.phantom_published.to_string()),
        ("unidentified_records", c.unidentified_records.to_string()),
        ("effect_duplicates", c.effect_duplicates.to_string()),
        ("phantom_effects", c.phantom_effects.to_string()),
        ("effect_counter_mismatch", c.effect_counter_mismatch.to_string()),
        ("outbox_pending", c.outbox_pending.to_string()),
        ("parked", c.parked.to_string()),
        ("dlq_records", opt(c.dlq_records)),
        ("poison_injected", c.poison_injected.to_string()),
        ("poison_oversize", c.poison_oversize.to_string()),
        ("poison_malformed", c.poison_malformed.to_string()),
        ("poison_parked", c.poison_parked.to_string()),
        ("poison_dead_lettered", c.poison_dead_lettered.to_string()),
        ("poison_unaccounted", c.poison_unaccounted.to_string()),
        ("healthy_dead_lettered", c.healthy_dead_lettered.to_string()),
        ("poisoned_keys", c.poisoned_keys.to_string()),
        ("poisoned_keys_events", c.poisoned_keys_events.to_string()),
        (
            "poisoned_keys_events_delivered",
            c.poisoned_keys_events_delivered.to_string(),
        ),
        ("publish_latency_p50", ms(c.publish_latency_p50_ms)),
        ("publish_latency_p99", ms(c.publish_latency_p99_ms)),
        ("publish_latency_max", ms(c.publish_latency_max_ms)),
    ];
    // Only the replica scenario publishes records again on purpose.
    rows.retain(|(name, value)| *name != "replayed_records" || value != "0");
    rows
}
