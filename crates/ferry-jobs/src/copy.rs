//! Disk copy between any two endpoints: NBD URIs, local files or block
//! devices, `-` (standard input or output) and `null:` (discard).
//!
//! How it works: the source's extents (`base:allocation` over NBD,
//! SEEK_DATA/SEEK_HOLE on local files) split the image into data pieces of
//! at most the request size and zero ranges. Many workers (connections ×
//! requests in flight) take pieces in turn: data is read and, if the block
//! turns out to be all zeroes, treated as a zero range; zero ranges are
//! skipped where the destination is known to read zeroes already (a new
//! file, holes of an existing file, `base:allocation` zero extents of an
//! NBD destination, `null:`), and otherwise written as zeroes without
//! allocating (NBD WRITE_ZEROES without NO_HOLE, or punching a hole in a
//! file). A sparse source therefore never inflates the destination.
//!
//! # What a failed copy leaves behind
//!
//! - **New local file**: the data goes to `DST.part`, which is renamed to
//!   `DST` only after every write succeeded (and was synced, with
//!   `--flush`). A failed copy leaves `DST.part` (delete it or copy again)
//!   and never a `DST` that looks complete.
//! - **Existing local file or block device**: written in place. After a
//!   failure some ranges hold the new data and the rest still hold the old
//!   contents (an existing regular file has already been resized to the
//!   source's size). Treat the destination as garbage and copy again.
//! - **NBD destination**: the same as an existing device: ranges written
//!   before the failure hold new data, the rest old data. Writes the server
//!   acknowledged may still sit in its cache unless `--flush` completed.
//! - **`-` (standard output)**: the stream stops early; the reader sees a
//!   short stream and nbdferry exits non-zero.
//!
//! In every case nbdferry exits with a non-zero status and an error naming
//! the failed endpoint and request.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry_repo::{PointReader, PointWriter};
use nbd_client::{Client, ConnectOptions, NbdUri};
use nbd_proto::consts::BASE_ALLOCATION;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::endpoint::{
    EndpointSpec, LocalFile, connect, nbd_dirty_runs, nbd_err, nbd_extents, nbd_write_zero_bytes,
};
use crate::error::{Error, Result};
use crate::pace::Pacer;
use crate::plan::{Item, Run, push_items};
use crate::progress::Progress;
use crate::zero::{is_zero, zero_runs};

/// Granularity of zero detection inside data pieces (a file system block).
const ZERO_GRAIN: u64 = 4096;

/// How far ahead extents are fetched at a time.
const EXTENT_WINDOW: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Connections per NBD endpoint (used only if the server allows multi-conn).
    pub connections: usize,
    /// Requests in flight per connection.
    pub requests: usize,
    /// Largest read/write request.
    pub request_size: u64,
    /// Flush (NBD FLUSH / fsync) the destination before finishing.
    pub flush: bool,
    /// The caller promises the destination already reads as zeroes (e.g. a
    /// fresh export on a server that cannot report it), so zero ranges are
    /// skipped instead of written.
    pub destination_is_zero: bool,
    pub handshake_timeout: Duration,
    /// Fail once requests to an NBD endpoint have waited this long without
    /// a byte from its server (None: wait forever).
    pub io_timeout: Option<Duration>,
    /// Pace reads from the source to this many bytes per second.
    pub rate: Option<u64>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        // Measured with proto-tests/bench/bench-client.sh against qemu-nbd
        // (1 GiB of data in a 4 GiB image, 2 cores): 1 MiB requests cut
        // the wall time of a read to null: by about a third against 256 KiB
        // (fewer replies, wake-ups and server round trips); past 1 MiB
        // nothing changed. 4 connections x 8 requests keep 32 MiB in
        // flight, more did not help.
        CopyOptions {
            connections: 4,
            requests: 8,
            request_size: 1 << 20,
            flush: false,
            destination_is_zero: false,
            handshake_timeout: Duration::from_secs(30),
            io_timeout: Some(Duration::from_secs(60)),
            rate: None,
        }
    }
}

