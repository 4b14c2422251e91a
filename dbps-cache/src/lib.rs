//! Event-driven replication: local, denormalised copies of another service's data.
//!
//! `dbps-cache` will provide a `ReplicaProjector` that keeps a local table (for example
//! the quote service's `customer_cache {id, name, tax_number}`) up to date from another
//! service's events and never goes back to an older version of a record, and a Redis
//! cache with TTL whose entries events invalidate without a loader that read before the
//! invalidation putting a stale value back.
