//! A repository in a local directory: one file per object, written under a
//! temporary name and renamed into place (atomic for readers).
//!
//! Durability: chunk files are not synced one by one (an fsync per chunk
//! would dominate a backup's time); [`Backend::barrier`] makes all of them
//! durable with one `syncfs` before the index that names them is written,
//! and that index (`Durability::Now`) is synced itself, then its directory.
//! `Durability::AfterAll` does both with one `syncfs` between writing the
//! temporary file and renaming it into place.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{Backend, BoxFuture, Durability, ObjectMeta};
use crate::error::{Error, Result};

pub struct Local {
    root: PathBuf,
}

impl Local {
    pub fn new(root: PathBuf) -> Local {
        Local { root }
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

fn put_file(path: &Path, data: &[u8], durability: Durability) -> Result<()> {
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
    f.write_all(data).map_err(io("cannot write", &tmp))?;
    match durability {
        Durability::Now => f.sync_all().map_err(io("cannot sync", &tmp))?,
        // Makes the earlier puts and this one's content durable at once;
        // the rename below then publishes only durable data.
        Durability::AfterAll => sync_fs(&f).map_err(io("cannot sync", &tmp))?,
        Durability::Deferred => {}
    }
    drop(f);
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io("cannot rename into place", path)(e));
    }
    if durability != Durability::Deferred {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync", dir))?;
    }
    Ok(())
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

    fn put<'a>(&'a self, key: &'a str, data: Bytes, durability: Durability) -> BoxFuture<'a, ()> {
        let path = self.path(key);
        Box::pin(blocking(move || put_file(&path, &data, durability)))
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, bool> {
        let path = self.path(key);
        Box::pin(blocking(move || match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
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
        let root = self.root.clone();
        Box::pin(blocking(move || {
            let dir = fs::File::open(&root).map_err(io("cannot open", &root))?;
            sync_fs(&dir).map_err(io("cannot sync", &root))
        }))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}
