//! The customer service as its process runs it — its own provisioned database, the relay
//! and the command consumer started by `App::start`, served by `dbps-service` — driven
//! over HTTP and Kafka.

use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_core::{CancellationToken, Envelope, Registry};
use dbps_service::{Service, ServiceConfig};
use example_customer_service::events::{CustomerCreated, CustomerEvent, CustomerUpdated, RecordMachineInstalled};
use example_customer_service::{AGGREGATE, App, COMMANDS_CONSUMER, CreateCustomer, Customer, CustomerView, SERVICE};
use rdkafka::Message as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The service running on a test's own database and topic namespace.
struct Running {
    /// The service's name: its unique test name, and the root of its topics.
    name: String,
    base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<dbps_service::Result<()>>,
    naming: dbps_core::kafka::TopicNaming,
    group: String,
    pool: sqlx::PgPool,
    kafka: dbps_testkit::TestKafka,
    // Dropped last: removes the service's database and roles.
    _database: dbps_testkit::TestService,
}

impl Running {
    /// `POST /customers` of Ada, answered.
    async fn create_ada(&self, http: &reqwest::Client) -> Result<Customer, Box<dyn std::error::Error + Send + Sync>> {
        Ok(http
            .post(format!("{}/customers", self.base))
            .json(&ada())
            .send()
            .await?
            .json()
            .await?)
    }

    /// Stops the service, reads every record its relay wrote to the customer topic.
    async fn stop_and_read_events(
        self,
        at_least: usize,
    ) -> Result<Vec<rdkafka::message::OwnedMessage>, Box<dyn std::error::Error + Send + Sync>> {
        let topic = self.naming.events(&self.name, AGGREGATE)?;
        let mut reader = self.kafka.reader(&topic)?;
        reader.wait_for(at_least).await?;
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task).await???;
        Ok(reader.finish().await?)
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn,rdkafka=warn")
        .with_test_writer()
        .try_init();
}

/// The service on its own provisioned test database and topic namespace, serving.
async fn start() -> Result<Running, Box<dyn std::error::Error + Send + Sync>> {
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
    let app = App::start(&mut service).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let running = Running {
        name: service.name().to_string(),
        base,
        stop: service.shutdown_token(),
        naming: service.naming(),
        group: service.group(COMMANDS_CONSUMER),
        pool: test.pool().clone(),
        task: tokio::spawn(service.serve_on(listener, app.router())),
        kafka,
        _database: test,
    };
    Ok(running)
}

fn ada() -> CreateCustomer {
    CreateCustomer {
        name: "Ada Lovelace".into(),
        tax_number: "GB-1815".into(),
        email: "ada@example.com".into(),
    }
}

