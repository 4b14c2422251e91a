-- Idempotency keys of the service's POST (and PATCH) endpoints: one row per key and
-- endpoint. A request claims its key by inserting the row (status null: in progress); the
-- row then keeps the first complete answer, which duplicates of the request get again.
CREATE TABLE dbps_idempotency (
    -- The endpoint: method and path (`POST /orders`).
    scope        text        NOT NULL,
    -- The client's Idempotency-Key.
    key          text        NOT NULL,
    -- SHA-256 of the request (query and body): the same key with another request is refused.
    request_hash bytea       NOT NULL,
    -- The request that holds the key while it is in progress.
    claim        uuid        NOT NULL,
    -- The answer: null while in progress.
    status       smallint,
    headers      jsonb       NOT NULL DEFAULT '{}',
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When the claim was taken (a claim that outlives its lease may be taken over).
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    PRIMARY KEY (scope, key)
);

-- Purging old keys scans by age.
CREATE INDEX dbps_idempotency_created_at ON dbps_idempotency (created_at);
