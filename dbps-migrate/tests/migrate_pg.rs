//! The PostgreSQL migration runner and provisioning, against the real server.
#![cfg(feature = "postgres")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dbps_migrate::pg::{PgMigrations, PgService, migrator_from_dir};
use dbps_migrate::{Identifier, MigrateError, Password, ServiceName};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

static CUSTOMER_V1: Migrator = sqlx::migrate!("tests/fixtures/pg/customer_v1");
static CUSTOMER_V2: Migrator = sqlx::migrate!("tests/fixtures/pg/customer_v2");
static FRAMEWORK: Migrator = sqlx::migrate!("tests/fixtures/pg/framework");
static AUDIT: Migrator = sqlx::migrate!("tests/fixtures/pg/audit");
static BROKEN: Migrator = sqlx::migrate!("tests/fixtures/pg/broken");

/// A service name no other test uses: `prefix` and random hex digits.
fn unique_service(prefix: &str) -> ServiceName {
    let random = uuid::Uuid::now_v7().simple().to_string();
    // The last digits of a UUIDv7 are random; the first are a timestamp shared by tests
    // started in the same millisecond.
    ServiceName::new(format!("{prefix}_{}", &random[random.len() - 12..])).expect("valid name")
}

/// Options for the test's own database, as the server's administrative role.
///
/// Tests open their own connections rather than borrowing from `pg.pool()`: a pooled
/// connection is returned by a task spawned on drop, which a single-threaded test runtime
/// may never run before the testkit closes the pool at the end of the test.
fn test_db_options(pg: &dbps_testkit::TestPostgres) -> PgConnectOptions {
    pg.admin_options().clone().database(pg.name())
}

/// Options that reach no server: a call that connects fails with a connection error.
fn unreachable() -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(1)
        .username("nobody")
        .database("nowhere")
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error.as_database_error()?.code().map(|c| c.into_owned())
}

async fn scalar_i64(conn: &mut PgConnection, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(conn).await.expect(sql)
}

/// Databases and roles a test created on the shared server, dropped when the test ends
/// (also when it panics).
struct Cleanup {
    admin: PgConnectOptions,
    services: Vec<PgService>,
}

impl Cleanup {
    fn new(admin: &PgConnectOptions) -> Self {
        Self {
            admin: admin.clone(),
            services: Vec::new(),
        }
    }

    fn track(&mut self, service: &PgService) {
        self.services.push(service.clone());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let admin = self.admin.clone().disable_statement_logging();
        let services = std::mem::take(&mut self.services);
        // The test's runtime may be shutting down: clean up on a thread with its own.
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let mut conn = PgConnection::connect_with(&admin).await?;
                for service in services {
                    let statements = [
                        format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", service.database_name()),
                        format!("DROP ROLE IF EXISTS \"{}\"", service.runtime_role()),
                        format!("DROP ROLE IF EXISTS \"{}\"", service.owner_role()),
                    ];
                    for statement in statements {
                        sqlx::raw_sql(AssertSqlSafe(statement)).execute(&mut conn).await?;
                    }
                }
                conn.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("cleanup of test databases and roles failed: {error}"),
            Err(_) => eprintln!("cleanup of test databases and roles panicked"),
        }
    }
}

/// A directory of migration files the test can change, removed afterwards.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn copy_of(fixture: &str) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("dbps-migrate-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pg")
            .join(fixture);
        for entry in std::fs::read_dir(source)? {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runners_apply_each_migration_once() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let options = test_db_options(&pg);
    let service = unique_service("conc");

    let runners: Vec<_> = (0..4)
        .map(|_| {
            let migrations = PgMigrations::new(service.clone())
                .component("framework", &FRAMEWORK)
                .component("customer", &CUSTOMER_V2);
            let options = options.clone();
            tokio::spawn(async move { migrations.run(&options).await })
        })
        .collect();
    let mut applied = Vec::new();
    for runner in runners {
        let report = runner.await??;
        for component in report.components {
            for migration in component.applied {
                applied.push((component.component.clone(), migration.version));
            }
        }
    }
    applied.sort();
    let expected = vec![
        ("customer".to_owned(), 1),
        ("customer".to_owned(), 2),
        ("customer".to_owned(), 3),
        ("framework".to_owned(), 1),
        ("framework".to_owned(), 2),
    ];
    assert_eq!(applied, expected, "each migration applied by exactly one runner");

    let mut conn = PgConnection::connect_with(&options).await?;
    let effects: Vec<(i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT version, count(*) FROM \"{service}\".migration_effects GROUP BY version ORDER BY version"
    )))
    .fetch_all(&mut conn)
    .await?;
    assert_eq!(effects, vec![(2, 1), (3, 1)]);
    let history = scalar_i64(&mut conn, "SELECT count(*) FROM dbps_migrations.customer").await;
    assert_eq!(history, 3);
    Ok(())
}

