//! Option requests (client to server) and option replies (server to client).

use bytes::{BufMut, BytesMut};

use crate::consts::{IHAVEOPT, MAX_STRING, OPT_REPLY_MAGIC, info, rep};
use crate::{DecodeError, Reader};

/// Header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic(magic));
        }
        Ok(OptionHeader {
            code: r.u32()?,
            len: r.u32()?,
        })
    }
}

pub fn encode_option(out: &mut BytesMut, code: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(code);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub rep_type: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        Ok(OptionReplyHeader {
            option: r.u32()?,
            rep_type: r.u32()?,
            len: r.u32()?,
        })
    }
}

pub fn encode_reply(out: &mut BytesMut, option: u32, rep_type: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(rep_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// An error reply; the message is cut to the protocol's string limit.
pub fn encode_error(out: &mut BytesMut, option: u32, rep_type: u32, msg: &str) {
    let msg = truncate_str(msg, MAX_STRING);
    encode_reply(out, option, rep_type, msg.as_bytes());
}

/// The longest prefix of `s` that fits `max` bytes without splitting a character.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let name_len = r.u32()? as usize;
        if name_len > data.len().saturating_sub(6) {
            return Err(DecodeError::Invalid(
                "export name length exceeds the option",
            ));
        }
        let name = r.string(name_len)?;
        let n = r.u16()? as usize;
        if r.remaining() != n * 2 {
            return Err(DecodeError::Invalid(
                "information request count does not match the option length",
            ));
        }
        let mut infos = Vec::with_capacity(n);
        for _ in 0..n {
            infos.push(r.u16()?);
        }
        Ok(InfoRequest { name, infos })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.name.len() as u32);
        out.put_slice(self.name.as_bytes());
        out.put_u16(self.infos.len() as u16);
        for i in &self.infos {
            out.put_u16(*i);
        }
    }
}

/// Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let export = r.string32()?;
        let n = r.u32()? as usize;
        // Each query takes at least its 4-byte length: bound the allocation by
        // what the option can actually hold.
        if n > r.remaining() / 4 {
            return Err(DecodeError::Invalid("query count exceeds the option"));
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            queries.push(r.string32()?);
        }
        if !r.is_empty() {
            return Err(DecodeError::Trailing);
        }
        Ok(MetaContextRequest { export, queries })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.export.len() as u32);
        out.put_slice(self.export.as_bytes());
        out.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            out.put_u32(q.len() as u32);
            out.put_slice(q.as_bytes());
        }
    }
}

/// One NBD_REP_SERVER entry of a LIST reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: String,
    pub description: String,
}

impl ServerEntry {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.name.len() as u32);
        out.put_slice(self.name.as_bytes());
        out.put_slice(self.description.as_bytes());
    }

    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let name = r.string32()?;
        let rest = r.rest();
        let description = Reader::new(rest).string(rest.len())?;
        Ok(ServerEntry { name, description })
    }
}

/// The payload of an NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    Unknown(u16),
}

impl Info {
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Info::Export { size, flags } => {
                out.put_u16(info::EXPORT);
                out.put_u64(*size);
                out.put_u16(*flags);
            }
            Info::Name(s) => {
                out.put_u16(info::NAME);
                out.put_slice(truncate_str(s, MAX_STRING).as_bytes());
            }
            Info::Description(s) => {
                out.put_u16(info::DESCRIPTION);
                out.put_slice(truncate_str(s, MAX_STRING).as_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                out.put_u16(info::BLOCK_SIZE);
                out.put_u32(*minimum);
                out.put_u32(*preferred);
                out.put_u32(*maximum);
            }
            Info::Unknown(t) => out.put_u16(*t),
        }
    }

    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let t = r.u16()?;
        let info = match t {
            info::EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            info::NAME | info::DESCRIPTION => {
                let s = r.string(r.remaining())?;
                if t == info::NAME {
                    Info::Name(s)
                } else {
                    Info::Description(s)
                }
            }
            info::BLOCK_SIZE => Info::BlockSize {
                minimum: r.u32()?,
                preferred: r.u32()?,
                maximum: r.u32()?,
            },
            other => {
                r.rest();
                Info::Unknown(other)
            }
        };
        if !r.is_empty() {
            return Err(DecodeError::Trailing);
        }
        Ok(info)
    }
}

/// The payload of an NBD_REP_META_CONTEXT reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

impl MetaContext {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.id);
        out.put_slice(self.name.as_bytes());
    }

    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let id = r.u32()?;
        let name = r.string(r.remaining())?;
        Ok(MetaContext { id, name })
    }
}

/// Builds an option reply whose payload is produced by `encode`.
pub fn encode_reply_with(
    out: &mut BytesMut,
    option: u32,
    rep_type: u32,
    encode: impl FnOnce(&mut BytesMut),
) {
    let mut payload = BytesMut::new();
    encode(&mut payload);
    encode_reply(out, option, rep_type, &payload);
}

/// Human-readable text of an error reply's payload.
pub fn error_message(rep_type: u32, data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    if text.is_empty() {
        rep::name(rep_type).to_string()
    } else {
        format!("{}: {}", rep::name(rep_type), text)
    }
}
