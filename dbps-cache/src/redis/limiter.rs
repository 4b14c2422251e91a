//! Rate limiting shared by every instance of a service: GCRA in Redis, one script a
//! decision, and its axum middleware.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::error::{CacheError, Result};

/// The generic cell rate algorithm on the key's "theoretical arrival time", in
/// microseconds of the server's clock (so instances with drifting clocks agree).
///
/// ARGV[1]: emission interval (period / limit), ARGV[2]: period. Returns
/// `{allowed, remaining, reset_after, retry_after}`, times in microseconds.
const GCRA: &str = r"
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local emission = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
if new_tat - now > period then
  return {0, 0, tat - now, new_tat - now - period}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((period - (new_tat - now)) / emission), new_tat - now, 0}
";

/// How many requests a key may make per period; all of them may come at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    limit: u32,
    period: Duration,
}

impl Quota {
    /// `limit` requests per `period`.
    pub fn new(limit: u32, period: Duration) -> Result<Self> {
        if limit == 0 || period.is_zero() {
            return Err(CacheError::InvalidConfig {
                setting: "quota",
                reason: String::from("limit and period must be positive"),
            });
        }
        Ok(Self { limit, period })
    }

    /// The number of requests per period.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }
}

/// One decision of the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request may go ahead.
    pub allowed: bool,
    /// The quota's limit.
    pub limit: u32,
    /// Requests the key may still make right now.
    pub remaining: u32,
    /// When the key's quota is whole again.
    pub reset_after: Duration,
    /// For a refused request: when the next one would be allowed.
    pub retry_after: Option<Duration>,
}

/// A rate limiter in Redis, shared by every instance of a service: GCRA (the generic cell
/// rate algorithm), decided atomically by one Lua script on the server's clock.
///
/// Keys live under the limiter's namespace (`<service>:ratelimit:`) and expire when their
/// quota is whole again. Metrics: `dbps_ratelimit_decisions_total{limiter, outcome}`
/// (`allowed`, `limited`) and `dbps_ratelimit_unavailable_total{limiter}`.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    conn: ConnectionManager,
    namespace: String,
    quota: Quota,
    timeout: Duration,
    script: Arc<Script>,
    /// `dbps_ratelimit_decisions_total`, allowed and limited, registered once.
    decisions: Arc<[metrics::Counter; 2]>,
}

impl RateLimiter {
    /// A limiter of `quota` per key, its keys under `namespace`; Redis gets 50 ms to
    /// decide.
    pub fn new(conn: ConnectionManager, namespace: impl Into<String>, quota: Quota) -> Self {
        let namespace = namespace.into();
        let decisions = ["allowed", "limited"].map(|outcome| {
            metrics::counter!("dbps_ratelimit_decisions_total", "limiter" => namespace.clone(), "outcome" => outcome)
        });
        Self {
            conn,
            decisions: Arc::new(decisions),
            namespace,
            quota,
            timeout: Duration::from_millis(50),
            script: Arc::new(Script::new(GCRA)),
        }
    }

    /// How long Redis may take to decide (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Decides one request of `key`.
    pub async fn check(&self, key: &str) -> Result<Decision> {
        let period_us = u64::try_from(self.quota.period.as_micros()).unwrap_or(u64::MAX);
        let emission_us = (period_us / u64::from(self.quota.limit)).max(1);
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key(format!("{}{key}", self.namespace));
        invocation.arg(emission_us).arg(period_us);
        let answer: (i64, i64, i64, i64) =
            match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(source)) => {
                    return Err(CacheError::Redis {
                        operation: "rate limit",
                        source,
                    });
                }
                Err(_) => {
                    return Err(CacheError::Timeout {
                        operation: "rate limit",
                        timeout: self.timeout,
                    });
                }
            };
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        let (allowed, remaining, reset_after, retry_after) = answer;
        let decision = Decision {
            allowed: allowed == 1,
            limit: self.quota.limit,
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset_after: micros(reset_after),
            retry_after: (allowed != 1).then(|| micros(retry_after)),
        };
        let [allowed, limited] = &*self.decisions;
        if decision.allowed { allowed } else { limited }.increment(1);
        Ok(decision)
    }
}

/// Names the key a request counts against (`None`: not limited).
type Keying = dyn Fn(&Request) -> Option<String> + Send + Sync;

/// What the middleware keys a request by.
#[derive(Clone)]
struct KeyFn(Arc<Keying>);

