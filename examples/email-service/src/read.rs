//! The read endpoints: an email, an attachment's bytes, a customer's emails.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use dbps_service::http::{Fields, Problem};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::assign::to_chrono;
use crate::ingest::{chunk_id, hex};
use crate::model::{EmailPage, EmailRecord, EmailSummary, EmailView};
use crate::{App, unavailable};
use sha2::{Digest as _, Sha256};

/// Emails in a page of `GET /customers/{id}/emails` unless the request says otherwise.
const DEFAULT_PAGE: u32 = 50;
/// Most emails in a page.
const MAX_PAGE: u32 = 500;
/// The longest id the service gives an email (a UUID, or a message id of another
/// producer for a notification).
const MAX_ID: usize = 200;

fn email_id(raw: &str) -> Result<&str, Problem> {
    if raw.is_empty() || raw.len() > MAX_ID || raw.chars().any(char::is_control) {
        return Err(Problem::not_found(format!("email {raw:.40}")));
    }
    Ok(raw)
}

async fn load(app: &App, id: &str) -> Result<EmailRecord, Problem> {
    app.emails()
        .find_one(doc! { "_id": id })
        .await
        .map_err(|error| unavailable(&error))?
        .ok_or_else(|| Problem::not_found(format!("email {id}")))
}

/// `GET /emails/{id}`.
pub(crate) async fn get_email(State(app): State<App>, Path(id): Path<String>) -> Result<Json<EmailView>, Problem> {
    let id = email_id(&id)?;
    let record = load(&app, id).await?;
    let assignment = app
        .assigner()
        .assignment(id)
        .await
        .map_err(|error| unavailable(&error))?;
    Ok(Json(record.view(assignment)))
}

/// `GET /emails/{id}/attachments/{n}`: the bytes, reassembled from their chunks.
pub(crate) async fn get_attachment(
    State(app): State<App>,
    Path((id, n)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let id = email_id(&id)?;
    let record = load(&app, id).await?;
    let attachment = n
        .parse::<i64>()
        .ok()
        .and_then(|n| record.attachments.iter().find(|a| a.n == n))
        .ok_or_else(|| Problem::not_found(format!("attachment {n:.20} of email {id}")))?;
    let mut bytes = Vec::with_capacity(usize::try_from(attachment.size).unwrap_or_default());
    for chunk in 0..attachment.chunks {
        let found = app
            .chunks()
            .find_one(doc! { "_id": chunk_id(id, attachment.n, chunk) })
            .await
            .map_err(|error| unavailable(&error))?;
        match found.as_ref().and_then(|c| c.get_binary_generic("data").ok()) {
            Some(data) => bytes.extend_from_slice(data),
            None => return Err(damaged(id, attachment.n, "a chunk is missing")),
        }
    }
    if bytes.len() as i64 != attachment.size || hex(&Sha256::digest(&bytes)) != attachment.sha256 {
        return Err(damaged(id, attachment.n, "its bytes do not match its checksum"));
    }
    let disposition = match &attachment.filename {
        Some(name) => format!("attachment; filename=\"{}\"", quoted(name)),
        None => String::from("attachment"),
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, attachment.content_type.clone()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response())
}

/// A stored attachment that cannot be reassembled: the service's fault, `500`.
fn damaged(id: &str, n: i64, why: &str) -> Problem {
    tracing::error!(email = %id, attachment = n, why, "attachment damaged");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR).detail(format!("attachment {n} of email {id} is damaged: {why}"))
}

/// A file name inside a quoted string of a header: printable ASCII, without quotes and
/// backslashes.
fn quoted(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The query of `GET /customers/{id}/emails`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListEmails {
    /// Most emails in the page: 1 to 500, default 50.
    pub limit: Option<u32>,
    /// Only emails whose id comes after this one (the previous page's `next`).
    pub after: Option<String>,
}

/// `GET /customers/{id}/emails`: the emails assigned to the customer, oldest first (by
/// id, which is time-ordered).
pub(crate) async fn customer_emails(
    State(app): State<App>,
    Path(customer): Path<String>,
    Query(query): Query<ListEmails>,
) -> Result<Json<EmailPage>, Problem> {
    let customer: Uuid = customer
        .parse()
        .map_err(|_| Problem::not_found(format!("customer {customer:.40}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        let mut fields = Fields::new();
        fields.invalid("limit", format!("must be 1 to {MAX_PAGE}"));
        fields.finish()?;
    }
    let mut filter = doc! { "customer_id": customer.to_string() };
    if let Some(after) = &query.after {
        filter.insert("email_id", doc! { "$gt": after });
    }
    let assignments: Vec<Document> = app
        .assignments()
        .find(filter)
        .projection(doc! { "email_id": 1, "assigned_at": 1 })
        .sort(doc! { "email_id": 1 })
        .limit(i64::from(limit) + 1)
        .await
        .map_err(|error| unavailable(&error))?
        .try_collect()
        .await
        .map_err(|error| unavailable(&error))?;
    let more = assignments.len() > limit as usize;
    let assignments: Vec<(String, mongodb::bson::DateTime)> = assignments
        .iter()
        .take(limit as usize)
        .filter_map(|a| {
            Some((
                a.get_str("email_id").ok()?.to_owned(),
                *a.get_datetime("assigned_at").ok()?,
            ))
        })
        .collect();
    let ids: Vec<&str> = assignments.iter().map(|(id, _)| id.as_str()).collect();
    let records: HashMap<String, EmailRecord> = app
        .emails()
        .find(doc! { "_id": { "$in": &ids } })
        .projection(doc! { "headers": 0, "text": 0, "html": 0, "raw": 0 })
        .await
        .map_err(|error| unavailable(&error))?
        .try_collect::<Vec<_>>()
        .await
        .map_err(|error| unavailable(&error))?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let emails: Vec<EmailSummary> = assignments
        .iter()
        .filter_map(|(id, assigned_at)| {
            let record = records.get(id)?;
            Some(EmailSummary {
                id: record.id.clone(),
                message_id: record.message_id.clone(),
                from: record.from.clone(),
                subject: record.subject.clone(),
                received_at: to_chrono(record.received_at),
                assigned_at: to_chrono(*assigned_at),
                attachments: record.attachments.len(),
            })
        })
        .collect();
    let next = more.then(|| assignments.last().map(|(id, _)| id.clone())).flatten();
    Ok(Json(EmailPage { emails, next }))
}
