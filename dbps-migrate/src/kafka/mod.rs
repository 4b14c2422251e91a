//! A service's principal on the shared Kafka cluster: its SCRAM user and its ACLs.
//!
//! In a database-per-service system the event bus is the shared surface: without ACLs
//! any service can write another's topic (and forge its events) or read every topic.
//! [`KafkaAccess`] provisions, idempotently and from an administrative connection, a
//! service's SCRAM-SHA-512 user and exactly these `ALLOW` ACLs for `User:<user>`:
//!
//! | resource | pattern | operations | why |
//! |---|---|---|---|
//! | topics starting with the topic prefix (`<service>.`) | prefixed | `WRITE`, `DESCRIBE`, `CREATE` | its own events, replies and dead-letter topics; creating them (`Relay::builder(..).create_topics`) |
//! | each topic it [produces to](KafkaAccess::produces) outside its prefix | literal | `WRITE`, `DESCRIBE` | commands addressed to another service, replies to another service's saga |
//! | each topic it [consumes](KafkaAccess::consumes) | literal | `READ`, `DESCRIBE` | the events it subscribes to |
//! | consumer groups starting with the group prefix (`<service>.`) | prefixed | `READ`, `DESCRIBE` | its own consumer groups only |
//!
//! Provisioning makes the principal's `ALLOW` ACLs exactly these: a binding granted earlier
//! and no longer declared (a topic the service stopped consuming, an `ALL` granted by
//! hand) is deleted. `DENY` bindings only take rights away, and are left as they are.
//! [`KafkaAccess::revoke`] deletes every ACL of the principal and its SCRAM credential.
//!
//! The idempotent producer needs no `IDEMPOTENT_WRITE` on the cluster: since Kafka 3.0
//! `WRITE` on a topic implies it.
//!
//! ```no_run
//! # async fn example() -> Result<(), dbps_migrate::MigrateError> {
//! use dbps_core::kafka::KafkaConfig;
//! use dbps_migrate::kafka::KafkaAccess;
//! use dbps_migrate::{Password, ServiceName};
//!
//! let admin = KafkaConfig::new("kafka:9093")
//!     .set("security.protocol", "SASL_SSL")
//!     .set("sasl.mechanism", "SCRAM-SHA-512")
//!     .set("sasl.username", "admin")
//!     .set("sasl.password", std::env::var("KAFKA_ADMIN_PASSWORD").unwrap_or_default())
//!     .set("ssl.ca.location", "/etc/dbps/ca.crt");
//! let password = Password::new(std::env::var("QUOTE_KAFKA_PASSWORD").unwrap_or_default())?;
//!
//! let access = KafkaAccess::new(ServiceName::new("quote")?)
//!     .consumes("customer.customer.events")
//!     .produces("inventory.commands");
//! access.provision(&admin, &password).await?;
//!
//! // The service's own configuration: the admin's brokers and TLS, its own user.
//! let _quote = access.client_config(&admin, &password);
//! # Ok(()) }
//! ```

mod ffi;

use std::fmt;
use std::time::Duration;

use dbps_core::kafka::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::{MigrateError, Password, Result, ServiceName};

/// The kind of resource an ACL is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ResourceType {
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
    /// The cluster.
    Cluster,
    /// A transactional id.
    TransactionalId,
}

/// How an ACL's resource name matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PatternType {
    /// The name exactly.
    Literal,
    /// Every name starting with it.
    Prefixed,
}

/// An operation an ACL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum AclOperation {
    /// Consume from a topic, join a group.
    Read,
    /// Produce to a topic.
    Write,
    /// Create a topic.
    Create,
    /// Delete a topic or group.
    Delete,
    /// Alter a resource.
    Alter,
    /// Read metadata and offsets.
    Describe,
    /// Read a resource's configuration.
    DescribeConfigs,
    /// Change a resource's configuration.
    AlterConfigs,
    /// Produce idempotently (cluster).
    IdempotentWrite,
    /// Everything: never granted by provisioning, but found and removed if granted by hand.
    All,
    /// Broker-to-broker actions (cluster).
    ClusterAction,
}

