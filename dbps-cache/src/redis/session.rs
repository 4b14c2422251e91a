//! Sessions of axum services in Redis, through tower-sessions.

use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, SessionStore};

/// A [`SessionStore`] for `tower-sessions` over the workspace's Redis client (the
/// published Redis store for tower-sessions is built on another client).
///
/// Each session is one key, `<namespace><id>`, holding the record as JSON and expiring
/// when the session does: expiry is Redis's, and sessions outlive restarts of the
/// service. Use it with `tower_sessions::SessionManagerLayer::new(store)`.
#[derive(Debug, Clone)]
pub struct RedisSessionStore {
    conn: ConnectionManager,
    namespace: String,
}

impl RedisSessionStore {
    /// A store over `conn`, its keys starting with `namespace` (`<service>:session:`).
    pub fn new(conn: ConnectionManager, namespace: impl Into<String>) -> Self {
        Self {
            conn,
            namespace: namespace.into(),
        }
    }

    fn key(&self, id: &Id) -> String {
        format!("{}{id}", self.namespace)
    }
}

fn backend(error: redis::RedisError) -> session_store::Error {
    session_store::Error::Backend(error.to_string())
}

#[async_trait::async_trait]
impl SessionStore for RedisSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        // A new id until one is free: `SET NX` never overwrites another session.
        loop {
            if self.write(record, true).await? {
                return Ok(());
            }
            record.id = Id::default();
        }
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.write(record, false).await.map(|_| ())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let mut conn = self.conn.clone();
        let text: Option<String> = conn.get(self.key(id)).await.map_err(backend)?;
        text.map(|text| serde_json::from_str(&text).map_err(|e| session_store::Error::Decode(e.to_string())))
            .transpose()
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(self.key(id)).await.map_err(backend)?;
        Ok(())
    }
}

impl RedisSessionStore {
    /// Stores `record` until its expiry; with `only_new`, only if its id is free.
    /// Returns whether it was stored.
    async fn write(&self, record: &Record, only_new: bool) -> session_store::Result<bool> {
        let text = serde_json::to_string(record).map_err(|e| session_store::Error::Encode(e.to_string()))?;
        let ttl_ms = (record.expiry_date - time::OffsetDateTime::now_utc()).whole_milliseconds();
        let ttl_ms = u64::try_from(ttl_ms).unwrap_or(0).max(1);
        let mut command = redis::cmd("SET");
        command.arg(self.key(&record.id)).arg(text).arg("PX").arg(ttl_ms);
        if only_new {
            command.arg("NX");
        }
        let mut conn = self.conn.clone();
        let stored: Option<String> = command.query_async(&mut conn).await.map_err(backend)?;
        Ok(stored.is_some())
    }
}
