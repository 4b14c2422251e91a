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

message_set! {
    /// The events on `<quote>.quote.events`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum QuoteEvent {
        /// A quote was created.
        Created(QuoteCreated),
        /// A sales rep is to be notified.
        NotificationRequested(SalesRepNotificationRequested),
    }
}
