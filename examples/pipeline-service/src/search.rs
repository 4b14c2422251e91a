//! The quotes index: one OpenSearch document per quote, for searching quotes and
//! aggregating them (by status, by customer) where the warehouse's SQL is not the tool —
//! full text over the reasons, free combinations of filters.
//!
//! It is a search projection (`dbps_cache::projection::OsProjection`): versioned indices
//! `<prefix>quotes_v<n>` behind the alias `<prefix>quotes`, the document of a quote
//! versioned by the quote's sequence number, so a late or duplicated event changes
//! nothing. A document is whole in every event it comes from: `quote.QuoteCreated` makes
//! it (status `New`, the value of its lines) and every `quote.QuoteStatusChanged` replaces
//! it (status, reason, value, purchase order), each carrying every field of the document.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use dbps_cache::CacheError;
use dbps_cache::projection::{DocChange, OsProjection, SearchModel};
use dbps_core::{Envelope, HandlerError, message_set};
use dbps_service::http::Problem;
use example_contracts::quote::{QuoteCreated, QuoteStatusChanged};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::warehouse::NEW;

/// The projection's name: the alias after the prefix.
pub const QUOTES_INDEX: &str = "quotes";

/// Most hits of one search.
const MAX_SIZE: u64 = 100;
/// Hits of a search that does not say.
const DEFAULT_SIZE: u64 = 20;
/// Most customers in the aggregation by customer.
const TOP_CUSTOMERS: u64 = 10;

message_set! {
    /// What the quotes index follows on the quote events.
    #[derive(Debug, Clone)]
    pub enum QuoteDocuments {
        /// A quote was created.
        Created(QuoteCreated),
        /// A quote's status changed.
        StatusChanged(QuoteStatusChanged),
    }
}

/// Version `version` of the quotes index, reading the quote events topic.
#[derive(Debug, Clone)]
pub struct QuoteSearch {
    version: u32,
    topic: String,
}

impl QuoteSearch {
    /// The declaration of version `version`, reading `topic`.
    pub fn new(version: u32, topic: impl Into<String>) -> Self {
        Self {
            version,
            topic: topic.into(),
        }
    }
}

impl SearchModel for QuoteSearch {
    type Events = QuoteDocuments;

    fn name(&self) -> &str {
        QUOTES_INDEX
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    fn mappings(&self) -> Value {
        json!({
            "settings": { "number_of_shards": 1 },
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "quote_id": { "type": "keyword" },
                    "customer_id": { "type": "keyword" },
                    "status": { "type": "keyword" },
                    "reason": { "type": "text", "analyzer": "english" },
                    "value_cents": { "type": "long" },
                    "purchase_order_id": { "type": "keyword" },
                    "updated_at": { "type": "date" },
                }
            }
        })
    }

    fn project(&self, event: QuoteDocuments, envelope: &Envelope) -> Result<DocChange, HandlerError> {
        let document = match event {
            QuoteDocuments::Created(quote) => QuoteDocument {
                quote_id: quote.quote_id,
                customer_id: quote.customer_id,
                status: NEW.to_owned(),
                reason: None,
                value_cents: quote.lines.iter().fold(0i64, |sum, l| {
                    sum.saturating_add(l.quantity.saturating_mul(l.unit_price_cents))
                }),
                purchase_order_id: None,
                updated_at: envelope.occurred_at,
            },
            QuoteDocuments::StatusChanged(changed) => QuoteDocument {
                quote_id: changed.quote_id,
                customer_id: changed.customer_id,
                status: changed.status,
                reason: changed.reason,
                value_cents: changed.total_cents,
                purchase_order_id: changed.purchase_order_id,
                updated_at: envelope.occurred_at,
            },
        };
        Ok(DocChange::index(&document)?)
    }
}

/// A quote as the index holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteDocument {
    /// The quote.
    pub quote_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// Its status (`New` until its first change).
    pub status: String,
    /// Why it has its status, when it says.
    pub reason: Option<String>,
    /// Its value, in cents.
    pub value_cents: i64,
    /// Its purchase order, once ordered.
    pub purchase_order_id: Option<Uuid>,
    /// The time of the event it is as of.
    pub updated_at: DateTime<Utc>,
}

/// Where the quotes index lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchSettings {
    /// The OpenSearch cluster (`http://host:port`).
    pub url: String,
    /// The prefix of the index and alias names (`pipeline-` by default).
    pub index_prefix: String,
}

/// The quotes index of a warehouse: how to build its projection of a version.
#[derive(Debug, Clone)]
pub(crate) struct QuoteIndex {
    settings: SearchSettings,
    topic: String,
}

impl QuoteIndex {
    pub(crate) fn new(settings: SearchSettings, topic: String) -> Self {
        Self { settings, topic }
    }

    pub(crate) fn projection(
        &self,
        version: u32,
        max_batch: usize,
        group_prefix: &str,
        progress: Option<impl Fn(dbps_cache::projection::RebuildProgress) + Send + Sync + 'static>,
    ) -> Result<OsProjection<QuoteSearch>, CacheError> {
        let mut builder = OsProjection::builder(&self.settings.url, QuoteSearch::new(version, &self.topic))
            .index_prefix(&self.settings.index_prefix)
            .max_batch(max_batch)
            .group_prefix(group_prefix);
        if let Some(progress) = progress {
            builder = builder.on_progress(progress);
        }
        builder.build()
    }
}

