//! Provisioning of a service's database, schemas and roles.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

use super::runner::PgMigrations;
use super::{HISTORY_SCHEMA, connect, pg_error};
use crate::error::{MigrateError, Result};
use crate::fnv1a32;
use crate::ident::{Identifier, Password, ServiceName};

/// The first half of the advisory lock key of provisioning ("dbpp" in ASCII), distinct from
/// the migration lock so that provisioning and migrating never wait for each other.
const LOCK_CLASS: i32 = 0x6462_7070;

/// Suffix of the owner role's name.
const OWNER_SUFFIX: &str = "_owner";
/// Suffix of the runtime role's name.
const RUNTIME_SUFFIX: &str = "_app";

/// The PostgreSQL layout of one service — database, schema, owner and runtime roles — and
/// its provisioning.
///
/// Names derive from the [`ServiceName`]: database and schema `<service>`, owner role
/// `<service>_owner`, runtime role `<service>_app`. Database and schema can be overridden
/// (the schema may be `public`).
///
/// ```no_run
/// # async fn example(admin: sqlx::postgres::PgConnectOptions) -> Result<(), dbps_migrate::MigrateError> {
/// use dbps_migrate::{Password, PgService, ServiceName};
///
/// let service = PgService::new(ServiceName::new("customer")?);
/// assert_eq!(service.owner_role().as_str(), "customer_owner");
/// assert_eq!(service.runtime_role().as_str(), "customer_app");
/// let report = service
///     .provision(&admin, &Password::new("owner-secret")?, &Password::new("app-secret")?)
///     .await?;
/// assert_eq!(report.database.as_str(), "customer");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgService {
    service: ServiceName,
    database: Identifier,
    schema: Identifier,
    lock_timeout: Duration,
}

impl PgService {
    /// The layout of `service` with the default names.
    pub fn new(service: ServiceName) -> Self {
        let name = service.as_identifier().clone();
        Self {
            service,
            database: name.clone(),
            schema: name,
            lock_timeout: Duration::from_secs(60),
        }
    }

    /// Uses `database` instead of the service's name as the database's name.
    pub fn database(mut self, database: Identifier) -> Self {
        self.database = database;
        self
    }

    /// Uses `schema` instead of the service's name as the schema's name.
    pub fn schema(mut self, schema: Identifier) -> Self {
        self.schema = schema;
        self
    }

    /// How long provisioning waits for a concurrent provisioning of the same service
    /// (one minute by default).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The service.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The database's name.
    pub fn database_name(&self) -> &Identifier {
        &self.database
    }

    /// The schema's name.
    pub fn schema_name(&self) -> &Identifier {
        &self.schema
    }

    /// The role that owns the database and runs the migrations: `<service>_owner`.
    pub fn owner_role(&self) -> Identifier {
        self.service.as_identifier().with_suffix(OWNER_SUFFIX)
    }

    /// The role the service connects with at run time: `<service>_app`.
    pub fn runtime_role(&self) -> Identifier {
        self.service.as_identifier().with_suffix(RUNTIME_SUFFIX)
    }

    /// Connect options for the owner role: `server`'s host, port and TLS settings with the
    /// service's database, the owner role and `password`.
    pub fn owner_options(&self, server: &PgConnectOptions, password: &Password) -> PgConnectOptions {
        self.options_for(server, &self.owner_role(), password)
    }

    /// Connect options for the runtime role, as [`PgService::owner_options`].
    pub fn runtime_options(&self, server: &PgConnectOptions, password: &Password) -> PgConnectOptions {
        self.options_for(server, &self.runtime_role(), password)
    }

    /// Connect options for `server` on the service's database with the role of `server`
    /// (for an administrator who wants to look at the service's database).
    pub fn admin_options(&self, server: &PgConnectOptions) -> PgConnectOptions {
        server.clone().database(self.database.as_str())
    }

    /// A migration runner for this service, with its schema set.
    pub fn migrations(&self) -> PgMigrations {
        PgMigrations::new(self.service.clone()).schema(self.schema.clone())
    }

    fn options_for(&self, server: &PgConnectOptions, role: &Identifier, password: &Password) -> PgConnectOptions {
        server
            .clone()
            .username(role.as_str())
            .password(password.expose_secret())
            .database(self.database.as_str())
    }

