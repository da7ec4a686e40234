//! The read-only view of one snapshot (export `DISK@SNAP`).
//!
//! A block reads from the preserved-block store when the snapshot has a
//! copy of it, else from the origin, which then still holds the snapshot's
//! content. The race with a live write is closed by the write path's
//! order (copy durable → map entry → origin write): a view that found no
//! map entry reads the origin and then looks again; if an entry appeared
//! meanwhile the origin may already be overwritten, so it rereads from the
//! copy. If no entry appeared, the origin write had not started when the
//! origin read finished.

use std::sync::Arc;

use crate::blockdev::{BlockDev, Caps, Extent, ZeroMode};
use crate::dirty::DIRTY_PREFIX;
use crate::error::{Result, StoreError};
use crate::volume::{BASE_ALLOCATION, Volume, read};

pub struct SnapshotView {
    vol: Arc<Volume>,
    name: String,
    seq: u64,
    gen_end: Option<u64>,
}

impl SnapshotView {
    pub(crate) fn new(vol: Arc<Volume>, name: String, seq: u64, gen_end: Option<u64>) -> Self {
        SnapshotView {
            vol,
            name,
            seq,
            gen_end,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Slots of blocks `[a, b)`, or an error once the snapshot is deleted.
    fn slots(&self, a: u64, b: u64) -> Result<Vec<Option<u64>>> {
        let maps = read(&self.vol.maps);
        let map = maps.snaps.get(&self.seq).ok_or_else(|| {
            StoreError::NotFound(format!(
                "snapshot '{}@{}' was deleted",
                self.vol.name(),
                self.name
            ))
        })?;
        Ok((a..b).map(|blk| map.get(&blk).copied()).collect())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.vol.size();
        if offset > size || len > size - offset {
            return Err(StoreError::OutOfRange { offset, len });
        }
        Ok(())
    }
}

impl BlockDev for SnapshotView {
    fn size(&self) -> u64 {
        self.vol.size()
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: true,
            flush: true,
            fua: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: true,
            multi_conn: true,
            rotational: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let gran = self.vol.gran;
        let (a, b) = (offset / gran, (offset + len - 1) / gran + 1);
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
        // Origin runs first, in as few reads as possible.
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
            self.vol.file.read_at(&mut buf[s..e], offset + s as u64)?;
            blk = end;
        }
        let again = self.slots(a, b)?;
        let cow = self.vol.cow.get();
        for blk in a..b {
            let i = (blk - a) as usize;
            if let Some(slot) = first[i].or(again[i]) {
                let (s, e, within) = piece(blk);
                let cow = cow
                    .ok_or_else(|| StoreError::BadState("preserved-block store missing".into()))?;
                cow.read(slot, within, &mut buf[s..e])?;
            }
        }
        Ok(())
    }

    /// The inline path for cached reads of blocks the snapshot still
    /// shares with the origin (same look-read-look protocol as `read_at`);
    /// anything preserved goes the blocking way.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let len = buf.len() as u64;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(true);
        }
        let gran = self.vol.gran;
        let (a, b) = (offset / gran, (offset + len - 1) / gran + 1);
        if self.slots(a, b)?.iter().any(Option::is_some) {
            return Ok(false);
        }
        if !self.vol.file.read_at_nowait(buf, offset)? {
            return Ok(false);
        }
        Ok(self.slots(a, b)?.iter().all(Option::is_none))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(StoreError::ReadOnly)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _mode: ZeroMode) -> Result<()> {
        Err(StoreError::ReadOnly)
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(StoreError::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)
    }

    fn contexts(&self) -> Vec<String> {
        let mut v = vec![BASE_ALLOCATION.to_string()];
        v.extend(
            self.vol
                .checkpoint_names_before(self.gen_end)
                .into_iter()
                .map(|n| format!("{DIRTY_PREFIX}{n}")),
        );
        v
    }

    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let gran = self.vol.gran;
        if context == BASE_ALLOCATION {
            // Origin allocation first, then the map (same order as reads):
            // preserved blocks are reported as data, which is always safe.
            let origin = self.vol.file.extents(context, offset, len, usize::MAX)?;
            let (a, b) = (offset / gran, (offset + len - 1) / gran + 1);
            let slots = self.slots(a, b)?;
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            for e in origin {
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
                            if out.len() >= max_extents.max(1) {
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
            return Ok(out);
        }
        let name = context
            .strip_prefix(DIRTY_PREFIX)
            .ok_or_else(|| StoreError::UnknownContext(context.to_string()))?;
        let gen_id = self
            .vol
            .checkpoint_gen(name)
            .filter(|&g| self.gen_end.is_some_and(|end| g < end))
            .ok_or_else(|| StoreError::UnknownContext(context.to_string()))?;
        self.slots(0, 0)?;
        let words = self.vol.union_since(gen_id, self.gen_end);
        Ok(self.vol.dirty_extents(&words, offset, len, max_extents))
    }
}
