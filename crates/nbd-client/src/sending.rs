//! The sending side of a connection.
//!
//! A request is written straight from the task that makes it when the
//! socket is free and takes it without waiting: at queue depth 1 that saves
//! waking the writer task, a cross-thread wakeup per request (a device
//! layer on the blocking pool, such as the copy-on-read layer fetching a
//! block, would otherwise pay one on every fetch). Otherwise the request
//! queues for the writer task, which sends everything queued in one
//! vectored write. Either way a request goes out whole: whoever finds a
//! request half-sent (the socket was full) finishes it before sending
//! anything else.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::sync::{Mutex, mpsc};

use crate::stream::WriteHalf;

/// Most requests sent with one vectored write (two slices each, well under
/// the kernel's IOV_MAX of 1024).
const MAX_BATCH: usize = 256;

/// Larger write payloads go through the writer task even when the socket
/// is free: the caller can then prepare its next request while the writer
/// copies this one into the socket.
const MAX_DIRECT_PAYLOAD: usize = 256 * 1024;

/// One request on its way out.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub header: BytesMut,
    pub payload: Option<Bytes>,
    /// NBD_CMD_DISC: nothing may be sent after it.
    pub last: bool,
}

impl Outgoing {
    fn payload_len(&self) -> usize {
        self.payload.as_ref().map_or(0, Bytes::len)
    }

    fn wire_len(&self) -> usize {
        self.header.len() + self.payload_len()
    }

    /// What is left to send after the first `done` bytes: header, then
    /// payload (either may be empty).
    fn rest(&self, done: usize) -> [IoSlice<'_>; 2] {
        let h = self.header.len();
        let p = self.payload.as_deref().unwrap_or_default();
        [
            IoSlice::new(&self.header[done.min(h)..]),
            IoSlice::new(&p[done.saturating_sub(h).min(p.len())..]),
        ]
    }
}

/// The write half and the request it left half-sent, if any.
struct Wire {
    w: WriteHalf,
    carry: Option<(Outgoing, usize)>,
}

/// Sends requests on one connection (see the module comment).
pub(crate) struct Sender {
    wire: Arc<Mutex<Wire>>,
    queue: mpsc::UnboundedSender<Outgoing>,
}

/// Why a send failed: the stream broke (the connection is over) or the
/// writer task is gone.
pub(crate) enum SendError {
    Io(std::io::Error),
    Closed,
}

impl Sender {
    /// A sender over `w`, and the writer task's future: it runs until the
    /// DISC request is sent or every sender is gone (then it shuts the
    /// stream down), or a write fails (its error).
    pub fn new(
        w: WriteHalf,
    ) -> (
        Self,
        impl std::future::Future<Output = std::io::Result<()>> + Send + 'static,
    ) {
        let wire = Arc::new(Mutex::new(Wire { w, carry: None }));
        let (queue, rx) = mpsc::unbounded_channel();
        let task = write_loop(wire.clone(), rx);
        (Sender { wire, queue }, task)
    }

    /// Sends `out` now as far as the socket takes it without waiting, if no
    /// other send is under way; queues it for the writer task otherwise.
    pub fn send(&self, out: Outgoing) -> Result<(), SendError> {
        if out.last || out.payload_len() > MAX_DIRECT_PAYLOAD {
            return self.queue(out);
        }
        let mut wire = match self.wire.try_lock() {
            Ok(wire) if wire.carry.is_none() => wire,
            _ => return self.queue(out),
        };
        let done = write_without_waiting(&mut wire.w, &out).map_err(SendError::Io)?;
        if let Some(done) = done {
            wire.carry = Some((out, done));
            drop(wire);
            // Wakes the writer to finish it.
            return self.queue(Outgoing::default());
        }
        Ok(())
    }

    fn queue(&self, out: Outgoing) -> Result<(), SendError> {
        self.queue.send(out).map_err(|_| SendError::Closed)
    }
}

/// Writes and flushes `out` as far as `w` allows without waiting. Returns
/// how many bytes went out if that is not everything (or the flush is still
/// pending), None when the request is fully sent.
fn write_without_waiting(w: &mut WriteHalf, out: &Outgoing) -> std::io::Result<Option<usize>> {
    // Polled once with a waker that does nothing: Pending just means "not
    // now"; the writer task polls again with its own waker.
    let mut cx = Context::from_waker(Waker::noop());
    let total = out.wire_len();
    let mut done = 0;
    while done < total {
        match Pin::new(&mut *w).poll_write_vectored(&mut cx, &out.rest(done)) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => done += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(Some(done)),
        }
    }
    match Pin::new(&mut *w).poll_flush(&mut cx) {
        Poll::Ready(r) => r.map(|()| None),
        Poll::Pending => Ok(Some(done)),
    }
}

async fn write_loop(
    wire: Arc<Mutex<Wire>>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
    loop {
        let Some(first) = rx.recv().await else {
            // Every sender is gone: the connection was dropped. Closing our
            // side lets the server see EOF.
            let mut wire = wire.lock().await;
            finish_carry(&mut wire).await?;
            return wire.w.shutdown().await;
        };
        let mut last = first.last;
        batch.push(first);
        // Everything already queued goes out with the same system call.
        while !last && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => {
                    last = m.last;
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let mut wire = wire.lock().await;
        finish_carry(&mut wire).await?;
        write_all(&mut wire.w, &batch, 0).await?;
        // The payloads go back to their owners as soon as they are sent.
        batch.clear();
        if last {
            return wire.w.shutdown().await;
        }
    }
}

/// Sends what a direct send left over.
async fn finish_carry(wire: &mut Wire) -> std::io::Result<()> {
    if let Some((out, done)) = wire.carry.take() {
        write_all(&mut wire.w, std::slice::from_ref(&out), done).await?;
    }
    Ok(())
}

/// Writes `batch` (less the first `done` bytes of its first request) and
/// flushes.
async fn write_all(w: &mut WriteHalf, batch: &[Outgoing], done: usize) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * batch.len());
    for (i, m) in batch.iter().enumerate() {
        let rest = m.rest(if i == 0 { done } else { 0 });
        slices.extend(rest.into_iter().filter(|s| !s.is_empty()));
    }
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    w.flush().await
}
