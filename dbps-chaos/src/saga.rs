//! The `saga-kill` scenario's world and its worker processes: a three-step saga `order`
//! run by the orchestrator of the service `quote` over three participant services,
//! `inventory`, `orders` and `billing`, each with a database, an outbox and an inbox of
//! its own.
//!
//! - `reserve-stock`: inventory reserves `qty` of an item (a `reservations` row, the
//!   item's `stock.available` lowered); its compensation `ReleaseStock` gives it back.
//! - `purchase-order`: orders creates a purchase order, or refuses one above the credit
//!   limit (`PoRejected`: the saga fails at step 2); its compensation `CancelPo`.
//! - `bill`: billing bills the order; its compensation `Refund`. A saga may ask billing
//!   not to answer: billing then applies the bill without a reply (the reply is lost), or
//!   ignores the command (it never arrived, as far as anybody can tell). Either way the
//!   step times out, and the saga compensates it with the two before it.
//!
//! Every participant appends what it did to `effects (saga_id, step, kind, message_id)`
//! in the inbox's transaction: `do` when it applied a step, `undo` when a compensation
//! undid something, `nothing-to-undo` when there was nothing to undo, `refused` and
//! `ignored`. The checker (`saga_check.rs`) reads those rows and the live tables with SQL;
//! it never asks dbps what happened.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dbps_core::inbox::pg::{PgInbox, TxHandler};
use dbps_core::kafka::{ConsumerRunner, KafkaConfig, TopicNaming};
use dbps_core::{CancellationToken, Envelope, HandlerError, Message, message_set};
use dbps_outbox::pg::PgOutbox;
use dbps_saga::{
    Command, CommandHandler, Compensated, DeadlineSummary, Definition, Orchestrator, Participant, Reply, Step,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

use crate::workers::{connect, shutdown_requested};

// ---------------------------------------------------------------------------------------
// The saga and its messages
// ---------------------------------------------------------------------------------------

/// The orchestrating service.
pub(crate) const ORCHESTRATOR: &str = "quote";
/// The participant services, in step order.
pub(crate) const PARTICIPANTS: [&str; 3] = ["inventory", "orders", "billing"];
/// The saga type.
pub(crate) const SAGA: &str = "order";
/// Purchase orders above this amount are refused.
pub(crate) const CREDIT_LIMIT: i64 = 1000;
/// Items the orders reserve stock of.
pub(crate) const ITEMS: u32 = 16;
/// What each item has in stock at the start.
pub(crate) const INITIAL_STOCK: i64 = 1_000_000_000;
/// How long the first two steps wait for their reply: long enough that no kill makes them
/// time out.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a compensation is sent before the saga is stuck.
pub(crate) const COMPENSATION_ATTEMPTS: u32 = 6;
/// The first backoff of a compensation sent again (doubled per attempt).
pub(crate) const COMPENSATION_BACKOFF: Duration = Duration::from_secs(1);
/// How long a compensation waits for its acknowledgement.
pub(crate) const COMPENSATION_TIMEOUT: Duration = Duration::from_secs(15);

/// One step as the checker knows it: the reply types that move it on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepSpec {
    /// The step's name in the definition.
    pub(crate) name: &'static str,
    /// The reply that means success.
    pub(crate) success: &'static str,
    /// The reply that means the step refused, if it can.
    pub(crate) failure: Option<&'static str>,
}

/// The saga's steps, in order. Each has a compensation and is not sent again after a
/// timeout (`retries` 0).
pub(crate) const STEPS: [StepSpec; 3] = [
    StepSpec {
        name: "reserve-stock",
        success: StockReserved::TYPE,
        failure: None,
    },
    StepSpec {
        name: "purchase-order",
        success: PoCreated::TYPE,
        failure: Some(PoRejected::TYPE),
    },
    StepSpec {
        name: "bill",
        success: Billed::TYPE,
        failure: None,
    },
];

