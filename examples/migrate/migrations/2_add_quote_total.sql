ALTER TABLE quotes ADD COLUMN total_cents bigint NOT NULL DEFAULT 0;
