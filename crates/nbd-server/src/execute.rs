//! Checking a request against the export and the negotiated session, and
//! carrying it out on the device. Runs on the blocking pool.

use std::sync::Arc;

use bytes::BytesMut;
use ferry_block::{BlockDev, Error as BlockError, FileSpan, ZeroMode};
use nbd_proto::consts::{chunk, cmd, cmdflag, errno, replyflag, state};

use crate::metrics::ExportMetrics;
use nbd_proto::reply::{
    Extent, ReplyMode, encode_block_status_payload, encode_chunk_header, encode_error_payload,
    encode_hole_payload, encode_simple,
};
use nbd_proto::request::Request;
use nbd_proto::validate::{Refusal, Terms};

use crate::bufpool::POOL;
use crate::outgoing::{Outgoing, Part};
use crate::registry::MIN_BLOCK;

/// Most extents returned for one context in one BLOCK_STATUS reply.
const MAX_STATUS_EXTENTS: usize = 65536;
/// Most content chunks one READ is split into along holes.
const MAX_READ_EXTENTS: usize = 64;
/// Holes shorter than this are sent as zero data: a chunk header costs more.
const MIN_HOLE_CHUNK: u64 = 4096;
/// Smaller reads are copied into their reply, not sent from the page
/// cache: for them sendfile (or a mapping, over TLS) costs more than the
/// copy it saves. fio randread over loopback from ext4's page cache (7
/// alternated runs): QD32 12% more IOPS at 4 KiB, 34% at 32 KiB; QD1 2-3%
/// more at 4-16 KiB; from 64 KiB up, sendfile was as fast or faster (12%
/// at 256 KiB).
const MIN_ZERO_COPY: u64 = 64 << 10;
/// Larger cached reads still go to the blocking pool, so that one copy
/// does not hold up the connection's reader for long.
const MAX_INLINE_READ: u64 = 4 << 20;

/// Everything a request needs to know about its connection.
pub struct Session {
    pub dev: Arc<dyn BlockDev>,
    pub mode: ReplyMode,
    pub flags: u16,
    pub contexts: Vec<(u32, String)>,
    pub max_payload: u32,
    /// Cached read data may go out as file bytes (a plain socket).
    pub zero_copy: bool,
    pub metrics: ExportMetrics,
}

impl Session {
    /// Checks a request header against what was negotiated; the caller
    /// answers refusals without running anything (after consuming any
    /// payload).
    pub fn validate(&self, req: &Request) -> Result<(), Refusal> {
        Terms {
            mode: self.mode,
            flags: self.flags,
            size: self.dev.size(),
            max_payload: self.max_payload,
            min_block: MIN_BLOCK,
            has_contexts: !self.contexts.is_empty(),
        }
        .validate(req)
    }

    /// The reply to a refused or failed request.
    pub fn error_reply(&self, req: &Request, errno: u32, message: &str) -> Outgoing {
        self.metrics.error(errno);
        let mut head = BytesMut::with_capacity(64);
        match self.mode {
            ReplyMode::Simple => encode_simple(&mut head, errno, req.cookie),
            mode => {
                let mut payload = BytesMut::new();
                encode_error_payload(&mut payload, errno, message);
                encode_chunk_header(
                    &mut head,
                    mode == ReplyMode::Extended,
                    replyflag::DONE,
                    chunk::ERROR,
                    req.cookie,
                    req.offset,
                    payload.len() as u64,
                );
                head.extend_from_slice(&payload);
            }
        }
        Outgoing::head(head)
    }

    /// Success without payload.
    fn done_reply(&self, req: &Request) -> Outgoing {
        let mut head = BytesMut::with_capacity(32);
        match self.mode {
            // Simple replies stay legal for payload-less commands with
            // structured replies, and are cheaper.
            ReplyMode::Simple | ReplyMode::Structured => encode_simple(&mut head, 0, req.cookie),
            ReplyMode::Extended => encode_chunk_header(
                &mut head,
                true,
                replyflag::DONE,
                chunk::NONE,
                req.cookie,
                req.offset,
                0,
            ),
        }
        Outgoing::head(head)
    }

    /// Runs a validated request. `payload` holds the data of a WRITE in
    /// its first `req.length` bytes.
    pub fn execute(&self, req: &Request, payload: Vec<u8>) -> Outgoing {
        let fua = req.flags & cmdflag::FUA != 0;
        let result = match req.command {
            cmd::READ => return self.read(req),
            cmd::BLOCK_STATUS => return self.block_status(req),
            cmd::WRITE => {
                let r = self
                    .dev
                    .write_at(&payload[..req.length as usize], req.offset, fua);
                POOL.put(payload);
                r
            }
            cmd::FLUSH => self.dev.flush(),
            cmd::TRIM => self.dev.trim(req.offset, req.length, fua),
            cmd::CACHE => self.dev.cache(req.offset, req.length),
            cmd::WRITE_ZEROES => self.dev.write_zeroes(
                req.offset,
                req.length,
                ZeroMode {
                    may_trim: req.flags & cmdflag::NO_HOLE == 0,
                    fast: req.flags & cmdflag::FAST_ZERO != 0,
                    fua,
                },
            ),
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.done_reply(req),
            Err(e) => self.store_error(req, &e),
        }
    }

