//! One live disk with its checkpoints and snapshots: the layer that owns a
//! disk's state directory (`STATE_DIR/disks/NAME/`) and builds the stack
//! `FileDev → dirty tracking → snapshot origin` behind one [`BlockDev`].
//!
//! State directory:
//! ```text
//! lock            flock'ed while a daemon has the disk open
//! manifest.json   snapshots, checkpoints, generations (atomic replace)
//! gens/ID.bits    one dirty bitmap per generation (little-endian words)
//! cow.store       preserved old blocks shared by all snapshots (cow.rs)
//! ```
//! Nothing is created until the first snapshot or checkpoint, so serving a
//! disk that never uses them leaves no trace and costs nothing.
//!
//! # Write path and crash ordering
//! Every write-like request (WRITE, WRITE_ZEROES, TRIM) holds the *fence*
//! (`live`, a read lock) from before its metadata work until its data
//! write returns. Before the data is issued:
//! 1. if any checkpoint exists, the blocks' dirty bits are made durable in
//!    the active generation (group-committed, skipped when already set);
//! 2. if any snapshot exists and the newest snapshot still shares a block
//!    with the origin (`cowdone` bit clear), the old block is copied to
//!    `cow.store` and made durable (group-committed), then given to every
//!    snapshot that has no copy of that block yet.
//!
//! When both are needed they run at once (the write waits for the longer
//! one). Stripe locks make two first writes to one block preserve it once.
//! A sequential overwrite stream also preserves a few blocks ahead of
//! itself, so it pays fewer syncs.
//!
//! Reads of the live disk go straight to the file: no lock, no lookup.
//!
//! Creating a snapshot or checkpoint takes the fence for writing, which
//! waits for in-flight writes and holds new ones back. So a snapshot holds
//! exactly the writes acknowledged before `create` returned, and a
//! checkpoint boundary never splits a write. The new state is published by
//! one atomic manifest replacement; the in-memory switch happens after it,
//! so a failure leaves the old state and no half-created object.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Serialize;

use crate::bitmap::{self, AtomicBitmap};
use crate::blockdev::{BlockDev, Caps, Extent, ZeroMode};
use crate::cow::CowStore;
use crate::dirty::{self, ActiveGen, DIRTY_PREFIX, MARK_WINDOW};
use crate::error::{Result, StoreError};
use crate::file::FileDev;
use crate::meta::{self, CheckpointMeta, Manifest, SnapshotMeta, validate_name};
use crate::snapshot::SnapshotView;

pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;

/// Checks a tracking/copy-on-write block size: a power of two from 4 KiB
/// (the page size, and O_DIRECT's alignment) to 64 MiB (one preserved
/// block is buffered whole).
pub fn validate_granularity(granularity: u64) -> Result<()> {
    if granularity.is_power_of_two() && (4096..=64 << 20).contains(&granularity) {
        Ok(())
    } else {
        Err(StoreError::InvalidName(format!(
            "granularity {granularity} must be a power of two from 4096 (4K) to 67108864 (64M)"
        )))
    }
}
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
const COW_STORE: &str = "cow.store";
/// Stripe locks serialise two first writes to the same block so the block
/// is preserved once; 1024 makes unrelated blocks rarely share a stripe.
const STRIPES: u64 = 1024;
/// Blocks preserved ahead of a sequential overwrite (see `prepare`).
const COW_AHEAD_MAX: u64 = 256;
const COW_AHEAD_FACTOR: u64 = 4;

