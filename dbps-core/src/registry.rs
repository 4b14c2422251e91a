//! Typed messages and the registry that decodes them, upcasting older versions.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::envelope::Envelope;
use crate::error::{Error, Result};

/// A Rust type that is the payload of one message type at one schema version.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct StockReserved { quote_id: String, sku: String, quantity: u32 }
///
/// impl dbps_core::Message for StockReserved {
///     const TYPE: &'static str = "inventory.StockReserved";
///     const VERSION: u32 = 2;
/// }
/// ```
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The message type, `<service>.<Name>` by convention: events past tense
    /// (`quote.QuoteCreated`), commands imperative (`inventory.ReserveStock`).
    const TYPE: &'static str;
    /// The current schema version of the payload. Raise it when the payload changes in a
    /// way old readers cannot follow, and register an upcaster from the old version.
    const VERSION: u32 = 1;
}

/// Turns a payload of one version into the payload of the next version.
type Upcaster = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

#[derive(Clone)]
struct Entry {
    current: u32,
    /// Upcasters by the version they start from.
    upcasters: HashMap<u32, Upcaster>,
}

/// The message types a service understands, with upcasters for their older versions.
///
/// Decoding an envelope whose type is not registered, or whose version is neither the
/// current one nor reachable through upcasters, is a typed error
/// ([`Error::UnknownType`], [`Error::UnknownVersion`]), never a panic. The consumer
/// runner sends such messages to the dead-letter topic.
#[derive(Clone, Default)]
pub struct Registry {
    entries: HashMap<&'static str, Entry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut types: Vec<_> = self.entries.iter().map(|(t, e)| (*t, e.current)).collect();
        types.sort_unstable();
        f.debug_struct("Registry").field("types", &types).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `M` as the current version of its message type.
    pub fn register<M: Message>(&mut self) -> &mut Self {
        self.entries
            .entry(M::TYPE)
            .or_insert_with(|| Entry {
                current: M::VERSION,
                upcasters: HashMap::new(),
            })
            .current = M::VERSION;
        self
    }

    /// Registers an upcaster that turns a `from`-version payload of `M`'s type into a
    /// `from + 1` payload. Chains of upcasters bring any older version to the current one.
    pub fn upcaster<M: Message>(
        &mut self,
        from: u32,
        upcast: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.register::<M>();
        if let Some(entry) = self.entries.get_mut(M::TYPE) {
            entry.upcasters.insert(from, Arc::new(upcast));
        }
        self
    }

    /// Whether the envelope's type is registered and its version can be decoded.
    pub fn check(&self, envelope: &Envelope) -> Result<()> {
        let entry = self.entry(&envelope.message_type)?;
        let mut version = envelope.schema_version;
        while version < entry.current {
            if !entry.upcasters.contains_key(&version) {
                break;
            }
            version += 1;
        }
        if version == entry.current {
            Ok(())
        } else {
            Err(Error::UnknownVersion {
                message_type: envelope.message_type.clone(),
                version: envelope.schema_version,
                current: entry.current,
            })
        }
    }

    /// Decodes the envelope's payload into `M`, upcasting older versions.
    ///
    /// `M` need not be registered: a payload at `M`'s current version decodes directly.
    /// Registering matters only for older versions, which go through `M`'s upcasters.
    pub fn decode<M: Message>(&self, envelope: &Envelope) -> Result<M> {
        if envelope.message_type != M::TYPE {
            return Err(Error::WrongType {
                expected: M::TYPE,
                actual: envelope.message_type.clone(),
            });
        }
        let decode_error = |version, source| Error::Decode {
            message_type: M::TYPE.to_owned(),
            version,
            source,
        };
        if envelope.schema_version == M::VERSION {
            return serde_json::from_str(envelope.payload.get()).map_err(|e| decode_error(envelope.schema_version, e));
        }
        let unknown_version = || Error::UnknownVersion {
            message_type: M::TYPE.to_owned(),
            version: envelope.schema_version,
            current: M::VERSION,
        };
        let entry = self.entries.get(M::TYPE).ok_or_else(unknown_version)?;
        self.check(envelope)?;
        let mut value: Value =
            serde_json::from_str(envelope.payload.get()).map_err(|e| decode_error(envelope.schema_version, e))?;
        for from in envelope.schema_version..entry.current {
            let upcast = &entry.upcasters[&from];
            value = upcast(value).map_err(|reason| Error::Upcast {
                message_type: M::TYPE.to_owned(),
                from,
                reason,
            })?;
        }
        serde_json::from_value(value).map_err(|e| decode_error(entry.current, e))
    }