/// One `ALLOW` ACL: `principal` may do `operation` on the resources the pattern matches,
/// from `host` (`*` for any).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub struct AclBinding {
    /// The resource kind.
    pub resource: ResourceType,
    /// How `name` matches.
    pub pattern: PatternType,
    /// The resource name or prefix.
    pub name: String,
    /// The operation allowed.
    pub operation: AclOperation,
    /// The principal (`User:quote`).
    pub principal: String,
    /// The host (`*`).
    pub host: String,
}

impl AclBinding {
    /// An `ALLOW` binding from any host.
    pub fn allow(
        principal: impl Into<String>,
        resource: ResourceType,
        pattern: PatternType,
        name: impl Into<String>,
        operation: AclOperation,
    ) -> Self {
        Self {
            resource,
            pattern,
            name: name.into(),
            operation,
            principal: principal.into(),
            host: String::from("*"),
        }
    }
}

impl fmt::Display for AclBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} on {:?} {:?} {} from {}",
            self.principal, self.operation, self.resource, self.pattern, self.name, self.host
        )
    }
}

/// What [`KafkaAccess::provision`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KafkaProvisioned {
    /// Bindings that did not exist and were created.
    pub created: Vec<AclBinding>,
    /// Bindings of the principal that are no longer declared and were deleted.
    pub deleted: Vec<AclBinding>,
}

/// A service's user and ACLs on the shared Kafka cluster (see the [module](self)).
#[derive(Clone)]
pub struct KafkaAccess {
    service: ServiceName,
    user: String,
    topic_prefix: String,
    group_prefix: String,
    produces: Vec<String>,
    consumes: Vec<String>,
    iterations: i32,
    timeout: Duration,
}

impl fmt::Debug for KafkaAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAccess")
            .field("service", &self.service)
            .field("user", &self.user)
            .field("topic_prefix", &self.topic_prefix)
            .field("group_prefix", &self.group_prefix)
            .field("produces", &self.produces)
            .field("consumes", &self.consumes)
            .finish_non_exhaustive()
    }
}

impl KafkaAccess {
    /// The access of `service`: user `<service>`, topics and groups under `<service>.`,
    /// consuming nothing until told.
    pub fn new(service: ServiceName) -> Self {
        let prefix = format!("{service}.");
        Self {
            user: service.as_str().to_owned(),
            topic_prefix: prefix.clone(),
            group_prefix: prefix,
            service,
            produces: Vec::new(),
            consumes: Vec::new(),
            iterations: 8192,
            timeout: Duration::from_secs(30),
        }
    }

    /// The SCRAM user name (default: the service name).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// The prefix of the topics the service owns (default `<service>.`; with an
    /// environment prefix, `staging.<service>.`).
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// The prefix of the service's consumer groups (default `<service>.`, as
    /// `dbps_service::Service::group` names them).
    pub fn group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// A topic outside its prefix that the service writes (a command to another service).
    pub fn produces(mut self, topic: impl Into<String>) -> Self {
        self.produces.push(topic.into());
        self
    }

    /// A topic the service consumes.
    pub fn consumes(mut self, topic: impl Into<String>) -> Self {
        self.consumes.push(topic.into());
        self
    }

    /// How long each admin request may take (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The service.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The principal the brokers see: `User:<user>`.
    pub fn principal(&self) -> String {
        format!("User:{}", self.user)
    }

    /// The ACLs provisioning grants (see the [module](self)), sorted.
    pub fn bindings(&self) -> Vec<AclBinding> {
        use AclOperation::{Create, Describe, Read, Write};
        use PatternType::{Literal, Prefixed};
        use ResourceType::{Group, Topic};
        let principal = self.principal();
        let mut bindings = Vec::new();
        for operation in [Write, Describe, Create] {
            bindings.push(AclBinding::allow(
                &principal,
                Topic,
                Prefixed,
                &self.topic_prefix,
                operation,
            ));
        }
        for topic in self.produces.iter().filter(|t| !t.starts_with(&self.topic_prefix)) {
            for operation in [Write, Describe] {
                bindings.push(AclBinding::allow(&principal, Topic, Literal, topic, operation));
            }
        }
        for topic in &self.consumes {
            for operation in [Read, Describe] {
                bindings.push(AclBinding::allow(&principal, Topic, Literal, topic, operation));
            }
        }
        for operation in [Read, Describe] {
            bindings.push(AclBinding::allow(
                &principal,
                Group,
                Prefixed,
                &self.group_prefix,
                operation,
            ));
        }
        bindings.sort();
        bindings.dedup();
        bindings
    }

