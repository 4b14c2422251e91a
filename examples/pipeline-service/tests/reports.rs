//! The pipeline service as its process runs it — its own provisioned database, its
//! projections reading Kafka, served by `dbps-service` — fed with the other services'
//! events published to their topics, asked for its reports over HTTP. Every figure is
//! compared with a computation over the events the test generated, made here in Rust.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use dbps_cache::projection::RebuildProgress;
use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_core::{CancellationToken, Envelope, Message, MessageSet, Registry};
use dbps_service::{Service, ServiceConfig};
use example_contracts::inventory::{
    MissingStock, PRODUCT_AGGREGATE, ProductChanged, RESERVATION_AGGREGATE, ReservationEvent, ReservedLine,
    StockLevelChanged, StockReservationFailed, StockReserved,
};
use example_contracts::quote::{
    QuoteCreated, QuoteEvent, QuoteLine, QuoteStatusChanged, SalesRepNotificationRequested,
};
use example_customer_service::events::{CustomerCreated, CustomerEvent, CustomerUpdated};
use example_pipeline_service::warehouse::ProductChanges;
use example_pipeline_service::{
    App, Bucket, Conversion, PipelineValue, QuoteSearchResult, SEARCH_INDEX, SERVICE, SearchSettings, Settings,
    StockMovementRow, StockMovements, StockOutRow, StockOuts, TABLES, Topics, ValueRow,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn,rdkafka=warn")
        .with_test_writer()
        .try_init();
}

/// The service on its own provisioned database and topic namespace (the followed services
/// under their canonical names, below the test's topic prefix).
struct Running {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<dbps_service::Result<()>>,
    app: App,
    topics: Topics,
    kafka_config: KafkaConfig,
    publisher: KafkaPublisher,
    pool: sqlx::PgPool,
    _kafka: dbps_testkit::TestKafka,
    // Dropped last: removes the service's database and roles.
    _database: dbps_testkit::TestService,
}

async fn start() -> Result<Running, BoxError> {
    start_with(None).await
}

/// The service, with the quotes index in `search` when given.
async fn start_with(search: Option<&dbps_testkit::TestOpenSearch>) -> Result<Running, BoxError> {
    init_logs();
    let test = dbps_testkit::service(SERVICE).start().await?;
    let kafka = dbps_testkit::kafka().await?;
    let (owner, runtime) = test.passwords();
    let kafka_config = KafkaConfig::new(kafka.brokers());
    let config = ServiceConfig::new(test.name().as_str())?
        .postgres(test.server_options().clone())
        .passwords(owner.clone(), runtime.clone())
        .provision(false)
        .kafka(kafka_config.clone())
        .topic_prefix(kafka.prefix());
    let mut service = Service::new(config);
    let mut settings = Settings::new(test.owner_options());
    settings.search = search.map(|search| SearchSettings {
        url: search.url().to_owned(),
        index_prefix: search.prefix().to_owned(),
    });
    let topics = settings.topics(&service.naming())?;
    let app = App::start(&mut service, settings).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    Ok(Running {
        base,
        http: reqwest::Client::new(),
        stop: service.shutdown_token(),
        app: app.clone(),
        topics,
        publisher: KafkaPublisher::builder(kafka_config.clone()).build()?,
        kafka_config,
        pool: test.pool().clone(),
        task: tokio::spawn(service.serve_on(listener, app.router())),
        _kafka: kafka,
        _database: test,
    })
}

impl Running {
    async fn publish(&self, events: &[(Source, Envelope)]) -> TestResult {
        let messages: Vec<(&str, &Envelope)> = events
            .iter()
            .map(|(source, envelope)| (self.topic(*source), envelope))
            .collect();
        for result in self.publisher.publish_batch(messages).await {
            result?;
        }
        Ok(())
    }

    fn topic(&self, source: Source) -> &str {
        match source {
            Source::Customers => &self.topics.customers,
            Source::Quotes => &self.topics.quotes,
            Source::Products => &self.topics.products,
            Source::Reservations => &self.topics.reservations,
        }
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, Value), BoxError> {
        let response = self.http.get(format!("{}{path}", self.base)).send().await?;
        let status = response.status();
        Ok((status, response.json().await?))
    }

    async fn report<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<Option<T>, BoxError> {
        let (status, body) = self.get(path).await?;
        match status {
            StatusCode::OK => Ok(Some(serde_json::from_value(body)?)),
            // Not built yet.
            StatusCode::SERVICE_UNAVAILABLE => Ok(None),
            other => Err(format!("{path}: {other} {body}").into()),
        }
    }

