//! A service's start-up, run and stop, against the real PostgreSQL and Kafka: its own
//! database, the relay, health and metrics, a failing part that stops everything, and the
//! HTTP edge's problems.

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use dbps_core::Message;
use dbps_outbox::Relay;
use dbps_outbox::pg::PgOutboxStore;
use dbps_service::http::{Fields, Problem};
use dbps_service::{Service, ServiceConfig, ServiceError};
use serde::{Deserialize, Serialize};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Serialize, Deserialize)]
struct Ping {
    n: i64,
}

impl Message for Ping {
    const TYPE: &'static str = "svc.Ping";
}

/// A service configuration on the test's own provisioned service (so the test service's
/// drop removes database and roles, whatever the service did), and its Kafka.
async fn config(
    test: &dbps_testkit::TestService,
    kafka: &dbps_testkit::TestKafka,
    provision: bool,
) -> Result<ServiceConfig, Box<dyn std::error::Error + Send + Sync>> {
    let (owner, runtime) = test.passwords();
    Ok(ServiceConfig::new(test.name().as_str())?
        .postgres(test.server_options().clone())
        .passwords(owner.clone(), runtime.clone())
        .provision(provision)
        .kafka(dbps_core::kafka::KafkaConfig::new(kafka.brokers()))
        .topic_prefix(kafka.prefix()))
}

