//! The messaging spine of dbps: what every other dbps crate builds on.
//!
//! A system that gives each service its own database can no longer share a transaction
//! between services. What it shares instead are messages. `dbps-core` will define them and
//! move them:
//!
//! - **Envelope and typed events**: one envelope for events, commands and replies, with
//!   event id (UUIDv7), type and schema version, source, aggregate type, id and
//!   per-aggregate sequence number, correlation and causation ids and W3C trace context;
//!   typed events with registered upcasters; payload size and nesting limits.
//! - **Wire format**: the CloudEvents 1.0 Kafka protocol binding in binary content mode,
//!   so that services in other languages read dbps events and dbps reads theirs.
//! - **Kafka**: topic naming and idempotent provisioning, an idempotent `KafkaPublisher`,
//!   and a consumer runner that commits an offset only after its message was handled or
//!   dead-lettered.
//! - **Inbox**: idempotent consumers whose de-duplication record commits in the same
//!   transaction as the effect, on PostgreSQL and MongoDB.
//! - **Migrations**: a per-service migration runner with provisioning of least-privilege
//!   roles.
//! - **Resilience**: retries with backoff and circuit breakers between services.
//!
//! This crate is deliberately small and slow to change: the other dbps crates depend on
//! it, and it depends on none of them.
