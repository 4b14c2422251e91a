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
