//! PostgreSQL replicas against the real stack: the sequence guard, tombstones, gaps,
//! batches through the consumer runner, backfill over HTTP and the reconciler.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::TestResult;
use common::owner::{Customer, CustomerCache, CustomerEmails, Owner};
use dbps_cache::replica::http::{HttpSource, snapshot_router};
use dbps_cache::replica::{PgReplica, PgSnapshotSource, Reconciler};
use rand::seq::SliceRandom as _;
use sqlx::PgPool;

async fn setup() -> Result<(dbps_testkit::TestPostgres, Owner), Box<dyn std::error::Error + Send + Sync>> {
    let db = dbps_testkit::postgres().await?;
    dbps_migrate::PgMigrations::new(dbps_migrate::ServiceName::new("quote")?)
        .schema(dbps_migrate::Identifier::new("public")?)
        .component("dbps_inbox", &dbps_core::inbox::pg::MIGRATOR)
        .component("dbps_replica", &dbps_cache::replica::MIGRATOR)
        .run(&sqlx::postgres::PgConnectOptions::from_str(db.url())?)
        .await?;
    sqlx::raw_sql(
        "create table customer_cache (id uuid primary key, name text not null, tax_number text, source_sequence bigint not null);
         create table customer_email_index (email text primary key, customer_id uuid not null, source_sequence bigint not null);
         create index on customer_email_index (customer_id);",
    )
    .execute(db.pool())
    .await?;
    let owner = Owner::create(db.pool().clone()).await?;
    Ok((db, owner))
}

fn cache(pool: &PgPool) -> PgReplica<CustomerCache> {
    PgReplica::builder(pool.clone(), "customer_cache", CustomerCache)
        .aggregate_column("id")
        .build()
        .expect("valid replica")
}

async fn cached(pool: &PgPool) -> Result<BTreeMap<String, (String, i64)>, sqlx::Error> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("select id::text, name, source_sequence from customer_cache order by id")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(id, name, seq)| (id, (name, seq))).collect())
}

#[tokio::test]
async fn duplicates_and_stale_events_change_nothing() -> TestResult {
    let (db, owner) = setup().await?;
    let replica = cache(db.pool());
    let v1 = owner.upsert(Customer::new("Ada")).await?;
    let id = v1.aggregate_id.clone();
    let v2 = owner.rename(&id, "Ada L.").await?;
    assert_eq!(replica.apply(&[v1.clone(), v2.clone()]).await?, 1);
    // The same messages again: the inbox skips them.
    assert_eq!(replica.apply(&[v2.clone(), v1.clone()]).await?, 0);
    // The old version under a new message id (a re-publication): the guard skips it.
    let mut again = v1.clone();
    again.id = uuid::Uuid::now_v7().to_string();
    assert_eq!(replica.apply(&[again]).await?, 0);
    assert_eq!(cached(db.pool()).await?[&id], (String::from("Ada L."), 2));
    assert_eq!(replica.version(&id).await?, Some((2, false)));
    Ok(())
}