macro_rules! message {
    ($(#[$doc:meta])* $name:ident { $($(#[$field_doc:meta])* $field:ident: $ty:ty),* $(,)? } = $type:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        pub(crate) struct $name { $($(#[$field_doc])* pub(crate) $field: $ty),* }
        impl Message for $name {
            const TYPE: &'static str = $type;
        }
    };
}

message!(
    /// Reserve stock for a quote.
    ReserveStock { quote: String, item: String, qty: i64 } = "chaos.inventory.ReserveStock"
);
message!(
    /// Give a quote's reservation back.
    ReleaseStock { quote: String } = "chaos.inventory.ReleaseStock"
);
message!(
    /// The stock is reserved.
    StockReserved { reservation: String } = "chaos.inventory.StockReserved"
);
message!(
    /// Create a purchase order.
    CreatePo { quote: String, amount: i64 } = "chaos.orders.CreatePo"
);
message!(
    /// Cancel a quote's purchase order.
    CancelPo { quote: String } = "chaos.orders.CancelPo"
);
message!(
    /// The purchase order exists.
    PoCreated { po: String } = "chaos.orders.PoCreated"
);
message!(
    /// The purchase order was refused.
    PoRejected { reason: String } = "chaos.orders.PoRejected"
);
message!(
    /// Bill a quote; `answer` says whether billing replies.
    Bill { quote: String, amount: i64, answer: BillAnswer } = "chaos.billing.Bill"
);
message!(
    /// The quote is billed.
    Billed { invoice: String } = "chaos.billing.Billed"
);
message!(
    /// Refund a quote's bill.
    Refund { quote: String } = "chaos.billing.Refund"
);

message_set! { pub(crate) enum InventoryCommands { Reserve(ReserveStock), Release(ReleaseStock) } }
message_set! { pub(crate) enum OrderCommands { Create(CreatePo), Cancel(CancelPo) } }
message_set! { pub(crate) enum BillingCommands { Bill(Bill), Refund(Refund) } }

/// What billing does with a `Bill` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BillAnswer {
    /// Bill and reply.
    Reply,
    /// Bill, and send no reply (a lost reply).
    ApplySilently,
    /// Do nothing, send nothing (a lost command).
    Ignore,
}

/// How a saga is meant to end, chosen when it is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Intent {
    /// Every step succeeds.
    Complete,
    /// The purchase order is over the credit limit: refused at step 2.
    Reject,
    /// Billing bills without replying: step 3 times out.
    TimeoutApplied,
    /// Billing ignores the command: step 3 times out.
    TimeoutIgnored,
}

impl Intent {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Reject => "reject",
            Self::TimeoutApplied => "timeout-applied",
            Self::TimeoutIgnored => "timeout-ignored",
        }
    }

    fn answer(self) -> BillAnswer {
        match self {
            Self::Complete | Self::Reject => BillAnswer::Reply,
            Self::TimeoutApplied => BillAnswer::ApplySilently,
            Self::TimeoutIgnored => BillAnswer::Ignore,
        }
    }
}

/// The saga's data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderData {
    pub(crate) quote: String,
    pub(crate) intent: Intent,
    pub(crate) item: String,
    pub(crate) qty: i64,
    pub(crate) amount: i64,
    pub(crate) reservation: Option<String>,
    pub(crate) po: Option<String>,
    pub(crate) invoice: Option<String>,
}

impl OrderData {
    /// A saga meant to end as `intent`, its amounts and item drawn from `rng`.
    pub(crate) fn new(quote: String, intent: Intent, rng: &mut StdRng) -> Self {
        let amount = if intent == Intent::Reject {
            rng.random_range(CREDIT_LIMIT + 1..=5 * CREDIT_LIMIT)
        } else {
            rng.random_range(1..=CREDIT_LIMIT)
        };
        Self {
            quote,
            intent,
            item: item_name(rng.random_range(0..ITEMS)),
            qty: rng.random_range(1..=10),
            amount,
            reservation: None,
            po: None,
            invoice: None,
        }
    }
}

pub(crate) fn item_name(n: u32) -> String {
    format!("item-{n}")
}

