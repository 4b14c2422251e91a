//! The ADR's flows, one after the other, each narrated as it happens, and the closing
//! check that the numbers add up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::events::{self, Watcher};
use crate::mailpit::Mailpit;
use crate::out;
use crate::services::{Blamed as _, Fleet, Svc};

/// How long one wait of a flow (a status, a stock level, a message) may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// Between two polls of a state.
const POLL: Duration = Duration::from_millis(200);
/// The consumer group of the quote service's customer replica.
const QUOTE_REPLICA_GROUP: &str = "quote.customer-cache";
/// The consumer group of the email service's customer email index.
const EMAIL_INDEX_GROUP: &str = "email.customer-email-index";
/// The domain of the notifications' `Message-ID`s (the email service's).
const NOTIFICATION_DOMAIN: &str = "email.dbps";

/// A customer of this run.
#[derive(Debug)]
struct Customer {
    label: &'static str,
    id: String,
    /// Its email address now.
    email: String,
}

/// An email of this run, received by the email service.
#[derive(Debug)]
struct Email {
    label: String,
    id: String,
    from: String,
    /// The customer it must end up assigned to (`None`: nobody's).
    customer: Option<usize>,
    /// Whether it arrived before its customer (assigned late).
    late: bool,
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
    /// The products its reservation was short of.
    short: &'static [usize],
}

/// The rows of the summary's email table and the email checks.
type EmailChecks = (Vec<[String; 6]>, Vec<(bool, String, Svc)>);

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
    emails: Vec<Email>,
    mail: Mailpit,
    /// The sales rep on every quote: an address of this run's own, so that the mail that
    /// reached it is this run's.
    sales_rep: String,
    /// The id of the notification request of the quote out of stock.
    notification_request: Option<String>,
}

