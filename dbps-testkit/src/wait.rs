//! Waiting for something to become true, with a deadline instead of a sleep.

use std::time::Duration;

use crate::error::{Error, Result};

/// How long [`eventually`] and [`wait_for`] wait before they give up.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How often they check.
const INTERVAL: Duration = Duration::from_millis(20);

/// Checks `check` until it returns `true`, for up to [`DEADLINE`]; an error from the check
/// ends the wait at once.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), dbps_testkit::Error> {
/// dbps_testkit::eventually("the order to be shipped", || async {
///     let (state,): (String,) = sqlx::query_as("select state from orders where id = 1").fetch_one(&pool).await?;
///     Ok::<_, sqlx::Error>(state == "shipped")
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn eventually<F, Fut, E>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<bool, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    wait_for(what, || {
        let checked = check();
        async move { checked.await.map(|done| done.then_some(())) }
    })
    .await
}

/// Checks `check` until it returns `Some(value)`, for up to [`DEADLINE`], and returns the
/// value; an error from the check ends the wait at once.
pub async fn wait_for<T, F, Fut, E>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Option<T>, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = tokio::time::Instant::now();
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => {
                return Err(Error::Check {
                    what: what.to_owned(),
                    source: error.into(),
                });
            }
        }
        if started.elapsed() >= DEADLINE {
            return Err(Error::TimedOut {
                what: what.to_owned(),
                after: DEADLINE,
            });
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let mut calls = 0;
        let value = wait_for("three calls", || {
            calls += 1;
            let now = calls;
            async move { Ok::<_, Error>((now == 3).then_some(now)) }
        })
        .await
        .expect("reached");
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn a_failing_check_ends_the_wait() {
        let error = eventually("a broken check", || async { Err::<bool, _>("boom") })
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Check { .. }), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_deadline() {
        let error = eventually("never", || async { Ok::<_, Error>(false) })
            .await
            .unwrap_err();
        assert!(matches!(error, Error::TimedOut { .. }), "{error}");
        assert_eq!(error.to_string(), "timed out after 60s waiting for never");
    }
}
