//! The snapshot origin: the layer that keeps every snapshot's content
//! while the live disk changes under it.
//!
//! Before a block that the newest snapshot still shares with the origin is
//! first overwritten, its old content is copied into the preserved-block
//! store (`cow.store`, see `cow_store.rs`) and made durable (group
//! commit); only then does the write go down. One copy serves every
//! snapshot that shares the block: it is given to each snapshot that has
//! no copy of it yet. Stripe locks make two first writes to one block
//! preserve it once, and a sequential overwrite stream preserves a few
//! blocks ahead of itself, so it pays fewer syncs. When the layers below
//! have durability work of their own for the same write (dirty bits),
//! both run at once: the write waits for the longer one, not their sum.
//!
//! Reads of the live disk pass straight down: no lock, no lookup.
//! Snapshot views (`view.rs`) read through the few methods marked for
//! them below.
//!
//! Which snapshots a preserved record belongs to is not stored: replaying
//! the valid records in LSN order and giving each to every existing
//! snapshot that is not newer than the record's `snap_seq` and has no
//! slot for that block yet rebuilds exactly the maps that were in memory.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ferry_block::{BlockDev, Error, Layer, Result, ZeroMode};

use crate::bitmap::AtomicBitmap;
use crate::cow_store::CowStore;
use crate::manifest::SnapshotMeta;

/// Stripe locks serialise two first writes to the same block so the block
/// is preserved once; 1024 makes unrelated blocks rarely share a stripe.
const STRIPES: u64 = 1024;
/// Blocks preserved ahead of a sequential overwrite (see `preserve_for`).
const AHEAD_MAX: u64 = 256;
const AHEAD_FACTOR: u64 = 4;
/// `newest` when no snapshot exists.
const NONE: u64 = 0;

#[derive(Default)]
struct Maps {
    /// Snapshot seq → block → slot in the preserved-block store.
    snaps: BTreeMap<u64, HashMap<u64, u64>>,
    /// Slot → number of snapshots using it.
    refs: HashMap<u64, u32>,
}

