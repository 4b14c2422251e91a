//! The delivery worker: sends the notifications recorded as `sending` over SMTP and
//! records the outcome, retrying failures with backoff.
//!
//! # One attempt
//!
//! 1. **Claim**: the attempt counter goes up and `next_attempt_at` moves one lease
//!    ahead, in one update guarded by the `next_attempt_at` read, so that another instance
//!    does not take the same email while this one sends it.
//! 2. **Send** the recorded bytes (`raw`, with the notification's one `Message-ID`) in one
//!    SMTP transaction: `MAIL FROM`, `RCPT TO`, `DATA`, each step within the SMTP timeout.
//!    A lease shorter than an attempt can take lets another instance send a second copy
//!    meanwhile — with the same `Message-ID`, like the crash windows below.
//! 3. **Record** the outcome: `sent` with the server's reply; after a refusal for good
//!    (a 5xx reply) `failed`; otherwise the next attempt's time, doubling from
//!    `retry_initial` up to `retry_max`, and `failed` after `max_attempts`.
//!
//! # Crash windows
//!
//! | the process dies | what happens next | copies at the SMTP server |
//! |---|---|---|
//! | before the request is recorded | Kafka delivers the request again (its offset was not committed); it is recorded then | 1 |
//! | after `sending` is recorded, before the SMTP transaction | the email is due (at once, or when the claim's lease ends); it is sent | 1 |
//! | during the SMTP transaction, before the server accepted the data | the server drops the unfinished transaction; the email is sent again when the lease ends | 1 |
//! | after the server accepted it, before `sent` is recorded | sent again when the lease ends | 2, with the same `Message-ID` |
//! | after `sent` is recorded | nothing: a delivered request finds it recorded | 1 |
//!
//! So every notification is delivered at least once, and every copy carries the same
//! `Message-ID` (and the same bytes): a mail client or a deduplicating relay recognises a
//! second copy as the same message. Exactly once is not possible here: nothing can make
//! the server's acceptance and the service's record one atomic step.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt as _;
use lettre::Address;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use mongodb::Collection;
use mongodb::bson::{self, doc};
use tokio::sync::Notify;

use crate::failpoint::{Failpoint, Failpoints};
use crate::model::EmailRecord;
use crate::notify::MESSAGE_ID_DOMAIN;

/// Emails taken per look.
const BATCH: i64 = 16;
/// How long the worker waits between looks when nothing wakes it.
const POLL: Duration = Duration::from_secs(1);

/// Where and how the worker sends.
#[derive(Debug, Clone)]
pub struct SmtpServer {
    host: String,
    port: u16,
    timeout: Duration,
}

/// A setting the delivery worker cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct InvalidSetting {
    /// The setting.
    pub setting: &'static str,
    /// Why.
    pub reason: String,
}

impl SmtpServer {
    /// The server of an `smtp://host[:port]` URL (port 25 by default), each SMTP
    /// transaction bounded by `timeout`. Plain SMTP only: this build has no TLS, so it
    /// refuses credentials rather than send them in clear.
    pub fn from_url(url: &str, timeout: Duration) -> Result<Self, InvalidSetting> {
        let invalid = |reason: String| InvalidSetting {
            setting: "EMAIL_SMTP_URL",
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid(format!("not a URL: {e}")))?;
        if parsed.scheme() != "smtp" {
            return Err(invalid(format!(
                "the scheme must be smtp (plain SMTP), not {:?}",
                parsed.scheme()
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid(String::from(
                "credentials would travel in clear: plain SMTP takes none",
            )));
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid(String::from("no host")))?;
        Ok(Self {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: parsed.port().unwrap_or(25),
            timeout,
        })
    }
}

/// Why an SMTP transaction failed.
#[derive(Debug)]
struct SendError {
    permanent: bool,
    reason: String,
}

impl From<lettre::transport::smtp::Error> for SendError {
    fn from(error: lettre::transport::smtp::Error) -> Self {
        Self {
            permanent: error.is_permanent(),
            reason: dbps_core::ErrorChain(&error).to_string(),
        }
    }
}

/// The worker's retry and lease settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) lease: Duration,
    pub(crate) retry_initial: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) max_attempts: u32,
}

