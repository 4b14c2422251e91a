//! The email service of the dbps example system, on MongoDB.
//!
//! # Owns
//!
//! Its own MongoDB database, named after the service (`email`), migrated at every start
//! with `dbps_migrate::MongoMigrations` ([`store::migrations`]): the collections, their
//! validators (where the server enforces them — FerretDB does not, and the service checks
//! what it writes itself), their indexes and the outbox relay's.
//!
//! | collection | holds |
//! |---|---|
//! | `emails` | every email, inbound and outbound: `message_id` (unique), sender, recipients, subject, date, every header field, the text and HTML bodies, the attachments' metadata, the customer assignment (a copy), and for notifications the request, the exact bytes sent and the delivery status |
//! | `email_attachments` | the attachments' bytes in chunks of 1 MiB, `{email_id, attachment, n, data}`, indexed on `(email_id, attachment, n)`: a 10 MB attachment fits although a document holds at most 16 MB |
//! | `email_assignments` | `{email_id, customer_id, address, assigned_at}`, one per assigned email; its documents carry the `email.EmailAssigned` events until the relay published them |
//! | `customer_email_index` | a replica of the customer service: `{_id: address, email, customer_id}`, one document per address |
//!
//! `dbps_service::Service` runs it — configuration, the relay, the consumers, its own
//! tasks, the HTTP server with `/health` and `/metrics`, graceful shutdown; only
//! `Service::postgres` is not called. `dbps-service` has no MongoDB start-up step:
//! [`store::connect`] and [`store::migrations`] are that step here.
//!
//! # Consumes
//!
//! - `<customer>.customer.events` (`customer.CustomerCreated`, `customer.CustomerUpdated`):
//!   the `customer_email_index` replica ([`customers`]), a
//!   `dbps_cache::replica::MongoReplica` guarded by the customer's version, backfilled at
//!   start from the customer service's snapshot (`<customer url>/snapshot/customers`).
//!   After each batch the pending emails of the addresses it names are assigned (late
//!   assignment).
//! - `<quote>.quote.events`: each `quote.SalesRepNotificationRequested` becomes one email
//!   to the quote's sales rep — recorded once per request through the MongoDB inbox
//!   (`insert_once`, the request's message id as the email's `_id`), then sent over SMTP
//!   by the delivery worker ([`delivery`]). Other quote events are ignored.
//!
//! # Publishes
//!
//! `email.EmailAssigned` ([`events`]) on `<email>.email.events`, keyed by the email's id,
//! through the MongoDB outbox: the assignment document and its event are one
//! single-document write (no transaction, so FerretDB works), and the relay publishes it.
//!
//! # Serves
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /emails` | a raw RFC 5322 message, `Content-Type: message/rfc822` | `201`, the [`EmailView`](model::EmailView), `Location`; `200` with the first email's view for a `Message-ID` stored before |
//! | `GET /emails/{id}` | | `200`, the [`EmailView`](model::EmailView): headers, bodies, attachments' metadata, assignment, delivery |
//! | `GET /emails/{id}/attachments/{n}` | | `200`, the attachment's bytes (`n` from 0), with its `Content-Type` and file name |
//! | `GET /customers/{id}/emails?limit=&after=` | | `200`, an [`EmailPage`](model::EmailPage): the emails assigned to the customer, oldest first |
//! | `GET /health`, `GET /metrics` | | liveness, Prometheus metrics |
//!
//! Every client mistake is a 4xx `application/problem+json` answer, found before anything
//! is written: another media type (`415`), a body that is not a message (`400`), no
//! `Message-ID` or no sender address (`422`), an attachment over
//! [`Settings::max_attachment_bytes`] or a request over [`Settings::max_message_bytes`] or
//! text and headers over 8 MiB (`413`); an unknown email or attachment, or a customer id
//! that is not a UUID (`404`); a `limit` outside 1 to 500 (`422`). A customer's list takes
//! `limit` (default 50) and `after` (the previous page's `next`).
//!
//! # Nothing half-written
//!
//! An email's chunks are written first, each naming the new email's id, then the email's
//! document: the one write that makes the email and its attachments exist. Readers reach
//! chunks only through the email, so a failure in between leaves nothing visible; the
//! request deletes the chunks it wrote, and a sweep removes those a crash left after an
//! hour. A duplicate `Message-ID` is answered with the first email (`200`); the unique
//! index decides between two requests racing with the same one.
//!
//! # Assignment
//!
//! An inbound email is assigned to the customer whose address, in lower case, is its
//! sender's ([`assign`]): `email_assignments` gets one document (its `_id` is the email's,
//! so an email is assigned once, with one event), then the email's `customer_id` copy.
//! An email from an unknown address stays unassigned and is assigned when a customer with
//! that address appears: the replica's handler assigns the pending emails of each address
//! after applying the batch that names it, the backfill ends with a sweep, and a periodic
//! sweep ([`Settings::sweep_interval`]) finishes whatever a crash interrupted. An address
//! that moves to another customer takes the emails that arrive after the move.
//!
//! # Notifications, and the crash windows
//!
//! A notification is rendered once — plain text and HTML, to the sales rep, with the
//! quote id, the customer id, the reason and the missing products — and recorded with
//! its delivery status `sending`, its bytes and one `Message-ID` derived from the request:
//! `<notification-{request's message id}@email.dbps>`. The worker sends the recorded bytes,
//! then records `sent`; a failed send is retried with backoff. The process can die at any
//! point of that:
//!
//! | the process dies | after a restart | copies received |
//! |---|---|---|
//! | before the request is recorded | Kafka delivers it again; recorded and sent | 1 |
//! | after recording `sending`, before SMTP | sent at once, or when the interrupted attempt's lease ends | 1 |
//! | during the SMTP transaction | the server dropped the unfinished transaction; sent again | 1 |
//! | after the server accepted it, before `sent` is recorded | sent again | 2 |
//! | after `sent` is recorded | nothing more | 1 |
//!
//! Delivery is therefore at least once; it cannot be exactly once, since the SMTP
//! server's acceptance and the service's record cannot be one atomic step. What makes the
//! second copy safe is the `Message-ID`: it is derived from the request, not generated
//! per attempt, and the bytes are recorded before the first attempt, so every copy is the
//! same message with the same `Message-ID` — the recipient's mail client (or a
//! deduplicating relay) can recognise it as a copy rather than a second notification, and
//! so can anyone who counts the copies. A duplicate delivery of the request by Kafka finds
//! the email recorded (the inbox) and sends nothing more.
//!
//! The windows can be reproduced: `EMAIL_FAILPOINT` ([`failpoint`]) stops the process at a
//! named point so that a test can SIGKILL it there.

pub mod assign;
pub mod customers;
pub mod delivery;
pub mod events;
pub mod failpoint;
mod ingest;
pub mod model;
pub mod notify;
mod read;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use dbps_core::kafka::TopicSpec;
use dbps_core::{OtherTypes, Typed};
use dbps_outbox::Relay;
use dbps_outbox::mongo::{MongoOutbox, MongoOutboxStore};
use dbps_service::Service;
use dbps_service::http::Problem;
use mongodb::bson::Document;
use mongodb::{Collection, Database};
use tokio::sync::Notify;

use crate::assign::Assigner;
use crate::delivery::{Deliveries, Policy, SmtpServer};
pub use crate::failpoint::Failpoint;
use crate::failpoint::Failpoints;
pub use crate::ingest::{MAX_ATTACHMENTS, MAX_EMAIL_DOCUMENT, MESSAGE_RFC822};
use crate::model::EmailRecord;
use crate::notify::NotificationRequests;
pub use crate::notify::notification_message_id;
use crate::store::{ASSIGNMENTS, ATTACHMENTS, EMAILS};

/// The service's name, the root of its database, topics and groups.
pub const SERVICE: &str = example_contracts::services::EMAIL;

/// The consumer of the customer events (its group is `<email>.customer-email-index`).
pub const INDEX_CONSUMER: &str = "customer-email-index";
/// The consumer of the quote events (its group is `<email>.notifications`).
pub const NOTIFICATIONS_CONSUMER: &str = "notifications";

/// A boxed error of the service's start.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the email service needs to know of the others, its limits and its delivery
/// policy.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The customer service's name (its events topic).
    pub customer: String,
    /// The customer service's base URL (the replica's snapshot).
    pub customer_url: String,
    /// The quote service's name (its events topic).
    pub quote: String,
    /// The SMTP server notifications go to: `smtp://host[:port]`.
    pub smtp_url: String,
    /// The notifications' sender (`From` and the SMTP envelope's sender).
    pub sender: String,
    /// The largest attachment `POST /emails` takes, decoded, in bytes.
    pub max_attachment_bytes: usize,
    /// The largest request `POST /emails` takes, in bytes (a raw message, its attachments
    /// base64-encoded: keep it above 4/3 of `max_attachment_bytes`).
    pub max_message_bytes: usize,
    /// How often pending emails are swept for late assignment (and orphan chunks removed).
    pub sweep_interval: Duration,
    /// How long one step of an SMTP transaction may take.
    pub smtp_timeout: Duration,
    /// How long a notification being sent is left to its sender before it is due again
    /// (what a crash in the middle of an attempt costs).
    pub delivery_lease: Duration,
    /// The wait after a failed send, doubled after each further failure...
    pub retry_initial: Duration,
    /// ... up to this.
    pub retry_max: Duration,
    /// How many attempts a notification gets before it is `failed`.
    pub max_attempts: u32,
    /// The failpoint armed in this process (fault injection; `None` in production).
    pub failpoint: Option<Failpoint>,
}

