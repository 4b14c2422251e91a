//! What the quote service publishes, on `<quote>.quote.events`, keyed by the quote's id.

use dbps_core::{Message, message_set};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::inventory::MissingStock;

/// The aggregate of the quote service's events (`<quote>.quote.events`).
pub const AGGREGATE: &str = "quote";

/// One line of a quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteLine {
    /// The product (an inventory product id).
    pub product_id: Uuid,
    /// How many; above zero.
    pub quantity: i64,
    /// The unit price, in cents.
    pub unit_price_cents: i64,
}

/// A quote was created with its lines: the inventory reserves stock for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteCreated {
    /// The quote.
    pub quote_id: Uuid,
    /// The customer it is for.
    pub customer_id: Uuid,
    /// The sales rep's email address.
    pub sales_rep: String,
    /// Its lines.
    pub lines: Vec<QuoteLine>,
}

impl Message for QuoteCreated {
    const TYPE: &'static str = "quote.QuoteCreated";
}

/// A quote is "Pending Stock": its sales rep should be told (the email service sends
/// the notification).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalesRepNotificationRequested {
    /// The quote.
    pub quote_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// The sales rep's email address.
    pub sales_rep: String,
    /// Why, in words.
    pub reason: String,
    /// What the inventory was short of (empty when it never answered).
    pub missing: Vec<MissingStock>,
}

impl Message for SalesRepNotificationRequested {
    const TYPE: &'static str = "quote.SalesRepNotificationRequested";
}

/// A quote's status changed: published with every change of status, in the transaction
/// of the change, so the history of a quote's statuses (and of its conversion into an
/// order) can be followed from its events alone.
///
/// Statuses, in the order a quote may reach them: `New` (when created; no event says it),
/// `Awaiting Stock`, then `Stock Reserved` or `Pending Stock`; after acceptance
/// `Ordering`, then `Ordered` or `Order Failed`. The event's sequence number is the
/// quote's (after its `QuoteCreated`, which is 1), so a follower of the quote's events
/// can tell which status is the newest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteStatusChanged {
    /// The quote.
    pub quote_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// The new status.
    pub status: String,
    /// Why (for `Pending Stock`; `None` for the others).
    pub reason: Option<String>,
    /// The quote's value, in cents.
    pub total_cents: i64,
    /// The quote's version after the change (every change raises it).
    pub version: i64,
    /// The purchase order, once the quote is `Ordered`.
    pub purchase_order_id: Option<Uuid>,
}

impl Message for QuoteStatusChanged {
    const TYPE: &'static str = "quote.QuoteStatusChanged";
}

message_set! {
    /// The events on `<quote>.quote.events`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum QuoteEvent {
        /// A quote was created.
        Created(QuoteCreated),
        /// A sales rep is to be notified.
        NotificationRequested(SalesRepNotificationRequested),
        /// A quote's status changed.
        StatusChanged(QuoteStatusChanged),
    }
}
