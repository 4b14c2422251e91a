//! The service's MongoDB database: its collections, their indexes and validators, and
//! the connection at start.
//!
//! `dbps-service` prepares PostgreSQL databases only ([`dbps_service::Service::postgres`]);
//! [`connect`] and [`migrations`] are the same step for this service's MongoDB database:
//! its name is the service's name, and the migrations run at every start under the
//! migration runner's lock (`dbps_migrate::MongoMigrations`).

use dbps_migrate::{MongoMigrations, mongo::BoxError};
use dbps_outbox::mongo::MongoOutboxStore;
use mongodb::bson::{Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::IndexOptions;
use mongodb::{Database, IndexModel};

/// Emails, inbound and outbound: headers, text and HTML bodies, the attachments'
/// metadata, the customer assignment (a copy of `email_assignments`) and, for
/// notifications, the delivery status.
pub const EMAILS: &str = "emails";
/// The attachments' bytes, in chunks of [`CHUNK_SIZE`] bytes: `{email_id, attachment, n,
/// data}`.
pub const ATTACHMENTS: &str = "email_attachments";
/// Which customer each assigned email belongs to; its documents carry the
/// `email.EmailAssigned` events until the relay has published them (the MongoDB outbox).
pub const ASSIGNMENTS: &str = "email_assignments";
/// The replica of the customer service: `{_id: address, email, customer_id}`, one
/// document per address.
pub const CUSTOMER_INDEX: &str = "customer_email_index";

/// How many bytes of an attachment one chunk document holds.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// The server's error code for a command or an option it does not implement (FerretDB
/// answers `create` with a validator so).
const NOT_IMPLEMENTED: i32 = 238;
/// The server's error code for a collection that exists already.
const NAMESPACE_EXISTS: i32 = 48;

/// Connects to the MongoDB server at `uri` and names the service's database.
///
/// The driver connects lazily; the migrations that follow are the first round trip, so a
/// server that cannot be reached fails the start there.
pub async fn connect(uri: &str, database: &str) -> Result<Database, mongodb::error::Error> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    Ok(client.database(database))
}

/// The migrations of the service's database: the collections (with their validators
/// where the server enforces validators), then the indexes — the service's and the
/// outbox relay's.
pub fn migrations(database: &Database) -> MongoMigrations {
    let outbox = MongoOutboxStore::new(database.clone()).collection(ASSIGNMENTS);
    let index = |keys: Document, name: &str, unique: bool| {
        IndexModel::builder()
            .keys(keys)
            .options(IndexOptions::builder().name(name.to_owned()).unique(unique).build())
            .build()
    };
    let migrations = MongoMigrations::new(database.clone())
        .migration(1, "create the email collections", |db| async move {
            create_collections(&db).await
        })
        // One email per Message-ID: the duplicate check of `POST /emails`.
        .index(EMAILS, index(doc! { "message_id": 1 }, "message_id_unique", true))
        // The unassigned emails of a sender (late assignment).
        .index(
            EMAILS,
            index(doc! { "from_address": 1, "customer_id": 1 }, "sender_assignment", false),
        )
        // The notifications due for a delivery attempt.
        .index(
            EMAILS,
            index(
                doc! { "delivery.status": 1, "delivery.next_attempt_at": 1 },
                "deliveries_due",
                false,
            ),
        )
        // An attachment's chunks in order.
        .index(
            ATTACHMENTS,
            index(
                doc! { "email_id": 1, "attachment": 1, "n": 1 },
                "attachment_chunks",
                true,
            ),
        )
        .index(
            ASSIGNMENTS,
            index(doc! { "customer_id": 1, "email_id": 1 }, "customer_emails", false),
        )
        .index(
            CUSTOMER_INDEX,
            index(doc! { "customer_id": 1 }, "customer_addresses", false),
        );
    outbox
        .indexes()
        .into_iter()
        .fold(migrations, |migrations, (collection, index)| {
            migrations.index(&collection, index)
        })
}

/// The validators: the fields every writer of a collection sets, with their types. The
/// service checks what it writes itself; a validator keeps other writers honest on
/// servers that enforce it.
fn validators() -> [(&'static str, Document); 4] {
    [
        (
            EMAILS,
            doc! { "$jsonSchema": {
                "bsonType": "object",
                "required": ["_id", "message_id", "direction", "received_at", "attachments"],
                "properties": {
                    "_id": { "bsonType": "string" },
                    "message_id": { "bsonType": "string", "minLength": 1 },
                    "direction": { "enum": ["inbound", "outbound"] },
                    "received_at": { "bsonType": "date" },
                    "attachments": { "bsonType": "array" },
                    "customer_id": { "bsonType": ["string", "null"] },
                },
            } },
        ),
        (
            ATTACHMENTS,
            doc! { "$jsonSchema": {
                "bsonType": "object",
                "required": ["email_id", "attachment", "n", "data"],
                "properties": {
                    "email_id": { "bsonType": "string" },
                    "attachment": { "bsonType": ["int", "long"], "minimum": 0 },
                    "n": { "bsonType": ["int", "long"], "minimum": 0 },
                    "data": { "bsonType": "binData" },
                },
            } },
        ),
        (
            ASSIGNMENTS,
            doc! { "$jsonSchema": {
                "bsonType": "object",
                "required": ["email_id", "customer_id", "assigned_at"],
                "properties": {
                    "email_id": { "bsonType": "string" },
                    "customer_id": { "bsonType": "string" },
                    "assigned_at": { "bsonType": "date" },
                },
            } },
        ),
        (
            CUSTOMER_INDEX,
            doc! { "$jsonSchema": {
                "bsonType": "object",
                "required": ["email", "customer_id"],
                "properties": {
                    "email": { "bsonType": "string" },
                    "customer_id": { "bsonType": "string" },
                },
            } },
        ),
    ]
}

/// Creates the collections with their validators. A server that does not implement
/// validators (FerretDB 1.x) gets the collections without them; a collection that
/// exists already (a run that failed part-way) is left as it is.
async fn create_collections(db: &Database) -> Result<(), BoxError> {
    for (name, validator) in validators() {
        match db.create_collection(name).validator(validator).await {
            Ok(()) => {}
            Err(error) if code(&error) == Some(NAMESPACE_EXISTS) => {}
            Err(error) if code(&error) == Some(NOT_IMPLEMENTED) => {
                tracing::info!(
                    collection = name,
                    "the server does not enforce validators; creating the collection without one"
                );
                match db.create_collection(name).await {
                    Ok(()) => {}
                    Err(error) if code(&error) == Some(NAMESPACE_EXISTS) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// The server's error code of a command error.
fn code(error: &mongodb::error::Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(command) => Some(command.code),
        _ => None,
    }
}