    /// The reports' figures now (`None` while the warehouse is not built).
    async fn figures(&self) -> Result<Option<Figures>, BoxError> {
        let by_status: Option<PipelineValue> = self.report("/reports/pipeline-value?group=status").await?;
        let by_month: Option<PipelineValue> = self.report("/reports/pipeline-value?group=month").await?;
        let conversion: Option<Conversion> = self.report("/reports/conversion?group=month").await?;
        let stock_outs: Option<StockOuts> = self.report("/reports/stock-outs").await?;
        let movements: Option<StockMovements> = self.report("/reports/stock-movements").await?;
        let (Some(by_status), Some(by_month), Some(conversion), Some(stock_outs), Some(movements)) =
            (by_status, by_month, conversion, stock_outs, movements)
        else {
            return Ok(None);
        };
        Ok(Some(Figures {
            by_status: (by_status.rows, by_status.quotes, by_status.value_cents),
            by_month: (by_month.rows, by_month.quotes, by_month.value_cents),
            conversion: (
                conversion.created,
                conversion.ordered,
                billionths(conversion.ratio),
                conversion.created_value_cents,
                conversion.ordered_value_cents,
                conversion
                    .months
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m| (m.month, m.created, m.ordered, billionths(m.ratio)))
                    .collect(),
            ),
            stock_outs: stock_outs.rows,
            stock_movements: movements.rows,
        }))
    }

    /// Waits until the reports show `expected`.
    async fn converges(&self, expected: &Figures) -> TestResult {
        let last: Mutex<Option<Figures>> = Mutex::new(None);
        let seen = &last;
        let waited = dbps_testkit::eventually("the reports to equal the computation over the events", || async move {
            let figures = self.figures().await?;
            let done = figures.as_ref() == Some(expected);
            *seen.lock().expect("last figures") = figures;
            Ok::<_, BoxError>(done)
        })
        .await;
        if let Err(error) = waited {
            let last = last.lock().expect("last figures");
            panic!("{error}: the reports did not converge:\n  seen     {last:?}\n  expected {expected:?}");
        }
        Ok(())
    }

    async fn stop(self) -> TestResult {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task).await???;
        Ok(())
    }
}

/// The topic an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Customers,
    Quotes,
    Products,
    Reservations,
}

/// A month's conversion: month, created, ordered, ratio in billionths.
type MonthConversion = (String, i64, i64, Option<i64>);

/// The figures of the five reports, without their freshness.
#[derive(Debug, Clone, PartialEq)]
struct Figures {
    by_status: (Vec<ValueRow>, i64, i64),
    by_month: (Vec<ValueRow>, i64, i64),
    /// Ratios in billionths: what JSON carries of a float is compared, not its last bit.
    conversion: (i64, i64, Option<i64>, i64, i64, Vec<MonthConversion>),
    stock_outs: Vec<StockOutRow>,
    stock_movements: Vec<StockMovementRow>,
}

/// Generates the other services' events as they would publish them: each aggregate's
/// events numbered in its sequence, with their times.
struct World {
    rng: StdRng,
    sequences: BTreeMap<(&'static str, Uuid), i64>,
    customers: Vec<Uuid>,
    /// Product, SKU, its stock's version.
    products: Vec<(Uuid, String, i64)>,
    start: DateTime<Utc>,
    quotes: usize,
}

/// A time with whole microseconds (what PostgreSQL keeps).
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).expect("in range")
}

/// A customer event of customer `n` (`id`): its name, version and addresses; its tax
/// number and email follow from `n`. Built from JSON: the event's other fields (machines,
/// ...) default to none.
fn customer<E: serde::de::DeserializeOwned>(id: Uuid, n: usize, name: &str, version: i64, addresses: Value) -> E {
    serde_json::from_value(json!({
        "id": id,
        "name": name,
        "tax_number": format!("TX{n:04}"),
        "email": format!("c{n}@example.com"),
        "version": version,
        "addresses": addresses,
    }))
    .expect("a customer")
}

