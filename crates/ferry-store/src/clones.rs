//! The reflink snapshot backend of one disk: a snapshot is a clone of the
//! image file (`FICLONE`), kept next to it as `.IMAGE.nbdferry-snap.SEQ`
//! (a clone must live on the image's file system). The file system shares
//! the blocks and copies them on write, so the live disk's write path does
//! nothing for these snapshots, and a snapshot export reads its clone,
//! which nothing writes. A revert reflinks the changed ranges back from
//! the clone into the image (`Disk::revert`).
//!
//! Crash ordering: a clone is made durable (file and directory) before the
//! manifest names its snapshot, and a deleted snapshot leaves the manifest
//! before its clone is removed. So the manifest never names a clone that
//! is missing, and a clone the manifest does not name is the leftover of
//! an interrupted create or delete: it is removed when the disk is opened.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ferry_block::{BASE_ALLOCATION, BlockDev, Error, Extent, Result as BlockResult};

use crate::file::FileDev;
use crate::manifest::sync_dir;
use crate::reflink;
use crate::view::Frozen;

pub(crate) struct Clones {
    /// The image, read-only: what clones are made of, and whose mapping
    /// is compared with theirs.
    image: File,
    size: u64,
    dir: PathBuf,
    /// `.IMAGE.nbdferry`: clones are `STEM-snap.SEQ`, probes `STEM.probe*`.
    stem: String,
    /// The file system's block: what a reflinked range is aligned to.
    fs_block: u64,
    open: Mutex<HashMap<u64, Arc<CloneFile>>>,
}

/// One snapshot's clone, open for its views until it is deleted.
pub(crate) struct CloneFile {
    path: PathBuf,
    /// `DISK@SNAP`, for errors.
    export: String,
    /// None once deleted: views fail, and the space is free at once.
    dev: RwLock<Option<FileDev>>,
}