#[tokio::test]
async fn a_held_lock_makes_a_runner_wait_then_time_out() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let options = test_db_options(&pg);
    let migrations = PgMigrations::new(unique_service("lock"))
        .component("customer", &CUSTOMER_V1)
        .lock_timeout(Duration::from_millis(300));
    let (class, object) = migrations.advisory_lock_key();

    let mut holder = PgConnection::connect_with(&options).await?;
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(class)
        .bind(object)
        .execute(&mut holder)
        .await?;

    let error = migrations.run(&options).await.unwrap_err();
    assert!(matches!(error, MigrateError::LockTimeout { .. }), "{error:?}");
    assert!(error.is_transient());
    assert!(error.to_string().contains("migration lock of service lock_"), "{error}");
    let status = migrations.status(&options).await?;
    assert_eq!(status.pending_count(), 2, "nothing applied while the lock was held");

    holder.close().await?;
    let report = migrations.run(&options).await?;
    assert_eq!(report.applied_count(), 2);
    Ok(())
}

#[tokio::test]
async fn changed_applied_migration_is_refused() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let options = test_db_options(&pg);
    let service = unique_service("chg");
    let dir = ScratchDir::copy_of("customer_v1")?;
    let migrations = |migrator: &Migrator| PgMigrations::new(service.clone()).component("customer", migrator);

    let report = migrations(&migrator_from_dir(&dir.0).await?).run(&options).await?;
    assert_eq!(report.applied_count(), 2);

    // Edit an applied migration and add a new one.
    let applied = dir.0.join("2_add_email.sql");
    let mut sql = std::fs::read_to_string(&applied)?;
    sql.push_str("\nALTER TABLE customers ADD COLUMN phone text;\n");
    std::fs::write(&applied, sql)?;
    std::fs::write(dir.0.join("3_add_vat.sql"), "CREATE TABLE vat_rates (rate numeric);\n")?;
    let changed = migrations(&migrator_from_dir(&dir.0).await?);

    let error = changed.run(&options).await.unwrap_err();
    match &error {
        MigrateError::Changed { component, version } => {
            assert_eq!(component, "customer");
            assert_eq!(*version, 2);
        }
        other => panic!("expected Changed, got {other:?}"),
    }
    assert!(
        error
            .to_string()
            .starts_with("migration 2 of customer was changed after it was applied"),
        "{error}"
    );
    assert!(!error.is_transient());
    let error = changed.dry_run(&options).await.unwrap_err();
    assert!(matches!(error, MigrateError::Changed { version: 2, .. }), "{error:?}");

    // The refusal came before anything was applied.
    let mut conn = PgConnection::connect_with(&options).await?;
    let vat: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT to_regclass('\"{service}\".vat_rates')::text"
    )))
    .fetch_one(&mut conn)
    .await?;
    assert_eq!(vat, None);
    let status = changed.status(&options).await?;
    assert!(status.has_conflicts());
    assert_eq!(status.components[0].changed, vec![2]);
    assert_eq!(status.components[0].pending.len(), 1);
    assert_eq!(status.components[0].pending[0].version, 3);
    Ok(())
}

#[tokio::test]
async fn applied_migration_missing_from_the_source_is_refused_unless_ignored() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let options = test_db_options(&pg);
    let service = unique_service("miss");
    PgMigrations::new(service.clone())
        .component("customer", &CUSTOMER_V2)
        .run(&options)
        .await?;

    let older = PgMigrations::new(service.clone()).component("customer", &CUSTOMER_V1);
    let error = older.run(&options).await.unwrap_err();
    assert!(
        matches!(&error, MigrateError::Missing { component, version: 3 } if component == "customer"),
        "{error:?}"
    );
    let report = older.ignore_missing(true).run(&options).await?;
    assert_eq!(report.applied_count(), 0);
    Ok(())
}