/// What the copy did, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub size: u64,
    /// Read from the source as data (holes, zeroes and kept ranges are
    /// not read).
    pub read: u64,
    /// Written as data.
    pub data: u64,
    /// Written as zeroes (WRITE_ZEROES, hole punching).
    pub zeroed: u64,
    /// Not written: the destination already reads zeroes there.
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    data: AtomicU64,
    zeroed: AtomicU64,
    skipped: AtomicU64,
}

pub(crate) enum Source {
    Nbd {
        client: Arc<Client>,
        uri: NbdUri,
        extents: bool,
        /// A dirty-bitmap context: copy only what it marks dirty and keep
        /// the rest (an incremental backup).
        dirty: Option<String>,
    },
    File(LocalFile),
    /// A point of a backup repository (restore, verify).
    Repo(Arc<PointReader>),
    Stdin,
}

pub(crate) enum Dest {
    Nbd {
        client: Arc<Client>,
        uri: NbdUri,
    },
    File(LocalFile),
    /// A point being written into a backup repository.
    Repo(PointWriter),
    /// Not written: compared with what this export holds (verify).
    Compare {
        client: Arc<Client>,
        uri: NbdUri,
    },
    Stdout,
    Null,
}

/// Ranges of the destination known to read as zeroes before the copy.
#[derive(Default)]
pub(crate) struct ZeroMap {
    all: bool,
    ranges: Vec<(u64, u64)>,
}

impl ZeroMap {
    fn add(&mut self, a: u64, b: u64) {
        match self.ranges.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => self.ranges.push((a, b)),
        }
    }

    fn contains(&self, offset: u64, len: u64) -> bool {
        if self.all {
            return true;
        }
        let i = self.ranges.partition_point(|r| r.1 <= offset);
        self.ranges
            .get(i)
            .is_some_and(|&(a, b)| a <= offset && offset + len <= b)
    }
}

struct Ctx {
    src: Source,
    dst: Dest,
    dst_zero: ZeroMap,
    size: u64,
    align: u64,
    request_size: u64,
    planner: Mutex<Planner>,
    counters: Counters,
    progress: Arc<Progress>,
    pacer: Option<Pacer>,
}

struct Planner {
    pos: u64,
    queue: VecDeque<Item>,
}

