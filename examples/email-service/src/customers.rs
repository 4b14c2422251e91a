//! What the email service knows of customers: `customer_email_index {email, customer_id}`,
//! a replica of the customer service's events, backfilled from that service's snapshot —
//! and the late assignment of emails that arrived before their customer.
//!
//! The index holds one document per address, `_id` the address in lower case: a
//! customer created with an address adds its entry; a customer whose address changes
//! moves its entry (the new address is written, the old one removed). The replica is a
//! `dbps_cache::replica::MongoReplica`, guarded by the customer's version (the events'
//! sequence number), so a late or repeated event changes nothing.
//!
//! The customer service does not keep addresses unique. When two customers share one,
//! the index holds a single entry for it — the customer whose change the replica applied
//! last, unless that change's version is below the entry's — and emails from the address
//! go to that customer.
//!
//! # Late assignment
//!
//! An email whose sender the index does not know stays unassigned. [`IndexAndAssign`]
//! is the consumer's handler: it applies a batch of customer events to the replica, then
//! assigns the pending emails of every address the batch mentions, to whichever customer
//! the index now holds for it. The offsets are committed only after both, so a crash in
//! between redelivers the batch: the replica finds it stale and the assignment runs
//! again. The backfill ends with a sweep of every pending email, and the same sweep runs
//! periodically (`Settings::sweep_interval`) for anything a failure left behind.

use std::collections::BTreeSet;
use std::time::Duration;

use dbps_cache::replica::http::HttpSource;
use dbps_cache::replica::{Change, MongoReplica, Projection};
use dbps_core::{BatchHandler, CancellationToken, Envelope, HandlerError, MessageSet as _, Registry};
use example_customer_service::events::CustomerEvent;
use mongodb::Database;
use serde::{Deserialize, Serialize};

use crate::assign::{Assigner, normalize_address};
use crate::store::CUSTOMER_INDEX;

/// Where the customer service serves its snapshot for replicas.
pub const SNAPSHOT_PATH: &str = example_customer_service::SNAPSHOT_PATH;

/// Customers per snapshot page, when backfilling.
const BACKFILL_PAGE: usize = 500;

/// A customer as the customer service's events and snapshot carry it (other fields are
/// ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerAddress {
    /// The customer's email address.
    pub email: String,
}

/// One index document.
#[derive(Debug, Serialize)]
struct Entry<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    email: &'a str,
}

/// `customer_email_index`: one document per address, keyed by the address.
#[derive(Debug, Clone, Copy, Default)]
pub struct CustomerEmailIndex;

impl Projection for CustomerEmailIndex {
    type Events = CustomerEvent;
    type Snapshot = CustomerAddress;

    fn project(&self, event: CustomerEvent, _: &Envelope) -> Result<Change, HandlerError> {
        self.snapshot(CustomerAddress {
            email: address_of(event),
        })
    }

    fn snapshot(&self, state: CustomerAddress) -> Result<Change, HandlerError> {
        let address = normalize_address(&state.email);
        if address.is_empty() {
            return Ok(Change::Rows(Vec::new()));
        }
        Ok(Change::row(&Entry {
            id: &address,
            email: &address,
        })?)
    }
}

fn address_of(event: CustomerEvent) -> String {
    match event {
        CustomerEvent::Created(c) => c.email,
        CustomerEvent::Updated(c) => c.email,
    }
}

/// The replica over the service's database.
pub fn replica(database: &Database) -> Result<MongoReplica<CustomerEmailIndex>, dbps_cache::CacheError> {
    MongoReplica::builder(database.clone(), CUSTOMER_INDEX, CustomerEmailIndex)
        .aggregate_field("customer_id")
        .build()
}

/// The consumer's handler of the customer events: the replica, then the late
/// assignment of the addresses the events name (see the module documentation).
#[derive(Debug, Clone)]
pub struct IndexAndAssign {
    replica: MongoReplica<CustomerEmailIndex>,
    assigner: Assigner,
    registry: Registry,
}

impl IndexAndAssign {
    /// The handler over `replica` and `assigner`.
    pub fn new(replica: MongoReplica<CustomerEmailIndex>, assigner: Assigner) -> Self {
        Self {
            replica,
            assigner,
            registry: Registry::new(),
        }
    }
}

impl BatchHandler for IndexAndAssign {
    fn max_batch(&self) -> usize {
        self.replica.max_batch()
    }

    async fn handle_batch(&self, messages: &[Envelope]) -> Result<(), HandlerError> {
        self.replica.handle_batch(messages).await?;
        let addresses: BTreeSet<String> = messages
            .iter()
            .filter_map(|m| CustomerEvent::decode(&self.registry, m).ok())
            .map(|event| normalize_address(&address_of(event)))
            .filter(|address| !address.is_empty())
            .collect();
        for address in addresses {
            self.assigner
                .assign_pending(&address)
                .await
                .map_err(HandlerError::transient)?;
        }
        Ok(())
    }
}

/// Fills the replica from the customer service's snapshot at `customer_url` (retrying
/// until it can), assigns what the filled index allows, then waits for the service to
/// stop: the event stream keeps the replica current.
pub async fn backfill(
    replica: MongoReplica<CustomerEmailIndex>,
    assigner: Assigner,
    customer_url: &str,
    stop: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let base = customer_url.trim_end_matches('/');
    let source = HttpSource::new(http, format!("{base}{SNAPSHOT_PATH}"));
    let mut wait = Duration::from_millis(200);
    loop {
        match replica.backfill(&source, BACKFILL_PAGE).await {
            Ok((read, applied)) => {
                tracing::info!(read, applied, "customer email index backfilled");
                break;
            }
            Err(error) => tracing::warn!(%error, ?wait, "customer snapshot unavailable; trying again"),
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
    if let Err(error) = assigner.sweep().await {
        // The periodic sweep tries again.
        tracing::warn!(error = %dbps_core::ErrorChain(&error), "assigning pending emails after the backfill failed");
    }
    stop.cancelled().await;
    Ok(())
}

/// Every `interval`, assigns pending emails the index knows a customer for and removes
/// orphan attachment chunks, until the service stops. Failures are logged and tried
/// again at the next round.
pub async fn sweep_periodically(
    assigner: Assigner,
    interval: Duration,
    stop: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(error) = assigner.sweep().await {
            tracing::warn!(error = %dbps_core::ErrorChain(&error), "assignment sweep failed");
        }
        if let Err(error) = assigner.remove_orphan_chunks().await {
            tracing::warn!(%error, "removing orphan attachment chunks failed");
        }
    }
}
