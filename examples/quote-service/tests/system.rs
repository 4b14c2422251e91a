//! The example system end to end: the customer, inventory, purchase-order and quote
//! services, each on its own provisioned database, and, where a test needs it, the email
//! service on its own MongoDB database sending to Mailpit — served over HTTP and talking
//! over Kafka: the ADR's flows as a client sees them.

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
    Email,
}

/// Whether a system runs the email service too (on MongoDB, sending to Mailpit); the
/// tests that do not look at email leave it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Email {
    Without,
    With,
}

/// A service's database.
enum Store {
    /// Provisioned, with its own roles.
    Postgres(Box<dbps_testkit::TestService>),
    /// A fresh MongoDB database, named like the service (so its consumer groups are the
    /// test's own).
    Mongo(dbps_testkit::TestMongo),
}

/// One service: its database (kept across restarts), its address and, while it runs,
/// its task.
struct Node {
    kind: Kind,
    store: Store,
    addr: SocketAddr,
    running: Option<(CancellationToken, tokio::task::JoinHandle<dbps_service::Result<()>>)>,
}

impl Node {
    /// The service's name: its database's.
    fn name(&self) -> String {
        match &self.store {
            Store::Postgres(database) => database.name().to_string(),
            Store::Mongo(mongo) => mongo.database().name().to_owned(),
        }
    }

