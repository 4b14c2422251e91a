-- A parallel group's branches while it runs or is compensated: per branch its name, state
-- (sent, succeeded, failed, compensating, compensated) and the message id whose reply it
-- waits for. NULL for any other step.
ALTER TABLE dbps_saga_instances ADD COLUMN branches jsonb;
