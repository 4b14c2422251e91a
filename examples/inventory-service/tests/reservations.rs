//! Stock reserved for the quote service's `QuoteCreated` events, as they arrive over
//! Kafka: every line in one local transaction or none, once per quote.

mod common;

use common::{TestResult, envelopes, payload, start};
use example_contracts::inventory::{
    MissingStock, ProductEvent, ReservationEvent, ReservedLine, StockLevelChanged, StockReservationFailed,
    StockReserved,
};
use example_inventory_service::{Reservation, Stock};
use rdkafka::Message as _;
use reqwest::StatusCode;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_with_enough_stock_reserves_every_line() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;
    let dies = service.create_product("DIE-7", 5).await?;

    let quote_id = Uuid::now_v7();
    // Two lines of the press add up; the dies take everything there is.
    let created = service.quote_created(quote_id, &[(press.id, 2), (dies.id, 5), (press.id, 1)])?;
    service.publish_quote_event(&created).await?;

    let mut reader = service.kafka.reader(&service.reservation_topic()?)?;
    let record = reader.wait_for(1).await?[0].clone();
    assert_eq!(record.key(), Some(quote_id.to_string().as_bytes()));
    let event = &envelopes(&[record])?[0];
    assert_eq!(event.aggregate_id, quote_id.to_string());
    assert_eq!(event.aggregate_type.as_deref(), Some("reservation"));
    assert_eq!(event.source, service.name);
    assert_eq!(event.causation_id.as_deref(), Some(created.id.as_str()));
    let reserved: StockReserved = payload(event)?;
    let mut expected = vec![
        ReservedLine {
            product_id: press.id,
            quantity: 3,
        },
        ReservedLine {
            product_id: dies.id,
            quantity: 5,
        },
    ];
    expected.sort_by_key(|l| l.product_id);
    assert_eq!(
        reserved,
        StockReserved {
            quote_id,
            lines: expected
        }
    );

    // The stock shows it, and so does the quote's reservation.
    assert_eq!(service.stored_stock(press.id).await?, (10, 3, 2));
    assert_eq!(service.stored_stock(dies.id).await?, (5, 5, 2));
    let (stock, _) = service.stock(dies.id).await?;
    assert_eq!((stock.on_hand, stock.reserved, stock.available), (5, 5, 0));
    let reservation: Reservation = service
        .http
        .get(format!("{}/quotes/{quote_id}/reservation", service.base))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(reservation.lines.len(), 2);
    assert!(reservation.lines.iter().all(|l| l.state == "reserved"));

    // Each product's availability changed: its StockLevelChanged follows its creation's.
    service.database.outbox_drained().await?;
    let products = service.kafka.reader(&service.product_topic()?)?.finish().await?;
    let levels: Vec<StockLevelChanged> = envelopes(&products)?
        .iter()
        .map(common::decode::<ProductEvent>)
        .filter_map(|e| match e {
            Ok(ProductEvent::StockLevel(level)) => Some(Ok(level)),
            Ok(ProductEvent::Changed(_)) => None,
            Err(error) => Some(Err(error)),
        })
        .collect::<Result<_, _>>()?;
    for (product, available) in [(press.id, 7), (dies.id, 0)] {
        let last = levels.iter().rfind(|l| l.product_id == product);
        assert_eq!(
            last,
            Some(&StockLevelChanged {
                product_id: product,
                available,
                version: 2
            })
        );
    }
    service.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_short_of_one_product_reserves_nothing() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;
    let dies = service.create_product("DIE-7", 2).await?;
    let unknown = Uuid::now_v7();

    let quote_id = Uuid::now_v7();
    let created = service.quote_created(quote_id, &[(press.id, 3), (dies.id, 5), (unknown, 1)])?;
    service.publish_quote_event(&created).await?;

    let mut reader = service.kafka.reader(&service.reservation_topic()?)?;
    let event = &envelopes(reader.wait_for(1).await?)?[0];
    assert_eq!(event.aggregate_id, quote_id.to_string());
    let ReservationEvent::Failed(failed) = common::decode::<ReservationEvent>(event)? else {
        panic!("expected StockReservationFailed, got {}", event.message_type);
    };
    let mut missing = vec![
        MissingStock {
            product_id: dies.id,
            requested: 5,
            available: 2,
        },
        MissingStock {
            product_id: unknown,
            requested: 1,
            available: 0,
        },
    ];
    missing.sort_by_key(|m| m.product_id);
    assert_eq!(failed, StockReservationFailed { quote_id, missing });

    // Nothing was reserved, not even the line there was enough of.
    for (product, on_hand) in [(press.id, 10), (dies.id, 2)] {
        assert_eq!(service.stored_stock(product).await?, (on_hand, 0, 1));
        let (stock, _): (Stock, _) = service.stock(product).await?;
        assert_eq!(stock.available, on_hand);
    }
    let none = service
        .http
        .get(format!("{}/quotes/{quote_id}/reservation", service.base))
        .send()
        .await?;
    common::problem(none, StatusCode::NOT_FOUND).await?;
    let (rows,): (i64,) = sqlx::query_as("select count(*) from stock_reservations")
        .fetch_one(&service.pool)
        .await?;
    assert_eq!(rows, 0);
    service.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_delivered_twice_or_published_again_is_reserved_once() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;

    let quote_id = Uuid::now_v7();
    let created = service.quote_created(quote_id, &[(press.id, 4)])?;
    // The same event twice (a redelivery), then the same quote as a new event (the quote
    // service publishing it again).
    let again = service.quote_created(quote_id, &[(press.id, 4)])?;
    for envelope in [&created, &created, &again] {
        service.publish_quote_event(envelope).await?;
    }
    service
        .kafka
        .caught_up(&service.quote_group(), &service.quote_topic()?)
        .await?;
    service.database.outbox_drained().await?;

    assert_eq!(service.stored_stock(press.id).await?, (10, 4, 2));
    let records = service.kafka.reader(&service.reservation_topic()?)?.finish().await?;
    assert_eq!(records.len(), 1, "one answer for one reservation");
    let reserved: StockReserved = payload(&envelopes(&records)?[0])?;
    assert_eq!(
        reserved.lines,
        vec![ReservedLine {
            product_id: press.id,
            quantity: 4
        }]
    );
    let (inbox,): (i64,) = sqlx::query_as("select count(*) from dbps_inbox where consumer = $1")
        .bind(service.quote_group())
        .fetch_one(&service.pool)
        .await?;
    assert_eq!(inbox, 2, "two distinct events, each recorded once");
    service.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_quotes_never_reserve_more_than_there_is() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;
    let dies = service.create_product("DIE-7", 100).await?;

    // Twelve quotes of 3 presses each, keyed apart (so the consumer's partitions take them
    // at once), their lines in either order: three can have their presses.
    let mut quotes = Vec::new();
    for n in 0..12 {
        let quote_id = Uuid::now_v7();
        let lines = if n % 2 == 0 {
            [(press.id, 3), (dies.id, 1)]
        } else {
            [(dies.id, 1), (press.id, 3)]
        };
        quotes.push(service.quote_created(quote_id, &lines)?);
    }
    for quote in &quotes {
        service.publish_quote_event(quote).await?;
    }

    let mut reader = service.kafka.reader(&service.reservation_topic()?)?;
    let answers: Vec<ReservationEvent> = envelopes(reader.wait_for(quotes.len()).await?)?
        .iter()
        .map(common::decode)
        .collect::<Result<_, _>>()?;
    let reserved = answers
        .iter()
        .filter(|a| matches!(a, ReservationEvent::Reserved(_)))
        .count();
    assert_eq!((reserved, answers.len()), (3, 12), "{answers:?}");
    let (on_hand, held, _) = service.stored_stock(press.id).await?;
    assert_eq!((on_hand, held), (10, 9));
    assert_eq!(service.stored_stock(dies.id).await?.1, 3);

    // Every quote was answered, none dead-lettered.
    service
        .kafka
        .caught_up(&service.quote_group(), &service.quote_topic()?)
        .await?;
    let dead_letters = service.naming.dead_letter(&service.quote_group())?;
    assert!(service.kafka.reader(&dead_letters)?.finish().await?.is_empty());
    service.shutdown().await
}
