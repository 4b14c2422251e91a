-- The purchase-order service's own tables: its purchase orders with their lines, and the
-- customers' credit limits (a customer without a row has the configured default).
CREATE TABLE purchase_orders (
    id           uuid        PRIMARY KEY,
    -- One purchase order per quote, ever: a command sent again finds it here.
    quote_id     uuid        NOT NULL UNIQUE,
    customer_id  uuid        NOT NULL,
    total_cents  bigint      NOT NULL CHECK (total_cents > 0),
    state        text        NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'cancelled')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    cancelled_at timestamptz,
    CHECK ((state = 'cancelled') = (cancelled_at IS NOT NULL))
);

CREATE INDEX purchase_orders_customer_id ON purchase_orders (customer_id);

CREATE TABLE purchase_order_lines (
    purchase_order_id uuid    NOT NULL REFERENCES purchase_orders (id) ON DELETE CASCADE,
    line_no           integer NOT NULL CHECK (line_no > 0),
    product_id        uuid    NOT NULL,
    quantity          bigint  NOT NULL CHECK (quantity > 0),
    unit_price_cents  bigint  NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (purchase_order_id, line_no)
);

CREATE TABLE credit_limits (
    customer_id uuid        PRIMARY KEY,
    limit_cents bigint      NOT NULL CHECK (limit_cents >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