/// A snapshot as the admin API lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub created: u64,
    /// Blocks of this snapshot held in the preserved-block store (shared
    /// ones count for every snapshot that uses them).
    pub preserved_blocks: u64,
    /// Checkpoints older than the snapshot: the snapshot export offers
    /// `qemu:dirty-bitmap:NAME` for each.
    pub checkpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub name: String,
    pub created: u64,
    /// Blocks written since the checkpoint, up to now.
    pub dirty_blocks: u64,
    pub granularity: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeleteInfo {
    pub name: String,
    /// Preserved blocks no other snapshot needed, punched out of the store.
    pub freed_blocks: u64,
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RevertInfo {
    pub name: String,
    /// Blocks copied back (those changed since the snapshot).
    pub blocks: u64,
}

/// What the fence protects: everything the write path consults.
struct Live {
    active: Option<ActiveGen>,
    /// Blocks the newest snapshot no longer shares with the origin.
    cowdone: AtomicBitmap,
    newest_seq: Option<u64>,
}

struct MetaState {
    manifest: Manifest,
    /// The state directory and its manifest exist.
    on_disk: bool,
    _lock: Option<File>,
}

#[derive(Default)]
pub(crate) struct Maps {
    /// Snapshot seq → block → slot in the preserved-block store.
    pub snaps: BTreeMap<u64, HashMap<u64, u64>>,
    /// Slot → number of snapshots using it.
    refs: HashMap<u64, u32>,
}

pub struct Volume {
    name: String,
    dir: PathBuf,
    pub(crate) file: FileDev,
    size: u64,
    pub(crate) gran: u64,
    nblocks: u64,
    live: RwLock<Live>,
    meta: Mutex<MetaState>,
    /// Frozen generations, oldest first: (id, words).
    frozen: RwLock<Vec<(u64, Arc<Vec<u64>>)>>,
    pub(crate) maps: RwLock<Maps>,
    pub(crate) cow: OnceLock<CowStore>,
    stripes: Box<[Mutex<()>]>,
    /// Dirty-bit marking window in blocks (dirty.rs, MARK_WINDOW).
    window: u64,
    /// Set by tests to skip the clean-close work, as a crash would.
    #[cfg(test)]
    pub(crate) crashed: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn take_lock(dir: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        StoreError::BadState(format!(
            "state directory {} is in use by another nbdferry process",
            dir.display()
        ))
    })?;
    Ok(f)
}

impl Volume {
    /// Opens the live disk `path` whose state lives in `disks_dir/name`.
    /// `granularity` applies when the disk has no state yet.
    pub fn open(
        name: &str,
        path: &Path,
        disks_dir: &Path,
        granularity: u64,
    ) -> Result<Arc<Volume>> {
        validate_name("disk", name)?;
        validate_granularity(granularity)?;
        let file = FileDev::open(path, false)?;
        let size = file.size();
        let source = fs::canonicalize(path)?;
        let dir = disks_dir.join(name);
        let mut manifest = Manifest::new(source.clone(), size, granularity);
        let mut on_disk = false;
        let mut dir_lock = None;
        if let Some(m) = Manifest::load(&dir)? {
            dir_lock = Some(take_lock(&dir)?);
            on_disk = true;
            if !m.is_empty() {
                if m.source != source || m.size != size {
                    return Err(StoreError::BadState(format!(
                        "state directory {} belongs to {} ({} bytes), not {} ({} bytes); remove it or use another --state-dir",
                        dir.display(),
                        m.source.display(),
                        m.size,
                        source.display(),
                        size
                    )));
                }
                manifest = m;
            } else {
                manifest.next_id = m.next_id;
            }
        }
        let gran = manifest.granularity;
        let nblocks = size.div_ceil(gran);
        let vol = Volume {
            name: name.to_string(),
            dir,
            file,
            size,
            gran,
            nblocks,
            live: RwLock::new(Live {
                active: None,
                cowdone: AtomicBitmap::new(nblocks),
                newest_seq: None,
            }),
            meta: Mutex::new(MetaState {
                manifest,
                on_disk,
                _lock: dir_lock,
            }),
            frozen: RwLock::new(Vec::new()),
            maps: RwLock::new(Maps::default()),
            cow: OnceLock::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            window: MARK_WINDOW,
            #[cfg(test)]
            crashed: Default::default(),
        };
        if on_disk {
            vol.load()?;
        }
        Ok(Arc::new(vol))
    }

