use dbps_core::kafka::TopicNaming;
use dbps_core::{Envelope, Message, PayloadLimits, TraceContext};
use sqlx::PgConnection;

use crate::error::{OutboxError, Result, store};

/// What [`PgOutbox::enqueue`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The outbox row's id.
    pub id: i64,
    /// The message id.
    pub message_id: String,
    /// The aggregate sequence number given to the message (events only).
    pub sequence: Option<i64>,
}

/// Writes messages into the outbox inside the caller's transaction.
///
/// ```no_run
/// # use dbps_outbox::pg::PgOutbox;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct CustomerCreated { id: String, name: String }
/// # impl dbps_core::Message for CustomerCreated { const TYPE: &'static str = "customer.CustomerCreated"; }
/// # async fn create(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = PgOutbox::new("customer");
/// let mut tx = pool.begin().await?;
/// sqlx::query("insert into customers (id, name) values ($1, $2)").bind("c-1").bind("Ada").execute(&mut *tx).await?;
/// outbox.enqueue_event(&mut tx, "customer", "c-1", &CustomerCreated { id: "c-1".into(), name: "Ada".into() }).await?;
/// tx.commit().await?; // the customer and its event, or neither
/// # Ok(()) }
/// ```
///
/// Events get their aggregate's next sequence number; the row that holds it stays locked
/// until the transaction ends, so two transactions on one aggregate are serialised and
/// its sequence numbers follow commit order. Payload limits are checked before anything
/// is written. A message without trace context takes the current span's (with dbps-core's
/// `opentelemetry` feature) or starts a new trace.
#[derive(Debug, Clone)]
pub struct PgOutbox {
    service: String,
    naming: TopicNaming,
    limits: PayloadLimits,
}

impl PgOutbox {
    /// The outbox of `service` (the CloudEvents source of its messages), with the default
    /// topic naming and payload limits.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            naming: TopicNaming::default(),
            limits: PayloadLimits::default(),
        }
    }

    /// Uses another topic naming.
    pub fn naming(mut self, naming: TopicNaming) -> Self {
        self.naming = naming;
        self
    }

    /// Uses other payload limits.
    pub fn limits(mut self, limits: PayloadLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Enqueues an event about `aggregate_type`/`aggregate_id`, for the aggregate's events
    /// topic (`<service>.<aggregate type>.events` by default).
    pub async fn enqueue_event<M: Message>(
        &self,
        conn: &mut PgConnection,
        aggregate_type: &str,
        aggregate_id: &str,
        event: &M,
    ) -> Result<Enqueued> {
        let envelope =
            Envelope::event(&self.service, aggregate_type, aggregate_id, event).map_err(OutboxError::Message)?;
        let topic = self
            .naming
            .events(&self.service, aggregate_type)
            .map_err(OutboxError::Message)?;
        self.enqueue(conn, &topic, envelope).await
    }

    /// Enqueues an event whose sequence number is the aggregate's own version, taken from
    /// the caller's row instead of the outbox's sequences table: one statement fewer per
    /// event and no `dbps_outbox_sequences` row to update.
    ///
    /// The contract, which the usual optimistic-locking pattern meets:
    ///
    /// - in this transaction, the caller updated (or inserted) the aggregate's row before
    ///   this call, so that row is locked until the transaction ends and the next
    ///   transaction on the aggregate waits for this one (the outbox ids, which are the
    ///   relay's order, then follow commit order per aggregate);
    /// - `version` is the row's version after that update, starting at 1 and growing by
    ///   exactly one per event: consumers and replicas read a missing number as a gap;
    /// - an aggregate type's events are enqueued this way or through
    ///   [`PgOutbox::enqueue_event`], never both (the sequences table would not know these
    ///   numbers).
    ///
    /// ```no_run
    /// # use dbps_outbox::pg::PgOutbox;
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { id: String }
    /// # impl dbps_core::Message for OrderPlaced { const TYPE: &'static str = "orders.OrderPlaced"; }
    /// # async fn place(pool: sqlx::PgPool, outbox: PgOutbox) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;
    /// let version: i64 = sqlx::query_scalar(
    ///     "update orders set status = 'placed', version = version + 1 where id = $1 returning version",
    /// )
    /// .bind("o-1")
    /// .fetch_one(&mut *tx)
    /// .await?;
    /// outbox
    ///     .enqueue_versioned_event(&mut tx, "order", "o-1", version, &OrderPlaced { id: "o-1".into() })
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A `version` below 1 is [`OutboxError::InvalidWrite`], and nothing is written.
    pub async fn enqueue_versioned_event<M: Message>(
        &self,
        conn: &mut PgConnection,
        aggregate_type: &str,
        aggregate_id: &str,
        version: i64,
        event: &M,
    ) -> Result<Enqueued> {
        if version < 1 {
            return Err(OutboxError::InvalidWrite(format!(
                "the version of {aggregate_type} {aggregate_id} is {version}: versions start at 1"
            )));
        }
        let mut envelope =
            Envelope::event(&self.service, aggregate_type, aggregate_id, event).map_err(OutboxError::Message)?;
        envelope.sequence = Some(version);
        let topic = self
            .naming
            .events(&self.service, aggregate_type)
            .map_err(OutboxError::Message)?;
        self.insert(conn, &topic, envelope, Sequence::Given).await
    }

    /// Enqueues any message (an event, a command or a reply) for `topic`. Events with an
    /// aggregate type get the next sequence number of their aggregate.
    pub async fn enqueue(&self, conn: &mut PgConnection, topic: &str, envelope: Envelope) -> Result<Enqueued> {
        let sequence = if envelope.kind == dbps_core::MessageKind::Event && envelope.aggregate_type.is_some() {
            Sequence::FromTable
        } else {
            Sequence::Given
        };
        self.insert(conn, topic, envelope, sequence).await
    }

    /// Checks and stores one message, numbering it as `sequence` says.
    async fn insert(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        mut envelope: Envelope,
        sequence: Sequence,
    ) -> Result<Enqueued> {
        dbps_core::kafka::validate_topic_name(topic).map_err(OutboxError::Message)?;
        self.limits
            .check(envelope.payload_json())
            .map_err(OutboxError::Message)?;
        // Reserved header names are refused now rather than by the relay, after commit.
        dbps_core::wire::check_headers(&envelope.headers).map_err(OutboxError::Message)?;
        if envelope.trace.traceparent.is_none() {
            envelope.trace = TraceContext::current().unwrap_or_else(TraceContext::new_root);
        }
        let headers = (!envelope.headers.is_empty())
            .then(|| serde_json::to_value(&envelope.headers))
            .transpose()
            .map_err(|e| OutboxError::InvalidWrite(format!("headers are not json: {e}")))?;
        // One round trip: (take the next sequence number, locking the aggregate's row until
        // commit,) insert the message and, if the relay owning its partition is asleep,
        // announce it. NOTIFY coalesces identical notifications, so a transaction sends at
        // most one however many messages it enqueues.
        let sql = match sequence {
            Sequence::FromTable => ENQUEUE_NUMBERED,
            Sequence::Given => ENQUEUE_AS_GIVEN,
        };
        let row: (i64, Option<i64>) = sqlx::query_as(sql)
            .bind(topic)
            .bind(&envelope.id)
            .bind(envelope.kind.as_str())
            .bind(&envelope.message_type)
            .bind(i32::try_from(envelope.schema_version).map_err(|_| {
                OutboxError::InvalidWrite(format!("schema version {} is too large", envelope.schema_version))
            })?)
            .bind(&envelope.source)
            .bind(&envelope.aggregate_type)
            .bind(&envelope.aggregate_id)
            .bind(envelope.sequence)
            .bind(envelope.occurred_at)
            .bind(&envelope.correlation_id)
            .bind(&envelope.causation_id)
            .bind(&envelope.reply_to)
            .bind(&envelope.trace.traceparent)
            .bind(&envelope.trace.tracestate)
            .bind(headers)
            .bind(envelope.payload_json())
            .bind(super::CHANNEL)
            .bind("")
            .fetch_one(&mut *conn)
            .await
            .map_err(store("enqueue"))?;
        metrics::counter!("dbps_outbox_enqueued_total", "service" => self.service.clone()).increment(1);
        Ok(Enqueued {
            id: row.0,
            message_id: envelope.id,
            sequence: row.1,
        })
    }
}

