//! `customer-service`: the customer service as a process.
//!
//! Configuration comes from the environment (see `dbps_service::ServiceConfig`):
//! `DBPS_POSTGRES_URL`, `DBPS_KAFKA_BROKERS`, `CUSTOMER_DB_OWNER_PASSWORD`,
//! `CUSTOMER_DB_RUNTIME_PASSWORD` and `CUSTOMER_HTTP_ADDR` (default `127.0.0.1:8080`);
//! customer search (see [`example_customer_service::Settings`]) from `DBPS_OPENSEARCH_URL`
//! (without it, search answers `503`) and `CUSTOMER_SEARCH_INDEX_PREFIX` (default
//! `customer-`).
//! Logs go to standard error, filtered by `RUST_LOG` or `dbps_service::DEFAULT_LOG_FILTER`.
//! SIGTERM or Ctrl-C stops it cleanly.

use dbps_service::{Service, ServiceConfig};
use example_customer_service::{App, SERVICE, Settings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    dbps_service::init_tracing();
    let mut service = Service::new(ServiceConfig::from_env(SERVICE)?);
    let app = App::start_with(&mut service, Settings::from_env()).await?;
    service.serve(app.router()).await?;
    Ok(())
}
