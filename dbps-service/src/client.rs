//! Calls from one service to another over REST: JSON in and out, a timeout per request,
//! retries of idempotent calls, a circuit breaker per target, RFC 9457 problems as typed
//! errors, W3C trace context and metrics.
//!
//! A [`ServiceClient`] talks to one target service. Share it (it is cheap to clone): its
//! connection pool and its circuit breaker belong to the target, not to a call.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use dbps_service::client::{ClientError, ServiceClient};
//!
//! #[derive(serde::Deserialize)]
//! struct Customer {
//!     name: String,
//! }
//!
//! # async fn example() -> Result<(), ClientError> {
//! let customers = ServiceClient::builder("customer", "http://127.0.0.1:8081")
//!     .timeout(Duration::from_secs(2))
//!     .retries(2)
//!     .build()?;
//! match customers.get_json::<Customer>("/customers/0195f0a2").await {
//!     Ok(Some(customer)) => println!("{}", customer.name),
//!     Ok(None) => println!("no such customer"),
//!     // The breaker is open, the call timed out, the service answered 503...: try later,
//!     // or answer from a replica.
//!     Err(error) if error.is_transient() => println!("customer service unavailable: {error}"),
//!     Err(error) => return Err(error),
//! }
//! # Ok(()) }
//! ```
//!
//! # What a call does
//!
//! 1. It fails fast with [`ClientError::BreakerOpen`] while the target's breaker is open.
//! 2. It sends the request with a `traceparent` (and `tracestate`) of the current span, when
//!    an OpenTelemetry layer records one (feature `opentelemetry`), and a deadline
//!    ([`ServiceClientBuilder::timeout`]) that covers connecting, the answer and its body.
//! 3. On a transient failure — no connection, a timeout, a 5xx, a 408 or 429, an answer
//!    with `Retry-After` — it retries with exponential backoff and jitter, but only calls
//!    that are safe to repeat: `GET`, `HEAD`, `PUT`, `DELETE`, and a `POST` that carries an
//!    `Idempotency-Key` (see [`crate::http::idempotency`]). A plain `POST` is sent once.
//! 4. A 2xx answer's body is decoded as JSON (an empty body as `null`, so `()` and
//!    `Option` work for `204`); a `404` of [`ServiceClient::get_json`] is `Ok(None)`;
//!    any other answer is [`ClientError::Status`], with the target's problem document
//!    when it sent `application/problem+json`.
//!
//! # The circuit breaker
//!
//! Each client has one breaker for its target
//! ([`tower-resilience-circuitbreaker`](tower_resilience_circuitbreaker), ADR 0011). After
//! [`ServiceClientBuilder::breaker`]'s number of consecutive failed attempts — no
//! connection, a timeout, a 5xx answer — it opens: calls fail at once without touching
//! the network. After the cool-down the next call is let through as a trial (half-open);
//! its success closes the breaker, its failure opens it for another cool-down.
//! [`ServiceClient::breaker_state`] tells where it is, for health pages.
//!
//! # Metrics
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `dbps_http_client_requests_total` | `target`, `outcome` | attempts, by outcome: `ok` (2xx, 3xx), `client_error` (4xx), `server_error` (5xx), `timeout`, `transport`, `too_large`, `breaker_open` (refused without a request) |
//! | `dbps_http_client_request_seconds` | `target` | duration of the attempts that were sent |
//! | `dbps_http_client_breaker_open` | `target` | `1` while the breaker is open or half-open, `0` when closed |

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use backon::{ExponentialBuilder, Retryable as _};
use dbps_core::TraceContext;
use problem_details::ProblemDetails;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tower::ServiceExt as _;
use tower_resilience_circuitbreaker::{
    CircuitBreaker, CircuitBreakerError, CircuitBreakerHandle, CircuitBreakerLayer, CircuitState, FailureClassifier,
};
use tracing::Instrument as _;

use crate::http::PROBLEM_JSON;
use crate::http::idempotency::IDEMPOTENCY_KEY;

