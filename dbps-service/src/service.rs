//! A running service: its long-running parts, its shutdown and its HTTP server.

use std::sync::OnceLock;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use dbps_core::BatchHandler;
use dbps_core::CancellationToken;
use dbps_core::kafka::{ConsumerRunner, KafkaPublisher, TopicNaming, TopicSpec};
use dbps_migrate::ServiceName;
use dbps_outbox::pg::PgOutbox;
use dbps_outbox::{OutboxStore, Relay};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::task::JoinSet;

use crate::config::ServiceConfig;
use crate::error::{BoxError, Result, ServiceError};

/// The partitions of a topic [`Service::consume`] creates because it is missing.
pub const CONSUMED_TOPIC_PARTITIONS: i32 = 3;

/// A dbps service while it runs: the parts it started (relay, consumer runners, its own
/// tasks), the one [`CancellationToken`] they all stop on, and its HTTP server.
///
/// `Service` does not hide tokio: every part is a future that runs on the caller's
/// runtime, and [`Service::run`] takes any future of the service's own.
/// [`Service::serve`] serves the service's router next to `/health` and `/metrics`, and
/// returns when the service has stopped:
///
/// - SIGTERM or Ctrl-C cancels the token: the HTTP server stops accepting, finishes the
///   requests in flight, and every part finishes its unit of work, commits it and
///   returns (see each part's lifecycle);
/// - a part that fails, ends on its own or panics cancels the token too, so the whole
///   service stops and `serve` returns that error (or resumes that panic) — a
///   half-running service does not stay up;
/// - parts still running after the shutdown grace period are abandoned, as in a crash,
///   and `serve` says which.
#[derive(Debug)]
pub struct Service {
    config: ServiceConfig,
    shutdown: CancellationToken,
    tasks: JoinSet<(String, std::result::Result<(), BoxError>)>,
    metrics: PrometheusHandle,
}

/// The process's Prometheus recorder, installed by the first service of the process.
static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (an application's own): then
            // `/metrics` shows what this one records, which is nothing, and says so in
            // the log.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was installed before the service's: /metrics will be empty");
            }
            handle
        })
        .clone()
}