impl World {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            sequences: BTreeMap::new(),
            customers: Vec::new(),
            products: Vec::new(),
            // Quotes are spread over about three months before now.
            start: micros(Utc::now() - TimeDelta::days(80)),
            quotes: 0,
        }
    }

    fn event<M: Message>(&mut self, aggregate: &'static str, id: Uuid, at: DateTime<Utc>, message: &M) -> Envelope {
        let sequence = self.sequences.entry((aggregate, id)).or_default();
        *sequence += 1;
        let mut envelope = Envelope::event("test", aggregate, id.to_string(), message).expect("an event");
        envelope.sequence = Some(*sequence);
        envelope.occurred_at = micros(at);
        envelope
    }

    /// Customers, created and some renamed.
    fn customers(&mut self, count: usize) -> Vec<(Source, Envelope)> {
        let mut events = Vec::new();
        for n in 0..count {
            let id = Uuid::now_v7();
            self.customers.push(id);
            let at = self.start - TimeDelta::days(5);
            let country = ["DE", "FR", "NL"][n % 3];
            let created: CustomerCreated = customer(
                id,
                n,
                &format!("Customer {n}"),
                1,
                json!([
                    { "id": Uuid::now_v7(), "kind": "shipping", "street": "Dock 1", "city": "Port",
                      "postal_code": "1000", "country": "US" },
                    { "id": Uuid::now_v7(), "kind": "billing", "street": "Main St 1", "city": "Town",
                      "postal_code": "1234", "country": country },
                ]),
            );
            events.push((
                Source::Customers,
                self.event(example_customer_service::AGGREGATE, id, at, &created),
            ));
            if n % 2 == 0 {
                let updated: CustomerUpdated = customer(
                    id,
                    n,
                    &format!("Customer {n} Ltd"),
                    2,
                    json!([
                        { "id": Uuid::now_v7(), "kind": "site", "street": "Plant 2", "city": "Mill",
                          "postal_code": "99", "country": "BE" },
                    ]),
                );
                let at = at + TimeDelta::hours(1);
                events.push((
                    Source::Customers,
                    self.event(example_customer_service::AGGREGATE, id, at, &updated),
                ));
            }
        }
        events
    }

    /// Products, created with some stock, and one renamed.
    fn products(&mut self, count: usize) -> Vec<(Source, Envelope)> {
        let mut events = Vec::new();
        for n in 0..count {
            let id = Uuid::now_v7();
            let sku = format!("SKU-{n}");
            let at = self.start - TimeDelta::days(4);
            let changed = ProductChanged {
                product_id: id,
                sku: sku.clone(),
                name: format!("Product {n}"),
                unit_price_cents: 1_000 + 250 * i64::try_from(n).unwrap_or_default(),
                version: 1,
            };
            events.push((Source::Products, self.event(PRODUCT_AGGREGATE, id, at, &changed)));
            let level = StockLevelChanged {
                product_id: id,
                available: self.rng.random_range(0..20),
                version: 1,
            };
            events.push((Source::Products, self.event(PRODUCT_AGGREGATE, id, at, &level)));
            if n == 0 {
                let renamed = ProductChanged {
                    name: String::from("Product 0 (new)"),
                    version: 2,
                    ..changed
                };
                let at = at + TimeDelta::hours(2);
                events.push((Source::Products, self.event(PRODUCT_AGGREGATE, id, at, &renamed)));
            }
            self.products.push((id, sku, 1));
        }
        events
    }

    /// `count` quotes with their statuses, the inventory's answers and stock changes: in
    /// turn new, reserved, ordered, pending stock and order failed.
    fn quotes(&mut self, count: usize) -> Vec<(Source, Envelope)> {
        let mut events = Vec::new();
        for _ in 0..count {
            let n = self.quotes;
            self.quotes += 1;
            let quote_id = Uuid::now_v7();
            let customer_id = self.customers[self.rng.random_range(0..self.customers.len())];
            let mut chosen: Vec<usize> = (0..self.products.len()).collect();
            chosen.shuffle(&mut self.rng);
            let lines: Vec<QuoteLine> = chosen[..self.rng.random_range(1..=3)]
                .iter()
                .map(|&p| QuoteLine {
                    product_id: self.products[p].0,
                    quantity: self.rng.random_range(1..=5),
                    unit_price_cents: self.rng.random_range(100..=5_000),
                })
                .collect();
            let total_cents: i64 = lines.iter().map(|l| l.quantity * l.unit_price_cents).sum();
            let created_at = self.start + TimeDelta::hours(i64::try_from(n).unwrap_or_default() * 61);
            let created = QuoteCreated {
                quote_id,
                customer_id,
                sales_rep: String::from("rep@example.com"),
                lines: lines.clone(),
            };
            events.push((
                Source::Quotes,
                self.event(example_contracts::quote::AGGREGATE, quote_id, created_at, &created),
            ));
            let path: &[&str] = match n % 5 {
                0 => &[],
                1 => &["Awaiting Stock", "Stock Reserved"],
                2 => &["Awaiting Stock", "Stock Reserved", "Ordering", "Ordered"],
                3 => &["Awaiting Stock", "Pending Stock"],
                _ => &["Awaiting Stock", "Stock Reserved", "Ordering", "Order Failed"],
            };
            // The quote's version after each change (1 when created).
            for (version, status) in (2..).zip(path) {
                let at = created_at + TimeDelta::minutes(version);
                if *status == "Stock Reserved" {
                    let reserved = StockReserved {
                        quote_id,
                        lines: lines
                            .iter()
                            .map(|l| ReservedLine {
                                product_id: l.product_id,
                                quantity: l.quantity,
                            })
                            .collect(),
                    };
                    events.push((
                        Source::Reservations,
                        self.event(RESERVATION_AGGREGATE, quote_id, at, &reserved),
                    ));
                    for line in &lines {
                        events.push(self.stock_level(line.product_id, at));
                    }
                }
                let reason = if *status == "Pending Stock" {
                    // One or two of its products were short.
                    let missing: Vec<MissingStock> = lines
                        .iter()
                        .take(2)
                        .map(|l| MissingStock {
                            product_id: l.product_id,
                            requested: l.quantity + 3,
                            available: self.rng.random_range(0..=2),
                        })
                        .collect();
                    let failed = StockReservationFailed {
                        quote_id,
                        missing: missing.clone(),
                    };
                    events.push((
                        Source::Reservations,
                        self.event(RESERVATION_AGGREGATE, quote_id, at, &failed),
                    ));
                    Some(String::from("not enough stock"))
                } else {
                    None
                };
                let changed = QuoteStatusChanged {
                    quote_id,
                    customer_id,
                    status: (*status).to_owned(),
                    reason: reason.clone(),
                    total_cents,
                    version,
                    purchase_order_id: (*status == "Ordered").then(Uuid::now_v7),
                };
                events.push((
                    Source::Quotes,
                    self.event(example_contracts::quote::AGGREGATE, quote_id, at, &changed),
                ));
                if let Some(reason) = reason {
                    // Also on the quote's events, and of no interest to the warehouse.
                    let notification = SalesRepNotificationRequested {
                        quote_id,
                        customer_id,
                        sales_rep: String::from("rep@example.com"),
                        reason,
                        missing: Vec::new(),
                    };
                    let at = at + TimeDelta::seconds(1);
                    events.push((
                        Source::Quotes,
                        self.event(example_contracts::quote::AGGREGATE, quote_id, at, &notification),
                    ));
                }
            }
        }
        events
    }

    fn stock_level(&mut self, product_id: Uuid, at: DateTime<Utc>) -> (Source, Envelope) {
        let product = self.products.iter_mut().find(|p| p.0 == product_id).expect("a product");
        product.2 += 1;
        let level = StockLevelChanged {
            product_id,
            available: self.rng.random_range(0..50),
            version: product.2,
        };
        (Source::Products, self.event(PRODUCT_AGGREGATE, product_id, at, &level))
    }
}

