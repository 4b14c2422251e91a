//! Each service's own principal on the shared servers, provisioned before the services
//! start: a Kafka SCRAM user with ACLs for exactly the topics and groups it uses (on the
//! stack's SASL_SSL listener), a Redis ACL user for the inventory service's stock cache
//! (over TLS), and PostgreSQL over TLS with `sslmode=verify-full`.
//!
//! It needs the stack's secured endpoints (`scripts/stack.sh env`: `DBPS_KAFKA_SECURE_BROKERS`,
//! `DBPS_KAFKA_ADMIN_USER`, `DBPS_KAFKA_ADMIN_PASSWORD`, `DBPS_TLS_CA_FILE`, ...). Where they
//! are not set, the services run as before, on the plaintext listener.

use std::collections::HashMap;

use anyhow::Context as _;
use dbps_core::kafka::{KafkaConfig, TopicNaming, TopicSpec};
use dbps_migrate::kafka::KafkaAccess;
use dbps_migrate::redis::RedisAccess;
use dbps_migrate::{Password, ServiceName};
use example_contracts::inventory::{PRODUCT_AGGREGATE, RESERVATION_AGGREGATE};
use example_contracts::services;

use crate::out;
use crate::services::Svc;

/// The administrators' credentials: the narrator's, never a service's.
pub(crate) const ADMIN_VARS: [&str; 6] = [
    "DBPS_KAFKA_ADMIN_USER",
    "DBPS_KAFKA_ADMIN_PASSWORD",
    "DBPS_KAFKA_SASL_USERNAME",
    "DBPS_KAFKA_SASL_PASSWORD",
    "DBPS_REDIS_ADMIN_USER",
    "DBPS_REDIS_ADMIN_PASSWORD",
];

/// The variables each service starts with, on top of the narrator's environment.
#[derive(Debug, Default)]
pub(crate) struct Principals {
    env: HashMap<Svc, Vec<(String, String)>>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.trim().is_empty())
}

/// The canonical name of a service, as its topics and groups are named.
fn service_name(svc: Svc) -> &'static str {
    match svc {
        Svc::Customer => services::CUSTOMER,
        Svc::Inventory => services::INVENTORY,
        Svc::PurchaseOrder => services::PURCHASE_ORDER,
        Svc::Quote => services::QUOTE,
        Svc::Email => services::EMAIL,
        Svc::Pipeline => "pipeline",
    }
}

/// The topics each service reads and the topics outside its own prefix it writes.
fn declared(svc: Svc, naming: &TopicNaming) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let customer_events = naming.events(services::CUSTOMER, "customer")?;
    let quote_events = naming.events(services::QUOTE, example_contracts::quote::AGGREGATE)?;
    let reservations = naming.events(services::INVENTORY, RESERVATION_AGGREGATE)?;
    let products = naming.events(services::INVENTORY, PRODUCT_AGGREGATE)?;
    let replies = naming.replies(services::QUOTE)?;
    Ok(match svc {
        // Its search projection reads its own events.
        Svc::Customer => (vec![naming.commands(services::CUSTOMER)?, customer_events], vec![]),
        Svc::Inventory => (
            vec![quote_events, naming.commands(services::INVENTORY)?, products],
            vec![replies],
        ),
        Svc::PurchaseOrder => (vec![naming.commands(services::PURCHASE_ORDER)?], vec![replies]),
        Svc::Quote => (
            vec![replies, reservations, customer_events, products],
            vec![
                naming.commands(services::INVENTORY)?,
                naming.commands(services::PURCHASE_ORDER)?,
            ],
        ),
        Svc::Email => (vec![customer_events, quote_events], vec![]),
        Svc::Pipeline => (vec![customer_events, quote_events, products, reservations], vec![]),
    })
}

