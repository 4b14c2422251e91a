//! The `dbps-migrate` binary, run as a script would run it, against the real server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The migration fixtures of this crate's tests.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pg")
        .join(name)
}

/// The binary with none of the caller's `DBPS_*` settings.
fn dbps_migrate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dbps-migrate"));
    for var in [
        "DBPS_ADMIN_URL",
        "DBPS_POSTGRES_URL",
        "DBPS_SERVICE",
        "DBPS_DATABASE",
        "DBPS_SCHEMA",
        "DBPS_OWNER_PASSWORD",
        "DBPS_RUNTIME_PASSWORD",
        "DBPS_MIGRATIONS",
        "DBPS_KAFKA_BROKERS",
        "DBPS_KAFKA_SECURITY_PROTOCOL",
        "DBPS_KAFKA_SASL_MECHANISM",
        "DBPS_KAFKA_SASL_USERNAME",
        "DBPS_KAFKA_SASL_PASSWORD",
        "DBPS_KAFKA_SSL_CA_LOCATION",
        "DBPS_KAFKA_SERVICE_PASSWORD",
        "DBPS_REDIS_URL",
        "DBPS_REDIS_SERVICE_PASSWORD",
        "DBPS_TLS_CA_FILE",
        "RUST_LOG",
    ] {
        command.env_remove(var);
    }
    command
}

/// What a run printed, with its exit code.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(command: &mut Command) -> Self {
        let Output { status, stdout, stderr } = command.output().expect("the binary runs");
        Self {
            code: status.code().expect("exited, not killed"),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    #[track_caller]
    fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn assert_hides(&self, secrets: &[&str]) {
        for secret in secrets {
            assert!(
                !self.stdout.contains(secret) && !self.stderr.contains(secret),
                "a password was printed:\n--- stdout\n{}\n--- stderr\n{}",
                self.stdout,
                self.stderr
            );
        }
    }
}

/// A service name no other test uses.
fn unique_service(prefix: &str) -> String {
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}", &random[random.len() - 12..])
}

/// The service's database and roles, dropped when the test ends (also when it panics).
struct Cleanup {
    admin: PgConnectOptions,
    service: String,
    /// Further roles the test created.
    roles: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let admin = self.admin.clone().disable_statement_logging();
        let service = self.service.clone();
        let roles = std::mem::take(&mut self.roles);
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let mut conn = PgConnection::connect_with(&admin).await?;
                for statement in [
                    format!("DROP DATABASE IF EXISTS \"{service}\" WITH (FORCE)"),
                    format!("DROP ROLE IF EXISTS \"{service}_app\""),
                    format!("DROP ROLE IF EXISTS \"{service}_owner\""),
                ]
                .into_iter()
                .chain(roles.iter().map(|role| format!("DROP ROLE IF EXISTS \"{role}\"")))
                {
                    sqlx::raw_sql(AssertSqlSafe(statement)).execute(&mut conn).await?;
                }
                conn.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("cleanup of the test service failed: {error}"),
            Err(_) => eprintln!("cleanup of the test service panicked"),
        }
    }
}

/// A directory of migration files the test can change, removed afterwards.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn copy_of(fixture_name: &str) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("dbps-migrate-cli-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(fixture(fixture_name))? {
            let entry = entry?;
            std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
        }
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn help_documents_the_exit_codes_and_hides_passwords() {
    for args in [
        &["--help"][..],
        &["up", "--help"],
        &["status", "--help"],
        &["provision", "--help"],
    ] {
        let run = Run::of(
            dbps_migrate()
                .args(args)
                .env("DBPS_OWNER_PASSWORD", "help-owner-secret")
                .env("DBPS_RUNTIME_PASSWORD", "help-runtime-secret")
                .env(
                    "DBPS_ADMIN_URL",
                    "postgres://admin:help-admin-secret@127.0.0.1:1/postgres",
                ),
        )
        .expect(0);
        for line in [
            "Exit codes:",
            "0  success",
            "1  failure",
            "2  usage",
            "3  `status --check`",
            "4  refused",
        ] {
            assert!(run.stdout.contains(line), "{args:?} lacks {line:?}:\n{}", run.stdout);
        }
        run.assert_hides(&["help-owner-secret", "help-runtime-secret", "help-admin-secret"]);
    }
}

