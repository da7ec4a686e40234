//! Async NBD client on tokio.
//!
//! [`NbdUri`] parses `nbd://`, `nbd+unix://` (and the TLS forms, which are
//! refused for now); [`Client::connect`] negotiates with the sans-IO
//! handshake from `nbd-proto` (extended headers or structured replies when
//! offered, meta contexts, GO with block sizes, EXPORT_NAME for old
//! servers) and opens several connections when the server allows
//! multi-conn. Requests are pipelined; errors name the command, offset and
//! errno.

mod client;
mod connection;
mod error;
mod negotiate;
mod sending;
mod stream;
mod tls;
mod uri;

pub use client::{Client, ConnectOptions, ContextExtents, list_exports};
pub use connection::Connection;
pub use error::{Error, Result};
pub use nbd_proto::client_handshake::BlockSize;
/// What a connection learned about its export.
pub use nbd_proto::client_handshake::ClientNegotiated as ExportInfo;
pub use nbd_proto::option::ServerEntry;
pub use nbd_proto::reply::{Extent, ReplyMode};
pub use stream::{BoxStream, NbdStream, connect_transport};
pub use tls::{TlsOptions, TlsSetup};
pub use uri::{DEFAULT_PORT, NbdUri, Transport, UriError};
