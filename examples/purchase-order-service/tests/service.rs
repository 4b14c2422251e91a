//! The purchase-order service as its process runs it — its own provisioned database, the
//! relay and the saga participant started by `App::start`, served by `dbps-service` —
//! driven by commands on its Kafka topic, as the quote saga sends them, and over HTTP.

use std::collections::HashMap;
use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicNaming};
use dbps_core::{CancellationToken, Envelope, Message, MessageKind, MessageSet, Registry, message_set};
use dbps_saga::Compensated;
use dbps_service::{Service, ServiceConfig};
use example_contracts::purchase_order::{
    CancelPurchaseOrder, CreatePurchaseOrder, PurchaseOrderCreated, PurchaseOrderRejected,
};
use example_contracts::quote::QuoteLine;
use example_purchase_order_service::{
    App, COMMANDS_CONSUMER, CreditLimit, PurchaseOrder, PurchaseOrderState, SERVICE, Settings,
};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Connection as _;
use uuid::Uuid;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

message_set! {
    /// What the service answers on the reply topic.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Answer {
        Created(PurchaseOrderCreated),
        Rejected(PurchaseOrderRejected),
        Compensated(Compensated),
    }
}

/// A command the service does not know.
#[derive(Debug, Serialize, Deserialize)]
struct ArchivePurchaseOrder {
    quote_id: Uuid,
}

impl Message for ArchivePurchaseOrder {
    const TYPE: &'static str = "purchase_order.ArchivePurchaseOrder";
}

/// The service running on a test's own database and topic namespace.
struct Running {
    /// The service's name: its unique test name, and the root of its topics.
    name: String,
    base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<dbps_service::Result<()>>,
    naming: TopicNaming,
    group: String,
    /// The service's command topic.
    commands: String,
    /// The test's reply topic, as the quote saga's would be.
    replies: String,
    publisher: KafkaPublisher,
    http: reqwest::Client,
    pool: sqlx::PgPool,
    kafka: dbps_testkit::TestKafka,
    // Dropped last: removes the service's database and roles.
    database: dbps_testkit::TestService,
}

impl Running {
    /// A command of saga `saga` as the orchestrator sends it: keyed and correlated by
    /// the saga's id, caused by the saga's previous message, answered on the reply topic.
    fn command<M: Message>(&self, saga: Uuid, message: &M) -> Result<Envelope, BoxError> {
        let mut envelope = Envelope::command("quote", saga.to_string(), &self.replies, message)?;
        envelope.correlation_id = Some(saga.to_string());
        envelope.causation_id = Some(Uuid::now_v7().to_string());
        Ok(envelope)
    }

    async fn publish(&self, envelope: &Envelope) -> TestResult {
        self.publisher.publish(&self.commands, envelope).await?;
        Ok(())
    }

    /// Publishes a new command of `saga`; returns it.
    async fn send<M: Message>(&self, saga: Uuid, message: &M) -> Result<Envelope, BoxError> {
        let envelope = self.command(saga, message)?;
        self.publish(&envelope).await?;
        Ok(envelope)
    }

    /// Waits until the reply topic holds at least `count` replies; returns them.
    async fn wait_for_replies(&self, count: usize) -> Result<Vec<Envelope>, BoxError> {
        let mut reader = self.kafka.reader(&self.replies)?;
        let records = reader.wait_for(count).await?;
        Ok(records
            .iter()
            .map(dbps_core::kafka::decode_record)
            .collect::<Result<_, _>>()?)
    }

    /// Every reply there will be to the commands published so far: once the service has
    /// handled them all and its relay has published everything it wrote, the topic read
    /// to its end. Keyed by the command each answers (its causation id).
    async fn all_replies(&self) -> Result<HashMap<String, (Envelope, Answer)>, BoxError> {
        self.kafka.caught_up(&self.group, &self.commands).await?;
        self.database.outbox_drained().await?;
        let records = self.kafka.reader(&self.replies)?.finish().await?;
        let mut replies = HashMap::new();
        for record in &records {
            let envelope = dbps_core::kafka::decode_record(record)?;
            let answer = Answer::decode(&Registry::new(), &envelope)?;
            let cause = envelope.causation_id.clone().ok_or("a reply without causation id")?;
            let previous = replies.insert(cause.clone(), (envelope, answer));
            assert!(previous.is_none(), "two replies to command {cause}");
        }
        assert_eq!(replies.len(), records.len());
        Ok(replies)
    }

