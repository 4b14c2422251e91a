//! `dbps-migrate`: provisions and migrates the PostgreSQL database of one dbps service, and
//! provisions its principals on Kafka and Redis.
//!
//! ```text
//! dbps-migrate provision --service customer            # database, schemas, roles, grants
//! dbps-migrate status    --service customer --migrations migrations --check
//! dbps-migrate up        --service customer --migrations migrations [--dry-run]
//! dbps-migrate kafka-access --service quote --consumes customer.customer.events \
//!              --produces inventory.commands --password-file /run/secrets/quote-kafka
//! dbps-migrate redis-access --service inventory --password-file /run/secrets/inventory-redis
//! ```
//!
//! `kafka-access` is [`KafkaAccess::provision`] (or `revoke` with `--revoke`), through an
//! administrator's connection: `DBPS_KAFKA_BROKERS` and the `DBPS_KAFKA_*` security
//! variables (`scripts/stack.sh env --secure` prints them for the local stack), or
//! `--admin-property KEY=VALUE`. The service's own password comes from
//! `--password-file` or `DBPS_KAFKA_SERVICE_PASSWORD`. `redis-access` is
//! [`RedisAccess::provision`] through `DBPS_REDIS_URL` (a user that may run `ACL`), with
//! `DBPS_TLS_CA_FILE` for a `rediss://` server signed by a private CA, and the service's
//! password from `--password-file` or `DBPS_REDIS_SERVICE_PASSWORD`.
//!
//! It wraps [`dbps_migrate`]: `provision` is [`PgService::provision`], `up` and
//! `status` are [`PgMigrations::run`], [`PgMigrations::dry_run`] and
//! [`PgMigrations::status`] with the service's own migrations (`--migrations DIR`, the
//! component named after the service, applied last) and any framework components
//! (`--component NAME=DIR`, applied first, in the order given).
//!
//! # Configuration
//!
//! Every flag has an environment variable; a flag wins over its variable.
//!
//! | flag | variable | meaning |
//! |---|---|---|
//! | `--admin-url` | `DBPS_ADMIN_URL`, else `DBPS_POSTGRES_URL` | the server; an administrative role for `provision` (for `up` and `status` with an owner password only its host, port and TLS settings are used) |
//! | `--service` | `DBPS_SERVICE` | the service's name, `[a-z][a-z0-9_]*`, at most 48 bytes |
//! | `--database` | `DBPS_DATABASE` | the database (default: the service's name) |
//! | `--schema` | `DBPS_SCHEMA` | the schema (default: the service's name) |
//! | `--owner-password` | `DBPS_OWNER_PASSWORD` | the owner role's password (`provision`, `up`; `status` connects as the administrator without it) |
//! | `--runtime-password` | `DBPS_RUNTIME_PASSWORD` | the runtime role's password (`provision`) |
//! | `--migrations` | `DBPS_MIGRATIONS` | directory of the service's own migrations |
//!
//! Prefer the variables for passwords: command-line arguments are visible to other users of
//! the machine. Passwords are never printed, logged or shown in errors; `--help` hides the
//! values of the password variables.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; for `status --check`, nothing pending |
//! | 1 | failure: server unreachable, a statement or migration failed, lock timeout |
//! | 2 | usage: bad flags, an invalid name or password, unreadable migrations |
//! | 3 | `status --check`: migrations are pending |
//! | 4 | refused: an applied migration was changed, is missing or is dirty |
//!
//! Logs go to standard error (`-v` for progress, `-vv` for more, or `RUST_LOG`); results
//! go to standard output.
//!
//! [`PgService::provision`]: dbps_migrate::PgService::provision
//! [`KafkaAccess::provision`]: dbps_migrate::kafka::KafkaAccess::provision
//! [`RedisAccess::provision`]: dbps_migrate::redis::RedisAccess::provision
//! [`PgMigrations::run`]: dbps_migrate::PgMigrations::run
//! [`PgMigrations::dry_run`]: dbps_migrate::PgMigrations::dry_run
//! [`PgMigrations::status`]: dbps_migrate::PgMigrations::status

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Args, Parser, Subcommand};
use dbps_migrate::pg::{MigrationReport, ProvisionReport, ServiceStatus, migrator_from_dir};
use dbps_migrate::{Identifier, MigrateError, Password, PgService, ServiceName};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_PENDING: u8 = 3;
const EXIT_REFUSED: u8 = 4;

