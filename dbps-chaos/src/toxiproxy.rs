//! A client of Toxiproxy's HTTP API: the TCP proxies the network scenarios put between
//! the workers and the servers, and the faults ("toxics") they add and remove.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The Toxiproxy server.
#[derive(Debug, Clone)]
pub(crate) struct Toxiproxy {
    http: reqwest::Client,
    url: String,
}

/// One proxy: where the workers connect instead of the server.
#[derive(Debug, Clone)]
pub(crate) struct Proxy {
    pub(crate) name: String,
    pub(crate) listen: SocketAddr,
}

/// Which direction of a connection a toxic acts on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    /// Server to client (answers).
    Downstream,
    /// Client to server (requests).
    Upstream,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
        }
    }
}

impl Toxiproxy {
    /// Connects to the server at `url` and checks that it answers.
    pub(crate) async fn connect(url: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .context("HTTP client")?;
        let url = url.trim_end_matches('/').to_owned();
        let version: Value = http
            .get(format!("{url}/version"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| {
                format!("Toxiproxy does not answer at {url}: start it with `scripts/stack.sh start toxiproxy`")
            })?
            .json()
            .await
            .context("Toxiproxy's version")?;
        tracing::debug!(%version, "toxiproxy");
        Ok(Self { http, url })
    }

    /// Creates proxy `name` from `listen` to `upstream`, replacing one of that name.
    pub(crate) async fn proxy(&self, name: &str, listen: &str, upstream: &str) -> Result<Proxy> {
        self.delete(name).await?;
        let created: Value = self
            .call(
                self.http.post(format!("{}/proxies", self.url)).json(&json!({
                    "name": name,
                    "listen": listen,
                    "upstream": upstream,
                    "enabled": true,
                })),
                &format!("create proxy {name}"),
            )
            .await?;
        let listen = created["listen"]
            .as_str()
            .context("the proxy's listen address")?
            .parse()
            .context("the proxy's listen address")?;
        Ok(Proxy {
            name: name.to_owned(),
            listen,
        })
    }

    /// Deletes proxy `name` (and so every connection through it), if it exists.
    pub(crate) async fn delete(&self, name: &str) -> Result<()> {
        let response = self
            .http
            .delete(format!("{}/proxies/{name}", self.url))
            .send()
            .await
            .with_context(|| format!("delete proxy {name}"))?;
        if !response.status().is_success() && response.status() != reqwest::StatusCode::NOT_FOUND {
            bail!("delete proxy {name}: {}", response.status());
        }
        Ok(())
    }

    /// Adds toxic `name` of `kind` with `attributes` to `proxy`.
    pub(crate) async fn add_toxic(
        &self,
        proxy: &Proxy,
        name: &str,
        kind: &str,
        stream: Stream,
        attributes: Value,
    ) -> Result<()> {
        self.call::<Value>(
            self.http
                .post(format!("{}/proxies/{}/toxics", self.url, proxy.name))
                .json(&json!({
                    "name": name,
                    "type": kind,
                    "stream": stream.as_str(),
                    "toxicity": 1.0,
                    "attributes": attributes,
                })),
            &format!("add toxic {name} to {}", proxy.name),
        )
        .await?;
        Ok(())
    }

    /// Removes toxic `name` from `proxy`.
    pub(crate) async fn remove_toxic(&self, proxy: &Proxy, name: &str) -> Result<()> {
        let response = self
            .http
            .delete(format!("{}/proxies/{}/toxics/{name}", self.url, proxy.name))
            .send()
            .await
            .with_context(|| format!("remove toxic {name} from {}", proxy.name))?;
        if !response.status().is_success() {
            bail!("remove toxic {name} from {}: {}", proxy.name, response.status());
        }
        Ok(())
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, request: reqwest::RequestBuilder, what: &str) -> Result<T> {
        let response = request.send().await.with_context(|| what.to_owned())?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{what}: {status}: {body}");
        }
        response.json().await.with_context(|| what.to_owned())
    }
}

/// `url` (`scheme://user:password@host:port/...`) pointed at `addr` instead.
pub(crate) fn via(url: &str, addr: SocketAddr) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => format!("{scheme}://{userinfo}@{addr}{tail}"),
        None => format!("{scheme}://{addr}{tail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_pointed_at_the_proxy() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            via("postgres://u:p@127.0.0.1:25432/db?sslmode=disable", addr),
            "postgres://u:p@127.0.0.1:4000/db?sslmode=disable"
        );
        assert_eq!(via("postgres://h:1", addr), "postgres://127.0.0.1:4000");
    }
}