#[test]
fn invalid_names_are_usage_errors_before_connecting() {
    // Port 1 has no server: reaching it would be exit code 1 and a connection error.
    let url = "postgres://admin:pw@127.0.0.1:1/postgres";
    let customer = fixture("customer_v1");
    for (args, message) in [
        (&["--service", "Bad-Name"][..], "invalid service name \"Bad-Name\""),
        (
            &["--service", "x\"; DROP DATABASE postgres; --"],
            "invalid service name",
        ),
        (&["--service", "postgres"], "invalid service name \"postgres\""),
        (
            &["--service", "customer", "--schema", "Public"],
            "invalid schema name \"Public\"",
        ),
        (
            &["--service", "customer", "--database", "a b"],
            "invalid database name \"a b\"",
        ),
    ] {
        for command in ["status", "up", "provision"] {
            let run = Run::of(
                dbps_migrate()
                    .args(args)
                    .arg(command)
                    .env("DBPS_ADMIN_URL", url)
                    .env("DBPS_MIGRATIONS", &customer)
                    .env("DBPS_OWNER_PASSWORD", "pw")
                    .env("DBPS_RUNTIME_PASSWORD", "pw"),
            )
            .expect(2);
            assert!(run.stderr.contains(message), "{args:?} {command}: {}", run.stderr);
            assert!(!run.stderr.contains("connect"), "{args:?} {command}: {}", run.stderr);
        }
    }
    let run = Run::of(
        dbps_migrate()
            .args(["--service", "customer", "status", "--component", "Inbox=/tmp"])
            .env("DBPS_ADMIN_URL", url),
    )
    .expect(2);
    assert!(
        run.stderr.contains("invalid component name \"Inbox\""),
        "{}",
        run.stderr
    );
}

#[test]
fn missing_configuration_is_a_usage_error() {
    let url = "postgres://admin:pw@127.0.0.1:1/postgres";
    let customer = fixture("customer_v1");
    // Arguments, environment, expected message.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a Path)], &'a str);
    let cases: [Case<'_>; 7] = [
        (&["up"], &[], "no service"),
        (&["--service", "customer", "up"], &[], "nothing to migrate"),
        (
            &["--service", "customer", "up"],
            &[("DBPS_MIGRATIONS", &customer)],
            "up runs as the owner role customer_owner: set --owner-password or DBPS_OWNER_PASSWORD",
        ),
        (
            &["--service", "customer", "provision"],
            &[],
            "no password: set --owner-password",
        ),
        (
            &["--service", "customer", "status", "--component", "inbox"],
            &[],
            "is not NAME=DIR",
        ),
        (
            &["--service", "customer", "status", "--migrations", "/nonexistent/dbps"],
            &[],
            "migrations in /nonexistent/dbps could not be read",
        ),
        (
            &["--service", "customer", "status", "--no-such-flag"],
            &[],
            "unexpected argument",
        ),
    ];
    for (args, env, message) in cases {
        let mut command = dbps_migrate();
        command.args(args).env("DBPS_ADMIN_URL", url);
        for (var, value) in env {
            command.env(var, value);
        }
        let run = Run::of(&mut command).expect(2);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
    }
    // Without any URL.
    let run = Run::of(
        dbps_migrate()
            .args(["--service", "customer", "status", "--migrations"])
            .arg(&customer),
    )
    .expect(2);
    assert!(run.stderr.contains("no server: set --admin-url"), "{}", run.stderr);
}

