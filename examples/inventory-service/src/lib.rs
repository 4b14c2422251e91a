//! The inventory service of the dbps example system.
//!
//! It owns the `products`, `inventory`, `stock_movements` and `stock_reservations` tables
//! in its own PostgreSQL database, provisioned and migrated at start (`inventory_owner`
//! runs the migrations, `inventory_app` serves requests and cannot run DDL, nor read
//! another service's database). A product's `inventory` row holds what is on hand and
//! what is reserved; checks keep the available stock (`on_hand - reserved`) from ever
//! going negative. `stock_movements` is append-only (a trigger refuses updates and
//! deletes): goods `received`, `shipped` and `returned`.
//!
//! # Consumes
//!
//! - `<quote>.quote.events` (the quote service's name is configured, `quote` by default):
//!   each `quote.QuoteCreated`, once however often Kafka delivers it, reserves stock for
//!   **every line of the quote in one local transaction**, or for none when one line is
//!   short or its product unknown. A quote with a reservation is not reserved again.
//! - `<inventory>.commands`, as a saga participant: `inventory.ConfirmReservation` ships
//!   the reserved goods (answered `inventory.ReservationConfirmed`, or
//!   `inventory.ReservationNotConfirmed` when nothing is reserved; a reservation confirmed
//!   already is confirmed again, as a command sent twice needs), and its compensation
//!   `inventory.ReleaseReservation` gives the stock back — reserved goods become available,
//!   shipped ones are returned — answered `dbps.saga.Compensated`, also when there is
//!   nothing left to release. The reply goes to the command's `reply_to` topic, with its
//!   correlation id, through the outbox in the same transaction as the effect.
//! - `<inventory>.product.events`, its own: each `inventory.StockLevelChanged` invalidates
//!   the product's entry in the Redis stock cache.
//!
//! # Publishes
//!
//! Through the outbox, in the transaction of the change:
//!
//! - `<inventory>.reservation.events`, keyed by the quote id: `inventory.StockReserved` or
//!   `inventory.StockReservationFailed` (with what was short), the answer to a
//!   `QuoteCreated`;
//! - `<inventory>.product.events`, keyed by the product id: `inventory.ProductChanged`
//!   when a product is created (its `version` is the product's) and
//!   `inventory.StockLevelChanged` whenever a product's stock changes (its `version` is
//!   the stock row's).
//!
//! Both kinds of product event share the product's sequence numbers (the envelope's
//! `sequence`), so a follower of one kind sees gaps there: the payload's `version` is
//! what orders the product, or its stock. Events made by a message (a `QuoteCreated`, a
//! command) carry its correlation id, its id as causation and its trace.
//!
//! # Serves
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /products` | [`CreateProduct`] | `201`, the [`Product`], `Location`; `409` for a known SKU |
//! | `GET /products` | | `200`, `[Product, ...]` by SKU, at most [`MAX_PRODUCTS`]: the reference data other services load |
//! | `GET /products/{id}` | | `200`, the [`Product`] |
//! | `POST /products/{id}/deliveries` | [`Delivery`] | `200`, the new [`Stock`]: goods received |
//! | `GET /products/{id}/stock` | | `200`, the [`Stock`], and [`CACHE_HEADER`]: `hit` or `miss` |
//! | `GET /quotes/{quote_id}/reservation` | | `200`, the quote's [`Reservation`]; `404` if it holds none |
//! | `GET /health`, `GET /metrics` | | liveness, Prometheus metrics |
//!
//! In JSON:
//!
//! - a [`CreateProduct`] is `{"sku", "name", "unit_price_cents", "on_hand"}` (SKU 1 to 64
//!   characters, name 1 to 200, price and stock not negative);
//! - a [`Product`] is `{"id", "sku", "name", "unit_price_cents", "version"}`;
//! - a [`Delivery`] is `{"quantity"}`, above zero;
//! - a [`Stock`] is `{"product_id", "on_hand", "reserved", "available", "version"}`;
//! - a [`Reservation`] is `{"quote_id", "lines": [{"product_id", "quantity", "state",
//!   "at"}, ...]}`, `state` one of `reserved`, `confirmed`, `released`.
//!
//! The stock check is the high-frequency read: it is served from Redis
//! (`dbps_cache::redis::RedisCache`, cache-aside with a TTL, under the keys
//! `<service>:stock:{<product id>}`). The service's own `StockLevelChanged` events
//! invalidate a product's entry (see *Consumes*); a delivery also invalidates it right
//! after its commit. While Redis is down the database answers.
//!
//! Every client mistake is a 4xx `application/problem+json` answer, found before anything
//! is written; logs carry ids only.
//!
//! # Configuration
//!
//! [`App::start`] takes the [`Service`] (its database, Kafka and HTTP address, from
//! `dbps_service::ServiceConfig`) and [`Settings`]: [`Settings::from_env`] reads
//! [`REDIS_URL_VAR`] (`DBPS_REDIS_URL`) and [`QUOTE_SERVICE_VAR`]
//! (`INVENTORY_QUOTE_SERVICE`, default `quote`).

mod http;
pub mod stock;

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use dbps_cache::redis::{Invalidate, RedisCache};
use dbps_core::inbox::pg::PgInbox;
use dbps_core::kafka::TopicSpec;
use dbps_core::{Message as _, OtherTypes, Typed};
use dbps_outbox::Relay;
use dbps_outbox::pg::PgOutboxStore;
use dbps_saga::Participant;
use dbps_service::Service;
use example_contracts::inventory::{PRODUCT_AGGREGATE, RESERVATION_AGGREGATE, StockLevelChanged};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;

pub use crate::http::{CreateProduct, Delivery, Product, Reservation, ReservationLine, Stock};
use crate::stock::{Events, Reservations, Warehouse};

/// The service's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The service's name, the root of its database, roles, topics and groups.
pub const SERVICE: &str = "inventory";

/// The consumer of `<inventory>.commands` (its group is `<inventory>.commands`).
pub const COMMANDS_CONSUMER: &str = "commands";

/// The consumer of the quote service's events (group `<inventory>.quote_events`).
pub const QUOTE_EVENTS_CONSUMER: &str = "quote_events";

/// The consumer of its own product events that invalidates the stock cache (group
/// `<inventory>.stock_cache`).
pub const STOCK_CACHE_CONSUMER: &str = "stock_cache";

/// The variable that names the quote service whose events are followed (default
/// `quote`).
pub const QUOTE_SERVICE_VAR: &str = "INVENTORY_QUOTE_SERVICE";

/// The variable with the Redis server's URL.
pub const REDIS_URL_VAR: &str = "DBPS_REDIS_URL";

/// The response header of `GET /products/{id}/stock`: `hit` when Redis served the stock,
/// `miss` when the database did.
pub const CACHE_HEADER: &str = "x-cache";

/// The most products `GET /products` returns.
pub const MAX_PRODUCTS: i64 = 1000;

/// How long a stock level stays in Redis when no event invalidates it (default).
pub const STOCK_TTL: Duration = Duration::from_secs(300);

/// The migration components of the service's database, in order: the framework's tables,
/// then the service's own.
pub fn components() -> [(&'static str, &'static Migrator); 3] {
    [
        ("dbps_outbox", &dbps_outbox::pg::MIGRATOR),
        ("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR),
        (SERVICE, &MIGRATOR),
    ]
}

/// What the inventory service needs besides a [`Service`]'s configuration: the quote
/// service it follows and the Redis server of its stock cache.
#[derive(Clone)]
pub struct Settings {
    quote_service: String,
    redis: ConnectionManager,
    cache_prefix: String,
    stock_ttl: Duration,
}

/// The connection is left out.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("quote_service", &self.quote_service)
            .field("cache_prefix", &self.cache_prefix)
            .field("stock_ttl", &self.stock_ttl)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Settings with the stock cache on `redis`, following the quote service `quote`, the
    /// cache's keys under `<service>:stock:`, kept for [`STOCK_TTL`].
    pub fn new(redis: ConnectionManager) -> Self {
        Self {
            quote_service: example_contracts::services::QUOTE.to_owned(),
            redis,
            cache_prefix: String::new(),
            stock_ttl: STOCK_TTL,
        }
    }

    /// The settings from the environment: the Redis server from [`REDIS_URL_VAR`]
    /// (required; connected lazily, so the service starts, and answers from the database,
    /// while Redis is down), the quote service from [`QUOTE_SERVICE_VAR`].
    pub fn from_env() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let url = var(REDIS_URL_VAR).ok_or_else(|| format!("{REDIS_URL_VAR} is not set"))?;
        let client = redis::Client::open(url.trim()).map_err(|e| format!("{REDIS_URL_VAR}: {e}"))?;
        let redis = ConnectionManager::new_lazy_with_config(client, ConnectionManagerConfig::new())?;
        let mut settings = Self::new(redis);
        if let Some(quote) = var(QUOTE_SERVICE_VAR) {
            settings.quote_service = quote.trim().to_owned();
        }
        Ok(settings)
    }

    /// Follows the events of the quote service named `name`.
    pub fn quote_service(mut self, name: impl Into<String>) -> Self {
        self.quote_service = name.into();
        self
    }

    /// Puts the cache's keys under `<prefix><service>:stock:` (an environment's, or a
    /// test's, own prefix).
    pub fn cache_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.cache_prefix = prefix.into();
        self
    }

    /// How long a stock level stays cached when no event invalidates it.
    pub fn stock_ttl(mut self, ttl: Duration) -> Self {
        self.stock_ttl = ttl;
        self
    }
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    pool: PgPool,
    events: Events,
    stock: RedisCache<Stock>,
}

impl App {
    /// Prepares the service's database and starts on `service` its relay, its consumer of
    /// the quote service's events, its saga participant and its stock-cache invalidation
    /// (each creates its topics if they are missing). Serve [`App::router`] with it next.
    pub async fn start(
        service: &mut Service,
        settings: Settings,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let pool = service.postgres(&components()).await?;
        let naming = service.naming();
        // Topics are named after the service's configured name (`inventory`, or a test's
        // unique one), as its outbox names them.
        let name = service.name().to_string();
        let events = Events::new(service.outbox(), naming.clone());

        let reservation_events = naming.events(&name, RESERVATION_AGGREGATE)?;
        let product_events = naming.events(&name, PRODUCT_AGGREGATE)?;
        let relay = Relay::builder(PgOutboxStore::new(pool.clone()), service.relay_publisher()?)
            .create_topics([
                TopicSpec::new(reservation_events, 3),
                TopicSpec::new(product_events.clone(), 3),
            ])
            .build()?;
        service.run_relay(relay);

        // Stock for each new quote, once per event.
        let group = service.group(QUOTE_EVENTS_CONSUMER);
        let reservations = Typed::new(Reservations::new(events.clone())).other_types(OtherTypes::Ignore);
        let inbox = PgInbox::new(pool.clone(), group.clone(), reservations);
        service.consume(
            &group,
            &naming.events(&settings.quote_service, example_contracts::quote::AGGREGATE)?,
            inbox,
        )?;

        // The saga's commands, each applied once with its reply.
        let group = service.group(COMMANDS_CONSUMER);
        let participant = Participant::new(events.outbox().clone(), Warehouse::new(events.clone()));
        let inbox = PgInbox::new(pool.clone(), group.clone(), participant);
        service.consume(&group, &naming.commands(&name)?, inbox)?;

        // The stock cache, invalidated by the service's own stock events.
        let stock: RedisCache<Stock> =
            RedisCache::builder(settings.redis, format!("{}{name}:stock:", settings.cache_prefix))
                .ttl(settings.stock_ttl)
                .build()?;
        let group = service.group(STOCK_CACHE_CONSUMER);
        let invalidate = Invalidate::new(stock.clone(), |event: &dbps_core::Envelope| {
            if event.message_type == StockLevelChanged::TYPE {
                vec![event.aggregate_id.clone()]
            } else {
                Vec::new()
            }
        });
        service.consume(&group, &product_events, invalidate)?;

        Ok(Self { pool, events, stock })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/products", post(http::create_product).get(http::list_products))
            .route("/products/{id}", get(http::get_product))
            .route("/products/{id}/deliveries", post(http::receive_delivery))
            .route("/products/{id}/stock", get(http::get_stock))
            .route("/quotes/{quote_id}/reservation", get(http::get_reservation))
            .layer(axum::extract::DefaultBodyLimit::max(http::MAX_BODY))
            .with_state(self.clone())
    }
}