#[tokio::test]
async fn status_and_dry_run_list_pending_without_applying() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let options = test_db_options(&pg);
    let service = unique_service("stat");
    let v1 = PgMigrations::new(service.clone())
        .component("framework", &FRAMEWORK)
        .component("customer", &CUSTOMER_V1);

    let status = v1.status(&options).await?;
    assert_eq!(status.pending_count(), 4);
    assert!(status.components.iter().all(|c| c.applied.is_empty()));
    assert_eq!(status.components[1].history_table, "dbps_migrations.\"customer\"");
    let plan = v1.dry_run(&options).await?;
    assert!(plan.dry_run);
    assert_eq!(plan.applied_count(), 4);
    let planned: Vec<String> = plan.components[1].applied.iter().map(ToString::to_string).collect();
    assert_eq!(planned, vec!["1 create customers", "2 add email"]);

    let mut conn = PgConnection::connect_with(&options).await?;
    let schema_exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(service.as_str())
        .fetch_one(&mut conn)
        .await?;
    assert!(!schema_exists, "status and dry run create nothing");

    let report = v1.run(&options).await?;
    assert!(!report.dry_run);
    assert_eq!(report.applied_count(), 4);

    let v2 = PgMigrations::new(service.clone())
        .component("framework", &FRAMEWORK)
        .component("customer", &CUSTOMER_V2);
    let status = v2.status(&options).await?;
    assert_eq!(status.pending_count(), 1);
    assert_eq!(status.components[1].applied.len(), 2);
    assert_eq!(status.components[1].pending[0].version, 3);
    let plan = v2.dry_run(&options).await?;
    assert_eq!(plan.components[0].applied.len(), 0);
    assert_eq!(plan.components[1].applied[0].version, 3);
    assert_eq!(
        v2.status(&options).await?.pending_count(),
        1,
        "a dry run applies nothing"
    );
    Ok(())
}

#[tokio::test]
async fn components_keep_separate_histories_and_apply_in_order() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let options = test_db_options(&pg);
    let service = unique_service("comp");

    // The audit component reads the framework's table: out of order, it fails.
    let error = PgMigrations::new(service.clone())
        .component("audit", &AUDIT)
        .component("framework", &FRAMEWORK)
        .run(&options)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, MigrateError::MigrationFailed { component, version: 1, .. } if component == "audit"),
        "{error:?}"
    );
    assert_eq!(error.sqlstate().as_deref(), Some("42P01"));

    // On a connection the caller owns; its search_path is restored afterwards.
    let mut conn = PgConnection::connect_with(&options).await?;
    let before: String = sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(&mut conn)
        .await?;
    let report = PgMigrations::new(service.clone())
        .component("framework", &FRAMEWORK)
        .component("audit", &AUDIT)
        .component("customer", &CUSTOMER_V1)
        .run_on(&mut conn)
        .await?;
    let after: String = sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(before, after);

    let order: Vec<&str> = report.components.iter().map(|c| c.component.as_str()).collect();
    assert_eq!(order, ["framework", "audit", "customer"]);
    assert_eq!(report.applied_count(), 5);
    for (table, rows) in [("framework", 2), ("audit", 1), ("customer", 2)] {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM dbps_migrations.\"{table}\""
        )))
        .fetch_one(&mut conn)
        .await?;
        assert_eq!(count, rows, "history of {table}");
    }
    // The objects went into the service's schema.
    for object in ["framework_log", "framework_audit", "customers"] {
        let found: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT to_regclass('\"{service}\".{object}')::text"
        )))
        .fetch_one(&mut conn)
        .await?;
        assert!(found.is_some(), "{object} in schema {service}");
    }
    Ok(())
}

#[tokio::test]
async fn failed_migration_rolls_back_and_releases_the_lock() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let options = test_db_options(&pg);
    let service = unique_service("brk");
    let broken = PgMigrations::new(service.clone())
        .component("broken", &BROKEN)
        .lock_timeout(Duration::from_secs(5));

    for _ in 0..2 {
        // The second attempt gets the same failure, not a lock timeout: the lock was released.
        let error = broken.run(&options).await.unwrap_err();
        assert!(
            matches!(&error, MigrateError::MigrationFailed { component, version: 2, .. } if component == "broken"),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "migration 2 of broken failed");
        assert_eq!(error.sqlstate().as_deref(), Some("42P01"));
    }
    let mut conn = PgConnection::connect_with(&options).await?;
    let tables: Vec<Option<String>> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT to_regclass(name)::text FROM unnest(ARRAY['\"{service}\".broken_ok', '\"{service}\".broken_partial']) AS name"
    )))
    .fetch_all(&mut conn)
    .await?;
    assert!(tables[0].is_some(), "migration 1 stays applied");
    assert_eq!(tables[1], None, "migration 2 rolled back");
    let status = broken.status(&options).await?;
    assert_eq!(status.components[0].applied.len(), 1);
    assert!(!status.has_conflicts(), "a rolled-back migration is pending, not dirty");
    Ok(())
}