const EXIT_CODES: &str = "\
Exit codes:
  0  success (for `status --check`: nothing pending)
  1  failure: server unreachable, a statement or migration failed, lock timeout
  2  usage: bad flags, an invalid name or password, unreadable migrations
  3  `status --check`: migrations are pending
  4  refused: an applied migration was changed, is missing or is dirty

Passwords are best given through DBPS_OWNER_PASSWORD and DBPS_RUNTIME_PASSWORD; they are
never printed.";

/// Provisions and migrates the PostgreSQL database of one dbps service, and its principals
/// on Kafka and Redis.
#[derive(Debug, Parser)]
#[command(name = "dbps-migrate", version, after_help = EXIT_CODES)]
struct Cli {
    /// Server URL. `provision` needs an administrative role (superuser, or CREATEROLE and
    /// CREATEDB); `up` and `status` use only its host, port and TLS settings when an owner
    /// password is given. Falls back to DBPS_POSTGRES_URL.
    #[arg(
        long,
        env = "DBPS_ADMIN_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    admin_url: Option<Secret>,

    /// The service's name: lowercase ASCII letters, digits and underscores, starting with a
    /// letter, at most 48 bytes.
    #[arg(long, env = "DBPS_SERVICE", global = true, value_name = "NAME")]
    service: Option<String>,

    /// The service's database [default: the service's name].
    #[arg(long, env = "DBPS_DATABASE", global = true, value_name = "NAME")]
    database: Option<String>,

    /// The service's schema [default: the service's name].
    #[arg(long, env = "DBPS_SCHEMA", global = true, value_name = "NAME")]
    schema: Option<String>,

    /// More log output on standard error (-v progress, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update the service's database, schemas, owner and runtime roles and their
    /// privileges. Idempotent; sets the passwords again.
    #[command(after_help = EXIT_CODES)]
    Provision(ProvisionArgs),
    /// Apply the pending migrations, as the owner role, under the service's migration lock.
    #[command(after_help = EXIT_CODES)]
    Up(UpArgs),
    /// Show applied, pending and changed migrations per component.
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// Create or update the service's Kafka SCRAM user and make its ACLs exactly: write
    /// and create its own topics, write the topics it --produces, read the topics it
    /// --consumes, use its own consumer groups. Idempotent; --revoke removes them.
    #[command(after_help = EXIT_CODES)]
    KafkaAccess(KafkaAccessArgs),
    /// Create or replace the service's Redis ACL user: its key prefix and the commands
    /// dbps uses only. Idempotent; --revoke deletes it.
    #[command(after_help = EXIT_CODES)]
    RedisAccess(RedisAccessArgs),
}

/// The service's own password, for Kafka or Redis: from a file or a variable.
#[derive(Debug, Args)]
struct ServicePassword {
    /// A file holding the service's password (its first line break is dropped).
    #[arg(long, value_name = "FILE", conflicts_with = "password")]
    password_file: Option<PathBuf>,

    /// The service's password; prefer the variable or --password-file.
    #[arg(long, hide_env_values = true, value_name = "PASSWORD")]
    password: Option<Secret>,
}

#[derive(Debug, Args)]
struct KafkaAccessArgs {
    /// The cluster's bootstrap servers.
    #[arg(long, env = "DBPS_KAFKA_BROKERS", value_name = "HOST:PORT,...")]
    brokers: String,

    /// A librdkafka property of the administrator's connection, KEY=VALUE; repeatable.
    /// DBPS_KAFKA_SECURITY_PROTOCOL, DBPS_KAFKA_SASL_MECHANISM, DBPS_KAFKA_SASL_USERNAME,
    /// DBPS_KAFKA_SASL_PASSWORD and DBPS_KAFKA_SSL_CA_LOCATION are read first.
    #[arg(long = "admin-property", value_name = "KEY=VALUE")]
    admin_properties: Vec<Secret>,

    /// A topic the service consumes; repeatable.
    #[arg(long = "consumes", value_name = "TOPIC")]
    consumes: Vec<String>,

    /// A topic outside its prefix the service writes (a command to another service);
    /// repeatable.
    #[arg(long = "produces", value_name = "TOPIC")]
    produces: Vec<String>,

    /// Its topics' prefix [default: SERVICE.].
    #[arg(long, value_name = "PREFIX")]
    topic_prefix: Option<String>,

