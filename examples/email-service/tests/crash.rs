//! The notification's crash windows: the `email-service` binary runs as a child process,
//! stops at a failpoint (`EMAIL_FAILPOINT`), is killed there with SIGKILL and started
//! again. The mail then arrives at least once, every copy with the same `Message-ID`.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::{BoxError, NO_CUSTOMER_SERVICE, QUOTE, TestResult, notification_request, publish, request_envelope};
use example_email_service::failpoint::MARKER;
use example_email_service::store::EMAILS;
use example_email_service::{Failpoint, notification_message_id};
use mongodb::bson::{Document, doc};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// One run of the binary, with what it wrote to standard error.
struct Process {
    child: Child,
    failpoints: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

/// The stack and the test's namespaces, shared by the runs of one test.
struct Setup {
    kafka: dbps_testkit::TestKafka,
    mongo: dbps_testkit::TestMongo,
    mail: dbps_testkit::TestMailpit,
    mongodb_uri: String,
}

impl Setup {
    async fn new() -> Result<Self, BoxError> {
        common::init_logs();
        let mongodb_uri = std::env::var("DBPS_MONGODB_URI")
            .map_err(|_| "DBPS_MONGODB_URI must name the stack's MongoDB server: eval \"$(scripts/stack.sh env)\"")?;
        Ok(Self {
            kafka: dbps_testkit::kafka().await?,
            mongo: dbps_testkit::mongo().await?,
            mail: dbps_testkit::mailpit().await?,
            mongodb_uri,
        })
    }

    /// Starts the binary on the test's database and topics, `failpoint` armed.
    fn spawn(&self, failpoint: Option<Failpoint>) -> Result<Process, BoxError> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_email-service"));
        command
            .env("RUST_LOG", "info,rdkafka=warn,librdkafka=warn")
            .env("DBPS_MONGODB_URI", &self.mongodb_uri)
            .env("DBPS_KAFKA_BROKERS", self.kafka.brokers())
            .env("DBPS_TOPIC_PREFIX", self.kafka.prefix())
            .env("EMAIL_SERVICE_NAME", self.mongo.database().name())
            .env("EMAIL_HTTP_ADDR", "127.0.0.1:0")
            .env("EMAIL_CUSTOMER_URL", NO_CUSTOMER_SERVICE)
            .env("EMAIL_QUOTE_SERVICE", QUOTE)
            .env("EMAIL_SMTP_URL", self.mail.smtp_url())
            .env("EMAIL_SMTP_TIMEOUT_MS", "2000")
            .env("EMAIL_DELIVERY_LEASE_MS", "3000")
            .env("EMAIL_KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env_remove("EMAIL_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(point) = failpoint {
            command.env("EMAIL_FAILPOINT", point.name());
        }
        let mut child = command.spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (sender, failpoints) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(point) = line.strip_prefix(MARKER) {
                    let _ = sender.send(point.to_owned());
                }
                if let Ok(mut log) = lines.lock() {
                    log.push(line);
                }
            }
        });
        Ok(Process { child, failpoints, log })
    }

    /// The notification's delivery status, `None` while it is not recorded.
    async fn status(&self, id: &str) -> Result<Option<String>, mongodb::error::Error> {
        let email = self
            .mongo
            .database()
            .collection::<Document>(EMAILS)
            .find_one(doc! { "_id": id })
            .await?;
        Ok(email.and_then(|e| {
            e.get_document("delivery")
                .ok()
                .and_then(|d| d.get_str("status").ok().map(str::to_owned))
        }))
    }
}

