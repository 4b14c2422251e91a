//! Batch handlers in the consumer runner against the real broker: what arrived together is
//! handed over together, a failing batch is retried whole, and a batch that fails for
//! good is handled again message by message so that only the bad message is dead-lettered.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestResult, eventually, header, read_records, start, topics};
use dbps_core::kafka::{HandlerError, RetryPolicy, RunSummary, dead_letter_header};
use dbps_core::{BatchHandler, Envelope};
use rdkafka::Message as _;

/// Records the messages of the batches it accepts; a batch holding the poison aggregate
/// fails permanently, and the first batch fails once transiently.
#[derive(Default, Clone)]
struct Batcher {
    seen: Arc<Mutex<Vec<String>>>,
    sizes: Arc<Mutex<Vec<usize>>>,
    calls: Arc<AtomicUsize>,
}

impl BatchHandler for Batcher {
    fn max_batch(&self) -> usize {
        64
    }

    async fn handle_batch(&self, messages: &[Envelope]) -> Result<(), HandlerError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(HandlerError::transient("database busy"));
        }
        if messages.iter().any(|m| m.aggregate_id == "poison") {
            return Err(HandlerError::permanent("poison violates a business rule"));
        }
        self.sizes.lock().expect("lock").push(messages.len());
        self.seen
            .lock()
            .expect("lock")
            .extend(messages.iter().map(|m| m.aggregate_id.clone()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_retried_whole_and_split_to_dead_letter_only_the_bad_message() -> TestResult {
    let t = topics("events", 1).await?;
    let mut envelopes = Vec::new();
    for n in 0..300 {
        let sku = if n == 150 {
            String::from("poison")
        } else {
            format!("sku-{n}")
        };
        envelopes.push(common::stock_changed(&sku, n)?);
    }
    // Everything is on the topic before the runner starts, so batches fill up.
    t.publish(&envelopes).await?;
    let batcher = Batcher::default();
    let retry = RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(50), 3)?;
    let (stop, task) = start(t.consumer(batcher.clone()).retry(retry).build()?);
    eventually("all messages handled or dead-lettered", || async {
        Ok(batcher.seen.lock().expect("lock").len() == 299)
    })
    .await?;
    t.kafka.caught_up(&t.group, &t.topic).await?;
    stop.cancel();
    let summary = task.await??;

    let expected: Vec<String> = envelopes
        .iter()
        .map(|e| e.aggregate_id.clone())
        .filter(|id| id != "poison")
        .collect();
    assert_eq!(
        *batcher.seen.lock().expect("lock"),
        expected,
        "each message once, in order"
    );
    let sizes = batcher.sizes.lock().expect("lock").clone();
    assert!(sizes.iter().any(|&s| s > 1), "batches were handed over: {sizes:?}");
    assert!(sizes.iter().all(|&s| s <= 64), "no batch above max_batch: {sizes:?}");
    assert_eq!(
        summary,
        RunSummary {
            handled: 299,
            dead_lettered: 1
        }
    );
    let dead = read_records(t.kafka.brokers(), &t.dlq, 1).await?;
    assert_eq!(dead[0].key(), Some("poison".as_bytes()));
    assert!(header(&dead[0], dead_letter_header::REASON).is_some_and(|r| r.contains("business rule")));
    Ok(())
}