    /// Creates or updates, from an administrative connection, everything the service needs:
    ///
    /// 1. the owner and runtime roles (`LOGIN`, no other attribute), with these passwords —
    ///    set again if the roles exist;
    /// 2. the database, owned by the owner role; `CONNECT` and `TEMP` revoked from `PUBLIC`,
    ///    `CONNECT` granted to the runtime role;
    /// 3. in the database: the schema and `dbps_migrations`, owned by the owner role; all
    ///    privileges on `public` revoked from `PUBLIC`; `USAGE` on the schema for the runtime
    ///    role; default privileges of the owner role giving the runtime role `SELECT`,
    ///    `INSERT`, `UPDATE`, `DELETE` on tables and `USAGE`, `SELECT` on sequences (and the
    ///    same on what already exists);
    /// 4. `search_path` set to the schema for both roles.
    ///
    /// Running it again is safe and updates the passwords. Concurrent provisionings of the
    /// same service wait for each other. `admin` must be a superuser, or a role with
    /// `CREATEROLE` and `CREATEDB` that is a member of the roles it creates. Its statements
    /// are not logged by sqlx (they carry passwords); the server's own `log_statement`
    /// setting is the operator's to choose.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidIdentifier`] for a database named after one of PostgreSQL's
    /// own or a schema named `dbps_migrations` (before connecting);
    /// [`MigrateError::Postgres`] naming the step that failed.
    pub async fn provision(
        &self,
        admin: &PgConnectOptions,
        owner_password: &Password,
        runtime_password: &Password,
    ) -> Result<ProvisionReport> {
        self.validate()?;
        // The statements below carry passwords: keep them out of sqlx's statement log.
        let admin = admin.clone().disable_statement_logging();
        let owner = self.owner_role();
        let runtime = self.runtime_role();
        let mut report = ProvisionReport {
            service: self.service.clone(),
            database: self.database.clone(),
            schema: self.schema.clone(),
            owner_role: owner.clone(),
            runtime_role: runtime.clone(),
            created_database: false,
            created_roles: Vec::new(),
        };

        let mut conn = connect(&admin).await?;
        let result = async {
            self.provision_cluster(&mut conn, owner_password, runtime_password, &mut report)
                .await?;
            // The provisioning lock, held by `conn`, also covers the service's database:
            // two concurrent GRANTs or REVOKEs on one catalog row fail with "tuple
            // concurrently updated" instead of waiting for each other.
            let mut database = connect(&self.admin_options(&admin)).await?;
            let result = self.provision_database(&mut database).await;
            let _ = database.close().await;
            result
        }
        .await;
        let _ = conn.close().await;
        result?;

        tracing::info!(
            service = %self.service,
            database = %self.database,
            schema = %self.schema,
            created_database = report.created_database,
            created_roles = report.created_roles.len(),
            "provisioned service database"
        );
        Ok(report)
    }

    /// What a service does when it starts: [`provision`](PgService::provision)
    /// (idempotent), apply `migrations` as the owner role, and open `pool` as the runtime
    /// role. Build `migrations` with [`PgService::migrations`] and its components: the
    /// framework's tables (`dbps_outbox::pg::MIGRATOR`, ...) and the service's own, last.
    ///
    /// # Errors
    ///
    /// As [`PgService::provision`] and [`PgMigrations::run`]; [`MigrateError::Postgres`]
    /// if the runtime role cannot connect.
    pub async fn prepare(
        &self,
        admin: &PgConnectOptions,
        owner_password: &Password,
        runtime_password: &Password,
        migrations: &PgMigrations,
        pool: PgPoolOptions,
    ) -> Result<PgPool> {
        self.provision(admin, owner_password, runtime_password).await?;
        let report = migrations.run(&self.owner_options(admin, owner_password)).await?;
        tracing::info!(service = %self.service, applied = report.applied_count(), "service database migrated");
        pool.connect_with(self.runtime_options(admin, runtime_password))
            .await
            .map_err(pg_error(format!(
                "connect to database {} as {}",
                self.database,
                self.runtime_role()
            )))
    }