/// 15 MiB: the default of [`Settings::max_attachment_bytes`].
pub const DEFAULT_MAX_ATTACHMENT_BYTES: usize = 15 * 1024 * 1024;
/// 32 MiB: the default of [`Settings::max_message_bytes`].
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

impl Settings {
    /// The canonical peers, the customer service at `customer_url`, the SMTP server at
    /// `smtp_url`, and the defaults: attachments up to 15 MiB in messages up to 32 MiB, a
    /// sweep every minute, SMTP steps of at most 10 s, a 2 minute lease, retries from 1 s
    /// doubling up to 5 minutes, 50 attempts.
    pub fn new(customer_url: impl Into<String>, smtp_url: impl Into<String>) -> Self {
        use example_contracts::services;
        Self {
            customer: services::CUSTOMER.to_owned(),
            customer_url: customer_url.into(),
            quote: services::QUOTE.to_owned(),
            smtp_url: smtp_url.into(),
            sender: format!("notifications@{}", notify::MESSAGE_ID_DOMAIN),
            max_attachment_bytes: DEFAULT_MAX_ATTACHMENT_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            sweep_interval: Duration::from_secs(60),
            smtp_timeout: Duration::from_secs(10),
            delivery_lease: Duration::from_secs(120),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            max_attempts: 50,
            failpoint: None,
        }
    }

