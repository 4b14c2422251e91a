//! The transactional outbox on PostgreSQL: an order and its `OrderPlaced` event commit in
//! one transaction, and the relay gets the event onto Kafka, at least once, in order.
//!
//! Run with: `scripts/stack.sh up && eval "$(scripts/stack.sh env)" && cargo run -p example-outbox-pg`
#![allow(clippy::print_stdout)] // An example talks to its reader.

use std::str::FromStr;
use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicSpec};
use dbps_core::{CancellationToken, Message};
use dbps_migrate::{Password, PgService, ServiceName};
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use dbps_outbox::{OutboxStore, Relay};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The service's own migrations: the `orders` table.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: i64,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "orders.OrderPlaced";
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin = PgConnectOptions::from_str(&std::env::var("DBPS_POSTGRES_URL")?)?;
    let kafka = KafkaConfig::new(std::env::var("DBPS_KAFKA_BROKERS")?);

    // The service's own database: provisioned, migrated as its owner (the outbox's tables
    // are one component), used as its runtime role.
    let service = PgService::new(ServiceName::new("example_orders")?);
    let migrations = service
        .migrations()
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component("orders", &MIGRATOR);
    let (owner, runtime) = (Password::new("owner-dev")?, Password::new("runtime-dev")?);
    let pool = service
        .prepare(&admin, &owner, &runtime, &migrations, PgPoolOptions::new())
        .await?;

    // The order and its event: both or neither.
    let outbox = PgOutbox::new("example_orders");
    let mut tx = pool.begin().await?;
    let (order_id,): (String,) = sqlx::query_as("insert into orders (total_cents) values (4200) returning id::text")
        .fetch_one(&mut *tx)
        .await?;
    let event = OrderPlaced {
        order_id: order_id.clone(),
        total_cents: 4200,
    };
    let enqueued = outbox.enqueue_event(&mut tx, "order", &order_id, &event).await?;
    tx.commit().await?;
    println!(
        "order {order_id} committed with its event (sequence {:?})",
        enqueued.sequence
    );

    // The relay: creates the events topic if needed, publishes, stops on the token.
    let store = PgOutboxStore::new(pool.clone());
    let publisher = KafkaPublisher::builder(kafka).build()?;
    let relay = Relay::builder(store.clone(), publisher)
        .create_topics([TopicSpec::new("example_orders.order.events", 3)])
        .build()?;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(relay.run(stop.clone()));
    while store.backlog().await?.pending > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let summary = relay.await??;
    println!(
        "relay published {} message(s) to example_orders.order.events",
        summary.published
    );
    Ok(())
}
