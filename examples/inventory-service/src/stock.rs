//! Stock held for quotes: the reservation a `QuoteCreated` makes, and the saga commands
//! that confirm it (the goods ship) or release it (the compensation).
//!
//! Every change takes the `inventory` rows it touches with `FOR UPDATE` in product-id
//! order first, and only then the quote's `stock_reservations` rows, so that concurrent
//! quotes sharing products wait for each other instead of deadlocking, and two deliveries
//! of one quote's messages run one after the other.

use std::collections::{BTreeMap, HashMap};

use dbps_core::inbox::pg::TypedTxHandler;
use dbps_core::kafka::TopicNaming;
use dbps_core::{Envelope, HandlerError, Message};
use dbps_outbox::OutboxError;
use dbps_outbox::pg::PgOutbox;
use dbps_saga::{CommandHandler, Compensated, Reply};
use example_contracts::inventory::{
    InventoryCommand, MissingStock, PRODUCT_AGGREGATE, RESERVATION_AGGREGATE, ReservationConfirmed,
    ReservationNotConfirmed, ReservedLine, StockLevelChanged, StockReservationFailed, StockReserved,
};
use example_contracts::quote::{QuoteCreated, QuoteEvent};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Stock;

/// The columns of a [`Stock`], from `inventory`.
pub(crate) const STOCK_COLUMNS: &str = "product_id, on_hand, reserved, on_hand - reserved as available, version";

/// The service's events, written through its outbox in the caller's transaction.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    outbox: PgOutbox,
    naming: TopicNaming,
}

impl Events {
    pub(crate) fn new(outbox: PgOutbox, naming: TopicNaming) -> Self {
        Self { outbox, naming }
    }

    pub(crate) fn outbox(&self) -> &PgOutbox {
        &self.outbox
    }

    /// Enqueues `event` about `aggregate` `id` for `<service>.<aggregate>.events`, keyed by
    /// `id` and numbered in the aggregate's sequence; caused by `cause` (its correlation
    /// and trace continued) when a message made it.
    pub(crate) async fn emit<M: Message>(
        &self,
        conn: &mut PgConnection,
        aggregate: &str,
        id: Uuid,
        event: &M,
        cause: Option<&Envelope>,
    ) -> Result<(), OutboxError> {
        let service = self.outbox.service();
        let mut envelope = Envelope::event(service, aggregate, id.to_string(), event).map_err(OutboxError::Message)?;
        if let Some(cause) = cause {
            envelope = envelope.caused_by(cause);
        }
        let topic = self.naming.events(service, aggregate).map_err(OutboxError::Message)?;
        self.outbox.enqueue(conn, &topic, envelope).await?;
        Ok(())
    }

    /// Enqueues `StockLevelChanged` for `stock`, on the product's events.
    pub(crate) async fn stock_level(
        &self,
        conn: &mut PgConnection,
        stock: &Stock,
        cause: Option<&Envelope>,
    ) -> Result<(), OutboxError> {
        let event = StockLevelChanged {
            product_id: stock.product_id,
            available: stock.available,
            version: stock.version,
        };
        self.emit(conn, PRODUCT_AGGREGATE, stock.product_id, &event, cause)
            .await
    }
}

/// Changes a product's stock by the deltas and returns it (`None` for an unknown
/// product). The table's checks refuse stock that would go negative or below what is
/// reserved.
pub(crate) async fn change_stock(
    conn: &mut PgConnection,
    product_id: Uuid,
    on_hand: i64,
    reserved: i64,
) -> Result<Option<Stock>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update inventory set on_hand = on_hand + $2, reserved = reserved + $3, version = version + 1,
             updated_at = now()
         where product_id = $1 returning {STOCK_COLUMNS}"
    )))
    .bind(product_id)
    .bind(on_hand)
    .bind(reserved)
    .fetch_optional(conn)
    .await
}

