//! The events the customer service publishes: its contract with the other services.

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

impl From<&Customer> for CustomerCreated {
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

impl From<&Customer> for CustomerUpdated {
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
