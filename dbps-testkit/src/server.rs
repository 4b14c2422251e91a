//! Where each backend's server comes from: an environment variable, a container, or an
//! error that says how to get one.

use std::any::Any;
use std::fmt;
use std::sync::{LazyLock, Mutex};

#[cfg(any(
    feature = "postgres",
    feature = "mongodb",
    feature = "redis",
    feature = "smtp",
    feature = "opensearch"
))]
use testcontainers::ImageExt;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, Image};
use tokio::sync::OnceCell;

use crate::error::{Error, Result};

/// A server dbps tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// PostgreSQL, the relational store of most services.
    Postgres,
    /// Apache Kafka, the event transport.
    Kafka,
    /// MongoDB (or a server speaking its wire protocol), the document store.
    Mongo,
    /// Redis, the cache.
    Redis,
    /// Mailpit: an SMTP server whose HTTP API tells what arrived (mail a service sends).
    Mailpit,
    /// OpenSearch (Elasticsearch-compatible REST API), the search store of projections.
    OpenSearch,
}

impl Backend {
    /// The environment variable that names this backend's server. Mailpit has a second
    /// one for its HTTP API, [`MAILPIT_API_VAR`].
    pub const fn env_var(self) -> &'static str {
        match self {
            Self::Postgres => "DBPS_POSTGRES_URL",
            Self::Kafka => "DBPS_KAFKA_BROKERS",
            Self::Mongo => "DBPS_MONGODB_URI",
            Self::Redis => "DBPS_REDIS_URL",
            Self::Mailpit => "DBPS_SMTP_URL",
            Self::OpenSearch => "DBPS_OPENSEARCH_URL",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Postgres => "postgres",
            Self::Kafka => "kafka",
            Self::Mongo => "mongodb",
            Self::Redis => "redis",
            Self::Mailpit => "mailpit",
            Self::OpenSearch => "opensearch",
        })
    }
}

/// The address of each backend, resolved at most once per test binary.
static POSTGRES: OnceCell<String> = OnceCell::const_new();
static KAFKA: OnceCell<String> = OnceCell::const_new();
static MONGO: OnceCell<String> = OnceCell::const_new();
static REDIS: OnceCell<String> = OnceCell::const_new();
static MAILPIT: OnceCell<MailpitAddresses> = OnceCell::const_new();
static OPENSEARCH: OnceCell<String> = OnceCell::const_new();

/// The environment variable that names Mailpit's HTTP API (`http://host:port`); its SMTP
/// server is in `DBPS_SMTP_URL` ([`Backend::env_var`]).
pub const MAILPIT_API_VAR: &str = "DBPS_MAILPIT_URL";

/// The address of `backend`'s server, from its variable or a container (for Mailpit, the
/// SMTP server's URL).
#[cfg_attr(
    not(any(
        feature = "postgres",
        feature = "kafka",
        feature = "mongodb",
        feature = "redis",
        feature = "opensearch"
    )),
    allow(dead_code)
)]
pub(crate) async fn address(backend: Backend) -> Result<&'static str> {
    let Some(cell) = cell(backend) else {
        return mailpit_addresses().await.map(|addresses| addresses.smtp.as_str());
    };
    cell.get_or_try_init(|| resolve(backend, |var| std::env::var(var).ok(), start_container(backend)))
        .await
        .map(String::as_str)
}

/// The address of `backend` if this binary resolved it already.
#[cfg_attr(not(feature = "mongodb"), allow(dead_code))]
pub(crate) fn address_if_resolved(backend: Backend) -> Option<&'static str> {
    match cell(backend) {
        Some(cell) => cell.get().map(String::as_str),
        None => MAILPIT.get().map(|addresses| addresses.smtp.as_str()),
    }
}

/// The cell of a backend with one address; `None` for Mailpit, which has two.
fn cell(backend: Backend) -> Option<&'static OnceCell<String>> {
    match backend {
        Backend::Postgres => Some(&POSTGRES),
        Backend::Kafka => Some(&KAFKA),
        Backend::Mongo => Some(&MONGO),
        Backend::Redis => Some(&REDIS),
        Backend::OpenSearch => Some(&OPENSEARCH),
        Backend::Mailpit => None,
    }
}

/// Where Mailpit listens: its SMTP server and its HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MailpitAddresses {
    /// `smtp://host:port`.
    pub(crate) smtp: String,
    /// `http://host:port`.
    #[cfg_attr(not(feature = "smtp"), allow(dead_code))]
    pub(crate) api: String,
}

/// Mailpit's addresses, from `DBPS_SMTP_URL` and `DBPS_MAILPIT_URL` or a container,
/// resolved at most once per test binary.
pub(crate) async fn mailpit_addresses() -> Result<&'static MailpitAddresses> {
    MAILPIT
        .get_or_try_init(|| resolve_mailpit(|var| std::env::var(var).ok(), start_mailpit()))
        .await
}

