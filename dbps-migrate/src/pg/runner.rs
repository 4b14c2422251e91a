//! The per-service migration runner.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use sqlx::migrate::{Migrate, Migration, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};

use super::{HISTORY_SCHEMA, connect, pg_error};
use crate::error::{MigrateError, Result};
use crate::ident::{Identifier, ServiceName};
use crate::{MigrationInfo, fnv1a32};

/// The first half of the advisory lock key of every migration run ("dbps" in ASCII), so that
/// dbps' locks are recognisable in `pg_locks.classid`.
const LOCK_CLASS: i32 = 0x6462_7073;

/// How long a run waits for another runner's lock by default.
const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// The migrations of one service: its own and those of the framework components it uses,
/// applied in one call.
///
/// ```no_run
/// # async fn example(owner: sqlx::postgres::PgConnectOptions) -> Result<(), dbps_migrate::MigrateError> {
/// use dbps_migrate::{PgMigrations, ServiceName};
///
/// // In a service: `static CUSTOMER: Migrator = sqlx::migrate!("migrations");`
/// # static CUSTOMER: sqlx::migrate::Migrator = sqlx::migrate!("tests/fixtures/pg/customer_v1");
/// let report = PgMigrations::new(ServiceName::new("customer")?)
///     .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
///     .component("customer", &CUSTOMER)
///     .run(&owner)
///     .await?;
/// for component in &report.components {
///     for migration in &component.applied {
///         println!("{}: applied {migration}", component.component);
///     }
/// }
/// # Ok(()) }
/// ```
///
/// Run it as the service's owner role ([`super::PgService::owner_options`]), so that the
/// tables it creates belong to that role and the runtime role's default privileges apply.
///
/// # Guarantees
///
/// - Components are applied in the order they were added, each migration in its own
///   transaction (unless its file starts with `-- no-transaction`), each recorded in the
///   component's own history table `dbps_migrations.<component>`.
/// - The whole run holds a session-level advisory lock ([`PgMigrations::advisory_lock_key`]),
///   so concurrent runs for the same service apply each migration once; the later ones wait
///   up to [`PgMigrations::lock_timeout`].
/// - Before anything is applied, every component's history is checked: an applied migration
///   whose checksum changed ([`MigrateError::Changed`]), an applied migration that is no
///   longer known ([`MigrateError::Missing`]) or a dirty one ([`MigrateError::Dirty`]) stops
///   the run before it changes anything.
/// - Names are validated before a connection is opened.
pub struct PgMigrations {
    service: ServiceName,
    schema: Identifier,
    components: Vec<Component>,
    lock_timeout: Duration,
    ignore_missing: bool,
}

/// A named list of migrations.
#[derive(Debug)]
struct Component {
    name: String,
    migrations: Vec<Migration>,
}

impl fmt::Debug for PgMigrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let components: Vec<(&str, usize)> = self
            .components
            .iter()
            .map(|c| (c.name.as_str(), c.migrations.len()))
            .collect();
        f.debug_struct("PgMigrations")
            .field("service", &self.service)
            .field("schema", &self.schema)
            .field("components", &components)
            .field("lock_timeout", &self.lock_timeout)
            .field("ignore_missing", &self.ignore_missing)
            .finish()
    }
}

