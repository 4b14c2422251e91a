//! The relay under a service's own Kafka principal on the stack's secured listener
//! (SASL_SSL, ACLs enforced): a message for a topic the service may not write stops the
//! relay with an error naming the topic and the principal; nothing is parked, and the
//! refused message stays in the outbox until the ACL (or the message's topic) is fixed.

mod common;

use std::time::Duration;

use common::TestResult;
use dbps_core::Message;
use dbps_core::kafka::{KafkaPublisher, TopicSpec, ensure_topics};
use dbps_migrate::kafka::KafkaAccess;
use dbps_migrate::{Password, ServiceName};
use dbps_outbox::pg::{MIGRATOR, PgOutbox, PgOutboxStore};
use dbps_outbox::{OutboxError, OutboxStore as _, Relay};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PriceChanged {
    sku: String,
    cents: i64,
}

impl Message for PriceChanged {
    const TYPE: &'static str = "catalog.PriceChanged";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_service_may_not_write_stops_the_relay_and_parks_nothing() -> TestResult {
    let stack = dbps_testkit::secure()?;
    let admin = stack.kafka_admin();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let suffix = &id[id.len() - 10..];
    let service = ServiceName::new(format!("catalog_{suffix}"))?;
    let own = format!("{service}.product.events");
    let foreign = format!("pricing_{suffix}.price.events");
    ensure_topics(&admin, &[TopicSpec::new(&own, 1), TopicSpec::new(&foreign, 1)]).await?;
    let access = KafkaAccess::new(service.clone());
    let password = Password::new(format!("p-{}", uuid::Uuid::new_v4()))?;
    access.provision(&admin, &password).await?;

    let db = dbps_testkit::postgres().await?;
    MIGRATOR.run(db.pool()).await?;
    let outbox = PgOutbox::new(service.as_str());
    let mut tx = db.pool().begin().await?;
    for (topic, sku) in [(&own, "sku-1"), (&foreign, "sku-2"), (&own, "sku-3")] {
        let price = PriceChanged {
            sku: sku.to_owned(),
            cents: 100,
        };
        let envelope = dbps_core::Envelope::event(service.as_str(), "product", sku, &price)?;
        outbox.enqueue(&mut tx, topic, envelope).await?;
    }
    tx.commit().await?;

    let config = access.client_config(&admin, &password);
    let publisher = KafkaPublisher::builder(config).build()?;
    let store = PgOutboxStore::new(db.pool().clone());
    let relay = Relay::builder(store.clone(), publisher)
        .rebalance_interval(Duration::from_millis(200))
        .retry_delay(Duration::from_millis(50))
        .build()?;
    let error = tokio::time::timeout(Duration::from_secs(60), relay.run(dbps_core::CancellationToken::new()))
        .await
        .expect("the relay stops by itself")
        .expect_err("a refused topic stops the relay");

    let shown = dbps_core::ErrorChain(&error).to_string();
    assert!(
        matches!(error, OutboxError::Publish(dbps_core::Error::Refused { .. })),
        "{shown}"
    );
    assert!(!error.is_transient(), "{shown}");
    assert!(
        shown.contains(&format!(
            "kafka refused User:{service} to produce to {foreign}: not authorised on the topic"
        )),
        "{shown}"
    );
    let backlog = store.backlog().await?;
    assert_eq!(backlog.parked, 0, "nothing is parked for a missing ACL");
    // The refused message waits in the outbox; a message of the same batch after it may
    // wait too (it is published again: at least once).
    assert!((1..=2).contains(&backlog.pending), "{backlog:?}");

    access.revoke(&admin).await?;
    Ok(())
}
