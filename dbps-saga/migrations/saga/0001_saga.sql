-- One row per saga instance: where it is, what it waits for and until when.
CREATE TABLE dbps_saga_instances (
    id           uuid        PRIMARY KEY,
    saga_type    text        NOT NULL,
    version      integer     NOT NULL,
    state        text        NOT NULL CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'stuck')),
    data         jsonb       NOT NULL,
    -- The step running or being compensated.
    step         integer     NOT NULL,
    -- Attempt of that step's command or compensation, from 0.
    attempt      integer     NOT NULL DEFAULT 0,
    -- The message id of the command whose reply the saga waits for; a reply caused by
    -- any other message is late or duplicate and changes nothing.
    awaiting     text,
    deadline     timestamptz,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- Bumped by every transition (optimistic version, for readers and operators).
    lock_version bigint      NOT NULL DEFAULT 0
);

-- Due deadlines are claimed in deadline order.
CREATE INDEX dbps_saga_instances_due ON dbps_saga_instances (deadline)
    WHERE state IN ('running', 'compensating');
CREATE INDEX dbps_saga_instances_state ON dbps_saga_instances (state, updated_at);

-- Append-only audit of every transition.
CREATE TABLE dbps_saga_history (
    id          bigserial   PRIMARY KEY,
    saga_id     uuid        NOT NULL REFERENCES dbps_saga_instances (id),
    at          timestamptz NOT NULL DEFAULT now(),
    step        integer     NOT NULL,
    from_state  text        NOT NULL,
    to_state    text        NOT NULL,
    cause       text        NOT NULL,
    message_id  text
);
CREATE INDEX dbps_saga_history_saga ON dbps_saga_history (saga_id, id);
