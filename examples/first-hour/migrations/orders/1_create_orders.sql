CREATE TABLE orders (
    id          uuid   PRIMARY KEY DEFAULT gen_random_uuid(),
    customer    text   NOT NULL,
    total_cents bigint NOT NULL CHECK (total_cents > 0)
);
