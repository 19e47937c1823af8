//! The runtime's error type at its crate boundary.

use std::time::Duration;

/// Errors returned by the Warden runtime API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's input was rejected before it reached the database.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The node's configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The database schema was created with a different partition count.
    #[error("partition count mismatch: the database was created with P={stored}, this node is configured with P={configured}")]
    PartitionMismatch { stored: u32, configured: u32 },

    /// The cluster schema has not been initialised (no node has started yet).
    #[error("cluster not initialised: start a node (which applies migrations) before enqueueing")]
    NotInitialised,

    /// No job with this id.
    #[error("job {0} not found")]
    JobNotFound(i64),

    /// No schedule of this name for this account.
    #[error("no schedule {name:?} for account {account:?}")]
    ScheduleNotFound { account: String, name: String },

    /// A fenced write failed: this node no longer holds the lease epoch it acted under.
    /// Not retryable: the caller is a zombie for that partition and must stop.
    #[error("fenced: lease for partition {partition} epoch {epoch} is no longer held")]
    Fenced { partition: u32, epoch: i64 },

    /// The database did not answer in time.
    #[error("database timed out after {0:?}")]
    Timeout(Duration),

    /// Any other database error (connection loss, constraint violation, ...).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A concurrent change made the request impossible as sent; retrying it is safe.
    #[error("conflict: {0}")]
    Conflict(String),

    /// A stored value Rust cannot represent (it entered before migration 0003's
    /// constraints, or by hand).
    #[error("undecodable value: {0}")]
    Undecodable(String),
}

impl Error {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// Would the same statement fail the same way if sent again? Data exceptions
    /// (SQLSTATE class 22: a NUL byte, an interval out of range), integrity violations
    /// (23), syntax or access errors (42), unsupported features (0A), and values that
    /// do not decode. Connection loss, timeouts, serialization failures and deadlocks
    /// are not permanent: retrying them is right.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::InvalidInput(_) | Error::Config(_) | Error::Undecodable(_) => true,
            Error::Database(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref().map(|c| &c[..2.min(c.len())]), Some("22" | "23" | "42" | "0A"))
            }
            Error::Database(
                sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::Decode(_)
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::TypeNotFound { .. },
            ) => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