const ADA: usize = 0;
const GRACE: usize = 1;
const HEDY: usize = 2;
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
            mail: Mailpit::from_env(http.clone()),
            http,
            sales_rep: format!("rep-{run}@example.com"),
            run,
            order_step_timeout,
            customers: Vec::new(),
            products: Vec::new(),
            quotes: Vec::new(),
            emails: Vec::new(),
            notification_request: None,
        }
    }

    /// Every flow, then the summary.
    pub(crate) async fn run(&mut self) -> anyhow::Result<()> {
        self.customers_are_created().await?;
        self.an_email_before_its_customer().await?;
        self.products_with_stock().await?;
        self.a_quote_reserves_its_stock().await?;
        self.an_accepted_quote_is_ordered().await?;
        self.a_quote_out_of_stock().await?;
        self.a_purchase_order_is_rejected().await?;
        self.the_purchase_order_service_is_down().await?;
        self.a_change_reaches_the_replicas().await?;
        self.search_and_reports().await?;
        self.the_breaker_opens_and_closes().await?;
        self.summary().await
    }

    // ----- The flows -----

    async fn customers_are_created(&mut self) -> anyhow::Result<()> {
        out::heading("1. Customers are created  (customer service -> quote replica, email index)");
        let mark = self.events.mark();
        out::say(
            "The customer service stores each customer and its customer.CustomerCreated event in one local \
             transaction (the outbox); its relay publishes the event. Two services keep what they need of the \
             customers from these events: the quote service a replica (customer_cache, on PostgreSQL), the email \
             service an index of their addresses (customer_email_index, on MongoDB).",
        );
        for (label, name) in [("Ada", "Ada Byron"), ("Grace", "Grace Hopper")] {
            self.create_customer(label, name).await?;
        }
        let ids: Vec<String> = self.customers.iter().map(|c| c.id.clone()).collect();
        let wanted: Vec<(&str, &str)> = ids.iter().map(|id| ("customer.CustomerCreated", id.as_str())).collect();
        self.events.expect(mark, &wanted, DEADLINE).await?;
        self.events.settle().await;
        self.replica_caught_up(
            Svc::Quote,
            QUOTE_REPLICA_GROUP,
            "the quote service's customer_cache has Ada and Grace",
        )
        .await?;
        self.replica_caught_up(
            Svc::Email,
            EMAIL_INDEX_GROUP,
            "the email service's index has their addresses",
        )
        .await?;

        println!();
        let mark = self.events.mark();
        out::say(
            "Ada writes to sales. The email service takes the raw message (RFC 5322, POST /emails), stores it \
             with its attachment's bytes, and assigns it to the customer whose address sent it: the index knows \
             Ada's. The assignment and its email.EmailAssigned event are one document write (the MongoDB \
             outbox); the relay publishes the event.",
        );
        let e = self
            .receive_email(
                &self.customers[ADA].email.clone(),
                "RFQ: three CNC lathes",
                Some(ADA),
                false,
            )
            .await?;
        let email = self.emails[e].id.clone();
        self.events
            .expect(mark, &[("email.EmailAssigned", &email)], DEADLINE)
            .await?;
        self.attachment_reads_back(e).await?;
        self.customer_emails(ADA, &[e]).await?;
        self.events.settle().await;
        Ok(())
    }

    async fn an_email_before_its_customer(&mut self) -> anyhow::Result<()> {
        out::heading("2. An email before its customer  (late assignment, email service)");
        let mark = self.events.mark();
        out::say(
            "An email comes from an address no customer has: it is stored, unassigned. When a customer with that \
             address is created, the email service's consumer applies the customer.CustomerCreated event to its \
             index and then assigns the pending emails of that address: email.EmailAssigned follows.",
        );
        let address = format!("hedy.{}@example.com", self.run);
        let e = self
            .receive_email(&address, "Frequency-hopping spindle drive?", Some(HEDY), true)
            .await?;
        let c = self.create_customer("Hedy", "Hedy Lamarr").await?;
        let (hedy, email) = (self.customers[c].id.clone(), self.emails[e].id.clone());
        self.events
            .expect(
                mark,
                &[("customer.CustomerCreated", &hedy), ("email.EmailAssigned", &email)],
                DEADLINE,
            )
            .await?;
        let path = format!("/emails/{email}");
        let (reply, calls, elapsed) = self
            .poll(
                Svc::Email,
                &path,
                &format!("{} assigned to Hedy", self.emails[e].label),
                |view| self.email_summary(e, view),
                |view| view["customer_id"] == hedy.as_str(),
            )
            .await?;
        self.show(
            "GET",
            &path,
            &reply,
            &format!("{}{}", self.email_summary(e, &reply.body), polled(calls, elapsed)),
        );
        self.customer_emails(HEDY, &[e]).await?;
        self.events.settle().await;
        Ok(())
    }

    async fn products_with_stock(&mut self) -> anyhow::Result<()> {
        out::heading("3. Products with stock  (inventory service, Redis)");
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
        out::heading("4. A quote reserves its stock  (event-driven: quote -> inventory -> quote)");
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
                    short: &[],
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
        out::heading("5. Order placement  (orchestrated saga: quote -> inventory -> purchase order)");
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
        out::heading("6. Out of stock  (the quote waits, the sales rep gets an email)");
        let mark = self.events.mark();
        out::say(
            "Grace asks for more mills than there are. The inventory reserves nothing of the quote and answers \
             inventory.StockReservationFailed; the quote becomes \"Pending Stock\" and, in the same transaction, \
             quote.SalesRepNotificationRequested is published for the quote's sales rep.",
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
                    short: &[MILL],
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
        self.the_sales_rep_is_emailed(q).await
    }

    /// The notification of quote `q`: read back from Mailpit, and as the email service
    /// recorded it.
    async fn the_sales_rep_is_emailed(&mut self, q: usize) -> anyhow::Result<()> {
        println!();
        out::say(
            "The email service's consumer records the request once (the MongoDB inbox: the request's id becomes \
             the email's id) and renders the email with a Message-ID derived from the request; its delivery worker \
             sends it over SMTP. Mailpit, the local stack's SMTP server, shows what arrived.",
        );
        let quote = self.quotes[q].id.clone();
        let request = self
            .events
            .seen()
            .into_iter()
            .find(|m| m.message_type == "quote.SalesRepNotificationRequested" && m.key == quote)
            .map(|m| m.id)
            .context("the notification request passed, but the watcher did not keep it")?;
        self.notification_request = Some(request.clone());
        let started = Instant::now();
        let mut calls = 0;
        let (path, arrived) = loop {
            let (path, arrived) = self.mail.to(&self.sales_rep).await.blame(Svc::Email)?;
            calls += 1;
            if !arrived.is_empty() {
                break (path, arrived);
            }
            if started.elapsed() > DEADLINE {
                return Err(anyhow::anyhow!(
                    "no email reached {} within {} s",
                    self.sales_rep,
                    DEADLINE.as_secs()
                ))
                .blame(Svc::Email);
            }
            tokio::time::sleep(POLL).await;
        };
        out::http(
            "GET",
            &path,
            200,
            &format!(
                "Mailpit: {} message(s) to the sales rep{}",
                arrived.len(),
                polled(calls, started.elapsed())
            ),
        );
        let (path, message) = self.mail.message(&arrived[0].id).await.blame(Svc::Email)?;
        out::http("GET", &path, 200, "Mailpit: the message");
        out::tagged("mail", &format!("From: {}", message.from));
        out::tagged("mail", &format!("To: {}", message.summary.to.join(", ")));
        out::tagged("mail", &format!("Subject: {}", message.summary.subject));
        out::tagged("mail", &format!("Message-ID: <{}>", message.summary.message_id));
        let first = message
            .text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default();
        out::tagged("mail", &format!("| {}", self.events.rename(first)));
        let expected = notification_message_id(&request);
        if message.summary.message_id != expected {
            return Err(anyhow::anyhow!(
                "the notification's Message-ID is <{}>, not <{expected}> (derived from the request)",
                message.summary.message_id
            ))
            .blame(Svc::Email);
        }
        if !message.summary.subject.contains(&quote) || !message.text.contains(&quote) {
            return Err(anyhow::anyhow!(
                "the notification does not name quote {}",
                self.quotes[q].label
            ))
            .blame(Svc::Email);
        }
        let path = format!("/emails/{request}");
        let (reply, calls, elapsed) = self
            .poll(
                Svc::Email,
                &path,
                "the notification recorded as sent",
                delivery,
                |email| email["delivery"]["status"] == "sent",
            )
            .await?;
        self.show(
            "GET",
            &path,
            &reply,
            &format!(
                "the email service's record: {}{}",
                delivery(&reply.body),
                polled(calls, elapsed)
            ),
        );
        self.events.settle().await;
        Ok(())
    }

    async fn a_purchase_order_is_rejected(&mut self) -> anyhow::Result<()> {
        out::heading("7. A purchase order is rejected  (the saga compensates)");
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
                    short: &[],
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
        out::heading("8. The purchase-order service is down  (a step times out)");
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
                    short: &[],
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

    async fn a_change_reaches_the_replicas(&mut self) -> anyhow::Result<()> {
        out::heading("9. Replication  (the quote service's replica, the email service's index)");
        let mark = self.events.mark();
        out::say(
            "Ada is renamed in the customer service. Its customer.CustomerUpdated event updates the quote \
             service's replica, which the quote shows: no call to the customer service is needed to read it.",
        );
        let ada = self.customers[ADA].id.clone();
        let name = format!("Ada Lovelace [{}]", self.run);
        let path = path_of_customer(&ada);
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

        println!();
        let mark = self.events.mark();
        out::say(
            "Ada moves to a new address. The email service's index follows the customer.CustomerUpdated event: \
             the entry moves from the old address to the new one, so an email from the new address is Ada's, and \
             one from the old address is nobody's.",
        );
        let old = self.customers[ADA].email.clone();
        let new = format!("ada.lovelace.{}@example.com", self.run);
        let held = self.events.hold();
        let reply = self
            .request(
                Svc::Customer,
                Method::PUT,
                &path_of_customer(&ada),
                Some(json!({ "email": new })),
                200,
            )
            .await?;
        self.show(
            "PUT",
            &path_of_customer(&ada),
            &reply,
            &format!("Ada: <{new}>, version {}", reply.body["version"]),
        );
        drop(held);
        self.customers[ADA].email = new.clone();
        self.events
            .expect(mark, &[("customer.CustomerUpdated", &ada)], DEADLINE)
            .await?;
        self.events.settle().await;
        self.replica_caught_up(
            Svc::Email,
            EMAIL_INDEX_GROUP,
            "the index holds Ada's new address, not the old one",
        )
        .await?;
        let mark = self.events.mark();
        let moved = self
            .receive_email(&new, "New address, same lathes", Some(ADA), false)
            .await?;
        self.receive_email(&old, "Sent from the old address", None, false)
            .await?;
        let email = self.emails[moved].id.clone();
        self.events
            .expect(mark, &[("email.EmailAssigned", &email)], DEADLINE)
            .await?;
        let ada_emails: Vec<usize> = self
            .emails
            .iter()
            .enumerate()
            .filter(|(_, e)| e.customer == Some(ADA))
            .map(|(n, _)| n)
            .collect();
        self.customer_emails(ADA, &ada_emails).await?;
        self.events.settle().await;
        Ok(())
    }

    async fn search_and_reports(&mut self) -> anyhow::Result<()> {
        out::heading("10. Search and reports  (OpenSearch projections, the pipeline service's warehouse)");
        out::say(
            "The customer service keeps a search index of its customers in OpenSearch, a projection of its own \
             customer events: each event carries the customer's whole searchable state and is indexed with the \
             customer's version as its external version, so a late event never overwrites a newer document. The \
             answer says how fresh the index is.",
        );
        let ada = self.customers[ADA].id.clone();
        let path = format!("/customers/search?q=Lovelace+{}", self.run);
        let (reply, calls, elapsed) = self
            .poll(
                Svc::Customer,
                &path,
                "Ada found under her new name",
                |found| format!("{} results", found["results"].as_array().map_or(0, Vec::len)),
                |found| ids_of(&found["results"]).contains(&ada.as_str()),
            )
            .await?;
        self.show(
            "GET",
            &path,
            &reply,
            &format!(
                "Ada, as of {}, at most {} ms behind{}",
                reply.body["as_of"].as_str().unwrap_or("?"),
                reply.body["lag_ms"],
                polled(calls, elapsed)
            ),
        );
        let path = format!("/customers/search?q=Byron+{}", self.run);
        let reply = self.get(Svc::Customer, &path).await?;
        anyhow::ensure!(
            reply.status == 200 && !ids_of(&reply.body["results"]).contains(&ada.as_str()),
            "the old name still finds Ada: {} {}",
            reply.status,
            reply.body
        );
        self.show(
            "GET",
            &path,
            &reply,
            "the old name finds no one: the rename replaced the document",
        );

        println!();
        out::say(
            "Reports across services are the pipeline service's job. It reads the customer, quote and inventory \
             events into a star schema in its own database (dimensions for customers, products and days; facts for \
             quotes, their statuses, stock levels, stock movements and stock-outs), each table a projection it can \
             rebuild from the topics' history, and keeps a quotes index in OpenSearch. The figures below must match \
             what this run did: its quotes, their statuses and values, and the mill that kept one waiting for stock.",
        );
        self.quotes_in_the_pipeline().await?;
        self.stock_outs_in_the_pipeline().await?;
        for path in ["/reports/pipeline-value?group=status", "/reports/conversion"] {
            let reply = self.request(Svc::Pipeline, Method::GET, path, None, 200).await?;
            self.show("GET", path, &reply, &report_summary(&reply.body));
        }
        Ok(())
    }

    /// Polls the pipeline's quotes index until it holds each quote of this run with the
    /// status and value the flows left it in.
    async fn quotes_in_the_pipeline(&self) -> anyhow::Result<()> {
        for (c, customer) in self.customers.iter().enumerate() {
            let expected: BTreeMap<&str, (&str, i64)> = self
                .quotes
                .iter()
                .filter(|q| q.customer == c)
                .map(|q| (q.id.as_str(), (q.outcome.status, self.value_cents(q))))
                .collect();
            if expected.is_empty() {
                continue;
            }
            let path = format!("/search/quotes?customer_id={}", customer.id);
            let held = |found: &Value| -> BTreeMap<String, (String, i64)> {
                found["hits"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|hit| {
                        (
                            hit["quote_id"].as_str().unwrap_or_default().to_owned(),
                            (
                                hit["status"].as_str().unwrap_or_default().to_owned(),
                                hit["value_cents"].as_i64().unwrap_or_default(),
                            ),
                        )
                    })
                    .collect()
            };
            let matches = |found: &Value| {
                let held = held(found);
                held.len() == expected.len()
                    && expected
                        .iter()
                        .all(|(id, (status, value))| held.get(*id).is_some_and(|h| h.0 == *status && h.1 == *value))
            };
            let (reply, calls, elapsed) = self
                .poll(
                    Svc::Pipeline,
                    &path,
                    &format!("{}'s quotes in the quotes index as the flows left them", customer.label),
                    |found| {
                        let mut quotes: Vec<String> = held(found)
                            .into_iter()
                            .map(|(id, (status, value))| {
                                format!("{} {status} {}", self.events.named(&id), out::money(value))
                            })
                            .collect();
                        quotes.sort();
                        quotes.join(", ")
                    },
                    matches,
                )
                .await?;
            let mut quotes: Vec<String> = self
                .quotes
                .iter()
                .filter(|q| q.customer == c)
                .map(|q| format!("{} {:?} {}", q.label, q.outcome.status, out::money(self.value_cents(q))))
                .collect();
            quotes.sort();
            self.show(
                "GET",
                &path,
                &reply,
                &format!(
                    "{}: {} — as the quote service has them{}",
                    customer.label,
                    quotes.join(", "),
                    polled(calls, elapsed)
                ),
            );
        }
        Ok(())
    }

    /// Polls the stock-out report until this run's products show the quotes this run left
    /// waiting for stock.
    async fn stock_outs_in_the_pipeline(&self) -> anyhow::Result<()> {
        let path = "/reports/stock-outs?limit=100";
        let expected: Vec<(usize, i64)> = (0..self.products.len())
            .map(|p| {
                let waiting = self
                    .quotes
                    .iter()
                    .filter(|q| q.outcome.status == "Pending Stock" && q.outcome.short.contains(&p))
                    .count();
                (p, i64::try_from(waiting).unwrap_or(i64::MAX))
            })
            .filter(|(_, waiting)| *waiting > 0)
            .collect();
        let row = |found: &Value, p: usize| -> Option<Value> {
            found["rows"]
                .as_array()?
                .iter()
                .find(|row| row["product_id"] == self.products[p].id.as_str())
                .cloned()
        };
        let (reply, calls, elapsed) = self
            .poll(
                Svc::Pipeline,
                path,
                "this run's stock-outs in the report",
                |found| format!("{} products", found["rows"].as_array().map_or(0, Vec::len)),
                |found| {
                    expected
                        .iter()
                        .all(|(p, waiting)| row(found, *p).is_some_and(|r| r["quotes_pending_stock"] == *waiting))
                },
            )
            .await?;
        let rows: Vec<String> = expected
            .iter()
            .filter_map(|(p, _)| {
                let r = row(&reply.body, *p)?;
                Some(format!(
                    "{}: {} quote(s) pending stock, {} units short, {} available now",
                    self.products[*p].sku, r["quotes_pending_stock"], r["units_short"], r["available_now"]
                ))
            })
            .collect();
        self.show(
            "GET",
            path,
            &reply,
            &format!("{}{}", rows.join("; "), polled(calls, elapsed)),
        );
        Ok(())
    }

    /// A quote's value at list prices: what the quote service charges for its lines.
    fn value_cents(&self, quote: &Quote) -> i64 {
        quote
            .lines
            .iter()
            .map(|(p, quantity)| quantity * self.products[*p].price_cents)
            .sum()
    }

    async fn the_breaker_opens_and_closes(&mut self) -> anyhow::Result<()> {
        out::heading("11. Circuit breaker  (the customer service is down)");
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
        out::heading("12. Summary  (do the numbers add up?)");
        out::say(
            "Each service answers for its own data. The stock on hand must be what it was less what the ordered \
             quotes took, nothing may stay reserved (no quote is left \"Stock Reserved\"), and every quote, \
             reservation and purchase order must be in the state its flow left it in. Every email must be \
             assigned to the customer whose address sent it (nobody's for the old address), and the sales rep \
             must have received exactly one email, the notification of the quote out of stock.",
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
        let (email_rows, email_checks) = self.check_emails().await?;
        checks.extend(email_checks);
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
            out::line(&format!(
                "{:<5} {:<10} {:<36} {:<11} {:<11} assigned",
                "email", "id", "from", "customer", "expected"
            ));
            for r in &email_rows {
                out::line(
                    format!(
                        "{:<5} {:<10} {:<36} {:<11} {:<11} {}",
                        r[0], r[1], r[2], r[3], r[4], r[5]
                    )
                    .trim_end(),
                );
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

    /// The email side of the summary: each email assigned to the customer it must be (its
    /// event passed), each customer's list, and the sales rep's one notification. Returns the
    /// table's rows and the checks.
    async fn check_emails(&self) -> anyhow::Result<EmailChecks> {
        let mut checks = Vec::new();
        let mut rows = Vec::new();
        let seen = self.events.seen();
        let whom = |c: Option<usize>| c.map_or("nobody", |c| self.customers[c].label);
        for email in &self.emails {
            let view = self.get(Svc::Email, &format!("/emails/{}", email.id)).await?;
            let assigned = view.body["customer_id"].as_str().map(str::to_owned);
            let expected = email.customer.map(|c| self.customers[c].id.clone());
            let delay = assignment_delay(&view.body);
            let late_ok = !email.late || delay.is_some_and(|d| !d.is_zero());
            checks.push((
                view.status == 200 && assigned == expected && late_ok,
                format!(
                    "{} from <{}> is assigned to {}{}",
                    email.label,
                    email.from,
                    whom(email.customer),
                    if email.late {
                        " (late: after it arrived, when the customer appeared)"
                    } else {
                        ""
                    }
                ),
                Svc::Email,
            ));
            let published = seen
                .iter()
                .filter(|m| m.message_type == "email.EmailAssigned" && m.key == email.id)
                .count();
            checks.push((
                (published > 0) == expected.is_some(),
                if expected.is_some() {
                    format!("{}'s assignment was published (email.EmailAssigned)", email.label)
                } else {
                    format!("{} has no email.EmailAssigned", email.label)
                },
                Svc::Email,
            ));
            rows.push([
                email.label.clone(),
                out::short(&email.id),
                email.from.clone(),
                assigned
                    .as_deref()
                    .map_or_else(|| String::from("-"), |c| self.events.named(c)),
                whom(email.customer).to_owned(),
                match delay {
                    Some(delay) if email.late => format!("late, {} after it arrived", out::secs(delay)),
                    Some(_) => String::from("on arrival"),
                    None => String::from("-"),
                },
            ]);
        }
        for (c, customer) in self.customers.iter().enumerate() {
            let reply = self
                .get(Svc::Email, &format!("/customers/{}/emails", customer.id))
                .await?;
            let expected: Vec<&Email> = self.emails.iter().filter(|e| e.customer == Some(c)).collect();
            let ids: Vec<&str> = expected.iter().map(|e| e.id.as_str()).collect();
            let labels: Vec<&str> = expected.iter().map(|e| e.label.as_str()).collect();
            checks.push((
                reply.status == 200 && listed(&reply.body) == ids,
                format!(
                    "{}'s emails: {}",
                    customer.label,
                    if labels.is_empty() {
                        String::from("none")
                    } else {
                        labels.join(", ")
                    }
                ),
                Svc::Email,
            ));
        }
        let (_, arrived) = self.mail.to(&self.sales_rep).await.blame(Svc::Email)?;
        let expected = self.notification_request.as_deref().map(notification_message_id);
        checks.push((
            arrived.len() == 1 && expected.as_deref() == Some(arrived[0].message_id.as_str()),
            format!(
                "the sales rep <{}> received exactly one email, Message-ID <{}> ({} arrived)",
                self.sales_rep,
                expected.as_deref().unwrap_or("notification-…"),
                arrived.len()
            ),
            Svc::Email,
        ));
        let recorded = match &self.notification_request {
            Some(request) => {
                let reply = self.get(Svc::Email, &format!("/emails/{request}")).await?;
                reply.status == 200 && reply.body["delivery"]["status"] == "sent"
            }
            None => false,
        };
        checks.push((
            recorded,
            String::from("the email service recorded the notification as sent"),
            Svc::Email,
        ));
        Ok((rows, checks))
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

    // ----- Customers and their emails -----

    /// Creates a customer with an address of this run's and names it `label`; returns its
    /// index.
    async fn create_customer(&mut self, label: &'static str, name: &str) -> anyhow::Result<usize> {
        let name = format!("{name} [{}]", self.run);
        let email = format!("{}.{}@example.com", label.to_lowercase(), self.run);
        let body = json!({
            "name": name,
            "tax_number": format!("TX-{}-{}", self.run, label.to_uppercase()),
            "email": email,
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
            &format!("{label}: {name:?} <{email}>, version {}", reply.body["version"]),
        );
        // Named after the call is shown, so that its messages follow it.
        self.events.name(&id, label);
        drop(held);
        self.customers.push(Customer { label, id, email });
        Ok(self.customers.len() - 1)
    }

    /// Waits until the consumer group of a service's customer replica has applied every
    /// customer event published so far, and says so.
    async fn replica_caught_up(&self, svc: Svc, group: &str, what: &str) -> anyhow::Result<()> {
        let topic = events::customer_topic()?;
        let took = self.events.caught_up(group, &topic, DEADLINE).await.blame(svc)?;
        out::action(
            "kafka",
            &format!("group {group}"),
            &format!("caught up on {topic} ({}): {what}", out::secs(took)),
        );
        Ok(())
    }

    /// Posts a raw email from `from` to the email service and names it `E<n>`; it must be
    /// assigned to `customer` on arrival, or, when it is `late`, be unassigned on arrival.
    /// Returns its index.
    async fn receive_email(
        &mut self,
        from: &str,
        subject: &str,
        customer: Option<usize>,
        late: bool,
    ) -> anyhow::Result<usize> {
        let label = format!("E{}", self.emails.len() + 1);
        let message_id = format!("{}-{}@example.com", label.to_lowercase(), self.run);
        let raw = raw_email(from, &message_id, subject);
        let url = format!("{}/emails", self.fleet.url(Svc::Email));
        let request = self.http.post(&url).header("content-type", "message/rfc822").body(raw);
        let held = self.events.hold();
        let reply = self.answer(Svc::Email, &Method::POST, &url, request).await?;
        if reply.status != 201 {
            let detail = problem(&reply.body);
            self.show("POST", "/emails", &reply, &detail);
            return Err(anyhow::anyhow!(
                "POST /emails answered {} where 201 was expected: {detail}",
                reply.status
            ))
            .blame(Svc::Email);
        }
        let id = id_of(&reply.body, "id").blame(Svc::Email)?;
        let attachments: Vec<String> = reply.body["attachments"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|a| {
                        format!(
                            "{}, {} bytes",
                            a["filename"].as_str().unwrap_or("?"),
                            a["size"].as_i64().unwrap_or(-1)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let assigned = reply.body["customer_id"].as_str().map(str::to_owned);
        let now = match &assigned {
            Some(customer) => format!("assigned to {}", self.events.named(customer)),
            None => String::from("unassigned (no customer has the address)"),
        };
        self.show(
            "POST",
            "/emails",
            &reply,
            &format!(
                "{label} from <{from}>, {subject:?}, attachment {}: {now}",
                attachments.join("; ")
            ),
        );
        self.events.name(&id, label.clone());
        drop(held);
        let expected = if late {
            None
        } else {
            customer.map(|c| self.customers[c].id.clone())
        };
        if assigned != expected {
            return Err(anyhow::anyhow!(
                "{label} from {from} is {now} on arrival, where {} was expected",
                expected.map_or_else(|| String::from("nobody"), |c| self.events.named(&c))
            ))
            .blame(Svc::Email);
        }
        self.emails.push(Email {
            label,
            id,
            from: from.to_owned(),
            customer,
            late,
        });
        Ok(self.emails.len() - 1)
    }

    /// Reads email `e`'s attachment back and compares it with what was sent.
    async fn attachment_reads_back(&self, e: usize) -> anyhow::Result<()> {
        let path = format!("/emails/{}/attachments/0", self.emails[e].id);
        let reply = self.request(Svc::Email, Method::GET, &path, None, 200).await?;
        let same = reply.body.as_str() == Some(ATTACHMENT.1);
        self.show(
            "GET",
            &path,
            &reply,
            &format!(
                "{}'s {}: {} bytes, {}",
                self.emails[e].label,
                ATTACHMENT.0,
                reply.body.as_str().map_or(0, str::len),
                if same {
                    "the bytes that were sent"
                } else {
                    "NOT the bytes that were sent"
                }
            ),
        );
        if !same {
            return Err(anyhow::anyhow!(
                "the attachment of {} differs from what was sent",
                self.emails[e].label
            ))
            .blame(Svc::Email);
        }
        Ok(())
    }

    /// The emails assigned to customer `c`, which must be `expected` (oldest first).
    async fn customer_emails(&self, c: usize, expected: &[usize]) -> anyhow::Result<()> {
        let path = format!("/customers/{}/emails", self.customers[c].id);
        let reply = self.request(Svc::Email, Method::GET, &path, None, 200).await?;
        let ids = listed(&reply.body);
        let names: Vec<String> = ids.iter().map(|id| self.events.named(id)).collect();
        self.show(
            "GET",
            &path,
            &reply,
            &format!("{}'s emails: {}", self.customers[c].label, names.join(", ")),
        );
        let wanted: Vec<&str> = expected.iter().map(|e| self.emails[*e].id.as_str()).collect();
        if ids != wanted {
            let wanted: Vec<&str> = expected.iter().map(|e| self.emails[*e].label.as_str()).collect();
            return Err(anyhow::anyhow!(
                "{}'s emails are [{}], not [{}]",
                self.customers[c].label,
                names.join(", "),
                wanted.join(", ")
            ))
            .blame(Svc::Email);
        }
        Ok(())
    }

    /// `E2 from <...>: assigned to Hedy 1.2 s after it arrived`.
    fn email_summary(&self, e: usize, view: &Value) -> String {
        let email = &self.emails[e];
        let assigned = match view["customer_id"].as_str() {
            Some(customer) => format!("assigned to {}", self.events.named(customer)),
            None => String::from("unassigned"),
        };
        let after = assignment_delay(view)
            .map(|delay| format!(" {} after it arrived", out::secs(delay)))
            .unwrap_or_default();
        format!("{} from <{}>: {assigned}{after}", email.label, email.from)
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
            "sales_rep": self.sales_rep,
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
        self.answer(svc, &method, &url, request).await
    }

    /// Sends a built request; the answer, its body as JSON where it is (else as text).
    async fn answer(
        &self,
        svc: Svc,
        method: &Method,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<Reply> {
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

/// `/customers/{id}`.
/// `12 quotes, 31,000.00 (Ordered 3, Pending Stock 2, ...) · lag 0.4 s`, from a pipeline
/// report.
fn report_summary(report: &Value) -> String {
    let lag = report["freshness"]["lag_seconds"]
        .as_f64()
        .map(|lag| format!(" · lag {lag:.1} s"))
        .unwrap_or_default();
    if let Some(rows) = report["rows"].as_array() {
        let groups: Vec<String> = rows
            .iter()
            .map(|row| format!("{} {}", row["status"].as_str().unwrap_or("?"), row["quotes"]))
            .collect();
        format!(
            "all runs: {} quotes, {} ({}){lag}",
            report["quotes"],
            out::money(report["value_cents"].as_i64().unwrap_or(0)),
            groups.join(", ")
        )
    } else {
        format!(
            "all runs: {} quotes created, {} ordered, conversion {}{lag}",
            report["created"],
            report["ordered"],
            report["ratio"]
                .as_f64()
                .map_or_else(|| String::from("-"), |r| format!("{:.0} %", r * 100.0))
        )
    }
}

/// The `id`s of the objects in `list`.
fn ids_of(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|item| item["id"].as_str())
        .collect()
}

fn path_of_customer(id: &str) -> String {
    format!("/customers/{id}")
}

/// The attachment of every email the demo sends: its file name and content.
const ATTACHMENT: (&str, &str) = ("rfq.csv", "machine,quantity,spindle\r\nCNC-5,3,12k\r\n");

/// A small raw RFC 5322 message from `from` to sales: a text part and one attachment.
fn raw_email(from: &str, message_id: &str, subject: &str) -> String {
    let boundary = format!("part-{message_id}");
    let date = chrono::Utc::now().to_rfc2822();
    let (name, content) = ATTACHMENT;
    format!(
        "From: <{from}>\r\n\
         To: Sales <sales@example.com>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{message_id}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Hello, please quote the machines in the attached list.\r\n\
         --{boundary}\r\n\
         Content-Type: text/csv; name=\"{name}\"\r\n\
         Content-Disposition: attachment; filename=\"{name}\"\r\n\
         \r\n\
         {content}\r\n\
         --{boundary}--\r\n"
    )
}

/// The `Message-ID` (without angle brackets) the email service gives the notification
/// that answers the request with id `request`.
fn notification_message_id(request: &str) -> String {
    format!("notification-{request}@{NOTIFICATION_DOMAIN}")
}

/// The ids of the emails in a page of `GET /customers/{id}/emails`.
fn listed(page: &Value) -> Vec<String> {
    page["emails"]
        .as_array()
        .map(|emails| {
            emails
                .iter()
                .filter_map(|e| e["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// How long after its arrival an email was assigned.
fn assignment_delay(view: &Value) -> Option<Duration> {
    let at = |field: &str| {
        view[field]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    (at("assigned_at")? - at("received_at")?).to_std().ok()
}

/// A notification's delivery as the email service records it.
fn delivery(email: &Value) -> String {
    let d = &email["delivery"];
    format!(
        "outbound to {}, delivery {} after {} attempt(s)",
        d["recipient"].as_str().unwrap_or("?"),
        d["status"].as_str().unwrap_or("?"),
        d["attempts"]
    )
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
