//! The storage trait every export layer implements.

use crate::error::Result;

/// What a device can do; the server derives the transmission flags from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
    pub cache: bool,
    /// Every handle sees the same data and one flush covers all of them.
    pub multi_conn: bool,
    pub rotational: bool,
}

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The range may be deallocated (no NBD_CMD_FLAG_NO_HOLE).
    pub may_trim: bool,
    /// Fail with [`StoreError::NotFast`](crate::StoreError::NotFast) rather than write zeroes.
    pub fast: bool,
    pub fua: bool,
}

/// A run of `length` bytes sharing the status `flags` of one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// A block device as an export sees it. Calls block (positional file I/O);
/// the server runs them on a blocking pool. All methods take `&self` so
/// that many requests run at once without a global lock.
pub trait BlockDev: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn caps(&self) -> Caps;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Like [`read_at`](Self::read_at), but only if it needs no waiting
    /// (the data is cached): `Ok(false)` means "would block, use
    /// `read_at`". Lets the server answer cached reads without a thread hop.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()>;
    /// Advisory discard: may do nothing.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    fn flush(&self) -> Result<()>;
    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> Result<()>;
    /// Meta contexts this device can answer, e.g. `base:allocation`.
    fn contexts(&self) -> Vec<String>;
    /// Extents of `context` covering at least the start of
    /// `[offset, offset+len)`, at most `max_extents` of them, contiguous from
    /// `offset` and never past the end of the range.
    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>>;
}
