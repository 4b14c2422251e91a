//! The CloudEvents 1.0 Kafka protocol binding, binary content mode.
//!
//! A dbps message on Kafka is a CloudEvent: the key is the aggregate id, the value is the
//! JSON payload, and the attributes travel as headers. Any CloudEvents-aware client in
//! another language reads dbps messages, and dbps reads theirs.
//!
//! | header | envelope field | required on decode |
//! |---|---|---|
//! | `ce_specversion` | `1.0` | yes |
//! | `ce_id` | [`Envelope::id`] | yes |
//! | `ce_type` | [`Envelope::message_type`] | yes |
//! | `ce_source` | [`Envelope::source`] | yes |
//! | `ce_subject` | [`Envelope::aggregate_id`] | no (the key is used instead) |
//! | `ce_time` | [`Envelope::occurred_at`] (RFC 3339) | no (the Kafka timestamp is used instead) |
//! | `content-type` | `application/json` | no (JSON is assumed) |
//! | `ce_schemaversion` | [`Envelope::schema_version`] | no (default 1) |
//! | `ce_messagekind` | [`Envelope::kind`] | no (default `event`) |
//! | `ce_sequence` | [`Envelope::sequence`] (decimal) | no |
//! | `ce_aggregatetype` | [`Envelope::aggregate_type`] | no |
//! | `ce_correlationid` | [`Envelope::correlation_id`] | no |
//! | `ce_causationid` | [`Envelope::causation_id`] | no |
//! | `ce_replyto` | [`Envelope::reply_to`] | no |
//! | `traceparent`, `tracestate` | [`Envelope::trace`] (W3C) | no |
//!
//! Every other header is a free header ([`Envelope::headers`]), including `ce_*`
//! extensions dbps does not know, which pass through unchanged. Why dbps implements the
//! binding itself rather than using a CloudEvents crate: `docs/adr/0002-cloudevents-binding.md`.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::value::RawValue;

use crate::envelope::{Envelope, MessageKind, TraceContext};
use crate::error::{Error, Result};

/// The CloudEvents version dbps writes and reads.
pub const SPEC_VERSION: &str = "1.0";
/// The content type of dbps payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Header names of the binding.
pub mod header {
    /// `ce_specversion`
    pub const SPEC_VERSION: &str = "ce_specversion";
    /// `ce_id`
    pub const ID: &str = "ce_id";
    /// `ce_type`
    pub const TYPE: &str = "ce_type";
    /// `ce_source`
    pub const SOURCE: &str = "ce_source";
    /// `ce_subject`
    pub const SUBJECT: &str = "ce_subject";
    /// `ce_time`
    pub const TIME: &str = "ce_time";
    /// `content-type`
    pub const CONTENT_TYPE: &str = "content-type";
    /// `ce_schemaversion` (extension)
    pub const SCHEMA_VERSION: &str = "ce_schemaversion";
    /// `ce_messagekind` (extension)
    pub const KIND: &str = "ce_messagekind";
    /// `ce_sequence` (extension)
    pub const SEQUENCE: &str = "ce_sequence";
    /// `ce_aggregatetype` (extension)
    pub const AGGREGATE_TYPE: &str = "ce_aggregatetype";
    /// `ce_correlationid` (extension)
    pub const CORRELATION_ID: &str = "ce_correlationid";
    /// `ce_causationid` (extension)
    pub const CAUSATION_ID: &str = "ce_causationid";
    /// `ce_replyto` (extension)
    pub const REPLY_TO: &str = "ce_replyto";
    /// `traceparent` (W3C trace context)
    pub const TRACEPARENT: &str = "traceparent";
    /// `tracestate` (W3C trace context)
    pub const TRACESTATE: &str = "tracestate";
    /// `ce_traceparent`, the CloudEvents distributed-tracing extension, read as a fallback.
    pub(crate) const CE_TRACEPARENT: &str = "ce_traceparent";
    /// `ce_tracestate`, read as a fallback.
    pub(crate) const CE_TRACESTATE: &str = "ce_tracestate";

