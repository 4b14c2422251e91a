//! Assigning emails to customers by their sender's address.
//!
//! An inbound email is assigned to the customer whose address (in the
//! `customer_email_index` replica) is the email's sender address, compared in lower case.
//! The assignment is one document in `email_assignments`, `_id` the email's id, written
//! with its `email.EmailAssigned` event in one single-document write (the MongoDB outbox):
//! the unique `_id` makes an email assigned once, with one event, however many assigners
//! race (the request that stored it, the replica's handler, the sweep). The email's own
//! `customer_id` is a copy, written next; it marks the email as no longer pending, and a
//! crash between the two writes is repaired by the next attempt (the insert finds the
//! assignment and copies it).
//!
//! An assignment is a fact about the email when it was made: an address that later moves
//! to another customer takes the emails that arrive after the move, not the earlier ones.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use dbps_core::classify::is_duplicate_key;
use dbps_outbox::OutboxError;
use dbps_outbox::mongo::MongoOutbox;
use futures::TryStreamExt as _;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::{Collection, Database};
use uuid::Uuid;

use crate::events::{AGGREGATE, EmailAssigned};
use crate::store::{ASSIGNMENTS, ATTACHMENTS, CUSTOMER_INDEX, EMAILS};

/// Chunks without an email older than this are left over from an ingest that failed or
/// crashed after writing them; younger ones may belong to an ingest still in flight.
const ORPHAN_AGE: chrono::Duration = chrono::Duration::hours(1);

/// Why an assignment could not be made now (it is tried again later).
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// The database failed.
    #[error("mongodb")]
    Mongo(#[from] mongodb::error::Error),
    /// The outbox refused the write.
    #[error("outbox")]
    Outbox(#[from] OutboxError),
}

/// What an assignment needs of an email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sender {
    pub(crate) email_id: String,
    pub(crate) message_id: String,
    pub(crate) address: String,
    pub(crate) subject: Option<String>,
    pub(crate) received_at: bson::DateTime,
}

impl Sender {
    /// From an email document (projected on the fields [`SENDER_FIELDS`] names).
    fn from_document(document: &Document) -> Option<Self> {
        Some(Self {
            email_id: document.get_str("_id").ok()?.to_owned(),
            message_id: document.get_str("message_id").ok()?.to_owned(),
            address: document.get_str("from_address").ok()?.to_owned(),
            subject: document.get_str("subject").ok().map(str::to_owned),
            received_at: *document.get_datetime("received_at").ok()?,
        })
    }
}

/// The fields of an email an assignment reads.
fn sender_fields() -> Document {
    doc! { "_id": 1, "message_id": 1, "from_address": 1, "subject": 1, "received_at": 1 }
}

/// The filter of the inbound emails not assigned yet.
fn pending() -> Document {
    doc! { "direction": "inbound", "customer_id": Bson::Null }
}

/// Assigns emails to customers (see the module documentation).
#[derive(Debug, Clone)]
pub struct Assigner {
    emails: Collection<Document>,
    assignments: Collection<Document>,
    attachments: Collection<Document>,
    index: Collection<Document>,
    outbox: MongoOutbox,
}

/// An address as the index keys it: trimmed, in lower case.
pub fn normalize_address(address: &str) -> String {
    address.trim().to_lowercase()
}

pub(crate) fn to_chrono(time: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(time.timestamp_millis()).unwrap_or_default()
}

impl Assigner {
    /// The assigner of the service's database; `outbox` writes the events.
    pub fn new(database: &Database, outbox: MongoOutbox) -> Self {
        Self {
            emails: database.collection(EMAILS),
            assignments: database.collection(ASSIGNMENTS),
            attachments: database.collection(ATTACHMENTS),
            index: database.collection(CUSTOMER_INDEX),
            outbox,
        }
    }

    /// The customer whose address `address` is, as the replica knows it.
    pub async fn customer_of(&self, address: &str) -> Result<Option<Uuid>, mongodb::error::Error> {
        let entry = self
            .index
            .find_one(doc! { "_id": normalize_address(address) })
            .projection(doc! { "customer_id": 1 })
            .await?;
        Ok(entry
            .as_ref()
            .and_then(|e| e.get_str("customer_id").ok())
            .and_then(|id| id.parse().ok()))
    }

    /// The customer an email is assigned to (`email_assignments` is the truth; the copy in
    /// the email may lag it after a crash).
    pub async fn assignment(&self, email_id: &str) -> Result<Option<(Uuid, bson::DateTime)>, mongodb::error::Error> {
        let found = self
            .assignments
            .find_one(doc! { "_id": email_id })
            .projection(doc! { "customer_id": 1, "assigned_at": 1 })
            .await?;
        Ok(found.and_then(|a| {
            let customer = a.get_str("customer_id").ok()?.parse().ok()?;
            Some((customer, *a.get_datetime("assigned_at").ok()?))
        }))
    }

