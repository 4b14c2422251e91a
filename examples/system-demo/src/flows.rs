//! The ADR's flows, one after the other, each narrated as it happens, and the closing
//! check that the numbers add up.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::events::Watcher;
use crate::out;
use crate::services::{Blamed as _, Fleet, Svc};

/// How long one wait of a flow (a status, a stock level, a message) may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// Between two polls of a state.
const POLL: Duration = Duration::from_millis(200);
/// The sales rep on every quote.
const SALES_REP: &str = "rep@example.com";

/// A customer of this run.
#[derive(Debug)]
struct Customer {
    label: &'static str,
    id: String,
}

/// A product of this run, with the stock it started with.
#[derive(Debug)]
struct Product {
    sku: String,
    id: String,
    initial: i64,
    price_cents: i64,
}

/// A quote of this run and the state the flows leave it in.
#[derive(Debug)]
struct Quote {
    label: String,
    id: String,
    customer: usize,
    /// (product, quantity).
    lines: Vec<(usize, i64)>,
    outcome: Outcome,
}

/// Where a flow leaves a quote.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    status: &'static str,
    /// A word the status reason must contain.
    reason: Option<&'static str>,
    /// The state of its reservation in the inventory (`None`: it has none).
    reservation: Option<&'static str>,
    /// The state of its purchase order (`None`: it has none).
    purchase_order: Option<&'static str>,
}

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    /// The `x-cache` header, where there is one.
    cache: String,
}

/// The demo's state: the processes, the watcher and what this run made.
#[derive(Debug)]
pub(crate) struct Demo<'a> {
    fleet: &'a mut Fleet,
    events: Watcher,
    http: reqwest::Client,
    run: String,
    order_step_timeout: u64,
    customers: Vec<Customer>,
    products: Vec<Product>,
    quotes: Vec<Quote>,
}

const ADA: usize = 0;
const GRACE: usize = 1;
const LATHE: usize = 0;
const MILL: usize = 1;

