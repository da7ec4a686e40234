use std::io;

/// Why a block request failed. The server turns these into NBD errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// This device cannot do this (a [`clone_range`] where a layer or the
    /// file system has no way to share blocks): the caller does it
    /// another way, by writing the bytes.
    ///
    /// [`clone_range`]: crate::BlockDev::clone_range
    #[error("operation not supported by this device")]
    Unsupported,
    /// The device went away under its user (a deleted snapshot, say).
    #[error("{0}")]
    Gone(String),
}

pub type Result<T> = std::result::Result<T, Error>;