    /// The service's own client configuration: `admin`'s brokers and TLS settings, with
    /// this service's SASL user and `password` instead of the administrator's.
    pub fn client_config(&self, admin: &KafkaConfig, password: &Password) -> KafkaConfig {
        let mut config = KafkaConfig::new(admin.bootstrap_servers());
        for (key, value) in admin.properties() {
            if !matches!(key, "bootstrap.servers" | "sasl.username" | "sasl.password") {
                config = config.set(key, value);
            }
        }
        config
            .set("sasl.username", &self.user)
            .set("sasl.password", password.expose_secret())
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, value: &str, reason: &'static str| MigrateError::InvalidIdentifier {
            what,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if self.user.is_empty() || self.user.contains([',', '=', '\0']) {
            return Err(bad(
                "kafka user",
                &self.user,
                "must be non-empty, without ',', '=' or nul",
            ));
        }
        for (what, prefix) in [
            ("topic prefix", &self.topic_prefix),
            ("group prefix", &self.group_prefix),
        ] {
            if prefix.is_empty() {
                return Err(bad(
                    what,
                    prefix,
                    "must not be empty: it would grant every topic or group",
                ));
            }
        }
        for topic in self.produces.iter().chain(&self.consumes) {
            dbps_core::kafka::validate_topic_name(topic)
                .map_err(|_| bad("topic", topic, "is not a valid topic name"))?;
        }
        Ok(())
    }

