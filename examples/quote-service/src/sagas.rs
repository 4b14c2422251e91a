//! The quote service's two sagas, as the ADR writes its flows.
//!
//! - **`quote-stock`** (event-driven, from `POST /quotes`): the quote awaits the
//!   inventory's answer to its `QuoteCreated`. `StockReserved` → "Stock Reserved";
//!   `StockReservationFailed` → "Pending Stock" and a notification to the sales rep is
//!   requested (`SalesRepNotificationRequested`). No answer before the deadline → the
//!   quote is marked "Pending Stock" and reported the same way, never left hanging.
//! - **`quote-order`** (orchestrated, from `POST /quotes/{id}/accept`): "Quote → Stock
//!   Reservation → PO Creation": confirm the reservation (the inventory turns it into
//!   stock movements) → create the purchase order → mark the quote "Ordered". A rejected
//!   or timed-out purchase order releases the reservation (compensation) and the quote
//!   says "Order Failed" with the saga's reason.
//!
//! Every status change runs as a local step, in the transaction of the transition that
//! reaches it, and publishes `quote.QuoteStatusChanged` (through the outbox, on the quote's
//! events topic, keyed by the quote id) in that transaction.

use std::time::Duration;

use dbps_outbox::pg::PgOutbox;
use dbps_saga::{BoxFuture, Command, Definition, LocalStep, SagaError, Step};
use example_contracts::inventory::{
    ConfirmReservation, MissingStock, ReleaseReservation, ReservationConfirmed, ReservationNotConfirmed,
    StockReservationFailed, StockReserved,
};
use example_contracts::purchase_order::{
    CancelPurchaseOrder, CreatePurchaseOrder, PurchaseOrderCreated, PurchaseOrderRejected,
};
use example_contracts::quote::{AGGREGATE, QuoteLine, QuoteStatusChanged, SalesRepNotificationRequested};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

/// The stock check saga's type.
pub const STOCK_SAGA: &str = "quote-stock";
/// The order saga's type.
pub const ORDER_SAGA: &str = "quote-order";

/// What the stock check knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockCheck {
    /// The quote.
    pub quote_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// Its sales rep.
    pub sales_rep: String,
    /// The inventory's answer, once it came.
    pub answer: Option<StockAnswer>,
}

/// The inventory's answer to a quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StockAnswer {
    /// Every line is reserved.
    Reserved,
    /// Something is short; nothing is reserved.
    Short {
        /// What.
        missing: Vec<MissingStock>,
    },
}

/// What the order saga knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The quote.
    pub quote_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// Its lines.
    pub lines: Vec<QuoteLine>,
    /// Its value, in cents.
    pub total_cents: i64,
    /// The purchase order, once created.
    pub purchase_order_id: Option<Uuid>,
}

/// Saga data that belongs to one quote.
trait OfQuote {
    fn quote_id(&self) -> Uuid;
}

impl OfQuote for StockCheck {
    fn quote_id(&self) -> Uuid {
        self.quote_id
    }
}

impl OfQuote for Order {
    fn quote_id(&self) -> Uuid {
        self.quote_id
    }
}

/// Sets a quote's status (and reason, or none), bumps its version and publishes
/// `QuoteStatusChanged` through the outbox, in the caller's transaction: the single place a
/// quote's status changes, so every change has its event.
async fn set_status(
    conn: &mut PgConnection,
    outbox: &PgOutbox,
    quote: Uuid,
    status: &str,
    reason: Option<&str>,
) -> Result<(), SagaError> {
    let changed: Option<(Uuid, i64, i64, Option<Uuid>)> = sqlx::query_as(
        "update quotes set status = $2, status_reason = $3, version = version + 1, updated_at = now() where id = $1 \
         returning customer_id, total_cents, version, purchase_order_id",
    )
    .bind(quote)
    .bind(status)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|source| SagaError::Postgres {
        operation: "set the quote's status",
        source,
    })?;
    let Some((customer_id, total_cents, version, purchase_order_id)) = changed else {
        tracing::warn!(quote = %quote, status, "no such quote; status not set");
        return Ok(());
    };
    let event = QuoteStatusChanged {
        quote_id: quote,
        customer_id,
        status: status.to_owned(),
        reason: reason.map(str::to_owned),
        total_cents,
        version,
        purchase_order_id,
    };
    outbox
        .enqueue_event(conn, AGGREGATE, &quote.to_string(), &event)
        .await
        .map_err(SagaError::Outbox)?;
    tracing::info!(quote = %quote, status, "quote status");
    Ok(())
}