impl PgMigrations {
    /// The migrations of `service`, with no component yet and the service's name as schema.
    pub fn new(service: ServiceName) -> Self {
        Self {
            schema: service.as_identifier().clone(),
            service,
            components: Vec::new(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            ignore_missing: false,
        }
    }

    /// The schema the migrations create their objects in: the run sets `search_path` to it
    /// and creates it if it does not exist. Defaults to the service's name.
    pub fn schema(mut self, schema: Identifier) -> Self {
        self.schema = schema;
        self
    }

    /// Adds the migrations of component `name`, applied after the components added before.
    ///
    /// `name` must be an identifier (`[a-z][a-z0-9_]*`, at most 63 bytes) and unique within
    /// this runner; it is checked when the runner runs, before it connects. The migrations
    /// are copied, so `migrator` need not outlive the runner.
    pub fn component(mut self, name: &str, migrator: &Migrator) -> Self {
        self.components.push(Component {
            name: name.to_owned(),
            migrations: migrator.iter().cloned().collect(),
        });
        self
    }

    /// How long a run waits for another run of the same service to release the lock
    /// (10 minutes by default) before failing with [`MigrateError::LockTimeout`].
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Whether a migration recorded as applied but no longer known is tolerated instead of
    /// refused with [`MigrateError::Missing`] (off by default).
    pub fn ignore_missing(mut self, ignore: bool) -> Self {
        self.ignore_missing = ignore;
        self
    }

    /// The service these migrations belong to.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The two-part key of the advisory lock a run holds, as it appears in `pg_locks`
    /// (`classid`, `objid`): `0x64627073` ("dbps") and a hash of the service name.
    pub fn advisory_lock_key(&self) -> (i32, i32) {
        (LOCK_CLASS, lock_object(&self.service))
    }

    /// The qualified name of the history table of component `component`.
    pub fn history_table(component: &str) -> String {
        format!("{HISTORY_SCHEMA}.\"{component}\"")
    }

    /// Connects with `options` and applies every pending migration of every component.
    ///
    /// # Errors
    ///
    /// See the type's guarantees; connection and statement failures are
    /// [`MigrateError::Postgres`] and [`MigrateError::MigrationFailed`].
    pub async fn run(&self, options: &PgConnectOptions) -> Result<MigrationReport> {
        let components = self.validated()?;
        let mut conn = connect(options).await?;
        let report = self.run_validated(&mut conn, &components).await;
        let _ = conn.close().await;
        report
    }

    /// Like [`PgMigrations::run`], on a connection the caller provides (for example one
    /// taken from a pool). The connection's `search_path` is restored afterwards and the
    /// advisory lock released.
    pub async fn run_on(&self, conn: &mut PgConnection) -> Result<MigrationReport> {
        let components = self.validated()?;
        self.run_validated(conn, &components).await
    }

    /// Connects with `options` and lists, per component, what [`PgMigrations::run`] would
    /// apply, without applying anything or taking the lock.
    ///
    /// # Errors
    ///
    /// The same refusals as a run: [`MigrateError::Changed`], [`MigrateError::Missing`],
    /// [`MigrateError::Dirty`].
    pub async fn dry_run(&self, options: &PgConnectOptions) -> Result<MigrationReport> {
        let components = self.validated()?;
        let mut conn = connect(options).await?;
        let report = self.dry_run_validated(&mut conn, &components).await;
        let _ = conn.close().await;
        report
    }

    /// Like [`PgMigrations::dry_run`], on a connection the caller provides.
    pub async fn dry_run_on(&self, conn: &mut PgConnection) -> Result<MigrationReport> {
        let components = self.validated()?;
        self.dry_run_validated(conn, &components).await
    }

    /// Connects with `options` and reports, per component, the applied, pending, changed,
    /// missing and dirty migrations. Changes nothing and refuses nothing.
    pub async fn status(&self, options: &PgConnectOptions) -> Result<ServiceStatus> {
        let components = self.validated()?;
        let mut conn = connect(options).await?;
        let status = self.status_validated(&mut conn, &components).await;
        let _ = conn.close().await;
        status
    }

    /// Like [`PgMigrations::status`], on a connection the caller provides.
    pub async fn status_on(&self, conn: &mut PgConnection) -> Result<ServiceStatus> {
        let components = self.validated()?;
        self.status_validated(conn, &components).await
    }

    /// Checks every name; returns the components with their validated names.
    fn validated(&self) -> Result<Vec<(Identifier, &Component)>> {
        if self.schema.as_str() == HISTORY_SCHEMA {
            return Err(MigrateError::InvalidIdentifier {
                what: "schema name",
                value: HISTORY_SCHEMA.to_owned(),
                reason: "is reserved for the migration history".to_owned(),
            });
        }
        let mut seen = HashSet::new();
        let mut components = Vec::with_capacity(self.components.len());
        for component in &self.components {
            let name = Identifier::checked("component name", component.name.clone(), Identifier::MAX_LEN)?;
            if !seen.insert(name.clone()) {
                return Err(MigrateError::DuplicateComponent {
                    component: component.name.clone(),
                });
            }
            components.push((name, component));
        }
        Ok(components)
    }

    async fn run_validated(
        &self,
        conn: &mut PgConnection,
        components: &[(Identifier, &Component)],
    ) -> Result<MigrationReport> {
        let session = Session::enter(conn, &self.schema).await?;
        let (class, object) = self.advisory_lock_key();
        if let Err(error) = self.lock(conn, class, object).await {
            session.leave(conn).await;
            return Err(error);
        }
        tracing::debug!(service = %self.service, "took the migration lock");
        let report = self.migrate_locked(conn, components).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(class)
            .bind(object)
            .execute(&mut *conn)
            .await;
        if let Err(error) = unlocked {
            // The lock belongs to the session: closing the connection releases it too.
            tracing::warn!(service = %self.service, %error, "could not release the migration lock");
        }
        session.leave(conn).await;
        report
    }

    async fn migrate_locked(
        &self,
        conn: &mut PgConnection,
        components: &[(Identifier, &Component)],
    ) -> Result<MigrationReport> {
        for schema in [self.schema.as_str(), HISTORY_SCHEMA] {
            ensure_schema(conn, schema).await?;
        }
        let mut statuses = Vec::with_capacity(components.len());
        for (name, component) in components {
            statuses.push(read_status(conn, name, component).await?);
        }
        // Refuse before applying anything, so that a changed migration in a later component
        // does not leave the service half-migrated.
        for status in &statuses {
            status.check(self.ignore_missing)?;
        }
        let mut report = self.report(conn, false).await?;
        for ((name, component), status) in components.iter().zip(statuses) {
            if !status.pending.is_empty() {
                self.apply(conn, name, component, &status.pending).await?;
            }
            report.components.push(ComponentReport {
                component: name.as_str().to_owned(),
                applied: status.pending,
            });
        }
        Ok(report)
    }

    /// Applies `pending` of `component` with sqlx's PostgreSQL migration driver: each
    /// migration and its history row in one transaction, in sqlx's history table format.
    ///
    /// This is what `Migrator::run` does after its checks, which this runner has already made
    /// under its own lock; driving [`Migrate`] directly keeps the run's future `Send` (sqlx's
    /// `Migrator::run` is not, for lifetime reasons) and lets it log each migration's time.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        name: &Identifier,
        component: &Component,
        pending: &[MigrationInfo],
    ) -> Result<()> {
        let table = Self::history_table(name.as_str());
        let map = |error| map_sqlx_migrate(name.as_str(), error);
        conn.ensure_migrations_table(&table).await.map_err(map)?;
        for info in pending {
            let Some(migration) = component
                .migrations
                .iter()
                .find(|m| m.version == info.version && !m.migration_type.is_down_migration())
            else {
                continue;
            };
            let elapsed = conn.apply(&table, migration).await.map_err(map)?;
            tracing::info!(
                service = %self.service,
                component = %name,
                version = migration.version,
                description = %migration.description,
                elapsed_ms = elapsed.as_millis(),
                "applied migration"
            );
        }
        Ok(())
    }

