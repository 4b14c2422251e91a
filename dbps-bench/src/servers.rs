//! The servers the harness measures against, and the scratch database and topics it
//! creates on them and removes afterwards.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use dbps_core::kafka::{KafkaConfig, TopicSpec, ensure_topics};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};

/// Where PostgreSQL and Kafka are, from the `DBPS_*` variables.
#[derive(Debug, Clone)]
pub(crate) struct Servers {
    /// An administrative role on the server (allowed to create databases), connected to
    /// the database the URL names.
    pub(crate) admin: PgConnectOptions,
    /// Kafka's bootstrap servers.
    pub(crate) brokers: String,
}

impl Servers {
    /// Reads `DBPS_POSTGRES_URL` and `DBPS_KAFKA_BROKERS`.
    pub(crate) fn from_env() -> anyhow::Result<Self> {
        let url = env_var("DBPS_POSTGRES_URL")?;
        // The parser's message may quote the URL, password included; it is not shown.
        let admin = PgConnectOptions::from_str(&url)
            .map_err(|_| anyhow!("DBPS_POSTGRES_URL is not a valid PostgreSQL connection URL"))?
            .disable_statement_logging();
        let brokers = env_var("DBPS_KAFKA_BROKERS")?;
        Ok(Self { admin, brokers })
    }
}

/// A `DBPS_*` variable of the local stack, trimmed; an error that says how to set it
/// when it is missing or empty.
pub(crate) fn env_var(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "{name} is not set: start the local stack and export its variables: \
                 scripts/stack.sh up && eval \"$(scripts/stack.sh env)\""
            )
        })
}

/// A name suffix for the scratch resources of one run: the last 12 hex digits of a
/// UUIDv7, so that runs (and their leftovers) never collide.
pub(crate) fn run_suffix() -> String {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    suffix[suffix.len() - 12..].to_owned()
}

/// The two topics of a run, removed by [`Topics::remove`].
#[derive(Debug)]
pub(crate) struct Topics {
    /// The topic the outbox publishes to.
    pub(crate) events: String,
    /// The topic the raw producer baseline publishes to.
    pub(crate) raw: String,
    /// The dead-letter topic of the scenarios' consumer runners (one partition).
    pub(crate) dead_letters: String,
    brokers: String,
}

impl Topics {
    /// Creates the topics, `partitions` partitions each (the dead-letter topic one).
    pub(crate) async fn create(brokers: &str, suffix: &str, partitions: i32) -> anyhow::Result<Self> {
        let topics = Self {
            events: format!("dbps-bench-{suffix}.order.events"),
            raw: format!("dbps-bench-{suffix}.raw"),
            dead_letters: format!("dbps-bench-{suffix}.dlq"),
            brokers: brokers.to_owned(),
        };
        let specs = [
            TopicSpec::new(&topics.events, partitions),
            TopicSpec::new(&topics.raw, partitions),
            TopicSpec::new(&topics.dead_letters, 1),
        ];
        if let Err(error) = ensure_topics(&KafkaConfig::new(brokers), &specs).await {
            topics.remove().await;
            return Err(anyhow::Error::new(error).context("creating the benchmark topics (DBPS_KAFKA_BROKERS)"));
        }
        Ok(topics)
    }

    /// Deletes the topics. Failures are reported, not returned: the measurement is
    /// already done.
    pub(crate) async fn remove(&self) {
        delete_topics(&self.brokers, &[&self.events, &self.raw, &self.dead_letters]).await;
    }
}

/// Deletes `topics`. Failures are reported, not returned: the measurement is already done.
pub(crate) async fn delete_topics(brokers: &str, topics: &[&str]) {
    let delete = async {
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin.delete_topics(topics, &options).await? {
            if let Err((topic, code)) = result {
                eprintln!("warning: could not delete topic {topic}: {code}");
            }
        }
        Ok::<_, rdkafka::error::KafkaError>(())
    };
    if let Err(error) = delete.await {
        eprintln!("warning: could not delete the benchmark topics: {error}");
    }
}

/// A database and topics of this run, removed by [`Scratch::remove`].
#[derive(Debug)]
pub(crate) struct Scratch {
    /// The database's name.
    pub(crate) database: String,
    /// Connection options for the scratch database (same role as the admin URL).
    pub(crate) options: PgConnectOptions,
    pub(crate) topics: Topics,
    servers: Servers,
}

impl Scratch {
    /// Creates the database and the two topics (`partitions` partitions each).
    pub(crate) async fn create(servers: &Servers, partitions: i32) -> anyhow::Result<Self> {
        let suffix = run_suffix();
        let database = format!("dbps_bench_{suffix}");
        let mut conn = servers
            .admin
            .connect()
            .await
            .context("connecting to PostgreSQL (DBPS_POSTGRES_URL)")?;
        // The name is generated above from hex digits, so quoting it is enough.
        conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(r#"CREATE DATABASE "{database}""#))))
            .await
            .with_context(|| format!("creating database {database}"))?;
        conn.close().await?;
        let topics = match Topics::create(&servers.brokers, &suffix, partitions).await {
            Ok(topics) => topics,
            Err(error) => {
                drop_database(servers, &database).await;
                return Err(error);
            }
        };
        Ok(Self {
            options: servers.admin.clone().database(&database),
            topics,
            database,
            servers: servers.clone(),
        })
    }

    /// A pool of at most `size` connections to the scratch database, its connections
    /// named `application` (so that `pg_stat_activity` tells them apart).
    pub(crate) async fn pool(&self, size: u32, application: &str) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.options.clone().application_name(application))
            .await
            .with_context(|| format!("connecting to {}", self.database))
    }

    /// Drops the database (ending any connection still open to it) and deletes the
    /// topics. Failures are reported, not returned: the measurement is already done.
    pub(crate) async fn remove(&self) {
        drop_database(&self.servers, &self.database).await;
        self.topics.remove().await;
    }
}

/// Drops `database`, ending any connection still open to it; failures are reported.
async fn drop_database(servers: &Servers, database: &str) {
    let drop_database = async {
        let mut conn = servers.admin.connect().await?;
        conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
            r#"DROP DATABASE IF EXISTS "{database}" WITH (FORCE)"#
        ))))
        .await?;
        conn.close().await
    };
    if let Err(error) = drop_database.await {
        eprintln!("warning: could not drop database {database}: {error}");
    }
}

/// The commit the harness was built from, `-dirty` when the working tree has changes.
pub(crate) fn git_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty { format!("{commit}-dirty") } else { commit }
        }
        None => String::from("unknown"),
    }
}