/// Appends a movement of `quantity` (negative: out) of a product.
pub(crate) async fn record_movement(
    conn: &mut PgConnection,
    product_id: Uuid,
    quantity: i64,
    kind: &str,
    quote_id: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    sqlx::query("insert into stock_movements (id, product_id, quantity, kind, quote_id) values ($1, $2, $3, $4, $5)")
        .bind(Uuid::now_v7())
        .bind(product_id)
        .bind(quantity)
        .bind(kind)
        .bind(quote_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// An outbox failure in a handler: retried if the database may recover, else
/// dead-lettered.
fn outbox_failure(error: OutboxError) -> HandlerError {
    if error.is_transient() {
        HandlerError::transient(error)
    } else {
        HandlerError::permanent(error)
    }
}

/// The stock a message changes: a stock row that should exist but does not cannot
/// appear by retrying.
fn stock_of(stock: Option<Stock>, product_id: Uuid) -> Result<Stock, HandlerError> {
    stock.ok_or_else(|| HandlerError::permanent(format!("no stock row for product {product_id}")))
}

/// Reserves the stock of each `QuoteCreated`, inside the inbox's transaction (so once per
/// event): every line or none.
#[derive(Debug)]
pub struct Reservations {
    events: Events,
}

impl Reservations {
    pub(crate) fn new(events: Events) -> Self {
        Self { events }
    }
}

impl TypedTxHandler<QuoteEvent> for Reservations {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: QuoteEvent,
        envelope: &Envelope,
    ) -> Result<(), HandlerError> {
        match event {
            QuoteEvent::Created(quote) => reserve(conn, &self.events, &quote, envelope).await,
            // The sales rep's notification is the email service's business, and a quote's
            // status changes are for those who report on them: only a new quote reserves.
            QuoteEvent::NotificationRequested(_) | QuoteEvent::StatusChanged(_) => Ok(()),
        }
    }
}

/// The quantity per product a quote asks for (lines of one product added up), in
/// product-id order.
fn wanted(quote: &QuoteCreated) -> Result<BTreeMap<Uuid, i64>, HandlerError> {
    let mut wanted = BTreeMap::new();
    for line in &quote.lines {
        let invalid = || {
            HandlerError::permanent(format!(
                "quote {} asks for {} of product {}",
                quote.quote_id, line.quantity, line.product_id
            ))
        };
        if line.quantity <= 0 {
            return Err(invalid());
        }
        let total: &mut i64 = wanted.entry(line.product_id).or_default();
        *total = total.checked_add(line.quantity).ok_or_else(invalid)?;
    }
    Ok(wanted)
}

async fn reserve(
    conn: &mut PgConnection,
    events: &Events,
    quote: &QuoteCreated,
    cause: &Envelope,
) -> Result<(), HandlerError> {
    let quote_id = quote.quote_id;
    let wanted = wanted(quote)?;
    let products: Vec<Uuid> = wanted.keys().copied().collect();
    // The stock rows first, in product-id order: the lock order of every stock change.
    let available: HashMap<Uuid, i64> = sqlx::query_as(
        "select product_id, on_hand - reserved from inventory where product_id = any($1)
         order by product_id for update",
    )
    .bind(&products)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    // Read after the locks: a reservation of this quote committed by a concurrent delivery
    // of another copy of the event is seen here.
    let (held,): (i64,) = sqlx::query_as("select count(*) from stock_reservations where quote_id = $1")
        .bind(quote_id)
        .fetch_one(&mut *conn)
        .await?;
    if held > 0 {
        tracing::info!(quote = %quote_id, message_id = %cause.id, "quote already has a reservation; not reserved again");
        return Ok(());
    }

    let missing: Vec<MissingStock> = wanted
        .iter()
        .filter_map(|(&product_id, &requested)| {
            let available = available.get(&product_id).copied().unwrap_or(0);
            (available < requested).then_some(MissingStock {
                product_id,
                requested,
                available,
            })
        })
        .collect();
    if !missing.is_empty() {
        let short = missing.len();
        let failed = StockReservationFailed { quote_id, missing };
        events
            .emit(conn, RESERVATION_AGGREGATE, quote_id, &failed, Some(cause))
            .await
            .map_err(outbox_failure)?;
        tracing::info!(quote = %quote_id, short, "stock not reserved");
        return Ok(());
    }

    let mut lines = Vec::with_capacity(wanted.len());
    for (&product_id, &quantity) in &wanted {
        sqlx::query("insert into stock_reservations (quote_id, product_id, quantity) values ($1, $2, $3)")
            .bind(quote_id)
            .bind(product_id)
            .bind(quantity)
            .execute(&mut *conn)
            .await?;
        let stock = stock_of(change_stock(conn, product_id, 0, quantity).await?, product_id)?;
        events
            .stock_level(conn, &stock, Some(cause))
            .await
            .map_err(outbox_failure)?;
        lines.push(ReservedLine { product_id, quantity });
    }
    let reserved = StockReserved { quote_id, lines };
    events
        .emit(conn, RESERVATION_AGGREGATE, quote_id, &reserved, Some(cause))
        .await
        .map_err(outbox_failure)?;
    tracing::info!(quote = %quote_id, products = reserved.lines.len(), "stock reserved");
    Ok(())
}

/// The inventory's part in the quote saga: confirms and releases reservations, with the
/// reply written through the outbox in the same transaction (a
/// [`Participant`](dbps_saga::Participant) on `<inventory>.commands`).
#[derive(Debug)]
pub struct Warehouse {
    events: Events,
}

impl Warehouse {
    pub(crate) fn new(events: Events) -> Self {
        Self { events }
    }
}

impl CommandHandler<InventoryCommand> for Warehouse {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: InventoryCommand,
        envelope: &Envelope,
    ) -> Result<Reply, HandlerError> {
        match command {
            InventoryCommand::Confirm(confirm) => self.confirm(conn, confirm.quote_id, envelope).await,
            InventoryCommand::Release(release) => self.release(conn, release.quote_id, envelope).await,
        }
    }
}

