-- The customer service's own tables (ADR-003: customers, addresses, contacts, machine history).
CREATE TABLE customers (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    tax_number  text        NOT NULL CHECK (length(tax_number) BETWEEN 1 AND 64),
    email       text        NOT NULL CHECK (position('@' in email) > 1),
    version     bigint      NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE customer_addresses (
    id          uuid PRIMARY KEY,
    customer_id uuid NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    street      text NOT NULL,
    city        text NOT NULL,
    postal_code text NOT NULL,
    country     text NOT NULL
);

CREATE TABLE customer_contacts (
    id          uuid PRIMARY KEY,
    customer_id uuid NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    name        text NOT NULL,
    email       text,
    phone       text
);

CREATE TABLE machine_history (
    id           uuid        PRIMARY KEY,
    customer_id  uuid        NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    machine      text        NOT NULL,
    installed_at timestamptz NOT NULL
);
