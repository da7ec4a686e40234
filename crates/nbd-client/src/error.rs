//! The client's error type: every failure names what went wrong in terms a
//! user can act on (the command, offset and errno of a server error).

use nbd_proto::assemble::Violation;
use nbd_proto::client_handshake::HandshakeError;
use nbd_proto::consts::{cmd, errno};

use crate::uri::UriError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("{0}")]
    Tls(String),
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake timed out after {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered a request with an error.
    #[error("server error on {command} at offset {offset} length {length}: {} ({errno}){}", errno_name(*.errno), message_suffix(.message))]
    Server {
        command: &'static str,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
    },
    /// Requests waited this long without a byte from the server; the
    /// connection was dropped.
    #[error("the server did not answer for {0:?} (I/O timeout)")]
    Timeout(std::time::Duration),
    /// The connection is gone; every request waiting on it fails with this.
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// The server broke the protocol; the connection was dropped.
    #[error("protocol error from server: {0}")]
    Protocol(String),
    /// The request cannot be sent to this export (flag missing, out of
    /// range, misaligned, too long).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("export does not support {0}")]
    Unsupported(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A reply the server may not send ends the connection.
impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Error::Protocol(v.to_string())
    }
}

fn errno_name(e: u32) -> &'static str {
    match errno::name(e) {
        // Unknown values are to be treated as EINVAL; say so.
        "unknown error" => "unknown error, treated as EINVAL",
        n => n,
    }
}

fn message_suffix(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

impl Error {
    pub(crate) fn server(
        command: u16,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
    ) -> Self {
        Error::Server {
            command: cmd::name(command),
            offset,
            length,
            errno,
            message,
        }
    }

    /// The NBD errno of a server error.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Error::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