async fn problem(
    response: reqwest::Response,
    status: StatusCode,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{status}"
    );
    Ok(response.json().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_written_with_their_events_and_versions_over_http() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    let customers = format!("{}/customers", service.base);

    let created = http.post(&customers).json(&ada()).send().await?;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["etag"], "\"1\"");
    let ada: Customer = created.json().await?;
    let one = format!("{customers}/{}", ada.id);

    // A change made from version 1 applies; a second one from version 1 is refused.
    let from_v1 = |body: Value| http.put(&one).header("if-match", "\"1\"").json(&body).send();
    let renamed = from_v1(json!({ "name": "Ada King" })).await?;
    assert_eq!(renamed.status(), StatusCode::OK);
    let renamed: Customer = renamed.json().await?;
    assert_eq!((renamed.name.as_str(), renamed.version), ("Ada King", 2));
    let stale = from_v1(json!({ "name": "Countess of Lovelace" })).await?;
    let stale = problem(stale, StatusCode::PRECONDITION_FAILED).await?;
    assert_eq!(stale["current_version"], 2);
    // The same values again: no new version, no event.
    let same = http.put(&one).json(&json!({ "name": "Ada King" })).send().await?;
    assert_eq!(same.status(), StatusCode::OK);
    assert_eq!(same.json::<Customer>().await?.version, 2);

    let view: CustomerView = http.get(&one).send().await?.json().await?;
    assert_eq!(view.customer, renamed);
    let unchanged = http.get(&one).header("if-none-match", "\"2\"").send().await?;
    assert_eq!(unchanged.status(), StatusCode::NOT_MODIFIED);

    // The runtime role cannot change its own tables.
    let denied = sqlx::query("create table sneaky (x int)")
        .execute(&service.pool)
        .await
        .unwrap_err();
    assert_eq!(
        denied.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501")
    );

    // Exactly two events, in order, with the versions as sequence numbers.
    let name = service.name.clone();
    let records = service.stop_and_read_events(2).await?;
    assert_eq!(records.len(), 2, "the two committed changes, nothing else");
    let events: Vec<Envelope> = records
        .iter()
        .map(dbps_core::kafka::decode_record)
        .collect::<Result<_, _>>()?;
    let registry = Registry::new();
    let decoded: Vec<CustomerEvent> = events
        .iter()
        .map(|e| dbps_core::MessageSet::decode(&registry, e))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        decoded,
        vec![
            CustomerEvent::Created(CustomerCreated::from(&ada)),
            CustomerEvent::Updated(CustomerUpdated::from(&renamed))
        ]
    );
    for (event, sequence) in events.iter().zip([1, 2]) {
        assert_eq!(event.aggregate_id, ada.id.to_string());
        assert_eq!(event.sequence, Some(sequence));
        assert_eq!(event.source, name);
        assert!(event.trace.trace_id().is_some());
    }
    assert!(records.iter().all(|r| r.key() == Some(ada.id.to_string().as_bytes())));

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_mistake_is_a_4xx_problem_and_writes_nothing() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    let customers = format!("{}/customers", service.base);
    let ada = service.create_ada(&http).await?;
    let one = format!("{customers}/{}", ada.id);

    let long_name = "ü".repeat(201); // 201 characters, 402 bytes
    let cases = [
        (
            json!({"name": "Ada", "tax_number": "X", "email": " @x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "A\u{0}da", "tax_number": "X", "email": "a@example.com"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": long_name, "tax_number": "X", "email": "a@example.com"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "Ada", "tax_number": "X", "email": "a@example.com", "vip": true}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"name": "Ada"}), StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (body, status) in cases {
        let response = http.post(&customers).json(&body).send().await?;
        problem(response, status).await?;
    }
    let exactly_200 = json!({"name": "ü".repeat(200), "tax_number": "X", "email": "a@example.com"});
    assert_eq!(
        http.post(&customers).json(&exactly_200).send().await?.status(),
        StatusCode::CREATED
    );

    let malformed = http
        .post(&customers)
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await?;
    problem(malformed, StatusCode::BAD_REQUEST).await?;
    let huge = http
        .post(&customers)
        .header("content-type", "application/json")
        .body(format!("{{\"name\": \"{}\"}}", "x".repeat(100_000)))
        .send()
        .await?;
    problem(huge, StatusCode::PAYLOAD_TOO_LARGE).await?;
    let empty = http.put(&one).json(&json!({})).send().await?;
    problem(empty, StatusCode::UNPROCESSABLE_ENTITY).await?;
    let not_a_version = http
        .put(&one)
        .header("if-match", "yesterday")
        .json(&json!({"name": "Ada"}))
        .send()
        .await?;
    problem(not_a_version, StatusCode::BAD_REQUEST).await?;
    let unknown = http.get(format!("{customers}/{}", uuid::Uuid::now_v7())).send().await?;
    problem(unknown, StatusCode::NOT_FOUND).await?;
    let not_an_id = http.get(format!("{customers}/42")).send().await?;
    problem(not_an_id, StatusCode::BAD_REQUEST).await?;

    // Two customers, two events: the mistakes wrote nothing.
    let (rows,): (i64,) = sqlx::query_as("select count(*) from customers")
        .fetch_one(&service.pool)
        .await?;
    assert_eq!(rows, 2);
    assert_eq!(service.stop_and_read_events(2).await?.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_commands_are_applied_once_and_unknown_customers_dead_lettered() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    let ada = service.create_ada(&http).await?;

    let install = |customer_id| RecordMachineInstalled {
        customer_id,
        machine: String::from("press P-200 #1137"),
        installed_at: chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default(),
    };
    let commands = service.naming.commands(&service.name)?;
    let reply_to = service.kafka.topic_name("po.replies");
    let command = Envelope::command("purchase-order", ada.id.to_string(), &reply_to, &install(ada.id))?;
    let stray = Envelope::command("purchase-order", "nobody", &reply_to, &install(uuid::Uuid::now_v7()))?;
    let publisher = KafkaPublisher::builder(KafkaConfig::new(service.kafka.brokers())).build()?;
    // The same command twice (a redelivery), and one for a customer that does not exist.
    for envelope in [&command, &command, &stray] {
        publisher.publish(&commands, envelope).await?;
    }
    service.kafka.caught_up(&service.group, &commands).await?;

    let view: CustomerView = http
        .get(format!("{}/customers/{}", service.base, ada.id))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(view.machines.len(), 1, "applied once: {:?}", view.machines);
    assert_eq!(view.machines[0].machine, "press P-200 #1137");
    let dead_letters = service.naming.dead_letter(&service.group)?;
    let dead = service.kafka.reader(&dead_letters)?.wait_for(1).await?.len();
    assert_eq!(dead, 1);
    service.stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), service.task).await???;
    Ok(())
}
