//! `ServiceClient` against real HTTP servers on 127.0.0.1: JSON, 404, problems, retries of
//! idempotent calls only, timeouts, the circuit breaker across a target's outage, metrics
//! and the trace context.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use dbps_core::CancellationToken;
use dbps_service::client::{BreakerState, ClientError, ServiceClient};
use dbps_service::http::{Fields, Problem};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A server on 127.0.0.1 until `stop`.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(router: Router) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().map_err(std::io::Error::other)?, router).await
    }

    async fn start_on(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
        });
        Ok(Self { addr, stop, task })
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, closes its connections and releases the port.
    async fn stop(self) -> TestResult {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Customer {
    id: String,
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct NewCustomer {
    name: String,
    email: String,
}

/// Counts the requests a route got.
#[derive(Clone, Default)]
struct Hits(Arc<AtomicUsize>);

impl Hits {
    fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The `Idempotency-Key` of each request a route got.
type SeenKeys = Arc<Mutex<Vec<Option<String>>>>;

/// A client that does not open its breaker in tests that are about something else.
fn client(target: &str, base: &str) -> dbps_service::client::ServiceClientBuilder {
    ServiceClient::builder(target, base)
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
        .breaker(1000, Duration::from_secs(60))
}

fn customers() -> Router {
    Router::new()
        .route(
            "/customers/{id}",
            get(|Path(id): Path<String>| async move {
                if id == "7" {
                    Json(Customer {
                        id,
                        name: String::from("Ada"),
                    })
                    .into_response()
                } else {
                    Problem::not_found(format!("customer {id}")).into_response()
                }
            }),
        )
        .route(
            "/customers",
            post(|Json(body): Json<NewCustomer>| async move {
                let mut fields = Fields::new();
                fields.text("name", &body.name, 20);
                fields.email("email", &body.email);
                fields.finish()?;
                Ok::<_, Problem>((
                    StatusCode::CREATED,
                    Json(Customer {
                        id: String::from("8"),
                        name: body.name,
                    }),
                ))
            }),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_decodes_the_json_answer_and_a_404_is_none() -> TestResult {
    let server = Server::start(customers()).await?;
    let client = client("customer", &server.base()).build()?;

    let found: Option<Customer> = client.get_json("/customers/7").await?;
    assert_eq!(
        found,
        Some(Customer {
            id: String::from("7"),
            name: String::from("Ada")
        })
    );
    let missing: Option<Customer> = client.get_json("/customers/8").await?;
    assert_eq!(missing, None);

    let created: Customer = client
        .post_json(
            "/customers",
            &NewCustomer {
                name: String::from("Grace"),
                email: String::from("grace@example.com"),
            },
            None,
        )
        .await?;
    assert_eq!(created.name, "Grace");
    // A 404 of a call that is not a read is an error like any other answer.
    let error = client
        .put_json::<_, Customer>("/customers/7", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::METHOD_NOT_ALLOWED), "{error}");
    assert_eq!(client.breaker_state(), BreakerState::Closed);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_problem_answer_is_parsed_into_the_error() -> TestResult {
    let server = Server::start(customers()).await?;
    let client = client("customer", &server.base()).build()?;

    let error = client
        .post_json::<_, Customer>(
            "/customers",
            &NewCustomer {
                name: String::new(),
                email: String::from("not an address"),
            },
            None,
        )
        .await
        .unwrap_err();
    let ClientError::Status {
        status,
        problem: Some(problem),
        ..
    } = &error
    else {
        panic!("not a status with a problem: {error:?}");
    };
    assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem.status, Some(StatusCode::UNPROCESSABLE_ENTITY));
    assert_eq!(problem.detail.as_deref(), Some("the request has invalid fields"));
    let errors = problem.extensions.get("errors").and_then(|e| e.as_array());
    assert_eq!(errors.map(Vec::len), Some(2), "{problem:?}");
    assert!(!error.is_transient(), "a 422 does not go away by itself");
    assert!(error.to_string().contains("invalid fields"), "{error}");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_fails_twice_is_retried_until_it_succeeds() -> TestResult {
    let flaky = Hits::default();
    let broken = Hits::default();
    let router = Router::new()
        .route(
            "/flaky",
            get(|State(hits): State<Hits>| async move {
                if hits.hit() <= 2 {
                    Problem::unavailable().into_response()
                } else {
                    Json(serde_json::json!({ "ok": true })).into_response()
                }
            })
            .with_state(flaky.clone()),
        )
        .route(
            "/broken",
            get(|State(hits): State<Hits>| async move {
                hits.hit();
                StatusCode::BAD_GATEWAY
            })
            .with_state(broken.clone()),
        );
    let server = Server::start(router).await?;
    let client = client("flaky", &server.base()).retries(2).build()?;

    let answer: Option<serde_json::Value> = client.get_json("/flaky").await?;
    assert_eq!(answer, Some(serde_json::json!({ "ok": true })));
    assert_eq!(flaky.count(), 3, "two failures, then the success");

    let error = client.get_json::<serde_json::Value>("/broken").await.unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::BAD_GATEWAY));
    assert!(error.is_transient());
    assert_eq!(broken.count(), 3, "the call and its two retries, no more");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_retried_only_when_it_has_an_idempotency_key() -> TestResult {
    let hits = Hits::default();
    let keys = SeenKeys::default();
    let seen = (hits.clone(), Arc::clone(&keys));
    let router = Router::new().route(
        "/orders",
        post(
            |State((hits, keys)): State<(Hits, SeenKeys)>, headers: HeaderMap| async move {
                hits.hit();
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                keys.lock().map(|mut k| k.push(key)).ok();
                Problem::unavailable()
            },
        )
        .with_state(seen),
    );
    let server = Server::start(router).await?;
    let client = client("orders", &server.base()).retries(3).build()?;
    let order = serde_json::json!({ "item": "bolt", "qty": 3 });

    let error = client
        .post_json::<_, serde_json::Value>("/orders", &order, None)
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(hits.count(), 1, "a POST without a key is sent once");

    let error = client
        .post_json::<_, serde_json::Value>("/orders", &order, Some("order-0195f0a2"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(hits.count(), 5, "with a key: the call and three retries");
    let keys = keys.lock().map(|k| k.clone()).unwrap_or_default();
    assert_eq!(keys[0], None);
    assert!(
        keys[1..].iter().all(|k| k.as_deref() == Some("order-0195f0a2")),
        "every retry carries the same key: {keys:?}"
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_does_not_answer_in_time_is_a_timeout() -> TestResult {
    let router = Router::new().route(
        "/stuck",
        get(|| async {
            std::future::pending::<()>().await;
            StatusCode::OK
        }),
    );
    // Not stopped at the end: its handler never returns, so a graceful stop would wait.
    let server = Server::start(router).await?;
    let client = client("stuck", &server.base())
        .timeout(Duration::from_millis(200))
        .retries(0)
        .build()?;
    let error = client.get_json::<serde_json::Value>("/stuck").await.unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    assert!(error.is_transient());
    server.task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_size_limit_is_refused() -> TestResult {
    let router = Router::new().route("/big", get(|| async { Json(vec!["x".repeat(100); 20]) }));
    let server = Server::start(router).await?;
    let strict = client("big", &server.base()).max_response_bytes(256).build()?;
    let error = strict.get_json::<Vec<String>>("/big").await.unwrap_err();
    assert!(matches!(error, ClientError::TooLarge { limit: 256, .. }), "{error:?}");
    let roomy = client("big", &server.base()).build()?;
    assert_eq!(roomy.get_json::<Vec<String>>("/big").await?.map(|v| v.len()), Some(20));
    server.stop().await
}

/// The process's Prometheus recorder, installed once for this test binary.
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other recorder in this test binary");
        handle
    })
}

fn gauge_line(target: &str, value: u8) -> String {
    format!("dbps_http_client_breaker_open{{target=\"{target}\"}} {value}")
}

fn ping(hits: Hits) -> Router {
    Router::new().route(
        "/ping",
        get(|State(hits): State<Hits>| async move {
            hits.hit();
            Json(serde_json::json!({ "pong": true }))
        })
        .with_state(hits),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_when_the_target_is_down_fails_fast_and_closes_when_it_is_back() -> TestResult {
    let metrics = metrics();
    let first = Hits::default();
    let server = Server::start(ping(first.clone())).await?;
    let addr = server.addr;
    // Two clients of the same target: one whose cool-down outlasts the test, to show that
    // an open breaker does not touch the network; one whose cool-down is short, to show
    // the trial call that closes it.
    let failures = 3;
    let patient = ServiceClient::builder("breaker-patient", &server.base())
        .retries(0)
        .breaker(failures, Duration::from_secs(600))
        .build()?;
    let eager = ServiceClient::builder("breaker-eager", &server.base())
        .retries(0)
        .breaker(failures, Duration::from_millis(200))
        .build()?;
    for client in [&patient, &eager] {
        assert!(client.get_json::<serde_json::Value>("/ping").await?.is_some());
        assert_eq!(client.breaker_state(), BreakerState::Closed);
    }
    assert_eq!(first.count(), 2);

    // The target goes away: its port refuses connections.
    server.stop().await?;
    for client in [&patient, &eager] {
        for attempt in 1..=failures {
            assert_eq!(client.breaker_state(), BreakerState::Closed, "before failure {attempt}");
            let error = client.get_json::<serde_json::Value>("/ping").await.unwrap_err();
            assert!(matches!(error, ClientError::Transport { .. }), "{error:?}");
        }
        assert_eq!(client.breaker_state(), BreakerState::Open, "{}", client.target());
        assert!(
            metrics.render().contains(&gauge_line(client.target(), 1)),
            "{}",
            metrics.render()
        );
    }

    // The target is back on the same port.
    let second = Hits::default();
    let server = Server::start_on(addr, ping(second.clone())).await?;

    // Open: the call fails at once, and the target does not hear of it.
    let error = patient.get_json::<serde_json::Value>("/ping").await.unwrap_err();
    assert!(
        matches!(error, ClientError::BreakerOpen { ref target } if target == "breaker-patient"),
        "{error:?}"
    );
    assert!(error.is_transient());
    assert_eq!(second.count(), 0, "an open breaker sends nothing");
    assert_eq!(patient.breaker_state(), BreakerState::Open);

    // After the cool-down a trial call goes through, and its success closes the breaker.
    dbps_testkit::eventually("the eager breaker to let a trial call through", || async {
        match eager.get_json::<serde_json::Value>("/ping").await {
            Ok(answer) => Ok(answer.is_some()),
            Err(ClientError::BreakerOpen { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    })
    .await?;
    assert_eq!(eager.breaker_state(), BreakerState::Closed);
    assert_eq!(second.count(), 1, "exactly the trial call reached the target");
    assert!(eager.get_json::<serde_json::Value>("/ping").await?.is_some());
    assert_eq!(second.count(), 2);
    let rendered = metrics.render();
    assert!(rendered.contains(&gauge_line("breaker-eager", 0)), "{rendered}");
    assert!(rendered.contains(&gauge_line("breaker-patient", 1)), "{rendered}");
    for outcome in ["ok", "transport", "breaker_open"] {
        let line = format!("dbps_http_client_requests_total{{target=\"breaker-eager\",outcome=\"{outcome}\"}}");
        assert!(rendered.contains(&line), "{line} in {rendered}");
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_of_the_current_span_reaches_the_target() -> TestResult {
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("dbps-service-test"));
    // For the whole test binary: handlers run on other threads than the test.
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));

    let seen = Arc::new(Mutex::new(None::<String>));
    let router = Router::new().route(
        "/traced",
        get(
            |State(seen): State<Arc<Mutex<Option<String>>>>, headers: HeaderMap| async move {
                let parent = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                seen.lock().map(|mut s| *s = parent).ok();
                Json(serde_json::json!({}))
            },
        )
        .with_state(Arc::clone(&seen)),
    );
    let server = Server::start(router).await?;
    let client = client("traced", &server.base()).build()?;

    let caller = tracing::info_span!("create_quote");
    let trace_id = caller.context().span().span_context().trace_id().to_string();
    client
        .get_json::<serde_json::Value>("/traced")
        .instrument(caller)
        .await?;

    let traceparent = seen.lock().map(|s| s.clone()).ok().flatten();
    let traceparent = traceparent.ok_or("no traceparent arrived")?;
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], trace_id, "the target continues the caller's trace");
    assert_eq!(parts[2].len(), 16);
    assert_ne!(parts[2], "0000000000000000");
    server.stop().await
}
