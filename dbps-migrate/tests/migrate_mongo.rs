//! The MongoDB migration runner, against the real server (FerretDB on the local stack).
#![cfg(feature = "mongodb")]

use std::time::{Duration, SystemTime};

use dbps_migrate::MigrateError;
use dbps_migrate::mongo::{LOCK_ID, MIGRATIONS_COLLECTION, MongoMigrations, ensure_index};
use futures::TryStreamExt;
use mongodb::bson::{DateTime, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Database, IndexModel};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Counts one application of `version` in the `effects` collection. A migration that runs
/// twice leaves a count of two.
async fn record_effect(db: &Database, version: i64) -> Result<(), dbps_migrate::mongo::BoxError> {
    db.collection::<Document>("effects")
        .update_one(doc! { "_id": version }, doc! { "$inc": { "count": 1 } })
        .upsert(true)
        .await?;
    Ok(())
}

/// Three migrations that count their applications, and a unique index.
fn counted(db: &Database) -> MongoMigrations {
    MongoMigrations::new(db.clone())
        .migration(1, "create customers", |db| async move { record_effect(&db, 1).await })
        .migration(2, "backfill emails", |db| async move { record_effect(&db, 2).await })
        .migration(3, "add tax numbers", |db| async move { record_effect(&db, 3).await })
        .index(
            "customer_email_index",
            IndexModel::builder()
                .keys(doc! { "email": 1 })
                .options(
                    IndexOptions::builder()
                        .name("email_unique".to_owned())
                        .unique(true)
                        .build(),
                )
                .build(),
        )
}

async fn effect_counts(db: &Database) -> Result<Vec<(i64, i32)>, mongodb::error::Error> {
    let documents: Vec<Document> = db
        .collection::<Document>("effects")
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await?
        .try_collect()
        .await?;
    Ok(documents
        .iter()
        .map(|d| (d.get_i64("_id").unwrap_or(-1), d.get_i32("count").unwrap_or(-1)))
        .collect())
}

async fn lock_document(db: &Database) -> Result<Option<Document>, mongodb::error::Error> {
    db.collection::<Document>(MIGRATIONS_COLLECTION)
        .find_one(doc! { "_id": LOCK_ID })
        .await
}

fn millis_from_now(offset: i64) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() + offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runners_apply_each_migration_once() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();

    let runners: Vec<_> = (0..4)
        .map(|_| {
            let migrations = counted(&db).lock_wait(Duration::from_secs(30));
            tokio::spawn(async move { migrations.run().await })
        })
        .collect();
    let mut applied = Vec::new();
    for runner in runners {
        let report = runner.await??;
        assert_eq!(report.indexes, 1);
        applied.extend(report.applied.iter().map(|m| m.version));
    }
    applied.sort_unstable();
    assert_eq!(applied, vec![1, 2, 3], "each migration applied by exactly one runner");
    assert_eq!(effect_counts(&db).await?, vec![(1, 1), (2, 1), (3, 1)]);

    let status = counted(&db).status().await?;
    assert_eq!(status.applied.len(), 3);
    assert!(status.pending.is_empty());
    assert_eq!(status.lock_owner, None, "the lock is released after the run");
    let indexes = db
        .collection::<Document>("customer_email_index")
        .list_index_names()
        .await?;
    assert!(indexes.contains(&"email_unique".to_owned()), "{indexes:?}");
    Ok(())
}

#[tokio::test]
async fn an_expired_lock_is_taken_over() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();
    // A runner that crashed while holding the lock.
    db.collection::<Document>(MIGRATIONS_COLLECTION)
        .insert_one(doc! { "_id": LOCK_ID, "owner": "crashed-runner", "expires_at": millis_from_now(-1_000) })
        .await?;

    let report = counted(&db).lock_wait(Duration::from_secs(5)).run().await?;
    assert_eq!(report.applied.len(), 3);
    assert_eq!(lock_document(&db).await?, None, "released after the run");
    Ok(())
}

#[tokio::test]
async fn a_live_lock_makes_a_runner_time_out_without_applying() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();
    db.collection::<Document>(MIGRATIONS_COLLECTION)
        .insert_one(doc! { "_id": LOCK_ID, "owner": "busy-runner", "expires_at": millis_from_now(60_000) })
        .await?;

    let error = counted(&db)
        .lock_wait(Duration::from_millis(500))
        .run()
        .await
        .unwrap_err();
    assert!(matches!(error, MigrateError::LockTimeout { .. }), "{error:?}");
    assert!(error.is_transient());
    assert!(
        error.to_string().contains(&format!("mongodb database {}", db.name())),
        "{error}"
    );
    assert!(effect_counts(&db).await?.is_empty(), "nothing applied");
    let status = counted(&db).status().await?;
    assert_eq!(status.lock_owner.as_deref(), Some("busy-runner"));
    assert!(status.lock_expires_at.is_some_and(|t| t > SystemTime::now()));
    assert_eq!(status.pending.len(), 3);
    Ok(())
}

