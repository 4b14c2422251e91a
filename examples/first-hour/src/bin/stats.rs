//! The order-statistics service. Run with the stack's variables and
//! `STATS_DB_OWNER_PASSWORD`, `STATS_DB_RUNTIME_PASSWORD`, `STATS_HTTP_ADDR` set.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    dbps_service::init_tracing();
    let mut service = dbps_service::Service::new(dbps_service::ServiceConfig::from_env("stats")?);
    let router = example_first_hour::stats(&mut service, "orders").await?;
    Ok(service.serve(router).await?)
}
