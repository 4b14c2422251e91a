-- The version of every aggregate a replica keeps: the newest sequence applied, and for a
-- deleted aggregate its tombstone (deleted = true), so that a late or redelivered update
-- cannot bring it back. Applying an event locks its aggregate's row, so two consumers
-- that briefly share a partition during a rebalance cannot both apply it.
CREATE TABLE dbps_replica_versions (
    replica      text        NOT NULL,
    aggregate_id text        NOT NULL,
    sequence     bigint      NOT NULL,
    deleted      boolean     NOT NULL DEFAULT false,
    source_time  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replica, aggregate_id)
);

-- Purging tombstones scans the deleted ones by age.
CREATE INDEX dbps_replica_versions_tombstones ON dbps_replica_versions (replica, updated_at) WHERE deleted;
