//! The sales rep's notifications: `quote.SalesRepNotificationRequested` in, an email
//! recorded as `sending` out (the delivery worker in [`crate::delivery`] sends it).
//!
//! The consumer records each request once, however often Kafka delivers it: the email's
//! document has the request's message id as its `_id`, and
//! `dbps_core::inbox::mongo::insert_once` inserts it unless it exists — the MongoDB inbox
//! on the single-document path, which needs no transaction. The document holds the whole
//! message as it will be sent (`raw`), rendered once with its one `Message-ID`, derived
//! from the request: `<notification-{request's message id}@email.dbps>`. Every attempt,
//! by any instance, sends these same bytes.

use std::sync::Arc;
use std::time::SystemTime;

use dbps_core::inbox::mongo::{Applied, insert_once};
use dbps_core::{Envelope, HandlerError, TypedHandler};
use example_contracts::quote::{QuoteEvent, SalesRepNotificationRequested};
use lettre::message::{Mailbox as LettreMailbox, MultiPart};
use mongodb::Collection;
use mongodb::bson::{self, Document, spec::BinarySubtype};
use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;

use crate::failpoint::{Failpoint, Failpoints};
use crate::ingest::hex;
use crate::model::{Delivery, DeliveryStatus, Direction, EmailRecord, Mailbox, MissingLine, NotificationRecord};

/// The domain of the notifications' `Message-ID`s.
pub const MESSAGE_ID_DOMAIN: &str = "email.dbps";

/// The `Message-ID` (without angle brackets) of the notification that answers the request
/// with message id `request_id`: the same for every delivery of the request and every
/// attempt to send it.
pub fn notification_message_id(request_id: &str) -> String {
    let safe = !request_id.is_empty()
        && request_id.len() <= 100
        && request_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    let token = if safe {
        request_id.to_owned()
    } else {
        // Another producer's id with characters a Message-ID cannot carry: its digest.
        hex(&Sha256::digest(request_id.as_bytes()))
    };
    format!("notification-{token}@{MESSAGE_ID_DOMAIN}")
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.chars().fold(String::with_capacity(text.len()), |mut s, c| {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            '\'' => s.push_str("&#39;"),
            other => s.push(other),
        }
        s
    })
}

/// The subject of a notification.
fn subject(request: &SalesRepNotificationRequested) -> String {
    format!("Quote {} is pending stock", request.quote_id)
}

/// The plain-text body.
fn text(request: &SalesRepNotificationRequested) -> String {
    let mut text = format!(
        "Quote {quote} for customer {customer} is pending stock.\n\nReason: {reason}\n\n",
        quote = request.quote_id,
        customer = request.customer_id,
        reason = request.reason,
    );
    if request.missing.is_empty() {
        text.push_str("The inventory did not say which products are short.\n");
    } else {
        text.push_str("Missing products:\n");
        for line in &request.missing {
            text.push_str(&format!(
                "  - product {}: {} requested, {} available\n",
                line.product_id, line.requested, line.available
            ));
        }
    }
    text.push_str(&format!(
        "\nQuote: {}\nCustomer: {}\n",
        request.quote_id, request.customer_id
    ));
    text
}

/// The HTML body.
fn html(request: &SalesRepNotificationRequested) -> String {
    let mut html = format!(
        "<!DOCTYPE html>\n<html><body>\n<p>Quote <strong>{quote}</strong> for customer <strong>{customer}</strong> \
         is pending stock.</p>\n<p>Reason: {reason}</p>\n",
        quote = request.quote_id,
        customer = request.customer_id,
        reason = escape(&request.reason),
    );
    if request.missing.is_empty() {
        html.push_str("<p>The inventory did not say which products are short.</p>\n");
    } else {
        html.push_str(
            "<table>\n<thead><tr><th>Product</th><th>Requested</th><th>Available</th></tr></thead>\n<tbody>\n",
        );
        for line in &request.missing {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                line.product_id, line.requested, line.available
            ));
        }
        html.push_str("</tbody>\n</table>\n");
    }
    html.push_str("</body></html>\n");
    html
}