    pub fn store_error(&self, req: &Request, e: &BlockError) -> Outgoing {
        let code = errno_of(e);
        if code == errno::EIO {
            tracing::warn!(
                command = cmd::name(req.command),
                offset = req.offset,
                length = req.length,
                "{e}"
            );
        }
        self.error_reply(req, code, &e.to_string())
    }

    /// Answers on the calling (async) thread what needs no waiting: a READ
    /// whose bytes are all cached, and BLOCK_STATUS (extent maps are
    /// metadata the layers keep at hand). None: use the blocking pool.
    /// Saving the thread hop matters most to clients that keep few
    /// requests in flight, like qemu's.
    pub fn try_inline(&self, req: &Request) -> Option<Outgoing> {
        match req.command {
            cmd::READ if req.length <= MAX_INLINE_READ => self.read_with(req, true),
            cmd::BLOCK_STATUS => Some(self.block_status(req)),
            _ => None,
        }
    }

    /// For a READ that [`try_inline`](Self::try_inline) could not answer:
    /// what brings its data in without a thread (a post-copy disk's absent
    /// blocks), after which `try_inline` can answer it.
    pub fn fetch_ahead(&self, req: &Request) -> Option<ferry_block::Fetch> {
        if req.command != cmd::READ || req.length > MAX_INLINE_READ {
            return None;
        }
        self.dev.fetch_ahead(req.offset, req.length)
    }

    fn read(&self, req: &Request) -> Outgoing {
        match self.read_with(req, false) {
            Some(out) => out,
            None => self.error_reply(req, errno::EIO, "read failed"),
        }
    }

    /// Fills `buf` from `offset`; with `nowait` only from cache (false: it
    /// would block).
    fn fill(&self, buf: &mut [u8], offset: u64, nowait: bool) -> Result<bool, BlockError> {
        if nowait {
            self.dev.read_at_nowait(buf, offset)
        } else {
            self.dev.read_at(buf, offset).map(|()| true)
        }
    }

    /// Where `[offset, offset+len)` can be sent from without a copy.
    fn span(&self, offset: u64, len: u64) -> Option<FileSpan> {
        if !self.zero_copy || len < MIN_ZERO_COPY {
            return None;
        }
        self.dev.file_span(offset, len)
    }

    fn read_with(&self, req: &Request, nowait: bool) -> Option<Outgoing> {
        let out = self.build_read(req, nowait)?;
        let sent_from_files: usize = out
            .parts
            .iter()
            .map(|p| match p {
                Part::File(_, n) => *n,
                _ => 0,
            })
            .sum();
        if sent_from_files > 0 {
            self.metrics.zero_copy(sent_from_files as u64);
        }
        Some(out)
    }

    fn build_read(&self, req: &Request, nowait: bool) -> Option<Outgoing> {
        let len = req.length as usize;
        if self.mode == ReplyMode::Simple {
            let mut head = BytesMut::with_capacity(16);
            encode_simple(&mut head, 0, req.cookie);
            let mut out = Outgoing::head(head);
            if let Some(span) = self.span(req.offset, req.length) {
                out.parts.push(Part::File(span, len));
                return Some(out);
            }
            let mut data = POOL.get(len);
            match self.fill(&mut data[..len], req.offset, nowait) {
                Ok(true) => {}
                Ok(false) => {
                    POOL.put(data);
                    return None;
                }
                Err(e) => return Some(self.store_error(req, &e)),
            }
            out.parts.push(Part::Data(0..len));
            out.data = data;
            return Some(out);
        }
        let extended = self.mode == ReplyMode::Extended;
        if len == 0 {
            let mut head = BytesMut::with_capacity(32);
            encode_chunk_header(
                &mut head,
                extended,
                replyflag::DONE,
                chunk::NONE,
                req.cookie,
                req.offset,
                0,
            );
            return Some(Outgoing::head(head));
        }
        let segments = if req.flags & cmdflag::DF != 0 {
            vec![(0, len as u64, false)]
        } else {
            self.read_segments(req.offset, req.length)
        };
        // Taken from the pool when a segment has to be copied.
        let mut data = Vec::new();
        let mut out = Outgoing::default();
        let last = segments.len() - 1;
        for (i, &(start, seg_len, hole)) in segments.iter().enumerate() {
            let flags = if i == last { replyflag::DONE } else { 0 };
            let abs = req.offset + start;
            let mut head = BytesMut::with_capacity(48);
            if hole {
                encode_chunk_header(
                    &mut head,
                    extended,
                    flags,
                    chunk::OFFSET_HOLE,
                    req.cookie,
                    req.offset,
                    12,
                );
                encode_hole_payload(&mut head, abs, seg_len as u32);
                out.parts.push(Part::Head(head));
                continue;
            }
            encode_chunk_header(
                &mut head,
                extended,
                flags,
                chunk::OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + seg_len,
            );
            head.extend_from_slice(&abs.to_be_bytes());
            if let Some(span) = self.span(abs, seg_len) {
                out.parts.push(Part::Head(head));
                out.parts.push(Part::File(span, seg_len as usize));
                continue;
            }
            if data.is_empty() {
                data = POOL.get(len);
            }
            let range = start as usize..(start + seg_len) as usize;
            match self.fill(&mut data[range.clone()], abs, nowait) {
                Ok(true) => {}
                Ok(false) => {
                    POOL.put(data);
                    return None;
                }
                Err(e) => {
                    // Chunks already built stay valid; the error ends the reply.
                    let mut err = self.error_reply(req, errno_of(&e), &e.to_string());
                    out.parts.append(&mut err.parts);
                    out.data = data;
                    return Some(out);
                }
            }
            out.parts.push(Part::Head(head));
            out.parts.push(Part::Data(range));
        }
        out.data = data;
        Some(out)
    }