/// The default deadline of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default number of retries of an idempotent call.
pub const DEFAULT_RETRIES: usize = 2;
/// The default number of consecutive failures that open the breaker.
pub const DEFAULT_BREAKER_FAILURES: usize = 5;
/// The default time the breaker stays open before it lets a trial call through.
pub const DEFAULT_BREAKER_COOL_DOWN: Duration = Duration::from_secs(10);
/// The default limit of an answer's body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// An RFC 9457 problem document as another service sent it: `type`, `status`, `title`,
/// `detail`, `instance`, and its extension members (such as `errors` of a `422` from
/// [`Fields`](crate::http::Fields)) in `extensions`.
pub type RemoteProblem = ProblemDetails<Map<String, Value>>;

/// Why a call to another service failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The target's circuit breaker is open: nothing was sent.
    #[error("{target}: circuit breaker open, the call was not made")]
    BreakerOpen {
        /// The target service.
        target: String,
    },
    /// No complete answer within the request's deadline.
    #[error("{target}: no answer within {timeout:?}")]
    Timeout {
        /// The target service.
        target: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The request could not be sent or its answer not received: no connection, a reset,
    /// an answer that is not HTTP.
    #[error("{target}: the request failed")]
    Transport {
        /// The target service.
        target: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The target answered with a status that is not a success (nor, for
    /// [`ServiceClient::get_json`], a `404`).
    #[error("{target} answered {status}{}", problem_suffix(.problem.as_deref()))]
    Status {
        /// The target service.
        target: String,
        /// The status of the answer.
        status: StatusCode,
        /// The problem document, when the answer was `application/problem+json`.
        problem: Option<Box<RemoteProblem>>,
        /// How long the target asked the client to wait (`Retry-After` in seconds).
        retry_after: Option<Duration>,
    },
    /// A successful answer's body is not the JSON the caller expects.
    #[error("{target}: the answer could not be decoded")]
    Decode {
        /// The target service.
        target: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An answer's body is larger than [`ServiceClientBuilder::max_response_bytes`].
    #[error("{target}: the answer is larger than {limit} bytes")]
    TooLarge {
        /// The target service.
        target: String,
        /// The limit.
        limit: usize,
    },
    /// The request's body could not be encoded as JSON.
    #[error("{target}: the request could not be encoded")]
    Encode {
        /// The target service.
        target: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A setting of the builder, or a call's path, is not usable. Nothing was sent.
    #[error("invalid {setting}: {reason}")]
    InvalidConfig {
        /// The setting (`base_url`, `path`, `target`, ...).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn problem_suffix(problem: Option<&RemoteProblem>) -> String {
    match problem.and_then(|p| p.detail.as_deref().or(p.title.as_deref())) {
        Some(text) => format!(": {text}"),
        None => String::new(),
    }
}

impl ClientError {
    /// Whether the same call may succeed later: the breaker is open, the target could not
    /// be reached or did not answer in time, or it answered 5xx, 408, 429, or anything
    /// with `Retry-After`. A 4xx answer otherwise, an answer that cannot be decoded and a
    /// request that cannot be encoded are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::BreakerOpen { .. } | Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status {
                status, retry_after, ..
            } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || retry_after.is_some()
            }
            Self::Decode { .. } | Self::TooLarge { .. } | Self::Encode { .. } | Self::InvalidConfig { .. } => false,
        }
    }

    /// The status of the target's answer, if it answered with one that is not a success.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The target's problem document, if it sent one.
    pub fn problem(&self) -> Option<&RemoteProblem> {
        match self {
            Self::Status { problem, .. } => problem.as_deref(),
            _ => None,
        }
    }

    /// Whether the client retries the call itself: transient, and worth sending again now
    /// (an open breaker is not: it refuses until its cool-down has passed).
    fn is_retried(&self) -> bool {
        self.is_transient() && !matches!(self, Self::BreakerOpen { .. })
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A consumer's handler that calls another service retries the message on a transient
/// failure and dead-letters it on a permanent one.
impl From<ClientError> for dbps_core::HandlerError {
    fn from(error: ClientError) -> Self {
        if error.is_transient() {
            Self::transient(error)
        } else {
            Self::permanent(error)
        }
    }
}

/// Where a target's circuit breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail at once. It stays open after the cool-down until the next call, which
    /// is the trial.
    Open,
    /// The trial call is under way; other calls fail at once until it ends.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<CircuitState> for BreakerState {
    fn from(state: CircuitState) -> Self {
        match state {
            CircuitState::Closed => Self::Closed,
            CircuitState::Open => Self::Open,
            CircuitState::HalfOpen => Self::HalfOpen,
        }
    }
}

/// Settings of a [`ServiceClient`]; see [`ServiceClient::builder`].
#[derive(Debug, Clone)]
pub struct ServiceClientBuilder {
    target: String,
    base_url: String,
    timeout: Duration,
    retries: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    breaker_failures: usize,
    breaker_cool_down: Duration,
    max_response_bytes: usize,
    http: Option<reqwest::Client>,
}

impl ServiceClientBuilder {
    /// The deadline of each request, from connecting to the end of the answer's body
    /// ([`DEFAULT_TIMEOUT`]). Each retry gets its own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often a failed idempotent call is sent again ([`DEFAULT_RETRIES`]; `0` for
    /// none).
    pub fn retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// The first and the longest wait between retries (50 ms and 1 s): exponential, with
    /// jitter. A `Retry-After` of the target replaces the wait, up to the longest.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// The breaker opens after `failures` consecutive failed attempts
    /// ([`DEFAULT_BREAKER_FAILURES`]) and lets a trial call through after `cool_down`
    /// ([`DEFAULT_BREAKER_COOL_DOWN`]).
    pub fn breaker(mut self, failures: usize, cool_down: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cool_down = cool_down;
        self
    }

    /// The largest answer body accepted ([`DEFAULT_MAX_RESPONSE_BYTES`]); a larger one is
    /// [`ClientError::TooLarge`].
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// Sends through `http` (its connection pool, TLS and proxy settings) instead of a
    /// client of its own. Its redirect policy applies: by default the client follows no
    /// redirects, so that one attempt is one exchange.
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// The client. Fails if the target's name is empty, the base URL is not an absolute
    /// `http` or `https` URL, or the breaker's number of failures is zero.
    pub fn build(self) -> Result<ServiceClient, ClientError> {
        let invalid = |setting, reason: String| ClientError::InvalidConfig { setting, reason };
        if self.target.trim().is_empty() {
            return Err(invalid("target", String::from("must not be empty")));
        }
        let base = reqwest::Url::parse(&self.base_url).map_err(|e| invalid("base_url", e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(invalid(
                "base_url",
                format!("{} is not an http or https URL with a host", self.base_url),
            ));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("base_url", String::from("must have no query or fragment")));
        }
        if self.breaker_failures == 0 {
            return Err(invalid("breaker failures", String::from("must be at least 1")));
        }
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(self.timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|source| ClientError::Transport {
                    target: self.target.clone(),
                    source,
                })?,
        };
        metrics::gauge!("dbps_http_client_breaker_open", "target" => self.target.clone()).set(0.0);
        let target = self.target.clone();
        let (layer, handle) = CircuitBreakerLayer::builder()
            .name(self.target.clone())
            .consecutive_failures(self.breaker_failures)
            .wait_duration_in_open(self.breaker_cool_down)
            .permitted_calls_in_half_open(1)
            .on_state_transition(move |from, to| {
                metrics::gauge!("dbps_http_client_breaker_open", "target" => target.clone())
                    .set(if to == CircuitState::Closed { 0.0 } else { 1.0 });
                let (from, to) = (BreakerState::from(from), BreakerState::from(to));
                if to == BreakerState::Open {
                    tracing::warn!(%target, %from, %to, "circuit breaker opened");
                } else {
                    tracing::info!(%target, %from, %to, "circuit breaker changed state");
                }
            })
            .failure_classifier_type(Outage)
            .build_with_handle()
            .map_err(|e| invalid("breaker", e.to_string()))?;
        let transport = Transport {
            http,
            max_body: self.max_response_bytes,
        };
        let breaker = tower::Layer::layer(&layer, transport);
        let base = self.base_url.trim_end_matches('/').to_owned();
        Ok(ServiceClient {
            inner: Arc::new(Inner {
                requests: Requests::new(&self.target),
                target: self.target,
                base,
                timeout: self.timeout,
                retries: self.retries,
                min_backoff: self.min_backoff,
                max_backoff: self.max_backoff,
                breaker,
                handle,
            }),
        })
    }
}

/// A client of one target service; see the [module documentation](self).
#[derive(Clone)]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

struct Inner {
    target: String,
    base: String,
    timeout: Duration,
    retries: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    breaker: CircuitBreaker<Transport, Outage>,
    handle: CircuitBreakerHandle<Outage>,
    requests: Requests,
}

impl fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClient")
            .field("target", &self.inner.target)
            .field("base", &self.inner.base)
            .field("timeout", &self.inner.timeout)
            .field("retries", &self.inner.retries)
            .field("breaker", &self.breaker_state())
            .finish_non_exhaustive()
    }
}

