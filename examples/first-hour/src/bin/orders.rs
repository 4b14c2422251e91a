//! The orders service. Run with the stack's variables and `ORDERS_DB_OWNER_PASSWORD`,
//! `ORDERS_DB_RUNTIME_PASSWORD`, `ORDERS_HTTP_ADDR` set.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    dbps_service::init_tracing();
    let mut service = dbps_service::Service::new(dbps_service::ServiceConfig::from_env("orders")?);
    let router = example_first_hour::orders(&mut service).await?;
    Ok(service.serve(router).await?)
}
