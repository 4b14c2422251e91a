//! The rate limiter and the session store against the real Redis: exact admission under
//! concurrency over several windows, the axum middleware's answers, failing open and
//! closed with Redis stopped, and sessions that survive a restart of the service.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use dbps_cache::redis::{Quota, RateLimit, RateLimiter, RedisSessionStore, rate_limit};
use reqwest::StatusCode;
use tower_sessions::{Session, SessionManagerLayer};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Serves `router` on a free port until the returned token is cancelled.
async fn serve(router: Router) -> Result<(String, dbps_core::CancellationToken), std::io::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = dbps_core::CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(stopped.cancelled_owned())
        .await
    });
    Ok((base, stop))
}

/// `GET /` answering "ok", behind `limit`.
fn limited(limit: RateLimit) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(axum::middleware::from_fn_with_state(limit, rate_limit))
}

/// A limiter of `limit` requests a minute in the test's Redis namespace.
fn per_minute(redis: &dbps_testkit::TestRedis, limit: u32) -> Result<RateLimiter, dbps_cache::CacheError> {
    Ok(RateLimiter::new(
        redis.connection(),
        redis.key("limit:"),
        Quota::new(limit, Duration::from_secs(60))?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_get_exactly_the_quota_in_every_window() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    // 10 per 3 s: a slot frees every 300 ms, far longer than 50 concurrent decisions take,
    // so each burst meets a whole quota and nothing more.
    let quota = Quota::new(10, Duration::from_secs(3))?;
    let limiter =
        Arc::new(RateLimiter::new(redis.connection(), redis.key("limit:"), quota).timeout(Duration::from_secs(2)));
    for window in 0..3 {
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                tokio::spawn(async move { limiter.check("api-key-1").await })
            })
            .collect();
        let mut decisions = Vec::new();
        for caller in callers {
            decisions.push(caller.await??);
        }
        let allowed = decisions.iter().filter(|d| d.allowed).count();
        assert_eq!(allowed, 10, "window {window}");
        let refused = decisions.iter().find(|d| !d.allowed).ok_or("none refused")?;
        assert!(
            refused
                .retry_after
                .is_some_and(|r| r > Duration::ZERO && r <= Duration::from_millis(300))
        );
        // The quota is whole again once the slowest admitted request's slot has passed.
        let reset = decisions.iter().map(|d| d.reset_after).max().unwrap_or_default();
        tokio::time::sleep(reset).await;
    }
    // Another key has its own quota.
    assert!(limiter.check("api-key-2").await?.allowed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_middleware_answers_429_with_the_standard_headers() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let router = limited(RateLimit::new(per_minute(&redis, 3)?).by_header("x-api-key"));
    let (base, stop) = serve(router).await?;
    let http = reqwest::Client::new();
    let call = |key: &'static str| http.get(format!("{base}/")).header("x-api-key", key).send();

    for remaining in [2, 1, 0] {
        let ok = call("partner-a").await?;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()["ratelimit-limit"], "3");
        assert_eq!(ok.headers()["ratelimit-remaining"], remaining.to_string().as_str());
    }
    let limited = call("partner-a").await?;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["content-type"], "application/problem+json");
    let retry: u64 = limited.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=20).contains(&retry), "retry after {retry} s");
    assert_eq!(limited.headers()["ratelimit-remaining"], "0");
    let problem: serde_json::Value = limited.json().await?;
    assert_eq!(problem["status"], 429);
    // Another key, and a request without one, are not held back.
    assert_eq!(call("partner-b").await?.status(), StatusCode::OK);
    assert_eq!(http.get(format!("{base}/")).send().await?.status(), StatusCode::OK);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_middleware_limits_each_client_address() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let router = limited(RateLimit::new(per_minute(&redis, 2)?));
    let (base, stop) = serve(router).await?;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(http.get(format!("{base}/")).send().await?.status());
    }
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]
    );
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_middleware_fails_open_or_closed_as_configured() -> TestResult {
    let mut server = dbps_testkit::redis_process().await?;
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(server.url())?).await?;
    let limiter = RateLimiter::new(conn, "svc:limit:", Quota::new(100, Duration::from_secs(1))?);
    let (open, stop_open) = serve(limited(RateLimit::new(limiter.clone()).by_header("x-api-key"))).await?;
    let (closed, stop_closed) = serve(limited(RateLimit::new(limiter).by_header("x-api-key").fail_closed())).await?;
    let http = reqwest::Client::new();
    let call = |base: &str| http.get(format!("{base}/")).header("x-api-key", "k").send();
    assert_eq!(call(&open).await?.status(), StatusCode::OK);
    assert_eq!(call(&closed).await?.status(), StatusCode::OK);

    server.stop();
    assert_eq!(call(&open).await?.status(), StatusCode::OK, "fail open");
    let refused = call(&closed).await?;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE, "fail closed");
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    stop_open.cancel();
    stop_closed.cancel();
    Ok(())
}

/// Counts the calls of one session.
async fn visits(session: Session) -> Result<String, StatusCode> {
    let seen: usize = session
        .get("visits")
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?
        .unwrap_or(0);
    session
        .insert("visits", seen + 1)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok((seen + 1).to_string())
}

fn app(redis: &dbps_testkit::TestRedis) -> Router {
    let store = RedisSessionStore::new(redis.connection(), redis.key("session:"));
    Router::new()
        .route("/visits", get(visits))
        .layer(SessionManagerLayer::new(store).with_secure(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_a_restart_of_the_service() -> TestResult {
    let redis = dbps_testkit::redis().await?;
    let http = reqwest::Client::new();

    let (base, stop) = serve(app(&redis)).await?;
    let first = http.get(format!("{base}/visits")).send().await?;
    let cookie = first.headers()["set-cookie"]
        .to_str()?
        .split(';')
        .next()
        .ok_or("no cookie")?
        .to_owned();
    assert_eq!(first.text().await?, "1");
    let again = http
        .get(format!("{base}/visits"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(again.text().await?, "2");
    stop.cancel();

    // A new process: new router, new store, same Redis.
    let (base, stop) = serve(app(&redis)).await?;
    let after = http
        .get(format!("{base}/visits"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(after.text().await?, "3", "the session outlived the service");
    let stranger = http.get(format!("{base}/visits")).send().await?;
    assert_eq!(stranger.text().await?, "1");
    // Redis holds the session with an expiry.
    let mut conn = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", redis.key("session:")))
        .query_async(&mut conn)
        .await?;
    assert_eq!(keys.len(), 2);
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut conn).await?;
    assert!(ttl > 0, "sessions expire in Redis");
    stop.cancel();
    Ok(())
}