#[tokio::test]
async fn a_deleted_aggregate_stays_deleted_when_a_late_update_arrives() -> TestResult {
    let (db, owner) = setup().await?;
    let replica = cache(db.pool());
    let created = owner.upsert(Customer::new("Grace")).await?;
    let id = created.aggregate_id.clone();
    let renamed = owner.rename(&id, "Grace H.").await?;
    let deleted = owner.delete(&id).await?;
    replica.apply(&[created]).await?;
    replica.apply(&[deleted]).await?;
    assert!(cached(db.pool()).await?.is_empty());
    // The rename was delayed and arrives after the delete.
    assert_eq!(replica.apply(&[renamed]).await?, 0);
    assert!(
        cached(db.pool()).await?.is_empty(),
        "a late update must not resurrect a deleted record"
    );
    assert_eq!(replica.version(&id).await?, Some((3, true)));
    // Tombstones younger than the horizon stay.
    assert_eq!(replica.purge_tombstones(Duration::from_secs(3600)).await?, 0);
    sqlx::query("update dbps_replica_versions set updated_at = now() - interval '2 hours'")
        .execute(db.pool())
        .await?;
    assert_eq!(replica.purge_tombstones(Duration::from_secs(3600)).await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_one_to_many_map_replaces_an_aggregates_entries() -> TestResult {
    let (db, owner) = setup().await?;
    let replica = PgReplica::builder(
        db.pool().clone(),
        "customer_email_index",
        CustomerEmails { id_field: "email" },
    )
    .aggregate_column("customer_id")
    .conflict_key(["email"])
    .build()?;
    let mut customer = Customer::new("Linus");
    customer.emails = vec!["l@example.com".into(), "linus@example.com".into()];
    let v1 = owner.upsert(customer.clone()).await?;
    let id = v1.aggregate_id.clone();
    customer.id = id.clone();
    customer.emails = vec!["linus@example.org".into()];
    let v2 = owner.upsert(customer).await?;
    replica.apply(&[v1]).await?;
    let entries = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>("select email from customer_email_index order by email")
            .fetch_all(&pool)
            .await
    };
    assert_eq!(
        entries(db.pool().clone()).await?,
        ["l@example.com", "linus@example.com"]
    );
    replica.apply(&[v2]).await?;
    assert_eq!(
        entries(db.pool().clone()).await?,
        ["linus@example.org"],
        "a changed address removes the old entry"
    );
    Ok(())
}

#[tokio::test]
async fn a_gap_is_counted_and_the_record_refetched_from_its_owner() -> TestResult {
    let (db, owner) = setup().await?;
    let source = PgSnapshotSource::new(db.pool().clone(), "customers", "id", "version")?;
    let replica = PgReplica::builder(db.pool().clone(), "customer_cache", CustomerCache)
        .aggregate_column("id")
        .refetch_from(source)
        .build()?;
    let v1 = owner.upsert(Customer::new("Barbara")).await?;
    let id = v1.aggregate_id.clone();
    let _lost = owner.rename(&id, "Barbara L.").await?;
    // The tax number changes: an event this replica projects as unchanged rows is not
    // what matters here; the point is that sequence 2 never arrives.
    let v3 = owner.set_tax_number(&id, "DE-1").await?;
    replica.apply(&[v1]).await?;
    replica.apply(&[v3]).await?;
    // The refetch read the owner's current state, which includes the lost rename.
    assert_eq!(cached(db.pool()).await?[&id], (String::from("Barbara L."), 3));
    Ok(())
}

#[tokio::test]
async fn shuffled_delivery_through_the_runner_never_goes_back_and_ends_at_the_latest() -> TestResult {
    let (db, owner) = setup().await?;
    let replica = cache(db.pool());
    let mut events = Vec::new();
    let mut ids = Vec::new();
    for n in 0..20 {
        let created = owner.upsert(Customer::new(&format!("c{n}"))).await?;
        ids.push(created.aggregate_id.clone());
        events.push(created);
    }
    for round in 0..30 {
        for id in &ids {
            events.push(owner.rename(id, &format!("{id}-{round}")).await?);
        }
    }
    events.shuffle(&mut rand::rng());
    // A watcher reads the table while the stream applies and checks that no record's
    // sequence ever goes down.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (pool, stop) = (db.pool().clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut seen: BTreeMap<String, i64> = BTreeMap::new();
            let mut regressions = 0;
            while !stop.load(Ordering::SeqCst) {
                for (id, (_, seq)) in cached(&pool).await? {
                    let last = seen.entry(id).or_default();
                    if seq < *last {
                        regressions += 1;
                    }
                    *last = seq;
                }
            }
            Ok::<_, sqlx::Error>(regressions)
        })
    };
    common::consume_batched(replica, &events).await?;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(watcher.await??, 0, "a watcher saw a record go back in time");
    let expected = owner.names().await?;
    let got: BTreeMap<String, (String, i64)> = cached(db.pool()).await?;
    assert_eq!(got, expected);
    Ok(())
}

#[tokio::test]
async fn backfill_over_http_meets_the_live_stream_without_gaps_or_regressions() -> TestResult {
    let (db, owner) = setup().await?;
    let mut history = Vec::new();
    for n in 0..300 {
        history.push(owner.upsert(Customer::new(&format!("b{n}"))).await?);
    }
    let source = PgSnapshotSource::new(db.pool().clone(), "customers", "id", "version")?
        .state("jsonb_build_object('id', t.id, 'name', t.name, 'tax_number', t.tax_number, 'emails', t.emails)");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/snapshot/customers", listener.local_addr()?);
    let app = axum::Router::new().nest("/snapshot/customers", snapshot_router(source));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = HttpSource::new(reqwest::Client::new(), &base);

    let replica = cache(db.pool());
    // Live updates race the backfill: the owner renames while pages are read, and the
    // stream (all events, oldest first) is applied at the same time.
    let live = {
        let (owner, ids) = (
            owner.clone(),
            history.iter().map(|e| e.aggregate_id.clone()).collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            let mut events = Vec::new();
            for (n, id) in ids.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
                events.push(owner.rename(id, &format!("live-{n}")).await?);
            }
            Ok::<_, sqlx::Error>(events)
        })
    };
    let streamer = {
        let replica = replica.clone();
        tokio::spawn(async move {
            for chunk in history.chunks(40) {
                replica.apply(chunk).await?;
            }
            Ok::<_, dbps_core::HandlerError>(())
        })
    };
    let (read, _) = replica.backfill(&http, 64).await?;
    streamer.await??;
    let live_events = live.await??;
    replica.apply(&live_events).await?;
    assert!(read >= 300, "read {read}");
    assert_eq!(cached(db.pool()).await?, owner.names().await?);

    // The reconciler over HTTP agrees, in few buckets' worth of work.
    let report = Reconciler::new(http, replica).run().await?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.source_records, 300);
    assert_eq!(report.differing_buckets, 0);
    server.abort();
    Ok(())
}

