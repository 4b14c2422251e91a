//! The customer service of the dbps example system.
//!
//! It will own the `customers`, `customer_addresses`, `customer_contacts` and
//! `machine_history` tables in its own PostgreSQL database, serve `POST /customers` and
//! `PUT /customers/{id}` over REST, and publish `CustomerCreated` and `CustomerUpdated`
//! through its transactional outbox. It is the source of truth that the quote service's
//! customer cache and the email service's customer index replicate.
