//! The two ends of a copy: NBD exports, local files and block devices,
//! standard input/output, and the `null:` sink.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use nbd_client::{Client, ConnectOptions, ContextExtents, NbdUri};
use nbd_proto::consts::{BASE_ALLOCATION, state};
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::ReadWriteFlags;

use crate::error::{Error, Result};
use crate::plan::{Run, dirty_runs};
use crate::serial::SerialThread;

/// What the user named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    Nbd(NbdUri),
    Path(PathBuf),
    /// `-`: standard input or output.
    Stream,
    /// `null:`: discard everything (destination only).
    Null,
}

impl EndpointSpec {
    pub fn parse(s: &str) -> Result<Self> {
        if s == "-" {
            Ok(EndpointSpec::Stream)
        } else if s == "null:" {
            Ok(EndpointSpec::Null)
        } else if NbdUri::is_uri(s) || s.starts_with("nbd") && s.contains("://") {
            let uri = NbdUri::parse(s).map_err(|e| Error::Invalid(format!("{s}: {e}")))?;
            Ok(EndpointSpec::Nbd(uri))
        } else {
            Ok(EndpointSpec::Path(PathBuf::from(s)))
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn nbd_err(uri: &NbdUri) -> impl FnOnce(nbd_client::Error) -> Error + '_ {
    move |source| Error::Nbd {
        endpoint: uri.to_string(),
        source,
    }
}

pub(crate) async fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<Arc<Client>> {
    Ok(Arc::new(
        Client::connect(uri, opts).await.map_err(nbd_err(uri))?,
    ))
}

/// A local file or block device. Reads are served in place from the page
/// cache when they can be, else on the blocking pool (in parallel); writes
/// and zeroing go to the file's writer thread (see [`SerialThread`]).
#[derive(Clone)]
pub(crate) struct LocalFile {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub block_device: bool,
    writer: Option<SerialThread>,
}

/// Makes a range read as zeroes without allocating it: punch a hole
/// (files, and devices that support discard-with-zeroes), else zero the
/// range in place, else write zero bytes.
fn zero_range(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let keep = FallocateFlags::KEEP_SIZE;
    if rustix::fs::fallocate(f, FallocateFlags::PUNCH_HOLE | keep, offset, len).is_ok()
        || rustix::fs::fallocate(f, FallocateFlags::ZERO_RANGE | keep, offset, len).is_ok()
    {
        return Ok(());
    }
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
        f.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

impl LocalFile {
    pub fn open(path: &Path, write: bool, create: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .create_new(create)
            .open(path)
            .map_err(io_err("cannot open", path))?;
        let block_device = file
            .metadata()
            .map_err(io_err("cannot stat", path))?
            .file_type()
            .is_block_device();
        let file = Arc::new(file);
        let writer = if write {
            let t = SerialThread::start("file-writer", || {})
                .map_err(io_err("cannot start a writer thread for", path))?;
            Some(t)
        } else {
            None
        };
        Ok(LocalFile {
            file,
            path: path.to_path_buf(),
            block_device,
            writer,
        })
    }

    /// Size of a file or block device (metadata says 0 for devices).
    pub fn size(&self) -> Result<u64> {
        rustix::fs::seek(&*self.file, SeekFrom::End(0))
            .map_err(|e| io_err("cannot size", &self.path)(e.into()))
    }

    pub async fn read(&self, offset: u64, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        // What the page cache holds is read right here: handing a read to
        // the blocking pool and back costs two thread wake-ups, more than
        // copying a cached piece. Only the rest (a miss that needs the
        // disk) goes to the blocking pool.
        let mut done = 0;
        while done < buf.len() {
            let slice = &mut [IoSliceMut::new(&mut buf[done..])];
            match rustix::io::preadv2(
                &*self.file,
                slice,
                offset + done as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                // AGAIN: not cached; OPNOTSUPP: no NOWAIT support here.
                Err(_) => break,
            }
        }
        if done == buf.len() {
            return Ok(buf);
        }
        let f = self.file.clone();
        let r = tokio::task::spawn_blocking(move || {
            f.read_exact_at(&mut buf[done..], offset + done as u64)
                .map(|_| buf)
        })
        .await
        .map_err(|e| Error::Invalid(format!("I/O task failed: {e}")))?;
        r.map_err(io_err("cannot read", &self.path))
    }

    /// Runs `job` on the file's writer thread and waits for its result.
    async fn run(
        &self,
        what: &'static str,
        job: impl FnOnce(&File) -> std::io::Result<()> + Send + 'static,
    ) -> Result<()> {
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("{} is open read-only", self.path.display())))?;
        let file = self.file.clone();
        writer
            .run(move || job(&file))
            .await
            .map_err(|e| Error::Invalid(format!("{}: {e}", self.path.display())))?
            .map_err(io_err(what, &self.path))
    }

    pub async fn write(&self, offset: u64, buf: Bytes) -> Result<()> {
        // The buffer is let go of on the writer thread, before the waiter
        // wakes, so that it can take the buffer back for its next read.
        self.run("cannot write", move |f| f.write_all_at(&buf, offset))
            .await
    }

    /// Makes a range read as zeroes without allocating it (see
    /// [`zero_range`]).
    pub async fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.run("cannot zero", move |f| zero_range(f, offset, len))
            .await
    }