    async fn dry_run_validated(
        &self,
        conn: &mut PgConnection,
        components: &[(Identifier, &Component)],
    ) -> Result<MigrationReport> {
        let mut report = self.report(conn, true).await?;
        for (name, component) in components {
            let status = read_status(conn, name, component).await?;
            status.check(self.ignore_missing)?;
            report.components.push(ComponentReport {
                component: name.as_str().to_owned(),
                applied: status.pending,
            });
        }
        Ok(report)
    }

    async fn status_validated(
        &self,
        conn: &mut PgConnection,
        components: &[(Identifier, &Component)],
    ) -> Result<ServiceStatus> {
        let mut status = ServiceStatus {
            service: self.service.clone(),
            schema: self.schema.clone(),
            components: Vec::with_capacity(components.len()),
        };
        for (name, component) in components {
            status.components.push(read_status(conn, name, component).await?);
        }
        Ok(status)
    }

    async fn report(&self, conn: &mut PgConnection, dry_run: bool) -> Result<MigrationReport> {
        let (database, role): (String, String) = sqlx::query_as("SELECT current_database(), current_user::text")
            .fetch_one(&mut *conn)
            .await
            .map_err(pg_error("read the current database and role"))?;
        Ok(MigrationReport {
            service: self.service.clone(),
            database,
            role,
            dry_run,
            components: Vec::new(),
        })
    }

