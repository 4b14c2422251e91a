//! Progress on stderr: a bar while a phase runs, one line when it ends.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar for a phase that runs for `duration` (its position is in milliseconds).
pub(crate) fn timed(label: &str, duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    bar.set_style(
        ProgressStyle::with_template("{prefix:<34} [{bar:30}] {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// A bar counting `total` items.
pub(crate) fn counted(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix:<34} [{bar:30}] {pos}/{len} {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// A spinner for a phase of unknown length.
pub(crate) fn spinner(label: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{prefix:<34} {spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Clears the bar and prints the phase's result as one line, so that the log of a run
/// without a terminal shows it too.
pub(crate) fn done(bar: &ProgressBar, label: &str, summary: &str) {
    bar.finish_and_clear();
    eprintln!("{label:<34} {summary}");
}
