//! `customer-demo`: drives a running customer service over HTTP and shows its events
//! arriving on Kafka.
//!
//! It waits for the service's `/health`, creates three customers, updates two of them,
//! and prints each event of those customers as a consumer runner receives it from
//! `customer.customer.events`. It exits 0 once all five events arrived in order, 1
//! otherwise.
#![allow(clippy::print_stdout)] // A demo talks to its user on standard output.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dbps_core::CancellationToken;
use dbps_core::Envelope;
use dbps_core::kafka::{ConsumerRunner, Handler, HandlerError, KafkaConfig, TopicSpec};
use example_customer_service::{CreateCustomer, Customer, UpdateCustomer};

const DEADLINE: Duration = Duration::from_secs(60);

/// Prints the events of the demo's customers and collects (id, sequence) pairs.
struct Printer {
    ours: Mutex<Vec<String>>,
    seen: Mutex<Vec<(String, i64)>>,
}

impl Handler for Printer {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        if self
            .ours
            .lock()
            .map_err(|_| HandlerError::permanent("lock"))?
            .contains(&message.aggregate_id)
        {
            println!(
                "  kafka  <- {:<26} customer {}  sequence {}  {}",
                message.message_type,
                message.aggregate_id,
                message.sequence.unwrap_or_default(),
                message.payload_json()
            );
            self.seen
                .lock()
                .map_err(|_| HandlerError::permanent("lock"))?
                .push((message.aggregate_id.clone(), message.sequence.unwrap_or_default()));
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::var("CUSTOMER_SERVICE_URL").unwrap_or_else(|_| "http://127.0.0.1:8081".into());
    let brokers = std::env::var("DBPS_KAFKA_BROKERS").context("DBPS_KAFKA_BROKERS is not set")?;
    let http = reqwest::Client::new();

    wait_for_health(&http, &base).await?;
    println!("customer service is up at {base}");

    let printer = Arc::new(Printer {
        ours: Mutex::new(Vec::new()),
        seen: Mutex::new(Vec::new()),
    });
    let group = format!("customer-demo-{}", uuid::Uuid::now_v7());
    let runner = ConsumerRunner::builder(KafkaConfig::new(&brokers), &group, Arc::clone(&printer))
        .topic("customer.customer.events")
        .dead_letter_topic("customer-demo.dlq")
        .create_topics(|name| TopicSpec::new(name, 1))
        .build()?;
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(runner.run(stop.clone()));

    let people = [
        ("Ada Lovelace", "GB-1815"),
        ("Grace Hopper", "US-1906"),
        ("Edsger Dijkstra", "NL-1930"),
    ];
    let mut created = Vec::new();
    for (name, tax) in people {
        let body = CreateCustomer {
            name: name.into(),
            tax_number: tax.into(),
            email: format!("{}@example.com", name.split(' ').next().unwrap_or("x").to_lowercase()),
        };
        let customer: Customer = answer(http.post(format!("{base}/customers")).json(&body)).await?;
        println!("  http   -> POST /customers          {} {}", customer.id, customer.name);
        printer
            .ours
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .push(customer.id.to_string());
        created.push(customer);
    }
    for customer in created.iter().take(2) {
        let change = UpdateCustomer {
            email: Some(format!("billing+{}@example.com", customer.version)),
            ..Default::default()
        };
        let updated: Customer = answer(http.put(format!("{base}/customers/{}", customer.id)).json(&change)).await?;
        println!("  http   -> PUT /customers/{}  version {}", updated.id, updated.version);
    }

    let deadline = tokio::time::Instant::now() + DEADLINE;
    while printer.seen.lock().map_err(|_| anyhow::anyhow!("lock"))?.len() < 5 {
        if tokio::time::Instant::now() > deadline {
            bail!("not all five events arrived within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    consumer.await??;

    let mut per_customer: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (id, sequence) in printer.seen.lock().map_err(|_| anyhow::anyhow!("lock"))?.iter() {
        per_customer.entry(id.clone()).or_default().push(*sequence);
    }
    for (id, sequences) in &per_customer {
        let expected: Vec<i64> = (1..=i64::try_from(sequences.len())?).collect();
        if *sequences != expected {
            bail!("events of customer {id} arrived out of order: {sequences:?}");
        }
    }
    println!("all 5 events arrived, in order per customer");
    Ok(())
}

/// Sends `request` and reads its JSON answer; an error status is an error.
async fn answer(request: reqwest::RequestBuilder) -> anyhow::Result<Customer> {
    Ok(request.send().await?.error_for_status()?.json().await?)
}

async fn wait_for_health(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(response) = http.get(format!("{base}/health")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the customer service at {base} did not become healthy within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