    /// Assigns the email to `customer`, unless it is assigned already; returns the
    /// customer it is assigned to (the earlier one if it was) and since when.
    pub(crate) async fn assign(&self, email: &Sender, customer: Uuid) -> Result<(Uuid, bson::DateTime), AssignError> {
        let now = bson::DateTime::now();
        let event = EmailAssigned {
            email_id: email.email_id.clone(),
            message_id: email.message_id.clone(),
            customer_id: customer,
            address: email.address.clone(),
            subject: email.subject.clone(),
            received_at: to_chrono(email.received_at),
            assigned_at: to_chrono(now),
        };
        let message = self.outbox.event(AGGREGATE, &event)?;
        let document = doc! {
            "_id": &email.email_id,
            "email_id": &email.email_id,
            "customer_id": customer.to_string(),
            "address": &email.address,
            "message_id": &email.message_id,
            "assigned_at": now,
        };
        let (assigned, at) = match self
            .outbox
            .insert_with_events(&self.assignments, document, [message])
            .await
        {
            Ok(_) => {
                tracing::info!(email = %email.email_id, %customer, "email assigned");
                (customer, now)
            }
            Err(OutboxError::Mongo { source, .. }) if is_duplicate_key(&source) => {
                // Assigned before (a race, or a crash before the copy below).
                match self.assignment(&email.email_id).await? {
                    Some(found) => found,
                    None => return Err(AssignError::Mongo(source)),
                }
            }
            Err(error) => return Err(error.into()),
        };
        self.emails
            .update_one(
                doc! { "_id": &email.email_id, "customer_id": Bson::Null },
                doc! { "$set": { "customer_id": assigned.to_string(), "assigned_at": at } },
            )
            .await?;
        Ok((assigned, at))
    }

    /// Assigns the pending emails from `address`, if the replica knows its customer.
    /// Returns how many it assigned.
    pub async fn assign_pending(&self, address: &str) -> Result<usize, AssignError> {
        let address = normalize_address(address);
        let Some(customer) = self.customer_of(&address).await? else {
            return Ok(0);
        };
        let mut filter = pending();
        filter.insert("from_address", &address);
        let emails: Vec<Document> = self
            .emails
            .find(filter)
            .projection(sender_fields())
            .await?
            .try_collect()
            .await?;
        let mut assigned = 0;
        for email in emails.iter().filter_map(Sender::from_document) {
            self.assign(&email, customer).await?;
            assigned += 1;
        }
        Ok(assigned)
    }

    /// Assigns every pending email whose sender the replica knows, and finishes the
    /// assignments a crash interrupted. Returns how many emails it assigned.
    pub async fn sweep(&self) -> Result<usize, AssignError> {
        let emails: Vec<Document> = self
            .emails
            .find(pending())
            .projection(sender_fields())
            .await?
            .try_collect()
            .await?;
        let mut by_address: BTreeMap<String, Vec<Sender>> = BTreeMap::new();
        for email in emails.iter().filter_map(Sender::from_document) {
            by_address.entry(email.address.clone()).or_default().push(email);
        }
        let mut assigned = 0;
        for (address, emails) in by_address {
            let customer = self.customer_of(&address).await?;
            for email in emails {
                // An assignment made before a crash counts, whoever has the address now.
                let customer = match self.assignment(&email.email_id).await? {
                    Some((earlier, _)) => earlier,
                    None => match customer {
                        Some(customer) => customer,
                        None => continue,
                    },
                };
                self.assign(&email, customer).await?;
                assigned += 1;
            }
        }
        if assigned > 0 {
            tracing::info!(assigned, "pending emails assigned");
        }
        Ok(assigned)
    }

    /// Deletes attachment chunks whose email was never stored (an ingest that failed
    /// and could not clean up, or crashed), once they are older than an hour. Returns
    /// how many chunks it deleted.
    pub async fn remove_orphan_chunks(&self) -> Result<u64, mongodb::error::Error> {
        let before = bson::DateTime::from_millis((Utc::now() - ORPHAN_AGE).timestamp_millis());
        let owners = self
            .attachments
            .distinct("email_id", doc! { "written_at": { "$lt": before } })
            .await?;
        let mut deleted = 0;
        for owner in owners {
            let Bson::String(email_id) = owner else { continue };
            let exists = self
                .emails
                .find_one(doc! { "_id": &email_id })
                .projection(doc! { "_id": 1 })
                .await?
                .is_some();
            if !exists {
                deleted += self
                    .attachments
                    .delete_many(doc! { "email_id": &email_id })
                    .await?
                    .deleted_count;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "orphan attachment chunks removed");
        }
        Ok(deleted)
    }
}