/// A local step that sets the quote's status.
#[derive(Debug, Clone)]
struct SetStatus {
    status: &'static str,
    outbox: PgOutbox,
}

impl SetStatus {
    fn new(status: &'static str, outbox: &PgOutbox) -> Self {
        Self {
            status,
            outbox: outbox.clone(),
        }
    }
}

impl<D: OfQuote + Send + 'static> LocalStep<D> for SetStatus {
    fn run<'a>(&'a self, conn: &'a mut PgConnection, data: &'a mut D) -> BoxFuture<'a, dbps_saga::Result<bool>> {
        Box::pin(async move {
            set_status(conn, &self.outbox, data.quote_id(), self.status, None).await?;
            Ok(true)
        })
    }
}

/// Marks a quote "Pending Stock" with its reason and requests the sales rep's
/// notification, in the same transaction (through the outbox).
#[derive(Debug, Clone)]
struct PendingStock {
    outbox: PgOutbox,
}

impl PendingStock {
    async fn mark(
        &self,
        conn: &mut PgConnection,
        check: &StockCheck,
        missing: &[MissingStock],
        reason: String,
    ) -> dbps_saga::Result<()> {
        set_status(conn, &self.outbox, check.quote_id, "Pending Stock", Some(&reason)).await?;
        let request = SalesRepNotificationRequested {
            quote_id: check.quote_id,
            customer_id: check.customer_id,
            sales_rep: check.sales_rep.clone(),
            reason,
            missing: missing.to_vec(),
        };
        self.outbox
            .enqueue_event(conn, AGGREGATE, &check.quote_id.to_string(), &request)
            .await
            .map_err(SagaError::Outbox)?;
        Ok(())
    }
}

/// The inventory answered: "Stock Reserved", or "Pending Stock" with what is missing.
#[derive(Debug, Clone)]
struct RecordAnswer(PendingStock);

impl LocalStep<StockCheck> for RecordAnswer {
    fn run<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        check: &'a mut StockCheck,
    ) -> BoxFuture<'a, dbps_saga::Result<bool>> {
        Box::pin(async move {
            match &check.answer {
                Some(StockAnswer::Short { missing }) => {
                    let products: Vec<String> = missing
                        .iter()
                        .map(|m| format!("{} ({} of {} available)", m.product_id, m.available, m.requested))
                        .collect();
                    let reason = format!("not enough stock: {}", products.join(", "));
                    self.0.mark(conn, check, missing, reason).await?;
                }
                _ => set_status(conn, &self.0.outbox, check.quote_id, "Stock Reserved", None).await?,
            }
            Ok(true)
        })
    }
}

/// The inventory never answered: "Pending Stock", reported to the sales rep.
#[derive(Debug, Clone)]
struct NoAnswer {
    pending: PendingStock,
    timeout: Duration,
}

impl LocalStep<StockCheck> for NoAnswer {
    fn run<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        check: &'a mut StockCheck,
    ) -> BoxFuture<'a, dbps_saga::Result<bool>> {
        Box::pin(async move {
            let reason = format!("the inventory did not answer within {} s", self.timeout.as_secs());
            self.pending.mark(conn, check, &[], reason).await?;
            Ok(true)
        })
    }
}

/// Marks the quote "Ordered" with its purchase order.
#[derive(Debug, Clone)]
struct Ordered(PgOutbox);

