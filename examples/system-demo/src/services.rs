//! The six services as child processes: started, health-checked, stopped with SIGTERM and
//! started again with the same environment.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::out;
use crate::principals::Principals;

/// How long a service may take to answer `/health` after it was started.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a service may take to stop after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// Where the stack's OpenSearch listens, for the customer service's search and the
/// pipeline's quotes index, unless `DBPS_OPENSEARCH_URL` says otherwise.
const DEFAULT_OPENSEARCH_URL: &str = "http://127.0.0.1:29200";

/// One of the example system's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Svc {
    Customer,
    Inventory,
    PurchaseOrder,
    Quote,
    Email,
    Pipeline,
}

impl Svc {
    /// In the order they start: the quote and email services read the customer service at
    /// start; the pipeline reads the others' events only.
    pub(crate) const ALL: [Svc; 6] = [
        Svc::Customer,
        Svc::Inventory,
        Svc::PurchaseOrder,
        Svc::Quote,
        Svc::Email,
        Svc::Pipeline,
    ];

    /// "customer service", for sentences.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Svc::Customer => "customer service",
            Svc::Inventory => "inventory service",
            Svc::PurchaseOrder => "purchase-order service",
            Svc::Quote => "quote service",
            Svc::Email => "email service",
            Svc::Pipeline => "pipeline service",
        }
    }

    /// The binary, also the name of its log file.
    pub(crate) fn binary(self) -> &'static str {
        match self {
            Svc::Customer => "customer-service",
            Svc::Inventory => "inventory-service",
            Svc::PurchaseOrder => "purchase-order-service",
            Svc::Quote => "quote-service",
            Svc::Email => "email-service",
            Svc::Pipeline => "pipeline-service",
        }
    }

    /// The variable with the address the service listens on.
    fn addr_var(self) -> &'static str {
        match self {
            Svc::Customer => "CUSTOMER_HTTP_ADDR",
            Svc::Inventory => "INVENTORY_HTTP_ADDR",
            Svc::PurchaseOrder => "PURCHASE_ORDER_HTTP_ADDR",
            Svc::Quote => "QUOTE_HTTP_ADDR",
            Svc::Email => "EMAIL_HTTP_ADDR",
            Svc::Pipeline => "PIPELINE_HTTP_ADDR",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Svc::Customer => 8081,
            Svc::Inventory => 8082,
            Svc::PurchaseOrder => 8083,
            Svc::Quote => 8084,
            Svc::Email => 8085,
            Svc::Pipeline => 8086,
        }
    }
}

/// The service whose log tells why a step failed: a context of the error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blame(pub(crate) Svc);

impl std::fmt::Display for Blame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.title())
    }
}

/// Blames a failure on a service, unless a step below blamed one already.
pub(crate) trait Blamed<T> {
    fn blame(self, svc: Svc) -> anyhow::Result<T>;
}

impl<T> Blamed<T> for anyhow::Result<T> {
    fn blame(self, svc: Svc) -> anyhow::Result<T> {
        self.map_err(|error| {
            if error.downcast_ref::<Blame>().is_some() {
                error
            } else {
                error.context(Blame(svc))
            }
        })
    }
}

/// A running service.
#[derive(Debug)]
struct Running {
    child: Child,
    pid: u32,
}

/// The services, where their binaries and logs are, and those that run.
#[derive(Debug)]
pub(crate) struct Fleet {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    pid_dir: Option<PathBuf>,
    addrs: HashMap<Svc, SocketAddr>,
    running: HashMap<Svc, Running>,
    /// Logs are truncated at a service's first start in this run, appended to after.
    started: Vec<Svc>,
    /// Each service's own credentials on the shared servers.
    principals: Principals,
    http: reqwest::Client,
}

