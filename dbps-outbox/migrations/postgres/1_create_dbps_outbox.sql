-- The transactional outbox. A service inserts its messages here in the transaction of
-- the state change they describe; the relay publishes them to Kafka and then deletes
-- them (or marks them published, when published rows are kept for a while).
CREATE TABLE dbps_outbox (
    id              bigserial   PRIMARY KEY,
    topic           text        NOT NULL,
    message_id      text        NOT NULL,
    kind            text        NOT NULL,
    message_type    text        NOT NULL,
    schema_version  integer     NOT NULL,
    source          text        NOT NULL,
    aggregate_type  text,
    aggregate_id    text        NOT NULL,
    sequence        bigint,
    occurred_at     timestamptz NOT NULL,
    correlation_id  text,
    causation_id    text,
    reply_to        text,
    traceparent     text,
    tracestate      text,
    headers         jsonb,
    payload         json        NOT NULL,
    -- Relays share the outbox by leasing these hash partitions of the Kafka key, so all
    -- messages of one aggregate are relayed by one relay at a time, in id order.
    lease_partition integer     NOT NULL GENERATED ALWAYS AS ((hashtext(aggregate_id) & 2147483647) % 32) STORED,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at    timestamptz,
    parked_at       timestamptz,
    park_reason     text
);

-- What the relay reads: unpublished, unparked rows in id order.
CREATE INDEX dbps_outbox_pending ON dbps_outbox (id) WHERE published_at IS NULL AND parked_at IS NULL;
-- Parked rows, for operators and for the policy that holds back an aggregate's later events.
CREATE INDEX dbps_outbox_parked ON dbps_outbox (aggregate_id) WHERE parked_at IS NOT NULL;
-- Retention of published rows, when they are kept.
CREATE INDEX dbps_outbox_published ON dbps_outbox (published_at) WHERE published_at IS NOT NULL;

-- The last sequence number of each aggregate. Enqueueing an event increments its row,
-- which locks it until the transaction ends: a second transaction on the same aggregate
-- waits, so sequence numbers (and outbox ids) of one aggregate follow commit order.
CREATE TABLE dbps_outbox_sequences (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
