//! A live disk: the owner of its state directory and of the layers its
//! export is built from.
//!
//! ```text
//! device below (file, block device) → dirty tracking → snapshot origin → write tap → write fence → export
//! snapshot export DISK@S: a read-only view over the origin's preserved blocks and the device below,
//!                        or over its reflink clone of the image
//! ```
//!
//! Which backend new snapshots get is decided when the disk is opened:
//! reflink clones (`clones.rs`) where the device below is the image file
//! itself and a probe clone in its directory succeeds, else the
//! preserved-block store. Each snapshot records its backend, so the
//! snapshots of either kind a disk already has keep working whichever
//! one new snapshots get.
//!
//! State directory (`STATE_DIR/disks/NAME/`):
//! ```text
//! lock            flock'ed while a daemon has the disk open
//! manifest.json   snapshots, checkpoints, generations (atomic replace)
//! gens/ID.bits    one dirty bitmap per generation (little-endian words)
//! cow.store       preserved old blocks shared by all snapshots
//! ```
//! and, for reflink snapshots, `.IMAGE.nbdferry-snap.SEQ` beside the image.
//! Nothing is created until the first snapshot or checkpoint, so serving a
//! disk that never uses them leaves no trace and costs nothing.
//!
//! Every change to snapshots and checkpoints runs with the write fence
//! held (`fence.rs`), is published by one atomic manifest replacement, and
//! only then switches the layers in memory: a failure leaves the old state
//! and no half-created object.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_api::{CheckpointInfo, DeleteInfo, RevertInfo, SnapshotBackend, SnapshotInfo};
use ferry_block::{BlockDev, Extent, IDENTITY_PREFIX, Layer, Result as BlockResult};

use crate::clones::{CloneFile, Clones};
use crate::dirty::{DirtyTracker, NewGeneration};
use crate::error::{Result, StoreError};
use crate::fence::WriteFence;
use crate::manifest::{self, CheckpointMeta, Manifest, SnapshotMeta, validate_name};
use crate::origin::SnapshotOrigin;
use crate::tap::{Tap, WriteTap};
use crate::view::{Frozen, Preserved, SnapshotView};

pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;
const COW_STORE: &str = "cow.store";
const GENS: &str = "gens";
/// Space set aside in the state directory for the manifest writes of the
/// operations that free space (deleting a snapshot or a checkpoint): on a
/// full file system they give the reserve back and retry, so freeing space
/// never needs space first. Set aside again by the next snapshot or
/// checkpoint created.
const RESERVE: &str = "reserve";
const RESERVE_BYTES: u64 = 1 << 20;

fn no_space(e: &StoreError) -> bool {
    matches!(e, StoreError::Io(io) if matches!(io.raw_os_error(), Some(28 /* ENOSPC */ | 122 /* EDQUOT */)))
}

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

/// Whether a disk's snapshots may be reflink clones of its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflinks {
    /// Where the image's file system clones files (probed when the disk
    /// is opened). Only for a device below that reads the image file
    /// itself: a clone of the file is then a snapshot of the disk.
    IfSupported,
    /// Always the preserved-block store (the device below is more than
    /// the image: a disk still arriving, say).
    Never,
}

/// Blocks of `gran` bytes that `ranges` (sorted by offset) touch, in order.
fn blocks_touched(ranges: &[(u64, u64)], gran: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(off, len) in ranges.iter().filter(|r| r.1 > 0) {
        let (a, b) = (off / gran, (off + len).div_ceil(gran));
        let a = out.last().map_or(a, |&last| a.max(last + 1));
        out.extend(a..b);
    }
    out
}

/// Most bytes one reflinked change of a revert covers: a client's largest
/// write (NBD's 32 MiB payload).
const CLONE_MAX: u64 = 32 << 20;

/// Copies whole blocks back onto the live disk, through a block-sized
/// buffer: a revert where blocks cannot be reflinked.
struct CopyBack<'a> {
    live: &'a dyn BlockDev,
    gran: u64,
    buf: Vec<u8>,
}

