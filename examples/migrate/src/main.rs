//! Per-service migrations: a service's own database and least-privilege roles, its
//! migrations and the framework's applied as components under one lock, a dry run, the
//! status, and proof that the runtime role cannot change a table.
//!
//! The same steps as a command: `dbps-migrate provision | up [--dry-run] | status --check`
//! (`cargo run -p dbps-migrate --features cli -- --help`).
//!
//! Run with: `scripts/stack.sh up && eval "$(scripts/stack.sh env)" && cargo run -p example-migrate`
#![allow(clippy::print_stdout)] // An example talks to its reader.

use std::str::FromStr;

use dbps_migrate::{Password, PgService, ServiceName};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The service's own migrations, embedded at compile time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin = PgConnectOptions::from_str(&std::env::var("DBPS_POSTGRES_URL")?)?;
    let service = PgService::new(ServiceName::new("example_quotes")?);
    let (owner, runtime) = (Password::new("owner-dev")?, Password::new("runtime-dev")?);

    // Once per environment, idempotent: database, schema, owner and runtime roles, grants.
    let provisioned = service.provision(&admin, &owner, &runtime).await?;
    println!(
        "provisioned {} (database created now: {}), roles {} and {}",
        provisioned.database, provisioned.created_database, provisioned.owner_role, provisioned.runtime_role
    );

    // At every deployment, as the owner: the framework's tables first, the service's last.
    let migrations = service
        .migrations()
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("quotes", &MIGRATOR);
    let owner_options = service.owner_options(&admin, &owner);
    let planned = migrations.dry_run(&owner_options).await?;
    println!("dry run: {} migration(s) to apply", planned.applied_count());
    let applied = migrations.run(&owner_options).await?;
    for component in &applied.components {
        for migration in &component.applied {
            println!("applied {}: {migration}", component.component);
        }
    }
    let status = migrations.status(&owner_options).await?;
    println!(
        "pending now: {}; conflicts: {}",
        status.pending_count(),
        status.has_conflicts()
    );

    // The service runs as the runtime role: it uses the tables, it cannot change them.
    let pool = PgPoolOptions::new()
        .connect_with(service.runtime_options(&admin, &runtime))
        .await?;
    sqlx::query("insert into quotes (customer_id) values (gen_random_uuid())")
        .execute(&pool)
        .await?;
    let refused = sqlx::query("drop table quotes").execute(&pool).await.unwrap_err();
    let code = refused.as_database_error().and_then(|e| e.code()).unwrap_or_default();
    println!("runtime role: insert ok, drop table refused with SQLSTATE {code}");
    anyhow::ensure!(code == "42501", "the runtime role must not run DDL");
    Ok(())
}