/// The `order` saga; the bill step times out after `bill_timeout`.
pub(crate) fn definition(bill_timeout: Duration) -> Definition<OrderData> {
    let [reserve, po, bill] = STEPS;
    Definition::new(SAGA, 1)
        .step(
            Step::new(reserve.name)
                .command(|d: &OrderData| {
                    Command::to(
                        "inventory",
                        &ReserveStock {
                            quote: d.quote.clone(),
                            item: d.item.clone(),
                            qty: d.qty,
                        },
                    )
                })
                .on_success(|d: &mut OrderData, r: StockReserved| d.reservation = Some(r.reservation))
                .compensate(|d: &OrderData| Command::to("inventory", &ReleaseStock { quote: d.quote.clone() }))
                .timeout(STEP_TIMEOUT),
        )
        .step(
            Step::new(po.name)
                .command(|d: &OrderData| {
                    Command::to(
                        "orders",
                        &CreatePo {
                            quote: d.quote.clone(),
                            amount: d.amount,
                        },
                    )
                })
                .on_success(|d: &mut OrderData, r: PoCreated| d.po = Some(r.po))
                .on_failure::<PoRejected>()
                .compensate(|d: &OrderData| Command::to("orders", &CancelPo { quote: d.quote.clone() }))
                .timeout(STEP_TIMEOUT),
        )
        .step(
            Step::new(bill.name)
                .command(|d: &OrderData| {
                    Command::to(
                        "billing",
                        &Bill {
                            quote: d.quote.clone(),
                            amount: d.amount,
                            answer: d.intent.answer(),
                        },
                    )
                })
                .on_success(|d: &mut OrderData, r: Billed| d.invoice = Some(r.invoice))
                .compensate(|d: &OrderData| Command::to("billing", &Refund { quote: d.quote.clone() }))
                .timeout(bill_timeout),
        )
}

// ---------------------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------------------

/// The orchestrating service's own table, next to the outbox, the inbox and the saga
/// tables: the quote each saga is started for, written in the saga's start transaction.
const QUOTE_SCHEMA: &str = r"
create table quotes (
    id         text        primary key,
    starter    integer     not null,
    saga_id    uuid        not null unique,
    intent     text        not null,
    created_at timestamptz not null default clock_timestamp()
);
";

/// What every participant appends, in the inbox's transaction. No unique constraint: an
/// effect applied twice shows up as two rows.
const EFFECTS_SCHEMA: &str = r"
create table effects (
    id         bigserial   primary key,
    saga_id    text        not null,
    step       text        not null,
    kind       text        not null,
    message_id text        not null,
    applied_at timestamptz not null default clock_timestamp()
);
";

/// Each participant's live state.
fn participant_schema(service: &str) -> Result<String> {
    let own = match service {
        "inventory" => format!(
            "create table stock (item text primary key, available bigint not null);
             insert into stock (item, available)
                 select 'item-' || n, {INITIAL_STOCK} from generate_series(0, {}) n;
             create table reservations (
                 saga_id text primary key, quote text not null, item text not null, qty bigint not null
             );",
            ITEMS - 1
        ),
        "orders" => String::from(
            "create table purchase_orders (saga_id text primary key, quote text not null, amount bigint not null);",
        ),
        "billing" => {
            String::from("create table bills (saga_id text primary key, quote text not null, amount bigint not null);")
        }
        other => bail!("no participant {other}"),
    };
    Ok(format!("{EFFECTS_SCHEMA}{own}"))
}

