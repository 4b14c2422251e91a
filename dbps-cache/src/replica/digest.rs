//! Digests of `(id, sequence)` per bucket of ids, the same in Rust and in SQL, so that a
//! source and a replica on different servers compare by a few numbers.

use md5::{Digest as _, Md5};
use serde::{Deserialize, Serialize};

/// How many buckets the ids are spread over: the first byte of `md5(id)`.
pub const DIGEST_BUCKETS: u16 = 256;

/// The count and digest of one bucket. The digest is the XOR of [`entry_hash`] over the
/// bucket's entries, so it does not depend on their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BucketDigest {
    /// The bucket, `0..DIGEST_BUCKETS`.
    pub bucket: u16,
    /// How many entries it holds.
    pub count: i64,
    /// XOR of their hashes.
    pub digest: i64,
}

/// The bucket of an id: the first byte of its MD5.
pub fn bucket_of(id: &str) -> u16 {
    u16::from(Md5::digest(id.as_bytes())[0])
}

/// The hash of one entry: the first eight bytes of `md5("<id>:<sequence>")`, big-endian.
pub fn entry_hash(id: &str, sequence: i64) -> i64 {
    let hash = Md5::digest(format!("{id}:{sequence}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    i64::from_be_bytes(first)
}

/// The digests of all buckets of some entries (buckets without entries included, so
/// that both sides list the same buckets).
pub(crate) fn digests_of<'a>(entries: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<BucketDigest> {
    let mut buckets: Vec<BucketDigest> = (0..DIGEST_BUCKETS)
        .map(|bucket| BucketDigest {
            bucket,
            ..BucketDigest::default()
        })
        .collect();
    for (id, sequence) in entries {
        let bucket = &mut buckets[usize::from(bucket_of(id))];
        bucket.count += 1;
        bucket.digest ^= entry_hash(id, sequence);
    }
    buckets
}

/// Fills in the buckets a `group by` left out (no entries), in bucket order.
pub(crate) fn complete(found: Vec<BucketDigest>) -> Vec<BucketDigest> {
    let mut buckets = digests_of(std::iter::empty());
    for digest in found {
        if let Some(slot) = buckets.get_mut(usize::from(digest.bucket)) {
            *slot = digest;
        }
    }
    buckets
}

/// SQL for a PostgreSQL expression: the bucket of the text expression `id`.
#[cfg(feature = "postgres")]
pub(crate) fn sql_bucket(id: &str) -> String {
    format!("get_byte(decode(md5({id}), 'hex'), 0)")
}

/// SQL for a PostgreSQL expression: [`entry_hash`] of the text `id` and bigint `sequence`.
#[cfg(feature = "postgres")]
pub(crate) fn sql_hash(id: &str, sequence: &str) -> String {
    format!("('x' || substr(md5({id} || ':' || {sequence}), 1, 16))::bit(64)::bigint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_do_not_depend_on_order() {
        let a = digests_of([("a", 1), ("b", 2), ("c", 3)]);
        let b = digests_of([("c", 3), ("a", 1), ("b", 2)]);
        assert_eq!(a, b);
        assert_eq!(a.len(), usize::from(DIGEST_BUCKETS));
        assert_eq!(a.iter().map(|d| d.count).sum::<i64>(), 3);
        assert_ne!(a, digests_of([("a", 1), ("b", 2), ("c", 4)]));
    }

    #[test]
    fn known_values() {
        // md5("a") = 0cc175b9c0f1b6a8...; md5("a:1") = 5a4b8b6b...
        assert_eq!(bucket_of("a"), 0x0c);
        assert_eq!(
            entry_hash("a", 1),
            i64::from_be_bytes(Md5::digest(b"a:1")[..8].try_into().unwrap_or_default())
        );
    }
}
