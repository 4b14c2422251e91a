//! `email-service`: the email service as a process.
//!
//! Configuration comes from the environment:
//!
//! - the service's (see `dbps_service::ServiceConfig`): `DBPS_KAFKA_BROKERS`,
//!   `EMAIL_HTTP_ADDR` (default `127.0.0.1:8080`), `DBPS_TOPIC_PREFIX`,
//!   `DBPS_SHUTDOWN_GRACE_SECS`;
//! - `DBPS_MONGODB_URI`: the MongoDB server; the database is the service's name;
//! - `EMAIL_SERVICE_NAME`: the service's name, `email` unless set (a deployment running
//!   several, or a test, names them apart: the name is the root of the database, the
//!   topics and the consumer groups);
//! - `EMAIL_KAFKA_SESSION_TIMEOUT_MS`: how soon Kafka gives a dead instance's partitions
//!   to another (librdkafka's `session.timeout.ms`, 45 s unless set);
//! - the email service's own (see `example_email_service::Settings::from_env`):
//!   `EMAIL_CUSTOMER_URL`, `EMAIL_SMTP_URL`, `EMAIL_CUSTOMER_SERVICE`,
//!   `EMAIL_QUOTE_SERVICE`, `EMAIL_MAX_ATTACHMENT_BYTES`, ...
//!
//! Logs go to standard error, filtered by `RUST_LOG` or `dbps_service::DEFAULT_LOG_FILTER`.
//! SIGTERM or Ctrl-C stops it cleanly.

use dbps_service::{Service, ServiceConfig};
use example_email_service::{App, SERVICE, Settings, store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    dbps_service::init_tracing();
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let name = var("EMAIL_SERVICE_NAME").unwrap_or_else(|| SERVICE.to_owned());
    let mut config = ServiceConfig::from_env(&name)?;
    if let Some(addr) = var("EMAIL_HTTP_ADDR") {
        config = config.http_addr(
            addr.trim()
                .parse()
                .map_err(|e| format!("EMAIL_HTTP_ADDR: {e} (expected host:port)"))?,
        );
    }
    if let Some(millis) = var("EMAIL_KAFKA_SESSION_TIMEOUT_MS") {
        let millis: u64 = millis
            .trim()
            .parse()
            .map_err(|e| format!("EMAIL_KAFKA_SESSION_TIMEOUT_MS: {e}"))?;
        let kafka = config
            .kafka_config()?
            .clone()
            .set("session.timeout.ms", millis.to_string())
            .set("heartbeat.interval.ms", (millis / 4).max(100).to_string());
        config = config.kafka(kafka);
    }
    let uri = var("DBPS_MONGODB_URI").ok_or("DBPS_MONGODB_URI is not set")?;
    let settings = Settings::from_env()?;
    let database = store::connect(&uri, config.name().as_str()).await?;
    let mut service = Service::new(config);
    let app = App::start(&mut service, database, settings).await?;
    service.serve(app.router()).await?;
    Ok(())
}
