//! Mailpit, the local stack's SMTP server, read back through its HTTP API: the mail that
//! reached an address, and one message with its text.

use anyhow::Context as _;
use serde_json::Value;

/// Where Mailpit's API is unless `DBPS_MAILPIT_URL` says otherwise.
const DEFAULT_API: &str = "http://127.0.0.1:28025";

/// A message as Mailpit's search lists it.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    /// Mailpit's id of the message (for [`Mailpit::message`]).
    pub(crate) id: String,
    /// The `Message-ID` header, without its angle brackets.
    pub(crate) message_id: String,
    /// The `To` addresses.
    pub(crate) to: Vec<String>,
    /// The subject.
    pub(crate) subject: String,
}

/// One message with its plain-text body.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) summary: Summary,
    /// The `From` address.
    pub(crate) from: String,
    /// The plain-text body.
    pub(crate) text: String,
}

/// Mailpit's HTTP API.
#[derive(Debug)]
pub(crate) struct Mailpit {
    api: String,
    http: reqwest::Client,
}

impl Mailpit {
    /// The API at `DBPS_MAILPIT_URL` (default `http://127.0.0.1:28025`).
    pub(crate) fn from_env(http: reqwest::Client) -> Self {
        let api = std::env::var("DBPS_MAILPIT_URL")
            .ok()
            .map(|v| v.trim().trim_end_matches('/').to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_API.to_owned());
        Self { api, http }
    }

    /// The messages whose `To` names `address`, newest first, and the path asked.
    pub(crate) async fn to(&self, address: &str) -> anyhow::Result<(String, Vec<Summary>)> {
        let query = format!("to:\"{address}\"");
        let path = format!("/api/v1/search?query={query}");
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/search", self.api))
            .with_context(|| format!("DBPS_MAILPIT_URL={} is not a URL", self.api))?;
        url.query_pairs_mut()
            .append_pair("query", &query)
            .append_pair("limit", "100");
        let body = self.get(self.http.get(url), &path).await?;
        let messages = body["messages"]
            .as_array()
            .map(|list| list.iter().map(summary).collect::<Vec<_>>())
            .unwrap_or_default();
        // Mailpit's search matches parts of addresses: keep the exact ones.
        let exact = messages
            .into_iter()
            .filter(|m| m.to.iter().any(|to| to.eq_ignore_ascii_case(address)))
            .collect();
        Ok((path, exact))
    }

    /// One message, and the path asked.
    pub(crate) async fn message(&self, id: &str) -> anyhow::Result<(String, Message)> {
        let path = format!("/api/v1/message/{id}");
        let body = self.get(self.http.get(format!("{}{path}", self.api)), &path).await?;
        let message = Message {
            summary: summary(&body),
            from: body["From"]["Address"].as_str().unwrap_or_default().to_owned(),
            text: body["Text"].as_str().unwrap_or_default().to_owned(),
        };
        Ok((path, message))
    }

    async fn get(&self, request: reqwest::RequestBuilder, path: &str) -> anyhow::Result<Value> {
        let what = format!("GET {}{path} (Mailpit; is the stack up? scripts/stack.sh up)", self.api);
        let response = request.send().await.with_context(|| what.clone())?;
        let status = response.status();
        if !status.is_success() {
            anyhow::bail!("{what} answered {status}");
        }
        response.json().await.with_context(|| what.clone())
    }
}

fn summary(m: &Value) -> Summary {
    let text = |field: &str| m[field].as_str().unwrap_or_default().to_owned();
    Summary {
        id: text("ID"),
        message_id: text("MessageID"),
        to: m["To"]
            .as_array()
            .map(|to| {
                to.iter()
                    .filter_map(|a| a["Address"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        subject: text("Subject"),
    }
}
