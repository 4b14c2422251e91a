//! The MongoDB outbox and its relay, against the stack's MongoDB-protocol server (which,
//! like a standalone MongoDB, has neither multi-document transactions nor change streams)
//! and the real Kafka.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{
    DEADLINE, TestResult, TestStore, assert_fetched_only_held_partitions, assert_in_order, drain, fast, header, read,
    start_relay, summarise,
};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicNaming};
use dbps_core::{Envelope, Message, PayloadLimits};
use dbps_outbox::mongo::{
    LEASES_COLLECTION, MongoMessageId, MongoOutbox, MongoOutboxStore, OUTBOX_FIELD, PARKED_FIELD, PENDING_FIELD,
    PUBLISHED_AT_FIELD, PUBLISHED_FIELD, PoisonPolicy, Retention,
};
use dbps_outbox::{Backlog, OutboxError, OutboxStore, Relay};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::{Collection, Database};
use rdkafka::Message as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TenderChanged {
    tender_id: String,
    note: String,
}

impl Message for TenderChanged {
    const TYPE: &'static str = "tender.TenderChanged";
}

fn change(tender: &str, note: &str) -> TenderChanged {
    TenderChanged {
        tender_id: tender.into(),
        note: note.into(),
    }
}

struct Fixture {
    mongo: dbps_testkit::TestMongo,
    kafka: dbps_testkit::TestKafka,
    outbox: MongoOutbox,
    topic: String,
}

impl Fixture {
    fn db(&self) -> &Database {
        self.mongo.database()
    }

    fn tenders(&self) -> Collection<Document> {
        self.db().collection("tenders")
    }

    /// A store over the `tenders` collection, with its index.
    async fn store(&self) -> Result<MongoOutboxStore, OutboxError> {
        let store = MongoOutboxStore::new(self.db().clone()).collection("tenders");
        store.create_indexes().await?;
        Ok(store)
    }

    /// Inserts tender `id` with one `created` event.
    async fn create(&self, id: &str) -> Result<String, OutboxError> {
        let created = self.outbox.event("tender", &change(id, "created"))?;
        let written = self
            .outbox
            .insert_with_events(&self.tenders(), doc! { "_id": id, "state": "open", "n": 0 }, [created])
            .await?;
        Ok(written.enqueued[0].message_id.clone())
    }

    /// Increments `n` of tender `id` with one event.
    async fn bump(&self, id: &str, note: &str) -> Result<String, OutboxError> {
        let event = self.outbox.event("tender", &change(id, note))?;
        let written = self
            .outbox
            .update_with_events(
                &self.tenders(),
                doc! { "_id": id },
                doc! { "$inc": { "n": 1 } },
                [event],
            )
            .await?;
        Ok(written.enqueued[0].message_id.clone())
    }
}

/// A database and a topic for the tender aggregate's events.
async fn fixture(partitions: i32) -> Result<Fixture, Box<dyn std::error::Error + Send + Sync>> {
    let mongo = dbps_testkit::mongo().await?;
    let kafka = dbps_testkit::kafka().await?;
    let topic = kafka.create_topic("tender.tender.events", partitions).await?;
    let naming = TopicNaming::new().events_pattern(topic.clone());
    Ok(Fixture {
        mongo,
        kafka,
        outbox: MongoOutbox::new("tender").naming(naming),
        topic,
    })
}

async fn document(
    collection: &Collection<Document>,
    id: &str,
) -> Result<Document, Box<dyn std::error::Error + Send + Sync>> {
    Ok(collection
        .find_one(doc! { "_id": id })
        .await?
        .ok_or_else(|| format!("document {id} missing"))?)
}

