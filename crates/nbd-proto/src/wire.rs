//! A bounds-checked big-endian reader over a byte slice: decoders use it so
//! that no input, however short or malformed, can make them panic.

use crate::DecodeError;

#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A protocol string of `len` bytes: at most 4096, UTF-8, no NUL.
    pub fn string(&mut self, len: usize) -> Result<String, DecodeError> {
        if len > crate::consts::MAX_STRING {
            return Err(DecodeError::StringTooLong(len));
        }
        let b = self.bytes(len)?;
        if b.contains(&0) {
            return Err(DecodeError::BadString);
        }
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadString)
    }

    /// A string preceded by its u32 length.
    pub fn string32(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        self.string(len)
    }
}
