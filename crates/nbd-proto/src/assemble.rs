//! Client side of the transmission phase: putting the reply to one request
//! together from what the server sends, and deciding what it may send
//! (NBD spec "Transmission"; the digest's sections 4.2 to 4.4 and 5.4).
//!
//! The I/O code reads a reply header (its length from
//! [`reply_header_len`]), finds the request by cookie and hands the header
//! to that request's [`ReplyAssembler`], which says what follows on the
//! wire ([`Next`]) and where it goes. Read data goes from the socket
//! straight into the caller's buffer: the assembler only picks the part
//! of the buffer, after checking that the chunk lies inside the request
//! and overlaps no earlier one. Anything the server may not send is a
//! [`Violation`], after which the connection must be dropped. Once a
//! message ended the reply ([`ReplyAssembler::is_done`]),
//! [`ReplyAssembler::finish`] says what the request yields.

use std::collections::BTreeMap;

use crate::DecodeError;
use crate::consts::{
    EXTENDED_REPLY_LEN, EXTENDED_REPLY_MAGIC, MAX_STRING, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_LEN, STRUCTURED_REPLY_MAGIC, chunk, cmd, errno, replyflag,
};
use crate::reply::{Chunk, Extent, MAX_EXTENTS_PER_CHUNK, ReplyHeader, ReplyMode};

/// Largest non-data chunk payload accepted: a block status chunk of the
/// most extents we take, in extended form. Anything larger is hostile.
pub const MAX_CHUNK_PAYLOAD: u64 = 8 + 16 * MAX_EXTENTS_PER_CHUNK as u64;

/// Something the server may not send. The connection must be dropped:
/// what follows on the wire can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("bad reply magic {0:#x}")]
    BadMagic(u32),
    #[error("simple reply with extended headers")]
    SimpleWithExtendedHeaders,
    #[error("structured reply that was not negotiated")]
    ChunkNotNegotiated,
    #[error("reply header form does not match the negotiated one")]
    WrongHeaderForm,
    #[error("simple reply after chunks of the same reply")]
    SimpleAfterChunks,
    #[error("simple reply to READ with structured replies")]
    SimpleReplyToStructuredRead,
    #[error("simple reply to BLOCK_STATUS")]
    SimpleReplyToBlockStatus,
    #[error("reply after the request was answered")]
    AfterDone,
    #[error("{0}-byte chunk payload is too long")]
    ChunkTooLong(u64),
    #[error("NONE chunk with a payload")]
    NoneWithPayload,
    #[error("NONE chunk without the DONE flag")]
    NoneWithoutDone,
    #[error("data chunk too short")]
    DataTooShort,
    #[error("{chunk} chunk in reply to {command}")]
    ChunkForCommand {
        chunk: &'static str,
        command: &'static str,
    },
    #[error(
        "{chunk} chunk at {offset} length {length} outside READ at {request_offset} length {request_length}"
    )]
    OutsideRead {
        chunk: &'static str,
        offset: u64,
        length: u64,
        request_offset: u64,
        request_length: u64,
    },
    #[error("overlapping chunks in the reply to READ at {offset} length {length}")]
    Overlap { offset: u64, length: u64 },
    #[error("BLOCK_STATUS_EXT chunk without extended headers")]
    ExtendedStatusWithoutExtendedHeaders,
    #[error("block status for unselected context id {0}")]
    UnselectedContext(u32),
    #[error("two block status chunks for context id {0}")]
    DuplicateContext(u32),
    #[error("error at {offset} outside the request at {request_offset} length {request_length}")]
    ErrorOutsideRequest {
        offset: u64,
        request_offset: u64,
        request_length: u64,
    },
    #[error("bad chunk of type {chunk_type}: {error}")]
    BadChunk { chunk_type: u16, error: DecodeError },
    /// The reply ended with only this many bytes of a READ delivered.
    #[error("the reply covered only {covered} bytes")]
    Incomplete { covered: u64 },
    #[error("the reply carried no extents")]
    NoExtents,
}

/// The length of the reply header that starts with `magic`, if that header
/// form is legal on a connection in `mode`.
pub fn reply_header_len(magic: u32, mode: ReplyMode) -> Result<usize, Violation> {
    use ReplyMode::{Extended, Simple, Structured};
    match (magic, mode) {
        (SIMPLE_REPLY_MAGIC, Extended) => Err(Violation::SimpleWithExtendedHeaders),
        (SIMPLE_REPLY_MAGIC, _) => Ok(SIMPLE_REPLY_LEN),
        (STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC, Simple) => {
            Err(Violation::ChunkNotNegotiated)
        }
        (STRUCTURED_REPLY_MAGIC, Structured) => Ok(STRUCTURED_REPLY_LEN),
        (EXTENDED_REPLY_MAGIC, Extended) => Ok(EXTENDED_REPLY_LEN),
        (STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC, _) => Err(Violation::WrongHeaderForm),
        _ => Err(Violation::BadMagic(magic)),
    }
}

