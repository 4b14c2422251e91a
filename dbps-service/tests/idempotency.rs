//! `Idempotency-Key` on POST endpoints, against the real PostgreSQL: a duplicate gets the
//! first answer and the handler runs once; another request with the same key, a key in
//! use, an invalid key and an oversized body are problems; a 5xx is not stored; a dropped
//! request releases its key; an abandoned claim is taken over; old keys are purged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use dbps_core::CancellationToken;
use dbps_service::http::Problem;
use dbps_service::http::idempotency::{self, Idempotency};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::sync::{Notify, Semaphore};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The test service's own table of effects.
static EFFECTS: Migrator = sqlx::migrate!("tests/fixtures/effects");

#[derive(Debug, Serialize, Deserialize)]
struct NewOrder {
    item: String,
    qty: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: Uuid,
    item: String,
    qty: i64,
}

/// The endpoints' state: the pool, how often each handler ran, and the controls of the
/// `/slow` and `/flaky` endpoints.
#[derive(Clone)]
struct App {
    pool: PgPool,
    runs: Arc<AtomicUsize>,
    failures_left: Arc<AtomicUsize>,
    started: Arc<Notify>,
    gate: Arc<Semaphore>,
}

impl App {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn effect(app: &App, endpoint: &str, order: NewOrder) -> Result<impl IntoResponse + use<>, Problem> {
    let id = Uuid::now_v7();
    sqlx::query("insert into effects (id, endpoint, item, qty) values ($1, $2, $3, $4)")
        .bind(id)
        .bind(endpoint)
        .bind(&order.item)
        .bind(order.qty)
        .execute(&app.pool)
        .await
        .map_err(|_| Problem::unavailable())?;
    let location = HeaderValue::from_str(&format!("/{endpoint}/{id}")).map_err(|_| Problem::unavailable())?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(Order {
            id,
            item: order.item,
            qty: order.qty,
        }),
    ))
}

/// Creates an order; a quantity below 1 is a 422.
async fn create_order(State(app): State<App>, Json(order): Json<NewOrder>) -> Result<impl IntoResponse, Problem> {
    app.runs.fetch_add(1, Ordering::SeqCst);
    if order.qty < 1 {
        return Err(Problem::new(StatusCode::UNPROCESSABLE_ENTITY).detail("qty must be at least 1"));
    }
    effect(&app, "orders", order).await
}

/// Fails with 503 while `failures_left` lasts, then creates.
async fn flaky(State(app): State<App>, Json(order): Json<NewOrder>) -> Result<impl IntoResponse, Problem> {
    app.runs.fetch_add(1, Ordering::SeqCst);
    if app
        .failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(Problem::unavailable());
    }
    effect(&app, "flaky", order).await
}

/// Says it started, waits for a permit of the gate, then creates.
async fn slow(State(app): State<App>, Json(order): Json<NewOrder>) -> Result<impl IntoResponse, Problem> {
    app.runs.fetch_add(1, Ordering::SeqCst);
    app.started.notify_one();
    app.gate.acquire().await.map_err(|_| Problem::unavailable())?.forget();
    effect(&app, "slow", order).await
}

/// A test service (its own database, migrated with the idempotency component) serving the
/// endpoints behind the idempotency layer and a 1 KiB body limit.
struct Harness {
    test: dbps_testkit::TestService,
    app: App,
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Harness {
    async fn start() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_with(|keys| keys).await
    }

