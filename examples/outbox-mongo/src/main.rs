//! The outbox on MongoDB without transactions: an email document and its events are one
//! single-document write — stored together or not at all — and the relay publishes the
//! events to Kafka in write order.
//!
//! Run with: `scripts/stack.sh up && eval "$(scripts/stack.sh env)" && cargo run -p example-outbox-mongo`
#![allow(clippy::print_stdout)] // An example talks to its reader.

use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicSpec};
use dbps_core::{CancellationToken, Message};
use dbps_outbox::mongo::{MongoOutbox, MongoOutboxStore};
use dbps_outbox::{OutboxStore, Relay};
use mongodb::bson::{Document, doc};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct EmailQueued {
    to: String,
}

impl Message for EmailQueued {
    const TYPE: &'static str = "example_email.EmailQueued";
}

#[derive(Serialize, Deserialize)]
struct EmailSent {
    attempt: i32,
}

impl Message for EmailSent {
    const TYPE: &'static str = "example_email.EmailSent";
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(std::env::var("DBPS_MONGODB_URI")?).await?;
    let kafka = KafkaConfig::new(std::env::var("DBPS_KAFKA_BROKERS")?);
    let db = client.database("example_email");
    let emails = db.collection::<Document>("emails");

    // The document and its first event in one write; then an update with another event.
    let outbox = MongoOutbox::new("example_email");
    let id = format!("e-{}", std::process::id());
    let queued = outbox.event(
        "email",
        &EmailQueued {
            to: "ada@example.com".into(),
        },
    )?;
    outbox
        .insert_with_events(&emails, doc! { "_id": &id, "state": "queued" }, [queued])
        .await?;
    let sent = outbox.event("email", &EmailSent { attempt: 1 })?;
    let written = outbox
        .update_with_events(
            &emails,
            doc! { "_id": &id },
            doc! { "$set": { "state": "sent" } },
            [sent],
        )
        .await?;
    println!(
        "email {id} stored with its events (last sequence {:?})",
        written.enqueued[0].sequence
    );

    // The relay reads the events out of the documents and marks them once Kafka has them.
    let store = MongoOutboxStore::new(db.clone()).collection("emails");
    store.create_indexes().await?; // once, with the service's migrations
    let relay = Relay::builder(store.clone(), KafkaPublisher::builder(kafka).build()?)
        .create_topics([TopicSpec::new("example_email.email.events", 3)])
        .build()?;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(relay.run(stop.clone()));
    while store.backlog().await?.pending > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let summary = relay.await??;
    println!(
        "relay published {} event(s) to example_email.email.events",
        summary.published
    );
    Ok(())
}
