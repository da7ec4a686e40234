//! Replies on their way out, and the writer task that sends them: it
//! gathers every finished reply it can find and sends headers and data with
//! one vectored write, without copying data into a header buffer.
//!
//! The reader task never waits for the socket. A reply it makes is written
//! at once only as far as the socket takes it without blocking; the rest
//! is left to the writer. So a client that has many reads in flight and
//! then asks for block status gets that answer promptly: the request is
//! read and answered while read replies still wait to be sent, and replies
//! without a data payload jump the queue of data replies. nbdcopy, for
//! one, waits for block status at every 128 MiB; served in order, it first
//! took every read reply, freed all its buffers, and page-faulted them all
//! in again (4x its faults, about 20% of its run time).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::BytesMut;
use ferry_block::FileSpan;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::admission::Permits;
use crate::deadline::{Stall, progress};
use crate::zero_copy::ReplyWrite;

/// A piece of a reply: encoded header bytes, a range of the data buffer,
/// or bytes of a file sent from the page cache (`zero_copy.rs`).
pub enum Part {
    Head(BytesMut),
    Data(std::ops::Range<usize>),
    File(FileSpan, usize),
}

/// A part as the writer sends it.
enum Piece<'a> {
    Bytes(&'a [u8]),
    File(&'a FileSpan, usize),
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Piece::Bytes(b) => b.len(),
            Piece::File(_, n) => *n,
        }
    }
}

/// One complete reply (all its chunks). Holding it keeps its in-flight
/// permits, so the reader cannot run ahead of what the writer has sent;
/// dropping it recycles its data buffer.
#[derive(Default)]
pub struct Outgoing {
    pub parts: Vec<Part>,
    pub data: Vec<u8>,
    pub permits: Option<Permits>,
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        crate::bufpool::POOL.put(std::mem::take(&mut self.data));
    }
}

impl Outgoing {
    /// Bytes of data this reply carries (its buffer may be larger).
    fn payload_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Data(r) => r.len(),
                Part::File(_, n) => *n,
                Part::Head(_) => 0,
            })
            .sum()
    }

    /// Bytes of the whole reply on the wire.
    fn wire_len(&self) -> usize {
        self.pieces().map(|p| p.len()).sum()
    }

    pub fn head(head: BytesMut) -> Self {
        let mut out = Outgoing::default();
        out.parts.push(Part::Head(head));
        out
    }

    fn pieces(&self) -> impl Iterator<Item = Piece<'_>> {
        self.parts.iter().map(|p| match p {
            Part::Head(h) => Piece::Bytes(h),
            Part::Data(r) => Piece::Bytes(&self.data[r.clone()]),
            Part::File(span, n) => Piece::File(span, *n),
        })
    }
}

/// writev takes at most IOV_MAX (1024) slices.
const MAX_SLICES: usize = 512;
/// What a file that ended early is padded with: a reply always goes out
/// whole, and a read past a file's end reads zeroes.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

/// One system call's worth of progress on `msgs`, from byte `skip` of
/// their concatenation: a vectored write of the bytes up to the next file
/// piece (telling the socket that file bytes follow), or a piece of a
/// file. Ready(Ok(0)) when nothing is left.
fn poll_step<W: ReplyWrite>(
    w: &mut W,
    cx: &mut Context<'_>,
    msgs: &[Outgoing],
    mut skip: usize,
) -> Poll<std::io::Result<usize>> {
    let mut slices: Vec<IoSlice<'_>> = Vec::new();
    for piece in msgs.iter().flat_map(Outgoing::pieces) {
        let len = piece.len();
        if skip >= len {
            skip -= len;
            continue;
        }
        match piece {
            Piece::Bytes(b) => {
                slices.push(IoSlice::new(&b[skip..]));
                skip = 0;
                if slices.len() == MAX_SLICES {
                    break;
                }
            }
            Piece::File(span, len) if slices.is_empty() => {
                let want = len - skip;
                let offset = span.offset + skip as u64;
                return match ready!(w.poll_send_file(cx, &span.file, offset, want))? {
                    0 => Pin::new(w).poll_write(cx, &ZEROES[..want.min(ZEROES.len())]),
                    n => Poll::Ready(Ok(n)),
                };
            }
            Piece::File(..) => return w.poll_write_more(cx, &slices),
        }
    }
    if slices.is_empty() {
        return Poll::Ready(Ok(0));
    }
    Pin::new(w).poll_write_vectored(cx, &slices)
}

