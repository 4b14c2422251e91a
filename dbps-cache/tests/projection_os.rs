//! OpenSearch projections against the real stack: external versions under shuffled and
//! duplicated delivery, checkpoints across restarts, a blue-green rebuild into a new
//! version while live writes go on, and OpenSearch cut off and back.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use common::TestResult;
use common::owner::{Customer, CustomerChanged, CustomerDeleted, CustomerEvents};
use common::projection::{Error, ProgressLog, Watch, assert_handover, publish, scrambled};
use dbps_cache::CacheError;
use dbps_cache::projection::{DocChange, OsProjection, RunSummary, SearchModel};
use dbps_core::kafka::{KafkaConfig, KafkaPublisher};
use dbps_core::{CancellationToken, Envelope, HandlerError, Message};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Documents `{name, email_count?}`; version 2 adds `email_count`, which only the events
/// carry.
#[derive(Debug, Clone)]
struct CustomerSearch {
    name: &'static str,
    version: u32,
    topic: String,
}

impl CustomerSearch {
    fn new(name: &'static str, version: u32, topic: &str) -> Self {
        Self {
            name,
            version,
            topic: topic.to_owned(),
        }
    }
}

impl SearchModel for CustomerSearch {
    type Events = CustomerEvents;

    fn name(&self) -> &str {
        self.name
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn topics(&self) -> Vec<String> {
        vec![self.topic.clone()]
    }

    fn mappings(&self) -> Value {
        let mut properties = json!({"name": {"type": "text", "fields": {"raw": {"type": "keyword"}}}});
        if self.version >= 2 {
            properties["email_count"] = json!({"type": "integer"});
        }
        json!({"settings": {"number_of_shards": 1}, "mappings": {"dynamic": "strict", "properties": properties}})
    }

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<DocChange, HandlerError> {
        match event {
            CustomerEvents::Changed(CustomerChanged(customer)) => {
                let mut document = json!({ "name": customer.name });
                if self.version >= 2 {
                    document["email_count"] = json!(customer.emails.len());
                }
                Ok(DocChange::index(&document)?)
            }
            CustomerEvents::Deleted(_) => Ok(DocChange::Delete),
        }
    }
}

/// The owner's side, in memory: each customer's name and version, and its events.
#[derive(Debug, Default, Clone)]
struct Owner {
    customers: BTreeMap<String, (String, i64)>,
    versions: BTreeMap<String, i64>,
}

impl Owner {
    fn event<M: Message>(&mut self, id: &str, message: &M) -> Envelope {
        let version = self.versions.entry(id.to_owned()).or_default();
        *version += 1;
        let mut envelope = Envelope::event("customer", "customer", id, message).expect("valid event");
        envelope.sequence = Some(*version);
        envelope
    }

    fn upsert(&mut self, id: &str, name: &str) -> Envelope {
        let mut customer = Customer::new(name);
        customer.id = id.to_owned();
        let event = self.event(id, &CustomerChanged(customer));
        self.customers
            .insert(id.to_owned(), (name.to_owned(), event.sequence.unwrap_or(0)));
        event
    }

    fn create(&mut self, name: &str) -> Envelope {
        self.upsert(&uuid::Uuid::now_v7().to_string(), name)
    }

    fn delete(&mut self, id: &str) -> Envelope {
        self.customers.remove(id);
        self.event(id, &CustomerDeleted {})
    }

