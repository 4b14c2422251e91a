use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::KafkaConfig;
use crate::error::{Error, Result};

/// How topic names are formed from service, aggregate and consumer-group names.
///
/// The defaults: `<service>.<aggregate>.events` for an aggregate's events,
/// `<service>.commands` for commands to a service, `<service>.replies` for replies to the
/// service that sent commands, and `<group>.dlq` for a consumer group's dead letters.
/// Each pattern may be replaced; `{service}`, `{aggregate}` and `{group}` are substituted.
/// [`TopicNaming::with_prefix`] puts every name under a prefix (an environment, or a
/// test's namespace).
///
/// ```
/// use dbps_core::kafka::TopicNaming;
///
/// let naming = TopicNaming::new().with_prefix("staging.");
/// assert_eq!(naming.events("customer", "customer")?, "staging.customer.customer.events");
/// assert_eq!(naming.dead_letter("quote")?, "staging.quote.dlq");
/// let fixed = TopicNaming::new().events_pattern("legacy-customers");
/// assert_eq!(fixed.events("customer", "customer")?, "legacy-customers");
/// # Ok::<(), dbps_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicNaming {
    /// Pattern for event topics.
    pub events: String,
    /// Pattern for command topics.
    pub commands: String,
    /// Pattern for reply topics.
    pub replies: String,
    /// Pattern for dead-letter topics.
    pub dead_letter: String,
}

impl Default for TopicNaming {
    fn default() -> Self {
        Self {
            events: String::from("{service}.{aggregate}.events"),
            commands: String::from("{service}.commands"),
            replies: String::from("{service}.replies"),
            dead_letter: String::from("{group}.dlq"),
        }
    }
}

impl TopicNaming {
    /// The default patterns.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every pattern with `prefix` in front.
    pub fn with_prefix(self, prefix: &str) -> Self {
        Self {
            events: format!("{prefix}{}", self.events),
            commands: format!("{prefix}{}", self.commands),
            replies: format!("{prefix}{}", self.replies),
            dead_letter: format!("{prefix}{}", self.dead_letter),
        }
    }

    /// Replaces the pattern of event topics (`{service}` and `{aggregate}` are substituted;
    /// a name without them is used as it is).
    pub fn events_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.events = pattern.into();
        self
    }

    /// Replaces the pattern of command topics (`{service}` is substituted).
    pub fn commands_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.commands = pattern.into();
        self
    }

    /// Replaces the pattern of reply topics (`{service}` is substituted).
    pub fn replies_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.replies = pattern.into();
        self
    }

    /// Replaces the pattern of dead-letter topics (`{group}` is substituted).
    pub fn dead_letter_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.dead_letter = pattern.into();
        self
    }

    /// The topic of `aggregate`'s events, owned by `service`.
    pub fn events(&self, service: &str, aggregate: &str) -> Result<String> {
        checked(
            self.events
                .replace("{service}", service)
                .replace("{aggregate}", aggregate),
        )
    }

    /// The topic of commands to `service`.
    pub fn commands(&self, service: &str) -> Result<String> {
        checked(self.commands.replace("{service}", service))
    }

    /// The topic of replies to `service`.
    pub fn replies(&self, service: &str) -> Result<String> {
        checked(self.replies.replace("{service}", service))
    }

    /// The dead-letter topic of consumer group `group`.
    pub fn dead_letter(&self, group: &str) -> Result<String> {
        checked(self.dead_letter.replace("{group}", group))
    }
}

fn checked(name: String) -> Result<String> {
    validate_topic_name(&name)?;
    Ok(name)
}

/// Checks a topic name against Kafka's rules: 1 to 249 characters of `[a-zA-Z0-9._-]`,
/// not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| Error::InvalidTopic {
        topic: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() || name.len() > 249 {
        return Err(invalid("a topic name has 1 to 249 characters"));
    }
    if name == "." || name == ".." {
        return Err(invalid("'.' and '..' are reserved"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(&format!(
            "{c:?} is not allowed: only ASCII letters, digits, '.', '_' and '-' are"
        )));
    }
    Ok(())
}

/// A topic to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicSpec {
    /// The topic's name.
    pub name: String,
    /// Number of partitions (the unit of parallelism and of ordering).
    pub partitions: i32,
    /// Replication factor.
    pub replication: i32,
    /// How long records are kept (`retention.ms`); `None` keeps the broker's default.
    pub retention: Option<Duration>,
    /// Further topic configuration (`cleanup.policy`, `min.insync.replicas`, ...).
    pub config: BTreeMap<String, String>,
}

impl TopicSpec {
    /// A topic with `partitions` partitions, replication factor 1 and the broker's
    /// default retention.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            replication: 1,
            retention: None,
            config: BTreeMap::new(),
        }
    }

    /// Sets the replication factor.
    pub fn replication(mut self, replication: i32) -> Self {
        self.replication = replication;
        self
    }

    /// Sets the retention time.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Sets a topic configuration entry.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }
}