impl std::fmt::Debug for KeyFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyFn")
    }
}

/// The client's address, from `ConnectInfo<SocketAddr>`.
fn client_address(request: &Request) -> Option<String> {
    let ConnectInfo(addr) = request.extensions().get::<ConnectInfo<std::net::SocketAddr>>()?;
    Some(addr.ip().to_string())
}

/// A [`RateLimiter`] as axum middleware:
///
/// ```no_run
/// # fn app(limiter: dbps_cache::redis::RateLimiter) -> axum::Router {
/// use dbps_cache::redis::RateLimit;
///
/// axum::Router::new()
///     // ... routes ...
///     .layer(axum::middleware::from_fn_with_state(
///         RateLimit::new(limiter).by_header("x-api-key"),
///         dbps_cache::redis::rate_limit,
///     ))
/// # }
/// ```
///
/// Every answer carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
/// (seconds); a refused request gets `429 Too Many Requests` as
/// `application/problem+json` with `Retry-After`. A request without a key (no such
/// header, no client address) is not limited. When Redis cannot decide, the request goes
/// ahead (fail open, the default) or gets `503` (fail closed), counted in
/// `dbps_ratelimit_unavailable_total` either way.
#[derive(Debug, Clone)]
pub struct RateLimit {
    limiter: RateLimiter,
    key: KeyFn,
    fail_open: bool,
}

impl RateLimit {
    /// Limits requests by their client address (`ConnectInfo<SocketAddr>`, which
    /// `dbps-service` provides); change the key with the `by_` methods.
    pub fn new(limiter: RateLimiter) -> Self {
        let key = KeyFn(Arc::new(client_address));
        Self {
            limiter,
            key,
            fail_open: true,
        }
    }

    /// Limits by the value of header `name` (an API key).
    pub fn by_header(mut self, name: &'static str) -> Self {
        self.key = KeyFn(Arc::new(move |request: &Request| {
            let value = request.headers().get(name)?.to_str().ok()?;
            Some(format!("{name}:{value}"))
        }));
        self
    }

    /// Limits by a key of the caller's choosing; `None` leaves the request unlimited.
    pub fn by(mut self, key: impl Fn(&Request) -> Option<String> + Send + Sync + 'static) -> Self {
        self.key = KeyFn(Arc::new(key));
        self
    }

    /// Refuses requests (`503`) while Redis cannot decide, instead of letting them go
    /// ahead.
    pub fn fail_closed(mut self) -> Self {
        self.fail_open = false;
        self
    }
}

/// The middleware function of [`RateLimit`].
pub async fn rate_limit(State(limit): State<RateLimit>, request: Request, next: Next) -> Response {
    let Some(key) = (limit.key.0)(&request) else {
        return next.run(request).await;
    };
    match limit.limiter.check(&key).await {
        Ok(decision) if decision.allowed => {
            let mut response = next.run(request).await;
            set_headers(response.headers_mut(), &decision);
            response
        }
        Ok(decision) => {
            let retry = decision.retry_after.unwrap_or_default().as_secs_f64().ceil().max(1.0);
            let body = serde_json::json!({
                "type": "about:blank",
                "title": "Too Many Requests",
                "status": 429,
                "detail": format!("at most {} requests per {:?}; retry in {retry} s", decision.limit, limit.limiter.quota.period),
            });
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/problem+json")],
                body.to_string(),
            )
                .into_response();
            set_headers(response.headers_mut(), &decision);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry as u64));
            response
        }
        Err(error) => {
            metrics::counter!("dbps_ratelimit_unavailable_total", "limiter" => limit.limiter.namespace.clone())
                .increment(1);
            tracing::warn!(error = %dbps_core::ErrorChain(&error), fail_open = limit.fail_open, "rate limiter unavailable");
            if limit.fail_open {
                next.run(request).await
            } else {
                let body = serde_json::json!({
                    "type": "about:blank",
                    "title": "Service Unavailable",
                    "status": 503,
                    "detail": "the rate limiter cannot decide now; retry later",
                });
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::CONTENT_TYPE, "application/problem+json")],
                    body.to_string(),
                )
                    .into_response()
            }
        }
    }
}

fn set_headers(headers: &mut HeaderMap, decision: &Decision) {
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    let reset = decision.reset_after.as_secs_f64().ceil() as u64;
    headers.insert("ratelimit-reset", HeaderValue::from(reset));
}
