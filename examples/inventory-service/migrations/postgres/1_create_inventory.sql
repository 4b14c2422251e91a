-- The inventory service's own tables: products, their stock, the movements of goods in and
-- out, and the stock held for quotes.
CREATE TABLE products (
    id               uuid        PRIMARY KEY,
    sku              text        NOT NULL UNIQUE CHECK (length(sku) BETWEEN 1 AND 64),
    name             text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    unit_price_cents bigint      NOT NULL CHECK (unit_price_cents >= 0),
    version          bigint      NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- One row per product. Available stock is on_hand - reserved and can never be negative.
CREATE TABLE inventory (
    product_id uuid        PRIMARY KEY REFERENCES products (id),
    on_hand    bigint      NOT NULL CHECK (on_hand >= 0),
    reserved   bigint      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    version    bigint      NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inventory_available_not_negative CHECK (reserved <= on_hand)
);

-- Every change of on_hand, append-only: goods received and returned come in (quantity > 0),
-- goods shipped go out (quantity < 0).
CREATE TABLE stock_movements (
    id         uuid        PRIMARY KEY,
    product_id uuid        NOT NULL REFERENCES products (id),
    quantity   bigint      NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('received', 'shipped', 'returned')),
    quote_id   uuid,
    at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT stock_movements_sign CHECK (quantity <> 0 AND (kind = 'shipped') = (quantity < 0))
);

CREATE INDEX stock_movements_product ON stock_movements (product_id, at);

CREATE FUNCTION stock_movements_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'stock_movements is append-only: % refused', TG_OP;
END;
$$;

CREATE TRIGGER stock_movements_append_only
    BEFORE UPDATE OR DELETE ON stock_movements
    FOR EACH STATEMENT EXECUTE FUNCTION stock_movements_append_only();

-- The stock a quote holds, one row per product of the quote: reserved when the quote is
-- created, confirmed when its goods ship, released when it is dropped or compensated.
CREATE TABLE stock_reservations (
    quote_id   uuid        NOT NULL,
    product_id uuid        NOT NULL REFERENCES products (id),
    quantity   bigint      NOT NULL CHECK (quantity > 0),
    state      text        NOT NULL DEFAULT 'reserved' CHECK (state IN ('reserved', 'confirmed', 'released')),
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (quote_id, product_id)
);
