//! The inventory's product catalogue, as reference data: held in process with a time to
//! live, loaded from the inventory's `GET /products` and kept current by its
//! `ProductChanged` events. A quote's lines are checked against it and priced from it.

use std::sync::Arc;
use std::time::Duration;

use dbps_cache::reference::{Item, ReferenceData, ReferenceUpdates};
use dbps_core::{Envelope, HandlerError, Message as _, Registry};
use dbps_service::client::ServiceClient;
use example_contracts::inventory::ProductChanged;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How long a product is held before it is loaded again.
pub const PRODUCT_TTL: Duration = Duration::from_secs(300);

/// What the quote service keeps of a product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductInfo {
    /// Its stock-keeping unit.
    pub sku: String,
    /// Its name.
    pub name: String,
    /// Its unit price, in cents.
    pub unit_price_cents: i64,
}

/// A product as the inventory's `GET /products` lists it (other fields are ignored).
#[derive(Debug, Deserialize)]
struct Listed {
    id: Uuid,
    sku: String,
    name: String,
    unit_price_cents: i64,
    version: i64,
}

/// The catalogue.
pub type Catalogue = Arc<ReferenceData<Uuid, ProductInfo>>;

/// The catalogue, loaded through `inventory` (a client of the inventory service).
pub fn catalogue(inventory: ServiceClient) -> Catalogue {
    Arc::new(ReferenceData::new("products", PRODUCT_TTL, move || {
        let inventory = inventory.clone();
        async move {
            let listed: Vec<Listed> = inventory.get_json("/products").await?.unwrap_or_default();
            Ok(listed
                .into_iter()
                .map(|p| Item {
                    key: p.id,
                    version: p.version,
                    value: ProductInfo {
                        sku: p.sku,
                        name: p.name,
                        unit_price_cents: p.unit_price_cents,
                    },
                })
                .collect())
        }
    }))
}

type Read = fn(&Envelope) -> Result<Option<(Uuid, i64, Option<ProductInfo>)>, HandlerError>;

/// The handler of the inventory's product events: `ProductChanged` updates the catalogue
/// (by the product's version); the topic's other events concern no product's details.
pub fn updates(catalogue: &Catalogue) -> ReferenceUpdates<Uuid, ProductInfo, Read> {
    ReferenceUpdates::new(Arc::clone(catalogue), read)
}

fn read(envelope: &Envelope) -> Result<Option<(Uuid, i64, Option<ProductInfo>)>, HandlerError> {
    if envelope.message_type != ProductChanged::TYPE {
        return Ok(None);
    }
    let changed: ProductChanged = Registry::new().decode(envelope).map_err(HandlerError::permanent)?;
    let info = ProductInfo {
        sku: changed.sku,
        name: changed.name,
        unit_price_cents: changed.unit_price_cents,
    };
    Ok(Some((changed.product_id, changed.version, Some(info))))
}
