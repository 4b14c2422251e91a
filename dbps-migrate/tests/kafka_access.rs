//! A service's principal on the stack's secured Kafka listener (SASL_SSL, SCRAM-SHA-512,
//! the StandardAuthorizer with `allow.everyone.if.no.acl.found=false`): provisioning,
//! and what the service can and cannot do with the ACLs it gets. Each refusal is checked
//! as the error a user sees.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dbps_core::kafka::{ConsumerRunner, Handler, HandlerError, KafkaConfig, KafkaPublisher, TopicSpec, ensure_topics};
use dbps_core::{Envelope, MessageKind};
use dbps_migrate::kafka::KafkaAccess;
use dbps_migrate::{MigrateError, Password, ServiceName};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Two services with fresh names, each with its own topic, created by the admin; both
/// principals and topics are removed when dropped.
struct Pair {
    admin: KafkaConfig,
    quote: KafkaAccess,
    customer: KafkaAccess,
    quote_password: Password,
    customer_password: Password,
    quote_topic: String,
    customer_topic: String,
    private_topic: String,
}

impl Pair {
    async fn new() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let stack = dbps_testkit::secure()?;
        let admin = stack.kafka_admin();
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let suffix = &suffix[suffix.len() - 10..];
        let quote = ServiceName::new(format!("quote_{suffix}"))?;
        let customer = ServiceName::new(format!("customer_{suffix}"))?;
        let quote_topic = format!("{quote}.quote.events");
        let customer_topic = format!("{customer}.customer.events");
        let private_topic = format!("{customer}.private");
        ensure_topics(
            &admin,
            &[
                TopicSpec::new(&quote_topic, 1),
                TopicSpec::new(&customer_topic, 1),
                TopicSpec::new(&private_topic, 1),
            ],
        )
        .await?;
        let quote = KafkaAccess::new(quote).consumes(&customer_topic);
        let customer = KafkaAccess::new(customer);
        let quote_password = Password::new(format!("q-{}", uuid::Uuid::new_v4()))?;
        let customer_password = Password::new(format!("c-{}", uuid::Uuid::new_v4()))?;
        quote.provision(&admin, &quote_password).await?;
        customer.provision(&admin, &customer_password).await?;
        Ok(Self {
            admin,
            quote,
            customer,
            quote_password,
            customer_password,
            quote_topic,
            customer_topic,
            private_topic,
        })
    }

    fn quote_config(&self) -> KafkaConfig {
        self.quote.client_config(&self.admin, &self.quote_password)
    }

    fn customer_config(&self) -> KafkaConfig {
        self.customer.client_config(&self.admin, &self.customer_password)
    }

    async fn cleanup(self) -> TestResult {
        self.quote.revoke(&self.admin).await?;
        self.customer.revoke(&self.admin).await?;
        let mut config = rdkafka::ClientConfig::new();
        for (key, value) in self.admin.properties() {
            config.set(key, value);
        }
        let admin: AdminClient<DefaultClientContext> = config.create()?;
        let topics = [
            self.quote_topic.as_str(),
            self.customer_topic.as_str(),
            self.private_topic.as_str(),
        ];
        admin.delete_topics(&topics, &AdminOptions::new()).await?;
        Ok(())
    }
}

fn ping(source: &str) -> Envelope {
    let mut envelope = Envelope::raw(
        MessageKind::Event,
        "test.Pinged",
        RawValue::from_string(String::from("{}")).expect("valid json"),
    );
    envelope.source = source.to_owned();
    envelope.aggregate_id = String::from("a-1");
    envelope
}

fn publisher(config: KafkaConfig) -> Result<KafkaPublisher, dbps_core::Error> {
    KafkaPublisher::builder(config.set("message.timeout.ms", "10000")).build()
}

#[derive(Default)]
struct Count(AtomicUsize);

