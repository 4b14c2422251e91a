//! CPU time from `/proc`: the writers' PostgreSQL backends, this process and the whole
//! machine, so that a write rate can be turned into CPU time per transaction. Only on
//! Linux; elsewhere the samples are `None` and the profile is left out.

use std::collections::HashMap;

/// CPU counters at one moment, in clock ticks.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    machine_busy: u64,
    machine_total: u64,
    own: u64,
    backends: HashMap<i32, u64>,
}

/// CPU seconds used between two samples.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// By the given PostgreSQL backends.
    pub(crate) backends_s: f64,
    /// By this process (writers, relay, consumer).
    pub(crate) harness_s: f64,
    /// By everything on the machine.
    pub(crate) machine_busy_s: f64,
    /// What all cores could have given (busy and idle).
    pub(crate) machine_capacity_s: f64,
}

impl Usage {
    /// How busy all cores were, in percent.
    pub(crate) fn machine_busy_pct(&self) -> f64 {
        100.0 * self.machine_busy_s / self.machine_capacity_s
    }

    pub(crate) fn add(&mut self, other: Self) {
        self.backends_s += other.backends_s;
        self.harness_s += other.harness_s;
        self.machine_busy_s += other.machine_busy_s;
        self.machine_capacity_s += other.machine_capacity_s;
    }
}

/// How busy all cores have been since `before` (a machine-wide sample), in percent.
pub(crate) fn busy_pct_since(before: Option<&Sample>) -> Option<f64> {
    Some(usage(before?, &sample(&[])?).machine_busy_pct())
}

/// The counters now, for the backends with these process ids.
#[cfg(target_os = "linux")]
pub(crate) fn sample(pids: &[i32]) -> Option<Sample> {
    use procfs::process::Process;
    use procfs::{CurrentSI, KernelStats};
    let cpu = |p: &Process| p.stat().ok().map(|s| s.utime + s.stime);
    let total = KernelStats::current().ok()?.total;
    let idle = total.idle + total.iowait.unwrap_or(0);
    let busy = total.user
        + total.nice
        + total.system
        + total.irq.unwrap_or(0)
        + total.softirq.unwrap_or(0)
        + total.steal.unwrap_or(0);
    let backends = pids
        .iter()
        .filter_map(|pid| Some((*pid, cpu(&Process::new(*pid).ok()?)?)))
        .collect();
    Some(Sample {
        machine_busy: busy,
        machine_total: busy + idle,
        own: cpu(&Process::myself().ok()?)?,
        backends,
    })
}

/// The counters now (not available on this system).
#[cfg(not(target_os = "linux"))]
pub(crate) fn sample(_pids: &[i32]) -> Option<Sample> {
    None
}

#[cfg(target_os = "linux")]
fn ticks_per_second() -> f64 {
    procfs::ticks_per_second() as f64
}

#[cfg(not(target_os = "linux"))]
fn ticks_per_second() -> f64 {
    100.0
}

/// CPU used between `before` and `after`. A backend that appeared meanwhile counts with
/// all its time; one that disappeared is not counted.
pub(crate) fn usage(before: &Sample, after: &Sample) -> Usage {
    let tick = 1.0 / ticks_per_second();
    let backends: u64 = after
        .backends
        .iter()
        .map(|(pid, ticks)| ticks.saturating_sub(before.backends.get(pid).copied().unwrap_or(0)))
        .sum();
    Usage {
        backends_s: backends as f64 * tick,
        harness_s: after.own.saturating_sub(before.own) as f64 * tick,
        machine_busy_s: after.machine_busy.saturating_sub(before.machine_busy) as f64 * tick,
        machine_capacity_s: after.machine_total.saturating_sub(before.machine_total) as f64 * tick,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_new_backends_whole_and_ignores_gone_ones() {
        let before = Sample {
            machine_busy: 100,
            machine_total: 400,
            own: 10,
            backends: HashMap::from([(1, 50), (2, 70)]),
        };
        let after = Sample {
            machine_busy: 300,
            machine_total: 800,
            own: 30,
            backends: HashMap::from([(1, 80), (3, 5)]),
        };
        let used = usage(&before, &after);
        let tick = 1.0 / ticks_per_second();
        assert!((used.backends_s - 35.0 * tick).abs() < 1e-9);
        assert!((used.harness_s - 20.0 * tick).abs() < 1e-9);
        assert!((used.machine_busy_s - 200.0 * tick).abs() < 1e-9);
        assert!((used.machine_capacity_s - 400.0 * tick).abs() < 1e-9);
    }
}
