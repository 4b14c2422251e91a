//! Search projections in OpenSearch indices behind an alias, read from Kafka by the
//! projection itself.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbps_core::CancellationToken;
use dbps_core::kafka::KafkaConfig;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::reader::{
    BatchEffect, Common, IDLE_CHECK, Positions, Record, Runner, advance, behind, common_builder_methods,
    rebuild_unless_serving, retrying,
};
use super::{DocChange, RebuildReport, RunSummary, SearchModel};
use crate::error::{CacheError, Result};
use crate::replica::Projected;

/// The name of the checkpoint index, after the prefix.
const CHECKPOINT_INDEX: &str = "dbps_projection_checkpoints";

/// How long a rebuild waits for the serving version's runner to pause before the switch.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// How long a handover request pauses the serving version's runner at most (a rebuild
/// that died before its switch does not stop the serving version for longer).
const HANDOVER_EXPIRY: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// How often a paused runner looks whether the switch happened.
const PAUSE_POLL: Duration = Duration::from_millis(100);

/// How often an idle runner writes that it is current.
const IDLE_HEARTBEAT: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// Builds an [`OsProjection`].
pub struct OsProjectionBuilder<M> {
    url: String,
    model: M,
    prefix: String,
    common: Common,
    gc_deletes: Duration,
    timeout: Duration,
    client: Option<reqwest::Client>,
}

impl<M> fmt::Debug for OsProjectionBuilder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OsProjectionBuilder")
            .field("prefix", &self.prefix)
            .field("max_batch", &self.common.max_batch)
            .field("gc_deletes", &self.gc_deletes)
            .finish_non_exhaustive()
    }
}

impl<M: SearchModel> OsProjectionBuilder<M> {
    /// The prefix of every index and alias name of the projection (default none), so that
    /// several services or tests share a cluster: `orders-` gives the alias
    /// `orders-<name>`, the indices `orders-<name>_v<n>` and the checkpoint index
    /// `orders-dbps_projection_checkpoints`. Lower case letters, digits, `_`, `-` and `.`,
    /// not starting with `_` or `-`.
    pub fn index_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    common_builder_methods!("`_bulk` request");

    /// How long the projection's indices remember a deleted document's version
    /// (`index.gc_deletes`, set when an index is created; default one day). An event
    /// older than a delete that arrives later than this after the delete brings the
    /// document back. Longer windows keep more tombstones in the node's memory.
    pub fn gc_deletes(mut self, window: Duration) -> Self {
        self.gc_deletes = window;
        self
    }

    /// How long one request to OpenSearch may take (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The HTTP client to use (its timeouts then apply instead of [`timeout`](Self::timeout)).
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Checks the declaration and the settings and builds the projection.
    pub fn build(self) -> Result<OsProjection<M>> {
        let name = self.model.name().to_owned();
        check_name("projection name", &name, false)?;
        check_name("index prefix", &self.prefix, true)?;
        let version = self.model.version();
        let topics = self.model.topics();
        self.common.check(version, &topics)?;
        let body = index_body(self.model.mappings(), self.gc_deletes)?;
        let url = self.url.trim_end_matches('/').to_owned();
        let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
        if host.is_none_or(str::is_empty) {
            return Err(invalid("opensearch url", "expected http://host:port"));
        }
        let client = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .timeout(self.timeout)
                .connect_timeout(self.timeout.min(Duration::from_secs(5)))
                .build()
                .map_err(|source| CacheError::OpenSearch {
                    operation: "build the client",
                    status: None,
                    kind: None,
                    source: Some(source),
                })?,
        };
        let alias = format!("{}{name}", self.prefix);
        let index = format!("{alias}_v{version}");
        if index.len() > 255 {
            return Err(invalid("projection name", "the index name is longer than 255 bytes"));
        }
        let runner = Runner::new(self.common, &name, self.model.version(), topics);
        Ok(OsProjection {
            inner: Arc::new(Inner {
                http: Http { client, url },
                model: self.model,
                version,
                checkpoints: format!("{}{CHECKPOINT_INDEX}", self.prefix),
                state_id: name.clone(),
                name,
                alias,
                index,
                body,
                runner,
            }),
        })
    }
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> CacheError {
    CacheError::InvalidConfig {
        setting,
        reason: reason.into(),
    }
}

