//! `Idempotency-Key` for `POST` (and `PATCH`) endpoints: a client that did not hear the
//! answer sends the same request again with the same key, and gets the first answer
//! instead of a second effect.
//!
//! [`Idempotency`] is a layer over the service's routes, backed by the `dbps_idempotency`
//! table in the service's own database ([`MIGRATOR`], a migration component like the
//! outbox's):
//!
//! ```no_run
//! use axum::Router;
//! use axum::extract::DefaultBodyLimit;
//! use axum::routing::post;
//! use dbps_service::http::idempotency::{self, Idempotency};
//! use dbps_service::{Service, ServiceConfig};
//!
//! # async fn create_order() -> &'static str { "created" }
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut service = Service::new(ServiceConfig::from_env("orders")?);
//! let pool = service
//!     .postgres(&[(idempotency::COMPONENT, &idempotency::MIGRATOR) /* , ("orders", &MIGRATOR) */])
//!     .await?;
//! let keys = Idempotency::new(pool.clone());
//! // Keys older than the retention (24 hours) are removed once an hour.
//! let purge = keys.clone();
//! service.run("idempotency purge", move |stop| {
//!     purge.purge_periodically(std::time::Duration::from_secs(3600), stop)
//! });
//! let router = Router::new()
//!     .route("/orders", post(create_order))
//!     .layer(keys)
//!     // Outside the idempotency layer, so that it bounds the body the layer buffers.
//!     .layer(DefaultBodyLimit::max(64 * 1024));
//! service.serve(router).await?;
//! # Ok(()) }
//! ```
//!
//! # What a request with `Idempotency-Key` gets
//!
//! Keys are scoped by method and path: the same key on `POST /orders` and on
//! `POST /customers` names two operations. A request without the header, or with another
//! method, passes through untouched.
//!
//! | the key is | answer |
//! |---|---|
//! | not 1 to 255 visible ASCII characters, or sent twice | `400` problem; the handler does not run |
//! | new | the handler runs; its answer is stored if it is complete — not a 5xx, 408 or 429, which a retry may change — and returned |
//! | stored, same request | the stored answer again, byte for byte (status, body, `Content-Type`, `Location`, `ETag`), with `Idempotent-Replayed: true`; the handler does not run |
//! | stored or in progress, another request (query or body) | `422` problem |
//! | in progress (a duplicate arrived before the first answered) | `409` problem with `Retry-After: 1` |
//!
//! A request holds its key while its handler runs. If the handler fails with a 5xx,
//! panics, or the request is dropped (the client went away), the key is released, so a
//! retry runs the handler again. If the process dies meanwhile, the key stays claimed for
//! the lease ([`Idempotency::lease`], 60 seconds), after which a retry takes it over.
//!
//! The layer buffers the request body to fingerprint it, within the router's body limit
//! (`axum::extract::DefaultBodyLimit` applied outside this layer, or axum's default of
//! 2 MB): a larger body is a `413` problem.
//!
//! # Choosing keys
//!
//! A client makes one key per operation (a UUID) and sends it with every retry of that
//! operation. Keys are not tied to a client: two clients that use the same key on the same
//! endpoint get each other's answer, so keys must be unique, not counters.
//! [`ServiceClient::post_json`](crate::client::ServiceClient::post_json) retries a `POST`
//! only when it has a key.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, OriginalUri, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dbps_core::CancellationToken;
use dbps_core::classify::Classify as _;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tower::ServiceExt as _;
use uuid::Uuid;

use super::Problem;

/// The `dbps_idempotency` table's migrations. Apply them as a component of the service's
/// database, before the service's own: `service.postgres(&[(COMPONENT, &MIGRATOR), ...])`.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/idempotency");

/// The name of [`MIGRATOR`]'s component.
pub const COMPONENT: &str = "dbps_idempotency";

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header of a replayed answer (`true`).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// How long keys are kept by default: 24 hours.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a request may hold a key by default before a duplicate takes it over: 60
/// seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// The largest answer stored by default (1 MiB); a larger one is returned but not stored.
pub const DEFAULT_MAX_STORED_BYTES: usize = 1024 * 1024;

/// The headers of an answer that are stored and replayed with its status and body.
const STORED_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// The layer that makes `POST` and `PATCH` endpoints idempotent by `Idempotency-Key`; see
/// the [module documentation](self). Apply it with `router.layer(Idempotency::new(pool))`.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pool: PgPool,
    lease: Duration,
    retention: Duration,
    max_stored_bytes: usize,
}