    async fn lock(&self, conn: &mut PgConnection, class: i32, object: i32) -> Result<()> {
        let action = || format!("take the migration lock of service {}", self.service);
        // `lock_timeout` bounds the wait for an advisory lock too. It is set for this one
        // statement and restored, so that it does not apply to the migrations themselves.
        sqlx::query("SELECT set_config('lock_timeout', $1, false)")
            .bind(format!("{}ms", self.lock_timeout.as_millis().max(1)))
            .execute(&mut *conn)
            .await
            .map_err(pg_error(action()))?;
        let locked = sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(class)
            .bind(object)
            .execute(&mut *conn)
            .await;
        // `reset_val` is the value the session started with (server, database or role default).
        let restored = sqlx::query(
            "SELECT set_config('lock_timeout', reset_val, false) FROM pg_settings WHERE name = 'lock_timeout'",
        )
        .execute(&mut *conn)
        .await;
        match locked {
            Ok(_) => restored.map(|_| ()).map_err(pg_error(action())),
            Err(source) => {
                let timed_out = source
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|code| code == "55P03");
                if timed_out {
                    Err(MigrateError::LockTimeout {
                        target: format!("service {}", self.service),
                        waited: self.lock_timeout,
                    })
                } else {
                    Err(MigrateError::Postgres {
                        action: action(),
                        source,
                    })
                }
            }
        }
    }
}

/// The lock object for `service`: its name's FNV-1a hash, reinterpreted as a signed integer.
fn lock_object(service: &ServiceName) -> i32 {
    i32::from_ne_bytes(fnv1a32(service.as_str().as_bytes()).to_ne_bytes())
}

/// The connection's `search_path` while a run is on it.
struct Session {
    previous: String,
}

impl Session {
    /// Points `search_path` at `schema` only, remembering the previous value.
    async fn enter(conn: &mut PgConnection, schema: &Identifier) -> Result<Self> {
        let previous: String = sqlx::query_scalar("SELECT current_setting('search_path')")
            .fetch_one(&mut *conn)
            .await
            .map_err(pg_error("read search_path"))?;
        sqlx::query("SELECT set_config('search_path', $1, false)")
            .bind(schema.quoted())
            .execute(&mut *conn)
            .await
            .map_err(pg_error(format!("set search_path to {schema}")))?;
        Ok(Self { previous })
    }

    /// Restores the previous `search_path`; a failure only matters to a pooled connection,
    /// and is logged.
    async fn leave(self, conn: &mut PgConnection) {
        let restored = sqlx::query("SELECT set_config('search_path', $1, false)")
            .bind(&self.previous)
            .execute(&mut *conn)
            .await;
        if let Err(error) = restored {
            tracing::warn!(%error, "could not restore search_path after migrating");
        }
    }
}