/// Copies `src` to `dst` (as named on the command line).
pub async fn copy(
    src: &str,
    dst: &str,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<CopyStats> {
    let src = open_source(EndpointSpec::parse(src)?, opts, &[]).await?;
    let dst = open_dest(EndpointSpec::parse(dst)?, src.size()?, opts).await?;
    run(src, dst, opts, progress).await
}

pub(crate) fn connect_options(opts: &CopyOptions, contexts: &[&str]) -> ConnectOptions {
    let mut meta_contexts = vec![BASE_ALLOCATION.to_string()];
    meta_contexts.extend(contexts.iter().map(|c| c.to_string()));
    ConnectOptions {
        connections: opts.connections.max(1),
        requests: opts.requests.max(1),
        meta_contexts,
        handshake_timeout: opts.handshake_timeout,
        io_timeout: opts.io_timeout,
        ..ConnectOptions::default()
    }
}

/// Opens a source named on the command line; `contexts` are meta contexts
/// to negotiate beside `base:allocation`.
pub(crate) async fn open_source(
    spec: EndpointSpec,
    opts: &CopyOptions,
    contexts: &[&str],
) -> Result<Source> {
    Ok(match spec {
        EndpointSpec::Nbd(uri) => {
            let client = connect(&uri, &connect_options(opts, contexts)).await?;
            let extents = client.info().has_context(BASE_ALLOCATION);
            Source::Nbd {
                client,
                uri,
                extents,
                dirty: None,
            }
        }
        EndpointSpec::Path(p) => Source::File(LocalFile::open(&p, false, false)?),
        EndpointSpec::Stream => Source::Stdin,
        EndpointSpec::Null => return Err(Error::Invalid("null: can only be a destination".into())),
    })
}

impl Source {
    /// The source's size; `None` for a stream.
    pub(crate) fn size(&self) -> Result<Option<u64>> {
        Ok(match self {
            Source::Nbd { client, .. } => Some(client.size()),
            Source::File(f) => Some(f.size()?),
            Source::Repo(r) => Some(r.size()),
            Source::Stdin => None,
        })
    }
}

/// A destination ready to be written, with what it already reads as
/// zeroes and, for a new file, the rename that ends the copy.
pub(crate) struct OpenDest {
    pub dst: Dest,
    pub zero: ZeroMap,
    rename: Option<(PathBuf, PathBuf)>,
}

impl OpenDest {
    pub fn new(dst: Dest, zero: ZeroMap) -> OpenDest {
        OpenDest {
            dst,
            zero,
            rename: None,
        }
    }
}

/// Opens a destination named on the command line for a source of `size`
/// bytes (`None`: a stream of unknown length).
pub(crate) async fn open_dest(
    spec: EndpointSpec,
    size: Option<u64>,
    opts: &CopyOptions,
) -> Result<OpenDest> {
    // A new local file is written under a temporary name and renamed at the
    // end, so a failed copy never leaves something that looks complete.
    let mut rename: Option<(PathBuf, PathBuf)> = None;
    let mut dst_zero = ZeroMap::default();
    let dst = match spec {
        EndpointSpec::Nbd(uri) => {
            let client = connect(&uri, &connect_options(opts, &[])).await?;
            if client.info().read_only() {
                return Err(Error::Invalid(format!("{uri}: the export is read-only")));
            }
            if let Some(s) = size
                && client.size() < s
            {
                return Err(Error::Invalid(format!(
                    "{uri}: destination ({} bytes) is smaller than the source ({s} bytes)",
                    client.size()
                )));
            }
            if client.info().has_context(BASE_ALLOCATION) {
                dst_zero = nbd_zero_map(&client, &uri, size.unwrap_or(client.size())).await?;
            }
            Dest::Nbd { client, uri }
        }
        EndpointSpec::Path(p) => {
            if p.exists() {
                let f = LocalFile::open(&p, true, false)?;
                if f.block_device {
                    if let Some(s) = size
                        && f.size()? < s
                    {
                        return Err(Error::Invalid(format!(
                            "{}: device is smaller than the source ({s} bytes)",
                            p.display()
                        )));
                    }
                } else {
                    if let Some(s) = size {
                        f.file.set_len(s).map_err(|e| io("cannot resize", &p, e))?;
                    }
                    for (a, b) in f_zero_ranges(&f, size.unwrap_or(0))? {
                        dst_zero.add(a, b);
                    }
                }
                Dest::File(f)
            } else {
                let part = part_path(&p);
                // A leftover from an earlier failed copy is ours to replace.
                let _ = std::fs::remove_file(&part);
                let f = LocalFile::open(&part, true, true)?;
                if let Some(s) = size {
                    f.file
                        .set_len(s)
                        .map_err(|e| io("cannot resize", &part, e))?;
                }
                dst_zero.all = true;
                rename = Some((part, p));
                Dest::File(f)
            }
        }
        EndpointSpec::Stream => Dest::Stdout,
        EndpointSpec::Null => {
            dst_zero.all = true;
            Dest::Null
        }
    };
    if opts.destination_is_zero {
        dst_zero.all = true;
    }
    Ok(OpenDest {
        dst,
        zero: dst_zero,
        rename,
    })
}

/// Runs a copy between opened endpoints.
pub(crate) async fn run(
    src: Source,
    dst: OpenDest,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<CopyStats> {
    let size = src.size()?;
    if let Some(s) = size {
        progress.set_total(s);
    }
    let OpenDest {
        dst,
        zero: dst_zero,
        rename,
    } = dst;
    let align = src_align(&src).max(dst_align(&dst)).max(1);
    let max_req = src_max(&src).min(dst_max(&dst));
    let request_size = (opts.request_size.min(max_req) / align * align).max(align);
    let workers = opts.connections.max(1) * opts.requests.max(1);

    let ctx = Arc::new(Ctx {
        src,
        dst,
        dst_zero,
        size: size.unwrap_or(0),
        align,
        request_size,
        planner: Mutex::new(Planner {
            pos: 0,
            queue: VecDeque::new(),
        }),
        counters: Counters::default(),
        progress,
        pacer: opts.rate.map(Pacer::new),
    });

    let total = match (&ctx.src, &ctx.dst) {
        (Source::Stdin, _) => copy_from_stdin(&ctx, workers).await?,
        (_, Dest::Stdout) => copy_to_stdout(&ctx, workers).await?,
        _ => {
            run_workers(&ctx, workers).await?;
            ctx.size
        }
    };

    finish(&ctx, opts.flush, total).await?;
    if let Some((part, fin)) = rename {
        std::fs::rename(&part, &fin).map_err(|e| io("cannot rename into place", &fin, e))?;
    }
    let stats = CopyStats {
        size: total,
        read: ctx.counters.read.load(Ordering::Relaxed),
        data: ctx.counters.data.load(Ordering::Relaxed),
        zeroed: ctx.counters.zeroed.load(Ordering::Relaxed),
        skipped: ctx.counters.skipped.load(Ordering::Relaxed),
    };
    // Soft disconnect now that nothing is in flight.
    if let Ok(ctx) = Arc::try_unwrap(ctx) {
        if let Source::Nbd { client, .. } = ctx.src
            && let Ok(c) = Arc::try_unwrap(client)
        {
            let _ = c.disconnect().await;
        }
        if let Dest::Nbd { client, .. } | Dest::Compare { client, .. } = ctx.dst
            && let Ok(c) = Arc::try_unwrap(client)
        {
            let _ = c.disconnect().await;
        }
    }
    Ok(stats)
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `DST.part` next to the destination.
fn part_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

fn src_align(s: &Source) -> u64 {
    match s {
        Source::Nbd { client, .. } => client.info().min_block().into(),
        _ => 1,
    }
}

fn dst_align(d: &Dest) -> u64 {
    match d {
        Dest::Nbd { client, .. } | Dest::Compare { client, .. } => client.info().min_block().into(),
        _ => 1,
    }
}

/// Largest request to the source. A repository point splits a request at
/// chunk boundaries itself, so it takes requests of any size (the 1 MiB
/// default: fewer, larger writes to an NBD destination on restore).
fn src_max(s: &Source) -> u64 {
    match s {
        Source::Nbd { client, .. } => client.info().max_payload().into(),
        _ => 32 << 20,
    }
}

/// Largest write to the destination. A point being written splits a piece
/// at chunk boundaries itself, so reads from the source stay at the request
/// size (the grid of `push_items` keeps them chunk-aligned).
fn dst_max(d: &Dest) -> u64 {
    match d {
        Dest::Nbd { client, .. } | Dest::Compare { client, .. } => {
            client.info().max_payload().into()
        }
        _ => 32 << 20,
    }
}

fn f_zero_ranges(f: &LocalFile, size: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    for (len, zero) in f.extents(0, size)? {
        if zero {
            out.push((pos, pos + len));
        }
        pos += len;
    }
    Ok(out)
}

pub(crate) async fn nbd_zero_map(client: &Client, uri: &NbdUri, size: u64) -> Result<ZeroMap> {
    let mut map = ZeroMap::default();
    let mut pos = 0;
    while pos < size {
        let runs = nbd_extents(client, uri, pos, (size - pos).min(EXTENT_WINDOW)).await?;
        for (len, zero) in runs {
            if zero {
                map.add(pos, pos + len);
            }
            pos += len;
        }
    }
    Ok(map)
}

impl Ctx {
    /// The next piece of work, fetching the next window of extents when the
    /// queue runs dry.
    async fn next_item(&self) -> Result<Option<Item>> {
        let mut p = self.planner.lock().await;
        if let Some(item) = p.queue.pop_front() {
            return Ok(Some(item));
        }
        if p.pos >= self.size {
            return Ok(None);
        }
        let len = (self.size - p.pos).min(EXTENT_WINDOW);
        let zero_if = |v: Vec<(u64, bool)>| -> Vec<(u64, Run)> {
            v.into_iter().map(|(l, z)| (l, Run::zero_if(z))).collect()
        };
        let runs = match &self.src {
            Source::Nbd {
                client,
                uri,
                extents,
                dirty: Some(ctx),
            } => nbd_dirty_runs(client, uri, *extents, ctx, p.pos, len).await?,
            Source::Nbd {
                client,
                uri,
                extents: true,
                dirty: None,
            } => zero_if(nbd_extents(client, uri, p.pos, len).await?),
            Source::File(f) => zero_if(f.extents(p.pos, len)?),
            Source::Repo(r) => zero_if(r.extents(p.pos, len)?),
            _ => vec![(len, Run::Data)],
        };
        let runs = match &self.dst {
            Dest::Repo(w) => keep_done_slots(w, p.pos, &runs),
            _ => runs,
        };
        let start = p.pos;
        let covered: u64 = runs.iter().map(|r| r.0).sum();
        if covered == 0 {
            return Err(Error::Invalid("source reported no extents".into()));
        }
        push_items(
            start,
            &runs,
            self.align,
            self.request_size,
            self.size,
            &mut p.queue,
        );
        p.pos = start + covered;
        Ok(p.queue.pop_front())
    }

    async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let len = buf.len() as u64;
        if let Some(p) = &self.pacer {
            p.wait(len).await;
        }
        let buf = match &self.src {
            Source::Nbd { client, uri, .. } => {
                client.read(offset, buf).await.map_err(nbd_err(uri))?
            }
            Source::File(f) => f.read(offset, buf).await?,
            Source::Repo(r) => {
                let mut buf = buf;
                r.read_at(&mut buf, offset).await?;
                buf
            }
            Source::Stdin => unreachable!("stdin is read sequentially"),
        };
        self.counters.read.fetch_add(len, Ordering::Relaxed);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        match &self.dst {
            Dest::Nbd { client, uri } => client
                .write(offset, data, false)
                .await
                .map_err(nbd_err(uri))?,
            Dest::File(f) => f.write(offset, data).await?,
            Dest::Repo(w) => w.write(offset, data).await?,
            Dest::Compare { client, uri } => {
                let theirs = client
                    .read(offset, vec![0u8; data.len()])
                    .await
                    .map_err(nbd_err(uri))?;
                if let Some(i) = (0..data.len()).find(|&i| data[i] != theirs[i]) {
                    return Err(Error::Differs {
                        endpoint: uri.to_string(),
                        offset: offset + i as u64,
                    });
                }
            }
            Dest::Null => {}
            Dest::Stdout => unreachable!("stdout is written in order"),
        }
        self.counters.data.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `[offset, offset+len)` of the destination read as zeroes.
    async fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if self.dst_zero.contains(offset, len) {
            self.counters.skipped.fetch_add(len, Ordering::Relaxed);
            return Ok(());
        }
        match &self.dst {
            Dest::Nbd { client, uri } => {
                if client.info().can_zero() {
                    client
                        .write_zeroes(offset, len, false, false)
                        .await
                        .map_err(nbd_err(uri))?;
                } else {
                    nbd_write_zero_bytes(client, uri, offset, len).await?;
                }
            }
            Dest::File(f) => f.zero(offset, len).await?,
            Dest::Repo(w) => w.zero(offset, len).await?,
            Dest::Compare { client, uri } => {
                let step = self.request_size;
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(step);
                    let theirs = client
                        .read(pos, vec![0u8; n as usize])
                        .await
                        .map_err(nbd_err(uri))?;
                    if let Some(i) = theirs.iter().position(|&b| b != 0) {
                        return Err(Error::Differs {
                            endpoint: uri.to_string(),
                            offset: pos + i as u64,
                        });
                    }
                    pos += n;
                }
            }
            Dest::Null => {}
            Dest::Stdout => unreachable!("stdout is written in order"),
        }
        self.counters.zeroed.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a piece that was read as data: all-zero blocks in it become
    /// zero ranges, the rest is written. Returns the buffer for reuse.
    async fn data(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let grain = self.align.max(ZERO_GRAIN) as usize;
        let runs = zero_runs(&buf, grain);
        let data = Bytes::from(buf);
        for (a, b, zero) in runs {
            let at = offset + a as u64;
            if zero {
                self.zero(at, (b - a) as u64).await?;
            } else {
                self.write(at, data.slice(a..b)).await?;
            }
        }
        // Take the buffer back if the connection let go of it.
        Ok(data.try_into_mut().map(Vec::from).unwrap_or_default())
    }

    /// A range the destination takes from elsewhere (the previous point).
    async fn keep(&self, offset: u64, len: u64) -> Result<()> {
        match &self.dst {
            Dest::Repo(w) => w.keep(offset, len).await.map_err(Error::from),
            _ => Err(Error::Invalid(
                "only a backup can keep ranges from a previous point".into(),
            )),
        }
    }

    async fn item(&self, item: Item, buf: Vec<u8>) -> Result<Vec<u8>> {
        let buf = match item {
            Item::Zero { offset, len } => {
                self.zero(offset, len).await?;
                buf
            }
            Item::Keep { offset, len } => {
                self.keep(offset, len).await?;
                buf
            }
            Item::Data { offset, len } => {
                let mut buf = buf;
                buf.resize(len as usize, 0);
                let buf = self.read(offset, buf).await?;
                self.data(offset, buf).await?
            }
        };
        self.progress.add(item.len());
        Ok(buf)
    }
}

async fn run_workers(ctx: &Arc<Ctx>, workers: usize) -> Result<()> {
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let ctx = ctx.clone();
        set.spawn(async move {
            let mut buf = Vec::new();
            while let Some(item) = ctx.next_item().await? {
                buf = ctx.item(item, buf).await?;
            }
            Ok::<(), Error>(())
        });
    }
    join_all(set).await
}

/// Waits for every task; the first error stops the others.
async fn join_all(mut set: JoinSet<Result<()>>) -> Result<()> {
    while let Some(r) = set.join_next().await {
        let r = r.map_err(|e| Error::Invalid(format!("copy task failed: {e}")))?;
        if let Err(e) = r {
            set.abort_all();
            return Err(e);
        }
    }
    Ok(())
}

/// A read running ahead of the ordered writer.
type ReadTask = tokio::task::JoinHandle<Result<(Item, Vec<u8>)>>;

/// Ordered copy to standard output: reads run ahead (up to `workers`
/// pieces), output is written strictly in order, zero ranges as zero bytes.
async fn copy_to_stdout(ctx: &Arc<Ctx>, workers: usize) -> Result<u64> {
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::io::stdout());
    let mut inflight: VecDeque<ReadTask> = VecDeque::new();
    let zeroes = vec![0u8; 1 << 20];
    let stdout_err = |e| io("cannot write", Path::new("<stdout>"), e);
    loop {
        while inflight.len() < workers {
            let Some(item) = ctx.next_item().await? else {
                break;
            };
            let ctx2 = ctx.clone();
            inflight.push_back(tokio::spawn(async move {
                match item {
                    Item::Data { offset, len } => {
                        Ok((item, ctx2.read(offset, vec![0u8; len as usize]).await?))
                    }
                    Item::Zero { .. } | Item::Keep { .. } => Ok((item, Vec::new())),
                }
            }));
        }
        let Some(h) = inflight.pop_front() else { break };
        let (item, data) = h
            .await
            .map_err(|e| Error::Invalid(format!("read task failed: {e}")))??;
        match item {
            Item::Data { .. } => out.write_all(&data).await.map_err(stdout_err)?,
            Item::Keep { .. } => {
                return Err(Error::Invalid(
                    "a kept range cannot be written to a stream".into(),
                ));
            }
            Item::Zero { len, .. } => {
                let mut left = len;
                while left > 0 {
                    let n = left.min(zeroes.len() as u64) as usize;
                    out.write_all(&zeroes[..n]).await.map_err(stdout_err)?;
                    left -= n as u64;
                }
            }
        }
        ctx.progress.add(item.len());
    }
    out.flush().await.map_err(stdout_err)?;
    Ok(ctx.size)
}