impl Idempotency {
    /// Keys in the `dbps_idempotency` table of `pool` (the service's runtime pool).
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
            max_stored_bytes: DEFAULT_MAX_STORED_BYTES,
        }
    }

    /// How long a request may hold its key before a duplicate may take it over
    /// ([`DEFAULT_LEASE`]). Longer than any handler takes: a duplicate that takes over a
    /// key whose first request is still running runs the handler a second time.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long keys are kept by [`Idempotency::purge`] ([`DEFAULT_RETENTION`]): longer
    /// than clients retry.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The largest answer body that is stored ([`DEFAULT_MAX_STORED_BYTES`]). A larger
    /// answer is returned, but not stored: a duplicate runs the handler again.
    pub fn max_stored_bytes(mut self, limit: usize) -> Self {
        self.max_stored_bytes = limit;
        self
    }

    /// Deletes the keys older than the retention, returning how many.
    pub async fn purge(&self) -> Result<u64, sqlx::Error> {
        purge_older_than(&self.pool, self.retention).await
    }

    /// Purges every `every` (the first time at once) until `stop` is cancelled; for
    /// [`Service::run`](crate::Service::run). A transient database error is logged and
    /// the purge tried again next time; a permanent one (the table is missing) ends it.
    pub async fn purge_periodically(self, every: Duration, stop: CancellationToken) -> Result<(), sqlx::Error> {
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            match self.purge().await {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "idempotency keys purged"),
                Err(error) if error.is_transient() => {
                    tracing::warn!(error = %dbps_core::ErrorChain(&error), "idempotency keys could not be purged; trying again later");
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Deletes the idempotency keys in `pool`'s `dbps_idempotency` created longer than
/// `retention` ago, returning how many.
pub async fn purge_older_than(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("delete from dbps_idempotency where created_at < now() - $1::bigint * interval '1 microsecond'")
            .bind(micros(retention))
            .execute(pool)
            .await?;
    Ok(done.rows_affected())
}

/// A duration in microseconds, at most a century (an interval PostgreSQL can subtract).
fn micros(duration: Duration) -> i64 {
    const CENTURY: i64 = 100 * 366 * 24 * 3600 * 1_000_000;
    i64::try_from(duration.as_micros()).unwrap_or(CENTURY).min(CENTURY)
}

impl<S> tower::Layer<S> for Idempotency {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            settings: self.clone(),
        }
    }
}

/// The service of the [`Idempotency`] layer.
#[derive(Debug, Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    settings: Idempotency,
}

impl<S> tower::Service<Request> for IdempotencyService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The clone that was polled ready handles this request.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let settings = self.settings.clone();
        Box::pin(async move { Ok(handle(settings, ready, request).await) })
    }
}

async fn handle<S>(settings: Idempotency, inner: S, request: Request) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Send,
    S::Future: Send,
{
    if !matches!(*request.method(), Method::POST | Method::PATCH) {
        return run(inner, request).await;
    }
    let mut keys = request.headers().get_all(IDEMPOTENCY_KEY).into_iter();
    let Some(key) = keys.next() else {
        return run(inner, request).await;
    };
    let key = match (valid_key(key), keys.next()) {
        (Some(key), None) => key.to_owned(),
        _ => {
            return Problem::new(StatusCode::BAD_REQUEST)
                .detail("Idempotency-Key must be sent once, as 1 to 255 visible ASCII characters")
                .into_response();
        }
    };
    let path = request
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| request.uri().path().to_owned(), |uri| uri.path().to_owned());
    let scope = format!("{} {path}", request.method());
    let query = request.uri().query().unwrap_or_default().to_owned();
    let (parts, body) = request.into_parts();
    // Within the router's body limit (`DefaultBodyLimit`), as a handler's extractor would.
    let body = match Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await {
        Ok(body) => body,
        Err(rejection) => {
            return Problem::new(rejection.status())
                .detail(rejection.body_text())
                .into_response();
        }
    };
    let fingerprint = fingerprint(&query, &body);
    let mut claim = match settings.claim(&scope, &key, &fingerprint).await {
        Ok(Claimed::Ours(claim)) => claim,
        Ok(Claimed::Answered(stored)) => return stored.replay(),
        Ok(Claimed::OtherRequest) => {
            return Problem::new(StatusCode::UNPROCESSABLE_ENTITY)
                .detail("this Idempotency-Key was used with another request to this endpoint: use a new key for a new request")
                .into_response();
        }
        Ok(Claimed::InProgress) => {
            let mut response = Problem::new(StatusCode::CONFLICT)
                .detail("a request with this Idempotency-Key is in progress: retry later for its answer")
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Err(error) => {
            tracing::error!(error = %dbps_core::ErrorChain(&error), %scope, "idempotency key could not be claimed");
            return Problem::unavailable().into_response();
        }
    };
    let response = run(inner, Request::from_parts(parts, Body::from(body))).await;
    claim.finish(response, settings.max_stored_bytes).await
}