/// Number of messages waiting in the outboxes of a collection.
async fn stored(collection: &Collection<Document>) -> Result<usize, mongodb::error::Error> {
    let documents: Vec<Document> = collection.find(doc! {}).await?.try_collect().await?;
    Ok(documents
        .iter()
        .map(|d| d.get_document(OUTBOX_FIELD).map_or(0, Document::len))
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_and_update_carry_their_events_and_the_relay_publishes_them_in_order() -> TestResult {
    let f = fixture(1).await?;
    let tenders = f.tenders();
    let created = f.outbox.event("tender", &change("t-1", "created"))?;
    let written = f
        .outbox
        .insert_with_events(&tenders, doc! { "_id": "t-1", "state": "open" }, [created])
        .await?;
    assert_eq!(written.document, Bson::String("t-1".into()));
    assert_eq!(written.enqueued[0].sequence, Some(1));

    // Two events and a command in one update: events numbered on, the command unsequenced
    // and keyed by its target.
    let priced = f.outbox.event("tender", &change("t-1", "priced"))?;
    let command = Envelope::command("tender", "supplier-9", "tender.replies", &change("t-1", "quote please"))?;
    let command = f.outbox.message(&f.topic, command)?;
    let closed = f.outbox.event("tender", &change("t-1", "closed"))?;
    let updated = f
        .outbox
        .update_with_events(
            &tenders,
            doc! { "_id": "t-1", "state": "open" },
            doc! { "$set": { "state": "closed" } },
            [priced, command, closed],
        )
        .await?;
    let sequences: Vec<Option<i64>> = updated.enqueued.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, vec![Some(2), None, Some(3)]);

    // Without an _id, the document gets an ObjectId, which is the aggregate id.
    let anonymous = f.outbox.event("tender", &change("?", "created"))?;
    let anonymous = f
        .outbox
        .insert_with_events(&tenders, doc! { "state": "draft" }, [anonymous])
        .await?;
    let Bson::ObjectId(oid) = &anonymous.document else {
        return Err(format!("expected an ObjectId, got {}", anonymous.document).into());
    };

    let store = f.store().await?;
    let lease = store.join().await?;
    assert!(
        !lease.change_stream(),
        "the local server has no change streams: polling"
    );
    store.leave(lease).await?;
    let (summary, records) = drain(fast(store.clone(), f.kafka.brokers())?, &f.kafka, &f.topic, 5).await?;
    assert_eq!(summary.published, 5);

    let seen = summarise(&records);
    let t1: Vec<(String, i64, String)> = seen.iter().filter(|(a, _, _)| a == "t-1").cloned().collect();
    assert_eq!(
        t1,
        vec![
            ("t-1".into(), 1, written.enqueued[0].message_id.clone()),
            ("t-1".into(), 2, updated.enqueued[0].message_id.clone()),
            ("t-1".into(), 3, updated.enqueued[2].message_id.clone()),
        ]
    );
    let command_record = records
        .iter()
        .find(|r| header(r, "ce_id") == Some(updated.enqueued[1].message_id.as_str()))
        .ok_or("command not published")?;
    assert_eq!(command_record.key(), Some("supplier-9".as_bytes()));
    assert_eq!(header(command_record, "ce_messagekind"), Some("command"));
    assert!(seen.iter().any(|(a, s, _)| a == &oid.to_hex() && *s == 1));
    let payload: serde_json::Value = serde_json::from_slice(records[0].payload().unwrap_or_default())?;
    assert_eq!(payload["note"], "created");

    // The business state is there, the outbox fields are gone.
    let t1 = document(&tenders, "t-1").await?;
    assert_eq!(t1.get_str("state")?, "closed");
    assert!(
        !t1.contains_key(OUTBOX_FIELD) && !t1.contains_key(PENDING_FIELD),
        "{t1}"
    );
    assert_eq!(store.backlog().await?, Backlog::default());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_or_refused_writes_store_and_publish_nothing() -> TestResult {
    let f = fixture(1).await?;
    let tenders = f.tenders();
    f.create("t-1").await?;
    let before = document(&tenders, "t-1").await?;
    let event = || f.outbox.event("tender", &change("t-1", "never"));

    // A filter that matches nothing.
    let error = f
        .outbox
        .update_with_events(
            &tenders,
            doc! { "_id": "t-1", "state": "closed" },
            doc! { "$set": { "state": "x" } },
            [event()?],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, OutboxError::NoDocument { collection } if collection == "tenders"),
        "{error:?}"
    );
    assert!(error.to_string().contains("nothing was written"));
    // An update the server refuses: `$inc` of a text field.
    let error = f
        .outbox
        .update_with_events(
            &tenders,
            doc! { "_id": "t-1" },
            doc! { "$inc": { "state": 1 } },
            [event()?],
        )
        .await
        .unwrap_err();
    assert!(matches!(error, OutboxError::Mongo { .. }), "{error:?}");
    // A duplicate insert.
    let error = f
        .outbox
        .insert_with_events(&tenders, doc! { "_id": "t-1", "state": "dup" }, [event()?])
        .await
        .unwrap_err();
    assert!(matches!(error, OutboxError::Mongo { .. }), "{error:?}");
    // Updates that would touch the outbox's own fields, or replace the document.
    for update in [doc! { "$set": { "_dbps_outbox_seq": 0 } }, doc! { "state": "replaced" }] {
        let error = f
            .outbox
            .update_with_events(&tenders, doc! { "_id": "t-1" }, update, [event()?])
            .await
            .unwrap_err();
        assert!(matches!(error, OutboxError::InvalidWrite(_)), "{error:?}");
    }
    // An event about another aggregate.
    let elsewhere = Envelope::event("tender", "tender", "t-2", &change("t-2", "x"))?;
    let error = f
        .outbox
        .update_with_events(
            &tenders,
            doc! { "_id": "t-1" },
            doc! { "$set": { "state": "x" } },
            [f.outbox.message(&f.topic, elsewhere)?],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            OutboxError::Message(dbps_core::Error::InvalidAttribute {
                attribute: "subject",
                ..
            })
        ),
        "{error:?}"
    );
    // Bad messages are refused when they are built, before any write.
    let strict = f.outbox.clone().limits(PayloadLimits::new(100, 4)?);
    let error = strict.event("tender", &change("t-1", &"x".repeat(200))).unwrap_err();
    assert!(
        matches!(error, OutboxError::Message(dbps_core::Error::PayloadTooLarge { .. })),
        "{error:?}"
    );
    let envelope = Envelope::event("tender", "tender", "", &change("t-1", "x"))?;
    let error = f.outbox.message("not a topic!", envelope.clone()).unwrap_err();
    assert!(matches!(
        error,
        OutboxError::Message(dbps_core::Error::InvalidTopic { .. })
    ));
    let mut spoofed = envelope;
    spoofed.headers.insert("ce_id".into(), "x".into());
    let error = f.outbox.message(&f.topic, spoofed).unwrap_err();
    assert!(matches!(
        error,
        OutboxError::Message(dbps_core::Error::InvalidAttribute {
            attribute: "headers",
            ..
        })
    ));

    assert_eq!(document(&tenders, "t-1").await?, before, "the document is untouched");
    assert_eq!(stored(&tenders).await?, 1, "only the creation's event is stored");

    // One good write after all that: the topic gets exactly the two committed events.
    let bumped = f.bump("t-1", "bumped").await?;
    let store = f.store().await?;
    let (_, records) = drain(fast(store.clone(), f.kafka.brokers())?, &f.kafka, &f.topic, 2).await?;
    let seen = summarise(&records);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1], ("t-1".to_owned(), 2, bumped));
    assert_eq!(document(&tenders, "t-1").await?.get_i32("n")?, 1);
    Ok(())
}