/// Creates `schema` if it does not exist. Existence is checked first so that a role that owns
/// the schema but may not create schemas in the database gets no error.
async fn ensure_schema(conn: &mut PgConnection, schema: &str) -> Result<()> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(&mut *conn)
        .await
        .map_err(pg_error(format!("look up schema {schema}")))?;
    if !exists {
        // `schema` is a validated identifier or the history schema's constant name.
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")))
            .execute(&mut *conn)
            .await
            .map_err(pg_error(format!("create schema {schema}")))?;
    }
    Ok(())
}

/// A row of a history table.
#[derive(sqlx::FromRow)]
struct AppliedRow {
    version: i64,
    description: String,
    checksum: Vec<u8>,
    success: bool,
}

/// Compares `component`'s history table with its migrations.
async fn read_status(conn: &mut PgConnection, name: &Identifier, component: &Component) -> Result<ComponentStatus> {
    let table = PgMigrations::history_table(name.as_str());
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&table)
        .fetch_one(&mut *conn)
        .await
        .map_err(pg_error(format!("look up history table {table}")))?;
    let rows: Vec<AppliedRow> = if exists {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT version, description, checksum, success FROM {table} ORDER BY version"
        )))
        .fetch_all(&mut *conn)
        .await
        .map_err(pg_error(format!("read history table {table}")))?
    } else {
        Vec::new()
    };

    let known: HashMap<i64, &Migration> = component
        .migrations
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| (m.version, m))
        .collect();
    let mut status = ComponentStatus {
        component: name.as_str().to_owned(),
        history_table: table,
        applied: Vec::new(),
        pending: Vec::new(),
        changed: Vec::new(),
        missing: Vec::new(),
        dirty: Vec::new(),
    };
    let mut recorded = HashSet::new();
    for row in rows {
        recorded.insert(row.version);
        if !row.success {
            status.dirty.push(row.version);
        }
        match known.get(&row.version) {
            Some(migration) if *migration.checksum != *row.checksum => status.changed.push(row.version),
            Some(_) => {}
            None => status.missing.push(row.version),
        }
        status.applied.push(MigrationInfo::new(row.version, row.description));
    }
    let mut pending: Vec<&Migration> = known
        .values()
        .filter(|m| !recorded.contains(&m.version))
        .copied()
        .collect();
    pending.sort_by_key(|m| m.version);
    status.pending = pending
        .into_iter()
        .map(|m| MigrationInfo::new(m.version, m.description.as_ref()))
        .collect();
    Ok(status)
}

/// Maps sqlx's migrator errors to ours, naming the component.
fn map_sqlx_migrate(component: &str, error: sqlx::migrate::MigrateError) -> MigrateError {
    use sqlx::migrate::MigrateError as Sqlx;
    let component = component.to_owned();
    match error {
        Sqlx::ExecuteMigration(source, version) => MigrateError::MigrationFailed {
            component,
            version,
            source,
        },
        Sqlx::VersionMismatch(version) => MigrateError::Changed { component, version },
        Sqlx::VersionMissing(version) => MigrateError::Missing { component, version },
        Sqlx::Dirty(version) => MigrateError::Dirty { component, version },
        Sqlx::Execute(source) => MigrateError::Postgres {
            action: format!("update the migration history of {component}"),
            source,
        },
        source => MigrateError::Migrator { component, source },
    }
}

/// What a run applied, or what a dry run would apply.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MigrationReport {
    /// The service.
    pub service: ServiceName,
    /// The database the run was connected to.
    pub database: String,
    /// The role the migrations ran as.
    pub role: String,
    /// Whether this is a dry run, which applied nothing.
    pub dry_run: bool,
    /// One entry per component, in the order they were applied.
    pub components: Vec<ComponentReport>,
}

impl MigrationReport {
    /// How many migrations were applied (or, for a dry run, would be).
    pub fn applied_count(&self) -> usize {
        self.components.iter().map(|c| c.applied.len()).sum()
    }
}