async fn run<S>(inner: S, request: Request) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    match inner.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// A key of 1 to 255 visible ASCII characters.
fn valid_key(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let valid = (1..=255).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    valid.then(|| value.to_str().ok()).flatten()
}

/// SHA-256 of the query string and the body: what a duplicate must repeat.
fn fingerprint(query: &str, body: &[u8]) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update((query.len() as u64).to_be_bytes());
    hash.update(query.as_bytes());
    hash.update(body);
    hash.finalize().to_vec()
}

/// What claiming a key found.
enum Claimed {
    /// The key is this request's: run the handler.
    Ours(Claim),
    /// The key's first request was answered.
    Answered(Stored),
    /// The key's first request is still running.
    InProgress,
    /// The key was used with another request.
    OtherRequest,
}

impl Idempotency {
    async fn claim(&self, scope: &str, key: &str, fingerprint: &[u8]) -> Result<Claimed, sqlx::Error> {
        let token = Uuid::now_v7();
        // A row deleted between the insert and the read (released after a 5xx, purged) is
        // claimed again.
        for _ in 0..3 {
            // New, or in progress beyond its lease with the same request: ours.
            let claimed: Option<(Uuid,)> = sqlx::query_as(
                "insert into dbps_idempotency (scope, key, request_hash, claim) values ($1, $2, $3, $4) \
                 on conflict (scope, key) do update set claim = excluded.claim, claimed_at = now() \
                 where dbps_idempotency.status is null \
                   and dbps_idempotency.request_hash = excluded.request_hash \
                   and dbps_idempotency.claimed_at < now() - $5::bigint * interval '1 microsecond' \
                 returning claim",
            )
            .bind(scope)
            .bind(key)
            .bind(fingerprint)
            .bind(token)
            .bind(micros(self.lease))
            .fetch_optional(&self.pool)
            .await?;
            if claimed.is_some() {
                return Ok(Claimed::Ours(Claim {
                    pool: self.pool.clone(),
                    scope: scope.to_owned(),
                    key: key.to_owned(),
                    token,
                    settled: false,
                }));
            }
            let row: Option<KeyRow> = sqlx::query_as(
                "select request_hash, status, headers, body from dbps_idempotency where scope = $1 and key = $2",
            )
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else {
                continue;
            };
            if row.request_hash != fingerprint {
                return Ok(Claimed::OtherRequest);
            }
            let Some(status) = row.status else {
                return Ok(Claimed::InProgress);
            };
            return Ok(Claimed::Answered(Stored {
                status: u16::try_from(status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                headers: row.headers,
                body: row.body.unwrap_or_default(),
            }));
        }
        Ok(Claimed::InProgress)
    }
}

/// A key's row, as a duplicate reads it.
#[derive(sqlx::FromRow)]
struct KeyRow {
    request_hash: Vec<u8>,
    status: Option<i16>,
    headers: Value,
    body: Option<Vec<u8>>,
}

/// A stored answer.
struct Stored {
    status: StatusCode,
    headers: Value,
    body: Vec<u8>,
}

impl Stored {
    fn replay(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        if let Value::Object(stored) = self.headers {
            for (name, value) in stored {
                let name = HeaderName::from_bytes(name.as_bytes());
                let value = value.as_str().map(HeaderValue::from_str);
                if let (Ok(name), Some(Ok(value))) = (name, value) {
                    headers.insert(name, value);
                }
            }
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

/// A key held by this request while its handler runs. Dropped before it is settled —
/// the handler panicked, or the request was dropped — it releases the key.
struct Claim {
    pool: PgPool,
    scope: String,
    key: String,
    token: Uuid,
    settled: bool,
}

impl Claim {
    /// Stores a complete answer, or releases the key for a retry.
    async fn finish(&mut self, response: Response, max_stored: usize) -> Response {
        let status = response.status();
        if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS
        {
            self.release().await;
            return response;
        }
        let (parts, body) = response.into_parts();
        let body = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(error = %dbps_core::ErrorChain(&error), scope = %self.scope, "the answer's body could not be read");
                self.release().await;
                return Problem::new(StatusCode::INTERNAL_SERVER_ERROR).into_response();
            }
        };
        if body.len() > max_stored {
            tracing::warn!(scope = %self.scope, bytes = body.len(), max_stored, "answer too large to store; a duplicate runs the handler again");
            self.release().await;
            return Response::from_parts(parts, Body::from(body));
        }
        let headers: Map<String, Value> = STORED_HEADERS
            .iter()
            .filter_map(|name| {
                let value = parts.headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), Value::from(value)))
            })
            .collect();
        let stored = sqlx::query(
            "update dbps_idempotency set status = $4, headers = $5, body = $6, completed_at = now() \
             where scope = $1 and key = $2 and claim = $3 and status is null",
        )
        .bind(&self.scope)
        .bind(&self.key)
        .bind(self.token)
        .bind(i16::try_from(status.as_u16()).unwrap_or(i16::MAX))
        .bind(Value::Object(headers))
        .bind(body.as_ref())
        .execute(&self.pool)
        .await;
        match stored {
            Ok(done) => {
                self.settled = true;
                if done.rows_affected() == 0 {
                    tracing::warn!(scope = %self.scope, "the idempotency key was taken over after its lease; this answer is not stored");
                }
            }
            Err(error) => {
                // Dropping the claim releases the key (or its lease ends).
                tracing::error!(error = %dbps_core::ErrorChain(&error), scope = %self.scope, "the answer could not be stored");
            }
        }
        Response::from_parts(parts, Body::from(body))
    }

    async fn release(&mut self) {
        self.settled = true;
        if let Err(error) = release(&self.pool, &self.scope, &self.key, self.token).await {
            tracing::error!(error = %dbps_core::ErrorChain(&error), scope = %self.scope, "the idempotency key could not be released; it is free again after its lease");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, scope, key, token) = (
            self.pool.clone(),
            std::mem::take(&mut self.scope),
            std::mem::take(&mut self.key),
            self.token,
        );
        runtime.spawn(async move {
            if let Err(error) = release(&pool, &scope, &key, token).await {
                tracing::error!(error = %dbps_core::ErrorChain(&error), %scope, "the idempotency key of a dropped request could not be released; it is free again after its lease");
            }
        });
    }
}

