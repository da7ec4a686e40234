use std::fs::File;
use std::io::IoSliceMut;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::Extent;

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

impl Caps {
    /// A read-only device that reads, flushes (a no-op) and prefetches.
    pub const READ_ONLY: Caps = Caps {
        read_only: true,
        flush: true,
        fua: false,
        trim: false,
        write_zeroes: false,
        fast_zero: false,
        cache: true,
        multi_conn: true,
        rotational: false,
    };
}

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The range may be deallocated (no NBD_CMD_FLAG_NO_HOLE).
    pub may_trim: bool,
    /// Fail with [`Error::NotFast`] rather than write zeroes.
    pub fast: bool,
    pub fua: bool,
}

/// `Err(OutOfRange)` unless `[offset, offset+len)` lies within `size`
/// bytes (computed without overflow).
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    if offset > size || len > size - offset {
        return Err(Error::OutOfRange { offset, len });
    }
    Ok(())
}

/// Bytes of a device that are, until a write changes them, the bytes of a
/// file at `offset`, and are in the page cache: a reply can send them to a
/// socket straight from the cache, without a copy through user space.
#[derive(Clone, Debug)]
pub struct FileSpan {
    pub file: Arc<File>,
    pub offset: u64,
}

/// Brings a range's data in (see [`BlockDev::fetch_ahead`]). Once the
/// range can be read it yields what is left to do, if anything (the rest
/// of the blocks it fetches), for the caller to run to its end on its own.
pub struct Fetch(pub Pin<Box<dyn Future<Output = Result<Option<Fetch>>> + Send>>);

impl Future for Fetch {
    type Output = Result<Option<Fetch>>;
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// A block device as an export sees it. Calls block (positional I/O); the
/// server runs them on a blocking pool. All methods take `&self` so that
/// many requests run at once without a global lock.
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
    /// When a read of `[offset, offset+len)` would wait for data that is
    /// not here yet (a copy-on-read layer's absent blocks): a future that
    /// brings it in, for a caller on an async runtime to await instead of
    /// parking a thread on the fetch; once it yields, the read finds the
    /// data here (unless a fetch failed or another caller's is still under
    /// way). None: nothing to bring.
    fn fetch_ahead(&self, offset: u64, len: u64) -> Option<Fetch> {
        let _ = (offset, len);
        None
    }
    /// Fills `bufs` from consecutive bytes at `offset`, as `read_at` fills
    /// one buffer. Devices that can do it in one system call override it.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], mut offset: u64) -> Result<()> {
        for b in bufs.iter_mut() {
            self.read_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
    /// Where `[offset, offset+len)` can be sent from the page cache (see
    /// [`FileSpan`]); None when those bytes are not plainly a cached file
    /// range (a snapshot view, absent blocks, data not in cache). A device
    /// whose reads are not exactly the file's bytes must keep the default.
    fn file_span(&self, offset: u64, len: u64) -> Option<FileSpan> {
        let _ = (offset, len);
        None
    }
    /// `base:allocation` of `[offset, offset+len)` when this device knows
    /// it without waiting on anything remote; None: treat it all as data.
    /// The server splits READ replies along these holes, which must never
    /// cost a round trip of its own (a post-copy disk would otherwise ask
    /// its source for block status before every first read).
    fn local_allocation(&self, offset: u64, len: u64, max: usize) -> Option<Vec<Extent>> {
        self.extents(crate::BASE_ALLOCATION, offset, len, max).ok()
    }
    /// Makes durable whatever must be durable before `[offset, offset+len)`
    /// may change (a dirty bit, a preserved copy). The write methods do
    /// this themselves; a layer calls it on `next` to overlap its own
    /// durability work with that of the layers below.
    fn prepare_write(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    // The writes refuse by default: a read-only device (a snapshot view, a
    // backup point, a post-copy source) implements only the reads.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let _ = (buf, offset, fua);
        Err(Error::ReadOnly)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let _ = (offset, len, mode);
        Err(Error::ReadOnly)
    }
    /// Advisory discard: may do nothing.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let _ = (offset, len, fua);
        Err(Error::ReadOnly)
    }
    /// Makes `[offset, offset+len)` hold the bytes `src` holds at the same
    /// offset by sharing its blocks (a reflink, `FICLONERANGE`) instead
    /// of writing them: a change of that range like a write, without the
    /// data passing through. `offset` must be aligned to the file
    /// system's block, and so must `len` unless the range ends at `src`'s
    /// end. [`Error::Unsupported`] where it cannot be done (not a file,
    /// no reflinks, a layer that cannot account for it): then nothing
    /// changed and the caller writes the bytes instead.
    fn clone_range(&self, src: &File, offset: u64, len: u64) -> Result<()> {
        let _ = (src, offset, len);
        Err(Error::Unsupported)
    }
    fn flush(&self) -> Result<()>;
    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size(), offset, len)
    }
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

