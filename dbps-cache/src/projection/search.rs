//! The declaration of a search projection: what its documents are made of.

use dbps_core::{Envelope, HandlerError, MessageSet};
use serde::Serialize;
use serde_json::Value;

use crate::error::{CacheError, Result};

/// What an event means for a search projection's document of its aggregate (the id of
/// the document is the envelope's aggregate id, its external version the envelope's
/// sequence number).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DocChange {
    /// The whole document as of this event; it replaces any older one.
    Index(Value),
    /// The aggregate is gone: its document is deleted, and the delete's version keeps an
    /// older event from bringing it back (for as long as the index keeps tombstones, see
    /// [`OsProjection`](super::OsProjection)).
    Delete,
    /// The event does not change the document.
    Skip,
}

impl DocChange {
    /// The document `value` serializes to (a JSON object).
    pub fn index<T: Serialize>(value: &T) -> Result<Self> {
        match serde_json::to_value(value) {
            Ok(document @ Value::Object(_)) => Ok(Self::Index(document)),
            Ok(_) => Err(CacheError::InvalidConfig {
                setting: "search document",
                reason: String::from("a document must serialize to a JSON object"),
            }),
            Err(source) => Err(CacheError::Codec {
                key: String::from("search document"),
                source,
            }),
        }
    }
}

/// A versioned search read model: the topics it reads, its index's settings and
/// mappings, and how an event becomes a whole document.
///
/// Documents are whole: each event that changes one carries (or lets the model derive)
/// the aggregate's complete searchable state, because an older event applied later must
/// lose against a newer one by version alone. A change of mappings or of what a document
/// holds is a new version, built by a rebuild into a fresh index.
///
/// ```
/// use dbps_cache::projection::{DocChange, SearchModel};
/// use dbps_core::{Envelope, HandlerError, Message, message_set};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct ProductChanged { pub name: String, pub description: String }
/// impl Message for ProductChanged { const TYPE: &'static str = "inventory.ProductChanged"; }
///
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct ProductRetired {}
/// impl Message for ProductRetired { const TYPE: &'static str = "inventory.ProductRetired"; }
///
/// message_set! { pub enum ProductEvents { Changed(ProductChanged), Retired(ProductRetired) } }
///
/// struct ProductSearch;
///
/// impl SearchModel for ProductSearch {
///     type Events = ProductEvents;
///
///     fn name(&self) -> &str { "products" }
///     fn version(&self) -> u32 { 1 }
///     fn topics(&self) -> Vec<String> { vec![String::from("inventory.product.events")] }
///
///     fn mappings(&self) -> serde_json::Value {
///         serde_json::json!({
///             "mappings": { "properties": {
///                 "name": { "type": "text", "analyzer": "english" },
///                 "description": { "type": "text", "analyzer": "english" },
///             }}
///         })
///     }
///
///     fn project(&self, event: ProductEvents, _: &Envelope) -> Result<DocChange, HandlerError> {
///         match event {
///             ProductEvents::Changed(p) => Ok(DocChange::index(&p)?),
///             ProductEvents::Retired(_) => Ok(DocChange::Delete),
///         }
///     }
/// }
/// ```
pub trait SearchModel: Send + Sync + 'static {
    /// The events the projection understands. Other types on its topics are skipped
    /// (counted as `dbps_projection_ignored_total`).
    type Events: MessageSet;

    /// The projection's name: the alias readers search (after the index prefix), and the
    /// stem of its indices' names. Lower case letters, digits, `_` and `-`, starting with
    /// a letter or a digit.
    fn name(&self) -> &str;

    /// The version (at least 1) this declaration describes. Its index is
    /// `<prefix><name>_v<version>`.
    fn version(&self) -> u32;

    /// The topics the projection reads.
    fn topics(&self) -> Vec<String>;

    /// The body that creates this version's index: a JSON object with `settings` and
    /// `mappings` (either may be left out). The projection adds `index.gc_deletes` to the
    /// settings unless they name it.
    fn mappings(&self) -> Value;

    /// What `event` means for the document of the envelope's aggregate.
    fn project(&self, event: Self::Events, envelope: &Envelope) -> Result<DocChange, HandlerError>;
}