/// Picks Mailpit's addresses: both variables if both are set, else the container that
/// `start` brings up if neither is, else an error that names the missing one.
pub(crate) async fn resolve_mailpit(
    lookup: impl Fn(&str) -> Option<String>,
    start: impl Future<Output = std::result::Result<MailpitAddresses, String>>,
) -> Result<MailpitAddresses> {
    let smtp_var = Backend::Mailpit.env_var();
    let value = |var: &str| lookup(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    match (value(smtp_var), value(MAILPIT_API_VAR)) {
        (Some(smtp), Some(api)) => Ok(MailpitAddresses { smtp, api }),
        (None, None) => start.await.map_err(|reason| Error::NoServer {
            backend: Backend::Mailpit,
            var: smtp_var,
            reason,
        }),
        (smtp, _) => {
            let (set, missing) = if smtp.is_some() {
                (smtp_var, MAILPIT_API_VAR)
            } else {
                (MAILPIT_API_VAR, smtp_var)
            };
            Err(Error::InvalidAddress {
                backend: Backend::Mailpit,
                var: missing,
                reason: format!("{missing} is not set but {set} is: set both (`scripts/stack.sh env` prints them)"),
            })
        }
    }
}

/// Picks the address: the variable if it is set and not empty, else the container that
/// `start` brings up, else [`Error::NoServer`].
pub(crate) async fn resolve(
    backend: Backend,
    lookup: impl Fn(&str) -> Option<String>,
    start: impl Future<Output = std::result::Result<String, String>>,
) -> Result<String> {
    let var = backend.env_var();
    if let Some(value) = lookup(var).filter(|v| !v.trim().is_empty()) {
        return Ok(value.trim().to_owned());
    }
    start.await.map_err(|reason| Error::NoServer { backend, var, reason })
}

/// Containers are started on a runtime of their own that lives as long as the process,
/// because the tests that share them each run on a runtime that stops when the test ends.
static CONTAINER_RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dbps-testkit-containers")
        .enable_all()
        .build()
        .expect("dbps-testkit could not build its container runtime")
});

/// Started containers, kept alive for the whole test binary.
static CONTAINERS: Mutex<Vec<(String, Box<dyn Any + Send>)>> = Mutex::new(Vec::new());

/// Statics are never dropped, so `ContainerAsync`'s own removal never runs for shared
/// containers; remove them when the test binary exits instead.
#[dtor::dtor(unsafe)]
fn remove_containers() {
    let ids: Vec<String> = match CONTAINERS.lock() {
        Ok(containers) => containers.iter().map(|(id, _)| id.clone()).collect(),
        Err(_) => return,
    };
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "--force", "--volumes"])
            .args(&ids)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