/// The newest event of each aggregate among `events` (by sequence), decoded into `S`
/// (types outside `S` are not considered).
fn newest<S: MessageSet>(events: &[(Source, Envelope)], source: Source) -> BTreeMap<String, (i64, S, DateTime<Utc>)> {
    let registry = Registry::new();
    let mut newest: BTreeMap<String, (i64, S, DateTime<Utc>)> = BTreeMap::new();
    for (_, envelope) in events.iter().filter(|(s, _)| *s == source) {
        if !S::TYPES.contains(&envelope.message_type.as_str()) {
            continue;
        }
        let sequence = envelope.sequence.expect("sequenced");
        if newest
            .get(&envelope.aggregate_id)
            .is_some_and(|(s, _, _)| *s >= sequence)
        {
            continue;
        }
        let event = S::decode(&registry, envelope).expect("decodable");
        newest.insert(envelope.aggregate_id.clone(), (sequence, event, envelope.occurred_at));
    }
    newest
}

// Message sets of one type each, to find the newest event of that type per aggregate.
dbps_core::message_set! {
    enum Created { Created(QuoteCreated) }
}
dbps_core::message_set! {
    enum Status { Changed(QuoteStatusChanged) }
}
dbps_core::message_set! {
    enum Level { Changed(StockLevelChanged) }
}

fn ratio(ordered: i64, created: i64) -> Option<f64> {
    (created > 0).then(|| ordered as f64 / created as f64)
}

fn billionths(ratio: Option<f64>) -> Option<i64> {
    ratio.map(|r| (r * 1e9).round() as i64)
}

/// What the reports must say about `events`, computed from them.
fn expected(events: &[(Source, Envelope)]) -> Figures {
    let created = newest::<Created>(events, Source::Quotes);
    let statuses = newest::<Status>(events, Source::Quotes);
    let status_of = |quote: &str| {
        statuses
            .get(quote)
            .map_or_else(|| String::from("New"), |(_, Status::Changed(s), _)| s.status.clone())
    };
    // (status or month) → (quotes, value); month → (created, ordered, created value, ordered value).
    let mut by_status: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut by_month: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut months: BTreeMap<String, (i64, i64, i64, i64)> = BTreeMap::new();
    for (quote, (_, Created::Created(q), at)) in &created {
        let value: i64 = q.lines.iter().map(|l| l.quantity * l.unit_price_cents).sum();
        let status = status_of(quote);
        let month = at.format("%Y-%m").to_string();
        let entry = by_status.entry(status.clone()).or_default();
        *entry = (entry.0 + 1, entry.1 + value);
        let entry = by_month.entry(month.clone()).or_default();
        *entry = (entry.0 + 1, entry.1 + value);
        let ordered = i64::from(status == "Ordered");
        let entry = months.entry(month).or_default();
        *entry = (
            entry.0 + 1,
            entry.1 + ordered,
            entry.2 + value,
            entry.3 + ordered * value,
        );
    }
    let rows = |groups: &BTreeMap<String, (i64, i64)>, status: bool| -> (Vec<ValueRow>, i64, i64) {
        let rows = groups
            .iter()
            .map(|(key, (quotes, value_cents))| ValueRow {
                status: status.then(|| key.clone()),
                month: (!status).then(|| key.clone()),
                quotes: *quotes,
                value_cents: *value_cents,
            })
            .collect();
        (
            rows,
            groups.values().map(|g| g.0).sum(),
            groups.values().map(|g| g.1).sum(),
        )
    };
    let (all, ordered) = (
        months.values().map(|m| m.0).sum::<i64>(),
        months.values().map(|m| m.1).sum::<i64>(),
    );
    let conversion = (
        all,
        ordered,
        billionths(ratio(ordered, all)),
        months.values().map(|m| m.2).sum(),
        months.values().map(|m| m.3).sum(),
        months
            .iter()
            .map(|(month, (created, ordered, _, _))| {
                (month.clone(), *created, *ordered, billionths(ratio(*ordered, *created)))
            })
            .collect(),
    );

    // Stock-outs: the newest answer of each quote's reservation, per product short.
    let answers = newest::<ReservationEvent>(events, Source::Reservations);
    let products = newest::<ProductChanges>(events, Source::Products);
    let levels = newest::<Level>(events, Source::Products);
    let mut short: BTreeMap<Uuid, (BTreeSet<String>, i64, i64)> = BTreeMap::new();
    for (quote, (_, answer, _)) in &answers {
        let ReservationEvent::Failed(failed) = answer else {
            continue;
        };
        for missing in &failed.missing {
            let entry = short.entry(missing.product_id).or_default();
            entry.0.insert(quote.clone());
            entry.1 += (missing.requested - missing.available).max(0);
            entry.2 += i64::from(status_of(quote) == "Pending Stock");
        }
    }
    let mut stock_outs: Vec<StockOutRow> = short
        .into_iter()
        .map(|(product_id, (quotes, units_short, pending))| {
            let product = products.get(&product_id.to_string()).map(|(_, p, _)| {
                let ProductChanges::Changed(p) = p;
                p
            });
            StockOutRow {
                product_id,
                sku: product.map(|p| p.sku.clone()),
                name: product.map(|p| p.name.clone()),
                quotes: i64::try_from(quotes.len()).unwrap_or_default(),
                quotes_pending_stock: pending,
                units_short,
                available_now: levels
                    .get(&product_id.to_string())
                    .map(|(_, Level::Changed(l), _)| l.available),
            }
        })
        .collect();
    stock_outs.sort_by(|a, b| {
        b.units_short
            .cmp(&a.units_short)
            .then(b.quotes.cmp(&a.quotes))
            .then(a.product_id.cmp(&b.product_id))
    });
    Figures {
        by_status: rows(&by_status, true),
        by_month: rows(&by_month, false),
        conversion,
        stock_outs,
        stock_movements: stock_movements(events, None, None, None),
    }
}

