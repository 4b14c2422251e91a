//! The events the customer service publishes: its contract with the other services.
//!
//! Both events carry `{"id", "name", "tax_number", "email", "version"}`, the customer's
//! state at `version`, which is also the event's sequence number. A snapshot record's
//! `state` has the same shape (see [`crate::snapshot`]).

use dbps_core::Message;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Customer;

/// A customer was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerCreated {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
    /// Email address.
    pub email: String,
    /// The customer's version (1).
    pub version: i64,
}

impl Message for CustomerCreated {
    const TYPE: &'static str = "customer.CustomerCreated";
}

/// A customer changed; the event carries the whole new state, so a replica needs no
/// other event to catch up.
///
/// Adding an address or a contact is a change of the customer too: it raises the version,
/// and this event then carries the same id, name, tax number and email as before with the
/// new version (addresses and contacts are not part of it). The version is the event's
/// sequence number, and the service's snapshot ([`crate::SNAPSHOT_PATH`]) serves the same
/// fields, so one projection reads both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerUpdated {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Tax number.
    pub tax_number: String,
    /// Email address.
    pub email: String,
    /// The customer's new version.
    pub version: i64,
}

impl Message for CustomerUpdated {
    const TYPE: &'static str = "customer.CustomerUpdated";
}

/// Both events carry the customer's whole state.
macro_rules! from_customer {
    ($($event:ty),+) => {
        $(
            impl From<&Customer> for $event {
                fn from(c: &Customer) -> Self {
                    Self {
                        id: c.id,
                        name: c.name.clone(),
                        tax_number: c.tax_number.clone(),
                        email: c.email.clone(),
                        version: c.version,
                    }
                }
            }
        )+
    };
}

from_customer!(CustomerCreated, CustomerUpdated);

dbps_core::message_set! {
    /// The events on `customer.customer.events`, for the services that follow them.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum CustomerEvent {
        /// A customer was created.
        Created(CustomerCreated),
        /// A customer changed.
        Updated(CustomerUpdated),
    }
}

/// Record that a machine was installed at a customer's site (sent by whoever delivers
/// it; the customer service keeps the machine history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMachineInstalled {
    /// The customer.
    pub customer_id: Uuid,
    /// The machine (model and serial number).
    pub machine: String,
    /// When it was installed.
    pub installed_at: chrono::DateTime<chrono::Utc>,
}

impl Message for RecordMachineInstalled {
    const TYPE: &'static str = "customer.RecordMachineInstalled";
}

dbps_core::message_set! {
    /// The commands on `customer.commands`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum CustomerCommand {
        /// Record an installed machine.
        RecordMachineInstalled(RecordMachineInstalled),
    }
}