/// Migrates a service's database: outbox and inbox (and, for the orchestrator, the saga
/// tables) through `dbps-migrate`, then the service's own tables.
pub(crate) async fn migrate(pool: &PgPool, service: &str) -> Result<()> {
    let mut conn = pool.acquire().await.context("connect")?;
    let mut migrations = dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new(format!("chaos_{service}"))?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_outbox", &dbps_outbox::pg::MIGRATOR)
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR);
    let own = if service == ORCHESTRATOR {
        migrations = migrations.component("dbps_saga", &dbps_saga::MIGRATOR);
        String::from(QUOTE_SCHEMA)
    } else {
        participant_schema(service)?
    };
    migrations
        .run_on(&mut conn)
        .await
        .with_context(|| format!("migrations of {service}"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(own))
        .execute(&mut *conn)
        .await
        .with_context(|| format!("tables of {service}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Participants
// ---------------------------------------------------------------------------------------

fn saga_of(envelope: &Envelope) -> Result<&str, HandlerError> {
    envelope
        .correlation_id
        .as_deref()
        .ok_or_else(|| HandlerError::permanent(format!("command {} carries no saga id", envelope.id)))
}

/// Appends what the participant did for `envelope`'s saga.
async fn record(conn: &mut PgConnection, envelope: &Envelope, step: &str, kind: &str) -> Result<(), HandlerError> {
    sqlx::query("insert into effects (saga_id, step, kind, message_id) values ($1, $2, $3, $4)")
        .bind(saga_of(envelope)?)
        .bind(step)
        .bind(kind)
        .bind(&envelope.id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records an undo, or that there was nothing to undo; either way the compensation is
/// acknowledged.
async fn undone(conn: &mut PgConnection, envelope: &Envelope, step: &str, found: bool) -> Result<Reply, HandlerError> {
    record(conn, envelope, step, if found { "undo" } else { "nothing-to-undo" }).await?;
    Reply::new(&Compensated {})
}

struct Inventory;

impl CommandHandler<InventoryCommands> for Inventory {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: InventoryCommands,
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        let saga = saga_of(envelope)?;
        match command {
            InventoryCommands::Reserve(r) => {
                let inserted = sqlx::query(
                    "insert into reservations (saga_id, quote, item, qty) values ($1, $2, $3, $4) on conflict do nothing",
                )
                .bind(saga)
                .bind(&r.quote)
                .bind(&r.item)
                .bind(r.qty)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if inserted == 1 {
                    sqlx::query("update stock set available = available - $2 where item = $1")
                        .bind(&r.item)
                        .bind(r.qty)
                        .execute(&mut *conn)
                        .await?;
                }
                record(conn, envelope, STEPS[0].name, "do").await?;
                Reply::new(&StockReserved {
                    reservation: format!("r-{}", r.quote),
                })
            }
            InventoryCommands::Release(_) => {
                let released: Option<(String, i64)> =
                    sqlx::query_as("delete from reservations where saga_id = $1 returning item, qty")
                        .bind(saga)
                        .fetch_optional(&mut *conn)
                        .await?;
                if let Some((item, qty)) = &released {
                    sqlx::query("update stock set available = available + $2 where item = $1")
                        .bind(item)
                        .bind(qty)
                        .execute(&mut *conn)
                        .await?;
                }
                undone(conn, envelope, STEPS[0].name, released.is_some()).await
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
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        let saga = saga_of(envelope)?;
        match command {
            OrderCommands::Create(c) if c.amount > CREDIT_LIMIT => {
                record(conn, envelope, STEPS[1].name, "refused").await?;
                Reply::new(&PoRejected {
                    reason: format!("{} is over the credit limit", c.amount),
                })
            }
            OrderCommands::Create(c) => {
                sqlx::query(
                    "insert into purchase_orders (saga_id, quote, amount) values ($1, $2, $3) on conflict do nothing",
                )
                .bind(saga)
                .bind(&c.quote)
                .bind(c.amount)
                .execute(&mut *conn)
                .await?;
                record(conn, envelope, STEPS[1].name, "do").await?;
                Reply::new(&PoCreated {
                    po: format!("po-{}", c.quote),
                })
            }
            OrderCommands::Cancel(_) => {
                let cancelled = sqlx::query("delete from purchase_orders where saga_id = $1")
                    .bind(saga)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                undone(conn, envelope, STEPS[1].name, cancelled > 0).await
            }
        }
    }
}

struct Billing;

impl Billing {
    async fn bill(conn: &mut PgConnection, bill: &Bill, envelope: &Envelope) -> Result<(), HandlerError> {
        sqlx::query("insert into bills (saga_id, quote, amount) values ($1, $2, $3) on conflict do nothing")
            .bind(saga_of(envelope)?)
            .bind(&bill.quote)
            .bind(bill.amount)
            .execute(&mut *conn)
            .await?;
        record(conn, envelope, STEPS[2].name, "do").await
    }
}

impl CommandHandler<BillingCommands> for Billing {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: BillingCommands,
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        match command {
            BillingCommands::Bill(bill) => {
                Self::bill(conn, &bill, envelope).await?;
                Reply::new(&Billed {
                    invoice: format!("inv-{}", bill.quote),
                })
            }
            BillingCommands::Refund(_) => {
                let refunded = sqlx::query("delete from bills where saga_id = $1")
                    .bind(saga_of(envelope)?)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                undone(conn, envelope, STEPS[2].name, refunded > 0).await
            }
        }
    }
}

/// Billing's inbox handler: the `Participant`, except for the bills it was asked not to
/// answer, which it applies or ignores without a reply.
struct BillingDesk(Participant<BillingCommands, Billing>);

impl TxHandler for BillingDesk {
    async fn handle(&self, conn: &mut PgConnection, message: &Envelope) -> Result<(), HandlerError> {
        if message.message_type == Bill::TYPE {
            let bill: Bill = serde_json::from_str(message.payload.get()).map_err(HandlerError::permanent)?;
            match bill.answer {
                BillAnswer::Reply => {}
                BillAnswer::ApplySilently => return Billing::bill(conn, &bill, message).await,
                BillAnswer::Ignore => return record(conn, message, STEPS[2].name, "ignored").await,
            }
        }
        self.0.handle(conn, message).await
    }
}

// ---------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------

/// Where a saga worker finds Kafka and its topics.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// The prefix of the run's topics (`<prefix><service>.commands`, `….replies`).
    #[arg(long)]
    prefix: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// The dead-letter topic.
    #[arg(long)]
    dlq: String,
    /// `session.timeout.ms`: how soon the group notices a killed member.
    #[arg(long, default_value_t = 6000)]
    session_timeout_ms: u64,
}

impl KafkaArgs {
    fn naming(&self) -> TopicNaming {
        TopicNaming::new().with_prefix(&self.prefix)
    }

    fn runner<H: dbps_core::BatchHandler>(&self, topic: &str, handler: H) -> Result<ConsumerRunner<H>> {
        let heartbeat = (self.session_timeout_ms / 4).max(500);
        let config = KafkaConfig::new(&self.brokers)
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", heartbeat.to_string());
        ConsumerRunner::builder(config, &self.group, handler)
            .topic(topic)
            .dead_letter_topic(&self.dlq)
            .build()
            .context("build consumer runner")
    }
}

/// Options of an orchestrator process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct OrchestratorArgs {
    /// The orchestrating service's database.
    #[arg(long, env = "DBPS_CHAOS_DB_URL", hide_env_values = true)]
    db_url: String,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// This process's name, for its log lines.
    #[arg(long, default_value = "orchestrator")]
    name: String,
    /// This process's starter number: it starts the sagas `n` with `n % starters == starter`.
    #[arg(long, default_value_t = 0)]
    starter: u32,
    /// Starter numbers in all.
    #[arg(long, default_value_t = 1)]
    starters: u32,
    /// Sagas to start, in all starters.
    #[arg(long)]
    sagas: u64,
    /// Sagas per second this process starts (0: as fast as it can).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Share of the sagas refused at step 2.
    #[arg(long, default_value_t = 0.2)]
    reject_fraction: f64,
    /// Share of the sagas whose step 3 times out (half with the bill applied, half not).
    #[arg(long, default_value_t = 0.1)]
    timeout_fraction: f64,
    /// How long the bill step waits for its reply, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    bill_timeout_ms: u64,
    /// How often the deadline scanner looks for due deadlines, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Seed of the sagas' random choices (each saga's are drawn from it and its number).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The intent of saga number `n` of `starter`, and its data, from the seed alone: a
/// restarted starter draws the same for the same saga.
fn plan_saga(args: &OrchestratorArgs, n: u64) -> OrderData {
    let stream = (u64::from(args.starter) << 40) ^ n;
    let mut rng = StdRng::seed_from_u64(args.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let draw: f64 = rng.random_range(0.0..1.0);
    let intent = if draw < args.reject_fraction {
        Intent::Reject
    } else if draw < args.reject_fraction + args.timeout_fraction / 2.0 {
        Intent::TimeoutApplied
    } else if draw < args.reject_fraction + args.timeout_fraction {
        Intent::TimeoutIgnored
    } else {
        Intent::Complete
    };
    OrderData::new(format!("q-{}-{n}", args.starter), intent, &mut rng)
}

/// Runs the orchestrator: the reply consumer (through the inbox), the deadline scanner,
/// and a starter that starts this process's share of the sagas, one per transaction,
/// each with its `quotes` row. A restarted starter counts its `quotes` rows and goes on
/// from there. The process runs until asked to stop.
pub(crate) async fn orchestrator(args: OrchestratorArgs) -> Result<()> {
    anyhow::ensure!(args.starter < args.starters, "--starter must be below --starters");
    let pool = connect(&args.db_url, 14).await?;
    let naming = args.kafka.naming();
    let orchestrator = Orchestrator::builder(pool.clone(), ORCHESTRATOR)
        .naming(naming)
        .register(definition(Duration::from_millis(args.bill_timeout_ms)))
        .compensation(COMPENSATION_ATTEMPTS, COMPENSATION_BACKOFF, COMPENSATION_TIMEOUT)
        .poll_interval(Duration::from_millis(args.poll_ms))
        .build()
        .context("build the orchestrator")?;
    let replies = PgInbox::new(pool.clone(), ORCHESTRATOR, orchestrator.replies());
    let runner = args.kafka.runner(orchestrator.reply_topic(), replies)?;
    let stop = shutdown_requested();
    tracing::info!(name = %args.name, "orchestrator started");
    let mut consuming = tokio::spawn(runner.run(stop.clone()));
    let mut scanning = tokio::spawn(orchestrator.clone().run(stop.clone()));
    let args = Arc::new(args);
    let mut starting = tokio::spawn(starter(Arc::clone(&args), pool, orchestrator, stop.clone()));
    // Until asked to stop; a part that ends before (the starter excepted, once its share
    // is started) fails the process.
    let mut started_all = false;
    loop {
        tokio::select! {
            // The scanner and the consumer end when asked to stop: that is no failure.
            biased;
            () = stop.cancelled() => break,
            done = &mut consuming => bail!("{}: the reply consumer ended: {}", args.name, ended(done)),
            done = &mut scanning => bail!("{}: the deadline scanner ended: {}", args.name, ended(done)),
            done = &mut starting, if !started_all => match done {
                Ok(Ok(())) => started_all = true,
                other => bail!("{}: the starter failed: {other:?}", args.name),
            },
        }
    }
    let summary = consuming.await.context("reply consumer panicked")??;
    let deadlines: DeadlineSummary = scanning.await.context("deadline scanner panicked")??;
    starting.abort();
    println!(
        "{}: handled {} replies, dead-lettered {}, moved {} sagas on a timeout (graceful stop)",
        args.name, summary.handled, summary.dead_lettered, deadlines.timed_out
    );
    Ok(())
}

/// How a task of the orchestrator process ended, for its error message.
fn ended<T, E: std::fmt::Display>(done: Result<Result<T, E>, tokio::task::JoinError>) -> String {
    match done {
        Ok(Ok(_)) => String::from("without an error"),
        Ok(Err(error)) => format!("with an error: {error}"),
        Err(error) => format!("abnormally: {error}"),
    }
}

async fn starter(
    args: Arc<OrchestratorArgs>,
    pool: PgPool,
    orchestrator: Orchestrator,
    stop: CancellationToken,
) -> Result<()> {
    let share = args.sagas / u64::from(args.starters)
        + u64::from(u64::from(args.starter) < args.sagas % u64::from(args.starters));
    let done: i64 = sqlx::query_scalar("select count(*) from quotes where starter = $1")
        .bind(i32::try_from(args.starter)?)
        .fetch_one(&pool)
        .await
        .context("count this starter's quotes")?;
    let mut next = u64::try_from(done)?;
    let began = tokio::time::Instant::now();
    let first = next;
    let mut errors = 0u64;
    while next < share && !stop.is_cancelled() {
        if args.rate > 0.0 {
            #[allow(clippy::cast_precision_loss)] // saga counts stay far below 2^52
            let due = Duration::from_secs_f64((next - first) as f64 / args.rate);
            tokio::time::sleep_until(began + due).await;
        }
        let data = plan_saga(&args, next);
        match start_one(&pool, &orchestrator, &args, &data).await {
            Ok(()) => next += 1,
            Err(error) => {
                errors += 1;
                eprintln!("{}: start {} failed: {error:#}", args.name, data.quote);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    println!(
        "{}: started sagas {first}..{next} of {share} ({errors} errors)",
        args.name
    );
    Ok(())
}

/// One saga and its quote, in one transaction.
async fn start_one(
    pool: &PgPool,
    orchestrator: &Orchestrator,
    args: &OrchestratorArgs,
    data: &OrderData,
) -> Result<()> {
    let mut tx = pool.begin().await.context("begin")?;
    let id = orchestrator.start(&mut tx, SAGA, data).await.context("start")?;
    sqlx::query("insert into quotes (id, starter, saga_id, intent) values ($1, $2, $3, $4)")
        .bind(&data.quote)
        .bind(i32::try_from(args.starter)?)
        .bind(id)
        .bind(data.intent.as_str())
        .execute(&mut *tx)
        .await
        .context("insert the quote")?;
    tx.commit().await.context("commit")?;
    Ok(())
}

/// Options of a participant process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ParticipantArgs {
    /// The participant's database.
    #[arg(long, env = "DBPS_CHAOS_DB_URL", hide_env_values = true)]
    db_url: String,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The participant service: inventory, orders or billing.
    #[arg(long)]
    service: String,
}

/// Runs one participant's command consumer until asked to stop.
pub(crate) async fn participant(args: ParticipantArgs) -> Result<()> {
    let pool = connect(&args.db_url, 10).await?;
    let naming = args.kafka.naming();
    let topic = naming.commands(&args.service)?;
    let outbox = PgOutbox::new(args.service.clone()).naming(naming);
    let stop = shutdown_requested();
    tracing::info!(service = %args.service, "participant started");
    let summary = match args.service.as_str() {
        "inventory" => {
            let handler = PgInbox::new(pool, "inventory", Participant::new(outbox, Inventory));
            args.kafka.runner(&topic, handler)?.run(stop).await
        }
        "orders" => {
            let handler = PgInbox::new(pool, "orders", Participant::new(outbox, Orders));
            args.kafka.runner(&topic, handler)?.run(stop).await
        }
        "billing" => {
            let handler = PgInbox::new(pool, "billing", BillingDesk(Participant::new(outbox, Billing)));
            args.kafka.runner(&topic, handler)?.run(stop).await
        }
        other => bail!("no participant {other}"),
    }
    .context("consumer")?;
    println!(
        "{}: handled {}, dead-lettered {} (graceful stop)",
        args.service, summary.handled, summary.dead_lettered
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(seed: u64) -> OrchestratorArgs {
        OrchestratorArgs {
            db_url: String::new(),
            kafka: KafkaArgs {
                brokers: String::new(),
                prefix: String::new(),
                group: String::new(),
                dlq: String::new(),
                session_timeout_ms: 6000,
            },
            name: String::new(),
            starter: 1,
            starters: 2,
            sagas: 10_000,
            rate: 0.0,
            reject_fraction: 0.2,
            timeout_fraction: 0.1,
            bill_timeout_ms: 3000,
            poll_ms: 500,
            seed,
        }
    }

    #[test]
    fn a_restarted_starter_draws_the_same_saga_and_the_mix_holds() {
        let a = args(7);
        let first = plan_saga(&a, 42);
        let again = plan_saga(&a, 42);
        assert_eq!(
            (first.intent, first.amount, first.qty, first.item.as_str()),
            (again.intent, again.amount, again.qty, again.item.as_str())
        );
        let mut counts = std::collections::HashMap::new();
        for n in 0..10_000 {
            let data = plan_saga(&a, n);
            assert_eq!(data.amount > CREDIT_LIMIT, data.intent == Intent::Reject);
            *counts.entry(data.intent).or_insert(0_u32) += 1;
        }
        let share = |intent| f64::from(counts[&intent]) / 10_000.0;
        assert!((share(Intent::Complete) - 0.7).abs() < 0.02);
        assert!((share(Intent::Reject) - 0.2).abs() < 0.02);
        assert!((share(Intent::TimeoutApplied) - 0.05).abs() < 0.01);
        assert!((share(Intent::TimeoutIgnored) - 0.05).abs() < 0.01);
    }
}