/// What the stock-movements report must say about `events` (for one product, between two
/// days): each distinct `StockLevelChanged` once, its change against the product's
/// previous level by stock version (from zero for the first), per product and month.
fn stock_movements(
    events: &[(Source, Envelope)],
    product: Option<Uuid>,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
) -> Vec<StockMovementRow> {
    let registry = Registry::new();
    // Product → stock version → (available, when), each event once however often delivered.
    let mut levels: BTreeMap<Uuid, BTreeMap<i64, (i64, DateTime<Utc>)>> = BTreeMap::new();
    for (_, envelope) in events.iter().filter(|(s, _)| *s == Source::Products) {
        if envelope.message_type != StockLevelChanged::TYPE {
            continue;
        }
        let Ok(Level::Changed(level)) = Level::decode(&registry, envelope) else {
            panic!("a stock level");
        };
        levels
            .entry(level.product_id)
            .or_default()
            .insert(level.version, (level.available, envelope.occurred_at));
    }
    // (product, month) → (movements, in, out, last level).
    let mut months: BTreeMap<(Uuid, String), (i64, i64, i64, i64)> = BTreeMap::new();
    for (product_id, history) in &levels {
        let mut previous = 0;
        for (available, at) in history.values() {
            let delta = available - previous;
            previous = *available;
            let day = at.date_naive();
            if product.is_some_and(|p| p != *product_id) || from.is_some_and(|f| day < f) || to.is_some_and(|t| day > t)
            {
                continue;
            }
            let entry = months.entry((*product_id, at.format("%Y-%m").to_string())).or_default();
            entry.0 += 1;
            entry.1 += delta.max(0);
            entry.2 += (-delta).max(0);
            // In version order: the month's last movement comes last.
            entry.3 = *available;
        }
    }
    months
        .into_iter()
        .map(
            |((product_id, month), (movements, units_in, units_out, last_level))| StockMovementRow {
                product_id,
                month,
                movements,
                units_in,
                units_out,
                last_level,
            },
        )
        .collect()
}

/// The newest source time among `events` of `source` whose type is in `S`.
fn newest_time<S: MessageSet>(events: &[(Source, Envelope)], source: Source) -> Option<DateTime<Utc>> {
    newest::<S>(events, source).values().map(|(_, _, at)| *at).max()
}