impl LocalStep<Order> for Ordered {
    fn run<'a>(&'a self, conn: &'a mut PgConnection, order: &'a mut Order) -> BoxFuture<'a, dbps_saga::Result<bool>> {
        Box::pin(async move {
            sqlx::query("update quotes set purchase_order_id = $2 where id = $1")
                .bind(order.quote_id)
                .bind(order.purchase_order_id)
                .execute(&mut *conn)
                .await
                .map_err(|source| SagaError::Postgres {
                    operation: "record the purchase order",
                    source,
                })?;
            set_status(conn, &self.0, order.quote_id, "Ordered", None).await?;
            Ok(true)
        })
    }
}

/// The stock check: await the inventory's answer to `QuoteCreated`, keyed by the quote.
pub fn stock_check(outbox: PgOutbox, timeout: Duration) -> Definition<StockCheck> {
    let awaiting = SetStatus::new("Awaiting Stock", &outbox);
    let pending = PendingStock { outbox };
    let key = |quote: &Uuid| quote.to_string();
    Definition::new(STOCK_SAGA, 1)
        .step(
            Step::new("awaiting-stock")
                .local(awaiting)
                .compensate_locally(NoAnswer {
                    pending: pending.clone(),
                    timeout,
                }),
        )
        .step(
            Step::new("stock-answer")
                .awaits(|check: &StockCheck| check.quote_id.to_string())
                .on_event(
                    move |e: &StockReserved| key(&e.quote_id),
                    |check: &mut StockCheck, _| check.answer = Some(StockAnswer::Reserved),
                )
                // A shortage is an answer too (a business outcome, not a failure of the
                // saga): the next step marks the quote and requests the notification.
                .on_event(
                    move |e: &StockReservationFailed| key(&e.quote_id),
                    |check: &mut StockCheck, e| check.answer = Some(StockAnswer::Short { missing: e.missing }),
                )
                .timeout(timeout),
        )
        .step(Step::new("record-answer").local(RecordAnswer(pending)))
}

/// Where the order saga's commands go: the participants' service names.
#[derive(Debug, Clone)]
pub struct Participants {
    /// The inventory service's name.
    pub inventory: String,
    /// The purchase-order service's name.
    pub purchase_order: String,
}

/// The order: confirm the reservation → create the purchase order → "Ordered". Status
/// changes are published through `outbox`.
pub fn order(outbox: &PgOutbox, participants: &Participants, step_timeout: Duration) -> Definition<Order> {
    let inventory = participants.inventory.clone();
    let release_at = participants.inventory.clone();
    let orders = participants.purchase_order.clone();
    let cancel_at = participants.purchase_order.clone();
    Definition::new(ORDER_SAGA, 1)
        .step(
            Step::new("ordering")
                .local(SetStatus::new("Ordering", outbox))
                .compensate_locally(SetStatus::new("Order Failed", outbox)),
        )
        .step(
            Step::new("confirm-reservation")
                .command(move |o: &Order| Command::to(&inventory, &ConfirmReservation { quote_id: o.quote_id }))
                .on_success(|_: &mut Order, _: ReservationConfirmed| {})
                .on_failure::<ReservationNotConfirmed>()
                .compensate(move |o: &Order| Command::to(&release_at, &ReleaseReservation { quote_id: o.quote_id }))
                .timeout(step_timeout),
        )
        .step(
            Step::new("create-purchase-order")
                .command(move |o: &Order| {
                    Command::to(
                        &orders,
                        &CreatePurchaseOrder {
                            quote_id: o.quote_id,
                            customer_id: o.customer_id,
                            lines: o.lines.clone(),
                            total_cents: o.total_cents,
                        },
                    )
                })
                .on_success(|o: &mut Order, created: PurchaseOrderCreated| {
                    o.purchase_order_id = Some(created.purchase_order_id);
                })
                .on_failure::<PurchaseOrderRejected>()
                .compensate(move |o: &Order| Command::to(&cancel_at, &CancelPurchaseOrder { quote_id: o.quote_id }))
                .timeout(step_timeout),
        )
        .step(Step::new("ordered").local(Ordered(outbox.clone())))
}
