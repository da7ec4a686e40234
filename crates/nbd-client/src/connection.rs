//! One negotiated connection in transmission: many requests in flight,
//! replies routed by cookie.
//!
//! Requests go out from the task that makes them when the socket is free,
//! else through a writer task that sends everything queued in one vectored
//! write, headers and write payloads side by side (no copy into a staging
//! buffer; see `sending`). A reader task decodes
//! replies and completes the waiting request; what a reply may contain, and
//! where its data goes, is decided by the request's `ReplyAssembler`
//! (nbd-proto), and the reader only moves bytes: read data land directly in
//! the caller's buffer at the chunk's offset, straight from the socket (only
//! the bytes that arrived together with a header pass through the small read
//! buffer). When either task fails, or the server sends nothing for the I/O
//! timeout while requests wait, the connection is marked dead and every
//! waiting request gets the error, so nothing waits on a connection that
//! cannot answer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_proto::assemble::{Failure, Next, Outcome, ReplyAssembler, reply_header_len};
use nbd_proto::consts::{cmd, cmdflag};
use nbd_proto::reply::{Extent, ReplyHeader, ReplyMode};
use nbd_proto::request::Request;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::ExportInfo;
use crate::error::{Error, Result};
use crate::sending::{Outgoing, SendError, Sender};
use crate::stream::{BoxStream, ReadHalf};

/// Read buffer for reply headers and small payloads. Small on purpose:
/// bulk read data is read past it into the caller's buffer, and whatever
/// sits in it when a data chunk starts is copied once more.
const READ_BUFFER: usize = 16 * 1024;

/// A request waiting for its reply.
struct Pending {
    reply: ReplyAssembler,
    tx: oneshot::Sender<Result<Outcome>>,
}

impl Pending {
    fn complete(self) {
        let (command, offset, length) = (
            self.reply.command(),
            self.reply.offset(),
            self.reply.length(),
        );
        let result = self.reply.finish().map_err(|f| match f {
            Failure::Server(e) => Error::server(command, e.offset, length, e.errno, e.message),
            Failure::Violation(v) => Error::Protocol(format!(
                "{} at {offset} length {length}: {v}",
                cmd::name(command)
            )),
        });
        // The caller may have given up waiting; nothing to do then.
        let _ = self.tx.send(result);
    }

    fn fail(self, e: Error) {
        let _ = self.tx.send(Err(e));
    }
}

/// Why a connection is unusable.
#[derive(Debug, Clone)]
enum Dead {
    Timeout(Duration),
    /// The server broke the protocol.
    Protocol(String),
    Closed(String),
}

impl Dead {
    fn error(&self) -> Error {
        match self {
            Dead::Timeout(d) => Error::Timeout(*d),
            Dead::Protocol(m) => Error::Protocol(m.clone()),
            Dead::Closed(why) => Error::Disconnected(why.clone()),
        }
    }
}

#[derive(Default)]
struct Table {
    map: HashMap<u64, Pending>,
    /// Since when requests have been waiting without a break (None while
    /// none wait): the I/O timeout counts from here or from the last byte
    /// received, whichever is later.
    busy_since: Option<Instant>,
    dead: Option<Dead>,
}

impl Table {
    fn insert(&mut self, cookie: u64, p: Pending) {
        if self.map.is_empty() {
            self.busy_since = Some(Instant::now());
        }
        self.map.insert(cookie, p);
    }

    fn remove(&mut self, cookie: u64) -> Option<Pending> {
        let p = self.map.remove(&cookie);
        if self.map.is_empty() {
            self.busy_since = None;
        }
        p
    }
}

struct Shared {
    table: Mutex<Table>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic elsewhere must not take the client down with poison.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail_all(&self, why: Dead) {
        let (drained, why) = {
            let mut t = self.lock();
            let why = t.dead.get_or_insert(why).clone();
            t.busy_since = None;
            (t.map.drain().map(|(_, p)| p).collect::<Vec<_>>(), why)
        };
        for p in drained {
            p.fail(why.error());
        }
    }
}

/// A connection in transmission phase.
pub struct Connection {
    info: Arc<ExportInfo>,
    shared: Arc<Shared>,
    sender: Sender,
    slots: Arc<Semaphore>,
    max_in_flight: u32,
    next_cookie: AtomicU64,
    reader: JoinHandle<()>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        // A writer stuck on a server that stopped reading must not outlive
        // the connection either.
        if let Some(w) = self
            .writer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.abort();
        }
    }
}

