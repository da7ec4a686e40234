//! Framing: the request stream cut into request headers and payloads.
//! Many small requests come in with one syscall, while large WRITE
//! payloads go straight into their own buffer. A client that stops in the
//! middle of a header or a payload is cut off at the stall deadline.

use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use nbd_proto::request::Request;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::deadline::{Stall, progress};

const READ_AHEAD: usize = 64 * 1024;

pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    extended: bool,
    stall: Duration,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `pending` holds bytes already read past the end of the handshake;
    /// `extended`: the headers are extended ones.
    pub fn new(inner: R, pending: BytesMut, extended: bool, stall: Duration) -> Self {
        let mut buf = BytesMut::with_capacity(READ_AHEAD.max(pending.len()));
        buf.extend_from_slice(&pending);
        FrameReader {
            inner,
            buf,
            extended,
            stall,
        }
    }

    /// The next request header; None at a clean end of stream. Cancel
    /// safe: bytes read stay buffered for the next call.
    pub async fn next_request(&mut self) -> std::io::Result<Option<Request>> {
        let hlen = Request::header_len(self.extended);
        if !self.fill(hlen).await? {
            return Ok(None);
        }
        let req = Request::decode(&self.buf[..hlen], self.extended)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        self.buf.advance(hlen);
        Ok(Some(req))
    }

    /// The next request if it has arrived already, without waiting: after
    /// shutdown, the requests a client sent before it could know.
    pub fn request_if_ready(&mut self) -> std::io::Result<Option<Request>> {
        // One poll with a waker that does nothing: Pending means "not yet".
        let next = pin!(self.next_request());
        match next.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(None),
        }
    }

    /// Whether part of a request has arrived (its rest is due).
    pub fn mid_request(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Makes at least `n` bytes available. Returns false on a clean end of
    /// stream before the first byte. Once a request has begun, its rest
    /// must keep coming.
    async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < READ_AHEAD / 4 {
                self.buf.reserve(READ_AHEAD);
            }
            let started = self.mid_request();
            let read = self.inner.read_buf(&mut self.buf);
            let got = if started {
                progress(self.stall, Stall::Request, read).await?
            } else {
                read.await?
            };
            if got == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(true)
    }

    /// Reads exactly `dst.len()` payload bytes.
    pub async fn read_payload(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        let have = self.buf.len().min(dst.len());
        dst[..have].copy_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        let mut rest = &mut dst[have..];
        while !rest.is_empty() {
            let got = progress(self.stall, Stall::Request, self.inner.read(rest)).await?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            rest = &mut rest[got..];
        }
        Ok(())
    }

    /// Skips `n` payload bytes without keeping them.
    pub async fn discard(&mut self, mut n: u64) -> std::io::Result<()> {
        let have = (self.buf.len() as u64).min(n) as usize;
        self.buf.advance(have);
        n -= have as u64;
        let mut scratch = vec![0u8; 64 * 1024];
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            let read = self.inner.read(&mut scratch[..want]);
            let got = progress(self.stall, Stall::Request, read).await?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            n -= got as u64;
        }
        Ok(())
    }
}
