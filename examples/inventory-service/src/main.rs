//! `inventory-service`: the inventory service as a process.
//!
//! Configuration comes from the environment (see `dbps_service::ServiceConfig`):
//! `DBPS_POSTGRES_URL`, `DBPS_KAFKA_BROKERS`, `INVENTORY_DB_OWNER_PASSWORD`,
//! `INVENTORY_DB_RUNTIME_PASSWORD` and `INVENTORY_HTTP_ADDR` (default `127.0.0.1:8080`);
//! and `DBPS_REDIS_URL` (the stock cache) and `INVENTORY_QUOTE_SERVICE` (the quote service
//! whose events it follows, default `quote`). Logs go to standard error, filtered by
//! `RUST_LOG` or `dbps_service::DEFAULT_LOG_FILTER`. SIGTERM or Ctrl-C stops it cleanly.

use dbps_service::{Service, ServiceConfig};
use example_inventory_service::{App, SERVICE, Settings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    dbps_service::init_tracing();
    let mut service = Service::new(ServiceConfig::from_env(SERVICE)?);
    let app = App::start(&mut service, Settings::from_env()?).await?;
    service.serve(app.router()).await?;
    Ok(())
}
