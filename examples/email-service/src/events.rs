//! The events the email service publishes: its contract with the other services.
//!
//! They go to `<email>.email.events` (`email.email.events` under the canonical name),
//! keyed by the email's id, each with the email's sequence number. An email is assigned
//! once, so today every email has at most one event, at sequence 1.

use chrono::{DateTime, Utc};
use dbps_core::Message;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The aggregate of the service's events (the middle of the events topic's name).
pub const AGGREGATE: &str = "email";

/// An email was assigned to a customer: its sender's address is the customer's (as the
/// service's replica of the customer service knew it when the email was assigned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailAssigned {
    /// The email (the service's id for it).
    pub email_id: String,
    /// Its `Message-ID`, without angle brackets.
    pub message_id: String,
    /// The customer.
    pub customer_id: Uuid,
    /// The sender's address that matched the customer's, in lower case.
    pub address: String,
    /// The email's subject, if it had one.
    pub subject: Option<String>,
    /// When the email was received.
    pub received_at: DateTime<Utc>,
    /// When it was assigned (later than `received_at` when the customer appeared after
    /// the email).
    pub assigned_at: DateTime<Utc>,
}

impl Message for EmailAssigned {
    const TYPE: &'static str = "email.EmailAssigned";
}

dbps_core::message_set! {
    /// The events on `<email>.email.events`, for the services that follow them.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum EmailEvent {
        /// An email was assigned to a customer.
        Assigned(EmailAssigned),
    }
}
