//! `system-demo`: the dbps example system as six processes, its flows narrated.
//!
//! It gives each service its own principals where the stack's secured endpoints are
//! configured (a Kafka SCRAM user with ACLs for exactly its topics and groups, the
//! inventory service a Redis ACL user, PostgreSQL over TLS; a forged event from the quote
//! service is shown refused), starts the customer, inventory, purchase-order, quote and
//! pipeline services (each a process on its own PostgreSQL database, provisioned and
//! migrated at start) and the email service (on its own MongoDB database, migrated at
//! start), waits for each `/health`,
//! subscribes to the topics they talk over and walks through the ADR's flows: customers
//! reaching the quote service's replica and the email service's address index, an email
//! assigned to its customer by its sender, an email assigned late when its customer
//! appears, products and the Redis stock check, a quote that reserves its stock, an order
//! placed by a saga, a quote out of stock and the sales rep's email (read back from
//! Mailpit), a rejected purchase order, the purchase-order service down while a quote is
//! accepted, a rename and an address change reaching the replicas, a customer search on
//! the customer service's OpenSearch projection, the pipeline service's reports across
//! services (checked against what the run did), and the circuit breaker in front of the
//! customer service. It prints each HTTP call and each message of the run
//! on Kafka under the flow that caused it, stops and starts services as the flows need,
//! and ends with a check that the numbers add up. It exits 0 when every check passed, 1
//! otherwise, and stops every service it started in either case (also on Ctrl-C or
//! SIGTERM).
//!
//! Run it with `scripts/demo.sh`, which brings up the local stack, builds the binaries and
//! sets the environment:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DBPS_KAFKA_BROKERS` | Kafka, for the narrator (and the services without principals) | required |
//! | `DBPS_KAFKA_SECURE_BROKERS`, `DBPS_KAFKA_ADMIN_USER`, `DBPS_KAFKA_ADMIN_PASSWORD`, `DBPS_TLS_CA_FILE` | the SASL_SSL listener and its administrator: each service gets its own principal | none: every service on `DBPS_KAFKA_BROKERS` |
//! | `DBPS_REDIS_ADMIN_USER`, `DBPS_REDIS_ADMIN_PASSWORD`, `DBPS_REDIS_TLS_URL` | the inventory service's own Redis user, over TLS | none |
//! | `DBPS_POSTGRES_TLS_URL` | the services' PostgreSQL URL with `sslmode=verify-full` | `DBPS_POSTGRES_URL` |
//! | `DBPS_MAILPIT_URL` | Mailpit's HTTP API, where the narrator reads the mail that arrived | `http://127.0.0.1:28025` |
//! | `SYSTEM_DEMO_BIN_DIR` | where the service binaries are | `target/debug` |
//! | `SYSTEM_DEMO_LOG_DIR` | where each service's log goes (`<binary>.log`) | `.dbps` |
//! | `SYSTEM_DEMO_PID_DIR` | where the pids of running services are kept | none |
//! | `SYSTEM_DEMO_BLAME_FILE` | written on failure: the log of the service to look at | none |
//! | `<NAME>_HTTP_ADDR` | each service's address (`CUSTOMER`, `INVENTORY`, `PURCHASE_ORDER`, `QUOTE`, `EMAIL`, `PIPELINE`) | `127.0.0.1:8081` to `8086` |
//!
//! The services take the rest of their configuration from the same environment (their
//! database passwords, `DBPS_POSTGRES_URL`, `DBPS_REDIS_URL`, `DBPS_MONGODB_URI`,
//! `QUOTE_CUSTOMER_URL`, `QUOTE_ORDER_STEP_TIMEOUT_SECS`, `EMAIL_CUSTOMER_URL`,
//! `EMAIL_SMTP_URL`, ...); the narrator gives the quote and email services the customer
//! service's URL, and the email service the stack's SMTP server (`DBPS_SMTP_URL`), where the
//! environment names none. Every run makes its own customers, products and emails (their
//! names, addresses and `Message-ID`s carry the run's id) and its own sales rep address, so
//! it can run again on the same databases, topics and Mailpit.
#![allow(clippy::print_stdout)] // A demo talks to its user on standard output.