#[tokio::test]
async fn invalid_names_are_rejected_before_any_sql() -> TestResult {
    for name in [
        "",
        "Customer",
        "customer-service",
        "customer service",
        "1customer",
        "_customer",
        "customer\"; DROP DATABASE postgres; --",
        "kundé",
        "pg_customer",
        "postgres",
        "template1",
        &"c".repeat(49),
    ] {
        let error = ServiceName::new(name).unwrap_err();
        assert!(
            matches!(
                &error,
                MigrateError::InvalidIdentifier {
                    what: "service name",
                    ..
                }
            ),
            "{name:?}: {error:?}"
        );
    }
    assert!(Identifier::new("Public").is_err());

    // Each of these would fail to connect if it got that far: the error shows it did not.
    let service = ServiceName::new("customer")?;
    let error = PgMigrations::new(service.clone())
        .component("dbps-inbox", &FRAMEWORK)
        .run(&unreachable())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, MigrateError::InvalidIdentifier { what: "component name", value, .. } if value == "dbps-inbox"),
        "{error:?}"
    );
    let error = PgMigrations::new(service.clone())
        .component("customer", &CUSTOMER_V1)
        .component("customer", &CUSTOMER_V2)
        .status(&unreachable())
        .await
        .unwrap_err();
    assert!(matches!(error, MigrateError::DuplicateComponent { .. }), "{error:?}");
    let password = Password::new("irrelevant")?;
    let error = PgService::new(service.clone())
        .database(Identifier::new("postgres")?)
        .provision(&unreachable(), &password, &password)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            MigrateError::InvalidIdentifier {
                what: "database name",
                ..
            }
        ),
        "{error:?}"
    );
    let error = PgService::new(service)
        .schema(Identifier::new("dbps_migrations")?)
        .provision(&unreachable(), &password, &password)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            MigrateError::InvalidIdentifier {
                what: "schema name",
                ..
            }
        ),
        "{error:?}"
    );

    // The control: with valid names, the same options fail at the connection.
    let error = PgMigrations::new(ServiceName::new("customer")?)
        .run(&unreachable())
        .await
        .unwrap_err();
    assert!(matches!(error, MigrateError::Postgres { .. }), "{error:?}");
    assert!(error.is_transient());
    Ok(())
}

#[tokio::test]
async fn runtime_roles_have_least_privilege() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let admin = pg.admin_options().clone();
    let mut cleanup = Cleanup::new(&admin);
    let a = PgService::new(unique_service("lpa"));
    let b = PgService::new(unique_service("lpb"));
    cleanup.track(&a);
    cleanup.track(&b);
    // Quotes, backslashes and dollar signs must reach the server intact.
    let a_owner = Password::new("o'wner \\ $$ secret ü")?;
    let a_app = Password::new("app'; DROP ROLE dbps; --")?;
    let b_owner = Password::new("b-owner")?;
    let b_app = Password::new("b-app")?;
    a.provision(&admin, &a_owner, &a_app).await?;
    b.provision(&admin, &b_owner, &b_app).await?;

    let report = a
        .migrations()
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("framework", &FRAMEWORK)
        .component("customer", &CUSTOMER_V1)
        .run(&a.owner_options(&admin, &a_owner))
        .await?;
    assert_eq!(report.role, a.owner_role().as_str());
    assert_eq!(report.database, a.database_name().as_str());
    b.migrations()
        .component("customer", &CUSTOMER_V1)
        .run(&b.owner_options(&admin, &b_owner))
        .await?;

    // The runtime role reads and writes the service's tables and the framework's.
    let mut app = PgConnection::connect_with(&a.runtime_options(&admin, &a_app)).await?;
    let id: i64 = sqlx::query_scalar("INSERT INTO customers (name, tax_number) VALUES ('Ada', 'T1') RETURNING id")
        .fetch_one(&mut app)
        .await?;
    sqlx::query("UPDATE customers SET email = 'ada@example.com' WHERE id = $1")
        .bind(id)
        .execute(&mut app)
        .await?;
    sqlx::query("INSERT INTO framework_log (message) VALUES ('hello')")
        .execute(&mut app)
        .await?;
    sqlx::query("INSERT INTO dbps_inbox (consumer, message_id) VALUES ('c', 'm1')")
        .execute(&mut app)
        .await?;
    assert_eq!(scalar_i64(&mut app, "SELECT count(*) FROM dbps_inbox").await, 1);
    sqlx::query("DELETE FROM customers WHERE id = $1")
        .bind(id)
        .execute(&mut app)
        .await?;
    let search_path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(&mut app)
        .await?;
    assert!(search_path.contains(a.schema_name().as_str()), "{search_path}");

    // It cannot change the schema, create objects or read the migration history.
    for statement in [
        "CREATE TABLE sneaky (id int)",
        "CREATE TABLE public.sneaky (id int)",
        "CREATE TEMP TABLE sneaky (id int)",
        "ALTER TABLE customers ADD COLUMN sneaky int",
        "DROP TABLE customers",
        "TRUNCATE customers",
        "CREATE SCHEMA sneaky",
        "SELECT count(*) FROM dbps_migrations.customer",
    ] {
        let error = sqlx::raw_sql(statement).execute(&mut app).await.unwrap_err();
        assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{statement}: {error}");
    }
    app.close().await?;

    // Neither of A's roles can connect to B's database, nor B's to A's.
    for options in [
        a.runtime_options(&admin, &a_app).database(b.database_name().as_str()),
        a.owner_options(&admin, &a_owner).database(b.database_name().as_str()),
        b.runtime_options(&admin, &b_app).database(a.database_name().as_str()),
    ] {
        let error = PgConnection::connect_with(&options).await.unwrap_err();
        assert_eq!(sqlstate(&error).as_deref(), Some("42501"), "{error}");
    }
    Ok(())
}