#[test]
fn an_unreachable_server_is_a_failure_without_the_password() {
    let run = Run::of(
        dbps_migrate()
            .args(["--service", "customer", "up", "--migrations"])
            .arg(fixture("customer_v1"))
            .env(
                "DBPS_ADMIN_URL",
                "postgres://admin:unreachable-admin-secret@127.0.0.1:1/postgres",
            )
            .env("DBPS_OWNER_PASSWORD", "unreachable-owner-secret"),
    )
    .expect(1);
    assert!(
        run.stderr
            .contains("postgres could not connect to database customer as customer_owner"),
        "{}",
        run.stderr
    );
    run.assert_hides(&["unreachable-admin-secret", "unreachable-owner-secret"]);
}

#[tokio::test]
async fn provision_up_and_status_round_trip() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let service = unique_service("cli");
    // An administrator of the test's own, whose password is distinctive enough to search
    // the output for.
    let admin_role = format!("{service}_admin");
    let admin_password = format!("cli-admin-s3cret-{}", uuid::Uuid::now_v7().simple());
    let _cleanup = Cleanup {
        admin: pg.admin_options().clone(),
        service: service.clone(),
        roles: vec![admin_role.clone()],
    };
    let mut conn = PgConnection::connect_with(&pg.admin_options().clone().disable_statement_logging()).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE ROLE \"{admin_role}\" WITH LOGIN SUPERUSER PASSWORD '{admin_password}'"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    let options = pg.admin_options();
    let admin_url = format!(
        "postgres://{admin_role}:{admin_password}@{}:{}/{}",
        options.get_host(),
        options.get_port(),
        pg.name()
    );
    let owner_password = "cli-owner-s3cret'\\$";
    let runtime_password = "cli-runtime-s3cret";
    let secrets = [owner_password, runtime_password, admin_password.as_str()];
    // Everything logged at the most verbose level, to catch a password in any log line.
    let cli = |args: &[&str]| {
        let mut command = dbps_migrate();
        command
            .args(["--service", &service])
            .args(args)
            .env("DBPS_POSTGRES_URL", &admin_url)
            .env("DBPS_OWNER_PASSWORD", owner_password)
            .env("DBPS_RUNTIME_PASSWORD", runtime_password)
            .env("RUST_LOG", "trace");
        let run = Run::of(&mut command);
        run.assert_hides(&secrets);
        run
    };
    let framework = format!("framework={}", fixture("framework").display());
    let v1 = fixture("customer_v1").display().to_string();
    let v2 = fixture("customer_v2").display().to_string();

    let run = cli(&["provision"]).expect(0);
    assert!(
        run.stdout.contains(&format!("database      {service} (created)")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("runtime role  {service}_app (created)")),
        "{}",
        run.stdout
    );
    let run = cli(&["provision"]).expect(0);
    assert!(
        run.stdout.contains(&format!("database      {service} (updated)")),
        "{}",
        run.stdout
    );

    let source = ["--component", &framework, "--migrations", &v1];
    let run = cli(&[&["status", "--check"][..], &source].concat()).expect(3);
    assert!(run.stdout.contains("4 pending"), "{}", run.stdout);
    assert!(run.stdout.contains("pending  1 create customers"), "{}", run.stdout);

    let run = cli(&[&["up", "--dry-run"][..], &source].concat()).expect(0);
    assert!(
        run.stdout.contains(&format!("would apply {service} 2 add email")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("dry run: 4 migrations would be applied"),
        "{}",
        run.stdout
    );
    cli(&[&["status", "--check"][..], &source].concat()).expect(3);

    let run = cli(&[&["up"][..], &source].concat()).expect(0);
    let applied: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("applied ")).collect();
    assert_eq!(
        applied,
        vec![
            "applied framework 1 create framework log".to_owned(),
            "applied framework 2 add created at".to_owned(),
            format!("applied {service} 1 create customers"),
            format!("applied {service} 2 add email"),
        ]
    );
    assert!(
        run.stdout.contains(&format!(
            "up: 4 migrations applied to database {service} as {service}_owner"
        )),
        "{}",
        run.stdout
    );
    let run = cli(&[&["status", "--check"][..], &source].concat()).expect(0);
    assert!(run.stdout.contains("up to date"), "{}", run.stdout);

    let source_v2 = ["--component", &framework, "--migrations", &v2];
    let run = cli(&[&["up"][..], &source_v2].concat()).expect(0);
    assert!(run.stdout.contains("up: 1 migration applied"), "{}", run.stdout);

    // The runtime role the CLI provisioned works, and cannot create tables.
    let runtime = pg
        .admin_options()
        .clone()
        .username(&format!("{service}_app"))
        .password(runtime_password)
        .database(&service);
    let mut conn = PgConnection::connect_with(&runtime).await?;
    sqlx::query("INSERT INTO customers (name, tax_number) VALUES ('Ada', 'T1')")
        .execute(&mut conn)
        .await?;
    let denied = sqlx::raw_sql("CREATE TABLE sneaky (id int)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        denied.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501")
    );
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_changed_migration_is_refused_with_exit_code_4() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let service = unique_service("clichg");
    let _cleanup = Cleanup {
        admin: pg.admin_options().clone(),
        service: service.clone(),
        roles: Vec::new(),
    };
    let dir = ScratchDir::copy_of("customer_v1")?;
    let cli = |args: &[&str]| {
        Run::of(
            dbps_migrate()
                .args(["--service", &service])
                .args(args)
                .arg("--migrations")
                .arg(&dir.0)
                .env("DBPS_ADMIN_URL", pg.url())
                .env("DBPS_OWNER_PASSWORD", "owner")
                .env("DBPS_RUNTIME_PASSWORD", "runtime"),
        )
    };
    Run::of(
        dbps_migrate()
            .args(["--service", &service, "provision"])
            .env("DBPS_ADMIN_URL", pg.url())
            .env("DBPS_OWNER_PASSWORD", "owner")
            .env("DBPS_RUNTIME_PASSWORD", "runtime"),
    )
    .expect(0);
    cli(&["up"]).expect(0);

    let file = dir.0.join("1_create_customers.sql");
    let sql = std::fs::read_to_string(&file)?;
    std::fs::write(&file, sql.replace("name       text", "full_name  text"))?;

    let run = cli(&["up"]).expect(4);
    assert!(
        run.stderr
            .contains(&format!("migration 1 of {service} was changed after it was applied")),
        "{}",
        run.stderr
    );
    let run = cli(&["status"]).expect(4);
    assert!(run.stdout.contains("CHANGED  1"), "{}", run.stdout);
    cli(&["up", "--dry-run"]).expect(4);
    Ok(())
}