fn history(seed: u64, quotes: usize) -> (World, Vec<(Source, Envelope)>) {
    let mut world = World::new(seed);
    let mut events = world.customers(4);
    events.extend(world.products(5));
    events.extend(world.quotes(quotes));
    (world, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reports_equal_a_computation_over_the_source_events() -> TestResult {
    let service = start().await?;
    let (_, events) = history(1, 25);
    service.publish(&events).await?;
    let expected = expected(&events);
    // Every status is there, and stock-outs.
    let statuses: BTreeSet<&str> = expected
        .by_status
        .0
        .iter()
        .filter_map(|r| r.status.as_deref())
        .collect();
    assert_eq!(
        statuses,
        BTreeSet::from(["New", "Stock Reserved", "Ordered", "Pending Stock", "Order Failed"])
    );
    assert!(expected.by_month.0.len() >= 3, "{:?}", expected.by_month);
    assert!(!expected.stock_outs.is_empty());
    service.converges(&expected).await?;
    // The tables no report reads (the customers, the lines) may still be building.
    dbps_testkit::eventually("every table to serve version 1", || async {
        let serving = service.app.warehouse().serving_versions().await?;
        Ok::<_, sqlx::Error>(serving.values().all(|v| *v == Some(1)))
    })
    .await?;

    // Each report says how fresh it is: the serving version and the newest event applied.
    let value: PipelineValue = service
        .report("/reports/pipeline-value?group=month")
        .await?
        .ok_or("built")?;
    let sources: BTreeMap<&str, _> = value.freshness.sources.iter().map(|s| (s.table.as_str(), s)).collect();
    assert_eq!(sources.len(), 2);
    assert_eq!(sources["fact_quote"].version, Some(1));
    assert_eq!(
        sources["fact_quote"].newest_event_at,
        newest_time::<Created>(&events, Source::Quotes)
    );
    assert_eq!(
        sources["fact_quote_status"].newest_event_at,
        newest_time::<Status>(&events, Source::Quotes)
    );
    assert!(
        sources
            .values()
            .all(|s| s.applied_at.is_some() && s.lag_seconds.is_some())
    );
    assert_eq!(
        value.freshness.newest_event_at,
        sources.values().filter_map(|s| s.newest_event_at).max()
    );
    let (status, all) = service.get("/reports/freshness").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["sources"].as_array().map(Vec::len), Some(TABLES.len()));

    // The dimensions hold the newest state; the lines fact one row per line.
    let customers: Vec<(String, Option<String>, i32)> =
        sqlx::query_as("select name, country, address_count from dim_customer order by name")
            .fetch_all(&service.pool)
            .await?;
    let country = |c: &str| Some(c.to_owned());
    assert_eq!(
        customers,
        [
            (String::from("Customer 0 Ltd"), country("BE"), 1),
            (String::from("Customer 1"), country("FR"), 2),
            (String::from("Customer 2 Ltd"), country("BE"), 1),
            (String::from("Customer 3"), country("DE"), 2),
        ]
    );
    // No report reads the lines fact, so the reports' convergence does not wait for it.
    let created = newest::<Created>(&events, Source::Quotes);
    let expected_lines: usize = created.values().map(|(_, Created::Created(q), _)| q.lines.len()).sum();
    let expected_lines = i64::try_from(expected_lines)?;
    dbps_testkit::eventually("the lines fact to hold every line", || async {
        match sqlx::query_scalar::<_, i64>("select count(*) from fact_quote_line")
            .fetch_one(&service.pool)
            .await
        {
            Ok(lines) => Ok::<_, sqlx::Error>(lines == expected_lines),
            // Not built yet.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await?;

    // The stock movements: every level change was counted, and the filters choose the
    // product and the days (the first movement in a range counts from the level before).
    let moves: usize = expected
        .stock_movements
        .iter()
        .map(|r| usize::try_from(r.movements).unwrap_or_default())
        .sum();
    let level_events = events
        .iter()
        .filter(|(_, e)| e.message_type == StockLevelChanged::TYPE)
        .count();
    assert_eq!(moves, level_events);
    assert!(expected.stock_movements.iter().any(|r| r.units_out > 0));
    let product = expected.stock_movements[0].product_id;
    let (first_day, last_day) = {
        let mut days: Vec<chrono::NaiveDate> = events
            .iter()
            .filter(|(_, e)| e.message_type == StockLevelChanged::TYPE)
            .map(|(_, e)| e.occurred_at.date_naive())
            .collect();
        days.sort();
        (days[days.len() / 3], days[2 * days.len() / 3])
    };
    for (query, (p, from, to)) in [
        (format!("?product_id={product}"), (Some(product), None, None)),
        (
            format!("?from={first_day}&to={last_day}"),
            (None, Some(first_day), Some(last_day)),
        ),
        (
            format!("?product_id={product}&from={first_day}"),
            (Some(product), Some(first_day), None),
        ),
    ] {
        let report: StockMovements = service
            .report(&format!("/reports/stock-movements{query}"))
            .await?
            .ok_or("built")?;
        assert_eq!(report.rows, stock_movements(&events, p, from, to), "{query}");
        assert_eq!((report.product_id, report.from, report.to), (p, from, to));
        assert_eq!(report.freshness.sources.len(), 1);
        assert_eq!(
            report.freshness.newest_event_at,
            newest_time::<Level>(&events, Source::Products)
        );
    }

    // A date range.
    let first_month = &expected.by_month.0[0];
    let month = first_month.month.clone().ok_or("month")?;
    let from = format!("{month}-01");
    let value: PipelineValue = service
        .report(&format!("/reports/pipeline-value?group=month&from={from}&to={from}"))
        .await?
        .ok_or("built")?;
    assert!(value.quotes <= first_month.quotes);
    assert!(value.rows.iter().all(|r| r.month.as_deref() == Some(month.as_str())));
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_typed_400_problems() -> TestResult {
    let service = start().await?;
    for (path, parameter) in [
        ("/reports/pipeline-value?group=weekly", "group"),
        ("/reports/pipeline-value?group=status&group=month", "group"),
        ("/reports/pipeline-value?from=yesterday", "from"),
        ("/reports/pipeline-value?from=2026-05-02&to=2026-05-01", "to"),
        ("/reports/pipeline-value?colour=red", "colour"),
        ("/reports/conversion?group=status", "group"),
        ("/reports/conversion?to=2026-13-01", "to"),
        ("/reports/stock-outs?limit=0", "limit"),
        ("/reports/stock-outs?limit=lots", "limit"),
        ("/reports/stock-outs?limit=1001", "limit"),
        ("/reports/stock-movements?product_id=widget", "product_id"),
        ("/reports/stock-movements?from=2026-02-30", "from"),
        ("/reports/stock-movements?from=2026-05-02&to=2026-05-01", "to"),
        ("/reports/stock-movements?product=x", "product"),
        ("/reports/freshness?table=x", "table"),
        ("/search/quotes?size=101", "size"),
        ("/search/quotes?customer_id=ada", "customer_id"),
        ("/search/quotes?q=a&q=b", "q"),
        ("/search/quotes?sort=value", "sort"),
    ] {
        let response = service.http.get(format!("{}{path}", service.base)).send().await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{path}"
        );
        let problem: Value = response.json().await?;
        assert_eq!(problem["status"], 400, "{path}");
        // "Invalid report parameters", "Invalid search parameters".
        let title = problem["title"].as_str().unwrap_or_default();
        assert!(
            title.starts_with("Invalid ") && title.ends_with(" parameters"),
            "{path}: {problem}"
        );
        let errors = problem["errors"].as_array().ok_or("errors")?;
        assert!(
            errors
                .iter()
                .any(|e| e["parameter"] == parameter && e["detail"].is_string()),
            "{path}: {problem}"
        );
    }
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_and_duplicated_delivery_gives_the_same_figures() -> TestResult {
    let service = start().await?;
    let (_, events) = history(2, 30);
    let expected = expected(&events);
    // Every event at least once, a third of them twice, a tenth again under a new message
    // id (as an outbox relay may re-publish), each topic's records in random order.
    let mut delivered = events.clone();
    delivered.extend(events.iter().step_by(3).cloned());
    delivered.extend(events.iter().step_by(10).map(|(source, e)| {
        let mut again = e.clone();
        again.id = Uuid::now_v7().to_string();
        (*source, again)
    }));
    delivered.shuffle(&mut StdRng::seed_from_u64(7));
    service.publish(&delivered).await?;
    service.converges(&expected).await?;
    service.stop().await
}

/// What a reader polling the reports saw during the rebuild.
#[derive(Debug, Default)]
struct Watch {
    reads: u64,
    unavailable: u64,
    drops: u64,
    versions: BTreeSet<u32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_during_live_events_switches_to_the_same_figures_without_a_gap() -> TestResult {
    let service = Arc::new(start().await?);
    let (mut world, mut events) = history(3, 20);
    service.publish(&events).await?;
    service.converges(&expected(&events)).await?;
    // The tables no report reads (the lines fact) may still be building.
    dbps_testkit::eventually("every table to serve version 1", || async {
        let serving = service.app.warehouse().serving_versions().await?;
        Ok::<_, sqlx::Error>(serving.values().all(|v| *v == Some(1)))
    })
    .await?;

    // A reader polls the reports through the rebuild and the switch: the quotes counted
    // never go down, and the report is always there.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (service, watching) = (Arc::clone(&service), Arc::clone(&watching));
        async move {
            let mut watch = Watch::default();
            let mut last = 0;
            while watching.load(Ordering::SeqCst) {
                let Some(conversion) = service.report::<Conversion>("/reports/conversion").await? else {
                    watch.unavailable += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                watch.reads += 1;
                if conversion.created < last {
                    watch.drops += 1;
                }
                last = conversion.created;
                watch
                    .versions
                    .extend(conversion.freshness.sources.iter().filter_map(|s| s.version));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, BoxError>(watch)
        }
    });

    // Live events go on: new quotes, a few at a time.
    let live: Vec<Vec<(Source, Envelope)>> = (0..15).map(|_| world.quotes(2)).collect();
    events.extend(live.iter().flatten().cloned());
    let writer = tokio::spawn({
        let service = Arc::clone(&service);
        async move {
            for batch in live {
                service.publish(&batch).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, BoxError>(())
        }
    });

    // The batch ETL: every table rebuilt into version 2 from the topics' history.
    let progress: Arc<Mutex<Vec<(String, RebuildProgress)>>> = Arc::default();
    let warehouse = service.app.warehouse().clone().on_progress({
        let progress = Arc::clone(&progress);
        move |table, p| progress.lock().expect("progress").push((table.to_owned(), p))
    });
    assert_eq!(warehouse.next_version().await?, 2);
    let summary = warehouse
        .rebuild(&service.kafka_config, None, &CancellationToken::new())
        .await?;
    assert_eq!(summary.version, 2);
    assert!(summary.switched(), "{summary:?}");
    assert!(summary.tables.iter().all(|t| t.report.previous == Some(1)));
    assert!(summary.replayed() > 0);
    assert!(warehouse.serving_versions().await?.values().all(|v| *v == Some(2)));

    writer.await??;
    // The running service follows version 2 and keeps it current: all live events arrive.
    service.converges(&expected(&events)).await?;
    // And after the rebuild, too.
    let later = world.quotes(5);
    events.extend(later.iter().cloned());
    service.publish(&later).await?;
    service.converges(&expected(&events)).await?;

    watching.store(false, Ordering::SeqCst);
    let watch = watcher.await??;
    assert!(watch.reads > 0, "{watch:?}");
    assert_eq!(watch.drops, 0, "the quotes counted never went down: {watch:?}");
    assert_eq!(watch.unavailable, 0, "the reports were served throughout: {watch:?}");
    assert!(watch.versions.contains(&2), "{watch:?}");
    let value: PipelineValue = service.report("/reports/pipeline-value").await?.ok_or("built")?;
    assert!(value.freshness.sources.iter().all(|s| s.version == Some(2)));

    // Progress was reported for every table, and reached the end.
    let progress = progress.lock().expect("progress").clone();
    for table in TABLES {
        let last = progress
            .iter()
            .rev()
            .find(|(t, _)| t == table)
            .ok_or_else(|| format!("no progress of {table}"))?;
        assert_eq!((last.1.version, last.1.fraction()), (2, 1.0), "{table}");
    }
    // A rebuild of a version that serves does nothing.
    let again = warehouse
        .rebuild(&service.kafka_config, Some(2), &CancellationToken::new())
        .await?;
    assert!(
        again
            .tables
            .iter()
            .all(|t| !t.report.switched && t.report.replayed == 0)
    );

    let service = Arc::into_inner(service).ok_or("the service is still shared")?;
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quotes_index_searches_and_aggregates_what_the_events_say() -> TestResult {
    let search = dbps_testkit::opensearch().await?;
    let service = start_with(Some(&search)).await?;
    let (_, events) = history(4, 25);
    service.publish(&events).await?;

    // Computed from the events: per status and per customer, count and value; the
    // customer and value of each quote.
    let expected = expected(&events);
    let by_status: Vec<Bucket> = expected
        .by_status
        .0
        .iter()
        .map(|r| Bucket {
            key: r.status.clone().unwrap_or_default(),
            quotes: r.quotes,
            value_cents: r.value_cents,
        })
        .collect();
    let created = newest::<Created>(&events, Source::Quotes);
    let statuses = newest::<Status>(&events, Source::Quotes);
    let mut by_customer: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (_, Created::Created(q), _) in created.values() {
        let entry = by_customer.entry(q.customer_id.to_string()).or_default();
        *entry = (
            entry.0 + 1,
            entry.1 + q.lines.iter().map(|l| l.quantity * l.unit_price_cents).sum::<i64>(),
        );
    }
    let by_customer: BTreeSet<Bucket> = by_customer
        .into_iter()
        .map(|(key, (quotes, value_cents))| Bucket {
            key,
            quotes,
            value_cents,
        })
        .collect();
    // The index's freshness counts every record it read on the topic.
    let newest_event = events
        .iter()
        .filter(|(source, _)| *source == Source::Quotes)
        .map(|(_, e)| e.occurred_at)
        .max();

    let searched = |path: &'static str| {
        let service = &service;
        async move { service.report::<QuoteSearchResult>(path).await }
    };
    dbps_testkit::eventually("the quotes index to aggregate every quote", || async {
        let Some(all) = searched("/search/quotes?size=100").await? else {
            return Ok::<_, BoxError>(false);
        };
        Ok(all.total == 25
            && all.by_status == by_status
            && all.by_customer.iter().cloned().collect::<BTreeSet<_>>() == by_customer
            && all.freshness.newest_event_at == newest_event)
    })
    .await?;
    let all = searched("/search/quotes?size=100").await?.ok_or("built")?;
    assert_eq!(all.hits.len(), 25);
    assert_eq!(all.freshness.version, Some(1));
    assert!(all.freshness.current_at.is_some());
    for hit in &all.hits {
        let (_, Created::Created(quote), _) = &created[&hit.quote_id.to_string()];
        let status = statuses
            .get(&hit.quote_id.to_string())
            .map_or("New", |(_, Status::Changed(s), _)| s.status.as_str());
        assert_eq!((hit.customer_id, hit.status.as_str()), (quote.customer_id, status));
    }

    // Full text over the reasons: the quotes short of stock; filters combine.
    let pending = expected
        .by_status
        .0
        .iter()
        .find(|r| r.status.as_deref() == Some("Pending Stock"))
        .ok_or("pending quotes")?;
    let short = searched("/search/quotes?q=stock").await?.ok_or("built")?;
    assert_eq!(short.total, u64::try_from(pending.quotes)?);
    assert!(short.hits.iter().all(|h| h.status == "Pending Stock"));
    let customer = &all.hits[0].customer_id;
    let ordered_of_customer = statuses
        .values()
        .filter(|(_, Status::Changed(s), _)| s.status == "Ordered" && &s.customer_id == customer)
        .count();
    let path = format!("/search/quotes?status=Ordered&customer_id={customer}&size=0");
    let (status, filtered) = service.get(&path).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(filtered["total"], json!(ordered_of_customer));
    assert_eq!(filtered["hits"], json!([]));

    // The rebuild moves the index to the new version with the tables, same results.
    service.converges(&expected).await?;
    dbps_testkit::eventually("every table to serve version 1", || async {
        let serving = service.app.warehouse().serving_versions().await?;
        Ok::<_, sqlx::Error>(serving.values().all(|v| *v == Some(1)))
    })
    .await?;
    let summary = service
        .app
        .warehouse()
        .rebuild(&service.kafka_config, None, &CancellationToken::new())
        .await?;
    assert!(summary.switched(), "{summary:?}");
    assert!(
        summary
            .tables
            .iter()
            .any(|t| t.table == SEARCH_INDEX && t.report.previous == Some(1))
    );
    let rebuilt = searched("/search/quotes?size=100").await?.ok_or("built")?;
    assert_eq!(rebuilt.freshness.version, Some(2));
    assert_eq!((rebuilt.total, &rebuilt.by_status), (25, &by_status));
    service.stop().await
}

#[test]
fn the_quote_events_are_the_contract_s() {
    // The warehouse follows the quote service's status events by their contract type.
    assert_eq!(QuoteStatusChanged::TYPE, "quote.QuoteStatusChanged");
    assert!(<QuoteEvent as MessageSet>::TYPES.contains(&QuoteStatusChanged::TYPE));
    assert!(<CustomerEvent as MessageSet>::TYPES.contains(&CustomerCreated::TYPE));
}
