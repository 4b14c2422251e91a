-- The quote service's own tables (ADR-003: quotes, quote_line_items, machine_configurations,
-- and its customer_cache replica of the customer service's customers).
CREATE TABLE quotes (
    id            uuid        PRIMARY KEY,
    customer_id   uuid        NOT NULL,
    sales_rep     text        NOT NULL CHECK (position('@' in sales_rep) > 1),
    status        text        NOT NULL CHECK (status IN
                      ('New', 'Awaiting Stock', 'Stock Reserved', 'Pending Stock', 'Ordering', 'Ordered', 'Order Failed')),
    status_reason text,
    total_cents   bigint      NOT NULL CHECK (total_cents >= 0),
    -- The sagas that drive it: the stock check (from creation) and the order (from acceptance).
    stock_saga    uuid,
    order_saga    uuid,
    purchase_order_id uuid,
    version       bigint      NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quotes_customer ON quotes (customer_id);

CREATE TABLE quote_line_items (
    quote_id         uuid    NOT NULL REFERENCES quotes (id) ON DELETE CASCADE,
    line_no          integer NOT NULL,
    product_id       uuid    NOT NULL,
    quantity         bigint  NOT NULL CHECK (quantity > 0),
    unit_price_cents bigint  NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (quote_id, line_no)
);

CREATE TABLE machine_configurations (
    id       uuid  PRIMARY KEY,
    quote_id uuid  NOT NULL REFERENCES quotes (id) ON DELETE CASCADE,
    machine  text  NOT NULL CHECK (length(machine) BETWEEN 1 AND 200),
    options  jsonb NOT NULL DEFAULT '{}'
);

-- The replica: what the quote service keeps of each customer, from the customer service's
-- events (and its snapshot, for backfill). Written only by the replica.
CREATE TABLE customer_cache (
    id              uuid   PRIMARY KEY,
    name            text   NOT NULL,
    tax_number      text   NOT NULL,
    source_sequence bigint NOT NULL
);
