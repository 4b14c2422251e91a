//! A provisioned, migrated service database per test.

use std::str::FromStr;

use dbps_migrate::{Password, PgMigrations, PgService, ServiceName};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::error::{Error, Result};
use crate::server::{self, Backend};

/// The owner and runtime passwords every test service gets.
const OWNER_PASSWORD: &str = "dbps-test-owner";
const RUNTIME_PASSWORD: &str = "dbps-test-runtime";

/// Starts describing a test service named `<name>_<unique suffix>`: add the migration
/// components it needs, then [`TestServiceBuilder::start`] provisions and migrates it as a
/// real deployment would (its own database, owner and runtime roles).
///
/// ```no_run
/// # static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../dbps-migrate/tests/fixtures/pg/customer_v1");
/// # async fn example() -> Result<(), dbps_testkit::Error> {
/// let orders = dbps_testkit::service("orders")
///     .component("orders", &MIGRATOR)
///     .start()
///     .await?;
/// // The pool connects as the runtime role, like the service in production.
/// sqlx::query("select 1").execute(orders.pool()).await?;
/// # Ok(()) }
/// ```
pub fn service(name: &str) -> TestServiceBuilder {
    TestServiceBuilder {
        name: name.to_owned(),
        components: Vec::new(),
    }
}

/// The migration components of a test service (see [`service`]).
#[derive(Debug)]
pub struct TestServiceBuilder {
    name: String,
    components: Vec<(String, &'static Migrator)>,
}

impl TestServiceBuilder {
    /// Adds a migration component, applied in the order added (the framework's tables
    /// first, the service's own last).
    pub fn component(mut self, name: &str, migrator: &'static Migrator) -> Self {
        self.components.push((name.to_owned(), migrator));
        self
    }

    /// Provisions the service's database and roles, applies the components as the owner
    /// role and connects a pool as the runtime role.
    pub async fn start(self) -> Result<TestService> {
        let address = server::address(Backend::Postgres).await?;
        let admin = PgConnectOptions::from_str(address).map_err(|e| Error::InvalidAddress {
            backend: Backend::Postgres,
            var: Backend::Postgres.env_var(),
            reason: format!("{e} (in {})", server::redact(address)),
        })?;
        // The last digits of a UUIDv7 are random; the first are a timestamp.
        let suffix = crate::unique_suffix();
        let name = format!("{}_{}", self.name, &suffix[suffix.len() - 12..]);
        let service_error = |source| Error::Service {
            service: name.clone(),
            source: Box::new(source),
        };
        let service = PgService::new(ServiceName::new(name.clone()).map_err(service_error)?);
        let owner = Password::new(OWNER_PASSWORD).map_err(service_error)?;
        let runtime = Password::new(RUNTIME_PASSWORD).map_err(service_error)?;
        let mut test = TestService {
            service,
            admin,
            owner,
            runtime,
            pool: None,
        };
        // From here on, dropping `test` removes whatever was provisioned, also when a
        // step fails.
        let migrations = self
            .components
            .iter()
            .fold(test.service.migrations(), |m, (name, migrator)| {
                m.component(name, migrator)
            });
        let pool = test
            .service
            .prepare(
                &test.admin,
                &test.owner,
                &test.runtime,
                &migrations,
                PgPoolOptions::new().max_connections(8),
            )
            .await
            .map_err(service_error)?;
        test.pool = Some(pool);
        Ok(test)
    }
}

/// A service's own database with its owner and runtime roles, provisioned and migrated for
/// one test and removed — database and roles — when dropped (also when the test panics).
pub struct TestService {
    service: PgService,
    admin: PgConnectOptions,
    owner: Password,
    runtime: Password,
    pool: Option<PgPool>,
}

impl std::fmt::Debug for TestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestService")
            .field("service", &self.service.service())
            .finish_non_exhaustive()
    }
}

impl TestService {
    /// The service's unique name (`<name>_<suffix>`), also its database's name.
    pub fn name(&self) -> &ServiceName {
        self.service.service()
    }

    /// The provisioning of the service (roles, database, schema).
    pub fn service(&self) -> &PgService {
        &self.service
    }

    /// A pool connected as the service's runtime role.
    pub fn pool(&self) -> &PgPool {
        self.pool.as_ref().expect("a started test service always has its pool")
    }

    /// Connect options for the runtime role.
    pub fn runtime_options(&self) -> PgConnectOptions {
        self.service.runtime_options(&self.admin, &self.runtime)
    }

    /// Connect options for the owner role.
    pub fn owner_options(&self) -> PgConnectOptions {
        self.service.owner_options(&self.admin, &self.owner)
    }

    /// Connect options for the server's administrative role on the service's database.
    pub fn admin_options(&self) -> PgConnectOptions {
        self.service.admin_options(&self.admin)
    }

    /// The server's administrative connect options (for provisioning further services).
    pub fn server_options(&self) -> &PgConnectOptions {
        &self.admin
    }

    /// The owner and runtime roles' passwords (to hand the service's own start-up the
    /// same credentials).
    pub fn passwords(&self) -> (&Password, &Password) {
        (&self.owner, &self.runtime)
    }

    /// Waits until the service's outbox (`dbps_outbox`) holds no message waiting to be
    /// published — parked ones aside: its relay has drained it.
    pub async fn outbox_drained(&self) -> Result<()> {
        crate::eventually("the service's outbox to drain", || async {
            let (waiting,): (i64,) =
                sqlx::query_as("select count(*) from dbps_outbox where published_at is null and parked_at is null")
                    .fetch_one(self.pool())
                    .await?;
            Ok::<_, sqlx::Error>(waiting == 0)
        })
        .await
    }

    /// A migration runner for this service (to apply further components).
    pub fn migrations(&self) -> PgMigrations {
        self.service.migrations()
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        let service = self.service.clone();
        let admin = self.admin.clone();
        // The pool's connections live on the test's runtime; deprovisioning ends them
        // from the server side (DROP DATABASE ... WITH (FORCE)).
        self.pool = None;
        crate::run_cleanup("a test service", async move {
            service.deprovision(&admin).await.map_err(|e| e.to_string())
        });
    }
}
