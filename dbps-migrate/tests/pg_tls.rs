//! PostgreSQL over TLS with `sslmode=verify-full` against the stack's CA, as a service's
//! URL says it.

use sqlx::Connection as _;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test]
async fn a_verify_full_url_connects_over_tls_and_an_untrusted_server_is_refused() -> TestResult {
    let stack = dbps_testkit::secure()?;
    let mut connection = sqlx::PgConnection::connect(stack.postgres_url()).await?;
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&mut connection)
        .await?;
    assert!(ssl, "the connection is encrypted");
    connection.close().await?;

    // Without the stack's CA the server's certificate cannot be verified: refused.
    let untrusted = stack
        .postgres_url()
        .split_once("&sslrootcert=")
        .map_or_else(|| stack.postgres_url().to_owned(), |(url, _)| url.to_owned());
    let error = sqlx::PgConnection::connect(&untrusted)
        .await
        .expect_err("a server signed by an unknown CA is refused under verify-full");
    let shown = error.to_string();
    assert!(shown.contains("invalid peer certificate: UnknownIssuer"), "{shown}");
    Ok(())
}
