//! The commands the purchase-order service takes, on `<purchase_order>.commands`.
//!
//! [`CreatePurchaseOrder`] is answered [`PurchaseOrderCreated`] or
//! [`PurchaseOrderRejected`] (a business rule said no: the order is over the customer's
//! credit limit); [`CancelPurchaseOrder`], its compensation, `dbps_saga::Compensated`
//! (also when there is no order to cancel).

use dbps_core::{Message, message_set};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::quote::QuoteLine;

/// Create the purchase order of an accepted quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePurchaseOrder {
    /// The quote (one purchase order per quote).
    pub quote_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// The lines.
    pub lines: Vec<QuoteLine>,
    /// The order's value, in cents.
    pub total_cents: i64,
}

impl Message for CreatePurchaseOrder {
    const TYPE: &'static str = "purchase_order.CreatePurchaseOrder";
}

/// The purchase order exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseOrderCreated {
    /// The purchase order.
    pub purchase_order_id: Uuid,
    /// The quote.
    pub quote_id: Uuid,
}

impl Message for PurchaseOrderCreated {
    const TYPE: &'static str = "purchase_order.PurchaseOrderCreated";
}

/// The purchase order was refused by a business rule; nothing was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseOrderRejected {
    /// The quote.
    pub quote_id: Uuid,
    /// Why, in words.
    pub reason: String,
}

impl Message for PurchaseOrderRejected {
    const TYPE: &'static str = "purchase_order.PurchaseOrderRejected";
}

/// Cancel a quote's purchase order (the compensation of [`CreatePurchaseOrder`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelPurchaseOrder {
    /// The quote.
    pub quote_id: Uuid,
}

impl Message for CancelPurchaseOrder {
    const TYPE: &'static str = "purchase_order.CancelPurchaseOrder";
}

message_set! {
    /// The commands on `<purchase_order>.commands`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum PurchaseOrderCommand {
        /// Create a purchase order.
        Create(CreatePurchaseOrder),
        /// Cancel it.
        Cancel(CancelPurchaseOrder),
    }
}
