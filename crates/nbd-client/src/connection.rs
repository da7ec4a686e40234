//! One negotiated connection in transmission: many requests in flight,
//! replies routed by cookie.
//!
//! A writer task sends requests in the order they were queued, batching
//! whatever is ready into one flush. A reader task decodes replies and
//! completes the waiting request: read data (and holes, as zeroes) land
//! directly in the caller's buffer at the chunk's offset. When either task
//! fails the connection is marked dead and every waiting request gets the
//! error, so nothing waits on a connection that cannot answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use nbd_proto::consts::{MAX_STRING, chunk, cmd, cmdflag, replyflag};
use nbd_proto::reply::{Chunk, Extent, ReplyHeader, ReplyMode};
use nbd_proto::request::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::export::ExportInfo;
use crate::stream::NbdStream;

/// Largest non-data chunk payload accepted: a block status chunk of 2^20
/// extended descriptors plus its header. Anything larger is hostile.
const MAX_CHUNK_PAYLOAD: u64 = 8 + 16 * (1 << 20);

/// What a completed request hands back.
enum Done {
    Plain,
    Read(Vec<u8>),
    BlockStatus(Vec<(u32, Vec<Extent>)>),
}

enum Kind {
    Plain,
    /// `covered` counts bytes delivered by data and hole chunks.
    Read {
        buf: Vec<u8>,
        covered: u64,
    },
    BlockStatus(Vec<(u32, Vec<Extent>)>),
}

struct Pending {
    command: u16,
    offset: u64,
    length: u64,
    kind: Kind,
    /// The first error chunk; the request fails once DONE arrives.
    error: Option<Error>,
    tx: oneshot::Sender<Result<Done>>,
}

impl Pending {
    fn complete(self) {
        let result = match self.error {
            Some(e) => Err(e),
            None => match self.kind {
                Kind::Plain => Ok(Done::Plain),
                Kind::Read { buf, covered } => {
                    if covered == self.length {
                        Ok(Done::Read(buf))
                    } else {
                        Err(Error::Protocol(format!(
                            "READ at {} of {} bytes: reply covered {covered} bytes",
                            self.offset, self.length
                        )))
                    }
                }
                Kind::BlockStatus(v) => {
                    if v.is_empty() {
                        Err(Error::Protocol("block status reply without extents".into()))
                    } else {
                        Ok(Done::BlockStatus(v))
                    }
                }
            },
        };
        // The caller may have given up waiting; nothing to do then.
        let _ = self.tx.send(result);
    }

    fn fail(self, e: Error) {
        let _ = self.tx.send(Err(e));
    }
}

