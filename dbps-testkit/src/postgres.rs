use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};

use crate::error::{Error, Result};
use crate::server::{self, Backend};

/// A fresh PostgreSQL database for one test, dropped when this handle is dropped.
///
/// The server comes from `DBPS_POSTGRES_URL` (or a container); the role in that URL must
/// be allowed to create databases. The test's own pool connects as the same role.
pub struct TestPostgres {
    name: String,
    admin: PgConnectOptions,
    url: String,
    pool: PgPool,
}

/// Connection options carry the password, so `Debug` shows only the database.
impl std::fmt::Debug for TestPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPostgres")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Creates a fresh database on the shared PostgreSQL server.
pub async fn postgres() -> Result<TestPostgres> {
    let address = server::address(Backend::Postgres).await?;
    let invalid = |reason: String| Error::InvalidAddress {
        backend: Backend::Postgres,
        var: Backend::Postgres.env_var(),
        reason,
    };
    let admin = PgConnectOptions::from_str(address)
        .map_err(|e| invalid(format!("{e} (in {})", server::redact(address))))?
        .disable_statement_logging();
    let name = format!("dbps_t_{}", crate::unique_suffix());
    let pg_error = |source| Error::Postgres {
        database: name.clone(),
        source,
    };

    let mut conn = admin.connect().await.map_err(pg_error)?;
    // The name is generated above from a UUID, so quoting it is enough.
    conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#))))
        .await
        .map_err(pg_error)?;
    conn.close().await.map_err(pg_error)?;

    let options = admin.clone().database(&name);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(pg_error)?;
    let url = with_database(address, &name);
    tracing::debug!(database = %name, server = %server::redact(address), "created test database");
    Ok(TestPostgres { name, admin, url, pool })
}

impl TestPostgres {
    /// A pool connected to this test's database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection URL for this test's database (it contains the password: keep it out
    /// of logs).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connection options for the server's administrative role, for tests that create
    /// roles or further databases (remove what you create).
    pub fn admin_options(&self) -> &PgConnectOptions {
        &self.admin
    }

    /// A [`crate::FaultyLink`] to this test's server: connect to
    /// `link.url(db.url())` to go through it.
    ///
    /// # Errors
    ///
    /// The server's address does not resolve, or no local port could be opened.
    pub async fn faulty_link(&self) -> Result<crate::FaultyLink> {
        let host = self.admin.get_host();
        let port = self.admin.get_port();
        let upstream = tokio::net::lookup_host((host, port))
            .await
            .map_err(crate::Error::Link)?
            .next()
            .ok_or_else(|| {
                crate::Error::Link(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host}:{port} has no address"),
                ))
            })?;
        crate::FaultyLink::start(upstream).await
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        let admin = self.admin.clone();
        // The pool's connections live on the test's runtime, which is blocked while the
        // cleanup runs; FORCE ends them from the server side instead.
        crate::run_cleanup("a postgres test database", async move {
            let mut conn = admin.connect().await.map_err(|e| e.to_string())?;
            // FORCE ends connections the test may have leaked (PostgreSQL 13 and later).
            conn.execute(sqlx::raw_sql(AssertSqlSafe(format!(
                r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
            ))))
            .await
            .map_err(|e| format!("{name}: {e}"))?;
            conn.close().await.map_err(|e| e.to_string())
        });
    }
}

/// `url` with its database path replaced by `database`, query string kept.
fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (authority_and_path, query) = match rest.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (rest, None),
    };
    let authority = authority_and_path
        .split_once('/')
        .map_or(authority_and_path, |(a, _)| a);
    match query {
        Some(query) => format!("{scheme}://{authority}/{database}?{query}"),
        None => format!("{scheme}://{authority}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_replaced_in_url() {
        assert_eq!(
            with_database("postgres://u:p@h:1/postgres", "t1"),
            "postgres://u:p@h:1/t1"
        );
        assert_eq!(with_database("postgres://u:p@h:1", "t1"), "postgres://u:p@h:1/t1");
        assert_eq!(
            with_database("postgresql://h/db?sslmode=disable", "t1"),
            "postgresql://h/t1?sslmode=disable"
        );
    }
}