    /// The purchase order of `quote` over HTTP, if there is one.
    async fn purchase_order_of(&self, quote: Uuid) -> Result<Option<PurchaseOrder>, BoxError> {
        let response = self
            .http
            .get(format!("{}/purchase-orders?quote_id={quote}", self.base))
            .send()
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            problem(response, StatusCode::NOT_FOUND).await?;
            return Ok(None);
        }
        assert_eq!(response.status(), StatusCode::OK);
        Ok(Some(response.json().await?))
    }

    async fn count(&self, sql: &'static str) -> Result<i64, BoxError> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    /// Stops the service; it must stop cleanly.
    async fn stop(self) -> TestResult {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task).await???;
        Ok(())
    }
}

/// `reply` answers `command`, as the saga's orchestrator expects: same correlation (the
/// saga), same key, from the service. Returns what it says.
fn answer_to(replies: &HashMap<String, (Envelope, Answer)>, command: &Envelope, service: &str) -> Answer {
    let Some((reply, answer)) = replies.get(&command.id) else {
        panic!("no reply to {} among {replies:?}", command.message_type)
    };
    assert_eq!(reply.kind, MessageKind::Reply);
    assert_eq!(reply.correlation_id, command.correlation_id);
    assert_eq!(reply.aggregate_id, command.aggregate_id);
    assert_eq!(reply.source, service);
    answer.clone()
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn,rdkafka=warn")
        .with_test_writer()
        .try_init();
}

/// The service on its own provisioned test database and topic namespace, serving, with a
/// reply topic for the test.
async fn start(settings: Settings) -> Result<Running, BoxError> {
    init_logs();
    let test = dbps_testkit::service(SERVICE).start().await?;
    let kafka = dbps_testkit::kafka().await?;
    let (owner, runtime) = test.passwords();
    // The test service is provisioned already, under its own unique name; the service
    // migrates it as at every start.
    let config = ServiceConfig::new(test.name().as_str())?
        .postgres(test.server_options().clone())
        .passwords(owner.clone(), runtime.clone())
        .provision(false)
        .kafka(KafkaConfig::new(kafka.brokers()))
        .topic_prefix(kafka.prefix());
    let mut service = Service::new(config);
    let app = App::start(&mut service, settings).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let naming = service.naming();
    let name = service.name().to_string();
    // The sender of the commands owns its reply topic and creates it.
    let replies = naming.replies("quote")?;
    kafka.create_topics(&[(&replies, 1)]).await?;
    let running = Running {
        commands: naming.commands(&name)?,
        replies,
        publisher: KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?,
        http: reqwest::Client::new(),
        name,
        base,
        stop: service.shutdown_token(),
        naming,
        group: service.group(COMMANDS_CONSUMER),
        pool: test.pool().clone(),
        task: tokio::spawn(service.serve_on(listener, app.router())),
        kafka,
        database: test,
    };
    Ok(running)
}

/// Two lines, 2 × 15.00 + 1 × 93.45 = 123.45.
fn lines() -> Vec<QuoteLine> {
    vec![
        QuoteLine {
            product_id: Uuid::now_v7(),
            quantity: 2,
            unit_price_cents: 1_500,
        },
        QuoteLine {
            product_id: Uuid::now_v7(),
            quantity: 1,
            unit_price_cents: 9_345,
        },
    ]
}

fn order(customer_id: Uuid, total_cents: i64) -> CreatePurchaseOrder {
    CreatePurchaseOrder {
        quote_id: Uuid::now_v7(),
        customer_id,
        lines: lines(),
        total_cents,
    }
}

