//! The customer service as its process runs it — its own provisioned database, the relay
//! and the command consumer started by `App::start`, served by `dbps-service` — driven
//! over HTTP and Kafka.

use std::time::Duration;

use dbps_cache::replica::http::HttpSource;
use dbps_cache::replica::{Change, PgReplica, Projection, Reconciler};
use dbps_core::kafka::{ConsumerRunner, KafkaConfig, KafkaPublisher, TopicSpec};
use dbps_core::{CancellationToken, Envelope, HandlerError, Registry};
use dbps_service::{Service, ServiceConfig};
use example_customer_service::events::{CustomerCreated, CustomerEvent, CustomerUpdated, RecordMachineInstalled};
use example_customer_service::{
    AGGREGATE, Address, AddressKind, App, COMMANDS_CONSUMER, Contact, CreateCustomer, Customer, CustomerPage,
    CustomerView, Machine, SERVICE, SNAPSHOT_PATH, Settings, search::SearchResults,
};
use rdkafka::Message as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

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
    database: dbps_testkit::TestService,
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

    /// `POST /customers` of a customer named `name`, answered.
    async fn create(
        &self,
        http: &reqwest::Client,
        name: &str,
    ) -> Result<Customer, Box<dyn std::error::Error + Send + Sync>> {
        let body = CreateCustomer {
            name: name.into(),
            tax_number: format!("TAX-{name}"),
            email: format!("{}@example.com", name.to_lowercase().replace(' ', ".")),
        };
        let response = http.post(format!("{}/customers", self.base)).json(&body).send().await?;
        assert_eq!(response.status(), StatusCode::CREATED);
        Ok(response.json().await?)
    }

    /// Stops the service and waits for it to finish.
    async fn stop(self) -> TestResult {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task).await???;
        Ok(())
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

/// The service on its own provisioned test database and topic namespace, serving,
/// without customer search.
async fn start() -> Result<Running, Box<dyn std::error::Error + Send + Sync>> {
    start_with(Settings::default()).await
}

/// [`start`] with `settings`.
async fn start_with(settings: Settings) -> Result<Running, Box<dyn std::error::Error + Send + Sync>> {
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
    let app = App::start_with(&mut service, settings).await?;
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
        database: test,
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
    assert_eq!(view.customer.version, 2, "a recorded machine is a new version");
    let dead_letters = service.naming.dead_letter(&service.group)?;
    let dead = service.kafka.reader(&dead_letters)?.wait_for(1).await?.len();
    assert_eq!(dead, 1);
    service.stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), service.task).await???;
    Ok(())
}

/// The events in `records`, decoded, with their sequence numbers.
fn decode_events(records: &[rdkafka::message::OwnedMessage]) -> Result<Vec<(CustomerEvent, Option<i64>)>, BoxError> {
    let registry = Registry::new();
    let mut events = Vec::new();
    for record in records {
        let envelope = dbps_core::kafka::decode_record(record)?;
        let event: CustomerEvent = dbps_core::MessageSet::decode(&registry, &envelope)?;
        events.push((event, envelope.sequence));
    }
    Ok(events)
}

