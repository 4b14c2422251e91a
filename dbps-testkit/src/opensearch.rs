//! OpenSearch (Elasticsearch-compatible REST API) with an index prefix per test.

use std::time::Duration;

use reqwest::{Client, Method, StatusCode, Url};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::error::{Error, Result};
use crate::server::{self, Backend};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The start of every test's index prefix; the rest is unique to the test.
const PREFIX_START: &str = "dbps-t-";

/// Set once the server was told to give new indices no replicas.
static NO_REPLICAS: OnceCell<()> = OnceCell::const_new();

/// The shared OpenSearch server with an index prefix unique to one test: build every index
/// (and alias) name with [`TestOpenSearch::index`], so tests running in parallel never see
/// each other's documents. The test's indices and aliases are deleted when the handle is
/// dropped.
///
/// Talk to the server through [`TestOpenSearch::client`] and [`TestOpenSearch::url`] the
/// way a service would, with its REST API; the helpers cover what tests check most.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let search = dbps_testkit::opensearch().await?;
/// let orders = search.index("orders");
/// search
///     .client()
///     .put(format!("{}/{orders}/_doc/1", search.url()))
///     .json(&serde_json::json!({"customer": "Ada"}))
///     .send()
///     .await?
///     .error_for_status()?;
/// search.refresh(&orders).await?;
/// assert_eq!(search.count(&orders).await?, 1);
/// # Ok(()) }
/// ```
pub struct TestOpenSearch {
    url: &'static str,
    /// `url` with a trailing slash, for joining paths.
    base: Url,
    prefix: String,
    client: Client,
}

impl std::fmt::Debug for TestOpenSearch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestOpenSearch")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The shared OpenSearch server (`DBPS_OPENSEARCH_URL`, else a container) with a fresh
/// index prefix; checks that the server answers.
///
/// Once per test binary it also sets the persistent cluster setting
/// `cluster.default_number_of_replicas` to 0, as `scripts/stack.sh` does: a single node
/// cannot hold replicas, and indices with one would stay yellow.
pub async fn opensearch() -> Result<TestOpenSearch> {
    let url = server::address(Backend::OpenSearch).await?.trim_end_matches('/');
    let base = parse_url(url)?;
    let client = Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| opensearch_error("building the HTTP client", e))?;
    let search = TestOpenSearch {
        url,
        base,
        prefix: format!("{PREFIX_START}{}", crate::unique_suffix()),
        client,
    };
    NO_REPLICAS
        .get_or_try_init(|| async {
            search
                .request(
                    Method::PUT,
                    "_cluster/settings",
                    Some(json!({"persistent": {"cluster.default_number_of_replicas": 0}})),
                    &[],
                )
                .await
                .map_err(|e| match e {
                    Error::OpenSearch { what, source } => Error::OpenSearch {
                        what: format!("{what} (is the stack up? `scripts/stack.sh up`)"),
                        source,
                    },
                    other => other,
                })
                .map(|_| ())
        })
        .await?;
    Ok(search)
}

/// The server's base URL with a trailing slash.
fn parse_url(value: &str) -> Result<Url> {
    let invalid = |reason: String| Error::InvalidAddress {
        backend: Backend::OpenSearch,
        var: Backend::OpenSearch.env_var(),
        reason,
    };
    let url = Url::parse(&format!("{value}/")).map_err(|e| invalid(format!("{e} (in {})", server::redact(value))))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "expected http://host:port, got scheme {:?}",
            url.scheme()
        )));
    }
    if url.cannot_be_a_base() || url.host_str().is_none() {
        return Err(invalid(format!("no host in {}", server::redact(value))));
    }
    Ok(url)
}

fn opensearch_error(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::OpenSearch {
        what: what.into(),
        source: source.into(),
    }
}

/// A reply with an error status, as the error's source.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    body: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.body)
    }
}

impl std::error::Error for Refused {}

impl TestOpenSearch {
    /// The server, `http://host:port`, without a trailing slash.
    pub fn url(&self) -> &str {
        self.url
    }

    /// An HTTP client for the server (cheap to clone).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The prefix every index and alias name of this test starts with (lowercase).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` inside this test's namespace: `<prefix>-<name>`, lowercased (index names
    /// must be). Use it for aliases too, so that they are removed with the test.
    pub fn index(&self, name: &str) -> String {
        format!("{}-{}", self.prefix, name.to_lowercase())
    }

