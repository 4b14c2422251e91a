//! The inventory as a participant of the quote saga: commands on its command topic, as
//! the orchestrator sends them, answered on the sender's reply topic.

mod common;

use common::{BoxError, Running, TestResult, envelopes, payload, start};
use dbps_core::{Envelope, Message};
use dbps_saga::Compensated;
use example_contracts::inventory::{
    ConfirmReservation, ReleaseReservation, ReservationConfirmed, ReservationNotConfirmed, StockReserved,
};
use example_inventory_service::Reservation;
use uuid::Uuid;

/// A saga's conversation with the inventory: commands out, replies read back in order.
struct Saga<'a> {
    service: &'a Running,
    id: Uuid,
    replies: dbps_testkit::TopicReader,
}

impl<'a> Saga<'a> {
    fn new(service: &'a Running) -> Result<Self, BoxError> {
        Ok(Self {
            service,
            id: Uuid::now_v7(),
            replies: service.kafka.reader(&service.naming.replies(&service.quote)?)?,
        })
    }

    /// Sends `command` as the orchestrator does (keyed by the saga, correlated with it,
    /// replies to the quote service's reply topic) and returns the reply.
    async fn send<M: Message>(&mut self, command: &M) -> Result<Envelope, BoxError> {
        let service = self.service;
        let reply_to = service.naming.replies(&service.quote)?;
        let mut envelope = Envelope::command(&service.quote, self.id.to_string(), reply_to, command)?;
        envelope.correlation_id = Some(self.id.to_string());
        service
            .publisher
            .publish(&service.naming.commands(&service.name)?, &envelope)
            .await?;
        let count = self.replies.records().len() + 1;
        let reply = envelopes(&self.replies.wait_for(count).await?[count - 1..])?.remove(0);
        assert_eq!(reply.correlation_id.as_deref(), Some(self.id.to_string().as_str()));
        assert_eq!(reply.causation_id.as_deref(), Some(envelope.id.as_str()));
        assert_eq!(reply.aggregate_id, self.id.to_string());
        assert_eq!(reply.source, service.name);
        Ok(reply)
    }
}

/// Reserves `lines` for a new quote through a `QuoteCreated`; waits for the answer,
/// which must be `StockReserved`.
async fn reserve(service: &Running, lines: &[(Uuid, i64)]) -> Result<Uuid, BoxError> {
    let quote_id = Uuid::now_v7();
    service
        .publish_quote_event(&service.quote_created(quote_id, lines)?)
        .await?;
    // Each wait gives up after the testkit's deadline if no further answer arrives.
    let mut reader = service.kafka.reader(&service.reservation_topic()?)?;
    let mut read = 0;
    loop {
        read += 1;
        let answer = envelopes(&reader.wait_for(read).await?[read - 1..])?.remove(0);
        if answer.aggregate_id == quote_id.to_string() {
            assert_eq!(payload::<StockReserved>(&answer)?.quote_id, quote_id);
            return Ok(quote_id);
        }
    }
}

async fn movements(service: &Running, quote_id: Uuid) -> Result<Vec<(Uuid, i64, String)>, BoxError> {
    Ok(
        sqlx::query_as("select product_id, quantity, kind from stock_movements where quote_id = $1 order by at, id")
            .bind(quote_id)
            .fetch_all(&service.pool)
            .await?,
    )
}

