//! `dbps-chaos`: fault injection against the real stack, and an independent count of
//! what was lost, duplicated or reordered.
//!
//! ```text
//! eval "$(scripts/stack.sh env)"
//! cargo run --release -p dbps-chaos -- <scenario> [--json PATH] [--seed N]
//! ```
//!
//! | scenario | fault | must show |
//! |---|---|---|
//! | `relay-kill` | relay processes killed with SIGKILL at random moments and restarted | nothing lost, order kept |
//! | `mongo-relay-kill` | the same, for the MongoDB outbox (writers write through `MongoOutbox`) | nothing lost, order kept |
//! | `gap` | 32 concurrent writers, 10 % waiting 0–2 s before COMMIT, 1 % rolling back | nothing lost, order kept, no rolled-back event published |
//! | `consumer-kill` | consumer-group members killed with SIGKILL at random moments | every effect applied exactly once |
//! | `broker-restart` | the Kafka broker stopped and started under load | nothing lost, the relay resumes by itself |
//! | `poison` | one oversize or malformed record per 10,000 | every one parked or dead-lettered, healthy keys unaffected |
//! | `replica` | `PgReplica` consumers killed with SIGKILL at random; 8 % of the events published again late, out of order, including old updates of deleted customers | every replica row equal to its source row, no record going back in time, no deleted record coming back |
//! | `pg-restart` | PostgreSQL stopped (fast and immediate shutdowns) and started ≥ 10 times under load | nothing lost, order kept, relays and consumers recover by themselves |
//! | `net-reset` | TCP resets on relay ↔ PostgreSQL, relay ↔ Kafka and consumer ↔ PostgreSQL connections (Toxiproxy) | nothing lost, order kept, leases move |
//! | `net-latency` | 200 ± 100 ms on relay ↔ Kafka and writer ↔ PostgreSQL for periods (Toxiproxy) | nothing lost, order kept, latency back within seconds |
//! | `half-open` | connections that stop answering without closing (Toxiproxy's `timeout` toxic) | every component notices by its own timeouts, nothing hangs |
//! | `saga-kill` | 10,000 sagas (70 % complete, 20 % refused at step 2, 10 % unanswered at step 3) while the saga orchestrator, its participants and the relays are killed with SIGKILL at random | every saga completed or compensated, each effect applied once, nothing left behind by a compensated saga, no transition twice |
//!
//! Writers, relays and consumers run as separate processes of this executable (the
//! hidden `worker` subcommand), so they can be killed for real. Writers commit one event
//! per transaction through `PgOutbox` together with a business row (`committed_events`);
//! relays run `dbps_outbox::Relay`; consumers run `ConsumerRunner` with `PgInbox` in a
//! database of their own. When the load is over and the system has settled, a checker
//! that uses none of the code under test reads the databases with SQL and the topics with
//! its own Kafka consumer, counts, prints a table and, with `--json`, writes the counts.
//! The exit status is 0 when every count that must be zero is zero, 1 when one is not,
//! and 2 when the harness itself could not run.

// A command-line tool: the progress lines and the results table go to stdout on purpose.
#![allow(clippy::print_stdout)]

mod checker;
mod model;
mod procs;
mod replica;
mod report;
mod saga;
mod saga_check;
mod saga_run;
mod scenarios;
mod stack;
mod toxiproxy;
mod workers;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::scenarios::{Scenario, ScenarioArgs};

/// Fault injection that proves nothing is lost.
#[derive(Debug, Parser)]
#[command(name = "dbps-chaos", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Kill relay processes with SIGKILL at random moments under load (at least 20 kills).
    RelayKill(ScenarioArgs),
    /// Relay-kill for the MongoDB outbox: writers write through `MongoOutbox`, the relays
    /// relay `MongoOutboxStore`, and relays are killed at random (at least 20 kills).
    MongoRelayKill(ScenarioArgs),
    /// 32 concurrent writers, 10 % waiting 0–2 s before COMMIT, 1 % rolling back.
    Gap(ScenarioArgs),
    /// Kill consumer-group members with SIGKILL at random moments (at least 20 kills).
    ConsumerKill(ScenarioArgs),
    /// Stop and start the Kafka broker under load (through scripts/stack.sh).
    BrokerRestart(ScenarioArgs),
    /// One oversize or malformed record per 10,000.
    Poison(ScenarioArgs),
    /// Replicas kept by events (`PgReplica`): consumers killed with SIGKILL at random (at
    /// least 20 kills), 8 % of the events published again out of order.
    Replica(ScenarioArgs),
    /// Sagas (`dbps-saga`) with a mix of outcomes while the orchestrator, the participants
    /// and the relays are killed with SIGKILL at random (at least 20 kills). `--events` is
    /// the number of sagas, `--seconds` how long they are started over.
    SagaKill(ScenarioArgs),
    /// Stop PostgreSQL (fast and immediate shutdowns in turn) and start it again under load,
    /// at least 10 times, with two relays and a consumer running (through
    /// scripts/stack.sh; it stops FerretDB too and starts it again at the end).
    PgRestart(ScenarioArgs),
    /// Reset (TCP RST) the relays' and the consumers' connections to PostgreSQL and the
    /// relays' to Kafka at random, through Toxiproxy (at least 30 resets).
    NetReset(ScenarioArgs),
    /// Add 200 ms ± 100 ms to the relays' Kafka connections and the writers' PostgreSQL
    /// connections for periods, through Toxiproxy (at least 10 periods).
    NetLatency(ScenarioArgs),
    /// Turn connections half-open (nothing passes, nothing closes) for 12-16 s, through
    /// Toxiproxy: each component must notice by its own timeouts (at least 10 faults).
    HalfOpen(ScenarioArgs),
    /// A process of a scenario (started by the scenarios themselves).
    #[command(hide = true)]
    Worker {
        #[command(subcommand)]
        role: workers::Role,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dbps-chaos: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let (scenario, args) = match cli.command {
        Command::Worker { role } => {
            init_tracing("info");
            return match runtime.block_on(workers::run(role)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("worker failed: {error:#}");
                    ExitCode::from(1)
                }
            };
        }
        Command::RelayKill(args) => (Scenario::RelayKill, args),
        Command::MongoRelayKill(args) => (Scenario::MongoRelayKill, args),
        Command::Gap(args) => (Scenario::Gap, args),
        Command::ConsumerKill(args) => (Scenario::ConsumerKill, args),
        Command::BrokerRestart(args) => (Scenario::BrokerRestart, args),
        Command::Poison(args) => (Scenario::Poison, args),
        Command::Replica(args) => (Scenario::Replica, args),
        Command::PgRestart(args) => (Scenario::PgRestart, args),
        Command::NetReset(args) => (Scenario::NetReset, args),
        Command::NetLatency(args) => (Scenario::NetLatency, args),
        Command::HalfOpen(args) => (Scenario::HalfOpen, args),
        Command::SagaKill(args) => {
            init_tracing("warn");
            return exit_code(runtime.block_on(saga_run::run(args)));
        }
    };
    init_tracing("warn");
    exit_code(runtime.block_on(scenarios::run(scenario, args)))
}

/// 0 when the scenario passed, 1 when a count that must be zero is not, 2 when the harness
/// could not run.
fn exit_code(outcome: anyhow::Result<bool>) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("dbps-chaos: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
