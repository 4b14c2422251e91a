//! An event-driven replica: the Customer service writes customers with the outbox, the
//! Quote service keeps `customer_cache` from their events in its own database — a late
//! event does not undo a delete — and a reconciler compares the copy with the owner's
//! snapshot over HTTP, finds damage done by hand and repairs it.
//!
//! Run with: `scripts/stack.sh up && eval "$(scripts/stack.sh env)" && cargo run -p example-replica`
//! The same binary runs one reconciliation as a command: `cargo run -p example-replica -- reconcile`.
#![allow(clippy::print_stdout)] // An example talks to its reader.

use std::str::FromStr;
use std::time::Duration;

use dbps_cache::replica::http::{HttpSource, snapshot_router};
use dbps_cache::replica::{Change, PgReplica, PgSnapshotSource, Projection, Reconciler};
use dbps_core::kafka::{ConsumerRunner, KafkaConfig, KafkaPublisher, TopicSpec, ensure_topics};
use dbps_core::{CancellationToken, Envelope, HandlerError, Message, message_set};
use dbps_migrate::{Password, PgService, ServiceName};
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

static CUSTOMERS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/customers");
static QUOTES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/quotes");
const TOPIC: &str = "example_replica_customers.customer.events";

/// A customer's state, in its events and in the owner's snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CustomerChanged {
    name: String,
    tax_number: Option<String>,
}

impl Message for CustomerChanged {
    const TYPE: &'static str = "customer.CustomerChanged";
}

#[derive(Debug, Serialize, Deserialize)]
struct CustomerDeleted {}

impl Message for CustomerDeleted {
    const TYPE: &'static str = "customer.CustomerDeleted";
}

message_set! {
    /// What the Customer service says about customers.
    enum CustomerEvents { Changed(CustomerChanged), Deleted(CustomerDeleted) }
}

/// Quote's `customer_cache`: name and tax number of each customer.
struct CustomerCache;

impl Projection for CustomerCache {
    type Events = CustomerEvents;
    type Snapshot = CustomerChanged;

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
        match event {
            CustomerEvents::Changed(customer) => self.snapshot(customer),
            CustomerEvents::Deleted(_) => Ok(Change::Delete),
        }
    }

    fn snapshot(&self, customer: CustomerChanged) -> Result<Change, HandlerError> {
        Ok(Change::row(&customer)?)
    }
}

/// One service's database, provisioned and migrated.
async fn service(name: &str, component: &str, migrator: &'static sqlx::migrate::Migrator) -> anyhow::Result<PgPool> {
    let admin = PgConnectOptions::from_str(&std::env::var("DBPS_POSTGRES_URL")?)?;
    let service = PgService::new(ServiceName::new(name)?);
    let mut migrations = service.migrations();
    migrations = if name == "example_replica_customers" {
        migrations.component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
    } else {
        migrations
            .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
            .component("dbps_replica", &dbps_cache::replica::MIGRATOR)
    };
    let migrations = migrations.component(component, migrator);
    let (owner, runtime) = (Password::new("owner-dev")?, Password::new("runtime-dev")?);
    Ok(service
        .prepare(&admin, &owner, &runtime, &migrations, PgPoolOptions::new())
        .await?)
}

fn replica(quotes: &PgPool) -> anyhow::Result<PgReplica<CustomerCache>> {
    Ok(PgReplica::builder(quotes.clone(), "customer_cache", CustomerCache)
        .aggregate_column("id")
        .build()?)
}

