use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;

/// How to reach a Kafka cluster: bootstrap servers and librdkafka properties.
///
/// Any librdkafka property passes through (`security.protocol`, `ssl.*`, `sasl.*`, ...).
/// Values of secret properties (passwords, keys, tokens) never appear in `Debug` output
/// or logs.
///
/// ```
/// let config = dbps_core::kafka::KafkaConfig::new("127.0.0.1:9092")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512")
///     .set("sasl.username", "quote-service")
///     .set("sasl.password", "s3cret");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// A configuration for the given bootstrap servers (`host:port,host:port`).
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        let mut properties = BTreeMap::new();
        properties.insert(String::from("bootstrap.servers"), bootstrap_servers.into());
        Self { properties }
    }

    /// Sets a librdkafka property.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// The bootstrap servers.
    pub fn bootstrap_servers(&self) -> &str {
        self.properties.get("bootstrap.servers").map_or("", String::as_str)
    }

    /// A property's value, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// Every property, in key order, secrets included: for building another client from
    /// this configuration. Keep the values out of logs (`Debug` redacts them).
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }

    /// The principal the brokers see for this configuration, for error messages:
    /// `User:<sasl.username>` when SASL is on, the TLS client certificate's subject when
    /// one is configured, otherwise `User:ANONYMOUS`.
    pub fn principal(&self) -> String {
        let protocol = self
            .get("security.protocol")
            .unwrap_or("plaintext")
            .to_ascii_uppercase();
        if protocol.starts_with("SASL")
            && let Some(user) = self.get("sasl.username")
        {
            return format!("User:{user}");
        }
        if protocol.ends_with("SSL")
            && (self.get("ssl.certificate.location").is_some() || self.get("ssl.certificate.pem").is_some())
        {
            return String::from("the subject of the TLS client certificate");
        }
        String::from("User:ANONYMOUS")
    }

    /// The rdkafka client configuration: these properties over `defaults`.
    pub(crate) fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        // rdkafka derives librdkafka's log level from the `log` crate's, which is off in
        // a program that logs through `tracing` only: keep warnings and errors coming, so
        // that a refused login reaches the client context (and the logs), where
        // subscribers filter them.
        if (config.log_level as i32) < (rdkafka::config::RDKafkaLogLevel::Warning as i32) {
            config.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        }
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

/// Whether a property holds a secret that must not be shown.
pub(crate) fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "ssl_key",
        "ssl.key.location",
    ]
    .iter()
    .any(|needle| key.contains(needle))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in &self.properties {
            if is_secret(key) {
                map.entry(key, &"***");
            } else {
                map.entry(key, value);
            }
        }
        map.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug() {
        let config = KafkaConfig::new("b:9092")
            .set("sasl.password", "p1")
            .set("ssl.key.password", "p2")
            .set("sasl.oauthbearer.client.secret", "p3")
            .set("ssl.key.pem", "-----BEGIN PRIVATE KEY-----")
            .set("sasl.username", "svc");
        let shown = format!("{config:?}");
        for secret in ["p1", "p2", "p3", "BEGIN PRIVATE KEY"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("svc") && shown.contains("b:9092"));
    }

    #[test]
    fn the_principal_is_the_sasl_user_only_under_sasl() {
        let plain = KafkaConfig::new("b:9092").set("sasl.username", "quote");
        assert_eq!(plain.principal(), "User:ANONYMOUS");
        let sasl = plain.set("security.protocol", "SASL_SSL");
        assert_eq!(sasl.principal(), "User:quote");
    }

    #[test]
    fn user_properties_override_defaults() {
        let config = KafkaConfig::new("b:9092").set("acks", "1");
        let client = config.client_config(&[("acks", "all"), ("linger.ms", "5")]);
        assert_eq!(client.get("acks"), Some("1"));
        assert_eq!(client.get("linger.ms"), Some("5"));
    }
}
