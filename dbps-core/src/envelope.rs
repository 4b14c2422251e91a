//! The envelope every dbps message travels in.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::limits::PayloadLimits;
use crate::registry::Message;

/// What a message is for. Events, commands and replies share the [`Envelope`] and travel
/// through the same outbox, consumer runner and inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MessageKind {
    /// A fact about an aggregate, published on the aggregate's topic.
    #[default]
    Event,
    /// A request to one service, published on that service's command topic.
    Command,
    /// The answer to a command, correlated to it.
    Reply,
}

impl MessageKind {
    /// The kind's name on the wire (`event`, `command`, `reply`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Command => "command",
            Self::Reply => "reply",
        }
    }

    /// Parses a kind's wire name.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "event" => Ok(Self::Event),
            "command" => Ok(Self::Command),
            "reply" => Ok(Self::Reply),
            other => Err(Error::InvalidAttribute {
                attribute: "messagekind",
                reason: format!("{other:?} is not one of event, command, reply"),
            }),
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// W3C trace context (`traceparent`, `tracestate`) carried from the writer of a message
/// to the service that handles it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TraceContext {
    /// The `traceparent` header: `00-<trace id>-<parent span id>-<flags>`.
    pub traceparent: Option<String>,
    /// The vendor-specific `tracestate` header.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The 32-hex-digit trace id of a well-formed `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        let parent = self.traceparent.as_deref()?;
        let mut parts = parent.split('-');
        let (_version, trace_id) = (parts.next()?, parts.next()?);
        (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace_id)
    }

    /// The same trace continued by a new span: the trace id and flags are kept, the parent
    /// span id is replaced by a fresh one. A message written while handling another carries
    /// this, so one trace follows a flow across services.
    pub fn child(&self) -> Self {
        let Some(parent) = self.traceparent.as_deref() else {
            return self.clone();
        };
        let parts: Vec<&str> = parent.split('-').collect();
        if parts.len() != 4 || self.trace_id().is_none() {
            return self.clone();
        }
        let span_id = format!("{:016x}", rand::random::<u64>().max(1));
        Self {
            traceparent: Some(format!("{}-{}-{}-{}", parts[0], parts[1], span_id, parts[3])),
            tracestate: self.tracestate.clone(),
        }
    }

    /// The trace context of the current `tracing` span, when an OpenTelemetry layer
    /// records it (feature `opentelemetry`); `None` otherwise. Messages built inside a
    /// span carry it, so the consumer's span continues the writer's trace.
    pub fn current() -> Option<Self> {
        #[cfg(feature = "opentelemetry")]
        {
            use opentelemetry::trace::TraceContextExt as _;
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let context = tracing::Span::current().context();
            let span = context.span();
            let span_context = span.span_context();
            if !span_context.is_valid() {
                return None;
            }
            let state = span_context.trace_state().header();
            Some(Self {
                traceparent: Some(format!(
                    "00-{}-{}-{:02x}",
                    span_context.trace_id(),
                    span_context.span_id(),
                    span_context.trace_flags().to_u8()
                )),
                tracestate: (!state.is_empty()).then_some(state),
            })
        }
        #[cfg(not(feature = "opentelemetry"))]
        {
            None
        }
    }

    /// An OpenTelemetry context whose remote parent is this trace context, for making a
    /// span its child; `None` if the `traceparent` is missing or malformed.
    #[cfg(feature = "opentelemetry")]
    pub fn otel_context(&self) -> Option<opentelemetry::Context> {
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
        let parent = self.traceparent.as_deref()?;
        let parts: Vec<&str> = parent.split('-').collect();
        let [_version, trace_id, span_id, flags] = parts.as_slice() else {
            return None;
        };
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let state = self
            .tracestate
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let span_context = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
        span_context
            .is_valid()
            .then(|| opentelemetry::Context::new().with_remote_span_context(span_context))
    }

    /// A new trace with a random trace id, for a flow that starts here.
    pub fn new_root() -> Self {
        let trace_id = format!("{:032x}", rand::random::<u128>().max(1));
        let span_id = format!("{:016x}", rand::random::<u64>().max(1));
        Self {
            traceparent: Some(format!("00-{trace_id}-{span_id}-01")),
            tracestate: None,
        }
    }
}

/// One message: an event, a command or a reply, with everything a consumer needs to
/// route, de-duplicate, order and trace it.
///
/// The payload is JSON, kept as validated raw text so that it passes from the database
/// to Kafka without being parsed again.
///
/// Build one with [`Envelope::event`], [`Envelope::command`] or [`Envelope::reply_to`];
/// stores and bridges that hold an encoded payload start from [`Envelope::raw`] and set
/// the fields they kept. The fields are public to read and to set, and the struct is
/// `#[non_exhaustive]`, so that new attributes do not break callers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Envelope {
    /// Unique id of the message (a UUIDv7 for messages dbps creates; any non-empty string
    /// for messages from other CloudEvents producers). Inboxes de-duplicate on it.
    pub id: String,
    /// Event, command or reply.
    pub kind: MessageKind,
    /// The message type, e.g. `customer.CustomerCreated`.
    pub message_type: String,
    /// The payload's schema version, for upcasting older payloads.
    pub schema_version: u32,
    /// The service that wrote the message (CloudEvents `source`).
    pub source: String,
    /// The aggregate's type, e.g. `customer`.
    pub aggregate_type: Option<String>,
    /// The aggregate's id (CloudEvents `subject`, and the Kafka key, so all messages of one
    /// aggregate share a partition).
    pub aggregate_id: String,
    /// The aggregate's sequence number: strictly increasing in commit order for events of
    /// one aggregate, so consumers can detect gaps and stale versions.
    pub sequence: Option<i64>,
    /// When the fact happened or the request was made.
    pub occurred_at: DateTime<Utc>,
    /// Groups the messages of one flow (for example a saga's id).
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<String>,
    /// For commands: the topic the reply should go to.
    pub reply_to: Option<String>,
    /// W3C trace context.
    pub trace: TraceContext,
    /// Free headers, passed through as Kafka headers.
    pub headers: BTreeMap<String, String>,
    /// The JSON payload.
    pub payload: Box<RawValue>,
}

