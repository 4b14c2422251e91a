use std::sync::Mutex;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;

use crate::error::{Error, Result};
use crate::server::{self, Backend};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Kafka bootstrap servers and a topic-name prefix unique to one test; the topics created
/// through this handle are deleted when it is dropped.
pub struct TestKafka {
    brokers: &'static str,
    prefix: String,
    admin: AdminClient<DefaultClientContext>,
    created: Mutex<Vec<String>>,
}

impl std::fmt::Debug for TestKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKafka")
            .field("brokers", &self.brokers)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Connects an admin client to the shared Kafka broker with a fresh topic prefix.
pub async fn kafka() -> Result<TestKafka> {
    let brokers = server::address(Backend::Kafka).await?;
    let admin = admin_client(brokers).map_err(|source| Error::Kafka {
        topic: String::from("(admin)"),
        source,
    })?;
    Ok(TestKafka {
        brokers,
        prefix: format!("dbps-t-{}-", crate::unique_suffix()),
        admin,
        created: Mutex::new(Vec::new()),
    })
}

fn admin_client(brokers: &str) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    ClientConfig::new().set("bootstrap.servers", brokers).create()
}

impl TestKafka {
    /// The bootstrap servers, for `bootstrap.servers`.
    pub fn brokers(&self) -> &str {
        self.brokers
    }

    /// `name` inside this test's namespace, without creating the topic.
    pub fn topic_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A consumer group id unique to this test.
    pub fn group_id(&self, name: &str) -> String {
        format!("{}group-{name}", self.prefix)
    }

    /// Creates the topic `name` (inside this test's namespace) with `partitions`
    /// partitions and returns its full name. The topic is deleted when the handle drops.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<String> {
        let topic = self.topic_name(name);
        let kafka_error = |source| Error::Kafka {
            topic: topic.clone(),
            source,
        };
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics(
                &[NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))],
                &options,
            )
            .await
            .map_err(kafka_error)?;
        for result in results {
            result.map_err(|(_, code)| kafka_error(KafkaError::AdminOp(code)))?;
        }
        self.created.lock().expect("topic list poisoned").push(topic.clone());
        Ok(topic)
    }
}

impl Drop for TestKafka {
    fn drop(&mut self) {
        let topics = std::mem::take(self.created.get_mut().expect("topic list poisoned"));
        if topics.is_empty() {
            return;
        }
        let brokers = self.brokers;
        crate::run_cleanup("kafka test topics", async move {
            let admin = admin_client(brokers).map_err(|e| e.to_string())?;
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
            admin.delete_topics(&names, &options).await.map_err(|e| e.to_string())?;
            Ok(())
        });
    }
}
