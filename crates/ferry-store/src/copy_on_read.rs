//! Copy-on-read: the layer of a disk that is still arriving (post-copy).
//!
//! The local device (a sparse file of the source's size) holds the blocks
//! that have arrived; the others are fetched from the source (a read-only
//! device, a remote NBD export in practice) when a reader needs them, or
//! by a background pass ([`CopyOnRead::claim`], [`Claim::land`]).
//!
//! Two maps, at the disk's granularity:
//! - `present` (durable, `hydrate/present.bits`): the local block holds
//!   its data durably. Set only after that data is synced;
//! - `current` (memory): the local block holds its data now, maybe not
//!   yet durably (a client wrote it and has not flushed). Reads, writes
//!   and fetches consult this one.
//!
//! The rules, whatever crashes:
//! - a block is marked present only after its data is durable: blocks
//!   the background pass fetched are written ([`Claim::land`]), and a
//!   sync for many of them ([`CopyOnRead::settle_landed`]) syncs the local
//!   file, makes their bits durable, and only then makes them current; a
//!   block a client wrote, or one fetched because a client read it, is
//!   current at once and becomes present at the next sync (a client's
//!   FLUSH or FUA write, or the pass's next one). A reader does not wait
//!   for a sync: until then a crash only fetches that block again;
//! - data a client wrote is never overwritten by a fetch: a fetch writes a
//!   block only under its stripe lock and only if it is not current, and a
//!   client write makes it current under the same lock. After a crash a
//!   block a client wrote but never flushed may be fetched again: the
//!   write was never promised to survive.
//!
//! Two readers of one absent block wait for one fetch (`fetching`).
//!
//! A source that can be awaited ([`AsyncRead`], a network source) lets a
//! server fetch a reader's absent blocks on its async runtime
//! ([`BlockDev::fetch_ahead`]) and then answer inline, with no thread
//! parked on the round trip. A reader that wants a few pages of a block
//! gets those pages fetched first and answered from memory (`staged`),
//! then the rest of the block follows in one request: its wait is one
//! small read at the source, not a whole block's (the block's request
//! carries the reader's pages again when there are bytes on both sides
//! and they are at most an eighth of it: a few KiB more on the wire cost
//! less than a second request).
//!
//! A write that covers whole blocks needs no fetch; a partial write into
//! an absent block fetches the rest first. TRIM and WRITE_ZEROES of whole
//! absent blocks need no fetch (a partial TRIM of an absent block is
//! skipped: trimming is advisory). Once every block is present the layer
//! is complete: everything passes straight through and the source is
//! never asked again.

use std::collections::{HashSet, VecDeque};
use std::ops::Deref;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ferry_block::{
    BASE_ALLOCATION, BlockDev, Error, Extent, Fetch, FileSpan, Layer, Result, ZeroMode, check_range,
};

use crate::bitmap::{self, AtomicBitmap};
use crate::durable_bitmap::{DurableBitmap, Rounding};
use crate::sync::GroupSync;

/// A present bit claims exactly one block: no rounding.
const EXACT: Rounding = Rounding {
    window: 1,
    max_ahead: 0,
};
const STRIPES: u64 = 1024;
/// A reader waits this long for another fetch of its blocks before it
/// looks again (and fetches itself if that fetch failed).
const WAIT_SLICE: Duration = Duration::from_millis(200);
/// The present map's file in the layer's directory.
pub const PRESENT_MAP: &str = "present.bits";
/// `base:allocation`: the range reads as zeroes.
const ZERO_FLAG: u32 = 0b10;
/// Blocks claimed at a time when a source's zeroes are recorded.
const ZERO_RECORD_BLOCKS: u64 = 256;
/// Most bytes a [`BlockDev::fetch_ahead`] fetches: it writes them from the
/// caller's async thread, which must not be held up long. Larger reads
/// take the blocking path.
const MAX_FETCH_AHEAD: u64 = 1 << 20;
/// Fetched data is written page by page, so zero pages stay holes.
const PAGE: usize = 4096;
const UNMAP: ZeroMode = ZeroMode {
    may_trim: true,
    fast: false,
    fua: false,
};

/// Reads of the source to await on an async runtime: `(offset, len,
/// waited)` to that many bytes; `waited`: a reader waits for them (else
/// they complete a block behind its reader, and must not delay the next
/// one). What a network source offers besides its blocking [`BlockDev`].
pub type AsyncRead = Arc<
    dyn Fn(u64, u64, bool) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<u8>>> + Send>>
        + Send
        + Sync,
>;

/// `len` bytes at `offset` from the source, exactly.
async fn read_exact(reads: &AsyncRead, offset: u64, len: u64, waited: bool) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let data = reads(offset, len, waited).await?;
    if data.len() as u64 != len {
        return Err(Error::Io(std::io::Error::other(format!(
            "the source sent {} bytes for a read of {len} at {offset}",
            data.len()
        ))));
    }
    Ok(data)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct CopyOnRead {
    local: Arc<dyn BlockDev>,
    source: Arc<dyn BlockDev>,
    size: u64,
    gran: u64,
    nblocks: u64,
    present: DurableBitmap,
    current: AtomicBitmap,
    /// Blocks of `current` count.
    current_count: AtomicU64,
    /// Blocks made current (written by a client, or fetched for a reader)
    /// that are not yet durably present.
    unsynced: Mutex<Vec<u64>>,
    /// Held through [`present_after`](CopyOnRead::present_after).
    presenting: Mutex<()>,
    /// Blocks being fetched (on demand or by the background pass).
    fetching: Mutex<HashSet<u64>>,
    fetched: Condvar,
    stripes: Box<[Mutex<()>]>,
    /// Group commit of the local device's data before bits are set.
    data_sync: GroupSync,
    complete: AtomicBool,
    /// Ranges clients asked to be cached (NBD_CMD_CACHE): fetched first.
    wanted: Mutex<VecDeque<(u64, u64)>>,
    /// Bytes read from the source because a client needed them.
    fetched_demand: AtomicU64,
    /// The source's awaitable reads, and the layer itself for the futures
    /// that use them ([`CopyOnRead::with_async_reads`]).
    async_reads: Option<(AsyncRead, Weak<CopyOnRead>)>,
    /// How long a reader waits for another fetch of its blocks (the
    /// source's timeout: a reader's wait is bounded by it, however long
    /// the fetch it waits for takes); None: as long as that fetch takes.
    wait_limit: Option<Duration>,
    /// Pages fetched for a reader ahead of the rest of their blocks, by
    /// offset, until those blocks are installed. Reads of blocks that are
    /// not current may be answered from them: the source is frozen, so
    /// they hold the blocks' bytes.
    staged: Mutex<Vec<(u64, Arc<[u8]>)>>,
}

/// Takes staged pages off when the fetch that staged them ends, however
/// it ends.
struct Unstage {
    cor: Arc<CopyOnRead>,
    offset: u64,
}

impl Drop for Unstage {
    fn drop(&mut self) {
        lock(&self.cor.staged).retain(|(o, _)| *o != self.offset);
    }
}

/// Blocks claimed for one fetch: nobody else fetches them meanwhile.
/// Dropping the claim releases what was not installed (a failed fetch),
/// and wakes whoever waits for those blocks. `C` is how it holds the
/// layer: a reference, or an `Arc` for a claim that crosses await points.
pub struct Claim<C: Deref<Target = CopyOnRead>> {
    cor: C,
    blocks: Vec<u64>,
}

