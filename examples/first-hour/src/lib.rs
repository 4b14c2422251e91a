//! A team's first hour with dbps, as one crate: an **orders** service that writes orders
//! and their `OrderPlaced` events through the outbox, and a **stats** service that counts
//! them per customer exactly once through the consumer runner and the inbox. Each has its
//! own database; they share nothing but the `orders.order.events` topic.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use dbps_core::inbox::pg::{PgInbox, TypedTxHandler};
use dbps_core::kafka::{ConsumerRunner, HandlerError, TopicSpec};
use dbps_core::{Envelope, Message, Typed, message_set};
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use dbps_service::Service;
use dbps_service::http::{Fields, Problem};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

static ORDERS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/orders");
static STATS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/stats");

/// The event the orders service publishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// Who ordered.
    pub customer: String,
    /// The order's total.
    pub total_cents: i64,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "orders.OrderPlaced";
}

message_set! {
    /// What the stats service follows on the orders topic.
    #[derive(Debug)]
    pub enum OrderEvent {
        /// An order was placed.
        Placed(OrderPlaced),
    }
}

/// Starts the orders service's parts on `service` and returns its routes.
pub async fn orders(service: &mut Service) -> Result<Router, Box<dyn std::error::Error + Send + Sync>> {
    let pool = service
        .postgres(&[("dbps_outbox", &dbps_outbox::pg::MIGRATOR), ("orders", &ORDERS)])
        .await?;
    let topic = service.naming().events(service.name().as_str(), "order")?;
    let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?)
        .create_topics([TopicSpec::new(topic, 3)])
        .build()?;
    service.run_relay(relay);
    Ok(Router::new()
        .route("/orders", post(place))
        .with_state((pool, service.outbox())))
}

/// `POST /orders {customer, total_cents}`: the order and its event, in one transaction.
async fn place(
    State((pool, outbox)): State<(PgPool, PgOutbox)>,
    Json(order): Json<OrderPlaced>,
) -> Result<(), Problem> {
    let mut fields = Fields::new();
    let customer = fields.text("customer", &order.customer, 100);
    if order.total_cents <= 0 {
        fields.invalid("total_cents", "must be positive");
    }
    fields.finish()?;
    let unavailable = |_| Problem::unavailable();
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let (id,): (String,) =
        sqlx::query_as("insert into orders (customer, total_cents) values ($1, $2) returning id::text")
            .bind(customer)
            .bind(order.total_cents)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
    outbox
        .enqueue_event(&mut tx, "order", &id, &order)
        .await
        .map_err(|_| Problem::unavailable())?;
    tx.commit().await.map_err(unavailable)
}

/// Counts placed orders per customer, inside the inbox's transaction.
struct CountOrders;

impl TypedTxHandler<OrderEvent> for CountOrders {
    async fn handle(&self, conn: &mut PgConnection, event: OrderEvent, _: &Envelope) -> Result<(), HandlerError> {
        let OrderEvent::Placed(order) = event;
        sqlx::query(
            "insert into order_stats values ($1, 1, $2) on conflict (customer)
             do update set orders = order_stats.orders + 1, total_cents = order_stats.total_cents + $2",
        )
        .bind(&order.customer)
        .bind(order.total_cents)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// Starts the stats service's consumer of `orders_service`'s events on `service` and
/// returns its routes.
pub async fn stats(
    service: &mut Service,
    orders_service: &str,
) -> Result<Router, Box<dyn std::error::Error + Send + Sync>> {
    let pool = service
        .postgres(&[("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR), ("stats", &STATS)])
        .await?;
    let group = service.group("orders");
    let runner = ConsumerRunner::builder(
        service.kafka()?.clone(),
        &group,
        PgInbox::new(pool.clone(), &group, Typed::new(CountOrders)),
    )
    .topic(service.naming().events(orders_service, "order")?)
    .dead_letter_topic(service.naming().dead_letter(&group)?)
    .create_topics(|name| TopicSpec::new(name, 3))
    .build()?;
    service.run_consumer(runner);
    Ok(Router::new().route("/stats", get(report)).with_state(pool))
}

/// `GET /stats`: orders and totals per customer.
async fn report(State(pool): State<PgPool>) -> Result<Json<Vec<(String, i64, i64)>>, Problem> {
    let rows = sqlx::query_as("select customer, orders, total_cents from order_stats order by customer")
        .fetch_all(&pool)
        .await
        .map_err(|_| Problem::unavailable())?;
    Ok(Json(rows))
}
