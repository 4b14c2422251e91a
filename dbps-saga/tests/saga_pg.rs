//! The orchestrator and its participants against the real stack: PostgreSQL for state,
//! outbox and inbox, Kafka for commands and replies.

use std::str::FromStr as _;
use std::time::Duration;

use dbps_core::inbox::pg::PgInbox;
use dbps_core::kafka::{ConsumerRunner, KafkaConfig, KafkaPublisher, TopicSpec};
use dbps_core::{CancellationToken, Envelope, HandlerError, Message, MessageKind, message_set};
use dbps_outbox::Relay;
use dbps_outbox::pg::{PgOutbox, PgOutboxStore};
use dbps_saga::{
    BranchState, Command, CommandHandler, Compensated, CompensationFailed, Definition, Orchestrator, Participant,
    Reply, SagaError, SagaState, Step,
};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

macro_rules! message {
    ($name:ident { $($field:ident: $ty:ty),* } = $type:literal) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        struct $name { $($field: $ty),* }
        impl Message for $name {
            const TYPE: &'static str = $type;
        }
    };
}

message!(
    ReserveStock {
        quote: String,
        qty: i64
    } = "inventory.ReserveStock"
);
message!(ReleaseStock { quote: String } = "inventory.ReleaseStock");
message!(StockReserved { reservation: String } = "inventory.StockReserved");
message!(StockShort { missing: i64 } = "inventory.StockShort");
message!(
    CreatePo {
        quote: String,
        amount: i64
    } = "orders.CreatePo"
);
message!(CancelPo { quote: String } = "orders.CancelPo");
message!(PoCreated { po: String } = "orders.PoCreated");
message!(PoRejected { reason: String } = "orders.PoRejected");
message!(Bill { quote: String } = "billing.Bill");
message!(Billed {} = "billing.Billed");

message_set! { enum InventoryCommands { Reserve(ReserveStock), Release(ReleaseStock) } }
message_set! { enum OrderCommands { Create(CreatePo), Cancel(CancelPo) } }
message_set! { enum BillingCommands { Bill(Bill) } }

/// The saga's data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Order {
    quote: String,
    qty: i64,
    amount: i64,
    reservation: Option<String>,
    po: Option<String>,
}

fn reserve_step() -> Step<Order> {
    Step::new("reserve-stock")
        .command(|o: &Order| {
            Command::to(
                "inventory",
                &ReserveStock {
                    quote: o.quote.clone(),
                    qty: o.qty,
                },
            )
        })
        .on_success(|o: &mut Order, r: StockReserved| o.reservation = Some(r.reservation))
        .on_failure::<StockShort>()
        .compensate(|o: &Order| Command::to("inventory", &ReleaseStock { quote: o.quote.clone() }))
        .timeout(Duration::from_secs(20))
}

fn purchase_order_step() -> Step<Order> {
    Step::new("purchase-order")
        .command(|o: &Order| {
            Command::to(
                "orders",
                &CreatePo {
                    quote: o.quote.clone(),
                    amount: o.amount,
                },
            )
        })
        .on_success(|o: &mut Order, r: PoCreated| o.po = Some(r.po))
        .on_failure::<PoRejected>()
        .compensate(|o: &Order| Command::to("orders", &CancelPo { quote: o.quote.clone() }))
        .timeout(Duration::from_secs(20))
}

fn bill_step(timeout: Duration) -> Step<Order> {
    Step::new("bill")
        .command(|o: &Order| Command::to("billing", &Bill { quote: o.quote.clone() }))
        .on_success(|_: &mut Order, _: Billed| {})
        .timeout(timeout)
}

/// Reserve stock, then create the purchase order, then bill.
fn definition(bill_timeout: Duration) -> Definition<Order> {
    Definition::new("order", 1)
        .step(reserve_step())
        .step(purchase_order_step())
        .step(bill_step(bill_timeout))
}

/// Reserve stock and create the purchase order at once (a parallel group), then bill.
fn parallel_definition(bill_timeout: Duration) -> Definition<Order> {
    Definition::new("order-parallel", 1)
        .step(
            Step::parallel("prepare")
                .branch(reserve_step())
                .branch(purchase_order_step())
                .timeout(Duration::from_secs(20)),
        )
        .step(bill_step(bill_timeout))
}

