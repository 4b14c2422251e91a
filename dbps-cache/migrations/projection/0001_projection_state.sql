-- Which version of each projection serves its view (`<name>` → `<name>_v<version>`).
-- Applying events to the serving version locks its row in share mode; the switch to a
-- rebuilt version locks it for update, so no batch of the old version commits after it.
CREATE TABLE dbps_projection_state (
    projection      text        PRIMARY KEY,
    serving_version integer,
    switched_at     timestamptz
);

-- Where each version of a projection is in each topic partition: the offset of the next
-- record to apply, written in the transaction that applied the records before it.
CREATE TABLE dbps_projection_checkpoints (
    projection  text        NOT NULL,
    version     integer     NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, version, topic, partition)
);