    async fn start_with(
        settings: impl FnOnce(Idempotency) -> Idempotency,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let test = dbps_testkit::service("idem")
            .component(idempotency::COMPONENT, &idempotency::MIGRATOR)
            .component("effects", &EFFECTS)
            .start()
            .await?;
        let app = App {
            pool: test.pool().clone(),
            runs: Arc::default(),
            failures_left: Arc::default(),
            started: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        };
        let router = Router::new()
            .route("/orders", post(create_order))
            .route("/flaky", post(flaky))
            .route("/slow", post(slow))
            .with_state(app.clone())
            .layer(settings(Idempotency::new(test.pool().clone())))
            .layer(DefaultBodyLimit::max(1024));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
        });
        Ok(Self {
            test,
            app,
            base,
            http: reqwest::Client::new(),
            stop,
        })
    }

    fn post(&self, path: &str, key: Option<&str>, body: &serde_json::Value) -> reqwest::RequestBuilder {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    }

    async fn effects(&self, endpoint: &str) -> Result<i64, sqlx::Error> {
        let (count,): (i64,) = sqlx::query_as("select count(*) from effects where endpoint = $1")
            .bind(endpoint)
            .fetch_one(self.test.pool())
            .await?;
        Ok(count)
    }

    async fn keys(&self) -> Result<i64, sqlx::Error> {
        let (count,): (i64,) = sqlx::query_as("select count(*) from dbps_idempotency")
            .fetch_one(self.test.pool())
            .await?;
        Ok(count)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An answer read whole.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    location: Option<String>,
    replayed: Option<String>,
    body: Vec<u8>,
}

async fn answer(response: reqwest::Response) -> Result<Answer, reqwest::Error> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (content_type, location, replayed) = (
        header("content-type"),
        header("location"),
        header("idempotent-replayed"),
    );
    Ok(Answer {
        status: response.status(),
        content_type,
        location,
        replayed,
        body: response.bytes().await?.to_vec(),
    })
}