/// One call: what is sent on every attempt.
struct Call<'a> {
    method: Method,
    url: reqwest::Url,
    path: &'a str,
    body: Option<Bytes>,
    idempotency_key: Option<HeaderValue>,
}

/// The answer of one attempt, read to its end.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl ServiceClient {
    /// Settings for a client of `target` (its service name: metrics, logs and errors
    /// name it) at `base_url` (`http://customer:8080`, or with a path prefix
    /// `http://gateway/customer`); paths of calls are appended to it.
    pub fn builder(target: &str, base_url: &str) -> ServiceClientBuilder {
        ServiceClientBuilder {
            target: target.to_owned(),
            base_url: base_url.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cool_down: DEFAULT_BREAKER_COOL_DOWN,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            http: None,
        }
    }

    /// The target service's name.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Where the target's circuit breaker is.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.handle.state().into()
    }

    /// `GET path`, its JSON answer decoded; `Ok(None)` when the target answers `404`.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, ClientError> {
        let call = self.call(Method::GET, path, None, None)?;
        match self.send(call).await {
            Ok(answer) => self.decode(&answer).map(Some),
            Err(ClientError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `POST path` with `body` as JSON, its JSON answer decoded. With an
    /// `idempotency_key` (sent as `Idempotency-Key`; a UUID made once per operation, the
    /// same for every retry of it) the call is retried like the idempotent methods —
    /// the target must de-duplicate by the key ([`crate::http::idempotency`] does); without
    /// one it is sent once.
    pub async fn post_json<B, T>(&self, path: &str, body: &B, idempotency_key: Option<&str>) -> Result<T, ClientError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let key = idempotency_key
            .map(|key| {
                HeaderValue::from_str(key).map_err(|e| ClientError::InvalidConfig {
                    setting: "idempotency_key",
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        let call = self.call(Method::POST, path, Some(self.encode(body)?), key)?;
        let answer = self.send(call).await?;
        self.decode(&answer)
    }

    /// `PUT path` with `body` as JSON, its JSON answer decoded.
    pub async fn put_json<B, T>(&self, path: &str, body: &B) -> Result<T, ClientError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let call = self.call(Method::PUT, path, Some(self.encode(body)?), None)?;
        let answer = self.send(call).await?;
        self.decode(&answer)
    }

    /// `DELETE path`; any answer body is ignored.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let call = self.call(Method::DELETE, path, None, None)?;
        self.send(call).await.map(drop)
    }

    fn encode<B: Serialize + ?Sized>(&self, body: &B) -> Result<Bytes, ClientError> {
        serde_json::to_vec(body)
            .map(Bytes::from)
            .map_err(|source| ClientError::Encode {
                target: self.inner.target.clone(),
                source,
            })
    }

    fn decode<T: DeserializeOwned>(&self, answer: &Answer) -> Result<T, ClientError> {
        let body: &[u8] = if answer.body.iter().all(u8::is_ascii_whitespace) {
            b"null"
        } else {
            &answer.body
        };
        serde_json::from_slice(body).map_err(|source| ClientError::Decode {
            target: self.inner.target.clone(),
            source,
        })
    }

    fn call<'a>(
        &self,
        method: Method,
        path: &'a str,
        body: Option<Bytes>,
        idempotency_key: Option<HeaderValue>,
    ) -> Result<Call<'a>, ClientError> {
        if !path.starts_with('/') {
            return Err(ClientError::InvalidConfig {
                setting: "path",
                reason: format!("{path:?} must start with /"),
            });
        }
        let url =
            reqwest::Url::parse(&format!("{}{path}", self.inner.base)).map_err(|e| ClientError::InvalidConfig {
                setting: "path",
                reason: format!("{path:?}: {e}"),
            })?;
        Ok(Call {
            method,
            url,
            path,
            body,
            idempotency_key,
        })
    }

    /// Sends `call`, retried when it is safe to repeat; `Ok` only for a 2xx answer.
    async fn send(&self, call: Call<'_>) -> Result<Answer, ClientError> {
        let inner = &self.inner;
        let span = tracing::info_span!(
            "http_client",
            target = %inner.target,
            method = %call.method,
            path = call.path,
        );
        // The call's span is the parent of the target's span.
        let trace = span.in_scope(TraceContext::current);
        let repeatable = matches!(call.method, Method::GET | Method::HEAD | Method::PUT | Method::DELETE)
            || (call.method == Method::POST && call.idempotency_key.is_some());
        let retries = if repeatable { inner.retries } else { 0 };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(inner.min_backoff)
            .with_max_delay(inner.max_backoff)
            .with_max_times(retries)
            .with_jitter();
        let max_backoff = inner.max_backoff;
        let attempt = || self.attempt(&call, trace.as_ref());
        attempt
            .retry(backoff)
            .when(ClientError::is_retried)
            .adjust(move |error, delay| match (error.retry_after(), delay) {
                (Some(asked), Some(_)) => Some(asked.min(max_backoff)),
                (_, delay) => delay,
            })
            .notify(|error, delay| {
                tracing::debug!(error = %dbps_core::ErrorChain(error), ?delay, "call failed; retrying");
            })
            .instrument(span)
            .await
    }

    async fn attempt(&self, call: &Call<'_>, trace: Option<&TraceContext>) -> Result<Answer, ClientError> {
        let inner = &self.inner;
        let mut request = reqwest::Request::new(call.method.clone(), call.url.clone());
        *request.timeout_mut() = Some(inner.timeout);
        let headers = request.headers_mut();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, application/problem+json"),
        );
        if let Some(body) = &call.body {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            *request.body_mut() = Some(reqwest::Body::from(body.clone()));
        }
        if let Some(key) = &call.idempotency_key {
            request.headers_mut().insert(IDEMPOTENCY_KEY, key.clone());
        }
        if let Some(trace) = trace {
            for (name, value) in [("traceparent", &trace.traceparent), ("tracestate", &trace.tracestate)] {
                if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                    request.headers_mut().insert(name, value);
                }
            }
        }
        let started = Instant::now();
        let result = inner.breaker.clone().oneshot(request).await;
        let target = || inner.target.clone();
        let answer = match result {
            Ok(answer) => answer,
            Err(CircuitBreakerError::OpenCircuit) => {
                inner.requests.count("breaker_open");
                return Err(ClientError::BreakerOpen { target: target() });
            }
            Err(CircuitBreakerError::Inner(error)) => {
                inner.requests.sent(started);
                return Err(match error {
                    FetchError::Timeout => {
                        inner.requests.count("timeout");
                        ClientError::Timeout {
                            target: target(),
                            timeout: inner.timeout,
                        }
                    }
                    FetchError::Transport(source) => {
                        inner.requests.count("transport");
                        ClientError::Transport {
                            target: target(),
                            source,
                        }
                    }
                    FetchError::TooLarge(limit) => {
                        inner.requests.count("too_large");
                        ClientError::TooLarge {
                            target: target(),
                            limit,
                        }
                    }
                });
            }
        };
        inner.requests.sent(started);
        let status = answer.status;
        inner.requests.count(if status.is_server_error() {
            "server_error"
        } else if status.is_client_error() {
            "client_error"
        } else {
            "ok"
        });
        if status.is_success() {
            return Ok(answer);
        }
        let problem = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(PROBLEM_JSON))
            .then(|| serde_json::from_slice::<RemoteProblem>(&answer.body).ok())
            .flatten()
            .map(Box::new);
        let retry_after = answer
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(ClientError::Status {
            target: target(),
            status,
            problem,
            retry_after,
        })
    }
}

