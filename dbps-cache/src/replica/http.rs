//! The snapshot over HTTP: the owner serves its [`SnapshotSource`] with
//! [`snapshot_router`], and a replica's service reads it with [`HttpSource`].
//!
//! | route | answer |
//! |---|---|
//! | `GET ?after=<id>&limit=<n>` (the base itself) | a [`SnapshotPage`] |
//! | `GET /records/{id}` | a [`SnapshotRecord`], or `404` |
//! | `GET /digests` | the [`BucketDigest`]s |
//! | `GET /entries?buckets=3,17` | `[[id, sequence], ...]` of those buckets |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::{BucketDigest, SnapshotPage, SnapshotRecord, SnapshotSource};
use crate::error::{CacheError, Result};

/// The largest page the router serves, whatever is asked.
pub const MAX_PAGE: usize = 5_000;

/// Routes that serve `source` (nest them, e.g. under `/snapshot/customers`).
pub fn snapshot_router<S: SnapshotSource + 'static>(source: S) -> Router {
    Router::new()
        .route("/", get(page::<S>))
        .route("/records/{id}", get(record::<S>))
        .route("/digests", get(digests::<S>))
        .route("/entries", get(entries::<S>))
        .with_state(Arc::new(source))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct EntriesQuery {
    buckets: String,
}

fn failure(error: &CacheError) -> Response {
    let status = if error.is_transient() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    tracing::error!(error = %dbps_core::ErrorChain(error), "snapshot request failed");
    (
        status,
        Json(serde_json::json!({ "title": "snapshot unavailable", "status": status.as_u16() })),
    )
        .into_response()
}

async fn page<S: SnapshotSource>(State(source): State<Arc<S>>, Query(query): Query<PageQuery>) -> Response {
    let limit = query.limit.unwrap_or(1_000).clamp(1, MAX_PAGE);
    match source.page(query.after.as_deref(), limit).await {
        Ok(page) => Json(page).into_response(),
        Err(error) => failure(&error),
    }
}

async fn record<S: SnapshotSource>(State(source): State<Arc<S>>, Path(id): Path<String>) -> Response {
    match source.get(&id).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(error) => failure(&error),
    }
}

async fn digests<S: SnapshotSource>(State(source): State<Arc<S>>) -> Response {
    match source.digests().await {
        Ok(digests) => Json(digests).into_response(),
        Err(error) => failure(&error),
    }
}

async fn entries<S: SnapshotSource>(State(source): State<Arc<S>>, Query(query): Query<EntriesQuery>) -> Response {
    let buckets: std::result::Result<Vec<u16>, _> = query
        .buckets
        .split(',')
        .filter(|b| !b.is_empty())
        .map(str::parse)
        .collect();
    let Ok(buckets) = buckets else {
        return (StatusCode::BAD_REQUEST, "buckets: a comma-separated list of numbers").into_response();
    };
    match source.entries(&buckets).await {
        Ok(entries) => Json(entries).into_response(),
        Err(error) => failure(&error),
    }
}

/// A [`SnapshotSource`] read from an owner's [`snapshot_router`] at `base` (the URL the
/// router is nested at, e.g. `http://customer:8080/snapshot/customers`).
#[derive(Debug, Clone)]
pub struct HttpSource {
    client: reqwest::Client,
    base: String,
}

impl HttpSource {
    /// A source at `base`, read with `client` (which carries timeouts and TLS settings).
    pub fn new(client: reqwest::Client, base: impl Into<String>) -> Self {
        Self {
            client,
            base: base.into().trim_end_matches('/').to_owned(),
        }
    }

    /// GETs `url`; `None` on `404` when `absent_ok`, an error on any other failure.
    async fn fetch<T: serde::de::DeserializeOwned>(
        &self,
        url: String,
        query: &[(&str, String)],
        absent_ok: bool,
    ) -> Result<Option<T>> {
        let error = |source| CacheError::Http {
            url: url.clone(),
            source,
        };
        let response = self.client.get(&url).query(query).send().await.map_err(error)?;
        if absent_ok && response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = response.error_for_status().map_err(error)?;
        response.json().await.map(Some).map_err(error)
    }
}

impl SnapshotSource for HttpSource {
    async fn page(&self, after: Option<&str>, limit: usize) -> Result<SnapshotPage> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        Ok(self.fetch(self.base.clone(), &query, false).await?.unwrap_or_default())
    }

    async fn get(&self, aggregate_id: &str) -> Result<Option<SnapshotRecord>> {
        let mut url =
            reqwest::Url::parse(&format!("{}/records/", self.base)).map_err(|e| CacheError::InvalidConfig {
                setting: "snapshot url",
                reason: e.to_string(),
            })?;
        url.path_segments_mut()
            .map_err(|()| CacheError::InvalidConfig {
                setting: "snapshot url",
                reason: String::from("cannot be a base"),
            })?
            .pop_if_empty()
            .push(aggregate_id);
        self.fetch(url.to_string(), &[], true).await
    }

    async fn digests(&self) -> Result<Vec<BucketDigest>> {
        Ok(self
            .fetch(format!("{}/digests", self.base), &[], false)
            .await?
            .unwrap_or_default())
    }

    async fn entries(&self, buckets: &[u16]) -> Result<Vec<(String, i64)>> {
        let list: Vec<String> = buckets.iter().map(u16::to_string).collect();
        let query = [("buckets", list.join(","))];
        Ok(self
            .fetch(format!("{}/entries", self.base), &query, false)
            .await?
            .unwrap_or_default())
    }
}
