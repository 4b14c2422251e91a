//! A flush that makes librdkafka ignore `linger.ms` for as long as it runs.
//!
//! rdkafka's `Producer::flush` calls `rd_kafka_flush` with a zero timeout in a loop and
//! polls in between, so librdkafka ignores `linger.ms` only for an instant and queued
//! messages still wait for it (measured: about 6 ms from the relay's hand-over to the
//! consumer with `linger.ms=5`, about 1 ms with `linger.ms=0`). `rd_kafka_flush` called
//! with the timeout itself keeps the producer flushing until every queued message was
//! delivered, which is what [`KafkaPublisher::publish_batch`](super::KafkaPublisher::publish_batch)
//! needs at the end of a batch. This module is the crate's only unsafe code
//! (docs/adr/0017-pipelined-relay.md).
#![allow(unsafe_code)]

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::producer::{FutureProducer, Producer};

/// Sends everything queued without waiting for `linger.ms`, and waits (blocking) until
/// it was delivered or `timeout` passed. Messages queued meanwhile are sent at once too.
pub(super) fn flush_queued<C: ClientContext + 'static>(producer: &FutureProducer<C>, timeout: Duration) {
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let handle = producer.client().native_ptr();
    // SAFETY: `handle` is the live librdkafka handle of `producer`, which the borrow keeps
    // alive for the whole call; `rd_kafka_flush` may be called from any thread, also while
    // the producer's polling thread runs. It returns `NO_ERROR` or `_TIMED_OUT`, both
    // declared in the bindings' enum. A timeout leaves the messages queued: their delivery
    // reports give the outcome, so the result is not needed.
    let _ = unsafe { rdkafka::bindings::rd_kafka_flush(handle, timeout_ms) };
}