/// `GET /search/quotes`: matching quotes, how many, and their aggregations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuoteSearchResult {
    /// Quotes that match, in all.
    pub total: u64,
    /// The best matches (by relevance with `q`, else the most recently changed first).
    pub hits: Vec<QuoteDocument>,
    /// The matching quotes per status: count and value.
    pub by_status: Vec<Bucket>,
    /// The matching quotes of the customers with the most of them: count and value.
    pub by_customer: Vec<Bucket>,
    /// How fresh the index is.
    pub freshness: SearchFreshness,
}

/// One bucket of an aggregation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bucket {
    /// The status or the customer.
    pub key: String,
    /// Quotes.
    pub quotes: i64,
    /// Their value, in cents.
    pub value_cents: i64,
}

/// How fresh the quotes index is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchFreshness {
    /// The version the alias serves.
    pub version: Option<u32>,
    /// The source time of the newest event applied.
    pub newest_event_at: Option<DateTime<Utc>>,
    /// When the index last had nothing more to read.
    pub current_at: Option<DateTime<Utc>>,
}

/// The search endpoint's state: the projection of the version the service started with
/// (its alias and checkpoints are those of whichever version serves).
pub(crate) type SearchState = Option<OsProjection<QuoteSearch>>;

/// `GET /search/quotes?q=&status=&customer_id=&size=`.
pub(crate) async fn search_quotes(
    State(index): State<SearchState>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<QuoteSearchResult>, Problem> {
    let mut errors = Vec::new();
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, value) in &params {
        if !["q", "status", "customer_id", "size"].contains(&name.as_str()) {
            errors
                .push(json!({ "parameter": name, "detail": "unknown parameter; known: q, status, customer_id, size" }));
        } else if seen.insert(name, value).is_some() {
            errors.push(json!({ "parameter": name, "detail": "given more than once" }));
        }
    }
    let text = seen.get("q").map(|q| q.trim()).filter(|q| !q.is_empty());
    if text.is_some_and(|q| q.chars().count() > 200) {
        errors.push(json!({ "parameter": "q", "detail": "must have at most 200 characters" }));
    }
    let status = seen.get("status").map(|s| s.trim());
    let customer = match seen.get("customer_id").map(|c| c.trim().parse::<Uuid>()) {
        None => None,
        Some(Ok(customer)) => Some(customer),
        Some(Err(_)) => {
            errors.push(json!({ "parameter": "customer_id", "detail": "must be a UUID" }));
            None
        }
    };
    let size = match seen.get("size").map(|s| s.trim().parse::<u64>()) {
        None => DEFAULT_SIZE,
        Some(Ok(size)) if size <= MAX_SIZE => size,
        Some(_) => {
            errors
                .push(json!({ "parameter": "size", "detail": format!("must be a whole number from 0 to {MAX_SIZE}") }));
            DEFAULT_SIZE
        }
    };
    if !errors.is_empty() {
        return Err(Problem::new(StatusCode::BAD_REQUEST)
            .title("Invalid search parameters")
            .detail("the search's parameters are invalid")
            .with("errors", errors));
    }
    let Some(index) = index else {
        return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE)
            .title("Search is not configured")
            .detail("this pipeline keeps no quotes index (no OpenSearch configured)"));
    };

    let mut filter = Vec::new();
    if let Some(status) = status {
        filter.push(json!({ "term": { "status": status } }));
    }
    if let Some(customer) = customer {
        filter.push(json!({ "term": { "customer_id": customer } }));
    }
    let must = match text {
        Some(text) => json!([{ "multi_match": { "query": text, "fields": ["reason"] } }]),
        None => json!([{ "match_all": {} }]),
    };
    let mut body = json!({
        "size": size,
        "track_total_hits": true,
        "query": { "bool": { "must": must, "filter": filter } },
        "aggs": {
            "by_status": {
                "terms": { "field": "status", "size": 50, "order": { "_key": "asc" } },
                "aggs": { "value": { "sum": { "field": "value_cents" } } }
            },
            "by_customer": {
                "terms": { "field": "customer_id", "size": TOP_CUSTOMERS },
                "aggs": { "value": { "sum": { "field": "value_cents" } } }
            }
        }
    });
    if text.is_none() {
        body["sort"] = json!([{ "updated_at": "desc" }, { "quote_id": "asc" }]);
    }
    let reply = index.search(&body).await.map_err(search_failed)?;
    let freshness = index.freshness().await.map_err(search_failed)?;
    let hits = reply["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|hit| serde_json::from_value(hit["_source"].clone()).ok())
        .collect();
    Ok(Json(QuoteSearchResult {
        total: reply["hits"]["total"]["value"].as_u64().unwrap_or_default(),
        hits,
        by_status: buckets(&reply["aggregations"]["by_status"]),
        by_customer: buckets(&reply["aggregations"]["by_customer"]),
        freshness: SearchFreshness {
            version: freshness.version,
            newest_event_at: freshness.applied_until,
            current_at: freshness.current_at,
        },
    }))
}

fn buckets(aggregation: &Value) -> Vec<Bucket> {
    aggregation["buckets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| Bucket {
            key: b["key"].as_str().unwrap_or_default().to_owned(),
            quotes: b["doc_count"].as_i64().unwrap_or_default(),
            value_cents: b["value"]["value"].as_f64().unwrap_or_default().round() as i64,
        })
        .collect()
}

fn search_failed(error: CacheError) -> Problem {
    if let CacheError::OpenSearch { kind: Some(kind), .. } = &error
        && kind == "index_not_found_exception"
    {
        return Problem::unavailable()
            .title("The quotes index is being built")
            .detail("the quotes index has not been built from the event history yet; retry later");
    }
    tracing::error!(%error, "search failed");
    Problem::unavailable()
}