/// Writers race on the same documents, each write an increment plus an event; some writes
/// fail their filter. The relay runs throughout. Published set = written set, and every
/// document's sequence numbers are 1..n in publish order, n being its counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_one_document_get_gapless_sequences_in_write_order() -> TestResult {
    let f = Arc::new(fixture(3).await?);
    let mut committed: BTreeSet<String> = BTreeSet::new();
    for t in 0..5 {
        committed.insert(f.create(&format!("t-{t}")).await?);
    }

    let (stop, relay) = start_relay(fast(f.store().await?, f.kafka.brokers())?);
    let writers = 12;
    let per_writer = 25;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let f = Arc::clone(&f);
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..per_writer {
                let tender = format!("t-{}", (w + i) % 5);
                let event = f.outbox.event("tender", &change(&tender, &format!("{w}/{i}")))?;
                // One in five writes requires a state the tender is not in.
                let state = if (w * 3 + i) % 5 == 0 { "closed" } else { "open" };
                match f
                    .outbox
                    .update_with_events(
                        &f.tenders(),
                        doc! { "_id": &tender, "state": state },
                        doc! { "$inc": { "n": 1 } },
                        [event],
                    )
                    .await
                {
                    Ok(w) => written.push(w.enqueued[0].message_id.clone()),
                    Err(OutboxError::NoDocument { .. }) => {}
                    Err(other) => return Err(other.into()),
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(written)
        }));
    }
    for task in tasks {
        committed.extend(task.await??);
    }
    assert_eq!(committed.len(), 5 + 240, "four in five of the 300 writes matched");
    let reader = read(&f.kafka, &f.topic, committed.len()).await?;
    stop.cancel();
    relay.await??;
    let records = reader.finish().await?;

    let seen = summarise(&records);
    let published: BTreeSet<String> = seen.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(published.len(), seen.len(), "no duplicates in a run without crashes");
    assert_eq!(published, committed, "published set = written set");
    assert_in_order(&seen);
    let mut per_aggregate: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (aggregate, sequence, _) in &seen {
        per_aggregate.entry(aggregate.clone()).or_default().push(*sequence);
    }
    for (aggregate, sequences) in per_aggregate {
        let n = i64::from(document(&f.tenders(), &aggregate).await?.get_i32("n")?);
        let expected: Vec<i64> = (1..=n + 1).collect();
        assert_eq!(
            sequences, expected,
            "{aggregate}: the creation plus one event per increment"
        );
    }
    assert_eq!(stored(&f.tenders()).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_outbox_without_loss_or_reordering() -> TestResult {
    let f = fixture(4).await?;
    let store_a = TestStore::recording(f.store().await?);
    let store_b = TestStore::recording(f.store().await?);
    let (stop_a, relay_a) = start_relay(fast(store_a.clone(), f.kafka.brokers())?);
    let (stop_b, relay_b) = start_relay(fast(store_b.clone(), f.kafka.brokers())?);
    // Both relays hold half of the partitions before the writes start.
    store_a.holding(16).await?;
    store_b.holding(16).await?;

    // One aggregate per lease partition, so that both relays have work.
    let mut aggregates = BTreeMap::new();
    for i in 0.. {
        let id = format!("t-{i}");
        aggregates.entry(dbps_outbox::mongo::partition(&id)).or_insert(id);
        if aggregates.len() == 32 {
            break;
        }
    }
    let mut committed = BTreeSet::new();
    for t in aggregates.values() {
        committed.insert(f.create(t).await?);
    }
    for round in 0..9 {
        for t in aggregates.values() {
            committed.insert(f.bump(t, &round.to_string()).await?);
        }
    }
    let reader = read(&f.kafka, &f.topic, committed.len()).await?;
    stop_a.cancel();
    stop_b.cancel();
    let (a, b) = (relay_a.await??, relay_b.await??);
    let records = reader.finish().await?;

    let seen = summarise(&records);
    let published: BTreeSet<String> = seen.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(published, committed);
    assert_in_order(&seen);
    assert_fetched_only_held_partitions(&[&store_a, &store_b]);
    // Each relay published the 10 messages of each of its 16 partitions' aggregate.
    assert_eq!((a.published, b.published), (160, 160), "{a:?} {b:?}");
    Ok(())
}

/// A batch over many documents is marked with a statement per document: on FerretDB 1.x
/// in several `update` commands, since one command of 60 statements leaves that server
/// waiting for a connection of its own pool forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_many_documents_is_marked_and_cleared() -> TestResult {
    let f = fixture(2).await?;
    let mut committed = BTreeSet::new();
    for i in 0..120 {
        committed.insert(f.create(&format!("m-{i}")).await?);
    }
    // One batch holds all 120 documents: 240 statements to mark and clear them.
    let (summary, records) = drain(fast(f.store().await?, f.kafka.brokers())?, &f.kafka, &f.topic, 120).await?;
    let published: BTreeSet<String> = summarise(&records).into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(published, committed);
    assert_eq!(summary.published, 120, "{summary:?}");
    assert_eq!(stored(&f.tenders()).await?, 0);
    let pending = f
        .tenders()
        .count_documents(doc! { PENDING_FIELD: { "$exists": true } })
        .await?;
    assert_eq!(pending, 0, "every drained outbox was cleared");
    // The server still answers.
    f.db().run_command(doc! { "ping": 1 }).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_stopped_between_ack_and_mark_republishes_and_loses_nothing() -> TestResult {
    let f = fixture(1).await?;
    let mut committed = vec![f.create("t-1").await?];
    for i in 1..10 {
        committed.push(f.bump("t-1", &i.to_string()).await?);
    }

    let crashing = TestStore::crash_before_mark(f.store().await?);
    let (_stop, relay) = start_relay(fast(crashing.clone(), f.kafka.brokers())?);
    let first = read(&f.kafka, &f.topic, 10).await?.finish().await?;
    assert!(crashing.crashed(), "acknowledged, not marked");
    // The crash: the relay's task dies with its lease.
    relay.abort();
    let _ = relay.await;
    assert_eq!(stored(&f.tenders()).await?, 10, "nothing was marked");

    let (_, all) = drain(fast(f.store().await?, f.kafka.brokers())?, &f.kafka, &f.topic, 20).await?;

    let seen = summarise(&all);
    assert_eq!(seen.len(), 20, "every message twice: once before the crash, once after");
    let ids: Vec<String> = seen.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(ids[..10], committed[..]);
    assert_eq!(ids[10..], committed[..], "the restart republished in order");
    assert_eq!(summarise(&first)[..10], seen[..10]);
    assert_eq!(stored(&f.tenders()).await?, 0);
    let t1 = document(&f.tenders(), "t-1").await?;
    assert!(!t1.contains_key(PENDING_FIELD), "{t1}");
    Ok(())
}

/// A relay that dies without a word (its process is gone: no lease is released) holds its
/// partitions until the leases expire; then another relay takes them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_vanished_relay_are_taken_over_when_they_expire() -> TestResult {
    let f = fixture(1).await?;
    let ttl = Duration::from_secs(2);
    let store = f.store().await?.lease_ttl(ttl);
    let mut vanished = store.join().await?;
    store.rebalance(&mut vanished).await?;
    assert_eq!(vanished.partitions().len(), 32);
    // Gone without releasing anything, as a killed process would be.
    std::mem::forget(vanished);

    let committed = f.create("t-1").await?;
    let started = tokio::time::Instant::now();
    let (stop, relay) = start_relay(fast(store.clone(), f.kafka.brokers())?);
    let records = read(&f.kafka, &f.topic, 1).await?.finish().await?;
    let waited = started.elapsed();
    stop.cancel();
    relay.await??;
    assert_eq!(summarise(&records)[0].2, committed);
    assert!(
        waited >= ttl.saturating_sub(Duration::from_millis(500)),
        "published after {waited:?}, before the vanished relay's leases expired"
    );
    Ok(())
}

