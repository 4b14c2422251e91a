//! A service's configuration, from its environment.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use dbps_core::kafka::{KafkaConfig, TopicNaming};
use dbps_migrate::{Password, ServiceName};
use sqlx::postgres::PgConnectOptions;

use crate::error::{Result, ServiceError};

/// Where a service finds its servers, its secrets and its address.
///
/// [`ServiceConfig::from_env`] reads, for a service named `customer`:
///
/// | variable | meaning | default |
/// |---|---|---|
/// | `DBPS_POSTGRES_URL` | the PostgreSQL server; with [`provision`](ServiceConfig::provision) an administrative role that may create databases and roles, otherwise only its host, port and TLS settings are used | required for [`Service::postgres`](crate::Service::postgres) |
/// | `DBPS_KAFKA_BROKERS` | Kafka bootstrap servers | required for Kafka |
/// | `DBPS_KAFKA_SECURITY_PROTOCOL`, `DBPS_KAFKA_SASL_MECHANISM`, `DBPS_KAFKA_SSL_CA_LOCATION` | `security.protocol`, `sasl.mechanism`, `ssl.ca.location` (`SASL_SSL`, `SCRAM-SHA-512`, the CA file) | librdkafka's defaults (plaintext) |
/// | `CUSTOMER_KAFKA_PASSWORD`, `CUSTOMER_KAFKA_USER` | the service's own Kafka principal (see `dbps_migrate::kafka::KafkaAccess`); the user defaults to the service's name; without them, `DBPS_KAFKA_SASL_USERNAME` and `DBPS_KAFKA_SASL_PASSWORD` | none |
/// | `CUSTOMER_DB_OWNER_PASSWORD` | password of the `customer_owner` role, which runs the migrations | required for PostgreSQL |
/// | `CUSTOMER_DB_RUNTIME_PASSWORD` | password of the `customer_app` role the service connects as | required for PostgreSQL |
/// | `CUSTOMER_HTTP_ADDR` | address the HTTP server listens on | `127.0.0.1:8080` |
/// | `DBPS_PROVISION` | `true`: provision the database and roles at start (idempotent); `false`: they were provisioned beforehand (`dbps-migrate provision`) | `true` |
/// | `DBPS_TOPIC_PREFIX` | a prefix for every topic name (an environment: `staging.`) | none |
/// | `DBPS_SHUTDOWN_GRACE_SECS` | how long a stop may take before the remaining work is abandoned | `30` |
///
/// The service's name is the root of every other name (see the crate documentation);
/// the variables of its own secrets are its name in capitals.
#[derive(Clone)]
pub struct ServiceConfig {
    pub(crate) name: ServiceName,
    pub(crate) postgres: Option<PgConnectOptions>,
    pub(crate) owner_password: Option<Password>,
    pub(crate) runtime_password: Option<Password>,
    pub(crate) provision: bool,
    pub(crate) kafka: Option<KafkaConfig>,
    pub(crate) http_addr: SocketAddr,
    pub(crate) topic_prefix: String,
    pub(crate) shutdown_grace: Duration,
}

/// Passwords and the server URL are left out.
impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("name", &self.name)
            .field("postgres", &self.postgres.is_some())
            .field("provision", &self.provision)
            .field("kafka", &self.kafka)
            .field("http_addr", &self.http_addr)
            .field("topic_prefix", &self.topic_prefix)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

impl ServiceConfig {
    /// A configuration for service `name` with nothing set: add what the service uses with
    /// the setters (tests do), or read it all with [`ServiceConfig::from_env`].
    pub fn new(name: &str) -> Result<Self> {
        Ok(Self {
            name: ServiceName::new(name).map_err(ServiceError::Migrate)?,
            postgres: None,
            owner_password: None,
            runtime_password: None,
            provision: true,
            kafka: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            topic_prefix: String::new(),
            shutdown_grace: Duration::from_secs(30),
        })
    }

    /// The configuration of service `name` from the environment (see the table above).
    /// A variable that is set but unusable is an error naming it; one that is missing is
    /// an error only when the part that needs it starts.
    pub fn from_env(name: &str) -> Result<Self> {
        Self::from_lookup(name, |var| std::env::var(var).ok())
    }

