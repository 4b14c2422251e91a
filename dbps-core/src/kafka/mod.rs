//! Apache Kafka: configuration, topics, the publisher and the consumer runner.

mod config;
mod consumer;
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
