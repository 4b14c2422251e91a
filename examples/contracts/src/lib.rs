//! The messages the services of the dbps example system exchange: their contracts.
//!
//! Each service owns its database and publishes only messages; these types are what
//! the others may rely on. A service's own tables never appear here. The customer
//! service's events live in its own crate (`example_customer_service::events`), which
//! came first.
//!
//! | module | published by | topic (canonical service names) | key |
//! |---|---|---|---|
//! | [`quote`] events (`QuoteCreated`, `QuoteStatusChanged`, `SalesRepNotificationRequested`) | quote | `quote.quote.events` | quote id |
//! | [`inventory`] reservation events | inventory | `inventory.reservation.events` | quote id |
//! | [`inventory`] product events | inventory | `inventory.product.events` | product id |
//! | [`inventory`] commands | quote's sagas | `inventory.commands` | saga id |
//! | [`purchase_order`] commands | quote's sagas | `purchase_order.commands` | saga id |
//!
//! Replies to commands go to the sender's reply topic (`quote.replies`); a compensation
//! is answered with `dbps_saga::Compensated`.

pub mod inventory;
pub mod purchase_order;
pub mod quote;

/// The canonical service names; a deployment (or a test) may run them under others.
pub mod services {
    /// The customer service.
    pub const CUSTOMER: &str = "customer";
    /// The quote service.
    pub const QUOTE: &str = "quote";
    /// The inventory service.
    pub const INVENTORY: &str = "inventory";
    /// The purchase-order service.
    pub const PURCHASE_ORDER: &str = "purchase_order";
    /// The email service.
    pub const EMAIL: &str = "email";
}
