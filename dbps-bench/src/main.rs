//! `dbps-bench`: dbps measured beside its baselines, in the same run, against the real
//! servers of the local stack.
//!
//! ```sh
//! eval "$(scripts/stack.sh env)"
//! cargo run --release -p dbps-bench -- outbox [--duration 20s] [--json PATH] [--chart PATH]
//! cargo run --release -p dbps-bench -- outbox-soak [--duration 20m] [--interval 60s] [--json PATH]
//! cargo run --release -p dbps-bench -- outbox-mongo [--duration 20s] [--json PATH]
//! cargo run --release -p dbps-bench -- cache [--duration 20s] [--json PATH]
//! cargo run --release -p dbps-bench -- replica [--duration 20s] [--json PATH]
//! cargo run --release -p dbps-bench -- saga [--duration 20s] [--json PATH]
//! cargo run --release -p dbps-bench -- projection [--backlog 100000] [--rebuild-events 1000000] [--json PATH]
//! ```
//!
//! The machines dbps is developed on are small and shared, so absolute figures drift from
//! run to run; every figure is therefore taken next to a baseline measured in the same
//! run, and the targets are ratios. The method is described in `docs/benchmarks.md`.
//!
//! The harness reads `DBPS_POSTGRES_URL` (or `DBPS_MONGODB_URI`), `DBPS_KAFKA_BROKERS` (and,
//! for `projection`, `DBPS_OPENSEARCH_URL`), creates a database and
//! topics of its own and removes them when it ends, also when it fails. It exits with 0
//! when the measurement completed (whether or not the targets were met) and non-zero
//! when the harness itself failed.

// The result table on stdout is this program's output; progress goes to stderr.
#![allow(clippy::print_stdout)]

mod baseline;
mod cache;
mod chart;
mod cpu;
mod observer;
mod outbox;
mod outbox_mongo;
mod outbox_soak;
mod probes;
mod progress;
mod projection;
mod replica;
mod report;
mod saga;
mod servers;
mod workload;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Benchmarks for dbps, each figure beside a baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "dbps-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// The PostgreSQL outbox: write overhead, relay drain rate, commit → consumer latency
    /// and idle cost, beside a business transaction without the outbox, a raw Kafka
    /// producer and the server's raw commit rate.
    Outbox(outbox::Args),
    /// The PostgreSQL outbox under a steady load (half the maximum write rate, relay
    /// running) for 20 minutes: commit → consumer latency, and the outbox table's and
    /// indexes' size, per minute.
    OutboxSoak(outbox_soak::Args),
    /// The MongoDB outbox: relay drain rate and write → consumer latency beside the
    /// server's raw insert rate, and the cost of writing events with inserts and updates.
    OutboxMongo(outbox_mongo::Args),
    /// dbps-cache's Redis pieces: cache-aside hit reads beside plain `GET`s, the hit ratio
    /// under a Zipf key distribution, invalidation → fresh read, and rate-limiter decisions
    /// beside a no-op `EVALSHA`.
    Cache(cache::Args),
    /// dbps-cache's PostgreSQL replica: the apply rate from a backlog beside the same
    /// runner writing nothing, commit → replica row latency beside the outbox's own commit
    /// → consumer latency, and the reconciler over 100k records.
    Replica(replica::Args),
    /// dbps-saga: three-step sagas through real participants on Kafka, completed and state
    /// transitions per second beside the server's raw commit rate, start → completed
    /// latency at a quarter and half of that rate, and the idle scanner's queries.
    Saga(saga::Args),
    /// dbps-cache's projections: rebuilds from a topic's history into PostgreSQL and into
    /// OpenSearch (bulk), in events per second beside a consumer that writes nothing, and
    /// the time to rebuild from a million events.
    Projection(projection::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Outbox(args) => outbox::run(args).await,
        Scenario::OutboxSoak(args) => outbox_soak::run(args).await,
        Scenario::OutboxMongo(args) => outbox_mongo::run(args).await,
        Scenario::Cache(args) => cache::run(args).await,
        Scenario::Replica(args) => replica::run(args).await,
        Scenario::Saga(args) => saga::run(args).await,
        Scenario::Projection(args) => projection::run(args).await,
    }
}
