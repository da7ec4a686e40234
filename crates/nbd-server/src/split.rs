//! Splitting a connection into its reader and writer halves. Sockets split
//! into owned halves without a lock; a TLS stream needs the locking
//! `tokio::io::split`, because its state is shared by both directions.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::zero_copy::ReplyWrite;

pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn ReplyWrite>;

pub trait Split: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn split(self) -> (ReadHalf, WriteHalf);
}

impl Split for tokio::net::TcpStream {
    fn split(self) -> (ReadHalf, WriteHalf) {
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }
}

impl Split for tokio::net::UnixStream {
    fn split(self) -> (ReadHalf, WriteHalf) {
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Split for nbd_tls::server::TlsStream<S> {
    fn split(self) -> (ReadHalf, WriteHalf) {
        let (r, w) = tokio::io::split(self);
        (Box::new(r), Box::new(w))
    }
}
