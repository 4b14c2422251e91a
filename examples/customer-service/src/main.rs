//! `customer-service`: the customer service as a process.
//!
//! Configuration (environment):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DBPS_POSTGRES_URL` | administrative connection used to provision the service's database | required |
//! | `DBPS_KAFKA_BROKERS` | Kafka bootstrap servers | required |
//! | `CUSTOMER_SERVICE_ADDR` | address to listen on | `127.0.0.1:8081` |
//! | `CUSTOMER_DB_OWNER_PASSWORD` | password of the `customer_owner` role | a development value |
//! | `CUSTOMER_DB_APP_PASSWORD` | password of the `customer_app` role | a development value |

use std::str::FromStr;

use anyhow::Context as _;
use dbps_core::kafka::KafkaConfig;
use dbps_migrate::{Password, PgService, ServiceName};
use example_customer_service::{App, SHUTDOWN_GRACE, prepare};
use sqlx::postgres::PgConnectOptions;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".into()),
        )
        .init();

    let admin_url = std::env::var("DBPS_POSTGRES_URL").context("DBPS_POSTGRES_URL is not set")?;
    let admin = PgConnectOptions::from_str(&admin_url).context("DBPS_POSTGRES_URL is not a postgres URL")?;
    let brokers = std::env::var("DBPS_KAFKA_BROKERS").context("DBPS_KAFKA_BROKERS is not set")?;
    let addr = std::env::var("CUSTOMER_SERVICE_ADDR").unwrap_or_else(|_| "127.0.0.1:8081".into());
    let owner_password = password("CUSTOMER_DB_OWNER_PASSWORD", "customer-owner-dev")?;
    let app_password = password("CUSTOMER_DB_APP_PASSWORD", "customer-app-dev")?;

    let service = PgService::new(ServiceName::new("customer")?);
    let pool = prepare(&admin, &service, &owner_password, &app_password).await?;
    let kafka = KafkaConfig::new(brokers);
    let app = App::new(pool, "customer.customer.events");
    app.ensure_topic(&kafka).await?;

    let stop = dbps_core::CancellationToken::new();
    let relay = {
        let app = app.clone();
        let kafka = kafka.clone();
        let shutdown = stop.clone();
        tokio::spawn(async move { app.relay(&kafka, shutdown).await })
    };

    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, topic = app.topic(), "customer service listening");
    let server = axum::serve(listener, app.router()).with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    shutdown_signal().await;
    tracing::info!("shutting down");
    stop.cancel();
    tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = server.await;
        let _ = relay.await;
    })
    .await
    .context("shutdown took too long")?;
    Ok(())
}

fn password(var: &str, development: &str) -> anyhow::Result<Password> {
    let value = std::env::var(var).unwrap_or_else(|_| {
        tracing::warn!("{var} is not set; using the development password");
        development.to_owned()
    });
    Ok(Password::new(value)?)
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