fn order(item: &str, qty: i64) -> serde_json::Value {
    serde_json::json!({ "item": item, "qty": qty })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_post_gets_the_first_answer_and_the_handler_runs_once() -> TestResult {
    let h = Harness::start().await?;
    let key = Uuid::now_v7().to_string();
    let body = order("bolt", 3);

    let first = answer(h.post("/orders", Some(&key), &body).send().await?).await?;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.replayed, None);
    assert!(first.location.is_some());

    let again = answer(h.post("/orders", Some(&key), &body).send().await?).await?;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, first.body, "the same answer, byte for byte");
    assert_eq!(again.location, first.location);
    assert_eq!(again.content_type, first.content_type);
    assert_eq!(again.replayed.as_deref(), Some("true"));
    assert_eq!(h.app.runs(), 1, "the handler ran once");
    assert_eq!(h.effects("orders").await?, 1);

    // Keys are scoped by endpoint: the same key elsewhere is another operation.
    let elsewhere = answer(h.post("/flaky", Some(&key), &body).send().await?).await?;
    assert_eq!(elsewhere.status, StatusCode::CREATED);
    assert_eq!(elsewhere.replayed, None);
    assert_eq!(h.effects("flaky").await?, 1);

    // A client mistake is a complete answer too: stored, and replayed.
    let invalid_key = Uuid::now_v7().to_string();
    let refused = answer(h.post("/orders", Some(&invalid_key), &order("bolt", 0)).send().await?).await?;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let refused_again = answer(h.post("/orders", Some(&invalid_key), &order("bolt", 0)).send().await?).await?;
    assert_eq!(refused_again.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused_again.body, refused.body);
    assert_eq!(refused_again.content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(refused_again.replayed.as_deref(), Some("true"));
    assert_eq!(h.app.runs(), 3, "orders twice (one refused), flaky once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_request_is_a_422() -> TestResult {
    let h = Harness::start().await?;
    let key = Uuid::now_v7().to_string();
    let first = h.post("/orders", Some(&key), &order("bolt", 3)).send().await?;
    assert_eq!(first.status(), StatusCode::CREATED);

    let other_body = answer(h.post("/orders", Some(&key), &order("bolt", 4)).send().await?).await?;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other_body.content_type.as_deref(), Some("application/problem+json"));
    let problem: serde_json::Value = serde_json::from_slice(&other_body.body)?;
    assert_eq!(problem["status"], 422);

    let other_query = h
        .post("/orders?priority=high", Some(&key), &order("bolt", 3))
        .send()
        .await?;
    assert_eq!(other_query.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h.app.runs(), 1);
    assert_eq!(h.effects("orders").await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_key_run_every_time() -> TestResult {
    let h = Harness::start().await?;
    for _ in 0..3 {
        let response = answer(h.post("/orders", None, &order("bolt", 3)).send().await?).await?;
        assert_eq!(response.status, StatusCode::CREATED);
        assert_eq!(response.replayed, None);
    }
    assert_eq!(h.app.runs(), 3);
    assert_eq!(h.effects("orders").await?, 3);
    assert_eq!(h.keys().await?, 0, "nothing is stored without a key");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_answer_is_not_stored_and_a_retry_runs_the_handler() -> TestResult {
    let h = Harness::start().await?;
    h.app.failures_left.store(1, Ordering::SeqCst);
    let key = Uuid::now_v7().to_string();
    let body = order("nut", 2);

    let failed = h.post("/flaky", Some(&key), &body).send().await?;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.keys().await?, 0, "the key was released");

    let retried = answer(h.post("/flaky", Some(&key), &body).send().await?).await?;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert_eq!(retried.replayed, None);
    assert_eq!(h.app.runs(), 2, "the retry ran the handler");

    let duplicate = answer(h.post("/flaky", Some(&key), &body).send().await?).await?;
    assert_eq!(duplicate.body, retried.body);
    assert_eq!(duplicate.replayed.as_deref(), Some("true"));
    assert_eq!(h.app.runs(), 2);
    assert_eq!(h.effects("flaky").await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_key_is_a_400() -> TestResult {
    let h = Harness::start().await?;
    let long = "k".repeat(256);
    let invalid = [
        HeaderValue::from_static(""),
        HeaderValue::from_static("two words"),
        HeaderValue::from_str(&long)?,
        HeaderValue::from_bytes("schlüssel".as_bytes())?,
    ];
    for key in invalid {
        let response = h
            .http
            .post(format!("{}/orders", h.base))
            .header("idempotency-key", key.clone())
            .json(&order("bolt", 1))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{key:?}");
        let problem: serde_json::Value = response.json().await?;
        assert_eq!(problem["status"], 400, "{key:?}");
    }
    let twice = h
        .http
        .post(format!("{}/orders", h.base))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .json(&order("bolt", 1))
        .send()
        .await?;
    assert_eq!(twice.status(), StatusCode::BAD_REQUEST);
    // The longest valid key is accepted.
    let longest = h.post("/orders", Some(&long[1..]), &order("bolt", 1)).send().await?;
    assert_eq!(longest.status(), StatusCode::CREATED);
    assert_eq!(h.app.runs(), 1, "only the valid request ran");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_router_limit_is_a_413() -> TestResult {
    let h = Harness::start().await?;
    let response = h
        .post("/orders", Some("big-1"), &order(&"x".repeat(2000), 1))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    assert_eq!(h.app.runs(), 0);
    assert_eq!(h.keys().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_while_the_first_is_in_progress_is_a_409() -> TestResult {
    let h = Harness::start().await?;
    let key = Uuid::now_v7().to_string();
    let body = order("washer", 5);

    let first = tokio::spawn(h.post("/slow", Some(&key), &body).send());
    h.app.started.notified().await;

    let duplicate = h.post("/slow", Some(&key), &body).send().await?;
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert_eq!(
        duplicate.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );

    h.app.gate.add_permits(1);
    let first = answer(first.await??).await?;
    assert_eq!(first.status, StatusCode::CREATED);

    let later = answer(h.post("/slow", Some(&key), &body).send().await?).await?;
    assert_eq!(later.body, first.body);
    assert_eq!(later.replayed.as_deref(), Some("true"));
    assert_eq!(h.app.runs(), 1);
    assert_eq!(h.effects("slow").await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_by_its_client_releases_its_key() -> TestResult {
    let h = Harness::start().await?;
    let key = Uuid::now_v7().to_string();
    let body = order("washer", 5);

    let abandoned = tokio::spawn(h.post("/slow", Some(&key), &body).send());
    h.app.started.notified().await;
    assert_eq!(h.keys().await?, 1, "the key is held while the handler runs");
    // The client goes away; the server drops the request, and with it the claim.
    abandoned.abort();
    dbps_testkit::eventually("the dropped request's key to be released", || async {
        Ok::<_, sqlx::Error>(h.keys().await? == 0)
    })
    .await?;

    h.app.gate.add_permits(1);
    let retried = answer(h.post("/slow", Some(&key), &body).send().await?).await?;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert_eq!(retried.replayed, None);
    assert_eq!(h.app.runs(), 2);
    assert_eq!(h.effects("slow").await?, 1, "the dropped request had no effect");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_held_beyond_its_lease_is_taken_over() -> TestResult {
    let h = Harness::start_with(|keys| keys.lease(Duration::from_secs(30))).await?;
    let key = Uuid::now_v7().to_string();
    let body = order("gear", 1);

    // The first request holds the key, as a process that died mid-request would.
    let stuck = tokio::spawn(h.post("/slow", Some(&key), &body).send());
    h.app.started.notified().await;
    sqlx::query("update dbps_idempotency set claimed_at = now() - interval '1 minute'")
        .execute(h.test.pool())
        .await?;

    // A duplicate after the lease takes the key over and runs the handler.
    let takeover = tokio::spawn(h.post("/slow", Some(&key), &body).send());
    h.app.started.notified().await;
    h.app.gate.add_permits(2);
    let takeover = answer(takeover.await??).await?;
    assert_eq!(takeover.status, StatusCode::CREATED);
    let stuck = answer(stuck.await??).await?;
    assert_eq!(
        stuck.status,
        StatusCode::CREATED,
        "the first request still gets its answer"
    );

    // The answer kept is the one of the request that held the key when it finished.
    let later = answer(h.post("/slow", Some(&key), &body).send().await?).await?;
    assert_eq!(later.replayed.as_deref(), Some("true"));
    assert_eq!(later.body, takeover.body);
    assert_ne!(later.body, stuck.body);
    assert_eq!(h.app.runs(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_older_than_the_retention_are_purged() -> TestResult {
    let h = Harness::start().await?;
    let (old, recent) = (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());
    let body = order("bolt", 1);
    for key in [&old, &recent] {
        assert_eq!(
            h.post("/orders", Some(key), &body).send().await?.status(),
            StatusCode::CREATED
        );
    }
    sqlx::query("update dbps_idempotency set created_at = now() - interval '25 hours' where key = $1")
        .bind(&old)
        .execute(h.test.pool())
        .await?;

    let purged = idempotency::purge_older_than(h.test.pool(), idempotency::DEFAULT_RETENTION).await?;
    assert_eq!(purged, 1);
    assert_eq!(h.keys().await?, 1);

    // The purged key is new again; the recent one still replays.
    let reused = answer(h.post("/orders", Some(&old), &body).send().await?).await?;
    assert_eq!(reused.replayed, None);
    let replayed = answer(h.post("/orders", Some(&recent), &body).send().await?).await?;
    assert_eq!(replayed.replayed.as_deref(), Some("true"));
    assert_eq!(h.effects("orders").await?, 3);

    // The periodic purge, as a service runs it, with a retention of its own.
    sqlx::query("update dbps_idempotency set created_at = now() - interval '2 hours'")
        .execute(h.test.pool())
        .await?;
    let stop = CancellationToken::new();
    let keys = Idempotency::new(h.test.pool().clone()).retention(Duration::from_secs(3600));
    let purging = tokio::spawn(keys.purge_periodically(Duration::from_secs(3600), stop.clone()));
    dbps_testkit::eventually("the periodic purge", || async {
        Ok::<_, sqlx::Error>(h.keys().await? == 0)
    })
    .await?;
    stop.cancel();
    purging.await??;
    Ok(())
}