#[tokio::test]
async fn the_reconciler_reports_damage_done_by_hand_and_repairs_it() -> TestResult {
    let (db, owner) = setup().await?;
    let replica = cache(db.pool());
    let mut events = Vec::new();
    for n in 0..200 {
        events.push(owner.upsert(Customer::new(&format!("r{n}"))).await?);
    }
    replica.apply(&events).await?;
    let ids: Vec<String> = events.iter().map(|e| e.aggregate_id.clone()).collect();
    // Damage: one row deleted, one set back to an older sequence, one row nobody owns,
    // and one record renamed at the owner while its event was lost.
    sqlx::query("delete from customer_cache where id = $1::uuid")
        .bind(&ids[0])
        .execute(db.pool())
        .await?;
    sqlx::query("update customer_cache set source_sequence = 0, name = 'old' where id = $1::uuid")
        .bind(&ids[1])
        .execute(db.pool())
        .await?;
    let stranger = uuid::Uuid::now_v7().to_string();
    sqlx::query("insert into customer_cache values ($1::uuid, 'stranger', null, 7)")
        .bind(&stranger)
        .execute(db.pool())
        .await?;
    let _lost = owner.rename(&ids[2], "renamed").await?;

    let source = PgSnapshotSource::new(db.pool().clone(), "customers", "id", "version")?;
    let report = Reconciler::new(source.clone(), replica.clone()).run().await?;
    assert_eq!(report.missing, [ids[0].clone()]);
    let mut stale = vec![ids[1].clone(), ids[2].clone()];
    stale.sort();
    assert_eq!(report.stale, stale);
    assert_eq!(report.extra, [stranger]);
    assert_eq!(report.repaired, 0, "reporting only");

    let repaired = Reconciler::new(source.clone(), replica.clone())
        .repair(true)
        .run()
        .await?;
    assert_eq!((repaired.repaired, repaired.removed), (3, 1));
    let after = Reconciler::new(source, replica).run().await?;
    assert!(after.is_clean(), "{after:?}");
    assert_eq!(cached(db.pool()).await?, owner.names().await?);
    Ok(())
}

#[tokio::test]
async fn a_consumer_crash_in_the_middle_of_a_batch_loses_and_doubles_nothing() -> TestResult {
    let (db, owner) = setup().await?;
    let mut events = Vec::new();
    let mut ids = Vec::new();
    for n in 0..50 {
        let created = owner.upsert(Customer::new(&format!("k{n}"))).await?;
        ids.push(created.aggregate_id.clone());
        events.push(created);
    }
    for round in 0..40 {
        for id in &ids {
            events.push(owner.rename(id, &format!("{id}/{round}")).await?);
        }
    }
    let stream = common::Stream::start(&events).await?;
    // The first runner is dropped (a crash: no final commit) while it applies.
    let first = stream.spawn(cache(db.pool()));
    dbps_testkit::eventually("the first runner applied some", || async {
        let applied: i64 = sqlx::query_scalar("select count(*) from dbps_inbox")
            .fetch_one(db.pool())
            .await?;
        Ok::<_, sqlx::Error>(applied > 200)
    })
    .await?;
    first.abort();
    let _ = first.await;
    let second = stream.spawn(cache(db.pool()));
    stream.caught_up().await?;
    stream.stop();
    second.await??;
    assert_eq!(cached(db.pool()).await?, owner.names().await?);
    Ok(())
}

#[tokio::test]
async fn invalid_settings_are_typed_errors() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/none")
        .expect("lazy pool");
    let bad = |b: dbps_cache::replica::PgReplicaBuilder<CustomerCache>| b.build().map(|_| ()).unwrap_err().to_string();
    assert!(bad(PgReplica::builder(pool.clone(), "t; drop table x", CustomerCache)).contains("identifier"));
    assert!(bad(PgReplica::builder(pool.clone(), "t", CustomerCache).aggregate_column("a\"b")).contains("identifier"));
    assert!(bad(PgReplica::builder(pool.clone(), "t", CustomerCache).max_batch(0)).contains("max_batch"));
    assert!(bad(PgReplica::builder(pool, "", CustomerCache)).contains("empty"));
}
