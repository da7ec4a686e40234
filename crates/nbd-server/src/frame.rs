//! Buffered reading of requests: many small requests come in with one
//! syscall, while large WRITE payloads go straight into their own buffer.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

const READ_AHEAD: usize = 64 * 1024;

pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `pending` holds bytes already read past the end of the handshake.
    pub fn new(inner: R, pending: BytesMut) -> Self {
        let mut buf = BytesMut::with_capacity(READ_AHEAD.max(pending.len()));
        buf.extend_from_slice(&pending);
        FrameReader { inner, buf }
    }

    /// Makes at least `n` bytes available. Returns false on a clean end of
    /// stream before the first byte.
    pub async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < READ_AHEAD / 4 {
                self.buf.reserve(READ_AHEAD);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(true)
    }

    pub fn peek(&self, n: usize) -> &[u8] {
        &self.buf[..n]
    }

    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
    }

    /// Reads exactly `dst.len()` payload bytes.
    pub async fn read_payload(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        let have = self.buf.len().min(dst.len());
        dst[..have].copy_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        if have < dst.len() {
            self.inner.read_exact(&mut dst[have..]).await?;
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
            let got = self.inner.read(&mut scratch[..want]).await?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            n -= got as u64;
        }
        Ok(())
    }
}
