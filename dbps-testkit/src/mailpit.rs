//! Mail that reached the shared Mailpit server, read back through its HTTP API, per test.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Client, Method, Response, StatusCode, Url};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::server::{self, Backend, MAILPIT_API_VAR};
use crate::wait::DEADLINE;

/// The domain of every address [`TestMailpit::recipient`] makes. `.test` is reserved for
/// testing (RFC 6761): mail to it can never reach anyone, whatever server a misconfigured
/// service talks to.
pub const MAIL_DOMAIN: &str = "example.test";

/// How long one API request may take (the source of a large message included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`TestMailpit::wait_for`] asks.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Messages per search request.
const PAGE_SIZE: usize = 200;

/// The longest local part of an address (RFC 5321, 4.5.3.1.1).
const MAX_LOCAL_PART: usize = 64;

/// The shared Mailpit server with a tag unique to one test: every address that
/// [`TestMailpit::recipient`] makes carries the tag (`name+<tag>@example.test`), and the
/// queries only answer for such addresses, so tests running in parallel never see each
/// other's mail. The test's mail is deleted when the handle is dropped.
///
/// ```no_run
/// # async fn example() -> Result<(), dbps_testkit::Error> {
/// let mail = dbps_testkit::mailpit().await?;
/// let customer = mail.recipient("customer");
/// // ... the service under test sends to `customer` through mail.smtp_url() ...
/// let arrived = mail.wait_for(&customer, 1).await?;
/// let message = mail.message(&arrived[0].id).await?;
/// assert!(message.text().unwrap_or_default().contains("Welcome"));
/// # Ok(()) }
/// ```
pub struct TestMailpit {
    smtp_url: &'static str,
    smtp_host: String,
    smtp_port: u16,
    api_url: &'static str,
    /// `api_url` with a trailing slash, for joining paths.
    api_base: Url,
    tag: String,
    client: Client,
}

impl std::fmt::Debug for TestMailpit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestMailpit")
            .field("smtp_url", &self.smtp_url)
            .field("api_url", &self.api_url)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// The shared Mailpit server (`DBPS_SMTP_URL` and `DBPS_MAILPIT_URL`, else a container)
/// with a fresh tag; checks that its HTTP API answers.
pub async fn mailpit() -> Result<TestMailpit> {
    let addresses = server::mailpit_addresses().await?;
    let (smtp_host, smtp_port) = parse_smtp_url(&addresses.smtp)?;
    let api_url = addresses.api.trim_end_matches('/');
    let api_base = parse_api_url(api_url)?;
    let client = Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| mailpit_error("building the HTTP client", e))?;
    let mailpit = TestMailpit {
        smtp_url: addresses.smtp.as_str(),
        smtp_host,
        smtp_port,
        api_url,
        api_base,
        tag: crate::unique_suffix(),
        client,
    };
    let info = mailpit.endpoint(&["info"])?;
    let what = format!("GET {info} (is the stack up? `scripts/stack.sh up`)");
    mailpit.send(Method::GET, info, &what).await?;
    Ok(mailpit)
}

/// Host and port of an `smtp://host[:port]` URL (port 25 when it names none).
fn parse_smtp_url(value: &str) -> Result<(String, u16)> {
    let invalid = |reason: String| Error::InvalidAddress {
        backend: Backend::Mailpit,
        var: Backend::Mailpit.env_var(),
        reason,
    };
    let url = Url::parse(value).map_err(|e| invalid(format!("{e} (in {})", server::redact(value))))?;
    if url.scheme() != "smtp" {
        return Err(invalid(format!(
            "expected smtp://host:port, got scheme {:?} (TLS is not supported)",
            url.scheme()
        )));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid(format!("no host in {}", server::redact(value))))?;
    Ok((host.to_owned(), url.port().unwrap_or(25)))
}

/// The API's base URL with a trailing slash (Mailpit may serve under a path, `--webroot`).
fn parse_api_url(value: &str) -> Result<Url> {
    let invalid = |reason: String| Error::InvalidAddress {
        backend: Backend::Mailpit,
        var: MAILPIT_API_VAR,
        reason,
    };
    let url = Url::parse(&format!("{value}/")).map_err(|e| invalid(format!("{e} (in {value})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "expected http://host:port, got scheme {:?}",
            url.scheme()
        )));
    }
    if url.cannot_be_a_base() || url.host_str().is_none() {
        return Err(invalid(format!("no host in {value}")));
    }
    Ok(url)
}