    /// Creates or updates the service's SCRAM-SHA-512 credential and makes its ACLs
    /// exactly [`KafkaAccess::bindings`], through `admin` (a super-user, or a principal
    /// allowed to alter ACLs and credentials). Idempotent.
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidIdentifier`] for an empty prefix, a bad user or topic name
    /// (before any connection); [`MigrateError::Kafka`] if the cluster refuses or does not
    /// answer (`is_transient` tells which).
    pub async fn provision(&self, admin: &KafkaConfig, password: &Password) -> Result<KafkaProvisioned> {
        self.validate()?;
        let wanted = self.bindings();
        let principal = self.principal();
        let user = self.user.clone();
        let password = password.clone();
        let iterations = self.iterations;
        let provisioned = self
            .blocking(admin, "provision", move |admin| {
                admin.alter_scram(&user, Some(password.expose_secret()), iterations)?;
                let existing = admin.describe_acls(&principal)?;
                let stale: Vec<AclBinding> = existing.iter().filter(|b| !wanted.contains(b)).cloned().collect();
                admin.delete_acls(&principal, Some(&stale))?;
                let created: Vec<AclBinding> = wanted.iter().filter(|b| !existing.contains(b)).cloned().collect();
                admin.create_acls(&wanted)?;
                Ok(KafkaProvisioned {
                    created,
                    deleted: stale,
                })
            })
            .await?;
        tracing::info!(
            service = %self.service,
            principal = %self.principal(),
            created = provisioned.created.len(),
            deleted = provisioned.deleted.len(),
            "kafka user and ACLs provisioned"
        );
        Ok(provisioned)
    }

    /// The ACLs the cluster holds for the service's principal.
    ///
    /// # Errors
    ///
    /// As [`KafkaAccess::provision`].
    pub async fn granted(&self, admin: &KafkaConfig) -> Result<Vec<AclBinding>> {
        let principal = self.principal();
        let mut granted = self
            .blocking(admin, "describe ACLs of", move |admin| admin.describe_acls(&principal))
            .await?;
        granted.sort();
        Ok(granted)
    }

    /// Deletes every ACL of the service's principal and its SCRAM credential; returns how
    /// many ACLs were deleted. Idempotent: revoking a service that has none is `Ok(0)`.
    ///
    /// # Errors
    ///
    /// As [`KafkaAccess::provision`].
    pub async fn revoke(&self, admin: &KafkaConfig) -> Result<usize> {
        let principal = self.principal();
        let user = self.user.clone();
        let iterations = self.iterations;
        let deleted = self
            .blocking(admin, "revoke", move |admin| {
                let deleted = admin.delete_acls(&principal, None)?;
                admin.alter_scram(&user, None, iterations)?;
                Ok(deleted)
            })
            .await?;
        tracing::info!(service = %self.service, principal = %self.principal(), deleted, "kafka user and ACLs revoked");
        Ok(deleted)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        admin: &KafkaConfig,
        action: &'static str,
        call: impl FnOnce(&ffi::Admin) -> std::result::Result<T, ffi::CallError> + Send + 'static,
    ) -> Result<T> {
        let target = format!("{action} {}", self.principal());
        let mut config = ClientConfig::new();
        for (key, value) in admin.properties() {
            config.set(key, value);
        }
        let client: AdminClient<DefaultClientContext> = config.create().map_err(|source| MigrateError::Kafka {
            action: target.clone(),
            code: source.rdkafka_error_code(),
            // rdkafka's message for a refused property shows its value, maybe a password.
            message: match &source {
                rdkafka::error::KafkaError::ClientConfig(_, description, key, _) => {
                    format!(
                        "invalid admin configuration {key}: {}",
                        description.replace(key.as_str(), "…")
                    )
                }
                other => other.to_string(),
            },
        })?;
        let admin = ffi::Admin::new(client, self.timeout);
        let joined = tokio::task::spawn_blocking(move || call(&admin)).await;
        let result = match joined {
            Ok(result) => result,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        };
        result.map_err(|error| MigrateError::Kafka {
            action: target,
            code: error.code,
            message: error.message,
        })
    }
}

/// Whether a Kafka admin error may succeed later (the cluster unreachable or busy).
pub(crate) fn is_transient(code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        Some(
            C::OperationTimedOut
                | C::RequestTimedOut
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::NetworkException
                | C::NotController
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::LeaderNotAvailable
                | C::ThrottlingQuotaExceeded
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_gets_its_prefixes_and_what_it_declares() {
        let access = KafkaAccess::new(ServiceName::new("quote").unwrap())
            .consumes("customer.customer.events")
            .produces("inventory.commands")
            .produces("quote.replies");
        let shown: Vec<String> = access.bindings().iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "User:quote Read on Topic Literal customer.customer.events from *",
                "User:quote Describe on Topic Literal customer.customer.events from *",
                "User:quote Write on Topic Literal inventory.commands from *",
                "User:quote Describe on Topic Literal inventory.commands from *",
                "User:quote Write on Topic Prefixed quote. from *",
                "User:quote Create on Topic Prefixed quote. from *",
                "User:quote Describe on Topic Prefixed quote. from *",
                "User:quote Read on Group Prefixed quote. from *",
                "User:quote Describe on Group Prefixed quote. from *",
            ]
        );
    }

    #[test]
    fn an_empty_prefix_is_refused_before_any_connection() {
        let access = KafkaAccess::new(ServiceName::new("quote").unwrap()).topic_prefix("");
        let error = access.validate().unwrap_err();
        assert!(error.to_string().contains("topic prefix"), "{error}");
    }

    #[test]
    fn the_client_config_carries_the_services_user_and_hides_its_password() {
        let admin = KafkaConfig::new("b:9093")
            .set("security.protocol", "SASL_SSL")
            .set("sasl.username", "admin")
            .set("sasl.password", "admin-secret");
        let access = KafkaAccess::new(ServiceName::new("quote").unwrap());
        let config = access.client_config(&admin, &Password::new("quote-secret").unwrap());
        assert_eq!(config.get("sasl.username"), Some("quote"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.principal(), "User:quote");
        let shown = format!("{config:?} {access:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