/// One product of a quote's reservation.
#[derive(Debug, sqlx::FromRow)]
struct Held {
    product_id: Uuid,
    quantity: i64,
    state: String,
}

/// Locks a quote's reservation — its products' stock rows in product-id order, then its
/// own rows — and returns it.
async fn lock_reservation(conn: &mut PgConnection, quote_id: Uuid) -> Result<Vec<Held>, sqlx::Error> {
    // A quote's products never change once reserved (only the rows' state does).
    let products: Vec<Uuid> = sqlx::query_scalar("select product_id from stock_reservations where quote_id = $1")
        .bind(quote_id)
        .fetch_all(&mut *conn)
        .await?;
    if products.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query("select product_id from inventory where product_id = any($1) order by product_id for update")
        .bind(&products)
        .execute(&mut *conn)
        .await?;
    sqlx::query_as(
        "select product_id, quantity, state from stock_reservations where quote_id = $1
         order by product_id for update",
    )
    .bind(quote_id)
    .fetch_all(&mut *conn)
    .await
}

impl Warehouse {
    /// Ships the reserved goods: a `shipped` movement per product, on hand and reserved
    /// down by the quantity. A reservation confirmed already is confirmed again (the
    /// orchestrator may send a command twice, with two message ids).
    async fn confirm(&self, conn: &mut PgConnection, quote_id: Uuid, cause: &Envelope) -> Result<Reply, HandlerError> {
        let held = lock_reservation(conn, quote_id).await?;
        let reserved: Vec<&Held> = held.iter().filter(|h| h.state == "reserved").collect();
        if reserved.is_empty() {
            if !held.is_empty() && held.iter().all(|h| h.state == "confirmed") {
                tracing::info!(quote = %quote_id, message_id = %cause.id, "reservation confirmed already");
                return Reply::new(&ReservationConfirmed { quote_id });
            }
            let reason = if held.is_empty() {
                "no stock is reserved for the quote"
            } else {
                "the quote's reservation was released"
            };
            tracing::info!(quote = %quote_id, reason, "reservation not confirmed");
            return Reply::new(&ReservationNotConfirmed {
                quote_id,
                reason: reason.to_owned(),
            });
        }
        for line in reserved {
            record_movement(conn, line.product_id, -line.quantity, "shipped", Some(quote_id)).await?;
            let stock = change_stock(conn, line.product_id, -line.quantity, -line.quantity).await?;
            let stock = stock_of(stock, line.product_id)?;
            self.events
                .stock_level(conn, &stock, Some(cause))
                .await
                .map_err(outbox_failure)?;
        }
        sqlx::query(
            "update stock_reservations set state = 'confirmed', at = now() where quote_id = $1 and state = 'reserved'",
        )
        .bind(quote_id)
        .execute(&mut *conn)
        .await?;
        tracing::info!(quote = %quote_id, "reservation confirmed");
        Reply::new(&ReservationConfirmed { quote_id })
    }

    /// Gives the stock back: reserved goods become available again, shipped ones come
    /// back (a `returned` movement). Idempotent: nothing left to release is
    /// `Compensated` too.
    async fn release(&self, conn: &mut PgConnection, quote_id: Uuid, cause: &Envelope) -> Result<Reply, HandlerError> {
        let held = lock_reservation(conn, quote_id).await?;
        let mut released = 0;
        for line in &held {
            let stock = match line.state.as_str() {
                "reserved" => change_stock(conn, line.product_id, 0, -line.quantity).await?,
                "confirmed" => {
                    record_movement(conn, line.product_id, line.quantity, "returned", Some(quote_id)).await?;
                    change_stock(conn, line.product_id, line.quantity, 0).await?
                }
                _ => continue,
            };
            let stock = stock_of(stock, line.product_id)?;
            self.events
                .stock_level(conn, &stock, Some(cause))
                .await
                .map_err(outbox_failure)?;
            released += 1;
        }
        if released > 0 {
            sqlx::query(
                "update stock_reservations set state = 'released', at = now() where quote_id = $1 and state <> 'released'",
            )
            .bind(quote_id)
            .execute(&mut *conn)
            .await?;
        }
        tracing::info!(quote = %quote_id, products = released, "reservation released");
        Reply::new(&Compensated {})
    }
}
