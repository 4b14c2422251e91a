use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use crate::error::{Error, Result};
use crate::server::{self, Backend};

/// A Redis connection with a key prefix unique to one test; the prefix's keys are deleted
/// when this handle is dropped.
///
/// Build every key with [`TestRedis::key`] so that tests running in parallel never see each
/// other's keys.
pub struct TestRedis {
    client: redis::Client,
    connection: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for TestRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRedis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Connects to the shared Redis server with a fresh key prefix.
pub async fn redis() -> Result<TestRedis> {
    let address = server::address(Backend::Redis).await?;
    let client = redis::Client::open(address).map_err(|e| Error::InvalidAddress {
        backend: Backend::Redis,
        var: Backend::Redis.env_var(),
        reason: format!("{e} (in {})", server::redact(address)),
    })?;
    let connection = ConnectionManager::new(client.clone()).await.map_err(Error::Redis)?;
    Ok(TestRedis {
        client,
        connection,
        prefix: format!("dbps:t:{}:", crate::unique_suffix()),
    })
}

impl TestRedis {
    /// A connection to the server (cheap to clone, reconnects by itself).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// The prefix every key of this test starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` inside this test's namespace.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let client = self.client.clone();
        let pattern = format!("{}*", self.prefix);
        crate::run_cleanup("redis test keys", async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            let keys: Vec<String> = {
                let mut iter = conn
                    .scan_match::<_, String>(&pattern)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut keys = Vec::new();
                while let Some(key) = iter.next_item().await {
                    keys.push(key.map_err(|e| e.to_string())?);
                }
                keys
            };
            for chunk in keys.chunks(500) {
                let _: () = conn.del(chunk).await.map_err(|e| e.to_string())?;
            }
            Ok(())
        });
    }
}

/// A Redis server of one test's own, started from the `redis-server` binary (`PATH`, or
/// `DBPS_REDIS_SERVER`) on a free loopback port, without persistence — for tests that stop
/// and restart Redis, which the shared server cannot do for them. Stopped on drop.
#[derive(Debug)]
pub struct RedisProcess {
    binary: String,
    port: u16,
    child: Option<std::process::Child>,
}

/// Starts a private Redis server and waits until it answers.
pub async fn redis_process() -> Result<RedisProcess> {
    let binary = std::env::var("DBPS_REDIS_SERVER").unwrap_or_else(|_| String::from("redis-server"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| Error::NoServer {
            backend: Backend::Redis,
            var: "DBPS_REDIS_SERVER",
            reason: format!("no free port: {e}"),
        })?;
    let mut process = RedisProcess {
        binary,
        port,
        child: None,
    };
    process.start().await?;
    Ok(process)
}

impl RedisProcess {
    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub async fn start(&mut self) -> Result<()> {
        let child = std::process::Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Error::NoServer {
                backend: Backend::Redis,
                var: "DBPS_REDIS_SERVER",
                reason: format!(
                    "could not start {} ({e}); `scripts/stack.sh up` installs it",
                    self.binary
                ),
            })?;
        self.child = Some(child);
        let client = redis::Client::open(self.url()).map_err(Error::Redis)?;
        crate::eventually("the private redis server to answer", || {
            let client = client.clone();
            async move {
                match client.get_multiplexed_async_connection().await {
                    Ok(mut conn) => redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .map(|pong| pong == "PONG")
                        .or(Ok::<_, redis::RedisError>(false)),
                    Err(_) => Ok(false),
                }
            }
        })
        .await
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
