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
