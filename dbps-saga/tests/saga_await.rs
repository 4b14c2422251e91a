//! Steps that await an event instead of a reply, against the real PostgreSQL: the ADR's
//! `QuoteCreated` → `StockReserved` / `StockReservationFailed` flow as a persisted state
//! machine with a deadline.

use std::str::FromStr as _;
use std::time::Duration;

use dbps_core::{CancellationToken, Envelope, Message};
use dbps_saga::{Command, Definition, Orchestrator, SagaState, Step};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StockReserved {
    quote: String,
    reservation: String,
}
impl Message for StockReserved {
    const TYPE: &'static str = "inventory.StockReserved";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StockReservationFailed {
    quote: String,
}
impl Message for StockReservationFailed {
    const TYPE: &'static str = "inventory.StockReservationFailed";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CreatePo {
    quote: String,
}
impl Message for CreatePo {
    const TYPE: &'static str = "orders.CreatePo";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PoCreated {}
impl Message for PoCreated {
    const TYPE: &'static str = "orders.PoCreated";
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct QuoteFlow {
    quote: String,
    reservation: Option<String>,
}

fn definition(stock_deadline: Duration) -> Definition<QuoteFlow> {
    Definition::new("quote-flow", 1)
        .step(
            Step::<QuoteFlow>::new("await-stock")
                .awaits(|q| q.quote.clone())
                .on_event(
                    |e: &StockReserved| e.quote.clone(),
                    |q, e: StockReserved| {
                        q.reservation = Some(e.reservation);
                    },
                )
                .on_failure_event(|e: &StockReservationFailed| e.quote.clone())
                .timeout(stock_deadline),
        )
        .step(
            Step::<QuoteFlow>::new("purchase-order")
                .command(|q| Command::to("orders", &CreatePo { quote: q.quote.clone() }))
                .on_success(|_, _: PoCreated| {}),
        )
}

async fn setup(
    stock_deadline: Duration,
) -> Result<(dbps_testkit::TestPostgres, Orchestrator), Box<dyn std::error::Error + Send + Sync>> {
    let db = dbps_testkit::postgres().await?;
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("quote")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component("dbps_saga", &dbps_saga::MIGRATOR)
        .run(&sqlx::postgres::PgConnectOptions::from_str(db.url())?)
        .await?;
    let orchestrator = Orchestrator::builder(db.pool().clone(), "quote")
        .register(definition(stock_deadline))
        .poll_interval(Duration::from_millis(50))
        .build()?;
    Ok((db, orchestrator))
}

async fn start(
    db: &dbps_testkit::TestPostgres,
    orchestrator: &Orchestrator,
    quote: &str,
) -> Result<Uuid, Box<dyn std::error::Error + Send + Sync>> {
    let mut tx = db.pool().begin().await?;
    let id = orchestrator
        .start(
            &mut tx,
            "quote-flow",
            &QuoteFlow {
                quote: quote.to_owned(),
                ..QuoteFlow::default()
            },
        )
        .await?;
    tx.commit().await?;
    Ok(id)
}

async fn deliver<M: Message>(
    db: &dbps_testkit::TestPostgres,
    orchestrator: &Orchestrator,
    event: &M,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let envelope = Envelope::event("inventory", "stock", "any", event)?;
    let mut tx = db.pool().begin().await?;
    let moved = orchestrator.handle_event(&mut tx, &envelope).await?;
    tx.commit().await?;
    Ok(moved)
}

#[tokio::test]
async fn an_awaited_event_with_the_sagas_key_moves_it_once() -> TestResult {
    let (db, orchestrator) = setup(Duration::from_secs(30)).await?;
    let id = start(&db, &orchestrator, "q1").await?;
    let waiting = orchestrator.get(id).await?.ok_or("missing")?;
    assert_eq!(
        (waiting.step, waiting.awaiting.as_deref()),
        (0, None),
        "nothing is sent for an awaited event"
    );
    assert!(waiting.await_key.is_some());

    // Another quote's event moves nothing.
    let other = StockReserved {
        quote: "q2".into(),
        reservation: "r2".into(),
    };
    assert_eq!(deliver(&db, &orchestrator, &other).await?, 0);
    let mine = StockReserved {
        quote: "q1".into(),
        reservation: "r1".into(),
    };
    assert_eq!(deliver(&db, &orchestrator, &mine).await?, 1);
    let moved = orchestrator.get(id).await?.ok_or("missing")?;
    assert_eq!((moved.step, moved.state), (1, SagaState::Running));
    assert_eq!(moved.data["reservation"], "r1");
    assert!(
        moved.await_key.is_none() && moved.awaiting.is_some(),
        "now waiting for the PO's reply"
    );
    let commands: i64 = sqlx::query_scalar("select count(*) from dbps_outbox where message_type = 'orders.CreatePo'")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(commands, 1);
    // The same fact published again (a new message id) is awaited by nobody any more.
    assert_eq!(deliver(&db, &orchestrator, &mine).await?, 0);
    assert_eq!(
        orchestrator.get(id).await?.ok_or("missing")?.lock_version,
        moved.lock_version
    );
    Ok(())
}

#[tokio::test]
async fn a_failure_event_compensates_and_a_missing_event_hits_its_deadline() -> TestResult {
    let (db, orchestrator) = setup(Duration::from_millis(300)).await?;
    let failed = start(&db, &orchestrator, "short").await?;
    assert_eq!(
        deliver(&db, &orchestrator, &StockReservationFailed { quote: "short".into() }).await?,
        1
    );
    let compensated = orchestrator.get(failed).await?.ok_or("missing")?;
    assert_eq!(compensated.state, SagaState::Compensated);
    assert!(
        compensated
            .last_error
            .is_some_and(|e| e.contains("StockReservationFailed"))
    );

    // Nobody answers for "silent": the scanner times the wait out.
    let silent = start(&db, &orchestrator, "silent").await?;
    let stop = CancellationToken::new();
    let scanner = tokio::spawn(orchestrator.clone().run(stop.clone()));
    dbps_testkit::eventually("the awaited event's deadline passed", || async {
        Ok::<_, dbps_saga::SagaError>(
            orchestrator
                .get(silent)
                .await?
                .is_some_and(|s| s.state == SagaState::Compensated),
        )
    })
    .await?;
    stop.cancel();
    assert_eq!(scanner.await??.timed_out, 1);
    let late = StockReserved {
        quote: "silent".into(),
        reservation: "r".into(),
    };
    assert_eq!(
        deliver(&db, &orchestrator, &late).await?,
        0,
        "a late event changes nothing"
    );
    Ok(())
}

#[tokio::test]
async fn awaiting_steps_are_checked_when_registered() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/none")
        .expect("lazy pool");
    let build = |step: Step<QuoteFlow>| {
        Orchestrator::builder(pool.clone(), "quote")
            .register(Definition::new("flow", 1).step(step))
            .build()
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let keyless = Step::<QuoteFlow>::new("a").on_event(|e: &StockReserved| e.quote.clone(), |_, _| {});
    assert!(build(keyless).contains("without a key"));
    let both = Step::<QuoteFlow>::new("b")
        .command(|q| Command::to("orders", &CreatePo { quote: q.quote.clone() }))
        .on_success(|_, _: PoCreated| {})
        .awaits(|q| q.quote.clone())
        .on_event(|e: &StockReserved| e.quote.clone(), |_, _| {});
    assert!(build(both).contains("both"));
    let no_success = Step::<QuoteFlow>::new("c")
        .awaits(|q| q.quote.clone())
        .on_failure_event(|e: &StockReservationFailed| e.quote.clone());
    assert!(build(no_success).contains("no success event"));
}
