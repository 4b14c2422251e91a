//! The inventory service of the dbps example system.
//!
//! It will own the `products`, `inventory`, `stock_movements` and `stock_reservations`
//! tables in its own PostgreSQL database, reserve and release stock as steps of the quote
//! saga, and answer high-frequency stock checks from a Redis cache that its own events
//! invalidate.