#[derive(Default)]
struct Table {
    map: HashMap<u64, Pending>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Shared {
    table: Mutex<Table>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic elsewhere must not take the client down with poison.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail_all(&self, why: &str) {
        let drained: Vec<Pending> = {
            let mut t = self.lock();
            if t.dead.is_none() {
                t.dead = Some(why.to_string());
            }
            t.map.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            p.fail(Error::Disconnected(why.to_string()));
        }
    }
}

struct Outgoing {
    header: BytesMut,
    payload: Option<Bytes>,
}

/// A connection in transmission phase.
pub struct Connection {
    info: Arc<ExportInfo>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Outgoing>,
    slots: Arc<Semaphore>,
    max_in_flight: u32,
    next_cookie: AtomicU64,
    reader: JoinHandle<()>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    /// Starts transmission on a negotiated stream with at most `in_flight`
    /// requests outstanding.
    pub fn start<S: NbdStream>(stream: S, info: ExportInfo, in_flight: usize) -> Self {
        let in_flight = in_flight.clamp(1, 1 << 16);
        let info = Arc::new(info);
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
        });
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader_task(rd, shared.clone(), info.clone()));
        let writer = tokio::spawn(writer_task(wr, rx, shared.clone()));
        Connection {
            info,
            shared,
            tx,
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

    async fn submit(
        &self,
        command: u16,
        mut flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Bytes>,
        kind: Kind,
    ) -> Result<Done> {
        let _permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Disconnected("connection closed".into()))?;
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.shared.lock();
            if let Some(why) = &t.dead {
                return Err(Error::Disconnected(why.clone()));
            }
            t.map.insert(
                cookie,
                Pending {
                    command,
                    offset,
                    length,
                    kind,
                    error: None,
                    tx,
                },
            );
        }
        let extended = self.info.mode == ReplyMode::Extended;
        if extended && payload.is_some() {
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
        if self.tx.send(Outgoing { header, payload }).is_err() {
            self.shared.lock().map.remove(&cookie);
            return Err(Error::Disconnected("connection closed".into()));
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
        let kind = Kind::Read { buf, covered: 0 };
        match self
            .submit(cmd::READ, 0, offset, length, None, kind)
            .await?
        {
            Done::Read(buf) => Ok(buf),
            _ => unreachable!("READ completes with data"),
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if self.info.read_only() {
            return Err(Error::Unsupported("writes (export is read-only)"));
        }
        let length = data.len() as u64;
        self.check_range("WRITE", offset, length)?;
        self.check_payload("WRITE", length)?;
        let flags = self.fua_flag(fua);
        self.submit(cmd::WRITE, flags, offset, length, Some(data), Kind::Plain)
            .await
            .map(drop)
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
        self.submit(cmd::WRITE_ZEROES, flags, offset, length, None, Kind::Plain)
            .await
            .map(drop)
    }

    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        if !self.info.can_trim() || self.info.read_only() {
            return Err(Error::Unsupported("TRIM"));
        }
        self.check_range("TRIM", offset, length)?;
        self.check_effect_length("TRIM", length)?;
        self.submit(cmd::TRIM, 0, offset, length, None, Kind::Plain)
            .await
            .map(drop)
    }

    pub async fn flush(&self) -> Result<()> {
        if !self.info.can_flush() {
            return Err(Error::Unsupported("FLUSH"));
        }
        self.submit(cmd::FLUSH, 0, 0, 0, None, Kind::Plain)
            .await
            .map(drop)
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
        match self
            .submit(
                cmd::BLOCK_STATUS,
                flags,
                offset,
                length,
                None,
                Kind::BlockStatus(Vec::new()),
            )
            .await?
        {
            Done::BlockStatus(v) => Ok(v),
            _ => unreachable!("BLOCK_STATUS completes with extents"),
        }
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
        let mut header = BytesMut::with_capacity(32);
        Request {
            flags: 0,
            command: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(&mut header, self.info.mode == ReplyMode::Extended);
        let _ = self.tx.send(Outgoing {
            header,
            payload: None,
        });
        // Nothing more may be sent after DISC.
        all.forget();
        self.slots.close();
        self.shared.lock().dead = Some("disconnected".into());
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Dropping our sender is not possible while `self` lives, so the
        // writer is told to stop by the DISC it just sent (see writer_task).
        if let Some(w) = writer {
            let _ = w.await;
        }
        Ok(())
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(mut msg) = rx.recv().await {
        let mut disc = false;
        let res: std::io::Result<()> = async {
            loop {
                disc |= msg.header.len() >= 8
                    && u16::from_be_bytes([msg.header[6], msg.header[7]]) == cmd::DISC;
                w.write_all(&msg.header).await?;
                if let Some(p) = &msg.payload {
                    w.write_all(p).await?;
                }
                if disc {
                    break;
                }
                // Batch everything already queued into one flush.
                match rx.try_recv() {
                    Ok(m) => msg = m,
                    Err(_) => break,
                }
            }
            w.flush().await
        }
        .await;
        if let Err(e) = res {
            shared.fail_all(&format!("write failed: {e}"));
            return;
        }
        if disc {
            let _ = w.shutdown().await;
            return;
        }
    }
    // Every sender is gone: the connection was dropped. Closing our side
    // lets the server see EOF.
    let _ = w.shutdown().await;
}

async fn reader_task<R: AsyncRead + Unpin>(rd: R, shared: Arc<Shared>, info: Arc<ExportInfo>) {
    let mut r = BufReader::with_capacity(256 * 1024, rd);
    let why = match read_replies(&mut r, &shared, &info).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    tracing::debug!("reader stopped: {why}");
    shared.fail_all(&why);
}

fn take(shared: &Shared, cookie: u64) -> Result<Pending> {
    shared
        .lock()
        .map
        .remove(&cookie)
        .ok_or_else(|| Error::Protocol(format!("reply with unknown cookie {cookie:#x}")))
}

/// Reads replies until EOF (Ok) or a protocol/I/O error.
async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    info: &ExportInfo,
) -> Result<()> {
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
        let len = ReplyHeader::len_for_magic(magic)
            .ok_or_else(|| Error::Protocol(format!("bad reply magic {magic:#x}")))?;
        r.read_exact(&mut hdr[4..len]).await?;
        let header =
            ReplyHeader::decode(&hdr[..len]).map_err(|e| Error::Protocol(e.to_string()))?;
        match header {
            ReplyHeader::Simple { error, cookie } => {
                if info.mode == ReplyMode::Extended {
                    return Err(Error::Protocol("simple reply with extended headers".into()));
                }
                let mut p = take(shared, cookie)?;
                if error != 0 {
                    let e = Error::server(p.command, p.offset, p.length, error, String::new());
                    p.fail(e);
                    continue;
                }
                if let Kind::Read { buf, covered } = &mut p.kind {
                    if info.mode == ReplyMode::Structured {
                        return Err(Error::Protocol(
                            "simple reply to READ with structured replies".into(),
                        ));
                    }
                    r.read_exact(buf).await?;
                    *covered = p.length;
                } else if let Kind::BlockStatus(_) = p.kind {
                    return Err(Error::Protocol("simple reply to BLOCK_STATUS".into()));
                }
                p.complete();
            }
            ReplyHeader::Chunk {
                flags,
                chunk_type,
                cookie,
                payload_len,
                ..
            } => {
                if info.mode == ReplyMode::Simple {
                    return Err(Error::Protocol(
                        "structured reply that was not negotiated".into(),
                    ));
                }
                if (info.mode == ReplyMode::Extended) != (len == 32) {
                    return Err(Error::Protocol(
                        "reply header form does not match the negotiated one".into(),
                    ));
                }
                let mut p = take(shared, cookie)?;
                chunk_into(r, &mut p, chunk_type, payload_len, info).await?;
                if flags & replyflag::DONE != 0 {
                    p.complete();
                } else {
                    shared.lock().map.insert(cookie, p);
                }
            }
        }
    }
}