    /// Creates `count` customers and renames each `rounds` times; their events in order.
    fn history(&mut self, prefix: &str, count: usize, rounds: usize) -> Vec<Envelope> {
        let mut events: Vec<Envelope> = (0..count).map(|n| self.create(&format!("{prefix}{n}"))).collect();
        let ids: Vec<String> = events.iter().map(|e| e.aggregate_id.clone()).collect();
        for round in 0..rounds {
            for id in &ids {
                events.push(self.upsert(id, &format!("{prefix}-{round}")));
            }
        }
        events
    }
}

/// Runs `projection` in a task until `stop`.
fn running<M: SearchModel>(
    projection: &OsProjection<M>,
    config: &KafkaConfig,
    stop: &CancellationToken,
) -> JoinHandle<Result<RunSummary, CacheError>> {
    let (projection, config, stop) = (projection.clone(), config.clone(), stop.clone());
    tokio::spawn(async move { projection.run(&config, stop).await })
}

/// The prefix of a test's projections: inside the testkit's namespace, so its indices
/// are deleted with the test.
fn prefix(search: &dbps_testkit::TestOpenSearch) -> String {
    format!("{}-", search.prefix())
}

/// `id → (name, version)` searched through `alias` (refreshed first); `None` while the
/// alias does not exist.
async fn documents(
    search: &dbps_testkit::TestOpenSearch,
    alias: &str,
) -> Result<Option<BTreeMap<String, (String, i64)>>, Error> {
    let url = search.url();
    let refreshed = search.client().post(format!("{url}/{alias}/_refresh")).send().await?;
    if refreshed.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let reply: Value = search
        .client()
        .post(format!("{url}/{alias}/_search"))
        .json(&json!({"size": 10_000, "version": true, "query": {"match_all": {}}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let hits = reply["hits"]["hits"].as_array().cloned().unwrap_or_default();
    Ok(Some(
        hits.iter()
            .map(|hit| {
                let id = hit["_id"].as_str().unwrap_or_default().to_owned();
                let name = hit["_source"]["name"].as_str().unwrap_or_default().to_owned();
                (id, (name, hit["_version"].as_i64().unwrap_or(0)))
            })
            .collect(),
    ))
}

/// Waits until `alias` holds exactly the owner's customers.
async fn converged(search: &dbps_testkit::TestOpenSearch, alias: &str, owner: &Owner) -> Result<(), Error> {
    dbps_testkit::eventually(&format!("{alias} to hold the owner's customers"), || async {
        Ok::<_, Error>(documents(search, alias).await?.as_ref() == Some(&owner.customers))
    })
    .await?;
    Ok(())
}

/// Counter values by name and `projection` label.
type Tally = Arc<Mutex<BTreeMap<(String, String), u64>>>;

/// Counters recorded by this test binary.
static COUNTERS: OnceLock<Tally> = OnceLock::new();

fn counters() -> Tally {
    Arc::clone(COUNTERS.get_or_init(|| {
        let counters: Tally = Arc::default();
        let _ = metrics::set_global_recorder(Counters(Arc::clone(&counters)));
        counters
    }))
}

fn counter(name: &str, projection: &str) -> u64 {
    counters()
        .lock()
        .expect("counters")
        .get(&(name.to_owned(), projection.to_owned()))
        .copied()
        .unwrap_or(0)
}

/// A recorder that keeps counters only.
struct Counters(Tally);

struct Count {
    key: (String, String),
    counters: Tally,
}

impl metrics::CounterFn for Count {
    fn increment(&self, value: u64) {
        *self
            .counters
            .lock()
            .expect("counters")
            .entry(self.key.clone())
            .or_default() += value;
    }

    fn absolute(&self, value: u64) {
        self.counters.lock().expect("counters").insert(self.key.clone(), value);
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let projection = key
            .labels()
            .find(|l| l.key() == "projection")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        metrics::Counter::from_arc(Arc::new(Count {
            key: (key.name().to_owned(), projection),
            counters: Arc::clone(&self.0),
        }))
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A unique projection name (the metrics' labels are shared by the whole binary).
fn unique(stem: &str) -> &'static str {
    Box::leak(format!("{stem}{:08x}", rand::random::<u32>()).into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_and_duplicated_events_give_the_in_order_result() -> TestResult {
    counters();
    let (search, kafka) = (dbps_testkit::opensearch().await?, dbps_testkit::kafka().await?);
    let mut owner = Owner::default();
    let mut events = owner.history("s", 30, 8);
    // Some customers are deleted; a late rename after a delete must not bring one back.
    for event in events.iter().take(5).cloned().collect::<Vec<_>>() {
        events.push(owner.delete(&event.aggregate_id));
    }
    let in_order = kafka.create_topic("in-order", 2).await?;
    let shuffled = kafka.create_topic("shuffled", 2).await?;
    publish(&kafka, &in_order, &events).await?;
    let delivered = scrambled(&events);
    publish(&kafka, &shuffled, &delivered).await?;

    let config = KafkaConfig::new(kafka.brokers());
    let stop = CancellationToken::new();
    let (once_name, shuffled_name) = (unique("once"), unique("shuffled"));
    let mut runs = Vec::new();
    let mut aliases = Vec::new();
    for (name, topic) in [(once_name, &in_order), (shuffled_name, &shuffled)] {
        let model = CustomerSearch::new(name, 1, topic);
        let projection = OsProjection::builder(search.url(), model)
            .index_prefix(prefix(&search))
            .max_batch(16)
            .build()?;
        aliases.push(projection.alias().to_owned());
        runs.push(running(&projection, &config, &stop));
    }
    converged(&search, &aliases[0], &owner).await?;
    converged(&search, &aliases[1], &owner).await?;
    stop.cancel();
    for run in runs {
        run.await??;
    }
    let once = documents(&search, &aliases[0]).await?;
    assert_eq!(once.as_ref().map(BTreeMap::len), Some(25));
    assert_eq!(once, documents(&search, &aliases[1]).await?);
    // The duplicates and the late events were refused by their versions, not applied.
    let stale = counter("dbps_projection_stale_total", &format!("{shuffled_name}_v1"));
    assert!(
        stale >= (delivered.len() - events.len()) as u64,
        "every duplicate counts as stale: {stale}"
    );
    assert_eq!(
        counter("dbps_projection_stale_total", &format!("{once_name}_v1")),
        0,
        "in order, nothing is stale"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_projection_resumes_from_its_checkpoint() -> TestResult {
    let (search, kafka) = (dbps_testkit::opensearch().await?, dbps_testkit::kafka().await?);
    let topic = kafka.create_topic("events", 1).await?;
    let mut owner = Owner::default();
    let first = owner.history("r", 20, 4);
    publish(&kafka, &topic, &first).await?;
    let config = KafkaConfig::new(kafka.brokers());
    let model = CustomerSearch::new("list", 1, &topic);
    let build = || {
        OsProjection::builder(search.url(), model.clone())
            .index_prefix(prefix(&search))
            .build()
    };
    let projection = build()?;
    let summary = run_to_end(&search, &projection, &config, &owner, &topic, 100).await?;
    assert_eq!(summary.records, 100);
    let status = projection.status().await?;
    assert_eq!(status.serving_version, Some(1));
    assert_eq!(status.checkpoints, BTreeMap::from([((topic.clone(), 0), 100)]));
    // Source times travel with microseconds.
    let newest = first.iter().map(|e| e.occurred_at.timestamp_micros()).max();
    assert_eq!(
        status.freshness.applied_until.map(|t| t.timestamp_micros()),
        newest,
        "the newest source time applied"
    );
    let freshness = projection.freshness().await?;
    assert_eq!(freshness.version, Some(1));
    assert!(freshness.current_at.is_some() && freshness.lag().is_some());

    // While it is down, more events arrive; a new instance takes up where it stopped.
    let ids: Vec<String> = first.iter().take(20).map(|e| e.aggregate_id.clone()).collect();
    let more: Vec<Envelope> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| owner.upsert(id, &format!("later-{n}")))
        .collect();
    publish(&kafka, &topic, &more).await?;
    let projection = build()?;
    let summary = run_to_end(&search, &projection, &config, &owner, &topic, 120).await?;
    assert_eq!(
        summary.records, 20,
        "only the records after the checkpoint are read again"
    );
    Ok(())
}

/// Runs `projection` until its alias holds the owner's customers and its checkpoint of
/// `topic` (one partition) is `end`, then stops it; its summary.
async fn run_to_end(
    search: &dbps_testkit::TestOpenSearch,
    projection: &OsProjection<CustomerSearch>,
    config: &KafkaConfig,
    owner: &Owner,
    topic: &str,
    end: i64,
) -> Result<RunSummary, Error> {
    let stop = CancellationToken::new();
    let run = running(projection, config, &stop);
    converged(search, projection.alias(), owner).await?;
    let partition = (topic.to_owned(), 0);
    dbps_testkit::eventually("the checkpoint to reach the end", || async {
        Ok::<_, CacheError>(projection.checkpoints().await?.get(&partition) == Some(&end))
    })
    .await?;
    stop.cancel();
    Ok(run.await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_into_v2_during_live_writes_switches_the_alias_atomically() -> TestResult {
    let (search, kafka) = (dbps_testkit::opensearch().await?, dbps_testkit::kafka().await?);
    let topic = kafka.create_topic("events", 2).await?;
    let mut owner = Owner::default();
    let past = owner.history("p", 60, 10);
    publish(&kafka, &topic, &past).await?;
    let config = KafkaConfig::new(kafka.brokers());
    let model = |version| CustomerSearch::new("customers", version, &topic);
    let v1 = OsProjection::builder(search.url(), model(1))
        .index_prefix(prefix(&search))
        .max_batch(32)
        .build()?;
    let alias = v1.alias().to_owned();
    let stop = CancellationToken::new();
    let v1_run = running(&v1, &config, &stop);
    converged(&search, &alias, &owner).await?;
    assert_eq!(v1.serving_version().await?, Some(1));

    // A reader polls the alias's count and every document's version through the rebuild
    // and the switch.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (client, url, alias, watching) = (
            search.client().clone(),
            search.url().to_owned(),
            alias.clone(),
            Arc::clone(&watching),
        );
        async move {
            let mut watch = Watch::default();
            while watching.load(Ordering::SeqCst) {
                let count: Value = client.get(format!("{url}/{alias}/_count")).send().await?.json().await?;
                watch.read(count["count"].as_u64().unwrap_or(0));
                let reply: Value = client
                    .post(format!("{url}/{alias}/_search"))
                    .json(&json!({"size": 10_000, "version": true}))
                    .send()
                    .await?
                    .json()
                    .await?;
                for hit in reply["hits"]["hits"].as_array().cloned().unwrap_or_default() {
                    let id = hit["_id"].as_str().unwrap_or_default().to_owned();
                    watch.version(id, hit["_version"].as_i64().unwrap_or(0));
                    watch.saw_v2 |= hit["_source"].get("email_count").is_some();
                }
            }
            Ok::<_, reqwest::Error>(watch)
        }
    });

    // Live writes go on: new customers and renames, published as they happen.
    let ids: Vec<String> = past.iter().take(60).map(|e| e.aggregate_id.clone()).collect();
    let writer = tokio::spawn({
        let (mut owner, topic) = (owner.clone(), topic.clone());
        let publisher = KafkaPublisher::builder(KafkaConfig::new(kafka.brokers())).build()?;
        async move {
            for round in 0..40 {
                let mut events = vec![owner.create(&format!("live{round}"))];
                for id in ids.iter().skip(round % 3).step_by(3) {
                    events.push(owner.upsert(id, &format!("live-{round}")));
                }
                for event in &events {
                    publisher.publish(&topic, event).await?;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Ok::<_, Error>(owner)
        }
    });

    let progress = ProgressLog::default();
    let v2 = OsProjection::builder(search.url(), model(2))
        .index_prefix(prefix(&search))
        .max_batch(32)
        .on_progress(progress.recorder())
        .build()?;
    let v2_run = running(&v2, &config, &stop);

    // The old version notices that it is superseded and stops on its own.
    let v1_summary = v1_run.await??;
    assert_eq!(v1_summary.superseded_by, Some(2));
    assert_eq!(v2.serving_version().await?, Some(2));
    let owner = writer.await??;
    // After the switch, the live writes reach the alias through v2.
    converged(&search, &alias, &owner).await?;
    watching.store(false, Ordering::SeqCst);
    let watch = watcher.await??;
    stop.cancel();
    let v2_summary = v2_run.await??;
    assert_eq!(v2_summary.superseded_by, None);

    assert!(watch.reads > 0);
    assert_eq!(watch.count_drops, 0, "the alias never lost documents: {watch:?}");
    assert_eq!(watch.regressions, 0, "no document went back in time: {watch:?}");
    assert!(watch.saw_v2, "the alias serves v2's field");
    assert_eq!(owner.customers.len(), 100);
    assert_handover(&v1.checkpoints().await?, &v2.checkpoints().await?, &progress, 660);
    Ok(())
}

/// A TCP forwarder to OpenSearch that can be cut: while cut, it closes the connections it
/// carries and every new one at once.
struct Forwarder {
    url: String,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<JoinSet<()>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: &str) -> Result<Self, Error> {
        let target = target.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<JoinSet<()>>> = Arc::default();
        let acceptor = tokio::spawn({
            let (up, connections) = (Arc::clone(&up), Arc::clone(&connections));
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let target = target.clone();
                    connections.lock().expect("connections").spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        });
        Ok(Self {
            url,
            up,
            connections,
            acceptor,
        })
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.connections.lock().expect("connections").abort_all();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.connections.lock().expect("connections").abort_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opensearch_down_and_back_loses_nothing() -> TestResult {
    let (search, kafka) = (dbps_testkit::opensearch().await?, dbps_testkit::kafka().await?);
    let topic = kafka.create_topic("events", 2).await?;
    let mut owner = Owner::default();
    let first = owner.history("d", 20, 2);
    publish(&kafka, &topic, &first).await?;
    let forwarder = Forwarder::start(search.url()).await?;
    let model = CustomerSearch::new("outage", 1, &topic);
    let projection = OsProjection::builder(forwarder.url.clone(), model.clone())
        .index_prefix(prefix(&search))
        .timeout(std::time::Duration::from_secs(2))
        .max_batch(8)
        .build()?;
    // Reads the same checkpoints directly, past the forwarder.
    let direct = OsProjection::builder(search.url(), model)
        .index_prefix(prefix(&search))
        .build()?;
    let config = KafkaConfig::new(kafka.brokers());
    let stop = CancellationToken::new();
    let run = running(&projection, &config, &stop);
    converged(&search, projection.alias(), &owner).await?;
    let before: i64 = direct.checkpoints().await?.values().sum();
    assert_eq!(before, 60);

    // OpenSearch goes away while events are published.
    forwarder.cut();
    let ids: Vec<String> = first.iter().take(20).map(|e| e.aggregate_id.clone()).collect();
    let mut during: Vec<Envelope> = ids.iter().map(|id| owner.upsert(id, "during outage")).collect();
    during.extend((0..10).map(|n| owner.create(&format!("new{n}"))));
    during.push(owner.delete(&ids[0]));
    publish(&kafka, &topic, &during).await?;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(
        !run.is_finished(),
        "the projection waits for OpenSearch, it does not fail"
    );
    let stuck: i64 = direct.checkpoints().await?.values().sum();
    assert_eq!(stuck, 60, "nothing is checkpointed while OpenSearch is away");

    // Back: the projection resumes from its checkpoint and ends complete.
    forwarder.restore();
    converged(&search, projection.alias(), &owner).await?;
    dbps_testkit::eventually("the checkpoints to reach the end", || async {
        Ok::<_, CacheError>(direct.checkpoints().await?.values().sum::<i64>() == 60 + during.len() as i64)
    })
    .await?;
    stop.cancel();
    let summary = run.await??;
    assert_eq!(
        summary.records,
        (first.len() + during.len()) as u64,
        "every record read once"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_declarations_are_typed_errors() {
    let model = CustomerSearch::new;
    let setting = |result: Result<OsProjection<CustomerSearch>, CacheError>| match result {
        Err(CacheError::InvalidConfig { setting, .. }) => setting,
        other => panic!("expected a configuration error, got {other:?}"),
    };
    let url = "http://127.0.0.1:29200";
    assert_eq!(
        setting(OsProjection::builder(url, model("Customers", 1, "t")).build()),
        "projection name"
    );
    assert_eq!(
        setting(OsProjection::builder(url, model("a/b", 1, "t")).build()),
        "projection name"
    );
    assert_eq!(
        setting(OsProjection::builder(url, model("x", 0, "t")).build()),
        "projection version"
    );
    assert_eq!(
        setting(OsProjection::builder(url, model("x", 1, "")).build()),
        "projection topics"
    );
    assert_eq!(
        setting(
            OsProjection::builder(url, model("x", 1, "t"))
                .index_prefix("_hidden")
                .build()
        ),
        "index prefix"
    );
    assert_eq!(
        setting(OsProjection::builder(url, model("x", 1, "t")).max_batch(0).build()),
        "max_batch"
    );
    assert_eq!(
        setting(OsProjection::builder("127.0.0.1:29200", model("x", 1, "t")).build()),
        "opensearch url"
    );

    /// Mappings that are not an index body.
    struct Broken;
    impl SearchModel for Broken {
        type Events = CustomerEvents;
        fn name(&self) -> &str {
            "broken"
        }
        fn version(&self) -> u32 {
            1
        }
        fn topics(&self) -> Vec<String> {
            vec![String::from("t")]
        }
        fn mappings(&self) -> Value {
            json!(["not", "an", "object"])
        }
        fn project(&self, _: CustomerEvents, _: &Envelope) -> Result<DocChange, HandlerError> {
            Ok(DocChange::Skip)
        }
    }
    assert!(matches!(
        OsProjection::builder(url, Broken).build(),
        Err(CacheError::InvalidConfig {
            setting: "search mappings",
            ..
        })
    ));
    assert!(matches!(
        DocChange::index(&"a string"),
        Err(CacheError::InvalidConfig {
            setting: "search document",
            ..
        })
    ));

    let projection = OsProjection::builder(url, model("orders", 3, "t"))
        .index_prefix("crm-")
        .build()
        .expect("valid");
    assert_eq!(
        (
            projection.index(),
            projection.alias(),
            projection.checkpoint_index(),
            projection.version()
        ),
        ("crm-orders_v3", "crm-orders", "crm-dbps_projection_checkpoints", 3)
    );
}
