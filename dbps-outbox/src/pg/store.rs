use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbps_core::{Envelope, MessageKind, TraceContext};
use serde_json::value::RawValue;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::{Connection, PgConnection, Row};

use dbps_core::pg::{bounded, within};

use super::{CHANNEL, LEASE_PARTITIONS};
use crate::error::{OutboxError, Result, store};
use crate::store::{Backlog, OutboxStore, Pending, PoisonPolicy, Retention};

/// Advisory-lock class of relay membership (`'dbps'` in ASCII).
const MEMBER_CLASS: i32 = 0x6462_7073;
/// Advisory-lock class of lease partitions.
const PARTITION_CLASS: i32 = MEMBER_CLASS + 1;

/// The relay's side of the PostgreSQL outbox.
///
/// Relay instances (one per service replica) share the outbox through session-level
/// advisory locks on 32 hash partitions of the aggregate id: each takes a fair share,
/// gives up its excess when another relay joins, and loses its locks with its connection
/// if it dies, so the others take over. A partition changes hands only between batches,
/// so per-aggregate order holds across relays.
#[derive(Debug, Clone)]
pub struct PgOutboxStore {
    pool: PgPool,
    retention: Retention,
    poison: PoisonPolicy,
    timeout: Duration,
    lease_idle_timeout: Duration,
}

/// How long one of the relay's statements may go unanswered by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server keeps an idle lease session by default.
const DEFAULT_LEASE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One relay instance's claim: its membership and partition locks (on a connection of
/// its own) and its LISTEN connection.
#[derive(Debug)]
pub struct PgLease {
    locks: PgConnection,
    listener: PgListener,
    member: i32,
    owned: Vec<i32>,
    /// Whether this relay told writers (through `dbps_outbox_wake`) that it sleeps.
    sleeping: bool,
    /// When a fetch last found messages: until `HOT_WINDOW` has passed, the relay polls
    /// instead of sleeping.
    last_found: Option<std::time::Instant>,
}

/// How long after the last message found the relay keeps polling.
const HOT_WINDOW: Duration = Duration::from_millis(500);
/// How often a busy relay polls.
const HOT_POLL: Duration = Duration::from_millis(2);