    /// Its consumer groups' prefix [default: SERVICE.].
    #[arg(long, value_name = "PREFIX")]
    group_prefix: Option<String>,

    /// Its SCRAM user [default: SERVICE].
    #[arg(long, value_name = "NAME")]
    user: Option<String>,

    #[command(flatten)]
    password: ServicePassword,

    /// Delete the service's ACLs and credential instead.
    #[arg(long)]
    revoke: bool,
}

#[derive(Debug, Args)]
struct RedisAccessArgs {
    /// The server, as a user that may run ACL (`rediss://admin:PASSWORD@host:port` for
    /// TLS).
    #[arg(long, env = "DBPS_REDIS_URL", hide_env_values = true, value_name = "URL")]
    redis_url: Secret,

    /// The CA certificate (PEM) that signed the server's certificate, for a rediss://
    /// URL whose CA is not among the system's.
    #[arg(long, env = "DBPS_TLS_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,

    /// Its key prefix [default: SERVICE:].
    #[arg(long, value_name = "PREFIX")]
    key_prefix: Option<String>,

    /// One more command it may run (`hget`, `client|setinfo`); repeatable.
    #[arg(long = "command", value_name = "COMMAND")]
    commands: Vec<String>,

    /// Its user [default: SERVICE].
    #[arg(long, value_name = "NAME")]
    user: Option<String>,

    #[command(flatten)]
    password: ServicePassword,

    /// Delete the user instead.
    #[arg(long)]
    revoke: bool,
}

/// A password, or a URL that may hold one: its `Debug` hides it.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

#[derive(Debug, Args)]
struct ProvisionArgs {
    /// Password of the owner role, SERVICE_owner.
    #[arg(long, env = "DBPS_OWNER_PASSWORD", hide_env_values = true, value_name = "PASSWORD")]
    owner_password: Option<Secret>,

    /// Password of the runtime role, SERVICE_app.
    #[arg(long, env = "DBPS_RUNTIME_PASSWORD", hide_env_values = true, value_name = "PASSWORD")]
    runtime_password: Option<Secret>,
}

#[derive(Debug, Args)]
struct SourceArgs {
    /// Directory of the service's own migrations (VERSION_DESCRIPTION.sql), applied as
    /// the component named after the service, after every --component.
    #[arg(long, env = "DBPS_MIGRATIONS", value_name = "DIR")]
    migrations: Option<PathBuf>,

    /// A further component, NAME=DIR, applied before the service's own migrations, in the
    /// order given. Repeatable.
    #[arg(long = "component", value_name = "NAME=DIR")]
    components: Vec<String>,
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    source: SourceArgs,

    /// Password of the owner role, which runs the migrations.
    #[arg(long, env = "DBPS_OWNER_PASSWORD", hide_env_values = true, value_name = "PASSWORD")]
    owner_password: Option<Secret>,

    /// List what would be applied, apply nothing.
    #[arg(long)]
    dry_run: bool,

    /// Seconds to wait for another runner of the same service to finish.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    lock_timeout: u64,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    source: SourceArgs,

    /// Password of the owner role; without it, status connects as the administrator.
    #[arg(long, env = "DBPS_OWNER_PASSWORD", hide_env_values = true, value_name = "PASSWORD")]
    owner_password: Option<Secret>,

    /// Exit with 3 if migrations are pending.
    #[arg(long)]
    check: bool,
}

/// An error with the exit code it ends the program with.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }
}

