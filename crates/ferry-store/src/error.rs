use std::io;

/// Why a management operation on a disk (snapshots, checkpoints, its
/// state directory) failed. Block requests fail with [`ferry_block::Error`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Block(#[from] ferry_block::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A snapshot, checkpoint or disk name that is not allowed.
    #[error("{0}")]
    InvalidName(String),
    /// The name is taken.
    #[error("{0}")]
    Exists(String),
    /// No such snapshot or checkpoint.
    #[error("{0}")]
    NotFound(String),
    /// The state directory does not describe this disk, or is damaged.
    #[error("{0}")]
    BadState(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;
