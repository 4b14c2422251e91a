//! Apache Kafka: configuration, topics, the publisher and the consumer runner.

mod config;
mod consumer;
mod publisher;
mod topics;

pub use crate::handler::{Handler, HandlerError};
pub use config::KafkaConfig;
pub use consumer::{
    ConsumerRunner, ConsumerRunnerBuilder, ERROR_LOG_INTERVAL, RetryPolicy, RunSummary, dead_letter_header,
};
pub use publisher::{Delivery, KafkaPublisher, KafkaPublisherBuilder};
pub use topics::{TopicNaming, TopicOutcome, TopicSpec, ensure_topics, validate_topic_name};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Whether a Kafka error may go away if the same request is sent again later.
///
/// Permanent: the message is too large, the topic does not exist or is invalid, the
/// client is not authorised, the record is invalid, the configuration is wrong.
/// Everything else (timeouts, unreachable brokers, full queues, leader elections) is
/// transient.
pub fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Subscription(_) => false,
        other => !matches!(
            other.rdkafka_error_code(),
            Some(
                C::MessageSizeTooLarge
                    | C::InvalidMessageSize
                    | C::MessageBatchTooLarge
                    | C::UnknownTopic
                    | C::UnknownTopicOrPartition
                    | C::InvalidTopic
                    | C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::TransactionalIdAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::InvalidMessage
                    | C::InvalidRecord
                    | C::InvalidRequiredAcks
                    | C::InvalidArgument
                    | C::PolicyViolation
                    | C::UnsupportedVersion
                    | C::UnsupportedCompressionType
            )
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_topic_errors_are_permanent() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert!(!is_transient(&KafkaError::MessageProduction(code)), "{code:?}");
        }
    }

    #[test]
    fn timeouts_and_broker_trouble_are_transient() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::NotEnoughReplicas,
        ] {
            assert!(is_transient(&KafkaError::MessageProduction(code)), "{code:?}");
        }
    }
}
