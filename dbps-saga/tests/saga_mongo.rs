//! The MongoDB participant against the local MongoDB-protocol server and Kafka: a command's
//! effect and its reply in one insert, applied once, the reply relayed to the saga's reply
//! topic.

use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher, decode_record};
use dbps_core::{CancellationToken, Envelope, Handler, HandlerError, Message, message_set};
use dbps_outbox::Relay;
use dbps_outbox::mongo::{MongoOutbox, MongoOutboxStore};
use dbps_saga::{MongoCommandHandler, MongoParticipant, Reply};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use serde::{Deserialize, Serialize};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReserveStock {
    quote: String,
    qty: i64,
}
impl Message for ReserveStock {
    const TYPE: &'static str = "inventory.ReserveStock";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StockReserved {
    reservation: String,
}
impl Message for StockReserved {
    const TYPE: &'static str = "inventory.StockReserved";
}

message_set! { enum Commands { Reserve(ReserveStock) } }

struct Reservations;

impl MongoCommandHandler<Commands> for Reservations {
    async fn handle(&self, command: Commands, envelope: &Envelope) -> Result<(Document, Reply), HandlerError> {
        let Commands::Reserve(reserve) = command;
        let document = doc! { "quote": &reserve.quote, "qty": reserve.qty, "saga": &envelope.aggregate_id };
        Ok((
            document,
            Reply::new(&StockReserved {
                reservation: envelope.id.clone(),
            })?,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_applied_once_and_its_reply_leaves_through_the_documents_outbox() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let kafka = dbps_testkit::kafka().await?;
    let replies = kafka.create_topic("quote.replies", 1).await?;
    let naming = kafka.naming();
    let collection = mongo.database().collection::<Document>("reservations");
    let participant = MongoParticipant::new(
        MongoOutbox::new("inventory").naming(naming),
        collection.clone(),
        Reservations,
    );
    let saga = uuid::Uuid::now_v7().to_string();
    let mut command = Envelope::command(
        "quote",
        &saga,
        &replies,
        &ReserveStock {
            quote: "q1".into(),
            qty: 3,
        },
    )?;
    command.correlation_id = Some(saga.clone());
    assert!(participant.apply(&command).await?);
    // Delivered again: the document is there, nothing is applied or replied twice.
    assert!(!participant.apply(&command).await?);
    let documents: Vec<Document> = collection.find(doc! {}).await?.try_collect().await?;
    assert_eq!(documents.len(), 1);
    assert_eq!(documents[0].get_str("_id")?, command.id);

    // The relay publishes the reply from the document's outbox.
    let store = MongoOutboxStore::new(mongo.database().clone()).collection("reservations");
    store.create_indexes().await?;
    let relay = Relay::builder(
        store,
        KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?,
    )
    .poll_interval(Duration::from_millis(50))
    .build()?;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(relay.run(stop.clone()));
    let mut reader = kafka.reader(&replies)?;
    let records = reader.wait_for(1).await?.to_vec();
    stop.cancel();
    relay.await??;
    let reply = decode_record(&records[0])?;
    assert_eq!(reply.message_type, StockReserved::TYPE);
    assert_eq!(reply.causation_id.as_deref(), Some(command.id.as_str()));
    assert_eq!(reply.correlation_id.as_deref(), Some(saga.as_str()));
    assert_eq!(reply.aggregate_id, saga);

    // A command without a reply topic is refused for good (dead-lettered by the runner).
    let mut orphan = command.clone();
    orphan.id = uuid::Uuid::now_v7().to_string();
    orphan.reply_to = None;
    let refused = participant.handle(&orphan).await.unwrap_err();
    assert!(!refused.is_transient());
    Ok(())
}
