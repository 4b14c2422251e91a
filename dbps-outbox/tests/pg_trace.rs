//! A message enqueued inside a traced span carries that span's trace context.

use dbps_core::Message;
use dbps_outbox::pg::{MIGRATOR, PgOutbox};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Serialize, Deserialize)]
struct QuoteCreated {
    id: String,
}

impl Message for QuoteCreated {
    const TYPE: &'static str = "quote.QuoteCreated";
}

#[tokio::test]
async fn enqueue_captures_the_current_spans_trace_context() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("dbps-test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let db = dbps_testkit::postgres().await?;
    MIGRATOR.run(db.pool()).await?;
    let outbox = PgOutbox::new("quote");

    let span = tracing::info_span!("POST /quotes");
    let (trace_id, span_id) = {
        let context = span.context();
        let span_ref = context.span();
        let sc = span_ref.span_context();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    };
    async {
        let mut tx = db.pool().begin().await?;
        outbox
            .enqueue_event(&mut tx, "quote", "q-1", &QuoteCreated { id: "q-1".into() })
            .await?;
        tx.commit().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .instrument(span)
    .await?;
    // Outside the span, a message starts a trace of its own.
    let mut tx = db.pool().begin().await?;
    outbox
        .enqueue_event(&mut tx, "quote", "q-2", &QuoteCreated { id: "q-2".into() })
        .await?;
    tx.commit().await?;

    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("select aggregate_id, traceparent from dbps_outbox order by id")
            .fetch_all(db.pool())
            .await?;
    assert_eq!(
        rows[0].1.as_deref(),
        Some(format!("00-{trace_id}-{span_id}-01").as_str())
    );
    let other = rows[1].1.as_deref().ok_or("no traceparent")?;
    assert!(other.starts_with("00-") && !other.contains(&trace_id), "{other}");
    Ok(())
}
