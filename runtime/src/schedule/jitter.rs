//! Jitter: a deterministic offset from a stable hash of (schedule key, nominal time),
//! so every node, of every version, computes the same fire instant for a fire.
//!
//! The hash is FNV-1a (64-bit) over the key's length, the key's bytes and the nominal
//! time (Unix seconds and nanoseconds, little-endian), finished by MurmurHash3's
//! 64-bit mixer. It is part of the stored behaviour: changing it moves every jittered
//! fire, so `offset_is_pinned` freezes a few values.

use chrono::{DateTime, Utc};
use std::time::Duration;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable 64-bit hash of (key, nominal).
pub(crate) fn fire_hash(key: &[u8], nominal: DateTime<Utc>) -> u64 {
    let mut h = FNV_OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    // The length first, so ("ab", t) and ("a", t') cannot collide by shifting bytes.
    eat(&(key.len() as u64).to_le_bytes());
    eat(key);
    eat(&nominal.timestamp().to_le_bytes());
    eat(&nominal.timestamp_subsec_nanos().to_le_bytes());
    fmix64(h)
}

/// MurmurHash3's finaliser: every input bit affects every output bit, so consecutive
/// nominal times spread over the whole jitter window.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// An offset in `[0, cap)` at millisecond resolution, uniform over the hash; zero
/// when `cap` is under a millisecond.
pub(crate) fn offset(key: &[u8], nominal: DateTime<Utc>, cap: Duration) -> Duration {
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    // Multiply-shift maps the hash onto [0, cap_ms) without modulo bias.
    let ms = ((u128::from(fire_hash(key, nominal)) * u128::from(cap_ms)) >> 64) as u64;
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn offset_is_pinned() {
        // These values are a compatibility contract between node versions (checked
        // against an independent implementation of FNV-1a + fmix64).
        assert_eq!(fire_hash(b"", t(0)), 0xaa62_50e4_79c2_df92);
        assert_eq!(fire_hash(b"acct-1/nightly", t(1_790_000_000)), 0x2d23_1c3e_d187_2fa1);
        assert_eq!(offset(b"acct-1/nightly", t(1_790_000_000), Duration::from_secs(60)), Duration::from_millis(10_579));
    }

    #[test]
    fn offset_stays_below_the_cap() {
        for cap_ms in [1, 2, 999, 1000, 60_000, 86_400_000] {
            let cap = Duration::from_millis(cap_ms);
            for i in 0..500 {
                assert!(offset(b"k", t(1_700_000_000 + i * 60), cap) < cap);
            }
        }
        assert_eq!(offset(b"k", t(0), Duration::ZERO), Duration::ZERO);
        assert_eq!(offset(b"k", t(0), Duration::from_micros(999)), Duration::ZERO);
    }

    #[test]
    fn offsets_spread_over_the_window() {
        let cap = Duration::from_secs(10);
        let mut buckets = [0u32; 10];
        for i in 0..10_000 {
            buckets[offset(b"spread", t(i * 60), cap).as_secs() as usize] += 1;
        }
        // 1,000 expected per bucket; a fair hash stays well within ±20%.
        assert!(buckets.iter().all(|&n| (800..1200).contains(&n)), "{buckets:?}");
    }

    #[test]
    fn key_and_nominal_both_matter() {
        let cap = Duration::from_secs(3600);
        assert_ne!(offset(b"a", t(60), cap), offset(b"b", t(60), cap));
        assert_ne!(offset(b"a", t(60), cap), offset(b"a", t(120), cap));
        assert_ne!(fire_hash(b"ab", t(0)), fire_hash(b"a", t(0)));
    }
}