    /// Names a free header may not take.
    pub(crate) const RESERVED: [&str; 17] = [
        SPEC_VERSION,
        ID,
        TYPE,
        SOURCE,
        SUBJECT,
        TIME,
        CONTENT_TYPE,
        SCHEMA_VERSION,
        KIND,
        SEQUENCE,
        AGGREGATE_TYPE,
        CORRELATION_ID,
        CAUSATION_ID,
        REPLY_TO,
        TRACEPARENT,
        TRACESTATE,
        "ce_datacontenttype",
    ];
}

/// A message in Kafka's terms, borrowing from the envelope it was encoded from.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded<'a> {
    /// The record key: the aggregate id.
    pub key: &'a str,
    /// The record headers, in a stable order.
    pub headers: Vec<(&'a str, std::borrow::Cow<'a, str>)>,
    /// The record value: the JSON payload.
    pub value: &'a str,
}

/// Encodes an envelope as a Kafka record in binary content mode.
///
/// Fails only when a free header takes a reserved name.
pub fn encode(envelope: &Envelope) -> Result<Encoded<'_>> {
    use std::borrow::Cow::{Borrowed, Owned};
    let mut headers: Vec<(&str, std::borrow::Cow<'_, str>)> = Vec::with_capacity(12 + envelope.headers.len());
    headers.push((header::SPEC_VERSION, Borrowed(SPEC_VERSION)));
    headers.push((header::ID, Borrowed(&envelope.id)));
    headers.push((header::TYPE, Borrowed(&envelope.message_type)));
    headers.push((header::SOURCE, Borrowed(&envelope.source)));
    headers.push((header::SUBJECT, Borrowed(&envelope.aggregate_id)));
    headers.push((
        header::TIME,
        Owned(envelope.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
    ));
    headers.push((header::CONTENT_TYPE, Borrowed(CONTENT_TYPE_JSON)));
    headers.push((header::SCHEMA_VERSION, Owned(envelope.schema_version.to_string())));
    headers.push((header::KIND, Borrowed(envelope.kind.as_str())));
    if let Some(sequence) = envelope.sequence {
        headers.push((header::SEQUENCE, Owned(sequence.to_string())));
    }
    let optional = [
        (header::AGGREGATE_TYPE, &envelope.aggregate_type),
        (header::CORRELATION_ID, &envelope.correlation_id),
        (header::CAUSATION_ID, &envelope.causation_id),
        (header::REPLY_TO, &envelope.reply_to),
        (header::TRACEPARENT, &envelope.trace.traceparent),
        (header::TRACESTATE, &envelope.trace.tracestate),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            headers.push((name, Borrowed(value)));
        }
    }
    check_headers(&envelope.headers)?;
    for (name, value) in &envelope.headers {
        headers.push((name, Borrowed(value)));
    }
    Ok(Encoded {
        key: &envelope.aggregate_id,
        headers,
        value: envelope.payload.get(),
    })
}

/// Checks that no free header takes a name the wire format reserves, so that a message
/// can be refused before it is stored rather than when it is published.
pub fn check_headers(headers: &BTreeMap<String, String>) -> Result<()> {
    match headers.keys().find(|name| header::RESERVED.contains(&name.as_str())) {
        Some(name) => Err(Error::InvalidAttribute {
            attribute: "headers",
            reason: format!("free header {name} takes a name reserved by the wire format"),
        }),
        None => Ok(()),
    }
}