    /// Removes the service's database (ending its sessions) and its roles: the reverse of
    /// [`PgService::provision`], for tearing down an environment. Removing what does not
    /// exist is not an error.
    pub async fn deprovision(&self, admin: &PgConnectOptions) -> Result<()> {
        self.validate()?;
        let mut conn = connect(admin).await?;
        let result = async {
            for sql in [
                format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database.quoted()),
                format!("DROP ROLE IF EXISTS {}", self.runtime_role().quoted()),
                format!("DROP ROLE IF EXISTS {}", self.owner_role().quoted()),
            ] {
                sqlx::query(AssertSqlSafe(sql.clone()))
                    .execute(&mut conn)
                    .await
                    .map_err(pg_error(sql))?;
            }
            Ok(())
        }
        .await;
        let _ = conn.close().await;
        result?;
        tracing::info!(service = %self.service, database = %self.database, "deprovisioned service database");
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        if matches!(self.database.as_str(), "postgres" | "template0" | "template1") {
            return Err(MigrateError::InvalidIdentifier {
                what: "database name",
                value: self.database.as_str().to_owned(),
                reason: "is the name of a database postgresql keeps for itself".to_owned(),
            });
        }
        if self.schema.as_str() == HISTORY_SCHEMA {
            return Err(MigrateError::InvalidIdentifier {
                what: "schema name",
                value: HISTORY_SCHEMA.to_owned(),
                reason: "is reserved for the migration history".to_owned(),
            });
        }
        Ok(())
    }

    /// Roles and database, on a connection to the administrator's database.
    async fn provision_cluster(
        &self,
        conn: &mut PgConnection,
        owner_password: &Password,
        runtime_password: &Password,
        report: &mut ProvisionReport,
    ) -> Result<()> {
        let object = i32::from_ne_bytes(fnv1a32(self.service.as_str().as_bytes()).to_ne_bytes());
        let lock_action = || format!("take the provisioning lock of service {}", self.service);
        sqlx::query("SELECT set_config('lock_timeout', $1, false)")
            .bind(format!("{}ms", self.lock_timeout.as_millis().max(1)))
            .execute(&mut *conn)
            .await
            .map_err(pg_error(lock_action()))?;
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(object)
            .execute(&mut *conn)
            .await
            .map_err(|source| {
                let timed_out = source
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| code == "55P03");
                if timed_out {
                    MigrateError::LockTimeout {
                        target: format!("provisioning of service {}", self.service),
                        waited: self.lock_timeout,
                    }
                } else {
                    MigrateError::Postgres {
                        action: lock_action(),
                        source,
                    }
                }
            })?;
        // The lock is released when the connection closes, also if a step below fails.

        let owner = self.owner_role();
        let runtime = self.runtime_role();
        for (role, password) in [(&owner, owner_password), (&runtime, runtime_password)] {
            if upsert_role(conn, role, password).await? {
                report.created_roles.push(role.clone());
            }
        }
        for role in [&owner, &runtime] {
            execute(
                conn,
                format!(
                    "ALTER ROLE {} SET search_path TO {}",
                    role.quoted(),
                    self.schema.quoted()
                ),
                format!("set the search_path of role {role}"),
            )
            .await?;
        }

        let database = &self.database;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database.as_str())
            .fetch_one(&mut *conn)
            .await
            .map_err(pg_error(format!("look up database {database}")))?;
        if exists {
            execute(
                conn,
                format!("ALTER DATABASE {} OWNER TO {}", database.quoted(), owner.quoted()),
                format!("make {owner} the owner of database {database}"),
            )
            .await?;
        } else {
            execute(
                conn,
                format!("CREATE DATABASE {} OWNER {}", database.quoted(), owner.quoted()),
                format!("create database {database}"),
            )
            .await?;
            report.created_database = true;
        }
        execute(
            conn,
            format!("REVOKE ALL ON DATABASE {} FROM PUBLIC", database.quoted()),
            format!("revoke the privileges of public on database {database}"),
        )
        .await?;
        execute(
            conn,
            format!(
                "GRANT CONNECT ON DATABASE {} TO {}",
                database.quoted(),
                runtime.quoted()
            ),
            format!("grant connect on database {database} to {runtime}"),
        )
        .await
    }

    /// Schemas and privileges, on a connection to the service's database, in one transaction.
    async fn provision_database(&self, conn: &mut PgConnection) -> Result<()> {
        let owner = self.owner_role();
        let runtime = self.runtime_role();
        let schema = &self.schema;
        let history = Identifier::new(HISTORY_SCHEMA)?;
        let (o, r, s, h) = (owner.quoted(), runtime.quoted(), schema.quoted(), history.quoted());
        let steps = [
            (
                "REVOKE ALL ON SCHEMA public FROM PUBLIC".to_owned(),
                "revoke the privileges of public on schema public".to_owned(),
            ),
            (
                format!("CREATE SCHEMA IF NOT EXISTS {s} AUTHORIZATION {o}"),
                format!("create schema {schema}"),
            ),
            (
                format!("ALTER SCHEMA {s} OWNER TO {o}"),
                format!("make {owner} the owner of schema {schema}"),
            ),
            (
                format!("CREATE SCHEMA IF NOT EXISTS {h} AUTHORIZATION {o}"),
                format!("create schema {history}"),
            ),
            (
                format!("ALTER SCHEMA {h} OWNER TO {o}"),
                format!("make {owner} the owner of schema {history}"),
            ),
            (
                format!("REVOKE ALL ON SCHEMA {h} FROM PUBLIC"),
                format!("revoke the privileges of public on schema {history}"),
            ),
            (
                format!("REVOKE ALL ON SCHEMA {s} FROM PUBLIC"),
                format!("revoke the privileges of public on schema {schema}"),
            ),
            (
                format!("GRANT USAGE ON SCHEMA {s} TO {r}"),
                format!("grant usage on schema {schema} to {runtime}"),
            ),
            (
                format!(
                    "ALTER DEFAULT PRIVILEGES FOR ROLE {o} IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}"
                ),
                format!("set the default table privileges of {owner} in schema {schema}"),
            ),
            (
                format!("ALTER DEFAULT PRIVILEGES FOR ROLE {o} IN SCHEMA {s} GRANT USAGE, SELECT ON SEQUENCES TO {r}"),
                format!("set the default sequence privileges of {owner} in schema {schema}"),
            ),
            (
                format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}"),
                format!("grant the runtime privileges on the tables of schema {schema}"),
            ),
            (
                format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {r}"),
                format!("grant the runtime privileges on the sequences of schema {schema}"),
            ),
        ];
        let mut tx = conn.begin().await.map_err(pg_error("begin provisioning transaction"))?;
        for (sql, action) in steps {
            execute(&mut tx, sql, action).await?;
        }
        tx.commit().await.map_err(pg_error("commit provisioning transaction"))
    }
}

