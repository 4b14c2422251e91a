//! The customer service over HTTP, with its own provisioned database, the relay in-process
//! and the events read back from Kafka with the consumer runner.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dbps_core::kafka::{ConsumerRunner, Handler, HandlerError, KafkaConfig};
use dbps_core::{Envelope, Registry};
use dbps_migrate::{Password, PgService, ServiceName};
use example_customer_service::events::{CustomerCreated, CustomerUpdated};
use example_customer_service::{App, CreateCustomer, Customer, UpdateCustomer, prepare};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[derive(Default)]
struct Collect(Mutex<Vec<Envelope>>);

impl Handler for Collect {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        self.0
            .lock()
            .map_err(|_| HandlerError::permanent("poisoned"))?
            .push(message.clone());
        Ok(())
    }
}

/// Removes the service's database and roles, which live outside the testkit's database.
async fn drop_service(admin: &sqlx::postgres::PgConnectOptions, service: &PgService) -> TestResult {
    let mut conn = admin.connect().await?;
    for sql in [
        format!(r#"drop database if exists "{}" with (force)"#, service.database_name()),
        format!(r#"drop role if exists "{}""#, service.runtime_role()),
        format!(r#"drop role if exists "{}""#, service.owner_role()),
    ] {
        sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
    }
    conn.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_created_and_updated_over_http_publish_their_events_in_order() -> TestResult {
    let pg = dbps_testkit::postgres().await?;
    let kafka = dbps_testkit::kafka().await?;
    let admin = pg.admin_options().clone();
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let service = PgService::new(ServiceName::new(format!("customer_{suffix}"))?);
    let result = scenario(&admin, &service, &kafka).await;
    drop_service(&admin, &service).await?;
    result
}

async fn scenario(
    admin: &sqlx::postgres::PgConnectOptions,
    service: &PgService,
    kafka: &dbps_testkit::TestKafka,
) -> TestResult {
    let pool = prepare(admin, service, &Password::new("owner-pw")?, &Password::new("app-pw")?).await?;
    let topic = kafka.create_topic("customer.customer.events", 3).await?;
    let dlq = kafka.create_topic("dlq", 1).await?;
    let config = KafkaConfig::new(kafka.brokers());
    let app = App::new(pool.clone(), &topic);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(axum::serve(listener, app.router()).into_future());
    let stop_relay = dbps_core::CancellationToken::new();
    let relay = {
        let app = app.clone();
        let config = config.clone();
        let stop = stop_relay.clone();
        tokio::spawn(async move { app.relay(&config, stop).await })
    };

    let http = reqwest::Client::new();
    let create = CreateCustomer {
        name: "Ada Lovelace".into(),
        tax_number: "GB-1815".into(),
        email: "ada@example.com".into(),
    };
    let response = http.post(format!("{base}/customers")).json(&create).send().await?;
    assert_eq!(response.status(), 201);
    let ada: Customer = response.json().await?;
    assert_eq!(ada.version, 1);

    let change = UpdateCustomer {
        name: Some("Ada King".into()),
        ..Default::default()
    };
    let response = http
        .put(format!("{base}/customers/{}", ada.id))
        .json(&change)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let renamed: Customer = response.json().await?;
    assert_eq!(
        (renamed.name.as_str(), renamed.version, renamed.email.as_str()),
        ("Ada King", 2, "ada@example.com")
    );

    // Bad input: a typed 422 and nothing written; an unknown customer: 404.
    let bad = CreateCustomer {
        name: " ".into(),
        tax_number: "X".into(),
        email: "nobody".into(),
    };
    assert_eq!(
        http.post(format!("{base}/customers")).json(&bad).send().await?.status(),
        422
    );
    let missing = uuid::Uuid::now_v7();
    assert_eq!(
        http.put(format!("{base}/customers/{missing}"))
            .json(&change)
            .send()
            .await?
            .status(),
        404
    );
    let fetched: Customer = http
        .get(format!("{base}/customers/{}", ada.id))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(fetched, renamed);

    // The events, read back with the consumer runner.
    let collected = Arc::new(Collect::default());
    let runner = ConsumerRunner::builder(config.clone(), kafka.group_id("check"), Arc::clone(&collected))
        .topic(&topic)
        .dead_letter_topic(&dlq)
        .build()?;
    let stop = dbps_core::CancellationToken::new();
    let consumer = tokio::spawn(runner.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while collected.0.lock().map_err(|_| "poisoned")?.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "events did not arrive");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.cancel();
    consumer.await??;
    stop_relay.cancel();
    relay.await??;
    server.abort();

    let events = collected.0.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(events.len(), 2, "exactly the two committed changes: {events:?}");
    let mut registry = Registry::new();
    registry.register::<CustomerCreated>().register::<CustomerUpdated>();
    let created: CustomerCreated = registry.decode(&events[0])?;
    let updated: CustomerUpdated = registry.decode(&events[1])?;
    assert_eq!(created, CustomerCreated::from(&ada));
    assert_eq!(updated, CustomerUpdated::from(&renamed));
    assert_eq!((events[0].sequence, events[1].sequence), (Some(1), Some(2)));
    for event in &events {
        assert_eq!(event.aggregate_id, ada.id.to_string());
        assert_eq!(event.source, "customer");
        assert!(event.trace.trace_id().is_some());
    }

    // The service's runtime role cannot run DDL in its own database.
    let mut conn = pool.acquire().await?;
    let error = sqlx::query("create table sneaky (x int)")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert_eq!(
        error.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501")
    );
    drop(conn);
    pool.close().await;
    Ok(())
}
