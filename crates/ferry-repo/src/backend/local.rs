//! A repository in a local directory: one file per object, written under a
//! temporary name and renamed into place (atomic for readers).
//!
//! Durability: chunk files are not synced as they are written;
//! [`Backend::barrier`] makes every object written (or found) since the
//! last one durable before the index that names them is written, and that
//! index (`Durability::Now`) is synced itself, then its directory.
//! `Durability::AfterAll` does both before its file is renamed into place.
//! A few objects (an incremental's new chunks) are synced one by one, in
//! parallel, then their folders; many (a full backup), or an unknown set
//! (dedup against a listing of `chunks/`), with one `syncfs`. `syncfs`
//! would also flush whatever else on the file system is dirty: on a backup
//! server that holds other tools' writes, that made a small incremental
//! wait a second for data that was not its own.

use std::fs;
use std::io::{IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Backend, BoxFuture, Durability, ObjectMeta};
use crate::error::{Error, Result};

pub struct Local {
    root: PathBuf,
    written: Arc<Written>,
}

/// Up to this many objects since the last barrier are synced one by one;
/// more take one `syncfs`.
const SYNC_EACH_MAX: usize = 1024;
/// fsyncs issued together share the file system's journal commits.
const SYNC_THREADS: usize = 16;

/// What the next barrier must make durable.
#[derive(Default)]
struct Written {
    set: Mutex<ToSync>,
    /// One barrier at a time: a barrier that finds the set empty must not
    /// return while another is still syncing what it took.
    syncing: Mutex<()>,
}

#[derive(Default, Debug, PartialEq)]
enum ToSync {
    #[default]
    Nothing,
    /// The objects, and how many bytes were written to them.
    Files(Vec<PathBuf>, u64),
    WholeFs,
}

impl Written {
    fn add(&self, path: PathBuf, bytes: u64) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *set {
            ToSync::Nothing => *set = ToSync::Files(vec![path], bytes),
            ToSync::Files(v, n) if v.len() < SYNC_EACH_MAX => {
                v.push(path);
                *n += bytes;
            }
            _ => *set = ToSync::WholeFs,
        }
    }

    /// Objects this writer did not write may be used without it knowing
    /// which (another writer's chunks, not synced yet): sync everything.
    fn unknown(&self) {
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = ToSync::WholeFs;
    }

    /// Makes what was written durable (with `extra`, a file not renamed
    /// into place yet).
    fn sync(&self, root: &Path, extra: Option<&fs::File>) -> std::io::Result<()> {
        let _one = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        let set = std::mem::take(&mut *self.set.lock().unwrap_or_else(|e| e.into_inner()));
        let files = match set {
            ToSync::Files(_, bytes) if !mostly_others(bytes) => {
                // syncfs flushes little besides ours, and costs one
                // journal commit where each file would cost its own.
                return sync_fs(&fs::File::open(root)?);
            }
            ToSync::WholeFs => return sync_fs(&fs::File::open(root)?),
            ToSync::Nothing => Vec::new(),
            ToSync::Files(v, _) => v,
        };
        if let Some(f) = extra {
            f.sync_all()?;
        }
        // The files' data and inodes, then the folders that name them.
        sync_each(&files)?;
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        sync_each(&dirs)
    }
}

/// Whether the system's dirty page cache holds much more than `ours`
/// bytes (`Dirty:` in /proc/meminfo): a `syncfs` would then mostly wait
/// for other writers' data. Unknown counts as no. (Our own chunks leave
/// `Dirty:` early, their writeback started: this errs towards `syncfs`,
/// which then has little left to wait for.)
fn mostly_others(ours: u64) -> bool {
    let Ok(info) = fs::read_to_string("/proc/meminfo") else {
        return false;
    };
    let dirty = info
        .lines()
        .find_map(|l| l.strip_prefix("Dirty:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    dirty > 4 * ours + (32 << 20)
}

/// fsyncs every path, from several threads at once.
fn sync_each(paths: &[PathBuf]) -> std::io::Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    let per = paths.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|s| {
        let workers: Vec<_> = paths
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter().try_for_each(|p| {
                        match fs::File::open(p).and_then(|f| f.sync_all()) {
                            // Set aside or deleted meanwhile (by gc's
                            // protocol): nothing of it to make durable.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                            r => r,
                        }
                    })
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sync thread panicked")))
        })
    })
}

impl Local {
    pub fn new(root: PathBuf) -> Local {
        Local {
            root,
            written: Arc::default(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("file task failed: {e}")))?
}

/// A name no other writer uses at the same time: pid plus a counter.
fn temp_name(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn put_file(
    path: &Path,
    parts: &[Bytes],
    durability: Durability,
    root: &Path,
    written: &Written,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_name(path);
    // The folder exists but for the first object in it: try first.
    let mut f = match fs::File::create(&tmp) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
            fs::File::create(&tmp)
        }
        r => r,
    }
    .map_err(io("cannot create", &tmp))?;
    write_parts(&mut f, parts).map_err(io("cannot write", &tmp))?;
    if durability == Durability::Deferred {
        start_writeback(&f);
    }
    match durability {
        Durability::Now => f.sync_all().map_err(io("cannot sync", &tmp))?,
        // Makes the earlier puts and this one's content durable at once;
        // the rename below then publishes only durable data.
        Durability::AfterAll => written
            .sync(root, Some(&f))
            .map_err(io("cannot sync", &tmp))?,
        Durability::Deferred => {}
    }
    drop(f);
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io("cannot rename into place", path)(e));
    }
    if durability == Durability::Deferred {
        let len = parts.iter().map(Bytes::len).sum::<usize>();
        written.add(path.to_path_buf(), len as u64);
    } else {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync", dir))?;
    }
    Ok(())
}