impl Policy {
    /// The wait before attempt `attempts + 1`.
    fn backoff(&self, attempts: i64) -> Duration {
        let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        self.retry_initial
            .saturating_mul(2u32.saturating_pow(doublings))
            .min(self.retry_max)
    }
}

fn after(duration: Duration) -> bson::DateTime {
    let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
    bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis().saturating_add(millis))
}

/// Sends the recorded notifications (see the module documentation).
#[derive(Debug, Clone)]
pub struct Deliveries {
    emails: Collection<EmailRecord>,
    server: SmtpServer,
    sender: Address,
    policy: Policy,
    wake: Arc<Notify>,
    failpoints: Failpoints,
}

impl Deliveries {
    pub(crate) fn new(
        emails: Collection<EmailRecord>,
        server: SmtpServer,
        sender: Address,
        policy: Policy,
        wake: Arc<Notify>,
        failpoints: Failpoints,
    ) -> Self {
        Self {
            emails,
            server,
            sender,
            policy,
            wake,
            failpoints,
        }
    }

    /// Sends what is due until `stop` is cancelled; woken early when a notification is
    /// recorded. A database failure is logged and tried again at the next look.
    pub async fn run(self, stop: dbps_core::CancellationToken) -> Result<(), std::convert::Infallible> {
        loop {
            let mut claimed = false;
            match self.due().await {
                Ok(due) => {
                    for record in due {
                        if stop.is_cancelled() {
                            return Ok(());
                        }
                        claimed |= self.attempt(record).await;
                    }
                }
                Err(error) => tracing::warn!(%error, "reading the notifications due failed"),
            }
            if claimed {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// The notifications due for an attempt, oldest due first.
    async fn due(&self) -> Result<Vec<EmailRecord>, mongodb::error::Error> {
        self.emails
            .find(doc! {
                "delivery.status": "sending",
                "delivery.next_attempt_at": { "$lte": bson::DateTime::now() },
            })
            .sort(doc! { "delivery.next_attempt_at": 1 })
            .limit(BATCH)
            .await?
            .try_collect()
            .await
    }

    /// One attempt at one notification; `false` if another instance had claimed it.
    async fn attempt(&self, record: EmailRecord) -> bool {
        let id = record.id.as_str();
        let (Some(delivery), Some(raw)) = (&record.delivery, &record.raw) else {
            // Not written by this service's recorder: nothing to send, and it must not
            // stay due for ever.
            tracing::error!(email = %id, "a notification without its message; giving it up");
            self.record(
                id,
                doc! { "$set": { "delivery.status": "failed", "delivery.last_error": "no message recorded to send" } },
            )
            .await;
            return false;
        };
        let claim = self
            .emails
            .update_one(
                doc! {
                    "_id": id,
                    "delivery.status": "sending",
                    "delivery.next_attempt_at": delivery.next_attempt_at,
                },
                doc! {
                    "$set": {
                        "delivery.next_attempt_at": after(self.policy.lease),
                        "delivery.last_attempt_at": bson::DateTime::now(),
                    },
                    "$inc": { "delivery.attempts": 1_i64 },
                },
            )
            .await;
        match claim {
            Ok(result) if result.matched_count == 1 => {}
            Ok(_) => return false,
            Err(error) => {
                tracing::warn!(email = %id, %error, "claiming a notification failed");
                return false;
            }
        }
        let attempts = delivery.attempts + 1;
        self.failpoints.pass(Failpoint::BeforeSmtp).await;
        let outcome = self.send(&delivery.recipient, &raw.bytes).await;
        let update = match outcome {
            Ok(reply) => {
                tracing::info!(email = %id, attempts, "notification sent");
                doc! { "$set": {
                    "delivery.status": "sent",
                    "delivery.sent_at": bson::DateTime::now(),
                    "delivery.smtp_reply": reply,
                    "delivery.last_error": bson::Bson::Null,
                } }
            }
            Err(error) if error.permanent || attempts >= i64::from(self.policy.max_attempts) => {
                tracing::error!(email = %id, attempts, reason = %error.reason, "notification given up");
                doc! { "$set": {
                    "delivery.status": "failed",
                    "delivery.last_error": &error.reason,
                } }
            }
            Err(error) => {
                let wait = self.policy.backoff(attempts);
                tracing::warn!(email = %id, attempts, ?wait, reason = %error.reason, "sending a notification failed; trying again later");
                doc! { "$set": {
                    "delivery.next_attempt_at": after(wait),
                    "delivery.last_error": &error.reason,
                } }
            }
        };
        self.record(id, update).await;
        true
    }

    /// Records an attempt's outcome, trying a few times: a `sent` that cannot be recorded
    /// makes the email due again when its lease ends, and it is sent a second time.
    async fn record(&self, id: &str, update: bson::Document) {
        let mut wait = Duration::from_millis(100);
        for attempt in 1..=5 {
            match self
                .emails
                .update_one(doc! { "_id": id, "delivery.status": "sending" }, update.clone())
                .await
            {
                Ok(_) => return,
                Err(error) if attempt < 5 => {
                    tracing::warn!(email = %id, %error, "recording a delivery failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(error) => {
                    tracing::error!(email = %id, %error, "recording a delivery failed; it will be sent again");
                }
            }
        }
    }

    /// One SMTP transaction, each step bounded by the server's timeout; the server's
    /// reply to the message.
    async fn send(&self, recipient: &str, raw: &[u8]) -> Result<String, SendError> {
        let recipient: Address = recipient.parse().map_err(|e| SendError {
            permanent: true,
            reason: format!("the recipient cannot be mailed to: {e}"),
        })?;
        let hello = ClientId::Domain(MESSAGE_ID_DOMAIN.to_owned());
        let mut connection = self
            .step(
                "connect",
                AsyncSmtpConnection::connect_tokio1(
                    (self.server.host.as_str(), self.server.port),
                    Some(self.server.timeout),
                    &hello,
                    None,
                    None,
                ),
            )
            .await?;
        let mut parameters = Vec::new();
        if !raw.is_ascii() {
            if !connection.server_info().supports_feature(Extension::EightBitMime) {
                return Err(SendError {
                    permanent: true,
                    reason: String::from("the message is not ASCII and the server does not take 8BITMIME"),
                });
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        self.step(
            "MAIL FROM",
            connection.command(Mail::new(Some(self.sender.clone()), parameters)),
        )
        .await?;
        self.step("RCPT TO", connection.command(Rcpt::new(recipient, Vec::new())))
            .await?;
        // The server holds the envelope, not the message: a crash here leaves nothing.
        self.failpoints.pass(Failpoint::DuringSmtp).await;
        self.step("DATA", connection.command(Data)).await?;
        let reply = self.step("the message", connection.message(raw)).await?;
        // The server has the message; the service has not recorded it yet.
        self.failpoints.pass(Failpoint::AfterSmtp).await;
        let _ = tokio::time::timeout(self.server.timeout, connection.quit()).await;
        let text: Vec<&str> = reply.message().collect();
        Ok(format!("{} {}", reply.code(), text.join(" ")))
    }

    /// One step of an SMTP transaction, within the server's timeout.
    async fn step<T>(
        &self,
        what: &str,
        step: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, SendError> {
        match tokio::time::timeout(self.server.timeout, step).await {
            Ok(result) => result.map_err(SendError::from),
            Err(_) => Err(SendError {
                permanent: false,
                reason: format!("{what} took longer than {:?}", self.server.timeout),
            }),
        }
    }
}