/// Sends `msgs` from byte `pos` on, and flushes; fails when no byte goes
/// out for `stall`.
async fn send_all<W: ReplyWrite>(
    w: &mut W,
    msgs: &[Outgoing],
    mut pos: usize,
    stall: Duration,
) -> std::io::Result<()> {
    let total: usize = msgs.iter().map(Outgoing::wire_len).sum();
    while pos < total {
        let step = std::future::poll_fn(|cx| poll_step(w, cx, msgs, pos));
        match progress(stall, Stall::Replies, step).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => pos += n,
        }
    }
    // A TLS stream may take the plaintext but keep records it could not
    // send yet (socket full); nothing else would push them out before the
    // next reply, so a client waiting for this one would hang. A no-op on
    // plain sockets.
    progress(stall, Stall::Replies, w.flush()).await
}

const MAX_BATCH_MESSAGES: usize = 64;
const MAX_BATCH_BYTES: usize = 4 << 20;

/// The stream, and what a direct send could not finish: the writer sends
/// that remainder (and flushes) before anything else.
struct Wire<W> {
    w: W,
    carry: Option<(Outgoing, usize)>,
    /// The writer gives up when the client takes no byte for this long.
    stall: Duration,
}

impl<W: ReplyWrite> Wire<W> {
    /// Sends (and flushes) what a direct send left over; returns the data
    /// bytes of that reply.
    async fn finish_carry(&mut self) -> std::io::Result<usize> {
        let Some((out, done)) = self.carry.take() else {
            return Ok(0);
        };
        send_all(&mut self.w, std::slice::from_ref(&out), done, self.stall).await?;
        Ok(out.payload_len())
    }
}

/// Data bytes of replies that wait for the writer. Beyond this the reader
/// holds READs back (and goes on with other requests): a client that reads
/// replies slower than they are made then pins a few MiB per connection,
/// not all that its requests in flight may (`--max-inflight-bytes`).
const BACKLOG_MAX: usize = 8 << 20;

#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    drained: Notify,
    /// The writer is gone: nothing will drain, so nobody should wait.
    closed: CancellationToken,
}

/// Marks the backlog closed when the writer task ends, however it ends.
struct CloseOnDrop(Arc<Backlog>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.closed.cancel();
        self.0.drained.notify_one();
    }
}

impl Backlog {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn sent(&self, n: usize) {
        if n > 0 {
            self.bytes.fetch_sub(n, Ordering::AcqRel);
            self.drained.notify_one();
        }
    }
}

/// The sending side of a connection: a reply is written directly by the
/// thread that made it (the reader's task or a blocking-pool thread) when
/// the socket is free, which saves waking the writer (a cross-thread
/// wakeup per request otherwise); else it queues for the writer task.
pub struct ReplySink<W> {
    urgent: mpsc::UnboundedSender<Outgoing>,
    bulk: mpsc::UnboundedSender<Outgoing>,
    wr: Arc<Mutex<Wire<W>>>,
    backlog: Arc<Backlog>,
}

impl<W> Clone for ReplySink<W> {
    fn clone(&self) -> Self {
        ReplySink {
            urgent: self.urgent.clone(),
            bulk: self.bulk.clone(),
            wr: self.wr.clone(),
            backlog: self.backlog.clone(),
        }
    }
}