/// The server answered a request with an error; the connection stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The NBD error value (never 0: a 0 in an error chunk counts as
    /// EINVAL, as the spec asks of unknown values).
    pub errno: u32,
    /// The server's message; empty for simple replies.
    pub message: String,
    /// Where it failed: the error chunk's offset, else the request's.
    pub offset: u64,
}

/// Why a request that was answered to the end failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Server(ServerError),
    /// The reply ended without what the request needs. Only this request
    /// fails: the stream itself stayed in order.
    Violation(Violation),
}

/// What a successful reply yields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// A READ's buffer, every byte delivered (empty for other commands).
    pub data: Vec<u8>,
    /// BLOCK_STATUS: the extents for each context answered, in arrival
    /// order (empty for other commands).
    pub extents: Vec<(u32, Vec<Extent>)>,
}

/// What follows a reply header on the wire, and where it goes.
#[derive(Debug)]
pub enum Next<'a> {
    /// Nothing: the message is complete.
    Complete,
    /// Read data, as many bytes as this part of the caller's buffer holds:
    /// read them straight into it.
    Data(&'a mut [u8]),
    /// A data chunk: read its 8-byte offset and pass it to
    /// [`ReplyAssembler::data_at`].
    DataOffset(DataChunk),
    /// A chunk payload of [`PayloadChunk::payload_len`] bytes: read it whole and
    /// pass it to [`ReplyAssembler::payload`].
    Payload(PayloadChunk),
}

/// A data chunk whose offset is still to be read.
#[derive(Debug)]
pub struct DataChunk {
    /// Data bytes that follow the offset.
    len: u64,
}

/// A chunk whose payload is still to be read.
#[derive(Debug)]
pub struct PayloadChunk {
    chunk_type: u16,
    len: usize,
}

impl PayloadChunk {
    /// Bytes of payload to read.
    pub fn payload_len(&self) -> usize {
        self.len
    }
}

/// Which bytes of a READ chunks delivered. A duplicated chunk would
/// otherwise make the count add up while part of the buffer (maybe holding
/// data of an earlier request) was never written.
#[derive(Debug, Default)]
struct Coverage {
    covered: u64,
    /// Delivered runs, start to end relative to the request, merged when
    /// they touch: a reply that arrives in order keeps one. There is at
    /// most one run per chunk received.
    runs: BTreeMap<u64, u64>,
}

impl Coverage {
    /// Records `[start, end)` of a request of `total` bytes, unless it
    /// overlaps what was delivered before (then false).
    fn add(&mut self, start: u64, end: u64, total: u64) -> bool {
        if self.covered == total {
            return false;
        }
        // The usual single chunk that covers everything needs no record:
        // any further chunk overlaps it.
        if end - start == total {
            if self.covered > 0 {
                return false;
            }
            self.covered = total;
            return true;
        }
        let before = self.runs.range(..=start).next_back().map(|(&s, &e)| (s, e));
        let after = self.runs.range(start..).next().map(|(&s, _)| s);
        if before.is_some_and(|(_, e)| e > start) || after.is_some_and(|s| s < end) {
            return false;
        }
        let mut run = (start, end);
        if let Some((s, e)) = before
            && e == start
        {
            self.runs.remove(&s);
            run.0 = s;
        }
        if let Some(e) = self.runs.remove(&end) {
            run.1 = e;
        }
        self.runs.insert(run.0, run.1);
        self.covered += end - start;
        true
    }
}

#[derive(Debug)]
enum Kind {
    /// Success carries nothing.
    Plain,
    Read {
        buf: Vec<u8>,
        coverage: Coverage,
    },
    BlockStatus {
        selected: Vec<u32>,
        answers: Vec<(u32, Vec<Extent>)>,
    },
}

/// The reply to one request, as it comes in.
#[derive(Debug)]
pub struct ReplyAssembler {
    command: u16,
    offset: u64,
    length: u64,
    mode: ReplyMode,
    kind: Kind,
    /// The first error the server reported; the request fails with it once
    /// the reply is done.
    error: Option<ServerError>,
    /// A chunk of this reply arrived: a simple reply may not follow.
    chunked: bool,
    done: bool,
}

impl ReplyAssembler {
    fn new(command: u16, offset: u64, length: u64, mode: ReplyMode, kind: Kind) -> Self {
        ReplyAssembler {
            command,
            offset,
            length,
            mode,
            kind,
            error: None,
            chunked: false,
            done: false,
        }
    }

    /// A request whose success carries nothing (WRITE, FLUSH, TRIM, CACHE,
    /// WRITE_ZEROES).
    pub fn plain(command: u16, offset: u64, length: u64, mode: ReplyMode) -> Self {
        Self::new(command, offset, length, mode, Kind::Plain)
    }

    /// A READ of `buf.len()` bytes at `offset`; the data lands in `buf`.
    pub fn read(offset: u64, buf: Vec<u8>, mode: ReplyMode) -> Self {
        let length = buf.len() as u64;
        let kind = Kind::Read {
            buf,
            coverage: Coverage::default(),
        };
        Self::new(cmd::READ, offset, length, mode, kind)
    }

