//! Each backend round-trips real data through the client crate dbps uses.

use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{Document, doc};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::AsyncCommands;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn postgres_insert_and_select() -> Result<(), Box<dyn std::error::Error>> {
    let pg = dbps_testkit::postgres().await?;
    sqlx::query("create table customers (id bigint primary key, name text not null)")
        .execute(pg.pool())
        .await?;
    sqlx::query("insert into customers (id, name) values ($1, $2), ($3, $4)")
        .bind(1_i64)
        .bind("Ada")
        .bind(2_i64)
        .bind("Grace")
        .execute(pg.pool())
        .await?;
    let rows: Vec<(i64, String)> = sqlx::query_as("select id, name from customers order by id")
        .fetch_all(pg.pool())
        .await?;
    assert_eq!(rows, vec![(1, String::from("Ada")), (2, String::from("Grace"))]);

    // The stack runs PostgreSQL the way the outbox and the benchmarks need it.
    let (wal_level,): (String,) = sqlx::query_as("show wal_level").fetch_one(pg.pool()).await?;
    assert_eq!(wal_level, "logical");
    let (commit_ts,): (String,) = sqlx::query_as("show track_commit_timestamp")
        .fetch_one(pg.pool())
        .await?;
    assert_eq!(commit_ts, "on");
    Ok(())
}

#[tokio::test]
async fn redis_set_get_with_ttl() -> Result<(), Box<dyn std::error::Error>> {
    let redis = dbps_testkit::redis().await?;
    let mut conn = redis.connection();
    let key = redis.key("stock:sku-1");
    let _: () = conn.set_ex(&key, "42", 60).await?;
    let value: Option<String> = conn.get(&key).await?;
    assert_eq!(value.as_deref(), Some("42"));
    let ttl: i64 = conn.ttl(&key).await?;
    assert!((1..=60).contains(&ttl), "ttl was {ttl}");

    // A key whose TTL runs out is gone.
    let short = redis.key("short");
    let _: () = conn.pset_ex(&short, "x", 50).await?;
    dbps_testkit::eventually("a key with a 50 ms ttl to expire", || {
        let mut conn = conn.clone();
        let short = short.clone();
        async move { conn.exists::<_, bool>(&short).await.map(|exists| !exists) }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn kafka_produce_and_consume_on_fresh_topic() -> Result<(), Box<dyn std::error::Error>> {
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("roundtrip", 3).await?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    for i in 0..10 {
        let payload = format!("event-{i}");
        producer
            .send(FutureRecord::to(&topic).key("customer-1").payload(&payload), DEADLINE)
            .await
            .map_err(|(e, _)| e)?;
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", kafka.group_id("roundtrip"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut received = Vec::new();
    let mut stream = consumer.stream();
    while received.len() < 10 {
        let message = tokio::time::timeout(DEADLINE, stream.next())
            .await?
            .ok_or("stream ended")??;
        assert_eq!(message.key(), Some(&b"customer-1"[..]));
        received.push(String::from_utf8(message.payload().unwrap_or_default().to_vec())?);
    }
    // One key, so one partition, so the order of sending.
    let expected: Vec<String> = (0..10).map(|i| format!("event-{i}")).collect();
    assert_eq!(received, expected);
    Ok(())
}

#[tokio::test]
async fn mongo_insert_and_find() -> Result<(), Box<dyn std::error::Error>> {
    let mongo = dbps_testkit::mongo().await?;
    let emails = mongo.database().collection::<Document>("emails");
    emails
        .insert_many([
            doc! { "_id": "e1", "subject": "Quote 17", "customer_id": "c1" },
            doc! { "_id": "e2", "subject": "Invoice", "customer_id": "c2" },
        ])
        .await?;
    let found = emails
        .find_one(doc! { "customer_id": "c1" })
        .await?
        .ok_or("no document found")?;
    assert_eq!(found.get_str("_id")?, "e1");
    assert_eq!(found.get_str("subject")?, "Quote 17");
    assert_eq!(emails.count_documents(doc! {}).await?, 2);
    Ok(())
}
