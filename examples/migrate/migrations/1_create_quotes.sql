CREATE TABLE quotes (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id uuid NOT NULL,
    status      text NOT NULL DEFAULT 'draft'
);
