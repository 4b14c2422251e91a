-- The Customer service's own table: `version` counts the customer's changes, so it equals
-- the sequence of the customer's newest event.
CREATE TABLE customers (
    id         uuid   PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text   NOT NULL,
    tax_number text,
    version    bigint NOT NULL DEFAULT 1
);