fn mailpit_error(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Mailpit {
        what: what.into(),
        source: source.into(),
    }
}

impl TestMailpit {
    /// The SMTP server, `smtp://host:port` (plain SMTP, no authentication needed).
    pub fn smtp_url(&self) -> &str {
        self.smtp_url
    }

    /// The SMTP server's host, for clients that take host and port.
    pub fn smtp_host(&self) -> &str {
        &self.smtp_host
    }

    /// The SMTP server's port.
    pub fn smtp_port(&self) -> u16 {
        self.smtp_port
    }

    /// Mailpit's HTTP API, `http://host:port` (its endpoints are under `/api/v1/`).
    pub fn api_url(&self) -> &str {
        self.api_url
    }

    /// This test's tag, which every address of the test carries.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// An address of this test: `name+<tag>@example.test`.
    ///
    /// # Panics
    ///
    /// If `name` is empty, longer than 31 characters, or has a character other than ASCII
    /// letters, digits, `.`, `-` and `_` (a dot neither first, last nor doubled): it is a
    /// test's own constant.
    pub fn recipient(&self, name: &str) -> String {
        let longest = MAX_LOCAL_PART - 1 - self.tag.len();
        let valid = !name.is_empty()
            && name.len() <= longest
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            && !name.starts_with('.')
            && !name.ends_with('.')
            && !name.contains("..");
        assert!(
            valid,
            "recipient name {name:?}: use 1 to {longest} ASCII letters, digits, '.', '-' or '_'"
        );
        format!("{name}+{}@{MAIL_DOMAIN}", self.tag)
    }

    /// Whether `address` is one of this test's addresses (made by [`TestMailpit::recipient`]).
    pub fn owns(&self, address: &str) -> bool {
        let suffix = format!("+{}@{MAIL_DOMAIN}", self.tag);
        let address = address.trim().to_ascii_lowercase();
        address.len() > suffix.len() && address.ends_with(&suffix)
    }

    /// Every message that reached one of this test's addresses (as To, Cc or Bcc — envelope
    /// recipients a message's headers do not name count as Bcc), oldest first. Summaries:
    /// [`MailMessage::content`] is `None`.
    pub async fn messages(&self) -> Result<Vec<MailMessage>> {
        let found = self.search(&format!("addressed:{}", self.tag)).await?;
        Ok(found
            .into_iter()
            .filter(|m| m.recipients().any(|r| self.owns(r)))
            .collect())
    }

    /// The messages that reached `address`, one of this test's (as To, Cc or Bcc), oldest
    /// first. Summaries: [`MailMessage::content`] is `None`.
    pub async fn messages_to(&self, address: &str) -> Result<Vec<MailMessage>> {
        self.check_owned(address)?;
        let address = address.trim();
        let found = self.search(&format!("addressed:\"{address}\"")).await?;
        Ok(found
            .into_iter()
            .filter(|m| m.recipients().any(|r| r.eq_ignore_ascii_case(address)))
            .collect())
    }

    /// Waits until at least `count` messages have reached `address` (up to [`DEADLINE`])
    /// and returns all that have, oldest first.
    pub async fn wait_for(&self, address: &str, count: usize) -> Result<Vec<MailMessage>> {
        self.wait_for_within(address, count, DEADLINE).await
    }