    /// Whether `index` is a name of this test (made by [`TestOpenSearch::index`]).
    pub fn owns(&self, index: &str) -> bool {
        index
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with('-') && rest.len() > 1)
    }

    /// Makes what was indexed into `index` (an index, alias or pattern) visible to search.
    pub async fn refresh(&self, index: &str) -> Result<()> {
        self.request(Method::POST, &format!("{index}/_refresh"), None, &[])
            .await
            .map(|_| ())
    }

    /// How many documents `index` holds that search sees (refresh first to count the
    /// latest writes).
    pub async fn count(&self, index: &str) -> Result<u64> {
        let reply = self
            .request(Method::GET, &format!("{index}/_count"), None, &[])
            .await?
            .unwrap_or_default();
        reply["count"]
            .as_u64()
            .ok_or_else(|| opensearch_error(format!("GET {index}/_count"), format!("no count in {reply}")))
    }

    /// The source of document `id` in `index`, `None` if there is none (a real-time get:
    /// no refresh needed).
    pub async fn get(&self, index: &str, id: &str) -> Result<Option<Value>> {
        let path = format!("{index}/_doc/{}", encode(id));
        Ok(self
            .request(Method::GET, &path, None, &[StatusCode::NOT_FOUND])
            .await?
            .and_then(|mut reply| {
                reply["found"]
                    .as_bool()
                    .unwrap_or(false)
                    .then(|| reply["_source"].take())
            }))
    }

    /// Sends one request; the JSON reply, or `None` for a status in `absent`.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        absent: &[StatusCode],
    ) -> Result<Option<Value>> {
        request(&self.client, &self.base, method, path, body, absent).await
    }
}

/// `value` as one URL path segment.
fn encode(value: &str) -> String {
    let mut url = Url::parse("http://x/").expect("a valid base URL");
    url.path_segments_mut().expect("a base URL").push(value);
    url.path().trim_start_matches('/').to_owned()
}

async fn request(
    client: &Client,
    base: &Url,
    method: Method,
    path: &str,
    body: Option<Value>,
    absent: &[StatusCode],
) -> Result<Option<Value>> {
    let url = base
        .join(path)
        .map_err(|e| opensearch_error(format!("{method} {path}"), e))?;
    let what = format!("{method} {url}");
    let mut builder = client.request(method, url);
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.map_err(|e| opensearch_error(what.clone(), e))?;
    let status = response.status();
    if absent.contains(&status) {
        return Ok(None);
    }
    let text = response.text().await.map_err(|e| opensearch_error(what.clone(), e))?;
    if !status.is_success() {
        return Err(opensearch_error(what, Refused { status, body: text }));
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| opensearch_error(what, e))
}

/// Deletes the indices and aliases named with `prefix`.
///
/// Runs with a client of its own: the test's client may hold pooled connections whose
/// tasks live on the test's runtime, which waits for this cleanup and cannot drive them.
async fn remove(base: Url, prefix: String) -> std::result::Result<(), String> {
    let client = Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let own = format!("{prefix}-");
    let pattern = format!("{own}*");
    // Aliases of the test that point at indices of others (or of no test) first; those of
    // the test's own indices go with them.
    let aliases = request(
        &client,
        &base,
        Method::GET,
        &format!("_alias/{pattern}?expand_wildcards=all"),
        None,
        &[StatusCode::NOT_FOUND],
    )
    .await
    .map_err(|e| error_chain(&e))?
    .unwrap_or_default();
    let mut actions = Vec::new();
    if let Some(indices) = aliases.as_object() {
        for (index, entry) in indices {
            if index.starts_with(&own) {
                continue;
            }
            if let Some(names) = entry["aliases"].as_object() {
                for alias in names.keys() {
                    actions.push(json!({"remove": {"index": index, "alias": alias}}));
                }
            }
        }
    }
    if !actions.is_empty() {
        request(
            &client,
            &base,
            Method::POST,
            "_aliases",
            Some(json!({ "actions": actions })),
            &[],
        )
        .await
        .map_err(|e| error_chain(&e))?;
    }
    // Indices by name, not by pattern: a server may refuse wildcard deletes
    // (action.destructive_requires_name).
    let listed = request(
        &client,
        &base,
        Method::GET,
        &format!("_cat/indices/{pattern}?format=json&h=index&expand_wildcards=all"),
        None,
        &[StatusCode::NOT_FOUND],
    )
    .await
    .map_err(|e| error_chain(&e))?
    .unwrap_or_default();
    // The pattern also matches aliases; only the test's own indices go.
    let names: Vec<&str> = listed
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|row| row["index"].as_str())
                .filter(|index| index.starts_with(&own))
                .collect()
        })
        .unwrap_or_default();
    for chunk in names.chunks(50) {
        request(
            &client,
            &base,
            Method::DELETE,
            &chunk.join(","),
            None,
            &[StatusCode::NOT_FOUND],
        )
        .await
        .map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

fn error_chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Drop for TestOpenSearch {
    fn drop(&mut self) {
        let cleanup = remove(self.base.clone(), self.prefix.clone());
        crate::run_cleanup("opensearch test indices", cleanup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("http://127.0.0.1:29200").expect("valid").as_str(),
            "http://127.0.0.1:29200/"
        );
        assert!(matches!(
            parse_url("127.0.0.1:29200"),
            Err(Error::InvalidAddress {
                backend: Backend::OpenSearch,
                var: "DBPS_OPENSEARCH_URL",
                ..
            })
        ));
    }

    #[test]
    fn ids_are_one_path_segment() {
        assert_eq!(encode("order-1"), "order-1");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
