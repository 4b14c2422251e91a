//! Idempotent effects on MongoDB, against the stack's MongoDB-protocol server (which,
//! like a standalone MongoDB, has no multi-document transactions).

mod common;

use common::TestResult;
use dbps_core::inbox::mongo::{Applied, MongoTransactionalInbox, SEQUENCE_FIELD, insert_once, update_once};
use dbps_core::{Envelope, Error};
use mongodb::bson::{Document, doc};

fn event(sku: &str, sequence: Option<i64>) -> Result<Envelope, Error> {
    let mut e = common::stock_changed(sku, 1)?;
    e.sequence = sequence;
    Ok(e)
}

#[tokio::test]
async fn insert_once_applies_a_redelivered_message_once() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let emails = mongo.database().collection::<Document>("emails");
    let message = event("sku-1", Some(1))?;
    let email = doc! { "to": "sales@example.com", "subject": "Stock low" };
    assert_eq!(insert_once(&emails, &message, email.clone()).await?, Applied::Applied);
    assert_eq!(insert_once(&emails, &message, email).await?, Applied::Duplicate);
    assert_eq!(emails.count_documents(doc! {}).await?, 1);
    let stored = emails.find_one(doc! {}).await?.ok_or("missing")?;
    assert_eq!(stored.get_str("_id")?, message.id);
    Ok(())
}

#[tokio::test]
async fn update_once_ignores_duplicates_and_stale_versions() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let index = mongo.database().collection::<Document>("customer_email_index");
    let v1 = event("c-1", Some(1))?;
    let v2 = event("c-1", Some(2))?;

    // The first event creates the copy.
    let set = |email: &str| doc! { "$set": { "email": email } };
    assert_eq!(
        update_once(&index, "c-1", &v1, set("old@example.com"), true).await?,
        Applied::Applied
    );
    assert_eq!(
        update_once(&index, "c-1", &v2, set("new@example.com"), true).await?,
        Applied::Applied
    );
    // Redelivered v2 and a late v1 change nothing.
    assert_eq!(
        update_once(&index, "c-1", &v2, set("new@example.com"), true).await?,
        Applied::Duplicate
    );
    assert_eq!(
        update_once(&index, "c-1", &v1, set("old@example.com"), true).await?,
        Applied::Duplicate
    );
    assert_eq!(
        update_once(&index, "c-1", &v1, set("old@example.com"), false).await?,
        Applied::Duplicate
    );

    let copy = index.find_one(doc! { "_id": "c-1" }).await?.ok_or("missing")?;
    assert_eq!(copy.get_str("email")?, "new@example.com", "the copy never went back");
    assert_eq!(copy.get_i64(SEQUENCE_FIELD)?, 2);
    assert_eq!(index.count_documents(doc! {}).await?, 1);

    let unsequenced = event("c-1", None)?;
    let error = update_once(&index, "c-1", &unsequenced, set("x"), true)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::MissingAttribute { attribute: "sequence" }),
        "{error:?}"
    );
    Ok(())
}

#[tokio::test]
async fn transactional_inbox_fails_fast_without_transactions() -> TestResult {
    let mongo = dbps_testkit::mongo().await?;
    let error = MongoTransactionalInbox::new(mongo.client().clone(), mongo.database(), "stock-totals")
        .await
        .unwrap_err();
    assert!(matches!(error, Error::TransactionsUnsupported), "{error:?}");
    assert!(error.to_string().contains("does not support transactions"));
    Ok(())
}
