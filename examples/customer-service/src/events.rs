//! The events the customer service publishes: its contract with the other services.
//!
//! Both events carry `{"id", "name", "tax_number", "email", "version", "addresses",
//! "machines"}`, the customer's state at `version`, which is also the event's sequence
//! number; an empty list is left out. A snapshot record's `state` has the customer's
//! fields without the two lists (see [`crate::snapshot`]); readers of the events that do
//! not need the lists ignore them, and events written before the lists existed decode
//! with empty ones.

use dbps_core::Message;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Address, Customer, Machine};

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
    /// The customer's addresses, oldest first (left out of the JSON when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Address>,
    /// The customer's machine history, oldest first (left out of the JSON when there are
    /// none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Machine>,
}

impl Message for CustomerCreated {
    const TYPE: &'static str = "customer.CustomerCreated";
}

/// A customer changed; the event carries the whole new state, so a replica needs no
/// other event to catch up.
///
/// Adding an address or a contact, and recording an installed machine, is a change of the
/// customer too: it raises the version, and this event then carries the same id, name,
/// tax number and email as before with the new version, and the addresses and machines
/// as they are now (contacts are not part of it). The version is the event's
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
    /// The customer's addresses, oldest first (left out of the JSON when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Address>,
    /// The customer's machine history, oldest first (left out of the JSON when there are
    /// none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Machine>,
}

impl Message for CustomerUpdated {
    const TYPE: &'static str = "customer.CustomerUpdated";
}

/// Both events carry the customer's whole state; `From<&Customer>` gives them without
/// addresses and machines (a new customer has none), [`CustomerUpdated::with_details`]
/// adds them.
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
                        addresses: Vec::new(),
                        machines: Vec::new(),
                    }
                }
            }
        )+
    };
}

from_customer!(CustomerCreated, CustomerUpdated);

impl CustomerUpdated {
    /// The event for `customer` with its current addresses and machines.
    pub fn with_details(customer: &Customer, addresses: Vec<Address>, machines: Vec<Machine>) -> Self {
        Self {
            addresses,
            machines,
            ..Self::from(customer)
        }
    }
}

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
