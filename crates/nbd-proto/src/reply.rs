//! Transmission replies: simple replies, structured and extended chunks, and
//! the payloads of every chunk type.

use bytes::{BufMut, BytesMut};

use crate::consts::{EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk};
use crate::{DecodeError, Reader};

/// Which reply form a connection uses, fixed at the end of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Simple replies only (no structured replies negotiated).
    Simple,
    /// Structured replies with 20-byte chunk headers.
    Structured,
    /// Extended headers: 32-byte chunk headers, no simple replies.
    Extended,
}

impl ReplyMode {
    pub fn structured(self) -> bool {
        self != ReplyMode::Simple
    }
}

pub fn encode_simple(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A chunk header in structured or extended form. `offset` is the offset of
/// the request being answered (only sent in extended form).
#[allow(clippy::too_many_arguments)]
pub fn encode_chunk_header(
    out: &mut BytesMut,
    extended: bool,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    if extended {
        out.put_u32(EXTENDED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(chunk_type);
        out.put_u64(cookie);
        out.put_u64(offset);
        out.put_u64(payload_len);
    } else {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(chunk_type);
        out.put_u64(cookie);
        debug_assert!(payload_len <= u32::MAX as u64);
        out.put_u32(payload_len as u32);
    }
}

/// A decoded reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: u64,
        payload_len: u64,
    },
}

impl ReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            }),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
                flags: r.u16()?,
                chunk_type: r.u16()?,
                cookie: r.u64()?,
                offset: 0,
                payload_len: r.u32()?.into(),
            }),
            EXTENDED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
                flags: r.u16()?,
                chunk_type: r.u16()?,
                cookie: r.u64()?,
                offset: r.u64()?,
                payload_len: r.u64()?,
            }),
            other => Err(DecodeError::BadMagic(other.into())),
        }
    }

    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// One block status descriptor: a run of `length` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u64,
}

/// Payload of an OFFSET_HOLE chunk.
pub fn encode_hole_payload(out: &mut BytesMut, offset: u64, len: u32) {
    out.put_u64(offset);
    out.put_u32(len);
}

/// Payload of a BLOCK_STATUS (compact) or BLOCK_STATUS_EXT chunk. In compact
/// form each extent must fit 32 bits; callers split longer ones.
pub fn encode_block_status_payload(
    out: &mut BytesMut,
    extended: bool,
    context_id: u32,
    extents: &[Extent],
) {
    out.put_u32(context_id);
    if extended {
        out.put_u32(extents.len() as u32);
        for e in extents {
            out.put_u64(e.length);
            out.put_u64(e.flags);
        }
    } else {
        for e in extents {
            debug_assert!(e.length <= u32::MAX as u64 && e.flags <= u32::MAX as u64);
            out.put_u32(e.length as u32);
            out.put_u32(e.flags as u32);
        }
    }
}

/// Length of a block status payload with `n` extents.
pub fn block_status_payload_len(extended: bool, n: usize) -> usize {
    if extended { 8 + 16 * n } else { 4 + 8 * n }
}

/// Payload of an ERROR chunk (message cut to what qemu's client accepts).
pub fn encode_error_payload(out: &mut BytesMut, error: u32, msg: &str) {
    let msg = crate::option::truncate_str(msg, MAX_ERROR_MESSAGE);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// qemu's client rejects non-data chunks with payloads over 1000 bytes.
pub const MAX_ERROR_MESSAGE: usize = 512;

/// A decoded chunk payload (client side). Data chunks carry the offset of
/// their data; the data itself is read separately by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    Hole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        extents: Vec<Extent>,
    },
    Error {
        error: u32,
        message: String,
        offset: Option<u64>,
    },
}

/// Largest number of extents a client accepts in one block status chunk.
pub const MAX_EXTENTS_PER_CHUNK: usize = 1 << 20;

impl Chunk {
    /// Decodes any non-data chunk payload. Unknown non-error types are a
    /// protocol violation; unknown error types decode as `Error`.
    pub fn decode(chunk_type: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let chunk = match chunk_type {
            chunk::NONE => Chunk::None,
            chunk::OFFSET_HOLE => Chunk::Hole {
                offset: r.u64()?,
                length: r.u32()?,
            },
            chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => {
                let context_id = r.u32()?;
                let extended = chunk_type == chunk::BLOCK_STATUS_EXT;
                let n = if extended {
                    let n = r.u32()? as usize;
                    if n.checked_mul(16) != Some(r.remaining()) {
                        return Err(DecodeError::Invalid(
                            "block status descriptor count mismatch",
                        ));
                    }
                    n
                } else {
                    if !r.remaining().is_multiple_of(8) {
                        return Err(DecodeError::Invalid(
                            "block status payload not a multiple of 8",
                        ));
                    }
                    r.remaining() / 8
                };
                if n == 0 || n > MAX_EXTENTS_PER_CHUNK {
                    return Err(DecodeError::Invalid(
                        "block status descriptor count out of range",
                    ));
                }
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    let (length, flags) = if extended {
                        (r.u64()?, r.u64()?)
                    } else {
                        (r.u32()?.into(), r.u32()?.into())
                    };
                    if length == 0 {
                        return Err(DecodeError::Invalid("zero-length extent"));
                    }
                    extents.push(Extent { length, flags });
                }
                Chunk::BlockStatus {
                    context_id,
                    extents,
                }
            }
            t if t & chunk::ERROR_BIT != 0 => {
                let error = r.u32()?;
                let msg_len = r.u16()? as usize;
                let message = String::from_utf8_lossy(r.bytes(msg_len)?).into_owned();
                let offset = if t == chunk::ERROR_OFFSET {
                    Some(r.u64()?)
                } else {
                    None
                };
                r.rest();
                Chunk::Error {
                    error,
                    message,
                    offset,
                }
            }
            _ => return Err(DecodeError::Invalid("unknown chunk type")),
        };
        if !r.is_empty() {
            return Err(DecodeError::Trailing);
        }
        Ok(chunk)
    }
}
