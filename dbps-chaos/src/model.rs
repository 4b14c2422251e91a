//! What the system under test writes and applies, and the tables the checker reads.

use dbps_core::Message;
use serde::{Deserialize, Serialize};

/// The aggregate type of every event the writers commit.
pub(crate) const AGGREGATE_TYPE: &str = "order";

/// The MongoDB collection of the aggregates, in the MongoDB scenario.
pub(crate) const MONGO_ORDERS: &str = "orders";

/// The service name (CloudEvents source) of the writers' outbox.
pub(crate) const SERVICE: &str = "chaos";

/// The inbox consumer name of the effect the consumers apply.
pub(crate) const INBOX_CONSUMER: &str = "chaos-effects";

/// Header that marks a record the harness injected as poison, with the record's id.
pub(crate) const POISON_HEADER: &str = "chaos-poison";

/// The event the writers commit, one per transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderChanged {
    /// The order (aggregate) the event is about.
    pub(crate) order_id: String,
    /// Which writer process committed it.
    pub(crate) writer: u32,
    /// The writer's slot number for it.
    pub(crate) slot: u64,
    /// Filler that makes a record too large for the relay's publisher (poison scenario).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) padding: String,
}

impl Message for OrderChanged {
    const TYPE: &'static str = "chaos.OrderChanged";
}

/// The writers' own tables, in the service's database next to the outbox.
///
/// `committed_events` is the business row: written in the transaction that enqueues the
/// event, so it exists exactly when the event was committed. `rolled_back_events` is
/// written after a rollback, in a transaction of its own.
pub(crate) const SERVICE_SCHEMA: &str = r"
create table committed_events (
    message_id   text    primary key,
    aggregate_id text    not null,
    sequence     bigint  not null,
    outbox_id    bigint  not null,
    writer       integer not null,
    late_ms      integer not null default 0,
    poison       text
);
create table rolled_back_events (
    message_id   text primary key,
    aggregate_id text not null
);
";

/// The consumer's own tables, in the consumer's database next to its inbox.
///
/// `effects` has no unique constraint on purpose: an effect applied twice shows up as
/// two rows. `effect_totals` is a counter updated in the same transaction.
pub(crate) const CONSUMER_SCHEMA: &str = r"
create table effects (
    id           bigserial   primary key,
    message_id   text        not null,
    aggregate_id text        not null,
    sequence     bigint,
    applied_at   timestamptz not null default clock_timestamp()
);
create table effect_totals (
    aggregate_id  text   primary key,
    applied       bigint not null,
    last_sequence bigint
);
";

/// The id of aggregate number `n`.
pub(crate) fn aggregate_id(n: u32) -> String {
    format!("order-{n}")
}

// ---------------------------------------------------------------------------------------
// The replica scenario
// ---------------------------------------------------------------------------------------

/// The aggregate type of the replica scenario's events.
pub(crate) const CUSTOMER: &str = "customer";

/// The replica's name: its table in the replica database, and its inbox consumer
/// (`replica:<name>`).
pub(crate) const REPLICA_NAME: &str = "customer_replica";

/// Header of a record the replayer published again: the original message's id.
pub(crate) const REPLAY_HEADER: &str = "chaos-replay";

/// A customer was created or changed: its whole state as of the event's sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CustomerChanged {
    /// The customer (aggregate).
    pub(crate) id: String,
    /// Its name as of this version.
    pub(crate) name: String,
}

impl Message for CustomerChanged {
    const TYPE: &'static str = "chaos.CustomerChanged";
}

/// A customer was deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CustomerDeleted {
    /// The customer (aggregate).
    pub(crate) id: String,
}

impl Message for CustomerDeleted {
    const TYPE: &'static str = "chaos.CustomerDeleted";
}

dbps_core::message_set! {
    /// The events the replica understands.
    pub(crate) enum CustomerEvents { Changed(CustomerChanged), Deleted(CustomerDeleted) }
}

/// The owner's tables, in the service database next to the outbox and
/// `committed_events` (which the customer writers fill as the other writers do).
///
/// `chaos_customers` is the source of truth the replica is compared with: `version` is
/// the sequence of the customer's latest event. `deleted_customers` holds each deleted
/// customer and the sequence of its delete event, written in the delete's transaction.
/// `source_events` keeps each event's type and payload, so that the replayer can publish
/// it again later; `replayed_events` lists what it published again (under fresh ids),
/// with the customer's sequence at that moment.
pub(crate) const REPLICA_SOURCE_SCHEMA: &str = r"
create table chaos_customers (
    id      text   primary key,
    name    text   not null,
    version bigint not null
);
create table deleted_customers (
    id         text        primary key,
    sequence   bigint      not null,
    deleted_at timestamptz not null default clock_timestamp()
);
create table source_events (
    message_id   text  primary key,
    message_type text  not null,
    payload      jsonb not null
);
create table replayed_events (
    message_id       text        primary key,
    original_id      text        not null,
    aggregate_id     text        not null,
    sequence         bigint      not null,
    current_sequence bigint      not null,
    replayed_at      timestamptz not null default clock_timestamp()
);
";

/// The replica's table, in the replica database next to `dbps_inbox` and
/// `dbps_replica_versions`.
pub(crate) const REPLICA_SCHEMA: &str = r"
create table customer_replica (
    id              text   primary key,
    name            text   not null,
    source_sequence bigint not null
);
";

/// The id of customer number `n`.
pub(crate) fn customer_id(n: u32) -> String {
    format!("customer-{n}")
}