async fn start_container(backend: Backend) -> std::result::Result<String, String> {
    let task = CONTAINER_RUNTIME.spawn(async move {
        match backend {
            Backend::Postgres => {
                #[cfg(feature = "postgres")]
                {
                    let image = testcontainers_modules::postgres::Postgres::default()
                        .with_tag("16-alpine")
                        .with_cmd([
                            "postgres",
                            "-c",
                            "wal_level=logical",
                            "-c",
                            "track_commit_timestamp=on",
                            "-c",
                            "max_connections=300",
                        ]);
                    let port = keep(image, 5432).await?;
                    Ok(format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres"))
                }
                #[cfg(not(feature = "postgres"))]
                without("postgres")
            }
            Backend::Kafka => {
                #[cfg(feature = "kafka")]
                {
                    use testcontainers_modules::kafka::apache;
                    let port = keep(apache::Kafka::default(), apache::KAFKA_PORT.as_u16()).await?;
                    Ok(format!("127.0.0.1:{port}"))
                }
                #[cfg(not(feature = "kafka"))]
                without("kafka")
            }
            Backend::Mongo => {
                #[cfg(feature = "mongodb")]
                {
                    let image = testcontainers_modules::mongo::Mongo::repl_set().with_tag("7");
                    let port = keep(image, 27017).await?;
                    Ok(format!("mongodb://127.0.0.1:{port}/?directConnection=true"))
                }
                #[cfg(not(feature = "mongodb"))]
                without("mongodb")
            }
            Backend::Redis => {
                #[cfg(feature = "redis")]
                {
                    use testcontainers_modules::redis;
                    let port = keep(redis::Redis::default().with_tag("7-alpine"), redis::REDIS_PORT).await?;
                    Ok(format!("redis://127.0.0.1:{port}"))
                }
                #[cfg(not(feature = "redis"))]
                without("redis")
            }
            Backend::OpenSearch => {
                #[cfg(feature = "opensearch")]
                {
                    use testcontainers::GenericImage;
                    use testcontainers::core::{IntoContainerPort, WaitFor};

                    // The official image as the stack runs it: one node, no security plugin
                    // (plain HTTP, no login), a small heap.
                    let image = GenericImage::new("opensearchproject/opensearch", OPENSEARCH_IMAGE_TAG)
                        .with_exposed_port(9200.tcp())
                        .with_wait_for(WaitFor::message_on_stdout("] started"))
                        .with_env_var("discovery.type", "single-node")
                        .with_env_var("DISABLE_SECURITY_PLUGIN", "true")
                        .with_env_var("DISABLE_INSTALL_DEMO_CONFIG", "true")
                        .with_env_var("OPENSEARCH_JAVA_OPTS", "-Xms256m -Xmx768m");
                    let port = keep(image, 9200).await?;
                    Ok(format!("http://127.0.0.1:{port}"))
                }
                #[cfg(not(feature = "opensearch"))]
                without("opensearch")
            }
            // Mailpit has two addresses: `mailpit_addresses` starts its container.
            Backend::Mailpit => Err(String::from("mailpit is resolved by mailpit_addresses")),
        }
    });
    task.await.map_err(|e| format!("container task failed: {e}"))?
}

/// The OpenSearch image the container fallback runs: the version `scripts/stack.sh` runs.
#[cfg(feature = "opensearch")]
const OPENSEARCH_IMAGE_TAG: &str = "2.19.6";

/// The Mailpit image the container fallback runs: the version `scripts/stack.sh` builds.
#[cfg(feature = "smtp")]
const MAILPIT_IMAGE_TAG: &str = "v1.33.1";

/// Starts a Mailpit container configured like the stack's server.
async fn start_mailpit() -> std::result::Result<MailpitAddresses, String> {
    #[cfg(feature = "smtp")]
    {
        use testcontainers::GenericImage;
        use testcontainers::core::{IntoContainerPort, WaitFor};

        let task = CONTAINER_RUNTIME.spawn(async {
            let image = GenericImage::new("axllent/mailpit", MAILPIT_IMAGE_TAG)
                .with_exposed_port(1025.tcp())
                .with_exposed_port(8025.tcp())
                .with_wait_for(WaitFor::message_on_stdout("accessible via"))
                .with_env_var("MP_MAX_MESSAGES", "2000")
                .with_env_var("MP_MAX_MESSAGE_SIZE", "50")
                .with_env_var("MP_SMTP_AUTH_ACCEPT_ANY", "true")
                .with_env_var("MP_SMTP_AUTH_ALLOW_INSECURE", "true")
                .with_env_var("MP_SMTP_DISABLE_RDNS", "true")
                .with_env_var("MP_DISABLE_VERSION_CHECK", "true");
            let ports = keep_ports(image, &[1025, 8025]).await?;
            Ok(MailpitAddresses {
                smtp: format!("smtp://127.0.0.1:{}", ports[0]),
                api: format!("http://127.0.0.1:{}", ports[1]),
            })
        });
        task.await.map_err(|e| format!("container task failed: {e}"))?
    }
    #[cfg(not(feature = "smtp"))]
    {
        Err(String::from("dbps-testkit was built without its smtp feature"))
    }
}

/// The container error of a backend whose feature is off.
#[allow(dead_code)]
fn without(feature: &str) -> std::result::Result<String, String> {
    Err(format!("dbps-testkit was built without its {feature} feature"))
}

/// Starts `image`, keeps the container for the rest of the process and returns the host
/// port mapped to `port`.
#[cfg_attr(
    not(any(
        feature = "postgres",
        feature = "kafka",
        feature = "mongodb",
        feature = "redis",
        feature = "opensearch"
    )),
    allow(dead_code)
)]
async fn keep<I>(image: impl Into<testcontainers::ContainerRequest<I>>, port: u16) -> std::result::Result<u16, String>
where
    I: Image + 'static,
{
    keep_ports(image, &[port]).await.map(|ports| ports[0])
}

/// Starts `image`, keeps the container for the rest of the process and returns the host
/// ports mapped to `ports`, in their order.
#[cfg_attr(
    not(any(
        feature = "postgres",
        feature = "kafka",
        feature = "mongodb",
        feature = "redis",
        feature = "smtp",
        feature = "opensearch"
    )),
    allow(dead_code)
)]
async fn keep_ports<I>(
    image: impl Into<testcontainers::ContainerRequest<I>>,
    ports: &[u16],
) -> std::result::Result<Vec<u16>, String>
where
    I: Image + 'static,
{
    let request: testcontainers::ContainerRequest<I> = image.into();
    let container: ContainerAsync<I> = request.start().await.map_err(|e| e.to_string())?;
    let mut host_ports = Vec::with_capacity(ports.len());
    for port in ports {
        host_ports.push(container.get_host_port_ipv4(*port).await.map_err(|e| e.to_string())?);
    }
    let id = container.id().to_owned();
    CONTAINERS
        .lock()
        .map_err(|_| String::from("container registry poisoned"))?
        .push((id, Box::new(container)));
    Ok(host_ports)
}

