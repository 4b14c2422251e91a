CREATE TABLE order_stats (
    customer    text   PRIMARY KEY,
    orders      bigint NOT NULL,
    total_cents bigint NOT NULL
);
