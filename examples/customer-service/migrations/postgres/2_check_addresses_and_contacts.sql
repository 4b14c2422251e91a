-- What the service checks at its HTTP edge, held by the tables too, and the indexes that
-- read a customer's addresses, contacts and machines.
ALTER TABLE customer_addresses
    ADD CONSTRAINT customer_addresses_kind CHECK (kind IN ('billing', 'shipping', 'site')),
    ADD CONSTRAINT customer_addresses_street CHECK (length(street) BETWEEN 1 AND 200),
    ADD CONSTRAINT customer_addresses_city CHECK (length(city) BETWEEN 1 AND 100),
    ADD CONSTRAINT customer_addresses_postal_code CHECK (length(postal_code) BETWEEN 1 AND 16),
    ADD CONSTRAINT customer_addresses_country CHECK (country ~ '^[A-Z]{2}$');

ALTER TABLE customer_contacts
    ADD CONSTRAINT customer_contacts_name CHECK (length(name) BETWEEN 1 AND 200),
    ADD CONSTRAINT customer_contacts_email CHECK (email IS NULL OR position('@' in email) > 1),
    ADD CONSTRAINT customer_contacts_phone CHECK (phone IS NULL OR length(phone) BETWEEN 1 AND 32);

CREATE INDEX customer_addresses_customer ON customer_addresses (customer_id, id);
CREATE INDEX customer_contacts_customer ON customer_contacts (customer_id, id);
CREATE INDEX machine_history_customer ON machine_history (customer_id, installed_at, id);