    /// A BLOCK_STATUS for `length` bytes at `offset`, answered for the
    /// `selected` meta context ids.
    pub fn block_status(offset: u64, length: u64, mode: ReplyMode, selected: Vec<u32>) -> Self {
        let kind = Kind::BlockStatus {
            selected,
            answers: Vec::new(),
        };
        Self::new(cmd::BLOCK_STATUS, offset, length, mode, kind)
    }

    pub fn command(&self) -> u16 {
        self.command
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    /// The last message of the reply arrived (once what its header
    /// announced has been read, the reply is complete).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes the header of the next message of this reply; its form must
    /// have passed [`reply_header_len`] for this connection.
    pub fn header(&mut self, header: &ReplyHeader) -> Result<Next<'_>, Violation> {
        if self.done {
            return Err(Violation::AfterDone);
        }
        match *header {
            ReplyHeader::Simple { error, .. } => self.simple(error),
            ReplyHeader::Chunk {
                flags,
                chunk_type,
                payload_len,
                ..
            } => self.chunk(flags & replyflag::DONE != 0, chunk_type, payload_len),
        }
    }

    fn simple(&mut self, error: u32) -> Result<Next<'_>, Violation> {
        if self.chunked {
            return Err(Violation::SimpleAfterChunks);
        }
        self.done = true;
        if error != 0 {
            self.fail(error, String::new(), self.offset);
            return Ok(Next::Complete);
        }
        let (length, mode) = (self.length, self.mode);
        match &mut self.kind {
            Kind::Plain => Ok(Next::Complete),
            Kind::Read { .. } if mode == ReplyMode::Structured => {
                Err(Violation::SimpleReplyToStructuredRead)
            }
            Kind::Read { buf, coverage } => {
                coverage.covered = length;
                Ok(Next::Data(buf))
            }
            Kind::BlockStatus { .. } => Err(Violation::SimpleReplyToBlockStatus),
        }
    }

    fn chunk(
        &mut self,
        done: bool,
        chunk_type: u16,
        payload_len: u64,
    ) -> Result<Next<'_>, Violation> {
        self.chunked = true;
        self.done = done;
        match chunk_type {
            chunk::OFFSET_DATA if payload_len < 9 => Err(Violation::DataTooShort),
            chunk::OFFSET_DATA => Ok(Next::DataOffset(DataChunk {
                len: payload_len - 8,
            })),
            chunk::NONE if payload_len != 0 => Err(Violation::NoneWithPayload),
            chunk::NONE if !done => Err(Violation::NoneWithoutDone),
            chunk::NONE => Ok(Next::Complete),
            // Other payloads are read whole before they are looked at:
            // bound them first.
            _ if payload_len > MAX_CHUNK_PAYLOAD => Err(Violation::ChunkTooLong(payload_len)),
            _ => Ok(Next::Payload(PayloadChunk {
                chunk_type,
                len: payload_len as usize,
            })),
        }
    }

    /// Where the data of a data chunk at `offset` goes in the caller's
    /// buffer: read exactly that many bytes into it.
    pub fn data_at(&mut self, chunk: DataChunk, offset: u64) -> Result<&mut [u8], Violation> {
        self.deliver("data", offset, chunk.len)
    }

    /// Checks that `[offset, offset+n)` lies inside the READ and overlaps
    /// nothing delivered before, records it and returns that part of the
    /// buffer.
    fn deliver(&mut self, what: &'static str, offset: u64, n: u64) -> Result<&mut [u8], Violation> {
        let (request_offset, request_length) = (self.offset, self.length);
        let Kind::Read { buf, coverage } = &mut self.kind else {
            return Err(Violation::ChunkForCommand {
                chunk: what,
                command: cmd::name(self.command),
            });
        };
        let outside = Violation::OutsideRead {
            chunk: what,
            offset,
            length: n,
            request_offset,
            request_length,
        };
        let Some(start) = offset
            .checked_sub(request_offset)
            .filter(|s| n > 0 && s.checked_add(n).is_some_and(|end| end <= request_length))
        else {
            return Err(outside);
        };
        if !coverage.add(start, start + n, request_length) {
            return Err(Violation::Overlap {
                offset: request_offset,
                length: request_length,
            });
        }
        // Inside the request, so inside the buffer (of the request's length).
        buf.get_mut(start as usize..(start + n) as usize)
            .ok_or(outside)
    }

    /// Takes the payload of a non-data chunk.
    pub fn payload(&mut self, chunk: PayloadChunk, payload: &[u8]) -> Result<(), Violation> {
        let chunk_type = chunk.chunk_type;
        let decoded = Chunk::decode(chunk_type, payload)
            .map_err(|error| Violation::BadChunk { chunk_type, error })?;
        match decoded {
            // Settled by its header.
            Chunk::None => {}
            Chunk::Hole { offset, length } => {
                self.deliver("hole", offset, length.into())?.fill(0);
            }
            Chunk::BlockStatus {
                context_id,
                extents,
            } => {
                // qemu's client tolerates compact status chunks with
                // extended headers, and so do we; the reverse cannot be
                // meant.
                if chunk_type == chunk::BLOCK_STATUS_EXT && self.mode != ReplyMode::Extended {
                    return Err(Violation::ExtendedStatusWithoutExtendedHeaders);
                }
                let Kind::BlockStatus { selected, answers } = &mut self.kind else {
                    return Err(Violation::ChunkForCommand {
                        chunk: "block status",
                        command: cmd::name(self.command),
                    });
                };
                if !selected.contains(&context_id) {
                    return Err(Violation::UnselectedContext(context_id));
                }
                if answers.iter().any(|(id, _)| *id == context_id) {
                    return Err(Violation::DuplicateContext(context_id));
                }
                answers.push((context_id, extents));
            }
            Chunk::Error {
                error,
                message,
                offset,
            } => {
                // ERROR_OFFSET must point inside the request.
                let inside = |at: u64| at.checked_sub(self.offset).is_some_and(|s| s < self.length);
                if let Some(at) = offset
                    && !inside(at)
                {
                    return Err(Violation::ErrorOutsideRequest {
                        offset: at,
                        request_offset: self.offset,
                        request_length: self.length,
                    });
                }
                let at = offset.unwrap_or(self.offset);
                let message = crate::option::truncate_str(&message, MAX_STRING).to_string();
                // Unknown values count as EINVAL, as the spec asks.
                self.fail(if error == 0 { errno::EINVAL } else { error }, message, at);
            }
        }
        Ok(())
    }

    /// Keeps the first error: later ones add nothing the caller can use.
    fn fail(&mut self, errno: u32, message: String, offset: u64) {
        self.error.get_or_insert(ServerError {
            errno,
            message,
            offset,
        });
    }

    /// What the request yields, once [`is_done`](Self::is_done).
    pub fn finish(self) -> Result<Outcome, Failure> {
        if let Some(e) = self.error {
            return Err(Failure::Server(e));
        }
        match self.kind {
            Kind::Plain => Ok(Outcome::default()),
            Kind::Read { buf, coverage } if coverage.covered == self.length => Ok(Outcome {
                data: buf,
                ..Outcome::default()
            }),
            Kind::Read { coverage, .. } => Err(Failure::Violation(Violation::Incomplete {
                covered: coverage.covered,
            })),
            Kind::BlockStatus { answers, .. } if answers.is_empty() => {
                Err(Failure::Violation(Violation::NoExtents))
            }
            Kind::BlockStatus { answers, .. } => Ok(Outcome {
                extents: answers,
                ..Outcome::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::reply::{
        encode_block_status_payload, encode_chunk_header, encode_error_payload,
        encode_hole_payload, encode_simple,
    };
    use ReplyMode::{Extended, Simple, Structured};

    const DONE: u16 = replyflag::DONE;
    const AT: u64 = 1 << 20;
    const LEN: usize = 4096;

    /// Messages of one reply as a server puts them on the wire.
    struct Wire {
        mode: ReplyMode,
        out: BytesMut,
    }

    impl Wire {
        fn new(mode: ReplyMode) -> Self {
            Wire {
                mode,
                out: BytesMut::new(),
            }
        }

        fn simple(mut self, error: u32, data: &[u8]) -> Self {
            encode_simple(&mut self.out, error, 1);
            self.out.put_slice(data);
            self
        }

        fn chunk(mut self, flags: u16, chunk_type: u16, payload: &[u8]) -> Self {
            let extended = self.mode == Extended;
            let len = payload.len() as u64;
            encode_chunk_header(&mut self.out, extended, flags, chunk_type, 1, AT, len);
            self.out.put_slice(payload);
            self
        }

        fn data(self, flags: u16, offset: u64, data: &[u8]) -> Self {
            let mut p = offset.to_be_bytes().to_vec();
            p.extend_from_slice(data);
            self.chunk(flags, chunk::OFFSET_DATA, &p)
        }

        fn hole(self, flags: u16, offset: u64, len: u32) -> Self {
            let mut p = BytesMut::new();
            encode_hole_payload(&mut p, offset, len);
            self.chunk(flags, chunk::OFFSET_HOLE, &p)
        }

        fn status(self, flags: u16, id: u32, lengths: &[u64]) -> Self {
            let extended = self.mode == Extended;
            let t = if extended {
                chunk::BLOCK_STATUS_EXT
            } else {
                chunk::BLOCK_STATUS
            };
            self.status_as(flags, t, id, lengths)
        }

        fn status_as(self, flags: u16, chunk_type: u16, id: u32, lengths: &[u64]) -> Self {
            let extents: Vec<Extent> = lengths
                .iter()
                .map(|&length| Extent { length, flags: 0 })
                .collect();
            let mut p = BytesMut::new();
            encode_block_status_payload(
                &mut p,
                chunk_type == chunk::BLOCK_STATUS_EXT,
                id,
                &extents,
            );
            self.chunk(flags, chunk_type, &p)
        }

        fn error(self, flags: u16, errno: u32, msg: &str, offset: Option<u64>) -> Self {
            let mut p = BytesMut::new();
            encode_error_payload(&mut p, errno, msg);
            let t = match offset {
                Some(o) => {
                    p.put_u64(o);
                    chunk::ERROR_OFFSET
                }
                None => chunk::ERROR,
            };
            self.chunk(flags, t, &p)
        }

        fn none(self, flags: u16) -> Self {
            self.chunk(flags, chunk::NONE, &[])
        }
    }

    fn take<'a>(wire: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, tail) = wire.split_at(n);
        *wire = tail;
        head
    }

    /// Feeds `wire` to `a` as the I/O code does, message by message.
    fn drive(a: &mut ReplyAssembler, mode: ReplyMode, mut wire: &[u8]) -> Result<(), Violation> {
        while !wire.is_empty() {
            let magic = u32::from_be_bytes(wire[..4].try_into().unwrap());
            let len = reply_header_len(magic, mode)?;
            let header = ReplyHeader::decode(take(&mut wire, len)).unwrap();
            match a.header(&header)? {
                Next::Complete => {}
                Next::Data(dst) => dst.copy_from_slice(take(&mut wire, dst.len())),
                Next::DataOffset(c) => {
                    let offset = u64::from_be_bytes(take(&mut wire, 8).try_into().unwrap());
                    let dst = a.data_at(c, offset)?;
                    dst.copy_from_slice(take(&mut wire, dst.len()));
                }
                Next::Payload(c) => {
                    let payload = take(&mut wire, c.payload_len());
                    a.payload(c, payload)?;
                }
            }
        }
        Ok(())
    }

    /// Runs a READ of LEN bytes at AT (buffer pre-filled with 0xee) and
    /// finishes it if the wire ended the reply.
    fn read(wire: Wire) -> Result<Result<Outcome, Failure>, Violation> {
        let mode = wire.mode;
        let mut a = ReplyAssembler::read(AT, vec![0xee; LEN], mode);
        drive(&mut a, mode, &wire.out)?;
        assert!(a.is_done(), "the script did not end the reply");
        Ok(a.finish())
    }

    fn read_ok(wire: Wire) -> Vec<u8> {
        match read(wire) {
            Ok(Ok(o)) => o.data,
            other => panic!("expected data, got {other:?}"),
        }
    }

    fn server_error(
        errno: u32,
        message: &str,
        offset: u64,
    ) -> Result<Result<Outcome, Failure>, Violation> {
        Ok(Err(Failure::Server(ServerError {
            errno,
            message: message.into(),
            offset,
        })))
    }

    fn outside(chunk: &'static str, offset: u64, length: u64) -> Violation {
        Violation::OutsideRead {
            chunk,
            offset,
            length,
            request_offset: AT,
            request_length: LEN as u64,
        }
    }

    const OVERLAP: Violation = Violation::Overlap {
        offset: AT,
        length: LEN as u64,
    };

    #[test]
    fn header_forms_per_mode() {
        use Violation::*;
        let (s, c, e) = (
            SIMPLE_REPLY_MAGIC,
            STRUCTURED_REPLY_MAGIC,
            EXTENDED_REPLY_MAGIC,
        );
        for (magic, mode, want) in [
            (s, Simple, Ok(SIMPLE_REPLY_LEN)),
            (s, Structured, Ok(SIMPLE_REPLY_LEN)),
            (s, Extended, Err(SimpleWithExtendedHeaders)),
            (c, Simple, Err(ChunkNotNegotiated)),
            (c, Structured, Ok(STRUCTURED_REPLY_LEN)),
            (c, Extended, Err(WrongHeaderForm)),
            (e, Simple, Err(ChunkNotNegotiated)),
            (e, Structured, Err(WrongHeaderForm)),
            (e, Extended, Ok(EXTENDED_REPLY_LEN)),
            (0x5a5a_5a5a, Structured, Err(BadMagic(0x5a5a_5a5a))),
        ] {
            assert_eq!(reply_header_len(magic, mode), want, "{magic:#x} {mode:?}");
        }
    }

    #[test]
    fn simple_replies_to_read() {
        let data: Vec<u8> = (0..LEN).map(|i| i as u8).collect();
        assert_eq!(read_ok(Wire::new(Simple).simple(0, &data)), data);
        // An error carries no data.
        assert_eq!(
            read(Wire::new(Simple).simple(errno::EIO, &[])),
            server_error(errno::EIO, "", AT)
        );
        // With structured replies READ data must come in chunks; an error
        // in a simple reply is tolerated.
        assert_eq!(
            read(Wire::new(Structured).simple(0, &data)),
            Err(Violation::SimpleReplyToStructuredRead)
        );
        assert_eq!(
            read(Wire::new(Structured).simple(errno::EPERM, &[])),
            server_error(errno::EPERM, "", AT)
        );
    }

    #[test]
    fn content_chunks_fill_the_buffer() {
        for mode in [Structured, Extended] {
            let data = vec![0x11; LEN];
            assert_eq!(read_ok(Wire::new(mode).data(DONE, AT, &data)), data);
            // Any order, holes read as zeroes, a trailing NONE may end it.
            let got = read_ok(
                Wire::new(mode)
                    .data(0, AT + 3072, &[0x33; 1024])
                    .hole(0, AT + 1024, 2048)
                    .data(0, AT, &[0x11; 1024])
                    .none(DONE),
            );
            let mut want = vec![0x11; 1024];
            want.extend([0; 2048]);
            want.extend([0x33; 1024]);
            assert_eq!(got, want);
            // A hole for everything.
            assert_eq!(
                read_ok(Wire::new(mode).hole(DONE, AT, LEN as u32)),
                vec![0; LEN]
            );
        }
    }

    #[test]
    fn content_chunks_must_lie_inside_the_read() {
        let end = AT + LEN as u64;
        for (wire, want) in [
            (
                Wire::new(Structured).data(DONE, end, &[1; 512]),
                outside("data", end, 512),
            ),
            (
                Wire::new(Structured).data(DONE, AT - 512, &[1; 512]),
                outside("data", AT - 512, 512),
            ),
            (
                Wire::new(Extended).data(DONE, end - 256, &[1; 512]),
                outside("data", end - 256, 512),
            ),
            (
                Wire::new(Structured).data(DONE, AT, &[1; LEN + 1]),
                outside("data", AT, LEN as u64 + 1),
            ),
            (
                Wire::new(Structured).hole(DONE, end - 1, 2),
                outside("hole", end - 1, 2),
            ),
            (
                Wire::new(Structured).hole(DONE, AT, 0),
                outside("hole", AT, 0),
            ),
            (
                Wire::new(Structured).data(DONE, u64::MAX, &[1; 4]),
                outside("data", u64::MAX, 4),
            ),
        ] {
            assert_eq!(read(wire), Err(want));
        }
        // A payload length far beyond the buffer is refused by range, before
        // anything is read into it.
        let mut wire = BytesMut::new();
        encode_chunk_header(&mut wire, true, DONE, chunk::OFFSET_DATA, 1, AT, u64::MAX);
        wire.put_u64(AT);
        let mut a = ReplyAssembler::read(AT, vec![0; LEN], Extended);
        assert_eq!(
            drive(&mut a, Extended, &wire),
            Err(outside("data", AT, u64::MAX - 8))
        );
    }

    #[test]
    fn overlapping_chunks_are_refused() {
        let half = &[0x11; LEN / 2];
        for wire in [
            // The first half twice: the byte count adds up, the buffer is
            // half written.
            Wire::new(Structured).data(0, AT, half).data(DONE, AT, half),
            // Everything, then a part again, either way round.
            Wire::new(Structured)
                .data(0, AT, &[1; LEN])
                .hole(DONE, AT + 512, 512),
            Wire::new(Structured)
                .hole(0, AT + 512, 512)
                .data(DONE, AT, &[1; LEN]),
            // Neighbours that touch are fine; one straddling them is not.
            Wire::new(Extended)
                .data(0, AT, &[1; 1024])
                .data(0, AT + 2048, &[1; 1024])
                .hole(0, AT + 1024, 1024)
                .hole(DONE, AT + 1024 + 512, 1024),
            Wire::new(Structured)
                .data(0, AT + 1024, &[1; 1024])
                .hole(DONE, AT, 1025),
        ] {
            assert_eq!(read(wire), Err(OVERLAP));
        }
    }

    #[test]
    fn a_read_must_be_covered() {
        assert_eq!(
            read(Wire::new(Structured).data(DONE, AT, &[1; LEN / 2])),
            Ok(Err(Failure::Violation(Violation::Incomplete {
                covered: LEN as u64 / 2,
            })))
        );
        assert!(matches!(
            read(Wire::new(Extended).none(DONE)),
            Ok(Err(Failure::Violation(Violation::Incomplete {
                covered: 0,
                ..
            })))
        ));
        // A zero-length read is covered by nothing.
        let mut a = ReplyAssembler::read(AT, Vec::new(), Extended);
        drive(&mut a, Extended, &Wire::new(Extended).none(DONE).out).unwrap();
        assert_eq!(a.finish(), Ok(Outcome::default()));
    }

    #[test]
    fn none_and_data_chunk_shapes() {
        assert_eq!(
            read(Wire::new(Structured).data(0, AT, &[1; LEN]).none(0)),
            Err(Violation::NoneWithoutDone)
        );
        assert_eq!(
            read(
                Wire::new(Structured)
                    .data(0, AT, &[1; LEN])
                    .chunk(DONE, chunk::NONE, &[0; 4])
            ),
            Err(Violation::NoneWithPayload)
        );
        assert_eq!(
            read(Wire::new(Structured).chunk(DONE, chunk::OFFSET_DATA, &AT.to_be_bytes())),
            Err(Violation::DataTooShort)
        );
        assert!(matches!(
            read(Wire::new(Structured).chunk(DONE, 3, &[])),
            Err(Violation::BadChunk { chunk_type: 3, .. })
        ));
        assert!(matches!(
            read(Wire::new(Structured).chunk(DONE, chunk::OFFSET_HOLE, &[0; 13])),
            Err(Violation::BadChunk {
                chunk_type: chunk::OFFSET_HOLE,
                ..
            })
        ));
    }

    #[test]
    fn non_data_payloads_are_bounded_before_reading() {
        let mut a = ReplyAssembler::read(AT, vec![0; LEN], Structured);
        let header = ReplyHeader::Chunk {
            flags: DONE,
            chunk_type: chunk::ERROR,
            cookie: 1,
            offset: 0,
            payload_len: MAX_CHUNK_PAYLOAD + 1,
        };
        assert!(matches!(
            a.header(&header),
            Err(Violation::ChunkTooLong(n)) if n == MAX_CHUNK_PAYLOAD + 1
        ));
    }

    #[test]
    fn error_chunks_fail_the_request() {
        // The first error wins; the reply still runs to DONE.
        assert_eq!(
            read(
                Wire::new(Structured)
                    .error(0, errno::EIO, "disk on fire", None)
                    .data(0, AT, &[1; LEN])
                    .error(DONE, errno::ENOSPC, "later", None)
            ),
            server_error(errno::EIO, "disk on fire", AT)
        );
        // ERROR_OFFSET pinpoints the failure inside the request.
        assert_eq!(
            read(Wire::new(Extended).data(0, AT, &[1; 512]).error(
                DONE,
                errno::EIO,
                "bad sector",
                Some(AT + 512)
            )),
            server_error(errno::EIO, "bad sector", AT + 512)
        );
        for at in [AT - 1, AT + LEN as u64, u64::MAX] {
            assert_eq!(
                read(Wire::new(Structured).error(DONE, errno::EIO, "", Some(at))),
                Err(Violation::ErrorOutsideRequest {
                    offset: at,
                    request_offset: AT,
                    request_length: LEN as u64,
                })
            );
        }
        // An error value of 0 counts as EINVAL; unknown error types are
        // errors all the same.
        assert_eq!(
            read(Wire::new(Structured).error(DONE, 0, "zero", None)),
            server_error(errno::EINVAL, "zero", AT)
        );
        let mut p = BytesMut::new();
        encode_error_payload(&mut p, errno::EIO, "odd");
        p.put_slice(b"extra");
        assert_eq!(
            read(Wire::new(Structured).chunk(DONE, chunk::ERROR_BIT | 9, &p)),
            server_error(errno::EIO, "odd", AT)
        );
    }

    #[test]
    fn one_reply_per_request() {
        let mut a = ReplyAssembler::plain(cmd::FLUSH, 0, 0, Structured);
        let wire = Wire::new(Structured).simple(0, &[]).simple(0, &[]);
        assert_eq!(
            drive(&mut a, Structured, &wire.out),
            Err(Violation::AfterDone)
        );
        let mut a = ReplyAssembler::plain(cmd::WRITE, 0, 512, Structured);
        let wire = Wire::new(Structured)
            .error(0, errno::EIO, "", None)
            .simple(0, &[]);
        assert_eq!(
            drive(&mut a, Structured, &wire.out),
            Err(Violation::SimpleAfterChunks)
        );
    }

    #[test]
    fn plain_commands() {
        for (mode, wire) in [
            (Simple, Wire::new(Simple).simple(0, &[])),
            (Structured, Wire::new(Structured).simple(0, &[])),
            (Structured, Wire::new(Structured).none(DONE)),
            (Extended, Wire::new(Extended).none(DONE)),
        ] {
            let mut a = ReplyAssembler::plain(cmd::WRITE, AT, 512, mode);
            drive(&mut a, mode, &wire.out).unwrap();
            assert!(a.is_done());
            assert_eq!(a.finish(), Ok(Outcome::default()));
        }
        for (wire, want) in [
            (
                Wire::new(Structured).data(DONE, AT, &[1; 512]),
                Violation::ChunkForCommand {
                    chunk: "data",
                    command: "WRITE",
                },
            ),
            (
                Wire::new(Structured).hole(DONE, AT, 512),
                Violation::ChunkForCommand {
                    chunk: "hole",
                    command: "WRITE",
                },
            ),
            (
                Wire::new(Structured).status(DONE, 0, &[512]),
                Violation::ChunkForCommand {
                    chunk: "block status",
                    command: "WRITE",
                },
            ),
        ] {
            let mut a = ReplyAssembler::plain(cmd::WRITE, AT, 512, Structured);
            assert_eq!(drive(&mut a, Structured, &wire.out), Err(want));
        }
    }

    fn status(wire: Wire) -> Result<Result<Outcome, Failure>, Violation> {
        let mode = wire.mode;
        let mut a = ReplyAssembler::block_status(AT, 1 << 20, mode, vec![0, 2]);
        drive(&mut a, mode, &wire.out)?;
        assert!(a.is_done(), "the script did not end the reply");
        Ok(a.finish())
    }

    fn extents(lengths: &[u64]) -> Vec<Extent> {
        lengths
            .iter()
            .map(|&length| Extent { length, flags: 0 })
            .collect()
    }

    #[test]
    fn block_status_replies() {
        for mode in [Structured, Extended] {
            assert_eq!(
                status(
                    Wire::new(mode)
                        .status(0, 2, &[512, 1024])
                        .status(DONE, 0, &[4096])
                ),
                Ok(Ok(Outcome {
                    extents: vec![(2, extents(&[512, 1024])), (0, extents(&[4096]))],
                    ..Outcome::default()
                }))
            );
            assert_eq!(
                status(Wire::new(mode).status(0, 1, &[512]).none(DONE)),
                Err(Violation::UnselectedContext(1))
            );
            assert_eq!(
                status(Wire::new(mode).status(0, 2, &[512]).status(DONE, 2, &[512])),
                Err(Violation::DuplicateContext(2))
            );
            assert_eq!(
                status(Wire::new(mode).none(DONE)),
                Ok(Err(Failure::Violation(Violation::NoExtents)))
            );
            assert_eq!(
                status(Wire::new(mode).data(DONE, AT, &[0; 512])),
                Err(Violation::ChunkForCommand {
                    chunk: "data",
                    command: "BLOCK_STATUS"
                })
            );
            assert_eq!(
                status(
                    Wire::new(mode)
                        .status(0, 0, &[512])
                        .error(DONE, errno::EINVAL, "no", None)
                ),
                server_error(errno::EINVAL, "no", AT)
            );
        }
        assert_eq!(
            status(Wire::new(Structured).simple(0, &[])),
            Err(Violation::SimpleReplyToBlockStatus)
        );
        // Compact status chunks are tolerated with extended headers, as qemu
        // does; extended ones without them are not.
        assert!(matches!(
            status(Wire::new(Extended).status_as(DONE, chunk::BLOCK_STATUS, 0, &[512])),
            Ok(Ok(_))
        ));
        assert_eq!(
            status(Wire::new(Structured).status_as(DONE, chunk::BLOCK_STATUS_EXT, 0, &[512])),
            Err(Violation::ExtendedStatusWithoutExtendedHeaders)
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any set of content chunks: the assembler accepts exactly
            /// those that lie inside the request and overlap nothing before
            /// them, and the read succeeds exactly when they tile it; the
            /// buffer then holds what they carried.
            #[test]
            fn reassembly_matches_a_byte_map(
                len in 1usize..200,
                chunks in proptest::collection::vec((0u64..220, 0u64..80, any::<bool>()), 1..24),
            ) {
                let mut model: Vec<Option<u8>> = vec![None; len];
                let mut wire = Wire::new(Structured);
                let mut violation = None;
                let last = chunks.len() - 1;
                for (i, &(start, n, hole)) in chunks.iter().enumerate() {
                    let flags = if i == last { DONE } else { 0 };
                    let fill = i as u8 + 1;
                    let inside = n > 0 && start + n <= len as u64;
                    let free = inside && model[start as usize..(start + n) as usize].iter().all(Option::is_none);
                    if violation.is_none() {
                        if !free {
                            violation = Some(!inside);
                        } else {
                            let b = if hole { 0 } else { fill };
                            model[start as usize..(start + n) as usize].fill(Some(b));
                        }
                    }
                    wire = if hole {
                        wire.hole(flags, AT + start, n as u32)
                    } else if n == 0 {
                        // A data chunk carries at least one byte: stand in
                        // with one past the end.
                        wire.data(flags, AT + len as u64, &[fill])
                    } else {
                        wire.data(flags, AT + start, &vec![fill; n as usize])
                    };
                }
                let mut a = ReplyAssembler::read(AT, vec![0xee; len], Structured);
                let got = drive(&mut a, Structured, &wire.out);
                match violation {
                    Some(outside) => {
                        let e = got.unwrap_err();
                        prop_assert_eq!(matches!(e, Violation::OutsideRead { .. }), outside, "{}", e);
                        prop_assert_eq!(matches!(e, Violation::Overlap { .. }), !outside, "{}", e);
                    }
                    None => {
                        prop_assert_eq!(got, Ok(()));
                        let finished = a.finish();
                        if model.iter().all(Option::is_some) {
                            let want: Vec<u8> = model.iter().map(|b| b.unwrap()).collect();
                            prop_assert_eq!(finished.map(|o| o.data), Ok(want));
                        } else {
                            let is_incomplete = matches!(finished, Err(Failure::Violation(Violation::Incomplete { .. })));
                            prop_assert!(is_incomplete);
                        }
                    }
                }
            }
        }
    }
}
