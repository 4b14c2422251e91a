-- Whether the relay that owns a lease partition is asleep, waiting for a notification.
-- Writers NOTIFY only for sleeping partitions: NOTIFY takes a database-wide lock at
-- commit that serialises committing transactions, so a busy relay, which polls anyway,
-- is not sent any. Unlogged: it is a hint, rebuilt as "asleep" after a crash.
CREATE UNLOGGED TABLE dbps_outbox_wake (
    lease_partition integer PRIMARY KEY,
    sleeping        boolean NOT NULL DEFAULT true
);

INSERT INTO dbps_outbox_wake (lease_partition) SELECT generate_series(0, 31);
