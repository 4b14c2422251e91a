//! The consumer runner: at-least-once handling, ordered per partition, concurrent across
//! partitions, with retries and a dead-letter topic.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::classify::Classify as _;
use tracing::Instrument;

use super::{KafkaConfig, KafkaPublisher};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::handler::BatchHandler;
use crate::wire;

/// How transient failures are retried: exponential backoff with jitter, bounded.
///
/// When the attempts run out, the message goes to the dead-letter topic with the last
/// error, so that one broken message does not stop its partition forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Longest delay between two attempts.
    pub max_delay: Duration,
    /// Retries after the first attempt.
    pub max_retries: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            max_retries: 8,
        }
    }
}

impl RetryPolicy {
    /// Up to `max_retries` retries, the first after `initial_delay`, each delay doubling
    /// (with jitter) up to `max_delay`.
    pub fn new(initial_delay: Duration, max_delay: Duration, max_retries: usize) -> Result<Self> {
        if initial_delay.is_zero() || max_delay < initial_delay {
            return Err(Error::config(
                "retry policy",
                format!("delays must be positive with max_delay ({max_delay:?}) >= initial_delay ({initial_delay:?})"),
            ));
        }
        Ok(Self {
            initial_delay,
            max_delay,
            max_retries,
        })
    }

    /// The same delays, retried for ever.
    fn unbounded(self) -> Self {
        Self {
            max_retries: usize::MAX,
            ..self
        }
    }

    pub(crate) fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
            .with_jitter()
            .build()
    }
}