/// Renders the notification of `request` (the message with id `request_id`) from
/// `sender`, recorded as `sending`. A sales rep address that is not one is a permanent
/// failure (the request is dead-lettered).
pub(crate) fn render(
    sender: &LettreMailbox,
    request: &SalesRepNotificationRequested,
    request_id: &str,
) -> Result<EmailRecord, HandlerError> {
    let to: LettreMailbox = request
        .sales_rep
        .trim()
        .parse()
        .map_err(|e| HandlerError::permanent(format!("the sales rep's address cannot be mailed to: {e}")))?;
    let message_id = notification_message_id(request_id);
    let (subject, text, html) = (subject(request), text(request), html(request));
    let message = lettre::Message::builder()
        .message_id(Some(format!("<{message_id}>")))
        .from(sender.clone())
        .to(to.clone())
        .subject(subject.clone())
        .date(SystemTime::now())
        .multipart(MultiPart::alternative_plain_html(text.clone(), html.clone()))
        .map_err(|e| HandlerError::permanent(format!("the notification cannot be built: {e}")))?;
    let raw = message.formatted();
    // The headers as the message carries them, read back as an inbound email's are.
    let parsed = crate::ingest::parse(&raw, usize::MAX)
        .map_err(|_| HandlerError::permanent("the rendered notification does not parse"))?;
    let now = bson::DateTime::now();
    Ok(EmailRecord {
        id: request_id.to_owned(),
        message_id,
        direction: Direction::Outbound,
        from: Some(Mailbox {
            name: sender.name.clone(),
            address: sender.email.to_string(),
        }),
        from_address: None,
        to: vec![Mailbox {
            name: to.name.clone(),
            address: to.email.to_string(),
        }],
        cc: Vec::new(),
        subject: Some(subject),
        date: Some(now),
        headers: parsed.headers,
        text: Some(text),
        html: Some(html),
        attachments: Vec::new(),
        size: raw.len() as i64,
        received_at: now,
        customer_id: None,
        assigned_at: None,
        notification: Some(NotificationRecord {
            request_id: request_id.to_owned(),
            quote_id: request.quote_id.to_string(),
            customer_id: request.customer_id.to_string(),
            reason: request.reason.clone(),
            missing: request
                .missing
                .iter()
                .map(|m| MissingLine {
                    product_id: m.product_id.to_string(),
                    requested: m.requested,
                    available: m.available,
                })
                .collect(),
        }),
        delivery: Some(Delivery {
            status: DeliveryStatus::Sending,
            recipient: to.email.to_string(),
            attempts: 0,
            next_attempt_at: now,
            last_attempt_at: None,
            last_error: None,
            sent_at: None,
            smtp_reply: None,
        }),
        raw: Some(bson::Binary {
            subtype: BinarySubtype::Generic,
            bytes: raw,
        }),
    })
}

/// The consumer's handler of the quote service's events: records each notification
/// request once and wakes the delivery worker. Other quote events are not its concern.
#[derive(Debug, Clone)]
pub struct NotificationRequests {
    emails: Collection<Document>,
    sender: LettreMailbox,
    wake: Arc<Notify>,
    failpoints: Failpoints,
}

impl NotificationRequests {
    pub(crate) fn new(
        emails: Collection<Document>,
        sender: LettreMailbox,
        wake: Arc<Notify>,
        failpoints: Failpoints,
    ) -> Self {
        Self {
            emails,
            sender,
            wake,
            failpoints,
        }
    }
}

impl TypedHandler<QuoteEvent> for NotificationRequests {
    async fn handle(&self, event: QuoteEvent, envelope: &Envelope) -> Result<(), HandlerError> {
        let QuoteEvent::NotificationRequested(request) = event else {
            return Ok(());
        };
        self.failpoints.pass(Failpoint::BeforeRecord).await;
        let record = render(&self.sender, &request, &envelope.id)?;
        let document = bson::to_document(&record).map_err(HandlerError::permanent)?;
        match insert_once(&self.emails, envelope, document).await? {
            Applied::Applied => {
                tracing::info!(email = %envelope.id, quote = %request.quote_id, "notification recorded");
            }
            Applied::Duplicate => {
                tracing::info!(email = %envelope.id, "notification request delivered again; recorded before");
            }
        }
        self.wake.notify_one();
        Ok(())
    }
}