/// Envelopes are equal when all their fields are; payloads compare as text.
impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        let Self {
            id,
            kind,
            message_type,
            schema_version,
            source,
            aggregate_type,
            aggregate_id,
            sequence,
            occurred_at,
            correlation_id,
            causation_id,
            reply_to,
            trace,
            headers,
            payload,
        } = self;
        *id == other.id
            && *kind == other.kind
            && *message_type == other.message_type
            && *schema_version == other.schema_version
            && *source == other.source
            && *aggregate_type == other.aggregate_type
            && *aggregate_id == other.aggregate_id
            && *sequence == other.sequence
            && *occurred_at == other.occurred_at
            && *correlation_id == other.correlation_id
            && *causation_id == other.causation_id
            && *reply_to == other.reply_to
            && *trace == other.trace
            && *headers == other.headers
            && payload.get() == other.payload.get()
    }
}

impl Envelope {
    /// An event about an aggregate, with a fresh UUIDv7 id, the current time and default
    /// [`PayloadLimits`]. Set the sequence, correlation and trace fields as needed (the
    /// outbox fills them in).
    pub fn event<M: Message>(
        source: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        message: &M,
    ) -> Result<Self> {
        let mut envelope = Self::new(MessageKind::Event, source, aggregate_id, message)?;
        envelope.aggregate_type = Some(aggregate_type.into());
        Ok(envelope)
    }

    /// A command to another service (`target_id` is the key, e.g. the saga or the entity it
    /// concerns), asking for a reply on `reply_to`.
    pub fn command<M: Message>(
        source: impl Into<String>,
        target_id: impl Into<String>,
        reply_to: impl Into<String>,
        message: &M,
    ) -> Result<Self> {
        let mut envelope = Self::new(MessageKind::Command, source, target_id, message)?;
        envelope.reply_to = Some(reply_to.into());
        Ok(envelope)
    }

    /// The reply to `command`: same key and correlation, caused by the command.
    pub fn reply_to<M: Message>(command: &Envelope, source: impl Into<String>, message: &M) -> Result<Self> {
        let mut envelope = Self::new(MessageKind::Reply, source, command.aggregate_id.clone(), message)?;
        envelope.correlation_id = command.correlation_id.clone().or_else(|| Some(command.id.clone()));
        envelope.causation_id = Some(command.id.clone());
        envelope.trace = command.trace.child();
        Ok(envelope)
    }

    fn new<M: Message>(
        kind: MessageKind,
        source: impl Into<String>,
        aggregate_id: impl Into<String>,
        message: &M,
    ) -> Result<Self> {
        let payload = serde_json::value::to_raw_value(message).map_err(Error::Encode)?;
        PayloadLimits::default().check(payload.get())?;
        Ok(Self {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            message_type: M::TYPE.to_owned(),
            schema_version: M::VERSION,
            source: source.into(),
            aggregate_type: None,
            aggregate_id: aggregate_id.into(),
            sequence: None,
            occurred_at: Utc::now(),
            correlation_id: None,
            causation_id: None,
            reply_to: None,
            trace: TraceContext::current().unwrap_or_default(),
            headers: BTreeMap::new(),
            payload,
        })
    }

    /// A message of `message_type` with an already-encoded JSON `payload` (not checked
    /// against the payload limits: it was, when it was first built), a fresh id, schema
    /// version 1, the current time and no source, aggregate or trace yet. A store that
    /// reads messages back sets the fields it kept.
    pub fn raw(kind: MessageKind, message_type: impl Into<String>, payload: Box<RawValue>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            message_type: message_type.into(),
            schema_version: 1,
            source: String::new(),
            aggregate_type: None,
            aggregate_id: String::new(),
            sequence: None,
            occurred_at: Utc::now(),
            correlation_id: None,
            causation_id: None,
            reply_to: None,
            trace: TraceContext::default(),
            headers: BTreeMap::new(),
            payload,
        }
    }

    /// Marks this message as caused by `cause`: same correlation (or the cause's id when it
    /// has none), the cause's id as causation, and the cause's trace continued.
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.correlation_id = cause.correlation_id.clone().or_else(|| Some(cause.id.clone()));
        self.causation_id = Some(cause.id.clone());
        self.trace = cause.trace.child();
        self
    }

    /// The payload as JSON text.
    pub fn payload_json(&self) -> &str {
        self.payload.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_keeps_trace_id_and_replaces_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(root.trace_id(), child.trace_id());
        assert!(root.trace_id().is_some());
        assert_ne!(root.traceparent, child.traceparent);
        assert!(child.traceparent.as_deref().is_some_and(|p| p.ends_with("-01")));
    }

    #[test]
    fn malformed_traceparent_passes_through_unchanged() {
        let odd = TraceContext {
            traceparent: Some("garbage".into()),
            tracestate: None,
        };
        assert_eq!(odd.child(), odd);
        assert_eq!(odd.trace_id(), None);
    }

    #[test]
    fn kinds_round_trip_and_reject_unknown() {
        for kind in [MessageKind::Event, MessageKind::Command, MessageKind::Reply] {
            assert_eq!(MessageKind::parse(kind.as_str()).ok(), Some(kind));
        }
        assert!(matches!(
            MessageKind::parse("query"),
            Err(Error::InvalidAttribute {
                attribute: "messagekind",
                ..
            })
        ));
    }
}