/// A relay whose leases were taken over (they expired while it was stalled) stops
/// publishing those partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_lost_its_leases_stops_fetching() -> TestResult {
    let f = fixture(1).await?;
    let store = f.store().await?.lease_ttl(Duration::from_secs(1));
    let mut lease = store.join().await?;
    store.rebalance(&mut lease).await?;
    f.create("t-1").await?;
    assert_eq!(store.fetch(&mut lease, 10).await?.len(), 1);

    // Another relay took every partition over.
    f.db()
        .collection::<Document>(LEASES_COLLECTION)
        .update_many(
            doc! { "kind": "partition" },
            doc! { "$set": { "owner": "another-relay", "expires_at": mongodb::bson::DateTime::MAX } },
        )
        .await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store.owns_any(&lease) {
        assert!(tokio::time::Instant::now() < deadline, "the relay kept its lost leases");
        let batch = store.fetch(&mut lease, 10).await?;
        if !store.owns_any(&lease) {
            assert!(batch.is_empty(), "fetched with lost leases");
        }
        store.wait_for_commit(&mut lease, Duration::from_millis(50)).await?;
    }
    assert!(store.fetch(&mut lease, 10).await?.is_empty());
    store.rebalance(&mut lease).await?;
    assert!(!store.owns_any(&lease), "all partitions are held by the other relay");
    store.leave(lease).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_poison_event_does_not_block_other_aggregates_and_replays_after_the_fix() -> TestResult {
    for policy in [PoisonPolicy::Continue, PoisonPolicy::HoldAggregate] {
        let f = fixture(1).await?;
        let tenders = f.tenders();
        f.create("t-big").await?;
        let poison_event = f.outbox.event("tender", &change("t-big", &"x".repeat(20_000)))?;
        let after_event = f.outbox.event("tender", &change("t-big", "after"))?;
        let written = f
            .outbox
            .update_with_events(
                &tenders,
                doc! { "_id": "t-big" },
                doc! { "$inc": { "n": 1 } },
                [poison_event, after_event],
            )
            .await?;
        let (poison, after) = (&written.enqueued[0], &written.enqueued[1]);
        let other = f.create("t-other").await?;

        // A producer limited to 10 kB refuses the 20 kB event permanently.
        let small =
            KafkaPublisher::builder(KafkaConfig::new(f.kafka.brokers()).set("message.max.bytes", "10000")).build()?;
        let store = f.store().await?.poison_policy(policy);
        let relay = Relay::builder(store.clone(), small)
            .rebalance_interval(Duration::from_millis(200))
            .build()?;
        let (stop, task) = start_relay(relay);
        let expected_now = if policy == PoisonPolicy::Continue { 3 } else { 2 };
        let reader = read(&f.kafka, &f.topic, expected_now).await?;
        stop.cancel();
        let summary = task.await??;
        let records = reader.finish().await?;
        assert_eq!(summary.parked, 1, "{policy:?}");
        let ids: BTreeSet<String> = summarise(&records).into_iter().map(|(_, _, id)| id).collect();
        assert!(ids.contains(&other), "other aggregates flow ({policy:?})");
        assert_eq!(
            ids.contains(&after.message_id),
            policy == PoisonPolicy::Continue,
            "{policy:?}"
        );
        assert!(!ids.contains(&poison.message_id));

        let parked = store.parked().await?;
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].0.envelope.id, poison.message_id);
        assert_eq!(parked[0].0.id, poison.id);
        assert!(parked[0].1.contains("produce to"), "reason recorded: {}", parked[0].1);
        assert_eq!(store.backlog().await?.parked, 1);
        let held = if policy == PoisonPolicy::HoldAggregate { 1 } else { 0 };
        assert_eq!(store.backlog().await?.pending, held, "{policy:?}");

        // The fix: a producer that accepts it. Replay, and it goes out (before the held
        // event, under HoldAggregate).
        store.replay(&parked[0].0.id).await?;
        let (_, all) = drain(fast(store.clone(), f.kafka.brokers())?, &f.kafka, &f.topic, 4).await?;
        let seen = summarise(&all);
        assert_eq!(seen.len(), 4, "{policy:?}");
        if policy == PoisonPolicy::HoldAggregate {
            assert_in_order(&seen);
        }
        assert!(store.parked().await?.is_empty());
        assert!(!document(&tenders, "t-big").await?.contains_key(PARKED_FIELD));
        assert!(matches!(
            store.replay(&parked[0].0.id).await,
            Err(OutboxError::NotParkedEntry { .. })
        ));
    }
    Ok(())
}

