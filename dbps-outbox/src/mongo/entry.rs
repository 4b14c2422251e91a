//! How one message is stored inside a document's outbox, and how it is read back.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use dbps_core::{Envelope, MessageKind, TraceContext};
use mongodb::bson::{self, Bson, Document, doc};
use serde_json::value::RawValue;

use super::PARTITIONS;
use crate::error::{OutboxError, Result};
use crate::store::Pending;

/// Where a message waits in the MongoDB outbox: the document whose outbox holds it and its
/// key in that outbox. The relay marks and parks messages by it; operators replay and
/// discard parked ones by it.
#[derive(Debug, Clone, PartialEq)]
pub struct MongoMessageId {
    /// The collection of the document.
    pub collection: String,
    /// The document's `_id`.
    pub document: Bson,
    /// The message's key in the document's outbox (unique in the collection).
    pub key: String,
}

impl fmt::Display for MongoMessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.collection, id_string(&self.document), self.key)
    }
}

/// The string form of a document id: the aggregate id of the events stored with it.
/// Strings stay as they are, object ids become their hex form, numbers their decimal form,
/// anything else its relaxed extended JSON.
pub(crate) fn id_string(id: &Bson) -> String {
    match id {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// The lease partition of an aggregate: FNV-1a (32 bit) of its id, modulo [`PARTITIONS`].
/// Stored with the document when it is written, so relays select their partitions with
/// an equality match. The relay that holds this partition publishes the aggregate's
/// messages.
pub fn partition(aggregate_id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in aggregate_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    // PARTITIONS is small, so the remainder always fits.
    i32::try_from(hash % PARTITIONS).unwrap_or(0)
}

/// A fresh entry key: a UUIDv7 without hyphens, unique across the collection, so one
/// `update_many` can remove entries of many documents by key.
pub(crate) fn new_key() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The stored form of a message at position `position` of its document's outbox.
pub(crate) fn encode(envelope: &Envelope, topic: &str, position: i64, written_at: bson::DateTime) -> Document {
    let mut entry = doc! {
        "position": position,
        "topic": topic,
        "message_id": &envelope.id,
        "kind": envelope.kind.as_str(),
        "message_type": &envelope.message_type,
        "schema_version": i64::from(envelope.schema_version),
        "source": &envelope.source,
        "aggregate_id": &envelope.aggregate_id,
        // Kept as text: BSON dates have millisecond precision, the envelope has more.
        "occurred_at": envelope.occurred_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        "written_at": written_at,
        "payload": envelope.payload_json(),
    };
    let optional = [
        ("aggregate_type", &envelope.aggregate_type),
        ("correlation_id", &envelope.correlation_id),
        ("causation_id", &envelope.causation_id),
        ("reply_to", &envelope.reply_to),
        ("traceparent", &envelope.trace.traceparent),
        ("tracestate", &envelope.trace.tracestate),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            entry.insert(name, value.as_str());
        }
    }
    if let Some(sequence) = envelope.sequence {
        entry.insert("sequence", sequence);
    }
    if !envelope.headers.is_empty() {
        let headers: Document = envelope
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Bson::String(v.clone())))
            .collect();
        entry.insert("headers", headers);
    }
    entry
}

/// A stored entry read back: its position in the document's outbox and the message.
pub(crate) struct Decoded {
    pub(crate) position: i64,
    pub(crate) pending: Pending<MongoMessageId>,
}