/// What a run applied for one component.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ComponentReport {
    /// The component's name.
    pub component: String,
    /// The migrations applied (or, for a dry run, that would be), in order.
    pub applied: Vec<MigrationInfo>,
}

/// The migration state of a service, per component.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceStatus {
    /// The service.
    pub service: ServiceName,
    /// The schema its migrations create objects in.
    pub schema: Identifier,
    /// One entry per component, in order.
    pub components: Vec<ComponentStatus>,
}

impl ServiceStatus {
    /// How many migrations are pending in all components.
    pub fn pending_count(&self) -> usize {
        self.components.iter().map(|c| c.pending.len()).sum()
    }

    /// Whether a run would refuse to migrate: some component has a changed, missing or
    /// dirty migration.
    pub fn has_conflicts(&self) -> bool {
        self.components.iter().any(ComponentStatus::has_conflicts)
    }
}

/// The migration state of one component.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ComponentStatus {
    /// The component's name.
    pub component: String,
    /// Its history table, `dbps_migrations."<component>"`.
    pub history_table: String,
    /// The migrations recorded as applied, in version order.
    pub applied: Vec<MigrationInfo>,
    /// The known migrations not applied yet, in version order.
    pub pending: Vec<MigrationInfo>,
    /// Applied migrations whose source changed since (checksum differs).
    pub changed: Vec<i64>,
    /// Applied migrations that are not among the known migrations.
    pub missing: Vec<i64>,
    /// Migrations recorded as failed part-way.
    pub dirty: Vec<i64>,
}

impl ComponentStatus {
    /// Whether a run would refuse to migrate this component.
    pub fn has_conflicts(&self) -> bool {
        !(self.changed.is_empty() && self.missing.is_empty() && self.dirty.is_empty())
    }

    /// The error a run returns for this component, if any.
    fn check(&self, ignore_missing: bool) -> Result<()> {
        let component = || self.component.clone();
        if let Some(&version) = self.dirty.first() {
            return Err(MigrateError::Dirty {
                component: component(),
                version,
            });
        }
        if let Some(&version) = self.changed.first() {
            return Err(MigrateError::Changed {
                component: component(),
                version,
            });
        }
        match self.missing.first() {
            Some(&version) if !ignore_missing => Err(MigrateError::Missing {
                component: component(),
                version,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_differ_per_service() {
        let customer = PgMigrations::new(ServiceName::new("customer").unwrap());
        let quote = PgMigrations::new(ServiceName::new("quote").unwrap());
        assert_eq!(customer.advisory_lock_key().0, 0x6462_7073);
        assert_eq!(
            customer.advisory_lock_key().1,
            i32::from_ne_bytes(fnv1a32(b"customer").to_ne_bytes())
        );
        assert_ne!(customer.advisory_lock_key(), quote.advisory_lock_key());
    }

    #[test]
    fn components_are_validated_before_connecting() {
        let migrator = Migrator::with_migrations(Vec::new());
        let service = ServiceName::new("customer").unwrap();
        let error = PgMigrations::new(service.clone())
            .component("Inbox", &migrator)
            .validated()
            .unwrap_err();
        assert!(matches!(
            error,
            MigrateError::InvalidIdentifier {
                what: "component name",
                ..
            }
        ));
        let error = PgMigrations::new(service.clone())
            .component("inbox", &migrator)
            .component("inbox", &migrator)
            .validated()
            .unwrap_err();
        assert!(matches!(error, MigrateError::DuplicateComponent { .. }));
        let error = PgMigrations::new(service)
            .schema(Identifier::new(HISTORY_SCHEMA).unwrap())
            .validated()
            .unwrap_err();
        assert!(matches!(
            error,
            MigrateError::InvalidIdentifier {
                what: "schema name",
                ..
            }
        ));
    }

    #[test]
    fn history_tables_are_per_component() {
        assert_eq!(
            PgMigrations::history_table("dbps_inbox"),
            "dbps_migrations.\"dbps_inbox\""
        );
    }
}
