//! The inventory service as its process runs it — its own provisioned database, the relay,
//! the consumers and the participant started by `App::start`, served by `dbps-service` —
//! on a test's own database, topic namespace and Redis key prefix.

// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, KafkaPublisher, TopicNaming, TopicSpec};
use dbps_core::{CancellationToken, Envelope, Message, MessageSet, Registry};
use dbps_service::{Service, ServiceConfig};
use example_contracts::inventory::{PRODUCT_AGGREGATE, RESERVATION_AGGREGATE};
use example_contracts::quote::{QuoteCreated, QuoteLine};
use example_inventory_service::{
    App, CACHE_HEADER, COMMANDS_CONSUMER, CreateProduct, Product, QUOTE_EVENTS_CONSUMER, SERVICE, STOCK_CACHE_CONSUMER,
    Settings, Stock,
};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type TestResult = Result<(), BoxError>;

/// The service running on a test's own database, topic namespace and Redis keys.
pub(crate) struct Running {
    /// The service's name: its unique test name, and the root of its topics.
    pub(crate) name: String,
    /// The unique name of the quote service whose events it follows.
    pub(crate) quote: String,
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) stop: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<dbps_service::Result<()>>,
    pub(crate) naming: TopicNaming,
    /// Connected as the service's runtime role.
    pub(crate) pool: sqlx::PgPool,
    pub(crate) publisher: KafkaPublisher,
    pub(crate) kafka: dbps_testkit::TestKafka,
    _redis: dbps_testkit::TestRedis,
    // Dropped last: removes the service's database and roles.
    pub(crate) database: dbps_testkit::TestService,
}

pub(crate) fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn,rdkafka=warn")
        .with_test_writer()
        .try_init();
}

/// The last twelve characters of a fresh UUIDv7 (its random part).
fn suffix() -> String {
    let id = Uuid::now_v7().simple().to_string();
    id[id.len() - 12..].to_owned()
}

/// The service on its own provisioned test database, topic namespace and Redis keys,
/// following the events of a quote service with a unique name, serving.
pub(crate) async fn start() -> Result<Running, BoxError> {
    init_logs();
    let test = dbps_testkit::service(SERVICE).start().await?;
    let kafka = dbps_testkit::kafka().await?;
    let redis = dbps_testkit::redis().await?;
    let quote = format!("quote_{}", suffix());
    let (owner, runtime) = test.passwords();
    let config = ServiceConfig::new(test.name().as_str())?
        .postgres(test.server_options().clone())
        .passwords(owner.clone(), runtime.clone())
        .provision(false)
        .kafka(KafkaConfig::new(kafka.brokers()))
        .topic_prefix(kafka.prefix());
    let mut service = Service::new(config);
    let name = service.name().to_string();
    let naming = service.naming();
    // The topics this test writes to exist before anything is published to them, as the
    // quote service's would.
    dbps_core::kafka::ensure_topics(
        &KafkaConfig::new(kafka.brokers()),
        &[
            TopicSpec::new(naming.events(&quote, example_contracts::quote::AGGREGATE)?, 3),
            TopicSpec::new(naming.commands(&name)?, 3),
            TopicSpec::new(naming.replies(&quote)?, 1),
        ],
    )
    .await?;
    let settings = Settings::new(redis.connection())
        .quote_service(&quote)
        .cache_prefix(redis.prefix());
    let app = App::start(&mut service, settings).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
    Ok(Running {
        name,
        quote,
        base,
        http: reqwest::Client::new(),
        stop: service.shutdown_token(),
        naming: service.naming(),
        pool: test.pool().clone(),
        task: tokio::spawn(service.serve_on(listener, app.router())),
        publisher,
        kafka,
        _redis: redis,
        database: test,
    })
}

