//! The crate's errors: what callers can match on, with messages fit for an operator.

use std::net::SocketAddr;
use std::time::Duration;

/// A gossip configuration that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("node id must be 1..=128 bytes without control characters")]
    NodeId,
    #[error("gossip interval must be 10ms..=10s, got {0:?}")]
    GossipInterval(Duration),
    #[error("phi threshold must be 1..=100, got {0}")]
    PhiThreshold(f64),
    #[error("seed {0:?} must be host:port")]
    Seed(String),
}

/// Why gossip membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// chitchat refused to start (for example, the address is taken).
    #[error("starting gossip on {addr}: {reason}")]
    Start { addr: SocketAddr, reason: String },
}
