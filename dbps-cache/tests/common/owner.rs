//! The owning side of the replica tests: a customer table that writes an event with the
//! aggregate's next sequence for every change, and the projections of Quote's
//! `customer_cache` and Email's address index.

use std::collections::BTreeMap;

use dbps_cache::replica::{Change, Projection};
use dbps_core::{Envelope, HandlerError, Message, message_set};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// A customer's state, as its events and the snapshot carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub tax_number: Option<String>,
    #[serde(default)]
    pub emails: Vec<String>,
}

impl Customer {
    pub fn new(name: &str) -> Self {
        Self {
            id: String::new(),
            name: name.to_owned(),
            tax_number: None,
            emails: vec![format!("{name}@example.com")],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomerChanged(pub Customer);
impl Message for CustomerChanged {
    const TYPE: &'static str = "customer.CustomerChanged";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomerDeleted {}
impl Message for CustomerDeleted {
    const TYPE: &'static str = "customer.CustomerDeleted";
}

message_set! {
    pub enum CustomerEvents { Changed(CustomerChanged), Deleted(CustomerDeleted) }
}

/// The owner: its table and its events.
#[derive(Debug, Clone)]
pub struct Owner {
    pool: PgPool,
}

impl Owner {
    pub async fn create(pool: PgPool) -> Result<Self, sqlx::Error> {
        sqlx::raw_sql(
            "create table customers (id uuid primary key, name text not null, tax_number text,
                                     emails jsonb not null default '[]', version bigint not null)",
        )
        .execute(&pool)
        .await?;
        Ok(Self { pool })
    }

    fn event<M: Message>(id: &str, sequence: i64, message: &M) -> Envelope {
        let mut envelope = Envelope::event("customer", "customer", id, message).expect("valid event");
        envelope.sequence = Some(sequence);
        envelope
    }

    /// Creates (empty id) or replaces a customer.
    pub async fn upsert(&self, mut customer: Customer) -> Result<Envelope, sqlx::Error> {
        if customer.id.is_empty() {
            customer.id = uuid::Uuid::now_v7().to_string();
        }
        let version: i64 = sqlx::query_scalar(
            "insert into customers (id, name, tax_number, emails, version) values ($1::uuid, $2, $3, $4, 1)
             on conflict (id) do update set name = excluded.name, tax_number = excluded.tax_number,
             emails = excluded.emails, version = customers.version + 1 returning version",
        )
        .bind(&customer.id)
        .bind(&customer.name)
        .bind(&customer.tax_number)
        .bind(serde_json::json!(customer.emails))
        .fetch_one(&self.pool)
        .await?;
        Ok(Self::event(&customer.id.clone(), version, &CustomerChanged(customer)))
    }

    async fn change(&self, id: &str, set: &str, value: &str) -> Result<Envelope, sqlx::Error> {
        let (customer, version): (sqlx::types::Json<Customer>, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "update customers set {set} = $2, version = version + 1 where id = $1::uuid
             returning jsonb_build_object('id', id, 'name', name, 'tax_number', tax_number, 'emails', emails), version"
        )))
        .bind(id)
        .bind(value)
        .fetch_one(&self.pool)
        .await?;
        Ok(Self::event(id, version, &CustomerChanged(customer.0)))
    }

    pub async fn rename(&self, id: &str, name: &str) -> Result<Envelope, sqlx::Error> {
        self.change(id, "name", name).await
    }

    pub async fn set_tax_number(&self, id: &str, tax_number: &str) -> Result<Envelope, sqlx::Error> {
        self.change(id, "tax_number", tax_number).await
    }

    pub async fn delete(&self, id: &str) -> Result<Envelope, sqlx::Error> {
        let version: i64 = sqlx::query_scalar("delete from customers where id = $1::uuid returning version")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Self::event(id, version + 1, &CustomerDeleted {}))
    }

    /// `id → (name, version)` of every customer.
    pub async fn names(&self) -> Result<BTreeMap<String, (String, i64)>, sqlx::Error> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("select id::text, name, version from customers order by id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, version)| (id, (name, version)))
            .collect())
    }
}

#[derive(Serialize)]
struct CacheRow<'a> {
    name: &'a str,
    tax_number: Option<&'a str>,
}

/// Quote's `customer_cache (id, name, tax_number, source_sequence)`.
#[derive(Debug)]
pub struct CustomerCache;

impl Projection for CustomerCache {
    type Events = CustomerEvents;
    type Snapshot = Customer;

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
        match event {
            CustomerEvents::Changed(CustomerChanged(customer)) => self.snapshot(customer),
            CustomerEvents::Deleted(_) => Ok(Change::Delete),
        }
    }

    fn snapshot(&self, customer: Customer) -> Result<Change, HandlerError> {
        Ok(Change::row(&CacheRow {
            name: &customer.name,
            tax_number: customer.tax_number.as_deref(),
        })?)
    }
}

/// Email's `customer_email_index (email, customer_id, source_sequence)`: one entry per
/// address. `id_field` names the address's field (`_id` in MongoDB).
#[derive(Debug)]
pub struct CustomerEmails {
    pub id_field: &'static str,
}

impl Projection for CustomerEmails {
    type Events = CustomerEvents;
    type Snapshot = Customer;

    fn project(&self, event: CustomerEvents, _: &Envelope) -> Result<Change, HandlerError> {
        match event {
            CustomerEvents::Changed(CustomerChanged(customer)) => self.snapshot(customer),
            CustomerEvents::Deleted(_) => Ok(Change::Delete),
        }
    }

    fn snapshot(&self, customer: Customer) -> Result<Change, HandlerError> {
        let rows: Vec<serde_json::Value> = customer
            .emails
            .iter()
            .map(|email| serde_json::json!({ self.id_field: email }))
            .collect();
        Ok(Change::rows(&rows)?)
    }
}
