//! The transactional outbox: a service's state change and the events it implies commit
//! together, and a relay gets every committed event onto Kafka.
//!
//! `dbps-outbox` will provide:
//!
//! - `PgOutbox`: `enqueue` inside the caller's own sqlx transaction, with per-aggregate
//!   sequence numbers that follow commit order also under concurrent writers.
//! - `MongoOutbox`: events written atomically with the aggregate's own document, so it
//!   works on deployments without multi-document transactions, plus a transactional mode
//!   for replica sets.
//! - A relay that wakes on commit, publishes in batches through the `dbps-core` Kafka
//!   publisher, marks an event only after the broker acknowledged it, never skips an event
//!   whose transaction committed late, keeps per-aggregate order with several relay
//!   instances running, parks poison events for an operator and keeps the table small.