impl Handler for Count {
    async fn handle(&self, _message: &Envelope) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Runs a consumer runner until it stops by itself (or 60 s pass).
async fn run_until_stopped(
    runner: ConsumerRunner<Arc<Count>>,
) -> Result<dbps_core::kafka::RunSummary, dbps_core::Error> {
    let shutdown = CancellationToken::new();
    tokio::time::timeout(Duration::from_secs(60), runner.run(shutdown))
        .await
        .expect("the runner stops by itself when it is refused")
}

#[tokio::test]
async fn provisioning_grants_exactly_the_declared_acls_and_revoking_removes_them() -> TestResult {
    let pair = Pair::new().await?;
    assert_eq!(pair.quote.granted(&pair.admin).await?, pair.quote.bindings());

    // Idempotent: a second run changes nothing.
    let again = pair.quote.provision(&pair.admin, &pair.quote_password).await?;
    assert!(again.created.is_empty() && again.deleted.is_empty(), "{again:?}");

    // A topic no longer declared loses its ACLs.
    let narrower = KafkaAccess::new(pair.quote.service().clone());
    let changed = narrower.provision(&pair.admin, &pair.quote_password).await?;
    assert_eq!(
        changed.deleted.len(),
        2,
        "read and describe of {}: {changed:?}",
        pair.customer_topic
    );
    assert!(changed.deleted.iter().all(|b| b.name == pair.customer_topic));
    assert_eq!(pair.quote.granted(&pair.admin).await?, narrower.bindings());

    // Revoked: no ACL left, and the user can no longer sign in.
    let customer_config = pair.customer_config();
    assert_eq!(pair.customer.revoke(&pair.admin).await?, pair.customer.bindings().len());
    assert!(pair.customer.granted(&pair.admin).await?.is_empty());
    assert_eq!(pair.customer.revoke(&pair.admin).await?, 0, "revoking twice is fine");
    let error = publisher(customer_config)?
        .publish(&pair.customer_topic, &ping("customer"))
        .await
        .expect_err("a revoked user is refused");
    let shown = dbps_core::ErrorChain(&error).to_string();
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(!error.is_transient(), "{shown}");
    pair.cleanup().await
}

#[tokio::test]
async fn a_service_can_write_its_own_topics_but_not_another_services() -> TestResult {
    let pair = Pair::new().await?;
    let quote = publisher(pair.quote_config())?;
    quote.publish(&pair.quote_topic, &ping("quote")).await?;

    // Forging a customer event is refused, naming who and what.
    let error = quote
        .publish(&pair.customer_topic, &ping("quote"))
        .await
        .expect_err("quote may not write customer's topic");
    let shown = dbps_core::ErrorChain(&error).to_string();
    assert!(matches!(error, dbps_core::Error::Refused { .. }), "{shown}");
    assert!(!error.is_transient());
    let principal = pair.quote.principal();
    assert!(
        shown.starts_with(&format!(
            "kafka refused {principal} to produce to {}: not authorised on the topic",
            pair.customer_topic
        )),
        "{shown}"
    );
    pair.cleanup().await
}

#[tokio::test]
async fn a_service_can_consume_what_it_declared_but_no_other_topic_or_group() -> TestResult {
    let pair = Pair::new().await?;
    let customer = publisher(pair.customer_config())?;
    customer.publish(&pair.customer_topic, &ping("customer")).await?;
    let quote = pair.quote_config();
    let group = format!("{}.customer-cache", pair.quote.service());

    // Another service's topic it may describe but not create: ensure_topics finds it and
    // asks to create nothing.
    let outcomes = ensure_topics(&quote, &[TopicSpec::new(&pair.customer_topic, 1)]).await?;
    assert_eq!(outcomes, [dbps_core::kafka::TopicOutcome::Existed]);

    // The declared topic, in its own group: consumed.
    let count = Arc::new(Count::default());
    let runner = ConsumerRunner::builder(quote.clone(), &group, Arc::clone(&count))
        .topic(&pair.customer_topic)
        .dead_letter_topic(format!("{group}.dlq"))
        .create_topics(|name| TopicSpec::new(name, 1))
        .build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(runner.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count.0.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the declared topic was not consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await??;

    // A topic it did not declare: the runner stops at once, naming topic and principal.
    let runner = ConsumerRunner::builder(quote.clone(), &group, Arc::new(Count::default()))
        .topic(&pair.private_topic)
        .dead_letter_topic(format!("{group}.dlq"))
        .build()?;
    let error = run_until_stopped(runner)
        .await
        .expect_err("an undeclared topic is refused");
    let shown = dbps_core::ErrorChain(&error).to_string();
    assert!(
        shown.starts_with(&format!(
            "kafka refused {} to describe topic {}: not authorised on the topic",
            pair.quote.principal(),
            pair.private_topic
        )),
        "{shown}"
    );

    // Another service's group, on a topic it may read: refused at the group.
    let foreign = format!("{}.customer-cache", pair.customer.service());
    let runner = ConsumerRunner::builder(quote, &foreign, Arc::new(Count::default()))
        .topic(&pair.customer_topic)
        .dead_letter_topic(format!("{group}.dlq"))
        .build()?;
    let error = run_until_stopped(runner).await.expect_err("a foreign group is refused");
    let shown = dbps_core::ErrorChain(&error).to_string();
    assert!(matches!(error, dbps_core::Error::Refused { .. }), "{shown}");
    assert!(
        shown.contains(&pair.quote.principal()) && shown.contains(&foreign),
        "{shown}"
    );
    assert!(shown.contains("not authorised for the consumer group"), "{shown}");
    pair.cleanup().await
}

#[tokio::test]
async fn a_wrong_password_and_a_plaintext_client_are_refused() -> TestResult {
    let pair = Pair::new().await?;
    let wrong = pair
        .quote
        .client_config(&pair.admin, &Password::new("not-the-password")?);
    let error = dbps_core::kafka::missing_topics(&wrong, std::slice::from_ref(&pair.quote_topic))
        .await
        .expect_err("a wrong password is refused");
    let shown = dbps_core::ErrorChain(&error).to_string();
    assert!(
        matches!(error, dbps_core::Error::Refused { .. }) && !error.is_transient(),
        "{shown}"
    );
    assert!(
        shown.starts_with(&format!(
            "kafka refused {} to describe topic {}: authentication failed: ",
            pair.quote.principal(),
            pair.quote_topic
        )),
        "{shown}"
    );
    assert!(!shown.contains("not-the-password"), "{shown}");

    let plaintext = KafkaConfig::new(pair.admin.bootstrap_servers());
    let error = dbps_core::kafka::missing_topics(&plaintext, std::slice::from_ref(&pair.quote_topic))
        .await
        .expect_err("plaintext is refused on the SASL_SSL listener");
    let shown = dbps_core::ErrorChain(&error).to_string();
    assert!(
        shown.contains(&format!("describe topic {}", pair.quote_topic)),
        "{shown}"
    );
    // librdkafka gives no better reason than a broken connection.
    assert!(shown.contains("Broker transport failure"), "{shown}");
    pair.cleanup().await
}

#[tokio::test]
async fn an_empty_prefix_is_refused_before_anything_is_granted() -> TestResult {
    let stack = dbps_testkit::secure()?;
    let access = KafkaAccess::new(ServiceName::new("anyone")?).topic_prefix("");
    let error = access
        .provision(&stack.kafka_admin(), &Password::new("x")?)
        .await
        .expect_err("an empty prefix would grant every topic");
    assert!(
        matches!(
            error,
            MigrateError::InvalidIdentifier {
                what: "topic prefix",
                ..
            }
        ),
        "{error}"
    );
    Ok(())
}
