//! The read-only view of one snapshot (export `DISK@SNAP`): its contexts
//! (allocation, the dirty bitmaps of older checkpoints, its identity) over
//! its frozen content, which one of the snapshot backends holds.
//!
//! With the preserved-block store ([`Preserved`]), a block reads from the
//! store when the snapshot has a copy of it, else from the device below
//! the origin, which then still holds the snapshot's content. The race
//! with a live write is closed by the origin's write order (copy durable →
//! map entry → write goes down): a view that found no map entry reads
//! below and then looks again; if an entry appeared meanwhile the block
//! may already be overwritten, so it rereads from the copy. If no entry
//! appeared, the overwrite had not started when the read finished. A
//! reflink snapshot reads its clone (`clones.rs`), which nothing writes.

use std::sync::Arc;

use ferry_block::{
    BASE_ALLOCATION, BlockDev, Caps, DIRTY_BITMAP_PREFIX, Error, Extent, Result, check_range,
};

use crate::dirty::DirtyTracker;
use crate::origin::SnapshotOrigin;

/// A snapshot's frozen content, as its backend holds it. Every method
/// fails with [`Error::Gone`] once the snapshot is deleted.
pub(crate) trait Frozen: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The inline path for cached reads: Ok(false) where it would block.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool>;
    /// `base:allocation` of `[offset, offset+len)`.
    fn allocation(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>>;
    fn alive(&self) -> Result<()>;
}

pub struct SnapshotView {
    /// Keeps its owner (the disk, and so the lock on its state directory)
    /// alive while the view is served; the view reads through the layers.
    _owner: Arc<dyn Send + Sync>,
    content: Arc<dyn Frozen>,
    size: u64,
    dirty: Arc<DirtyTracker>,
    /// The snapshot's identity context (`nbdferry:identity:...`).
    identity: String,
    /// First dirty generation after the snapshot (None: no checkpoint
    /// existed then, so it offers no dirty contexts).
    gen_end: Option<u64>,
}

impl SnapshotView {
    pub(crate) fn new(
        owner: Arc<dyn Send + Sync>,
        content: Arc<dyn Frozen>,
        size: u64,
        dirty: Arc<DirtyTracker>,
        identity: String,
        gen_end: Option<u64>,
    ) -> Self {
        SnapshotView {
            _owner: owner,
            content,
            size,
            dirty,
            identity,
            gen_end,
        }
    }
}

impl BlockDev for SnapshotView {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::READ_ONLY
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.content.read_at(buf, offset)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.content.read_at_nowait(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn contexts(&self) -> Vec<String> {
        let mut v = vec![BASE_ALLOCATION.to_string()];
        v.extend(
            self.dirty
                .checkpoints_before(self.gen_end)
                .into_iter()
                .map(|n| format!("{DIRTY_BITMAP_PREFIX}{n}")),
        );
        v.push(self.identity.clone());
        v
    }

    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if context == BASE_ALLOCATION {
            return self.content.allocation(offset, len, max_extents);
        }
        if context == self.identity {
            return crate::disk::identity_extent(self.size, offset, len);
        }
        if self.gen_end.is_none() {
            return Err(Error::UnknownContext(context.to_string()));
        }
        self.content.alive()?;
        self.dirty
            .extents_until(context, self.gen_end, offset, len, max_extents)
    }
}

/// A snapshot's content in the preserved-block store and below the origin.
pub(crate) struct Preserved {
    origin: Arc<SnapshotOrigin>,
    /// `DISK@SNAP`, for errors.
    export: String,
    seq: u64,
}

impl Preserved {
    pub(crate) fn new(origin: Arc<SnapshotOrigin>, export: String, seq: u64) -> Self {
        Preserved {
            origin,
            export,
            seq,
        }
    }

    /// Slots of blocks `[a, b)`, or an error once the snapshot is deleted.
    fn slots(&self, a: u64, b: u64) -> Result<Vec<Option<u64>>> {
        self.origin
            .slots(self.seq, a, b)
            .ok_or_else(|| Error::Gone(format!("snapshot '{}' was deleted", self.export)))
    }

    fn gran(&self) -> u64 {
        self.origin.granularity()
    }

    fn blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        let gran = self.gran();
        (offset / gran, (offset + len - 1) / gran + 1)
    }
}

impl Frozen for Preserved {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return self.alive();
        }
        let gran = self.gran();
        let (a, b) = self.blocks(offset, len);
        let first = self.slots(a, b)?;
        // Piece of `buf` that block `blk` covers.
        let piece = |blk: u64| {
            let start = (blk * gran).max(offset);
            let end = ((blk + 1) * gran).min(offset + len);
            (
                (start - offset) as usize,
                (end - offset) as usize,
                start - blk * gran,
            )
        };
        // Shared runs first, in as few reads as possible.
        let mut blk = a;
        while blk < b {
            if first[(blk - a) as usize].is_some() {
                blk += 1;
                continue;
            }
            let mut end = blk + 1;
            while end < b && first[(end - a) as usize].is_none() {
                end += 1;
            }
            let (s, _, _) = piece(blk);
            let (_, e, _) = piece(end - 1);
            self.origin
                .below()
                .read_at(&mut buf[s..e], offset + s as u64)?;
            blk = end;
        }
        let again = self.slots(a, b)?;
        for blk in a..b {
            let i = (blk - a) as usize;
            if let Some(slot) = first[i].or(again[i]) {
                let (s, e, within) = piece(blk);
                self.origin.read_preserved(slot, within, &mut buf[s..e])?;
            }
        }
        Ok(())
    }

    /// The inline path for cached reads of blocks the snapshot still
    /// shares (same look-read-look protocol as `read_at`); anything
    /// preserved goes the blocking way.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let len = buf.len() as u64;
        if len == 0 {
            return self.alive().map(|()| true);
        }
        let (a, b) = self.blocks(offset, len);
        if self.slots(a, b)?.iter().any(Option::is_some) {
            return Ok(false);
        }
        if !self.origin.below().read_at_nowait(buf, offset)? {
            return Ok(false);
        }
        Ok(self.slots(a, b)?.iter().all(Option::is_none))
    }

    /// Allocation below first, then the map (same order as reads):
    /// preserved blocks are reported as data, which is always safe.
    fn allocation(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>> {
        let gran = self.gran();
        let below = self
            .origin
            .below()
            .extents(BASE_ALLOCATION, offset, len, usize::MAX)?;
        let (a, b) = self.blocks(offset, len);
        let slots = self.slots(a, b)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for e in below {
            let end = pos + e.length;
            while pos < end {
                let blk = pos / gran;
                let stop = ((blk + 1) * gran).min(end);
                let flags = if slots[(blk - a) as usize].is_some() {
                    0
                } else {
                    e.flags
                };
                match out.last_mut() {
                    Some(last) if last.flags == flags => last.length += stop - pos,
                    _ => {
                        if out.len() >= max.max(1) {
                            return Ok(out);
                        }
                        out.push(Extent {
                            length: stop - pos,
                            flags,
                        });
                    }
                }
                pos = stop;
            }
        }
        Ok(out)
    }

    fn alive(&self) -> Result<()> {
        self.slots(0, 0).map(drop)
    }
}