/// A layer of the block stack: one concern on top of `next`. Every method
/// passes through unless the layer overrides it; a layer that only tracks
/// writes, say, overrides the write methods and nothing else. The
/// exception is [`clone_range`](Layer::clone_range), which a layer must
/// take up itself.
pub trait Layer: Send + Sync + 'static {
    /// The device below.
    fn next(&self) -> &dyn BlockDev;

    fn size(&self) -> u64 {
        self.next().size()
    }
    fn caps(&self) -> Caps {
        self.next().caps()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.next().read_at(buf, offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.next().read_at_nowait(buf, offset)
    }
    fn fetch_ahead(&self, offset: u64, len: u64) -> Option<Fetch> {
        self.next().fetch_ahead(offset, len)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.next().read_vectored_at(bufs, offset)
    }
    /// A layer that changes what reads return must override this.
    fn file_span(&self, offset: u64, len: u64) -> Option<FileSpan> {
        self.next().file_span(offset, len)
    }
    /// A layer that changes `base:allocation` must override this.
    fn local_allocation(&self, offset: u64, len: u64, max: usize) -> Option<Vec<Extent>> {
        self.next().local_allocation(offset, len, max)
    }
    fn prepare_write(&self, offset: u64, len: u64) -> Result<()> {
        self.next().prepare_write(offset, len)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.next().write_at(buf, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.next().write_zeroes(offset, len, mode)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.next().trim(offset, len, fua)
    }
    /// The one method that does not pass through by default: a layer that
    /// does something for every write (marks it dirty, preserves what it
    /// overwrites, repeats it elsewhere) would be skipped by a clone it
    /// never heard of. So a layer opts in by overriding it, and one that
    /// does not refuses; the caller then writes the bytes, which every
    /// layer sees.
    fn clone_range(&self, src: &File, offset: u64, len: u64) -> Result<()> {
        let _ = (src, offset, len);
        Err(Error::Unsupported)
    }
    fn flush(&self) -> Result<()> {
        self.next().flush()
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.next().cache(offset, len)
    }
    fn contexts(&self) -> Vec<String> {
        self.next().contexts()
    }
    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>> {
        self.next().extents(context, offset, len, max_extents)
    }
}

impl<L: Layer> BlockDev for L {
    fn size(&self) -> u64 {
        Layer::size(self)
    }
    fn caps(&self) -> Caps {
        Layer::caps(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Layer::read_at(self, buf, offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        Layer::read_at_nowait(self, buf, offset)
    }
    fn fetch_ahead(&self, offset: u64, len: u64) -> Option<Fetch> {
        Layer::fetch_ahead(self, offset, len)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        Layer::read_vectored_at(self, bufs, offset)
    }
    fn file_span(&self, offset: u64, len: u64) -> Option<FileSpan> {
        Layer::file_span(self, offset, len)
    }
    fn local_allocation(&self, offset: u64, len: u64, max: usize) -> Option<Vec<Extent>> {
        Layer::local_allocation(self, offset, len, max)
    }
    fn prepare_write(&self, offset: u64, len: u64) -> Result<()> {
        Layer::prepare_write(self, offset, len)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        Layer::write_at(self, buf, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        Layer::write_zeroes(self, offset, len, mode)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        Layer::trim(self, offset, len, fua)
    }
    fn clone_range(&self, src: &File, offset: u64, len: u64) -> Result<()> {
        Layer::clone_range(self, src, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Layer::flush(self)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        Layer::cache(self, offset, len)
    }
    fn contexts(&self) -> Vec<String> {
        Layer::contexts(self)
    }
    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>> {
        Layer::extents(self, context, offset, len, max_extents)
    }
}