    /// [`TestMailpit::wait_for`] with a deadline of the caller's.
    pub async fn wait_for_within(&self, address: &str, count: usize, within: Duration) -> Result<Vec<MailMessage>> {
        self.check_owned(address)?;
        let started = tokio::time::Instant::now();
        loop {
            let messages = self.messages_to(address).await?;
            if messages.len() >= count {
                return Ok(messages);
            }
            if started.elapsed() >= within {
                let noun = if count == 1 { "message" } else { "messages" };
                return Err(Error::TimedOut {
                    what: format!(
                        "{count} {noun} to {address} in Mailpit at {} ({} arrived)",
                        self.api_url,
                        messages.len()
                    ),
                    after: within,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// One message, with its text and HTML bodies and its attachments'
    /// ([`MailMessage::content`] is `Some`).
    pub async fn message(&self, id: &str) -> Result<MailMessage> {
        let what = format!("GET /api/v1/message/{id}");
        let url = self.endpoint(&["message", id])?;
        let response = self.send(Method::GET, url, &what).await?;
        let full: FullJson = response.json().await.map_err(|e| mailpit_error(what, e))?;
        Ok(full.into())
    }

    /// The message's full source (RFC 5322) as Mailpit received it. Mailpit adds a `Bcc`
    /// header naming the envelope recipients that the headers did not.
    pub async fn raw(&self, id: &str) -> Result<Vec<u8>> {
        let what = format!("GET /api/v1/message/{id}/raw");
        let url = self.endpoint(&["message", id, "raw"])?;
        self.bytes(url, what).await
    }

    /// The decoded content of one attachment (its [`MailAttachment::part_id`]).
    pub async fn attachment(&self, id: &str, part_id: &str) -> Result<Vec<u8>> {
        let what = format!("GET /api/v1/message/{id}/part/{part_id}");
        let url = self.endpoint(&["message", id, "part", part_id])?;
        self.bytes(url, what).await
    }

    /// Deletes the messages that reached `address`, one of this test's, and returns how many
    /// there were. (Dropping the handle deletes all of the test's mail.)
    pub async fn delete_to(&self, address: &str) -> Result<usize> {
        let ids: Vec<String> = self.messages_to(address).await?.into_iter().map(|m| m.id).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let what = format!("DELETE /api/v1/messages ({} to {address})", ids.len());
        let url = self.endpoint(&["messages"])?;
        let request = self.client.delete(url).json(&DeleteJson { ids: &ids });
        check(request.send().await.map_err(|e| mailpit_error(what.clone(), e))?, &what).await?;
        Ok(ids.len())
    }

    fn check_owned(&self, address: &str) -> Result<()> {
        if self.owns(address) {
            Ok(())
        } else {
            Err(Error::ForeignAddress {
                address: address.to_owned(),
                tag: self.tag.clone(),
                domain: MAIL_DOMAIN,
            })
        }
    }

    /// `/api/v1/<segments...>`, each segment percent-encoded.
    fn endpoint(&self, segments: &[&str]) -> Result<Url> {
        endpoint(&self.api_base, segments)
    }

    async fn send(&self, method: Method, url: Url, what: &str) -> Result<Response> {
        let response = self
            .client
            .request(method, url)
            .send()
            .await
            .map_err(|e| mailpit_error(what, e))?;
        check(response, what).await
    }

    async fn bytes(&self, url: Url, what: String) -> Result<Vec<u8>> {
        let response = self.send(Method::GET, url, &what).await?;
        let body = response.bytes().await.map_err(|e| mailpit_error(what, e))?;
        Ok(body.to_vec())
    }

    /// Every summary a Mailpit search finds, oldest first.
    async fn search(&self, query: &str) -> Result<Vec<MailMessage>> {
        let what = format!("GET /api/v1/search?query={query}");
        let mut found: Vec<MailMessage> = Vec::new();
        loop {
            let mut url = self.endpoint(&["search"])?;
            url.query_pairs_mut()
                .append_pair("query", query)
                .append_pair("start", &found.len().to_string())
                .append_pair("limit", &PAGE_SIZE.to_string());
            let response = self.send(Method::GET, url, &what).await?;
            let page: SearchJson = response.json().await.map_err(|e| mailpit_error(what.clone(), e))?;
            let fetched = page.messages.len();
            for summary in page.messages {
                // Mail arriving between pages shifts the pages (newest first): skip repeats.
                if !found.iter().any(|m| m.id == summary.id) {
                    found.push(summary.into());
                }
            }
            if fetched < PAGE_SIZE || found.len() >= page.messages_count {
                break;
            }
        }
        // Mailpit answers newest first; within one millisecond, keep its (reversed) order.
        found.reverse();
        found.sort_by_key(|m| m.created);
        Ok(found)
    }
}

fn endpoint(base: &Url, segments: &[&str]) -> Result<Url> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| mailpit_error(format!("{base} as a base URL"), "it cannot be a base"))?
        .pop_if_empty()
        .extend(["api", "v1"])
        .extend(segments);
    Ok(url)
}

/// The response if its status is a success, else an error with the status and body.
async fn check(response: Response, what: &str) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let body = body.trim();
    let reason = match status {
        StatusCode::NOT_FOUND => format!("{status}: no such message or endpoint ({body})"),
        _ => format!("{status}: {body}"),
    };
    Err(mailpit_error(what, reason))
}

impl Drop for TestMailpit {
    fn drop(&mut self) {
        let Ok(mut url) = self.endpoint(&["search"]) else {
            return;
        };
        url.query_pairs_mut()
            .append_pair("query", &format!("addressed:{}", self.tag));
        crate::run_cleanup("the test's mail in mailpit", async move {
            // A client of its own: the test's runtime, which owns the pooled connections,
            // may be gone.
            let client = Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .map_err(|e| e.to_string())?;
            let response = client.delete(url).send().await.map_err(|e| e.to_string())?;
            match response.status() {
                status if status.is_success() => Ok(()),
                status => Err(format!("DELETE /api/v1/search: {status}")),
            }
        });
    }
}

/// A message Mailpit received. From [`TestMailpit::messages_to`] a summary; from
/// [`TestMailpit::message`] with its [`content`](MailMessage::content).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MailMessage {
    /// Mailpit's id of the message, for [`TestMailpit::message`] and [`TestMailpit::raw`].
    pub id: String,
    /// The `Message-ID` header, without its angle brackets (empty if there is none).
    pub message_id: String,
    /// The `From` address (empty if there is none).
    pub from: String,
    /// The `To` addresses.
    pub to: Vec<String>,
    /// The `Cc` addresses.
    pub cc: Vec<String>,
    /// The `Bcc` addresses, with the envelope recipients the headers did not name.
    pub bcc: Vec<String>,
    /// The subject, decoded.
    pub subject: String,
    /// When Mailpit received the message. (From [`TestMailpit::message`]: the `Date` header,
    /// which Mailpit takes to be the receipt time where the message has none.)
    pub created: DateTime<Utc>,
    /// The size of the message's source in bytes.
    pub size: u64,
    /// How many attachments it has (inline parts not counted).
    pub attachments: usize,
    /// The bodies and attachments; `None` in summaries.
    pub content: Option<MailContent>,
}

impl MailMessage {
    /// The plain-text body, if this is not a summary (empty if the message has none).
    pub fn text(&self) -> Option<&str> {
        self.content.as_ref().map(|c| c.text.as_str())
    }

