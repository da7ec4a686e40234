//! Dirty tracking for checkpoints: the layer that records the blocks every
//! write touches, in bitmap generations.
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
//! active generation's file before the write that dirties it is issued**
//! (a [`DurableBitmap`] with window rounding: a first write into a window
//! makes the whole window's bits durable with one group sync, and later
//! writes there cost a few atomic loads). The file is therefore a superset
//! of the truth: after a crash a checkpoint may report whole windows
//! around the blocks really written, never less. When a generation is
//! frozen (a newer checkpoint or snapshot starts) and at a clean close,
//! the exact bits replace the file's: no write is in flight then (the
//! disk's write fence is held, or the layer is gone), and the exact bits
//! cover every write issued. Frozen generations never change again.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ferry_block::{BlockDev, DIRTY_BITMAP_PREFIX, Error, Extent, Layer, Result, ZeroMode};

use crate::bitmap;
use crate::durable_bitmap::{DurableBitmap, Rounding, read_bits};
use crate::manifest::{CheckpointMeta, TrackingMeta};

/// Blocks whose bits become durable together on a first write: one sync
/// then covers the neighbours a sequential or clustered writer is about to
/// touch. The durable file may therefore hold a few extra bits (whole
/// windows) after a crash; while the daemon runs, and after a clean
/// shutdown, answers come from the exact in-memory bits.
pub(crate) const MARK_WINDOW: u64 = 16;
/// Most blocks marked ahead of a sequential writer (64 MiB at 64 KiB).
const MAX_AHEAD: u64 = 1024;
const ROUNDING: Rounding = Rounding {
    window: MARK_WINDOW,
    max_ahead: MAX_AHEAD,
};

fn gen_path(gens_dir: &Path, id: u64) -> PathBuf {
    gens_dir.join(format!("{id}.bits"))
}

/// The generation receiving bits, and the older, frozen ones.
#[derive(Default)]
struct Generations {
    active: Option<(u64, DurableBitmap)>,
    /// Oldest first: (id, bits).
    frozen: Vec<(u64, Arc<Vec<u64>>)>,
    checkpoints: Vec<CheckpointMeta>,
}

/// A generation whose file exists but that receives no bits yet: it
/// becomes active once the manifest that names it is durable (or its file
/// is removed again if that fails).
pub(crate) struct NewGeneration {
    id: u64,
    path: PathBuf,
    map: DurableBitmap,
}