#[tokio::test]
async fn a_discarded_parked_message_is_gone_for_good() -> TestResult {
    let f = fixture(1).await?;
    f.create("t-1").await?;
    let store = f.store().await?;
    let mut lease = store.join().await?;
    store.rebalance(&mut lease).await?;
    let batch = store.fetch(&mut lease, 10).await?;
    store.park(&batch[0].id, "refused by the broker").await?;
    assert!(
        store.fetch(&mut lease, 10).await?.is_empty(),
        "a parked message is not fetched"
    );
    let parked = store.parked().await?;
    assert_eq!((parked.len(), parked[0].1.as_str()), (1, "refused by the broker"));
    store.discard(&batch[0].id).await?;
    assert!(store.parked().await?.is_empty());
    assert_eq!(store.backlog().await?, Backlog::default());
    let t1 = document(&f.tenders(), "t-1").await?;
    assert!(!t1.contains_key(PARKED_FIELD) && !t1.contains_key(OUTBOX_FIELD), "{t1}");
    assert!(matches!(
        store.discard(&batch[0].id).await,
        Err(OutboxError::NotParkedEntry { .. })
    ));
    store.leave(lease).await?;
    Ok(())
}

#[tokio::test]
async fn kept_messages_are_purged_by_retention() -> TestResult {
    let f = fixture(1).await?;
    let store = f.store().await?.retention(Retention::Keep(Duration::from_secs(3600)));
    f.create("t-1").await?;
    f.bump("t-1", "b").await?;
    f.create("t-2").await?;
    let mut lease = store.join().await?;
    store.rebalance(&mut lease).await?;
    let batch = store.fetch(&mut lease, 10).await?;
    assert_eq!(batch.len(), 3);
    let ids: Vec<MongoMessageId> = batch.iter().map(|p| p.id.clone()).collect();
    store.mark_published(&ids).await?;
    assert!(store.fetch(&mut lease, 10).await?.is_empty());
    let t1 = document(&f.tenders(), "t-1").await?;
    assert_eq!(t1.get_document(PUBLISHED_FIELD)?.len(), 2, "{t1}");
    assert!(!t1.contains_key(PENDING_FIELD));

    f.tenders()
        .update_one(
            doc! { "_id": "t-1" },
            doc! { "$set": { PUBLISHED_AT_FIELD: mongodb::bson::DateTime::from_millis(
                mongodb::bson::DateTime::now().timestamp_millis() - 2 * 3_600_000
            ) } },
        )
        .await?;
    assert_eq!(store.purge_published(Duration::from_secs(3600)).await?, 2);
    assert!(!document(&f.tenders(), "t-1").await?.contains_key(PUBLISHED_FIELD));
    assert_eq!(
        document(&f.tenders(), "t-2")
            .await?
            .get_document(PUBLISHED_FIELD)?
            .len(),
        1
    );
    assert_eq!(store.backlog().await?, Backlog::default());
    store.leave(lease).await?;
    Ok(())
}

#[tokio::test]
async fn transactional_mode_fails_fast_without_transactions() -> TestResult {
    let f = fixture(1).await?;
    let error = f
        .outbox
        .clone()
        .transactional(f.mongo.client(), f.db())
        .await
        .unwrap_err();
    assert!(matches!(error, OutboxError::TransactionsUnsupported), "{error:?}");
    assert!(error.to_string().contains("does not support transactions"), "{error}");
    Ok(())
}

#[tokio::test]
async fn a_relay_needs_registered_collections() -> TestResult {
    let f = fixture(1).await?;
    let error = MongoOutboxStore::new(f.db().clone()).join().await.unwrap_err();
    assert!(
        matches!(
            error,
            OutboxError::InvalidConfig {
                setting: "collections",
                ..
            }
        ),
        "{error:?}"
    );
    Ok(())
}