impl<'a> CopyBack<'a> {
    fn new(live: &'a dyn BlockDev, gran: u64) -> Self {
        CopyBack {
            live,
            gran,
            buf: vec![0u8; gran as usize],
        }
    }

    /// Writes block `blk` (short at the end of the disk), filled by `read`.
    fn block(&mut self, blk: u64, read: &dyn Fn(&mut [u8]) -> BlockResult<()>) -> BlockResult<()> {
        let off = blk * self.gran;
        let n = self.gran.min(self.live.size() - off) as usize;
        read(&mut self.buf[..n])?;
        self.live.write_at(&self.buf[..n], off, false)
    }
}

struct State {
    manifest: Manifest,
    /// The state directory and its manifest exist.
    on_disk: bool,
    _lock: Option<File>,
}

pub struct Disk {
    name: String,
    dir: PathBuf,
    gran: u64,
    state: Mutex<State>,
    fence: Arc<WriteFence>,
    tap: Arc<Tap>,
    origin: Arc<SnapshotOrigin>,
    dirty: Arc<DirtyTracker>,
    /// The image's clones (None: not a regular file).
    clones: Option<Clones>,
    /// What new snapshots get.
    backend: SnapshotBackend,
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

impl Disk {
    /// Builds the live stack of disk `name` over `below` (the device an
    /// image `source` was opened as), with its state in `disks_dir/name`.
    /// `granularity` applies when the disk has no state yet; `reflinks`
    /// says whether new snapshots may be clones of the image.
    pub fn open(
        name: &str,
        below: Arc<dyn BlockDev>,
        source: &Path,
        disks_dir: &Path,
        granularity: u64,
        reflinks: Reflinks,
    ) -> Result<Arc<Disk>> {
        validate_name("disk", name)?;
        validate_granularity(granularity)?;
        let size = below.size();
        let source = std::fs::canonicalize(source)?;
        let dir = disks_dir.join(name);
        let mut manifest = Manifest::new(source.clone(), size, granularity);
        let mut on_disk = false;
        // Whoever has state here (a manifest, or the layers below: a disk
        // still arriving) holds the directory for this daemon alone.
        let lock = if dir.is_dir() {
            Some(take_lock(&dir)?)
        } else {
            None
        };
        if let Some(m) = Manifest::load(&dir)? {
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
                if m.source == source && m.size == size {
                    manifest.identity = m.identity;
                }
            }
        }
        let gran = manifest.granularity;
        let dirty = Arc::new(DirtyTracker::new(below, gran, dir.join(GENS)));
        let origin = Arc::new(SnapshotOrigin::new(
            dirty.clone(),
            gran,
            dir.join(COW_STORE),
        ));
        let (preserved, cloned): (Vec<SnapshotMeta>, Vec<SnapshotMeta>) = manifest
            .snapshots
            .iter()
            .cloned()
            .partition(|s| s.backend == SnapshotBackend::PreservedBlocks);
        if on_disk {
            dirty.load(&manifest.tracking)?;
            origin
                .load(&preserved)
                .map_err(|e| StoreError::BadState(format!("{}: {e}", dir.display())))?;
        }
        let clones = Clones::new(&source)?;
        match &clones {
            // Also without state: a clone made by a first snapshot whose
            // manifest never got written is a leftover too.
            Some(c) => c
                .load(
                    &cloned
                        .iter()
                        .map(|s| (s.seq, format!("{name}@{}", s.name)))
                        .collect::<Vec<_>>(),
                )
                .map_err(|e| StoreError::BadState(format!("{}: {e}", dir.display())))?,
            None if !cloned.is_empty() => {
                return Err(StoreError::BadState(format!(
                    "{}: has reflink snapshots, but {} is not a regular file",
                    dir.display(),
                    source.display()
                )));
            }
            None => {}
        }
        let backend = match (&clones, reflinks) {
            (Some(c), Reflinks::IfSupported) if c.supported() => SnapshotBackend::Reflink,
            _ => SnapshotBackend::PreservedBlocks,
        };
        tracing::info!(disk = name, backend = backend.as_str(), "snapshot backend");
        let tap = Arc::new(Tap::new(origin.clone()));
        Ok(Arc::new(Disk {
            name: name.to_string(),
            dir,
            gran,
            state: Mutex::new(State {
                manifest,
                on_disk,
                _lock: lock,
            }),
            fence: Arc::new(WriteFence::new(tap.clone())),
            tap,
            origin,
            dirty,
            clones,
            backend,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn granularity(&self) -> u64 {
        self.gran
    }

    /// The backend new snapshots of this disk get.
    pub fn snapshot_backend(&self) -> SnapshotBackend {
        self.backend
    }

    /// The image's clones; only asked for with a reflink snapshot at hand
    /// (which `open` made sure the image can have).
    fn clones(&self) -> Result<&Clones> {
        self.clones
            .as_ref()
            .ok_or_else(|| StoreError::BadState(format!("disk '{}' has no clones", self.name)))
    }

    fn clone_of(&self, s: &SnapshotMeta) -> Result<Arc<CloneFile>> {
        self.clones()?.get(s.seq).ok_or_else(|| {
            StoreError::NotFound(format!("no clone of snapshot '{}@{}'", self.name, s.name))
        })
    }

    /// Blocks whose old content a snapshot holds (see
    /// [`SnapshotInfo::preserved_blocks`]).
    fn held_blocks(&self, s: &SnapshotMeta) -> u64 {
        match s.backend {
            SnapshotBackend::PreservedBlocks => self.origin.preserved_count(s.seq),
            // Blocks changed since: what the snapshot holds apart from
            // the live disk, as preserved blocks are. Not settled: a
            // listing (or a metrics scrape) forces no writeback, so the
            // count may trail the writes the kernel has not written back.
            SnapshotBackend::Reflink => {
                match self.clones().and_then(|c| Ok(c.changed(s.seq, false)?)) {
                    Ok(ranges) => blocks_touched(&ranges, self.gran).len() as u64,
                    Err(e) => {
                        tracing::warn!(disk = %self.name, snapshot = s.name, "cannot map its clone: {e}");
                        0
                    }
                }
            }
        }
    }

    /// The device the disk's export serves: the top of its stack. It
    /// keeps the disk (and so its state directory's lock) alive.
    pub fn device(self: &Arc<Self>) -> Arc<dyn BlockDev> {
        self.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the state directory on first use.
    /// Creates the state directory on first use. Safe to call again after
    /// it failed half-way (a full file system).
    fn ensure_on_disk(&self, st: &mut State) -> Result<()> {
        if st.on_disk {
            return Ok(());
        }
        std::fs::create_dir_all(self.dir.join(GENS))?;
        for d in [self.dir.parent(), Some(self.dir.as_path())]
            .into_iter()
            .flatten()
        {
            manifest::sync_dir(d)?;
        }
        if st._lock.is_none() {
            st._lock = Some(take_lock(&self.dir)?);
        }
        st.manifest.store(&self.dir)?;
        st.on_disk = true;
        Ok(())
    }

    /// Sets the reserve aside if it is missing (best effort: on a full file
    /// system it waits for room). Creating operations call it, not deletes:
    /// a delete frees all it can at once.
    fn ensure_reserve(&self) {
        let path = self.dir.join(RESERVE);
        if path.exists() {
            return;
        }
        let made = (|| {
            let f = std::fs::File::create(&path)?;
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, RESERVE_BYTES)?;
            f.sync_all()?;
            manifest::sync_dir(&self.dir)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(disk = %self.name, "cannot set aside space for deletes: {e}");
        }
    }

    /// Publishes `m` (durably), then lets the layers take it up.
    fn publish(&self, st: &mut State, m: Manifest, new_gen: Option<NewGeneration>) -> Result<()> {
        if let Err(e) = m.store(&self.dir) {
            if let Some(g) = new_gen {
                g.discard();
            }
            return Err(e);
        }
        self.dirty.apply(&m.tracking, new_gen);
        st.manifest = m;
        Ok(())
    }

    /// [`publish`](Self::publish) for a change that frees space: on a full
    /// file system the reserve goes first, then the manifest is written.
    fn publish_freeing(&self, st: &mut State, m: Manifest) -> Result<()> {
        match m.store(&self.dir) {
            Err(e) if no_space(&e) && std::fs::remove_file(self.dir.join(RESERVE)).is_ok() => {
                tracing::info!(disk = %self.name, "state file system full: using the reserve");
                manifest::sync_dir(&self.dir)?;
                m.store(&self.dir)?;
            }
            r => r?,
        }
        self.dirty.apply(&m.tracking, None);
        st.manifest = m;
        Ok(())
    }

    fn exists_error(&self, what: &str, name: &str) -> StoreError {
        StoreError::Exists(match what {
            "snapshot" => format!("snapshot '{}@{name}' already exists", self.name),
            _ => format!("checkpoint '{name}' of disk '{}' already exists", self.name),
        })
    }

    /// `nbdferry:identity:ID` for the live disk, `...ID@SEQ` for snapshot
    /// SEQ of it.
    fn identity_context(&self, snapshot: Option<u64>) -> String {
        let id = &self.state().manifest.identity;
        match snapshot {
            Some(seq) => format!("{IDENTITY_PREFIX}{id}@{seq}"),
            None => format!("{IDENTITY_PREFIX}{id}"),
        }
    }

    // ---- snapshots ----------------------------------------------------

    /// Freezes the disk's current content as snapshot `name`; with
    /// `checkpoint`, also starts checkpoint `name` at the same instant.
    pub fn create_snapshot(&self, name: &str, checkpoint: bool) -> Result<SnapshotInfo> {
        validate_name("snapshot", name)?;
        let _fence = self.fence.hold();
        let mut st = self.state();
        if st.manifest.snapshots.iter().any(|s| s.name == name) {
            return Err(self.exists_error("snapshot", name));
        }
        if checkpoint
            && st
                .manifest
                .tracking
                .checkpoints
                .iter()
                .any(|c| c.name == name)
        {
            return Err(self.exists_error("checkpoint", name));
        }
        self.ensure_on_disk(&mut st)?;
        self.ensure_reserve();
        if self.backend == SnapshotBackend::PreservedBlocks {
            self.origin.ensure_store()?;
        }
        // Acknowledged writes become part of the snapshot durably.
        BlockDev::flush(&*self.fence)?;
        let mut m = st.manifest.clone();
        let seq = m.take_id();
        let created = manifest::now();
        let new_gen = if checkpoint || !m.tracking.checkpoints.is_empty() {
            let id = m.take_id();
            m.tracking.gens.push(id);
            Some(self.dirty.create_generation(id)?)
        } else {
            None
        };
        let gen_end = new_gen.as_ref().map(NewGeneration::id);
        // The clone is durable before the manifest that names it.
        let clone = match self.backend {
            SnapshotBackend::Reflink => {
                let made = self
                    .clones()
                    .and_then(|c| Ok(c.create(seq, format!("{}@{name}", self.name))?));
                match made {
                    Ok(c) => Some(c),
                    Err(e) => {
                        if let Some(g) = new_gen {
                            g.discard();
                        }
                        return Err(e);
                    }
                }
            }
            SnapshotBackend::PreservedBlocks => None,
        };
        m.snapshots.push(SnapshotMeta {
            name: name.to_string(),
            seq,
            gen_end,
            created,
            backend: self.backend,
        });
        if let (true, Some(id)) = (checkpoint, gen_end) {
            m.tracking.checkpoints.push(CheckpointMeta {
                name: name.to_string(),
                gen_id: id,
                created,
            });
        }
        if let Err(e) = self.publish(&mut st, m, new_gen) {
            if let (Some(c), Ok(clones)) = (&clone, self.clones()) {
                clones.discard(c);
            }
            return Err(e);
        }
        match clone {
            Some(c) => self.clones()?.add(seq, c),
            None => self.origin.add_snapshot(seq),
        }
        tracing::info!(disk = %self.name, snapshot = name, checkpoint, backend = self.backend.as_str(), "snapshot created");
        Ok(SnapshotInfo {
            name: name.to_string(),
            created,
            preserved_blocks: 0,
            backend: self.backend,
            checkpoints: self.dirty.checkpoints_before(gen_end),
        })
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let snaps = self.state().manifest.snapshots.clone();
        snaps
            .into_iter()
            .map(|s| SnapshotInfo {
                preserved_blocks: self.held_blocks(&s),
                backend: s.backend,
                checkpoints: self.dirty.checkpoints_before(s.gen_end),
                name: s.name,
                created: s.created,
            })
            .collect()
    }

    fn find_snapshot(&self, st: &State, name: &str) -> Result<SnapshotMeta> {
        st.manifest
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("no snapshot '{}@{name}'", self.name)))
    }

    /// The read-only view of snapshot `name`.
    pub fn snapshot_view(self: &Arc<Self>, name: &str) -> Result<Arc<dyn BlockDev>> {
        let s = self.find_snapshot(&self.state(), name)?;
        let content: Arc<dyn Frozen> = match s.backend {
            SnapshotBackend::PreservedBlocks => Arc::new(Preserved::new(
                self.origin.clone(),
                format!("{}@{}", self.name, s.name),
                s.seq,
            )),
            SnapshotBackend::Reflink => self.clone_of(&s)?,
        };
        Ok(Arc::new(SnapshotView::new(
            self.clone(),
            content,
            self.origin.below().size(),
            self.dirty.clone(),
            self.identity_context(Some(s.seq)),
            s.gen_end,
        )))
    }

    /// Deletes snapshot `name` and punches out the preserved blocks only it
    /// used (or removes its clone). Views of it fail from now on; the
    /// caller makes sure nobody reads it (the daemon refuses while NBD
    /// clients have it open).
    pub fn delete_snapshot(&self, name: &str) -> Result<DeleteInfo> {
        let _fence = self.fence.hold();
        let mut st = self.state();
        let s = self.find_snapshot(&st, name)?;
        let mut m = st.manifest.clone();
        m.snapshots.retain(|x| x.seq != s.seq);
        self.publish_freeing(&mut st, m)?;
        drop(st);
        // Only now that no manifest names the snapshot may its blocks go.
        let (freed_blocks, freed_bytes) = match s.backend {
            SnapshotBackend::PreservedBlocks => {
                let freed = self.origin.remove_snapshot(s.seq);
                self.origin.release(&freed)?;
                (freed.len() as u64, freed.len() as u64 * self.gran)
            }
            SnapshotBackend::Reflink => {
                let freed = self.clones()?.remove(s.seq)?;
                (
                    blocks_touched(&freed, self.gran).len() as u64,
                    freed.iter().map(|r| r.1).sum(),
                )
            }
        };
        tracing::info!(disk = %self.name, snapshot = name, freed_blocks, "snapshot deleted");
        Ok(DeleteInfo {
            name: name.to_string(),
            freed_blocks,
            freed_bytes,
        })
    }

    /// Puts the live disk back to snapshot `name`'s content, changing only
    /// the blocks changed since it: preserved ones are copied back; those
    /// the image no longer shares with a reflink snapshot's clone are
    /// reflinked back from it (see [`reflink_back`](Self::reflink_back)).
    /// Writes wait meanwhile. Every change goes through the tap and the
    /// origin like a write, so it is tracked as dirty, preserved for
    /// older preserved-block snapshots and seen by a mirror.
    ///
    /// Crash safety: the snapshot is never written, and each change makes
    /// its dirty bits and preserved copies durable before it goes down.
    /// So a revert cut short (kill -9, power loss) leaves the disk a mix
    /// of reverted and not yet reverted blocks, every snapshot intact and
    /// every checkpoint covering what changed; reverting again finishes
    /// the job. Success is reported only after the image is flushed.
    pub fn revert(&self, name: &str) -> Result<RevertInfo> {
        let _fence = self.fence.hold();
        let s = self.find_snapshot(&self.state(), name)?;
        // Below the fence, which this holds; through the tap, so that a
        // mirror sees the blocks change.
        let live: &dyn BlockDev = &*self.tap;
        let blocks = match s.backend {
            SnapshotBackend::PreservedBlocks => {
                let blocks = self.origin.preserved(s.seq);
                let mut copy = CopyBack::new(live, self.gran);
                for &(blk, slot) in &blocks {
                    copy.block(blk, &|b| self.origin.read_preserved(slot, 0, b))?;
                }
                blocks.len()
            }
            SnapshotBackend::Reflink => {
                let clone = self.clone_of(&s)?;
                let blocks = blocks_touched(&self.clones()?.changed(s.seq, true)?, self.gran);
                self.reflink_back(live, &clone, &blocks)?;
                blocks.len()
            }
        };
        // Durable (reflinked ranges' new block maps too) before it is
        // reported.
        live.flush()?;
        tracing::info!(disk = %self.name, snapshot = name, blocks, "reverted");
        Ok(RevertInfo {
            name: name.to_string(),
            blocks: blocks as u64,
        })
    }

    /// Puts `blocks` back from `clone` by reflinking runs of them
    /// (`clone_range`): no byte moves, and the image shares the clone's
    /// blocks again, so the space the changed blocks took is free at once.
    /// Each run is one change through `live`, which each layer handles
    /// as a write of the range (dirty bits, preserving first, the tap).
    /// Where that cannot be done (a layer that cannot account for a clone,
    /// a copy-on-read disk; a granularity finer than the file system's
    /// blocks), the runs left are copied instead, which every layer
    /// understands.
    fn reflink_back(&self, live: &dyn BlockDev, clone: &CloneFile, blocks: &[u64]) -> Result<()> {
        let size = live.size();
        let mut src = if self.clones()?.clones_blocks_of(self.gran) {
            Some(clone.file()?)
        } else {
            None
        };
        let mut copy = CopyBack::new(live, self.gran);
        // Runs no longer than a client's largest write: the layers' work
        // per change (the origin buffers the blocks it preserves) stays
        // what it is for writes.
        let most = (CLONE_MAX / self.gran).max(1);
        for (a, b) in crate::bitmap::runs_of(blocks) {
            for a in (a..b).step_by(most as usize) {
                let b = (a + most).min(b);
                // A short last block ends at the end of both files, where
                // a reflink need not end on a file system block.
                let (off, end) = (a * self.gran, (b * self.gran).min(size));
                if let Some(from) = &src {
                    match live.clone_range(from, off, end - off) {
                        Ok(()) => continue,
                        Err(ferry_block::Error::Unsupported) => {
                            tracing::info!(disk = %self.name, "cannot reflink here: copying instead");
                            src = None;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                for blk in a..b {
                    copy.block(blk, &|buf| clone.read_at(buf, blk * self.gran))?;
                }
            }
        }
        Ok(())
    }

    // ---- checkpoints --------------------------------------------------

    pub fn create_checkpoint(&self, name: &str) -> Result<CheckpointInfo> {
        validate_name("checkpoint", name)?;
        let _fence = self.fence.hold();
        let mut st = self.state();
        if st
            .manifest
            .tracking
            .checkpoints
            .iter()
            .any(|c| c.name == name)
        {
            return Err(self.exists_error("checkpoint", name));
        }
        self.ensure_on_disk(&mut st)?;
        self.ensure_reserve();
        let mut m = st.manifest.clone();
        let id = m.take_id();
        m.tracking.gens.push(id);
        let created = manifest::now();
        m.tracking.checkpoints.push(CheckpointMeta {
            name: name.to_string(),
            gen_id: id,
            created,
        });
        let new_gen = self.dirty.create_generation(id)?;
        self.publish(&mut st, m, Some(new_gen))?;
        tracing::info!(disk = %self.name, checkpoint = name, "checkpoint created");
        Ok(CheckpointInfo {
            name: name.to_string(),
            created,
            dirty_blocks: 0,
            granularity: self.gran,
        })
    }

    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        let list = self.state().manifest.tracking.checkpoints.clone();
        list.into_iter()
            .map(|c| CheckpointInfo {
                dirty_blocks: self
                    .dirty
                    .dirty_blocks(&c.name)
                    .map_or(0, |b| b.len() as u64),
                name: c.name,
                created: c.created,
                granularity: self.gran,
            })
            .collect()
    }

    /// Deletes checkpoint `name`. Generations no remaining checkpoint
    /// reaches are dropped; the others are untouched, so every other
    /// checkpoint's answer stays exact.
    pub fn delete_checkpoint(&self, name: &str) -> Result<()> {
        let _fence = self.fence.hold();
        let mut st = self.state();
        let mut m = st.manifest.clone();
        if !m.tracking.remove_checkpoint(name) {
            return Err(StoreError::NotFound(format!(
                "no checkpoint '{name}' on disk '{}'",
                self.name
            )));
        }
        self.publish_freeing(&mut st, m)?;
        tracing::info!(disk = %self.name, checkpoint = name, "checkpoint deleted");
        Ok(())
    }

    /// Blocks written since checkpoint `name` (up to now): for tests and
    /// tools that want a list rather than extents.
    pub fn dirty_blocks(&self, checkpoint: &str) -> Result<Vec<u64>> {
        self.dirty.dirty_blocks(checkpoint).ok_or_else(|| {
            StoreError::NotFound(format!(
                "no checkpoint '{checkpoint}' on disk '{}'",
                self.name
            ))
        })
    }

    /// Plugs a tap in that sees every change from now on (None: takes it
    /// out). No change is in flight meanwhile.
    pub fn set_tap(&self, tap: Option<Arc<dyn WriteTap>>) {
        let _fence = self.fence.hold();
        self.tap.set(tap);
    }

    /// Holds writes back (those in flight finish first) until the guard is
    /// dropped: a job's short freeze.
    pub fn hold_writes(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.fence.hold()
    }

    /// Refuses every write from now on, with EPERM (the disk has moved).
    pub fn close_writes(&self) {
        self.tap.close();
    }

    /// The disk's state directory (it may not exist yet).
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// A directory for a job's durable state in the disk's state
    /// directory (created, with the state directory, if missing).
    pub fn job_dir(&self, job: &str) -> Result<PathBuf> {
        let mut st = self.state();
        self.ensure_on_disk(&mut st)?;
        let dir = self.dir.join(job);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Periodic upkeep (the daemon calls it every few seconds): keeps what
    /// a crash can make a checkpoint over-report to the last few seconds'
    /// marking windows. Returns the bits dropped.
    pub fn tighten(&self) -> Result<u64> {
        Ok(self.dirty.tighten()?)
    }

    /// Drops the disk the way a crash would: no clean-close work.
    #[cfg(test)]
    pub(crate) fn crash(self: Arc<Self>) {
        self.dirty.simulate_crash();
    }
}

/// The disk is the top of its own stack, so whoever serves it keeps its
/// state directory locked; everything passes on to the fence. It adds the
/// disk's identity context.
impl Layer for Disk {
    fn next(&self) -> &dyn BlockDev {
        &*self.fence
    }

    fn contexts(&self) -> Vec<String> {
        let mut v = self.next().contexts();
        v.push(self.identity_context(None));
        v
    }

    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> BlockResult<Vec<Extent>> {
        if context == self.identity_context(None) {
            return identity_extent(self.next().size(), offset, len);
        }
        self.next().extents(context, offset, len, max)
    }
}

/// The one extent of an identity context: it describes no data.
pub(crate) fn identity_extent(size: u64, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
    ferry_block::check_range(size, offset, len)?;
    Ok(vec![Extent {
        length: len,
        flags: 0,
    }])
}
