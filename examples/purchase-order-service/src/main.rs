//! `purchase-order-service`: the purchase-order service as a process.
//!
//! Configuration comes from the environment (see `dbps_service::ServiceConfig`):
//! `DBPS_POSTGRES_URL`, `DBPS_KAFKA_BROKERS`, `PURCHASE_ORDER_DB_OWNER_PASSWORD`,
//! `PURCHASE_ORDER_DB_RUNTIME_PASSWORD` and `PURCHASE_ORDER_HTTP_ADDR` (default
//! `127.0.0.1:8080`), and `PURCHASE_ORDER_DEFAULT_LIMIT_CENTS`, the credit limit of
//! customers without one of their own (default `1000000`, 10,000.00).
//! Logs go to standard error, filtered by `RUST_LOG` or `dbps_service::DEFAULT_LOG_FILTER`.
//! SIGTERM or Ctrl-C stops it cleanly.

use dbps_service::{Service, ServiceConfig};
use example_purchase_order_service::{App, SERVICE, Settings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    dbps_service::init_tracing();
    let settings = Settings::from_env()?;
    let mut service = Service::new(ServiceConfig::from_env(SERVICE)?);
    let app = App::start(&mut service, settings).await?;
    service.serve(app.router()).await?;
    Ok(())
}