impl<C: Deref<Target = CopyOnRead>> Claim<C> {
    /// The claimed blocks as runs `[a, b)`, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        bitmap::runs_of(&self.blocks)
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Writes fetched data for the claimed run starting at block `a`:
    /// `data` holds the run's `len` bytes, or None when the source reads
    /// zeroes there (the local range is then deallocated, not written).
    /// Blocks a client made current meanwhile are left as they are. The
    /// written blocks stay claimed and absent until
    /// [`CopyOnRead::settle_landed`] makes them durably present: a crash
    /// fetches them again, and nobody sees them here before they are
    /// durable.
    pub fn land(&mut self, a: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let cor: &CopyOnRead = &self.cor;
        cor.write_run(&mut self.blocks, a, len, data).map(drop)
    }
}

impl<C: Deref<Target = CopyOnRead>> Drop for Claim<C> {
    fn drop(&mut self) {
        self.cor.unclaim(&self.blocks);
    }
}

/// What the background pass and the status report see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HydrationProgress {
    pub present_bytes: u64,
    pub total_bytes: u64,
    /// Bytes read from the source because a client needed them.
    pub fetched_on_demand: u64,
}

impl CopyOnRead {
    /// The layer over `local` (sized like the source), with its present
    /// map in `dir` (created empty the first time).
    pub fn open(
        local: Arc<dyn BlockDev>,
        source: Arc<dyn BlockDev>,
        gran: u64,
        dir: &Path,
    ) -> std::io::Result<Self> {
        let size = local.size();
        if source.size() != size {
            return Err(std::io::Error::other(format!(
                "the source has {} bytes, the local image {size}",
                source.size()
            )));
        }
        let nblocks = size.div_ceil(gran);
        std::fs::create_dir_all(dir)?;
        let path = dir.join(PRESENT_MAP);
        let present = if path.exists() {
            DurableBitmap::open(&path, nblocks, EXACT)?
        } else {
            DurableBitmap::create(&path, nblocks, EXACT)?
        };
        let words = present.words();
        let count: u64 = (0..nblocks)
            .filter(|&b| bitmap::test_bit(&words, b))
            .count() as u64;
        Ok(CopyOnRead {
            local,
            source,
            size,
            gran,
            nblocks,
            present,
            current: AtomicBitmap::from_words(&words),
            current_count: AtomicU64::new(count),
            unsynced: Mutex::new(Vec::new()),
            presenting: Mutex::new(()),
            fetching: Mutex::new(HashSet::new()),
            fetched: Condvar::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            data_sync: GroupSync::default(),
            complete: AtomicBool::new(count == nblocks),
            wanted: Mutex::new(VecDeque::new()),
            fetched_demand: AtomicU64::new(0),
            async_reads: None,
            wait_limit: None,
            staged: Mutex::new(Vec::new()),
        })
    }

    /// A reader waits at most `limit` for blocks another fetch brings,
    /// then fails (EIO), as it would waiting for the source itself.
    pub fn with_wait_limit(mut self, limit: Duration) -> Self {
        self.wait_limit = Some(limit);
        self
    }

    /// The layer, able to fetch readers' blocks on an async runtime with
    /// `reads` (see [`BlockDev::fetch_ahead`]).
    pub fn with_async_reads(mut self, reads: AsyncRead) -> Arc<Self> {
        Arc::new_cyclic(|me| {
            self.async_reads = Some((reads, me.clone()));
            self
        })
    }

    pub fn granularity(&self) -> u64 {
        self.gran
    }