/// Reads a stored entry back.
pub(crate) fn decode(id: MongoMessageId, entry: &Document) -> Result<Decoded> {
    let corrupt = |reason: String| OutboxError::CorruptEntry {
        id: id.to_string(),
        reason,
    };
    let text = |name: &str| -> Result<String> {
        entry
            .get_str(name)
            .map(str::to_owned)
            .map_err(|e| corrupt(format!("{name}: {e}")))
    };
    let optional = |name: &str| -> Result<Option<String>> {
        match entry.get(name) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(corrupt(format!("{name} is a {:?}, not a string", other.element_type()))),
        }
    };
    let integer = |name: &str| -> Result<Option<i64>> {
        match entry.get(name) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Int64(i)) => Ok(Some(*i)),
            Some(Bson::Int32(i)) => Ok(Some(i64::from(*i))),
            Some(other) => Err(corrupt(format!(
                "{name} is a {:?}, not an integer",
                other.element_type()
            ))),
        }
    };
    let position = integer("position")?.ok_or_else(|| corrupt("position missing".into()))?;
    let kind = MessageKind::parse(&text("kind")?).map_err(|e| corrupt(e.to_string()))?;
    let schema_version = integer("schema_version")?.ok_or_else(|| corrupt("schema_version missing".into()))?;
    let occurred_at = DateTime::parse_from_rfc3339(&text("occurred_at")?)
        .map_err(|e| corrupt(format!("occurred_at: {e}")))?
        .with_timezone(&Utc);
    let headers = match entry.get("headers") {
        None | Some(Bson::Null) => BTreeMap::new(),
        Some(Bson::Document(headers)) => headers
            .iter()
            .map(|(k, v)| match v {
                Bson::String(s) => Ok((k.clone(), s.clone())),
                other => Err(corrupt(format!("header {k} is a {:?}", other.element_type()))),
            })
            .collect::<Result<_>>()?,
        Some(other) => return Err(corrupt(format!("headers is a {:?}", other.element_type()))),
    };
    let payload = RawValue::from_string(text("payload")?).map_err(|e| corrupt(format!("payload: {e}")))?;
    let mut envelope = Envelope::raw(kind, text("message_type")?, payload);
    envelope.id = text("message_id")?;
    envelope.schema_version = u32::try_from(schema_version).map_err(|e| corrupt(format!("schema_version: {e}")))?;
    envelope.source = text("source")?;
    envelope.aggregate_type = optional("aggregate_type")?;
    envelope.aggregate_id = text("aggregate_id")?;
    envelope.sequence = integer("sequence")?;
    envelope.occurred_at = occurred_at;
    envelope.correlation_id = optional("correlation_id")?;
    envelope.causation_id = optional("causation_id")?;
    envelope.reply_to = optional("reply_to")?;
    envelope.trace = TraceContext {
        traceparent: optional("traceparent")?,
        tracestate: optional("tracestate")?,
    };
    envelope.headers = headers;
    let topic = text("topic")?;
    Ok(Decoded {
        position,
        pending: Pending {
            id,
            topic,
            partition: partition(&envelope.aggregate_id),
            envelope,
        },
    })
}

/// The entries of one outbox map (`{key: entry}`) in position order, i.e. write order.
pub(crate) fn decode_all(collection: &str, document: &Bson, outbox: &Document) -> Result<Vec<Pending<MongoMessageId>>> {
    let mut decoded = outbox
        .iter()
        .map(|(key, entry)| {
            let id = MongoMessageId {
                collection: collection.to_owned(),
                document: document.clone(),
                key: key.clone(),
            };
            match entry {
                Bson::Document(entry) => decode(id, entry),
                other => Err(OutboxError::CorruptEntry {
                    id: id.to_string(),
                    reason: format!("entry is a {:?}, not a document", other.element_type()),
                }),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    decoded.sort_by_key(|d| d.position);
    Ok(decoded.into_iter().map(|d| d.pending).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Noted {
        note: String,
    }

    impl dbps_core::Message for Noted {
        const TYPE: &'static str = "test.Noted";
    }

    #[test]
    fn entries_round_trip_every_envelope_field() -> Result<(), Box<dyn std::error::Error>> {
        let mut envelope = Envelope::event("quote", "quote", "q-1", &Noted { note: "x".into() })?;
        envelope.sequence = Some(7);
        envelope.correlation_id = Some("saga-1".into());
        envelope.causation_id = Some("m-0".into());
        envelope.trace = TraceContext::new_root();
        envelope.headers.insert("tenant".into(), "acme".into());
        let entry = encode(&envelope, "quote.quote.events", 3, bson::DateTime::now());
        let id = MongoMessageId {
            collection: "quotes".into(),
            document: Bson::String("q-1".into()),
            key: "k".into(),
        };
        let decoded = decode(id.clone(), &entry)?;
        assert_eq!(decoded.position, 3);
        assert_eq!(decoded.pending.envelope, envelope);
        assert_eq!(decoded.pending.topic, "quote.quote.events");
        assert_eq!(decoded.pending.id, id);
        Ok(())
    }

    #[test]
    fn a_damaged_entry_is_a_typed_error_naming_it() {
        let id = MongoMessageId {
            collection: "quotes".into(),
            document: Bson::String("q-1".into()),
            key: "k1".into(),
        };
        let error = decode(id, &doc! { "position": 1_i64, "kind": "rumour" }).err();
        assert!(
            matches!(&error, Some(OutboxError::CorruptEntry { id, .. }) if id == "quotes/q-1/k1"),
            "{error:?}"
        );
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition("q-1"), partition("q-1"));
        let spread: std::collections::BTreeSet<i32> = (0..1000).map(|i| partition(&format!("q-{i}"))).collect();
        assert!(spread.iter().all(|p| (0..32).contains(p)));
        assert_eq!(spread.len(), 32, "1000 ids reach every partition");
    }

    #[test]
    fn document_ids_have_a_readable_string_form() {
        let oid = bson::oid::ObjectId::new();
        assert_eq!(id_string(&Bson::ObjectId(oid)), oid.to_hex());
        assert_eq!(id_string(&Bson::String("q-1".into())), "q-1");
        assert_eq!(id_string(&Bson::Int64(42)), "42");
    }
}
