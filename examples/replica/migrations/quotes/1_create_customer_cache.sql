-- The Quote service's copy of the customers it quotes for.
CREATE TABLE customer_cache (
    id              uuid   PRIMARY KEY,
    name            text   NOT NULL,
    tax_number      text,
    source_sequence bigint NOT NULL
);
