//! `POST /emails`: an RFC 5322 message in, stored with its attachments and assigned to
//! its sender's customer.
//!
//! # Nothing half-written
//!
//! Every check comes first — the request's media type, the message's syntax, its
//! `Message-ID` and `From`, each attachment's size, the size of what goes into the email
//! document — and answers a 4xx problem before anything is written. Then:
//!
//! 1. the attachments' chunks are written, each naming the new email's id;
//! 2. the email's document is inserted — the one write that makes the email, its
//!    attachments and its `Message-ID` exist (the unique index on `message_id` refuses a
//!    second email with the same one);
//! 3. the email is assigned, if its sender's address is a customer's.
//!
//! Readers reach chunks only through their email's document, so chunks without one are
//! invisible. A failure between 1 and 2 deletes the chunks written (and one that leaves
//! them — a crash, a dropped connection — is swept an hour later); a failure after 2 leaves
//! a stored email that is simply not assigned yet, which the sweep finishes.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dbps_core::classify::is_duplicate_key;
use dbps_service::http::{Fields, Problem};
use mail_parser::{Address, MessageParser, MimeHeaders as _};
use mongodb::bson::{self, Document, doc, spec::BinarySubtype};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::assign::{Sender, normalize_address};
use crate::model::{AttachmentMeta, Direction, EmailRecord, EmailView, HeaderField, Mailbox};
use crate::store::CHUNK_SIZE;
use crate::{App, unavailable};

/// The media type of `POST /emails`.
pub const MESSAGE_RFC822: &str = "message/rfc822";

/// The most bytes the email's own document (headers, text and HTML, metadata) may take:
/// well below MongoDB's 16 MiB per document.
pub const MAX_EMAIL_DOCUMENT: usize = 8 * 1024 * 1024;

/// The most attachments one email may have.
pub const MAX_ATTACHMENTS: usize = 100;

/// The longest `Message-ID` (RFC 5322's line limit).
const MAX_MESSAGE_ID: usize = 998;

/// A message checked and ready to be stored.
#[derive(Debug)]
pub(crate) struct Incoming {
    message_id: String,
    from: Mailbox,
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    subject: Option<String>,
    date: Option<bson::DateTime>,
    pub(crate) headers: Vec<HeaderField>,
    text: Option<String>,
    html: Option<String>,
    attachments: Vec<IncomingAttachment>,
    size: usize,
}

#[derive(Debug)]
struct IncomingAttachment {
    filename: Option<String>,
    content_type: String,
    bytes: Vec<u8>,
}