async fn problem(response: reqwest::Response, status: StatusCode) -> Result<Value, BoxError> {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{status}"
    );
    Ok(response.json().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_gets_one_purchase_order_however_often_its_command_arrives() -> TestResult {
    let service = start(Settings::default()).await?;
    let saga = Uuid::now_v7();
    let order = order(Uuid::now_v7(), 12_345);

    let first = service.command(saga, &order)?;
    // Kafka delivers it twice (a redelivery: the same message id) ...
    service.publish(&first).await?;
    service.publish(&first).await?;
    // ... and after a timeout the saga sends it again, under a new message id.
    let again = service.send(saga, &order).await?;

    let replies = service.all_replies().await?;
    assert_eq!(replies.len(), 2, "one reply per message id: {replies:?}");
    let Answer::Created(created) = answer_to(&replies, &first, &service.name) else {
        panic!("created: {replies:?}")
    };
    assert_eq!(created.quote_id, order.quote_id);
    assert_eq!(
        answer_to(&replies, &again, &service.name),
        Answer::Created(created.clone()),
        "the command sent again answers with the same purchase order"
    );

    let by_quote = service
        .purchase_order_of(order.quote_id)
        .await?
        .ok_or("no purchase order")?;
    assert_eq!(by_quote.id, created.purchase_order_id);
    assert_eq!(
        (by_quote.quote_id, by_quote.customer_id, by_quote.total_cents),
        (order.quote_id, order.customer_id, 12_345)
    );
    assert_eq!(by_quote.state, PurchaseOrderState::Open);
    assert_eq!(by_quote.lines, order.lines);
    assert_eq!(by_quote.cancelled_at, None);
    let by_id: PurchaseOrder = service
        .http
        .get(format!(
            "{}/purchase-orders/{}",
            service.base, created.purchase_order_id
        ))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(by_id, by_quote);

    assert_eq!(service.count("select count(*) from purchase_orders").await?, 1);
    assert_eq!(service.count("select count(*) from purchase_order_lines").await?, 2);
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_over_the_credit_limit_is_rejected_and_writes_nothing() -> TestResult {
    // A default of 2,000.00 for customers without a limit of their own.
    let service = start(Settings {
        default_limit_cents: 200_000,
    })
    .await?;
    let (limited, unlimited) = (Uuid::now_v7(), Uuid::now_v7());
    let limit_of = |customer: Uuid| format!("{}/credit-limits/{customer}", service.base);

    // Set, changed, and set again: 500.00.
    for cents in [60_000, 50_000] {
        let set = service
            .http
            .put(limit_of(limited))
            .json(&json!({ "limit_cents": cents }))
            .send()
            .await?;
        assert_eq!(set.status(), StatusCode::OK);
        let set: CreditLimit = set.json().await?;
        assert_eq!((set.limit_cents, set.is_default), (cents, false));
    }
    let own: CreditLimit = service.http.get(limit_of(limited)).send().await?.json().await?;
    assert_eq!(
        own,
        CreditLimit {
            customer_id: limited,
            limit_cents: 50_000,
            is_default: false
        }
    );
    let default: CreditLimit = service.http.get(limit_of(unlimited)).send().await?.json().await?;
    assert_eq!(
        default,
        CreditLimit {
            customer_id: unlimited,
            limit_cents: 200_000,
            is_default: true
        }
    );

    let over_own = order(limited, 50_001);
    let at_own = order(limited, 50_000);
    let over_default = order(unlimited, 200_001);
    let no_lines = CreatePurchaseOrder {
        lines: Vec::new(),
        ..order(unlimited, 100)
    };
    let nothing_to_pay = order(unlimited, 0);
    let mut sent = Vec::new();
    for order in [&over_own, &at_own, &over_default, &no_lines, &nothing_to_pay] {
        sent.push(service.send(Uuid::now_v7(), order).await?);
    }

    let replies = service.all_replies().await?;
    assert_eq!(replies.len(), 5);
    let answers: Vec<Answer> = sent
        .iter()
        .map(|command| answer_to(&replies, command, &service.name))
        .collect();
    let reason = |answer: &Answer, quote_id: Uuid| match answer {
        Answer::Rejected(rejected) if rejected.quote_id == quote_id => rejected.reason.clone(),
        other => panic!("rejected for quote {quote_id}: {other:?}"),
    };
    let over = reason(&answers[0], over_own.quote_id);
    assert!(over.contains("credit limit of 500.00"), "{over}");
    assert!(over.contains("500.01"), "{over}");
    assert!(
        matches!(&answers[1], Answer::Created(c) if c.quote_id == at_own.quote_id),
        "an order of exactly the limit is within it: {:?}",
        answers[1]
    );
    let over = reason(&answers[2], over_default.quote_id);
    assert!(over.contains("credit limit of 2,000.00"), "{over}");
    let empty = reason(&answers[3], no_lines.quote_id);
    assert!(empty.contains("no lines"), "{empty}");
    let zero = reason(&answers[4], nothing_to_pay.quote_id);
    assert!(zero.contains("above zero"), "{zero}");

    // Only the order within the limit was written.
    for rejected in [&over_own, &over_default, &no_lines, &nothing_to_pay] {
        assert_eq!(service.purchase_order_of(rejected.quote_id).await?, None);
    }
    assert!(service.purchase_order_of(at_own.quote_id).await?.is_some());
    assert_eq!(service.count("select count(*) from purchase_orders").await?, 1);
    assert_eq!(service.count("select count(*) from purchase_order_lines").await?, 2);
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_is_idempotent_and_compensated_also_without_a_purchase_order() -> TestResult {
    let service = start(Settings::default()).await?;
    let saga = Uuid::now_v7();
    let order = order(Uuid::now_v7(), 12_345);
    let cancel = CancelPurchaseOrder {
        quote_id: order.quote_id,
    };

    let create = service.send(saga, &order).await?;
    let first_cancel = service.send(saga, &cancel).await?;
    service.wait_for_replies(2).await?;
    let cancelled = service
        .purchase_order_of(order.quote_id)
        .await?
        .ok_or("no purchase order")?;
    assert_eq!(cancelled.state, PurchaseOrderState::Cancelled);
    assert!(cancelled.cancelled_at.is_some());

    // The compensation again (after a timeout), one for a quote that never got a purchase
    // order, and the creation once more: the quote's order stays cancelled.
    let second_cancel = service.send(saga, &cancel).await?;
    let other_saga = Uuid::now_v7();
    let nothing = CancelPurchaseOrder {
        quote_id: Uuid::now_v7(),
    };
    let cancel_nothing = service.send(other_saga, &nothing).await?;
    let create_again = service.send(saga, &order).await?;

    let replies = service.all_replies().await?;
    assert_eq!(replies.len(), 5);
    let Answer::Created(created) = answer_to(&replies, &create, &service.name) else {
        panic!("created: {replies:?}")
    };
    assert_eq!(created.purchase_order_id, cancelled.id);
    for compensation in [&first_cancel, &second_cancel, &cancel_nothing] {
        assert_eq!(
            answer_to(&replies, compensation, &service.name),
            Answer::Compensated(Compensated {})
        );
    }
    match answer_to(&replies, &create_again, &service.name) {
        Answer::Rejected(rejected) => assert!(rejected.reason.contains("cancelled"), "{}", rejected.reason),
        other => panic!("a cancelled quote gets no new purchase order: {other:?}"),
    }

    let after = service
        .purchase_order_of(order.quote_id)
        .await?
        .ok_or("no purchase order")?;
    assert_eq!(after, cancelled, "the second cancellation changed nothing");
    assert_eq!(service.purchase_order_of(nothing.quote_id).await?, None);
    assert_eq!(service.count("select count(*) from purchase_orders").await?, 1);
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_without_a_reply_topic_or_of_unknown_types_are_dead_lettered() -> TestResult {
    let service = start(Settings::default()).await?;
    let customer = Uuid::now_v7();
    let unanswerable = order(customer, 12_345);
    let mut no_reply_to = service.command(Uuid::now_v7(), &unanswerable)?;
    no_reply_to.reply_to = None;
    service.publish(&no_reply_to).await?;
    let unknown = ArchivePurchaseOrder {
        quote_id: Uuid::now_v7(),
    };
    service.send(Uuid::now_v7(), &unknown).await?;
    // The consumer goes on with the next command.
    let fine = order(customer, 12_345);
    let created = service.send(Uuid::now_v7(), &fine).await?;

    let replies = service.all_replies().await?;
    assert_eq!(replies.len(), 1);
    assert!(matches!(
        answer_to(&replies, &created, &service.name),
        Answer::Created(c) if c.quote_id == fine.quote_id
    ));
    let dead_letters = service.naming.dead_letter(&service.group)?;
    let dead = service.kafka.reader(&dead_letters)?.finish().await?;
    assert_eq!(dead.len(), 2);
    assert_eq!(service.purchase_order_of(unanswerable.quote_id).await?, None);
    assert_eq!(service.count("select count(*) from purchase_orders").await?, 1);
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_mistake_is_a_4xx_problem_and_writes_nothing() -> TestResult {
    let service = start(Settings::default()).await?;
    let http = &service.http;
    let limit = format!("{}/credit-limits/{}", service.base, Uuid::now_v7());

    let cases = [
        (json!({}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({ "limit_cents": -1 }), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({ "limit_cents": "500" }), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({ "limit_cents": 1.5 }), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({ "limit_cents": 500, "currency": "EUR" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (body, status) in cases {
        let response = http.put(&limit).json(&body).send().await?;
        let problem = problem(response, status).await?;
        if body.get("limit_cents") == Some(&json!(-1)) {
            assert_eq!(problem["errors"][0]["field"], "limit_cents", "{problem}");
        }
    }
    let malformed = http
        .put(&limit)
        .header("content-type", "application/json")
        .body("{\"limit_cents\":")
        .send()
        .await?;
    problem(malformed, StatusCode::BAD_REQUEST).await?;
    let huge = http
        .put(&limit)
        .header("content-type", "application/json")
        .body(format!("{{\"limit_cents\": 1, \"pad\": \"{}\"}}", "x".repeat(100_000)))
        .send()
        .await?;
    problem(huge, StatusCode::PAYLOAD_TOO_LARGE).await?;
    let not_an_id = http
        .put(format!("{}/credit-limits/42", service.base))
        .json(&json!({ "limit_cents": 1 }))
        .send()
        .await?;
    problem(not_an_id, StatusCode::BAD_REQUEST).await?;

    let orders = format!("{}/purchase-orders", service.base);
    let unknown = http.get(format!("{orders}/{}", Uuid::now_v7())).send().await?;
    problem(unknown, StatusCode::NOT_FOUND).await?;
    let not_an_id = http.get(format!("{orders}/42")).send().await?;
    problem(not_an_id, StatusCode::BAD_REQUEST).await?;
    let no_quote = http.get(&orders).send().await?;
    problem(no_quote, StatusCode::BAD_REQUEST).await?;
    let bad_quote = http.get(format!("{orders}?quote_id=yesterday")).send().await?;
    problem(bad_quote, StatusCode::BAD_REQUEST).await?;
    let unknown_quote = http.get(format!("{orders}?quote_id={}", Uuid::now_v7())).send().await?;
    problem(unknown_quote, StatusCode::NOT_FOUND).await?;

    // None of it wrote a limit; a valid request does.
    assert_eq!(service.count("select count(*) from credit_limits").await?, 0);
    let zero = http.put(&limit).json(&json!({ "limit_cents": 0 })).send().await?;
    assert_eq!(zero.status(), StatusCode::OK);
    assert_eq!(service.count("select count(*) from credit_limits").await?, 1);
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_cannot_reach_another_service_s_tables_nor_change_its_own() -> TestResult {
    let service = start(Settings::default()).await?;
    // Another service on the same server, with a table of its own.
    let customer = dbps_testkit::service(example_contracts::services::CUSTOMER)
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .start()
        .await?;
    let sqlstate = |error: &sqlx::Error| error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());

    // Its runtime role cannot even connect to the other service's database, nor theirs to
    // its own.
    let ours_on_theirs = service
        .database
        .runtime_options()
        .database(customer.service().database_name().as_str());
    let theirs_on_ours = customer
        .runtime_options()
        .database(service.database.service().database_name().as_str());
    for options in [ours_on_theirs, theirs_on_ours] {
        let denied = sqlx::PgConnection::connect_with(&options).await.unwrap_err();
        assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{denied}");
    }
    // The other service's own role reads its table (the denial above is about who asks).
    let (theirs,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(customer.pool())
        .await?;
    assert_eq!(theirs, 0);

    // In its own database it reads and writes its tables but cannot change them.
    assert_eq!(service.count("select count(*) from credit_limits").await?, 0);
    for statement in [
        "create table sneaky (x int)",
        "alter table purchase_orders add column sneaky int",
        "drop table credit_limits",
    ] {
        let denied = sqlx::raw_sql(statement).execute(&service.pool).await.unwrap_err();
        assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{statement}: {denied}");
    }
    service.stop().await
}
