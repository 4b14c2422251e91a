//! A customer's addresses, contacts and machine history.
//!
//! Adding an address or a contact, or recording a machine, changes the customer: its
//! version goes up by one and `customer.CustomerUpdated` is enqueued in the same
//! transaction, carrying the customer's (unchanged) id, name, tax number and email with the
//! new version, and its addresses and machines as they are now. So the `ETag` of
//! `GET /customers/{id}` and `If-Match` cover the whole customer, and the version stays the
//! sequence number of the customer's events, which replicas and the snapshot rely on.

use std::fmt;
use std::str::FromStr;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use dbps_service::http::{Fields, IfMatch, Problem, version_conflict};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::events::CustomerUpdated;
use crate::{AGGREGATE, App, Customer, db, outbox_error, with_etag};

/// Longest street (with house number), in characters.
const MAX_STREET: usize = 200;
/// Longest city, in characters.
const MAX_CITY: usize = 100;
/// Longest postal code, in characters.
const MAX_POSTAL_CODE: usize = 16;
/// Longest contact name, in characters.
const MAX_CONTACT_NAME: usize = 200;
/// Longest phone number, in characters.
const MAX_PHONE: usize = 32;
/// Fewest digits in a phone number.
const MIN_PHONE_DIGITS: usize = 3;

/// What an address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressKind {
    /// Where invoices go.
    Billing,
    /// Where goods go.
    Shipping,
    /// Where machines are installed and serviced.
    Site,
}

impl AddressKind {
    /// Every kind.
    pub const ALL: [Self; 3] = [Self::Billing, Self::Shipping, Self::Site];

    /// The kind as the API and the database spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Billing => "billing",
            Self::Shipping => "shipping",
            Self::Site => "site",
        }
    }
}

impl fmt::Display for AddressKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AddressKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("must be one of billing, shipping, site, not {s:?}"))
    }
}

/// An address of a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// Id.
    pub id: Uuid,
    /// What it is for.
    pub kind: AddressKind,
    /// Street and house number.
    pub street: String,
    /// City.
    pub city: String,
    /// Postal code.
    pub postal_code: String,
    /// Country, an ISO 3166-1 alpha-2 code (`DE`).
    pub country: String,
}

/// A contact person at a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Contact {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Email address, if known.
    pub email: Option<String>,
    /// Phone number, if known.
    pub phone: Option<String>,
}

/// A machine in a customer's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Machine {
    /// The machine.
    pub machine: String,
    /// When it was installed.
    pub installed_at: chrono::DateTime<chrono::Utc>,
}

/// Body of `POST /customers/{id}/addresses`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAddress {
    /// `billing`, `shipping` or `site`.
    pub kind: String,
    /// Street and house number, 1 to 200 characters.
    pub street: String,
    /// City, 1 to 100 characters.
    pub city: String,
    /// Postal code, 1 to 16 characters.
    pub postal_code: String,
    /// Country, an assigned ISO 3166-1 alpha-2 code; lower case is accepted and stored in
    /// upper case.
    pub country: String,
}

/// Body of `POST /customers/{id}/contacts`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewContact {
    /// Name, 1 to 200 characters.
    pub name: String,
    /// Email address.
    pub email: Option<String>,
    /// Phone number: an optional leading `+`, then digits, spaces and `-()/.`, at least
    /// three digits, at most 32 characters.
    pub phone: Option<String>,
}

/// The address kind, or a mistake recorded in `fields`.
fn kind(fields: &mut Fields, value: &str) -> Option<AddressKind> {
    match value.trim().parse() {
        Ok(kind) => Some(kind),
        Err(detail) => {
            fields.invalid("kind", detail);
            None
        }
    }
}

/// The country code in upper case, or a mistake recorded in `fields`.
fn country(fields: &mut Fields, value: &str) -> String {
    let code = value.trim().to_ascii_uppercase();
    if crate::countries::is_assigned(&code) {
        code
    } else {
        fields.invalid("country", "must be an assigned ISO 3166-1 alpha-2 code, like DE");
        String::new()
    }
}

/// Checks a phone number that passed [`Fields::optional_text`].
fn phone(fields: &mut Fields, value: Option<&str>) {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return;
    };
    let rest = value.strip_prefix('+').unwrap_or(value);
    let allowed = rest
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '(' | ')' | '/' | '.'));
    let digits = rest.chars().filter(char::is_ascii_digit).count();
    if !allowed || digits < MIN_PHONE_DIGITS {
        fields.invalid(
            "phone",
            "must be a phone number: an optional leading +, then digits, spaces and -()/., at least 3 digits",
        );
    }
}