/// Decodes a Kafka record in binary content mode.
///
/// `timestamp` (the record's timestamp) stands in for a missing `ce_time`. Missing
/// required attributes, malformed attributes, non-JSON content and invalid JSON payloads
/// are typed errors.
pub fn decode<'h>(
    key: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
    value: Option<&[u8]>,
    timestamp: Option<DateTime<Utc>>,
) -> Result<Envelope> {
    let mut known: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut free = BTreeMap::new();
    let mut fallback_trace = TraceContext::default();
    for (name, raw) in headers {
        let text = |attribute: &'static str| -> Result<String> {
            let bytes = raw.unwrap_or_default();
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| Error::InvalidAttribute {
                    attribute,
                    reason: String::from("not utf-8"),
                })
        };
        let lower = name.to_ascii_lowercase();
        if let Some(reserved) = header::RESERVED.iter().find(|r| **r == lower) {
            known.insert(reserved, text(attribute_name(reserved))?);
        } else if lower == header::CE_TRACEPARENT {
            fallback_trace.traceparent = Some(text("traceparent")?);
        } else if lower == header::CE_TRACESTATE {
            fallback_trace.tracestate = Some(text("tracestate")?);
        } else {
            // Free headers need not be text for other producers; dbps keeps the text ones
            // and reports the others instead of guessing an encoding.
            free.insert(name.to_owned(), text("headers")?);
        }
    }

    let mut take = |name: &'static str| known.remove(name).filter(|v| !v.is_empty());
    let spec_version = take(header::SPEC_VERSION).ok_or(Error::MissingAttribute {
        attribute: "specversion",
    })?;
    if spec_version != SPEC_VERSION {
        return Err(Error::InvalidAttribute {
            attribute: "specversion",
            reason: format!("{spec_version:?} is not supported (dbps reads {SPEC_VERSION})"),
        });
    }
    let id = take(header::ID).ok_or(Error::MissingAttribute { attribute: "id" })?;
    let message_type = take(header::TYPE).ok_or(Error::MissingAttribute { attribute: "type" })?;
    let source = take(header::SOURCE).ok_or(Error::MissingAttribute { attribute: "source" })?;
    let aggregate_id = match take(header::SUBJECT) {
        Some(subject) => subject,
        None => key
            .filter(|k| !k.is_empty())
            .map(|k| String::from_utf8(k.to_vec()))
            .transpose()
            .map_err(|_| Error::InvalidAttribute {
                attribute: "subject",
                reason: String::from("key is not utf-8"),
            })?
            .ok_or(Error::MissingAttribute { attribute: "subject" })?,
    };
    let occurred_at = match take(header::TIME) {
        Some(time) => DateTime::parse_from_rfc3339(&time)
            .map_err(|e| Error::InvalidAttribute {
                attribute: "time",
                reason: format!("{time:?}: {e}"),
            })?
            .with_timezone(&Utc),
        None => timestamp.ok_or(Error::MissingAttribute { attribute: "time" })?,
    };
    let content_type = take(header::CONTENT_TYPE).or_else(|| take("ce_datacontenttype"));
    if let Some(content_type) = content_type {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != CONTENT_TYPE_JSON && !(essence.starts_with("application/") && essence.ends_with("+json")) {
            return Err(Error::InvalidAttribute {
                attribute: "datacontenttype",
                reason: format!("{content_type:?} is not json (dbps reads json in binary content mode)"),
            });
        }
        if essence == "application/cloudevents+json" {
            return Err(Error::InvalidAttribute {
                attribute: "datacontenttype",
                reason: String::from("structured content mode is not supported; send binary content mode"),
            });
        }
    }
    let schema_version = match take(header::SCHEMA_VERSION) {
        Some(v) => v.parse().map_err(|_| Error::InvalidAttribute {
            attribute: "schemaversion",
            reason: format!("{v:?} is not a non-negative integer"),
        })?,
        None => 1,
    };
    let kind = take(header::KIND)
        .map(|k| MessageKind::parse(&k))
        .transpose()?
        .unwrap_or_default();
    let sequence = take(header::SEQUENCE)
        .map(|s| {
            s.parse::<i64>().map_err(|_| Error::InvalidAttribute {
                attribute: "sequence",
                reason: format!("{s:?} is not an integer"),
            })
        })
        .transpose()?;
    let trace = TraceContext {
        traceparent: take(header::TRACEPARENT).or(fallback_trace.traceparent),
        tracestate: take(header::TRACESTATE).or(fallback_trace.tracestate),
    };
    let aggregate_type = take(header::AGGREGATE_TYPE);
    let correlation_id = take(header::CORRELATION_ID);
    let causation_id = take(header::CAUSATION_ID);
    let reply_to = take(header::REPLY_TO);

    let value = value
        .filter(|v| !v.is_empty())
        .ok_or(Error::MissingAttribute { attribute: "data" })?;
    let text = std::str::from_utf8(value).map_err(|_| Error::InvalidAttribute {
        attribute: "data",
        reason: String::from("payload is not utf-8"),
    })?;
    let payload = RawValue::from_string(text.to_owned()).map_err(|source| Error::Decode {
        message_type: message_type.clone(),
        version: schema_version,
        source,
    })?;

    Ok(Envelope {
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
        headers: free,
        payload,
    })
}

