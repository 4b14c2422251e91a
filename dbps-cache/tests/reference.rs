//! Reference data: a versioned snapshot at start, events applied in order, duplicates and
//! late events ignored, a gap reloading the snapshot, deletions that stay deleted, and
//! updates arriving through the consumer runner from the real broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::TestResult;
use dbps_cache::reference::{Applied, Item, ReferenceData, ReferenceUpdates};
use dbps_core::kafka::HandlerError;
use dbps_core::{Envelope, Message, Registry};
use serde::{Deserialize, Serialize};

/// The owning service's products: name and version per sku.
type Source = Arc<Mutex<Vec<Item<String, String>>>>;

fn product(sku: &str, version: i64, name: &str) -> Item<String, String> {
    Item {
        key: sku.to_owned(),
        version,
        value: name.to_owned(),
    }
}

/// Reference data over `source`, counting its loads.
fn products(source: &Source, loads: &Arc<AtomicUsize>, ttl: Duration) -> ReferenceData<String, String> {
    let (source, loads) = (Arc::clone(source), Arc::clone(loads));
    ReferenceData::new("products", ttl, move || {
        let (source, loads) = (Arc::clone(&source), Arc::clone(&loads));
        async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok(source.lock().map_err(|_| "poisoned")?.clone())
        }
    })
}

#[tokio::test]
async fn events_apply_in_version_order_and_a_gap_reloads_the_snapshot() -> TestResult {
    let source: Source = Arc::new(Mutex::new(vec![product("p-1", 1, "Press"), product("p-2", 3, "Lathe")]));
    let loads = Arc::new(AtomicUsize::new(0));
    let data = products(&source, &loads, Duration::from_secs(3600));
    assert_eq!(data.reload().await?, 2);
    assert_eq!(data.get(&"p-2".to_owned()).await?.as_deref(), Some("Lathe"));

    assert_eq!(
        data.apply("p-1".into(), 2, Some("Press XL".into())).await?,
        Applied::Applied
    );
    // A duplicate and a late event change nothing.
    assert_eq!(
        data.apply("p-1".into(), 2, Some("Press XL".into())).await?,
        Applied::Stale
    );
    assert_eq!(data.apply("p-1".into(), 1, Some("Press".into())).await?, Applied::Stale);
    assert_eq!(data.get(&"p-1".to_owned()).await?.as_deref(), Some("Press XL"));

    // Versions 4 and 5 of p-2 were missed; the source has 5; the event is 6.
    source.lock().map_err(|_| "poisoned")?[1] = product("p-2", 5, "Lathe Pro");
    assert_eq!(
        data.apply("p-2".into(), 6, Some("Lathe Pro 2".into())).await?,
        Applied::Reloaded
    );
    assert_eq!(data.get(&"p-2".to_owned()).await?.as_deref(), Some("Lathe Pro 2"));
    assert_eq!(loads.load(Ordering::SeqCst), 2, "one reload for the gap");

    // A deletion stays: a late update of the deleted item does not bring it back.
    assert_eq!(data.apply("p-2".into(), 7, None).await?, Applied::Applied);
    assert_eq!(
        data.apply("p-2".into(), 6, Some("Lathe Pro 2".into())).await?,
        Applied::Stale
    );
    assert_eq!(data.get(&"p-2".to_owned()).await?, None);
    Ok(())
}

#[tokio::test]
async fn an_expired_item_reloads_the_snapshot_once_for_all_readers() -> TestResult {
    let source: Source = Arc::new(Mutex::new(vec![product("p-1", 1, "Press")]));
    let loads = Arc::new(AtomicUsize::new(0));
    let data = Arc::new(products(&source, &loads, Duration::from_millis(100)));
    data.reload().await?;
    source.lock().map_err(|_| "poisoned")?[0] = product("p-1", 2, "Press XL");
    dbps_testkit::eventually("the item to expire and be reloaded", || async {
        Ok::<_, dbps_cache::CacheError>(data.get(&"p-1".to_owned()).await?.as_deref() == Some("Press XL"))
    })
    .await?;

    // Twenty readers of an expired item: one reload.
    dbps_testkit::eventually("the item to expire again", || async {
        Ok::<_, std::convert::Infallible>(!data.holds(&"p-1".to_owned()).await)
    })
    .await?;
    let before = loads.load(Ordering::SeqCst);
    let readers: Vec<_> = (0..20)
        .map(|_| {
            let data = Arc::clone(&data);
            tokio::spawn(async move { data.get(&"p-1".to_owned()).await })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await??.as_deref(), Some("Press XL"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), before + 1);
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProductChanged {
    sku: String,
    name: Option<String>,
}

impl Message for ProductChanged {
    const TYPE: &'static str = "inventory.ProductChanged";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_events_reach_the_reference_data_through_the_consumer_runner() -> TestResult {
    let source: Source = Arc::new(Mutex::new(vec![product("p-1", 1, "Press")]));
    let data = Arc::new(products(
        &source,
        &Arc::new(AtomicUsize::new(0)),
        Duration::from_secs(3600),
    ));
    data.reload().await?;

    let registry = Registry::new();
    let updates = ReferenceUpdates::new(Arc::clone(&data), move |event: &Envelope| {
        let changed: ProductChanged = registry.decode(event).map_err(HandlerError::permanent)?;
        Ok(Some((changed.sku, event.sequence.unwrap_or_default(), changed.name)))
    });
    let mut events = Vec::new();
    for (sequence, name) in [(2, Some("Press XL")), (3, None)] {
        let change = ProductChanged {
            sku: String::from("p-1"),
            name: name.map(str::to_owned),
        };
        let mut event = Envelope::event("inventory", "product", "p-1", &change)?;
        event.sequence = Some(sequence);
        events.push(event);
    }
    common::consume(updates, &events).await?;
    assert_eq!(data.get(&"p-1".to_owned()).await?, None, "deleted by version 3");
    Ok(())
}