impl<'a> Demo<'a> {
    pub(crate) fn new(fleet: &'a mut Fleet, events: Watcher, http: reqwest::Client, run: String) -> Self {
        let order_step_timeout = std::env::var("QUOTE_ORDER_STEP_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(10);
        Self {
            fleet,
            events,
            http,
            run,
            order_step_timeout,
            customers: Vec::new(),
            products: Vec::new(),
            quotes: Vec::new(),
        }
    }

    /// Every flow, then the summary.
    pub(crate) async fn run(&mut self) -> anyhow::Result<()> {
        self.customers_are_created().await?;
        self.products_with_stock().await?;
        self.a_quote_reserves_its_stock().await?;
        self.an_accepted_quote_is_ordered().await?;
        self.a_quote_out_of_stock().await?;
        self.a_purchase_order_is_rejected().await?;
        self.the_purchase_order_service_is_down().await?;
        self.a_rename_reaches_the_replica().await?;
        self.the_breaker_opens_and_closes().await?;
        self.summary().await
    }

    // ----- The flows -----

    async fn customers_are_created(&mut self) -> anyhow::Result<()> {
        out::heading("1. Customers are created  (customer service)");
        let mark = self.events.mark();
        out::say(
            "The customer service stores each customer and its customer.CustomerCreated event in one local \
             transaction (the outbox); its relay publishes the event. The quote service keeps a replica of the \
             customers from these events.",
        );
        for (label, name) in [("Ada", "Ada Byron"), ("Grace", "Grace Hopper")] {
            let name = format!("{name} [{}]", self.run);
            let body = json!({
                "name": name,
                "tax_number": format!("TX-{}-{}", self.run, label.to_uppercase()),
                "email": format!("{}@example.com", label.to_lowercase()),
            });
            let held = self.events.hold();
            let reply = self
                .request(Svc::Customer, Method::POST, "/customers", Some(body), 201)
                .await?;
            let id = id_of(&reply.body, "id").blame(Svc::Customer)?;
            self.show(
                "POST",
                "/customers",
                &reply,
                &format!("{label}: {name:?}, version {}", reply.body["version"]),
            );
            // Named after the call is shown, so that its messages follow it.
            self.events.name(&id, label);
            drop(held);
            self.customers.push(Customer { label, id });
        }
        let ids: Vec<String> = self.customers.iter().map(|c| c.id.clone()).collect();
        let wanted: Vec<(&str, &str)> = ids.iter().map(|id| ("customer.CustomerCreated", id.as_str())).collect();
        self.events.expect(mark, &wanted, DEADLINE).await?;
        self.events.settle().await;
        Ok(())
    }

    async fn products_with_stock(&mut self) -> anyhow::Result<()> {
        out::heading("2. Products with stock  (inventory service, Redis)");
        let mark = self.events.mark();
        out::say(
            "The inventory service owns the products and their stock. Its stock check is asked often, so it is \
             served from Redis (cache-aside): the first check misses and fills the cache, the next one is a hit. \
             Every stock change publishes inventory.StockLevelChanged, whose consumer evicts the cached level.",
        );
        for (key, name, price_cents, on_hand) in
            [("LATHE", "CNC lathe", 250_000, 10), ("MILL", "5-axis mill", 400_000, 1)]
        {
            let sku = format!("{key}-{}", self.run);
            let body = json!({ "sku": sku, "name": name, "unit_price_cents": price_cents, "on_hand": on_hand });
            let held = self.events.hold();
            let reply = self
                .request(Svc::Inventory, Method::POST, "/products", Some(body), 201)
                .await?;
            let id = id_of(&reply.body, "id").blame(Svc::Inventory)?;
            self.show(
                "POST",
                "/products",
                &reply,
                &format!("{sku}: {name}, {} each, {on_hand} on hand", out::money(price_cents)),
            );
            self.events.name(&id, sku.clone());
            drop(held);
            self.products.push(Product {
                sku,
                id,
                initial: on_hand,
                price_cents,
            });
        }
        let wanted: Vec<(&str, &str)> = self
            .products
            .iter()
            .map(|p| ("inventory.ProductChanged", p.id.as_str()))
            .collect();
        self.events.expect(mark, &wanted, DEADLINE).await?;
        self.events.settle().await;
        let first = self.stock(LATHE).await?;
        self.show_stock(LATHE, &first, "");
        // The cached level is evicted by any stock event still on its way: ask until Redis
        // answers (the first time, normally).
        let started = Instant::now();
        let mut calls = 0;
        loop {
            let again = self.stock(LATHE).await?;
            calls += 1;
            if again.cache == "hit" {
                self.show_stock(LATHE, &again, "served from Redis");
                break;
            }
            self.show_stock(LATHE, &again, "");
            if started.elapsed() > DEADLINE || calls >= 20 {
                bail!("the stock check was never served from Redis");
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    async fn a_quote_reserves_its_stock(&mut self) -> anyhow::Result<()> {
        out::heading("3. A quote reserves its stock  (event-driven: quote -> inventory -> quote)");
        let mark = self.events.mark();
        out::say(
            "The quote service stores the quote, its lines and machine configurations, its quote.QuoteCreated \
             event and a saga that awaits the answer, in one transaction. The inventory reserves every line in one \
             transaction and answers inventory.StockReserved; the quote becomes \"Stock Reserved\".",
        );
        let q = self
            .create_quote(
                ADA,
                &[(LATHE, 3)],
                Outcome {
                    status: "Ordered",
                    reason: None,
                    reservation: Some("confirmed"),
                    purchase_order: Some("open"),
                },
            )
            .await?;
        self.quote_reaches(q, "Stock Reserved").await?;
        let (quote, lathe) = (self.quotes[q].id.clone(), self.products[LATHE].id.clone());
        self.events
            .expect(
                mark,
                &[
                    ("quote.QuoteCreated", &quote),
                    ("inventory.StockReserved", &quote),
                    ("inventory.StockLevelChanged", &lathe),
                ],
                DEADLINE,
            )
            .await?;
        self.stock_until(LATHE, "fresh: the event evicted the cached level", |s| {
            s["available"] == 7 && s["reserved"] == 3
        })
        .await?;
        self.events.settle().await;
        Ok(())
    }

    async fn an_accepted_quote_is_ordered(&mut self) -> anyhow::Result<()> {
        out::heading("4. Order placement  (orchestrated saga: quote -> inventory -> purchase order)");
        let mark = self.events.mark();
        out::say(
            "Accepting the quote starts the order saga in the quote service: it sends inventory.ConfirmReservation \
             (the reserved goods ship), then purchase_order.CreatePurchaseOrder; each participant answers on \
             quote.replies, and the saga marks the quote \"Ordered\".",
        );
        let q = 0;
        let lathe = self.products[LATHE].id.clone();
        let saga = self.accept(q).await?;
        let ordered = self.quote_reaches(q, "Ordered").await?;
        let po = id_of(&ordered, "purchase_order_id").blame(Svc::Quote)?;
        self.events.name(&po, format!("PO of {}", self.quotes[q].label));
        let path = format!("/purchase-orders/{po}");
        let reply = self.request(Svc::PurchaseOrder, Method::GET, &path, None, 200).await?;
        self.show("GET", &path, &reply, &self.purchase_order_summary(&reply.body));
        if reply.body["state"] != "open" || reply.body["quote_id"] != self.quotes[q].id.as_str() {
            bail!(
                "the purchase order {} is not the open order of {}",
                out::short(&po),
                self.quotes[q].label
            );
        }
        self.stock_until(LATHE, "3 shipped", |s| s["on_hand"] == 7 && s["reserved"] == 0)
            .await?;
        let path = format!("/quotes/{}/accept", self.quotes[q].id);
        let again = self
            .request(Svc::Quote, Method::POST, &path, Some(json!({})), 409)
            .await?;
        self.show("POST", &path, &again, &problem(&again.body));
        self.events
            .expect(
                mark,
                &[
                    ("inventory.ConfirmReservation", &saga),
                    ("inventory.ReservationConfirmed", &saga),
                    ("purchase_order.CreatePurchaseOrder", &saga),
                    ("purchase_order.PurchaseOrderCreated", &saga),
                    ("inventory.StockLevelChanged", &lathe),
                ],
                DEADLINE,
            )
            .await?;
        self.events.settle().await;
        Ok(())
    }

    async fn a_quote_out_of_stock(&mut self) -> anyhow::Result<()> {
        out::heading("5. Out of stock  (the quote waits, the sales rep is to be told)");
        let mark = self.events.mark();
        out::say(
            "Grace asks for more mills than there are. The inventory reserves nothing of the quote and answers \
             inventory.StockReservationFailed; the quote becomes \"Pending Stock\" and, in the same transaction, \
             quote.SalesRepNotificationRequested is published (the email service turns it into an email).",
        );
        let q = self
            .create_quote(
                GRACE,
                &[(LATHE, 2), (MILL, 5)],
                Outcome {
                    status: "Pending Stock",
                    reason: Some("not enough stock"),
                    reservation: None,
                    purchase_order: None,
                },
            )
            .await?;
        let pending = self.quote_reaches(q, "Pending Stock").await?;
        let reason = pending["status_reason"].as_str().unwrap_or_default();
        if !reason.contains(&self.products[MILL].id) {
            bail!(
                "the reason of {} does not name the mill: {reason:?}",
                self.quotes[q].label
            );
        }
        let quote = self.quotes[q].id.clone();
        self.events
            .expect(
                mark,
                &[
                    ("quote.QuoteCreated", &quote),
                    ("inventory.StockReservationFailed", &quote),
                    ("quote.SalesRepNotificationRequested", &quote),
                ],
                DEADLINE,
            )
            .await?;
        self.stock_until(LATHE, "nothing of the short quote is reserved", |s| {
            s["on_hand"] == 7 && s["reserved"] == 0
        })
        .await?;
        self.events.settle().await;
        Ok(())
    }

    async fn a_purchase_order_is_rejected(&mut self) -> anyhow::Result<()> {
        out::heading("6. A purchase order is rejected  (the saga compensates)");
        let mark = self.events.mark();
        out::say(
            "Grace's credit limit is set below her next quote's value. The purchase-order service answers \
             purchase_order.PurchaseOrderRejected; the saga compensates the steps it made in reverse: \
             inventory.ReleaseReservation returns the shipped goods, and the quote says \"Order Failed\" and why.",
        );
        let grace = self.customers[GRACE].id.clone();
        let product = self.products[LATHE].id.clone();
        let path = format!("/credit-limits/{grace}");
        let reply = self
            .request(
                Svc::PurchaseOrder,
                Method::PUT,
                &path,
                Some(json!({ "limit_cents": 100_000 })),
                200,
            )
            .await?;
        self.show(
            "PUT",
            &path,
            &reply,
            &format!(
                "Grace may order up to {}",
                out::money(reply.body["limit_cents"].as_i64().unwrap_or(0))
            ),
        );
        let q = self
            .create_quote(
                GRACE,
                &[(LATHE, 2)],
                Outcome {
                    status: "Order Failed",
                    reason: Some("PurchaseOrderRejected"),
                    reservation: Some("released"),
                    purchase_order: None,
                },
            )
            .await?;
        self.quote_reaches(q, "Stock Reserved").await?;
        self.stock_until(LATHE, "2 reserved", |s| s["on_hand"] == 7 && s["reserved"] == 2)
            .await?;
        let saga = self.accept(q).await?;
        let failed = self.quote_reaches(q, "Order Failed").await?;
        let reason = failed["status_reason"].as_str().unwrap_or_default();
        if !reason.contains("PurchaseOrderRejected") {
            bail!(
                "the reason of {} does not name the rejection: {reason:?}",
                self.quotes[q].label
            );
        }
        self.stock_until(LATHE, "back to its level", |s| s["on_hand"] == 7 && s["reserved"] == 0)
            .await?;
        self.events
            .expect(
                mark,
                &[
                    ("purchase_order.PurchaseOrderRejected", &saga),
                    ("inventory.ReleaseReservation", &saga),
                    ("dbps.saga.Compensated", &saga),
                    ("inventory.StockLevelChanged", &product),
                ],
                DEADLINE,
            )
            .await?;
        self.events.settle().await;
        Ok(())
    }

    async fn the_purchase_order_service_is_down(&mut self) -> anyhow::Result<()> {
        let timeout = self.order_step_timeout;
        let product = self.products[MILL].id.clone();
        out::heading("7. The purchase-order service is down  (a step times out)");
        let mark = self.events.mark();
        out::say(&format!(
            "With the purchase-order service stopped, the create-purchase-order step gets no answer within {timeout} \
             s. The saga compensates: its purchase_order.CancelPurchaseOrder (in case the order was made after all) \
             waits in the topic for the service, which comes back, makes the order from the waiting command and \
             cancels it. The reservation is released and the quote says \"Order Failed\"."
        ));
        let q = self
            .create_quote(
                ADA,
                &[(MILL, 1)],
                Outcome {
                    status: "Order Failed",
                    reason: Some("timed out"),
                    reservation: Some("released"),
                    purchase_order: Some("cancelled"),
                },
            )
            .await?;
        self.quote_reaches(q, "Stock Reserved").await?;
        self.fleet.stop(Svc::PurchaseOrder).await?;
        let saga = self.accept(q).await?;
        let started = Instant::now();
        self.events
            .expect(mark, &[("purchase_order.CancelPurchaseOrder", &saga)], DEADLINE)
            .await?;
        out::tagged(
            "saga",
            &format!(
                "no answer within {timeout} s: the step timed out ({} after the acceptance); the saga compensates, \
                 its cancel waits for the service",
                out::secs(started.elapsed())
            ),
        );
        let path = format!("/quotes/{}", self.quotes[q].id);
        let reply = self.request(Svc::Quote, Method::GET, &path, None, 200).await?;
        self.show("GET", &path, &reply, &self.quote_summary(q, &reply.body));
        let held = self.events.hold();
        self.fleet.start(Svc::PurchaseOrder).await?;
        drop(held);
        let failed = self.quote_reaches(q, "Order Failed").await?;
        let reason = failed["status_reason"].as_str().unwrap_or_default();
        if !reason.contains("timed out") {
            bail!(
                "the reason of {} does not say it timed out: {reason:?}",
                self.quotes[q].label
            );
        }
        self.stock_until(MILL, "back to its level", |s| s["on_hand"] == 1 && s["reserved"] == 0)
            .await?;
        let path = format!("/purchase-orders?quote_id={}", self.quotes[q].id);
        let reply = self.request(Svc::PurchaseOrder, Method::GET, &path, None, 200).await?;
        self.show("GET", &path, &reply, &self.purchase_order_summary(&reply.body));
        if reply.body["state"] != "cancelled" {
            bail!(
                "the purchase order of {} is {}, not cancelled",
                self.quotes[q].label,
                reply.body["state"]
            );
        }
        self.events
            .expect(
                mark,
                &[
                    ("purchase_order.PurchaseOrderCreated", &saga),
                    ("inventory.ReleaseReservation", &saga),
                    ("dbps.saga.Compensated", &saga),
                    ("inventory.StockLevelChanged", &product),
                ],
                DEADLINE,
            )
            .await?;
        self.events.settle().await;
        Ok(())
    }

    async fn a_rename_reaches_the_replica(&mut self) -> anyhow::Result<()> {
        out::heading("8. Replication  (the quote service's copy of the customers)");
        let mark = self.events.mark();
        out::say(
            "Ada is renamed in the customer service. Its customer.CustomerUpdated event updates the quote \
             service's replica, which the quote shows: no call to the customer service is needed to read it.",
        );
        let ada = self.customers[ADA].id.clone();
        let name = format!("Ada Lovelace [{}]", self.run);
        let path = format!("/customers/{ada}");
        let held = self.events.hold();
        let reply = self
            .request(Svc::Customer, Method::PUT, &path, Some(json!({ "name": name })), 200)
            .await?;
        self.show(
            "PUT",
            &path,
            &reply,
            &format!("Ada: {name:?}, version {}", reply.body["version"]),
        );
        drop(held);
        let path = format!("/quotes/{}", self.quotes[0].id);
        let (reply, calls, elapsed) = self
            .poll(
                Svc::Quote,
                &path,
                &format!("{} with the new name", self.quotes[0].label),
                |quote| format!("customer {}", quote["customer"]["name"]),
                |quote| quote["customer"]["name"] == name.as_str(),
            )
            .await?;
        self.show(
            "GET",
            &path,
            &reply,
            &format!(
                "{}: customer {name:?} from the replica{}",
                self.quotes[0].label,
                polled(calls, elapsed)
            ),
        );
        self.events
            .expect(mark, &[("customer.CustomerUpdated", &ada)], DEADLINE)
            .await?;
        self.events.settle().await;
        Ok(())
    }

    async fn the_breaker_opens_and_closes(&mut self) -> anyhow::Result<()> {
        out::heading("9. Circuit breaker  (the customer service is down)");
        out::say(
            "The quote service asks the customer service for fresh details through a circuit breaker. While that \
             service is down it answers from its replica and says the details may be stale; after three failures \
             the breaker opens and calls fail fast. Once the service is back, a trial call after the breaker's \
             cool-down (5 s) closes it.",
        );
        let path = format!("/quotes/{}/customer", self.quotes[0].id);
        let fresh = self.request(Svc::Quote, Method::GET, &path, None, 200).await?;
        self.show("GET", &path, &fresh, &details(&fresh.body));
        expect_source(&fresh.body, "customer-service", false)?;
        self.fleet.stop(Svc::Customer).await?;
        for _ in 0..4 {
            let stale = self.request(Svc::Quote, Method::GET, &path, None, 200).await?;
            self.show("GET", &path, &stale, &details(&stale.body));
            expect_source(&stale.body, "replica", true)?;
        }
        self.breaker(1).await?;
        let held = self.events.hold();
        self.fleet.start(Svc::Customer).await?;
        drop(held);
        let (reply, calls, elapsed) = self
            .poll_every(
                Svc::Quote,
                &path,
                Duration::from_millis(500),
                "fresh details from the customer service",
                details,
                |d| d["source"] == "customer-service",
            )
            .await?;
        self.show(
            "GET",
            &path,
            &reply,
            &format!("{}{}", details(&reply.body), polled(calls, elapsed)),
        );
        self.breaker(0).await?;
        Ok(())
    }

    /// Checks, and shows, the quote service's breaker gauge for the customer service.
    async fn breaker(&self, open: u8) -> anyhow::Result<()> {
        let reply = self.request(Svc::Quote, Method::GET, "/metrics", None, 200).await?;
        let text = reply.body.as_str().unwrap_or_default();
        let gauge = text
            .lines()
            .find(|l| l.starts_with("dbps_http_client_breaker_open") && l.contains("target=\"customer\""))
            .context("the quote service's /metrics has no dbps_http_client_breaker_open for the customer service")
            .blame(Svc::Quote)?;
        let state = if gauge.trim_end().ends_with(" 1") {
            "open"
        } else {
            "closed"
        };
        out::http(
            "GET",
            "/metrics",
            reply.status,
            &format!("the breaker in front of the customer service is {state}"),
        );
        out::tagged("metric", gauge.trim());
        if let Some(refused) = text.lines().find(|l| {
            l.starts_with("dbps_http_client_requests_total")
                && l.contains("target=\"customer\"")
                && l.contains("outcome=\"breaker_open\"")
        }) {
            out::tagged("metric", refused.trim());
        }
        if !gauge.trim_end().ends_with(&format!(" {open}")) {
            return Err(anyhow::anyhow!(
                "the breaker is {}, not {}: {gauge}",
                if open == 1 { "closed" } else { "open" },
                if open == 1 { "open" } else { "closed" }
            ))
            .blame(Svc::Quote);
        }
        Ok(())
    }

    // ----- The summary -----

    async fn summary(&mut self) -> anyhow::Result<()> {
        out::heading("10. Summary  (do the numbers add up?)");
        out::say(
            "Each service answers for its own data. The stock on hand must be what it was less what the ordered \
             quotes took, nothing may stay reserved (no quote is left \"Stock Reserved\"), and every quote, \
             reservation and purchase order must be in the state its flow left it in.",
        );
        // The last changes were asynchronous: give them the usual deadline to settle.
        let started = Instant::now();
        loop {
            let failures = self.check_all(false).await?;
            if failures == 0 {
                self.check_all(true).await?;
                println!();
                println!("all checks passed");
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                let failures = self.check_all(true).await?;
                bail!("{failures} check(s) failed");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Reads every quote, reservation, purchase order and stock level of the run and counts
    /// the checks that fail; `print`: shows the tables and each check.
    async fn check_all(&self, print: bool) -> anyhow::Result<usize> {
        let mut checks: Vec<(bool, String, Svc)> = Vec::new();
        let mut rows = Vec::new();
        let mut statuses = Vec::new();
        for quote in &self.quotes {
            let view = self.get(Svc::Quote, &format!("/quotes/{}", quote.id)).await?;
            let status = view.body["status"].as_str().unwrap_or("?").to_owned();
            let reason = view.body["status_reason"].as_str().unwrap_or_default().to_owned();
            let reservation = self
                .get(Svc::Inventory, &format!("/quotes/{}/reservation", quote.id))
                .await?;
            let reservation_state = (reservation.status == 200).then(|| {
                let states: Vec<&str> = reservation.body["lines"]
                    .as_array()
                    .map(|lines| lines.iter().filter_map(|l| l["state"].as_str()).collect())
                    .unwrap_or_default();
                let mut unique = states.clone();
                unique.sort_unstable();
                unique.dedup();
                unique.join("/")
            });
            let order = self
                .get(Svc::PurchaseOrder, &format!("/purchase-orders?quote_id={}", quote.id))
                .await?;
            let order_state = (order.status == 200).then(|| order.body["state"].as_str().unwrap_or("?").to_owned());

            let reason_ok = quote.outcome.reason.is_none_or(|word| reason.contains(word));
            checks.push((
                status == quote.outcome.status && reason_ok,
                format!(
                    "{} is {:?}{}",
                    quote.label,
                    quote.outcome.status,
                    quote
                        .outcome
                        .reason
                        .map(|w| format!(", its reason mentions {w:?}"))
                        .unwrap_or_default()
                ),
                Svc::Quote,
            ));
            checks.push((
                reservation_state.as_deref() == quote.outcome.reservation,
                format!(
                    "{}'s reservation: {}",
                    quote.label,
                    quote.outcome.reservation.unwrap_or("none (nothing was reserved)")
                ),
                Svc::Inventory,
            ));
            checks.push((
                order_state.as_deref() == quote.outcome.purchase_order,
                format!(
                    "{}'s purchase order: {}",
                    quote.label,
                    quote.outcome.purchase_order.unwrap_or("none")
                ),
                Svc::PurchaseOrder,
            ));
            rows.push([
                quote.label.clone(),
                out::short(&quote.id),
                self.customers[quote.customer].label.to_owned(),
                self.lines(&quote.lines),
                status.clone(),
                reservation_state.unwrap_or_else(|| String::from("-")),
                order_state.unwrap_or_else(|| String::from("-")),
                self.events.rename(&reason),
            ]);
            statuses.push(status);
        }
        let mut stock_rows = Vec::new();
        for (p, product) in self.products.iter().enumerate() {
            let stock = self.stock(p).await?.body;
            let taken: i64 = self.taken(p, &statuses, "Ordered");
            let holding: i64 = self.taken(p, &statuses, "Stock Reserved");
            let (on_hand, reserved, available) = (
                stock["on_hand"].as_i64().unwrap_or(-1),
                stock["reserved"].as_i64().unwrap_or(-1),
                stock["available"].as_i64().unwrap_or(-1),
            );
            checks.push((
                on_hand == product.initial - taken,
                format!(
                    "{}: on hand {on_hand} = {} initially - {taken} ordered",
                    product.sku, product.initial
                ),
                Svc::Inventory,
            ));
            checks.push((
                reserved == holding,
                format!(
                    "{}: reserved {reserved} = {holding} held by quotes still \"Stock Reserved\"",
                    product.sku
                ),
                Svc::Inventory,
            ));
            checks.push((
                available == on_hand - reserved,
                format!("{}: available {available} = on hand - reserved", product.sku),
                Svc::Inventory,
            ));
            stock_rows.push([
                product.sku.clone(),
                out::money(product.price_cents),
                product.initial.to_string(),
                taken.to_string(),
                on_hand.to_string(),
                reserved.to_string(),
                available.to_string(),
            ]);
        }
        let failures = checks.iter().filter(|(ok, _, _)| !ok).count();
        if print {
            println!();
            out::line(&format!(
                "{:<5} {:<10} {:<6} {:<20} {:<14} {:<12} {:<10} reason",
                "quote", "id", "for", "lines", "status", "reservation", "PO"
            ));
            for r in &rows {
                out::line(
                    format!(
                        "{:<5} {:<10} {:<6} {:<20} {:<14} {:<12} {:<10} {}",
                        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]
                    )
                    .trim_end(),
                );
            }
            println!();
            out::line(&format!(
                "{:<14} {:>10} {:>8} {:>8} {:>8} {:>9} {:>10}",
                "product", "price", "initial", "ordered", "on hand", "reserved", "available"
            ));
            for r in &stock_rows {
                out::line(&format!(
                    "{:<14} {:>10} {:>8} {:>8} {:>8} {:>9} {:>10}",
                    r[0], r[1], r[2], r[3], r[4], r[5], r[6]
                ));
            }
            println!();
            for (ok, what, _) in &checks {
                out::check(*ok, what);
            }
            let messages = self.events.seen().len();
            out::check(
                messages > 0,
                &format!("{messages} messages of this run passed on Kafka, each shown under its flow"),
            );
        }
        if let Some((_, what, svc)) = checks.iter().find(|(ok, _, _)| !ok)
            && print
        {
            return Err(anyhow::anyhow!("check failed: {what}")).blame(*svc);
        }
        Ok(failures)
    }

    /// How many of product `p` the quotes in `status` hold.
    fn taken(&self, p: usize, statuses: &[String], status: &str) -> i64 {
        self.quotes
            .iter()
            .zip(statuses)
            .filter(|(_, s)| s.as_str() == status)
            .flat_map(|(q, _)| q.lines.iter())
            .filter(|(product, _)| *product == p)
            .map(|(_, quantity)| quantity)
            .sum()
    }

    // ----- Quotes -----

    /// Creates a quote over HTTP and names it `Q<n>`.
    async fn create_quote(
        &mut self,
        customer: usize,
        lines: &[(usize, i64)],
        outcome: Outcome,
    ) -> anyhow::Result<usize> {
        let label = format!("Q{}", self.quotes.len() + 1);
        let body = json!({
            "customer_id": self.customers[customer].id,
            "sales_rep": SALES_REP,
            // No prices: the quote service prices each line from the inventory's catalogue.
            "lines": lines.iter().map(|(p, quantity)| json!({
                "product_id": self.products[*p].id,
                "quantity": quantity,
            })).collect::<Vec<_>>(),
            "machine_configurations": [{ "machine": "CNC-5", "options": { "spindle": "12k" } }],
        });
        let held = self.events.hold();
        let reply = self
            .request(Svc::Quote, Method::POST, "/quotes", Some(body), 201)
            .await?;
        let id = id_of(&reply.body, "id").blame(Svc::Quote)?;
        self.show(
            "POST",
            "/quotes",
            &reply,
            &format!(
                "{label} for {}: {}, {} (list prices), {:?}",
                self.customers[customer].label,
                self.lines(lines),
                out::money(reply.body["total_cents"].as_i64().unwrap_or(0)),
                reply.body["status"].as_str().unwrap_or("?")
            ),
        );
        self.events.name(&id, label.clone());
        if let Some(saga) = reply.body["stock_saga"].as_str() {
            self.events.name(saga, format!("{label} stock"));
        }
        drop(held);
        self.quotes.push(Quote {
            label,
            id,
            customer,
            lines: lines.to_vec(),
            outcome,
        });
        Ok(self.quotes.len() - 1)
    }

    /// Accepts quote `q`; returns its order saga's id.
    async fn accept(&mut self, q: usize) -> anyhow::Result<String> {
        let path = format!("/quotes/{}/accept", self.quotes[q].id);
        let held = self.events.hold();
        let reply = self
            .request(Svc::Quote, Method::POST, &path, Some(json!({})), 202)
            .await?;
        let saga = id_of(&reply.body, "order_saga").blame(Svc::Quote)?;
        let label = self.quotes[q].label.clone();
        self.show(
            "POST",
            &path,
            &reply,
            &format!("{label}: order saga {} started", out::short(&saga)),
        );
        self.events.name(&saga, format!("saga {label}"));
        drop(held);
        Ok(saga)
    }

    /// Polls quote `q` until its status is `status`; returns the quote.
    async fn quote_reaches(&self, q: usize, status: &str) -> anyhow::Result<Value> {
        let path = format!("/quotes/{}", self.quotes[q].id);
        let (reply, calls, elapsed) = self
            .poll(
                Svc::Quote,
                &path,
                &format!("{} {status:?}", self.quotes[q].label),
                |quote| self.quote_summary(q, quote),
                |quote| quote["status"] == status,
            )
            .await?;
        self.show(
            "GET",
            &path,
            &reply,
            &format!("{}{}", self.quote_summary(q, &reply.body), polled(calls, elapsed)),
        );
        Ok(reply.body)
    }

    fn quote_summary(&self, q: usize, quote: &Value) -> String {
        let mut text = format!("{} {:?}", self.quotes[q].label, quote["status"].as_str().unwrap_or("?"));
        if let Some(po) = quote["purchase_order_id"].as_str() {
            text.push_str(&format!(", purchase order {}", out::short(po)));
        }
        if let Some(reason) = quote["status_reason"].as_str() {
            text.push_str(&format!(": {}", self.events.rename(reason)));
        }
        text
    }

    fn purchase_order_summary(&self, order: &Value) -> String {
        format!(
            "{} of {}: {}, {}",
            out::short(order["id"].as_str().unwrap_or_default()),
            self.events.named(order["quote_id"].as_str().unwrap_or_default()),
            order["state"].as_str().unwrap_or("?"),
            out::money(order["total_cents"].as_i64().unwrap_or(0))
        )
    }

    /// `3 x LATHE-1a2b3c, 5 x MILL-1a2b3c`.
    fn lines(&self, lines: &[(usize, i64)]) -> String {
        lines
            .iter()
            .map(|(p, quantity)| {
                format!(
                    "{quantity} x {}",
                    self.products[*p].sku.split('-').next().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    // ----- Stock -----

    async fn stock(&self, p: usize) -> anyhow::Result<Reply> {
        self.get(Svc::Inventory, &format!("/products/{}/stock", self.products[p].id))
            .await
            .and_then(|reply| {
                if reply.status == 200 {
                    Ok(reply)
                } else {
                    Err(anyhow::anyhow!(
                        "the stock check answered {}: {}",
                        reply.status,
                        reply.body
                    ))
                }
            })
            .blame(Svc::Inventory)
    }

    fn show_stock(&self, p: usize, reply: &Reply, note: &str) {
        let s = &reply.body;
        let note = if note.is_empty() {
            String::new()
        } else {
            format!("  ({note})")
        };
        self.show(
            "GET",
            &format!("/products/{}/stock", self.products[p].id),
            reply,
            &format!(
                "{}: on hand {}, reserved {}, available {}  x-cache: {}{note}",
                self.products[p].sku, s["on_hand"], s["reserved"], s["available"], reply.cache
            ),
        );
    }

    /// Asks for product `p`'s stock until `done`, and shows the answer.
    async fn stock_until(&self, p: usize, note: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut calls = 0;
        loop {
            let reply = self.stock(p).await?;
            calls += 1;
            if done(&reply.body) {
                let note = if calls > 1 {
                    format!(
                        "{note}{}",
                        polled(calls, started.elapsed()).replace("  (", "; ").replace(')', "")
                    )
                } else {
                    note.to_owned()
                };
                self.show_stock(p, &reply, &note);
                return Ok(());
            }
            if started.elapsed() > DEADLINE {
                self.show_stock(p, &reply, "");
                return Err(anyhow::anyhow!(
                    "the stock of {} is not {note:?} within {} s",
                    self.products[p].sku,
                    DEADLINE.as_secs()
                ))
                .blame(Svc::Inventory);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    // ----- HTTP -----

    /// Sends a request; an answer with another status than `expected` is shown and is an
    /// error blamed on the service.
    async fn request(
        &self,
        svc: Svc,
        method: Method,
        path: &str,
        body: Option<Value>,
        expected: u16,
    ) -> anyhow::Result<Reply> {
        let reply = self.send(svc, method.clone(), path, body).await?;
        if reply.status != expected {
            let detail = problem(&reply.body);
            self.show(method.as_str(), path, &reply, &detail);
            return Err(anyhow::anyhow!(
                "{method} {path} answered {} where {expected} was expected: {detail}",
                reply.status
            ))
            .blame(svc);
        }
        Ok(reply)
    }

    async fn get(&self, svc: Svc, path: &str) -> anyhow::Result<Reply> {
        self.send(svc, Method::GET, path, None).await
    }

    async fn send(&self, svc: Svc, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.fleet.url(svc));
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))
            .blame(svc)?;
        let status = response.status().as_u16();
        let cache = response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading the answer to {method} {url}"))
            .blame(svc)?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body, cache })
    }

    /// GETs `path` until it answers 200 with a body that is `done`; returns the answer, the
    /// number of calls and the time they took. Past the deadline the last answer is shown
    /// (as `describe` puts it) and the wait fails, saying what was `awaited`.
    async fn poll(
        &self,
        svc: Svc,
        path: &str,
        awaited: &str,
        describe: impl Fn(&Value) -> String,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Reply, usize, Duration)> {
        self.poll_every(svc, path, POLL, awaited, describe, done).await
    }

    async fn poll_every(
        &self,
        svc: Svc,
        path: &str,
        every: Duration,
        awaited: &str,
        describe: impl Fn(&Value) -> String,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Reply, usize, Duration)> {
        let started = Instant::now();
        let mut calls = 0;
        loop {
            let reply = self.get(svc, path).await?;
            calls += 1;
            if reply.status == 200 && done(&reply.body) {
                return Ok((reply, calls, started.elapsed()));
            }
            if started.elapsed() > DEADLINE {
                let last = if reply.status == 200 {
                    describe(&reply.body)
                } else {
                    problem(&reply.body)
                };
                self.show(
                    "GET",
                    path,
                    &reply,
                    &format!("{last}{}", polled(calls, started.elapsed())),
                );
                return Err(anyhow::anyhow!(
                    "not {awaited} within {} s: the last answer was {} {last}",
                    DEADLINE.as_secs(),
                    reply.status
                ))
                .blame(svc);
            }
            tokio::time::sleep(every).await;
        }
    }

    fn show(&self, method: &str, path: &str, reply: &Reply, what: &str) {
        out::http(method, &shorten_ids(path), reply.status, what);
    }
}

/// `  (after 4 calls, 0.8 s)`, or nothing for one call.
fn polled(calls: usize, elapsed: Duration) -> String {
    if calls > 1 {
        format!("  (after {calls} calls, {})", out::secs(elapsed))
    } else {
        String::new()
    }
}

/// A path with its ids shortened.
fn shorten_ids(path: &str) -> String {
    let mut shown = String::new();
    let mut rest = path;
    while !rest.is_empty() {
        let at = rest.find(|c: char| c.is_ascii_hexdigit()).unwrap_or(rest.len());
        shown.push_str(&rest[..at]);
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
            .unwrap_or(rest.len());
        let token = &rest[..end];
        if token.len() == 36 && uuid::Uuid::parse_str(token).is_ok() {
            shown.push_str(&out::short(token));
        } else {
            shown.push_str(token);
        }
        rest = &rest[end..];
    }
    shown
}

fn id_of(body: &Value, field: &str) -> anyhow::Result<String> {
    body[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the answer has no {field}: {}", compact(body)))
}

/// A problem+json answer in a few words.
fn problem(body: &Value) -> String {
    match (body["title"].as_str(), body["detail"].as_str()) {
        (_, Some(detail)) => detail.to_owned(),
        (Some(title), None) => title.to_owned(),
        _ => compact(body),
    }
}

fn compact(body: &Value) -> String {
    let text = body.to_string();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text
    }
}

/// Customer details as the quote service gives them.
fn details(body: &Value) -> String {
    format!(
        "{:?} from {}, may_be_stale: {}",
        body["name"].as_str().unwrap_or("?"),
        body["source"].as_str().unwrap_or("?"),
        body["may_be_stale"]
    )
}

fn expect_source(body: &Value, source: &str, stale: bool) -> anyhow::Result<()> {
    if body["source"] != source || body["may_be_stale"] != stale {
        return Err(anyhow::anyhow!(
            "the customer's details came from {} (may_be_stale: {}), not from {source} (may_be_stale: {stale})",
            body["source"],
            body["may_be_stale"]
        ))
        .blame(Svc::Quote);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_in_paths_are_shortened() {
        assert_eq!(
            shorten_ids("/quotes/0193f2a4-1b2c-7d3e-8f40-5a6b7c8d9e0f/accept"),
            "/quotes/…7c8d9e0f/accept"
        );
        assert_eq!(
            shorten_ids("/purchase-orders?quote_id=0193f2a4-1b2c-7d3e-8f40-5a6b7c8d9e0f"),
            "/purchase-orders?quote_id=…7c8d9e0f"
        );
        assert_eq!(shorten_ids("/metrics"), "/metrics");
    }
}