    fn entry(&self, message_type: &str) -> Result<&Entry> {
        self.entries.get(message_type).ok_or_else(|| Error::UnknownType {
            message_type: message_type.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct CustomerCreated {
        id: String,
        name: String,
        tax_number: String,
    }

    impl Message for CustomerCreated {
        const TYPE: &'static str = "customer.CustomerCreated";
        const VERSION: u32 = 3;
    }

    fn envelope(version: u32, payload: Value) -> Envelope {
        let mut envelope =
            Envelope::event("customer", "customer", "c-1", &json!({})).expect("envelope of an empty object");
        envelope.message_type = CustomerCreated::TYPE.to_owned();
        envelope.schema_version = version;
        envelope.payload = serde_json::value::to_raw_value(&payload).expect("raw payload");
        envelope
    }

    impl Message for Value {
        const TYPE: &'static str = "test.Value";
    }

    fn registry() -> Registry {
        let mut registry = Registry::new();
        // v1 had a single "full_name"; v2 renamed it to "name"; v3 added "tax_number".
        registry
            .upcaster::<CustomerCreated>(1, |mut v| {
                let name = v.get_mut("full_name").map(Value::take).ok_or("no full_name")?;
                Ok(json!({ "id": v["id"], "name": name }))
            })
            .upcaster::<CustomerCreated>(2, |mut v| {
                v["tax_number"] = json!("unknown");
                Ok(v)
            });
        registry
    }

    #[test]
    fn current_version_decodes_directly() {
        let e = envelope(3, json!({"id": "c-1", "name": "Ada", "tax_number": "GB1"}));
        let decoded: CustomerCreated = registry().decode(&e).expect("decodes");
        assert_eq!(decoded.tax_number, "GB1");
    }

    #[test]
    fn old_versions_go_through_the_upcaster_chain() {
        let e = envelope(1, json!({"id": "c-1", "full_name": "Ada"}));
        let decoded: CustomerCreated = registry().decode(&e).expect("upcast from v1");
        assert_eq!(
            decoded,
            CustomerCreated {
                id: "c-1".into(),
                name: "Ada".into(),
                tax_number: "unknown".into()
            }
        );
    }

    #[test]
    fn failing_upcaster_is_a_typed_error() {
        let e = envelope(1, json!({"id": "c-1"}));
        let err = registry().decode::<CustomerCreated>(&e).unwrap_err();
        assert!(matches!(err, Error::Upcast { from: 1, .. }), "{err:?}");
    }

    #[test]
    fn unknown_type_and_version_are_typed_errors() {
        let registry = registry();
        let mut e = envelope(3, json!({}));
        e.message_type = "customer.CustomerDeleted".into();
        assert!(matches!(registry.check(&e), Err(Error::UnknownType { .. })));

        let e = envelope(7, json!({}));
        let err = registry.decode::<CustomerCreated>(&e).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnknownVersion {
                    version: 7,
                    current: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        let e = envelope(0, json!({}));
        assert!(matches!(
            registry.check(&e),
            Err(Error::UnknownVersion { version: 0, .. })
        ));
    }

    #[test]
    fn payload_not_matching_the_type_is_a_decode_error() {
        let e = envelope(3, json!({"id": 5}));
        assert!(matches!(
            registry().decode::<CustomerCreated>(&e),
            Err(Error::Decode { version: 3, .. })
        ));
    }

    #[test]
    fn current_version_decodes_without_registering() {
        let e = envelope(3, json!({"id": "c-1", "name": "Ada", "tax_number": "GB1"}));
        let decoded: CustomerCreated = Registry::new().decode(&e).expect("decodes");
        assert_eq!(decoded.name, "Ada");
        let old = envelope(2, json!({"id": "c-1", "name": "Ada"}));
        assert!(matches!(
            Registry::new().decode::<CustomerCreated>(&old),
            Err(Error::UnknownVersion {
                version: 2,
                current: 3,
                ..
            })
        ));
    }

    #[test]
    fn decoding_into_another_type_is_refused() {
        let e = envelope(3, json!({}));
        assert!(matches!(registry().decode::<Value>(&e), Err(Error::WrongType { .. })));
    }
}