pub struct SnapshotOrigin {
    next: Arc<dyn BlockDev>,
    size: u64,
    gran: u64,
    nblocks: u64,
    store_path: PathBuf,
    store: OnceLock<CowStore>,
    maps: RwLock<Maps>,
    /// Blocks the newest snapshot no longer shares with the origin.
    cowdone: AtomicBitmap,
    /// Seq of the newest snapshot, or `NONE`. Changes only under the
    /// disk's write fence, so a write sees one value throughout.
    newest: AtomicU64,
    stripes: Box<[Mutex<()>]>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SnapshotOrigin {
    pub(crate) fn new(next: Arc<dyn BlockDev>, gran: u64, store_path: PathBuf) -> Self {
        let size = next.size();
        let nblocks = size.div_ceil(gran);
        SnapshotOrigin {
            next,
            size,
            gran,
            nblocks,
            store_path,
            store: OnceLock::new(),
            maps: RwLock::new(Maps::default()),
            cowdone: AtomicBitmap::new(nblocks),
            newest: AtomicU64::new(NONE),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    fn read_maps(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_maps(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds the maps of `snapshots` from the store after a clean or
    /// unclean shutdown; records no snapshot owns any more are freed.
    pub(crate) fn load(&self, snapshots: &[SnapshotMeta]) -> io::Result<()> {
        if !self.store_path.exists() {
            if snapshots.is_empty() {
                return Ok(());
            }
            return Err(io::Error::other(format!(
                "snapshots listed but {} is missing",
                self.store_path.display()
            )));
        }
        let (store, mut recs) = CowStore::open(&self.store_path, self.gran)?;
        recs.sort_by_key(|r| r.lsn);
        let mut maps = Maps::default();
        for s in snapshots {
            maps.snaps.insert(s.seq, HashMap::new());
        }
        let mut orphans = Vec::new();
        for r in &recs {
            let mut n = 0;
            for (_, map) in maps.snaps.range_mut(..=r.snap_seq) {
                if let Entry::Vacant(v) = map.entry(r.block) {
                    v.insert(r.slot);
                    n += 1;
                }
            }
            if n == 0 {
                orphans.push(r.slot);
            } else {
                maps.refs.insert(r.slot, n);
            }
        }
        if !orphans.is_empty() {
            tracing::info!(
                slots = orphans.len(),
                "freeing preserved blocks of deleted snapshots"
            );
            store.release(&orphans)?;
        }
        if let Some((&seq, map)) = maps.snaps.iter().next_back() {
            self.newest.store(seq, Ordering::Release);
            for &b in map.keys() {
                self.cowdone.set(b);
            }
        }
        *self.write_maps() = maps;
        let _ = self.store.set(store);
        Ok(())
    }

    /// Creates the store before the first snapshot; whatever an old store
    /// held then is garbage (no snapshot exists, else `load` opened it).
    pub(crate) fn ensure_store(&self) -> io::Result<()> {
        if self.store.get().is_some() {
            return Ok(());
        }
        match std::fs::remove_file(&self.store_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = self
            .store
            .set(CowStore::create(&self.store_path, self.gran)?);
        Ok(())
    }

    fn store(&self) -> Result<&CowStore> {
        self.store
            .get()
            .ok_or_else(|| Error::Gone("preserved-block store missing".into()))
    }

    /// Starts snapshot `seq` (the newest from now on); only under the
    /// disk's write fence, after the manifest naming it is durable.
    pub(crate) fn add_snapshot(&self, seq: u64) {
        self.write_maps().snaps.insert(seq, HashMap::new());
        self.cowdone.clear();
        self.newest.store(seq, Ordering::Release);
    }

    /// Forgets snapshot `seq` (under the fence, after the manifest change
    /// is durable) and returns the store slots only it used, to release.
    pub(crate) fn remove_snapshot(&self, seq: u64) -> Vec<u64> {
        let mut maps = self.write_maps();
        let Maps { snaps, refs } = &mut *maps;
        let mut freed = Vec::new();
        for (_, slot) in snaps.remove(&seq).unwrap_or_default() {
            if let Some(n) = refs.get_mut(&slot) {
                *n -= 1;
                if *n == 0 {
                    refs.remove(&slot);
                    freed.push(slot);
                }
            }
        }
        // The newest snapshot may have changed: cowdone must describe it.
        let newest = snaps.iter().next_back();
        let seq_now = newest.map_or(NONE, |(&q, _)| q);
        if self.newest.load(Ordering::Acquire) != seq_now {
            self.cowdone.clear();
            if let Some((_, map)) = newest {
                for &b in map.keys() {
                    self.cowdone.set(b);
                }
            }
            self.newest.store(seq_now, Ordering::Release);
        }
        freed
    }

    /// Punches released slots out of the store: their space is free at once.
    pub(crate) fn release(&self, slots: &[u64]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        Ok(self.store()?.release(slots)?)
    }

    /// Blocks of snapshot `seq` held in the store.
    pub(crate) fn preserved_count(&self, seq: u64) -> u64 {
        self.read_maps()
            .snaps
            .get(&seq)
            .map_or(0, |m| m.len() as u64)
    }

    /// Snapshot `seq`'s preserved blocks: (block, slot), by block.
    pub(crate) fn preserved(&self, seq: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .read_maps()
            .snaps
            .get(&seq)
            .map(|m| m.iter().map(|(&b, &s)| (b, s)).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    pub(crate) fn granularity(&self) -> u64 {
        self.gran
    }

    // ---- what snapshot views read through --------------------------------

    /// Slots of blocks `[a, b)` in snapshot `seq`; None once it is deleted.
    pub(crate) fn slots(&self, seq: u64, a: u64, b: u64) -> Option<Vec<Option<u64>>> {
        let maps = self.read_maps();
        let map = maps.snaps.get(&seq)?;
        Some((a..b).map(|blk| map.get(&blk).copied()).collect())
    }

    /// Reads `buf.len()` bytes of the block preserved in `slot`, from
    /// `within` that block.
    pub(crate) fn read_preserved(&self, slot: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.store()?.read(slot, within, buf)?)
    }

    /// The device below: what a snapshot still shares with the origin.
    pub(crate) fn below(&self) -> &dyn BlockDev {
        &*self.next
    }

    // ---- the write path ------------------------------------------------

    /// Durability work before `[offset, offset+len)` changes: preserve
    /// what the newest snapshot still shares, overlapped with the layers
    /// below preparing for the same write.
    fn prepare(&self, offset: u64, len: u64) -> Result<()> {
        ferry_block::check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (a, b) = (offset / self.gran, (offset + len - 1) / self.gran + 1);
        let newest = self.newest.load(Ordering::Acquire);
        if newest == NONE || self.cowdone.all_set(a, b) {
            return self.next.prepare_write(offset, len);
        }
        std::thread::scope(|sc| {
            let below = sc.spawn(|| self.next.prepare_write(offset, len));
            let preserved = self.preserve_for(newest, a, b);
            let below = below
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("write preparation panicked").into()));
            below?;
            preserved
        })
    }

    /// Preserves what a write to blocks `[a, b)` needs preserved.
    fn preserve_for(&self, newest: u64, a: u64, b: u64) -> Result<()> {
        // A sequential overwrite stream will need the next blocks
        // preserved too: copy them in the same batch (one sync instead of
        // several), at most a few times the request's own size, so random
        // writers copy nothing extra.
        let ahead = self
            .cowdone
            .run_before(a, AHEAD_MAX)
            .min(AHEAD_FACTOR * (b - a));
        self.preserve(newest, a, (b + ahead).min(self.nblocks))
    }

    /// Copies blocks `todo` into the store, one batch (and so one store
    /// write) per run of consecutive blocks, and makes them durable;
    /// `written` collects (block, slot) as they go.
    fn copy_runs(
        &self,
        store: &CowStore,
        newest: u64,
        todo: &[u64],
        written: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let mut i = 0;
        while i < todo.len() {
            let mut j = i + 1;
            while j < todo.len() && todo[j] == todo[j - 1] + 1 {
                j += 1;
            }
            let items: Vec<(u64, usize)> = todo[i..j]
                .iter()
                .map(|&blk| (blk, (self.gran.min(self.size - blk * self.gran)) as usize))
                .collect();
            let slots = store.write_many(newest, &items, |bufs| {
                self.next.read_vectored_at(bufs, todo[i] * self.gran)
            })?;
            written.extend(todo[i..j].iter().copied().zip(slots));
            i = j;
        }
        // The copies are durable before any origin block is overwritten.
        Ok(store.commit()?)
    }

    /// Copies the old contents of blocks `[a, b)` that the newest snapshot
    /// still shares into the store, durably, once for all snapshots.
    fn preserve(&self, newest: u64, a: u64, b: u64) -> Result<()> {
        let mut stripes: Vec<usize> = (a..b).map(|blk| (blk % STRIPES) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> = stripes.iter().map(|&i| lock(&self.stripes[i])).collect();
        let todo: Vec<u64> = (a..b).filter(|&blk| !self.cowdone.get(blk)).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let store = self.store()?;
        let mut written = Vec::with_capacity(todo.len());
        if let Err(e) = self.copy_runs(store, newest, &todo, &mut written) {
            // The write fails and nothing points at these copies: their
            // slots are punched now, so the store's accounting stays exact
            // (and a restart does not replay them).
            let slots: Vec<u64> = written.iter().map(|&(_, s)| s).collect();
            let _ = store.release(&slots);
            return Err(e);
        }
        {
            let mut maps = self.write_maps();
            let Maps { snaps, refs } = &mut *maps;
            for &(blk, slot) in &written {
                let mut n = 0;
                for map in snaps.values_mut() {
                    if let Entry::Vacant(v) = map.entry(blk) {
                        v.insert(slot);
                        n += 1;
                    }
                }
                refs.insert(slot, n);
            }
        }
        for (blk, _) in written {
            self.cowdone.set(blk);
        }
        Ok(())
    }
}

impl Layer for SnapshotOrigin {
    fn next(&self) -> &dyn BlockDev {
        &*self.next
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<()> {
        self.prepare(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.prepare(offset, buf.len() as u64)?;
        self.next.write_at(buf, offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.prepare(offset, len)?;
        self.next.write_zeroes(offset, len, mode)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.prepare(offset, len)?;
        self.next.trim(offset, len, fua)
    }

    /// A clone replaces the range's blocks as a write would: what the
    /// newest snapshot still shares is preserved first, read from below
    /// before the clone (a refused clone leaves a harmless early copy,
    /// which the write the caller does instead would have made anyway).
    fn clone_range(&self, src: &std::fs::File, offset: u64, len: u64) -> Result<()> {
        self.prepare(offset, len)?;
        self.next.clone_range(src, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::SnapshotMeta;
    use ferry_block::{Change, MemDev};
    use std::collections::BTreeSet;

    const GRAN: u64 = 4096;
    const SIZE: u64 = 64 * GRAN;

    fn snap(seq: u64) -> SnapshotMeta {
        SnapshotMeta {
            name: format!("s{seq}"),
            seq,
            gen_end: None,
            created: 0,
            backend: Default::default(),
        }
    }

    /// Blocks with a valid record in the store file right now.
    fn recorded(path: &std::path::Path) -> BTreeSet<u64> {
        let (_, recs) = CowStore::open(path, GRAN).unwrap();
        recs.iter().map(|r| r.block).collect()
    }

    /// The crash-ordering rule, checked when each write reaches the device
    /// below: every block it overwrites that the snapshot shared already
    /// has its old content in the store.
    #[test]
    fn old_blocks_reach_the_store_before_the_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("cow.store");
        let path = store.clone();
        let mem = MemDev::with_data(vec![7u8; SIZE as usize]).with_hook(move |c| {
            let Change::Write { offset, len } = c else {
                return;
            };
            let have = recorded(&path);
            for b in offset / GRAN..(offset + len).div_ceil(GRAN) {
                assert!(have.contains(&b), "block {b} overwritten before preserved");
            }
        });
        let o = Arc::new(SnapshotOrigin::new(Arc::new(mem), GRAN, store.clone()));
        o.ensure_store().unwrap();
        o.add_snapshot(1);
        let dev: &dyn BlockDev = &*o;
        dev.write_at(&[1; 100], 3 * GRAN + 10, false).unwrap();
        dev.write_at(&vec![2; 3 * GRAN as usize], 10 * GRAN, false)
            .unwrap();
        // A newer snapshot gets its own copy when a block changes again.
        o.add_snapshot(2);
        dev.write_at(&[3; 10], 3 * GRAN, false).unwrap();
        assert_eq!(o.preserved_count(1), 4);
        assert_eq!(o.preserved_count(2), 1);
        let mut b = [0u8; 4];
        let slot = o.slots(1, 3, 4).unwrap()[0].unwrap();
        o.read_preserved(slot, 0, &mut b).unwrap();
        assert_eq!(b, [7; 4], "snapshot 1 keeps the original");
        let slot = o.slots(2, 3, 4).unwrap()[0].unwrap();
        o.read_preserved(slot, 10, &mut b).unwrap();
        assert_eq!(b, [1; 4], "snapshot 2 keeps the first overwrite");
        // Snapshot 1 owns its four copies alone: deleting it frees them.
        let freed = o.remove_snapshot(1);
        assert_eq!(freed.len(), 4);
        o.release(&freed).unwrap();
        assert!(o.slots(1, 0, 1).is_none());
        // Reloaded from the store, the maps are the same.
        let o2 = SnapshotOrigin::new(Arc::new(MemDev::new(SIZE)), GRAN, store);
        o2.load(&[snap(2)]).unwrap();
        assert_eq!(o2.preserved(2), o.preserved(2));
    }

    /// With dirty tracking below, a first overwrite makes the dirty bits
    /// and the preserved copy durable together, both before the write.
    #[test]
    fn preservation_overlaps_the_layers_below() {
        use crate::dirty::DirtyTracker;
        use crate::manifest::{CheckpointMeta, TrackingMeta};
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("cow.store");
        let gens = dir.path().join("gens");
        let (path, bits) = (store.clone(), gens.join("1.bits"));
        let mem = MemDev::with_data(vec![7u8; SIZE as usize]).with_hook(move |c| {
            let Change::Write { offset, len } = c else {
                return;
            };
            let have = recorded(&path);
            let dirty = crate::durable_bitmap::read_bits(&bits, SIZE / GRAN).unwrap();
            for b in offset / GRAN..(offset + len).div_ceil(GRAN) {
                assert!(have.contains(&b), "block {b} not preserved first");
                assert!(
                    crate::bitmap::test_bit(&dirty, b),
                    "block {b} not marked first"
                );
            }
        });
        let t = Arc::new(DirtyTracker::new(Arc::new(mem), GRAN, gens));
        let meta = TrackingMeta {
            gens: vec![1],
            checkpoints: vec![CheckpointMeta {
                name: "c".into(),
                gen_id: 1,
                created: 0,
            }],
        };
        t.apply(&meta, Some(t.create_generation(1).unwrap()));
        let o = SnapshotOrigin::new(t.clone(), GRAN, store);
        o.ensure_store().unwrap();
        o.add_snapshot(2);
        for i in 0..20 {
            BlockDev::write_at(&o, &[i as u8; 100], i * 3 * GRAN % SIZE, false).unwrap();
        }
        assert_eq!(t.dirty_blocks("c").unwrap().len(), 20);
    }
}