impl PgOutboxStore {
    /// A store over `pool`, deleting published rows and letting later events of a parked
    /// event's aggregate flow.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            retention: Retention::default(),
            poison: PoisonPolicy::default(),
            timeout: DEFAULT_TIMEOUT,
            lease_idle_timeout: DEFAULT_LEASE_IDLE_TIMEOUT,
        }
    }

    /// How long the relay waits for the database to answer one of its statements
    /// (default 30 s). A statement that gets no answer in time fails the round as
    /// transient, and its connection is closed: a half-open connection (a database that
    /// stopped answering without closing it) cannot stall the relay, and closing the
    /// lease connection gives its partitions up.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long the server keeps a relay's lease session while nothing arrives on it
    /// (default 60 s; PostgreSQL's `idle_session_timeout`, set on that session only).
    ///
    /// A relay that vanished without closing its connection (its host lost power, the
    /// network between them broke) would otherwise hold its partitions until the
    /// server's TCP keepalive notices, which Linux's defaults put at over two hours. With
    /// this bound the server ends the session and the other relays take its partitions
    /// over within it. A running relay uses its lease session at every rebalance, so the
    /// value must exceed the relay's rebalance interval (default 10 s) with room to
    /// spare; a relay whose session the server ended rejoins by itself.
    pub fn lease_idle_timeout(mut self, timeout: Duration) -> Self {
        self.lease_idle_timeout = timeout;
        self
    }

    /// Sets what happens to published rows.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Sets what happens to the events after a parked one.
    pub fn poison_policy(mut self, poison: PoisonPolicy) -> Self {
        self.poison = poison;
        self
    }

    /// The configured retention.
    pub fn retention_policy(&self) -> Retention {
        self.retention
    }

    /// Parked messages with their reasons, oldest first.
    pub async fn parked(&self) -> Result<Vec<(Pending, String)>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_PENDING} where parked_at is not null order by id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(store("list parked"))?;
        rows.iter()
            .map(|row| {
                Ok((
                    pending(row)?,
                    row.try_get::<Option<String>, _>("park_reason")
                        .ok()
                        .flatten()
                        .unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Puts a parked message back in line (after the cause was fixed): the relay publishes
    /// it again. It keeps its id, so it goes out before later messages of its aggregate
    /// that are still waiting.
    pub async fn replay(&self, id: i64) -> Result<()> {
        let result = sqlx::query(
            "update dbps_outbox set parked_at = null, park_reason = null where id = $1 and parked_at is not null",
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(store("replay"))?;
        if result.rows_affected() == 0 {
            return Err(OutboxError::NotParked { id });
        }
        sqlx::query("select pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await
            .map_err(store("notify"))?;
        tracing::info!(id, "parked outbox message replayed");
        Ok(())
    }

    /// Deletes a parked message for good (an operator decided it must not be published).
    pub async fn discard(&self, id: i64) -> Result<()> {
        let result = sqlx::query("delete from dbps_outbox where id = $1 and parked_at is not null")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(store("discard"))?;
        if result.rows_affected() == 0 {
            return Err(OutboxError::NotParked { id });
        }
        tracing::warn!(id, "parked outbox message discarded");
        Ok(())
    }

    /// Tells writers whether this relay's partitions need a notification.
    async fn mark_sleeping(&self, lease: &mut PgLease, sleeping: bool) -> Result<()> {
        within(
            self.timeout,
            sqlx::query("update dbps_outbox_wake set sleeping = $1 where lease_partition = any($2)")
                .bind(sleeping)
                .bind(&lease.owned)
                .execute(&mut lease.locks),
        )
        .await
        .map_err(store("mark relay sleeping"))?;
        lease.sleeping = sleeping;
        Ok(())
    }

    /// How many relays are members, and which partitions anyone holds, in one look at
    /// `pg_locks` (advisory locks are per database, so this sees this outbox only).
    async fn lock_table(&self, lease: &mut PgLease) -> Result<(i64, Vec<i32>)> {
        let query = sqlx::query_as(
            "select count(*) filter (where classid = $1::bigint::oid),
                    coalesce(array_agg(objid::bigint::int) filter (where classid = $2::bigint::oid), '{}')
             from pg_locks
             where locktype = 'advisory' and granted and objsubid = 2
               and database = (select oid from pg_database where datname = current_database())",
        )
        .bind(MEMBER_CLASS)
        .bind(PARTITION_CLASS)
        .fetch_one(&mut lease.locks);
        within(self.timeout, query).await.map_err(store("read relay locks"))
    }

    /// Runs one statement's work on a pool connection within the timeout.
    async fn on_pool<T>(
        &self,
        operation: &'static str,
        work: impl AsyncFnOnce(&mut PgConnection) -> std::result::Result<T, sqlx::Error>,
    ) -> Result<T> {
        bounded(&self.pool, self.timeout, work).await.map_err(store(operation))
    }
}

const SELECT_PENDING: &str = "select id, topic, message_id, kind, message_type, schema_version, source, aggregate_type,
    aggregate_id, sequence, occurred_at, correlation_id, causation_id, reply_to, traceparent, tracestate,
    headers, payload::text as payload, park_reason, lease_partition from dbps_outbox";

/// Fisher–Yates, so that relays starting together try partitions in different orders.
fn shuffle(items: &mut [i32]) {
    for i in (1..items.len()).rev() {
        let j = rand::random_range(0..=i);
        items.swap(i, j);
    }
}

fn pending(row: &PgRow) -> Result<Pending> {
    let id: i64 = row.try_get("id").map_err(store("read row"))?;
    let corrupt = |reason: String| OutboxError::Corrupt { id, reason };
    let get = |e: sqlx::Error| corrupt(e.to_string());
    let kind: String = row.try_get("kind").map_err(get)?;
    let headers: Option<serde_json::Value> = row.try_get("headers").map_err(get)?;
    let headers: BTreeMap<String, String> = match headers {
        Some(value) => serde_json::from_value(value).map_err(|e| corrupt(format!("headers: {e}")))?,
        None => BTreeMap::new(),
    };
    let payload: String = row.try_get("payload").map_err(get)?;
    let schema_version: i32 = row.try_get("schema_version").map_err(get)?;
    let mut envelope = Envelope::raw(
        MessageKind::parse(&kind).map_err(|e| corrupt(e.to_string()))?,
        row.try_get::<String, _>("message_type").map_err(get)?,
        RawValue::from_string(payload).map_err(|e| corrupt(format!("payload: {e}")))?,
    );
    envelope.id = row.try_get("message_id").map_err(get)?;
    envelope.schema_version = u32::try_from(schema_version).map_err(|e| corrupt(e.to_string()))?;
    envelope.source = row.try_get("source").map_err(get)?;
    envelope.aggregate_type = row.try_get("aggregate_type").map_err(get)?;
    envelope.aggregate_id = row.try_get("aggregate_id").map_err(get)?;
    envelope.sequence = row.try_get("sequence").map_err(get)?;
    envelope.occurred_at = row.try_get::<DateTime<Utc>, _>("occurred_at").map_err(get)?;
    envelope.correlation_id = row.try_get("correlation_id").map_err(get)?;
    envelope.causation_id = row.try_get("causation_id").map_err(get)?;
    envelope.reply_to = row.try_get("reply_to").map_err(get)?;
    envelope.trace = TraceContext {
        traceparent: row.try_get("traceparent").map_err(get)?,
        tracestate: row.try_get("tracestate").map_err(get)?,
    };
    envelope.headers = headers;
    Ok(Pending {
        id,
        topic: row.try_get("topic").map_err(get)?,
        partition: row.try_get("lease_partition").map_err(get)?,
        envelope,
    })
}

impl OutboxStore for PgOutboxStore {
    type Lease = PgLease;
    type Id = i64;

    async fn join(&self) -> Result<PgLease> {
        let limit = self.timeout;
        let mut locks = within(limit, async { Ok(self.pool.acquire().await?.detach()) })
            .await
            .map_err(store("connect relay"))?;
        // The server ends this session (releasing its locks) if the relay goes quiet.
        // And the fetch reads the pending index in id order whatever the statistics say:
        // an outbox analyzed while it was nearly empty, which then holds a backlog (after
        // a broker outage, say), is estimated at a handful of rows, and the planner would
        // sort the whole backlog on every fetch (seen: 300 ms per 2,000-row fetch over a
        // backlog of 106,000, against 13 ms through the index).
        let idle_ms = self.lease_idle_timeout.as_millis().to_string();
        within(
            limit,
            sqlx::query(
                "select set_config('idle_session_timeout', $1, false), set_config('enable_sort', 'off', false)",
            )
            .bind(&idle_ms)
            .execute(&mut locks),
        )
        .await
        .map_err(store("join relays"))?;
        let member = loop {
            let candidate = rand::random::<i32>() & i32::MAX;
            let taken: bool = within(
                limit,
                sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
                    .bind(MEMBER_CLASS)
                    .bind(candidate)
                    .fetch_one(&mut locks),
            )
            .await
            .map_err(store("join relays"))?;
            if taken {
                break candidate;
            }
        };
        let listener = within(limit, async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(CHANNEL).await?;
            Ok(listener)
        })
        .await
        .map_err(store("listen"))?;
        Ok(PgLease {
            locks,
            listener,
            member,
            owned: Vec::new(),
            sleeping: true,
            last_found: None,
        })
    }

    async fn rebalance(&self, lease: &mut PgLease) -> Result<()> {
        let (members, held) = self.lock_table(lease).await?;
        let members = members.max(1);
        let target = usize::try_from((i64::from(LEASE_PARTITIONS) + members - 1) / members).unwrap_or(1);
        if lease.owned.len() > target {
            let released = lease.owned.split_off(target);
            within(
                self.timeout,
                sqlx::query("select pg_advisory_unlock($1, p) from unnest($2::int[]) p")
                    .bind(PARTITION_CLASS)
                    .bind(&released)
                    .execute(&mut lease.locks),
            )
            .await
            .map_err(store("release partitions"))?;
            // Their next owner may be asleep: writers must notify for them again.
            within(
                self.timeout,
                sqlx::query("update dbps_outbox_wake set sleeping = true where lease_partition = any($1)")
                    .bind(&released)
                    .execute(&mut lease.locks),
            )
            .await
            .map_err(store("release partitions"))?;
            tracing::info!(
                member = lease.member,
                released = released.len(),
                owned = lease.owned.len(),
                "relay released partitions"
            );
        } else if lease.owned.len() < target {
            // Try the partitions nobody holds, in random order, one lock per statement:
            // a set-returning statement with a LIMIT may evaluate the lock function on
            // more rows than it returns, and so take locks it never reports.
            let mut free: Vec<i32> = (0..LEASE_PARTITIONS).filter(|p| !held.contains(p)).collect();
            shuffle(&mut free);
            let mut taken = 0;
            for partition in free {
                if lease.owned.len() >= target {
                    break;
                }
                let locked: bool = within(
                    self.timeout,
                    sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
                        .bind(PARTITION_CLASS)
                        .bind(partition)
                        .fetch_one(&mut lease.locks),
                )
                .await
                .map_err(store("take partition"))?;
                if locked {
                    lease.owned.push(partition);
                    taken += 1;
                }
            }
            if taken > 0 {
                lease.owned.sort_unstable();
                // New partitions take this relay's state (a crashed previous owner may have
                // left them marked awake).
                self.mark_sleeping(lease, lease.sleeping).await?;
                tracing::info!(
                    member = lease.member,
                    taken,
                    owned = lease.owned.len(),
                    "relay took partitions"
                );
            }
        }
        Ok(())
    }

    fn owns_any(&self, lease: &PgLease) -> bool {
        !lease.owned.is_empty()
    }

    fn partitions(&self, lease: &PgLease) -> Vec<i32> {
        lease.owned.clone()
    }

    async fn fetch(&self, lease: &mut PgLease, limit: usize) -> Result<Vec<Pending>> {
        self.fetch_excluding(lease, limit, &[]).await
    }

    /// The messages in flight are left out through a hashed `not in`, so the cost does
    /// not grow with their number times the rows scanned.
    async fn fetch_excluding(&self, lease: &mut PgLease, limit: usize, in_flight: &[i64]) -> Result<Vec<Pending>> {
        let hold = match self.poison {
            PoisonPolicy::Continue => "",
            PoisonPolicy::HoldAggregate => {
                " and not exists (select 1 from dbps_outbox p where p.parked_at is not null
                   and p.aggregate_id = o.aggregate_id and p.id < o.id)"
            }
        };
        let all = lease.owned.len() == usize::try_from(LEASE_PARTITIONS).unwrap_or(0);
        let partitions = if all { "" } else { " and lease_partition = any($2)" };
        let excluding = if in_flight.is_empty() {
            ""
        } else {
            " and id not in (select unnest($3::bigint[]))"
        };
        let sql = format!(
            "{SELECT_PENDING} o where published_at is null and parked_at is null{partitions}{excluding}{hold} order by id limit $1"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Fetched on the lease connection: a relay that lost it has lost its partitions
        // too, and must not publish.
        let rows = within(
            self.timeout,
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(limit)
                .bind(&lease.owned)
                .bind(in_flight)
                .fetch_all(&mut lease.locks),
        )
        .await
        .map_err(store("fetch"))?;
        if !rows.is_empty() {
            lease.last_found = Some(std::time::Instant::now());
        }
        let mut batch = Vec::with_capacity(rows.len());
        for row in &rows {
            match pending(row) {
                Ok(message) => batch.push(message),
                // A row that cannot become an envelope would fail every round: park it
                // for an operator instead, and keep the rest flowing.
                Err(OutboxError::Corrupt { id, reason }) => {
                    tracing::error!(id, %reason, "corrupt outbox row parked");
                    self.park(&id, &format!("corrupt row: {reason}")).await?;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(batch)
    }

    fn overlaps_rounds(&self) -> bool {
        true
    }

    async fn mark_published(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = match self.retention {
            Retention::Delete => "delete from dbps_outbox where id = any($1)",
            Retention::Keep(_) => "update dbps_outbox set published_at = now() where id = any($1)",
        };
        self.on_pool("mark published", async |conn: &mut PgConnection| {
            sqlx::query(sql).bind(ids).execute(conn).await
        })
        .await?;
        Ok(())
    }

    async fn park(&self, id: &i64, reason: &str) -> Result<()> {
        self.on_pool("park", async |conn: &mut PgConnection| {
            sqlx::query("update dbps_outbox set parked_at = now(), park_reason = $2 where id = $1")
                .bind(id)
                .bind(reason)
                .execute(conn)
                .await
        })
        .await?;
        Ok(())
    }

    /// A relay that found messages within the last half second polls every 2 ms and asks
    /// writers not to notify it; an idle one marks its partitions as sleeping, looks once
    /// more (for commits that raced the mark), then waits for a notification.
    async fn wait_for_commit(&self, lease: &mut PgLease, timeout: Duration) -> Result<bool> {
        let hot = lease.last_found.is_some_and(|t| t.elapsed() < HOT_WINDOW);
        if hot {
            if lease.sleeping {
                self.mark_sleeping(lease, false).await?;
            }
            while lease.listener.next_buffered().is_some() {}
            tokio::time::sleep(HOT_POLL).await;
            return Ok(true);
        }
        if !lease.sleeping {
            self.mark_sleeping(lease, true).await?;
            // A commit that read "awake" before the mark did not notify: look again.
            return Ok(true);
        }
        match tokio::time::timeout(timeout, lease.listener.recv()).await {
            Ok(Ok(_)) => {
                // Several commits may have been announced meanwhile; one fetch sees them all.
                while lease.listener.next_buffered().is_some() {}
                lease.last_found = Some(std::time::Instant::now());
                Ok(true)
            }
            Ok(Err(source)) => Err(OutboxError::Store {
                operation: "listen",
                source,
            }),
            Err(_) => Ok(false),
        }
    }

    fn retention_policy(&self) -> Retention {
        self.retention
    }

    async fn purge_published(&self, older_than: Duration) -> Result<u64> {
        let interval =
            sqlx::postgres::types::PgInterval::try_from(older_than).map_err(|e| OutboxError::InvalidConfig {
                setting: "retention",
                reason: e.to_string(),
            })?;
        let result = self
            .on_pool("purge", async |conn: &mut PgConnection| {
                sqlx::query("delete from dbps_outbox where published_at < now() - $1")
                    .bind(interval)
                    .execute(conn)
                    .await
            })
            .await?;
        Ok(result.rows_affected())
    }

    async fn backlog(&self) -> Result<Backlog> {
        let (pending, oldest, parked): (i64, Option<f64>, i64) = self
            .on_pool("backlog", async |conn: &mut PgConnection| {
                sqlx::query_as(
                    "select count(*) filter (where parked_at is null),
                            extract(epoch from now() - min(created_at) filter (where parked_at is null))::float8,
                            count(*) filter (where parked_at is not null)
                     from dbps_outbox where published_at is null",
                )
                .fetch_one(conn)
                .await
            })
            .await?;
        Ok(Backlog {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_age: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
            parked: u64::try_from(parked).unwrap_or(0),
        })
    }

    async fn leave(&self, lease: PgLease) -> Result<()> {
        // Closing the connection releases every advisory lock it holds.
        within(self.timeout, lease.locks.close())
            .await
            .map_err(store("leave"))?;
        Ok(())
    }
}