/// Checks a part of an index name: lower case letters, digits, `_` and `-` (and `.` in
/// a prefix), not starting with `_`, `-` or `+`.
fn check_name(setting: &'static str, value: &str, prefix: bool) -> Result<()> {
    if value.is_empty() {
        return if prefix {
            Ok(())
        } else {
            Err(invalid(setting, "must not be empty"))
        };
    }
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' || (prefix && c == '.');
    if !value.chars().all(allowed) || value.starts_with(['_', '-', '+', '.']) {
        return Err(invalid(
            setting,
            format!("{value:?} is not a valid index name part (lower case letters, digits, _ and -, not first _ or -)"),
        ));
    }
    Ok(())
}

/// The model's index body with `index.gc_deletes` added (unless the model sets it).
fn index_body(mappings: Value, gc_deletes: Duration) -> Result<Value> {
    let Value::Object(mut body) = mappings else {
        return Err(invalid(
            "search mappings",
            "must be a JSON object with `settings` and/or `mappings`",
        ));
    };
    if let Some(key) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "settings" | "mappings" | "aliases"))
    {
        return Err(invalid(
            "search mappings",
            format!("unknown key {key:?}: expected `settings` and/or `mappings`"),
        ));
    }
    let settings = body.entry("settings").or_insert_with(|| json!({}));
    let Some(settings) = settings.as_object_mut() else {
        return Err(invalid("search mappings", "`settings` must be an object"));
    };
    let named =
        settings.contains_key("index.gc_deletes") || settings.get("index").and_then(|i| i.get("gc_deletes")).is_some();
    if !named {
        settings.insert(
            String::from("index.gc_deletes"),
            json!(format!("{}s", gc_deletes.as_secs().max(1))),
        );
    }
    Ok(Value::Object(body))
}

/// One version of a search projection in an OpenSearch index, with the reader that keeps
/// it.
///
/// - **Versioned indices behind an alias.** Version `n` of projection `customers` lives in
///   the index `<prefix>customers_v<n>`; readers search the alias `<prefix>customers`
///   ([`alias`](Self::alias), [`search`](Self::search)), which points at the serving
///   version.
/// - **External versions.** Each document is written by `_bulk` with
///   `version_type=external` and the envelope's aggregate sequence as its version, so a
///   duplicated, late or reordered event never overwrites a newer document (OpenSearch
///   answers it with a version conflict, counted as stale). Deletes carry the version
///   too, and leave a tombstone that OpenSearch keeps for `index.gc_deletes`
///   ([`OsProjectionBuilder::gc_deletes`], one day by default): an event older than the
///   delete that comes later than that would bring the document back.
/// - **Checkpoints** per topic partition, in the index `<prefix>dbps_projection_checkpoints`
///   (document `<name>_v<n>`), written after each `_bulk` succeeded. A crash between the
///   two replays a batch, which the external versions make harmless. The checkpoint also
///   records the source time of the newest applied event and when the projection was
///   last current ([`freshness`](Self::freshness)).
/// - **Blue-green rebuild.** A new version fills its fresh index from the beginning of the
///   topics while the old one serves, asks the old version's runner to pause, catches up
///   with its checkpoints, and moves the alias in one `_aliases` request (remove the old
///   index, add the new one). The old runner sees that the alias has moved and stops.
///
/// Failures that may pass (OpenSearch or Kafka unreachable, 429, 5xx) are retried until
/// the projection is stopped; other refusals end [`run`](Self::run) with a
/// [`CacheError`]. Logs carry ids and statuses, never documents.
///
/// ```no_run
/// # use dbps_cache::projection::{DocChange, SearchModel};
/// # struct Customers;
/// # impl SearchModel for Customers {
/// #     type Events = Events;
/// #     fn name(&self) -> &str { "customers" }
/// #     fn version(&self) -> u32 { 2 }
/// #     fn topics(&self) -> Vec<String> { vec![String::from("customer.customer.events")] }
/// #     fn mappings(&self) -> serde_json::Value { serde_json::json!({}) }
/// #     fn project(&self, _: Events, _: &dbps_core::Envelope) -> Result<DocChange, dbps_core::HandlerError> { Ok(DocChange::Delete) }
/// # }
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)] struct Deleted {}
/// # impl dbps_core::Message for Deleted { const TYPE: &'static str = "customer.Deleted"; }
/// # dbps_core::message_set! { enum Events { Deleted(Deleted) } }
/// # async fn example(kafka: dbps_core::kafka::KafkaConfig) -> Result<(), Box<dyn std::error::Error>> {
/// use dbps_cache::projection::OsProjection;
///
/// let customers = OsProjection::builder("http://127.0.0.1:29200", Customers)
///     .index_prefix("crm-")
///     .on_progress(|p| tracing::info!(replayed = p.replayed, total = p.total, "rebuilding customers"))
///     .build()?;
/// // Rebuilds `crm-customers_v2` if it does not serve yet, moves the alias
/// // `crm-customers` to it, then keeps it current.
/// let running = tokio::spawn({
///     let customers = customers.clone();
///     async move { customers.run(&kafka, dbps_core::CancellationToken::new()).await }
/// });
/// let hits = customers
///     .search(&serde_json::json!({"query": {"match": {"name": "ada"}}}))
///     .await?;
/// let freshness = customers.freshness().await?;
/// # let _ = (hits, freshness, running); Ok(()) }
/// ```
pub struct OsProjection<M> {
    inner: Arc<Inner<M>>,
}