    /// The PostgreSQL database of a service that has one.
    fn pg(&self) -> &dbps_testkit::TestService {
        match &self.store {
            Store::Postgres(database) => database,
            Store::Mongo(_) => panic!("the {:?} service has no PostgreSQL database", self.kind),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// The four services, and the email service where asked, on one Kafka namespace.
struct System {
    kafka: dbps_testkit::TestKafka,
    redis: dbps_testkit::TestRedis,
    customer: Node,
    inventory: Node,
    orders: Node,
    quote: Node,
    email: Option<Node>,
    /// Where the email service sends (with [`Email::With`]).
    mail: Option<dbps_testkit::TestMailpit>,
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
    async fn start(stock_timeout: Duration, order_step_timeout: Duration, email: Email) -> Result<Self, BoxError> {
        init_logs();
        let kafka = dbps_testkit::kafka().await?;
        let redis = dbps_testkit::redis().await?;
        let node = |kind, store| Node {
            kind,
            store,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            running: None,
        };
        let pg = |name: &'static str| async move {
            Ok::<_, BoxError>(Store::Postgres(Box::new(dbps_testkit::service(name).start().await?)))
        };
        let (email, mail) = match email {
            Email::With => (
                Some(node(Kind::Email, Store::Mongo(dbps_testkit::mongo().await?))),
                Some(dbps_testkit::mailpit().await?),
            ),
            Email::Without => (None, None),
        };
        let mut system = Self {
            customer: node(Kind::Customer, pg("customer").await?),
            inventory: node(Kind::Inventory, pg("inventory").await?),
            orders: node(Kind::PurchaseOrder, pg("purchase_order").await?),
            quote: node(Kind::Quote, pg("quote").await?),
            email,
            mail,
            kafka,
            redis,
            timeouts: (stock_timeout, order_step_timeout),
            http: reqwest::Client::new(),
        };
        for kind in [Kind::Customer, Kind::Inventory, Kind::PurchaseOrder, Kind::Quote] {
            system.up(kind).await?;
        }
        if system.email.is_some() {
            system.up(Kind::Email).await?;
        }
        Ok(system)
    }

    fn node(&mut self, kind: Kind) -> &mut Node {
        match kind {
            Kind::Customer => &mut self.customer,
            Kind::Inventory => &mut self.inventory,
            Kind::PurchaseOrder => &mut self.orders,
            Kind::Quote => &mut self.quote,
            Kind::Email => self
                .email
                .as_mut()
                .expect("the system was started with the email service"),
        }
    }

    /// The email service (started with [`Email::With`]).
    fn email(&self) -> &Node {
        self.email
            .as_ref()
            .expect("the system was started with the email service")
    }

    /// Where the email service sends (started with [`Email::With`]).
    fn mail(&self) -> &dbps_testkit::TestMailpit {
        self.mail
            .as_ref()
            .expect("the system was started with the email service")
    }

    /// Starts a service (again, on the address it had).
    async fn up(&mut self, kind: Kind) -> TestResult {
        let customer = (self.customer.name(), self.customer.url(""));
        let inventory_url = self.inventory.url("");
        let (inventory, orders) = (self.inventory.name(), self.orders.name());
        let (brokers, prefix) = (self.kafka.brokers().to_owned(), self.kafka.prefix().to_owned());
        let redis = (self.redis.connection(), self.redis.prefix().to_owned());
        let quote = self.quote.name();
        let smtp = self.mail.as_ref().map(|mail| mail.smtp_url().to_owned());
        let timeouts = self.timeouts;
        let node = self.node(kind);
        let mut config = ServiceConfig::new(node.name().as_str())?
            .kafka(KafkaConfig::new(&brokers))
            .topic_prefix(&prefix)
            .shutdown_grace(Duration::from_secs(10));
        if let Store::Postgres(database) = &node.store {
            let (owner, runtime) = database.passwords();
            config = config
                .postgres(database.server_options().clone())
                .passwords(owner.clone(), runtime.clone())
                .provision(false);
        }
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
            Kind::Email => {
                let Store::Mongo(mongo) = &node.store else {
                    return Err("the email service runs on MongoDB".into());
                };
                let mut settings =
                    example_email_service::Settings::new(customer.1, smtp.ok_or("the email service needs Mailpit")?);
                settings.customer = customer.0;
                settings.quote = quote;
                example_email_service::App::start(&mut service, mongo.database().clone(), settings)
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
        if self.email.is_some() {
            self.down(Kind::Email).await?;
        }
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

    /// Creates a customer with the address `<name in lower case>@example.com`; returns its id.
    async fn customer(&self, name: &str) -> Result<Uuid, BoxError> {
        let email = format!("{}@example.com", name.to_lowercase());
        let (status, body) = self
            .post(
                self.customer.url("/customers"),
                json!({ "name": name, "tax_number": format!("TX-{name}"), "email": email }),
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
        self.quote_by("rep@example.com", customer, lines).await
    }

    /// Creates a quote over HTTP with `sales_rep` as its sales rep; returns its id.
    async fn quote_by(&self, sales_rep: &str, customer: Uuid, lines: &[(Uuid, i64)]) -> Result<Uuid, BoxError> {
        let lines: Vec<Value> = lines
            .iter()
            .map(|(product, quantity)| json!({ "product_id": product, "quantity": quantity }))
            .collect();
        let (status, body) = self
            .post(
                self.quote.url("/quotes"),
                json!({
                    "customer_id": customer,
                    "sales_rep": sales_rep,
                    "lines": lines,
                    "machine_configurations": [{ "machine": "CNC-5", "options": { "spindle": "12k" } }],
                }),
            )
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Ok(body["id"].as_str().ok_or("no id")?.parse()?)
    }

    /// Posts a raw message to the email service; the status and the email's view.
    async fn receive_email(&self, raw: String) -> Result<(StatusCode, Value), BoxError> {
        let response = self
            .http
            .post(self.email().url("/emails"))
            .header("content-type", "message/rfc822")
            .body(raw)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await?))
    }

    /// The ids of the emails assigned to `customer`, oldest first.
    async fn customer_emails(&self, customer: Uuid) -> Result<Vec<String>, BoxError> {
        let (status, page) = self
            .get(self.email().url(&format!("/customers/{customer}/emails")))
            .await?;
        assert_eq!(status, StatusCode::OK, "{page}");
        Ok(page["emails"]
            .as_array()
            .ok_or("no emails")?
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until the email service's consumer `consumer` has applied everything on
    /// `topic` so far.
    async fn email_caught_up(&self, consumer: &str, topic: &str) -> TestResult {
        let group = format!("{}.{consumer}", self.email().name());
        Ok(self.kafka.caught_up(&group, topic).await?)
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
    let system = System::start(Duration::from_secs(20), Duration::from_secs(20), Email::Without).await?;
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
    // The ordered quote: created and four statuses; the short one: created, two statuses
    // and the notification request.
    let records = notifications.wait_for(9).await?;
    let events: Vec<_> = records
        .iter()
        .map(dbps_core::kafka::decode_record)
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .map(|e| dbps_core::MessageSet::decode(&registry, e).map(|event| (e.sequence, event)))
        .collect::<Result<Vec<(Option<i64>, QuoteEvent)>, _>>()?;
    let requested: Vec<_> = events
        .iter()
        .filter_map(|(_, e)| match e {
            QuoteEvent::NotificationRequested(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(requested.len(), 1);
    assert_eq!((requested[0].quote_id, requested[0].missing.len()), (short, 1));
    assert_eq!(requested[0].missing[0].product_id, mill);
    // Every status change was published, in order, in the quote's sequence after its
    // `QuoteCreated`, with the quote's value and version.
    let statuses = |quote: Uuid| -> Vec<(i64, example_contracts::quote::QuoteStatusChanged)> {
        events
            .iter()
            .filter_map(|(sequence, e)| match e {
                QuoteEvent::StatusChanged(s) if s.quote_id == quote => Some((sequence.unwrap_or_default(), s.clone())),
                _ => None,
            })
            .collect()
    };
    let of_ordered = statuses(ordered);
    assert_eq!(
        of_ordered.iter().map(|(_, s)| s.status.as_str()).collect::<Vec<_>>(),
        ["Awaiting Stock", "Stock Reserved", "Ordering", "Ordered"]
    );
    assert_eq!(
        of_ordered.iter().map(|(sequence, _)| *sequence).collect::<Vec<_>>(),
        [2, 3, 4, 5],
        "after QuoteCreated (1)"
    );
    assert!(of_ordered.windows(2).all(|w| w[0].1.version < w[1].1.version));
    let (_, last) = of_ordered.last().ok_or("no status")?;
    assert_eq!((last.customer_id, last.total_cents), (ada, 750_000));
    assert_eq!(last.purchase_order_id.map(|p| p.to_string()).as_deref(), Some(po));
    assert_eq!(last.version, done["version"].as_i64().ok_or("no version")?);
    let of_short = statuses(short);
    assert_eq!(
        of_short.iter().map(|(_, s)| s.status.as_str()).collect::<Vec<_>>(),
        ["Awaiting Stock", "Pending Stock"]
    );
    assert!(
        of_short[1]
            .1
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&mill.to_string())),
        "{of_short:?}"
    );
    assert_eq!(
        (of_short[1].1.customer_id, of_short[1].1.purchase_order_id),
        (grace, None)
    );

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
        .fetch_one(system.quote.pg().pool())
        .await?;
    assert_eq!(quotes, 3);
    system.stop().await
}

/// A small raw message (RFC 5322) from `from` to sales: a text part and one attachment.
fn raw_email(from: &str, message_id: &str, subject: &str) -> String {
    format!(
        "From: {from}\r\n\
         To: sales@example.com\r\n\
         Subject: {subject}\r\n\
         Date: Tue, 3 Mar 2026 10:00:00 +0000\r\n\
         Message-ID: <{message_id}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
         \r\n\
         --b1\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Please quote the machines in the attached list.\r\n\
         --b1\r\n\
         Content-Type: text/csv; name=\"rfq.csv\"\r\n\
         Content-Disposition: attachment; filename=\"rfq.csv\"\r\n\
         \r\n\
         machine,quantity\r\nCNC-5,3\r\n\
         --b1--\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_stock_quote_emails_its_sales_rep_once_and_emails_are_assigned_to_their_customers() -> TestResult {
    let system = System::start(Duration::from_secs(20), Duration::from_secs(20), Email::With).await?;
    let (email, mail) = (system.email(), system.mail());
    let rep = mail.recipient("rep");
    let ada = system.customer("Ada").await?;
    let grace = system.customer("Grace").await?;
    let lathe = system.product("LATHE-1", 10).await?;
    let mill = system.product("MILL-2", 1).await?;
    let quote_events = system.kafka.naming().events(&system.quote.name(), AGGREGATE)?;
    let mut requests = system.kafka.reader(&quote_events)?;

    // An email from a customer's address (in other letters' case) is assigned to the
    // customer on arrival, once the email service's index has the customer.
    let customer_events = system
        .kafka
        .naming()
        .events(&system.customer.name(), example_customer_service::AGGREGATE)?;
    system
        .email_caught_up(example_email_service::INDEX_CONSUMER, &customer_events)
        .await?;
    let (status, from_ada) = system
        .receive_email(raw_email("Ada <ADA@example.com>", "rfq-1@example.com", "RFQ"))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{from_ada}");
    assert_eq!(from_ada["customer_id"].as_str(), Some(ada.to_string().as_str()));
    assert_eq!(from_ada["attachments"][0]["filename"], "rfq.csv");
    let from_ada = from_ada["id"].as_str().ok_or("no id")?.to_owned();
    assert_eq!(system.customer_emails(ada).await?, [from_ada]);
    // One from an address nobody has yet is assigned when its customer is created.
    let (status, early) = system
        .receive_email(raw_email("hedy@example.com", "rfq-2@example.com", "Early"))
        .await?;
    assert_eq!((status, &early["customer_id"]), (StatusCode::CREATED, &Value::Null));
    let early = early["id"].as_str().ok_or("no id")?.to_owned();
    let hedy = system.customer("Hedy").await?;
    dbps_testkit::eventually("the early email assigned to hedy", || async {
        let (_, view) = system.get(email.url(&format!("/emails/{early}"))).await?;
        Ok::<_, BoxError>(view["customer_id"] == hedy.to_string().as_str())
    })
    .await?;
    assert_eq!(system.customer_emails(hedy).await?, [early]);
    assert!(system.customer_emails(grace).await?.is_empty());

    // Out of stock: "Pending Stock", the notification requested, and the email to the
    // quote's sales rep.
    let short = system.quote_by(&rep, grace, &[(lathe, 2), (mill, 5)]).await?;
    system.quote_reaches(short, "Pending Stock").await?;
    // Created, "Awaiting Stock", "Pending Stock" and the notification request.
    let records = requests.wait_for(4).await?;
    let request = records
        .iter()
        .map(dbps_core::kafka::decode_record)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|e| e.message_type == "quote.SalesRepNotificationRequested")
        .ok_or("no notification requested")?;
    dbps_testkit::eventually("the notification sent", || async {
        let (_, view) = system.get(email.url(&format!("/emails/{}", request.id))).await?;
        Ok::<_, BoxError>(view["delivery"]["status"] == "sent")
    })
    .await?;
    mail.wait_for(&rep, 1).await?;
    // Every quote event is handled: whatever was to arrive has arrived, and it is one email.
    system
        .email_caught_up(example_email_service::NOTIFICATIONS_CONSUMER, &quote_events)
        .await?;
    let arrived = mail.messages_to(&rep).await?;
    assert_eq!(arrived.len(), 1, "exactly one email: {arrived:?}");
    assert_eq!(
        arrived[0].message_id,
        example_email_service::notification_message_id(&request.id)
    );
    let message = mail.message(&arrived[0].id).await?;
    assert_eq!(message.subject, format!("Quote {short} is pending stock"));
    let text = message.text().unwrap_or_default();
    for expected in [short.to_string(), grace.to_string(), mill.to_string()] {
        assert!(text.contains(&expected), "the email lacks {expected}:\n{text}");
    }
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_order_service_that_does_not_answer_times_out_and_the_reservation_is_released() -> TestResult {
    let mut system = System::start(Duration::from_secs(20), Duration::from_secs(2), Email::Without).await?;
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
    let orchestrator_pool = system.quote.pg().pool().clone();
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
    let mut system = System::start(Duration::from_secs(20), Duration::from_secs(20), Email::Without).await?;
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
    let mut system = System::start(Duration::from_secs(2), Duration::from_secs(20), Email::Without).await?;
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
    // Each quote's creation and statuses ("Awaiting Stock", then "Stock Reserved" or
    // "Pending Stock"), and one notification request.
    let records = notifications.wait_for(7).await?;
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
            "quote.QuoteStatusChanged",
            "quote.QuoteStatusChanged",
            "quote.QuoteStatusChanged",
            "quote.QuoteStatusChanged",
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
        .fetch_one(system.quote.pg().pool())
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