impl<W: ReplyWrite + 'static> ReplySink<W> {
    /// A sink over `w` and its writer task, which ends (after shutting the
    /// stream down) once every sink is dropped, or fails when the client
    /// takes no byte of its replies for `stall`.
    pub fn new(w: W, stall: Duration) -> (Self, tokio::task::JoinHandle<std::io::Result<()>>) {
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::unbounded_channel();
        let wr = Arc::new(Mutex::new(Wire {
            w,
            carry: None,
            stall,
        }));
        let backlog = Arc::new(Backlog::default());
        let writer = tokio::spawn(write_loop(wr.clone(), backlog.clone(), urgent_rx, bulk_rx));
        let sink = ReplySink {
            urgent,
            bulk,
            wr,
            backlog,
        };
        (sink, writer)
    }

    /// Whether the replies waiting for the writer hold at most
    /// `BACKLOG_MAX` bytes of data (or the writer is gone).
    pub fn has_room(&self) -> bool {
        self.backlog.bytes.load(Ordering::Acquire) <= BACKLOG_MAX
            || self.backlog.closed.is_cancelled()
    }

    /// Returns once the writer task has ended. While a sink exists it only
    /// ends by failing (a stalled client, a broken stream): replies can no
    /// longer be sent, so the connection is over.
    pub async fn gone(&self) {
        self.backlog.closed.cancelled().await
    }

    /// Returns once [`has_room`](Self::has_room).
    pub async fn room(&self) {
        loop {
            let drained = self.backlog.drained.notified();
            if self.has_room() {
                return;
            }
            drained.await;
        }
    }

    /// Queues a reply for the writer task (from any thread).
    pub fn queue(&self, out: Outgoing) {
        self.backlog.add(out.payload_len());
        let q = if out.payload_len() == 0 {
            &self.urgent
        } else {
            &self.bulk
        };
        // The writer only goes away with the connection.
        let _ = q.send(out);
    }

    /// Sends a reply now, as far as the socket takes it without waiting,
    /// if no other write is under way; queues it otherwise.
    pub fn send(&self, out: Outgoing) -> std::io::Result<()> {
        let len = out.payload_len();
        if len > MAX_DIRECT_REPLY {
            self.queue(out);
            return Ok(());
        }
        let mut wire = match self.wr.try_lock() {
            Ok(wire) if wire.carry.is_none() => wire,
            _ => {
                self.queue(out);
                return Ok(());
            }
        };
        let done = write_without_waiting(&mut wire.w, &out)?;
        if let Some(done) = done {
            self.backlog.add(len);
            wire.carry = Some((out, done));
            drop(wire);
            // Wakes the writer to finish it.
            self.queue(Outgoing::default());
        }
        Ok(())
    }

    /// [`send`](Self::send) from a thread that cannot end the connection
    /// itself (the blocking pool): when the stream breaks, the reader is
    /// told through [`gone`](Self::gone), as when the writer fails.
    pub fn send_or_close(&self, out: Outgoing) {
        if let Err(e) = self.send(out) {
            tracing::debug!("reply failed: {e}");
            self.backlog.closed.cancel();
        }
    }
}

/// Writes and flushes `out` as far as `w` allows without waiting. Returns
/// how many bytes went out if that is not everything (or the flush is
/// still pending), None when the reply is fully sent.
fn write_without_waiting<W: ReplyWrite>(
    w: &mut W,
    out: &Outgoing,
) -> std::io::Result<Option<usize>> {
    // Polled once with a waker that does nothing: Pending just means "not
    // now"; the writer task polls again with its own waker.
    let mut cx = Context::from_waker(Waker::noop());
    let total = out.wire_len();
    let mut done = 0;
    while done < total {
        match poll_step(w, &mut cx, std::slice::from_ref(out), done) {
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

/// Larger replies go through the writer task even when the socket is free:
/// the reader can then copy the next request's data while the writer
/// copies this one into the socket (qemu-img convert's 2 MiB reads gained
/// about 10% with it; small replies are cheaper sent directly).
const MAX_DIRECT_REPLY: usize = 256 * 1024;

/// Sends queued replies, payload-less ones first, until every sender is
/// gone, then shuts the stream down.
async fn write_loop<W: ReplyWrite>(
    wr: Arc<Mutex<Wire<W>>>,
    backlog: Arc<Backlog>,
    mut urgent: mpsc::UnboundedReceiver<Outgoing>,
    mut bulk: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    let _close = CloseOnDrop(backlog.clone());
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH_MESSAGES);
    loop {
        let first = tokio::select! {
            biased;
            Some(m) = urgent.recv() => m,
            Some(m) = bulk.recv() => m,
            else => break,
        };
        let mut bytes = first.payload_len();
        batch.push(first);
        while batch.len() < MAX_BATCH_MESSAGES {
            match urgent.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        while batch.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
            match bulk.try_recv() {
                Ok(m) => {
                    bytes += m.payload_len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let mut wire = wr.lock().await;
        backlog.sent(wire.finish_carry().await?);
        let stall = wire.stall;
        send_all(&mut wire.w, &batch, 0, stall).await?;
        drop(wire);
        backlog.sent(bytes);
        batch.clear();
    }
    let mut wire = wr.lock().await;
    wire.finish_carry().await?;
    let stall = wire.stall;
    progress(stall, Stall::Replies, wire.w.flush()).await?;
    progress(stall, Stall::Replies, wire.w.shutdown()).await
}
