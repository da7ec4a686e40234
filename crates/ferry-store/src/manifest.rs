//! The per-disk catalogue (`manifest.json`), the rules for names, and the
//! small durable-file helpers the state directory is built with.
//!
//! Every change to the set of snapshots, checkpoints or bitmap generations
//! is one atomic replacement of the manifest: write a temporary file, fsync
//! it, rename it over the old one, fsync the directory. After a crash the
//! manifest is either the old or the new one, never a mix; files that the
//! surviving manifest does not name are leftovers of an interrupted change
//! and are removed when the disk is opened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ferry_api::SnapshotBackend;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

pub(crate) const MANIFEST: &str = "manifest.json";
const FORMAT_VERSION: u32 = 1;

/// Checks a disk, snapshot or checkpoint name (see
/// [`ferry_api::validate_name`]: the API's rule is the store's).
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    ferry_api::validate_name(kind, name).map_err(StoreError::InvalidName)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct CheckpointMeta {
    pub name: String,
    /// First bitmap generation of this checkpoint: "dirty since" it is the
    /// union of this generation and every later one.
    pub gen_id: u64,
    pub created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SnapshotMeta {
    pub name: String,
    /// Creation order; preserved-block records carry the newest snapshot
    /// seq of their time, which decides which snapshots they belong to.
    pub seq: u64,
    /// First bitmap generation after the snapshot (None: no checkpoint
    /// existed, so the snapshot carries no dirty contexts).
    pub gen_end: Option<u64>,
    pub created: u64,
    /// Where its content lives (manifests from before reflink snapshots
    /// hold only preserved-block ones).
    #[serde(default)]
    pub backend: SnapshotBackend,
}

/// What the dirty-tracking layer keeps in the manifest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct TrackingMeta {
    /// Bitmap generations, oldest first; the last one is the active one
    /// while any checkpoint exists. File: `gens/ID.bits`.
    pub gens: Vec<u64>,
    pub checkpoints: Vec<CheckpointMeta>,
}

/// The catalogue of one disk. Each layer's part is its own type; the
/// disk's owner writes them together, so one change that spans layers (a
/// snapshot that also starts a checkpoint) is one atomic replacement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub version: u32,
    pub source: PathBuf,
    pub size: u64,
    pub granularity: u64,
    /// This disk's identity, published to NBD clients (a post-copy
    /// destination checks it did not get another disk after a reconnect).
    /// Made from the image file (see `file_identity`) and then kept;
    /// state from before it existed gets a random one when loaded.
    #[serde(default = "new_identity")]
    pub identity: String,
    /// Next id for generations and snapshot seqs (one counter, so both
    /// are ordered in time against each other).
    pub next_id: u64,
    #[serde(flatten)]
    pub tracking: TrackingMeta,
    pub snapshots: Vec<SnapshotMeta>,
}

impl Manifest {
    pub fn new(source: PathBuf, size: u64, granularity: u64) -> Self {
        Manifest {
            version: FORMAT_VERSION,
            size,
            granularity,
            identity: file_identity(&source).unwrap_or_else(new_identity),
            source,
            next_id: 1,
            tracking: TrackingMeta::default(),
            snapshots: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tracking.checkpoints.is_empty() && self.snapshots.is_empty()
    }

    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join(MANIFEST);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            StoreError::BadState(format!("{}: damaged manifest: {e}", path.display()))
        })?;
        if m.version != FORMAT_VERSION {
            return Err(StoreError::BadState(format!(
                "{}: unsupported format version {}",
                path.display(),
                m.version
            )));
        }
        Ok(Some(m))
    }

    /// Replaces the manifest atomically and durably.
    pub fn store(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_atomic(dir, MANIFEST, &text)?;
        Ok(())
    }
}

/// temp + fsync + rename + fsync(dir): the file is either old or new. A
/// failure (a full file system, say) leaves no temporary file behind.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `path` with `len` zero bytes and makes it durable, directory
/// entry included. The zeroes are written, not a hole: a later
/// `fdatasync` of an in-place update then has no block allocation to
/// commit to the file system journal, which makes it several times
/// cheaper (it is on the first-write path of every tracked block).
///
/// A failure (a full file system, say) removes the file again.
pub(crate) fn create_zeroed(path: &Path, len: u64) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let filled = (|| {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        match path.parent() {
            Some(parent) => sync_dir(parent),
            None => Ok(()),
        }
    })();
    if let Err(e) = filled {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(f)
}

/// The identity of an image that has no state yet: its file system, inode
/// and birth time. A restart of the daemon (even a `kill -9`) serving the
/// same file publishes the same identity, so a peer that was fetching from
/// it or mirroring to it carries on; a file replaced at the same path is
/// another disk. None where the file system keeps no birth time.
fn file_identity(source: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(source).ok()?;
    let born = md
        .created()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "{:x}.{:x}.{:x}.{:x}",
        md.dev(),
        md.ino(),
        born.as_secs(),
        born.subsec_nanos()
    ))
}

/// 128 random bits, in hex.
fn new_identity() -> String {
    let mut b = [0u8; 16];
    if let Err(e) = File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    }) {
        // Unique enough without randomness: the time and the process.
        tracing::warn!("no /dev/urandom ({e}): identity from the clock");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..8].copy_from_slice(&(t as u64).to_le_bytes());
        b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
