//! A service's ACL user on the stack's Redis, over TLS (the server verified against the
//! stack's CA): its own keys only, the commands dbps uses only, and the errors a user sees
//! otherwise.

use dbps_migrate::redis::RedisAccess;
use dbps_migrate::{Password, ServiceName};
use redis::AsyncCommands as _;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn suffix() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 10..].to_owned()
}

#[tokio::test]
async fn a_service_reads_and_writes_only_its_own_keys_with_the_commands_dbps_uses() -> TestResult {
    let stack = dbps_testkit::secure()?;
    let admin = stack.redis_admin()?;
    let suffix = suffix();
    let quote = RedisAccess::new(ServiceName::new(format!("quote_{suffix}"))?);
    let customer = RedisAccess::new(ServiceName::new(format!("customer_{suffix}"))?);
    let quote_password = Password::new(format!("q-{}", uuid::Uuid::new_v4()))?;
    let customer_password = Password::new(format!("c-{}", uuid::Uuid::new_v4()))?;
    quote.provision(&admin, &quote_password).await?;
    quote.provision(&admin, &quote_password).await?; // idempotent
    customer.provision(&admin, &customer_password).await?;

    let customer_key = format!("customer_{suffix}:customer:c-1");
    let mut as_customer = stack
        .redis_as(Some((customer.user_name(), customer_password.expose_secret())))?
        .get_multiplexed_async_connection()
        .await?;
    let () = as_customer.set(&customer_key, "{\"name\":\"Ada\"}").await?;

    let mut as_quote = stack
        .redis_as(Some((quote.user_name(), quote_password.expose_secret())))?
        .get_multiplexed_async_connection()
        .await?;
    let own_key = format!("quote_{suffix}:quote:q-1");
    let () = as_quote.set(&own_key, "draft").await?;
    let value: Option<String> = as_quote.get(&own_key).await?;
    assert_eq!(value.as_deref(), Some("draft"));

    // Another service's key: read and write refused with NOPERM.
    let error = as_quote
        .get::<_, Option<String>>(&customer_key)
        .await
        .expect_err("quote may not read customer's keys");
    assert_eq!(error.code(), Some("NOPERM"), "{error}");
    assert!(
        error.to_string().contains("no permissions to access one of the keys"),
        "{error}"
    );
    let error = as_quote
        .set::<_, _, ()>(&customer_key, "forged")
        .await
        .expect_err("quote may not write customer's keys");
    assert_eq!(error.code(), Some("NOPERM"), "{error}");
    let value: Option<String> = as_customer.get(&customer_key).await?;
    assert_eq!(
        value.as_deref(),
        Some("{\"name\":\"Ada\"}"),
        "the forged write did not land"
    );

    // A command dbps does not use: refused, even on its own keys.
    let error = redis::cmd("KEYS")
        .arg("*")
        .query_async::<Vec<String>>(&mut as_quote)
        .await
        .expect_err("KEYS is not in the user's commands");
    assert_eq!(error.code(), Some("NOPERM"), "{error}");
    assert!(
        error.to_string().contains("no permissions to run the 'keys' command"),
        "{error}"
    );

    // Revoked: the user cannot sign in any more.
    assert!(quote.revoke(&admin).await?);
    assert!(!quote.revoke(&admin).await?, "revoking twice is fine");
    let error = stack
        .redis_as(Some((quote.user_name(), quote_password.expose_secret())))?
        .get_multiplexed_async_connection()
        .await
        .expect_err("a revoked user cannot sign in");
    assert!(error.to_string().contains("Password authentication failed"), "{error}");
    customer.revoke(&admin).await?;
    let () = redis::cmd("DEL")
        .arg(&customer_key)
        .arg(&own_key)
        .query_async(&mut stack.redis_admin()?.get_multiplexed_async_connection().await?)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_password_and_a_plaintext_client_on_the_tls_port_are_refused() -> TestResult {
    let stack = dbps_testkit::secure()?;
    let admin = stack.redis_admin()?;
    let access = RedisAccess::new(ServiceName::new(format!("quote_{}", suffix()))?);
    access.provision(&admin, &Password::new("right-password")?).await?;

    let error = stack
        .redis_as(Some((access.user_name(), "wrong-password")))?
        .get_multiplexed_async_connection()
        .await
        .expect_err("a wrong password is refused");
    assert!(error.to_string().contains("Password authentication failed"), "{error}");
    assert!(
        !error.to_string().contains("wrong-password"),
        "the password is not shown: {error}"
    );

    // Plain TCP to the TLS port: the handshake never happens, the connection fails.
    let tls_url = std::env::var("DBPS_REDIS_TLS_URL")?;
    let plaintext = tls_url.replacen("rediss://", "redis://", 1);
    let client = redis::Client::open(plaintext.as_str())?;
    let attempt = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut connection).await
    })
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "a plaintext client got an answer on the TLS port"
    );
    access.revoke(&admin).await?;
    Ok(())
}
