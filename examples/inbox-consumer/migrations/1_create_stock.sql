CREATE TABLE stock (
    sku     text   PRIMARY KEY,
    on_hand bigint NOT NULL
);