async fn states(service: &Running, quote_id: Uuid) -> Result<Vec<String>, BoxError> {
    let reservation: Reservation = service
        .http
        .get(format!("{}/quotes/{quote_id}/reservation", service.base))
        .send()
        .await?
        .json()
        .await?;
    Ok(reservation.lines.into_iter().map(|l| l.state).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_reservation_ships_and_its_compensation_returns_the_goods_once() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;
    let dies = service.create_product("DIE-7", 4).await?;
    let quote_id = reserve(&service, &[(press.id, 3), (dies.id, 4)]).await?;
    assert_eq!(service.stored_stock(press.id).await?, (10, 3, 2));

    let mut saga = Saga::new(&service)?;
    let reply = saga.send(&ConfirmReservation { quote_id }).await?;
    assert_eq!(
        payload::<ReservationConfirmed>(&reply)?,
        ReservationConfirmed { quote_id }
    );
    // The reply committed with the effect: the goods left.
    assert_eq!(service.stored_stock(press.id).await?, (7, 0, 3));
    assert_eq!(service.stored_stock(dies.id).await?, (0, 0, 3));
    let mut shipped = vec![
        (press.id, -3, String::from("shipped")),
        (dies.id, -4, String::from("shipped")),
    ];
    shipped.sort();
    let mut moved = movements(&service, quote_id).await?;
    moved.sort();
    assert_eq!(moved, shipped);
    assert_eq!(states(&service, quote_id).await?, ["confirmed", "confirmed"]);

    // The orchestrator may send a command again (a new message id): confirmed again,
    // nothing shipped twice.
    let again = saga.send(&ConfirmReservation { quote_id }).await?;
    payload::<ReservationConfirmed>(&again)?;
    assert_eq!(service.stored_stock(press.id).await?, (7, 0, 3));
    assert_eq!(movements(&service, quote_id).await?.len(), 2);

    // The compensation returns the goods.
    let reply = saga.send(&ReleaseReservation { quote_id }).await?;
    assert_eq!(payload::<Compensated>(&reply)?, Compensated {});
    assert_eq!(service.stored_stock(press.id).await?, (10, 0, 4));
    assert_eq!(service.stored_stock(dies.id).await?, (4, 0, 4));
    let returned = movements(&service, quote_id).await?;
    assert_eq!(returned.len(), 4);
    assert!(
        returned[2..]
            .iter()
            .all(|(_, quantity, kind)| kind == "returned" && *quantity > 0),
        "{returned:?}"
    );
    assert_eq!(states(&service, quote_id).await?, ["released", "released"]);

    // Released twice: still compensated, nothing changes.
    let reply = saga.send(&ReleaseReservation { quote_id }).await?;
    payload::<Compensated>(&reply)?;
    assert_eq!(service.stored_stock(press.id).await?, (10, 0, 4));
    assert_eq!(service.stored_stock(dies.id).await?, (4, 0, 4));
    assert_eq!(movements(&service, quote_id).await?.len(), 4);

    // A released reservation cannot be confirmed any more.
    let reply = saga.send(&ConfirmReservation { quote_id }).await?;
    let refused: ReservationNotConfirmed = payload(&reply)?;
    assert_eq!(refused.quote_id, quote_id);
    assert!(!refused.reason.is_empty());
    assert_eq!(service.stored_stock(press.id).await?, (10, 0, 4));
    service.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_reserved_quote_makes_its_stock_available_and_unknown_quotes_are_answered() -> TestResult {
    let service = start().await?;
    let press = service.create_product("PRESS-200", 10).await?;
    let quote_id = reserve(&service, &[(press.id, 6)]).await?;
    assert_eq!(service.stored_stock(press.id).await?, (10, 6, 2));

    let mut saga = Saga::new(&service)?;
    let reply = saga.send(&ReleaseReservation { quote_id }).await?;
    payload::<Compensated>(&reply)?;
    assert_eq!(service.stored_stock(press.id).await?, (10, 0, 3));
    assert!(
        movements(&service, quote_id).await?.is_empty(),
        "nothing left the warehouse"
    );
    assert_eq!(states(&service, quote_id).await?, ["released"]);

    // A quote the inventory never reserved for: nothing to confirm, nothing to release.
    let stranger = Uuid::now_v7();
    let reply = saga.send(&ConfirmReservation { quote_id: stranger }).await?;
    assert_eq!(payload::<ReservationNotConfirmed>(&reply)?.quote_id, stranger);
    let reply = saga.send(&ReleaseReservation { quote_id: stranger }).await?;
    payload::<Compensated>(&reply)?;
    assert_eq!(service.stored_stock(press.id).await?, (10, 0, 3));

    // The quote's stock is available to the next quote.
    reserve(&service, &[(press.id, 10)]).await?;
    assert_eq!(service.stored_stock(press.id).await?, (10, 10, 4));
    service.shutdown().await
}