/// Writes every part, in order, with as few system calls as it takes.
fn write_parts(f: &mut fs::File, parts: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    // Drops empty parts up front: a write of nothing reads as WriteZero.
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match f.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Starts writing `f`'s dirty pages to the disk without waiting for
/// them. A deferred object is synced by the next barrier; begun now, its
/// writeback overlaps the rest of the backup instead of all of it waiting
/// in that barrier (below the kernel's background threshold, often
/// gigabytes, nothing would be written before it). Advisory: an error
/// only leaves the work to the barrier.
fn start_writeback(f: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // open for the duration of the call (borrowed from `f`).
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// `syncfs(2)` of the filesystem that holds `f`.
fn sync_fs(f: &fs::File) -> std::io::Result<()> {
    rustix::fs::syncfs(f).map_err(Into::into)
}

fn list_dir(root: &Path, dir: &Path, out: &mut Vec<ObjectMeta>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("cannot list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io("cannot list", dir))?;
        let name = entry.file_name();
        // Temporary files of writers in progress are not objects.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Renamed or deleted while we listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("cannot stat", &path)(e)),
        };
        if meta.is_dir() {
            list_dir(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(ObjectMeta {
                key: rel.to_string_lossy().into_owned(),
                size: meta.len(),
            });
        }
    }
    Ok(())
}

impl Backend for Local {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Bytes>> {
        let path = self.path(key);
        Box::pin(blocking(move || match fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("cannot read", &path)(e)),
        }))
    }

    fn put_parts<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        durability: Durability,
    ) -> BoxFuture<'a, ()> {
        let (path, root, written) = (self.path(key), self.root.clone(), self.written.clone());
        Box::pin(blocking(move || {
            put_file(&path, &parts, durability, &root, &written)
        }))
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, bool> {
        let (path, written) = (self.path(key), self.written.clone());
        Box::pin(blocking(move || match fs::symlink_metadata(&path) {
            // It may be another writer's, not durable yet: the next
            // barrier syncs it too (cheap when it already is).
            Ok(_) => {
                written.add(path, 0);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("cannot stat", &path)(e)),
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        let path = self.path(key);
        Box::pin(blocking(move || match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io("cannot delete", &path)(e))
            }
            _ => Ok(()),
        }))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<ObjectMeta>> {
        let root = self.root.clone();
        let dir = self.path(prefix);
        if prefix.starts_with(crate::id::CHUNKS) {
            // Deduplication against the listing: whatever it finds may be
            // used, durable or not.
            self.written.unknown();
        }
        Box::pin(blocking(move || {
            let mut out = Vec::new();
            list_dir(&root, &dir, &mut out)?;
            Ok(out)
        }))
    }

    fn rename<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, bool> {
        let (from, to) = (self.path(from), self.path(to));
        Box::pin(blocking(move || {
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
            }
            match fs::rename(&from, &to) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io("cannot rename", &from)(e)),
            }
        }))
    }

    fn barrier(&self) -> BoxFuture<'_, ()> {
        let (root, written) = (self.root.clone(), self.written.clone());
        Box::pin(blocking(move || {
            written.sync(&root, None).map_err(io("cannot sync", &root))
        }))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    /// The canonical path: a relative path, a symlink or a trailing slash
    /// name the same directory.
    fn identity(&self) -> String {
        fs::canonicalize(&self.root).map_or_else(|_| self.describe(), |p| p.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn deferred(local: &Local, key: &str) {
        let data = Bytes::from_static(b"x");
        local.put(key, data, Durability::Deferred).await.unwrap();
    }

    fn planned(w: &Written) -> ToSync {
        std::mem::take(&mut *w.set.lock().unwrap())
    }

    #[tokio::test]
    async fn barriers_sync_what_was_written_or_found_or_everything() {
        let dir = tempfile::tempdir().unwrap();
        let local = Local::new(dir.path().to_path_buf());
        deferred(&local, "chunks/ab/one").await;
        assert!(local.exists("chunks/cd/two").await.is_ok());
        deferred(&local, "chunks/cd/two").await;
        assert!(local.exists("chunks/ab/one").await.unwrap());
        let root = dir.path();
        assert_eq!(
            planned(&local.written),
            ToSync::Files(
                vec![
                    root.join("chunks/ab/one"),
                    root.join("chunks/cd/two"),
                    root.join("chunks/ab/one"),
                ],
                2
            ),
            "the written object and the one found"
        );
        deferred(&local, "chunks/ab/three").await;
        local.barrier().await.unwrap();
        assert_eq!(
            planned(&local.written),
            ToSync::Nothing,
            "a barrier takes it all"
        );

        local.list(crate::id::CHUNKS).await.unwrap();
        assert_eq!(
            planned(&local.written),
            ToSync::WholeFs,
            "dedup against a listing"
        );
        for i in 0..=SYNC_EACH_MAX {
            local.written.add(root.join(format!("x{i}")), 1);
        }
        assert_eq!(
            planned(&local.written),
            ToSync::WholeFs,
            "too many to sync each"
        );
        local.list("points/").await.unwrap();
        assert_eq!(planned(&local.written), ToSync::Nothing);
    }
}
