//! The documents of the `emails` collection, as the service writes and reads them, and
//! the JSON views of the HTTP API.

use chrono::{DateTime, Utc};
use mongodb::bson;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::assign::to_chrono;

/// Which way an email went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Received (`POST /emails`).
    Inbound,
    /// Sent by the service (a notification).
    Outbound,
}

/// A mailbox of an address header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// The display name, if any.
    pub name: Option<String>,
    /// The address.
    pub address: String,
}

/// One header field as the message had it (unfolded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderField {
    /// The field name, as written.
    pub name: String,
    /// The value, unfolded and trimmed, not decoded.
    pub value: String,
}

/// An attachment's metadata, kept in its email's document; its bytes are in
/// `email_attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentMeta {
    /// Its position among the email's attachments, from 0 (the `{n}` of its URL).
    pub n: i64,
    /// Its file name, if it has one.
    pub filename: Option<String>,
    /// Its media type (`application/pdf`).
    pub content_type: String,
    /// Its size in bytes, decoded.
    pub size: i64,
    /// How many chunks hold it.
    pub chunks: i64,
    /// The SHA-256 of its bytes, in hex.
    pub sha256: String,
}

/// The state of an outbound email's delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Recorded; being sent, or to be sent (again) at `next_attempt_at`.
    Sending,
    /// The SMTP server accepted it.
    Sent,
    /// Given up: the server refused it permanently, or every attempt failed.
    Failed,
}

/// An outbound email's delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Where it stands.
    pub status: DeliveryStatus,
    /// The recipient (the SMTP envelope's).
    pub recipient: String,
    /// Attempts started so far.
    pub attempts: i64,
    /// When the next attempt is due (while `sending`); an attempt in flight pushes it one
    /// lease ahead, so that another instance does not take it meanwhile.
    pub next_attempt_at: bson::DateTime,
    /// When the last attempt started.
    pub last_attempt_at: Option<bson::DateTime>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the server accepted it.
    pub sent_at: Option<bson::DateTime>,
    /// The server's reply to the message.
    pub smtp_reply: Option<String>,
}

/// What a notification is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRecord {
    /// The id of the `quote.SalesRepNotificationRequested` message it answers.
    pub request_id: String,
    /// The quote.
    pub quote_id: String,
    /// Its customer.
    pub customer_id: String,
    /// Why the sales rep is told.
    pub reason: String,
    /// What the inventory was short of.
    pub missing: Vec<MissingLine>,
}

/// A product the inventory was short of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingLine {
    /// The product.
    pub product_id: String,
    /// How many the quote asked for.
    pub requested: i64,
    /// How many were available.
    pub available: i64,
}

/// A document of `emails`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EmailRecord {
    #[serde(rename = "_id")]
    pub(crate) id: String,
    /// Without angle brackets; unique.
    pub(crate) message_id: String,
    pub(crate) direction: Direction,
    pub(crate) from: Option<Mailbox>,
    /// The sender's address in lower case (what assignment looks up).
    pub(crate) from_address: Option<String>,
    #[serde(default)]
    pub(crate) to: Vec<Mailbox>,
    #[serde(default)]
    pub(crate) cc: Vec<Mailbox>,
    pub(crate) subject: Option<String>,
    /// The `Date` header.
    pub(crate) date: Option<bson::DateTime>,
    #[serde(default)]
    pub(crate) headers: Vec<HeaderField>,
    pub(crate) text: Option<String>,
    pub(crate) html: Option<String>,
    #[serde(default)]
    pub(crate) attachments: Vec<AttachmentMeta>,
    /// The raw message's size in bytes.
    pub(crate) size: i64,
    /// When it was received (inbound) or recorded (outbound).
    pub(crate) received_at: bson::DateTime,
    /// The customer it is assigned to: a copy of `email_assignments`, `null` while
    /// pending (inbound) or never (outbound).
    pub(crate) customer_id: Option<String>,
    pub(crate) assigned_at: Option<bson::DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) notification: Option<NotificationRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) delivery: Option<Delivery>,
    /// The message exactly as it is sent (outbound): every attempt sends these bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) raw: Option<bson::Binary>,
}