impl NewGeneration {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Gives up on it: the file goes, nothing names it.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub struct DirtyTracker {
    next: Arc<dyn BlockDev>,
    gran: u64,
    nblocks: u64,
    gens_dir: PathBuf,
    gens: RwLock<Generations>,
    /// Set by tests to skip the clean-close work, as a crash would.
    #[cfg(test)]
    crashed: std::sync::atomic::AtomicBool,
}

impl TrackingMeta {
    /// Removes checkpoint `name`; returns false if there is none.
    /// Generations no remaining checkpoint reaches are dropped from the
    /// list (the layer removes their files when the change is applied).
    pub(crate) fn remove_checkpoint(&mut self, name: &str) -> bool {
        let before = self.checkpoints.len();
        self.checkpoints.retain(|c| c.name != name);
        if self.checkpoints.len() == before {
            return false;
        }
        let oldest = self
            .checkpoints
            .iter()
            .map(|c| c.gen_id)
            .min()
            .unwrap_or(u64::MAX);
        self.gens.retain(|&g| g >= oldest);
        true
    }
}

impl DirtyTracker {
    pub(crate) fn new(next: Arc<dyn BlockDev>, gran: u64, gens_dir: PathBuf) -> Self {
        let nblocks = next.size().div_ceil(gran);
        DirtyTracker {
            next,
            gran,
            nblocks,
            gens_dir,
            gens: RwLock::new(Generations::default()),
            #[cfg(test)]
            crashed: Default::default(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Generations> {
        self.gens.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Generations> {
        self.gens.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up the generations `meta` lists after a clean or unclean
    /// shutdown: all but the last are frozen, the last is active. Files
    /// no generation owns are leftovers of an interrupted change.
    pub(crate) fn load(&self, meta: &TrackingMeta) -> io::Result<()> {
        std::fs::create_dir_all(&self.gens_dir)?;
        let mut g = self.write();
        for (i, &id) in meta.gens.iter().enumerate() {
            let path = gen_path(&self.gens_dir, id);
            if i + 1 == meta.gens.len() {
                g.active = Some((id, DurableBitmap::open(&path, self.nblocks, ROUNDING)?));
            } else {
                g.frozen
                    .push((id, Arc::new(read_bits(&path, self.nblocks)?)));
            }
        }
        g.checkpoints = meta.checkpoints.clone();
        drop(g);
        self.remove_files_except(&meta.gens)
    }

    fn remove_files_except(&self, gens: &[u64]) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.gens_dir)? {
            let entry = entry?;
            let keep = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".bits"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| gens.contains(&id));
            if !keep {
                tracing::info!(file = %entry.path().display(), "removing leftover bitmap");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Creates the (empty, durable) file of generation `id`. A file of
    /// that id can only be left over from a change that failed before its
    /// manifest was written (ids come from the manifest's counter, which
    /// moves on only when one is): it goes first.
    pub(crate) fn create_generation(&self, id: u64) -> io::Result<NewGeneration> {
        std::fs::create_dir_all(&self.gens_dir)?;
        let path = gen_path(&self.gens_dir, id);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(file = %path.display(), "removing leftover bitmap"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let map = DurableBitmap::create(&path, self.nblocks, ROUNDING)?;
        Ok(NewGeneration { id, path, map })
    }

    /// Applies a manifest change that is durable now: `new` becomes the
    /// active generation (the old one is frozen with exact bits), the
    /// checkpoints are `meta`'s, and generations `meta` no longer lists
    /// are dropped. Only while the disk's write fence is held.
    pub(crate) fn apply(&self, meta: &TrackingMeta, new: Option<NewGeneration>) {
        let mut g = self.write();
        if let Some(new) = new
            && let Some((id, old)) = g.active.replace((new.id, new.map))
        {
            // Frozen generations keep exact bits on disk too. Best
            // effort: the window-rounded file is a safe superset.
            if let Err(e) = old.write_exact() {
                tracing::warn!("cannot trim frozen bitmap {id}: {e}");
            }
            g.frozen.push((id, Arc::new(old.words())));
        }
        g.checkpoints = meta.checkpoints.clone();
        let kept: BTreeSet<u64> = meta.gens.iter().copied().collect();
        let mut dropped: Vec<u64> = g
            .frozen
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !kept.contains(id))
            .collect();
        g.frozen.retain(|(id, _)| kept.contains(id));
        if let Some((id, _)) = g.active.as_ref().filter(|(id, _)| !kept.contains(id)) {
            // No checkpoint left: tracking stops and costs nothing again.
            dropped.push(*id);
            g.active = None;
        }
        drop(g);
        for id in dropped {
            let _ = std::fs::remove_file(gen_path(&self.gens_dir, id));
        }
    }

    pub(crate) fn checkpoint_gen(&self, name: &str) -> Option<u64> {
        self.read()
            .checkpoints
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.gen_id)
    }

    /// Checkpoints older than generation `gen_end`.
    pub(crate) fn checkpoints_before(&self, gen_end: Option<u64>) -> Vec<String> {
        let Some(end) = gen_end else {
            return Vec::new();
        };
        self.read()
            .checkpoints
            .iter()
            .filter(|c| c.gen_id < end)
            .map(|c| c.name.clone())
            .collect()
    }

    /// Union of generations with id in `[from, to)` (`to` None: up to now,
    /// the active generation included).
    pub(crate) fn union(&self, from: u64, to: Option<u64>) -> Vec<u64> {
        let mut out = vec![0u64; bitmap::words_for(self.nblocks)];
        let end = to.unwrap_or(u64::MAX);
        let or = |out: &mut Vec<u64>, w: &[u64]| {
            for (o, x) in out.iter_mut().zip(w) {
                *o |= x;
            }
        };
        let g = self.read();
        for (id, w) in &g.frozen {
            if *id >= from && *id < end {
                or(&mut out, w);
            }
        }
        if to.is_none()
            && let Some((_, active)) = &g.active
        {
            or(&mut out, &active.words());
        }
        out
    }

    /// Blocks written since checkpoint `name`, up to now.
    pub(crate) fn dirty_blocks(&self, name: &str) -> Option<Vec<u64>> {
        let w = self.union(self.checkpoint_gen(name)?, None);
        Some(
            (0..self.nblocks)
                .filter(|&b| bitmap::test_bit(&w, b))
                .collect(),
        )
    }

    /// The `qemu:dirty-bitmap:C` extents of `[offset, offset+len)` for
    /// the changes between checkpoint C and `gen_end` (None: up to now).
    /// A checkpoint that is not older than `gen_end` is unknown there.
    pub(crate) fn extents_until(
        &self,
        context: &str,
        gen_end: Option<u64>,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>> {
        let gen_id = context
            .strip_prefix(DIRTY_BITMAP_PREFIX)
            .and_then(|n| self.checkpoint_gen(n))
            .filter(|&g| gen_end.is_none_or(|end| g < end))
            .ok_or_else(|| Error::UnknownContext(context.to_string()))?;
        let words = self.union(gen_id, gen_end);
        Ok(ferry_block::block_extents(
            offset,
            len,
            self.gran,
            max,
            |b| bitmap::test_bit(&words, b) as u32,
        ))
    }

    /// Records that `[offset, offset+len)` is about to change; returns once
    /// the bits are durable.
    fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        ferry_block::check_range(self.next.size(), offset, len)?;
        if let Some((_, g)) = &self.read().active {
            g.mark(offset / self.gran, (offset + len - 1) / self.gran + 1)?;
        }
        Ok(())
    }

    /// Drops from the active generation's file the bits its marking
    /// windows added and no write has needed since (see
    /// `DurableBitmap::tighten`); returns how many.
    pub(crate) fn tighten(&self) -> io::Result<u64> {
        match &self.read().active {
            Some((_, g)) => g.tighten(),
            None => Ok(0),
        }
    }

    #[cfg(test)]
    pub(crate) fn simulate_crash(&self) {
        self.crashed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for DirtyTracker {
    /// Clean close: the active generation's file gets the exact bits, so a
    /// restart after a clean shutdown reports no extra blocks. Nothing can
    /// write through the layer any more.
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Some((id, g)) = &self.read().active
            && let Err(e) = g.write_exact()
        {
            tracing::warn!("cannot write exact dirty bitmap {id}: {e}");
        }
    }
}

impl Layer for DirtyTracker {
    fn next(&self) -> &dyn BlockDev {
        &*self.next
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<()> {
        self.mark(offset, len)?;
        self.next.prepare_write(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.mark(offset, buf.len() as u64)?;
        self.next.write_at(buf, offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.mark(offset, len)?;
        self.next.write_zeroes(offset, len, mode)
    }

    /// A trimmed range may read back differently, so it is a change.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.mark(offset, len)?;
        self.next.trim(offset, len, fua)
    }

    /// A cloned range is a change like a write: its bits are durable
    /// before the clone is issued. (If the device below refuses it, the
    /// caller writes the range instead: the bits are needed all the same.)
    fn clone_range(&self, src: &std::fs::File, offset: u64, len: u64) -> Result<()> {
        self.mark(offset, len)?;
        self.next.clone_range(src, offset, len)
    }

    fn contexts(&self) -> Vec<String> {
        let mut v = self.next.contexts();
        v.extend(
            self.read()
                .checkpoints
                .iter()
                .map(|c| format!("{DIRTY_BITMAP_PREFIX}{}", c.name)),
        );
        v
    }

    fn extents(&self, context: &str, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>> {
        if !context.starts_with(DIRTY_BITMAP_PREFIX) {
            return self.next.extents(context, offset, len, max);
        }
        ferry_block::check_range(self.next.size(), offset, len)?;
        self.extents_until(context, None, offset, len, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_block::{Change, MemDev};

    const GRAN: u64 = 4096;
    const SIZE: u64 = 256 * GRAN;

    fn blocks(words: &[u64]) -> Vec<u64> {
        (0..SIZE / GRAN)
            .filter(|&b| bitmap::test_bit(words, b))
            .collect()
    }

    fn meta(gens: &[u64], checkpoints: &[(&str, u64)]) -> TrackingMeta {
        TrackingMeta {
            gens: gens.to_vec(),
            checkpoints: checkpoints
                .iter()
                .map(|&(name, gen_id)| CheckpointMeta {
                    name: name.into(),
                    gen_id,
                    created: 0,
                })
                .collect(),
        }
    }

    /// The crash-ordering rule, checked at the moment each write reaches
    /// the device below: the bits of the blocks it changes are already in
    /// the generation's file.
    #[test]
    fn bits_reach_the_file_before_the_write_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let gens = dir.path().join("gens");
        let file = gen_path(&gens, 1);
        let checked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (file2, n) = (file.clone(), checked.clone());
        let mem = MemDev::new(SIZE).with_hook(move |c| {
            let (Change::Write { offset, len }
            | Change::Zero { offset, len }
            | Change::Trim { offset, len }) = c;
            let on_disk = read_bits(&file2, SIZE / GRAN).unwrap();
            for b in offset / GRAN..(offset + len).div_ceil(GRAN) {
                assert!(
                    bitmap::test_bit(&on_disk, b),
                    "block {b} written before its bit"
                );
            }
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let t = DirtyTracker::new(Arc::new(mem), GRAN, gens);
        let g = t.create_generation(1).unwrap();
        t.apply(&meta(&[1], &[("c1", 1)]), Some(g));
        let dev: &dyn BlockDev = &t;
        dev.write_at(&[1; 5000], 3 * GRAN + 100, false).unwrap();
        dev.write_at(&[1; 10], 200 * GRAN, true).unwrap();
        let zero = ZeroMode {
            may_trim: true,
            fast: false,
            fua: false,
        };
        dev.write_zeroes(100 * GRAN, 3 * GRAN, zero).unwrap();
        dev.trim(150 * GRAN, GRAN, false).unwrap();
        assert_eq!(checked.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(
            t.dirty_blocks("c1").unwrap(),
            vec![3, 4, 100, 101, 102, 150, 200]
        );
        // Out-of-range writes mark nothing.
        assert!(dev.write_at(&[1], SIZE, false).is_err());
        assert_eq!(t.dirty_blocks("c1").unwrap().len(), 7);
    }

    #[test]
    fn generations_answer_every_checkpoint_and_drop_unreachable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let gens = dir.path().join("gens");
        let t = DirtyTracker::new(Arc::new(MemDev::new(SIZE)), GRAN, gens.clone());
        let dev: &dyn BlockDev = &t;
        dev.write_at(&[1], 0, false).unwrap(); // before any checkpoint
        let g1 = t.create_generation(1).unwrap();
        let mut m = meta(&[1], &[("a", 1)]);
        t.apply(&m, Some(g1));
        dev.write_at(&[1], GRAN, false).unwrap();
        let g2 = t.create_generation(2).unwrap();
        m = meta(&[1, 2], &[("a", 1), ("b", 2)]);
        t.apply(&m, Some(g2));
        dev.write_at(&[1], 2 * GRAN, false).unwrap();
        assert_eq!(t.dirty_blocks("a").unwrap(), vec![1, 2]);
        assert_eq!(t.dirty_blocks("b").unwrap(), vec![2]);
        assert_eq!(blocks(&t.union(1, Some(2))), vec![1]);
        let ctx = |n: &str| format!("{DIRTY_BITMAP_PREFIX}{n}");
        assert_eq!(
            dev.contexts(),
            vec!["base:allocation".to_string(), ctx("a"), ctx("b")]
        );
        let e = dev.extents(&ctx("a"), 0, 4 * GRAN, 10).unwrap();
        let runs: Vec<(u64, u32)> = e.iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(runs, vec![(GRAN, 0), (2 * GRAN, 1), (GRAN, 0)]);
        // Up to generation 2 (a snapshot's boundary), b is not older.
        assert!(t.extents_until(&ctx("b"), Some(2), 0, GRAN, 1).is_err());
        // Deleting a drops generation 1 (b does not reach it).
        assert!(m.remove_checkpoint("a"));
        assert!(!m.remove_checkpoint("a"));
        assert_eq!(m.gens, vec![2]);
        t.apply(&m, None);
        assert!(!gen_path(&gens, 1).exists());
        assert_eq!(t.dirty_blocks("b").unwrap(), vec![2]);
        // The last checkpoint gone: tracking stops, its file goes.
        assert!(m.remove_checkpoint("b"));
        t.apply(&m, None);
        assert!(!gen_path(&gens, 2).exists());
        dev.write_at(&[1], 9 * GRAN, false).unwrap();
        assert_eq!(dev.contexts(), vec!["base:allocation".to_string()]);
    }

    #[test]
    fn clean_close_is_exact_and_a_crash_over_reports_whole_windows() {
        let dir = tempfile::tempdir().unwrap();
        let gens = dir.path().join("gens");
        let mem: Arc<dyn BlockDev> = Arc::new(MemDev::new(SIZE));
        let m = meta(&[1], &[("c", 1)]);
        let open = || {
            let t = DirtyTracker::new(mem.clone(), GRAN, gens.clone());
            t.load(&m).unwrap();
            t
        };
        let t = DirtyTracker::new(mem.clone(), GRAN, gens.clone());
        t.apply(&m, Some(t.create_generation(1).unwrap()));
        BlockDev::write_at(&t, &[1], 5 * GRAN, false).unwrap();
        drop(t);
        assert_eq!(open().dirty_blocks("c").unwrap(), vec![5]);
        let t = open();
        BlockDev::write_at(&t, &[1], 40 * GRAN, false).unwrap();
        t.simulate_crash();
        drop(t);
        let after = open().dirty_blocks("c").unwrap();
        let mut want = vec![5];
        want.extend(32..48);
        assert_eq!(after, want, "a crash keeps the marked window");
    }
}