/// Starts a change of customer `id` in `tx`: its version goes up by one (the row stays
/// locked until the transaction ends). `404` if there is no such customer, `412` if
/// `expected` is not the version it was at.
async fn bump(tx: &mut PgConnection, id: Uuid, expected: Option<i64>) -> Result<Customer, Problem> {
    let customer: Customer = sqlx::query_as(
        "update customers set version = version + 1, updated_at = now() where id = $1
         returning id, name, tax_number, email, version",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?
    .ok_or_else(|| Problem::not_found(format!("customer {id}")))?;
    let previous = customer.version - 1;
    match expected {
        // Dropping the transaction rolls the increment back.
        Some(expected) if expected != previous => Err(version_conflict(expected, previous)),
        _ => Ok(customer),
    }
}

/// Enqueues the customer's `CustomerUpdated` and commits the change.
async fn finish(app: &App, mut tx: Transaction<'static, Postgres>, customer: &Customer) -> Result<(), Problem> {
    let event = updated(&mut tx, customer).await.map_err(db)?;
    app.outbox
        .enqueue_event(&mut tx, AGGREGATE, &customer.id.to_string(), &event)
        .await
        .map_err(outbox_error)?;
    tx.commit().await.map_err(db)
}

/// The `CustomerUpdated` of `customer` at its new version, with its addresses and machines
/// as `conn` sees them (in the transaction that holds the customer's row).
pub(crate) async fn updated(conn: &mut PgConnection, customer: &Customer) -> Result<CustomerUpdated, sqlx::Error> {
    let addresses = load_addresses(conn, customer.id).await?;
    let machines = load_machines(conn, customer.id).await?;
    Ok(CustomerUpdated::with_details(customer, addresses, machines))
}

pub(crate) async fn add_address(
    State(app): State<App>,
    Path(id): Path<Uuid>,
    IfMatch(expected): IfMatch,
    Json(body): Json<NewAddress>,
) -> Result<Response, Problem> {
    let mut fields = Fields::new();
    let kind = kind(&mut fields, &body.kind);
    let street = fields.text("street", &body.street, MAX_STREET);
    let city = fields.text("city", &body.city, MAX_CITY);
    let postal_code = fields.text("postal_code", &body.postal_code, MAX_POSTAL_CODE);
    let country = country(&mut fields, &body.country);
    fields.finish()?;
    // `finish` refused the request if the kind was not valid.
    let kind = kind.ok_or_else(|| Problem::new(StatusCode::UNPROCESSABLE_ENTITY))?;
    let address = Address {
        id: Uuid::now_v7(),
        kind,
        street: street.to_owned(),
        city: city.to_owned(),
        postal_code: postal_code.to_owned(),
        country,
    };

    let mut tx = app.pool.begin().await.map_err(db)?;
    let customer = bump(&mut tx, id, expected).await?;
    sqlx::query(
        "insert into customer_addresses (id, customer_id, kind, street, city, postal_code, country)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(address.id)
    .bind(id)
    .bind(address.kind.as_str())
    .bind(&address.street)
    .bind(&address.city)
    .bind(&address.postal_code)
    .bind(&address.country)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    finish(&app, tx, &customer).await?;
    tracing::info!(%id, address = %address.id, version = customer.version, "address added");
    Ok(with_etag(StatusCode::CREATED, address, customer.version))
}

pub(crate) async fn add_contact(
    State(app): State<App>,
    Path(id): Path<Uuid>,
    IfMatch(expected): IfMatch,
    Json(body): Json<NewContact>,
) -> Result<Response, Problem> {
    let mut fields = Fields::new();
    let name = fields.text("name", &body.name, MAX_CONTACT_NAME);
    let email = fields.optional_email("email", body.email.as_deref());
    let phone_number = fields.optional_text("phone", body.phone.as_deref(), MAX_PHONE);
    phone(&mut fields, phone_number);
    fields.finish()?;
    let contact = Contact {
        id: Uuid::now_v7(),
        name: name.to_owned(),
        email: email.map(str::to_owned),
        phone: phone_number.map(str::to_owned),
    };

    let mut tx = app.pool.begin().await.map_err(db)?;
    let customer = bump(&mut tx, id, expected).await?;
    sqlx::query("insert into customer_contacts (id, customer_id, name, email, phone) values ($1, $2, $3, $4, $5)")
        .bind(contact.id)
        .bind(id)
        .bind(&contact.name)
        .bind(&contact.email)
        .bind(&contact.phone)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    finish(&app, tx, &customer).await?;
    tracing::info!(%id, contact = %contact.id, version = customer.version, "contact added");
    Ok(with_etag(StatusCode::CREATED, contact, customer.version))
}

/// The customer's addresses, oldest first.
pub(crate) async fn addresses(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Address>, Problem> {
    load_addresses(conn, id).await.map_err(db)
}

pub(crate) async fn load_addresses(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Address>, sqlx::Error> {
    let rows: Vec<(Uuid, String, String, String, String, String)> = sqlx::query_as(
        "select id, kind, street, city, postal_code, country from customer_addresses
         where customer_id = $1 order by id",
    )
    .bind(id)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(id, kind, street, city, postal_code, country)| {
            // The table's check constraint admits only the kinds there are.
            let kind = kind
                .parse()
                .map_err(|detail: String| sqlx::Error::Decode(format!("address {id}: {detail}").into()))?;
            Ok(Address {
                id,
                kind,
                street,
                city,
                postal_code,
                country,
            })
        })
        .collect()
}

/// The customer's contacts, oldest first.
pub(crate) async fn contacts(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Contact>, Problem> {
    sqlx::query_as("select id, name, email, phone from customer_contacts where customer_id = $1 order by id")
        .bind(id)
        .fetch_all(conn)
        .await
        .map_err(db)
}

/// The customer's machine history, oldest first.
pub(crate) async fn machines(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Machine>, Problem> {
    load_machines(conn, id).await.map_err(db)
}

pub(crate) async fn load_machines(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Machine>, sqlx::Error> {
    sqlx::query_as("select machine, installed_at from machine_history where customer_id = $1 order by installed_at, id")
        .bind(id)
        .fetch_all(conn)
        .await
}

/// A read-only transaction that sees one state of the database throughout.
pub(crate) async fn snapshot_read(app: &App) -> Result<Transaction<'static, Postgres>, Problem> {
    app.pool
        .begin_with("begin isolation level repeatable read read only")
        .await
        .map_err(db)
}

/// Reads a list of customer `id` with `list`; `404` if there is no such customer.
async fn list_of<T: Serialize>(
    app: &App,
    id: Uuid,
    list: impl AsyncFnOnce(&mut PgConnection, Uuid) -> Result<Vec<T>, Problem>,
) -> Result<Json<Vec<T>>, Problem> {
    let mut tx = snapshot_read(app).await?;
    let (exists,): (bool,) = sqlx::query_as("select exists (select 1 from customers where id = $1)")
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    if !exists {
        return Err(Problem::not_found(format!("customer {id}")));
    }
    let items = list(&mut tx, id).await?;
    tx.commit().await.map_err(db)?;
    Ok(Json(items))
}

pub(crate) async fn get_addresses(State(app): State<App>, Path(id): Path<Uuid>) -> Result<Json<Vec<Address>>, Problem> {
    list_of(&app, id, addresses).await
}

pub(crate) async fn get_contacts(State(app): State<App>, Path(id): Path<Uuid>) -> Result<Json<Vec<Contact>>, Problem> {
    list_of(&app, id, contacts).await
}

pub(crate) async fn get_machines(State(app): State<App>, Path(id): Path<Uuid>) -> Result<Json<Vec<Machine>>, Problem> {
    list_of(&app, id, machines).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(check: impl FnOnce(&mut Fields)) -> bool {
        let mut fields = Fields::new();
        check(&mut fields);
        fields.finish().is_ok()
    }

    #[test]
    fn kinds_round_trip_and_others_are_refused() {
        for kind in AddressKind::ALL {
            assert_eq!(kind.as_str().parse(), Ok(kind));
            assert_eq!(serde_json::to_value(kind).ok(), Some(serde_json::json!(kind.as_str())));
        }
        assert!(!checked(|f| {
            kind(f, "office");
        }));
        assert!(!checked(|f| {
            kind(f, "Billing");
        }));
    }

    #[test]
    fn countries_are_normalised_to_upper_case() {
        let mut fields = Fields::new();
        assert_eq!(country(&mut fields, " de "), "DE");
        assert!(fields.finish().is_ok());
        for bad in ["Germany", "DEU", "XX", ""] {
            assert!(!checked(|f| {
                country(f, bad);
            }));
        }
    }

    #[test]
    fn phone_numbers_need_digits_and_nothing_else() {
        for good in ["+49 30 1234-5678", "(030) 123 45", "030/12.34"] {
            assert!(checked(|f| phone(f, Some(good))), "{good}");
        }
        for bad in ["call me", "12", "+49 30 ext 5", "++49 301"] {
            assert!(!checked(|f| phone(f, Some(bad))), "{bad}");
        }
    }
}