/// `GET /emails/{id}`: an email with its headers, bodies and attachments' metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmailView {
    /// The service's id for it.
    pub id: String,
    /// Its `Message-ID`, without angle brackets.
    pub message_id: String,
    /// Received or sent.
    pub direction: Direction,
    /// The sender.
    pub from: Option<Mailbox>,
    /// The recipients.
    pub to: Vec<Mailbox>,
    /// The copied recipients.
    pub cc: Vec<Mailbox>,
    /// The subject.
    pub subject: Option<String>,
    /// The `Date` header.
    pub date: Option<DateTime<Utc>>,
    /// When the service received (or recorded) it.
    pub received_at: DateTime<Utc>,
    /// Every header field, in order.
    pub headers: Vec<HeaderField>,
    /// The plain-text body.
    pub text: Option<String>,
    /// The HTML body.
    pub html: Option<String>,
    /// The attachments (their bytes at `/emails/{id}/attachments/{n}`).
    pub attachments: Vec<AttachmentView>,
    /// The customer it is assigned to; `null` while none is known.
    pub customer_id: Option<Uuid>,
    /// When it was assigned.
    pub assigned_at: Option<DateTime<Utc>>,
    /// For a notification: what it is about.
    pub notification: Option<NotificationRecord>,
    /// For a notification: its delivery.
    pub delivery: Option<DeliveryView>,
}

/// An attachment's metadata in a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    /// Its position, from 0.
    pub n: i64,
    /// Its file name.
    pub filename: Option<String>,
    /// Its media type.
    pub content_type: String,
    /// Its size in bytes.
    pub size: i64,
    /// The SHA-256 of its bytes, in hex.
    pub sha256: String,
}

/// A notification's delivery in a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryView {
    /// `sending`, `sent` or `failed`.
    pub status: DeliveryStatus,
    /// The recipient.
    pub recipient: String,
    /// Attempts started.
    pub attempts: i64,
    /// When the server accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// An email in a customer's list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailSummary {
    /// The service's id for it.
    pub id: String,
    /// Its `Message-ID`.
    pub message_id: String,
    /// The sender.
    pub from: Option<Mailbox>,
    /// The subject.
    pub subject: Option<String>,
    /// When it was received.
    pub received_at: DateTime<Utc>,
    /// When it was assigned to the customer.
    pub assigned_at: DateTime<Utc>,
    /// How many attachments it has.
    pub attachments: usize,
}

/// `GET /customers/{id}/emails`: a page of the emails assigned to a customer, oldest
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailPage {
    /// The emails of this page.
    pub emails: Vec<EmailSummary>,
    /// The id to ask the next page `after`; `None` on the last page.
    pub next: Option<String>,
}

impl EmailRecord {
    /// The view, with the assignment as `email_assignments` holds it.
    pub(crate) fn view(self, assignment: Option<(Uuid, bson::DateTime)>) -> EmailView {
        EmailView {
            id: self.id,
            message_id: self.message_id,
            direction: self.direction,
            from: self.from,
            to: self.to,
            cc: self.cc,
            subject: self.subject,
            date: self.date.map(to_chrono),
            received_at: to_chrono(self.received_at),
            headers: self.headers,
            text: self.text,
            html: self.html,
            attachments: self
                .attachments
                .into_iter()
                .map(|a| AttachmentView {
                    n: a.n,
                    filename: a.filename,
                    content_type: a.content_type,
                    size: a.size,
                    sha256: a.sha256,
                })
                .collect(),
            customer_id: assignment.map(|(customer, _)| customer),
            assigned_at: assignment.map(|(_, at)| to_chrono(at)),
            notification: self.notification,
            delivery: self.delivery.map(|d| DeliveryView {
                status: d.status,
                recipient: d.recipient,
                attempts: d.attempts,
                sent_at: d.sent_at.map(to_chrono),
                last_error: d.last_error,
            }),
        }
    }
}