async fn release(pool: &PgPool, scope: &str, key: &str, token: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("delete from dbps_idempotency where scope = $1 and key = $2 and claim = $3 and status is null")
        .bind(scope)
        .bind(key)
        .bind(token)
        .execute(pool)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        for good in [
            "a",
            "0195f0a2-7c1e-7d4b-9a51-3c2f1e0d9b8a",
            &"k".repeat(255),
            "\"quoted\"",
            "~!",
        ] {
            assert!(
                valid_key(&HeaderValue::from_str(good).expect("header")).is_some(),
                "{good}"
            );
        }
        for bad in ["", " ", "two words", &"k".repeat(256), "tab\there"] {
            let value = HeaderValue::from_str(bad).expect("header");
            assert!(valid_key(&value).is_none(), "{bad:?}");
        }
        let latin = HeaderValue::from_bytes("schlüssel".as_bytes()).expect("header");
        assert!(valid_key(&latin).is_none());
    }

    #[test]
    fn the_fingerprint_covers_query_and_body() {
        assert_eq!(fingerprint("a=1", b"{}"), fingerprint("a=1", b"{}"));
        assert_ne!(fingerprint("a=1", b"{}"), fingerprint("a=2", b"{}"));
        assert_ne!(fingerprint("", b"{\"n\":1}"), fingerprint("", b"{\"n\":2}"));
        assert_ne!(fingerprint("ab", b""), fingerprint("a", b"b"));
    }

    #[test]
    fn durations_become_bounded_microseconds() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert!(micros(Duration::MAX) > 0);
    }
}
