//! The local stack's secured endpoints: Kafka over SASL_SSL (SCRAM-SHA-512) with ACLs
//! enforced, Redis over TLS with ACL users, PostgreSQL with TLS.
//!
//! `scripts/stack.sh up` starts them beside the plain ones and `scripts/stack.sh env`
//! names them (`DBPS_KAFKA_SECURE_BROKERS`, `DBPS_KAFKA_ADMIN_USER`,
//! `DBPS_KAFKA_ADMIN_PASSWORD`, `DBPS_TLS_CA_FILE`, `DBPS_REDIS_TLS_URL`,
//! `DBPS_REDIS_ADMIN_USER`, `DBPS_REDIS_ADMIN_PASSWORD`, `DBPS_POSTGRES_TLS_URL`). There
//! is no container fallback: a secured server needs its certificates and users set up
//! the way the stack does.

use std::fmt;

use crate::error::{Error, Result};

/// The secured endpoints of the local stack, from the environment.
#[derive(Clone)]
pub struct SecureStack {
    kafka_brokers: String,
    kafka_admin_user: String,
    kafka_admin_password: String,
    ca_file: String,
    redis_url: String,
    redis_admin_user: String,
    redis_admin_password: String,
    postgres_url: String,
}

impl fmt::Debug for SecureStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureStack")
            .field("kafka_brokers", &self.kafka_brokers)
            .field("kafka_admin_user", &self.kafka_admin_user)
            .field("ca_file", &self.ca_file)
            .field("redis_url", &self.redis_url)
            .field("redis_admin_user", &self.redis_admin_user)
            .finish_non_exhaustive()
    }
}

fn var(name: &'static str) -> Result<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .ok_or(Error::NoSecureServer { var: name })
}

/// The secured endpoints named by the environment.
///
/// # Errors
///
/// [`Error::NoSecureServer`] naming the first variable that is not set.
pub fn secure() -> Result<SecureStack> {
    Ok(SecureStack {
        kafka_brokers: var("DBPS_KAFKA_SECURE_BROKERS")?,
        kafka_admin_user: var("DBPS_KAFKA_ADMIN_USER")?,
        kafka_admin_password: var("DBPS_KAFKA_ADMIN_PASSWORD")?,
        ca_file: var("DBPS_TLS_CA_FILE")?,
        redis_url: var("DBPS_REDIS_TLS_URL")?,
        redis_admin_user: var("DBPS_REDIS_ADMIN_USER")?,
        redis_admin_password: var("DBPS_REDIS_ADMIN_PASSWORD")?,
        postgres_url: var("DBPS_POSTGRES_TLS_URL")?,
    })
}

impl SecureStack {
    /// The SASL_SSL bootstrap servers.
    pub fn kafka_brokers(&self) -> &str {
        &self.kafka_brokers
    }

    /// The stack's CA certificate (PEM file), which signed every server's certificate.
    pub fn ca_file(&self) -> &str {
        &self.ca_file
    }

    /// A client configuration for the SASL_SSL listener as `user` with `password`
    /// (SCRAM-SHA-512, the server verified against the stack's CA).
    #[cfg(feature = "kafka")]
    pub fn kafka_as(&self, user: &str, password: &str) -> dbps_core::kafka::KafkaConfig {
        dbps_core::kafka::KafkaConfig::new(&self.kafka_brokers)
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", user)
            .set("sasl.password", password)
            .set("ssl.ca.location", &self.ca_file)
    }

    /// The Kafka super-user's configuration (for provisioning).
    #[cfg(feature = "kafka")]
    pub fn kafka_admin(&self) -> dbps_core::kafka::KafkaConfig {
        self.kafka_as(&self.kafka_admin_user, &self.kafka_admin_password)
    }

    /// A client of the TLS port as `user` (or the default user when `None`), the server
    /// verified against the stack's CA.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`] if the URL or the CA file cannot be used.
    #[cfg(feature = "redis")]
    pub fn redis_as(&self, user: Option<(&str, &str)>) -> Result<::redis::Client> {
        let invalid = |reason: String| Error::InvalidAddress {
            backend: crate::Backend::Redis,
            var: "DBPS_REDIS_TLS_URL",
            reason,
        };
        let mut info: ::redis::ConnectionInfo =
            ::redis::IntoConnectionInfo::into_connection_info(self.redis_url.as_str())
                .map_err(|e| invalid(e.to_string()))?;
        if let Some((user, password)) = user {
            let settings = info.redis_settings().clone().set_username(user).set_password(password);
            info = info.set_redis_settings(settings);
        }
        let ca = std::fs::read(&self.ca_file).map_err(|e| invalid(format!("CA file {}: {e}", self.ca_file)))?;
        ::redis::Client::build_with_tls(
            info,
            ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        )
        .map_err(|e| invalid(e.to_string()))
    }

    /// A client of the TLS port as the Redis admin user (for provisioning).
    ///
    /// # Errors
    ///
    /// As [`SecureStack::redis_as`].
    #[cfg(feature = "redis")]
    pub fn redis_admin(&self) -> Result<::redis::Client> {
        self.redis_as(Some((&self.redis_admin_user, &self.redis_admin_password)))
    }

    /// The PostgreSQL URL with `sslmode=verify-full` against the stack's CA.
    pub fn postgres_url(&self) -> &str {
        &self.postgres_url
    }
}
