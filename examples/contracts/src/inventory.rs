//! What the inventory service publishes and the commands it takes.
//!
//! - `<inventory>.reservation.events`, keyed by the quote's id: [`StockReserved`] or
//!   [`StockReservationFailed`], its answer to a `QuoteCreated`.
//! - `<inventory>.product.events`, keyed by the product's id: [`ProductChanged`]
//!   (reference data others keep with a TTL) and [`StockLevelChanged`].
//! - `<inventory>.commands`: [`ConfirmReservation`] (answered [`ReservationConfirmed`] or
//!   [`ReservationNotConfirmed`]) and its compensation [`ReleaseReservation`] (answered
//!   `dbps_saga::Compensated`, also when there is nothing to release).

use dbps_core::{Message, message_set};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The aggregate of reservation events (`<inventory>.reservation.events`).
pub const RESERVATION_AGGREGATE: &str = "reservation";
/// The aggregate of product events (`<inventory>.product.events`).
pub const PRODUCT_AGGREGATE: &str = "product";

/// A product the inventory could not reserve enough of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingStock {
    /// The product.
    pub product_id: Uuid,
    /// How many the quote asked for.
    pub requested: i64,
    /// How many were available (0 for an unknown product).
    pub available: i64,
}

/// One reserved line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedLine {
    /// The product.
    pub product_id: Uuid,
    /// How many.
    pub quantity: i64,
}

/// Every line of a quote is reserved (in one local transaction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReserved {
    /// The quote.
    pub quote_id: Uuid,
    /// What was reserved.
    pub lines: Vec<ReservedLine>,
}

impl Message for StockReserved {
    const TYPE: &'static str = "inventory.StockReserved";
}

/// A quote's lines could not all be reserved; nothing was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReservationFailed {
    /// The quote.
    pub quote_id: Uuid,
    /// What was short.
    pub missing: Vec<MissingStock>,
}

impl Message for StockReservationFailed {
    const TYPE: &'static str = "inventory.StockReservationFailed";
}

message_set! {
    /// The events on `<inventory>.reservation.events`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ReservationEvent {
        /// Reserved.
        Reserved(StockReserved),
        /// Not reserved.
        Failed(StockReservationFailed),
    }
}

/// A product was created or changed (reference data: the whole product).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductChanged {
    /// The product.
    pub product_id: Uuid,
    /// Its stock-keeping unit.
    pub sku: String,
    /// Its name.
    pub name: String,
    /// Its unit price, in cents.
    pub unit_price_cents: i64,
    /// The product's version (the event's sequence number).
    pub version: i64,
}

impl Message for ProductChanged {
    const TYPE: &'static str = "inventory.ProductChanged";
}

/// A product's available stock changed (a reservation, a release, a delivery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevelChanged {
    /// The product.
    pub product_id: Uuid,
    /// On hand and not reserved.
    pub available: i64,
    /// The stock row's version.
    pub version: i64,
}

impl Message for StockLevelChanged {
    const TYPE: &'static str = "inventory.StockLevelChanged";
}

message_set! {
    /// The events on `<inventory>.product.events`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ProductEvent {
        /// A product changed.
        Changed(ProductChanged),
        /// Its stock level changed.
        StockLevel(StockLevelChanged),
    }
}

/// Turn a quote's reservation into stock movements (the goods leave the warehouse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmReservation {
    /// The quote whose reservation it is.
    pub quote_id: Uuid,
}

impl Message for ConfirmReservation {
    const TYPE: &'static str = "inventory.ConfirmReservation";
}

/// The reservation was confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationConfirmed {
    /// The quote.
    pub quote_id: Uuid,
}

impl Message for ReservationConfirmed {
    const TYPE: &'static str = "inventory.ReservationConfirmed";
}

/// The reservation could not be confirmed (there is none, or it was released).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationNotConfirmed {
    /// The quote.
    pub quote_id: Uuid,
    /// Why.
    pub reason: String,
}

impl Message for ReservationNotConfirmed {
    const TYPE: &'static str = "inventory.ReservationNotConfirmed";
}

/// Give a quote's reserved (or confirmed) stock back: the compensation of
/// [`ConfirmReservation`], and how a quote's reservation is dropped. Idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReservation {
    /// The quote.
    pub quote_id: Uuid,
}

impl Message for ReleaseReservation {
    const TYPE: &'static str = "inventory.ReleaseReservation";
}

message_set! {
    /// The commands on `<inventory>.commands`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum InventoryCommand {
        /// Confirm a reservation.
        Confirm(ConfirmReservation),
        /// Release a reservation.
        Release(ReleaseReservation),
    }
}