impl Service {
    /// Starts a service: installs the Prometheus recorder (once per process) and cancels
    /// the shutdown token on SIGTERM or Ctrl-C. Call it inside the tokio runtime.
    pub fn new(config: ServiceConfig) -> Self {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = signal() => {
                    tracing::info!("shutdown requested");
                    on_signal.cancel();
                }
                () = on_signal.cancelled() => {}
            }
        });
        Self {
            config,
            shutdown,
            tasks: JoinSet::new(),
            metrics: metrics_handle(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// The service's name.
    pub fn name(&self) -> &ServiceName {
        &self.config.name
    }

    /// The token every part stops on; cancel it to stop the service.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The topic naming of the service's environment.
    pub fn naming(&self) -> TopicNaming {
        self.config.naming()
    }

    /// The consumer group of one of the service's consumers: `<service>.<consumer>`. It
    /// is also a good inbox consumer name (one per effect) and gives the dead-letter
    /// topic its name (`<service>.<consumer>.dlq`).
    pub fn group(&self, consumer: &str) -> String {
        format!("{}.{consumer}", self.config.name)
    }

    /// The service's outbox: messages from the service (`source` = its name), event topics
    /// named by [`Service::naming`].
    pub fn outbox(&self) -> PgOutbox {
        PgOutbox::new(self.config.name.as_str()).naming(self.naming())
    }

    /// The Kafka configuration.
    pub fn kafka(&self) -> Result<&dbps_core::kafka::KafkaConfig> {
        self.config.kafka_config()
    }

    /// A publisher for the service's relay: without a message timeout, so that a broker
    /// outage makes the relay wait instead of failing rounds.
    pub fn relay_publisher(&self) -> Result<KafkaPublisher> {
        let kafka = self.kafka()?.clone().set("message.timeout.ms", "0");
        KafkaPublisher::builder(kafka).build().map_err(ServiceError::Kafka)
    }

    /// Prepares the service's own database, as at every start: provisions it (database,
    /// schema, owner and runtime roles; idempotent; skipped when the configuration says it
    /// was provisioned beforehand), applies `components` in order as the owner role — the
    /// framework's tables first, the service's own migrations last — and returns a pool
    /// connected as the runtime role, which can read and write the tables but not change
    /// them.
    pub async fn postgres(&self, components: &[(&str, &Migrator)]) -> Result<PgPool> {
        let (server, owner, runtime) = self.config.postgres_parts()?;
        let service = dbps_migrate::PgService::new(self.config.name.clone());
        let migrations = components
            .iter()
            .fold(service.migrations(), |m, (name, migrator)| m.component(name, migrator));
        let pool = PgPoolOptions::new().max_connections(16);
        if self.config.provision {
            return service
                .prepare(server, owner, runtime, &migrations, pool)
                .await
                .map_err(ServiceError::Migrate);
        }
        let report = migrations
            .run(&service.owner_options(server, owner))
            .await
            .map_err(ServiceError::Migrate)?;
        tracing::info!(service = %self.config.name, applied = report.applied_count(), "service database migrated");
        pool.connect_with(service.runtime_options(server, runtime))
            .await
            .map_err(|source| {
                ServiceError::Migrate(dbps_migrate::MigrateError::Postgres {
                    action: format!("connect as {}", service.runtime_role()),
                    source,
                })
            })
    }

    /// Runs the relay until the service stops.
    pub fn run_relay<S: OutboxStore>(&mut self, relay: Relay<S>) {
        let shutdown = self.shutdown.clone();
        self.spawn(String::from("relay"), async move {
            let summary = relay.run(shutdown).await?;
            tracing::info!(published = summary.published, parked = summary.parked, "relay stopped");
            Ok(())
        });
    }

    /// Runs a consumer runner until the service stops (any handler: one message at a time
    /// or batched, such as `PgInbox::batched` or a replica).
    pub fn run_consumer<H: BatchHandler>(&mut self, runner: ConsumerRunner<H>) {
        let shutdown = self.shutdown.clone();
        let name = format!("consumer {}", runner.group_id());
        self.spawn(name, async move {
            let summary = runner.run(shutdown).await?;
            tracing::info!(
                handled = summary.handled,
                dead_lettered = summary.dead_lettered,
                "consumer stopped"
            );
            Ok(())
        });
    }

    /// Consumes `topic` with `handler` as the consumer group `group` (a name from
    /// [`Service::group`], which is also the inbox consumer name to give the handler) until
    /// the service stops. Undecodable and permanently failing messages go to the group's
    /// dead-letter topic (`<group>.dlq`); the topic and the dead-letter topic are created
    /// with [`CONSUMED_TOPIC_PARTITIONS`] partitions when they are missing. For other
    /// settings, build the [`ConsumerRunner`] and hand it to [`Service::run_consumer`].
    pub fn consume<H: BatchHandler>(&mut self, group: &str, topic: &str, handler: H) -> Result<()> {
        let naming = self.naming();
        let runner = ConsumerRunner::builder(self.kafka()?.clone(), group, handler)
            .topic(topic)
            .dead_letter_topic(naming.dead_letter(group).map_err(ServiceError::Kafka)?)
            .create_topics(|name| TopicSpec::new(name, CONSUMED_TOPIC_PARTITIONS))
            .build()
            .map_err(ServiceError::Kafka)?;
        self.run_consumer(runner);
        Ok(())
    }

    /// Runs a part of the service's own until the service stops: `part` gets the shutdown
    /// token and must return soon after it is cancelled.
    pub fn run<F, E>(&mut self, name: &str, part: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let future = part(self.shutdown.clone());
        self.spawn(name.to_owned(), async move { future.await.map_err(Into::into) });
    }

    fn spawn(&mut self, name: String, part: impl Future<Output = std::result::Result<(), BoxError>> + Send + 'static) {
        self.tasks.spawn(async move { (name, part.await) });
    }

    /// Serves `router` with `/health` and `/metrics` on the configured address until the
    /// service stops, then waits for every part (see the type's documentation). Error
    /// responses that are not JSON — axum's rejections, its 404 and 405 — become problems
    /// ([`problem_layer`](crate::http::problem_layer)).
    pub async fn serve(self, router: Router) -> Result<()> {
        let addr = self.config.http_addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServiceError::Bind { addr, source })?;
        self.serve_on(listener, router).await
    }

    /// [`Service::serve`] on a listener bound by the caller (tests bind port 0).
    pub async fn serve_on(mut self, listener: tokio::net::TcpListener, router: Router) -> Result<()> {
        let addr = listener.local_addr().ok();
        // Problems for every client mistake, also axum's own rejections and its 404 and 405.
        let app = router
            .merge(self.operations_routes())
            .layer(axum::middleware::from_fn(crate::http::problem_layer));
        let stopped = self.shutdown.clone();
        self.spawn(String::from("http"), async move {
            // With the client's address (`ConnectInfo`), which rate limits key by.
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(stopped.cancelled_owned())
            .await
            .map_err(Into::into)
        });
        tracing::info!(service = %self.config.name, addr = ?addr, "service started");
        self.wait().await
    }

    /// Waits until every part has stopped; the first failure stops the others.
    async fn wait(mut self) -> Result<()> {
        let mut failure: Option<ServiceError> = None;
        let mut panic = None;
        let grace = self.config.shutdown_grace;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if deadline.is_none() && self.shutdown.is_cancelled() {
                deadline = Some(tokio::time::Instant::now() + grace);
            }
            let next = match deadline {
                None => tokio::select! {
                    next = self.tasks.join_next() => next,
                    () = self.shutdown.cancelled() => continue,
                },
                Some(deadline) => match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let tasks = self.tasks.len();
                        self.tasks.abort_all();
                        while self.tasks.join_next().await.is_some() {}
                        failure.get_or_insert(ServiceError::ShutdownTimedOut {
                            tasks: vec![format!("{tasks} parts")],
                            grace,
                        });
                        break;
                    }
                },
            };
            let Some(joined) = next else { break };
            let stopping = self.shutdown.is_cancelled();
            match joined {
                Ok((_, Ok(()))) if stopping => {}
                Ok((task, Ok(()))) => {
                    tracing::error!(%task, "a part of the service ended unexpectedly; stopping");
                    failure.get_or_insert(ServiceError::Ended { task });
                }
                Ok((task, Err(source))) => {
                    tracing::error!(%task, error = %dbps_core::ErrorChain(source.as_ref()), "a part of the service failed; stopping");
                    failure.get_or_insert(ServiceError::Task { task, source });
                }
                Err(error) if error.is_panic() => {
                    tracing::error!("a part of the service panicked; stopping");
                    panic.get_or_insert(error.into_panic());
                }
                Err(_) => {}
            }
            self.shutdown.cancel();
        }
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
        tracing::info!(service = %self.config.name, "service stopped");
        failure.map_or(Ok(()), Err)
    }

    /// `/health` (200 while serving, 503 once stopping) and `/metrics` (Prometheus text).
    fn operations_routes(&self) -> Router {
        let stopping = self.shutdown.clone();
        let name = self.config.name.to_string();
        let metrics = self.metrics.clone();
        Router::new()
            .route(
                "/health",
                get(move || async move {
                    let (status, state) = if stopping.is_cancelled() {
                        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
                    } else {
                        (StatusCode::OK, "ok")
                    };
                    (
                        status,
                        axum::Json(serde_json::json!({ "service": name, "status": state })),
                    )
                        .into_response()
                }),
            )
            .route("/metrics", get(move || async move { metrics.render() }))
    }
}

/// SIGTERM (as sent by orchestrators) or Ctrl-C.
async fn signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the service");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
