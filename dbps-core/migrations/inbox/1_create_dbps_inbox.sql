-- The inbox: one row per (consumer, message) a consumer applied. The row is inserted in
-- the transaction of the message's effect, so the effect and the record of it commit
-- together and a redelivered message finds its row and is skipped.
CREATE TABLE dbps_inbox (
    consumer    text        NOT NULL,
    message_id  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Purging old records scans by age.
CREATE INDEX dbps_inbox_received_at ON dbps_inbox (received_at);