    /// Extents of `[offset, offset+len)` from SEEK_DATA/SEEK_HOLE as
    /// (length, reads-as-zero) runs. A file system without support reports
    /// everything as data, which is still correct.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        if self.block_device {
            // Linux answers SEEK_DATA on a block device with ENXIO, which
            // would read the whole device as one hole.
            return Ok(vec![(len, false)]);
        }
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match rustix::fs::seek(&*self.file, SeekFrom::Data(pos)) {
                Ok(d) => d.min(end),
                // ENXIO: no data after pos.
                Err(rustix::io::Errno::NXIO) => end,
                Err(_) => return Ok(vec![(len, false)]),
            };
            if data > pos {
                out.push((data - pos, true));
                pos = data;
                continue;
            }
            let hole = match rustix::fs::seek(&*self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h.min(end),
                Err(_) => end,
            };
            // A hole at pos cannot happen here (data == pos); guard anyway.
            let hole = hole.max(pos + 1).min(end);
            out.push((hole - pos, false));
            pos = hole;
        }
        Ok(out)
    }
}

/// Reads extents of `base:allocation` from an NBD export as
/// (length, reads-as-zero) runs covering at least part of the range.
pub(crate) async fn nbd_extents(
    client: &Client,
    uri: &NbdUri,
    offset: u64,
    len: u64,
) -> Result<Vec<(u64, bool)>> {
    let ctxs = client
        .block_status(offset, len)
        .await
        .map_err(nbd_err(uri))?;
    context_runs(&ctxs, uri, BASE_ALLOCATION, state::ZERO, len)
}

/// Runs of an incremental copy from an NBD export: the dirty ranges of
/// the `dirty` context (bit 0 set: changed since the bitmap was started),
/// as data or, where `base:allocation` says so, zeroes; everything else
/// kept. Both contexts come from one BLOCK_STATUS request.
pub(crate) async fn nbd_dirty_runs(
    client: &Client,
    uri: &NbdUri,
    allocation: bool,
    dirty: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<(u64, Run)>> {
    let ctxs = client
        .block_status(offset, len)
        .await
        .map_err(nbd_err(uri))?;
    let alloc = if allocation {
        context_runs(&ctxs, uri, BASE_ALLOCATION, state::ZERO, len)?
    } else {
        vec![(len, false)]
    };
    let dirty = context_runs(&ctxs, uri, dirty, state::DIRTY, len)?;
    Ok(dirty_runs(&alloc, &dirty))
}

/// One context's extents as (length, `bit` set) runs, cut at `len`.
fn context_runs(
    ctxs: &[ContextExtents],
    uri: &NbdUri,
    name: &str,
    bit: u32,
    len: u64,
) -> Result<Vec<(u64, bool)>> {
    let Some(ctx) = ctxs.iter().find(|c| c.name == name) else {
        return Err(Error::Nbd {
            endpoint: uri.to_string(),
            source: nbd_client::Error::Protocol(format!("block status reply lacks {name}")),
        });
    };
    let mut out = Vec::with_capacity(ctx.extents.len());
    let mut covered = 0u64;
    for e in &ctx.extents {
        if covered >= len {
            break;
        }
        let l = e.length.min(len - covered);
        out.push((l, e.flags & u64::from(bit) != 0));
        covered += l;
    }
    Ok(out)
}

/// Writes `len` zero bytes to an NBD export that cannot WRITE_ZEROES.
pub(crate) async fn nbd_write_zero_bytes(
    client: &Client,
    uri: &NbdUri,
    offset: u64,
    len: u64,
) -> Result<()> {
    let step = u64::from(client.info().max_payload()).min(1 << 20);
    let zeroes = Bytes::from(vec![0u8; step as usize]);
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(step);
        client
            .write(pos, zeroes.slice(..n as usize), false)
            .await
            .map_err(nbd_err(uri))?;
        pos += n;
    }
    Ok(())
}