impl Connection {
    /// Starts transmission on a negotiated stream with at most `in_flight`
    /// requests outstanding. With an `io_timeout`, the connection fails
    /// once requests have waited that long without a byte from the server.
    pub fn start(
        stream: BoxStream,
        info: ExportInfo,
        in_flight: usize,
        io_timeout: Option<Duration>,
    ) -> Self {
        let in_flight = in_flight.clamp(1, 1 << 16);
        let info = Arc::new(info);
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
        });
        let (rd, wr) = stream.into_halves();
        let (sender, write_loop) = Sender::new(wr);
        let rd = Watched::new(rd, shared.clone(), io_timeout);
        let reader = tokio::spawn(reader_task(rd, shared.clone(), info.clone()));
        let writer = tokio::spawn({
            let shared = shared.clone();
            async move {
                if let Err(e) = write_loop.await {
                    shared.fail_all(Dead::Closed(format!("write failed: {e}")));
                }
            }
        });
        Connection {
            info,
            shared,
            sender,
            slots: Arc::new(Semaphore::new(in_flight)),
            max_in_flight: in_flight as u32,
            next_cookie: AtomicU64::new(1),
            reader,
            writer: Mutex::new(Some(writer)),
        }
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Free request slots right now (for picking the least busy connection).
    pub fn idle_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// True once the connection failed or was closed.
    pub fn is_dead(&self) -> bool {
        self.shared.lock().dead.is_some()
    }

    fn check_range(&self, what: &str, offset: u64, length: u64) -> Result<()> {
        let size = self.info.size;
        if offset > size || length > size - offset {
            return Err(Error::InvalidRequest(format!(
                "{what} at {offset} length {length} is beyond the export size {size}"
            )));
        }
        let align = u64::from(self.info.min_block());
        // The export's tail may be unaligned; a request ending there is fine.
        if !offset.is_multiple_of(align)
            || (!length.is_multiple_of(align) && offset + length != size)
        {
            return Err(Error::InvalidRequest(format!(
                "{what} at {offset} length {length} is not aligned to the minimum block size {align}"
            )));
        }
        Ok(())
    }

    fn check_payload(&self, what: &str, length: u64) -> Result<()> {
        let max = self.info.max_payload();
        if length > u64::from(max) {
            return Err(Error::InvalidRequest(format!(
                "{what} of {length} bytes exceeds the maximum payload {max}"
            )));
        }
        Ok(())
    }

    fn check_effect_length(&self, what: &str, length: u64) -> Result<()> {
        if self.info.mode != ReplyMode::Extended && length > u64::from(u32::MAX) {
            return Err(Error::InvalidRequest(format!(
                "{what} of {length} bytes needs extended headers"
            )));
        }
        Ok(())
    }

    /// A request header in the negotiated form.
    fn encode(
        &self,
        mut flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: bool,
    ) -> BytesMut {
        let extended = self.info.mode == ReplyMode::Extended;
        if extended && payload {
            flags |= cmdflag::PAYLOAD_LEN;
        }
        let mut header = BytesMut::with_capacity(32);
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut header, extended);
        header
    }

    /// Sends the request that `reply` will receive the reply to (its
    /// command, offset and length) and waits for that reply.
    async fn submit(
        &self,
        flags: u16,
        payload: Option<Bytes>,
        reply: ReplyAssembler,
    ) -> Result<Outcome> {
        let (command, offset, length) = (reply.command(), reply.offset(), reply.length());
        let _permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Disconnected("connection closed".into()))?;
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let header = self.encode(flags, command, cookie, offset, length, payload.is_some());
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.shared.lock();
            if let Some(why) = &t.dead {
                return Err(why.error());
            }
            t.insert(cookie, Pending { reply, tx });
        }
        let msg = Outgoing {
            header,
            payload,
            last: false,
        };
        match self.sender.send(msg) {
            Ok(()) => {}
            Err(SendError::Io(e)) => {
                // Part of the request may be on the wire: nothing more can
                // be sent on this stream.
                self.shared
                    .fail_all(Dead::Closed(format!("write failed: {e}")));
            }
            Err(SendError::Closed) => {
                self.shared.lock().remove(cookie);
                return Err(Error::Disconnected("connection closed".into()));
            }
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(Error::Disconnected("connection closed".into())),
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` and hands it back.
    /// Holes in structured replies come back as zeroes.
    pub async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let length = buf.len() as u64;
        self.check_range("READ", offset, length)?;
        self.check_payload("READ", length)?;
        let reply = ReplyAssembler::read(offset, buf, self.info.mode);
        Ok(self.submit(0, None, reply).await?.data)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if self.info.read_only() {
            return Err(Error::Unsupported("writes (export is read-only)"));
        }
        let length = data.len() as u64;
        self.check_range("WRITE", offset, length)?;
        self.check_payload("WRITE", length)?;
        let flags = self.fua_flag(fua);
        let reply = self.plain(cmd::WRITE, offset, length);
        self.submit(flags, Some(data), reply).await.map(drop)
    }

    /// The reply to a command whose success carries nothing.
    fn plain(&self, command: u16, offset: u64, length: u64) -> ReplyAssembler {
        ReplyAssembler::plain(command, offset, length, self.info.mode)
    }

    fn fua_flag(&self, fua: bool) -> u16 {
        if fua && self.info.can_fua() {
            cmdflag::FUA
        } else {
            0
        }
    }

    /// Zeroes a range; without `no_hole` the server may punch a hole.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<()> {
        if !self.info.can_zero() || self.info.read_only() {
            return Err(Error::Unsupported("WRITE_ZEROES"));
        }
        if fast && !self.info.can_fast_zero() {
            return Err(Error::Unsupported("fast zeroing"));
        }
        self.check_range("WRITE_ZEROES", offset, length)?;
        self.check_effect_length("WRITE_ZEROES", length)?;
        let mut flags = 0;
        if no_hole {
            flags |= cmdflag::NO_HOLE;
        }
        if fast {
            flags |= cmdflag::FAST_ZERO;
        }
        let reply = self.plain(cmd::WRITE_ZEROES, offset, length);
        self.submit(flags, None, reply).await.map(drop)
    }

    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        if !self.info.can_trim() || self.info.read_only() {
            return Err(Error::Unsupported("TRIM"));
        }
        self.check_range("TRIM", offset, length)?;
        self.check_effect_length("TRIM", length)?;
        let reply = self.plain(cmd::TRIM, offset, length);
        self.submit(0, None, reply).await.map(drop)
    }

    pub async fn flush(&self) -> Result<()> {
        if !self.info.can_flush() {
            return Err(Error::Unsupported("FLUSH"));
        }
        let reply = self.plain(cmd::FLUSH, 0, 0);
        self.submit(0, None, reply).await.map(drop)
    }

    /// Block status of every selected context from `offset`, for up to
    /// `length` bytes (the server may answer less, or a little more).
    pub async fn block_status(
        &self,
        offset: u64,
        length: u64,
        req_one: bool,
    ) -> Result<Vec<(u32, Vec<Extent>)>> {
        if self.info.contexts.is_empty() {
            return Err(Error::Unsupported(
                "block status (no meta context selected)",
            ));
        }
        self.check_range("BLOCK_STATUS", offset, length)?;
        self.check_effect_length("BLOCK_STATUS", length)?;
        let flags = if req_one { cmdflag::REQ_ONE } else { 0 };
        let selected = self.info.contexts.iter().map(|(id, _)| *id).collect();
        let reply = ReplyAssembler::block_status(offset, length, self.info.mode, selected);
        Ok(self.submit(flags, None, reply).await?.extents)
    }

    /// Soft disconnect: waits for requests in flight, sends NBD_CMD_DISC and
    /// closes the write side.
    pub async fn disconnect(&self) -> Result<()> {
        let all = self
            .slots
            .acquire_many(self.max_in_flight)
            .await
            .map_err(|_| Error::Disconnected("connection closed".into()))?;
        if self.is_dead() {
            return Ok(());
        }
        let header = self.encode(0, cmd::DISC, 0, 0, 0, false);
        let _ = self.sender.send(Outgoing {
            header,
            payload: None,
            last: true,
        });
        // Nothing more may be sent after DISC.
        all.forget();
        self.slots.close();
        self.shared.lock().dead = Some(Dead::Closed("disconnected".into()));
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Dropping our sender is not possible while `self` lives, so the
        // writer is told to stop by the DISC it just sent (see writer_task).
        if let Some(w) = writer {
            let _ = w.await;
        }
        Ok(())
    }
}

/// The read half, with the I/O timeout: a read fails with `TimedOut` once
/// requests have waited `timeout` without a byte from the server. The timer
/// is not reset on every read; when it goes off it works out the real
/// deadline from the last byte received and re-arms if that is later.
struct Watched {
    inner: ReadHalf,
    shared: Arc<Shared>,
    timeout: Option<(Duration, Pin<Box<Sleep>>)>,
    last_rx: Instant,
}

impl Watched {
    fn new(inner: ReadHalf, shared: Arc<Shared>, timeout: Option<Duration>) -> Self {
        Watched {
            inner,
            shared,
            timeout: timeout.map(|t| (t, Box::pin(tokio::time::sleep(t)))),
            last_rx: Instant::now(),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            if buf.filled().len() > before {
                this.last_rx = Instant::now();
            }
            return Poll::Ready(r);
        }
        let Some((timeout, sleep)) = &mut this.timeout else {
            return Poll::Pending;
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let busy_since = this.shared.lock().busy_since;
            // Nothing waiting: look again one timeout from now.
            let deadline = busy_since.map_or(now, |b| b.max(this.last_rx)) + *timeout;
            if deadline <= now {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    TimedOut(*timeout),
                )));
            }
            sleep.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Marks an I/O error as the inactivity timeout (so waiting requests get
/// [`Error::Timeout`]).
#[derive(Debug)]
struct TimedOut(Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no reply from the server for {:?}", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// The timeout, if `e` is the inactivity timeout.
fn timed_out(e: &std::io::Error) -> Option<Duration> {
    e.get_ref()?.downcast_ref::<TimedOut>().map(|t| t.0)
}

type Reader = BufReader<Watched>;

async fn reader_task(rd: Watched, shared: Arc<Shared>, info: Arc<ExportInfo>) {
    let mut r = BufReader::with_capacity(READ_BUFFER, rd);
    let why = match read_replies(&mut r, &shared, &info).await {
        Ok(()) => Dead::Closed("server closed the connection".into()),
        Err(Error::Io(ref e)) if let Some(t) = timed_out(e) => Dead::Timeout(t),
        Err(Error::Protocol(m)) => Dead::Protocol(m),
        Err(e) => Dead::Closed(e.to_string()),
    };
    tracing::debug!("reader stopped: {why:?}");
    shared.fail_all(why);
}

fn take(shared: &Shared, cookie: u64) -> Result<Pending> {
    shared
        .lock()
        .remove(cookie)
        .ok_or_else(|| Error::Protocol(format!("reply with unknown cookie {cookie:#x}")))
}

/// Fills `dst` with the next bytes of the reply stream: first what the read
/// buffer holds, the rest straight from the socket, so bulk data is copied
/// only by the kernel.
async fn read_payload(r: &mut Reader, dst: &mut [u8]) -> std::io::Result<()> {
    let buffered = r.buffer();
    let n = buffered.len().min(dst.len());
    dst[..n].copy_from_slice(&buffered[..n]);
    Pin::new(&mut *r).consume(n);
    if n < dst.len() {
        // The buffer is empty now, so reading past it keeps the order.
        r.get_mut().read_exact(&mut dst[n..]).await?;
    }
    Ok(())
}

/// Reads replies until EOF (Ok) or a protocol/I/O error.
async fn read_replies(r: &mut Reader, shared: &Shared, info: &ExportInfo) -> Result<()> {
    let mut hdr = [0u8; 32];
    loop {
        match r.read_exact(&mut hdr[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let t = shared.lock();
                return if t.map.is_empty() || t.dead.is_some() {
                    Ok(())
                } else {
                    Err(Error::Disconnected("server closed the connection".into()))
                };
            }
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let len = reply_header_len(magic, info.mode)?;
        r.read_exact(&mut hdr[4..len]).await?;
        let header =
            ReplyHeader::decode(&hdr[..len]).map_err(|e| Error::Protocol(e.to_string()))?;
        let cookie = header.cookie();
        let mut p = take(shared, cookie)?;
        match receive(r, &mut p.reply, &header).await {
            Ok(()) if p.reply.is_done() => p.complete(),
            // More chunks to come.
            Ok(()) => shared.lock().insert(cookie, p),
            Err(e) => {
                // Back into the table, so it fails with everything else
                // waiting on this connection.
                shared.lock().insert(cookie, p);
                return Err(e);
            }
        }
    }
}

/// Reads what follows a reply header into its request, as the request's
/// assembler directs: read data straight into the caller's buffer, other
/// payloads whole (they are bounded). Errors are protocol violations or
/// I/O errors, and end the connection.
async fn receive(r: &mut Reader, reply: &mut ReplyAssembler, header: &ReplyHeader) -> Result<()> {
    match reply.header(header)? {
        Next::Complete => {}
        Next::Data(dst) => read_payload(r, dst).await?,
        Next::DataOffset(chunk) => {
            let offset = r.read_u64().await?;
            read_payload(r, reply.data_at(chunk, offset)?).await?;
        }
        Next::Payload(chunk) => {
            let mut payload = vec![0u8; chunk.payload_len()];
            r.read_exact(&mut payload).await?;
            reply.payload(chunk, &payload)?;
        }
    }
    Ok(())
}
