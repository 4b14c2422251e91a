//! The inventory service over HTTP: products and their events, the stock check served
//! from Redis and invalidated by the service's own events, client mistakes, and the
//! database boundaries of its runtime role.

mod common;

use common::{TestResult, envelopes, problem, start};
use example_contracts::inventory::{ProductChanged, ProductEvent, StockLevelChanged};
use example_inventory_service::{Product, Stock};
use rdkafka::Message as _;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Connection as _;
use uuid::Uuid;

/// Another service's migrations: a `customers` table in its own database.
static OTHER_SERVICE: sqlx::migrate::Migrator = sqlx::migrate!("tests/fixtures/other_service");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_are_created_with_their_stock_and_events() -> TestResult {
    let service = start().await?;
    let products = format!("{}/products", service.base);

    let created = service
        .http
        .post(&products)
        .json(&json!({"sku": "PRESS-200", "name": "Press P-200", "unit_price_cents": 1_250_000, "on_hand": 3}))
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::CREATED);
    let location = created.headers()["location"].to_str()?.to_owned();
    let press: Product = created.json().await?;
    assert_eq!(location, format!("/products/{}", press.id));
    assert_eq!(
        (
            press.sku.as_str(),
            press.name.as_str(),
            press.unit_price_cents,
            press.version
        ),
        ("PRESS-200", "Press P-200", 1_250_000, 1)
    );
    let empty = service.create_product("DIE-7", 0).await?;

    let fetched: Product = service
        .http
        .get(format!("{products}/{}", press.id))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(fetched, press);
    let all: Vec<Product> = service.http.get(&products).send().await?.json().await?;
    assert_eq!(all, vec![empty.clone(), press.clone()], "every product, by SKU");
    let (stock, _) = service.stock(press.id).await?;
    assert_eq!(
        stock,
        Stock {
            product_id: press.id,
            on_hand: 3,
            reserved: 0,
            available: 3,
            version: 1
        }
    );
    // The starting stock is a receipt.
    let (received,): (i64,) =
        sqlx::query_as("select coalesce(sum(quantity), 0)::bigint from stock_movements where kind = 'received'")
            .fetch_one(&service.pool)
            .await?;
    assert_eq!(received, 3);

    // Each product: ProductChanged, then its stock level, keyed by the product.
    service.database.outbox_drained().await?;
    let records = service.kafka.reader(&service.product_topic()?)?.finish().await?;
    assert_eq!(records.len(), 4);
    let events = envelopes(&records)?;
    for (product, available) in [(&press, 3), (&empty, 0)] {
        let of: Vec<_> = events
            .iter()
            .filter(|e| e.aggregate_id == product.id.to_string())
            .collect();
        let decoded: Vec<ProductEvent> = of.iter().map(|e| common::decode(e)).collect::<Result<_, _>>()?;
        assert_eq!(
            decoded,
            vec![
                ProductEvent::Changed(ProductChanged {
                    product_id: product.id,
                    sku: product.sku.clone(),
                    name: product.name.clone(),
                    unit_price_cents: product.unit_price_cents,
                    version: 1,
                }),
                ProductEvent::StockLevel(StockLevelChanged {
                    product_id: product.id,
                    available,
                    version: 1,
                }),
            ]
        );
        assert_eq!(
            of.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![Some(1), Some(2)]
        );
    }
    assert!(records.iter().all(|r| {
        r.key()
            .is_some_and(|k| k == press.id.to_string().as_bytes() || k == empty.id.to_string().as_bytes())
    }));
    service.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_check_is_served_from_redis_until_a_stock_event_invalidates_it() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;

    let (first, served) = service.stock(press.id).await?;
    assert_eq!(served, "miss");
    assert_eq!((first.on_hand, first.reserved, first.available), (10, 0, 10));
    let (second, served) = service.stock(press.id).await?;
    assert_eq!(served, "hit");
    assert_eq!(second, first);

    // A delivery: the next check shows the new level.
    let delivered = service
        .http
        .post(format!("{}/products/{}/deliveries", service.base, press.id))
        .json(&json!({"quantity": 5}))
        .send()
        .await?;
    assert_eq!(delivered.status(), StatusCode::OK);
    let delivered: Stock = delivered.json().await?;
    assert_eq!((delivered.on_hand, delivered.available, delivered.version), (15, 15, 2));
    dbps_testkit::eventually("the delivery to show in the stock check", || async {
        Ok::<_, common::BoxError>(service.stock(press.id).await?.0 == delivered)
    })
    .await?;
    // Once the delivery's own event has invalidated it too, the level stays cached.
    service.stock_cache_caught_up().await?;
    assert_eq!(service.stock(press.id).await?.0, delivered);
    let (cached, served) = service.stock(press.id).await?;
    assert_eq!((cached, served.as_str()), (delivered.clone(), "hit"));

    // A reservation, made by a Kafka consumer: only the StockLevelChanged event it
    // publishes can invalidate the cached level (the TTL is minutes away).
    let quote_id = Uuid::now_v7();
    service
        .publish_quote_event(&service.quote_created(quote_id, &[(press.id, 4)])?)
        .await?;
    service.kafka.reader(&service.reservation_topic()?)?.wait_for(1).await?;
    dbps_testkit::eventually("the reservation to show in the stock check", || async {
        let (stock, _) = service.stock(press.id).await?;
        Ok::<_, common::BoxError>((stock.on_hand, stock.reserved, stock.available) == (15, 4, 11))
    })
    .await?;
    service.stock_cache_caught_up().await?;
    let (fresh, _) = service.stock(press.id).await?;
    assert_eq!((fresh.reserved, fresh.available, fresh.version), (4, 11, 3));
    let (cached, served) = service.stock(press.id).await?;
    assert_eq!((cached, served.as_str()), (fresh, "hit"));
    service.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_mistake_is_a_4xx_problem_and_writes_nothing() -> TestResult {
    let service = start().await?;
    let http = &service.http;
    let products = format!("{}/products", service.base);
    let press = service.create_product("PRESS-200", 10).await?;
    let deliveries = format!("{products}/{}/deliveries", press.id);

    let product = |sku: &str, price: i64, on_hand: i64| json!({"sku": sku, "name": "Die", "unit_price_cents": price, "on_hand": on_hand});
    let cases = [
        (product("DIE-7", -1, 5), StatusCode::UNPROCESSABLE_ENTITY),
        (product("DIE-7", 100, -1), StatusCode::UNPROCESSABLE_ENTITY),
        (product(" ", 100, 5), StatusCode::UNPROCESSABLE_ENTITY),
        (product(&"X".repeat(65), 100, 5), StatusCode::UNPROCESSABLE_ENTITY),
        (product("DIE-7", 100, 2_000_000_000), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"sku": "DIE-7", "name": "Die", "unit_price_cents": 100}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"sku": "DIE-7", "name": "Die", "unit_price_cents": 1.5, "on_hand": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"sku": "DIE-7", "name": "Die", "unit_price_cents": 1, "on_hand": 1, "colour": "red"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (product("PRESS-200", 100, 5), StatusCode::CONFLICT),
    ];
    for (body, status) in cases {
        let response = http.post(&products).json(&body).send().await?;
        problem(response, status).await?;
    }
    let invalid = http.post(&products).json(&product("", -1, -1)).send().await?;
    let invalid = problem(invalid, StatusCode::UNPROCESSABLE_ENTITY).await?;
    assert_eq!(
        invalid["errors"].as_array().map(Vec::len),
        Some(3),
        "every mistake at once"
    );

    for body in [
        json!({"quantity": 0}),
        json!({"quantity": -3}),
        json!({}),
        json!({"quantity": "5"}),
    ] {
        let response = http.post(&deliveries).json(&body).send().await?;
        problem(response, StatusCode::UNPROCESSABLE_ENTITY).await?;
    }
    let unknown = Uuid::now_v7();
    let to_nowhere = http
        .post(format!("{products}/{unknown}/deliveries"))
        .json(&json!({"quantity": 5}))
        .send()
        .await?;
    problem(to_nowhere, StatusCode::NOT_FOUND).await?;

    for (url, field) in [(&products, "sku"), (&deliveries, "quantity")] {
        let malformed = http
            .post(url)
            .header("content-type", "application/json")
            .body(format!("{{\"{field}\":"))
            .send()
            .await?;
        problem(malformed, StatusCode::BAD_REQUEST).await?;
        let huge = http
            .post(url)
            .header("content-type", "application/json")
            .body(format!("{{\"{field}\": \"{}\"}}", "x".repeat(100_000)))
            .send()
            .await?;
        problem(huge, StatusCode::PAYLOAD_TOO_LARGE).await?;
    }

    for path in [
        format!("/products/{unknown}"),
        format!("/products/{unknown}/stock"),
        format!("/quotes/{unknown}/reservation"),
    ] {
        problem(
            http.get(format!("{}{path}", service.base)).send().await?,
            StatusCode::NOT_FOUND,
        )
        .await?;
    }
    for path in ["/products/42", "/products/42/stock", "/quotes/42/reservation"] {
        problem(
            http.get(format!("{}{path}", service.base)).send().await?,
            StatusCode::BAD_REQUEST,
        )
        .await?;
    }

    // One product with its one receipt and its two events: the mistakes wrote nothing.
    let count = |table: &'static str| {
        let pool = service.pool.clone();
        async move {
            let (rows,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
                .fetch_one(&pool)
                .await?;
            Ok::<_, sqlx::Error>(rows)
        }
    };
    assert_eq!(count("products").await?, 1);
    assert_eq!(count("stock_movements").await?, 1);
    assert_eq!(service.stored_stock(press.id).await?, (10, 0, 1));
    service.database.outbox_drained().await?;
    let events = service.kafka.reader(&service.product_topic()?)?.finish().await?;
    assert_eq!(events.len(), 2, "the product's ProductChanged and StockLevelChanged");
    service.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_reaches_its_own_tables_only() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;
    let sqlstate = |error: &sqlx::Error| error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());

    // Another service on the same server, with its own database and a table in it.
    let other = dbps_testkit::service("customer")
        .component("customer", &OTHER_SERVICE)
        .start()
        .await?;
    sqlx::query("insert into customers (id, name) values ($1, 'Ada')")
        .bind(Uuid::now_v7())
        .execute(other.pool())
        .await?;
    let other_database = other.service().database_name().as_str().to_owned();

    // The inventory's runtime role cannot even connect to it...
    let into_other = service.database.runtime_options().database(&other_database);
    let refused = sqlx::PgConnection::connect_with(&into_other).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("42501"), "{refused}");
    // ...nor the other service's runtime role to the inventory's.
    let into_inventory = other
        .runtime_options()
        .database(service.database.service().database_name().as_str());
    let refused = sqlx::PgConnection::connect_with(&into_inventory).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("42501"), "{refused}");

    // In its own database it cannot change the tables, nor read the migration history.
    for statement in [
        "create table sneaky (x int)",
        "alter table products add column colour text",
        "drop table stock_reservations",
        "select count(*) from dbps_migrations.inventory",
    ] {
        let denied = sqlx::query(statement).execute(&service.pool).await.unwrap_err();
        assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{statement}: {denied}");
    }
    // Stock movements are append-only.
    let rewritten = sqlx::query("update stock_movements set quantity = 1000")
        .execute(&service.pool)
        .await
        .unwrap_err();
    assert!(rewritten.to_string().contains("append-only"), "{rewritten}");
    let erased = sqlx::query("delete from stock_movements")
        .execute(&service.pool)
        .await
        .unwrap_err();
    assert!(erased.to_string().contains("append-only"), "{erased}");
    // A stock level below what is reserved, or negative, is refused by the table itself.
    let negative = sqlx::query("update inventory set reserved = on_hand + 1 where product_id = $1")
        .bind(press.id)
        .execute(&service.pool)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&negative).as_deref(), Some("23514"), "{negative}");
    assert_eq!(service.stored_stock(press.id).await?, (10, 0, 1));
    service.shutdown().await
}
