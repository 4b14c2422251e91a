//! With the `opentelemetry` feature, trace context flows from the writer's span through
//! Kafka into the consumer's span.

mod common;

use std::sync::{Arc, Mutex};

use common::{StockChanged, TestResult, eventually, start, topics};
use dbps_core::kafka::{Handler, HandlerError, KafkaConfig, KafkaPublisher};
use dbps_core::{Envelope, TraceContext};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// Installs an OpenTelemetry layer for the whole test binary (handlers run on other
/// threads than the test).
fn install_tracing() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("dbps-test"));
    let subscriber = tracing_subscriber::registry().with(layer);
    let _ = tracing::subscriber::set_global_default(subscriber);
}

fn current_trace_id() -> String {
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id()
        .to_string()
}

#[derive(Default)]
struct TraceOfHandler(Mutex<Vec<(String, String)>>);

impl Handler for TraceOfHandler {
    async fn handle(&self, message: &Envelope) -> Result<(), HandlerError> {
        let seen = current_trace_id();
        self.0
            .lock()
            .map_err(|_| HandlerError::permanent("poisoned"))?
            .push((message.id.clone(), seen));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_span_continues_the_writers_trace() -> TestResult {
    install_tracing();
    let t = topics("traced", 1).await?;

    // Built inside the writer's span, the envelope carries that span's trace.
    let writer = tracing::info_span!("create_quote");
    let (envelope, writer_trace) = async {
        let envelope = Envelope::event(
            "quote",
            "quote",
            "q-1",
            &StockChanged {
                sku: "a".into(),
                on_hand: 1,
            },
        )?;
        Ok::<_, dbps_core::Error>((envelope, current_trace_id()))
    }
    .instrument(writer)
    .await?;
    assert_ne!(writer_trace, "00000000000000000000000000000000");
    assert_eq!(envelope.trace.trace_id(), Some(writer_trace.as_str()));
    assert_eq!(TraceContext::current(), None, "outside any span there is no trace");

    KafkaPublisher::builder(KafkaConfig::new(t.kafka.brokers()))
        .build()?
        .publish(&t.topic, &envelope)
        .await?;
    let handler = Arc::new(TraceOfHandler::default());
    let runner = t.consumer(Arc::clone(&handler)).build()?;
    let (stop, task) = start(runner);
    eventually("message handled", || async {
        Ok(!handler.0.lock().map_err(|_| "poisoned")?.is_empty())
    })
    .await?;
    stop.cancel();
    task.await??;

    let seen = handler.0.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(
        seen,
        vec![(envelope.id.clone(), writer_trace)],
        "the handler ran in the writer's trace"
    );
    Ok(())
}