/// Creates `role` with `password`, or sets the password of an existing one; returns whether
/// the role was created.
async fn upsert_role(conn: &mut PgConnection, role: &Identifier, password: &Password) -> Result<bool> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role.as_str())
        .fetch_one(&mut *conn)
        .await
        .map_err(pg_error(format!("look up role {role}")))?;
    // DDL takes no bind parameters. The server quotes the password as a literal with
    // `format('%L')`, which handles quotes and backslashes whatever
    // `standard_conforming_strings` says; the password never passes through Rust formatting.
    let template = if exists {
        "ALTER ROLE %I WITH LOGIN PASSWORD %L"
    } else {
        "CREATE ROLE %I WITH LOGIN PASSWORD %L"
    };
    let action = || {
        if exists {
            format!("set the password of role {role}")
        } else {
            format!("create role {role}")
        }
    };
    let statement: String = sqlx::query_scalar("SELECT format($1, $2::text, $3::text)")
        .bind(template)
        .bind(role.as_str())
        .bind(password.expose_secret())
        .fetch_one(&mut *conn)
        .await
        .map_err(pg_error(action()))?;
    sqlx::raw_sql(AssertSqlSafe(statement))
        .execute(&mut *conn)
        .await
        .map_err(pg_error(action()))?;
    Ok(!exists)
}

/// Executes one statement built from validated identifiers only.
async fn execute(conn: &mut PgConnection, sql: String, action: String) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|source| MigrateError::Postgres { action, source })
}

/// What provisioning found and did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProvisionReport {
    /// The service.
    pub service: ServiceName,
    /// Its database.
    pub database: Identifier,
    /// Its schema.
    pub schema: Identifier,
    /// The role that owns the database and runs migrations.
    pub owner_role: Identifier,
    /// The role the service connects with.
    pub runtime_role: Identifier,
    /// Whether the database was created by this call (rather than found).
    pub created_database: bool,
    /// The roles created by this call (the others existed and had their password set).
    pub created_roles: Vec<Identifier>,
}