/// Reserve stock and bill at once; the group times out after `timeout` and is sent again
/// once.
fn group_with_retry(timeout: Duration) -> Definition<Order> {
    Definition::new("order-group-retry", 1).step(
        Step::parallel("reserve-and-bill")
            .branch(reserve_step())
            .branch(bill_step(timeout))
            .timeout(timeout)
            .retries(1),
    )
}

struct Inventory;

impl CommandHandler<InventoryCommands> for Inventory {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: InventoryCommands,
        _: &Envelope,
    ) -> Result<Reply, HandlerError> {
        match command {
            InventoryCommands::Reserve(r) if r.qty > 100 => Reply::new(&StockShort { missing: r.qty - 100 }),
            InventoryCommands::Reserve(r) => {
                sqlx::query("insert into reservations (quote, qty) values ($1, $2) on conflict (quote) do nothing")
                    .bind(&r.quote)
                    .bind(r.qty)
                    .execute(&mut *conn)
                    .await?;
                Reply::new(&StockReserved { reservation: r.quote })
            }
            InventoryCommands::Release(r) => {
                let failing: bool =
                    sqlx::query_scalar("select exists (select 1 from flags where name = 'fail_release')")
                        .fetch_one(&mut *conn)
                        .await?;
                if failing {
                    return Reply::new(&CompensationFailed {
                        reason: String::from("the warehouse system is down"),
                    });
                }
                sqlx::query("delete from reservations where quote = $1")
                    .bind(&r.quote)
                    .execute(&mut *conn)
                    .await?;
                Reply::new(&Compensated {})
            }
        }
    }
}

struct Orders;

impl CommandHandler<OrderCommands> for Orders {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: OrderCommands,
        _: &Envelope,
    ) -> Result<Reply, HandlerError> {
        match command {
            OrderCommands::Create(c) if c.amount > 1000 => Reply::new(&PoRejected {
                reason: format!("{} is over the credit limit", c.amount),
            }),
            OrderCommands::Create(c) => {
                sqlx::query("insert into purchase_orders (quote, amount) values ($1, $2)")
                    .bind(&c.quote)
                    .bind(c.amount)
                    .execute(&mut *conn)
                    .await?;
                Reply::new(&PoCreated {
                    po: format!("po-{}", c.quote),
                })
            }
            OrderCommands::Cancel(c) => {
                sqlx::query("delete from purchase_orders where quote = $1")
                    .bind(&c.quote)
                    .execute(&mut *conn)
                    .await?;
                Reply::new(&Compensated {})
            }
        }
    }
}

struct Billing;

impl CommandHandler<BillingCommands> for Billing {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: BillingCommands,
        _: &Envelope,
    ) -> Result<Reply, HandlerError> {
        let BillingCommands::Bill(bill) = command;
        sqlx::query("insert into bills (quote) values ($1)")
            .bind(&bill.quote)
            .execute(&mut *conn)
            .await?;
        Reply::new(&Billed {})
    }
}

/// A database, a Kafka namespace, the relay, the participants and the orchestrator's
/// reply consumer and deadline scanner.
struct World {
    db: dbps_testkit::TestPostgres,
    kafka: dbps_testkit::TestKafka,
    orchestrator: Orchestrator,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a world runs.
#[derive(Clone, Copy)]
struct Parts {
    bill_timeout: Duration,
    /// Whether the billing participant runs.
    billing: bool,
    /// Whether the relay runs (without it nothing committed reaches Kafka).
    relay: bool,
}

impl World {
    async fn start(bill_timeout: Duration, billing: bool) -> Result<Self, BoxError> {
        let db = dbps_testkit::postgres().await?;
        dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("quote")?)
            .schema(dbps_migrate::Identifier::new("public")?)
            .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
            .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
            .component("dbps_saga", &dbps_saga::MIGRATOR)
            .run(&sqlx::postgres::PgConnectOptions::from_str(db.url())?)
            .await?;
        sqlx::raw_sql(
            "create table reservations (quote text primary key, qty bigint not null);
             create table purchase_orders (quote text primary key, amount bigint not null);
             create table bills (quote text primary key);
             create table flags (name text primary key);",
        )
        .execute(db.pool())
        .await?;
        let kafka = dbps_testkit::kafka().await?;
        let naming = kafka.naming();
        let topics = [
            naming.commands("inventory")?,
            naming.commands("orders")?,
            naming.commands("billing")?,
            naming.replies("quote")?,
        ];
        let specs: Vec<(&str, i32)> = topics.iter().map(|t| (t.as_str(), 2)).collect();
        kafka.create_topics(&specs).await?;
        let parts = Parts {
            bill_timeout,
            billing,
            relay: true,
        };
        Self::open(db, kafka, parts)
    }

