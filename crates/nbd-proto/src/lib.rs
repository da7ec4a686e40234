//! The NBD wire protocol, sans-IO.
//!
//! Everything here works on byte buffers: no sockets, no runtime. Decoders
//! are total (they return errors, never panic) and bound every length before
//! allocating, so they can be fed hostile input directly and fuzzed.

pub mod assemble;
pub mod client_handshake;
pub mod consts;
pub mod handshake;
pub mod option;
pub mod reply;
pub mod request;
pub mod server_handshake;
pub mod validate;
mod wire;

pub use wire::Reader;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    #[error("string is not UTF-8 or contains NUL")]
    BadString,
    #[error("trailing bytes after the message")]
    Trailing,
    #[error("{0}")]
    Invalid(&'static str),
}