fn mailboxes(address: Option<&Address<'_>>) -> Vec<Mailbox> {
    address
        .map(|a| {
            a.iter()
                .filter_map(|addr| {
                    Some(Mailbox {
                        name: addr.name().map(str::to_owned),
                        address: addr.address()?.to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A header's raw value, unfolded and trimmed (not decoded: encoded words stay as they
/// were sent).
fn unfold(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut value = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {}
            other => value.push(other),
        }
    }
    value.trim().to_owned()
}

/// Whether `raw` starts with a header section (RFC 5322, 2.2): one or more lines that are
/// header fields (`name:` followed by the value, the name printable ASCII without a
/// colon) or their folded continuations, up to an empty line or the end. The parser
/// itself takes anything; this is what tells a message from other bytes.
fn well_formed_header_section(raw: &[u8]) -> bool {
    let mut fields = 0;
    for line in raw.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if fields == 0 {
                return false;
            }
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return false;
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
            return false;
        }
        fields += 1;
    }
    fields > 0
}

/// Parses and checks a raw message; every mistake is a 4xx problem.
pub(crate) fn parse(raw: &[u8], max_attachment_bytes: usize) -> Result<Incoming, Problem> {
    let not_a_message = || {
        Problem::new(StatusCode::BAD_REQUEST)
            .title("Not an RFC 5322 message")
            .detail("the body must be an RFC 5322 message: header fields, an empty line, the body")
    };
    if !well_formed_header_section(raw) {
        return Err(not_a_message());
    }
    let message = MessageParser::default().parse(raw).ok_or_else(not_a_message)?;
    let root = message.root_part();
    if root.headers.is_empty() || root.offset_body == 0 {
        return Err(not_a_message());
    }

    let mut fields = Fields::new();
    let message_id = match message.message_id() {
        Some(id) if id.is_empty() || id.len() > MAX_MESSAGE_ID => {
            fields.invalid("Message-ID", format!("must have 1 to {MAX_MESSAGE_ID} characters"));
            ""
        }
        Some(id) if id.chars().any(|c| c.is_control() || c.is_whitespace()) => {
            fields.invalid("Message-ID", "must not contain spaces or control characters");
            ""
        }
        Some(id) => id,
        None => {
            fields.invalid("Message-ID", "the message has no Message-ID");
            ""
        }
    };
    let from = message.from().and_then(|a| a.first());
    let from_address = match from.and_then(|f| f.address()) {
        Some(address) => fields.email("From", address),
        None => {
            fields.invalid("From", "the message has no sender address");
            ""
        }
    };
    let attachments: Vec<_> = message.attachments().collect();
    if attachments.len() > MAX_ATTACHMENTS {
        fields.invalid("attachments", format!("at most {MAX_ATTACHMENTS}"));
    }
    fields.finish()?;

    for (n, part) in attachments.iter().enumerate() {
        let size = part.contents().len();
        if size > max_attachment_bytes {
            return Err(Problem::new(StatusCode::PAYLOAD_TOO_LARGE)
                .title("Attachment too large")
                .detail(format!(
                    "attachment {n} has {size} bytes; the limit is {max_attachment_bytes}"
                ))
                .with("attachment", n)
                .with("filename", part.attachment_name())
                .with("size", size)
                .with("limit", max_attachment_bytes));
        }
    }

    let text = message
        .text_bodies()
        .find(|p| p.is_text() && !p.is_text_html())
        .and_then(|p| p.text_contents())
        .map(str::to_owned);
    let html = message
        .html_bodies()
        .find(|p| p.is_text_html())
        .and_then(|p| p.text_contents())
        .map(str::to_owned);
    let headers = root
        .headers
        .iter()
        .map(|h| HeaderField {
            name: h.name().to_owned(),
            value: unfold(
                raw.get(h.offset_start() as usize..h.offset_end() as usize)
                    .unwrap_or_default(),
            ),
        })
        .collect();
    Ok(Incoming {
        message_id: message_id.to_owned(),
        from: Mailbox {
            name: from.and_then(|f| f.name()).map(str::to_owned),
            address: from_address.to_owned(),
        },
        to: mailboxes(message.to()),
        cc: mailboxes(message.cc()),
        subject: message.subject().map(str::to_owned),
        date: message
            .date()
            .filter(|d| d.is_valid())
            .map(|d| bson::DateTime::from_millis(d.to_timestamp().saturating_mul(1000))),
        headers,
        text,
        html,
        attachments: attachments
            .iter()
            .map(|part| IncomingAttachment {
                filename: part.attachment_name().map(str::to_owned),
                content_type: part.content_type().map_or_else(
                    || String::from("application/octet-stream"),
                    |ct| match ct.subtype() {
                        Some(sub) => format!("{}/{sub}", ct.ctype()).to_ascii_lowercase(),
                        None => ct.ctype().to_ascii_lowercase(),
                    },
                ),
                bytes: part.contents().to_vec(),
            })
            .collect(),
        size: raw.len(),
    })
}

/// `POST /emails`.
pub(crate) async fn post_email(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some(MESSAGE_RFC822) {
        return Err(Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .detail(format!("the body must be a raw email, Content-Type: {MESSAGE_RFC822}")));
    }
    let limit = app.settings().max_attachment_bytes;
    // Decoding a message of megabytes is CPU work: off the request threads.
    let incoming = tokio::task::spawn_blocking(move || parse(&body, limit))
        .await
        .map_err(|error| unavailable(&error))??;
    let (status, view) = store(&app, incoming).await?;
    let location = format!("/emails/{}", view.id);
    Ok((status, [(header::LOCATION, location)], axum::Json(view)).into_response())
}

/// The email with this `Message-ID`, if one was stored.
async fn by_message_id(app: &App, message_id: &str) -> Result<Option<EmailRecord>, Problem> {
    app.emails()
        .find_one(doc! { "message_id": message_id })
        .await
        .map_err(|error| unavailable(&error))
}

/// The view of an email stored before: `200` with the first email's id.
async fn duplicate(app: &App, existing: EmailRecord) -> Result<(StatusCode, EmailView), Problem> {
    let assignment = app
        .assigner()
        .assignment(&existing.id)
        .await
        .map_err(|error| unavailable(&error))?;
    tracing::info!(email = %existing.id, "duplicate Message-ID; the email was stored before");
    Ok((StatusCode::OK, existing.view(assignment)))
}

/// Stores a checked message (see the module documentation for the order).
async fn store(app: &App, incoming: Incoming) -> Result<(StatusCode, EmailView), Problem> {
    if let Some(existing) = by_message_id(app, &incoming.message_id).await? {
        return duplicate(app, existing).await;
    }
    let id = Uuid::now_v7().to_string();
    let now = bson::DateTime::now();
    let attachments: Vec<AttachmentMeta> = incoming
        .attachments
        .iter()
        .enumerate()
        .map(|(n, a)| AttachmentMeta {
            n: n as i64,
            filename: a.filename.clone(),
            content_type: a.content_type.clone(),
            size: a.bytes.len() as i64,
            chunks: a.bytes.len().div_ceil(CHUNK_SIZE) as i64,
            sha256: hex(&Sha256::digest(&a.bytes)),
        })
        .collect();
    let from_address = normalize_address(&incoming.from.address);
    let record = EmailRecord {
        id: id.clone(),
        message_id: incoming.message_id.clone(),
        direction: Direction::Inbound,
        from: Some(incoming.from.clone()),
        from_address: Some(from_address.clone()),
        to: incoming.to,
        cc: incoming.cc,
        subject: incoming.subject.clone(),
        date: incoming.date,
        headers: incoming.headers,
        text: incoming.text,
        html: incoming.html,
        attachments,
        size: incoming.size as i64,
        received_at: now,
        customer_id: None,
        assigned_at: None,
        notification: None,
        delivery: None,
        raw: None,
    };
    let document = bson::to_document(&record).map_err(|error| unavailable(&error))?;
    let document_size = bson::to_vec(&document).map_err(|error| unavailable(&error))?.len();
    if document_size > MAX_EMAIL_DOCUMENT {
        return Err(Problem::new(StatusCode::PAYLOAD_TOO_LARGE)
            .title("Message text too large")
            .detail(format!(
                "the message's header fields and text take {document_size} bytes; the limit is {MAX_EMAIL_DOCUMENT}"
            )));
    }

    // 1. The chunks, invisible until the email exists.
    if let Err(error) = write_chunks(app, &id, &incoming.attachments, now).await {
        remove_chunks(app, &id).await;
        return Err(unavailable(&error));
    }
    // 2. The email: from here on it exists, with its attachments.
    match app.emails().insert_one(&record).await {
        Ok(_) => {}
        Err(error) if is_duplicate_key(&error) => {
            // Another request stored the same Message-ID meanwhile.
            remove_chunks(app, &id).await;
            return match by_message_id(app, &incoming.message_id).await? {
                Some(existing) => duplicate(app, existing).await,
                None => Err(unavailable(&error)),
            };
        }
        Err(error) => {
            // The insert may have been applied although its answer was lost: keep the
            // chunks if the email is there.
            match app.emails().find_one(doc! { "_id": &id }).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    remove_chunks(app, &id).await;
                    return Err(unavailable(&error));
                }
                Err(_) => return Err(unavailable(&error)),
            }
        }
    }
    tracing::info!(email = %id, attachments = incoming.attachments.len(), "email stored");

    // 3. The assignment; a failure leaves the email pending for the sweep.
    let sender = Sender {
        email_id: id.clone(),
        message_id: incoming.message_id,
        address: from_address.clone(),
        subject: incoming.subject,
        received_at: now,
    };
    let mut assignment = None;
    match app.assigner().customer_of(&from_address).await {
        Ok(Some(customer)) => match app.assigner().assign(&sender, customer).await {
            Ok(assigned) => assignment = Some(assigned),
            Err(error) => {
                tracing::warn!(email = %id, error = %dbps_core::ErrorChain(&error), "assignment failed; the sweep retries it");
            }
        },
        Ok(None) => tracing::info!(email = %id, "no customer has the sender's address yet"),
        Err(error) => tracing::warn!(email = %id, %error, "assignment failed; the sweep retries it"),
    }
    Ok((StatusCode::CREATED, record.view(assignment)))
}

/// Writes the attachments' chunks of email `id`.
async fn write_chunks(
    app: &App,
    id: &str,
    attachments: &[IncomingAttachment],
    now: bson::DateTime,
) -> Result<(), mongodb::error::Error> {
    for (attachment, part) in attachments.iter().enumerate() {
        for (n, chunk) in part.bytes.chunks(CHUNK_SIZE).enumerate() {
            let chunk: Document = doc! {
                "_id": chunk_id(id, attachment as i64, n as i64),
                "email_id": id,
                "attachment": attachment as i64,
                "n": n as i64,
                "data": bson::Binary { subtype: BinarySubtype::Generic, bytes: chunk.to_vec() },
                "written_at": now,
            };
            app.chunks().insert_one(chunk).await?;
        }
    }
    Ok(())
}

/// Deletes the chunks of email `id` after its ingest failed (best effort: the orphan
/// sweep removes what this leaves).
async fn remove_chunks(app: &App, id: &str) {
    if let Err(error) = app.chunks().delete_many(doc! { "email_id": id }).await {
        tracing::warn!(email = %id, %error, "could not remove the chunks of a failed ingest; the sweep will");
    }
}

/// The `_id` of a chunk: the email, the attachment's position and the chunk's number, so
/// that each chunk is read by its id.
pub(crate) fn chunk_id(email: &str, attachment: i64, n: i64) -> String {
    format!("{email}:{attachment}:{n}")
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &str = "From: Ada Lovelace <Ada@Example.com>\r\n\
        To: sales@example.com, Bob <bob@example.com>\r\n\
        Subject: Lathe\r\n\
        \tspare parts\r\n\
        Message-ID: <lathe-1@example.com>\r\n\
        Date: Tue, 1 Jul 2025 10:52:37 +0200\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
        \r\n\
        --b1\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        \r\n\
        Hello, can you quote?\r\n\
        --b1\r\n\
        Content-Type: application/pdf; name=\"drawing.pdf\"\r\n\
        Content-Disposition: attachment; filename=\"drawing.pdf\"\r\n\
        Content-Transfer-Encoding: base64\r\n\
        \r\n\
        JVBERi0xLjQK\r\n\
        --b1--\r\n";

    fn status(raw: &[u8], limit: usize) -> StatusCode {
        parse(raw, limit).map(|_| StatusCode::OK).unwrap_or_else(|p| p.status())
    }

    #[test]
    fn a_message_gives_its_id_sender_bodies_headers_and_attachments() {
        let incoming = parse(SIMPLE.as_bytes(), 1024).expect("a valid message");
        assert_eq!(incoming.message_id, "lathe-1@example.com");
        assert_eq!(incoming.from.address, "Ada@Example.com");
        assert_eq!(incoming.from.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(incoming.to.len(), 2);
        assert_eq!(incoming.subject.as_deref(), Some("Lathe spare parts"));
        assert_eq!(incoming.text.as_deref().map(str::trim), Some("Hello, can you quote?"));
        assert_eq!(incoming.html, None);
        assert!(incoming.date.is_some());
        let subject = incoming.headers.iter().find(|h| h.name == "Subject").expect("kept");
        assert_eq!(subject.value, "Lathe\tspare parts");
        assert_eq!(incoming.attachments.len(), 1);
        assert_eq!(incoming.attachments[0].filename.as_deref(), Some("drawing.pdf"));
        assert_eq!(incoming.attachments[0].content_type, "application/pdf");
        assert_eq!(incoming.attachments[0].bytes, b"%PDF-1.4\n");
    }

    #[test]
    fn what_is_not_a_message_is_a_bad_request() {
        for garbage in [
            &b""[..],
            b"   \r\n",
            b"this is not an email at all",
            b"\x00\x01\x02\xff\xfe binary",
            b"\r\n\r\nbody without headers",
            b"Subject hello\r\n\r\nbody",
            b" folded: first\r\n\r\nbody",
        ] {
            assert_eq!(status(garbage, 1024), StatusCode::BAD_REQUEST, "{garbage:?}");
        }
    }

    #[test]
    fn a_message_needs_an_id_and_a_sender() {
        let no_id = SIMPLE.replace("Message-ID: <lathe-1@example.com>\r\n", "");
        assert_eq!(status(no_id.as_bytes(), 1024), StatusCode::UNPROCESSABLE_ENTITY);
        let no_from = SIMPLE.replace("From: Ada Lovelace <Ada@Example.com>\r\n", "");
        assert_eq!(status(no_from.as_bytes(), 1024), StatusCode::UNPROCESSABLE_ENTITY);
        let bad_from = SIMPLE.replace("<Ada@Example.com>", "<not an address>");
        assert_eq!(status(bad_from.as_bytes(), 1024), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn an_attachment_over_the_limit_is_too_large() {
        assert_eq!(status(SIMPLE.as_bytes(), 9), StatusCode::OK);
        assert_eq!(status(SIMPLE.as_bytes(), 8), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
