//! MongoDB replicas against the real stack (FerretDB here): the sequence guard,
//! tombstones, one document per address, delivery through the runner, and the
//! reconciler comparing a PostgreSQL owner with a MongoDB replica.

mod common;

use std::collections::BTreeMap;

use common::TestResult;
use common::owner::{Customer, CustomerCache, CustomerEmails, Owner};
use dbps_cache::replica::{MongoReplica, PgSnapshotSource, Reconciler};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use rand::seq::SliceRandom as _;

async fn setup()
-> Result<(dbps_testkit::TestPostgres, dbps_testkit::TestMongo, Owner), Box<dyn std::error::Error + Send + Sync>> {
    let db = dbps_testkit::postgres().await?;
    let owner = Owner::create(db.pool().clone()).await?;
    let mongo = dbps_testkit::mongo().await?;
    Ok((db, mongo, owner))
}

fn cache(mongo: &dbps_testkit::TestMongo) -> MongoReplica<CustomerCache> {
    MongoReplica::builder(mongo.database().clone(), "customer_cache", CustomerCache)
        .build()
        .expect("valid replica")
}

/// `id → (name, sequence)` of the replica's documents.
async fn cached(mongo: &dbps_testkit::TestMongo) -> Result<BTreeMap<String, (String, i64)>, mongodb::error::Error> {
    let documents: Vec<Document> = mongo
        .database()
        .collection::<Document>("customer_cache")
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    Ok(documents
        .into_iter()
        .map(|d| {
            (
                d.get_str("_id").unwrap_or_default().to_owned(),
                (
                    d.get_str("name").unwrap_or_default().to_owned(),
                    d.get_i64("source_sequence").unwrap_or(-1),
                ),
            )
        })
        .collect())
}

#[tokio::test]
async fn stale_events_and_late_updates_after_a_delete_change_nothing() -> TestResult {
    let (_db, mongo, owner) = setup().await?;
    let replica = cache(&mongo);
    let v1 = owner.upsert(Customer::new("Ada")).await?;
    let id = v1.aggregate_id.clone();
    let v2 = owner.rename(&id, "Ada L.").await?;
    assert_eq!(replica.apply(std::slice::from_ref(&v2)).await?, 1);
    // Older and repeated events are stale.
    assert_eq!(replica.apply(&[v1.clone(), v2.clone()]).await?, 0);
    assert_eq!(cached(&mongo).await?[&id], (String::from("Ada L."), 2));
    let v3 = owner.delete(&id).await?;
    assert_eq!(replica.apply(&[v3]).await?, 1);
    assert!(cached(&mongo).await?.is_empty());
    assert_eq!(
        replica.apply(&[v2]).await?,
        0,
        "a late update must not resurrect a deleted record"
    );
    assert!(cached(&mongo).await?.is_empty());
    assert_eq!(replica.version(&id).await?, Some((3, true)));
    Ok(())
}

#[tokio::test]
async fn one_document_per_address_and_a_changed_address_removes_the_old_one() -> TestResult {
    let (_db, mongo, owner) = setup().await?;
    let replica = MongoReplica::builder(
        mongo.database().clone(),
        "customer_email_index",
        CustomerEmails { id_field: "_id" },
    )
    .aggregate_field("customer_id")
    .build()?;
    let mut customer = Customer::new("Linus");
    customer.emails = vec!["l@example.com".into(), "linus@example.com".into()];
    let v1 = owner.upsert(customer.clone()).await?;
    customer.id = v1.aggregate_id.clone();
    customer.emails = vec!["linus@example.org".into()];
    let v2 = owner.upsert(customer).await?;
    let emails = || async {
        let documents: Vec<Document> = mongo
            .database()
            .collection::<Document>("customer_email_index")
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        Ok::<_, mongodb::error::Error>(
            documents
                .iter()
                .map(|d| d.get_str("_id").unwrap_or_default().to_owned())
                .collect::<Vec<_>>(),
        )
    };
    replica.apply(std::slice::from_ref(&v1)).await?;
    assert_eq!(emails().await?, ["l@example.com", "linus@example.com"]);
    replica.apply(&[v2, v1]).await?;
    assert_eq!(emails().await?, ["linus@example.org"]);
    Ok(())
}

#[tokio::test]
async fn shuffled_delivery_through_the_runner_ends_at_the_owners_state() -> TestResult {
    let (_db, mongo, owner) = setup().await?;
    let mut events = Vec::new();
    let mut ids = Vec::new();
    for n in 0..10 {
        let created = owner.upsert(Customer::new(&format!("m{n}"))).await?;
        ids.push(created.aggregate_id.clone());
        events.push(created);
    }
    for round in 0..10 {
        for id in &ids {
            events.push(owner.rename(id, &format!("{id}-{round}")).await?);
        }
    }
    let deleted = owner.delete(&ids[0]).await?;
    events.push(deleted);
    events.shuffle(&mut rand::rng());
    common::consume_batched(cache(&mongo), &events).await?;
    assert_eq!(cached(&mongo).await?, owner.names().await?);
    Ok(())
}

#[tokio::test]
async fn backfill_then_reconcile_a_mongodb_replica_against_its_postgresql_owner() -> TestResult {
    let (db, mongo, owner) = setup().await?;
    let replica = cache(&mongo);
    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(owner.upsert(Customer::new(&format!("f{n}"))).await?.aggregate_id);
    }
    let source = PgSnapshotSource::new(db.pool().clone(), "customers", "id", "version")?;
    let (read, advanced) = replica.backfill(&source, 25).await?;
    assert_eq!((read, advanced), (60, 60));
    assert!(Reconciler::new(source.clone(), replica.clone()).run().await?.is_clean());

    let collection = mongo.database().collection::<Document>("customer_cache");
    collection.delete_one(doc! { "_id": &ids[0] }).await?;
    collection
        .update_one(doc! { "_id": &ids[1] }, doc! { "$set": { "source_sequence": 0_i64 } })
        .await?;
    collection
        .insert_one(doc! { "_id": "stranger", "aggregate_id": "stranger", "name": "x", "source_sequence": 4_i64 })
        .await?;
    let report = Reconciler::new(source.clone(), replica.clone())
        .repair(true)
        .run()
        .await?;
    assert_eq!(report.missing, [ids[0].clone()]);
    assert_eq!(report.stale, [ids[1].clone()]);
    assert_eq!(report.extra, ["stranger"]);
    assert_eq!((report.repaired, report.removed), (2, 1));
    assert!(Reconciler::new(source, replica).run().await?.is_clean());
    assert_eq!(cached(&mongo).await?, owner.names().await?);
    Ok(())
}