/// Copy from standard input: read in order, write pieces concurrently.
/// The size is what the stream holds.
async fn copy_from_stdin(ctx: &Arc<Ctx>, workers: usize) -> Result<u64> {
    let mut input = tokio::io::stdin();
    let stdin_err = |e| io("cannot read", Path::new("<stdin>"), e);
    let limit = match &ctx.dst {
        Dest::Nbd { client, .. } => Some(client.size()),
        _ => None,
    };
    let mut out = match ctx.dst {
        Dest::Stdout => Some(tokio::io::stdout()),
        _ => None,
    };
    let rs = ctx.request_size as usize;
    let slots = Arc::new(tokio::sync::Semaphore::new(workers));
    let mut set = JoinSet::new();
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; rs];
        let mut n = 0;
        while n < rs {
            let r = input.read(&mut buf[n..]).await.map_err(stdin_err)?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if let Some(limit) = limit
            && offset + n as u64 > limit
        {
            set.abort_all();
            return Err(Error::Invalid(format!(
                "the input is larger than the destination ({limit} bytes)"
            )));
        }
        if let Some(out) = &mut out {
            out.write_all(&buf)
                .await
                .map_err(|e| io("cannot write", Path::new("<stdout>"), e))?;
            ctx.progress.add(n as u64);
        } else {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let ctx2 = ctx.clone();
            let at = offset;
            set.spawn(async move {
                let _permit = permit;
                let len = buf.len() as u64;
                if is_zero(&buf) {
                    ctx2.zero(at, len).await?;
                } else {
                    ctx2.data(at, buf).await?;
                }
                ctx2.progress.add(len);
                Ok(())
            });
            // Reap finished writes so errors surface early.
            while let Some(r) = set.try_join_next() {
                r.map_err(|e| Error::Invalid(format!("write task failed: {e}")))??;
            }
        }
        offset += n as u64;
    }
    join_all(set).await?;
    if let Some(mut out) = out {
        out.flush()
            .await
            .map_err(|e| io("cannot write", Path::new("<stdout>"), e))?;
    }
    Ok(offset)
}