    /// Splits a read into (relative start, length, is_hole) pieces along the
    /// holes of the backing device. Short holes are folded into data.
    fn read_segments(&self, offset: u64, length: u64) -> Vec<(u64, u64, bool)> {
        let extents = self
            .dev
            .local_allocation(offset, length, MAX_READ_EXTENTS)
            .unwrap_or_default();
        let mut segs: Vec<(u64, u64, bool)> = Vec::with_capacity(extents.len() + 1);
        let mut pos = 0;
        for e in extents {
            let len = e.length.min(length - pos);
            if len == 0 {
                break;
            }
            let hole = e.flags & state::ZERO != 0 && len >= MIN_HOLE_CHUNK;
            match segs.last_mut() {
                Some(last) if last.2 == hole => last.1 += len,
                _ => segs.push((pos, len, hole)),
            }
            pos += len;
        }
        if pos < length {
            match segs.last_mut() {
                Some(last) if !last.2 => last.1 += length - pos,
                _ => segs.push((pos, length - pos, false)),
            }
        }
        segs
    }

    fn block_status(&self, req: &Request) -> Outgoing {
        let extended = self.mode == ReplyMode::Extended;
        let req_one = req.flags & cmdflag::REQ_ONE != 0;
        let max = if req_one { 1 } else { MAX_STATUS_EXTENTS };
        // Compact replies carry 32-bit lengths.
        let length = if extended {
            req.length
        } else {
            req.length.min(u64::from(u32::MAX) & !511)
        };
        let mut head = BytesMut::with_capacity(64 + 16 * self.contexts.len());
        let last = self.contexts.len() - 1;
        for (i, (id, name)) in self.contexts.iter().enumerate() {
            let extents = match self.dev.extents(name, req.offset, length, max) {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => vec![ferry_block::Extent { length, flags: 0 }],
                Err(e) => return self.store_error(req, &e),
            };
            let extents: Vec<Extent> = extents
                .iter()
                .take(max)
                .map(|e| Extent {
                    length: e.length,
                    flags: e.flags.into(),
                })
                .collect();
            let payload_len = nbd_proto::reply::block_status_payload_len(extended, extents.len());
            let chunk_type = if extended {
                chunk::BLOCK_STATUS_EXT
            } else {
                chunk::BLOCK_STATUS
            };
            let flags = if i == last { replyflag::DONE } else { 0 };
            encode_chunk_header(
                &mut head,
                extended,
                flags,
                chunk_type,
                req.cookie,
                req.offset,
                payload_len as u64,
            );
            encode_block_status_payload(&mut head, extended, *id, &extents);
        }
        Outgoing::head(head)
    }
}

/// The NBD error for a storage failure.
pub fn errno_of(e: &BlockError) -> u32 {
    match e {
        BlockError::NotFast | BlockError::Unsupported => errno::ENOTSUP,
        BlockError::ReadOnly => errno::EPERM,
        BlockError::OutOfRange { .. } | BlockError::UnknownContext(_) => errno::EINVAL,
        BlockError::Gone(_) => errno::EIO,
        BlockError::Io(io) => match io.raw_os_error() {
            Some(28 /* ENOSPC */ | 122 /* EDQUOT */ | 27 /* EFBIG */) => errno::ENOSPC,
            Some(1 /* EPERM */ | 13 /* EACCES */ | 30 /* EROFS */) => errno::EPERM,
            Some(22 /* EINVAL */) => errno::EINVAL,
            _ => errno::EIO,
        },
    }
}
