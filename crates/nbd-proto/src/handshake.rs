//! The fixed parts of the handshake: greeting, client flags and the reply to
//! NBD_OPT_EXPORT_NAME.

use bytes::{BufMut, BytesMut};

use crate::consts::{CLISERV_MAGIC, IHAVEOPT, NBDMAGIC};
use crate::{DecodeError, Reader};

/// Length of the newstyle greeting.
pub const GREETING_LEN: usize = 18;

pub fn encode_greeting(out: &mut BytesMut, handshake_flags: u16) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(handshake_flags);
}

/// Decodes the 18-byte newstyle greeting, returning the handshake flags.
pub fn decode_greeting(buf: &[u8]) -> Result<u16, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != NBDMAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let second = r.u64()?;
    if second == CLISERV_MAGIC {
        return Err(DecodeError::Invalid("server speaks oldstyle negotiation"));
    }
    if second != IHAVEOPT {
        return Err(DecodeError::BadMagic(second));
    }
    r.u16()
}

/// The reply to a successful EXPORT_NAME: size, flags, and 124 zero bytes
/// unless both sides agreed on NO_ZEROES.
pub fn encode_export_name_reply(out: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, 124);
    }
}

/// Length of the EXPORT_NAME reply the client must read.
pub fn export_name_reply_len(no_zeroes: bool) -> usize {
    if no_zeroes { 10 } else { 134 }
}

/// Decodes size and transmission flags from an EXPORT_NAME reply.
pub fn decode_export_name_reply(buf: &[u8]) -> Result<(u64, u16), DecodeError> {
    let mut r = Reader::new(buf);
    Ok((r.u64()?, r.u16()?))
}