impl Clones {
    /// The clones of image `source`; None unless it is a regular file.
    pub(crate) fn new(source: &Path) -> io::Result<Option<Clones>> {
        let image = File::open(source)?;
        let meta = image.metadata()?;
        let (Some(dir), Some(file)) = (source.parent(), source.file_name()) else {
            return Ok(None);
        };
        if !meta.is_file() {
            return Ok(None);
        }
        let fs_block = rustix::fs::fstatvfs(&image)?.f_frsize;
        Ok(Some(Clones {
            image,
            size: meta.len(),
            dir: dir.to_path_buf(),
            stem: format!(".{}.nbdferry", file.to_string_lossy()),
            fs_block,
            open: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether the image's file system can clone it (a probe, not assumed
    /// from the file system's name).
    pub(crate) fn supported(&self) -> bool {
        reflink::probe(&self.dir, &self.stem)
    }

    /// Whether ranges of whole `gran`-byte blocks (and a short last one,
    /// which ends at the end of the file) may be reflinked: the file
    /// system clones whole blocks of its own only.
    pub(crate) fn clones_blocks_of(&self, gran: u64) -> bool {
        gran.is_multiple_of(self.fs_block)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{}-snap.{seq}", self.stem))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<CloneFile>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the clones of the snapshots `(seq, export)` the manifest
    /// names and removes every other clone of this image (leftovers of an
    /// interrupted create or delete).
    pub(crate) fn load(&self, snapshots: &[(u64, String)]) -> io::Result<()> {
        let keep: HashSet<u64> = snapshots.iter().map(|(seq, _)| *seq).collect();
        let prefix = format!("{}-snap.", self.stem);
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            let Some(rest) = name.strip_prefix(prefix.as_str()) else {
                continue;
            };
            if rest.parse::<u64>().is_ok_and(|seq| keep.contains(&seq)) {
                continue;
            }
            tracing::info!(clone = %name, "removing a clone no snapshot names");
            fs::remove_file(self.dir.join(&*name))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        let mut open = self.lock();
        for (seq, export) in snapshots {
            let path = self.path(*seq);
            let dev = FileDev::open(&path, true).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "snapshot {export} listed but its clone {}: {e}",
                        path.display()
                    ),
                )
            })?;
            open.insert(*seq, Arc::new(CloneFile::new(path, export.clone(), dev)));
        }
        Ok(())
    }

    /// Clones the image as snapshot `seq`'s, durably (file and directory
    /// entry), before anything names it. Only with writes held back and
    /// the image flushed. Not in use until [`add`](Self::add)ed; on
    /// failure nothing is left behind.
    pub(crate) fn create(&self, seq: u64, export: String) -> io::Result<Arc<CloneFile>> {
        let path = self.path(seq);
        let made = (|| {
            // A leftover of a create that died before its manifest (same
            // seq, since the seq counter lives in the manifest) goes.
            let dst = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            reflink::clone_file(&self.image, &dst)?;
            dst.sync_all()?;
            sync_dir(&self.dir)?;
            FileDev::open(&path, true)
        })();
        match made {
            Ok(dev) => Ok(Arc::new(CloneFile::new(path, export, dev))),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Serves `clone` as snapshot `seq` (once the manifest names it).
    pub(crate) fn add(&self, seq: u64, clone: Arc<CloneFile>) {
        self.lock().insert(seq, clone);
    }

    /// Removes a clone that no manifest came to name.
    pub(crate) fn discard(&self, clone: &CloneFile) {
        clone.close();
        let _ = fs::remove_file(&clone.path);
    }

    pub(crate) fn get(&self, seq: u64) -> Option<Arc<CloneFile>> {
        self.lock().get(&seq).cloned()
    }

    /// Removes snapshot `seq`'s clone (once no manifest names it): views
    /// of it fail from now on and its own blocks are free. Returns the
    /// ranges only it held, which that freed.
    pub(crate) fn remove(&self, seq: u64) -> io::Result<Vec<(u64, u64)>> {
        let Some(clone) = self.lock().remove(&seq) else {
            return Ok(Vec::new());
        };
        let freed = clone.exclusive().unwrap_or_default();
        clone.close();
        fs::remove_file(&clone.path)?;
        sync_dir(&self.dir)?;
        Ok(freed)
    }

    /// Ranges where the live image may differ from snapshot `seq`'s clone:
    /// all but the blocks they still share (and holes in both). `settled`
    /// makes it exact (see [`reflink::mapping`]); without, writes not yet
    /// written back by the kernel may be missing.
    pub(crate) fn changed(&self, seq: u64, settled: bool) -> io::Result<Vec<(u64, u64)>> {
        let clone = self
            .get(seq)
            .ok_or_else(|| io::Error::other("snapshot clone is not open"))?;
        let theirs = clone.mapping()?;
        let ours = reflink::mapping(&self.image, self.size, settled)?;
        Ok(reflink::differing(&theirs, &ours, self.size))
    }
}

impl CloneFile {
    fn new(path: PathBuf, export: String, dev: FileDev) -> Self {
        CloneFile {
            path,
            export,
            dev: RwLock::new(Some(dev)),
        }
    }

    fn close(&self) {
        *self.dev.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn with<T>(&self, op: impl FnOnce(&FileDev) -> BlockResult<T>) -> BlockResult<T> {
        match &*self.dev.read().unwrap_or_else(|e| e.into_inner()) {
            Some(dev) => op(dev),
            None => Err(Error::Gone(format!(
                "snapshot '{}' was deleted",
                self.export
            ))),
        }
    }

    /// The clone, open for reading: what a revert reflinks ranges from.
    pub(crate) fn file(&self) -> BlockResult<File> {
        self.with(|_| Ok(File::open(&self.path)?))
    }

    /// Nothing writes a clone: its mapping is always settled.
    fn mapping(&self) -> io::Result<Vec<reflink::Mapped>> {
        let file = File::open(&self.path)?;
        let size = file.metadata()?.len();
        reflink::mapping(&file, size, false)
    }

    /// Ranges of the clone no other file shares.
    pub(crate) fn exclusive(&self) -> io::Result<Vec<(u64, u64)>> {
        Ok(reflink::exclusive(&self.mapping()?).collect())
    }
}

impl Frozen for CloneFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.with(|d| d.read_at(buf, offset))
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> BlockResult<bool> {
        self.with(|d| d.read_at_nowait(buf, offset))
    }

    fn allocation(&self, offset: u64, len: u64, max: usize) -> BlockResult<Vec<Extent>> {
        self.with(|d| d.extents(BASE_ALLOCATION, offset, len, max))
    }

    fn alive(&self) -> BlockResult<()> {
        self.with(|_| Ok(()))
    }
}
