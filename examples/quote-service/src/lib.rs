//! The quote service of the dbps example system.
//!
//! It will own the `quotes`, `quote_line_items` and `machine_configurations` tables in its
//! own PostgreSQL database, keep a `customer_cache {id, name, tax_number}` replica up to
//! date from the customer service's events, and orchestrate the quote creation saga:
//! quote, then stock reservation in the inventory service, then a purchase order. A failed
//! reservation marks the quote "Pending Stock" and notifies the sales rep through the
//! email service; a failed purchase order releases the reservation.
