//! Dirty tracking for checkpoints: bitmap generations and their files.
//!
//! A generation records the blocks written while it was the newest one. A
//! checkpoint starts a new generation; "dirty since C" is the union of C's
//! generation and every later one, so it stays exact for any older C and
//! deleting a checkpoint never changes another one's answer (no merge of
//! bits is needed: generations are only dropped when no checkpoint reaches
//! them). A snapshot also starts a generation, so "dirty between C and
//! snapshot S" is the union of the generations from C up to S's boundary.
//!
//! Crash consistency, the one rule: **a block's bit is durable in the
//! active generation's file before the write that dirties it is issued.**
//! `ActiveGen::mark` records the block in the exact in-memory bitmap (what
//! queries answer), and if the file does not already hold a bit for it,
//! sets the bits of the block's whole window (and further ahead for a
//! sequential writer) in the file image, queues those words and waits for
//! a group sync: one leader writes all queued words and issues one
//! `fdatasync` for everyone who queued before it started. Only then are the
//! bits recorded in `durable`, the bitmap the fast path checks, so a write
//! to a block already covered costs a few atomic loads and no I/O.
//!
//! The file is therefore a superset of the truth: after a crash a
//! checkpoint may report whole windows around the blocks really written,
//! never less. When a generation is frozen (a newer checkpoint or snapshot
//! starts) and at a clean close, the exact bits replace the file's (no
//! write is in flight then, and the exact bits cover every write issued).
//! Frozen generations never change again. Nothing is ever only in memory
//! when data reaches the disk, so there is no "inconsistent" state to give
//! up on.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Mutex;

use crate::bitmap::{self, AtomicBitmap};
use crate::blockdev::Extent;
use crate::cow::{pread_full, pwrite};
use crate::sync::GroupSync;

pub(crate) const DIRTY_PREFIX: &str = "qemu:dirty-bitmap:";

/// Blocks whose bits become durable together on a first write: one sync
/// then covers the neighbours a sequential or clustered writer is about to
/// touch. The durable file may therefore hold a few extra bits (whole
/// windows) after a crash; while the daemon runs, and after a clean
/// shutdown, answers come from the exact in-memory bits.
pub(crate) const MARK_WINDOW: u64 = 16;
/// Most blocks marked ahead of a sequential writer (64 MiB at 64 KiB).
const MAX_AHEAD: u64 = 1024;

/// The generation that receives new dirty bits.
pub(crate) struct ActiveGen {
    pub id: u64,
    file: File,
    nblocks: u64,
    window: u64,
    /// Blocks actually written: the answer to queries.
    exact: AtomicBitmap,
    /// What the file should hold (a superset of `exact`, window-rounded).
    ondisk: AtomicBitmap,
    /// Bits known durable in the file; the fast path.
    durable: AtomicBitmap,
    /// Word indices changed in `ondisk` since the last sync.
    pending: Mutex<Vec<usize>>,
    sync: GroupSync,
}

pub(crate) fn gen_path(dir: &Path, id: u64) -> std::path::PathBuf {
    dir.join("gens").join(format!("{id}.bits"))
}

pub(crate) fn read_bits(path: &Path, nblocks: u64) -> io::Result<Vec<u64>> {
    let nwords = bitmap::words_for(nblocks);
    let f = File::open(path)?;
    let mut bytes = vec![0u8; nwords * 8];
    pread_full(&f, &mut bytes, 0)?;
    Ok(bitmap::from_bytes(&bytes, nwords))
}

impl ActiveGen {
    /// A new, empty, durable generation file.
    pub fn create(dir: &Path, id: u64, nblocks: u64, window: u64) -> io::Result<Self> {
        let len = bitmap::words_for(nblocks) as u64 * 8;
        let file = crate::meta::create_zeroed(&gen_path(dir, id), len)?;
        Ok(Self::with(
            id,
            file,
            nblocks,
            window,
            &vec![0; bitmap::words_for(nblocks)],
        ))
    }

    /// Reopens the active generation; after a crash its bits may include
    /// whole windows around the blocks really written.
    pub fn open(dir: &Path, id: u64, nblocks: u64, window: u64) -> io::Result<Self> {
        let path = gen_path(dir, id);
        let words = read_bits(&path, nblocks)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(Self::with(id, file, nblocks, window, &words))
    }

    fn with(id: u64, file: File, nblocks: u64, window: u64, words: &[u64]) -> Self {
        ActiveGen {
            id,
            file,
            nblocks,
            window: window.max(1),
            exact: AtomicBitmap::from_words(words),
            ondisk: AtomicBitmap::from_words(words),
            durable: AtomicBitmap::from_words(words),
            pending: Mutex::new(Vec::new()),
            sync: GroupSync::default(),
        }
    }