#[tokio::test]
async fn the_lock_is_renewed_while_a_migration_runs() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();

    // The migration waits until the lock's expiry moved forward, which only the renewal does;
    // with a one-second time to live the renewal runs every third of a second.
    let report = MongoMigrations::new(db.clone())
        .lock_ttl(Duration::from_secs(1))
        .migration(1, "outlives the lock's first expiry", |db| async move {
            let first = lock_document(&db)
                .await?
                .ok_or("no lock document")?
                .get_datetime("expires_at")?
                .to_owned();
            dbps_testkit::eventually("the lock to be renewed", || {
                let db = db.clone();
                async move {
                    let lock = lock_document(&db).await?.ok_or("no lock document")?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(*lock.get_datetime("expires_at")? > first)
                }
            })
            .await?;
            Ok(())
        })
        .run()
        .await?;
    assert_eq!(report.applied.len(), 1);
    Ok(())
}

#[tokio::test]
async fn changed_or_missing_migrations_are_refused() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();
    counted(&db).run().await?;

    let renamed = MongoMigrations::new(db.clone())
        .migration(1, "create customers", |db| async move { record_effect(&db, 1).await })
        .migration(2, "something else now", |db| async move { record_effect(&db, 2).await })
        .migration(3, "add tax numbers", |db| async move { record_effect(&db, 3).await })
        .migration(4, "new", |db| async move { record_effect(&db, 4).await });
    let error = renamed.run().await.unwrap_err();
    assert!(
        matches!(&error, MigrateError::Changed { component, version: 2 } if component == db.name()),
        "{error:?}"
    );
    let status = renamed.status().await?;
    assert_eq!(status.changed, vec![2]);
    assert_eq!(status.pending.len(), 1);

    let fewer = MongoMigrations::new(db.clone())
        .migration(1, "create customers", |db| async move { record_effect(&db, 1).await });
    let error = fewer.run().await.unwrap_err();
    assert!(matches!(error, MigrateError::Missing { version: 2, .. }), "{error:?}");
    assert_eq!(
        effect_counts(&db).await?,
        vec![(1, 1), (2, 1), (3, 1)],
        "nothing applied"
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_migration_stops_the_run_and_runs_again_next_time() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();
    let failing = MongoMigrations::new(db.clone())
        .migration(1, "works", |db| async move { record_effect(&db, 1).await })
        .migration(2, "fails", |_db| async move { Err("boom".into()) })
        .migration(3, "never reached", |db| async move { record_effect(&db, 3).await });
    let error = failing.run().await.unwrap_err();
    assert!(
        matches!(&error, MigrateError::MongoMigrationFailed { version: 2, name, .. } if name == "fails"),
        "{error:?}"
    );
    assert_eq!(effect_counts(&db).await?, vec![(1, 1)]);
    assert_eq!(lock_document(&db).await?, None, "the lock is released after a failure");

    let fixed = MongoMigrations::new(db.clone())
        .migration(1, "works", |db| async move { record_effect(&db, 1).await })
        .migration(2, "fails", |db| async move { record_effect(&db, 2).await })
        .migration(3, "never reached", |db| async move { record_effect(&db, 3).await });
    let report = fixed.run().await?;
    let applied: Vec<i64> = report.applied.iter().map(|m| m.version).collect();
    assert_eq!(applied, vec![2, 3]);
    Ok(())
}

#[tokio::test]
async fn invalid_versions_are_rejected_before_any_request() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();
    let twice = MongoMigrations::new(db.clone())
        .migration(1, "a", |_db| async move { Ok(()) })
        .migration(1, "b", |_db| async move { Ok(()) });
    let error = twice.run().await.unwrap_err();
    assert!(
        matches!(error, MigrateError::InvalidVersion { version: 1, .. }),
        "{error:?}"
    );
    let zero = MongoMigrations::new(db.clone()).migration(0, "zero", |_db| async move { Ok(()) });
    assert!(matches!(
        zero.run().await.unwrap_err(),
        MigrateError::InvalidVersion { version: 0, .. }
    ));
    assert_eq!(lock_document(&db).await?, None, "no lock was taken");
    Ok(())
}

#[tokio::test]
async fn ensure_index_is_idempotent_and_enforced() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let db = mongo.database().clone();
    let index = || {
        IndexModel::builder()
            .keys(doc! { "email": 1 })
            .options(
                IndexOptions::builder()
                    .name("email_unique".to_owned())
                    .unique(true)
                    .build(),
            )
            .build()
    };
    ensure_index(&db, "customer_email_index", index()).await?;
    ensure_index(&db, "customer_email_index", index()).await?;
    let collection = db.collection::<Document>("customer_email_index");
    collection.insert_one(doc! { "email": "ada@example.com" }).await?;
    let duplicate = collection.insert_one(doc! { "email": "ada@example.com" }).await;
    assert!(duplicate.is_err(), "the unique index rejects a duplicate");
    Ok(())
}
