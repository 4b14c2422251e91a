//! Idempotent consumers: each message's effect applied once, although Kafka delivers it
//! at least once.
//!
//! - `pg` (feature `postgres`): `PgInbox` records the message id in the same transaction
//!   as the handler's effect. Use it for every PostgreSQL service.
//! - `mongo` (feature `mongodb`): guarded writes that need no multi-document transaction
//!   — an insert keyed by the message id, or an update guarded by the aggregate's
//!   sequence number — for every MongoDB deployment, and `MongoTransactionalInbox` for
//!   replica sets, where an effect spans several documents.

#[cfg(feature = "mongodb")]
pub mod mongo;
#[cfg(feature = "postgres")]
pub mod pg;