/// The address with any password replaced, for errors and logs.
#[cfg_attr(
    not(any(feature = "postgres", feature = "mongodb", feature = "redis", feature = "opensearch")),
    allow(dead_code)
)]
pub(crate) fn redact(address: &str) -> String {
    let Some((scheme, rest)) = address.split_once("://") else {
        return address.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return address.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => address.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn variable_wins_over_container() {
        let address = resolve(
            Backend::Redis,
            |var| (var == "DBPS_REDIS_URL").then(|| String::from(" redis://10.0.0.1:6379 ")),
            async { panic!("no container may be started when the variable is set") },
        )
        .await
        .expect("resolved");
        assert_eq!(address, "redis://10.0.0.1:6379");
    }

    #[tokio::test]
    async fn container_used_when_variable_empty() {
        let address = resolve(Backend::Kafka, |_| Some(String::new()), async {
            Ok(String::from("127.0.0.1:32768"))
        })
        .await
        .expect("resolved");
        assert_eq!(address, "127.0.0.1:32768");
    }

    #[tokio::test]
    async fn no_server_error_says_how_to_get_one() {
        let error = resolve(Backend::Postgres, |_| None, async {
            Err(String::from("client error: Socket not found: /var/run/docker.sock"))
        })
        .await
        .expect_err("no server anywhere");
        assert!(matches!(
            error,
            Error::NoServer {
                backend: Backend::Postgres,
                ..
            }
        ));
        let message = error.to_string();
        assert!(message.contains("DBPS_POSTGRES_URL is not set"), "{message}");
        assert!(message.contains("scripts/stack.sh up"), "{message}");
        assert!(message.contains("docker.sock"), "{message}");
    }

    #[tokio::test]
    async fn mailpit_takes_both_variables() {
        let addresses = resolve_mailpit(
            |var| match var {
                "DBPS_SMTP_URL" => Some(String::from(" smtp://127.0.0.1:21025 ")),
                "DBPS_MAILPIT_URL" => Some(String::from("http://127.0.0.1:28025")),
                _ => None,
            },
            async { panic!("no container may be started when the variables are set") },
        )
        .await
        .expect("resolved");
        assert_eq!(
            addresses,
            MailpitAddresses {
                smtp: String::from("smtp://127.0.0.1:21025"),
                api: String::from("http://127.0.0.1:28025"),
            }
        );
    }

    #[tokio::test]
    async fn mailpit_with_one_variable_names_the_other() {
        let error = resolve_mailpit(
            |var| (var == "DBPS_SMTP_URL").then(|| String::from("smtp://127.0.0.1:21025")),
            async { panic!("no container may be started when a variable is set") },
        )
        .await
        .expect_err("half a configuration");
        assert!(
            matches!(
                error,
                Error::InvalidAddress {
                    backend: Backend::Mailpit,
                    var: "DBPS_MAILPIT_URL",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("set both"), "{error}");
    }

    #[tokio::test]
    async fn no_mailpit_error_says_how_to_get_one() {
        let error = resolve_mailpit(|_| None, async { Err(String::from("no docker")) })
            .await
            .expect_err("no server anywhere");
        let message = error.to_string();
        assert!(message.starts_with("no mailpit server"), "{message}");
        assert!(message.contains("DBPS_SMTP_URL is not set"), "{message}");
        assert!(message.contains("scripts/stack.sh up"), "{message}");
    }

    #[tokio::test]
    async fn opensearch_comes_from_its_variable() {
        assert_eq!(Backend::OpenSearch.env_var(), "DBPS_OPENSEARCH_URL");
        assert_eq!(Backend::OpenSearch.to_string(), "opensearch");
        let address = resolve(
            Backend::OpenSearch,
            |var| (var == "DBPS_OPENSEARCH_URL").then(|| String::from("http://127.0.0.1:29200 ")),
            async { panic!("no container may be started when the variable is set") },
        )
        .await
        .expect("resolved");
        assert_eq!(address, "http://127.0.0.1:29200");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://dbps:secret@127.0.0.1:25432/postgres"),
            "postgres://dbps:***@127.0.0.1:25432/postgres"
        );
        assert_eq!(redact("redis://127.0.0.1:26379"), "redis://127.0.0.1:26379");
        assert_eq!(redact("127.0.0.1:29092"), "127.0.0.1:29092");
        assert_eq!(redact("mongodb://user@h:1/"), "mongodb://user@h:1/");
    }
}