/// The owner's snapshot, served over HTTP on a free port; returns its URL.
async fn serve_snapshot(customers: &PgPool) -> anyhow::Result<String> {
    let source = PgSnapshotSource::new(customers.clone(), "customers", "id", "version")?
        .state("jsonb_build_object('name', t.name, 'tax_number', t.tax_number)");
    let app = axum::Router::new().nest("/snapshot/customers", snapshot_router(source));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/snapshot/customers", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Writes a customer change and its event in one transaction.
async fn change(
    customers: &PgPool,
    outbox: &PgOutbox,
    id: Option<&str>,
    name: &str,
) -> anyhow::Result<(String, Envelope)> {
    let mut tx = customers.begin().await?;
    let id: String = match id {
        None => {
            sqlx::query_scalar("insert into customers (name) values ($1) returning id::text")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?
        }
        Some(id) => {
            sqlx::query_scalar(
                "update customers set name = $2, version = version + 1 where id = $1::uuid returning id::text",
            )
            .bind(id)
            .bind(name)
            .fetch_one(&mut *tx)
            .await?
        }
    };
    let event = CustomerChanged {
        name: name.to_owned(),
        tax_number: Some(format!("DE-{}", &id[..8])),
    };
    sqlx::query("update customers set tax_number = $2 where id = $1::uuid")
        .bind(&id)
        .bind(&event.tax_number)
        .execute(&mut *tx)
        .await?;
    let enqueued = outbox.enqueue_event(&mut tx, "customer", &id, &event).await?;
    tx.commit().await?;
    let mut envelope = Envelope::event("example_replica_customers", "customer", &id, &event)?;
    envelope.sequence = enqueued.sequence;
    Ok((id, envelope))
}

async fn cache(quotes: &PgPool) -> anyhow::Result<Vec<(String, String, i64)>> {
    Ok(
        sqlx::query_as("select id::text, name, source_sequence from customer_cache order by name")
            .fetch_all(quotes)
            .await?,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let kafka = KafkaConfig::new(std::env::var("DBPS_KAFKA_BROKERS")?);
    let customers = service("example_replica_customers", "customers", &CUSTOMERS).await?;
    let quotes = service("example_replica_quotes", "quotes", &QUOTES).await?;
    if std::env::args().nth(1).as_deref() == Some("reconcile") {
        let owner = HttpSource::new(reqwest::Client::new(), serve_snapshot(&customers).await?);
        let report = Reconciler::new(owner, replica(&quotes)?).repair(true).run().await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    // A fresh start for each run.
    sqlx::query("delete from customers").execute(&customers).await?;
    sqlx::raw_sql("delete from customer_cache; delete from dbps_replica_versions; delete from dbps_inbox")
        .execute(&quotes)
        .await?;
    ensure_topics(&kafka, &[TopicSpec::new(TOPIC, 3)]).await?;

    // The Customer service: customers and their events, the relay publishing them.
    let outbox = PgOutbox::new("example_replica_customers");
    let (ada, _) = change(&customers, &outbox, None, "Ada").await?;
    let (grace, created) = change(&customers, &outbox, None, "Grace").await?;
    let (_, renamed) = change(&customers, &outbox, Some(&grace), "Grace Hopper").await?;
    change(&customers, &outbox, Some(&ada), "Ada Lovelace").await?;
    let mut tx = customers.begin().await?;
    sqlx::query("delete from customers where id = $1::uuid")
        .bind(&grace)
        .execute(&mut *tx)
        .await?;
    outbox
        .enqueue_event(&mut tx, "customer", &grace, &CustomerDeleted {})
        .await?;
    tx.commit().await?;
    println!("customer service: Ada created and renamed, Grace created, renamed and deleted");

    let stop = CancellationToken::new();
    let publisher = KafkaPublisher::builder(kafka.clone()).build()?;
    let relay = Relay::builder(PgOutboxStore::new(customers.clone()), publisher.clone()).build()?;
    let relay = tokio::spawn(relay.run(stop.clone()));

    // The Quote service: the replica, a batch handler of the consumer runner.
    let runner = ConsumerRunner::builder(
        kafka.clone(),
        "example_replica_quotes.customer-cache",
        replica(&quotes)?,
    )
    .topic(TOPIC)
    .create_topics(|name| TopicSpec::new(name, 1))
    .build()?;
    let consumer = tokio::spawn(runner.run(stop.clone()));
    let replica = replica(&quotes)?;
    let settled = || async {
        for _ in 0..600 {
            if replica.version(&grace).await? == Some((3, true)) && replica.version(&ada).await? == Some((2, false)) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the replica did not catch up within 30 s")
    };
    settled().await?;
    println!("quote service's customer_cache: {:?}", cache(&quotes).await?);

    // Grace's old events arrive again, late (a producer retried, a topic was replayed).
    for late in [&created, &renamed] {
        let mut again = late.clone();
        again.id = format!("{}-replayed", late.id);
        publisher.publish(TOPIC, &again).await?;
    }
    // They pass the inbox (new message ids) and meet the sequence guard.
    for _ in 0..600 {
        let handled: i64 = sqlx::query_scalar("select count(*) from dbps_inbox where message_id like '%-replayed'")
            .fetch_one(&quotes)
            .await?;
        if handled == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = cache(&quotes).await?;
    anyhow::ensure!(rows.len() == 1, "a late event brought Grace back: {rows:?}");
    println!("after Grace's old events were delivered again: {rows:?} (the delete holds)");

    // Consistency monitoring: compare with the owner's snapshot, then damage and repair.
    let owner = HttpSource::new(reqwest::Client::new(), serve_snapshot(&customers).await?);
    let reconciler = Reconciler::new(owner, replica.clone()).repair(true);
    let clean = reconciler.run().await?;
    anyhow::ensure!(clean.is_clean(), "{clean:?}");
    println!(
        "reconciler: {} record(s) at the owner, {} in the replica, clean",
        clean.source_records, clean.replica_records
    );
    sqlx::query("update customer_cache set name = 'Ada (old)', source_sequence = 1")
        .execute(&quotes)
        .await?;
    let repaired = reconciler.run().await?;
    println!(
        "after a row was set back by hand: stale {:?}, repaired {}",
        repaired.stale, repaired.repaired
    );
    anyhow::ensure!(reconciler.run().await?.is_clean(), "the repair did not hold");
    println!("quote service's customer_cache: {:?}", cache(&quotes).await?);

    stop.cancel();
    relay.await??;
    consumer.await??;
    Ok(())
}
