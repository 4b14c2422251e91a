//! The purchase-order service of the dbps example system.
//!
//! It will own its purchase orders in its own PostgreSQL database and create them as the
//! last step of the quote saga, answering with a reply that either completes the saga or
//! makes the orchestrator release the stock reservation.
