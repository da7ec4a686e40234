//! Byte streams the client runs over. Everything above this module is
//! generic over [`NbdStream`], so a TLS stream can later be slotted in as
//! just another implementation.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{Error, Result};
use crate::uri::{NbdUri, Transport};

/// Any duplex byte stream: TCP, Unix socket, TLS over either, a pipe pair.
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> NbdStream for T {}

/// The stream type connections use after connecting.
pub type BoxStream = Box<dyn NbdStream>;

/// Opens the transport a URI names. TLS URIs are refused for now.
pub async fn connect_transport(uri: &NbdUri) -> Result<BoxStream> {
    if uri.tls {
        return Err(Error::TlsNotSupported);
    }
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