    /// Seeds the present map in `dir` of a disk of `size` bytes whose
    /// local image already holds everything but the byte ranges `absent`
    /// (a pre-copy mirror's target switched to post-copy): those blocks
    /// will be fetched, the rest is present. Refuses to replace a map.
    pub fn seed(dir: &Path, size: u64, gran: u64, absent: &[(u64, u64)]) -> std::io::Result<()> {
        let path = dir.join(PRESENT_MAP);
        if path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists: the disk is arriving already", path.display()),
            ));
        }
        let nblocks = size.div_ceil(gran);
        let mut gone: Vec<(u64, u64)> = absent
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|&(off, len)| {
                (
                    off / gran,
                    off.saturating_add(len).div_ceil(gran).min(nblocks),
                )
            })
            .collect();
        gone.sort_unstable();
        std::fs::create_dir_all(dir)?;
        let present = DurableBitmap::create(&path, nblocks, EXACT)?;
        let mut at = 0;
        for (a, b) in gone.into_iter().chain([(nblocks, nblocks)]) {
            if a > at {
                present.mark(at, a)?;
            }
            at = at.max(b);
        }
        Ok(())
    }

    /// Whether a disk of `size` bytes whose present map is in `dir` has
    /// arrived whole: it then needs neither its source nor this layer.
    pub fn arrived(dir: &Path, size: u64, gran: u64) -> std::io::Result<bool> {
        let path = dir.join(PRESENT_MAP);
        if !path.exists() {
            return Ok(false);
        }
        let nblocks = size.div_ceil(gran);
        let words = crate::durable_bitmap::read_bits(&path, nblocks)?;
        Ok((0..nblocks).all(|b| bitmap::test_bit(&words, b)))
    }

    /// Every block is present: the source is not needed any more.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Makes every block a client wrote durably present; true when every
    /// block is then durably present (the disk no longer needs its
    /// source, after a restart too).
    pub fn settle(&self) -> Result<bool> {
        Layer::flush(self)?;
        let words = self.present.words();
        Ok((0..self.nblocks).all(|b| bitmap::test_bit(&words, b)))
    }

    pub fn progress(&self) -> HydrationProgress {
        let count = self.current_count.load(Ordering::Acquire);
        let last = self.nblocks - 1;
        let short = if self.current.get(last) {
            self.gran - self.block_len(last)
        } else {
            0
        };
        HydrationProgress {
            present_bytes: count * self.gran - short,
            total_bytes: self.size,
            fetched_on_demand: self.fetched_demand.load(Ordering::Relaxed),
        }
    }

    fn blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / self.gran, (offset + len).div_ceil(self.gran))
    }

    /// Bytes of block `b` (the last one may be short).
    fn block_len(&self, b: u64) -> u64 {
        self.gran.min(self.size - b * self.gran)
    }

    /// Counts each block once, whoever sets it (a client's write and an
    /// install may race for the same block): an over-count would call the
    /// disk complete while a block is still absent.
    fn set_current(&self, b: u64) {
        if !self.current.test_and_set(b)
            && self.current_count.fetch_add(1, Ordering::AcqRel) + 1 == self.nblocks
        {
            self.complete.store(true, Ordering::Release);
            tracing::info!("every block has arrived: hydration complete");
        }
    }

    // ---- fetching ------------------------------------------------------

    /// Claims the blocks of `[a, b)` that are absent and that nobody is
    /// fetching.
    pub fn claim(&self, a: u64, b: u64) -> Claim<&Self> {
        let blocks = self.claim_blocks(a, b);
        Claim { cor: self, blocks }
    }

    /// [`claim`](Self::claim), holding the layer by `Arc`.
    pub fn claim_owned(self: &Arc<Self>, a: u64, b: u64) -> Claim<Arc<Self>> {
        let blocks = self.claim_blocks(a, b);
        Claim {
            cor: self.clone(),
            blocks,
        }
    }

    fn claim_blocks(&self, a: u64, b: u64) -> Vec<u64> {
        let mut f = lock(&self.fetching);
        (a..b.min(self.nblocks))
            .filter(|&blk| !self.current.get(blk) && f.insert(blk))
            .collect()
    }

    /// Whether every block of `[a, b)` is claimed by a fetch (landed and
    /// waiting for its sync, or being fetched for a reader).
    pub fn being_fetched(&self, a: u64, b: u64) -> bool {
        let f = lock(&self.fetching);
        (a..b).all(|blk| f.contains(&blk))
    }

    /// The first run of absent blocks at or after block `from`, at most
    /// `max` long (None: nothing absent from there on).
    pub fn next_absent(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut a = from;
        while a < self.nblocks && self.current.get(a) {
            a += 1;
        }
        if a >= self.nblocks {
            return None;
        }
        let mut b = a + 1;
        while b < self.nblocks && b - a < max && !self.current.get(b) {
            b += 1;
        }
        Some((a, b))
    }

    /// A range a client asked to have cached, to fetch first.
    pub fn take_wanted(&self) -> Option<(u64, u64)> {
        lock(&self.wanted).pop_front()
    }

    /// Writes what `claimed` still holds of the run at block `a` (fetched
    /// for a reader, or zeroes the source reported), makes it current, and
    /// takes it off `claimed`; durably present at the next sync.
    fn install(&self, claimed: &mut Vec<u64>, a: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let done = self.write_run(claimed, a, len, data)?;
        // Queued before a client can see it current: a client's write to
        // it, then its FLUSH, must make it present.
        lock(&self.unsynced).extend_from_slice(&done);
        for &blk in &done {
            self.set_current(blk);
        }
        self.release(claimed, &done);
        Ok(())
    }

    /// Makes the blocks the claims landed durably present (one sync for
    /// all of them, which covers what clients wrote before it too), then
    /// current, then lets the claims go. On failure they stay absent.
    pub fn settle_landed<C: Deref<Target = CopyOnRead>>(
        &self,
        claims: Vec<Claim<C>>,
    ) -> Result<()> {
        let blocks: Vec<u64> = claims
            .iter()
            .flat_map(|c| c.blocks.iter().copied())
            .collect();
        self.make_present(&blocks)?;
        for &blk in &blocks {
            self.set_current(blk);
        }
        // Dropping the claims lets whoever waits for these blocks go on.
        drop(claims);
        Ok(())
    }

    /// Takes `blocks` off `claimed` and off the blocks being fetched, and
    /// wakes whoever waits for them.
    fn release(&self, claimed: &mut Vec<u64>, blocks: &[u64]) {
        // Both in ascending order, as claimed: a search, not a scan (a
        // claim of a long zero run holds thousands of blocks).
        claimed.retain(|x| blocks.binary_search(x).is_err());
        self.unclaim(blocks);
    }

    /// Nobody fetches `blocks` any more: whoever waits for them looks
    /// again.
    fn unclaim(&self, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let mut f = lock(&self.fetching);
        for b in blocks {
            f.remove(b);
        }
        drop(f);
        self.fetched.notify_all();
    }

    /// Writes the blocks of the run at block `a` that `claimed` holds,
    /// and returns them (still claimed, not current). Blocks a client made
    /// current meanwhile are not written and are taken off `claimed`.
    fn write_run(
        &self,
        claimed: &mut Vec<u64>,
        a: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<Vec<u64>> {
        let b = (a * self.gran + len).div_ceil(self.gran).min(self.nblocks);
        let ours: Vec<u64> = (a..b)
            .filter(|blk| claimed.binary_search(blk).is_ok())
            .collect();
        // One write (or one hole) per run of blocks, not per block: a
        // 1 MiB fetch of 64 KiB blocks took 16 writes, each taking the
        // file's lock, and the source's holes as many fallocate calls.
        let (done, theirs): (Vec<u64>, Vec<u64>) = self.change_whole(&ours, || {
            let (theirs, done): (Vec<u64>, Vec<u64>) =
                ours.iter().partition(|&&blk| self.current.get(blk));
            for (ra, rb) in bitmap::runs_of(&done) {
                let (off, n) = self.run_span(ra, rb);
                match data {
                    Some(d) => {
                        let i = ((ra - a) * self.gran) as usize;
                        self.write_sparse(&d[i..i + n as usize], off)?;
                    }
                    None => self.local.write_zeroes(off, n, UNMAP)?,
                }
            }
            Ok((done, theirs))
        })?;
        self.release(claimed, &theirs);
        Ok(done)
    }

    /// Writes `data` at `off`, its all-zero pages as holes: the local file
    /// stays as sparse as the source, and a page some earlier, unflushed
    /// write left there is zeroed all the same.
    fn write_sparse(&self, data: &[u8], off: u64) -> Result<()> {
        let mut i = 0;
        while i < data.len() {
            let zero = |p: usize| data[p..(p + PAGE).min(data.len())].iter().all(|&x| x == 0);
            let kind = zero(i);
            let mut j = (i + PAGE).min(data.len());
            while j < data.len() && zero(j) == kind {
                j = (j + PAGE).min(data.len());
            }
            let at = off + i as u64;
            if kind {
                self.local.write_zeroes(at, (j - i) as u64, UNMAP)?;
            } else {
                self.local.write_at(&data[i..j], at, false)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Syncs the local data (group commit), then makes `blocks`' present
    /// bits durable.
    fn make_present(&self, blocks: &[u64]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.present_after(blocks, || {
            self.data_sync
                .sync(|| {
                    self.local
                        .flush()
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .map_err(Error::from)
        })
    }

    /// Runs `sync` (which makes the local data durable), then makes
    /// durable the present bits of `blocks` and of every block made
    /// current before it ran: the sync covered their data too.
    ///
    /// One at a time: a FLUSH that ran while another call held blocks it
    /// had taken, but not yet marked, would answer before those blocks
    /// (maybe a client's) are present, and a crash would fetch them over
    /// flushed data.
    fn present_after(&self, blocks: &[u64], sync: impl FnOnce() -> Result<()>) -> Result<()> {
        let _alone = lock(&self.presenting);
        let taken = std::mem::take(&mut *lock(&self.unsynced));
        let marked = sync().and_then(|()| {
            let mut covered = [&taken[..], blocks].concat();
            covered.sort_unstable();
            covered.dedup();
            self.present
                .mark_runs(&bitmap::runs_of(&covered))
                .map_err(Error::from)
        });
        if marked.is_err() {
            // Marked by the next sync that succeeds.
            lock(&self.unsynced).extend(taken);
        }
        marked
    }

    /// Makes blocks `[a, b)` current: fetches those nobody is fetching,
    /// waits for the others.
    fn ensure(&self, a: u64, b: u64) -> Result<()> {
        let deadline = self.wait_limit.map(|d| Instant::now() + d);
        loop {
            if (a..b).all(|blk| self.current.get(blk)) {
                return Ok(());
            }
            // Past it, a fetch of our own would wait for the source again.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "another fetch of these blocks from the source did not end in time",
                )
                .into());
            }
            let mut claim = self.claim(a, b);
            for (ra, rb) in claim.runs() {
                let (off, len) = self.run_span(ra, rb);
                let mut buf = vec![0u8; len as usize];
                self.source.read_at(&mut buf, off)?;
                self.install_for_reader(&mut claim.blocks, ra, &buf)?;
            }
            drop(claim);
            // Others are fetching the rest: wait for them, then look again
            // (their fetch may have failed, and this one then tries).
            let f = lock(&self.fetching);
            if (a..b).any(|blk| f.contains(&blk)) {
                let slice = deadline.map_or(WAIT_SLICE, |d| {
                    d.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
                });
                drop(self.fetched.wait_timeout(f, slice));
            }
        }
    }

    /// Byte offset and length of the blocks `[a, b)`.
    fn run_span(&self, a: u64, b: u64) -> (u64, u64) {
        let off = a * self.gran;
        (off, (b * self.gran).min(self.size) - off)
    }

    /// Installs a run fetched because a client reads it: current at once,
    /// durably present at the next sync (the reader waits for none; a
    /// crash only fetches it again).
    fn install_for_reader(&self, claimed: &mut Vec<u64>, a: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.fetched_demand.fetch_add(len, Ordering::Relaxed);
        let zero = data.iter().all(|&x| x == 0);
        self.install(claimed, a, len, (!zero).then_some(data))
    }

    /// Fetches the claimed blocks with the source's awaitable reads;
    /// `have` is a piece of them fetched already (at its offset).
    async fn fetch_claimed(
        mut claim: Claim<Arc<Self>>,
        reads: AsyncRead,
        have: Option<(u64, Arc<[u8]>)>,
    ) -> Result<()> {
        for (ra, rb) in claim.runs() {
            let (off, len) = claim.cor.run_span(ra, rb);
            let end = off + len;
            let data = match &have {
                // Bytes on both sides of a part small against its run:
                // one request for the whole run costs the source and this
                // side less than two (the part crosses again). The reader
                // saw `part`: it stays.
                Some((h0, part))
                    if *h0 > off
                        && h0 + (part.len() as u64) < end
                        && part.len() as u64 <= len / 8 =>
                {
                    let mut data = read_exact(&reads, off, len, false).await?;
                    data[(h0 - off) as usize..][..part.len()].copy_from_slice(part);
                    data
                }
                // Otherwise around the part (no request for an empty side).
                Some((h0, part)) if *h0 >= off && h0 + part.len() as u64 <= end => {
                    let h1 = h0 + part.len() as u64;
                    let before = read_exact(&reads, off, h0 - off, false).await?;
                    let after = read_exact(&reads, h1, end - h1, false).await?;
                    [&before[..], part, &after[..]].concat()
                }
                _ => read_exact(&reads, off, len, true).await?,
            };
            // The file write lands in the page cache: it blocks the caller
            // only when writeback throttles this process, which then
            // holds up the background pass's writes as much.
            claim.cor.install_for_reader(&mut claim.blocks, ra, &data)?;
        }
        Ok(())
    }

    /// The page-aligned part of `[offset, offset+len)` to fetch before the
    /// rest of the claimed blocks: when they are one run, and the part is
    /// smaller than it.
    fn first_part(&self, runs: &[(u64, u64)], offset: u64, len: u64) -> Option<(u64, u64)> {
        let [(ra, rb)] = runs else { return None };
        let (roff, rlen) = self.run_span(*ra, *rb);
        let p0 = (offset - offset % PAGE as u64).max(roff);
        let p1 = (offset + len)
            .next_multiple_of(PAGE as u64)
            .min(roff + rlen);
        (p0 <= offset && p1 >= offset + len && p1 - p0 < rlen).then_some((p0, p1 - p0))
    }

    /// Answers a read from staged pages if they hold all of it and none
    /// of its blocks is current: a client's whole-block write makes a
    /// block current without waiting for its fetch, and a read after that
    /// write must see it.
    fn read_staged(&self, buf: &mut [u8], offset: u64) -> bool {
        let end = offset + buf.len() as u64;
        let (a, b) = self.blocks(offset, buf.len() as u64);
        if (a..b).any(|blk| self.current.get(blk)) {
            return false;
        }
        let staged = lock(&self.staged);
        let Some((o, data)) = staged
            .iter()
            .find(|(o, data)| *o <= offset && end <= o + data.len() as u64)
        else {
            return false;
        };
        buf.copy_from_slice(&data[(offset - o) as usize..][..buf.len()]);
        true
    }

    /// For a write of `[offset, offset+len)`: fetches the blocks it covers
    /// only in part, and returns the blocks it covers whole that are not
    /// current (the write makes them current).
    fn prepare_change(&self, offset: u64, len: u64) -> Result<Vec<u64>> {
        let (a, b) = self.blocks(offset, len);
        let end = offset + len;
        let whole =
            |blk: u64| blk * self.gran >= offset && (blk * self.gran + self.block_len(blk)) <= end;
        for blk in [a, b - 1] {
            if !whole(blk) && !self.current.get(blk) {
                self.ensure(blk, blk + 1)?;
            }
        }
        Ok((a..b).filter(|&blk| !self.current.get(blk)).collect())
    }

    /// Records that a client changed `blocks` (whole, formerly absent):
    /// current now, durably present at the next flush (at once with FUA).
    fn changed(&self, blocks: &[u64], fua: bool) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        for &blk in blocks {
            self.set_current(blk);
        }
        if fua {
            return self.make_present(blocks);
        }
        lock(&self.unsynced).extend_from_slice(blocks);
        Ok(())
    }

    /// The source says `[offset, offset+len)` reads as zeroes: its whole
    /// absent blocks become current as local holes, without a fetch (and
    /// present at the next sync). Otherwise every read there would ask the
    /// source's block status again, since the server answers holes from it.
    /// Best effort: a failure leaves the blocks absent.
    fn record_zeroes(&self, offset: u64, len: u64) {
        let a = offset.div_ceil(self.gran);
        let end = offset + len;
        let b = if end == self.size {
            self.nblocks
        } else {
            end / self.gran
        };
        let mut blk = a;
        while blk < b {
            let stop = (blk + ZERO_RECORD_BLOCKS).min(b);
            let mut claim = self.claim(blk, stop);
            for (ra, rb) in claim.runs() {
                let (off, n) = self.run_span(ra, rb);
                if let Err(e) = self.install(&mut claim.blocks, ra, n, None) {
                    tracing::debug!("recording zeroes at {off}: {e}");
                    return;
                }
            }
            blk = stop;
        }
    }

    /// Whether every block of `[offset, offset+len)` is current here (a
    /// range past the end is not).
    fn all_here(&self, offset: u64, len: u64) -> bool {
        if self.is_complete() || len == 0 {
            return true;
        }
        if check_range(self.size, offset, len).is_err() {
            return false;
        }
        let (a, b) = self.blocks(offset, len);
        self.current.all_set(a, b)
    }

    /// Runs `op` under the stripe locks of `blocks`, taken in order: a
    /// client's change of whole absent blocks and a fetch's write of them
    /// never interleave.
    fn change_whole<T>(&self, blocks: &[u64], op: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut stripes: Vec<usize> = blocks.iter().map(|&b| (b % STRIPES) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> = stripes.iter().map(|&i| lock(&self.stripes[i])).collect();
        op()
    }
}

impl Layer for CopyOnRead {
    fn next(&self) -> &dyn BlockDev {
        &*self.local
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if !self.is_complete() && !buf.is_empty() {
            check_range(self.size, offset, buf.len() as u64)?;
            let (a, b) = self.blocks(offset, buf.len() as u64);
            self.ensure(a, b)?;
        }
        self.local.read_at(buf, offset)
    }

    /// The absent blocks of the range that nobody is fetching yet, fetched
    /// by a future; blocks another fetch has claimed are left to the
    /// blocking read, which waits for that fetch.
    fn fetch_ahead(&self, offset: u64, len: u64) -> Option<Fetch> {
        let (reads, me) = self.async_reads.as_ref()?;
        if self.all_here(offset, len) || check_range(self.size, offset, len).is_err() {
            return None;
        }
        let (a, b) = self.blocks(offset, len);
        if (b - a) * self.gran > MAX_FETCH_AHEAD {
            return None;
        }
        let me = me.upgrade()?;
        let claim = me.claim_owned(a, b);
        if claim.is_empty() {
            return None;
        }
        let first = self.first_part(&claim.runs(), offset, len);
        let reads = reads.clone();
        Some(Fetch(Box::pin(async move {
            let Some((p0, plen)) = first else {
                Self::fetch_claimed(claim, reads, None).await?;
                return Ok(None);
            };
            let part: Arc<[u8]> = read_exact(&reads, p0, plen, true).await?.into();
            lock(&me.staged).push((p0, part.clone()));
            let unstage = Unstage {
                cor: me,
                offset: p0,
            };
            Ok(Some(Fetch(Box::pin(async move {
                // Unstaged once the blocks are current (or released).
                let _unstage = unstage;
                Self::fetch_claimed(claim, reads, Some((p0, part))).await?;
                Ok(None)
            }))))
        })))
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        if !self.all_here(offset, buf.len() as u64) {
            check_range(self.size, offset, buf.len() as u64)?;
            return Ok(self.read_staged(buf, offset));
        }
        self.local.read_at_nowait(buf, offset)
    }

    /// Only blocks that are here may be sent from the local file: the
    /// bytes of absent ones are still at the source.
    fn file_span(&self, offset: u64, len: u64) -> Option<FileSpan> {
        self.all_here(offset, len)
            .then(|| self.local.file_span(offset, len))
            .flatten()
    }

    /// Absent blocks' allocation is the source's to tell, a round trip
    /// away: while any block of the range is absent, it is all data here.
    fn local_allocation(&self, offset: u64, len: u64, max: usize) -> Option<Vec<Extent>> {
        self.all_here(offset, len)
            .then(|| self.local.local_allocation(offset, len, max))
            .flatten()
    }

    fn read_vectored_at(&self, bufs: &mut [std::io::IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if !self.is_complete() && len > 0 {
            check_range(self.size, offset, len)?;
            let (a, b) = self.blocks(offset, len);
            self.ensure(a, b)?;
        }
        self.local.read_vectored_at(bufs, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if self.is_complete() || buf.is_empty() {
            return self.local.write_at(buf, offset, fua);
        }
        check_range(self.size, offset, buf.len() as u64)?;
        let fresh = self.prepare_change(offset, buf.len() as u64)?;
        self.change_whole(&fresh, || {
            self.local.write_at(buf, offset, fua)?;
            self.changed(&fresh, fua)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        if self.is_complete() || len == 0 {
            return self.local.write_zeroes(offset, len, mode);
        }
        check_range(self.size, offset, len)?;
        let fresh = self.prepare_change(offset, len)?;
        self.change_whole(&fresh, || {
            self.local.write_zeroes(offset, len, mode)?;
            self.changed(&fresh, mode.fua)
        })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        if self.is_complete() || len == 0 {
            return self.local.trim(offset, len, fua);
        }
        check_range(self.size, offset, len)?;
        // Only whole blocks: a partial trim of an absent block is skipped
        // (trim is advisory), so it never needs a fetch.
        let (a, b) = (
            offset.div_ceil(self.gran),
            ((offset + len) / self.gran).min(self.nblocks),
        );
        let b = if offset + len == self.size {
            self.nblocks
        } else {
            b
        };
        if a >= b {
            return Ok(());
        }
        let (start, end) = (a * self.gran, (b * self.gran).min(self.size));
        let fresh: Vec<u64> = (a..b).filter(|&blk| !self.current.get(blk)).collect();
        self.change_whole(&fresh, || {
            self.local.trim(start, end - start, fua)?;
            self.changed(&fresh, fua)
        })
    }

    /// Makes what clients wrote (and reads fetched) durable, then their
    /// blocks present.
    fn flush(&self) -> Result<()> {
        self.present_after(&[], || self.local.flush())
    }

    /// A client's prefetch hint: these blocks are fetched first.
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, offset, len)?;
        if !self.is_complete() && len > 0 {
            let (a, b) = self.blocks(offset, len);
            lock(&self.wanted).push_back((a, b));
        }
        Ok(())
    }

    /// Present blocks as the local device says; absent ones as the source
    /// says (or as data, the safe answer, if it cannot).
    fn extents(&self, context: &str, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>> {
        if context != BASE_ALLOCATION || self.is_complete() {
            return self.local.extents(context, offset, len, max);
        }
        check_range(self.size, offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end && out.len() < max.max(1) {
            let blk = pos / self.gran;
            let here = self.current.get(blk);
            let mut stop = ((blk + 1) * self.gran).min(end);
            while stop < end && self.current.get(stop / self.gran) == here {
                stop = ((stop / self.gran + 1) * self.gran).min(end);
            }
            let dev: &dyn BlockDev = if here { &*self.local } else { &*self.source };
            let part = dev
                .extents(BASE_ALLOCATION, pos, stop - pos, max)
                .unwrap_or_else(|_| {
                    vec![Extent {
                        length: stop - pos,
                        flags: 0,
                    }]
                });
            let mut covered = pos;
            for e in part {
                let length = e.length.min(stop - covered);
                if length == 0 {
                    break;
                }
                if !here && e.flags & ZERO_FLAG != 0 {
                    self.record_zeroes(covered, length);
                }
                match out.last_mut() {
                    Some(last) if last.flags == e.flags => last.length += length,
                    _ => out.push(Extent {
                        length,
                        flags: e.flags,
                    }),
                }
                covered += length;
            }
            if covered < stop {
                // The answer stopped short: the rest of this run is unknown
                // here, so this is as far as the reply goes.
                break;
            }
            pos = stop;
        }
        if out.is_empty() {
            return Err(Error::Io(std::io::Error::other("no extents")));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_block::MemDev;

    const GRAN: u64 = 4096;
    const SIZE: u64 = 64 * GRAN + 1000;

    /// A source that counts the bytes read from it and the block-status
    /// questions it is asked, and can be slowed down.
    struct Counted {
        next: Arc<MemDev>,
        read: AtomicU64,
        asked: AtomicU64,
        delay: Duration,
    }

    impl Layer for Counted {
        fn next(&self) -> &dyn BlockDev {
            &*self.next
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            std::thread::sleep(self.delay);
            self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
            self.next.read_at(buf, offset)
        }
        fn extents(&self, context: &str, off: u64, len: u64, max: usize) -> Result<Vec<Extent>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            self.next.extents(context, off, len, max)
        }
    }

    fn source_data() -> Vec<u8> {
        (0..SIZE as usize)
            .map(|i| (i / 4096) as u8 ^ 0x5a)
            .collect()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        local: Arc<MemDev>,
        source: Arc<Counted>,
    }

    fn fixture(delay: Duration) -> Fixture {
        let mut data = source_data();
        // Blocks 40..48 are zeroes at the source, and a hole.
        data[(40 * GRAN) as usize..(48 * GRAN) as usize].fill(0);
        let src = MemDev::with_data(data);
        src.trim(40 * GRAN, 8 * GRAN, false).unwrap();
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            local: Arc::new(MemDev::new(SIZE)),
            source: Arc::new(Counted {
                next: Arc::new(src),
                read: AtomicU64::new(0),
                asked: AtomicU64::new(0),
                delay,
            }),
        }
    }

    impl Fixture {
        fn open(&self) -> CopyOnRead {
            CopyOnRead::open(
                self.local.clone(),
                self.source.clone(),
                GRAN,
                self.dir.path(),
            )
            .unwrap()
        }
        fn read_from_source(&self) -> u64 {
            self.source.read.load(Ordering::SeqCst)
        }
    }

    fn read(dev: &dyn BlockDev, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        dev.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn a_seeded_map_leaves_exactly_the_absent_blocks_to_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let nblocks = SIZE.div_ceil(GRAN);
        let absent = [(3 * GRAN + 10, 5), (10 * GRAN, 2 * GRAN), (SIZE - 1, 1)];
        CopyOnRead::seed(dir.path(), SIZE, GRAN, &absent).unwrap();
        let words =
            crate::durable_bitmap::read_bits(&dir.path().join(PRESENT_MAP), nblocks).unwrap();
        let missing: Vec<u64> = (0..nblocks)
            .filter(|&b| !bitmap::test_bit(&words, b))
            .collect();
        assert_eq!(missing, vec![3, 10, 11, nblocks - 1]);
        let again = CopyOnRead::seed(dir.path(), SIZE, GRAN, &[]);
        assert!(again.is_err(), "a second seed replaced the map");
    }

    #[test]
    fn splitting_a_read_reply_never_asks_the_source() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        let absent = BlockDev::local_allocation(&cor, 0, 8 * GRAN, 64);
        assert_eq!(absent, None, "absent blocks count as data");
        read(&cor, 0, 8 * GRAN as usize);
        let here = BlockDev::local_allocation(&cor, 0, 8 * GRAN, 64).expect("known once here");
        assert_eq!(here.iter().map(|e| e.length).sum::<u64>(), 8 * GRAN);
        assert_eq!(f.source.asked.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn reads_fetch_whole_blocks_once_and_store_them() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        let want = source_data();
        assert_eq!(read(&cor, 100, 5000), want[100..5100]);
        assert_eq!(f.read_from_source(), 2 * GRAN, "blocks 0 and 1, whole");
        assert_eq!(read(&cor, 0, 8192), want[..8192]);
        assert_eq!(f.read_from_source(), 2 * GRAN, "present blocks are local");
        assert_eq!(f.local.contents()[..8192], want[..8192]);
        // The short last block.
        assert_eq!(read(&cor, SIZE - 10, 10), want[(SIZE - 10) as usize..]);
        assert_eq!(cor.progress().present_bytes, 2 * GRAN + 1000);
        let mut b = vec![0u8; 10];
        assert!(
            !BlockDev::read_at_nowait(&cor, &mut b, 20 * GRAN).unwrap(),
            "absent: not inline"
        );
        assert!(BlockDev::read_at_nowait(&cor, &mut b, 0).unwrap());
    }

    /// Polls `fut` once with a waker that does nothing.
    fn poll_once(fut: &mut Fetch) -> std::task::Poll<Result<Option<Fetch>>> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(fut).poll(&mut cx)
    }

    impl Fixture {
        /// The layer with awaitable reads of the source that finish only
        /// once `gate` is open.
        fn open_async(&self, gate: Arc<AtomicBool>) -> Arc<CopyOnRead> {
            self.open_async_at(gate, GRAN)
        }

        fn open_async_at(&self, gate: Arc<AtomicBool>, gran: u64) -> Arc<CopyOnRead> {
            let local = self.local.clone();
            CopyOnRead::open(local, self.source.clone(), gran, self.dir.path())
                .unwrap()
                .with_async_reads(self.gated_reads(gate))
        }

        /// Awaitable reads of the source that finish only once `gate` is
        /// open.
        fn gated_reads(&self, gate: Arc<AtomicBool>) -> AsyncRead {
            let source = self.source.clone();
            Arc::new(move |off, len, _| {
                let (source, gate) = (source.clone(), gate.clone());
                Box::pin(std::future::poll_fn(move |_| {
                    if !gate.load(Ordering::SeqCst) {
                        return std::task::Poll::Pending;
                    }
                    let mut buf = vec![0u8; len as usize];
                    let r =
                        BlockDev::read_at(&*source, &mut buf, off).map_err(std::io::Error::other);
                    std::task::Poll::Ready(r.map(|()| buf))
                }))
            })
        }
    }

    #[test]
    fn a_fetch_ahead_brings_a_readers_blocks_once() {
        let f = fixture(Duration::ZERO);
        let cor = f.open_async(Arc::new(AtomicBool::new(true)));
        let want = source_data();
        let mut fetch = BlockDev::fetch_ahead(&*cor, GRAN + 100, GRAN).expect("absent");
        assert!(
            BlockDev::fetch_ahead(&*cor, GRAN, 10).is_none(),
            "a second fetch of claimed blocks"
        );
        assert!(matches!(
            poll_once(&mut fetch),
            std::task::Poll::Ready(Ok(None))
        ));
        assert_eq!(f.read_from_source(), 2 * GRAN, "blocks 1 and 2, whole");
        assert!(
            BlockDev::fetch_ahead(&*cor, GRAN, 2 * GRAN).is_none(),
            "here now"
        );
        let mut b = vec![0u8; GRAN as usize];
        assert!(BlockDev::read_at_nowait(&*cor, &mut b, GRAN + 100).unwrap());
        assert_eq!(b, want[(GRAN + 100) as usize..][..GRAN as usize]);
        assert_eq!(f.read_from_source(), 2 * GRAN);
        assert_eq!(cor.progress().fetched_on_demand, 2 * GRAN);
    }

    #[test]
    fn a_reader_waits_for_another_fetch_no_longer_than_its_limit() {
        let f = fixture(Duration::ZERO);
        let gate = Arc::new(AtomicBool::new(false));
        let limit = Duration::from_millis(300);
        let cor = CopyOnRead::open(f.local.clone(), f.source.clone(), GRAN, f.dir.path())
            .unwrap()
            .with_wait_limit(limit)
            .with_async_reads(f.gated_reads(gate));
        // A fetch that claimed block 3 and never ends (its source is stuck).
        let _stuck = BlockDev::fetch_ahead(&*cor, 3 * GRAN, GRAN).expect("absent");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = cor.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut b = vec![0u8; 10];
            let r = BlockDev::read_at(&*reader, &mut b, 3 * GRAN + 5);
            let _ = tx.send((r.map_err(|e| e.to_string()), t.elapsed()));
        });
        let (r, waited) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader still waits, past its limit");
        let e = r.expect_err("blocks another fetch holds cannot be read");
        assert!(e.contains("did not end in time"), "{e}");
        assert!(waited >= limit, "gave up after {waited:?}");
        assert_eq!(f.read_from_source(), 0);
    }

    #[test]
    fn a_small_first_read_is_answered_before_the_rest_of_its_block() {
        // The rest of a 4-page block comes in two requests around the page
        // (each byte once); of a 16-page block in one, the page again.
        // Block 1 either way: data at the source (blocks 40..48 are not).
        for (pages, rest_crosses) in [(4, 4 * GRAN - PAGE as u64), (16, 16 * GRAN)] {
            let f = fixture(Duration::ZERO);
            let big = pages * GRAN;
            let cor = f.open_async_at(Arc::new(AtomicBool::new(true)), big);
            let want = source_data();
            let off = big + PAGE as u64 + 10;
            let mut fetch = BlockDev::fetch_ahead(&*cor, off, 100).expect("absent");
            let std::task::Poll::Ready(Ok(Some(mut rest))) = poll_once(&mut fetch) else {
                panic!("the reader's page first, the rest of its block after");
            };
            assert_eq!(f.read_from_source(), PAGE as u64, "the reader's page alone");
            let mut b = vec![0u8; 100];
            assert!(BlockDev::read_at_nowait(&*cor, &mut b, off).unwrap());
            assert_eq!(b, want[off as usize..][..100]);
            assert!(
                !BlockDev::read_at_nowait(&*cor, &mut b, big).unwrap(),
                "outside the page: not yet here"
            );
            assert!(matches!(
                poll_once(&mut rest),
                std::task::Poll::Ready(Ok(None))
            ));
            assert_eq!(
                f.read_from_source(),
                PAGE as u64 + rest_crosses,
                "{pages}-page block"
            );
            assert!(lock(&cor.staged).is_empty());
            let mut whole = vec![0u8; big as usize];
            assert!(BlockDev::read_at_nowait(&*cor, &mut whole, big).unwrap());
            assert_eq!(whole, want[big as usize..][..big as usize]);
            assert_eq!(f.local.contents()[big as usize..][..big as usize], whole);
        }
    }

    #[test]
    fn staged_pages_are_not_served_over_a_later_whole_block_write() {
        let f = fixture(Duration::ZERO);
        let big = 4 * GRAN;
        let cor = f.open_async_at(Arc::new(AtomicBool::new(true)), big);
        // Pages across the boundary of blocks 1 and 2 are staged.
        let off = 2 * big - 100;
        let mut fetch = BlockDev::fetch_ahead(&*cor, off, 200).expect("absent");
        let std::task::Poll::Ready(Ok(Some(mut rest))) = poll_once(&mut fetch) else {
            panic!("the reader's pages first");
        };
        // A whole-block write needs no fetch: block 2 is the client's now.
        BlockDev::write_at(&*cor, &vec![7u8; big as usize], 2 * big, false).unwrap();
        let mut b = vec![0u8; 200];
        if BlockDev::read_at_nowait(&*cor, &mut b, off).unwrap() {
            assert_eq!(b[100..], [7u8; 100], "staged source bytes over the write");
        }
        assert!(matches!(
            poll_once(&mut rest),
            std::task::Poll::Ready(Ok(None))
        ));
        let got = read(&*cor, off, 200);
        assert_eq!(got[..100], source_data()[off as usize..][..100]);
        assert_eq!(got[100..], [7u8; 100]);
    }

    #[test]
    fn a_write_during_a_fetch_ahead_is_not_overwritten_by_it() {
        let f = fixture(Duration::ZERO);
        let gate = Arc::new(AtomicBool::new(false));
        let cor = f.open_async(gate.clone());
        let mut fetch = BlockDev::fetch_ahead(&*cor, 5 * GRAN, 2 * GRAN).expect("absent");
        assert!(poll_once(&mut fetch).is_pending());
        // A whole-block write needs no fetch and does not wait for this one.
        BlockDev::write_at(&*cor, &vec![7u8; GRAN as usize], 6 * GRAN, false).unwrap();
        gate.store(true, Ordering::SeqCst);
        assert!(poll_once(&mut fetch).is_ready());
        assert_eq!(
            read(&*cor, 6 * GRAN, GRAN as usize),
            vec![7u8; GRAN as usize]
        );
        assert_eq!(
            read(&*cor, 5 * GRAN, GRAN as usize),
            source_data()[(5 * GRAN) as usize..][..GRAN as usize]
        );
    }

    #[test]
    fn two_readers_of_one_block_wait_for_one_fetch() {
        let f = fixture(Duration::from_millis(100));
        let cor = Arc::new(f.open());
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let cor = cor.clone();
                std::thread::spawn(move || read(&*cor, 10 * GRAN, 100))
            })
            .collect();
        for r in readers {
            assert_eq!(
                r.join().unwrap(),
                source_data()[(10 * GRAN) as usize..][..100]
            );
        }
        assert_eq!(f.read_from_source(), GRAN);
    }

    #[test]
    fn writes_fetch_only_what_they_do_not_cover() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        // Whole blocks: no fetch.
        BlockDev::write_at(&cor, &vec![1u8; 2 * GRAN as usize], 4 * GRAN, false).unwrap();
        assert_eq!(f.read_from_source(), 0);
        // Partial: the rest of the block comes from the source first.
        BlockDev::write_at(&cor, &[2u8; 10], 8 * GRAN + 5, false).unwrap();
        assert_eq!(f.read_from_source(), GRAN);
        let want = source_data();
        let got = read(&cor, 8 * GRAN, GRAN as usize);
        assert_eq!(got[..5], want[(8 * GRAN) as usize..][..5]);
        assert_eq!(got[5..15], [2u8; 10]);
        assert_eq!(
            got[15..],
            want[(8 * GRAN + 15) as usize..][..(GRAN - 15) as usize]
        );
        // Zeroes and trims of whole absent blocks: no fetch either.
        let z = ZeroMode {
            may_trim: true,
            fast: false,
            fua: false,
        };
        BlockDev::write_zeroes(&cor, 20 * GRAN, GRAN, z).unwrap();
        BlockDev::trim(&cor, 30 * GRAN + 1, GRAN * 2, false).unwrap();
        assert_eq!(f.read_from_source(), GRAN);
        assert_eq!(read(&cor, 20 * GRAN, 10), vec![0; 10]);
    }

    #[test]
    fn a_fetch_never_overwrites_a_client_write() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        // The background pass claims block 5 and reads it from the source…
        let mut claim = cor.claim(5, 6);
        let mut fetched = vec![0u8; GRAN as usize];
        BlockDev::read_at(&*f.source, &mut fetched, 5 * GRAN).unwrap();
        // …a client overwrites the whole block meanwhile…
        BlockDev::write_at(&cor, &vec![9u8; GRAN as usize], 5 * GRAN, false).unwrap();
        // …and the fetched data must not land on it.
        claim.land(5, GRAN, Some(&fetched)).unwrap();
        cor.settle_landed(vec![claim]).unwrap();
        assert_eq!(
            read(&cor, 5 * GRAN, GRAN as usize),
            vec![9u8; GRAN as usize]
        );
    }

    #[test]
    fn landed_blocks_stay_absent_until_their_sync_makes_them_present() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        let want = source_data();
        let run = |a: u64, b: u64| want[(a * GRAN) as usize..(b * GRAN) as usize].to_vec();
        let mut claim = cor.claim(3, 5);
        claim.land(3, 2 * GRAN, Some(&run(3, 5))).unwrap();
        let mut b = vec![0u8; 10];
        assert!(
            !BlockDev::read_at_nowait(&cor, &mut b, 3 * GRAN).unwrap(),
            "here before its sync"
        );
        assert!(cor.claim(3, 5).is_empty(), "let go before its sync");
        cor.settle_landed(vec![claim]).unwrap();
        assert!(BlockDev::read_at_nowait(&cor, &mut b, 3 * GRAN).unwrap());
        // Landed, then a crash before the sync.
        let mut claim = cor.claim(7, 8);
        claim.land(7, GRAN, Some(&run(7, 8))).unwrap();
        drop(claim);
        drop(cor);
        let cor = f.open();
        assert_eq!(read(&cor, 3 * GRAN, 2 * GRAN as usize), run(3, 5));
        assert_eq!(f.read_from_source(), 0, "synced blocks survive");
        assert_eq!(read(&cor, 7 * GRAN, GRAN as usize), run(7, 8));
        assert_eq!(
            f.read_from_source(),
            GRAN,
            "an unsynced one is fetched again"
        );
    }

    #[test]
    fn present_bits_follow_durable_data_across_crashes() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        let want = source_data();
        read(&cor, 0, 1);
        BlockDev::write_at(&cor, &vec![7u8; GRAN as usize], 2 * GRAN, false).unwrap();
        drop(cor); // a crash before any sync
        let cor = f.open();
        assert_eq!(f.read_from_source(), GRAN);
        // The unflushed write may be lost: block 2 is fetched again, and
        // so is block 0, whose fetch no sync covered.
        assert_eq!(read(&cor, 2 * GRAN, 4), want[(2 * GRAN) as usize..][..4]);
        assert_eq!(read(&cor, 0, 4), want[..4]);
        assert_eq!(f.read_from_source(), 3 * GRAN);
        read(&cor, 5 * GRAN, 1);
        BlockDev::write_at(&cor, &vec![7u8; GRAN as usize], 2 * GRAN, false).unwrap();
        BlockDev::write_at(&cor, &vec![8u8; GRAN as usize], 3 * GRAN, true).unwrap();
        drop(cor); // a crash after a FUA write: its sync covered the rest
        let cor = f.open();
        assert_eq!(
            read(&cor, 3 * GRAN, 4),
            vec![8u8; 4],
            "FUA write is present"
        );
        assert_eq!(read(&cor, 2 * GRAN, 4), vec![7u8; 4], "synced before FUA");
        assert_eq!(read(&cor, 5 * GRAN, 4), want[(5 * GRAN) as usize..][..4]);
        assert_eq!(read(&cor, 0, 4), want[..4]);
        assert_eq!(f.read_from_source(), 4 * GRAN, "synced fetches survive");
        BlockDev::write_at(&cor, &vec![6u8; GRAN as usize], 4 * GRAN, false).unwrap();
        // A block fetched for a reader, then written and flushed.
        read(&cor, 6 * GRAN, 1);
        BlockDev::write_at(&cor, &[5u8; 4], 6 * GRAN, false).unwrap();
        BlockDev::flush(&cor).unwrap();
        drop(cor);
        let cor = f.open();
        let before = f.read_from_source();
        assert_eq!(
            read(&cor, 4 * GRAN, 4),
            vec![6u8; 4],
            "a flushed write is present"
        );
        assert_eq!(
            read(&cor, 6 * GRAN, 4),
            vec![5u8; 4],
            "and one into a fetched block"
        );
        assert_eq!(f.read_from_source(), before);
    }

    #[test]
    fn zeroes_at_the_source_stay_holes_and_extents_answer_while_absent() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        // The source says 40..48 is a hole; a background install of it
        // writes nothing.
        let mut claim = cor.claim(40, 48);
        claim.land(40, 8 * GRAN, None).unwrap();
        cor.settle_landed(vec![claim]).unwrap();
        assert_eq!(f.read_from_source(), 0);
        let e = BlockDev::extents(&cor, BASE_ALLOCATION, 36 * GRAN, 16 * GRAN, 10).unwrap();
        let runs: Vec<(u64, u32)> = e.iter().map(|e| (e.length, e.flags)).collect();
        // 36..40 absent (source: data), 40..48 present and a local hole,
        // 48..52 absent (data).
        assert_eq!(runs, vec![(4 * GRAN, 0), (8 * GRAN, 3), (4 * GRAN, 0)]);
        assert_eq!(read(&cor, 40 * GRAN, 8), vec![0; 8]);
    }

    #[test]
    fn zeroes_the_source_reports_become_current_without_a_fetch() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        let before = cor.progress().present_bytes;
        // A client's block status over 38..50: the source says 40..48 is
        // a hole; the reply is the same, and those blocks are here now.
        let e = BlockDev::extents(&cor, BASE_ALLOCATION, 38 * GRAN, 12 * GRAN, 10).unwrap();
        let runs: Vec<(u64, u32)> = e.iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(runs, vec![(2 * GRAN, 0), (8 * GRAN, 3), (2 * GRAN, 0)]);
        assert_eq!(cor.progress().present_bytes, before + 8 * GRAN);
        let mut b = vec![1u8; 10];
        assert!(BlockDev::read_at_nowait(&cor, &mut b, 41 * GRAN).unwrap());
        assert_eq!(b, vec![0; 10]);
        assert_eq!(f.read_from_source(), 0, "nothing fetched");
        // Present at the next sync: after a flush and a crash, still here.
        BlockDev::flush(&cor).unwrap();
        drop(cor);
        let cor = f.open();
        assert_eq!(read(&cor, 44 * GRAN, 10), vec![0; 10]);
        assert_eq!(f.read_from_source(), 0);
    }

    #[test]
    fn complete_when_every_block_arrived_and_then_the_source_is_not_asked() {
        let f = fixture(Duration::ZERO);
        let cor = f.open();
        let mut from = 0;
        while let Some((a, b)) = cor.next_absent(from, 16) {
            let mut claim = cor.claim(a, b);
            let off = a * GRAN;
            let len = (b * GRAN).min(SIZE) - off;
            let mut buf = vec![0u8; len as usize];
            BlockDev::read_at(&*f.source, &mut buf, off).unwrap();
            claim.land(a, len, Some(&buf)).unwrap();
            cor.settle_landed(vec![claim]).unwrap();
            from = b;
        }
        assert!(cor.is_complete());
        assert!(cor.settle().unwrap());
        let before = f.read_from_source();
        assert_eq!(read(&cor, 0, SIZE as usize), source_data_with_hole());
        assert_eq!(f.read_from_source(), before);
        drop(cor);
        assert!(f.open().is_complete(), "complete after a restart too");
    }

    fn source_data_with_hole() -> Vec<u8> {
        let mut d = source_data();
        d[(40 * GRAN) as usize..(48 * GRAN) as usize].fill(0);
        d
    }
}