impl Process {
    fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|log| log.iter().rev().take(40).rev().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Waits until the process reports its failpoint reached, then kills it (SIGKILL).
    async fn kill_at(mut self, point: Failpoint) -> TestResult {
        let reached = tokio::time::timeout(dbps_testkit::DEADLINE, self.failpoints.recv()).await;
        match reached {
            Ok(Some(name)) if name == point.name() => {}
            other => {
                let _ = self.child.kill().await;
                return Err(format!(
                    "failpoint {point} not reached ({other:?}); the log:\n{}",
                    self.log_tail()
                )
                .into());
            }
        }
        self.child.kill().await?;
        let status = self.child.wait().await?;
        assert!(!status.success(), "killed, not exited: {status}");
        Ok(())
    }
}

/// Kills the service at `point` while it handles one notification request, starts it
/// again, and checks what reached the SMTP server: `copies` copies, each with the
/// request's Message-ID.
async fn crash_at(point: Failpoint, copies: usize) -> TestResult {
    let setup = Setup::new().await?;
    let rep = setup.mail.recipient("rep");
    let envelope = request_envelope(&notification_request(&rep))?;
    common::quote_topic(&setup.kafka).await?;
    let first = setup.spawn(Some(point))?;
    publish(&setup.kafka, &envelope).await?;
    first.kill_at(point).await?;

    // What the crash left.
    let status = setup.status(&envelope.id).await?;
    let delivered_before_restart = setup.mail.messages_to(&rep).await?.len();
    match point {
        Failpoint::BeforeRecord => assert_eq!(status, None, "nothing recorded"),
        _ => assert_eq!(status.as_deref(), Some("sending")),
    }
    match point {
        Failpoint::AfterSmtp => {
            assert_eq!(setup.mail.wait_for(&rep, 1).await?.len(), 1, "the server took it")
        }
        _ => assert_eq!(delivered_before_restart, 0, "nothing reached the server"),
    }

    // After a restart the notification is delivered and recorded as sent.
    let second = setup.spawn(None)?;
    let sent = dbps_testkit::eventually("the notification sent after the restart", || async {
        Ok::<_, mongodb::error::Error>(setup.status(&envelope.id).await?.as_deref() == Some("sent"))
    })
    .await;
    if let Err(error) = sent {
        return Err(format!("{error}; the log:\n{}", second.log_tail()).into());
    }
    let arrived = setup.mail.wait_for(&rep, copies).await?;
    assert_eq!(arrived.len(), copies, "copies after a crash at {point}");
    let expected = notification_message_id(&envelope.id);
    assert!(
        arrived.iter().all(|m| m.message_id == expected),
        "every copy is the same message: {arrived:?}"
    );
    if copies > 1 {
        let (a, b) = (
            setup.mail.message(&arrived[0].id).await?,
            setup.mail.message(&arrived[1].id).await?,
        );
        assert_eq!((a.subject.as_str(), a.text()), (b.subject.as_str(), b.text()));
    }
    drop(second);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_request_is_recorded_delivers_it_once_after_the_restart() -> TestResult {
    crash_at(Failpoint::BeforeRecord, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_smtp_transaction_delivers_it_once_after_the_restart() -> TestResult {
    crash_at(Failpoint::BeforeSmtp, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_the_smtp_transaction_delivers_it_once_after_the_restart() -> TestResult {
    crash_at(Failpoint::DuringSmtp, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_server_took_it_delivers_a_second_copy_with_the_same_message_id() -> TestResult {
    crash_at(Failpoint::AfterSmtp, 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_an_unknown_failpoint() -> TestResult {
    let output = Command::new(env!("CARGO_BIN_EXE_email-service"))
        .env("DBPS_MONGODB_URI", "mongodb://127.0.0.1:9/")
        .env("DBPS_KAFKA_BROKERS", "127.0.0.1:9")
        .env("EMAIL_CUSTOMER_URL", NO_CUSTOMER_SERVICE)
        .env("EMAIL_SMTP_URL", "smtp://127.0.0.1:9")
        .env("EMAIL_FAILPOINT", "sometime")
        .stdin(Stdio::null())
        .output()
        .await?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("EMAIL_FAILPOINT"), "{stderr}");
    Ok(())
}