/// Applies one chunk to its pending request. Errors returned here are
/// protocol violations that end the connection.
async fn chunk_into<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    chunk_type: u16,
    payload_len: u64,
    info: &ExportInfo,
) -> Result<()> {
    if chunk_type == chunk::OFFSET_DATA {
        let Kind::Read { buf, covered } = &mut p.kind else {
            return Err(Error::Protocol("data chunk in reply to a non-READ".into()));
        };
        if payload_len < 9 {
            return Err(Error::Protocol("data chunk too short".into()));
        }
        let offset = r.read_u64().await?;
        let n = payload_len - 8;
        let start = offset
            .checked_sub(p.offset)
            .filter(|s| s.checked_add(n).is_some_and(|end| end <= p.length))
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "data chunk at {offset} length {n} outside READ at {} length {}",
                    p.offset, p.length
                ))
            })?;
        // In range, so these fit the caller's buffer.
        let (start, n) = (start as usize, n as usize);
        r.read_exact(&mut buf[start..start + n]).await?;
        *covered += n as u64;
        return Ok(());
    }
    if payload_len > MAX_CHUNK_PAYLOAD {
        return Err(Error::Protocol(format!(
            "{payload_len}-byte chunk payload is too long"
        )));
    }
    let mut payload = vec![0u8; payload_len as usize];
    r.read_exact(&mut payload).await?;
    let decoded = match Chunk::decode(chunk_type, &payload) {
        Ok(c) => c,
        Err(e) => {
            return Err(Error::Protocol(format!(
                "bad chunk of type {chunk_type}: {e}"
            )));
        }
    };
    match decoded {
        Chunk::None => {
            if payload_len != 0 {
                return Err(Error::Protocol("NONE chunk with a payload".into()));
            }
        }
        Chunk::Hole { offset, length } => {
            let Kind::Read { buf, covered } = &mut p.kind else {
                return Err(Error::Protocol("hole chunk in reply to a non-READ".into()));
            };
            let n = u64::from(length);
            let start = offset
                .checked_sub(p.offset)
                .filter(|s| n > 0 && s + n <= p.length)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "hole chunk at {offset} length {n} outside the READ"
                    ))
                })?;
            buf[start as usize..(start + n) as usize].fill(0);
            *covered += n;
        }
        Chunk::BlockStatus {
            context_id,
            extents,
        } => {
            let Kind::BlockStatus(v) = &mut p.kind else {
                return Err(Error::Protocol(
                    "block status chunk in reply to another command".into(),
                ));
            };
            if !info.contexts.iter().any(|(id, _)| *id == context_id) {
                return Err(Error::Protocol(format!(
                    "block status for unselected context id {context_id}"
                )));
            }
            if v.iter().any(|(id, _)| *id == context_id) {
                return Err(Error::Protocol(format!(
                    "two block status chunks for context id {context_id}"
                )));
            }
            v.push((context_id, extents));
        }
        Chunk::Error {
            error,
            message,
            offset,
        } => {
            // Keep the connection; the request fails. Unknown values count
            // as EINVAL, as the spec asks.
            let errno = if error == 0 {
                nbd_proto::consts::errno::EINVAL
            } else {
                error
            };
            let message = nbd_proto::option::truncate_str(&message, MAX_STRING).to_string();
            if p.error.is_none() {
                p.error = Some(Error::server(
                    p.command,
                    offset.unwrap_or(p.offset),
                    p.length,
                    errno,
                    message,
                ));
            }
        }
    }
    Ok(())
}
