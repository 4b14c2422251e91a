//! The HTTP edge: every client mistake a 4xx in one shape, RFC 9457 problem details
//! (`application/problem+json`), checked before anything touches the database.
//!
//! - [`Problem`]: the response type of a handler's errors, with extension members such
//!   as a list of invalid fields.
//! - [`problem_layer`]: turns the plain-text rejections of axum's own extractors (a body
//!   that is not JSON, a missing field, a path that is not a UUID, an oversized body, an
//!   unknown route or method) into problems of the same shape.
//! - [`Fields`]: validation of request fields that collects every mistake at once.
//! - [`IfMatch`] and [`etag`]: optimistic concurrency on versioned resources.
//! - [`idempotency`]: `Idempotency-Key` for `POST` endpoints — a duplicate gets the first
//!   answer, not a second effect.

pub mod idempotency;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use problem_details::ProblemDetails;
use serde_json::{Map, Value};

/// The media type of problem details.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// How much of a rejection's text [`problem_layer`] keeps as the problem's detail.
const MAX_DETAIL: usize = 4096;

/// An RFC 9457 problem: status, title, detail, and extension members.
///
/// ```
/// use axum::http::StatusCode;
/// use dbps_service::http::Problem;
///
/// let problem = Problem::new(StatusCode::CONFLICT)
///     .detail("customer 7 is at version 4, not 3")
///     .with("current_version", 4);
/// assert_eq!(problem.status(), StatusCode::CONFLICT);
/// ```
#[derive(Debug, Clone)]
pub struct Problem {
    // Boxed: handlers return `Result<_, Problem>`, and the details are large.
    details: Box<ProblemDetails<Map<String, Value>>>,
    status: StatusCode,
}

impl Problem {
    /// A problem with `status` and its standard reason phrase as the title.
    pub fn new(status: StatusCode) -> Self {
        Self {
            details: Box::new(ProblemDetails::from_status_code(status).with_extensions(Map::new())),
            status,
        }
    }

    /// 404 for `what` (`customer 0195...`).
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND).detail(format!("{what} not found"))
    }

    /// 503: the service cannot answer now (its database is unreachable, say); the client
    /// may retry. The detail says nothing about the cause: log that yourself, without the
    /// request's personal data.
    pub fn unavailable() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE).detail("the service cannot answer now; retry later")
    }

    /// The human-readable explanation of this occurrence.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.details.detail = Some(detail.into());
        self
    }

    /// A short, stable summary (instead of the status's reason phrase).
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.details.title = Some(title.into());
        self
    }

    /// An extension member.
    pub fn with(mut self, name: &str, value: impl serde::Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.details.extensions.insert(name.to_owned(), value);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&*self.details).unwrap_or_default();
        (self.status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response()
    }
}

/// A middleware (`router.layer(axum::middleware::from_fn(problem_layer))`) that turns
/// every error response that is not JSON already — axum's extractor rejections, its 404
/// and 405 — into a [`Problem`] with the same status, the rejection's text as detail.
pub async fn problem_layer(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&response) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_DETAIL).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let mut problem = Problem::new(status);
    if !text.trim().is_empty() {
        problem = problem.detail(text.trim());
    }
    let mut converted = problem.into_response();
    // Keep headers such as `Allow` (405) and `Retry-After`.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            converted.headers_mut().insert(name, value.clone());
        }
    }
    converted
}

fn is_json(response: &Response<Body>) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with(PROBLEM_JSON))
}

/// Collects the mistakes in a request's fields, so the client hears of all of them at
/// once: `422` with `errors: [{field, detail}]`.
///
/// ```
/// use dbps_service::http::Fields;
///
/// let mut fields = Fields::new();
/// let name = fields.text("name", " Ada Lovelace ", 200);
/// fields.email("email", "not an address");
/// let problem = fields.finish().unwrap_err();
/// assert_eq!(problem.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
/// assert_eq!(name, "Ada Lovelace");
/// ```
#[derive(Debug, Default)]
pub struct Fields {
    errors: Vec<Value>,
}

impl Fields {
    /// No mistakes yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a mistake in `field`.
    pub fn invalid(&mut self, field: &str, detail: impl Into<String>) {
        self.errors
            .push(serde_json::json!({ "field": field, "detail": detail.into() }));
    }