impl From<MigrateError> for Failure {
    fn from(error: MigrateError) -> Self {
        let code = match &error {
            MigrateError::InvalidIdentifier { .. }
            | MigrateError::InvalidPassword { .. }
            | MigrateError::SecretFile { .. }
            | MigrateError::DuplicateComponent { .. }
            | MigrateError::Source { .. } => EXIT_USAGE,
            MigrateError::Changed { .. } | MigrateError::Missing { .. } | MigrateError::Dirty { .. } => EXIT_REFUSED,
            _ => EXIT_FAILURE,
        };
        Self {
            code,
            error: error.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self {
            code: EXIT_FAILURE,
            error,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Prints help, the version or the usage error; exits 0 or 2.
        Err(error) => error.exit(),
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return report_failure(&Failure::from(anyhow::Error::new(error).context("start the runtime"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => report_failure(&failure),
    }
}

fn report_failure(failure: &Failure) -> ExitCode {
    // `{:#}` prints the chain of causes on one line.
    let _ = writeln!(std::io::stderr().lock(), "error: {:#}", failure.error);
    ExitCode::from(failure.code)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "warn,dbps_core=info,dbps_migrate=info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::KafkaAccess(args) => return kafka_access(service_name(&cli)?, args).await,
        Command::RedisAccess(args) => return redis_access(service_name(&cli)?, args).await,
        Command::Provision(_) | Command::Up(_) | Command::Status(_) => {}
    }
    let service = layout(&cli)?;
    let server = server_options(cli.admin_url.as_ref().map(|url| url.0.as_str()))?;
    match cli.command {
        Command::Provision(args) => {
            let owner = password(args.owner_password, "--owner-password", "DBPS_OWNER_PASSWORD")?;
            let runtime = password(args.runtime_password, "--runtime-password", "DBPS_RUNTIME_PASSWORD")?;
            let report = service.provision(&server, &owner, &runtime).await?;
            print_provision(&report)?;
            Ok(0)
        }
        Command::Up(args) => {
            let migrators = load_migrators(&service, &args.source).await?;
            let owner = password(args.owner_password, "--owner-password", "DBPS_OWNER_PASSWORD").map_err(|_| {
                Failure::usage(anyhow::anyhow!(
                    "up runs as the owner role {}: set --owner-password or DBPS_OWNER_PASSWORD",
                    service.owner_role()
                ))
            })?;
            let mut migrations = service
                .migrations()
                .lock_timeout(Duration::from_secs(args.lock_timeout));
            for (name, migrator) in &migrators {
                migrations = migrations.component(name, migrator);
            }
            let options = service.owner_options(&server, &owner);
            let report = if args.dry_run {
                migrations.dry_run(&options).await?
            } else {
                migrations.run(&options).await?
            };
            print_report(&report)?;
            Ok(0)
        }
        Command::KafkaAccess(_) | Command::RedisAccess(_) => unreachable!("handled above"),
        Command::Status(args) => {
            let migrators = load_migrators(&service, &args.source).await?;
            let mut migrations = service.migrations();
            for (name, migrator) in &migrators {
                migrations = migrations.component(name, migrator);
            }
            let options = match args.owner_password {
                Some(secret) => service.owner_options(&server, &Password::new(secret.0)?),
                None => service.admin_options(&server),
            };
            let status = migrations.status(&options).await?;
            print_status(&status)?;
            if status.has_conflicts() {
                Ok(EXIT_REFUSED)
            } else if args.check && status.pending_count() > 0 {
                Ok(EXIT_PENDING)
            } else {
                Ok(0)
            }
        }
    }
}

/// The service's name from the flags, checked.
fn service_name(cli: &Cli) -> Result<ServiceName, Failure> {
    let name = cli
        .service
        .as_deref()
        .ok_or_else(|| Failure::usage(anyhow::anyhow!("no service: set --service or DBPS_SERVICE")))?;
    Ok(ServiceName::new(name)?)
}

/// The service's password for Kafka or Redis: `--password-file`, `--password` or `var`.
fn service_password(args: &ServicePassword, var: &str) -> Result<Password, Failure> {
    if let Some(file) = &args.password_file {
        return Ok(Password::from_file(file)?);
    }
    let secret = args
        .password
        .clone()
        .map(|secret| secret.0)
        .or_else(|| std::env::var(var).ok().filter(|value| !value.is_empty()))
        .ok_or_else(|| Failure::usage(anyhow::anyhow!("no password: set --password-file, --password or {var}")))?;
    Ok(Password::new(secret)?)
}

/// `kafka-access`: the service's SCRAM user and ACLs.
async fn kafka_access(service: ServiceName, args: &KafkaAccessArgs) -> Result<u8, Failure> {
    let mut admin = dbps_core::kafka::KafkaConfig::new(args.brokers.trim());
    for (var, property) in [
        ("DBPS_KAFKA_SECURITY_PROTOCOL", "security.protocol"),
        ("DBPS_KAFKA_SASL_MECHANISM", "sasl.mechanism"),
        ("DBPS_KAFKA_SASL_USERNAME", "sasl.username"),
        ("DBPS_KAFKA_SASL_PASSWORD", "sasl.password"),
        ("DBPS_KAFKA_SSL_CA_LOCATION", "ssl.ca.location"),
    ] {
        if let Ok(value) = std::env::var(var)
            && !value.is_empty()
        {
            admin = admin.set(property, value);
        }
    }
    for property in &args.admin_properties {
        let (key, value) = property
            .0
            .split_once('=')
            .ok_or_else(|| Failure::usage(anyhow::anyhow!("an --admin-property is not KEY=VALUE")))?;
        admin = admin.set(key.trim(), value);
    }
    let mut access = dbps_migrate::kafka::KafkaAccess::new(service);
    if let Some(user) = &args.user {
        access = access.user(user);
    }
    if let Some(prefix) = &args.topic_prefix {
        access = access.topic_prefix(prefix);
    }
    if let Some(prefix) = &args.group_prefix {
        access = access.group_prefix(prefix);
    }
    for topic in &args.consumes {
        access = access.consumes(topic);
    }
    for topic in &args.produces {
        access = access.produces(topic);
    }
    let mut out = std::io::stdout().lock();
    if args.revoke {
        let deleted = access.revoke(&admin).await?;
        writeln!(
            out,
            "revoked {}: {deleted} ACLs and its SCRAM credential deleted",
            access.principal()
        )
        .context("write")?;
        return Ok(0);
    }
    let password = service_password(&args.password, "DBPS_KAFKA_SERVICE_PASSWORD")?;
    let report = access.provision(&admin, &password).await?;
    for binding in &report.created {
        writeln!(out, "granted  {binding}").context("write")?;
    }
    for binding in &report.deleted {
        writeln!(out, "removed  {binding}").context("write")?;
    }
    writeln!(
        out,
        "{} has {} ACLs ({} new, {} removed) and its SCRAM-SHA-512 credential",
        access.principal(),
        access.bindings().len(),
        report.created.len(),
        report.deleted.len()
    )
    .context("write")?;
    Ok(0)
}

/// `redis-access`: the service's Redis ACL user.
async fn redis_access(service: ServiceName, args: &RedisAccessArgs) -> Result<u8, Failure> {
    let info = redis::IntoConnectionInfo::into_connection_info(args.redis_url.0.as_str())
        .map_err(|error| Failure::usage(anyhow::anyhow!("the redis url is not valid: {error}")))?;
    let admin = match &args.ca_file {
        Some(file) if args.redis_url.0.starts_with("rediss://") => {
            let ca = std::fs::read(file).with_context(|| format!("reading the CA file {}", file.display()))?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca),
                },
            )
        }
        _ => redis::Client::open(info),
    }
    .map_err(|error| Failure::usage(anyhow::anyhow!("the redis url cannot be used: {error}")))?;
    let mut access = dbps_migrate::redis::RedisAccess::new(service);
    if let Some(user) = &args.user {
        access = access.user(user);
    }
    if let Some(prefix) = &args.key_prefix {
        access = access.key_prefix(prefix);
    }
    for command in &args.commands {
        access = access.command(command);
    }
    let mut out = std::io::stdout().lock();
    if args.revoke {
        let existed = access.revoke(&admin).await?;
        let what = if existed { "deleted" } else { "did not exist" };
        writeln!(out, "redis user {} {what}", access.user_name()).context("write")?;
        return Ok(0);
    }
    let password = service_password(&args.password, "DBPS_REDIS_SERVICE_PASSWORD")?;
    access.provision(&admin, &password).await?;
    writeln!(out, "redis user {} provisioned", access.user_name()).context("write")?;
    Ok(0)
}

/// The service's layout from the flags; every name is checked before anything connects.
fn layout(cli: &Cli) -> Result<PgService, Failure> {
    let mut service = PgService::new(service_name(cli)?);
    if let Some(database) = &cli.database {
        service = service.database(Identifier::new(database).map_err(|e| rename(e, "database name"))?);
    }
    if let Some(schema) = &cli.schema {
        service = service.schema(Identifier::new(schema).map_err(|e| rename(e, "schema name"))?);
    }
    Ok(service)
}

/// Says which flag an invalid identifier came from.
fn rename(error: MigrateError, what: &'static str) -> MigrateError {
    match error {
        MigrateError::InvalidIdentifier { value, reason, .. } => {
            MigrateError::InvalidIdentifier { what, value, reason }
        }
        other => other,
    }
}

/// The server's connect options, from the flag or its variables. Errors never show the URL.
fn server_options(flag: Option<&str>) -> Result<PgConnectOptions, Failure> {
    let url = match flag {
        Some(url) => url.to_owned(),
        None => std::env::var("DBPS_POSTGRES_URL").map_err(|_| {
            Failure::usage(anyhow::anyhow!(
                "no server: set --admin-url, DBPS_ADMIN_URL or DBPS_POSTGRES_URL"
            ))
        })?,
    };
    PgConnectOptions::from_str(&url)
        .map_err(|error| Failure::usage(anyhow::anyhow!("the admin url is not a valid postgres url: {error}")))
}

fn password(secret: Option<Secret>, flag: &str, var: &str) -> Result<Password, Failure> {
    let secret = secret.ok_or_else(|| Failure::usage(anyhow::anyhow!("no password: set {flag} or {var}")))?;
    Ok(Password::new(secret.0)?)
}

/// The components to migrate: every `--component`, then the service's own migrations.
async fn load_migrators(service: &PgService, source: &SourceArgs) -> Result<Vec<(String, Migrator)>, Failure> {
    let mut migrators = Vec::new();
    for spec in &source.components {
        let (name, dir) = spec
            .split_once('=')
            .ok_or_else(|| Failure::usage(anyhow::anyhow!("--component {spec:?} is not NAME=DIR")))?;
        migrators.push((name.to_owned(), migrator_from_dir(dir).await?));
    }
    if let Some(dir) = &source.migrations {
        migrators.push((service.service().as_str().to_owned(), migrator_from_dir(dir).await?));
    }
    if migrators.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "nothing to migrate: set --migrations DIR (or DBPS_MIGRATIONS) or --component NAME=DIR"
        )));
    }
    Ok(migrators)
}