    /// The HTML body, if this is not a summary (empty if the message has none).
    pub fn html(&self) -> Option<&str> {
        self.content.as_ref().map(|c| c.html.as_str())
    }

    /// Every recipient address: To, Cc and Bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.to.iter().chain(&self.cc).chain(&self.bcc).map(String::as_str)
    }
}

/// What [`TestMailpit::message`] adds to a summary.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MailContent {
    /// The plain-text body (empty if there is none).
    pub text: String,
    /// The HTML body (empty if there is none).
    pub html: String,
    /// The attachments.
    pub attachments: Vec<MailAttachment>,
    /// The inline parts (images an HTML body refers to by `cid:`).
    pub inline: Vec<MailAttachment>,
}

/// One attachment or inline part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MailAttachment {
    /// Mailpit's part id, for [`TestMailpit::attachment`].
    pub part_id: String,
    /// The file name (empty if there is none).
    pub file_name: String,
    /// The content type.
    pub content_type: String,
    /// The decoded size in bytes.
    pub size: u64,
}

// Mailpit's JSON (its API's swagger: MessagesSummary, MessageSummary, Message, Attachment).

#[derive(Deserialize)]
struct SearchJson {
    #[serde(default)]
    messages_count: usize,
    #[serde(default)]
    messages: Vec<SummaryJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AddressJson {
    #[serde(default)]
    address: String,
}

fn addresses(list: Option<Vec<AddressJson>>) -> Vec<String> {
    list.unwrap_or_default().into_iter().map(|a| a.address).collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SummaryJson {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "MessageID", default)]
    message_id: String,
    from: Option<AddressJson>,
    to: Option<Vec<AddressJson>>,
    cc: Option<Vec<AddressJson>>,
    bcc: Option<Vec<AddressJson>>,
    #[serde(default)]
    subject: String,
    created: DateTime<Utc>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    attachments: usize,
}