impl Fleet {
    /// The fleet as the environment describes it: `SYSTEM_DEMO_BIN_DIR` (default
    /// `target/debug`), `SYSTEM_DEMO_LOG_DIR` (default `.dbps`), `SYSTEM_DEMO_PID_DIR`
    /// (none by default) and each service's `<NAME>_HTTP_ADDR`.
    pub(crate) fn from_env(http: reqwest::Client) -> anyhow::Result<Self> {
        let dir = |var: &str, default: &str| PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_owned()));
        let mut addrs = HashMap::new();
        for svc in Svc::ALL {
            let addr = match std::env::var(svc.addr_var()) {
                Ok(raw) if !raw.trim().is_empty() => raw
                    .trim()
                    .parse()
                    .with_context(|| format!("{}={raw:?} is not an address (host:port)", svc.addr_var()))?,
                _ => SocketAddr::from(([127, 0, 0, 1], svc.default_port())),
            };
            addrs.insert(svc, addr);
        }
        let fleet = Self {
            bin_dir: dir("SYSTEM_DEMO_BIN_DIR", "target/debug"),
            log_dir: dir("SYSTEM_DEMO_LOG_DIR", ".dbps"),
            pid_dir: std::env::var("SYSTEM_DEMO_PID_DIR").ok().map(PathBuf::from),
            addrs,
            running: HashMap::new(),
            started: Vec::new(),
            principals: Principals::default(),
            http,
        };
        for svc in Svc::ALL {
            let binary = fleet.bin_dir.join(svc.binary());
            if !binary.is_file() {
                bail!(
                    "{} is not built: {} is missing (cargo build -p example-{} --bins)",
                    svc.title(),
                    binary.display(),
                    svc.binary()
                );
            }
        }
        std::fs::create_dir_all(&fleet.log_dir).with_context(|| format!("creating {}", fleet.log_dir.display()))?;
        if let Some(dir) = &fleet.pid_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(fleet)
    }

    /// Provisions each service's own principals (see [`Principals`]); the services started
    /// from then on use them.
    pub(crate) async fn provision_principals(&mut self) -> anyhow::Result<()> {
        self.principals = Principals::provision().await?;
        Ok(())
    }

    /// The service's base URL.
    pub(crate) fn url(&self, svc: Svc) -> String {
        format!("http://{}", self.addrs[&svc])
    }

    /// The service's log file.
    pub(crate) fn log(&self, svc: Svc) -> PathBuf {
        self.log_dir.join(format!("{}.log", svc.binary()))
    }

    /// Fails, naming each, when something already listens on a service's port: a service
    /// left from an earlier run would answer in place of the one started now.
    pub(crate) fn check_ports(&self) -> anyhow::Result<()> {
        let mut taken = Vec::new();
        for svc in Svc::ALL {
            let addr = self.addrs[&svc];
            if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                taken.push(format!("  {:<23} {addr} is held by {}", svc.title(), holder(svc, addr)));
            }
        }
        if !taken.is_empty() {
            bail!("the address of a service is in use already:\n{}", taken.join("\n"));
        }
        Ok(())
    }

    /// Starts the service and waits until its `/health` answers 200.
    pub(crate) async fn start(&mut self, svc: Svc) -> anyhow::Result<()> {
        if self.running.contains_key(&svc) {
            bail!("the {} is running already", svc.title());
        }
        let addr = self.addrs[&svc];
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            bail!(
                "cannot start the {}: {addr} is held by {}",
                svc.title(),
                holder(svc, addr)
            );
        }
        self.spawn(svc).await.blame(svc)
    }

    async fn spawn(&mut self, svc: Svc) -> anyhow::Result<()> {
        let addr = self.addrs[&svc];
        let log_path = self.log(svc);
        let first = !self.started.contains(&svc);
        let mut log = open_log(&log_path, first)?;
        let again = if first { "" } else { " again" };
        writeln!(log, "---- system-demo: starting {}{again} on {addr} ----", svc.binary())?;
        let mut command = Command::new(self.bin_dir.join(svc.binary()));
        command
            .env(svc.addr_var(), addr.to_string())
            // The logs are files: no colour codes in them.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let peers: &[(&str, Svc)] = match svc {
            Svc::Quote => &[
                ("QUOTE_CUSTOMER_URL", Svc::Customer),
                ("QUOTE_INVENTORY_URL", Svc::Inventory),
            ],
            Svc::Email => &[("EMAIL_CUSTOMER_URL", Svc::Customer)],
            _ => &[],
        };
        for (var, peer) in peers {
            if std::env::var(var).is_err() {
                command.env(var, self.url(*peer));
            }
        }
        // The customer service's search and the pipeline's quotes index run on the stack's
        // OpenSearch unless told otherwise.
        if matches!(svc, Svc::Customer | Svc::Pipeline) && std::env::var("DBPS_OPENSEARCH_URL").is_err() {
            command.env("DBPS_OPENSEARCH_URL", DEFAULT_OPENSEARCH_URL);
        }
        // The email service sends to the stack's SMTP server unless told otherwise.
        if svc == Svc::Email
            && std::env::var("EMAIL_SMTP_URL").is_err()
            && let Ok(smtp) = std::env::var("DBPS_SMTP_URL")
        {
            command.env("EMAIL_SMTP_URL", smtp);
        }
        // Its own principals on Kafka, Redis and PostgreSQL over TLS, when provisioned;
        // the administrators' credentials stay with the narrator.
        if !self.principals.env(svc).is_empty() {
            for var in crate::principals::ADMIN_VARS {
                command.env_remove(var);
            }
        }
        for (var, value) in self.principals.env(svc) {
            command.env(var, value);
        }
        let started_at = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.bin_dir.join(svc.binary()).display()))?;
        let pid = child.id().context("the started service has no pid")?;
        if first {
            self.started.push(svc);
        }
        self.write_pid(svc, Some(pid));
        self.running.insert(svc, Running { child, pid });
        self.wait_healthy(svc).await?;
        out::action(
            "start",
            &format!("{} (pid {pid})", svc.title()),
            &format!(
                "healthy at {}/health after {}",
                self.url(svc),
                out::secs(started_at.elapsed())
            ),
        );
        Ok(())
    }

    async fn wait_healthy(&mut self, svc: Svc) -> anyhow::Result<()> {
        let url = format!("{}/health", self.url(svc));
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let running = self.running.get_mut(&svc).context("the service is not running")?;
            if let Some(status) = running.child.try_wait()? {
                self.running.remove(&svc);
                self.write_pid(svc, None);
                bail!(
                    "the {} exited while starting ({status}); see {}",
                    svc.title(),
                    self.log(svc).display()
                );
            }
            if let Ok(response) = self.http.get(&url).timeout(Duration::from_secs(2)).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} did not answer {url} with 200 within {} s",
                    svc.title(),
                    START_DEADLINE.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the service: SIGTERM (the `kill` command), then waits for it to exit; kills it
    /// if it has not within the deadline.
    pub(crate) async fn stop(&mut self, svc: Svc) -> anyhow::Result<()> {
        self.terminate(svc).await.blame(svc)
    }

    async fn terminate(&mut self, svc: Svc) -> anyhow::Result<()> {
        let Some(mut running) = self.running.remove(&svc) else {
            return Ok(());
        };
        let started_at = Instant::now();
        let signalled = Command::new("kill")
            .args(["-TERM", &running.pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .await;
        let result = match tokio::time::timeout(STOP_DEADLINE, running.child.wait()).await {
            Ok(Ok(status)) => {
                let how = if status.success() {
                    String::from("exited cleanly")
                } else {
                    format!("exited with {status}")
                };
                out::action(
                    "stop",
                    &format!("{} (pid {})", svc.title(), running.pid),
                    &format!("SIGTERM, {how} after {}", out::secs(started_at.elapsed())),
                );
                match signalled {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(anyhow::anyhow!("kill -TERM {} failed ({s})", running.pid)),
                    Err(e) => Err(anyhow::anyhow!("cannot run kill: {e}")),
                }
            }
            Ok(Err(error)) => Err(anyhow::anyhow!("waiting for the {}: {error}", svc.title())),
            Err(_) => {
                let _ = running.child.start_kill();
                let _ = running.child.wait().await;
                Err(anyhow::anyhow!(
                    "the {} did not stop within {} s of SIGTERM and was killed",
                    svc.title(),
                    STOP_DEADLINE.as_secs()
                ))
            }
        };
        self.write_pid(svc, None);
        result
    }

    /// Stops every running service, in the reverse order of their start (the email
    /// service first); returns the first failure.
    pub(crate) async fn stop_all(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        for svc in Svc::ALL.into_iter().rev() {
            if let Err(error) = self.stop(svc).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Records the pid of a running service where `scripts/demo.sh` finds it, should this
    /// process die without stopping its children.
    fn write_pid(&self, svc: Svc, pid: Option<u32>) {
        let Some(dir) = &self.pid_dir else { return };
        let path = dir.join(format!("{}.pid", svc.binary()));
        let _ = match pid {
            Some(pid) => std::fs::write(&path, format!("{pid}\n")),
            None => std::fs::remove_file(&path),
        };
    }
}

fn open_log(path: &Path, truncate: bool) -> anyhow::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true);
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    options
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Who listens on the service's address, as far as `ss` can tell, and what to do about it.
fn holder(svc: Svc, addr: SocketAddr) -> String {
    let elsewhere = format!(
        "free it, or give the {} another address with {}",
        svc.title(),
        svc.addr_var()
    );
    let listed = std::process::Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{}", addr.port())])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let pid = listed.ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let at = text.find("pid=")? + 4;
        text[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|p| p.parse::<u32>().ok())
    });
    let Some(pid) = pid else {
        return format!("another process: {elsewhere}");
    };
    let command = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let program = command.split(' ').next().unwrap_or_default();
    if Svc::ALL.iter().any(|s| program.ends_with(s.binary())) {
        format!("pid {pid} ({command}), a service left running by an earlier run: stop it with `kill {pid}`")
    } else {
        format!("pid {pid} ({command}): {elsewhere}")
    }
}
