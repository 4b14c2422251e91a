//! The PostgreSQL outbox: [`PgOutbox`] writes, [`PgOutboxStore`] is what the relay drains.

mod store;
mod writer;

/// The policies are shared by every store; they are re-exported here for convenience.
pub use crate::store::{PoisonPolicy, Retention};
pub use store::{PgLease, PgOutboxStore};
pub use writer::{Enqueued, PgOutbox};

use sqlx::migrate::Migrator;

/// The outbox tables' migrations (`dbps_outbox`, `dbps_outbox_sequences`). Compose them
/// with the service's own in the migration runner.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The channel commits are announced on.
pub(crate) const CHANNEL: &str = "dbps_outbox";
/// Number of hash partitions relays lease (fixed by the table's generated column).
pub(crate) const LEASE_PARTITIONS: i32 = 32;
