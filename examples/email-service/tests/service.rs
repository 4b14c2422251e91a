//! The email service in this process on the real stack: FerretDB, Kafka, Mailpit, and the
//! real customer service on PostgreSQL.

mod common;

use std::time::Duration;

use common::{
    BoxError, CustomerNode, EmailNode, NO_CUSTOMER_SERVICE, TestResult, message, noise, notification_request,
    post_email, publish, request_envelope,
};
use dbps_core::{MessageSet as _, Registry};
use example_email_service::events::{AGGREGATE, EmailEvent};
use example_email_service::model::{DeliveryStatus, EmailView};
use example_email_service::store::{ASSIGNMENTS, ATTACHMENTS, CUSTOMER_INDEX, EMAILS};
use example_email_service::{Settings, notification_message_id};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

async fn count(node: &EmailNode, collection: &str) -> Result<u64, mongodb::error::Error> {
    node.mongo
        .database()
        .collection::<Document>(collection)
        .count_documents(doc! {})
        .await
}

async fn email(http: &reqwest::Client, node: &EmailNode, id: &str) -> Result<EmailView, BoxError> {
    find_email(http, node, id)
        .await?
        .ok_or_else(|| format!("no email {id}").into())
}

/// The email, `None` while there is none.
async fn find_email(http: &reqwest::Client, node: &EmailNode, id: &str) -> Result<Option<EmailView>, BoxError> {
    let response = http.get(node.url(&format!("/emails/{id}"))).send().await?;
    match response.status() {
        StatusCode::OK => Ok(Some(response.json().await?)),
        StatusCode::NOT_FOUND => Ok(None),
        other => Err(format!("GET /emails/{id}: {other}").into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_with_a_multi_megabyte_attachment_reads_back_byte_for_byte_and_is_stored_once() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let node = EmailNode::start(&kafka, Settings::new(NO_CUSTOMER_SERVICE, "smtp://127.0.0.1:9")).await?;
    let http = reqwest::Client::new();
    let drawing = noise(6_000_000, 7);
    let notes = b"Spindle 12k, coolant through the tool.\n".to_vec();
    let raw = message(
        "Ada Lovelace <ada@example.com>",
        "lathe-quote-1@example.com",
        "Lathe drawings",
        &[("drawing.step", &drawing), ("notes.txt", &notes)],
    )?;

    let (status, created) = post_email(&http, node.url("/emails"), raw.clone()).await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().ok_or("no id")?.to_owned();
    let view = email(&http, &node, &id).await?;
    assert_eq!(view.message_id, "lathe-quote-1@example.com");
    assert_eq!(view.subject.as_deref(), Some("Lathe drawings"));
    assert_eq!(view.from.as_ref().map(|f| f.address.as_str()), Some("ada@example.com"));
    assert!(
        view.text.as_deref().is_some_and(|t| t.contains("Please quote.")),
        "{view:?}"
    );
    assert!(view.html.as_deref().is_some_and(|h| h.contains("<p>Please quote.</p>")));
    assert!(
        view.headers
            .iter()
            .any(|h| h.name == "Message-ID" && h.value == "<lathe-quote-1@example.com>")
    );
    assert_eq!(view.customer_id, None, "no customer has the address");
    let attachments: Vec<(i64, Option<&str>, i64)> = view
        .attachments
        .iter()
        .map(|a| (a.n, a.filename.as_deref(), a.size))
        .collect();
    assert_eq!(
        attachments,
        [
            (0, Some("drawing.step"), 6_000_000),
            (1, Some("notes.txt"), notes.len() as i64)
        ]
    );
    // The 6 MB attachment is six chunks, the small one one.
    assert_eq!(count(&node, ATTACHMENTS).await?, 7);
    for (n, expected) in [(0, &drawing), (1, &notes)] {
        let response = http
            .get(node.url(&format!("/emails/{id}/attachments/{n}")))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/octet-stream")
        );
        let bytes = response.bytes().await?;
        assert!(bytes.as_ref() == expected.as_slice(), "attachment {n} differs");
    }

    // The same Message-ID again: the first email, 200, nothing written.
    let (status, again) = post_email(&http, node.url("/emails"), raw).await?;
    assert_eq!((status, again["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
    // Two at once with another Message-ID: one is created, the other gets it.
    let small = message("bob@example.com", "race-1@example.com", "Race", &[("a.txt", b"a")])?;
    let (first, second) = tokio::join!(
        post_email(&http, node.url("/emails"), small.clone()),
        post_email(&http, node.url("/emails"), small)
    );
    let (first, second) = (first?, second?);
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CREATED]);
    assert_eq!(first.1["id"], second.1["id"]);
    assert_eq!(count(&node, EMAILS).await?, 2);
    assert_eq!(count(&node, ATTACHMENTS).await?, 8);
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_problem_and_writes_nothing() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let mut settings = Settings::new(NO_CUSTOMER_SERVICE, "smtp://127.0.0.1:9");
    settings.max_attachment_bytes = 1024 * 1024;
    settings.max_message_bytes = 12 * 1024 * 1024;
    let node = EmailNode::start(&kafka, settings).await?;
    let http = reqwest::Client::new();
    let post = |content_type: &'static str, body: Vec<u8>| {
        http.post(node.url("/emails"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let valid = String::from_utf8(message("ada@example.com", "ok-1@example.com", "Fine", &[])?)?;
    let huge_text = format!(
        "From: ada@example.com\r\nMessage-ID: <text-1@example.com>\r\nSubject: long\r\n\r\n{}",
        "All work and no play. ".repeat(9 * 1024 * 1024 / 22)
    );
    let rfc822 = "message/rfc822";
    let cases = [
        (
            post("application/json", valid.clone().into_bytes()).await?,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "another media type",
        ),
        (
            post(rfc822, Vec::new()).await?,
            StatusCode::BAD_REQUEST,
            "an empty body",
        ),
        (
            post(rfc822, b"this is not an email at all".to_vec()).await?,
            StatusCode::BAD_REQUEST,
            "not a message",
        ),
        (
            post(rfc822, b"\x00\x9f\x92\x96 binary".to_vec()).await?,
            StatusCode::BAD_REQUEST,
            "binary",
        ),
        (
            post(
                rfc822,
                valid.replace("Message-ID: <ok-1@example.com>\r\n", "").into_bytes(),
            )
            .await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "no Message-ID",
        ),
        (
            post(rfc822, valid.replace("From: ada@example.com\r\n", "").into_bytes()).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "no From",
        ),
        (
            post(
                rfc822,
                message(
                    "ada@example.com",
                    "big-1@example.com",
                    "Big",
                    &[("ok.bin", &noise(1000, 1)), ("big.bin", &noise(1024 * 1024 + 1, 2))],
                )?,
            )
            .await?,
            StatusCode::PAYLOAD_TOO_LARGE,
            "an attachment over the limit",
        ),
        (
            post(rfc822, huge_text.into_bytes()).await?,
            StatusCode::PAYLOAD_TOO_LARGE,
            "text over 8 MiB",
        ),
        (
            post(rfc822, vec![b'a'; 13 * 1024 * 1024]).await?,
            StatusCode::PAYLOAD_TOO_LARGE,
            "a body over the limit",
        ),
        (
            http.get(node.url(&format!("/emails/{}", Uuid::now_v7())))
                .send()
                .await?,
            StatusCode::NOT_FOUND,
            "an unknown email",
        ),
        (
            http.get(node.url(&format!("/emails/{}/attachments/0", Uuid::now_v7())))
                .send()
                .await?,
            StatusCode::NOT_FOUND,
            "an unknown email's attachment",
        ),
        (
            http.get(node.url("/customers/not-a-uuid/emails")).send().await?,
            StatusCode::NOT_FOUND,
            "not a customer id",
        ),
        (
            http.get(node.url(&format!("/customers/{}/emails?limit=0", Uuid::now_v7())))
                .send()
                .await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "a limit of 0",
        ),
    ];
    for (response, status, case) in cases {
        assert_eq!(response.status(), status, "{case}");
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{case}"
        );
    }
    for collection in [EMAILS, ATTACHMENTS, ASSIGNMENTS] {
        assert_eq!(count(&node, collection).await?, 0, "{collection}");
    }
    // The valid message is taken; its attachment index past the end is not found.
    let (status, created) = post_email(&http, node.url("/emails"), valid.into_bytes()).await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().ok_or("no id")?;
    let response = http
        .get(node.url(&format!("/emails/{id}/attachments/0")))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    node.stop().await
}

/// The customer the index holds for `address`.
async fn indexed(node: &EmailNode, address: &str) -> Result<Option<String>, mongodb::error::Error> {
    Ok(node
        .mongo
        .database()
        .collection::<Document>(CUSTOMER_INDEX)
        .find_one(doc! { "_id": address })
        .await?
        .and_then(|d| d.get_str("customer_id").ok().map(str::to_owned)))
}

async fn customer_emails(http: &reqwest::Client, node: &EmailNode, customer: Uuid) -> Result<Vec<String>, BoxError> {
    let page: Value = http
        .get(node.url(&format!("/customers/{customer}/emails")))
        .send()
        .await?
        .json()
        .await?;
    Ok(page["emails"]
        .as_array()
        .ok_or("no emails")?
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_are_assigned_by_sender_also_when_the_customer_comes_later_and_follow_an_address_change() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let customers = CustomerNode::start(&kafka).await?;
    let mut settings = Settings::new(customers.url(""), "smtp://127.0.0.1:9");
    settings.customer = customers.name();
    let node = EmailNode::start(&kafka, settings).await?;
    let http = reqwest::Client::new();
    let mut events = kafka.reader(&kafka.naming().events(node.name(), AGGREGATE)?)?;

    // A customer first, then an email from its address (in other letters' case).
    let ada = customers.create(&http, "Ada", "Ada@Example.com").await?;
    let ada_id = ada.to_string();
    dbps_testkit::eventually("ada indexed as ada", || async {
        Ok::<_, mongodb::error::Error>(indexed(&node, "ada@example.com").await?.as_deref() == Some(ada_id.as_str()))
    })
    .await?;
    let (status, first) = post_email(
        &http,
        node.url("/emails"),
        message("ADA@example.com", "a-1@example.com", "Hello", &[])?,
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first["customer_id"].as_str(), Some(ada_id.as_str()), "{first}");

    // An email first, from an address nobody has; then its customer.
    let (status, early) = post_email(
        &http,
        node.url("/emails"),
        message("grace@example.com", "g-1@example.com", "Early", &[("a.txt", b"x")])?,
    )
    .await?;
    assert_eq!((status, &early["customer_id"]), (StatusCode::CREATED, &Value::Null));
    let early_id = early["id"].as_str().ok_or("no id")?.to_owned();
    let grace = customers.create(&http, "Grace", "grace@example.com").await?;
    dbps_testkit::eventually("the early email assigned", || async {
        Ok::<_, BoxError>(email(&http, &node, &early_id).await?.customer_id == Some(grace))
    })
    .await?;
    assert_eq!(
        customer_emails(&http, &node, grace).await?,
        std::slice::from_ref(&early_id)
    );
    assert_eq!(
        customer_emails(&http, &node, ada).await?,
        [first["id"].as_str().ok_or("no id")?.to_owned()]
    );

    // Each assignment published one event, through the outbox.
    let registry = Registry::new();
    let records = events.wait_for(2).await?;
    let mut assigned: Vec<(String, Uuid)> = records
        .iter()
        .map(dbps_core::kafka::decode_record)
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .map(|e| EmailEvent::decode(&registry, e).map(|EmailEvent::Assigned(a)| (a.email_id, a.customer_id)))
        .collect::<Result<_, _>>()?;
    assigned.sort();
    let mut expected = vec![
        (first["id"].as_str().ok_or("no id")?.to_owned(), ada),
        (early_id, grace),
    ];
    expected.sort();
    assert_eq!(assigned, expected);

    // Ada's address changes: the index entry moves, new mail from the new address is
    // hers, mail from the old one is nobody's.
    customers.change_email(&http, ada, "ada@lovelace.example").await?;
    dbps_testkit::eventually("ada's entry moved", || async {
        Ok::<_, mongodb::error::Error>(
            indexed(&node, "ada@lovelace.example").await?.as_deref() == Some(ada_id.as_str())
                && indexed(&node, "ada@example.com").await?.is_none(),
        )
    })
    .await?;
    let (_, new) = post_email(
        &http,
        node.url("/emails"),
        message("ada@lovelace.example", "a-2@example.com", "Moved", &[])?,
    )
    .await?;
    assert_eq!(new["customer_id"].as_str(), Some(ada_id.as_str()));
    let (_, old) = post_email(
        &http,
        node.url("/emails"),
        message("ada@example.com", "a-3@example.com", "Old", &[])?,
    )
    .await?;
    assert_eq!(old["customer_id"], Value::Null);
    assert_eq!(customer_emails(&http, &node, ada).await?.len(), 2);
    node.stop().await?;
    customers.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_is_backfilled_from_the_customer_services_snapshot() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let customers = CustomerNode::start(&kafka).await?;
    let http = reqwest::Client::new();
    let carol = customers.create(&http, "Carol", "carol@example.com").await?;
    // The email service follows another name's events, so only the snapshot can tell it
    // of Carol.
    let mut settings = Settings::new(customers.url(""), "smtp://127.0.0.1:9");
    settings.customer = String::from("nobody");
    let node = EmailNode::start(&kafka, settings).await?;
    let carol_id = carol.to_string();
    dbps_testkit::eventually("carol backfilled", || async {
        Ok::<_, mongodb::error::Error>(indexed(&node, "carol@example.com").await?.as_deref() == Some(carol_id.as_str()))
    })
    .await?;
    let (status, created) = post_email(
        &http,
        node.url("/emails"),
        message("carol@example.com", "c-1@example.com", "Hi", &[])?,
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["customer_id"].as_str(), Some(carol_id.as_str()));
    node.stop().await?;
    customers.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_arrives_once_per_request_even_when_the_request_is_delivered_twice() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let mail = dbps_testkit::mailpit().await?;
    let node = EmailNode::start(&kafka, Settings::new(NO_CUSTOMER_SERVICE, mail.smtp_url())).await?;
    let http = reqwest::Client::new();
    let rep = mail.recipient("rep");
    let first = notification_request(&rep);
    let second = notification_request(&rep);
    let (one, two) = (request_envelope(&first)?, request_envelope(&second)?);
    // The first request twice (a redelivery), the second once.
    publish(&kafka, &one).await?;
    publish(&kafka, &one).await?;
    publish(&kafka, &two).await?;
    let topic = common::quote_topic(&kafka).await?;
    kafka
        .caught_up(&format!("{}.notifications", node.name()), &topic)
        .await?;
    for id in [&one.id, &two.id] {
        dbps_testkit::eventually("the notification sent", || async {
            Ok::<_, BoxError>(
                find_email(&http, &node, id)
                    .await?
                    .and_then(|e| e.delivery)
                    .is_some_and(|d| d.status == DeliveryStatus::Sent),
            )
        })
        .await?;
    }
    let arrived = mail.wait_for(&rep, 2).await?;
    assert_eq!(arrived.len(), 2, "one email per request");
    let mut ids: Vec<&str> = arrived.iter().map(|m| m.message_id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = [notification_message_id(&one.id), notification_message_id(&two.id)];
    expected.sort();
    assert_eq!(ids, expected);

    // What the sales rep reads.
    let sent = arrived
        .iter()
        .find(|m| m.message_id == notification_message_id(&one.id))
        .ok_or("the first request's email")?;
    let content = mail.message(&sent.id).await?;
    assert_eq!(content.subject, format!("Quote {} is pending stock", first.quote_id));
    for (body, kind) in [(content.text(), "text"), (content.html(), "html")] {
        let body = body.ok_or("no content")?;
        for expected in [
            first.quote_id.to_string(),
            first.customer_id.to_string(),
            first.reason.clone(),
            first.missing[0].product_id.to_string(),
        ] {
            assert!(body.contains(&expected), "the {kind} body lacks {expected}:\n{body}");
        }
    }
    // What the service recorded.
    let recorded = email(&http, &node, &one.id).await?;
    let delivery = recorded.delivery.ok_or("no delivery")?;
    assert_eq!(
        (delivery.status, delivery.attempts, delivery.recipient.as_str()),
        (DeliveryStatus::Sent, 1, rep.as_str())
    );
    assert_eq!(recorded.message_id, notification_message_id(&one.id));
    assert_eq!(
        recorded.notification.map(|n| n.quote_id),
        Some(first.quote_id.to_string())
    );
    node.stop().await
}

/// Forwards every connection on `listener` to `target` (a way to the SMTP server that
/// the test opens when it chooses).
async fn forward(listener: tokio::net::TcpListener, target: (String, u16)) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_send_is_retried_with_backoff_until_the_server_takes_it() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let mail = dbps_testkit::mailpit().await?;
    // A port with nothing behind it yet.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let mut settings = Settings::new(NO_CUSTOMER_SERVICE, format!("smtp://127.0.0.1:{port}"));
    settings.retry_initial = Duration::from_millis(100);
    settings.retry_max = Duration::from_millis(400);
    let node = EmailNode::start(&kafka, settings).await?;
    let http = reqwest::Client::new();
    let rep = mail.recipient("rep");
    let envelope = request_envelope(&notification_request(&rep))?;
    publish(&kafka, &envelope).await?;
    let failing = dbps_testkit::wait_for("failed attempts", || async {
        let view = find_email(&http, &node, &envelope.id).await?;
        Ok::<_, BoxError>(
            view.and_then(|v| v.delivery)
                .filter(|d| d.attempts >= 3 && d.status == DeliveryStatus::Sending),
        )
    })
    .await?;
    assert!(failing.last_error.is_some(), "{failing:?}");
    assert!(mail.messages_to(&rep).await?.is_empty());

    // The server becomes reachable: the next attempt delivers it, once.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let forwarder = tokio::spawn(forward(listener, (mail.smtp_host().to_owned(), mail.smtp_port())));
    let sent = dbps_testkit::wait_for("the notification sent", || async {
        let view = find_email(&http, &node, &envelope.id).await?;
        Ok::<_, BoxError>(
            view.and_then(|v| v.delivery)
                .filter(|d| d.status == DeliveryStatus::Sent),
        )
    })
    .await?;
    assert!(sent.attempts > failing.attempts, "{sent:?}");
    let arrived = mail.wait_for(&rep, 1).await?;
    assert_eq!(arrived.len(), 1);
    assert_eq!(arrived[0].message_id, notification_message_id(&envelope.id));
    forwarder.abort();
    node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collections_are_migrated_with_their_indexes() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let node = EmailNode::start(&kafka, Settings::new(NO_CUSTOMER_SERVICE, "smtp://127.0.0.1:9")).await?;
    let db = node.mongo.database();
    let names = db.list_collection_names().await?;
    for collection in [EMAILS, ATTACHMENTS, ASSIGNMENTS, CUSTOMER_INDEX] {
        assert!(names.iter().any(|n| n == collection), "{collection} in {names:?}");
    }
    let indexes: Vec<String> = db.collection::<Document>(EMAILS).list_index_names().await?;
    assert!(indexes.iter().any(|n| n == "message_id_unique"), "{indexes:?}");
    let chunks: Vec<mongodb::IndexModel> = db
        .collection::<Document>(ATTACHMENTS)
        .list_indexes()
        .await?
        .try_collect()
        .await?;
    assert!(
        chunks
            .iter()
            .any(|i| i.keys == doc! { "email_id": 1, "attachment": 1, "n": 1 }),
        "{chunks:?}"
    );
    // Starting again finds everything in place.
    let report = example_email_service::store::migrations(db).run().await?;
    assert!(report.applied.is_empty());
    node.stop().await
}