/// The keys of a JSON object, sorted.
fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_and_contacts_are_added_shown_and_announced_as_new_versions() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    let ada = service.create_ada(&http).await?;
    let one = format!("{}/customers/{}", service.base, ada.id);

    let billing = http
        .post(format!("{one}/addresses"))
        .json(
            &json!({"kind": "billing", "street": "12 St James's Square", "city": "London",
                      "postal_code": "SW1Y 4JH", "country": "GB"}),
        )
        .send()
        .await?;
    assert_eq!(billing.status(), StatusCode::CREATED);
    assert_eq!(billing.headers()["etag"], "\"2\"");
    let billing: Value = billing.json().await?;
    assert_eq!(
        keys(&billing),
        ["city", "country", "id", "kind", "postal_code", "street"]
    );
    assert_eq!(billing["kind"], "billing");
    let billing: Address = serde_json::from_value(billing)?;

    // Made from version 2, the customer's current one; the country in lower case.
    let site = http
        .post(format!("{one}/addresses"))
        .header("if-match", "\"2\"")
        .json(&json!({"kind": "site", "street": " Hauptstraße 5 ", "city": "Köln",
                      "postal_code": "50667", "country": "de"}))
        .send()
        .await?;
    assert_eq!(site.status(), StatusCode::CREATED);
    assert_eq!(site.headers()["etag"], "\"3\"");
    let site: Address = site.json().await?;
    assert_eq!(
        (site.kind, site.street.as_str(), site.country.as_str()),
        (AddressKind::Site, "Hauptstraße 5", "DE")
    );
    // Made from version 2 again: the customer changed since.
    let stale = http
        .post(format!("{one}/addresses"))
        .header("if-match", "\"2\"")
        .json(&json!({"kind": "shipping", "street": "Dock 4", "city": "Hamburg",
                      "postal_code": "20457", "country": "DE"}))
        .send()
        .await?;
    assert_eq!(
        problem(stale, StatusCode::PRECONDITION_FAILED).await?["current_version"],
        3
    );

    let charles = http
        .post(format!("{one}/contacts"))
        .json(&json!({"name": "Charles Babbage", "email": "charles@example.com", "phone": "+44 20 7946 0000"}))
        .send()
        .await?;
    assert_eq!(charles.status(), StatusCode::CREATED);
    assert_eq!(charles.headers()["etag"], "\"4\"");
    let charles: Contact = charles.json().await?;
    assert_eq!(
        (charles.email.as_deref(), charles.phone.as_deref()),
        (Some("charles@example.com"), Some("+44 20 7946 0000"))
    );
    let mary = http
        .post(format!("{one}/contacts"))
        .json(&json!({"name": "Mary Somerville"}))
        .send()
        .await?;
    assert_eq!(mary.headers()["etag"], "\"5\"");
    let mary: Value = mary.json().await?;
    assert_eq!(keys(&mary), ["email", "id", "name", "phone"]);
    assert_eq!((&mary["email"], &mary["phone"]), (&Value::Null, &Value::Null));
    let mary: Contact = serde_json::from_value(mary)?;

    let view = http.get(&one).send().await?;
    assert_eq!(view.headers()["etag"], "\"5\"");
    let view: Value = view.json().await?;
    assert_eq!(
        keys(&view),
        [
            "addresses",
            "contacts",
            "email",
            "id",
            "machines",
            "name",
            "tax_number",
            "version"
        ]
    );
    let view: CustomerView = serde_json::from_value(view)?;
    assert_eq!(
        view.customer,
        Customer {
            version: 5,
            ..ada.clone()
        }
    );
    assert_eq!(view.addresses, [billing.clone(), site.clone()]);
    assert_eq!(view.contacts, [charles.clone(), mary.clone()]);
    assert!(view.machines.is_empty());
    let addresses: Vec<Address> = http.get(format!("{one}/addresses")).send().await?.json().await?;
    assert_eq!(addresses, view.addresses);
    let contacts: Vec<Contact> = http.get(format!("{one}/contacts")).send().await?.json().await?;
    assert_eq!(contacts, view.contacts);
    let machines: Vec<Machine> = http.get(format!("{one}/machines")).send().await?.json().await?;
    assert!(machines.is_empty());

    // Five versions, five events in order: the four changes carry the customer's
    // unchanged fields at their new versions, and the addresses added so far.
    let events = decode_events(&service.stop_and_read_events(5).await?)?;
    let expected: Vec<(CustomerEvent, Option<i64>)> = (1..=5)
        .map(|version| {
            let at = Customer { version, ..ada.clone() };
            let addresses = match version {
                2 => vec![billing.clone()],
                _ => vec![billing.clone(), site.clone()],
            };
            let event = if version == 1 {
                CustomerEvent::Created(CustomerCreated::from(&at))
            } else {
                CustomerEvent::Updated(CustomerUpdated::with_details(&at, addresses, Vec::new()))
            };
            (event, Some(version))
        })
        .collect();
    assert_eq!(events, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_and_contacts_are_4xx_problems_and_write_nothing() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    let ada = service.create_ada(&http).await?;
    let one = format!("{}/customers/{}", service.base, ada.id);
    let address = |changes: Value| {
        let mut body = json!({"kind": "billing", "street": "12 St James's Square", "city": "London",
                              "postal_code": "SW1Y 4JH", "country": "GB"});
        if let (Some(body), Some(changes)) = (body.as_object_mut(), changes.as_object()) {
            for (field, value) in changes {
                if value.is_null() {
                    body.remove(field);
                } else {
                    body.insert(field.clone(), value.clone());
                }
            }
        }
        body
    };

    // (body, the fields the problem names; none when the body does not even decode)
    let addresses = [
        (address(json!({"kind": "office"})), vec!["kind"]),
        (address(json!({"kind": "Billing"})), vec!["kind"]),
        (address(json!({"country": "Germany"})), vec!["country"]),
        (address(json!({"country": "XX"})), vec!["country"]),
        (address(json!({"street": "   "})), vec!["street"]),
        (address(json!({"street": "x".repeat(201)})), vec!["street"]),
        (address(json!({"postal_code": "SW1Y\u{0}4JH"})), vec!["postal_code"]),
        (
            address(json!({"kind": "office", "country": "UK"})),
            vec!["kind", "country"],
        ),
        (address(json!({"city": null})), vec![]),
        (address(json!({"floor": 3})), vec![]),
        (address(json!({"kind": 1})), vec![]),
    ];
    for (body, fields) in addresses {
        let response = http.post(format!("{one}/addresses")).json(&body).send().await?;
        let problem = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await?;
        let named: Vec<&str> = problem["errors"]
            .as_array()
            .map(|errors| errors.iter().filter_map(|e| e["field"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(named, fields, "{body}: {problem}");
    }
    let contacts = [
        (json!({"name": "Charles", "email": "not an address"}), vec!["email"]),
        (json!({"name": "Charles", "email": ""}), vec!["email"]),
        (json!({"name": "Charles", "phone": "call me"}), vec!["phone"]),
        (json!({"name": "Charles", "phone": "12"}), vec!["phone"]),
        (json!({"name": " ", "email": "@example.com"}), vec!["name", "email"]),
        (json!({"email": "charles@example.com"}), vec![]),
        (json!({"name": "Charles", "role": "engineer"}), vec![]),
    ];
    for (body, fields) in contacts {
        let response = http.post(format!("{one}/contacts")).json(&body).send().await?;
        let problem = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await?;
        let named: Vec<&str> = problem["errors"]
            .as_array()
            .map(|errors| errors.iter().filter_map(|e| e["field"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(named, fields, "{body}: {problem}");
    }
    let malformed = http
        .post(format!("{one}/contacts"))
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await?;
    problem(malformed, StatusCode::BAD_REQUEST).await?;

    // A valid request for a customer that does not exist, or is not even an id.
    let nobody = format!("{}/customers/{}", service.base, uuid::Uuid::now_v7());
    let unknown = http
        .post(format!("{nobody}/addresses"))
        .json(&address(json!({})))
        .send()
        .await?;
    problem(unknown, StatusCode::NOT_FOUND).await?;
    let unknown = http
        .post(format!("{nobody}/contacts"))
        .json(&json!({"name": "Charles"}))
        .send()
        .await?;
    problem(unknown, StatusCode::NOT_FOUND).await?;
    for list in ["addresses", "contacts", "machines"] {
        problem(
            http.get(format!("{nobody}/{list}")).send().await?,
            StatusCode::NOT_FOUND,
        )
        .await?;
        problem(
            http.get(format!("{}/customers/42/{list}", service.base)).send().await?,
            StatusCode::BAD_REQUEST,
        )
        .await?;
    }
    let not_a_version = http
        .post(format!("{one}/contacts"))
        .header("if-match", "latest")
        .json(&json!({"name": "Charles"}))
        .send()
        .await?;
    problem(not_a_version, StatusCode::BAD_REQUEST).await?;

    // Nothing was written: no address, no contact, no new version, one event.
    let (addresses, contacts, version): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from customer_addresses), (select count(*) from customer_contacts),
                (select version from customers where id = $1)",
    )
    .bind(ada.id)
    .fetch_one(&service.pool)
    .await?;
    assert_eq!((addresses, contacts, version), (0, 0, 1));
    let view: CustomerView = http.get(&one).send().await?.json().await?;
    assert!(view.addresses.is_empty() && view.contacts.is_empty());
    assert_eq!(service.stop_and_read_events(1).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_listed_in_pages_by_id() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 1..=7 {
        ids.push(service.create(&http, &format!("Customer {n:02}")).await?.id);
    }
    ids.sort();
    let list = format!("{}/customers", service.base);

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut after: Option<uuid::Uuid> = None;
    loop {
        let mut request = http.get(&list).query(&[("limit", "3")]);
        if let Some(after) = after {
            request = request.query(&[("after", after.to_string())]);
        }
        let page: CustomerPage = request.send().await?.json().await?;
        sizes.push(page.customers.len());
        seen.extend(page.customers.iter().map(|c| c.id));
        match page.next {
            Some(next) => {
                assert_eq!(page.customers.last().map(|c| c.id), Some(next));
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, ids, "each customer once, in id order");

    // A page that ends exactly at the last customer says there is no next one.
    let all: CustomerPage = http.get(&list).query(&[("limit", "7")]).send().await?.json().await?;
    assert_eq!((all.customers.len(), all.next), (7, None));
    let default: CustomerPage = http.get(&list).send().await?.json().await?;
    assert_eq!(default, all);
    let past_the_end: CustomerPage = http
        .get(&list)
        .query(&[("after", ids[6].to_string())])
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        past_the_end,
        CustomerPage {
            customers: vec![],
            next: None
        }
    );

    for (query, status) in [
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=501", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=-1", StatusCode::BAD_REQUEST),
        ("limit=many", StatusCode::BAD_REQUEST),
        ("after=42", StatusCode::BAD_REQUEST),
        ("colour=red", StatusCode::BAD_REQUEST),
    ] {
        problem(http.get(format!("{list}?{query}")).send().await?, status).await?;
    }
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_pages_through_every_customer_once_at_its_version() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    for n in 0..25 {
        let customer = service.create(&http, &format!("Customer {n:02}")).await?;
        let one = format!("{}/customers/{}", service.base, customer.id);
        if n % 3 == 0 {
            let renamed = http
                .put(&one)
                .json(&json!({"name": format!("Renamed {n:02}")}))
                .send()
                .await?;
            assert_eq!(renamed.status(), StatusCode::OK);
        }
        if n % 5 == 0 {
            let added = http
                .post(format!("{one}/contacts"))
                .json(&json!({"name": "Purchasing"}))
                .send()
                .await?;
            assert_eq!(added.status(), StatusCode::CREATED);
        }
    }
    let current: CustomerPage = http
        .get(format!("{}/customers?limit=500", service.base))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(current.customers.len(), 25);
    assert!(current.customers.iter().any(|c| c.version == 3));
    let snapshot = format!("{}{SNAPSHOT_PATH}", service.base);

    let mut records: Vec<Value> = Vec::new();
    let mut pages = 0;
    let mut after: Option<String> = None;
    loop {
        let mut request = http.get(&snapshot).query(&[("limit", "4")]);
        if let Some(after) = &after {
            request = request.query(&[("after", after)]);
        }
        let response = request.send().await?;
        assert_eq!(response.status(), StatusCode::OK);
        let page: Value = response.json().await?;
        assert_eq!(keys(&page), ["next", "records"]);
        let page_records = page["records"].as_array().cloned().unwrap_or_default();
        assert!(page_records.len() <= 4);
        pages += 1;
        records.extend(page_records);
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 7, "25 records, 4 a page");
    assert_eq!(records.len(), 25, "each customer once");
    for (record, customer) in records.iter().zip(&current.customers) {
        // The same order (by id), the version as sequence, the events' payload as state.
        assert_eq!(keys(record), ["aggregate_id", "sequence", "state"]);
        assert_eq!(record["aggregate_id"], customer.id.to_string());
        assert_eq!(record["sequence"], customer.version);
        assert_eq!(record["state"], serde_json::to_value(CustomerUpdated::from(customer))?);
        let created: CustomerCreated = serde_json::from_value(record["state"].clone())?;
        assert_eq!(created, CustomerCreated::from(customer));
    }

    let ada = &current.customers[0];
    let one: Value = http
        .get(format!("{snapshot}/records/{}", ada.id))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(one, records[0]);
    let absent = http
        .get(format!("{snapshot}/records/{}", uuid::Uuid::now_v7()))
        .send()
        .await?;
    assert_eq!(absent.status(), StatusCode::NOT_FOUND);
    let digests: Vec<Value> = http.get(format!("{snapshot}/digests")).send().await?.json().await?;
    assert_eq!(digests.iter().filter_map(|d| d["count"].as_i64()).sum::<i64>(), 25);
    // Ids that are not customer ids are the client's mistake.
    for path in ["?after=42", "/records/42"] {
        problem(
            http.get(format!("{snapshot}{path}")).send().await?,
            StatusCode::BAD_REQUEST,
        )
        .await?;
    }
    service.stop().await
}

/// The test's stand-in for the quote service's `customer_cache`.
static CUSTOMER_CACHE: sqlx::migrate::Migrator = sqlx::migrate!("tests/fixtures/customer_cache");

/// `customer_cache {id, name, tax_number, email}`, kept from the customer events and the
/// snapshot by one projection.
struct CustomerCache;

#[derive(serde::Serialize)]
struct CacheRow<'a> {
    name: &'a str,
    tax_number: &'a str,
    email: &'a str,
}

impl Projection for CustomerCache {
    type Events = CustomerEvent;
    type Snapshot = CustomerUpdated;

    fn project(&self, event: CustomerEvent, _: &Envelope) -> Result<Change, HandlerError> {
        match event {
            CustomerEvent::Created(c) => self.snapshot(CustomerUpdated {
                id: c.id,
                name: c.name,
                tax_number: c.tax_number,
                email: c.email,
                version: c.version,
                addresses: c.addresses,
                machines: c.machines,
            }),
            CustomerEvent::Updated(c) => self.snapshot(c),
        }
    }

    fn snapshot(&self, c: CustomerUpdated) -> Result<Change, HandlerError> {
        Ok(Change::row(&CacheRow {
            name: &c.name,
            tax_number: &c.tax_number,
            email: &c.email,
        })?)
    }
}

/// The replica's rows, as customers (the sequence as version), in id order.
async fn cached(pool: &sqlx::PgPool) -> Result<Vec<Customer>, sqlx::Error> {
    sqlx::query_as("select id, name, tax_number, email, source_sequence as version from customer_cache order by id")
        .fetch_all(pool)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_backfills_from_the_snapshot_over_http_then_follows_the_events() -> TestResult {
    let service = start().await?;
    let http = reqwest::Client::new();
    for n in 0..25 {
        let customer = service.create(&http, &format!("Customer {n:02}")).await?;
        if n % 4 == 0 {
            let changed = http
                .put(format!("{}/customers/{}", service.base, customer.id))
                .json(&json!({"tax_number": format!("NEW-{n:02}")}))
                .send()
                .await?;
            assert_eq!(changed.status(), StatusCode::OK);
        }
    }
    let owner: CustomerPage = http
        .get(format!("{}/customers?limit=500", service.base))
        .send()
        .await?
        .json()
        .await?;

    // The quote service's side: its own database with the replica's tables.
    let quote = dbps_testkit::service("quote")
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("dbps_replica", &dbps_cache::replica::MIGRATOR)
        .component("quote", &CUSTOMER_CACHE)
        .start()
        .await?;
    let source = HttpSource::new(http.clone(), format!("{}{SNAPSHOT_PATH}", service.base));
    let replica = PgReplica::builder(quote.pool().clone(), "customer_cache", CustomerCache)
        .aggregate_column("id")
        .refetch_from(source.clone())
        .build()?;

    let (read, advanced) = replica.backfill(&source, 7).await?;
    assert_eq!((read, advanced), (25, 25));
    assert_eq!(cached(quote.pool()).await?, owner.customers);
    // Again: every record is at the version the replica holds, nothing advances.
    assert_eq!(replica.backfill(&source, 7).await?, (25, 0));

    // Then the stream: the events up to the snapshot change nothing, a newer one applies.
    let topic = service.naming.events(&service.name, AGGREGATE)?;
    let group = service.kafka.group_id("quote.customer-cache");
    let runner = ConsumerRunner::builder(KafkaConfig::new(service.kafka.brokers()), &group, replica.clone())
        .topic(&topic)
        .create_topics(|name| TopicSpec::new(name, 1))
        .build()?;
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(runner.run(stop.clone()));
    service.database.outbox_drained().await?;
    service.kafka.caught_up(&group, &topic).await?;
    assert_eq!(cached(quote.pool()).await?, owner.customers);

    let renamed: Customer = http
        .put(format!("{}/customers/{}", service.base, owner.customers[3].id))
        .json(&json!({"name": "Grace Hopper"}))
        .send()
        .await?
        .json()
        .await?;
    dbps_testkit::eventually("the replica to apply the rename", || async {
        Ok::<_, sqlx::Error>(cached(quote.pool()).await?.contains(&renamed))
    })
    .await?;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), consumer).await???;

    // The copy matches its owner, record for record.
    let report = Reconciler::new(source, replica).run().await?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.source_records, report.replica_records), (25, 25));
    service.stop().await
}

/// `GET /customers/search?q=<q>`: the ids found, and the whole answer.
async fn search(
    service: &Running,
    http: &reqwest::Client,
    q: &str,
) -> Result<(Vec<uuid::Uuid>, SearchResults), BoxError> {
    let response = http
        .get(format!("{}/customers/search", service.base))
        .query(&[("q", q)])
        .send()
        .await?;
    if response.status() != StatusCode::OK {
        return Err(format!("search {q:?}: {}", response.status()).into());
    }
    let results: SearchResults = response.json().await?;
    Ok((results.results.iter().map(|c| c.id).collect(), results))
}

/// Waits until searching `q` finds exactly `expected`.
async fn found(service: &Running, http: &reqwest::Client, q: &str, expected: &[uuid::Uuid]) -> TestResult {
    dbps_testkit::eventually(&format!("search {q:?} to find {expected:?}"), || async {
        // Before the index is built, search answers 503.
        Ok::<_, BoxError>(search(service, http, q).await.is_ok_and(|(ids, _)| ids == expected))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_found_by_name_address_and_machine_and_renames_move_them() -> TestResult {
    let opensearch = dbps_testkit::opensearch().await?;
    let settings = Settings::default()
        .opensearch(opensearch.url())
        .search_index_prefix(format!("{}-", opensearch.prefix()));
    let service = start_with(settings).await?;
    let http = reqwest::Client::new();
    let zenobia = service.create(&http, "Zenobia Quillfeather").await?;
    let other = service.create(&http, "Bartholomew Inkwell").await?;
    let address = http
        .post(format!("{}/customers/{}/addresses", service.base, zenobia.id))
        .json(
            &json!({"kind": "site", "street": "Harbourside Lane 7", "city": "Wolfsburg",
                      "postal_code": "38440", "country": "de"}),
        )
        .send()
        .await?;
    assert_eq!(address.status(), StatusCode::CREATED);

    // A machine delivered to Zenobia, recorded from the command topic.
    let commands = service.naming.commands(&service.name)?;
    let reply_to = service.kafka.topic_name("po.replies");
    let install = RecordMachineInstalled {
        customer_id: zenobia.id,
        machine: String::from("press P-200 #1137"),
        installed_at: chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default(),
    };
    let command = Envelope::command("purchase-order", zenobia.id.to_string(), &reply_to, &install)?;
    let publisher = KafkaPublisher::builder(KafkaConfig::new(service.kafka.brokers())).build()?;
    publisher.publish(&commands, &command).await?;
    service.kafka.caught_up(&service.group, &commands).await?;

    found(&service, &http, "Quillfeather", &[zenobia.id]).await?;
    found(&service, &http, "harbourside", &[zenobia.id]).await?;
    found(&service, &http, "P-200", &[zenobia.id]).await?;
    found(&service, &http, "Inkwell", &[other.id]).await?;
    found(&service, &http, "Wolfsburg Quillfeather", &[zenobia.id]).await?;
    found(&service, &http, "Wolfsburg Inkwell", &[]).await?;
    let (_, answer) = search(&service, &http, "Quillfeather").await?;
    let document = &answer.results[0];
    assert_eq!(document.version, 3, "created, address added, machine recorded");
    assert_eq!(document.addresses[0].city, "Wolfsburg");
    assert_eq!(document.machines[0].machine, "press P-200 #1137");
    assert!(answer.as_of.is_some(), "the answer says how fresh it is: {answer:?}");
    assert!(answer.lag_ms.is_some(), "{answer:?}");

    // Renamed: the new name finds Zenobia, the old one no longer does.
    let renamed = http
        .put(format!("{}/customers/{}", service.base, zenobia.id))
        .json(&json!({"name": "Zenobia Marchbanks"}))
        .send()
        .await?;
    assert_eq!(renamed.status(), StatusCode::OK);
    found(&service, &http, "Marchbanks", &[zenobia.id]).await?;
    found(&service, &http, "Quillfeather", &[]).await?;
    let (_, answer) = search(&service, &http, "Marchbanks").await?;
    assert_eq!(answer.results[0].version, 4);
    assert_eq!(
        answer.results[0].machines.len(),
        1,
        "a rename keeps the machine history"
    );
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_that_cannot_answer_is_a_503_problem() -> TestResult {
    // Not configured.
    let service = start().await?;
    let http = reqwest::Client::new();
    let url = format!("{}/customers/search?q=ada", service.base);
    let answer = problem(http.get(&url).send().await?, StatusCode::SERVICE_UNAVAILABLE).await?;
    assert_eq!(answer["status"], 503);
    // A query is required.
    let empty = http.get(format!("{}/customers/search?q=", service.base)).send().await?;
    assert!(empty.status().is_client_error(), "{}", empty.status());
    service.stop().await?;

    // OpenSearch unreachable: nothing listens on the port.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let service = start_with(Settings::default().opensearch(format!("http://{closed}"))).await?;
    let url = format!("{}/customers/search?q=ada", service.base);
    problem(http.get(&url).send().await?, StatusCode::SERVICE_UNAVAILABLE).await?;
    service.stop().await
}
