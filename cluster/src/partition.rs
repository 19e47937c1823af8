//! Account → partition: `partition = u32_be(md5(account)[0..4]) mod P`.
//!
//! Why md5 rather than xxh3/SipHash: the same function must be computable inside
//! PostgreSQL (the `warden.enqueue` SQL function used from users' triggers), and
//! `md5()` is a documented, stable built-in there. It is not used for security,
//! only for a fixed, well-mixed hash. The SQL twin lives in migration 0001 as
//! `warden.partition_of(text)`; a test in the runtime checks both agree.

use md5::{Digest, Md5};

/// Default number of partitions for a new cluster schema.
pub const DEFAULT_PARTITIONS: u32 = 1024;

/// The fixed partition count P of a cluster. Validated: 1 ..= 65_536.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionCount(u32);

/// A partition count out of range (the count asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("partition count must be between 1 and {max}, got {0}", max = PartitionCount::MAX)]
pub struct PartitionCountError(pub u32);

impl PartitionCount {
    pub const MAX: u32 = 65_536;

    pub fn new(p: u32) -> Result<Self, PartitionCountError> {
        if p == 0 || p > Self::MAX {
            return Err(PartitionCountError(p));
        }
        Ok(Self(p))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for PartitionCount {
    fn default() -> Self {
        Self(DEFAULT_PARTITIONS)
    }
}

/// The partition an account belongs to. Stable across versions, platforms and
/// processes; identical to `warden.partition_of(account) % P` in SQL.
pub fn partition_of(account: &str, partitions: PartitionCount) -> u32 {
    let digest = Md5::digest(account.as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    head % partitions.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_never_change() {
        // md5("acct-1") = 2f9a...; pinned so a refactor cannot silently re-home accounts.
        let p = PartitionCount::new(1024).unwrap();
        let digest = Md5::digest(b"acct-1");
        let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        assert_eq!(partition_of("acct-1", p), head % 1024);
        assert_eq!(partition_of("", PartitionCount::new(1).unwrap()), 0);
        // md5("a") = 0cc175b9c0f1b6a831c399e269772661 → 0x0cc175b9 = 214005177
        assert_eq!(partition_of("a", PartitionCount::new(65_536).unwrap()), 214_005_177 % 65_536);
    }

    #[test]
    fn spreads_accounts_evenly() {
        let p = PartitionCount::new(64).unwrap();
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[partition_of(&format!("account-{i}"), p) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "min {min} max {max}");
    }

    #[test]
    fn rejects_bad_counts() {
        assert!(PartitionCount::new(0).is_err());
        assert!(PartitionCount::new(65_537).is_err());
        assert_eq!(PartitionCount::new(7).unwrap().get(), 7);
    }
}