/// How often, at most, a consumer logs the errors its client reports while polling (an
/// unreachable broker is reported on every poll, 20 times a second).
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Lets a repeating log line through at most once per interval, and counts the ones it
/// held back.
#[derive(Debug)]
struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(lines held back since the last one let through)` when the line at `now` may
    /// be logged, `None` when it is held back.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// Names of the headers a dead-lettered record carries besides its original headers.
pub mod dead_letter_header {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "dbps-dlq-reason";
    /// The topic it was read from.
    pub const TOPIC: &str = "dbps-dlq-topic";
    /// The partition it was read from.
    pub const PARTITION: &str = "dbps-dlq-partition";
    /// Its offset there.
    pub const OFFSET: &str = "dbps-dlq-offset";
    /// The consumer group that gave up on it.
    pub const GROUP: &str = "dbps-dlq-group";
    /// When (RFC 3339).
    pub const FAILED_AT: &str = "dbps-dlq-failed-at";
}

/// What a runner did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Messages whose handler succeeded.
    pub handled: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
}

/// Builds a [`ConsumerRunner`].
pub struct ConsumerRunnerBuilder<H> {
    config: KafkaConfig,
    group_id: String,
    topics: Vec<String>,
    handler: H,
    dead_letter_topic: Option<String>,
    retry: RetryPolicy,
    commit_interval: Duration,
    max_queued_per_partition: usize,
    create_topics: Option<TopicFactory>,
}

/// Makes the spec of a topic to create from its name.
type TopicFactory = Arc<dyn Fn(&str) -> super::TopicSpec + Send + Sync>;

impl<H> fmt::Debug for ConsumerRunnerBuilder<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerRunnerBuilder")
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("create_topics", &self.create_topics.is_some())
            .finish_non_exhaustive()
    }
}

impl<H: BatchHandler> ConsumerRunnerBuilder<H> {
    /// Adds a topic to consume.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// The dead-letter topic (default: `<group id>.dlq`).
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// How transient failures are retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How often handled offsets are committed (default 200 ms). Offsets are also
    /// committed when partitions are revoked and when the runner stops.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How many fetched messages may wait for one partition's handler before that
    /// partition's fetching pauses (default 1,000; at least 1).
    pub fn max_queued_per_partition(mut self, max: usize) -> Self {
        self.max_queued_per_partition = max;
        self
    }

    /// Creates the consumed topics and the dead-letter topic that do not exist yet when
    /// the runner starts, each as `spec(name)` says:
    /// `.create_topics(|name| TopicSpec::new(name, 3))`.
    ///
    /// Without it, a runner whose topics or dead-letter topic are missing fails at start
    /// with [`Error::MissingTopics`], as production clusters create no topic on first use.
    pub fn create_topics(mut self, spec: impl Fn(&str) -> super::TopicSpec + Send + Sync + 'static) -> Self {
        self.create_topics = Some(Arc::new(spec));
        self
    }

    /// Checks the configuration and builds the runner.
    pub fn build(self) -> Result<ConsumerRunner<H>> {
        if self.topics.is_empty() {
            return Err(Error::config("topics", "a consumer runner needs at least one topic"));
        }
        for topic in &self.topics {
            super::validate_topic_name(topic)?;
        }
        if self.group_id.trim().is_empty() {
            return Err(Error::config("group_id", "a consumer runner needs a group id"));
        }
        if self.max_queued_per_partition == 0 {
            return Err(Error::config("max_queued_per_partition", "must be at least 1"));
        }
        if self.commit_interval.is_zero() {
            return Err(Error::config("commit_interval", "must be positive"));
        }
        for key in ["enable.auto.commit", "enable.auto.offset.store"] {
            if self.config.get(key).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
                return Err(Error::config(
                    key,
                    "true would commit offsets of messages not yet handled; the runner commits itself",
                ));
            }
        }
        let dead_letter_topic = match self.dead_letter_topic {
            Some(topic) => topic,
            None => super::TopicNaming::default().dead_letter(&self.group_id)?,
        };
        super::validate_topic_name(&dead_letter_topic)?;
        let publisher = KafkaPublisher::builder(self.config.clone()).build()?;
        Ok(ConsumerRunner {
            config: self.config,
            group_id: self.group_id,
            topics: self.topics,
            handler: Arc::new(self.handler),
            dead_letter_topic,
            publisher,
            retry: self.retry,
            commit_interval: self.commit_interval,
            max_queued_per_partition: self.max_queued_per_partition,
            create_topics: self.create_topics,
        })
    }
}

/// Runs a [`Handler`](crate::Handler), or a [`BatchHandler`] that applies what arrived
/// together in one go, for the messages of some topics under a consumer group.
///
/// - **At least once**: an offset is committed only after its message's handler
///   succeeded or the message was dead-lettered. Nothing is auto-committed.
/// - **Ordered per partition**, so per aggregate; partitions are handled concurrently,
///   each by its own task.
/// - **Retries** transient failures with exponential backoff and jitter
///   ([`RetryPolicy`]); permanent failures, exhausted retries and messages that cannot be
///   decoded go to the **dead-letter topic** with the reason, the original topic,
///   partition and offset and the original headers, and the partition moves on.
/// - **Rebalance-safe**: before a partition is revoked, its in-flight message finishes
///   and its handled offsets are committed; nothing is committed for a partition the
///   runner no longer owns.
/// - **Graceful shutdown**: when the shutdown future completes the runner stops
///   fetching, lets in-flight handlers finish, commits and leaves the group. Dropping the
///   `run` future instead stops without committing, like a crash.
///
/// Metrics (through the `metrics` facade, labelled by `group` and `topic`):
/// `dbps_consumer_messages_total{outcome=handled|dead_lettered}`,
/// `dbps_consumer_retries_total`, `dbps_consumer_failures_total`,
/// `dbps_consumer_handler_seconds`; and, labelled by `group` only,
/// `dbps_consumer_errors_total` (errors the client reports while polling, such as an
/// unreachable broker; they are logged at most once per [`ERROR_LOG_INTERVAL`], with how
/// many were not logged since).
pub struct ConsumerRunner<H> {
    config: KafkaConfig,
    group_id: String,
    topics: Vec<String>,
    handler: Arc<H>,
    dead_letter_topic: String,
    publisher: KafkaPublisher,
    retry: RetryPolicy,
    commit_interval: Duration,
    max_queued_per_partition: usize,
    create_topics: Option<TopicFactory>,
}

impl<H> fmt::Debug for ConsumerRunner<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerRunner")
            .field("config", &self.config)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<H: BatchHandler> ConsumerRunner<H> {
    /// A builder for a runner of `handler` in consumer group `group_id`.
    pub fn builder(config: KafkaConfig, group_id: impl Into<String>, handler: H) -> ConsumerRunnerBuilder<H> {
        ConsumerRunnerBuilder {
            config,
            group_id: group_id.into(),
            topics: Vec::new(),
            handler,
            dead_letter_topic: None,
            retry: RetryPolicy::default(),
            commit_interval: Duration::from_millis(200),
            max_queued_per_partition: 1000,
            create_topics: None,
        }
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> &str {
        &self.dead_letter_topic
    }

    /// Runs until `shutdown` is cancelled or the runner fails.
    ///
    /// - At start it checks that its topics and its dead-letter topic exist, creating
    ///   the missing ones if the builder was asked to ([`ConsumerRunnerBuilder::create_topics`]),
    ///   and fails with [`Error::MissingTopics`] otherwise. A broker that cannot be reached
    ///   yet is waited for, with backoff.
    /// - On shutdown it stops fetching, lets each partition finish the message in flight,
    ///   commits what was handled, leaves the group and returns the summary.
    /// - Transient trouble (an unreachable broker, a handler's transient failure) is
    ///   retried and counted; a permanent error (refused authorisation, invalid
    ///   configuration) stops the runner with `Err` at once.
    /// - A panic in a handler stops the runner like a shutdown (the panicking message is
    ///   not committed) and is then resumed on the caller's task: it is reported as a
    ///   panic, never as a clean stop.
    /// - Dropping the returned future stops the runner without a final commit, like a
    ///   crash: the next owner of each partition handles its uncommitted messages again.
    pub async fn run(self, shutdown: CancellationToken) -> Result<RunSummary> {
        let mut delays = self.retry.unbounded().delays();
        loop {
            let prepared = tokio::select! {
                () = shutdown.cancelled() => return Ok(RunSummary::default()),
                prepared = self.prepare_topics() => prepared,
            };
            match prepared {
                Ok(()) => break,
                Err(error) if error.is_transient() => {
                    let delay = delays.next().unwrap_or(self.retry.max_delay);
                    tracing::warn!(group = %self.group_id, %error, ?delay, "consumer runner cannot check its topics yet; retrying");
                    metrics::counter!("dbps_consumer_errors_total", "group" => self.group_id.clone()).increment(1);
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(RunSummary::default()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
        let shared = Arc::new(Shared {
            group_id: self.group_id.clone(),
            stop: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            partitions: Mutex::new(HashMap::new()),
            handled: std::sync::atomic::AtomicU64::new(0),
            dead_lettered: std::sync::atomic::AtomicU64::new(0),
            panic: Mutex::new(None),
        });
        let context = RunnerContext {
            shared: Arc::clone(&shared),
            auth: super::AuthMemory::default(),
        };
        let consumer: BaseConsumer<RunnerContext> = self
            .config
            // A request that gets no answer in 30 s (a half-open connection) gives its
            // connection up (librdkafka's default waits 60 s).
            .client_config(&[("auto.offset.reset", "earliest"), ("socket.timeout.ms", "30000")])
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create_with_context(context)
            .map_err(|source| super::creation_error("create consumer", source))?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|source| Error::Kafka {
            operation: format!("subscribe to {topics:?}"),
            source,
        })?;

        let worker = Worker {
            shared: Arc::clone(&shared),
            handler: Arc::clone(&self.handler),
            publisher: self.publisher.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            retry: self.retry,
        };
        let poll = PollLoop {
            consumer,
            worker,
            runtime: tokio::runtime::Handle::current(),
            commit_interval: self.commit_interval,
            max_queued: self.max_queued_per_partition,
            config: self.config.clone(),
            topics: self.topics.clone(),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("dbps-consumer-{}", self.group_id))
            .spawn(move || {
                let _ = done_tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll.run())));
            })
            .map_err(|source| Error::Spawn {
                what: "consumer poll",
                source,
            })?;

        // Dropping this future (a crash, in effect) stops the poll thread without a final
        // commit: the guard's drop raises `abort`.
        let mut guard = AbortOnDrop(Some(Arc::clone(&shared)));
        tokio::pin!(done_rx);
        let result = tokio::select! {
            result = &mut done_rx => result,
            () = shutdown.cancelled() => {
                shared.stop.store(true, Ordering::SeqCst);
                done_rx.await
            }
        };
        // The run ended by itself or by the shutdown: nothing to abort.
        guard.0 = None;
        // The thread always sends before it ends, panic or not.
        let polled = result.map_err(|_| Error::ShutDown)?;
        if let Some(payload) = shared.take_panic() {
            std::panic::resume_unwind(payload);
        }
        match polled {
            Ok(result) => result?,
            Err(payload) => std::panic::resume_unwind(payload),
        }
        Ok(RunSummary {
            handled: shared.handled.load(Ordering::Relaxed),
            dead_lettered: shared.dead_lettered.load(Ordering::Relaxed),
        })
    }

    /// Checks that the topics and the dead-letter topic exist, creating the missing ones
    /// when asked to.
    async fn prepare_topics(&self) -> Result<()> {
        let mut names = self.topics.clone();
        names.push(self.dead_letter_topic.clone());
        let missing = super::missing_topics(&self.config, &names).await?;
        if missing.is_empty() {
            return Ok(());
        }
        let Some(spec) = &self.create_topics else {
            return Err(Error::MissingTopics { topics: missing });
        };
        let specs: Vec<super::TopicSpec> = missing.iter().map(|name| spec(name)).collect();
        if let Some(other) = specs.iter().zip(&missing).find(|(spec, name)| spec.name != **name) {
            return Err(Error::config(
                "create_topics",
                format!("asked for topic {}, the spec names {}", other.1, other.0.name),
            ));
        }
        super::ensure_topics(&self.config, &specs).await?;
        tracing::info!(group = %self.group_id, topics = ?missing, "consumer runner created its missing topics");
        Ok(())
    }
}

struct AbortOnDrop(Option<Arc<Shared>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared.abort.store(true, Ordering::SeqCst);
            shared.stop.store(true, Ordering::SeqCst);
        }
    }
}

type PartitionKey = (String, i32);

/// State shared by the poll thread, the rebalance callbacks and the partition tasks.
struct Shared {
    group_id: String,
    /// Stop fetching and end the run.
    stop: AtomicBool,
    /// The run future was dropped: stop without committing anything more.
    abort: AtomicBool,
    partitions: Mutex<HashMap<PartitionKey, Arc<PartitionState>>>,
    handled: std::sync::atomic::AtomicU64,
    dead_lettered: std::sync::atomic::AtomicU64,
    /// The payload of a handler's panic, resumed by `run` once the poll thread stopped.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// One owned partition: its task's queue and what it has finished.
struct PartitionState {
    sender: Mutex<Option<mpsc::UnboundedSender<OwnedMessage>>>,
    queued: AtomicUsize,
    paused: AtomicBool,
    /// Set when the partition is revoked or the runner stops: the task finishes its
    /// in-flight message and drops the rest (they are fetched again by the next owner).
    revoked: AtomicBool,
    /// Offset to commit next (`last handled + 1`) and whether it was committed.
    progress: Mutex<Progress>,
    finished: (Mutex<bool>, Condvar),
}

#[derive(Default)]
struct Progress {
    next_offset: Option<i64>,
    committed: bool,
}

impl PartitionState {
    fn wait_finished(&self) {
        let (lock, condvar) = &self.finished;
        let mut finished = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while !*finished {
            finished = condvar
                .wait(finished)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn mark_finished(&self) {
        let (lock, condvar) = &self.finished;
        *lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        condvar.notify_all();
    }
}

impl Shared {
    /// Keeps the first panic of a partition task and stops the runner.
    fn record_panic(&self, payload: Box<dyn std::any::Any + Send>) {
        self.panic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(payload);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn take_panic(&self) -> Option<Box<dyn std::any::Any + Send>> {
        self.panic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Stops the tasks of `keys` (all partitions when `None`), waits until each has
    /// finished its in-flight message, and returns their states.
    fn stop_partitions(&self, keys: Option<&[PartitionKey]>) -> Vec<(PartitionKey, Arc<PartitionState>)> {
        let stopped: Vec<_> = {
            let mut partitions = self
                .partitions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match keys {
                Some(keys) => keys.iter().filter_map(|k| partitions.remove_entry(k)).collect(),
                None => partitions.drain().collect(),
            }
        };
        for (_, state) in &stopped {
            state.revoked.store(true, Ordering::SeqCst);
            // Closing the channel wakes a task that waits for its next message.
            drop(
                state
                    .sender
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take(),
            );
        }
        for (_, state) in &stopped {
            state.wait_finished();
        }
        stopped
    }

    /// The offsets handled but not yet committed, marking them committed.
    fn uncommitted(&self, states: &[(PartitionKey, Arc<PartitionState>)]) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), state) in states {
            let mut progress = state.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let (Some(offset), false) = (progress.next_offset, progress.committed)
                && list
                    .add_partition_offset(topic, *partition, Offset::Offset(offset))
                    .is_ok()
            {
                progress.committed = true;
            }
        }
        list
    }

    fn snapshot(&self) -> Vec<(PartitionKey, Arc<PartitionState>)> {
        let partitions = self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        partitions.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }
}

struct RunnerContext {
    shared: Arc<Shared>,
    auth: super::AuthMemory,
}

impl ClientContext for RunnerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.auth.record_log(level, log_message);
        super::log_like_rdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.auth.record(&error, reason);
        tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for RunnerContext {
    /// Runs on the poll thread before partitions are taken away: their tasks finish the
    /// in-flight message, and what they handled is committed while this runner still owns
    /// the partitions.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let keys: Vec<PartitionKey> = match rebalance {
            Rebalance::Revoke(list) => list
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Rebalance::Assign(_) | Rebalance::Error(_) => return,
        };
        let stopped = self.shared.stop_partitions(Some(&keys));
        if self.shared.abort.load(Ordering::SeqCst) {
            return;
        }
        let offsets = self.shared.uncommitted(&stopped);
        if offsets.count() > 0
            && let Err(error) = consumer.commit(&offsets, CommitMode::Sync)
        {
            tracing::warn!(group = %self.shared.group_id, %error, "commit before revocation failed; the next owner may handle some messages again");
        }
        tracing::info!(group = %self.shared.group_id, partitions = keys.len(), "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(group = %self.shared.group_id, partitions = list.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(group = %self.shared.group_id, %error, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(group = %self.shared.group_id, %error, "offset commit failed; it is retried with the next one");
        }
    }
}

struct PollLoop<H> {
    consumer: BaseConsumer<RunnerContext>,
    worker: Worker<H>,
    runtime: tokio::runtime::Handle,
    commit_interval: Duration,
    max_queued: usize,
    /// For the error that stops the loop: who was refused what.
    config: KafkaConfig,
    topics: Vec<String>,
}

impl<H: BatchHandler> PollLoop<H> {
    fn run(self) -> Result<()> {
        let shared = Arc::clone(&self.worker.shared);
        let mut last_commit = Instant::now();
        let mut errors = Throttle::new(ERROR_LOG_INTERVAL);
        let mut fatal = None;
        while !shared.stop.load(Ordering::SeqCst) {
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Ok(message)) => self.dispatch(message.detach()),
                Some(Err(error)) if !error.is_transient() => {
                    // Refused authorisation or invalid configuration: polling again cannot
                    // help. Stop as on shutdown, committing what was handled.
                    tracing::error!(group = %shared.group_id, %error, "consumer stopped by a permanent error");
                    fatal = Some(error);
                    break;
                }
                Some(Err(error)) => {
                    // librdkafka reports broker trouble here, on every poll while it lasts,
                    // and recovers by itself.
                    metrics::counter!("dbps_consumer_errors_total", "group" => shared.group_id.clone()).increment(1);
                    if let Some(held_back) = errors.admit(Instant::now()) {
                        tracing::warn!(group = %shared.group_id, %error, held_back, "consumer error");
                    }
                }
                None => {}
            }
            self.resume_drained();
            if last_commit.elapsed() >= self.commit_interval {
                self.commit(CommitMode::Async);
                last_commit = Instant::now();
            }
        }
        let stopped = shared.stop_partitions(None);
        if !shared.abort.load(Ordering::SeqCst) {
            let offsets = shared.uncommitted(&stopped);
            if offsets.count() > 0 {
                self.consumer
                    .commit(&offsets, CommitMode::Sync)
                    .map_err(|source| Error::Kafka {
                        operation: String::from("final commit"),
                        source,
                    })?;
            }
        }
        self.consumer.unsubscribe();
        match fatal {
            Some(source) => Err(super::kafka_error(
                &self.config,
                Some(&self.consumer.context().auth),
                format!("consume {:?} in group {}", self.topics, shared.group_id),
                source,
            )),
            None => Ok(()),
        }
    }

    fn dispatch(&self, message: OwnedMessage) {
        let key = (message.topic().to_owned(), message.partition());
        let state = {
            let mut partitions = self
                .worker
                .shared
                .partitions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(
                partitions
                    .entry(key.clone())
                    .or_insert_with(|| self.spawn_partition(&key)),
            )
        };
        let queued = state.queued.fetch_add(1, Ordering::SeqCst) + 1;
        let sent = state
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|sender| sender.send(message).is_ok());
        if !sent {
            // Only possible while the partition is being revoked; the next owner reads it.
            state.queued.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        if queued >= self.max_queued && !state.paused.swap(true, Ordering::SeqCst) {
            self.set_paused(&key, true);
        }
    }

    fn spawn_partition(&self, (topic, partition): &PartitionKey) -> Arc<PartitionState> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let state = Arc::new(PartitionState {
            sender: Mutex::new(Some(sender)),
            queued: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
            finished: (Mutex::new(false), Condvar::new()),
        });
        let worker = self.worker.clone();
        let task_state = Arc::clone(&state);
        let span = tracing::info_span!("dbps.partition", group = %worker.shared.group_id, topic = %topic, partition);
        self.runtime.spawn(
            async move {
                let shared = Arc::clone(&worker.shared);
                let finished = Arc::clone(&task_state);
                let run = std::panic::AssertUnwindSafe(worker.run_partition(task_state, receiver));
                if let Err(payload) = futures::FutureExt::catch_unwind(run).await {
                    // The message in flight stays uncommitted; the runner stops and `run`
                    // resumes the panic.
                    shared.record_panic(payload);
                    finished.mark_finished();
                }
            }
            .instrument(span),
        );
        state
    }

    fn resume_drained(&self) {
        for ((topic, partition), state) in self.worker.shared.snapshot() {
            if state.paused.load(Ordering::SeqCst) && state.queued.load(Ordering::SeqCst) <= self.max_queued / 2 {
                state.paused.store(false, Ordering::SeqCst);
                self.set_paused(&(topic, partition), false);
            }
        }
    }

    fn set_paused(&self, (topic, partition): &PartitionKey, paused: bool) {
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, *partition);
        let result = if paused {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        if let Err(error) = result {
            tracing::warn!(%topic, partition, paused, %error, "could not change the fetch state of a partition");
        }
    }

    fn commit(&self, mode: CommitMode) {
        let offsets = self.worker.shared.uncommitted(&self.worker.shared.snapshot());
        if offsets.count() > 0
            && let Err(error) = self.consumer.commit(&offsets, mode)
        {
            tracing::warn!(group = %self.worker.shared.group_id, %error, "offset commit failed");
            // Mark them uncommitted again so that the next round retries.
            for element in offsets.elements() {
                let key = (element.topic().to_owned(), element.partition());
                let partitions = self
                    .worker
                    .shared
                    .partitions
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(state) = partitions.get(&key) {
                    state
                        .progress
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .committed = false;
                }
            }
        }
    }
}

/// What a partition task needs; cloned once per partition.
struct Worker<H> {
    shared: Arc<Shared>,
    handler: Arc<H>,
    publisher: KafkaPublisher,
    dead_letter_topic: String,
    retry: RetryPolicy,
}

impl<H> Clone for Worker<H> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            handler: Arc::clone(&self.handler),
            publisher: self.publisher.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            retry: self.retry,
        }
    }
}

/// How handling one message ended.
enum Outcome {
    Handled,
    DeadLettered,
    /// The partition was revoked mid-way: leave the offset uncommitted.
    Abandoned,
}

impl<H: BatchHandler> Worker<H> {
    async fn run_partition(self, state: Arc<PartitionState>, mut receiver: mpsc::UnboundedReceiver<OwnedMessage>) {
        let max_batch = self.handler.max_batch().max(1);
        while let Some(first) = receiver.recv().await {
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            state.queued.fetch_sub(batch.len(), Ordering::SeqCst);
            if state.revoked.load(Ordering::SeqCst) {
                break;
            }
            let last_offset = batch.last().map_or(0, OwnedMessage::offset);
            let outcome = if let [message] = batch.as_slice() {
                self.process(&state, message).await
            } else {
                self.process_batch(&state, &batch).await
            };
            match outcome {
                Outcome::Handled | Outcome::DeadLettered => {
                    let mut progress = state.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    progress.next_offset = Some(last_offset + 1);
                    progress.committed = false;
                }
                Outcome::Abandoned => break,
            }
        }
        state.mark_finished();
    }

    /// Handles several messages of one partition with one call of the handler. Messages
    /// that cannot be decoded are dead-lettered first; a batch that fails permanently, or
    /// keeps failing, is handled again one message at a time, so that only the messages
    /// that fail on their own are dead-lettered.
    async fn process_batch(&self, state: &PartitionState, records: &[OwnedMessage]) -> Outcome {
        let topic = records[0].topic().to_owned();
        let labels = [("group", self.shared.group_id.clone()), ("topic", topic)];
        let mut envelopes = Vec::with_capacity(records.len());
        let mut decoded = Vec::with_capacity(records.len());
        for record in records {
            match decode_record(record) {
                Ok(envelope) => {
                    envelopes.push(envelope);
                    decoded.push(record);
                }
                Err(error) => {
                    let reason = format!("undecodable message: {error}");
                    if let Outcome::Abandoned = self.dead_letter(state, record, &reason).await {
                        return Outcome::Abandoned;
                    }
                }
            }
        }
        if envelopes.is_empty() {
            return Outcome::DeadLettered;
        }
        let span = tracing::info_span!(
            "dbps.consume_batch",
            messages = envelopes.len(),
            first_offset = decoded[0].offset(),
            last_offset = decoded[decoded.len() - 1].offset(),
        );
        let mut delays = self.retry.delays();
        let error = loop {
            let started = Instant::now();
            let result = self.handler.handle_batch(&envelopes).instrument(span.clone()).await;
            metrics::histogram!("dbps_consumer_handler_seconds", &labels).record(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(()) => {
                    let count = envelopes.len() as u64;
                    self.shared.handled.fetch_add(count, Ordering::Relaxed);
                    metrics::counter!("dbps_consumer_messages_total", &with_outcome(&labels, "handled"))
                        .increment(count);
                    return Outcome::Handled;
                }
                Err(error) => error,
            };
            metrics::counter!("dbps_consumer_failures_total", &labels).increment(1);
            if !error.is_transient() {
                break error;
            }
            let Some(delay) = delays.next() else {
                break error;
            };
            tracing::warn!(parent: &span, %error, ?delay, "batch handler failed, retrying");
            metrics::counter!("dbps_consumer_retries_total", &labels).increment(1);
            if !self.sleep_unless_revoked(state, delay).await {
                return Outcome::Abandoned;
            }
        };
        tracing::warn!(parent: &span, %error, "batch failed; handling its messages one at a time");
        for record in decoded {
            if let Outcome::Abandoned = self.process(state, record).await {
                return Outcome::Abandoned;
            }
        }
        Outcome::Handled
    }

    async fn process(&self, state: &PartitionState, message: &OwnedMessage) -> Outcome {
        let topic = message.topic().to_owned();
        let labels = [("group", self.shared.group_id.clone()), ("topic", topic.clone())];
        let envelope = match decode_record(message) {
            Ok(envelope) => envelope,
            Err(error) => {
                return self
                    .dead_letter(state, message, &format!("undecodable message: {error}"))
                    .await;
            }
        };
        let span = tracing::info_span!(
            "dbps.consume",
            message_type = %envelope.message_type,
            message_id = %envelope.id,
            aggregate_id = %envelope.aggregate_id,
            offset = message.offset(),
            trace_id = envelope.trace.trace_id().unwrap_or_default(),
            traceparent = envelope.trace.traceparent.as_deref().unwrap_or_default(),
        );
        #[cfg(feature = "opentelemetry")]
        if let Some(parent) = envelope.trace.otel_context() {
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            // Fails only when no OpenTelemetry layer is installed; then there is no trace
            // to continue.
            let _ = span.set_parent(parent);
        }
        let mut delays = self.retry.delays();
        loop {
            let started = Instant::now();
            let result = self
                .handler
                .handle_batch(std::slice::from_ref(&envelope))
                .instrument(span.clone())
                .await;
            metrics::histogram!("dbps_consumer_handler_seconds", &labels).record(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(()) => {
                    self.shared.handled.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("dbps_consumer_messages_total", &with_outcome(&labels, "handled")).increment(1);
                    return Outcome::Handled;
                }
                Err(error) => error,
            };
            metrics::counter!("dbps_consumer_failures_total", &labels).increment(1);
            if !error.is_transient() {
                return self.dead_letter(state, message, &error.to_string()).await;
            }
            let Some(delay) = delays.next() else {
                let reason = format!(
                    "retries exhausted after {} attempts: {error}",
                    self.retry.max_retries + 1
                );
                return self.dead_letter(state, message, &reason).await;
            };
            tracing::warn!(parent: &span, %error, ?delay, "handler failed, retrying");
            metrics::counter!("dbps_consumer_retries_total", &labels).increment(1);
            if !self.sleep_unless_revoked(state, delay).await {
                return Outcome::Abandoned;
            }
        }
    }

    /// Sends the original record to the dead-letter topic, retrying until the broker
    /// accepted it: the offset must not move past a message that is neither handled nor
    /// dead-lettered.
    async fn dead_letter(&self, state: &PartitionState, message: &OwnedMessage, reason: &str) -> Outcome {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let failed_at = Utc::now().to_rfc3339();
        for (key, value) in [
            (dead_letter_header::REASON, reason),
            (dead_letter_header::TOPIC, message.topic()),
            (dead_letter_header::PARTITION, &partition),
            (dead_letter_header::OFFSET, &offset),
            (dead_letter_header::GROUP, &self.shared.group_id),
            (dead_letter_header::FAILED_AT, &failed_at),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut delays = self.retry.unbounded().delays();
        loop {
            let sent = self
                .publisher
                .publish_raw(
                    &self.dead_letter_topic,
                    message.key(),
                    message.payload(),
                    headers.clone(),
                )
                .await;
            match sent {
                Ok(_) => {
                    self.shared.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    let labels = [
                        ("group", self.shared.group_id.clone()),
                        ("topic", message.topic().to_owned()),
                        ("outcome", String::from("dead_lettered")),
                    ];
                    metrics::counter!("dbps_consumer_messages_total", &labels).increment(1);
                    tracing::error!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        dead_letter_topic = %self.dead_letter_topic,
                        %reason,
                        "message dead-lettered"
                    );
                    return Outcome::DeadLettered;
                }
                Err(error) => {
                    let delay = delays.next().unwrap_or(self.retry.max_delay);
                    tracing::error!(%error, dead_letter_topic = %self.dead_letter_topic, "dead-lettering failed, retrying");
                    if !self.sleep_unless_revoked(state, delay).await {
                        return Outcome::Abandoned;
                    }
                }
            }
        }
    }

    /// Sleeps for `delay` in short steps; false if the partition was revoked meanwhile.
    async fn sleep_unless_revoked(&self, state: &PartitionState, delay: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            if state.revoked.load(Ordering::SeqCst) {
                return false;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return true;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(50))).await;
        }
    }
}

fn with_outcome(labels: &[(&'static str, String); 2], outcome: &str) -> [(&'static str, String); 3] {
    [labels[0].clone(), labels[1].clone(), ("outcome", outcome.to_owned())]
}

/// Decodes a record read from Kafka (CloudEvents binary mode, as dbps writes it) into an
/// envelope; the consumer runner does this for every message before the handler sees it.
pub fn decode_record(message: &OwnedMessage) -> Result<Envelope> {
    let timestamp = message
        .timestamp()
        .to_millis()
        .and_then(DateTime::<Utc>::from_timestamp_millis);
    let headers: Vec<(&str, Option<&[u8]>)> = match message.headers() {
        Some(headers) => headers.iter().map(|h| (h.key, h.value)).collect(),
        None => Vec::new(),
    };
    wire::decode(message.key(), headers, message.payload(), timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerError;

    #[test]
    fn retry_delays_grow_and_are_bounded() {
        let policy = RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(80),
            max_retries: 6,
        };
        let delays: Vec<Duration> = policy.delays().collect();
        assert_eq!(delays.len(), 6);
        // Jitter adds up to one base delay on top of each step.
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(160)), "{delays:?}");
        assert!(delays[0] >= Duration::from_millis(10));
    }

    #[test]
    fn throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut throttle = Throttle::new(Duration::from_secs(5));
        assert_eq!(throttle.admit(at(0)), Some(0));
        // A broker that stays down: one error per 50 ms poll.
        let admitted: Vec<Option<u64>> = (1..=200).map(|n| throttle.admit(at(n * 50))).collect();
        let through: Vec<(usize, u64)> = admitted
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|held| (i + 1, held)))
            .collect();
        // At 5 s and 10 s, each with the 99 polls held back since the last line.
        assert_eq!(through, vec![(100, 99), (200, 99)]);
        // After a quiet spell the next error is logged at once, with nothing held back.
        assert_eq!(throttle.admit(at(60_000)), Some(0));
    }

    #[test]
    fn handler_error_display_includes_the_cause_chain() {
        let error = HandlerError::transient(Error::config("pool", "closed"));
        assert!(error.is_transient());
        assert_eq!(
            error.to_string(),
            "transient handler failure: invalid configuration: pool: closed"
        );
        let error: HandlerError = Error::UnknownType {
            message_type: String::from("x.Y"),
        }
        .into();
        assert!(!error.is_transient());
    }
}