    pub(crate) fn from_lookup(name: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut config = Self::new(name)?;
        let var = |suffix: &str| format!("{}_{suffix}", config.name.as_str().to_ascii_uppercase());
        let get = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
        if let Some(url) = get("DBPS_POSTGRES_URL") {
            config.postgres = Some(PgConnectOptions::from_str(&url).map_err(|e| ServiceError::InvalidVar {
                var: String::from("DBPS_POSTGRES_URL"),
                // sqlx's message does not repeat the URL, so no password can leak here.
                reason: e.to_string(),
            })?);
        }
        for (suffix, slot) in [
            ("DB_OWNER_PASSWORD", &mut config.owner_password),
            ("DB_RUNTIME_PASSWORD", &mut config.runtime_password),
        ] {
            let var = var(suffix);
            if let Some(value) = get(&var) {
                *slot = Some(Password::new(value).map_err(|e| ServiceError::InvalidVar {
                    var: var.clone(),
                    reason: e.to_string(),
                })?);
            }
        }
        if let Some(brokers) = get("DBPS_KAFKA_BROKERS") {
            let mut kafka = KafkaConfig::new(brokers.trim());
            for (var, property) in [
                ("DBPS_KAFKA_SECURITY_PROTOCOL", "security.protocol"),
                ("DBPS_KAFKA_SASL_MECHANISM", "sasl.mechanism"),
                ("DBPS_KAFKA_SSL_CA_LOCATION", "ssl.ca.location"),
            ] {
                if let Some(value) = get(var) {
                    kafka = kafka.set(property, value.trim());
                }
            }
            // The service's own principal (its user defaults to its name) when it has a
            // password of its own, otherwise the shared one.
            let (user, password) = match get(&var("KAFKA_PASSWORD")) {
                Some(password) => (
                    Some(get(&var("KAFKA_USER")).unwrap_or_else(|| config.name.as_str().to_owned())),
                    Some(password),
                ),
                None if get(&var("KAFKA_USER")).is_some() => {
                    return Err(ServiceError::InvalidVar {
                        var: var("KAFKA_USER"),
                        reason: format!("{} is not set", var("KAFKA_PASSWORD")),
                    });
                }
                None => {
                    let shared = get("DBPS_KAFKA_SASL_USERNAME");
                    if let Some(user) = &shared {
                        tracing::warn!(
                            service = %config.name,
                            user = %user.trim(),
                            "the service connects to Kafka as the shared user DBPS_KAFKA_SASL_USERNAME, not as its own principal: give it one with {}",
                            var("KAFKA_PASSWORD")
                        );
                    }
                    (shared, get("DBPS_KAFKA_SASL_PASSWORD"))
                }
            };
            if let Some(user) = user {
                kafka = kafka.set("sasl.username", user.trim());
            }
            if let Some(password) = password {
                kafka = kafka.set("sasl.password", password);
            }
            config.kafka = Some(kafka);
        }
        let addr_var = var("HTTP_ADDR");
        if let Some(addr) = get(&addr_var) {
            config.http_addr = addr.trim().parse().map_err(|e| ServiceError::InvalidVar {
                var: addr_var,
                reason: format!("{e} (expected host:port, e.g. 127.0.0.1:8081)"),
            })?;
        }
        if let Some(provision) = get("DBPS_PROVISION") {
            config.provision = match provision.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(ServiceError::InvalidVar {
                        var: String::from("DBPS_PROVISION"),
                        reason: format!("{other:?} is neither true nor false"),
                    });
                }
            };
        }
        if let Some(prefix) = get("DBPS_TOPIC_PREFIX") {
            config.topic_prefix = prefix.trim().to_owned();
        }
        if let Some(secs) = get("DBPS_SHUTDOWN_GRACE_SECS") {
            let secs: u64 = secs.trim().parse().map_err(|e| ServiceError::InvalidVar {
                var: String::from("DBPS_SHUTDOWN_GRACE_SECS"),
                reason: format!("{e}"),
            })?;
            config.shutdown_grace = Duration::from_secs(secs);
        }
        Ok(config)
    }

    /// The PostgreSQL server (an administrative role when provisioning).
    pub fn postgres(mut self, server: PgConnectOptions) -> Self {
        self.postgres = Some(server);
        self
    }

    /// The passwords of the owner and runtime roles.
    pub fn passwords(mut self, owner: Password, runtime: Password) -> Self {
        self.owner_password = Some(owner);
        self.runtime_password = Some(runtime);
        self
    }

    /// Whether the service provisions its database and roles at start (default `true`).
    pub fn provision(mut self, provision: bool) -> Self {
        self.provision = provision;
        self
    }

    /// The Kafka configuration.
    pub fn kafka(mut self, kafka: KafkaConfig) -> Self {
        self.kafka = Some(kafka);
        self
    }

    /// The address the HTTP server listens on (port 0 picks a free port).
    pub fn http_addr(mut self, addr: SocketAddr) -> Self {
        self.http_addr = addr;
        self
    }

    /// A prefix for every topic name.
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// How long a stop may take.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// The service's name.
    pub fn name(&self) -> &ServiceName {
        &self.name
    }

    /// The topic naming of this service's environment (the default patterns under the
    /// topic prefix).
    pub fn naming(&self) -> TopicNaming {
        TopicNaming::new().with_prefix(&self.topic_prefix)
    }

    /// The Kafka configuration, or the error that says which variable is missing.
    pub fn kafka_config(&self) -> Result<&KafkaConfig> {
        self.kafka.as_ref().ok_or_else(|| ServiceError::MissingVar {
            var: String::from("DBPS_KAFKA_BROKERS"),
        })
    }

    pub(crate) fn postgres_parts(&self) -> Result<(&PgConnectOptions, &Password, &Password)> {
        let missing = |var: String| ServiceError::MissingVar { var };
        let upper = self.name.as_str().to_ascii_uppercase();
        Ok((
            self.postgres
                .as_ref()
                .ok_or_else(|| missing(String::from("DBPS_POSTGRES_URL")))?,
            self.owner_password
                .as_ref()
                .ok_or_else(|| missing(format!("{upper}_DB_OWNER_PASSWORD")))?,
            self.runtime_password
                .as_ref()
                .ok_or_else(|| missing(format!("{upper}_DB_RUNTIME_PASSWORD")))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<ServiceConfig> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        ServiceConfig::from_lookup("customer", |var| vars.get(var).cloned())
    }

    #[test]
    fn reads_the_service_s_own_variables_and_the_shared_ones() {
        let c = config(&[
            ("DBPS_POSTGRES_URL", "postgres://admin:secret@db:5432/postgres"),
            ("DBPS_KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("CUSTOMER_DB_OWNER_PASSWORD", "owner-pw"),
            ("CUSTOMER_DB_RUNTIME_PASSWORD", "app-pw"),
            ("CUSTOMER_HTTP_ADDR", "0.0.0.0:8081"),
            ("DBPS_TOPIC_PREFIX", "staging."),
            ("DBPS_PROVISION", "false"),
        ])
        .expect("valid");
        assert_eq!(c.http_addr, SocketAddr::from(([0, 0, 0, 0], 8081)));
        assert!(!c.provision);
        assert_eq!(
            c.naming().events("customer", "customer").expect("valid"),
            "staging.customer.customer.events"
        );
        assert!(c.postgres_parts().is_ok());
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret") && !shown.contains("owner-pw"), "{shown}");
    }

    #[test]
    fn the_kafka_principal_is_the_service_s_own() {
        let c = config(&[
            ("DBPS_KAFKA_BROKERS", "k1:9093"),
            ("DBPS_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("DBPS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("DBPS_KAFKA_SSL_CA_LOCATION", "/etc/dbps/ca.crt"),
            ("DBPS_KAFKA_SASL_USERNAME", "admin"),
            ("DBPS_KAFKA_SASL_PASSWORD", "admin-secret"),
            ("CUSTOMER_KAFKA_PASSWORD", "customer-secret"),
        ])
        .expect("valid");
        let kafka = c.kafka.clone().expect("kafka is configured");
        assert_eq!(kafka.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(kafka.get("ssl.ca.location"), Some("/etc/dbps/ca.crt"));
        assert_eq!(kafka.get("sasl.password"), Some("customer-secret"));
        assert_eq!(kafka.principal(), "User:customer", "its own password: its own user");
        let shared = config(&[
            ("DBPS_KAFKA_BROKERS", "k1:9093"),
            ("DBPS_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("DBPS_KAFKA_SASL_USERNAME", "admin"),
            ("DBPS_KAFKA_SASL_PASSWORD", "admin-secret"),
        ])
        .expect("valid");
        let shared_kafka = shared.kafka.clone().expect("kafka");
        assert_eq!(shared_kafka.principal(), "User:admin");
        assert_eq!(shared_kafka.get("sasl.password"), Some("admin-secret"));
        let shown = format!("{c:?} {shared:?}");
        let error = config(&[("DBPS_KAFKA_BROKERS", "k1:9093"), ("CUSTOMER_KAFKA_USER", "customer")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "CUSTOMER_KAFKA_USER is not usable: CUSTOMER_KAFKA_PASSWORD is not set"
        );
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn missing_variables_are_named_when_their_part_starts() {
        let c = config(&[]).expect("nothing set is a valid start");
        let error = c.postgres_parts().unwrap_err();
        assert_eq!(error.to_string(), "DBPS_POSTGRES_URL is not set");
        let c = config(&[("DBPS_POSTGRES_URL", "postgres://h/postgres")]).expect("valid");
        assert_eq!(
            c.postgres_parts().unwrap_err().to_string(),
            "CUSTOMER_DB_OWNER_PASSWORD is not set"
        );
        assert_eq!(
            c.kafka_config().unwrap_err().to_string(),
            "DBPS_KAFKA_BROKERS is not set"
        );
    }

    #[test]
    fn unusable_variables_are_errors_that_name_them() {
        for (var, value) in [
            ("CUSTOMER_HTTP_ADDR", "not an address"),
            ("DBPS_PROVISION", "maybe"),
            ("DBPS_POSTGRES_URL", "postgres://u:secret@h:notaport/db"),
            ("DBPS_SHUTDOWN_GRACE_SECS", "soon"),
        ] {
            let error = config(&[(var, value)]).unwrap_err();
            assert!(!error.to_string().contains("secret"), "{error}");
            assert!(
                matches!(&error, ServiceError::InvalidVar { var: v, .. } if v == var),
                "{var}: {error:?}"
            );
        }
    }
}
