//! Both services on their own databases, orders placed over HTTP, counted exactly once —
//! also when Kafka delivers an event again.

use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_service::{Service, ServiceConfig};
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A service on a test service's database, named after it, in the test's topic namespace.
async fn start(
    test: &dbps_testkit::TestService,
    kafka: &dbps_testkit::TestKafka,
) -> Result<(Service, tokio::net::TcpListener, String), Box<dyn std::error::Error + Send + Sync>> {
    let (owner, runtime) = test.passwords();
    let config = ServiceConfig::new(test.name().as_str())?
        .postgres(test.server_options().clone())
        .passwords(owner.clone(), runtime.clone())
        .kafka(KafkaConfig::new(kafka.brokers()))
        .topic_prefix(kafka.prefix());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    Ok((Service::new(config), listener, base))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_counted_once_per_event() -> TestResult {
    let kafka = dbps_testkit::kafka().await?;
    let (orders_db, stats_db) = (
        dbps_testkit::service("orders").start().await?,
        dbps_testkit::service("stats").start().await?,
    );
    let (mut orders, orders_listener, orders_url) = start(&orders_db, &kafka).await?;
    let (mut stats, stats_listener, stats_url) = start(&stats_db, &kafka).await?;
    let orders_name = orders.name().to_string();
    let (orders_router, stats_router) = (
        example_first_hour::orders(&mut orders).await?,
        example_first_hour::stats(&mut stats, &orders_name).await?,
    );
    let (stop_orders, stop_stats) = (orders.shutdown_token(), stats.shutdown_token());
    let topic = orders.naming().events(&orders_name, "order")?;
    let group = stats.group("orders");
    let running = [
        tokio::spawn(orders.serve_on(orders_listener, orders_router)),
        tokio::spawn(stats.serve_on(stats_listener, stats_router)),
    ];

    let http = reqwest::Client::new();
    for (customer, total) in [("ada", 100), ("ada", 250), ("grace", 75)] {
        let placed = http
            .post(format!("{orders_url}/orders"))
            .json(&json!({"customer": customer, "total_cents": total}))
            .send()
            .await?;
        assert_eq!(placed.status(), 200);
    }
    let refused = http
        .post(format!("{orders_url}/orders"))
        .json(&json!({"customer": "", "total_cents": 0}))
        .send()
        .await?;
    assert_eq!(refused.status(), 422);

    // The relay has published every order's event.
    orders_db.outbox_drained().await?;

    // Every event once, then one of them again: a redelivery.
    let first = kafka.reader(&topic)?.wait_for(3).await?[0].clone();
    let again = dbps_core::kafka::decode_record(&first)?;
    KafkaPublisher::builder(KafkaConfig::new(kafka.brokers()))
        .build()?
        .publish(&topic, &again)
        .await?;
    kafka.caught_up(&group, &topic).await?;

    let report: Vec<(String, i64, i64)> = http.get(format!("{stats_url}/stats")).send().await?.json().await?;
    assert_eq!(report, vec![("ada".into(), 2, 350), ("grace".into(), 1, 75)]);
    stop_orders.cancel();
    stop_stats.cancel();
    for service in running {
        service.await??;
    }
    Ok(())
}