impl Running {
    /// `POST /products` of `sku` with `on_hand` in stock, answered.
    pub(crate) async fn create_product(&self, sku: &str, on_hand: i64) -> Result<Product, BoxError> {
        let response = self
            .http
            .post(format!("{}/products", self.base))
            .json(&CreateProduct {
                sku: sku.to_owned(),
                name: format!("Product {sku}"),
                unit_price_cents: 1250,
                on_hand,
            })
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::CREATED, "creating {sku}");
        Ok(response.json().await?)
    }

    /// `GET /products/{id}/stock`, and whether Redis served it (`hit` or `miss`).
    pub(crate) async fn stock(&self, product: Uuid) -> Result<(Stock, String), BoxError> {
        let response = self
            .http
            .get(format!("{}/products/{product}/stock", self.base))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        let served = response
            .headers()
            .get(CACHE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((response.json().await?, served))
    }

    /// The stock as the database holds it (not through the cache).
    pub(crate) async fn stored_stock(&self, product: Uuid) -> Result<(i64, i64, i64), BoxError> {
        Ok(
            sqlx::query_as("select on_hand, reserved, version from inventory where product_id = $1")
                .bind(product)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The topic of the quote service's events.
    pub(crate) fn quote_topic(&self) -> Result<String, BoxError> {
        Ok(self.naming.events(&self.quote, example_contracts::quote::AGGREGATE)?)
    }

    /// The topic of the inventory's reservation events.
    pub(crate) fn reservation_topic(&self) -> Result<String, BoxError> {
        Ok(self.naming.events(&self.name, RESERVATION_AGGREGATE)?)
    }

    /// The topic of the inventory's product events.
    pub(crate) fn product_topic(&self) -> Result<String, BoxError> {
        Ok(self.naming.events(&self.name, PRODUCT_AGGREGATE)?)
    }

    /// The group that reserves stock for the quote service's events.
    pub(crate) fn quote_group(&self) -> String {
        format!("{}.{QUOTE_EVENTS_CONSUMER}", self.name)
    }

    /// Waits until the stock cache's invalidation has handled every product event
    /// published so far: the outbox is drained, and the group has caught up.
    pub(crate) async fn stock_cache_caught_up(&self) -> TestResult {
        self.database.outbox_drained().await?;
        let group = format!("{}.{STOCK_CACHE_CONSUMER}", self.name);
        self.kafka.caught_up(&group, &self.product_topic()?).await?;
        Ok(())
    }

    /// The group of the saga participant.
    pub(crate) fn commands_group(&self) -> String {
        format!("{}.{COMMANDS_CONSUMER}", self.name)
    }

    /// The `QuoteCreated` event of `quote_id` as the quote service publishes it: from the
    /// quote service, keyed by the quote id.
    pub(crate) fn quote_created(&self, quote_id: Uuid, lines: &[(Uuid, i64)]) -> Result<Envelope, BoxError> {
        let created = QuoteCreated {
            quote_id,
            customer_id: Uuid::now_v7(),
            sales_rep: String::from("rep@example.com"),
            lines: lines
                .iter()
                .map(|&(product_id, quantity)| QuoteLine {
                    product_id,
                    quantity,
                    unit_price_cents: 1250,
                })
                .collect(),
        };
        Ok(Envelope::event(
            &self.quote,
            example_contracts::quote::AGGREGATE,
            quote_id.to_string(),
            &created,
        )?)
    }

    /// Publishes `envelope` to the quote service's events topic.
    pub(crate) async fn publish_quote_event(&self, envelope: &Envelope) -> TestResult {
        self.publisher.publish(&self.quote_topic()?, envelope).await?;
        Ok(())
    }

    /// Stops the service and waits until it has.
    pub(crate) async fn shutdown(self) -> TestResult {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task).await???;
        Ok(())
    }
}

/// The records of a topic as envelopes.
pub(crate) fn envelopes(records: &[rdkafka::message::OwnedMessage]) -> Result<Vec<Envelope>, BoxError> {
    Ok(records
        .iter()
        .map(dbps_core::kafka::decode_record)
        .collect::<Result<_, _>>()?)
}

/// An envelope decoded into the message set `S`.
pub(crate) fn decode<S: MessageSet>(envelope: &Envelope) -> Result<S, BoxError> {
    Ok(S::decode(&Registry::new(), envelope)?)
}

/// An envelope's payload as message `M`, checking its type.
pub(crate) fn payload<M: Message>(envelope: &Envelope) -> Result<M, BoxError> {
    assert_eq!(envelope.message_type, M::TYPE);
    Ok(Registry::new().decode::<M>(envelope)?)
}

/// Asserts a problem answer with `status` and returns its body.
pub(crate) async fn problem(response: reqwest::Response, status: StatusCode) -> Result<Value, BoxError> {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{status}"
    );
    Ok(response.json().await?)
}