fn out() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

fn print_provision(report: &ProvisionReport) -> anyhow::Result<()> {
    let created = |yes: bool| if yes { "created" } else { "updated" };
    let role_created = |role| report.created_roles.contains(role);
    let mut out = out();
    writeln!(out, "provisioned service {}", report.service)?;
    writeln!(
        out,
        "  database      {} ({})",
        report.database,
        created(report.created_database)
    )?;
    writeln!(out, "  schema        {}", report.schema)?;
    writeln!(
        out,
        "  owner role    {} ({})",
        report.owner_role,
        created(role_created(&report.owner_role))
    )?;
    writeln!(
        out,
        "  runtime role  {} ({})",
        report.runtime_role,
        created(role_created(&report.runtime_role))
    )?;
    out.flush().context("write to standard output")
}

fn print_report(report: &MigrationReport) -> anyhow::Result<()> {
    let mut out = out();
    let verb = if report.dry_run { "would apply" } else { "applied" };
    for component in &report.components {
        for migration in &component.applied {
            writeln!(out, "{verb} {} {migration}", component.component)?;
        }
    }
    let count = report.applied_count();
    let noun = if count == 1 { "migration" } else { "migrations" };
    if report.dry_run {
        writeln!(
            out,
            "dry run: {count} {noun} would be applied to database {} as {}",
            report.database, report.role
        )?;
    } else {
        writeln!(
            out,
            "up: {count} {noun} applied to database {} as {}",
            report.database, report.role
        )?;
    }
    out.flush().context("write to standard output")
}

fn print_status(status: &ServiceStatus) -> anyhow::Result<()> {
    let mut out = out();
    writeln!(out, "service {} (schema {})", status.service, status.schema)?;
    for component in &status.components {
        writeln!(
            out,
            "  {}: {} applied, {} pending  [{}]",
            component.component,
            component.applied.len(),
            component.pending.len(),
            component.history_table
        )?;
        for migration in &component.pending {
            writeln!(out, "    pending  {migration}")?;
        }
        for version in &component.changed {
            writeln!(out, "    CHANGED  {version} (applied, but its file differs now)")?;
        }
        for version in &component.missing {
            writeln!(out, "    MISSING  {version} (applied, but no file has this version)")?;
        }
        for version in &component.dirty {
            writeln!(out, "    DIRTY    {version} (failed part-way; repair by hand)")?;
        }
    }
    let pending = status.pending_count();
    if status.has_conflicts() {
        writeln!(
            out,
            "refused: an applied migration changed or is missing; `up` will not run"
        )?;
    } else if pending == 0 {
        writeln!(out, "up to date")?;
    } else {
        writeln!(out, "{pending} pending")?;
    }
    out.flush().context("write to standard output")
}
