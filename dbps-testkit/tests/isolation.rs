//! The testkit's own promises: tests share servers but never data, and what a test
//! creates is removed when its handle drops.

use std::time::Duration;

use mongodb::bson::{Document, doc};
use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use redis::AsyncCommands;
use sqlx::ConnectOptions;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Two "tests" run concurrently, each writing the same table name and value slots;
/// each sees only its own row.
#[tokio::test]
async fn parallel_postgres_databases_are_separate() -> TestResult {
    let (a, b) = tokio::try_join!(dbps_testkit::postgres(), dbps_testkit::postgres())?;
    assert_ne!(a.name(), b.name());
    for (pg, who) in [(&a, "a"), (&b, "b")] {
        sqlx::query("create table t (who text)").execute(pg.pool()).await?;
        sqlx::query("insert into t values ($1)")
            .bind(who)
            .execute(pg.pool())
            .await?;
    }
    for (pg, who) in [(&a, "a"), (&b, "b")] {
        let rows: Vec<(String,)> = sqlx::query_as("select who from t").fetch_all(pg.pool()).await?;
        assert_eq!(rows, vec![(who.to_owned(),)]);
    }
    Ok(())
}

#[tokio::test]
async fn postgres_database_dropped_with_handle() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let name = pg.name().to_owned();
    let admin = pg.admin_options().clone();
    drop(pg);
    let mut conn = admin.connect().await?;
    let (exists,): (bool,) = sqlx::query_as("select exists (select 1 from pg_database where datname = $1)")
        .bind(&name)
        .fetch_one(&mut conn)
        .await?;
    assert!(!exists, "database {name} still exists after its handle dropped");
    Ok(())
}

#[tokio::test]
async fn parallel_redis_prefixes_are_separate() -> TestResult {
    let (a, b) = tokio::try_join!(dbps_testkit::redis(), dbps_testkit::redis())?;
    assert_ne!(a.prefix(), b.prefix());
    let _: () = a.connection().set(a.key("k"), "a").await?;
    let _: () = b.connection().set(b.key("k"), "b").await?;
    let from_a: String = a.connection().get(a.key("k")).await?;
    let from_b: String = b.connection().get(b.key("k")).await?;
    assert_eq!((from_a.as_str(), from_b.as_str()), ("a", "b"));

    // Dropping a removes a's keys and leaves b's.
    let a_key = a.key("k");
    drop(a);
    let mut conn = b.connection();
    let a_left: bool = conn.exists(&a_key).await?;
    assert!(!a_left, "{a_key} survived its handle");
    let b_left: bool = conn.exists(b.key("k")).await?;
    assert!(b_left);
    Ok(())
}

#[tokio::test]
async fn parallel_mongo_databases_are_separate() -> TestResult {
    let (a, b) = tokio::try_join!(dbps_testkit::mongo(), dbps_testkit::mongo())?;
    assert_ne!(a.database().name(), b.database().name());
    a.database()
        .collection::<Document>("c")
        .insert_one(doc! { "who": "a" })
        .await?;
    b.database()
        .collection::<Document>("c")
        .insert_one(doc! { "who": "b" })
        .await?;
    let in_a = a
        .database()
        .collection::<Document>("c")
        .find_one(doc! {})
        .await?
        .ok_or("empty")?;
    assert_eq!(in_a.get_str("who")?, "a");
    assert_eq!(
        a.database()
            .collection::<Document>("c")
            .count_documents(doc! {})
            .await?,
        1
    );

    let name = a.database().name().to_owned();
    let client = b.client().clone();
    drop(a);
    let names = client.list_database_names().await?;
    assert!(!names.contains(&name), "{name} still listed after its handle dropped");
    Ok(())
}

#[tokio::test]
async fn kafka_topics_are_prefixed_and_deleted_with_handle() -> TestResult {
    let (a, b) = tokio::try_join!(dbps_testkit::kafka(), dbps_testkit::kafka())?;
    let ta = a.create_topic("orders", 2).await?;
    let tb = b.create_topic("orders", 2).await?;
    assert_ne!(ta, tb);
    assert!(ta.ends_with("orders") && tb.ends_with("orders"));

    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", b.brokers()).create()?;
    let topic_exists = |name: String| {
        let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10));
        metadata.map(|m| m.topics().iter().any(|t| t.name() == name && t.error().is_none()))
    };
    assert!(topic_exists(ta.clone())?);
    drop(a);
    dbps_testkit::eventually(&format!("{ta} to be deleted"), || {
        let exists = topic_exists(ta.clone());
        async move { exists.map(|exists| !exists) }
    })
    .await?;
    assert!(topic_exists(tb.clone())?, "{tb} deleted with the other handle");
    Ok(())
}
