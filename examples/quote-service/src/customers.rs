//! What the quote service knows of customers: its `customer_cache` replica of the customer
//! service's events, and — when the replica lacks a customer, or a caller wants fresh
//! details — the customer service's REST API behind a circuit breaker.

use std::time::Duration;

use dbps_cache::replica::http::HttpSource;
use dbps_cache::replica::{Change, PgReplica, Projection};
use dbps_core::{CancellationToken, Envelope, HandlerError};
use dbps_service::client::{BreakerState, ServiceClient};
use dbps_service::http::{Fields, Problem};
use example_customer_service::events::CustomerEvent;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Settings;

/// Where the customer service serves its snapshot for replicas.
pub const SNAPSHOT_PATH: &str = "/snapshot/customers";

/// The replica's table.
pub const CACHE_TABLE: &str = "customer_cache";

/// A customer as the customer service's events and snapshot carry it (other fields are
/// ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerState {
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
}

/// `customer_cache {id, name, tax_number}`: one row per customer.
#[derive(Debug, Clone, Copy, Default)]
pub struct CustomerCache;

impl Projection for CustomerCache {
    type Events = CustomerEvent;
    type Snapshot = CustomerState;

    fn project(&self, event: CustomerEvent, _: &Envelope) -> Result<Change, HandlerError> {
        let (name, tax_number) = match event {
            CustomerEvent::Created(c) => (c.name, c.tax_number),
            CustomerEvent::Updated(c) => (c.name, c.tax_number),
        };
        self.snapshot(CustomerState { name, tax_number })
    }

    fn snapshot(&self, state: CustomerState) -> Result<Change, HandlerError> {
        Ok(Change::row(&state)?)
    }
}

/// The replica over the service's pool.
pub fn replica(pool: &PgPool) -> Result<PgReplica<CustomerCache>, dbps_cache::CacheError> {
    PgReplica::builder(pool.clone(), CACHE_TABLE, CustomerCache)
        .aggregate_column("id")
        .build()
}

/// Where customer details came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The quote service's own replica (kept by events; may lag the owner briefly).
    Replica,
    /// The customer service, just now.
    CustomerService,
}

/// Customer details as the quote service shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerDetails {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
    /// Where they came from.
    pub source: Source,
    /// True when the customer service could not be asked and the replica answered
    /// instead: the details may be stale.
    pub may_be_stale: bool,
}

/// The replica's row of a customer.
pub async fn cached(pool: &PgPool, id: Uuid) -> Result<Option<CustomerDetails>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query_as("select name, tax_number from customer_cache where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|(name, tax_number)| CustomerDetails {
        id,
        name,
        tax_number,
        source: Source::Replica,
        may_be_stale: false,
    }))
}

/// The customer as the customer service's `GET /customers/{id}` shows it (other fields are
/// ignored).
#[derive(Debug, Clone, Deserialize)]
struct OwnerCustomer {
    id: Uuid,
    name: String,
    tax_number: String,
}

/// How long a call to the customer service may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive failures that open the breaker.
const BREAKER_FAILURES: usize = 3;
/// How long an open breaker waits before it lets a trial call through.
const BREAKER_COOL_DOWN: Duration = Duration::from_secs(5);
/// Customers per snapshot page, when backfilling.
const BACKFILL_PAGE: usize = 500;

/// The quote service's way to customers: the replica first, the customer service over
/// REST (through a circuit breaker) when the replica lacks one or fresh details are asked
/// for.
#[derive(Debug, Clone)]
pub struct Directory {
    pool: PgPool,
    client: ServiceClient,
    snapshot: HttpSource,
}

impl Directory {
    /// The directory of the customer service at `settings.customer_url`.
    pub fn new(pool: PgPool, settings: &Settings) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let client = ServiceClient::builder("customer", &settings.customer_url)
            .timeout(CALL_TIMEOUT)
            .breaker(BREAKER_FAILURES, BREAKER_COOL_DOWN)
            .build()?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let base = settings.customer_url.trim_end_matches('/');
        let snapshot = HttpSource::new(http, format!("{base}{SNAPSHOT_PATH}"));
        Ok(Self { pool, client, snapshot })
    }

    /// Whether calls to the customer service are cut off by the open breaker.
    pub fn breaker_state(&self) -> BreakerState {
        self.client.breaker_state()
    }

    /// Checks that the customer exists: known to the replica, or else to the customer
    /// service. `422` when it does not exist, `503` when nobody can say.
    pub async fn require(&self, id: Uuid) -> Result<(), Problem> {
        if cached(&self.pool, id).await.map_err(unavailable)?.is_some() {
            return Ok(());
        }
        match self.client.get_json::<OwnerCustomer>(&format!("/customers/{id}")).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                let mut fields = Fields::new();
                fields.invalid("customer_id", format!("no customer {id}"));
                fields.finish()
            }
            Err(error) => {
                tracing::warn!(customer = %id, error = %dbps_core::ErrorChain(&error), "customer service unavailable");
                Err(Problem::unavailable().detail(
                    "the customer is not in the quote service's replica yet and the customer service cannot be asked",
                ))
            }
        }
    }

    /// The customer's details fresh from the customer service; when it cannot be asked
    /// (down, slow, or its breaker open), the replica's, marked `may_be_stale`.
    pub async fn fresh(&self, id: Uuid) -> Result<CustomerDetails, Problem> {
        match self.client.get_json::<OwnerCustomer>(&format!("/customers/{id}")).await {
            Ok(Some(owner)) => Ok(CustomerDetails {
                id: owner.id,
                name: owner.name,
                tax_number: owner.tax_number,
                source: Source::CustomerService,
                may_be_stale: false,
            }),
            Ok(None) => Err(Problem::not_found(format!("customer {id}"))),
            Err(error) => {
                tracing::warn!(customer = %id, error = %dbps_core::ErrorChain(&error), "answering from the replica");
                let cached = cached(&self.pool, id).await.map_err(unavailable)?;
                cached
                    .map(|details| CustomerDetails {
                        may_be_stale: true,
                        ..details
                    })
                    .ok_or_else(|| {
                        Problem::unavailable()
                            .detail("the customer service cannot be asked and the replica lacks the customer")
                    })
            }
        }
    }

    /// Fills the replica from the customer service's snapshot (retrying until it can),
    /// then waits for the service to stop: the event stream keeps the replica current.
    pub async fn backfill(self, stop: CancellationToken) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let replica = replica(&self.pool)?;
        let mut wait = Duration::from_millis(200);
        loop {
            match replica.backfill(&self.snapshot, BACKFILL_PAGE).await {
                Ok((applied, stale)) => {
                    tracing::info!(applied, stale, "customer replica backfilled");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, ?wait, "customer snapshot unavailable; trying again");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(10));
        }
        stop.cancelled().await;
        Ok(())
    }
}

fn unavailable(error: sqlx::Error) -> Problem {
    tracing::error!(%error, "reading the customer replica failed");
    Problem::unavailable()
}
