//! An idempotent consumer: the consumer runner reads `StockReceived` events, and the inbox
//! applies each one exactly once — the effect and the inbox record commit together — even
//! when Kafka delivers it twice.
//!
//! Run with: `scripts/stack.sh up && eval "$(scripts/stack.sh env)" && cargo run -p example-inbox-consumer`
#![allow(clippy::print_stdout)] // An example talks to its reader.

use std::str::FromStr;
use std::time::Duration;

use dbps_core::inbox::pg::{PgInbox, TypedTxHandler};
use dbps_core::kafka::{ConsumerRunner, HandlerError, KafkaConfig, KafkaPublisher, TopicSpec, ensure_topics};
use dbps_core::{CancellationToken, Envelope, Message, Typed, message_set};
use dbps_migrate::{Password, PgService, ServiceName};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Serialize, Deserialize)]
struct StockReceived {
    sku: String,
    quantity: i64,
}

impl Message for StockReceived {
    const TYPE: &'static str = "warehouse.StockReceived";
}

message_set! {
    /// What this consumer handles.
    #[derive(Debug)]
    enum WarehouseEvent {
        Received(StockReceived),
    }
}

/// Adds received stock, inside the inbox's transaction.
struct AddStock;

impl TypedTxHandler<WarehouseEvent> for AddStock {
    async fn handle(&self, conn: &mut PgConnection, event: WarehouseEvent, _: &Envelope) -> Result<(), HandlerError> {
        let WarehouseEvent::Received(received) = event;
        sqlx::query("insert into stock values ($1, $2) on conflict (sku) do update set on_hand = stock.on_hand + $2")
            .bind(&received.sku)
            .bind(received.quantity)
            .execute(conn)
            .await?; // database errors are retried or dead-lettered by their kind
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin = PgConnectOptions::from_str(&std::env::var("DBPS_POSTGRES_URL")?)?;
    let kafka = KafkaConfig::new(std::env::var("DBPS_KAFKA_BROKERS")?);
    let service = PgService::new(ServiceName::new("example_stock")?);
    let migrations = service
        .migrations()
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("stock", &MIGRATOR);
    let (owner, runtime) = (Password::new("owner-dev")?, Password::new("runtime-dev")?);
    let pool = service
        .prepare(&admin, &owner, &runtime, &migrations, PgPoolOptions::new())
        .await?;
    sqlx::query("delete from stock").execute(&pool).await?; // a fresh count for each run

    // Three deliveries of two events: the second is delivered twice.
    let topic = "example_warehouse.stock.events";
    ensure_topics(&kafka, &[TopicSpec::new(topic, 1)]).await?;
    let received = |quantity| {
        let event = StockReceived {
            sku: "sku-1".into(),
            quantity,
        };
        Envelope::event("example_warehouse", "stock", "sku-1", &event)
    };
    let (first, second) = (received(5)?, received(2)?);
    let publisher = KafkaPublisher::builder(kafka.clone()).build()?;
    for envelope in [&first, &second, &second] {
        publisher.publish(topic, envelope).await?;
    }

    // A fresh group per run reads the topic from its start; the inbox remembers what it
    // applied under its consumer name, so a second run applies nothing again.
    let group = format!("example_stock.{}", std::process::id());
    let inbox = PgInbox::new(pool.clone(), "example_stock.stock", Typed::new(AddStock));
    let runner = ConsumerRunner::builder(kafka, &group, inbox)
        .topic(topic)
        .create_topics(|name| TopicSpec::new(name, 1)) // the dead-letter topic
        .build()?;
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(runner.run(stop.clone()));
    let on_hand = loop {
        let row: Option<(i64,)> = sqlx::query_as("select on_hand from stock where sku = 'sku-1'")
            .fetch_optional(&pool)
            .await?;
        if row.is_some_and(|(n,)| n >= 7) || consumer.is_finished() {
            break row.map_or(0, |(n,)| n);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.cancel();
    let summary = consumer.await??;
    println!(
        "handled {} deliveries; sku-1 on hand: {on_hand} (5 + 2)",
        summary.handled
    );
    anyhow::ensure!(on_hand == 7, "expected 7 on hand");
    Ok(())
}