    /// Rebuilds the in-memory state from the directory after a clean or
    /// unclean shutdown, and removes leftovers of interrupted changes.
    fn load(&self) -> Result<()> {
        let meta = lock(&self.meta);
        let m = &meta.manifest;
        let mut live = write(&self.live);
        fs::create_dir_all(self.dir.join("gens"))?;
        // Generations: all but the last are frozen; the last is active.
        let mut frozen = Vec::new();
        for (i, &id) in m.gens.iter().enumerate() {
            if i + 1 == m.gens.len() {
                live.active = Some(ActiveGen::open(&self.dir, id, self.nblocks, self.window)?);
            } else {
                let words = dirty::read_bits(&dirty::gen_path(&self.dir, id), self.nblocks)?;
                frozen.push((id, Arc::new(words)));
            }
        }
        *write(&self.frozen) = frozen;
        for entry in fs::read_dir(self.dir.join("gens"))? {
            let entry = entry?;
            let keep = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".bits"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| m.gens.contains(&id));
            if !keep {
                tracing::info!(file = %entry.path().display(), "removing leftover bitmap");
                let _ = fs::remove_file(entry.path());
            }
        }
        // Preserved blocks: replay the store's records in LSN order.
        let cow_path = self.dir.join(COW_STORE);
        if cow_path.exists() {
            let (cow, mut recs) = CowStore::open(&cow_path, self.gran)?;
            recs.sort_by_key(|r| r.lsn);
            let mut maps = Maps::default();
            for s in &m.snapshots {
                maps.snaps.insert(s.seq, HashMap::new());
            }
            let mut orphans = Vec::new();
            for r in &recs {
                let mut n = 0;
                for (_, map) in maps.snaps.range_mut(..=r.snap_seq) {
                    if let std::collections::hash_map::Entry::Vacant(v) = map.entry(r.block) {
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
                cow.release(&orphans)?;
            }
            if let Some((&seq, map)) = maps.snaps.iter().next_back() {
                live.newest_seq = Some(seq);
                for &b in map.keys() {
                    live.cowdone.set(b);
                }
            }
            *write(&self.maps) = maps;
            let _ = self.cow.set(cow);
        } else if !m.snapshots.is_empty() {
            return Err(StoreError::BadState(format!(
                "{}: snapshots listed but {COW_STORE} is missing",
                self.dir.display()
            )));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn granularity(&self) -> u64 {
        self.gran
    }

    /// Creates the state directory on first use.
    fn ensure_on_disk(&self, meta: &mut MetaState) -> Result<()> {
        if !meta.on_disk {
            fs::create_dir_all(self.dir.join("gens"))?;
            for d in [self.dir.parent(), Some(self.dir.as_path())]
                .into_iter()
                .flatten()
            {
                meta::sync_dir(d)?;
            }
            meta._lock = Some(take_lock(&self.dir)?);
            meta.manifest.store(&self.dir)?;
            meta.on_disk = true;
        }
        if self.cow.get().is_none() {
            let path = self.dir.join(COW_STORE);
            let store = match CowStore::open(&path, self.gran) {
                // No snapshot exists (else load() would have opened it):
                // whatever is in an old store is garbage.
                Ok(_) => {
                    fs::remove_file(&path)?;
                    CowStore::create(&path, self.gran)?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    CowStore::create(&path, self.gran)?
                }
                Err(e) => return Err(e.into()),
            };
            let _ = self.cow.set(store);
        }
        Ok(())
    }

    fn cow(&self) -> &CowStore {
        self.cow
            .get()
            .expect("preserved-block store exists while snapshots exist")
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset > self.size || len > self.size - offset {
            return Err(StoreError::OutOfRange { offset, len });
        }
        Ok(())
    }

    /// Metadata work that must be durable before `[offset, offset+len)` is
    /// modified (module docs, steps 1 and 2).
    fn prepare(&self, live: &Live, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (a, b) = (offset / self.gran, (offset + len - 1) / self.gran + 1);
        let cow = live.newest_seq.filter(|_| !live.cowdone.all_set(a, b));
        match (&live.active, cow) {
            // Both a dirty-bit sync and a copy sync: overlap them, so a
            // first write waits for the longer one, not for their sum.
            (Some(g), Some(newest)) if !g.is_durable(a, b) => std::thread::scope(|sc| {
                let marking = sc.spawn(|| g.mark(a, b));
                let copied = self.preserve_for(live, newest, a, b);
                let marked = marking
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("dirty marking panicked")));
                marked?;
                copied
            }),
            (g, cow) => {
                if let Some(g) = g {
                    g.mark(a, b)?;
                }
                match cow {
                    Some(newest) => self.preserve_for(live, newest, a, b),
                    None => Ok(()),
                }
            }
        }
    }

    /// Preserves what a write to blocks `[a, b)` needs preserved.
    fn preserve_for(&self, live: &Live, newest: u64, a: u64, b: u64) -> Result<()> {
        // A sequential overwrite stream will need the next blocks
        // preserved too: copy them in the same batch (one sync instead of
        // several), at most a few times the request's own size, so random
        // writers copy nothing extra.
        let ahead = live
            .cowdone
            .run_before(a, COW_AHEAD_MAX)
            .min(COW_AHEAD_FACTOR * (b - a));
        self.preserve(live, newest, a, (b + ahead).min(self.nblocks))
    }

    /// Copies the old contents of blocks `[a, b)` that the newest snapshot
    /// still shares into the store, durably, once for all snapshots.
    fn preserve(&self, live: &Live, newest: u64, a: u64, b: u64) -> Result<()> {
        let mut stripes: Vec<usize> = (a..b).map(|blk| (blk % STRIPES) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> = stripes.iter().map(|&i| lock(&self.stripes[i])).collect();
        let todo: Vec<u64> = (a..b).filter(|&blk| !live.cowdone.get(blk)).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let cow = self.cow();
        let mut written = Vec::with_capacity(todo.len());
        // One batch (and so one store write) per run of consecutive blocks.
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
            let slots = cow.write_many(newest, &items, |bufs| {
                self.file.read_vectored_at(bufs, todo[i] * self.gran)
            })?;
            written.extend(todo[i..j].iter().copied().zip(slots));
            i = j;
        }
        // The copies are durable before any origin block is overwritten.
        cow.commit()?;
        {
            let mut maps = write(&self.maps);
            let Maps { snaps, refs } = &mut *maps;
            for &(blk, slot) in &written {
                let mut n = 0;
                for map in snaps.values_mut() {
                    if let std::collections::hash_map::Entry::Vacant(v) = map.entry(blk) {
                        v.insert(slot);
                        n += 1;
                    }
                }
                refs.insert(slot, n);
            }
        }
        for (blk, _) in written {
            live.cowdone.set(blk);
        }
        Ok(())
    }

    fn write_op(&self, offset: u64, len: u64, op: impl FnOnce() -> Result<()>) -> Result<()> {
        self.check(offset, len)?;
        let live = read(&self.live);
        self.prepare(&live, offset, len)?;
        op()
    }

    // ---- snapshots ----------------------------------------------------

    /// Freezes the disk's current content as snapshot `name`; with
    /// `checkpoint`, also starts checkpoint `name` at the same instant.
    pub fn create_snapshot(&self, name: &str, checkpoint: bool) -> Result<SnapshotInfo> {
        validate_name("snapshot", name)?;
        let mut live = write(&self.live);
        let mut meta = lock(&self.meta);
        if meta.manifest.snapshots.iter().any(|s| s.name == name) {
            return Err(StoreError::Exists(format!(
                "snapshot '{}@{name}' already exists",
                self.name
            )));
        }
        if checkpoint && meta.manifest.checkpoints.iter().any(|c| c.name == name) {
            return Err(StoreError::Exists(format!(
                "checkpoint '{name}' of disk '{}' already exists",
                self.name
            )));
        }
        self.ensure_on_disk(&mut meta)?;
        // Acknowledged writes become part of the snapshot durably.
        self.file.flush()?;
        let mut m = meta.manifest.clone();
        let seq = m.take_id();
        let created = meta::now();
        let new_gen = if checkpoint || !m.checkpoints.is_empty() {
            let id = m.take_id();
            m.gens.push(id);
            Some(ActiveGen::create(&self.dir, id, self.nblocks, self.window)?)
        } else {
            None
        };
        let gen_end = new_gen.as_ref().map(|g| g.id);
        m.snapshots.push(SnapshotMeta {
            name: name.to_string(),
            seq,
            gen_end,
            created,
        });
        if let (true, Some(id)) = (checkpoint, gen_end) {
            m.checkpoints.push(CheckpointMeta {
                name: name.to_string(),
                gen_id: id,
                created,
            });
        }
        if let Err(e) = m.store(&self.dir) {
            if let Some(id) = gen_end {
                let _ = fs::remove_file(dirty::gen_path(&self.dir, id));
            }
            return Err(e);
        }
        let checkpoints = older_checkpoints(&m, gen_end);
        meta.manifest = m;
        drop(meta);
        if let Some(g) = new_gen {
            self.switch_gen(&mut live, g);
        }
        write(&self.maps).snaps.insert(seq, HashMap::new());
        live.cowdone.clear();
        live.newest_seq = Some(seq);
        tracing::info!(disk = %self.name, snapshot = name, checkpoint, "snapshot created");
        Ok(SnapshotInfo {
            name: name.to_string(),
            created,
            preserved_blocks: 0,
            checkpoints,
        })
    }

    fn switch_gen(&self, live: &mut Live, g: ActiveGen) {
        if let Some(old) = live.active.replace(g) {
            // Frozen generations keep exact bits on disk too. Best effort:
            // the window-rounded file is a safe superset.
            if let Err(e) = old.write_exact() {
                tracing::warn!(disk = %self.name, "cannot trim frozen bitmap {}: {e}", old.id);
            }
            write(&self.frozen).push((old.id, Arc::new(old.words())));
        }
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let meta = lock(&self.meta);
        let maps = read(&self.maps);
        meta.manifest
            .snapshots
            .iter()
            .map(|s| SnapshotInfo {
                name: s.name.clone(),
                created: s.created,
                preserved_blocks: maps.snaps.get(&s.seq).map_or(0, |m| m.len() as u64),
                checkpoints: older_checkpoints(&meta.manifest, s.gen_end),
            })
            .collect()
    }

    fn find_snapshot(&self, meta: &MetaState, name: &str) -> Result<SnapshotMeta> {
        meta.manifest
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("no snapshot '{}@{name}'", self.name)))
    }

    /// The read-only view of snapshot `name`.
    pub fn snapshot_view(self: &Arc<Self>, name: &str) -> Result<Arc<SnapshotView>> {
        let meta = lock(&self.meta);
        let s = self.find_snapshot(&meta, name)?;
        Ok(Arc::new(SnapshotView::new(
            self.clone(),
            s.name,
            s.seq,
            s.gen_end,
        )))
    }

    /// Deletes snapshot `name` and punches out the preserved blocks only it
    /// used. Views of it fail from now on; the caller makes sure nobody
    /// reads it (the admin API refuses while NBD clients have it open).
    pub fn delete_snapshot(&self, name: &str) -> Result<DeleteInfo> {
        let mut live = write(&self.live);
        let mut meta = lock(&self.meta);
        let s = self.find_snapshot(&meta, name)?;
        let mut m = meta.manifest.clone();
        m.snapshots.retain(|x| x.seq != s.seq);
        m.store(&self.dir)?;
        meta.manifest = m;
        drop(meta);
        let mut freed = Vec::new();
        {
            let mut maps = write(&self.maps);
            let Maps { snaps, refs } = &mut *maps;
            for (_, slot) in snaps.remove(&s.seq).unwrap_or_default() {
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
            if live.newest_seq != newest.map(|(&q, _)| q) {
                live.cowdone.clear();
                live.newest_seq = newest.map(|(&q, map)| {
                    for &b in map.keys() {
                        live.cowdone.set(b);
                    }
                    q
                });
            }
        }
        // Only now that no manifest names the snapshot may its blocks go.
        self.cow().release(&freed)?;
        tracing::info!(disk = %self.name, snapshot = name, freed = freed.len(), "snapshot deleted");
        Ok(DeleteInfo {
            name: name.to_string(),
            freed_blocks: freed.len() as u64,
            freed_bytes: freed.len() as u64 * self.gran,
        })
    }

    /// Puts the live disk back to snapshot `name`'s content, copying only
    /// the blocks changed since it. Writes wait meanwhile; the copies go
    /// through the normal write path, so they are tracked as dirty and
    /// preserved for newer snapshots.
    pub fn revert(&self, name: &str) -> Result<RevertInfo> {
        let live = write(&self.live);
        let seq = self.find_snapshot(&lock(&self.meta), name)?.seq;
        let mut blocks: Vec<(u64, u64)> = read(&self.maps)
            .snaps
            .get(&seq)
            .map(|m| m.iter().map(|(&b, &s)| (b, s)).collect())
            .unwrap_or_default();
        blocks.sort_unstable();
        let mut buf = vec![0u8; self.gran as usize];
        for &(blk, slot) in &blocks {
            let off = blk * self.gran;
            let n = self.gran.min(self.size - off) as usize;
            self.cow().read(slot, 0, &mut buf[..n])?;
            self.prepare(&live, off, n as u64)?;
            self.file.write_at(&buf[..n], off, false)?;
        }
        self.file.flush()?;
        tracing::info!(disk = %self.name, snapshot = name, blocks = blocks.len(), "reverted");
        Ok(RevertInfo {
            name: name.to_string(),
            blocks: blocks.len() as u64,
        })
    }

    // ---- checkpoints --------------------------------------------------

    pub fn create_checkpoint(&self, name: &str) -> Result<CheckpointInfo> {
        validate_name("checkpoint", name)?;
        let mut live = write(&self.live);
        let mut meta = lock(&self.meta);
        if meta.manifest.checkpoints.iter().any(|c| c.name == name) {
            return Err(StoreError::Exists(format!(
                "checkpoint '{name}' of disk '{}' already exists",
                self.name
            )));
        }
        self.ensure_on_disk(&mut meta)?;
        let mut m = meta.manifest.clone();
        let id = m.take_id();
        m.gens.push(id);
        let created = meta::now();
        m.checkpoints.push(CheckpointMeta {
            name: name.to_string(),
            gen_id: id,
            created,
        });
        let g = ActiveGen::create(&self.dir, id, self.nblocks, self.window)?;
        if let Err(e) = m.store(&self.dir) {
            let _ = fs::remove_file(dirty::gen_path(&self.dir, id));
            return Err(e);
        }
        meta.manifest = m;
        drop(meta);
        self.switch_gen(&mut live, g);
        tracing::info!(disk = %self.name, checkpoint = name, "checkpoint created");
        Ok(CheckpointInfo {
            name: name.to_string(),
            created,
            dirty_blocks: 0,
            granularity: self.gran,
        })
    }

    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        let list = lock(&self.meta).manifest.checkpoints.clone();
        list.into_iter()
            .map(|c| {
                let words = self.union_since(c.gen_id, None);
                CheckpointInfo {
                    name: c.name,
                    created: c.created,
                    dirty_blocks: words.iter().map(|w| w.count_ones() as u64).sum(),
                    granularity: self.gran,
                }
            })
            .collect()
    }

    /// Deletes checkpoint `name`. Generations no remaining checkpoint
    /// reaches are dropped; the others are untouched, so every other
    /// checkpoint's answer stays exact.
    pub fn delete_checkpoint(&self, name: &str) -> Result<()> {
        let mut live = write(&self.live);
        let mut meta = lock(&self.meta);
        let mut m = meta.manifest.clone();
        let before = m.checkpoints.len();
        m.checkpoints.retain(|c| c.name != name);
        if m.checkpoints.len() == before {
            return Err(StoreError::NotFound(format!(
                "no checkpoint '{name}' on disk '{}'",
                self.name
            )));
        }
        let oldest = m
            .checkpoints
            .iter()
            .map(|c| c.gen_id)
            .min()
            .unwrap_or(u64::MAX);
        let dropped: Vec<u64> = m.gens.iter().copied().filter(|&g| g < oldest).collect();
        m.gens.retain(|&g| g >= oldest);
        m.store(&self.dir)?;
        meta.manifest = m;
        drop(meta);
        write(&self.frozen).retain(|(id, _)| !dropped.contains(id));
        if live
            .active
            .as_ref()
            .is_some_and(|g| dropped.contains(&g.id))
        {
            // No checkpoint left: tracking stops and costs nothing again.
            live.active = None;
        }
        for id in dropped {
            let _ = fs::remove_file(dirty::gen_path(&self.dir, id));
        }
        tracing::info!(disk = %self.name, checkpoint = name, "checkpoint deleted");
        Ok(())
    }

    pub(crate) fn checkpoint_gen(&self, name: &str) -> Option<u64> {
        lock(&self.meta)
            .manifest
            .checkpoints
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.gen_id)
    }

    pub(crate) fn checkpoint_names_before(&self, gen_end: Option<u64>) -> Vec<String> {
        older_checkpoints(&lock(&self.meta).manifest, gen_end)
    }

    /// Union of generations with id in `[from, to)` (`to` None: up to now,
    /// the active generation included).
    pub(crate) fn union_since(&self, from: u64, to: Option<u64>) -> Vec<u64> {
        let mut out = vec![0u64; bitmap::words_for(self.nblocks)];
        let end = to.unwrap_or(u64::MAX);
        let or = |out: &mut Vec<u64>, w: &[u64]| {
            for (o, x) in out.iter_mut().zip(w) {
                *o |= x;
            }
        };
        for (id, w) in read(&self.frozen).iter() {
            if *id >= from && *id < end {
                or(&mut out, w);
            }
        }
        if to.is_none()
            && let Some(g) = &read(&self.live).active
        {
            or(&mut out, &g.words());
        }
        out
    }

    /// Blocks written since checkpoint `name` (up to now): for tests and
    /// tools that want a list rather than extents.
    pub fn dirty_blocks(&self, checkpoint: &str) -> Result<Vec<u64>> {
        let gen_id = self.checkpoint_gen(checkpoint).ok_or_else(|| {
            StoreError::NotFound(format!(
                "no checkpoint '{checkpoint}' on disk '{}'",
                self.name
            ))
        })?;
        let w = self.union_since(gen_id, None);
        Ok((0..self.nblocks)
            .filter(|&b| bitmap::test_bit(&w, b))
            .collect())
    }

    pub(crate) fn dirty_extents(
        &self,
        words: &[u64],
        offset: u64,
        len: u64,
        max: usize,
    ) -> Vec<Extent> {
        dirty::block_extents(offset, len, self.gran, max, |b| {
            bitmap::test_bit(words, b) as u32
        })
    }
}