struct Inner<M> {
    http: Http,
    model: M,
    name: String,
    version: u32,
    alias: String,
    index: String,
    /// The body that creates the index.
    body: Value,
    checkpoints: String,
    /// The id of the projection's handover document in the checkpoint index.
    state_id: String,
    runner: Runner,
}

impl<M> Clone for OsProjection<M> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M> fmt::Debug for OsProjection<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OsProjection")
            .field("index", &self.inner.index)
            .field("alias", &self.inner.alias)
            .field("topics", &self.inner.runner.topics)
            .finish_non_exhaustive()
    }
}

/// How current a search projection's results are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Freshness {
    /// The version the alias serves (`None` before the first switch).
    pub version: Option<u32>,
    /// The source time of the newest event applied: the results include every change up
    /// to it.
    pub applied_until: Option<DateTime<Utc>>,
    /// When the projection last found nothing more to read: every event published before
    /// then is in the results.
    pub current_at: Option<DateTime<Utc>>,
    /// When the checkpoint was last written.
    pub updated_at: Option<DateTime<Utc>>,
}

impl Freshness {
    /// How long ago the projection was last current (`None` if it never was): an upper
    /// bound of how much the results may miss, while its runner runs.
    pub fn lag(&self) -> Option<Duration> {
        self.current_at.map(|at| (Utc::now() - at).to_std().unwrap_or_default())
    }
}

/// One version's state: where its reader is and how fresh it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// This version.
    pub version: u32,
    /// The version the alias serves.
    pub serving_version: Option<u32>,
    /// Per topic partition, the offset of the next record to apply.
    pub checkpoints: BTreeMap<(String, i32), i64>,
    /// This version's freshness (its `version` is this version).
    pub freshness: Freshness,
}

/// A checkpoint document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Checkpoint {
    projection: String,
    version: u32,
    positions: Vec<Position>,
    applied_until: Option<DateTime<Utc>>,
    current_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    /// The version whose switch this version's runner waits for.
    paused_for: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Position {
    topic: String,
    partition: i32,
    next_offset: i64,
}

impl Checkpoint {
    fn positions(&self) -> Positions {
        self.positions
            .iter()
            .map(|p| ((p.topic.clone(), p.partition), p.next_offset))
            .collect()
    }

    fn set_positions(&mut self, positions: &Positions) {
        self.positions = positions
            .iter()
            .map(|((topic, partition), next_offset)| Position {
                topic: topic.clone(),
                partition: *partition,
                next_offset: *next_offset,
            })
            .collect();
    }

    fn freshness(&self, version: Option<u32>) -> Freshness {
        Freshness {
            version,
            applied_until: self.applied_until,
            current_at: self.current_at,
            updated_at: self.updated_at,
        }
    }
}

/// The handover document: a version asks the serving one's runner to pause.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Handover {
    projection: String,
    switching_to: u32,
    requested_at: DateTime<Utc>,
}

/// Whether the serving version allows a batch of this version to be applied.
enum Gate {
    Open,
    Superseded(u32),
}