/// A file under the temporary directory holding `content`, removed on drop.
struct SecretFile(PathBuf);

impl SecretFile {
    fn new(name: &str, content: &str) -> Self {
        let path = std::env::temp_dir().join(format!("dbps-migrate-cli-{}-{name}", std::process::id()));
        std::fs::write(&path, content).expect("write the secret file");
        Self(path)
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn kafka_access_grants_from_the_command_line_with_a_password_file_and_revokes() -> TestResult {
    let stack = dbps_testkit::secure()?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let name = format!("cli_{}", &id[id.len() - 10..]);
    let password = SecretFile::new(&format!("{name}-kafka"), "cli-service-secret\n");
    let admin_password = std::env::var("DBPS_KAFKA_ADMIN_PASSWORD")?;
    let with_admin = |command: &mut Command| {
        command
            .env("DBPS_KAFKA_BROKERS", stack.kafka_brokers())
            .env("DBPS_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
            .env("DBPS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
            .env("DBPS_KAFKA_SASL_USERNAME", "dbps-admin")
            .env("DBPS_KAFKA_SASL_PASSWORD", &admin_password)
            .env("DBPS_KAFKA_SSL_CA_LOCATION", stack.ca_file());
    };

    // No password: a usage error that says where to put it.
    let mut command = dbps_migrate();
    with_admin(&mut command);
    let run = Run::of(command.args([
        "--service",
        &name,
        "kafka-access",
        "--consumes",
        "customer.customer.events",
    ]))
    .expect(2);
    assert!(
        run.stderr.contains("no password: set --password-file"),
        "{}",
        run.stderr
    );

    let mut command = dbps_migrate();
    with_admin(&mut command);
    let run = Run::of(
        command
            .args([
                "--service",
                &name,
                "kafka-access",
                "--consumes",
                "customer.customer.events",
                "--password-file",
            ])
            .arg(&password.0),
    )
    .expect(0);
    assert!(
        run.stdout
            .contains(&format!("User:{name} has 7 ACLs (7 new, 0 removed)")),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("cli-service-secret") && !run.stderr.contains("cli-service-secret"));

    let access = dbps_migrate::kafka::KafkaAccess::new(dbps_migrate::ServiceName::new(&name)?)
        .consumes("customer.customer.events");
    assert_eq!(access.granted(&stack.kafka_admin()).await?, access.bindings());
    // The service signs in with the password from the file.
    let own = stack.kafka_as(&name, "cli-service-secret");
    let own_topic = format!("{name}.cli.events");
    dbps_core::kafka::ensure_topics(&own, &[dbps_core::kafka::TopicSpec::new(&own_topic, 1)]).await?;

    let mut command = dbps_migrate();
    with_admin(&mut command);
    let run = Run::of(command.args(["--service", &name, "kafka-access", "--revoke"])).expect(0);
    assert!(
        run.stdout.contains(&format!("revoked User:{name}: 7 ACLs")),
        "{}",
        run.stdout
    );
    assert!(access.granted(&stack.kafka_admin()).await?.is_empty());
    let mut config = rdkafka::ClientConfig::new();
    for (key, value) in stack.kafka_admin().properties() {
        config.set(key, value);
    }
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = config.create()?;
    admin
        .delete_topics(&[own_topic.as_str()], &rdkafka::admin::AdminOptions::new())
        .await?;
    Ok(())
}

#[tokio::test]
async fn redis_access_provisions_over_tls_from_the_command_line_and_revokes() -> TestResult {
    let stack = dbps_testkit::secure()?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let name = format!("cli_{}", &id[id.len() - 10..]);
    let password = SecretFile::new(&format!("{name}-redis"), "cli-redis-secret");
    let admin_url = format!(
        "rediss://{}:{}@{}",
        std::env::var("DBPS_REDIS_ADMIN_USER")?,
        std::env::var("DBPS_REDIS_ADMIN_PASSWORD")?,
        std::env::var("DBPS_REDIS_TLS_URL")?.trim_start_matches("rediss://")
    );
    let run = Run::of(
        dbps_migrate()
            .env("DBPS_REDIS_URL", &admin_url)
            .env("DBPS_TLS_CA_FILE", stack.ca_file())
            .args(["--service", &name, "redis-access", "--password-file"])
            .arg(&password.0),
    )
    .expect(0);
    assert!(
        run.stdout.contains(&format!("redis user {name} provisioned")),
        "{}",
        run.stdout
    );

    let mut connection = stack
        .redis_as(Some((&name, "cli-redis-secret")))?
        .get_multiplexed_async_connection()
        .await?;
    let key = format!("{name}:k");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("v")
        .query_async(&mut connection)
        .await?;
    let () = redis::cmd("DEL").arg(&key).query_async(&mut connection).await?;

    let run = Run::of(
        dbps_migrate()
            .env("DBPS_REDIS_URL", &admin_url)
            .env("DBPS_TLS_CA_FILE", stack.ca_file())
            .args(["--service", &name, "redis-access", "--revoke"]),
    )
    .expect(0);
    assert!(
        run.stdout.contains(&format!("redis user {name} deleted")),
        "{}",
        run.stdout
    );
    Ok(())
}
