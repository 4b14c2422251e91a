//! Worker processes: started from this executable, killed with SIGKILL, restarted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, ChildStdin, Command};

/// One worker: how to start it, and its current process.
#[derive(Debug)]
pub(crate) struct Worker {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// Held open while the worker runs; closing it asks for a graceful stop.
    stdin: Option<ChildStdin>,
    starts: u32,
    kills: u32,
    unexpected_exits: u32,
}

impl Worker {
    /// A worker named `name` running `dbps-chaos worker <args>`, with `env` set and its
    /// output appended to `<dir>/<name>.log`.
    pub(crate) fn new(name: &str, args: Vec<String>, env: Vec<(String, String)>, dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            args,
            env,
            log: dir.join(format!("{name}.log")),
            child: None,
            stdin: None,
            starts: 0,
            kills: 0,
            unexpected_exits: 0,
        }
    }

    /// The worker's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// How often it was started.
    pub(crate) fn starts(&self) -> u32 {
        self.starts
    }

    /// How often it was killed on purpose.
    pub(crate) fn kills(&self) -> u32 {
        self.kills
    }

    /// How often it exited without being asked to.
    pub(crate) fn unexpected_exits(&self) -> u32 {
        self.unexpected_exits
    }

    /// Starts the process.
    pub(crate) fn start(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("locate the dbps-chaos executable")?;
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let err = out.try_clone()?;
        let mut command = Command::new(exe);
        command
            .arg("worker")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                // `dbps_core::inbox=debug` logs every duplicate the inbox skips, which the
                // consumer-kill scenario counts as evidence that kills caused redeliveries.
                std::env::var("DBPS_CHAOS_WORKER_LOG")
                    .unwrap_or_else(|_| String::from("info,rdkafka=warn,dbps_core::inbox=debug")),
            )
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("start {}", self.name))?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// Whether the process is running (it may have exited since the last look).
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub(crate) async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` sends SIGKILL on Unix: no handler runs, nothing is flushed.
            child.kill().await.with_context(|| format!("kill {}", self.name))?;
            self.kills += 1;
        }
        self.stdin = None;
        Ok(())
    }

    /// Returns the exit status if the process ended by itself since the last look.
    /// A non-zero exit counts as unexpected.
    pub(crate) fn poll_exit(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let Some(status) = child.try_wait()? else {
            return Ok(None);
        };
        self.child = None;
        self.stdin = None;
        if !status.success() {
            self.unexpected_exits += 1;
        }
        Ok(Some(status))
    }

    /// Asks the process to stop (closes its stdin) and waits up to `grace`, then kills it.
    /// Returns whether it stopped gracefully and successfully.
    pub(crate) async fn stop(&mut self, grace: Duration) -> Result<bool> {
        self.stdin = None;
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    self.unexpected_exits += 1;
                }
                Ok(status.success())
            }
            Err(_) => {
                child.kill().await?;
                Ok(false)
            }
        }
    }

    /// The last `lines` lines of the log, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// How many log lines contain `needle`.
    pub(crate) fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}