/// The topics of `names` that do not exist on the cluster.
///
/// Asks the brokers for each topic's metadata without creating it (even where the broker
/// would create topics on first use). A topic this client may not describe is an error
/// ([`Error::Refused`] naming the principal), not a missing topic; so is a refused login.
pub async fn missing_topics(config: &KafkaConfig, names: &[String]) -> Result<Vec<String>> {
    // A producer that sends nothing: polling it serves the client's events (log lines,
    // errors), so that a refused login reaches `AuthContext`.
    let producer: rdkafka::producer::BaseProducer<super::AuthContext> = config
        .client_config(&[("allow.auto.create.topics", "false")])
        .create_with_context(super::AuthContext::default())
        .map_err(|source| super::creation_error("create metadata client", source))?;
    let names = names.to_vec();
    let config = config.clone();
    let lookup = tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for name in names {
            let client = rdkafka::producer::Producer::client(&producer);
            let metadata = client.fetch_metadata(Some(&name), METADATA_TIMEOUT).map_err(|source| {
                producer.poll(Duration::ZERO);
                super::kafka_error(
                    &config,
                    Some(&*client.context().auth),
                    format!("describe topic {name}"),
                    source,
                )
            })?;
            let error = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name)
                .map_or(Some(RDKafkaErrorCode::UnknownTopicOrPartition), |t| {
                    t.error().map(RDKafkaErrorCode::from)
                });
            match error {
                None => {}
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => missing.push(name),
                Some(code) => {
                    return Err(super::kafka_error(
                        &config,
                        Some(&*client.context().auth),
                        format!("describe topic {name}"),
                        KafkaError::MetadataFetch(code),
                    ));
                }
            }
        }
        Ok(missing)
    });
    match lookup.await {
        Ok(result) => result,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// How long a metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`ensure_topics`] did for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicOutcome {
    /// The topic was created.
    Created,
    /// The topic existed already; it was left as it is.
    Existed,
}

/// Creates the topics that do not exist yet. Idempotent: a topic that exists is left
/// alone and reported as [`TopicOutcome::Existed`].
///
/// It looks first which topics exist and asks to create only the others, so that a
/// service allowed to describe a topic but not to create it (another service's topic,
/// under ACLs) can call it for topics that exist.
pub async fn ensure_topics(config: &KafkaConfig, specs: &[TopicSpec]) -> Result<Vec<TopicOutcome>> {
    for spec in specs {
        validate_topic_name(&spec.name)?;
        if spec.partitions < 1 || spec.replication < 1 {
            return Err(Error::config(
                format!("topic {} partitions and replication", spec.name),
                "a topic needs at least one partition and one replica",
            ));
        }
    }
    let names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
    let missing = missing_topics(config, &names).await?;
    let to_create: Vec<TopicSpec> = specs
        .iter()
        .filter(|spec| missing.contains(&spec.name))
        .cloned()
        .collect();
    let created = if to_create.is_empty() {
        Vec::new()
    } else {
        create_topics(config, &to_create).await?
    };
    Ok(specs
        .iter()
        .map(|spec| {
            to_create
                .iter()
                .zip(&created)
                .find(|(candidate, _)| candidate.name == spec.name)
                .map_or(TopicOutcome::Existed, |(_, outcome)| *outcome)
        })
        .collect())
}

/// Asks the cluster to create `specs` (validated); one outcome per spec, in order.
async fn create_topics(config: &KafkaConfig, specs: &[TopicSpec]) -> Result<Vec<TopicOutcome>> {
    let admin: AdminClient<super::AuthContext> = config
        .client_config(&[])
        .create_with_context(super::AuthContext::default())
        .map_err(|source| super::creation_error("create admin client", source))?;
    let retention: Vec<Option<String>> = specs
        .iter()
        .map(|s| s.retention.map(|r| r.as_millis().to_string()))
        .collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&retention)
        .map(|(spec, retention)| {
            let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(spec.replication));
            if let Some(retention) = retention {
                topic = topic.set("retention.ms", retention);
            }
            for (key, value) in &spec.config {
                topic = topic.set(key, value);
            }
            topic
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| super::kafka_error(config, Some(&*admin.inner().context().auth), "create topics", source))?;
    results
        .into_iter()
        .map(|result| match result {
            Ok(_) => Ok(TopicOutcome::Created),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => Ok(TopicOutcome::Existed),
            Err((name, code)) => Err(super::kafka_error(
                config,
                Some(&*admin.inner().context().auth),
                format!("create topic {name}"),
                KafkaError::AdminOp(code),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_naming() {
        let naming = TopicNaming::default();
        assert_eq!(
            naming.events("customer", "customer").ok().as_deref(),
            Some("customer.customer.events")
        );
        assert_eq!(naming.commands("inventory").ok().as_deref(), Some("inventory.commands"));
        assert_eq!(naming.replies("quote").ok().as_deref(), Some("quote.replies"));
        assert_eq!(
            naming.dead_letter("email-service").ok().as_deref(),
            Some("email-service.dlq")
        );
    }

    #[test]
    fn custom_patterns_are_substituted() {
        let naming = TopicNaming::new().events_pattern("prod.{service}.{aggregate}.v1");
        assert_eq!(
            naming.events("quote", "quote").ok().as_deref(),
            Some("prod.quote.quote.v1")
        );
    }

    #[test]
    fn invalid_topic_names_are_typed_errors() {
        for bad in ["", ".", "..", "has space", "slash/name", "ü", &"x".repeat(250)] {
            assert!(
                matches!(validate_topic_name(bad), Err(Error::InvalidTopic { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(TopicNaming::default().events("bad service", "x").is_err());
    }
}
