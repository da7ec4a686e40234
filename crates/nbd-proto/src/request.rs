//! Transmission requests in compact (28-byte) and extended (32-byte) form.

use bytes::{BufMut, BytesMut};

use crate::consts::{
    EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REQUEST_LEN, REQUEST_MAGIC, cmd, cmdflag,
};
use crate::{DecodeError, Reader};

/// A request header. `length` is 64-bit so one type serves both header
/// forms; in compact form it never exceeds `u32::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Header length for the negotiated form.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Bytes of payload that follow this header on the wire: a WRITE's data,
    /// or, with extended headers, whatever a PAYLOAD_LEN request announces.
    /// The reader must consume them even when it refuses the request, or
    /// the stream loses its framing. (qemu tolerates an extended WRITE
    /// without PAYLOAD_LEN, and so do we: its length is still its payload.)
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == cmd::WRITE || (extended && self.flags & cmdflag::PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }

    /// Decodes a header from exactly `header_len(extended)` bytes. A compact
    /// header arriving on an extended connection (or the reverse) is a
    /// protocol violation: the caller must drop the connection.
    pub fn decode(buf: &[u8], extended: bool) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected {
            return Err(DecodeError::BadMagic(magic.into()));
        }
        let flags = r.u16()?;
        let command = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = if extended { r.u64()? } else { r.u32()?.into() };
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Encodes the header (not the payload). In compact form a length above
    /// `u32::MAX` cannot be expressed; callers split requests beforehand.
    pub fn encode(&self, out: &mut BytesMut, extended: bool) {
        if extended {
            out.put_u32(EXTENDED_REQUEST_MAGIC);
        } else {
            out.put_u32(REQUEST_MAGIC);
        }
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        if extended {
            out.put_u64(self.length);
        } else {
            debug_assert!(self.length <= u32::MAX as u64);
            out.put_u32(self.length as u32);
        }
    }
}
