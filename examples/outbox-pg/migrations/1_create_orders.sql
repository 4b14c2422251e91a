CREATE TABLE orders (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    total_cents bigint      NOT NULL CHECK (total_cents >= 0),
    placed_at   timestamptz NOT NULL DEFAULT now()
);