mod events;
mod flows;
mod mailpit;
mod out;
mod principals;
mod services;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::events::Watcher;
use crate::flows::Demo;
use crate::services::{Blame, Fleet, Svc};

#[tokio::main]
async fn main() -> ExitCode {
    let started = Instant::now();
    let http = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(http) => http,
        Err(error) => return fail(&anyhow::Error::new(error), None),
    };
    let mut fleet = match Fleet::from_env(http.clone()).and_then(|fleet| fleet.check_ports().map(|()| fleet)) {
        Ok(fleet) => fleet,
        Err(error) => return fail(&error, None),
    };
    // A UUIDv7 ends in random bits.
    let run = uuid::Uuid::now_v7().simple().to_string()[26..].to_owned();
    println!("dbps example system: six services, each a process on its own database (run {run})");

    let outcome = tokio::select! {
        result = narrate(&mut fleet, http, &run) => result,
        signal = interrupted() => Err(anyhow::Error::new(signal)),
    };
    out::heading("Stopping the services");
    let stopped = fleet.stop_all().await;
    match outcome.and(stopped) {
        Ok(()) => {
            println!("the demo ran in {}", out::secs(started.elapsed()));
            ExitCode::SUCCESS
        }
        Err(error) => match error.downcast_ref::<Interrupted>() {
            Some(signal) => {
                eprintln!();
                eprintln!("the demo was {signal}; its services are stopped");
                ExitCode::from(signal.exit_code())
            }
            None => {
                let log = error.downcast_ref::<Blame>().map(|blame| fleet.log(blame.0));
                fail(&error, log)
            }
        },
    }
}

/// Starts the services and the watcher, then runs the flows.
async fn narrate(fleet: &mut Fleet, http: reqwest::Client, run: &str) -> anyhow::Result<()> {
    let brokers = std::env::var("DBPS_KAFKA_BROKERS").context("DBPS_KAFKA_BROKERS is not set")?;
    out::heading("Each service's own principal on Kafka and Redis");
    fleet.provision_principals().await?;
    out::heading("Starting the services");
    for svc in Svc::ALL {
        fleet.start(svc).await?;
    }
    let events = Watcher::start(&brokers, &format!("system-demo-{run}"), &events::topics()?).await?;
    Demo::new(fleet, events, http, run.to_owned()).run().await
}

/// The signal that ended the demo early.
#[derive(Debug, Clone, Copy)]
enum Interrupted {
    /// Ctrl-C.
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Interrupted {
    /// What a shell reports for a process ended by the signal.
    fn exit_code(self) -> u8 {
        match self {
            Interrupted::Interrupt => 130,
            Interrupted::Terminate => 143,
        }
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interrupted::Interrupt => "interrupted (Ctrl-C)",
            Interrupted::Terminate => "terminated (SIGTERM)",
        })
    }
}

impl std::error::Error for Interrupted {}

/// Resolves when Ctrl-C or SIGTERM arrives.
async fn interrupted() -> Interrupted {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return Interrupted::Interrupt;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Interrupted::Interrupt,
        _ = term.recv() => Interrupted::Terminate,
    }
}

/// Says what failed (and where to look), and exits 1.
fn fail(error: &anyhow::Error, log: Option<std::path::PathBuf>) -> ExitCode {
    let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
    eprintln!();
    eprintln!("demo failed: {}", chain.join(": "));
    if let Some(log) = log {
        eprintln!("the log to look at: {}", log.display());
        if let Ok(file) = std::env::var("SYSTEM_DEMO_BLAME_FILE") {
            let _ = std::fs::write(file, format!("{}\n", log.display()));
        }
    }
    ExitCode::FAILURE
}