async fn finish(ctx: &Ctx, flush: bool, total: u64) -> Result<()> {
    match &ctx.dst {
        Dest::File(f) => {
            if matches!(ctx.src, Source::Stdin) && !f.block_device {
                // The stream's length is the file's length (trailing zeroes
                // were skipped, not written).
                f.file
                    .set_len(total)
                    .map_err(|e| io("cannot resize", &f.path, e))?;
            }
            if flush {
                let file = f.file.clone();
                tokio::task::spawn_blocking(move || file.sync_all())
                    .await
                    .map_err(|e| Error::Invalid(format!("sync task failed: {e}")))?
                    .map_err(|e| io("cannot sync", &f.path, e))?;
            }
        }
        Dest::Nbd { client, uri } => {
            if flush && client.info().can_flush() {
                client.flush().await.map_err(nbd_err(uri))?;
            }
        }
        Dest::Repo(_) | Dest::Compare { .. } | Dest::Stdout | Dest::Null => {}
    }
    Ok(())
}

/// Marks the parts of `runs` (from `start`) that fall in slots the backup
/// already holds (a resumed run) as kept: they are not read again.
fn keep_done_slots(w: &PointWriter, start: u64, runs: &[(u64, Run)]) -> Vec<(u64, Run)> {
    let cs = w.chunk_size();
    let mut out: Vec<(u64, Run)> = Vec::with_capacity(runs.len());
    let mut pos = start;
    for &(len, run) in runs {
        let end = pos + len;
        while pos < end {
            let slot = pos / cs;
            let upto = ((slot + 1) * cs).min(end);
            let r = if w.slot_done(slot) { Run::Keep } else { run };
            match out.last_mut() {
                Some(last) if last.1 == r => last.0 += upto - pos,
                _ => out.push((upto - pos, r)),
            }
            pos = upto;
        }
    }
    out
}