fn older_checkpoints(m: &Manifest, gen_end: Option<u64>) -> Vec<String> {
    let Some(end) = gen_end else {
        return Vec::new();
    };
    m.checkpoints
        .iter()
        .filter(|c| c.gen_id < end)
        .map(|c| c.name.clone())
        .collect()
}

impl Drop for Volume {
    /// Clean close: the active generation's file gets the exact bits, so a
    /// restart after a clean shutdown reports no extra blocks.
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Some(g) = &read(&self.live).active
            && let Err(e) = g.write_exact()
        {
            tracing::warn!(disk = %self.name, "cannot write exact dirty bitmap: {e}");
        }
    }
}

impl BlockDev for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        self.file.caps()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_at(buf, offset)
    }

    // Live reads take the file's paths unchanged, the inline cached one too.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.file.read_at_nowait(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.write_op(offset, buf.len() as u64, || {
            self.file.write_at(buf, offset, fua)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.write_op(offset, len, || self.file.write_zeroes(offset, len, mode))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        // A trimmed range may read back differently, so it is a change.
        self.write_op(offset, len, || self.file.trim(offset, len, fua))
    }

    fn flush(&self) -> Result<()> {
        // Dirty bits and preserved blocks are already durable (write path).
        self.file.flush()
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.file.cache(offset, len)
    }

    fn contexts(&self) -> Vec<String> {
        let mut v = vec![BASE_ALLOCATION.to_string()];
        v.extend(
            lock(&self.meta)
                .manifest
                .checkpoints
                .iter()
                .map(|c| format!("{DIRTY_PREFIX}{}", c.name)),
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
        if context == BASE_ALLOCATION {
            return self.file.extents(context, offset, len, max_extents);
        }
        self.check(offset, len)?;
        let gen_id = context
            .strip_prefix(DIRTY_PREFIX)
            .and_then(|n| self.checkpoint_gen(n))
            .ok_or_else(|| StoreError::UnknownContext(context.to_string()))?;
        let words = self.union_since(gen_id, None);
        Ok(self.dirty_extents(&words, offset, len, max_extents))
    }
}