/// Where an event's sequence number comes from.
#[derive(Debug, Clone, Copy)]
enum Sequence {
    /// The aggregate's row in `dbps_outbox_sequences`, incremented (and locked) here.
    FromTable,
    /// The envelope's own (the caller's aggregate version, or none for commands and
    /// replies).
    Given,
}

/// The insert's columns and values, `$1` to `$17`, with `$9` the sequence number.
macro_rules! outbox_insert {
    ($sequence:literal, $from:literal) => {
        concat!(
            "insert into dbps_outbox (topic, message_id, kind, message_type, schema_version, source,
                aggregate_type, aggregate_id, sequence, occurred_at, correlation_id, causation_id,
                reply_to, traceparent, tracestate, headers, payload)
            select $1, $2, $3, $4, $5, $6, $7, $8, ",
            $sequence,
            ", $10, $11, $12, $13, $14, $15, $16, $17::json ",
            $from,
            " returning id, sequence, lease_partition"
        )
    };
}

/// Wakes the relay of the inserted row's partition only if it sleeps (`$18` the channel,
/// `$19` the payload); a missing row (after a crash) counts as asleep.
macro_rules! wake_if_asleep {
    () => {
        "select id, sequence from row left join lateral (
            select pg_notify($18, $19)
            where coalesce((select sleeping from dbps_outbox_wake w
                            where w.lease_partition = row.lease_partition), true)
        ) n on true"
    };
}

/// An event numbered by the sequences table. Selecting from `seq` makes the id (the
/// relay's order) be drawn only after the aggregate's sequence row is locked, so ids of
/// one aggregate follow its sequence numbers, which follow commit order.
const ENQUEUE_NUMBERED: &str = concat!(
    "with seq as (
        insert into dbps_outbox_sequences as s (aggregate_type, aggregate_id, last_sequence)
        select $7, $8, 1
        on conflict (aggregate_type, aggregate_id) do update set last_sequence = s.last_sequence + 1
        returning last_sequence
    ), row as (",
    outbox_insert!("seq.last_sequence", "from seq"),
    ") ",
    wake_if_asleep!()
);

/// A message stored with the envelope's own sequence number (or none).
const ENQUEUE_AS_GIVEN: &str = concat!("with row as (", outbox_insert!("$9", ""), ") ", wake_if_asleep!());
