use mongodb::{Client, Database};

use crate::error::{Error, Result};
use crate::server::{self, Backend};

/// A fresh MongoDB database for one test, dropped when this handle is dropped.
#[derive(Debug)]
pub struct TestMongo {
    client: Client,
    database: Database,
}

/// Connects to the shared MongoDB server and names a fresh database.
pub async fn mongo() -> Result<TestMongo> {
    let address = server::address(Backend::Mongo).await?;
    let name = format!("dbps_t_{}", crate::unique_suffix());
    let client = Client::with_uri_str(address)
        .await
        .map_err(|source| match *source.kind {
            mongodb::error::ErrorKind::InvalidArgument { .. } => Error::InvalidAddress {
                backend: Backend::Mongo,
                var: Backend::Mongo.env_var(),
                reason: format!("{source} (in {})", server::redact(address)),
            },
            _ => Error::Mongo {
                database: name.clone(),
                source,
            },
        })?;
    let database = client.database(&name);
    Ok(TestMongo { client, database })
}

impl TestMongo {
    /// A client connected to the server.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This test's database.
    pub fn database(&self) -> &Database {
        &self.database
    }
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        // The client's connections belong to the test's runtime, which may be gone; the
        // cleanup connects afresh.
        let address = server::address_if_resolved(Backend::Mongo);
        let name = self.database.name().to_owned();
        let Some(address) = address else { return };
        crate::run_cleanup("a mongodb test database", async move {
            let client = Client::with_uri_str(address).await.map_err(|e| e.to_string())?;
            client
                .database(&name)
                .drop()
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            client.shutdown().immediate(true).await;
            Ok(())
        });
    }
}