impl<M: SearchModel> OsProjection<M> {
    /// A builder for the projection `model` declares, kept in the OpenSearch cluster at
    /// `url` (`http://host:port`).
    pub fn builder(url: impl Into<String>, model: M) -> OsProjectionBuilder<M> {
        OsProjectionBuilder {
            url: url.into(),
            model,
            prefix: String::new(),
            common: Common::default(),
            gc_deletes: Duration::from_secs(24 * 60 * 60),
            timeout: Duration::from_secs(30),
            client: None,
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The version this projection writes.
    pub fn version(&self) -> u32 {
        self.inner.version
    }

    /// This version's index, `<prefix><name>_v<version>`.
    pub fn index(&self) -> &str {
        &self.inner.index
    }

    /// The alias readers search, `<prefix><name>`.
    pub fn alias(&self) -> &str {
        &self.inner.alias
    }

    /// The index that holds the checkpoints, `<prefix>dbps_projection_checkpoints`.
    pub fn checkpoint_index(&self) -> &str {
        &self.inner.checkpoints
    }

    /// Searches the serving version through the alias with a `_search` body; the reply as
    /// OpenSearch gave it. Before the first switch there is no alias, and OpenSearch
    /// answers `404` (`index_not_found_exception`).
    pub async fn search(&self, body: &Value) -> Result<Value> {
        let path = format!("{}/_search", self.inner.alias);
        self.inner
            .http
            .call("search", Method::POST, &path, Some(Body::Json(body)), &[])
            .await
            .map(|(_, reply)| reply)
    }

    /// The version the alias serves, `None` before the first switch.
    pub async fn serving_version(&self) -> Result<Option<u32>> {
        let inner = &self.inner;
        let (status, reply) = inner
            .http
            .call(
                "read the alias",
                Method::GET,
                &format!("_alias/{}", inner.alias),
                None,
                &[404],
            )
            .await?;
        if status == 404 {
            return Ok(None);
        }
        let stem = format!("{}_v", inner.alias);
        Ok(reply
            .as_object()
            .into_iter()
            .flat_map(|indices| indices.keys())
            .filter_map(|index| index.strip_prefix(&stem)?.parse::<u32>().ok())
            .max())
    }

    /// This version's checkpoints: per topic partition, the offset of the next record to
    /// apply.
    pub async fn checkpoints(&self) -> Result<BTreeMap<(String, i32), i64>> {
        Ok(self.checkpoint_of(self.inner.version).await?.positions())
    }

    /// This version's checkpoints, the version the alias serves and how fresh this
    /// version is.
    pub async fn status(&self) -> Result<ProjectionStatus> {
        let checkpoint = self.checkpoint_of(self.inner.version).await?;
        Ok(ProjectionStatus {
            version: self.inner.version,
            serving_version: self.serving_version().await?,
            checkpoints: checkpoint.positions(),
            freshness: checkpoint.freshness(Some(self.inner.version)),
        })
    }

    /// How fresh the results that readers of the alias get are: the serving version's
    /// checkpoint (all `None` before the first switch).
    pub async fn freshness(&self) -> Result<Freshness> {
        let Some(serving) = self.serving_version().await? else {
            return Ok(Freshness::default());
        };
        Ok(self.checkpoint_of(serving).await?.freshness(Some(serving)))
    }

    /// Rebuilds this version from the beginning of its topics and moves the alias to it,
    /// while the serving version (if any) goes on being written.
    ///
    /// The fresh index `<prefix><name>_v<version>` is created with the model's mappings
    /// (or, after an interrupted rebuild, taken up where its checkpoints are), every
    /// record up to the end offsets at the start is replayed into it, then the records
    /// that arrived meanwhile, until it has caught up with the serving version's
    /// checkpoints. Then the serving version's runner is asked to pause (it confirms in its
    /// checkpoint; a runner that does not within a few seconds is taken to be stopped),
    /// the last records are applied, and one `_aliases` request removes the old index from
    /// the alias and adds the new one: a reader of the alias sees one version or the
    /// other, complete.
    ///
    /// Nothing is done (`switched == false`) when this version or a newer one serves
    /// already, when another instance moved the alias meanwhile, or when `shutdown` stops
    /// the rebuild before the switch.
    pub async fn rebuild(&self, kafka: &KafkaConfig, shutdown: &CancellationToken) -> Result<RebuildReport> {
        let inner = &self.inner;
        self.prepare().await?;
        let previous = self.serving_version().await?;
        let (mut report, needed) = inner.runner.rebuild_report(previous);
        if !needed {
            return Ok(report);
        }
        self.create_index().await?;
        let mut checkpoint = self.checkpoint_of(inner.version).await?;
        let started = inner.runner.reader(kafka, checkpoint.positions()).await?;
        let (ends, mut total) = started.ends();
        let (reader, watermarks, mut positions) = (started.reader, started.watermarks, started.positions);
        tracing::info!(projection = %inner.runner.label, ?previous, total, "rebuild started");
        self.report_progress(0, total);

        // Replay up to the end offsets at the start, then up to the serving version's
        // checkpoints; once there, ask its runner to pause, and catch up with where it
        // stopped.
        let mut targets = ends;
        let mut handed_over = previous.is_none();
        loop {
            if !behind(&positions, &targets) {
                let mut serving = match previous {
                    Some(serving) => self.checkpoint_of(serving).await?.positions(),
                    None => Positions::new(),
                };
                serving.retain(|partition, _| watermarks.contains_key(partition));
                if !behind(&positions, &serving) {
                    if handed_over {
                        break;
                    }
                    if let Some(serving) = previous {
                        self.hand_over(serving, shutdown).await?;
                    }
                    handed_over = true;
                    continue;
                }
                targets = serving;
            }
            let Some(batch) = reader.next_batch(inner.runner.max_batch, shutdown, None).await? else {
                return Ok(report);
            };
            advance(&mut positions, &batch);
            checkpoint = self.apply_retrying(&batch, &checkpoint, &positions, shutdown).await?;
            report.replayed += batch.len() as u64;
            total = total.max(report.replayed);
            self.report_progress(report.replayed, total);
        }
        if !self.switch_alias(previous).await? {
            return Ok(report);
        }
        report.switched = true;
        self.report_progress(report.replayed, total.max(report.replayed));
        tracing::info!(projection = %inner.runner.label, ?previous, replayed = report.replayed, "alias switched");
        Ok(report)
    }

    /// Runs the projection until `shutdown` or until a newer version serves: rebuilds
    /// this version first if it does not serve yet ([`rebuild`](Self::rebuild)), then
    /// applies new records from its checkpoints.
    ///
    /// OpenSearch unreachable when it starts or while it applies live records is waited
    /// for; a failure during a rebuild ends the run (started again, the rebuild resumes
    /// from its checkpoints).
    pub async fn run(&self, kafka: &KafkaConfig, shutdown: CancellationToken) -> Result<RunSummary> {
        let inner = &self.inner;
        retrying(&inner.runner.label, &shutdown, || self.prepare()).await?;
        let serving = retrying(&inner.runner.label, &shutdown, || self.serving_version()).await?;
        let (mut summary, live) = rebuild_unless_serving(
            self.version(),
            serving,
            &shutdown,
            self.rebuild(kafka, &shutdown),
            self.serving_version(),
        )
        .await?;
        if !live {
            return Ok(summary);
        }
        let mut checkpoint = retrying(&inner.runner.label, &shutdown, || self.checkpoint_of(inner.version)).await?;
        let started = inner.runner.reader(kafka, checkpoint.positions()).await?;
        let (reader, mut positions) = (started.reader, started.positions);
        tracing::info!(projection = %inner.runner.label, ?positions, "applying from the checkpoints");
        while let Some(batch) = reader
            .next_batch(inner.runner.max_batch, &shutdown, Some(IDLE_CHECK))
            .await?
        {
            let gate = retrying(&inner.runner.label, &shutdown, || {
                self.gate(batch.is_empty(), &checkpoint)
            })
            .await?;
            if let Gate::Superseded(serving) = gate {
                tracing::info!(projection = %inner.runner.label, serving, "a newer version serves; stopping");
                summary.superseded_by = Some(serving);
                break;
            }
            if batch.is_empty() {
                let stale = checkpoint.current_at.is_none_or(|at| Utc::now() - at >= IDLE_HEARTBEAT);
                if stale {
                    let mut current = checkpoint.clone();
                    current.current_at = Some(Utc::now());
                    current.paused_for = None;
                    checkpoint = retrying(&inner.runner.label, &shutdown, || self.write_checkpoint(&current)).await?;
                }
                continue;
            }
            advance(&mut positions, &batch);
            checkpoint = self.apply_retrying(&batch, &checkpoint, &positions, &shutdown).await?;
            summary.records += batch.len() as u64;
        }
        Ok(summary)
    }

    /// Whether this version may go on: it stops when the alias serves a newer version,
    /// and waits while a newer version's rebuild has asked it to pause for its switch
    /// (saying so in its checkpoint). With `idle` (nothing to apply) the alias is looked
    /// at in any case; otherwise only when a handover was asked for.
    async fn gate(&self, idle: bool, checkpoint: &Checkpoint) -> Result<Gate> {
        let inner = &self.inner;
        let superseded = |serving: Option<u32>| serving.filter(|s| *s > inner.version).map(Gate::Superseded);
        let mut acknowledged = false;
        loop {
            let pending = self.handover().await?.filter(|h| h.switching_to > inner.version);
            if pending.is_none() && !idle {
                return Ok(Gate::Open);
            }
            if let Some(gate) = superseded(self.serving_version().await?) {
                return Ok(gate);
            }
            let Some(handover) = pending else {
                return Ok(Gate::Open);
            };
            if Utc::now() - handover.requested_at > HANDOVER_EXPIRY {
                if acknowledged {
                    tracing::warn!(projection = %inner.runner.label, to = handover.switching_to, "a handover expired; going on");
                }
                return Ok(Gate::Open);
            }
            if !acknowledged {
                tracing::info!(projection = %inner.runner.label, to = handover.switching_to, "pausing for a switch");
                let mut paused = checkpoint.clone();
                paused.paused_for = Some(handover.switching_to);
                self.write_checkpoint(&paused).await?;
                acknowledged = true;
            }
            tokio::time::sleep(PAUSE_POLL).await;
        }
    }

    /// Asks the runner of `serving` to pause and waits (a while) until it says it has.
    async fn hand_over(&self, serving: u32, shutdown: &CancellationToken) -> Result<()> {
        let inner = &self.inner;
        let request = Handover {
            projection: inner.name.clone(),
            switching_to: inner.version,
            requested_at: Utc::now(),
        };
        let path = format!("{}/_doc/{}?refresh=true", inner.checkpoints, inner.state_id);
        let body = to_json(&request)?;
        retrying(&inner.runner.label, shutdown, || {
            inner
                .http
                .call("request the handover", Method::PUT, &path, Some(Body::Json(&body)), &[])
        })
        .await?;
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        while tokio::time::Instant::now() < deadline && !shutdown.is_cancelled() {
            if self.checkpoint_of(serving).await?.paused_for == Some(inner.version) {
                tracing::info!(projection = %inner.runner.label, serving, "the serving version paused");
                return Ok(());
            }
            tokio::time::sleep(PAUSE_POLL).await;
        }
        tracing::info!(projection = %inner.runner.label, serving, "the serving version did not pause; taking it to be stopped");
        Ok(())
    }

    async fn handover(&self) -> Result<Option<Handover>> {
        let inner = &self.inner;
        let path = format!("{}/_doc/{}", inner.checkpoints, inner.state_id);
        let (status, reply) = inner
            .http
            .call("read the handover", Method::GET, &path, None, &[404])
            .await?;
        if status == 404 || reply["found"] != json!(true) {
            return Ok(None);
        }
        Ok(serde_json::from_value(reply["_source"].clone()).ok())
    }

    /// Moves the alias to this version's index in one request; `false` when another
    /// instance moved it meanwhile.
    async fn switch_alias(&self, previous: Option<u32>) -> Result<bool> {
        let inner = &self.inner;
        let mut actions = Vec::new();
        if let Some(previous) = previous {
            actions.push(json!({"remove": {"index": format!("{}_v{previous}", inner.alias), "alias": inner.alias}}));
        }
        actions.push(json!({"add": {"index": inner.index, "alias": inner.alias}}));
        let body = json!({ "actions": actions });
        // Everything applied is visible to search before readers are pointed at it.
        inner
            .http
            .call(
                "refresh the index",
                Method::POST,
                &format!("{}/_refresh", inner.index),
                None,
                &[],
            )
            .await?;
        let (status, _) = inner
            .http
            .call(
                "switch the alias",
                Method::POST,
                "_aliases",
                Some(Body::Json(&body)),
                &[404],
            )
            .await?;
        if status == 404 {
            // The old index no longer has the alias: another instance switched.
            let serving = self.serving_version().await?;
            tracing::info!(projection = %inner.runner.label, ?serving, "another instance switched the alias");
            return Ok(serving == Some(inner.version));
        }
        Ok(true)
    }

    /// Creates the checkpoint index unless it exists.
    async fn prepare(&self) -> Result<()> {
        let body = json!({
            "settings": {"number_of_shards": 1},
            "mappings": {"dynamic": false, "properties": {
                "projection": {"type": "keyword"},
                "version": {"type": "integer"},
                "updated_at": {"type": "date"},
            }},
        });
        self.create(&self.inner.checkpoints, &body).await
    }

    /// Creates this version's index unless it exists.
    async fn create_index(&self) -> Result<()> {
        self.create(&self.inner.index, &self.inner.body).await
    }

    async fn create(&self, index: &str, body: &Value) -> Result<()> {
        let (status, reply) = self
            .inner
            .http
            .call("create an index", Method::PUT, index, Some(Body::Json(body)), &[400])
            .await?;
        if status == 400 && reply["error"]["type"] != json!("resource_already_exists_exception") {
            return Err(CacheError::OpenSearch {
                operation: "create an index",
                status: Some(status),
                kind: error_kind(&reply),
                source: None,
            });
        }
        Ok(())
    }

    /// The checkpoint of `version` (empty when there is none).
    async fn checkpoint_of(&self, version: u32) -> Result<Checkpoint> {
        let inner = &self.inner;
        let path = format!("{}/_doc/{}_v{version}", inner.checkpoints, inner.name);
        let (status, reply) = inner
            .http
            .call("read a checkpoint", Method::GET, &path, None, &[404])
            .await?;
        if status == 404 || reply["found"] != json!(true) {
            return Ok(Checkpoint {
                projection: inner.name.clone(),
                version,
                ..Checkpoint::default()
            });
        }
        serde_json::from_value(reply["_source"].clone()).map_err(|source| CacheError::Codec {
            key: format!("{}/{path}", inner.http.url),
            source,
        })
    }

    async fn write_checkpoint(&self, checkpoint: &Checkpoint) -> Result<Checkpoint> {
        let inner = &self.inner;
        let mut written = checkpoint.clone();
        written.projection.clone_from(&inner.name);
        written.version = inner.version;
        written.updated_at = Some(Utc::now());
        let path = format!("{}/_doc/{}", inner.checkpoints, inner.runner.label);
        let body = to_json(&written)?;
        inner
            .http
            .call("write a checkpoint", Method::PUT, &path, Some(Body::Json(&body)), &[])
            .await?;
        Ok(written)
    }

    /// Applies a batch and then writes the checkpoint `positions` (the positions after
    /// it), retrying transient failures until `shutdown`.
    async fn apply_retrying(
        &self,
        batch: &[Record],
        checkpoint: &Checkpoint,
        positions: &Positions,
        shutdown: &CancellationToken,
    ) -> Result<Checkpoint> {
        let (operations, mut effect) = self.project(batch)?;
        let mut next = checkpoint.clone();
        next.set_positions(positions);
        next.paused_for = None;
        if let Some(newest) = batch
            .iter()
            .filter_map(|r| r.envelope.as_ref())
            .map(|e| e.occurred_at)
            .max()
        {
            next.applied_until = next.applied_until.max(Some(newest));
        }
        if batch.len() < self.inner.runner.max_batch {
            // The reader found no more records: the projection is current.
            next.current_at = Some(Utc::now());
        }
        let (advanced, stale) = retrying(&self.inner.runner.label, shutdown, || self.bulk(&operations)).await?;
        let written = retrying(&self.inner.runner.label, shutdown, || self.write_checkpoint(&next)).await?;
        effect.advanced = advanced;
        effect.stale += stale;
        effect.record(&self.inner.runner.label);
        Ok(written)
    }

    /// The batch's documents: per aggregate, the newest change that is not a skip.
    /// Events of a sequence already seen in the batch are stale.
    fn project(&self, batch: &[Record]) -> Result<(Vec<Projected<DocChange>>, BatchEffect)> {
        let inner = &self.inner;
        let mut newest: BTreeMap<String, Projected<DocChange>> = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut effect = BatchEffect::default();
        for envelope in batch.iter().filter_map(|r| r.envelope.as_ref()) {
            let projected = inner
                .runner
                .project::<M::Events, DocChange>(envelope, |event, envelope| inner.model.project(event, envelope))?;
            let Some(projected) = projected else { continue };
            if !seen.insert((projected.aggregate_id.clone(), projected.sequence)) {
                effect.stale += 1;
                continue;
            }
            effect.source_times.push(projected.source_time);
            if projected.change == DocChange::Skip {
                continue;
            }
            match newest.get(&projected.aggregate_id) {
                Some(kept) if kept.sequence >= projected.sequence => {}
                _ => {
                    newest.insert(projected.aggregate_id.clone(), projected);
                }
            }
        }
        Ok((newest.into_values().collect(), effect))
    }

    /// Sends the documents in one `_bulk` request: `(applied, stale)`.
    async fn bulk(&self, operations: &[Projected<DocChange>]) -> Result<(usize, usize)> {
        let inner = &self.inner;
        if operations.is_empty() {
            return Ok((0, 0));
        }
        let mut body = String::new();
        for operation in operations {
            let target = json!({
                "_index": inner.index,
                "_id": operation.aggregate_id,
                "version": operation.sequence,
                "version_type": "external",
            });
            match &operation.change {
                DocChange::Index(document) => {
                    let _ = writeln!(body, "{}", json!({ "index": target }));
                    let _ = writeln!(body, "{document}");
                }
                DocChange::Delete => {
                    let _ = writeln!(body, "{}", json!({ "delete": target }));
                }
                DocChange::Skip => {}
            }
        }
        let (_, reply) = inner
            .http
            .call("bulk", Method::POST, "_bulk", Some(Body::NdJson(body)), &[])
            .await?;
        let mut applied = 0;
        let mut stale = 0;
        let mut refused: Vec<(String, u16, String)> = Vec::new();
        let items = reply["items"].as_array().map(Vec::as_slice).unwrap_or_default();
        for item in items {
            let Some(result) = item.as_object().and_then(|o| o.values().next()) else {
                continue;
            };
            let status = result["status"].as_u64().unwrap_or(0);
            let status = u16::try_from(status).unwrap_or(0);
            match status {
                200..=299 => applied += 1,
                // A delete of a document that is not there still leaves its tombstone.
                404 if result["result"] == json!("not_found") => applied += 1,
                409 => stale += 1,
                _ => refused.push((
                    result["_id"].as_str().unwrap_or_default().to_owned(),
                    status,
                    result["error"]["type"].as_str().unwrap_or("unknown").to_owned(),
                )),
            }
        }
        if items.len() != operations.len() {
            return Err(CacheError::OpenSearch {
                operation: "bulk",
                status: None,
                kind: Some(format!("{} items answered for {}", items.len(), operations.len())),
                source: None,
            });
        }
        if let Some((id, status, kind)) = refused.first().cloned() {
            let transient = refused.iter().all(|(_, s, _)| *s == 429 || *s >= 500);
            tracing::warn!(projection = %inner.runner.label, failed = refused.len(), %id, status, %kind, "documents refused");
            return Err(CacheError::OpenSearchItems {
                projection: inner.runner.label.clone(),
                failed: refused.len(),
                id,
                status,
                kind,
                transient,
            });
        }
        Ok((applied, stale))
    }

    fn report_progress(&self, replayed: u64, total: u64) {
        self.inner.runner.report_progress(replayed, total);
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|source| CacheError::Codec {
        key: String::from("projection checkpoint"),
        source,
    })
}

fn error_kind(reply: &Value) -> Option<String> {
    reply["error"]["type"].as_str().map(str::to_owned)
}

/// The body of a request.
enum Body<'a> {
    Json(&'a Value),
    NdJson(String),
}

/// OpenSearch's REST API over reqwest.
struct Http {
    client: reqwest::Client,
    /// `http://host:port`, without a trailing slash.
    url: String,
}

impl Http {
    /// Sends a request; the status and the JSON reply. A status outside 2xx fails unless
    /// it is in `accepted`.
    async fn call(
        &self,
        operation: &'static str,
        method: Method,
        path: &str,
        body: Option<Body<'_>>,
        accepted: &[u16],
    ) -> Result<(u16, Value)> {
        let failed =
            |status: Option<u16>, kind: Option<String>, source: Option<reqwest::Error>| CacheError::OpenSearch {
                operation,
                status,
                kind,
                source,
            };
        let mut request = self.client.request(method, format!("{}/{path}", self.url));
        request = match body {
            Some(Body::Json(value)) => request.json(value),
            Some(Body::NdJson(text)) => request.header("content-type", "application/x-ndjson").body(text),
            None => request,
        };
        let response = request.send().await.map_err(|e| failed(None, None, Some(e)))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| failed(Some(status), None, Some(e)))?;
        let reply: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if (200..300).contains(&status) || accepted.contains(&status) {
            Ok((status, reply))
        } else {
            Err(failed(Some(status), error_kind(&reply), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_index_name_parts() {
        assert!(check_name("n", "customers", false).is_ok());
        assert!(check_name("n", "crm-2_x", false).is_ok());
        assert!(check_name("n", "", false).is_err());
        assert!(check_name("p", "", true).is_ok());
        assert!(check_name("p", "dbps-t-1.a-", true).is_ok());
        for bad in ["Customers", "_x", "-x", "a b", "a*b", "a/b", "a,b"] {
            assert!(check_name("n", bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_index_body_gets_gc_deletes() {
        let body = index_body(json!({"mappings": {"properties": {}}}), Duration::from_secs(3600)).expect("valid");
        assert_eq!(body["settings"]["index.gc_deletes"], "3600s");
        let own = index_body(
            json!({"settings": {"index": {"gc_deletes": "5m"}}}),
            Duration::from_secs(60),
        )
        .expect("valid");
        assert!(own["settings"].get("index.gc_deletes").is_none());
        assert!(index_body(json!([]), Duration::from_secs(1)).is_err());
        assert!(index_body(json!({"mapping": {}}), Duration::from_secs(1)).is_err());
    }
}
