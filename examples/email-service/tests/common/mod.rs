//! What the email service's tests share: the services they run on the real stack, raw
//! messages, and requests published to the quote service's topic.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_core::{CancellationToken, Envelope};
use dbps_service::{Service, ServiceConfig};
use example_contracts::inventory::MissingStock;
use example_contracts::quote::{AGGREGATE, SalesRepNotificationRequested};
use example_email_service::{App, Settings};
use lettre::message::header::ContentType;
use lettre::message::{Attachment, MultiPart};
use serde_json::Value;
use uuid::Uuid;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestResult = Result<(), BoxError>;

/// The quote service's name in these tests (its topic carries the test's prefix).
pub const QUOTE: &str = "quote";

/// An address nobody listens on: a customer service that is not there (the email
/// service's backfill keeps trying, harmlessly).
pub const NO_CUSTOMER_SERVICE: &str = "http://127.0.0.1:9";

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,rdkafka=warn,librdkafka=warn,sqlx=warn")
        .with_test_writer()
        .try_init();
}

/// A service running in this process, stopped (as SIGTERM would) by [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<dbps_service::Result<()>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) -> TestResult {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task).await???;
        Ok(())
    }
}

async fn serve(service: Service, router: axum::Router) -> Result<Running, BoxError> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let stop = service.shutdown_token();
    let task = tokio::spawn(service.serve_on(listener, router));
    Ok(Running { addr, stop, task })
}

/// The email service on its own fresh database (the database's name is the service's
/// name too, so its consumer groups are the test's own).
pub struct EmailNode {
    pub mongo: dbps_testkit::TestMongo,
    pub app: App,
    pub running: Running,
}

impl EmailNode {
    pub async fn start(kafka: &dbps_testkit::TestKafka, settings: Settings) -> Result<Self, BoxError> {
        init_logs();
        let mongo = dbps_testkit::mongo().await?;
        let name = mongo.database().name().to_owned();
        let config = ServiceConfig::new(&name)?
            .kafka(KafkaConfig::new(kafka.brokers()))
            .topic_prefix(kafka.prefix())
            .shutdown_grace(Duration::from_secs(10));
        let mut service = Service::new(config);
        let app = App::start(&mut service, mongo.database().clone(), settings).await?;
        let running = serve(service, app.router()).await?;
        Ok(Self { mongo, app, running })
    }

    pub fn name(&self) -> &str {
        self.mongo.database().name()
    }

    pub fn url(&self, path: &str) -> String {
        self.running.url(path)
    }

    pub async fn stop(self) -> TestResult {
        self.running.stop().await
    }
}

/// The real customer service on its own provisioned PostgreSQL database.
pub struct CustomerNode {
    pub database: dbps_testkit::TestService,
    pub running: Running,
}

impl CustomerNode {
    pub async fn start(kafka: &dbps_testkit::TestKafka) -> Result<Self, BoxError> {
        init_logs();
        let database = dbps_testkit::service("customer").start().await?;
        let (owner, runtime) = database.passwords();
        let config = ServiceConfig::new(database.name().as_str())?
            .postgres(database.server_options().clone())
            .passwords(owner.clone(), runtime.clone())
            .provision(false)
            .kafka(KafkaConfig::new(kafka.brokers()))
            .topic_prefix(kafka.prefix())
            .shutdown_grace(Duration::from_secs(10));
        let mut service = Service::new(config);
        let router = example_customer_service::App::start(&mut service).await?.router();
        let running = serve(service, router).await?;
        Ok(Self { database, running })
    }

    pub fn name(&self) -> String {
        self.database.name().to_string()
    }

    pub fn url(&self, path: &str) -> String {
        self.running.url(path)
    }

    /// Creates a customer; returns its id.
    pub async fn create(&self, http: &reqwest::Client, name: &str, email: &str) -> Result<Uuid, BoxError> {
        let response = http
            .post(self.url("/customers"))
            .json(&serde_json::json!({ "name": name, "tax_number": format!("TX-{name}"), "email": email }))
            .send()
            .await?;
        assert_eq!(response.status(), reqwest::StatusCode::CREATED);
        let body: Value = response.json().await?;
        Ok(body["id"].as_str().ok_or("no id")?.parse()?)
    }

    /// Changes a customer's email address.
    pub async fn change_email(&self, http: &reqwest::Client, id: Uuid, email: &str) -> TestResult {
        let response = http
            .put(self.url(&format!("/customers/{id}")))
            .json(&serde_json::json!({ "email": email }))
            .send()
            .await?;
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        Ok(())
    }

    pub async fn stop(self) -> TestResult {
        self.running.stop().await
    }
}

/// A raw message from `from` with Message-ID `<message_id>`, a text and an HTML body, and
/// `attachments` (file name, bytes).
pub fn message(
    from: &str,
    message_id: &str,
    subject: &str,
    attachments: &[(&str, &[u8])],
) -> Result<Vec<u8>, BoxError> {
    let mut body = MultiPart::mixed().multipart(MultiPart::alternative_plain_html(
        format!("{subject}\n\nPlease quote."),
        format!("<p>{subject}</p><p>Please quote.</p>"),
    ));
    for (name, bytes) in attachments {
        body = body.singlepart(
            Attachment::new((*name).to_owned()).body(bytes.to_vec(), ContentType::parse("application/octet-stream")?),
        );
    }
    let message = lettre::Message::builder()
        .message_id(Some(format!("<{message_id}>")))
        .from(from.parse()?)
        .to("sales@example.com".parse()?)
        .subject(subject)
        .multipart(body)?;
    Ok(message.formatted())
}

/// `len` bytes that are not a pattern a chunking bug could hide in.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Posts a raw message; the status and the JSON answer.
pub async fn post_email(
    http: &reqwest::Client,
    url: String,
    raw: Vec<u8>,
) -> Result<(reqwest::StatusCode, Value), BoxError> {
    let response = http
        .post(url)
        .header("content-type", "message/rfc822")
        .body(raw)
        .send()
        .await?;
    let status = response.status();
    Ok((status, response.json().await?))
}

/// A notification request for `sales_rep` about a new quote, short of one product.
pub fn notification_request(sales_rep: &str) -> SalesRepNotificationRequested {
    SalesRepNotificationRequested {
        quote_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        sales_rep: sales_rep.to_owned(),
        reason: String::from("the inventory is short of 1 product(s)"),
        missing: vec![MissingStock {
            product_id: Uuid::now_v7(),
            requested: 5,
            available: 1,
        }],
    }
}

/// The quote service's events topic in this test, created if missing.
pub async fn quote_topic(kafka: &dbps_testkit::TestKafka) -> Result<String, BoxError> {
    let topic = kafka.naming().events(QUOTE, AGGREGATE)?;
    if let Err(error) = kafka.create_topics(&[(&topic, 3)]).await {
        // A service that started first created it.
        tracing::info!(%error, "quote topic not created here");
    }
    Ok(topic)
}

/// The request as the quote service's outbox would publish it.
pub fn request_envelope(request: &SalesRepNotificationRequested) -> Result<Envelope, BoxError> {
    Ok(Envelope::event(
        QUOTE,
        AGGREGATE,
        request.quote_id.to_string(),
        request,
    )?)
}

/// Publishes `envelope` to the quote service's topic.
pub async fn publish(kafka: &dbps_testkit::TestKafka, envelope: &Envelope) -> TestResult {
    let topic = quote_topic(kafka).await?;
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
    publisher.publish(&topic, envelope).await?;
    Ok(())
}