async fn listener() -> std::io::Result<(tokio::net::TcpListener, String)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    Ok((listener, base))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_prepares_its_database_relays_serves_health_and_metrics_and_stops_cleanly() -> TestResult {
    for provision in [true, false] {
        let test = dbps_testkit::service("svc").start().await?;
        let kafka = dbps_testkit::kafka().await?;
        let service = Service::new(config(&test, &kafka, provision).await?);
        let pool = service.postgres(&[("dbps_outbox", &dbps_outbox::pg::MIGRATOR)]).await?;
        // The pool is the runtime role's: it writes the outbox, it cannot change tables.
        let denied = sqlx::query("drop table dbps_outbox").execute(&pool).await.unwrap_err();
        assert_eq!(
            denied.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("42501")
        );

        let topic = service.naming().events(service.name().as_str(), "ping")?;
        kafka.create_topics(&[(&topic, 1)]).await?;
        let mut tx = pool.begin().await?;
        service
            .outbox()
            .enqueue_event(&mut tx, "ping", "p-1", &Ping { n: 1 })
            .await?;
        tx.commit().await?;

        let mut service = service;
        let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?).build()?;
        service.run_relay(relay);
        let stop = service.shutdown_token();
        let (listener, base) = listener().await?;
        let running = tokio::spawn(service.serve_on(listener, Router::new()));

        let mut reader = kafka.reader(&topic)?;
        let record = reader.wait_for(1).await?;
        assert_eq!(record.len(), 1, "the relay published the outbox's message");

        let client = reqwest::Client::new();
        let health = client.get(format!("{base}/health")).send().await?;
        assert_eq!(health.status(), 200);
        let body: serde_json::Value = health.json().await?;
        assert_eq!(body["status"], "ok");
        assert_eq!(body["service"], test.name().as_str());
        // The relay counts a message once it is marked, just after Kafka has it.
        dbps_testkit::eventually("the relay's metrics on /metrics", || async {
            let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
            Ok::<_, reqwest::Error>(metrics.contains("dbps_outbox_published_total"))
        })
        .await?;

        stop.cancel();
        running.await??;
        assert!(
            client.get(format!("{base}/health")).send().await.is_err(),
            "the server is gone"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_part_stops_the_whole_service_and_is_reported() -> TestResult {
    let mut service = Service::new(ServiceConfig::new("svc_failing")?);
    let others_stopped = service.shutdown_token();
    service.run("waits", |stop| async move {
        stop.cancelled().await;
        Ok::<_, std::io::Error>(())
    });
    service.run("breaks", |_| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err(std::io::Error::other("disk on fire"))
    });
    let (listener, _) = listener().await?;
    let error = service.serve_on(listener, Router::new()).await.unwrap_err();
    assert!(
        matches!(&error, ServiceError::Task { task, .. } if task == "breaks"),
        "{error:?}"
    );
    assert!(others_stopped.is_cancelled());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_part_is_resumed_as_a_panic() -> TestResult {
    let mut service = Service::new(ServiceConfig::new("svc_panicking")?);
    service.run("panics", |_| async {
        let parts: Vec<u8> = Vec::new();
        // Out of bounds: a part that panics.
        let _ = parts[usize::from(parts.is_empty())];
        Ok::<_, std::io::Error>(())
    });
    let (listener, _) = listener().await?;
    let joined = tokio::spawn(service.serve_on(listener, Router::new())).await;
    assert!(joined.is_err_and(|e| e.is_panic()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_that_ignore_the_stop_are_abandoned_after_the_grace_period() -> TestResult {
    let config = ServiceConfig::new("svc_stubborn")?.shutdown_grace(Duration::from_millis(200));
    let mut service = Service::new(config);
    service.run("stubborn", |_| async {
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(())
    });
    let stop = service.shutdown_token();
    let (listener, _) = listener().await?;
    let running = tokio::spawn(service.serve_on(listener, Router::new()));
    stop.cancel();
    let error = tokio::time::timeout(Duration::from_secs(10), running)
        .await??
        .unwrap_err();
    assert!(matches!(error, ServiceError::ShutdownTimedOut { .. }), "{error:?}");
    Ok(())
}

#[derive(Debug, Deserialize)]
struct NewThing {
    name: String,
    email: String,
}

async fn create(axum::Json(body): axum::Json<NewThing>) -> Result<&'static str, Problem> {
    let mut fields = Fields::new();
    fields.text("name", &body.name, 20);
    fields.email("email", &body.email);
    fields.finish()?;
    Ok("created")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_mistake_is_a_problem_json_4xx() -> TestResult {
    let router = Router::new()
        .route("/things", post(create))
        .layer(axum::extract::DefaultBodyLimit::max(1024));
    let mut service = Service::new(ServiceConfig::new("svc_edge")?);
    let stop = service.shutdown_token();
    service.run("idle", |stop| async move {
        stop.cancelled().await;
        Ok::<_, std::io::Error>(())
    });
    let (listener, base) = listener().await?;
    let running = tokio::spawn(service.serve_on(listener, router));
    let client = reqwest::Client::new();
    let post = |body: String, json: bool| {
        let mut request = client.post(format!("{base}/things")).body(body);
        if json {
            request = request.header("content-type", "application/json");
        }
        request.send()
    };

    let cases = [
        (post(String::from("{not json"), true).await?, 400),
        (post(String::from(r#"{"name": "Ada"}"#), true).await?, 422),
        (
            post(String::from(r#"{"name": "Ada", "email": "ada@example.com"}"#), false).await?,
            415,
        ),
        (
            post(format!(r#"{{"name": "{}", "email": "a@b.c"}}"#, "x".repeat(2000)), true).await?,
            413,
        ),
        (
            post(String::from(r#"{"name": "A\u0000da", "email": " @x"}"#), true).await?,
            422,
        ),
        (client.get(format!("{base}/nowhere")).send().await?, 404),
        (client.get(format!("{base}/things")).send().await?, 405),
    ];
    for (response, status) in cases {
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{status}"
        );
        let problem: serde_json::Value = response.json().await?;
        assert_eq!(problem["status"], status);
        assert!(problem["title"].is_string(), "{problem}");
        if status == 422 && problem.get("errors").is_some() {
            assert_eq!(problem["errors"].as_array().map(Vec::len), Some(2), "{problem}");
        }
    }
    let ok = post(String::from(r#"{"name": "Ada", "email": "ada@example.com"}"#), true).await?;
    assert_eq!(ok.status(), 200);
    stop.cancel();
    running.await??;
    Ok(())
}
