//! `pipeline-service`: the reporting pipeline as a process.
//!
//! ```text
//! pipeline-service [serve]                 serve the reports and keep the warehouse current
//! pipeline-service rebuild [--version N]   rebuild the warehouse from the topics' history
//!                                          into version N (default: the serving one + 1)
//!                                          and switch its views, then exit
//! ```
//!
//! Configuration comes from the environment (see `dbps_service::ServiceConfig`):
//! `DBPS_POSTGRES_URL`, `DBPS_KAFKA_BROKERS`, `PIPELINE_DB_OWNER_PASSWORD`,
//! `PIPELINE_DB_RUNTIME_PASSWORD`, `PIPELINE_HTTP_ADDR` (default `127.0.0.1:8080`; the
//! example system runs it on `127.0.0.1:8086`), `DBPS_TOPIC_PREFIX`; and
//! `PIPELINE_CUSTOMER_SERVICE`, `PIPELINE_QUOTE_SERVICE`, `PIPELINE_INVENTORY_SERVICE`
//! (the services followed, default `customer`, `quote`, `inventory`) and
//! `PIPELINE_WAREHOUSE_VERSION` (the least version served, default 1); with
//! `DBPS_OPENSEARCH_URL` set, the quotes index is kept there too (names prefixed
//! `PIPELINE_SEARCH_INDEX_PREFIX`, default `pipeline-`) and rebuilt with the tables.
//! Logs go to standard error, filtered by `RUST_LOG` or `dbps_service::DEFAULT_LOG_FILTER`;
//! the rebuild's progress and result go to standard output. SIGTERM or Ctrl-C stops
//! either cleanly (a stopped rebuild resumes where it stopped when run again).

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Mutex;

use dbps_service::{Service, ServiceConfig};
use example_pipeline_service::{App, SERVICE, Settings};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: pipeline-service [serve] | pipeline-service rebuild [--version N]";

/// What the command line asks.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Serve,
    Rebuild { version: Option<u32> },
    Help,
}

fn parse(args: &[String]) -> Result<Command, String> {
    match args {
        [] => Ok(Command::Serve),
        [serve] if serve == "serve" => Ok(Command::Serve),
        [help] if help == "help" || help == "--help" || help == "-h" => Ok(Command::Help),
        [rebuild, rest @ ..] if rebuild == "rebuild" => {
            let version = match rest {
                [] => None,
                [flag, version] if flag == "--version" => Some(version.as_str()),
                [flag] if flag.starts_with("--version=") => flag.strip_prefix("--version="),
                _ => return Err(format!("unexpected arguments {rest:?}\n{USAGE}")),
            };
            let version = version
                .map(|v| {
                    v.parse::<u32>()
                        .ok()
                        .filter(|v| (1..=i32::MAX.unsigned_abs()).contains(v))
                        .ok_or_else(|| format!("--version {v:?} is not a version (1, 2, ...)"))
                })
                .transpose()?;
            Ok(Command::Rebuild { version })
        }
        _ => Err(format!("unexpected arguments {args:?}\n{USAGE}")),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = parse(&args)?;
    if command == Command::Help {
        writeln!(std::io::stdout().lock(), "{USAGE}")?;
        return Ok(());
    }
    dbps_service::init_tracing();
    let config = ServiceConfig::from_env(SERVICE)?;
    let settings = Settings::from_env(&config)?;
    let mut service = Service::new(config);
    match command {
        Command::Rebuild { version } => rebuild(&service, &settings, version).await,
        Command::Serve | Command::Help => {
            let app = App::start(&mut service, settings).await?;
            service.serve(app.router()).await?;
            Ok(())
        }
    }
}

/// Rebuilds every table into `version`, printing each table's progress by tenths.
async fn rebuild(service: &Service, settings: &Settings, version: Option<u32>) -> Result<(), BoxError> {
    let (_, warehouse) = example_pipeline_service::prepare(service, settings).await?;
    let shown: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    let warehouse = warehouse.on_progress(move |table, progress| {
        let tenth = (progress.fraction() * 10.0).floor() as u64;
        let mut shown = shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if shown.get(table).is_some_and(|t| *t >= tenth) {
            return;
        }
        shown.insert(table.to_owned(), tenth);
        let _ = writeln!(
            std::io::stdout().lock(),
            "{table:<18} v{}: {:>3}% ({} of {} records)",
            progress.version,
            tenth * 10,
            progress.replayed,
            progress.total
        );
    });
    let version = match version {
        Some(version) => version,
        None => warehouse.next_version().await?,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "rebuilding the warehouse into version {version}")?;
    drop(out);
    let summary = warehouse
        .rebuild(service.kafka()?, Some(version), &service.shutdown_token())
        .await?;
    let mut out = std::io::stdout().lock();
    for table in &summary.tables {
        let outcome = match (table.report.switched, table.report.previous) {
            (true, Some(previous)) => format!("switched from v{previous}"),
            (true, None) => String::from("switched (first version)"),
            (false, Some(previous)) if previous >= version => format!("not switched: v{previous} serves already"),
            (false, _) => String::from("not switched: stopped before the switch (run again to resume)"),
        };
        writeln!(
            out,
            "{:<18} v{}: {} records replayed, {outcome}",
            table.table, summary.version, table.report.replayed
        )?;
    }
    if !summary.switched() {
        return Err("the rebuild did not switch every table".into());
    }
    writeln!(out, "the warehouse serves version {version}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn commands() {
        assert_eq!(parse(&args(&[])), Ok(Command::Serve));
        assert_eq!(parse(&args(&["serve"])), Ok(Command::Serve));
        assert_eq!(parse(&args(&["rebuild"])), Ok(Command::Rebuild { version: None }));
        assert_eq!(
            parse(&args(&["rebuild", "--version", "3"])),
            Ok(Command::Rebuild { version: Some(3) })
        );
        assert_eq!(
            parse(&args(&["rebuild", "--version=2"])),
            Ok(Command::Rebuild { version: Some(2) })
        );
        assert!(parse(&args(&["rebuild", "--version", "0"])).is_err());
        assert!(parse(&args(&["rebuild", "--version"])).is_err());
        assert!(parse(&args(&["serve", "now"])).is_err());
        assert_eq!(parse(&args(&["--help"])), Ok(Command::Help));
    }
}
