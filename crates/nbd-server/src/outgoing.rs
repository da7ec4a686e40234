//! Replies on their way out, and the writer task that sends them: it
//! gathers every finished reply it can find and sends headers and data with
//! one vectored write, without copying data into a header buffer.

use std::io::IoSlice;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// A piece of a reply: encoded header bytes, or a range of the data buffer.
pub enum Part {
    Head(BytesMut),
    Data(std::ops::Range<usize>),
}

/// One complete reply (all its chunks). Holding it keeps its in-flight
/// permits, so the reader cannot run ahead of what the writer has sent;
/// dropping it recycles its data buffer.
#[derive(Default)]
pub struct Outgoing {
    pub parts: Vec<Part>,
    pub data: Vec<u8>,
    pub permits: Vec<OwnedSemaphorePermit>,
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        crate::bufpool::POOL.put(std::mem::take(&mut self.data));
    }
}

impl Outgoing {
    pub fn head(head: BytesMut) -> Self {
        let mut out = Outgoing::default();
        out.parts.push(Part::Head(head));
        out
    }

    fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) -> usize {
        let mut total = 0;
        for p in &self.parts {
            let s: &[u8] = match p {
                Part::Head(h) => h,
                Part::Data(r) => &self.data[r.clone()],
            };
            if !s.is_empty() {
                total += s.len();
                out.push(IoSlice::new(s));
            }
        }
        total
    }
}

const MAX_BATCH_MESSAGES: usize = 64;
const MAX_BATCH_BYTES: usize = 4 << 20;

/// Sends replies until every sender is gone, then shuts the stream down.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH_MESSAGES);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let mut bytes = 0;
        while batch.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.data.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let mut slices = Vec::with_capacity(batch.len() * 3);
        for m in &batch {
            m.slices(&mut slices);
        }
        write_all_vectored(&mut w, &mut slices).await?;
        batch.clear();
    }
    w.flush().await?;
    w.shutdown().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        // writev takes at most IOV_MAX (1024) slices.
        let n = w.write_vectored(&slices[..slices.len().min(512)]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}