/// The client's metrics of one target (looked up at each use, so that a client built
/// before the service installed its recorder still counts).
struct Requests {
    target: String,
}

impl Requests {
    fn new(target: &str) -> Self {
        Self {
            target: target.to_owned(),
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!(
            "dbps_http_client_requests_total",
            "target" => self.target.clone(),
            "outcome" => outcome,
        )
        .increment(1);
    }

    fn sent(&self, started: Instant) {
        metrics::histogram!("dbps_http_client_request_seconds", "target" => self.target.clone())
            .record(started.elapsed().as_secs_f64());
    }
}

/// The breaker's view of an attempt: an outage of the target is no connection, no answer
/// in time, or a 5xx. A 4xx is the caller's mistake, and an oversized body the target's
/// answer, not an outage.
#[derive(Debug, Clone, Copy)]
struct Outage;

impl FailureClassifier<Answer, FetchError> for Outage {
    fn classify(&self, result: &Result<Answer, FetchError>) -> bool {
        match result {
            Ok(answer) => answer.status.is_server_error(),
            Err(FetchError::TooLarge(_)) => false,
            Err(FetchError::Timeout | FetchError::Transport(_)) => true,
        }
    }
}

/// Why one attempt got no usable answer.
enum FetchError {
    Timeout,
    Transport(reqwest::Error),
    TooLarge(usize),
}

impl From<reqwest::Error> for FetchError {
    fn from(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            Self::Timeout
        } else {
            Self::Transport(error)
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One attempt, as a tower service for the breaker: the request sent, the answer read to
/// its end (within the deadline and the size limit).
#[derive(Clone)]
struct Transport {
    http: reqwest::Client,
    max_body: usize,
}

impl tower::Service<reqwest::Request> for Transport {
    type Response = Answer;
    type Error = FetchError;
    type Future = BoxFuture<Result<Answer, FetchError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), FetchError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: reqwest::Request) -> Self::Future {
        let http = self.http.clone();
        let limit = self.max_body;
        Box::pin(async move {
            let mut response = http.execute(request).await?;
            if response.content_length().is_some_and(|length| length > limit as u64) {
                return Err(FetchError::TooLarge(limit));
            }
            let status = response.status();
            let headers = std::mem::take(response.headers_mut());
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > limit {
                    return Err(FetchError::TooLarge(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Answer {
                status,
                headers,
                body: Bytes::from(body),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: Option<u64>) -> ClientError {
        ClientError::Status {
            target: String::from("t"),
            status: StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT),
            problem: None,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn answers_are_transient_when_retrying_later_may_help() {
        for code in [500, 502, 503, 504, 408, 429] {
            assert!(status(code, None).is_transient(), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 412, 422] {
            assert!(!status(code, None).is_transient(), "{code}");
        }
        assert!(status(409, Some(1)).is_transient(), "the target asked to retry");
        let open = ClientError::BreakerOpen {
            target: String::from("t"),
        };
        assert!(open.is_transient());
        assert!(!open.is_retried(), "an open breaker is not retried at once");
        assert!(status(503, None).is_retried());
    }

    #[test]
    fn a_builder_refuses_unusable_settings() {
        for (target, base) in [
            ("", "http://127.0.0.1:1"),
            ("t", "not a url"),
            ("t", "ftp://127.0.0.1/"),
            ("t", "http://127.0.0.1:1/?q=1"),
        ] {
            let error = ServiceClient::builder(target, base).build().unwrap_err();
            assert!(
                matches!(error, ClientError::InvalidConfig { .. }),
                "{target} {base}: {error}"
            );
        }
        let error = ServiceClient::builder("t", "http://127.0.0.1:1")
            .breaker(0, Duration::from_secs(1))
            .build()
            .unwrap_err();
        assert!(matches!(error, ClientError::InvalidConfig { .. }), "{error}");
    }

    #[test]
    fn paths_are_appended_to_the_base() {
        let client = ServiceClient::builder("t", "http://127.0.0.1:1/api/")
            .build()
            .expect("client");
        let call = client.call(Method::GET, "/customers/7?x=1", None, None).expect("call");
        assert_eq!(call.url.as_str(), "http://127.0.0.1:1/api/customers/7?x=1");
        assert!(client.call(Method::GET, "customers", None, None).is_err());
    }
}