#[tokio::test]
async fn provisioning_is_idempotent_and_updates_passwords() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let admin = pg.admin_options().clone();
    let mut cleanup = Cleanup::new(&admin);
    let service = PgService::new(unique_service("idem"));
    cleanup.track(&service);
    let owner = Password::new("owner-1")?;
    let app = Password::new("app-1")?;

    // Two provisionings at once wait for each other; one creates, the other finds.
    let (first, second) = tokio::join!(
        service.provision(&admin, &owner, &app),
        service.provision(&admin, &owner, &app)
    );
    let (first, second) = (first?, second?);
    assert!(first.created_database ^ second.created_database);
    assert_eq!(first.created_roles.len() + second.created_roles.len(), 2);

    service
        .migrations()
        .component("customer", &CUSTOMER_V1)
        .run(&service.owner_options(&admin, &owner))
        .await?;

    let new_app = Password::new("app-2")?;
    let again = service.provision(&admin, &owner, &new_app).await?;
    assert!(!again.created_database);
    assert!(again.created_roles.is_empty());

    let error = PgConnection::connect_with(&service.runtime_options(&admin, &app))
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&error).as_deref(),
        Some("28P01"),
        "the old password no longer works: {error}"
    );
    let mut conn = PgConnection::connect_with(&service.runtime_options(&admin, &new_app)).await?;
    assert_eq!(scalar_i64(&mut conn, "SELECT count(*) FROM customers").await, 0);
    conn.close().await?;

    // Migrating again after re-provisioning applies nothing.
    let report = service
        .migrations()
        .component("customer", &CUSTOMER_V1)
        .run(&service.owner_options(&admin, &owner))
        .await?;
    assert_eq!(report.applied_count(), 0);
    Ok(())
}

#[tokio::test]
async fn errors_and_debug_output_never_show_passwords() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let admin = pg.admin_options().clone();
    let mut cleanup = Cleanup::new(&admin);
    let service = PgService::new(unique_service("pw"));
    cleanup.track(&service);
    let secret = "pw-4c1d-secret";
    let password = Password::new(secret)?;
    assert!(!format!("{password:?}").contains(secret));
    service.provision(&admin, &password, &password).await?;

    let wrong = Password::new("wrong-password")?;
    let error = service
        .migrations()
        .run(&service.owner_options(&admin, &wrong))
        .await
        .unwrap_err();
    let shown = format!("{error} / {error:?}");
    assert!(!shown.contains("wrong-password"), "{shown}");
    assert!(
        error.to_string().starts_with(&format!(
            "postgres could not connect to database {}",
            service.database_name()
        )),
        "{error}"
    );
    let blocked = BTreeSet::from([secret]);
    assert!(blocked.iter().all(|s| !format!("{service:?}").contains(s)));
    Ok(())
}
