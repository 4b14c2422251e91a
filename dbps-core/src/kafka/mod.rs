//! Apache Kafka: configuration, topics, the publisher and the consumer runner.

mod config;
mod consumer;
mod flush;
mod publisher;
mod topics;

pub use crate::handler::{BatchHandler, Handler, HandlerError};
pub use config::KafkaConfig;
pub use consumer::{
    ConsumerRunner, ConsumerRunnerBuilder, ERROR_LOG_INTERVAL, RetryPolicy, RunSummary, dead_letter_header,
    decode_record,
};
pub use publisher::{Delivery, KafkaPublisher, KafkaPublisherBuilder};
pub use topics::{TopicNaming, TopicOutcome, TopicSpec, ensure_topics, missing_topics, validate_topic_name};

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::Error;

/// How recent an authentication failure must be to explain a request that timed out or
/// could not reach a broker: librdkafka tries again at least every
/// `reconnect.backoff.max.ms` (1 s here), so a failure that still holds was reported
/// moments ago.
const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(15);

/// A client context that remembers the last authentication failure librdkafka reported.
///
/// librdkafka reports a refused login (a wrong password, an unknown user, a plaintext
/// client on a TLS listener) through the error callback, not with the request that fails:
/// that one only times out or finds no broker. Remembering the callback's reason lets
/// [`kafka_error`] tell the user what really happened.
#[derive(Debug, Default)]
pub(crate) struct AuthMemory {
    last: Mutex<Option<(Instant, String)>>,
    /// Whether `last` holds a failure: lets [`AuthMemory::clear`], called for every
    /// acknowledged message, skip the lock in the usual case.
    remembered: AtomicBool,
}

impl AuthMemory {
    /// Records `error` if the broker refused the login (librdkafka's `__AUTHENTICATION`,
    /// or `SASL_AUTHENTICATION_FAILED`).
    pub(crate) fn record(&self, error: &KafkaError, reason: &str) {
        use RDKafkaErrorCode as C;
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(C::Authentication | C::SaslAuthenticationFailed)
        );
        if refused && is_refused_login(reason) {
            self.remember(reason);
        }
    }

    /// Records a librdkafka log line that reports a refused login: some clients learn of
    /// it only through the log.
    pub(crate) fn record_log(&self, level: RDKafkaLogLevel, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) && is_refused_login(message) {
            self.remember(message);
        }
    }

    /// Forgets a remembered failure: the client got through since.
    pub(crate) fn clear(&self) {
        if self.remembered.load(Ordering::Relaxed)
            && let Ok(mut last) = self.last.lock()
        {
            *last = None;
            self.remembered.store(false, Ordering::Relaxed);
        }
    }

    fn remember(&self, reason: &str) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Instant::now(), reason.to_owned()));
            self.remembered.store(true, Ordering::Relaxed);
        }
    }

    fn recent(&self) -> Option<String> {
        let last = self.last.lock().ok()?;
        last.as_ref()
            .filter(|(at, _)| at.elapsed() <= AUTH_FAILURE_WINDOW)
            .map(|(_, reason)| reason.clone())
    }
}

/// Whether librdkafka's text reports a login the broker refused, as opposed to a SASL
/// exchange that failed on the network (`SaslAuthenticateRequest failed: … transport
/// failure`), which says nothing about the credentials and must not stop anything.
fn is_refused_login(text: &str) -> bool {
    !text.contains("SaslAuthenticateRequest failed")
        && (text.contains("Authentication failed") || text.contains("invalid credentials"))
}

/// The default context plus [`AuthMemory`].
#[derive(Debug, Default)]
pub(crate) struct AuthContext {
    pub(crate) auth: std::sync::Arc<AuthMemory>,
}

impl rdkafka::consumer::ConsumerContext for AuthContext {}

impl rdkafka::producer::ProducerContext for AuthContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, (): Self::DeliveryOpaque) {}
}

impl ClientContext for AuthContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.auth.record_log(level, log_message);
        log_like_rdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.auth.record(&error, reason);
        tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
    }
}

/// The error of a client that could not be created. A property librdkafka refused is
/// named without its value, which may be a secret (rdkafka's own message shows it).
pub(crate) fn creation_error(operation: &str, source: KafkaError) -> Error {
    match source {
        KafkaError::ClientConfig(_, description, key, _) => {
            let reason = if config::is_secret(&key) {
                String::from("librdkafka refused the value (not shown: it is a secret)")
            } else {
                description
            };
            Error::config(key, reason)
        }
        other => Error::Kafka {
            operation: operation.to_owned(),
            source: other,
        },
    }
}

/// librdkafka's log line as rdkafka's default context writes it.
pub(crate) fn log_like_rdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}");
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
        RDKafkaLogLevel::Notice => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
        RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
    }
}

/// The error of a failed Kafka `operation`: [`Error::Refused`], naming the principal of
/// `config`, when the broker refused authorisation, or authentication (as reported with
/// the request or, shortly before, to `auth`), otherwise [`Error::Kafka`].
pub(crate) fn kafka_error(
    config: &KafkaConfig,
    auth: Option<&AuthMemory>,
    operation: impl Into<String>,
    source: KafkaError,
) -> Error {
    use RDKafkaErrorCode as C;
    let reason = match source.rdkafka_error_code() {
        Some(C::TopicAuthorizationFailed) => String::from("not authorised on the topic: an ACL for it is missing"),
        Some(C::GroupAuthorizationFailed) => {
            String::from("not authorised for the consumer group: an ACL for it is missing")
        }
        Some(C::ClusterAuthorizationFailed) => String::from("not authorised on the cluster: an ACL for it is missing"),
        Some(C::TransactionalIdAuthorizationFailed) => {
            String::from("not authorised for the transactional id: an ACL for it is missing")
        }
        Some(C::SaslAuthenticationFailed | C::Authentication) => {
            String::from("authentication failed: check the user, the password and the SASL mechanism")
        }
        Some(
            C::MessageTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::OperationTimedOut
            | C::RequestTimedOut,
        ) if let Some(login) = auth.and_then(AuthMemory::recent) => format!(
            "authentication failed: {login} (check the user, the password, the SASL mechanism and security.protocol)"
        ),
        _ => {
            return Error::Kafka {
                operation: operation.into(),
                source,
            };
        }
    };
    Error::Refused(Box::new(crate::error::Refusal {
        principal: config.principal(),
        operation: operation.into(),
        reason,
        source,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_login_is_remembered_not_a_sasl_exchange_lost_on_the_network() {
        let memory = AuthMemory::default();
        memory.record_log(
            RDKafkaLogLevel::Error,
            "[thrd:sasl_ssl://127.0.0.1:29096/bootstrap]: SASL authentication error: SaslAuthenticateRequest failed: Local: Broker transport failure",
        );
        assert_eq!(memory.recent(), None);
        memory.record_log(
            RDKafkaLogLevel::Error,
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
        );
        assert!(
            memory
                .recent()
                .is_some_and(|reason| reason.contains("invalid credentials"))
        );
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let config = KafkaConfig::new("b:9093")
            .set("security.protocol", "SASL_SSL")
            .set("sasl.username", "quote");
        let error = kafka_error(&config, Some(&memory), "produce to t", timed_out);
        assert!(
            error
                .to_string()
                .starts_with("kafka refused User:quote to produce to t: authentication failed"),
            "{error}"
        );
        memory.clear();
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let error = kafka_error(&config, Some(&memory), "produce to t", timed_out);
        assert!(
            matches!(error, Error::Kafka { .. }),
            "a timeout without a refused login stays transient: {error}"
        );
    }
}
