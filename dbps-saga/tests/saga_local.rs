//! Local steps: run and compensated in the orchestrator's own transaction, against the real
//! PostgreSQL.

use std::str::FromStr as _;

use dbps_core::{Envelope, Message};
use dbps_saga::{BoxFuture, Definition, LocalStep, Orchestrator, SagaState, Step};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StockReserved {
    quote: String,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Quote {
    id: String,
    marked: u32,
}

/// Sets the quote's status, in the orchestrator's transaction; refuses quotes named "refuse".
struct SetStatus(&'static str);

impl LocalStep<Quote> for SetStatus {
    fn run<'a>(&'a self, conn: &'a mut PgConnection, quote: &'a mut Quote) -> BoxFuture<'a, dbps_saga::Result<bool>> {
        Box::pin(async move {
            if quote.id == "refuse" && self.0 == "approved" {
                return Ok(false);
            }
            sqlx::query("insert into quotes (id, status) values ($1, $2) on conflict (id) do update set status = $2")
                .bind(&quote.id)
                .bind(self.0)
                .execute(conn)
                .await
                .map_err(|source| dbps_saga::SagaError::InvalidConfig {
                    setting: "test",
                    reason: source.to_string(),
                })?;
            quote.marked += 1;
            Ok(true)
        })
    }
}

fn definition() -> Definition<Quote> {
    Definition::new("quote-status", 1)
        .step(
            Step::<Quote>::new("mark-pending")
                .local(SetStatus("pending-stock"))
                .compensate_locally(SetStatus("cancelled")),
        )
        .step(
            Step::<Quote>::new("await-stock")
                .awaits(|q| q.id.clone())
                .on_event(|e: &StockReserved| e.quote.clone(), |_, _| {})
                .on_failure_event(|e: &StockReservationFailed| e.quote.clone()),
        )
        .step(Step::<Quote>::new("approve").local(SetStatus("approved")))
}

async fn status(pool: &sqlx::PgPool, id: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select status from quotes where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}

#[tokio::test]
async fn local_steps_run_and_are_compensated_in_the_orchestrators_transaction() -> TestResult {
    let db = dbps_testkit::postgres().await?;
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("quote")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component("dbps_saga", &dbps_saga::MIGRATOR)
        .run(&sqlx::postgres::PgConnectOptions::from_str(db.url())?)
        .await?;
    sqlx::query("create table quotes (id text primary key, status text not null)")
        .execute(db.pool())
        .await?;
    let orchestrator = Orchestrator::builder(db.pool().clone(), "quote")
        .register(definition())
        .build()?;
    let start = |id: &'static str| {
        let (pool, orchestrator) = (db.pool().clone(), orchestrator.clone());
        async move {
            let mut tx = pool.begin().await?;
            let saga = orchestrator
                .start(
                    &mut tx,
                    "quote-status",
                    &Quote {
                        id: id.to_owned(),
                        marked: 0,
                    },
                )
                .await?;
            tx.commit().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(saga)
        }
    };
    let event = |message: &dyn Fn() -> Result<Envelope, dbps_core::Error>| message();
    let deliver = |envelope: Envelope| {
        let (pool, orchestrator) = (db.pool().clone(), orchestrator.clone());
        async move {
            let mut tx = pool.begin().await?;
            let moved = orchestrator.handle_event(&mut tx, &envelope).await?;
            tx.commit().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(moved)
        }
    };

    // The first step ran in the start's transaction: the quote is pending.
    let ok = start("q1").await?;
    assert_eq!(status(db.pool(), "q1").await?, "pending-stock");
    let waiting = orchestrator.get(ok).await?.ok_or("missing")?;
    assert_eq!((waiting.step, waiting.data["marked"].as_u64()), (1, Some(1)));
    // Stock arrives: the last step runs locally in the event's transaction and completes.
    let reserved = event(&|| Envelope::event("inventory", "stock", "q1", &StockReserved { quote: "q1".into() }))?;
    assert_eq!(deliver(reserved).await?, 1);
    let done = orchestrator.get(ok).await?.ok_or("missing")?;
    assert_eq!(
        (done.state, done.data["marked"].as_u64()),
        (SagaState::Completed, Some(2))
    );
    assert_eq!(status(db.pool(), "q1").await?, "approved");

    // Stock short: the local step is compensated locally.
    let short = start("q2").await?;
    let failed = event(&|| {
        Envelope::event(
            "inventory",
            "stock",
            "q2",
            &StockReservationFailed { quote: "q2".into() },
        )
    })?;
    assert_eq!(deliver(failed).await?, 1);
    assert_eq!(
        orchestrator.get(short).await?.ok_or("missing")?.state,
        SagaState::Compensated
    );
    assert_eq!(status(db.pool(), "q2").await?, "cancelled");

    // A local step that says no compensates like a refusing participant.
    let refused = start("refuse").await?;
    let reserved = event(&|| Envelope::event("inventory", "stock", "r", &StockReserved { quote: "refuse".into() }))?;
    assert_eq!(deliver(reserved).await?, 1);
    let instance = orchestrator.get(refused).await?.ok_or("missing")?;
    assert_eq!(instance.state, SagaState::Compensated);
    assert!(
        instance
            .last_error
            .is_some_and(|e| e.contains("local step approve failed"))
    );
    assert_eq!(status(db.pool(), "refuse").await?, "cancelled");
    let history: Vec<String> = orchestrator.history(refused).await?.into_iter().map(|h| h.3).collect();
    assert!(history.iter().any(|c| c == "local step"), "{history:?}");
    Ok(())
}