    /// True when blocks `[a, b)` need no sync to be marked.
    pub fn is_durable(&self, a: u64, b: u64) -> bool {
        self.durable.all_set(a, b)
    }

    /// Records blocks `[a, b)` as written; returns once their bits are
    /// durable, at once (no I/O) when they already are.
    pub fn mark(&self, a: u64, b: u64) -> io::Result<()> {
        for i in a..b {
            if !self.exact.get(i) {
                self.exact.set(i);
            }
        }
        if self.durable.all_set(a, b) {
            return Ok(());
        }
        let wa = a / self.window * self.window;
        let mut wb = (b.div_ceil(self.window) * self.window).min(self.nblocks);
        // A sequential writer is coming this way: mark as far ahead as the
        // run behind it is long (like readahead), so a stream pays a
        // logarithmic number of syncs, not one per window.
        let ahead = self.durable.run_before(wa, MAX_AHEAD);
        if ahead > 0 {
            wb = ((wb + ahead).div_ceil(self.window) * self.window).min(self.nblocks);
        }
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for i in wa..wb {
                if !self.durable.get(i) {
                    self.ondisk.set(i);
                    let w = (i / 64) as usize;
                    if p.last() != Some(&w) {
                        p.push(w);
                    }
                }
            }
        }
        self.sync.sync(|| self.write_pending())?;
        for i in wa..wb {
            self.durable.set(i);
        }
        Ok(())
    }

    /// Leader work of a group sync: write every queued word (its current
    /// value holds all bits set before it was queued), then one fdatasync.
    fn write_pending(&self) -> io::Result<()> {
        let mut words =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        words.sort_unstable();
        words.dedup();
        let mut i = 0;
        while i < words.len() {
            let mut j = i + 1;
            while j < words.len() && words[j] == words[j - 1] + 1 {
                j += 1;
            }
            let vals: Vec<u64> = words[i..j].iter().map(|&w| self.ondisk.word(w)).collect();
            pwrite(&self.file, &bitmap::to_bytes(&vals), words[i] as u64 * 8)?;
            i = j;
        }
        rustix::fs::fdatasync(&self.file).map_err(io::Error::from)
    }

    /// Replaces the file's window-rounded bits by the exact ones. Only
    /// when no write is in flight (under the fence, or at close): the
    /// exact bits cover every write issued so far.
    pub fn write_exact(&self) -> io::Result<()> {
        pwrite(&self.file, &bitmap::to_bytes(&self.exact.snapshot()), 0)?;
        rustix::fs::fdatasync(&self.file).map_err(io::Error::from)
    }

    /// Blocks written so far in this generation.
    pub fn words(&self) -> Vec<u64> {
        self.exact.snapshot()
    }
}

/// Extents of `[offset, offset+len)` where a block's status is
/// `flag_of(block)`, merged, at most `max` of them.
pub(crate) fn block_extents(
    offset: u64,
    len: u64,
    gran: u64,
    max: usize,
    flag_of: impl Fn(u64) -> u32,
) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let b = pos / gran;
        let stop = ((b + 1) * gran).min(end);
        let flags = flag_of(b);
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += stop - pos,
            _ => {
                if out.len() >= max.max(1) {
                    break;
                }
                out.push(Extent {
                    length: stop - pos,
                    flags,
                })
            }
        }
        pos = stop;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_durable_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("gens")).unwrap();
        let g = ActiveGen::create(d.path(), 3, 1000, 16).unwrap();
        g.mark(10, 12).unwrap();
        g.mark(500, 501).unwrap();
        g.mark(13, 14).unwrap(); // inside a durable window: no I/O
        let set = |g: &ActiveGen| -> Vec<u64> {
            let w = g.words();
            (0..1000).filter(|&i| bitmap::test_bit(&w, i)).collect()
        };
        assert_eq!(set(&g), vec![10, 11, 13, 500]);
        drop(g); // no write_exact: a crash
        let g = ActiveGen::open(d.path(), 3, 1000, 16).unwrap();
        let mut want: Vec<u64> = (0..16).collect();
        want.extend(496..512);
        assert_eq!(set(&g), want, "after a crash: whole windows");
        g.write_exact().unwrap();
        let g = ActiveGen::open(d.path(), 3, 1000, 16).unwrap();
        assert_eq!(set(&g), want);
    }

    #[test]
    fn extents_merge_and_clip() {
        let e = block_extents(100, 4000, 1024, 10, |b| (b == 1 || b == 2) as u32);
        assert_eq!(
            e,
            vec![
                Extent {
                    length: 924,
                    flags: 0
                },
                Extent {
                    length: 2048,
                    flags: 1
                },
                Extent {
                    length: 1028,
                    flags: 0
                },
            ]
        );
        assert_eq!(block_extents(0, 4096, 1024, 1, |b| b as u32).len(), 1);
    }
}