    /// Runs the parts of a world on a prepared database and Kafka namespace (again, after
    /// a crash).
    fn open(db: dbps_testkit::TestPostgres, kafka: dbps_testkit::TestKafka, parts: Parts) -> Result<Self, BoxError> {
        let naming = kafka.naming();
        let topics = [
            naming.commands("inventory")?,
            naming.commands("orders")?,
            naming.commands("billing")?,
            naming.replies("quote")?,
        ];
        let orchestrator = Orchestrator::builder(db.pool().clone(), "quote")
            .naming(naming.clone())
            .register(definition(parts.bill_timeout))
            .register(parallel_definition(parts.bill_timeout))
            .register(group_with_retry(parts.bill_timeout))
            .compensation(3, Duration::from_millis(100), Duration::from_secs(20))
            .poll_interval(Duration::from_millis(100))
            .build()?;
        let stop = CancellationToken::new();
        let mut world = Self {
            db,
            kafka,
            orchestrator,
            stop,
            tasks: Vec::new(),
        };
        let config = KafkaConfig::new(world.kafka.brokers());
        let pool = world.db.pool().clone();
        if parts.relay {
            let relay = Relay::builder(
                PgOutboxStore::new(pool.clone()),
                KafkaPublisher::builder(config.clone()).build()?,
            )
            .poll_interval(Duration::from_millis(50))
            .build()?;
            world.spawn(relay.run(world.stop.clone()));
        }
        world.spawn(world.orchestrator.clone().run(world.stop.clone()));
        let groups = ["quote", "inventory", "orders", "billing"].map(|name| world.kafka.group_id(name));
        let group = |name: &str| groups.iter().find(|g| g.contains(name)).cloned().unwrap_or_default();
        // Replies and commands in batches (`batched`), as a busy service runs them.
        let replies = PgInbox::new(pool.clone(), "quote", world.orchestrator.replies()).batched(32);
        world.consume(&config, &group("quote"), &topics[3], replies)?;
        let inventory = PgInbox::new(pool.clone(), "inventory", inventory(&naming));
        world.consume(&config, &group("inventory"), &topics[0], inventory)?;
        let orders = PgInbox::new(
            pool.clone(),
            "orders",
            Participant::new(outbox("orders", &naming), Orders),
        );
        world.consume(&config, &group("orders"), &topics[1], orders)?;
        if parts.billing {
            let bills = PgInbox::new(pool, "billing", Participant::new(outbox("billing", &naming), Billing));
            world.consume(&config, &group("billing"), &topics[2], bills)?;
        }
        Ok(world)
    }

    /// Stops every part at once, as a crash would, keeping the database and Kafka.
    async fn crash(self) -> (dbps_testkit::TestPostgres, dbps_testkit::TestKafka) {
        self.stop.cancel();
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        (self.db, self.kafka)
    }

    fn spawn<T: Send + 'static, E: std::fmt::Debug + Send + 'static>(
        &mut self,
        run: impl Future<Output = Result<T, E>> + Send + 'static,
    ) {
        self.tasks.push(tokio::spawn(async move {
            run.await.expect("a part of the test world failed");
        }));
    }

    fn consume<H: dbps_core::BatchHandler>(
        &mut self,
        config: &KafkaConfig,
        group: &str,
        topic: &str,
        handler: H,
    ) -> Result<(), dbps_core::Error> {
        let runner = ConsumerRunner::builder(config.clone(), group, handler)
            .topic(topic)
            .create_topics(|name| TopicSpec::new(name, 1))
            .build()?;
        self.spawn(runner.run(self.stop.clone()));
        Ok(())
    }

    fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    async fn start_saga(&self, order: &Order) -> Result<Uuid, BoxError> {
        self.start_named("order", order).await
    }

    async fn start_named(&self, saga: &str, order: &Order) -> Result<Uuid, BoxError> {
        let mut tx = self.pool().begin().await?;
        let id = self.orchestrator.start(&mut tx, saga, order).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Waits until every saga is in `state`.
    async fn all_reach(&self, ids: &[Uuid], state: SagaState) -> TestResult {
        dbps_testkit::eventually(&format!("{} sagas {state}", ids.len()), || async {
            for id in ids {
                let instance = self.orchestrator.get(*id).await?.ok_or("a saga vanished")?;
                if instance.state != state {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(false);
                }
            }
            Ok(true)
        })
        .await?;
        Ok(())
    }

    async fn count(&self, table: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
            .fetch_one(self.pool())
            .await
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn outbox(service: &str, naming: &dbps_core::kafka::TopicNaming) -> PgOutbox {
    PgOutbox::new(service).naming(naming.clone())
}

fn inventory(naming: &dbps_core::kafka::TopicNaming) -> Participant<InventoryCommands, Inventory> {
    Participant::new(outbox("inventory", naming), Inventory)
}

fn order(quote: &str, qty: i64, amount: i64) -> Order {
    Order {
        quote: quote.to_owned(),
        qty,
        amount,
        ..Order::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_happy_path_completes_every_step_once_and_records_its_history() -> TestResult {
    let world = World::start(Duration::from_secs(20), true).await?;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(world.start_saga(&order(&format!("q{n}"), 10, 100)).await?);
    }
    world.all_reach(&ids, SagaState::Completed).await?;
    assert_eq!(world.count("reservations").await?, 5);
    assert_eq!(world.count("purchase_orders").await?, 5);
    assert_eq!(world.count("bills").await?, 5);
    let done = world.orchestrator.get(ids[0]).await?.ok_or("missing")?;
    assert_eq!(done.data["reservation"], "q0");
    assert_eq!(done.data["po"], "po-q0");
    let history: Vec<(usize, String, String)> = world
        .orchestrator
        .history(ids[0])
        .await?
        .into_iter()
        .map(|(step, from, to, _)| (step, from, to))
        .collect();
    let moves = |v: &[(usize, &str, &str)]| -> Vec<(usize, String, String)> {
        v.iter()
            .map(|(s, f, t)| (*s, (*f).to_owned(), (*t).to_owned()))
            .collect()
    };
    assert_eq!(
        history,
        moves(&[
            (0, "new", "running"),
            (1, "running", "running"),
            (2, "running", "running"),
            (2, "running", "completed"),
        ])
    );
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_compensates_exactly_the_earlier_steps_in_reverse() -> TestResult {
    let world = World::start(Duration::from_secs(20), true).await?;
    // Fails at step 2 (the PO is over the limit): the reservation is released.
    let at_two = world.start_saga(&order("over-limit", 10, 5_000)).await?;
    // Fails at step 1 (stock short): nothing to undo.
    let at_one = world.start_saga(&order("short", 500, 100)).await?;
    world.all_reach(&[at_two, at_one], SagaState::Compensated).await?;
    assert_eq!(world.count("reservations").await?, 0);
    assert_eq!(world.count("purchase_orders").await?, 0);
    let compensated = world.orchestrator.get(at_two).await?.ok_or("missing")?;
    assert!(compensated.last_error.is_some_and(|e| e.contains("PoRejected")));
    let history = world.orchestrator.history(at_two).await?;
    let last = history.last().ok_or("no history")?;
    assert_eq!((last.0, last.2.as_str()), (0, "compensated"), "step 0 compensated last");
    assert!(
        history
            .iter()
            .all(|(step, _, to, _)| !(to == "compensating" && *step == 1)),
        "the failed step itself is not compensated"
    );
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_never_answers_times_out_and_the_earlier_steps_are_compensated() -> TestResult {
    // Billing is not running: the third step's command is never answered.
    let world = World::start(Duration::from_secs(1), false).await?;
    let id = world.start_saga(&order("silent", 10, 100)).await?;
    world.all_reach(&[id], SagaState::Compensated).await?;
    assert_eq!(world.count("reservations").await?, 0);
    assert_eq!(world.count("purchase_orders").await?, 0);
    let causes: Vec<String> = world.orchestrator.history(id).await?.into_iter().map(|h| h.3).collect();
    assert_eq!(causes.iter().filter(|c| *c == "timeout").count(), 1);
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_is_stuck_until_an_operator_retries_it() -> TestResult {
    let world = World::start(Duration::from_secs(20), true).await?;
    sqlx::query("insert into flags values ('fail_release')")
        .execute(world.pool())
        .await?;
    let id = world.start_saga(&order("stuck", 10, 5_000)).await?;
    world.all_reach(&[id], SagaState::Stuck).await?;
    let stuck = world.orchestrator.get(id).await?.ok_or("missing")?;
    assert!(
        stuck
            .last_error
            .is_some_and(|e| e.contains("warehouse system is down") && e.contains("3 attempts"))
    );
    assert_eq!(world.orchestrator.overdue(Duration::ZERO).await?.len(), 1);
    assert_eq!(world.orchestrator.in_state(SagaState::Stuck, 10).await?.len(), 1);
    assert_eq!(world.count("reservations").await?, 1, "nothing is dropped silently");
    // A retry of a saga that is not stuck is refused.
    let completed = world.start_saga(&order("fine", 1, 1)).await?;
    world.all_reach(&[completed], SagaState::Completed).await?;
    assert!(matches!(
        world.orchestrator.retry(completed).await,
        Err(SagaError::WrongState { .. })
    ));
    // The operator fixes the cause and retries.
    sqlx::query("delete from flags").execute(world.pool()).await?;
    world.orchestrator.retry(id).await?;
    world.all_reach(&[id], SagaState::Compensated).await?;
    assert_eq!(
        world.count("reservations").await?,
        1,
        "only the completed saga's reservation is left"
    );
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deadline_scanners_on_one_database_move_each_saga_once() -> TestResult {
    let world = World::start(Duration::from_millis(500), false).await?;
    // A second orchestrator process on the same database.
    let second = Orchestrator::builder(world.pool().clone(), "quote")
        .naming(world.kafka.naming())
        .register(definition(Duration::from_millis(500)))
        .compensation(3, Duration::from_millis(100), Duration::from_secs(20))
        .poll_interval(Duration::from_millis(50))
        .build()?;
    let second_stop = CancellationToken::new();
    let scanner = tokio::spawn(second.run(second_stop.clone()));
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(world.start_saga(&order(&format!("t{n}"), 1, 1)).await?);
    }
    world.all_reach(&ids, SagaState::Compensated).await?;
    second_stop.cancel();
    let summary = scanner.await??;
    let per_saga: Vec<(Uuid, i64)> =
        sqlx::query_as("select saga_id, count(*) from dbps_saga_history where cause = 'timeout' group by saga_id")
            .fetch_all(world.pool())
            .await?;
    assert_eq!(per_saga.len(), 30);
    assert!(
        per_saga.iter().all(|(_, n)| *n == 1),
        "a saga timed out twice: {per_saga:?}"
    );
    tracing::info!(?summary, "second scanner");
    assert_eq!(world.count("reservations").await?, 0);
    assert_eq!(world.count("purchase_orders").await?, 0);
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_group_sends_its_branches_at_once_and_a_failing_branch_compensates_its_sibling() -> TestResult {
    let world = World::start(Duration::from_secs(20), true).await?;
    let fine = world.start_named("order-parallel", &order("p-fine", 10, 100)).await?;
    // Both branches' commands left in the start's transaction.
    let sent = world.orchestrator.get(fine).await?.ok_or("missing")?;
    assert_eq!(sent.branches.len(), 2);
    assert!(
        sent.branches
            .iter()
            .all(|b| b.state == BranchState::Sent && b.awaiting.is_some()),
        "{:?}",
        sent.branches
    );
    // The purchase order is refused: the reservation is released.
    let po_fails = world.start_named("order-parallel", &order("p-po", 10, 5_000)).await?;
    // Stock is short: the purchase order is cancelled.
    let stock_fails = world.start_named("order-parallel", &order("p-stock", 500, 100)).await?;
    world.all_reach(&[fine], SagaState::Completed).await?;
    world
        .all_reach(&[po_fails, stock_fails], SagaState::Compensated)
        .await?;
    let done = world.orchestrator.get(fine).await?.ok_or("missing")?;
    assert_eq!(
        (done.data["reservation"].as_str(), done.data["po"].as_str()),
        (Some("p-fine"), Some("po-p-fine"))
    );
    let reservations: Vec<String> = sqlx::query_scalar("select quote from reservations")
        .fetch_all(world.pool())
        .await?;
    let orders: Vec<String> = sqlx::query_scalar("select quote from purchase_orders")
        .fetch_all(world.pool())
        .await?;
    let bills: Vec<String> = sqlx::query_scalar("select quote from bills")
        .fetch_all(world.pool())
        .await?;
    assert_eq!(
        (reservations, orders, bills),
        (
            vec!["p-fine".to_owned()],
            vec!["p-fine".to_owned()],
            vec!["p-fine".to_owned()]
        )
    );
    let states = |instance: &dbps_saga::SagaInstance| -> Vec<(String, BranchState)> {
        instance.branches.iter().map(|b| (b.name.clone(), b.state)).collect()
    };
    let po = world.orchestrator.get(po_fails).await?.ok_or("missing")?;
    assert_eq!(
        states(&po),
        [
            ("reserve-stock".to_owned(), BranchState::Compensated),
            ("purchase-order".to_owned(), BranchState::Failed)
        ]
    );
    assert!(po.last_error.is_some_and(|e| e.contains("PoRejected")));
    let stock = world.orchestrator.get(stock_fails).await?.ok_or("missing")?;
    assert_eq!(
        states(&stock),
        [
            ("reserve-stock".to_owned(), BranchState::Failed),
            ("purchase-order".to_owned(), BranchState::Compensated)
        ]
    );
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_failing_after_a_parallel_group_compensates_every_branch_of_it() -> TestResult {
    // Billing is not running: the step after the group times out.
    let world = World::start(Duration::from_secs(1), false).await?;
    let id = world.start_named("order-parallel", &order("p-silent", 10, 100)).await?;
    world.all_reach(&[id], SagaState::Compensated).await?;
    assert_eq!(world.count("reservations").await?, 0);
    assert_eq!(world.count("purchase_orders").await?, 0);
    let done = world.orchestrator.get(id).await?.ok_or("missing")?;
    assert!(
        done.branches.iter().all(|b| b.state == BranchState::Compensated),
        "{:?}",
        done.branches
    );
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_times_out_sends_again_only_to_the_branches_that_did_not_answer() -> TestResult {
    // Billing is not running: its branch never answers.
    let world = World::start(Duration::from_secs(1), false).await?;
    let id = world
        .start_named("order-group-retry", &order("g-retry", 10, 100))
        .await?;
    world.all_reach(&[id], SagaState::Compensated).await?;
    let causes: Vec<String> = world.orchestrator.history(id).await?.into_iter().map(|h| h.3).collect();
    assert_eq!(causes.iter().filter(|c| *c == "timeout").count(), 2, "{causes:?}");
    // The inventory handled the reservation once (it answered, so it was not sent again:
    // a second one, under a new message id, would be a third inbox row) and its release
    // once.
    let handled: i64 = sqlx::query_scalar("select count(*) from dbps_inbox where consumer = 'inventory'")
        .fetch_one(world.pool())
        .await?;
    assert_eq!(handled, 2);
    assert_eq!(world.count("reservations").await?, 0);
    let done = world.orchestrator.get(id).await?.ok_or("missing")?;
    let states: Vec<BranchState> = done.branches.iter().map(|b| b.state).collect();
    assert_eq!(states, [BranchState::Compensated, BranchState::Compensated]);
    world.stop().await;
    Ok(())
}

/// Every message waiting in the outbox, read without publishing anything:
/// what a service sees when its relay dies before publishing.
async fn unpublished(pool: &PgPool) -> Result<Vec<Envelope>, BoxError> {
    use dbps_outbox::OutboxStore as _;
    let store = PgOutboxStore::new(pool.clone());
    let mut lease = store.join().await?;
    store.rebalance(&mut lease).await?;
    let pending = store.fetch(&mut lease, 100).await?;
    store.leave(lease).await?;
    Ok(pending.into_iter().map(|p| p.envelope).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_transition_committed_but_before_the_relay_published_repeats_and_loses_nothing() -> TestResult {
    let world = World::start(Duration::from_secs(20), true).await?;
    let (db, kafka) = world.crash().await;
    // A process whose relay is down: every commit stays in the outbox.
    let parts = Parts {
        bill_timeout: Duration::from_secs(20),
        billing: true,
        relay: false,
    };
    let world = World::open(db, kafka, parts)?;
    let id = world.start_saga(&order("crash", 10, 100)).await?;
    // The first step's command reaches the inventory (as Kafka would hand it over), whose
    // reply reaches the orchestrator: the transition to step 2 commits with its command.
    let [command] = <[Envelope; 1]>::try_from(unpublished(world.pool()).await?).map_err(|m| format!("{m:?}"))?;
    assert!(
        PgInbox::new(world.pool().clone(), "inventory", inventory(&world.kafka.naming()))
            .apply(&command)
            .await?
    );
    let reply = unpublished(world.pool())
        .await?
        .into_iter()
        .find(|m| m.message_type == StockReserved::TYPE)
        .ok_or("no reply in the outbox")?;
    assert!(
        PgInbox::new(world.pool().clone(), "quote", world.orchestrator.replies())
            .apply(&reply)
            .await?
    );
    let moved = world.orchestrator.get(id).await?.ok_or("missing")?;
    assert_eq!((moved.state, moved.step), (SagaState::Running, 1));
    assert_eq!(
        unpublished(world.pool()).await?.len(),
        3,
        "command 1, its reply and command 2 wait"
    );
    // The process dies before its relay published any of it.
    let (db, kafka) = world.crash().await;
    // After the restart the relay publishes all three: the command and reply handled
    // before are recognised by the inboxes, the new command runs, the saga completes.
    let world = World::open(db, kafka, Parts { relay: true, ..parts })?;
    world.all_reach(&[id], SagaState::Completed).await?;
    assert_eq!(world.count("reservations").await?, 1);
    assert_eq!(world.count("purchase_orders").await?, 1);
    assert_eq!(world.count("bills").await?, 1);
    let history = world.orchestrator.history(id).await?;
    assert_eq!(
        history.len(),
        4,
        "one transition per step and one to completed: {history:?}"
    );
    world.stop().await;
    Ok(())
}

fn reply(saga: Uuid, causation: &str, message: &impl Serialize, message_type: &str) -> Envelope {
    let payload = serde_json::value::to_raw_value(message).expect("json");
    let mut reply = Envelope::raw(MessageKind::Reply, message_type, payload);
    reply.correlation_id = Some(saga.to_string());
    reply.causation_id = Some(causation.to_owned());
    reply
}

#[tokio::test]
async fn late_duplicate_unknown_and_uncorrelated_replies_change_nothing() -> TestResult {
    let db = dbps_testkit::postgres().await?;
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("quote")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component("dbps_saga", &dbps_saga::MIGRATOR)
        .run(&sqlx::postgres::PgConnectOptions::from_str(db.url())?)
        .await?;
    let orchestrator = Orchestrator::builder(db.pool().clone(), "quote")
        .register(definition(Duration::from_secs(20)))
        .build()?;
    let mut tx = db.pool().begin().await?;
    let id = orchestrator.start(&mut tx, "order", &order("q", 1, 1)).await?;
    tx.commit().await?;
    let waiting = orchestrator.get(id).await?.ok_or("missing")?;
    let command = waiting.awaiting.clone().ok_or("no command awaited")?;

    // A reply to another (earlier, or re-sent) command: ignored.
    let mut tx = db.pool().begin().await?;
    let stale = reply(
        id,
        "an-earlier-command",
        &StockReserved {
            reservation: "x".into(),
        },
        StockReserved::TYPE,
    );
    orchestrator.handle_reply(&mut tx, &stale).await?;
    tx.commit().await?;
    assert_eq!(
        orchestrator.get(id).await?.ok_or("missing")?.lock_version,
        waiting.lock_version
    );

    // A reply type the step does not know: a typed error, the saga untouched.
    let mut tx = db.pool().begin().await?;
    let odd = reply(id, &command, &Billed {}, Billed::TYPE);
    let refused = orchestrator.handle_reply(&mut tx, &odd).await;
    assert!(matches!(refused, Err(SagaError::UnexpectedReply { .. })), "{refused:?}");
    tx.rollback().await?;

    // The real reply moves it once; the same reply again is late.
    let real = reply(
        id,
        &command,
        &StockReserved {
            reservation: "r".into(),
        },
        StockReserved::TYPE,
    );
    for _ in 0..2 {
        let mut tx = db.pool().begin().await?;
        orchestrator.handle_reply(&mut tx, &real).await?;
        tx.commit().await?;
    }
    let moved = orchestrator.get(id).await?.ok_or("missing")?;
    assert_eq!((moved.step, moved.lock_version), (1, waiting.lock_version + 1));
    assert_eq!(moved.data["reservation"], "r");

    // No saga id, or an unknown one: typed errors (dead-lettered by the runner).
    let mut tx = db.pool().begin().await?;
    let mut loose = real.clone();
    loose.correlation_id = None;
    assert!(matches!(
        orchestrator.handle_reply(&mut tx, &loose).await,
        Err(SagaError::Uncorrelated { .. })
    ));
    let unknown = reply(Uuid::now_v7(), &command, &Billed {}, Billed::TYPE);
    assert!(matches!(
        orchestrator.handle_reply(&mut tx, &unknown).await,
        Err(SagaError::NotFound { .. })
    ));
    tx.rollback().await?;

    // Version 2 deployed without version 1: an instance of version 1 is refused, untouched.
    let v2_only = Orchestrator::builder(db.pool().clone(), "quote")
        .register(
            Definition::<Order>::new("order", 2).step(
                Step::new("only")
                    .command(|o: &Order| Command::to("billing", &Bill { quote: o.quote.clone() }))
                    .on_success(|_: &mut Order, _: Billed| {}),
            ),
        )
        .build()?;
    let next = moved.awaiting.clone().ok_or("no command awaited")?;
    let mut tx = db.pool().begin().await?;
    let for_v1 = reply(id, &next, &PoCreated { po: "p".into() }, PoCreated::TYPE);
    assert!(matches!(
        v2_only.handle_reply(&mut tx, &for_v1).await,
        Err(SagaError::UnknownVersion { version: 1, .. })
    ));
    tx.rollback().await?;
    // The orchestrator that has version 1 finishes the instance under version 1's steps.
    let mut tx = db.pool().begin().await?;
    orchestrator.handle_reply(&mut tx, &for_v1).await?;
    tx.commit().await?;
    let third = orchestrator.get(id).await?.ok_or("missing")?;
    assert_eq!((third.version, third.step), (1, 2));
    Ok(())
}

#[tokio::test]
async fn invalid_definitions_are_typed_errors() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/none")
        .expect("lazy pool");
    let build = |definition: Definition<Order>| {
        Orchestrator::builder(pool.clone(), "quote")
            .register(definition)
            .build()
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(build(Definition::new("order", 1)).contains("no step"));
    let step = || {
        Step::new("a")
            .command(|o: &Order| Command::to("billing", &Bill { quote: o.quote.clone() }))
            .on_success(|_: &mut Order, _: Billed| {})
    };
    assert!(build(Definition::new("order", 1).step(step()).step(step())).contains("two steps"));
    assert!(build(Definition::new("order", 1).step(Step::new("b"))).contains("no command"));
    let lone = Step::parallel("group").branch(step());
    assert!(build(Definition::new("order", 1).step(lone)).contains("fewer than two branches"));
    let awaiting = Step::parallel("group")
        .branch(step())
        .branch(Step::new("b").awaits(|o: &Order| o.quote.clone()));
    assert!(build(Definition::new("order", 1).step(awaiting)).contains("must send a command"));
    let twice = Orchestrator::builder(pool.clone(), "quote")
        .register(Definition::new("order", 1).step(step()))
        .register(Definition::new("order", 1).step(step()))
        .build();
    assert!(twice.is_err_and(|e| e.to_string().contains("registered twice")));
    assert!(Orchestrator::builder(pool, "quote").build().is_err());
}