    /// From the environment: `EMAIL_CUSTOMER_URL` and `EMAIL_SMTP_URL` (required), and
    /// optionally `EMAIL_CUSTOMER_SERVICE`, `EMAIL_QUOTE_SERVICE` (the peers' names),
    /// `EMAIL_SENDER`, `EMAIL_MAX_ATTACHMENT_BYTES`, `EMAIL_MAX_MESSAGE_BYTES`,
    /// `EMAIL_SWEEP_INTERVAL_SECS`, `EMAIL_SMTP_TIMEOUT_MS`, `EMAIL_DELIVERY_LEASE_MS`,
    /// `EMAIL_RETRY_INITIAL_MS`, `EMAIL_RETRY_MAX_MS`, `EMAIL_MAX_ATTEMPTS` and
    /// `EMAIL_FAILPOINT`.
    pub fn from_env() -> Result<Self, BoxError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, BoxError> {
        let var = |name: &str| lookup(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let customer_url = var("EMAIL_CUSTOMER_URL").ok_or("EMAIL_CUSTOMER_URL is not set")?;
        let smtp_url = var("EMAIL_SMTP_URL").ok_or("EMAIL_SMTP_URL is not set")?;
        let mut settings = Self::new(customer_url, smtp_url);
        if let Some(name) = var("EMAIL_CUSTOMER_SERVICE") {
            settings.customer = name;
        }
        if let Some(name) = var("EMAIL_QUOTE_SERVICE") {
            settings.quote = name;
        }
        if let Some(sender) = var("EMAIL_SENDER") {
            settings.sender = sender;
        }
        let number = |name: &str| -> Result<Option<u64>, BoxError> {
            var(name)
                .map(|v| v.parse::<u64>().map_err(|e| format!("{name}: {e}").into()))
                .transpose()
        };
        let size = |name: &str| -> Result<Option<usize>, BoxError> {
            number(name)?
                .map(|n| usize::try_from(n).map_err(|e| format!("{name}: {e}").into()))
                .transpose()
        };
        if let Some(bytes) = size("EMAIL_MAX_ATTACHMENT_BYTES")? {
            settings.max_attachment_bytes = bytes;
        }
        if let Some(bytes) = size("EMAIL_MAX_MESSAGE_BYTES")? {
            settings.max_message_bytes = bytes;
        }
        if let Some(secs) = number("EMAIL_SWEEP_INTERVAL_SECS")? {
            settings.sweep_interval = Duration::from_secs(secs);
        }
        for (name, slot) in [
            ("EMAIL_SMTP_TIMEOUT_MS", &mut settings.smtp_timeout),
            ("EMAIL_DELIVERY_LEASE_MS", &mut settings.delivery_lease),
            ("EMAIL_RETRY_INITIAL_MS", &mut settings.retry_initial),
            ("EMAIL_RETRY_MAX_MS", &mut settings.retry_max),
        ] {
            if let Some(millis) = number(name)? {
                *slot = Duration::from_millis(millis);
            }
        }
        if let Some(attempts) = number("EMAIL_MAX_ATTEMPTS")? {
            settings.max_attempts = u32::try_from(attempts).map_err(|e| format!("EMAIL_MAX_ATTEMPTS: {e}"))?;
        }
        if let Some(point) = var("EMAIL_FAILPOINT") {
            settings.failpoint = Some(point.parse().map_err(|e| format!("EMAIL_FAILPOINT: {e}"))?);
        }
        Ok(settings)
    }

    /// Refuses settings the service cannot work with.
    fn check(&self) -> Result<(), BoxError> {
        let mut problems = Vec::new();
        if self.max_attachment_bytes == 0 {
            problems.push(String::from("the attachment limit must be above 0"));
        }
        if self.max_message_bytes == 0 {
            problems.push(String::from("the message limit must be above 0"));
        }
        if self.sweep_interval.is_zero() || self.smtp_timeout.is_zero() || self.retry_initial.is_zero() {
            problems.push(String::from(
                "the sweep interval, the SMTP timeout and the first retry wait must be above 0",
            ));
        }
        if self.delivery_lease <= self.smtp_timeout {
            problems.push(String::from("the delivery lease must be longer than the SMTP timeout"));
        }
        if self.retry_max < self.retry_initial {
            problems.push(String::from("the longest retry wait must not be below the first"));
        }
        if self.max_attempts == 0 {
            problems.push(String::from("a notification needs at least one attempt"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("invalid email settings: {}", problems.join("; ")).into())
        }
    }
}

/// The running service's state.
#[derive(Debug, Clone)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    database: Database,
    emails: Collection<EmailRecord>,
    chunks: Collection<Document>,
    assignments: Collection<Document>,
    assigner: Assigner,
    settings: Settings,
}

impl App {
    /// Migrates the service's database `database` and starts its parts on `service`: the
    /// relay of the assignment events, the customer replica (stream, backfill, sweep), the
    /// notification consumer and the delivery worker (topics are created where missing).
    /// Serve [`App::router`] next.
    pub async fn start(service: &mut Service, database: Database, settings: Settings) -> Result<Self, BoxError> {
        settings.check()?;
        let smtp = SmtpServer::from_url(&settings.smtp_url, settings.smtp_timeout)?;
        let sender: lettre::message::Mailbox = settings
            .sender
            .parse()
            .map_err(|e| format!("the sender {:?} is not an address: {e}", settings.sender))?;
        let report = store::migrations(&database).run().await?;
        tracing::info!(database = %report.database, applied = report.applied.len(), "email database migrated");

        let name = service.name().to_string();
        let naming = service.naming();
        let outbox = MongoOutbox::new(name.clone()).naming(naming.clone());
        let assigner = Assigner::new(&database, outbox);

        // The assignment events: written with their documents, published by the relay.
        let relay = Relay::builder(
            MongoOutboxStore::new(database.clone()).collection(ASSIGNMENTS),
            service.relay_publisher()?,
        )
        .create_topics([TopicSpec::new(naming.events(&name, events::AGGREGATE)?, 3)])
        .build()?;
        service.run_relay(relay);

        // The customer email index: the stream (with late assignment), the backfill and
        // the sweep.
        let replica = customers::replica(&database)?;
        service.consume(
            &service.group(INDEX_CONSUMER),
            &naming.events(&settings.customer, example_customer_service::AGGREGATE)?,
            customers::IndexAndAssign::new(replica.clone(), assigner.clone()),
        )?;
        let (backfill, url) = (assigner.clone(), settings.customer_url.clone());
        service.run("customer backfill", move |stop| async move {
            customers::backfill(replica, backfill, &url, stop).await
        });
        let (sweep, interval) = (assigner.clone(), settings.sweep_interval);
        service.run("assignment sweep", move |stop| {
            customers::sweep_periodically(sweep, interval, stop)
        });

        // Notifications: recorded once per request, sent by the delivery worker.
        let wake = Arc::new(Notify::new());
        let failpoints = Failpoints::new(settings.failpoint);
        let requests = NotificationRequests::new(
            database.collection(EMAILS),
            sender.clone(),
            Arc::clone(&wake),
            failpoints,
        );
        service.consume(
            &service.group(NOTIFICATIONS_CONSUMER),
            &naming.events(&settings.quote, example_contracts::quote::AGGREGATE)?,
            Typed::new(requests).other_types(OtherTypes::Ignore),
        )?;
        let deliveries = Deliveries::new(
            database.collection(EMAILS),
            smtp,
            sender.email,
            Policy {
                lease: settings.delivery_lease,
                retry_initial: settings.retry_initial,
                retry_max: settings.retry_max,
                max_attempts: settings.max_attempts,
            },
            wake,
            failpoints,
        );
        service.run("deliveries", move |stop| deliveries.run(stop));

        Ok(Self {
            inner: Arc::new(Inner {
                emails: database.collection(EMAILS),
                chunks: database.collection(ATTACHMENTS),
                assignments: database.collection(ASSIGNMENTS),
                database,
                assigner,
                settings,
            }),
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/emails", post(ingest::post_email))
            .route("/emails/{id}", get(read::get_email))
            .route("/emails/{id}/attachments/{n}", get(read::get_attachment))
            .route("/customers/{id}/emails", get(read::customer_emails))
            .layer(axum::extract::DefaultBodyLimit::max(
                self.inner.settings.max_message_bytes,
            ))
            .with_state(self.clone())
    }

    /// The service's database.
    pub fn database(&self) -> &Database {
        &self.inner.database
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The assigner (for operators and tests: [`Assigner::sweep`] assigns what is pending
    /// now).
    pub fn assigner(&self) -> &Assigner {
        &self.inner.assigner
    }

    pub(crate) fn emails(&self) -> &Collection<EmailRecord> {
        &self.inner.emails
    }

    pub(crate) fn chunks(&self) -> &Collection<Document> {
        &self.inner.chunks
    }

    pub(crate) fn assignments(&self) -> &Collection<Document> {
        &self.inner.assignments
    }
}

/// A database failure: `503`, logged without the request's data.
pub(crate) fn unavailable(error: &(dyn std::error::Error + 'static)) -> Problem {
    tracing::error!(error = %dbps_core::ErrorChain(error), "request failed");
    Problem::unavailable()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, BoxError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Settings::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn settings_come_from_the_environment_with_defaults() {
        let s = settings(&[
            ("EMAIL_CUSTOMER_URL", "http://customer:8080"),
            ("EMAIL_SMTP_URL", "smtp://127.0.0.1:21025"),
            ("EMAIL_QUOTE_SERVICE", "quote_b"),
            ("EMAIL_MAX_ATTACHMENT_BYTES", "1024"),
            ("EMAIL_FAILPOINT", "after-smtp"),
        ])
        .expect("valid");
        assert_eq!((s.customer.as_str(), s.quote.as_str()), ("customer", "quote_b"));
        assert_eq!(s.max_attachment_bytes, 1024);
        assert_eq!(s.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(s.failpoint, Some(Failpoint::AfterSmtp));
        assert!(s.check().is_ok());
    }

    #[test]
    fn missing_and_unusable_settings_are_refused() {
        assert!(settings(&[("EMAIL_SMTP_URL", "smtp://h")]).is_err());
        assert!(settings(&[("EMAIL_CUSTOMER_URL", "http://c")]).is_err());
        let base = [("EMAIL_CUSTOMER_URL", "http://c"), ("EMAIL_SMTP_URL", "smtp://h")];
        for bad in [
            ("EMAIL_MAX_ATTACHMENT_BYTES", "lots"),
            ("EMAIL_FAILPOINT", "sometime"),
            ("EMAIL_MAX_ATTEMPTS", "-1"),
        ] {
            let mut vars = base.to_vec();
            vars.push(bad);
            assert!(settings(&vars).is_err(), "{bad:?}");
        }
        let mut vars = base.to_vec();
        vars.push(("EMAIL_DELIVERY_LEASE_MS", "100"));
        assert!(
            settings(&vars).expect("parses").check().is_err(),
            "a lease shorter than a step"
        );
    }

    #[test]
    fn smtp_urls_are_plain_smtp_without_credentials() {
        let timeout = Duration::from_secs(1);
        assert!(SmtpServer::from_url("smtp://127.0.0.1:21025", timeout).is_ok());
        assert!(SmtpServer::from_url("smtp://mail.internal", timeout).is_ok());
        for bad in [
            "smtps://h:465",
            "smtp://user:secret@h:25",
            "http://h",
            "not a url",
            "smtp://",
        ] {
            let error = SmtpServer::from_url(bad, timeout).expect_err(bad);
            assert!(!error.to_string().contains("secret"), "{error}");
        }
    }

    #[test]
    fn the_message_id_of_a_notification_is_derived_from_its_request() {
        let id = "0195f1a2-7c3b-7d4e-8f90-123456789abc";
        assert_eq!(notification_message_id(id), format!("notification-{id}@email.dbps"));
        assert_eq!(notification_message_id(id), notification_message_id(id));
        let odd = notification_message_id("a b<c>@d");
        assert!(
            odd.starts_with("notification-") && !odd.contains(' ') && !odd.contains('<'),
            "{odd}"
        );
    }
}
