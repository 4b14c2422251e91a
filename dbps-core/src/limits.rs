//! Limits on payloads, checked before anything is written.

use crate::error::{Error, Result};

/// The largest payload and the deepest JSON nesting a message may have.
///
/// The default size limit (900 KiB) leaves room for headers below Kafka's default
/// `message.max.bytes` of 1 MB, so that a payload accepted here is not refused by the
/// broker later, when the state change it belongs to has long been committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PayloadLimits {
    /// Maximum payload size in bytes.
    pub max_bytes: usize,
    /// Maximum nesting depth of JSON arrays and objects.
    pub max_depth: usize,
}

impl Default for PayloadLimits {
    fn default() -> Self {
        Self {
            max_bytes: 900 * 1024,
            max_depth: 64,
        }
    }
}

impl PayloadLimits {
    /// Limits of `max_bytes` bytes and `max_depth` levels of nesting; both must be
    /// positive.
    pub fn new(max_bytes: usize, max_depth: usize) -> Result<Self> {
        if max_bytes == 0 || max_depth == 0 {
            return Err(Error::InvalidConfig {
                setting: String::from("payload limits"),
                reason: String::from("max_bytes and max_depth must be positive"),
            });
        }
        Ok(Self { max_bytes, max_depth })
    }

    /// Checks a JSON text against both limits. The depth scan is a single pass over the
    /// bytes that skips string contents, so it is cheap next to parsing.
    pub fn check(&self, json: &str) -> Result<()> {
        if json.len() > self.max_bytes {
            return Err(Error::PayloadTooLarge {
                size: json.len(),
                limit: self.max_bytes,
            });
        }
        let mut depth = 0_usize;
        let mut in_string = false;
        let mut escaped = false;
        for byte in json.bytes() {
            if in_string {
                match byte {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > self.max_depth {
                        return Err(Error::PayloadTooDeep {
                            depth,
                            limit: self.max_depth,
                        });
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_payload_within_limits() {
        let limits = PayloadLimits {
            max_bytes: 64,
            max_depth: 3,
        };
        assert!(limits.check(r#"{"a":[{"b":1}]}"#).is_ok());
    }

    #[test]
    fn rejects_oversize_payload() {
        let limits = PayloadLimits {
            max_bytes: 10,
            max_depth: 64,
        };
        let err = limits.check(r#"{"name":"far too long"}"#).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { size: 23, limit: 10 }), "{err:?}");
    }

    #[test]
    fn rejects_too_deep_payload() {
        let limits = PayloadLimits {
            max_bytes: 1024,
            max_depth: 3,
        };
        let err = limits.check(r#"{"a":{"b":{"c":{"d":1}}}}"#).unwrap_err();
        assert!(matches!(err, Error::PayloadTooDeep { depth: 4, limit: 3 }), "{err:?}");
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let limits = PayloadLimits {
            max_bytes: 1024,
            max_depth: 1,
        };
        assert!(limits.check(r#"{"a":"[[[{{{\"]]]"}"#).is_ok());
    }

    #[test]
    fn default_fits_under_kafka_message_limit() {
        assert!(PayloadLimits::default().max_bytes < 1_000_000);
    }
}
