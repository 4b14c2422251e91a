//! The example system end to end: the customer, inventory, purchase-order and quote
//! services, each on its own provisioned database, served over HTTP and talking over Kafka
//! — the ADR's flows as a client sees them.

use std::net::SocketAddr;
use std::time::Duration;

use dbps_core::kafka::KafkaConfig;
use dbps_core::{CancellationToken, Registry};
use dbps_service::{Service, ServiceConfig};
use example_contracts::quote::{AGGREGATE, QuoteEvent};
use example_quote_service::Settings;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection as _;
use uuid::Uuid;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

/// Which service a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Customer,
    Inventory,
    PurchaseOrder,
    Quote,
}

/// One service: its database (kept across restarts), its address and, while it runs,
/// its task.
struct Node {
    kind: Kind,
    database: dbps_testkit::TestService,
    addr: SocketAddr,
    running: Option<(CancellationToken, tokio::task::JoinHandle<dbps_service::Result<()>>)>,
}

impl Node {
    fn name(&self) -> String {
        self.database.name().to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// The four services on one Kafka namespace.
struct System {
    kafka: dbps_testkit::TestKafka,
    redis: dbps_testkit::TestRedis,
    customer: Node,
    inventory: Node,
    orders: Node,
    quote: Node,
    /// How long a quote waits for the inventory, and an order step for its participant.
    timeouts: (Duration, Duration),
    http: reqwest::Client,
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn,rdkafka=warn,librdkafka=warn")
        .with_test_writer()
        .try_init();
}

impl System {
    async fn start(stock_timeout: Duration, order_step_timeout: Duration) -> Result<Self, BoxError> {
        init_logs();
        let kafka = dbps_testkit::kafka().await?;
        let redis = dbps_testkit::redis().await?;
        let node = |kind, database| Node {
            kind,
            database,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            running: None,
        };
        let mut system = Self {
            customer: node(Kind::Customer, dbps_testkit::service("customer").start().await?),
            inventory: node(Kind::Inventory, dbps_testkit::service("inventory").start().await?),
            orders: node(
                Kind::PurchaseOrder,
                dbps_testkit::service("purchase_order").start().await?,
            ),
            quote: node(Kind::Quote, dbps_testkit::service("quote").start().await?),
            kafka,
            redis,
            timeouts: (stock_timeout, order_step_timeout),
            http: reqwest::Client::new(),
        };
        for kind in [Kind::Customer, Kind::Inventory, Kind::PurchaseOrder, Kind::Quote] {
            system.up(kind).await?;
        }
        Ok(system)
    }

    fn node(&mut self, kind: Kind) -> &mut Node {
        match kind {
            Kind::Customer => &mut self.customer,
            Kind::Inventory => &mut self.inventory,
            Kind::PurchaseOrder => &mut self.orders,
            Kind::Quote => &mut self.quote,
        }
    }

    /// Starts a service (again, on the address it had).
    async fn up(&mut self, kind: Kind) -> TestResult {
        let customer = (self.customer.name(), self.customer.url(""));
        let inventory_url = self.inventory.url("");
        let (inventory, orders) = (self.inventory.name(), self.orders.name());
        let (brokers, prefix) = (self.kafka.brokers().to_owned(), self.kafka.prefix().to_owned());
        let redis = (self.redis.connection(), self.redis.prefix().to_owned());
        let quote = self.quote.name();
        let timeouts = self.timeouts;
        let node = self.node(kind);
        let (owner, runtime) = node.database.passwords();
        let config = ServiceConfig::new(node.database.name().as_str())?
            .postgres(node.database.server_options().clone())
            .passwords(owner.clone(), runtime.clone())
            .provision(false)
            .kafka(KafkaConfig::new(&brokers))
            .topic_prefix(&prefix)
            .shutdown_grace(Duration::from_secs(10));
        let mut service = Service::new(config);
        let router = match node.kind {
            Kind::Customer => example_customer_service::App::start(&mut service).await?.router(),
            Kind::Inventory => {
                let settings = example_inventory_service::Settings::new(redis.0)
                    .quote_service(quote)
                    .cache_prefix(redis.1);
                example_inventory_service::App::start(&mut service, settings)
                    .await?
                    .router()
            }
            Kind::PurchaseOrder => example_purchase_order_service::App::start(&mut service, Default::default())
                .await?
                .router(),
            Kind::Quote => {
                let mut settings = Settings::new(customer.1, inventory_url);
                settings.customer = customer.0;
                settings.inventory = inventory;
                settings.purchase_order = orders;
                settings.stock_timeout = timeouts.0;
                settings.order_step_timeout = timeouts.1;
                settings.compensation_backoff = Duration::from_millis(200);
                settings.compensation_attempts = 50;
                example_quote_service::App::start(&mut service, settings)
                    .await?
                    .router()
            }
        };
        let listener = tokio::net::TcpListener::bind(node.addr).await?;
        node.addr = listener.local_addr()?;
        let stop = service.shutdown_token();
        node.running = Some((stop, tokio::spawn(service.serve_on(listener, router))));
        Ok(())
    }

    /// Stops a service cleanly (as SIGTERM would); its database stays.
    async fn down(&mut self, kind: Kind) -> TestResult {
        if let Some((stop, task)) = self.node(kind).running.take() {
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(60), task).await???;
        }
        Ok(())
    }

    async fn stop(mut self) -> TestResult {
        for kind in [Kind::Quote, Kind::PurchaseOrder, Kind::Inventory, Kind::Customer] {
            self.down(kind).await?;
        }
        Ok(())
    }

    async fn post(&self, url: String, body: Value) -> Result<(StatusCode, Value), BoxError> {
        let response = self.http.post(url).json(&body).send().await?;
        let status = response.status();
        Ok((status, response.json().await?))
    }

    async fn get(&self, url: String) -> Result<(StatusCode, Value), BoxError> {
        let response = self.http.get(url).send().await?;
        let status = response.status();
        Ok((status, response.json().await?))
    }

    async fn customer(&self, name: &str) -> Result<Uuid, BoxError> {
        let (status, body) = self
            .post(
                self.customer.url("/customers"),
                json!({ "name": name, "tax_number": format!("TX-{name}"), "email": "buyer@example.com" }),
            )
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Ok(body["id"].as_str().ok_or("no id")?.parse()?)
    }

    async fn product(&self, sku: &str, on_hand: i64) -> Result<Uuid, BoxError> {
        let (status, body) = self
            .post(
                self.inventory.url("/products"),
                json!({ "sku": sku, "name": format!("Machine {sku}"), "unit_price_cents": 250_000, "on_hand": on_hand }),
            )
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Ok(body["id"].as_str().ok_or("no id")?.parse()?)
    }

    async fn stock(&self, product: Uuid) -> Result<(Value, String), BoxError> {
        let response = self
            .http
            .get(self.inventory.url(&format!("/products/{product}/stock")))
            .send()
            .await?;
        let cache = response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((response.json().await?, cache))
    }

    /// Creates a quote over HTTP; returns its id.
    async fn quote(&self, customer: Uuid, lines: &[(Uuid, i64)]) -> Result<Uuid, BoxError> {
        let lines: Vec<Value> = lines
            .iter()
            .map(|(product, quantity)| json!({ "product_id": product, "quantity": quantity }))
            .collect();
        let (status, body) = self
            .post(
                self.quote.url("/quotes"),
                json!({
                    "customer_id": customer,
                    "sales_rep": "rep@example.com",
                    "lines": lines,
                    "machine_configurations": [{ "machine": "CNC-5", "options": { "spindle": "12k" } }],
                }),
            )
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Ok(body["id"].as_str().ok_or("no id")?.parse()?)
    }

    /// Waits until the quote's status is `status`; returns the quote.
    async fn quote_reaches(&self, quote: Uuid, status: &str) -> Result<Value, BoxError> {
        let url = self.quote.url(&format!("/quotes/{quote}"));
        dbps_testkit::eventually(&format!("quote {quote} {status}"), || async {
            let (_, body) = self.get(url.clone()).await?;
            Ok::<_, BoxError>(body["status"] == status)
        })
        .await?;
        Ok(self.get(url).await?.1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quote_flows_of_the_adr_end_to_end() -> TestResult {
    let system = System::start(Duration::from_secs(20), Duration::from_secs(20)).await?;
    let ada = system.customer("Ada").await?;
    let grace = system.customer("Grace").await?;
    let lathe = system.product("LATHE-1", 10).await?;
    let mill = system.product("MILL-2", 1).await?;
    let events = system.kafka.naming().events(&system.quote.name(), AGGREGATE)?;
    let mut notifications = system.kafka.reader(&events)?;

    // Creation: reserved → "Stock Reserved"; acceptance → confirmed, PO created, "Ordered".
    let (before, _) = system.stock(lathe).await?;
    assert_eq!(before["available"], 10);
    let ordered = system.quote(ada, &[(lathe, 3)]).await?;
    let reserved = system.quote_reaches(ordered, "Stock Reserved").await?;
    assert_eq!(reserved["total_cents"], 750_000, "three at the list price");
    assert_eq!(reserved["machine_configurations"][0]["machine"], "CNC-5");
    // The stock check is fresh after the reservation (the event invalidated Redis).
    dbps_testkit::eventually("stock check fresh", || async {
        let (stock, _) = system.stock(lathe).await?;
        Ok::<_, BoxError>(stock["available"] == 7)
    })
    .await?;
    let (_, second) = system.stock(lathe).await?;
    assert_eq!(second, "hit", "the next check is served from Redis");
    let (status, accepted) = system
        .post(system.quote.url(&format!("/quotes/{ordered}/accept")), json!({}))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let done = system.quote_reaches(ordered, "Ordered").await?;
    let po = done["purchase_order_id"].as_str().ok_or("no purchase order")?;
    let (status, order) = system.get(system.orders.url(&format!("/purchase-orders/{po}"))).await?;
    assert_eq!(
        (status, order["quote_id"].as_str()),
        (StatusCode::OK, Some(ordered.to_string().as_str()))
    );
    let (lathe_stock, _) = system.stock(lathe).await?;
    assert_eq!(
        (lathe_stock["on_hand"].as_i64(), lathe_stock["reserved"].as_i64()),
        (Some(7), Some(0))
    );
    // A quote that is not "Stock Reserved" cannot be accepted.
    let (status, _) = system
        .post(system.quote.url(&format!("/quotes/{ordered}/accept")), json!({}))
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);

    // Out of stock: "Pending Stock", nothing reserved, the sales rep's notification requested.
    let short = system.quote(grace, &[(lathe, 2), (mill, 5)]).await?;
    let pending = system.quote_reaches(short, "Pending Stock").await?;
    assert!(
        pending["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains(&mill.to_string())),
        "{pending}"
    );
    let (lathe_stock, _) = system.stock(lathe).await?;
    assert_eq!(lathe_stock["reserved"], 0, "nothing of a short quote is reserved");
    let registry = Registry::new();
    let records = notifications.wait_for(3).await?;
    let requested: Vec<_> = records
        .iter()
        .map(dbps_core::kafka::decode_record)
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter_map(|e| match dbps_core::MessageSet::decode(&registry, e) {
            Ok(QuoteEvent::NotificationRequested(n)) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(requested.len(), 1);
    assert_eq!((requested[0].quote_id, requested[0].missing.len()), (short, 1));
    assert_eq!(requested[0].missing[0].product_id, mill);

    // A purchase order over the customer's limit: rejected, the reservation released,
    // stock back to its level, the quote says why.
    let (status, _) = system
        .http
        .put(system.orders.url(&format!("/credit-limits/{grace}")))
        .json(&json!({ "limit_cents": 100_000 }))
        .send()
        .await
        .map(|r| (r.status(), ()))?;
    assert_eq!(status, StatusCode::OK);
    let rejected = system.quote(grace, &[(lathe, 2)]).await?;
    system.quote_reaches(rejected, "Stock Reserved").await?;
    let (status, _) = system
        .post(system.quote.url(&format!("/quotes/{rejected}/accept")), json!({}))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let failed = system.quote_reaches(rejected, "Order Failed").await?;
    assert!(
        failed["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("PurchaseOrderRejected")),
        "{failed}"
    );
    dbps_testkit::eventually("stock back to its level", || async {
        let (stock, _) = system.stock(lathe).await?;
        Ok::<_, BoxError>(stock["on_hand"] == 7 && stock["reserved"] == 0)
    })
    .await?;

    // Replication: a renamed customer reaches the quote's replica.
    let (status, _) = system
        .http
        .put(system.customer.url(&format!("/customers/{ada}")))
        .json(&json!({ "name": "Ada Lovelace" }))
        .send()
        .await
        .map(|r| (r.status(), ()))?;
    assert_eq!(status, StatusCode::OK);
    dbps_testkit::eventually("rename replicated", || async {
        let (_, quote) = system.get(system.quote.url(&format!("/quotes/{ordered}"))).await?;
        Ok::<_, BoxError>(quote["customer"]["name"] == "Ada Lovelace")
    })
    .await?;

    // Bad input: a 4xx problem, nothing written.
    let (status, problem) = system
        .post(
            system.quote.url("/quotes"),
            json!({ "customer_id": ada, "sales_rep": "rep@example.com", "lines": [{ "product_id": lathe, "quantity": 0, "unit_price_cents": 1 }] }),
        )
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    let (status, _) = system
        .post(
            system.quote.url("/quotes"),
            json!({ "customer_id": Uuid::now_v7(), "sales_rep": "rep@example.com", "lines": [{ "product_id": lathe, "quantity": 1, "unit_price_cents": 1 }] }),
        )
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "an unknown customer");
    let (status, problem) = system
        .post(
            system.quote.url("/quotes"),
            json!({ "customer_id": ada, "sales_rep": "rep@example.com", "lines": [{ "product_id": Uuid::now_v7(), "quantity": 1 }] }),
        )
        .await?;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "an unknown product: {problem}"
    );
    let quotes: i64 = sqlx::query_scalar("select count(*) from quotes")
        .fetch_one(system.quote.database.pool())
        .await?;
    assert_eq!(quotes, 3);
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_order_service_that_does_not_answer_times_out_and_the_reservation_is_released() -> TestResult {
    let mut system = System::start(Duration::from_secs(20), Duration::from_secs(2)).await?;
    let ada = system.customer("Ada").await?;
    let lathe = system.product("LATHE-1", 5).await?;
    let quote = system.quote(ada, &[(lathe, 2)]).await?;
    system.quote_reaches(quote, "Stock Reserved").await?;
    system.down(Kind::PurchaseOrder).await?;
    let (status, accepted) = system
        .post(system.quote.url(&format!("/quotes/{quote}/accept")), json!({}))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let saga: Uuid = accepted["order_saga"].as_str().ok_or("no saga")?.parse()?;
    // The purchase order step times out; its own compensation (a cancel, in case the
    // order was made) waits for the service, which then comes back.
    let orchestrator_pool = system.quote.database.pool().clone();
    dbps_testkit::eventually("the order saga compensating", || async {
        let state: String = sqlx::query_scalar("select state from dbps_saga_instances where id = $1")
            .bind(saga)
            .fetch_one(&orchestrator_pool)
            .await?;
        Ok::<_, BoxError>(state == "compensating")
    })
    .await?;
    system.up(Kind::PurchaseOrder).await?;
    let failed = system.quote_reaches(quote, "Order Failed").await?;
    assert!(
        failed["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("timed out")),
        "{failed}"
    );
    dbps_testkit::eventually("the reservation released", || async {
        let (stock, _) = system.stock(lathe).await?;
        Ok::<_, BoxError>(stock["on_hand"] == 5 && stock["reserved"] == 0)
    })
    .await?;
    // The command waited in its topic: the service made the order when it came back,
    // then cancelled it (commands and compensations of a saga arrive in order).
    let (status, order) = system
        .get(system.orders.url(&format!("/purchase-orders?quote_id={quote}")))
        .await?;
    assert_eq!(
        (status, order["state"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{order}"
    );
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_while_the_customer_service_is_down_and_closes_when_it_is_back() -> TestResult {
    let mut system = System::start(Duration::from_secs(20), Duration::from_secs(20)).await?;
    let ada = system.customer("Ada").await?;
    let lathe = system.product("LATHE-1", 5).await?;
    let quote = system.quote(ada, &[(lathe, 1)]).await?;
    let fresh_url = system.quote.url(&format!("/quotes/{quote}/customer"));
    let (status, fresh) = system.get(fresh_url.clone()).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (fresh["source"].as_str(), fresh["may_be_stale"].as_bool()),
        (Some("customer-service"), Some(false))
    );
    // The replica has Ada before the customer service goes away.
    dbps_testkit::eventually("ada replicated", || async {
        let (_, quote) = system.get(system.quote.url(&format!("/quotes/{quote}"))).await?;
        Ok::<_, BoxError>(quote["customer"]["name"] == "Ada")
    })
    .await?;

    system.down(Kind::Customer).await?;
    // Each call fails, the quote service answers from its replica and says so; after
    // three failures the breaker is open and calls fail fast.
    for _ in 0..4 {
        let (status, stale) = system.get(fresh_url.clone()).await?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (stale["source"].as_str(), stale["may_be_stale"].as_bool()),
            (Some("replica"), Some(true))
        );
    }
    let metrics = system
        .http
        .get(system.quote.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dbps_http_client_breaker_open") && l.contains("customer") && l.ends_with(" 1")),
        "the breaker is open:\n{metrics}"
    );

    system.up(Kind::Customer).await?;
    // After the cool-down a trial call goes through and the breaker closes.
    dbps_testkit::eventually("fresh details again", || async {
        let (_, details) = system.get(fresh_url.clone()).await?;
        Ok::<_, BoxError>(details["source"] == "customer-service")
    })
    .await?;
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_without_a_stock_answer_is_pending_and_reported_and_bad_input_writes_nothing() -> TestResult {
    let mut system = System::start(Duration::from_secs(2), Duration::from_secs(20)).await?;
    let ada = system.customer("Ada").await?;
    let lathe = system.product("LATHE-1", 5).await?;
    let events = system.kafka.naming().events(&system.quote.name(), AGGREGATE)?;
    let mut notifications = system.kafka.reader(&events)?;
    // A first quote is answered (and the quote service learns the product).
    let answered = system.quote(ada, &[(lathe, 1)]).await?;
    system.quote_reaches(answered, "Stock Reserved").await?;
    // The inventory is down: the next quote's deadline passes without an answer.
    system.down(Kind::Inventory).await?;
    let quote = system.quote(ada, &[(lathe, 1)]).await?;
    let pending = system.quote_reaches(quote, "Pending Stock").await?;
    assert!(
        pending["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("did not answer")),
        "{pending}"
    );
    let records = notifications.wait_for(3).await?;
    // Across quotes (keys, partitions) the order is not defined: compare them sorted.
    let mut types: Vec<String> = records
        .iter()
        .map(dbps_core::kafka::decode_record)
        .map(|e| e.map(|e| e.message_type))
        .collect::<Result<_, _>>()?;
    types.sort();
    assert_eq!(
        types,
        [
            "quote.QuoteCreated",
            "quote.QuoteCreated",
            "quote.SalesRepNotificationRequested"
        ]
    );
    system.up(Kind::Inventory).await?;

    // A duplicate POST with the same Idempotency-Key gets the first answer.
    let body = json!({ "customer_id": ada, "sales_rep": "rep@example.com", "lines": [{ "product_id": lathe, "quantity": 1, "unit_price_cents": 10 }] });
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = system
            .http
            .post(system.quote.url("/quotes"))
            .header("idempotency-key", "quote-once-1")
            .json(&body)
            .send()
            .await?;
        answers.push((
            response.status(),
            response.headers().contains_key("idempotent-replayed"),
            response.text().await?,
        ));
    }
    assert_eq!(answers[0].0, StatusCode::CREATED);
    assert_eq!((answers[1].0, answers[1].1), (StatusCode::CREATED, true));
    assert_eq!(answers[0].2, answers[1].2, "the same answer, byte for byte");

    // Bad input: a 4xx problem each, nothing written.
    let quotes = system.quote.url("/quotes");
    let raw = |body: String| {
        system
            .http
            .post(quotes.clone())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases = [
        (raw(String::from("{not json")).await?, StatusCode::BAD_REQUEST, "malformed JSON"),
        (raw(json!({ "sales_rep": "rep@example.com", "lines": [] }).to_string()).await?, StatusCode::UNPROCESSABLE_ENTITY, "missing customer"),
        (
            raw(json!({ "customer_id": ada, "sales_rep": "rep@example.com", "lines": [{ "product_id": lathe, "quantity": -1, "unit_price_cents": 10 }] }).to_string()).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "a negative quantity",
        ),
        (
            raw(json!({ "customer_id": ada, "sales_rep": "not an address", "lines": [{ "product_id": lathe, "quantity": 1, "unit_price_cents": 10 }] }).to_string()).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "a bad sales rep",
        ),
        (raw(format!("{{\"pad\": \"{}\"}}", "x".repeat(80 * 1024))).await?, StatusCode::PAYLOAD_TOO_LARGE, "an oversized body"),
        (system.http.get(system.quote.url(&format!("/quotes/{}", Uuid::now_v7()))).send().await?, StatusCode::NOT_FOUND, "an unknown quote"),
        (system.http.post(system.quote.url(&format!("/quotes/{}/accept", Uuid::now_v7()))).send().await?, StatusCode::NOT_FOUND, "accepting an unknown quote"),
    ];
    for (response, status, case) in cases {
        assert_eq!(response.status(), status, "{case}");
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{case}"
        );
    }
    let count: i64 = sqlx::query_scalar("select count(*) from quotes")
        .fetch_one(system.quote.database.pool())
        .await?;
    assert_eq!(
        count, 3,
        "the answered and the pending quotes, and the one created once"
    );
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quote_service_cannot_read_another_services_tables() -> TestResult {
    let quote = dbps_testkit::service("quote")
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .start()
        .await?;
    let inventory = dbps_testkit::service("inventory")
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .start()
        .await?;
    let sqlstate = |error: &sqlx::Error| error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
    // The quote service's runtime role cannot connect to the inventory's database, nor the
    // inventory's to the quote service's.
    let quote_on_inventory = quote
        .runtime_options()
        .database(inventory.service().database_name().as_str());
    let inventory_on_quote = inventory
        .runtime_options()
        .database(quote.service().database_name().as_str());
    for options in [quote_on_inventory, inventory_on_quote] {
        let denied = sqlx::PgConnection::connect_with(&options).await.unwrap_err();
        assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{denied}");
    }
    // Each reads its own tables.
    let (own,): (i64,) = sqlx::query_as("select count(*) from dbps_outbox")
        .fetch_one(quote.pool())
        .await?;
    assert_eq!(own, 0);
    Ok(())
}
