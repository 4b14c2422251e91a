//! `quote-service`: the quote service as a process.
//!
//! Configuration comes from the environment (see `dbps_service::ServiceConfig` and
//! `example_quote_service::Settings::from_env`): `DBPS_POSTGRES_URL`, `DBPS_KAFKA_BROKERS`,
//! `QUOTE_DB_OWNER_PASSWORD`, `QUOTE_DB_RUNTIME_PASSWORD`, `QUOTE_HTTP_ADDR` and
//! `QUOTE_CUSTOMER_URL` (the customer service) and `QUOTE_INVENTORY_URL` (the inventory's
//! product catalogue), optionally the peers' names and the saga timeouts. SIGTERM or
//! Ctrl-C stops it cleanly.

use dbps_service::{Service, ServiceConfig};
use example_quote_service::{App, SERVICE, Settings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    dbps_service::init_tracing();
    let mut service = Service::new(ServiceConfig::from_env(SERVICE)?);
    let app = App::start(&mut service, Settings::from_env()?).await?;
    service.serve(app.router()).await?;
    Ok(())
}