impl Principals {
    /// Provisions every service's principals, or returns none when the secured endpoints
    /// are not configured.
    pub(crate) async fn provision() -> anyhow::Result<Self> {
        let (Some(brokers), Some(user), Some(password), Some(ca)) = (
            var("DBPS_KAFKA_SECURE_BROKERS"),
            var("DBPS_KAFKA_ADMIN_USER"),
            var("DBPS_KAFKA_ADMIN_PASSWORD"),
            var("DBPS_TLS_CA_FILE"),
        ) else {
            out::say(
                "no secured endpoints configured (DBPS_KAFKA_SECURE_BROKERS and its administrator): the services connect as DBPS_KAFKA_BROKERS and DBPS_REDIS_URL say",
            );
            return Ok(Self::default());
        };
        let admin = KafkaConfig::new(&brokers)
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", &user)
            .set("sasl.password", &password)
            .set("ssl.ca.location", &ca);
        let prefix = std::env::var("DBPS_TOPIC_PREFIX").unwrap_or_default();
        let naming = TopicNaming::new().with_prefix(prefix.trim());

        // The system's topics, created by the platform before any service runs: a
        // service may create topics under its own prefix only, and reads topics of
        // services that may start after it.
        let topics: Vec<TopicSpec> = crate::events::topics()?
            .into_iter()
            .chain(std::iter::once(naming.commands(services::CUSTOMER)?))
            .map(|topic| TopicSpec::new(topic, dbps_service::CONSUMED_TOPIC_PARTITIONS))
            .collect();
        dbps_core::kafka::ensure_topics(&admin, &topics)
            .await
            .context("creating the system's topics as the Kafka administrator")?;

        let mut principals = Self::default();
        let mut quote = None;
        for svc in Svc::ALL {
            let name = service_name(svc);
            let service = ServiceName::new(name)?;
            let (consumes, produces) = declared(svc, &naming)?;
            let mut access = KafkaAccess::new(service.clone()).topic_prefix(format!("{}{name}.", prefix.trim()));
            for topic in &consumes {
                access = access.consumes(topic);
            }
            for topic in &produces {
                access = access.produces(topic);
            }
            let secret = Password::new(format!("{name}-{}", uuid::Uuid::new_v4().simple()))?;
            access
                .provision(&admin, &secret)
                .await
                .with_context(|| format!("provisioning the {}'s Kafka principal", svc.title()))?;
            let upper = name.to_ascii_uppercase();
            let mut env = vec![
                (String::from("DBPS_KAFKA_BROKERS"), brokers.clone()),
                (String::from("DBPS_KAFKA_SECURITY_PROTOCOL"), String::from("SASL_SSL")),
                (String::from("DBPS_KAFKA_SASL_MECHANISM"), String::from("SCRAM-SHA-512")),
                (String::from("DBPS_KAFKA_SSL_CA_LOCATION"), ca.clone()),
                (format!("{upper}_KAFKA_PASSWORD"), secret.expose_secret().to_owned()),
            ];
            if let Some(url) = var("DBPS_POSTGRES_TLS_URL") {
                env.push((String::from("DBPS_POSTGRES_URL"), url));
            }
            out::action(
                "grant",
                &format!("{} as {}", svc.title(), access.principal()),
                &format!(
                    "reads {}; writes {}{name}.*{}",
                    consumes.join(", "),
                    prefix.trim(),
                    if produces.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", produces.join(", "))
                    }
                ),
            );
            if svc == Svc::Inventory {
                env.extend(Self::redis_user(&service, &ca).await?);
            }
            if svc == Svc::Quote {
                quote = Some(access.client_config(&admin, &secret));
            }
            principals.env.insert(svc, env);
        }
        if let Some(quote) = quote {
            Self::forgery_is_refused(quote, &naming).await?;
        }
        Ok(principals)
    }

    /// Shows the boundary holding: the quote service's principal tries to publish a
    /// customer event, and Kafka refuses it.
    async fn forgery_is_refused(quote: KafkaConfig, naming: &TopicNaming) -> anyhow::Result<()> {
        let topic = naming.events(services::CUSTOMER, "customer")?;
        let publisher = dbps_core::kafka::KafkaPublisher::builder(quote.set("message.timeout.ms", "10000")).build()?;
        let payload = serde_json::value::RawValue::from_string(String::from("{\"name\":\"forged\"}"))?;
        let mut forged = dbps_core::Envelope::raw(dbps_core::MessageKind::Event, "customer.CustomerUpdated", payload);
        forged.source = String::from(services::CUSTOMER);
        forged.aggregate_id = String::from("forged");
        match publisher.publish(&topic, &forged).await {
            Err(error @ dbps_core::Error::Refused { .. }) => {
                out::action(
                    "refuse",
                    "a forged customer event from the quote service",
                    &error.to_string(),
                );
                Ok(())
            }
            Err(error) => Err(anyhow::Error::new(error).context("the forged event was refused, but not for its ACL")),
            Ok(_) => anyhow::bail!("the quote service's principal could write {topic}: the ACLs do not hold"),
        }
    }

    /// The inventory service's Redis user, for its stock cache (`inventory:` keys), over
    /// TLS when the stack offers it.
    async fn redis_user(service: &ServiceName, ca: &str) -> anyhow::Result<Vec<(String, String)>> {
        let (Some(plain), Some(user), Some(password)) = (
            var("DBPS_REDIS_URL"),
            var("DBPS_REDIS_ADMIN_USER"),
            var("DBPS_REDIS_ADMIN_PASSWORD"),
        ) else {
            return Ok(Vec::new());
        };
        let info = redis::IntoConnectionInfo::into_connection_info(plain.as_str())?;
        let settings = info
            .redis_settings()
            .clone()
            .set_username(&user)
            .set_password(&password);
        let admin = redis::Client::open(info.set_redis_settings(settings))?;
        let access = RedisAccess::new(service.clone());
        let secret = Password::new(format!("{service}-{}", uuid::Uuid::new_v4().simple()))?;
        access
            .provision(&admin, &secret)
            .await
            .context("provisioning the inventory service's Redis user")?;
        let (url, tls) = match var("DBPS_REDIS_TLS_URL") {
            Some(tls) => (tls, true),
            None => (plain, false),
        };
        let (scheme, address) = url.split_once("://").context("DBPS_REDIS_URL has no scheme")?;
        let url = format!("{scheme}://{}:{}@{address}", access.user_name(), secret.expose_secret());
        out::action(
            "grant",
            &format!("inventory service as Redis user {}", access.user_name()),
            &format!(
                "keys {service}:* only, the commands dbps uses{}",
                if tls { ", over TLS" } else { "" }
            ),
        );
        let mut env = vec![(String::from("DBPS_REDIS_URL"), url)];
        if tls {
            // The Redis client trusts the system's roots and this file: the stack's CA.
            env.push((String::from("SSL_CERT_FILE"), ca.to_owned()));
        }
        Ok(env)
    }

    /// The variables `svc` starts with.
    pub(crate) fn env(&self, svc: Svc) -> &[(String, String)] {
        self.env.get(&svc).map_or(&[], Vec::as_slice)
    }
}