impl From<SummaryJson> for MailMessage {
    fn from(s: SummaryJson) -> Self {
        Self {
            id: s.id,
            message_id: s.message_id,
            from: s.from.map(|a| a.address).unwrap_or_default(),
            to: addresses(s.to),
            cc: addresses(s.cc),
            bcc: addresses(s.bcc),
            subject: s.subject,
            created: s.created,
            size: s.size,
            attachments: s.attachments,
            content: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FullJson {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "MessageID", default)]
    message_id: String,
    from: Option<AddressJson>,
    to: Option<Vec<AddressJson>>,
    cc: Option<Vec<AddressJson>>,
    bcc: Option<Vec<AddressJson>>,
    #[serde(default)]
    subject: String,
    date: DateTime<Utc>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    text: String,
    #[serde(rename = "HTML", default)]
    html: String,
    attachments: Option<Vec<AttachmentJson>>,
    inline: Option<Vec<AttachmentJson>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AttachmentJson {
    #[serde(rename = "PartID", default)]
    part_id: String,
    #[serde(default)]
    file_name: String,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    size: u64,
}

impl From<AttachmentJson> for MailAttachment {
    fn from(a: AttachmentJson) -> Self {
        Self {
            part_id: a.part_id,
            file_name: a.file_name,
            content_type: a.content_type,
            size: a.size,
        }
    }
}

impl From<FullJson> for MailMessage {
    fn from(f: FullJson) -> Self {
        let parts = |list: Option<Vec<AttachmentJson>>| -> Vec<MailAttachment> {
            list.unwrap_or_default().into_iter().map(Into::into).collect()
        };
        let attachments = parts(f.attachments);
        Self {
            id: f.id,
            message_id: f.message_id,
            from: f.from.map(|a| a.address).unwrap_or_default(),
            to: addresses(f.to),
            cc: addresses(f.cc),
            bcc: addresses(f.bcc),
            subject: f.subject,
            created: f.date,
            size: f.size,
            attachments: attachments.len(),
            content: Some(MailContent {
                text: f.text,
                html: f.html,
                attachments,
                inline: parts(f.inline),
            }),
        }
    }
}

#[derive(serde::Serialize)]
struct DeleteJson<'a> {
    #[serde(rename = "IDs")]
    ids: &'a [String],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_give_host_and_port() {
        assert_eq!(
            parse_smtp_url("smtp://127.0.0.1:21025").expect("valid"),
            (String::from("127.0.0.1"), 21025)
        );
        assert_eq!(
            parse_smtp_url("smtp://mail.internal").expect("valid"),
            (String::from("mail.internal"), 25)
        );
        let error = parse_smtp_url("smtps://127.0.0.1:465").expect_err("TLS");
        assert!(
            matches!(
                error,
                Error::InvalidAddress {
                    var: "DBPS_SMTP_URL",
                    ..
                }
            ),
            "{error}"
        );
        assert!(parse_smtp_url("127.0.0.1:21025").is_err());
    }

    #[test]
    fn endpoints_keep_the_webroot_and_encode_ids() {
        let base = parse_api_url("http://127.0.0.1:28025").expect("valid");
        assert_eq!(
            endpoint(&base, &["message", "a/b c", "raw"]).expect("url").as_str(),
            "http://127.0.0.1:28025/api/v1/message/a%2Fb%20c/raw"
        );
        let base = parse_api_url("http://127.0.0.1:28025/mailpit").expect("valid");
        assert_eq!(
            endpoint(&base, &["search"]).expect("url").as_str(),
            "http://127.0.0.1:28025/mailpit/api/v1/search"
        );
        assert!(parse_api_url("smtp://127.0.0.1:21025").is_err());
    }

    #[test]
    fn summaries_parse_with_null_lists() {
        let json = r#"{"total": 3, "messages_count": 1, "messages": [{
            "ID": "7lrei7kP2gYGx1LTLZYiRl", "MessageID": "probe-1@dbps.test",
            "From": {"Name": "Shop", "Address": "shop@example.test"},
            "To": [{"Name": "", "Address": "rep+t@example.test"}], "Cc": null,
            "Bcc": [{"Name": "", "Address": "hidden+t@example.test"}], "ReplyTo": null,
            "Subject": "Probe", "Created": "2026-11-29T14:41:45.833+13:00",
            "Size": 2514, "Attachments": 1, "Snippet": "hello"}]}"#;
        let page: SearchJson = serde_json::from_str(json).expect("valid JSON");
        assert_eq!(page.messages_count, 1);
        let message: MailMessage = page.messages.into_iter().next().expect("one").into();
        assert_eq!(message.message_id, "probe-1@dbps.test");
        assert_eq!(message.from, "shop@example.test");
        assert!(message.cc.is_empty());
        assert_eq!(
            message.recipients().collect::<Vec<_>>(),
            ["rep+t@example.test", "hidden+t@example.test"]
        );
        assert_eq!(message.created.to_rfc3339(), "2026-11-29T01:41:45.833+00:00");
        assert_eq!(message.content, None);
    }
}
