use std::io;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A fast zero was asked for and cannot be done faster than writing.
    #[error("operation cannot be done fast")]
    NotFast,
    #[error("range {offset}+{len} is outside the device")]
    OutOfRange { offset: u64, len: u64 },
    #[error("device is read-only")]
    ReadOnly,
    #[error("unknown meta context {0}")]
    UnknownContext(String),
    /// A snapshot, checkpoint or disk name that is not allowed.
    #[error("{0}")]
    InvalidName(String),
    /// The name is taken.
    #[error("{0}")]
    Exists(String),
    /// No such snapshot or checkpoint.
    #[error("{0}")]
    NotFound(String),
    /// The object is in use (e.g. a snapshot that NBD clients are reading).
    #[error("{0}")]
    Busy(String),
    /// The state directory does not describe this disk, or is damaged.
    #[error("{0}")]
    BadState(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;
