//! The paged snapshot of the customers, for the replicas of other services to backfill,
//! re-fetch and reconcile from (`dbps_cache::replica`).
//!
//! Served under [`SNAPSHOT_PATH`] by `dbps_cache::replica::http::snapshot_router`; a
//! replica reads it with `HttpSource::new(client, "http://customer:8080/snapshot/customers")`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /snapshot/customers?after=<id>&limit=<n>` | `{"records": [record, ...], "next": "<id>" or null}` |
//! | `GET /snapshot/customers/records/{id}` | one record, or `404` |
//! | `GET /snapshot/customers/digests` | `[{"bucket", "count", "digest"}, ...]` (reconciliation) |
//! | `GET /snapshot/customers/entries?buckets=3,17` | `[["<id>", version], ...]` |
//!
//! A record is
//!
//! ```json
//! {"aggregate_id": "<id>", "sequence": 3,
//!  "state": {"id": "<id>", "name": "Ada Lovelace", "tax_number": "GB-1815",
//!            "email": "ada@example.com", "version": 3}}
//! ```
//!
//! `sequence` is the customer's version, the sequence number of its latest event, and
//! `state` is the payload of `customer.CustomerCreated` and `customer.CustomerUpdated` at
//! that version: a projection decodes it with the event's type (or any type with a subset
//! of its fields) and maps it as it maps the events. Pages are in id order; `limit`
//! defaults to 1,000 and is at most 5,000; `next` is the id to pass as `after` for the
//! following page, `null` on the last one.

use axum::Router;
use axum::extract::{Query, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dbps_cache::replica::PgSnapshotSource;
use dbps_cache::replica::http::snapshot_router;
use dbps_service::http::Problem;
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Where the service serves its snapshot; a replica's `HttpSource` takes the service's base
/// URL followed by this path.
pub const SNAPSHOT_PATH: &str = "/snapshot/customers";

/// A record's state: the fields of `CustomerCreated` and `CustomerUpdated`.
const STATE: &str = "jsonb_build_object('id', t.id, 'name', t.name, 'tax_number', t.tax_number, \
                     'email', t.email, 'version', t.version)";

/// The customers as a snapshot source: id, version as sequence, and the events' fields as
/// state. (A replica in the same process, or a test, may read it without HTTP.)
pub fn snapshot_source(pool: PgPool) -> Result<PgSnapshotSource, dbps_cache::CacheError> {
    Ok(PgSnapshotSource::new(pool, "customers", "id", "version")?.state(STATE))
}

/// The snapshot routes, to nest under [`SNAPSHOT_PATH`]. Ids that are not customer ids
/// are refused as `400` problems before they reach the database.
pub(crate) fn routes(source: PgSnapshotSource) -> Router {
    snapshot_router(source).layer(axum::middleware::from_fn(check_ids))
}

#[derive(Debug, Deserialize)]
struct After {
    after: Option<String>,
}

fn not_an_id(what: &str) -> Response {
    Problem::new(StatusCode::BAD_REQUEST)
        .detail(format!("{what} must be a customer id (a UUID)"))
        .into_response()
}

/// Refuses an `after` or a record id that is not a UUID (the database would fail to
/// compare it with the id column, a server error instead of the client's).
async fn check_ids(request: Request, next: Next) -> Response {
    if let Some(id) = request.uri().path().strip_prefix("/records/")
        && Uuid::parse_str(id).is_err()
    {
        return not_an_id("the record id");
    }
    if let Ok(Query(After { after: Some(after) })) = Query::<After>::try_from_uri(request.uri())
        && Uuid::parse_str(&after).is_err()
    {
        return not_an_id("after");
    }
    next.run(request).await
}