/// The CloudEvents attribute name of a reserved header, for error messages.
fn attribute_name(header: &'static str) -> &'static str {
    header.strip_prefix("ce_").unwrap_or(header)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::registry::Message;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct QuoteCreated {
        quote_id: String,
        total_cents: i64,
    }

    impl Message for QuoteCreated {
        const TYPE: &'static str = "quote.QuoteCreated";
        const VERSION: u32 = 2;
    }

    fn sample() -> Envelope {
        let mut e = Envelope::event(
            "quote",
            "quote",
            "q-17",
            &QuoteCreated {
                quote_id: "q-17".into(),
                total_cents: 4200,
            },
        )
        .expect("envelope");
        e.sequence = Some(5);
        e.correlation_id = Some("saga-1".into());
        e.causation_id = Some("cmd-1".into());
        e.trace = TraceContext::new_root();
        e.trace.tracestate = Some("vendor=1".into());
        e.headers.insert("tenant".into(), "acme".into());
        e
    }

    fn round_trip(e: &Envelope) -> Result<Envelope> {
        let encoded = encode(e)?;
        let headers: Vec<(&str, Option<&[u8]>)> =
            encoded.headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect();
        decode(
            Some(encoded.key.as_bytes()),
            headers,
            Some(encoded.value.as_bytes()),
            None,
        )
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let e = sample();
        let decoded = round_trip(&e).expect("decodes");
        // Times travel with microsecond precision.
        assert_eq!(decoded.occurred_at.timestamp_micros(), e.occurred_at.timestamp_micros());
        let decoded = Envelope {
            occurred_at: e.occurred_at,
            ..decoded
        };
        assert_eq!(decoded, e);
    }

    #[test]
    fn commands_and_replies_round_trip() {
        let command = Envelope::command("quote", "q-17", "quote.replies", &json!({"sku": "A"})).expect("command");
        let decoded = round_trip(&command).expect("decodes");
        assert_eq!(decoded.kind, MessageKind::Command);
        assert_eq!(decoded.reply_to.as_deref(), Some("quote.replies"));
        let reply = Envelope::reply_to(&command, "inventory", &json!({"ok": true})).expect("reply");
        let decoded = round_trip(&reply).expect("decodes");
        assert_eq!(decoded.kind, MessageKind::Reply);
        assert_eq!(decoded.causation_id.as_deref(), Some(command.id.as_str()));
    }

    /// Headers as another CloudEvents client (say, the Java or Go SDK) writes them:
    /// only the required attributes, `ce_time` with an offset, an unknown extension and
    /// the tracing extension under its CloudEvents name.
    #[test]
    fn decodes_headers_built_by_another_client() {
        let headers: Vec<(&str, Option<&[u8]>)> = vec![
            ("ce_specversion", Some(b"1.0")),
            ("ce_id", Some(b"A234-1234-1234")),
            ("ce_type", Some(b"com.example.someevent")),
            ("ce_source", Some(b"/mycontext/subcontext")),
            ("ce_time", Some(b"2018-04-05T03:56:24+02:00")),
            ("content-type", Some(b"application/json; charset=utf-8")),
            ("ce_comexampleextension1", Some(b"value")),
            (
                "ce_traceparent",
                Some(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
        ];
        let e = decode(Some(b"key-1"), headers, Some(br#"{"much":"wow"}"#), None).expect("decodes");
        assert_eq!(e.id, "A234-1234-1234");
        assert_eq!(e.message_type, "com.example.someevent");
        assert_eq!(e.source, "/mycontext/subcontext");
        assert_eq!(e.aggregate_id, "key-1", "the key stands in for a missing subject");
        assert_eq!(e.occurred_at.to_rfc3339(), "2018-04-05T01:56:24+00:00");
        assert_eq!(e.kind, MessageKind::Event);
        assert_eq!(e.schema_version, 1);
        assert_eq!(e.sequence, None);
        assert_eq!(
            e.headers.get("ce_comexampleextension1").map(String::as_str),
            Some("value")
        );
        assert_eq!(e.trace.trace_id(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(e.payload_json(), r#"{"much":"wow"}"#);
    }

    fn minimal_headers() -> Vec<(&'static str, Option<&'static [u8]>)> {
        vec![
            ("ce_specversion", Some(b"1.0".as_slice())),
            ("ce_id", Some(b"1".as_slice())),
            ("ce_type", Some(b"t".as_slice())),
            ("ce_source", Some(b"s".as_slice())),
            ("ce_subject", Some(b"a".as_slice())),
            ("ce_time", Some(b"2026-01-01T00:00:00Z".as_slice())),
        ]
    }

    #[test]
    fn each_missing_required_attribute_is_named() {
        for (missing, attribute) in [
            ("ce_specversion", "specversion"),
            ("ce_id", "id"),
            ("ce_type", "type"),
            ("ce_source", "source"),
        ] {
            let headers: Vec<_> = minimal_headers().into_iter().filter(|(n, _)| *n != missing).collect();
            let err = decode(None, headers, Some(b"{}"), None).unwrap_err();
            assert!(
                matches!(err, Error::MissingAttribute { attribute: a } if a == attribute),
                "without {missing}: {err:?}"
            );
        }
        let no_subject: Vec<_> = minimal_headers()
            .into_iter()
            .filter(|(n, _)| *n != "ce_subject")
            .collect();
        assert!(matches!(
            decode(None, no_subject, Some(b"{}"), None),
            Err(Error::MissingAttribute { attribute: "subject" })
        ));
        let no_time: Vec<_> = minimal_headers().into_iter().filter(|(n, _)| *n != "ce_time").collect();
        assert!(matches!(
            decode(None, no_time.clone(), Some(b"{}"), None),
            Err(Error::MissingAttribute { attribute: "time" })
        ));
        assert!(
            decode(None, no_time, Some(b"{}"), Some(Utc::now())).is_ok(),
            "the record timestamp stands in"
        );
        assert!(matches!(
            decode(None, minimal_headers(), None, None),
            Err(Error::MissingAttribute { attribute: "data" })
        ));
    }

    #[test]
    fn malformed_attributes_and_payloads_are_rejected() {
        let with = |name: &'static str, value: &'static [u8]| {
            let mut headers: Vec<_> = minimal_headers().into_iter().filter(|(n, _)| *n != name).collect();
            headers.push((name, Some(value)));
            decode(None, headers, Some(b"{}"), None)
        };
        assert!(matches!(
            with("ce_specversion", b"0.3"),
            Err(Error::InvalidAttribute {
                attribute: "specversion",
                ..
            })
        ));
        assert!(matches!(
            with("ce_time", b"yesterday"),
            Err(Error::InvalidAttribute { attribute: "time", .. })
        ));
        assert!(matches!(
            with("ce_sequence", b"x1"),
            Err(Error::InvalidAttribute {
                attribute: "sequence",
                ..
            })
        ));
        assert!(matches!(
            with("ce_messagekind", b"query"),
            Err(Error::InvalidAttribute {
                attribute: "messagekind",
                ..
            })
        ));
        assert!(matches!(
            with("content-type", b"text/plain"),
            Err(Error::InvalidAttribute {
                attribute: "datacontenttype",
                ..
            })
        ));
        assert!(matches!(
            with("ce_id", &[0xff, 0xfe]),
            Err(Error::InvalidAttribute { attribute: "id", .. })
        ));
        assert!(matches!(
            decode(None, minimal_headers(), Some(b"{not json"), None),
            Err(Error::Decode { .. })
        ));
    }

    #[test]
    fn free_header_with_reserved_name_is_refused() {
        let mut e = sample();
        e.headers.insert("ce_id".into(), "spoofed".into());
        assert!(matches!(
            encode(&e),
            Err(Error::InvalidAttribute {
                attribute: "headers",
                ..
            })
        ));
    }
}
