-- A step that awaits an event: the key an arriving event must match (saga type, step and
-- the correlation key, e.g. the quote's id). Cleared when the saga moves on.
ALTER TABLE dbps_saga_instances ADD COLUMN await_key text;
CREATE INDEX dbps_saga_instances_await ON dbps_saga_instances (await_key) WHERE await_key IS NOT NULL;
