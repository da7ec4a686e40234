//! Byte streams the client runs over. Everything above this module is
//! generic over [`NbdStream`], so a TLS stream can later be slotted in as
//! just another implementation.

use std::any::Any;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, Result};
use crate::uri::{NbdUri, Transport};

/// The read half a connection's reader task owns.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half a connection's writer task owns.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Any duplex byte stream: TCP, Unix socket, TLS over either, a pipe pair.
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Splits the stream for one reader and one writer task.
    fn into_halves(self: Box<Self>) -> (ReadHalf, WriteHalf);
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> NbdStream for T {
    fn into_halves(self: Box<Self>) -> (ReadHalf, WriteHalf) {
        // Sockets split into owned halves that need no lock, so a reader
        // copying a large payload out of the socket never blocks the writer
        // (tokio::io::split holds one lock across every read and write).
        let any: Box<dyn Any> = self;
        let any = match any.downcast::<TcpStream>() {
            Ok(s) => {
                let (r, w) = s.into_split();
                return (Box::new(r), Box::new(w));
            }
            Err(any) => any,
        };
        let any = match any.downcast::<UnixStream>() {
            Ok(s) => {
                let (r, w) = s.into_split();
                return (Box::new(r), Box::new(w));
            }
            Err(any) => any,
        };
        match any.downcast::<T>() {
            Ok(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
            Err(_) => unreachable!("the box holds a T"),
        }
    }
}

/// The stream type connections use after connecting.
pub type BoxStream = Box<dyn NbdStream>;

/// Opens the transport a URI names (TLS starts later, inside the NBD
/// handshake).
pub async fn connect_transport(uri: &NbdUri) -> Result<BoxStream> {
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|source| Error::Connect {
                    target: format!("{host}:{port}"),
                    source,
                })?;
            // Requests and replies are small messages that must not wait
            // for Nagle's algorithm (spec: both ends SHOULD set it).
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Transport::Unix { path } => {
            let s = UnixStream::connect(path)
                .await
                .map_err(|source| Error::Connect {
                    target: path.display().to_string(),
                    source,
                })?;
            Ok(Box::new(s))
        }
    }
}
