//! Customer search: `GET /customers/search?q=<text>`, full text over names, email
//! addresses, addresses and machine history, answered from an OpenSearch projection of
//! the service's own events.
//!
//! The projection ([`CustomerSearch`], an [`OsProjection`]) runs inside the service beside
//! its relay. It reads `<customer>.customer.events` and keeps one document per customer:
//! `customer.CustomerCreated` and `customer.CustomerUpdated` carry the customer's whole
//! searchable state (its fields, addresses and machines; see [`crate::events`]), and each
//! is indexed with the customer's version as its external version, so an older event never
//! overwrites a newer document. Readers search the alias `<prefix>customers`; a new
//! version of the mappings is rebuilt into a fresh index and the alias switched.
//!
//! The answer says how fresh it is ([`SearchResults`]): the source time of the newest
//! event applied, and how long ago the projection had read everything there was.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use dbps_cache::CacheError;
use dbps_cache::projection::{DocChange, OsProjection, SearchModel};
use dbps_core::{Envelope, HandlerError};
use dbps_service::http::{Fields, Problem};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::events::CustomerEvent;
use crate::{Address, App, Machine};

/// The projection's name: its alias is `<prefix>customers`.
pub const SEARCH_NAME: &str = "customers";

/// The version of the search documents and mappings.
pub const SEARCH_VERSION: u32 = 1;

/// Longest query, in characters.
const MAX_QUERY: usize = 200;
/// Results unless the request says otherwise.
const DEFAULT_LIMIT: u32 = 20;
/// Most results.
const MAX_LIMIT: u32 = 100;

/// The search projection's declaration: one document per customer, from its events.
#[derive(Debug, Clone)]
pub struct CustomerSearch {
    topic: String,
}

impl CustomerSearch {
    /// The projection of the customer events on `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        Self { topic: topic.into() }
    }
}

/// A customer as search finds it: the document the projection keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerDocument {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
    /// Email address.
    pub email: String,
    /// The customer's version the document shows.
    pub version: i64,
    /// Addresses, oldest first.
    pub addresses: Vec<Address>,
    /// Machine history, oldest first.
    pub machines: Vec<Machine>,
}

impl SearchModel for CustomerSearch {
    type Events = CustomerEvent;

    fn name(&self) -> &str {
        SEARCH_NAME
    }

    fn version(&self) -> u32 {
        SEARCH_VERSION
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    fn mappings(&self) -> Value {
        let text = json!({"type": "text"});
        json!({
            "settings": {"number_of_shards": 1},
            "mappings": {
                // Everything is kept in the source; only these fields are searched.
                "dynamic": false,
                "properties": {
                    "id": {"type": "keyword"},
                    "name": text,
                    "tax_number": {"type": "keyword"},
                    "email": text,
                    "version": {"type": "long"},
                    "addresses": {"properties": {
                        "street": text, "city": text, "postal_code": text, "country": text,
                    }},
                    "machines": {"properties": {"machine": text, "installed_at": {"type": "date"}}},
                },
            },
        })
    }

    fn project(&self, event: CustomerEvent, _: &Envelope) -> Result<DocChange, HandlerError> {
        // Both events carry the customer's whole state.
        macro_rules! document {
            ($c:expr) => {
                CustomerDocument {
                    id: $c.id,
                    name: $c.name,
                    tax_number: $c.tax_number,
                    email: $c.email,
                    version: $c.version,
                    addresses: $c.addresses,
                    machines: $c.machines,
                }
            };
        }
        let document = match event {
            CustomerEvent::Created(c) => document!(c),
            CustomerEvent::Updated(c) => document!(c),
        };
        Ok(DocChange::index(&document)?)
    }
}

/// The query of `GET /customers/search`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// The words to find, 1 to 200 characters; every word must occur in the customer's
    /// name, email, an address or a machine.
    pub q: String,
    /// Most results: 1 to 100, default 20.
    pub limit: Option<u32>,
}

/// `GET /customers/search`: the customers found, best first, and how fresh the index is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResults {
    /// The customers found, best match first.
    pub results: Vec<CustomerDocument>,
    /// The source time of the newest event the index has applied: every change up to it
    /// is in the results. `None` before the index applied anything.
    pub as_of: Option<DateTime<Utc>>,
    /// Milliseconds since the index last had read every event there was (`None` if it
    /// never had): how much the results may miss at most.
    pub lag_ms: Option<u64>,
}

/// `GET /customers/search?q=&limit=`.
pub(crate) async fn search(
    State(app): State<App>,
    Query(query): Query<SearchQuery>,
) -> Result<Json<SearchResults>, Problem> {
    let mut fields = Fields::new();
    let text = fields.text("q", &query.q, MAX_QUERY).to_owned();
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        fields.invalid("limit", format!("must be 1 to {MAX_LIMIT}"));
    }
    fields.finish()?;
    let Some(projection) = app.search.as_ref() else {
        return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE).detail("customer search is not configured"));
    };
    let body = json!({
        "size": limit,
        "query": {"multi_match": {
            "query": text,
            "type": "cross_fields",
            "operator": "and",
            "fields": [
                "name^3", "email", "addresses.street", "addresses.city", "addresses.postal_code",
                "addresses.country", "machines.machine",
            ],
        }},
    });
    let reply = projection.search(&body).await.map_err(search_unavailable)?;
    let freshness = projection.freshness().await.map_err(search_unavailable)?;
    let results = reply["hits"]["hits"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|hit| serde_json::from_value(hit["_source"].clone()).ok())
        .collect();
    Ok(Json(SearchResults {
        results,
        as_of: freshness.applied_until,
        lag_ms: freshness
            .lag()
            .map(|lag| u64::try_from(lag.as_millis()).unwrap_or(u64::MAX)),
    }))
}

/// OpenSearch cannot answer (or the index is not built yet): `503`, logged without the
/// query.
fn search_unavailable(error: CacheError) -> Problem {
    let building =
        matches!(&error, CacheError::OpenSearch { kind: Some(kind), .. } if kind == "index_not_found_exception");
    if building {
        return Problem::new(StatusCode::SERVICE_UNAVAILABLE).detail("the search index is being built; retry later");
    }
    tracing::warn!(%error, "search failed");
    Problem::new(StatusCode::SERVICE_UNAVAILABLE).detail("search cannot answer now; retry later")
}

/// Builds the projection of `topic` in the OpenSearch cluster at `url`, its indices named
/// with `prefix`, its reader in a consumer group starting with `group_prefix`.
pub(crate) fn projection(
    url: &str,
    prefix: &str,
    topic: &str,
    group_prefix: &str,
) -> Result<OsProjection<CustomerSearch>, CacheError> {
    OsProjection::builder(url, CustomerSearch::new(topic))
        .index_prefix(prefix)
        .group_prefix(group_prefix)
        .build()
}