    /// A text field: trimmed, 1 to `max_chars` characters (not bytes), no control
    /// characters (a NUL byte cannot be stored by PostgreSQL, and none belongs in a name).
    /// Returns the trimmed text (empty if invalid).
    pub fn text<'a>(&mut self, field: &str, value: &'a str, max_chars: usize) -> &'a str {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            self.invalid(field, "must not be empty");
        } else if trimmed.chars().count() > max_chars {
            self.invalid(field, format!("must have at most {max_chars} characters"));
        } else if trimmed.chars().any(char::is_control) {
            self.invalid(field, "must not contain control characters");
        } else {
            return trimmed;
        }
        ""
    }

    /// An optional text field, as [`Fields::text`] when present.
    pub fn optional_text<'a>(&mut self, field: &str, value: Option<&'a str>, max_chars: usize) -> Option<&'a str> {
        value.map(|v| self.text(field, v, max_chars))
    }

    /// An email address (RFC 5322 syntax, at most 254 characters), trimmed.
    pub fn email<'a>(&mut self, field: &str, value: &'a str) -> &'a str {
        let trimmed = self.text(field, value, 254);
        if trimmed.is_empty() {
            return trimmed;
        }
        if email_address::EmailAddress::parse_with_options(trimmed, email_address::Options::default()).is_err()
            || !trimmed.contains('@')
        {
            self.invalid(field, "must be an email address");
            return "";
        }
        trimmed
    }

    /// An optional email address, as [`Fields::email`] when present.
    pub fn optional_email<'a>(&mut self, field: &str, value: Option<&'a str>) -> Option<&'a str> {
        value.map(|v| self.email(field, v))
    }

    /// `Ok` if every field was valid, else the `422` problem listing the mistakes.
    pub fn finish(self) -> Result<(), Problem> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(Problem::new(StatusCode::UNPROCESSABLE_ENTITY)
            .detail("the request has invalid fields")
            .with("errors", self.errors))
    }
}

/// The version a client expects a resource to be at, from `If-Match: "<version>"` (the
/// [`etag`] of the resource it read); `None` without the header. A header that is not
/// such an entity tag is a `400` problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfMatch(pub Option<i64>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            return Ok(Self(None));
        };
        let invalid =
            || Problem::new(StatusCode::BAD_REQUEST).detail("If-Match must be the entity tag of a version, like \"3\"");
        let text = value.to_str().map_err(|_| invalid())?.trim();
        let text = text.strip_prefix("W/").unwrap_or(text);
        let version = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(invalid)?;
        Ok(Self(Some(version)))
    }
}

/// The entity tag of a resource at `version` (`"3"`), for the `ETag` header.
pub fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// `412` for an update whose `If-Match` names another version than the current one.
pub fn version_conflict(expected: i64, current: i64) -> Problem {
    Problem::new(StatusCode::PRECONDITION_FAILED)
        .detail(format!(
            "the resource is at version {current}, not {expected}: read it again"
        ))
        .with("current_version", current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_count_characters_and_refuse_control_characters() {
        let mut fields = Fields::new();
        assert_eq!(fields.text("name", &"ü".repeat(200), 200).chars().count(), 200);
        assert!(fields.finish().is_ok());
        for bad in ["", "   ", "a\u{0}b", "tab\there"] {
            let mut fields = Fields::new();
            assert_eq!(fields.text("name", bad, 200), "");
            assert!(fields.finish().is_err(), "{bad:?}");
        }
        let mut fields = Fields::new();
        fields.text("name", &"ü".repeat(201), 200);
        assert!(fields.finish().is_err());
    }

    #[test]
    fn emails_are_checked() {
        for good in ["ada@example.com", " ada.lovelace+quotes@example.co.uk "] {
            let mut fields = Fields::new();
            assert_eq!(fields.email("email", good), good.trim());
            assert!(fields.finish().is_ok(), "{good}");
        }
        for bad in [" @x", "no-at-sign", "a@", "@example.com", "a b@example.com"] {
            let mut fields = Fields::new();
            fields.email("email", bad);
            assert!(fields.finish().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn problems_are_problem_json_with_their_extensions() {
        let response = Problem::new(StatusCode::CONFLICT)
            .detail("taken")
            .with("current_version", 4)
            .into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some(PROBLEM_JSON)
        );
    }

    #[test]
    fn etags_round_trip() {
        assert_eq!(etag(3), HeaderValue::from_static("\"3\""));
    }
}
