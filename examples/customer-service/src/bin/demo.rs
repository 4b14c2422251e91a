//! `customer-demo`: drives a running customer service over HTTP and shows its events
//! arriving on Kafka.
//!
//! It waits for the service's `/health`, creates three customers, updates two of them,
//! gives the first a billing address and a contact, pages through `GET /customers`, and
//! prints each event of those customers as a consumer runner receives it from
//! `customer.customer.events`. It exits 0 once all seven events arrived in order, 1
//! otherwise.
#![allow(clippy::print_stdout)] // A demo talks to its user on standard output.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dbps_core::CancellationToken;
use dbps_core::Envelope;
use dbps_core::kafka::{ConsumerRunner, Handler, HandlerError, KafkaConfig, TopicSpec};
use example_customer_service::{
    Address, Contact, CreateCustomer, Customer, CustomerPage, NewAddress, NewContact, UpdateCustomer,
};
use serde::de::DeserializeOwned;

const DEADLINE: Duration = Duration::from_secs(60);
/// Three created, two updated, an address and a contact added.
const EVENTS: usize = 7;

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
    let first = created.first().context("no customer was created")?;
    let address = NewAddress {
        kind: "billing".into(),
        street: "12 St James's Square".into(),
        city: "London".into(),
        postal_code: "SW1Y 4JH".into(),
        country: "GB".into(),
    };
    let address: Address = answer(
        http.post(format!("{base}/customers/{}/addresses", first.id))
            .json(&address),
    )
    .await?;
    println!(
        "  http   -> POST /customers/{}/addresses  {} {}",
        first.id, address.kind, address.city
    );
    let contact = NewContact {
        name: "Charles Babbage".into(),
        email: Some("charles@example.com".into()),
        phone: None,
    };
    let contact: Contact = answer(
        http.post(format!("{base}/customers/{}/contacts", first.id))
            .json(&contact),
    )
    .await?;
    println!("  http   -> POST /customers/{}/contacts   {}", first.id, contact.name);

    // Every customer the service has, two a page.
    let (mut listed, mut pages, mut after) = (0usize, 0usize, None);
    loop {
        let mut request = http.get(format!("{base}/customers")).query(&[("limit", "2")]);
        if let Some(after) = after {
            request = request.query(&[("after", format!("{after}"))]);
        }
        let page: CustomerPage = answer(request).await?;
        listed += page
            .customers
            .iter()
            .filter(|c| created.iter().any(|d| d.id == c.id))
            .count();
        pages += 1;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    println!("  http   -> GET /customers?limit=2      {pages} page(s), the demo's {listed} customers among them");
    if listed != created.len() {
        bail!(
            "the customer list showed {listed} of the {} customers created",
            created.len()
        );
    }

    let deadline = tokio::time::Instant::now() + DEADLINE;
    while printer.seen.lock().map_err(|_| anyhow::anyhow!("lock"))?.len() < EVENTS {
        if tokio::time::Instant::now() > deadline {
            bail!("not all {EVENTS} events arrived within {DEADLINE:?}");
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
    println!("all {EVENTS} events arrived, in order per customer");
    Ok(())
}

/// Sends `request` and reads its JSON answer; an error status is an error.
async fn answer<T: DeserializeOwned>(request: reqwest::RequestBuilder) -> anyhow::Result<T> {
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
