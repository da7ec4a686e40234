//! Pre-copy migration: a mirror of a live disk onto another export while
//! clients keep writing it, then a short freeze that moves the last
//! changes.
//!
//! The mirror plugs into the disk's write tap. Every change marks its
//! blocks *pending* (not on the destination yet) in a bitmap file
//! (`mirror/pending.bits`, dirty-tracking rounding) before it goes down,
//! so a `kill -9` never forgets one. The marks are written, not synced:
//! a sync per first write into a region cost more than the destination's
//! round trip, on every random write. A host crash can lose marks, so the
//! job records the boot it runs in, and a resume in another boot
//! distrusts the map and plans the whole disk again (it never skips a
//! block; it resends what the destination may already hold).
//!
//! A copier sweeps the pending blocks in passes: it reads a run (noting
//! each block's stripe version), sends it, and once a FLUSH of the
//! destination covers the send, clears the blocks whose version did not
//! move meanwhile (a write moves it, and holds the blocks' stripes from
//! then until it is down, so the copier reads a block either before a
//! write, which then keeps it pending, or after it). The first pass is the
//! bulk copy: the disk's allocated data marked pending, its holes sent as
//! zeroes unless the destination reads zeroes there already.
//!
//! Active mode: a write to blocks whose destination copy is current (not
//! pending, or pending only because of earlier active writes not yet
//! flushed there: `active_sent`) is also written to the destination
//! before it is acknowledged, under the blocks' stripe locks, so two
//! overlapping writes reach the destination in the order they went down
//! here. The copier leaves such blocks alone; the next flush clears them.
//! Nothing new then needs the copier, and the mirror converges under any
//! write rate. A write to a stale block only marks it, for the copier. If
//! the destination fails an active write, its blocks go back to the
//! copier and the mirror falls back to background mode.
//!
//! Completion holds the disk's writes, sends what is pending, flushes the
//! destination, and reports how long writes were held.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_api::{MirrorMode, MirrorStatus};
use ferry_block::{BASE_ALLOCATION, BlockDev, Result as BlockResult};
use ferry_store::{AtomicBitmap, Change, Disk, DurableBitmap, Persist, Rounding, Ticket, WriteTap};
use nbd_proto::consts::state;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::remote::{Lane, Remote, RemoteError, RemoteIdentity};

const PENDING: &str = "pending.bits";
const RECORD: &str = "job.json";
/// Same rounding as dirty tracking: a first write puts a window in the file.
const ROUNDING: Rounding = Rounding {
    window: 16,
    max_ahead: 1024,
};
const STRIPES: usize = 4096;
/// Versions are counted per slot of blocks: a write to any block of a slot
/// keeps every block of it pending (rare with this many).
const VERSIONS: usize = 65536;
/// The copier reads and sends this much at a time.
const RUN_BYTES: u64 = 1 << 20;
/// Runs in flight at once, as `copy` keeps per connection: one at a time
/// leaves the link idle while each run is read and acknowledged.
const IN_FLIGHT: usize = 8;
/// Sends are made durable on the destination (and their blocks cleared)
/// at least this often, and after this many bytes.
/// (A crash of the source sends again at most this much.)
const FLUSH_EVERY: Duration = Duration::from_millis(250);
const FLUSH_BYTES: u64 = 16 << 20;
/// The pending map's file keeps the bits of cleared blocks until this many
/// bytes (at most a 32nd of the disk) are cleared: a write to a block whose
/// bit is still in the file needs no I/O, and a crash sends again at most
/// this much more.
const TIGHTEN_BYTES: u64 = 64 << 20;
const RETRY_PAUSE: Duration = Duration::from_millis(500);
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// `mirror/job.json`: what a restart needs to resume the mirror.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorRecord {
    pub destination: String,
    pub identity: RemoteIdentity,
    pub mode: MirrorMode,
    pub rate: Option<u64>,
    pub max_downtime_ms: u64,
    pub auto_active: bool,
    /// The bulk pass's plan (pending data, zeroed holes) is done.
    pub planned: bool,
    /// The host's boot the pending map was written in (its marks are not
    /// synced). None: its marks were synced (a version before this field,
    /// or a boot id the kernel did not give).
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// This boot of the host: marks written, not synced, hold only within it.
/// None when the kernel does not say; the marks are then synced.
fn boot_id() -> Option<String> {
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) => Some(id.trim().to_string()),
        Err(e) => {
            tracing::warn!("cannot read the boot id ({e}): the mirror syncs every mark");
            None
        }
    }
}

/// How durable the pending map's marks must be in a boot that is known
/// (written: the boot id tells a host crash) or not (synced).
fn persist_for(boot: Option<&str>) -> Persist {
    match boot {
        Some(_) => Persist::Written,
        None => Persist::Synced,
    }
}

/// Stripe locks that can be held by a value (a write's ticket carries
/// them from before its local write to after its remote one).
struct Stripes {
    busy: Mutex<Vec<bool>>,
    freed: Condvar,
}

struct Held {
    stripes: Arc<Stripes>,
    which: Vec<usize>,
}

impl Stripes {
    fn lock(&self) -> MutexGuard<'_, Vec<bool>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold(self: &Arc<Self>, blocks: std::ops::Range<u64>) -> Held {
        let mut which: Vec<usize> = blocks.map(|b| (b % STRIPES as u64) as usize).collect();
        which.sort_unstable();
        which.dedup();
        let mut busy = self.lock();
        while which.iter().any(|&i| busy[i]) {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        for &i in &which {
            busy[i] = true;
        }
        Held {
            stripes: self.clone(),
            which,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut busy = self.stripes.lock();
        for &i in &self.which {
            busy[i] = false;
        }
        drop(busy);
        self.stripes.freed.notify_all();
    }
}

#[derive(Default)]
struct Counters {
    phase: String,
    last_error: Option<String>,
    /// (time, bytes sent, bytes written by clients) samples.
    samples: Vec<(Instant, u64, u64)>,
    /// Pending bytes after each finished pass.
    after_pass: Vec<u64>,
}

pub struct Mirror {
    disk: Arc<Disk>,
    dev: Arc<dyn BlockDev>,
    remote: Arc<Remote>,
    dir: PathBuf,
    record: Mutex<MirrorRecord>,
    gran: u64,
    size: u64,
    pending: DurableBitmap,
    /// Pending only because active writes sent them and no destination
    /// flush covered those yet: the copier skips them.
    active_sent: AtomicBitmap,
    stripes: Arc<Stripes>,
    versions: Box<[AtomicU32]>,
    active: AtomicBool,
    /// The bulk plan is made: from now on a block that is not pending is
    /// current on the destination (before, nothing is).
    planned: AtomicBool,
    rate: AtomicU64,
    pass: AtomicU64,
    sent: AtomicU64,
    written: AtomicU64,
    /// Blocks cleared since the pending map's file was last tightened.
    loose: AtomicU64,
    /// Sent but not yet covered by a destination flush: (block, version).
    unflushed: Mutex<Vec<(u64, u32)>>,
    counters: Mutex<Counters>,
    wake: Notify,
    stop: CancellationToken,
    /// 0 running, 1 completing, 2 done (completed or cancelled).
    state: AtomicU8,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a mirror cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("the destination has {dest} bytes, the disk {disk}")]
    Size { dest: u64, disk: u64 },
    #[error("mirror state: {0}")]
    State(String),
}

fn state_err(e: impl std::fmt::Display) -> MirrorError {
    MirrorError::State(e.to_string())
}

/// Where a finished mirror stands.
#[derive(Debug, Clone)]
pub struct Finished {
    pub downtime: Duration,
    pub bytes_sent: u64,
    pub passes: u64,
    /// Left for the destination to fetch (post-copy switch): byte ranges.
    pub absent: Vec<(u64, u64)>,
}

impl Mirror {
    /// Starts a mirror of `disk` (served as `dev`) to `destination`.
    pub async fn start(
        disk: Arc<Disk>,
        dev: Arc<dyn BlockDev>,
        destination: &str,
        mode: MirrorMode,
        rate: Option<u64>,
        max_downtime: Duration,
        auto_active: bool,
    ) -> Result<Arc<Mirror>, MirrorError> {
        let remote = connect(destination, None).await?;
        let record = MirrorRecord {
            destination: destination.to_string(),
            identity: remote.identity().clone(),
            mode,
            rate,
            max_downtime_ms: max_downtime.as_millis() as u64,
            auto_active,
            planned: false,
            boot_id: boot_id(),
        };
        if record.identity.size != dev.size() {
            return Err(MirrorError::Size {
                dest: record.identity.size,
                disk: dev.size(),
            });
        }
        let dir = disk.job_dir("mirror").map_err(state_err)?;
        let _ = std::fs::remove_file(dir.join(PENDING));
        let nblocks = dev.size().div_ceil(disk.granularity());
        let pending = DurableBitmap::create(&dir.join(PENDING), nblocks, ROUNDING)
            .map_err(state_err)?
            .persist(persist_for(record.boot_id.as_deref()));
        let m = Mirror::new(disk, dev, remote, dir, record, pending);
        m.save()?;
        m.disk.set_tap(Some(m.clone()));
        tracing::info!(disk = m.disk.name(), destination, "mirror started");
        Ok(m)
    }

    /// Resumes the mirror whose state is in `dir` (after a restart): the
    /// same destination, checked to be the same disk.
    pub async fn resume(
        disk: Arc<Disk>,
        dev: Arc<dyn BlockDev>,
        dir: &Path,
    ) -> Result<Arc<Mirror>, MirrorError> {
        let text = std::fs::read(dir.join(RECORD)).map_err(state_err)?;
        let mut record: MirrorRecord = serde_json::from_slice(&text).map_err(state_err)?;
        let remote = connect(&record.destination, Some(record.identity.clone())).await?;
        let nblocks = dev.size().div_ceil(disk.granularity());
        let now = boot_id();
        let pending = DurableBitmap::open(&dir.join(PENDING), nblocks, ROUNDING)
            .map_err(state_err)?
            .persist(persist_for(now.as_deref()));
        // A record without a boot id had its marks synced: trusted. One
        // written in another boot (or in a boot that cannot be told now)
        // may have lost marks.
        let rebooted = record.boot_id.is_some() && record.boot_id != now;
        if rebooted {
            // Marks of the last boot may never have reached the disk: the
            // plan marks all the data again (and zeroes the holes).
            tracing::warn!(
                disk = disk.name(),
                "the host restarted under the mirror: sending the whole disk again"
            );
            record.planned = false;
        }
        // Saved before any mark of this boot goes unsynced into the map: a
        // host crash from now on is seen at the next resume.
        let changed = record.boot_id != now;
        record.boot_id = now;
        let m = Mirror::new(disk, dev, remote, dir.to_path_buf(), record, pending);
        if changed {
            m.save()?;
        }
        m.disk.set_tap(Some(m.clone()));
        tracing::info!(
            disk = m.disk.name(),
            pending = m.pending.count() * m.gran,
            "mirror resumed"
        );
        Ok(m)
    }

    /// Whether `disk` has a mirror to resume, and where its state is.
    pub fn saved(disk: &Disk) -> Option<PathBuf> {
        let dir = disk.state_dir().join("mirror");
        dir.join(RECORD).exists().then_some(dir)
    }

    fn new(
        disk: Arc<Disk>,
        dev: Arc<dyn BlockDev>,
        remote: Remote,
        dir: PathBuf,
        record: MirrorRecord,
        pending: DurableBitmap,
    ) -> Arc<Mirror> {
        let nblocks = dev.size().div_ceil(disk.granularity());
        Arc::new(Mirror {
            active_sent: AtomicBitmap::new(nblocks),
            gran: disk.granularity(),
            size: dev.size(),
            disk,
            dev,
            remote: Arc::new(remote),
            dir,
            active: AtomicBool::new(record.mode == MirrorMode::Active),
            planned: AtomicBool::new(record.planned),
            rate: AtomicU64::new(record.rate.unwrap_or(0)),
            record: Mutex::new(record),
            pending,
            stripes: Arc::new(Stripes {
                busy: Mutex::new(vec![false; STRIPES]),
                freed: Condvar::new(),
            }),
            versions: (0..VERSIONS).map(|_| AtomicU32::new(0)).collect(),
            pass: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            written: AtomicU64::new(0),
            loose: AtomicU64::new(0),
            unflushed: Mutex::new(Vec::new()),
            counters: Mutex::new(Counters {
                phase: "bulk".into(),
                ..Counters::default()
            }),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            state: AtomicU8::new(0),
        })
    }

    fn save(&self) -> Result<(), MirrorError> {
        let text = serde_json::to_vec_pretty(&*lock(&self.record)).map_err(state_err)?;
        ferry_store::write_atomic(&self.dir, RECORD, &text).map_err(state_err)
    }

    fn version(&self, blk: u64) -> &AtomicU32 {
        &self.versions[(blk % VERSIONS as u64) as usize]
    }

    fn nblocks(&self) -> u64 {
        self.size.div_ceil(self.gran)
    }

    /// Blocks the copier (or completion) must still send: pending, and not
    /// sent by an active write already (those wait only for a flush).
    fn to_send(&self) -> u64 {
        let sent = self.active_sent.snapshot();
        self.pending
            .words()
            .iter()
            .zip(sent.iter().chain(std::iter::repeat(&0)))
            .map(|(p, a)| u64::from((p & !a).count_ones()))
            .sum()
    }

    /// The first block at or after `from` the copier must send.
    fn next_to_send(&self, mut from: u64) -> Option<u64> {
        loop {
            let b = self.pending.next_set(from)?;
            if !self.active_sent.get(b) {
                return Some(b);
            }
            from = b + 1;
        }
    }

    /// The run of blocks to send from `b0`, at most a copier's run long.
    fn run_from(&self, b0: u64) -> u64 {
        let end = (b0 + (RUN_BYTES / self.gran).max(1)).min(self.nblocks());
        let mut b1 = b0 + 1;
        while b1 < end && self.pending.get(b1) && !self.active_sent.get(b1) {
            b1 += 1;
        }
        b1
    }

    fn blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.gran..(offset + len).div_ceil(self.gran)
    }

    pub fn set_mode(&self, mode: MirrorMode) -> Result<(), MirrorError> {
        self.active
            .store(mode == MirrorMode::Active, Ordering::Release);
        lock(&self.record).mode = mode;
        tracing::info!(disk = self.disk.name(), ?mode, "mirror mode");
        self.save()
    }

    pub fn set_rate(&self, rate: Option<u64>) -> Result<(), MirrorError> {
        self.rate.store(rate.unwrap_or(0), Ordering::Release);
        lock(&self.record).rate = rate;
        self.save()
    }

    fn note_error(&self, e: &dyn std::fmt::Display) {
        lock(&self.counters).last_error = Some(e.to_string());
    }

    // ---- the copier -----------------------------------------------------

    /// Runs the copier until the mirror completes or is cancelled.
    pub async fn run(self: Arc<Self>) {
        if !lock(&self.record).planned {
            while let Err(e) = self.plan().await {
                tracing::warn!(
                    disk = self.disk.name(),
                    "mirror: planning failed, will retry: {e}"
                );
                self.note_error(&e);
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                }
            }
        }
        let mut last_flush = Instant::now();
        let mut paced = Instant::now();
        loop {
            if self.next_to_send(0).is_none() {
                // Caught up: clear what active writes sent, wait for writes
                // (or look again now and then, to keep the pending map's
                // file tight).
                if self.pass.load(Ordering::Acquire) > 0 {
                    lock(&self.counters).phase = "caught-up".into();
                }
                if let Err(e) = self.flush_and_clear().await {
                    self.failed(&e).await;
                }
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(FLUSH_EVERY) => {}
                }
                continue;
            }
            let pass = self.pass.fetch_add(1, Ordering::AcqRel) + 1;
            lock(&self.counters).phase = if pass == 1 { "bulk" } else { "passes" }.into();
            let mut flight = Flight::default();
            // The periodic flush runs beside the sends: awaiting it here
            // would leave the link idle while the destination syncs.
            let mut flushing: Option<JoinHandle<Result<(), MirrorError>>> = None;
            let mut cursor = 0;
            while let Some(b0) = self.next_to_send(cursor) {
                if self.stop.is_cancelled() {
                    break;
                }
                let b1 = self.run_from(b0);
                cursor = b1;
                let rate = self.rate.load(Ordering::Acquire);
                if rate > 0 {
                    let now = Instant::now();
                    if paced > now {
                        tokio::select! {
                            _ = self.stop.cancelled() => break,
                            _ = tokio::time::sleep_until(paced.into()) => {}
                        }
                    }
                    let bytes = (b1 - b0) * self.gran;
                    paced = paced.max(now) + Duration::from_secs_f64(bytes as f64 / rate as f64);
                }
                if let Err(e) = flight.send(&self, b0, b1).await {
                    self.failed(&e).await;
                }
                let unflushed = lock(&self.unflushed).len() as u64 * self.gran;
                if (unflushed >= FLUSH_BYTES || last_flush.elapsed() >= FLUSH_EVERY)
                    && flushing.as_ref().is_none_or(|f| f.is_finished())
                {
                    if let Err(e) = joined(flushing.take()).await {
                        self.failed(&e).await;
                    }
                    let me = self.clone();
                    flushing = Some(tokio::spawn(async move { me.flush_and_clear().await }));
                    last_flush = Instant::now();
                }
            }
            // Completion sends these blocks again: the old sends must be
            // down first, or one could land over the newer data (and its
            // flush must not run beside completion's).
            let landed = flight.land().await.and(joined(flushing).await);
            if self.stop.is_cancelled() {
                return;
            }
            if let Err(e) = landed {
                self.failed(&e).await;
            }
            if let Err(e) = self.flush_and_clear().await {
                self.failed(&e).await;
            }
            last_flush = Instant::now();
            self.end_of_pass();
        }
    }

    async fn failed(&self, e: &MirrorError) {
        tracing::warn!(disk = self.disk.name(), "mirror: {e}; retrying");
        self.note_error(e);
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }

    /// The bulk pass's plan: allocated data pending, holes zeroed on the
    /// destination unless it reads zeroes there already.
    async fn plan(&self) -> Result<(), MirrorError> {
        let chunk: u64 = 1 << 30;
        let mut pos = 0;
        while pos < self.size {
            let len = chunk.min(self.size - pos);
            let dev = self.dev.clone();
            let extents = tokio::task::spawn_blocking(move || {
                dev.extents(BASE_ALLOCATION, pos, len, usize::MAX)
            })
            .await
            .map_err(state_err)?
            .map_err(state_err)?;
            let mut at = pos;
            for e in extents {
                let end = (at + e.length).min(pos + len);
                if e.flags & state::ZERO == 0 {
                    let blocks = self.blocks(at, end - at);
                    self.pending
                        .mark(blocks.start, blocks.end)
                        .map_err(state_err)?;
                } else if !self.reads_zero(at, end - at).await? {
                    self.remote.write_zeroes(Lane::Bulk, at, end - at).await?;
                }
                at = end;
                if at >= pos + len {
                    break;
                }
            }
            if at == pos {
                return Err(state_err("no extents for the range"));
            }
            pos = at;
        }
        self.remote.flush(Lane::Bulk).await?;
        lock(&self.record).planned = true;
        self.save()?;
        self.planned.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the destination reads zeroes all over `[offset, offset+len)`.
    async fn reads_zero(&self, offset: u64, len: u64) -> Result<bool, MirrorError> {
        let extents = match self.remote.allocation(Lane::Bulk, offset, len).await {
            Ok(e) => e,
            // No block status there: zero it to be sure.
            Err(RemoteError::Refused(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let covered: u64 = extents.iter().map(|e| e.length).sum();
        Ok(covered >= len && extents.iter().all(|e| e.flags & state::ZERO != 0))
    }

    /// Reads blocks `[b0, b1)` (noting their versions) and sends them.
    async fn send_run(&self, b0: u64, b1: u64) -> Result<(), MirrorError> {
        let off = b0 * self.gran;
        let len = (b1 * self.gran).min(self.size) - off;
        let (dev, stripes) = (self.dev.clone(), self.stripes.clone());
        let versions: Vec<u32>;
        let data = {
            let held = tokio::task::spawn_blocking(move || stripes.hold(b0..b1))
                .await
                .map_err(state_err)?;
            versions = (b0..b1)
                .map(|b| self.version(b).load(Ordering::Acquire))
                .collect();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                dev.read_at(&mut buf, off).map(|()| buf)
            })
            .await
            .map_err(state_err)?
            .map_err(state_err)?;
            drop(held);
            read
        };
        if data.iter().all(|&x| x == 0) {
            self.remote.write_zeroes(Lane::Bulk, off, len).await?;
        } else {
            self.remote
                .write(Lane::Bulk, off, Bytes::from(data))
                .await?;
        }
        self.sent.fetch_add(len, Ordering::Relaxed);
        lock(&self.unflushed).extend((b0..b1).zip(versions));
        Ok(())
    }

    /// Makes the sends so far durable on the destination, then clears the
    /// blocks no write has touched since they were read, durably.
    async fn flush_and_clear(self: &Arc<Self>) -> Result<(), MirrorError> {
        let batch = std::mem::take(&mut *lock(&self.unflushed));
        if let Err(e) = self.flush_remote().await {
            lock(&self.unflushed).extend(batch);
            return Err(e);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut cleared = 0;
            for (blk, v) in batch {
                let _held = me.stripes.hold(blk..blk + 1);
                if me.version(blk).load(Ordering::Acquire) == v {
                    me.pending.unmark(blk);
                    me.active_sent.clear_bit(blk);
                    cleared += 1;
                }
            }
            let loose = me.loose.fetch_add(cleared, Ordering::AcqRel) + cleared;
            if loose * me.gran < TIGHTEN_BYTES.min(me.size / 32) {
                return Ok(0);
            }
            me.loose.store(0, Ordering::Release);
            me.pending.tighten()
        })
        .await
        .map_err(state_err)?
        .map_err(state_err)?;
        Ok(())
    }

    async fn flush_remote(&self) -> Result<(), MirrorError> {
        self.remote.flush(Lane::Bulk).await?;
        self.remote.flush(Lane::Demand).await?;
        Ok(())
    }

    fn end_of_pass(&self) {
        let left = self.pending.count() * self.gran;
        let mut c = lock(&self.counters);
        c.after_pass.push(left);
        let record = lock(&self.record);
        // Passes stop shrinking: background mode cannot win; go active.
        let n = c.after_pass.len();
        if record.auto_active
            && !self.active.load(Ordering::Acquire)
            && n >= 3
            && c.after_pass[n - 1] * 10 >= c.after_pass[n - 2] * 9
            && c.after_pass[n - 2] * 10 >= c.after_pass[n - 3] * 9
        {
            drop(record);
            drop(c);
            tracing::info!(
                disk = self.disk.name(),
                "mirror passes stopped shrinking: going active"
            );
            if let Err(e) = self.set_mode(MirrorMode::Active) {
                self.note_error(&e);
            }
        }
    }

    // ---- completion ---------------------------------------------------------

    /// Holds the disk's writes, sends what is pending, flushes the
    /// destination, and runs `seal` (what comes after: refuse writes, or
    /// nothing) before writes go again: a write held meanwhile must not
    /// land on the source alone. The caller then calls
    /// [`release`](Self::release).
    /// With `postcopy`, nothing more is sent: what is durable on the
    /// destination is kept, and the blocks still pending are returned for
    /// the destination to fetch (downtime then does not depend on them).
    pub async fn complete(
        self: &Arc<Self>,
        copier: tokio::task::JoinHandle<()>,
        postcopy: bool,
        seal: impl FnOnce() + Send + 'static,
    ) -> Result<Finished, MirrorError> {
        self.state.store(1, Ordering::Release);
        lock(&self.counters).phase = "completing".into();
        self.stop.cancel();
        let _ = copier.await;
        let me = self.clone();
        let handle = tokio::runtime::Handle::current();
        let finished = tokio::task::spawn_blocking(move || {
            let held = me.disk.hold_writes();
            let started = Instant::now();
            let drained = if postcopy {
                handle
                    .block_on(me.flush_and_clear())
                    .map(|()| me.pending_runs())
            } else {
                handle.block_on(me.drain()).map(|()| Vec::new())
            };
            if drained.is_ok() {
                seal();
            }
            drop(held);
            drained.map(|absent| (started.elapsed(), absent))
        })
        .await
        .map_err(state_err)?;
        let (downtime, absent) = match finished {
            Ok(d) => d,
            Err(e) => {
                lock(&self.counters).phase = "failed".into();
                self.note_error(&e);
                return Err(e);
            }
        };
        Ok(Finished {
            downtime,
            bytes_sent: self.sent.load(Ordering::Relaxed),
            passes: self.pass.load(Ordering::Relaxed),
            absent,
        })
    }

    /// The pending blocks as byte ranges.
    fn pending_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut b = 0;
        while let Some(a) = self.pending.next_set(b) {
            b = a + 1;
            while b < self.nblocks() && self.pending.get(b) {
                b += 1;
            }
            let off = a * self.gran;
            runs.push((off, (b * self.gran).min(self.size) - off));
        }
        runs
    }

    /// With writes held: everything pending goes, then a flush, until
    /// nothing is pending (no write moves a version now, so a second
    /// round only sends what an earlier read raced with).
    async fn drain(self: &Arc<Self>) -> Result<(), MirrorError> {
        // Active writes sent but not flushed go again: simpler than
        // tracking them, and they are few.
        self.active_sent.clear();
        loop {
            let mut flight = Flight::default();
            let mut cursor = 0;
            while let Some(b0) = self.next_to_send(cursor) {
                let b1 = self.run_from(b0);
                if let Err(e) = flight.send(self, b0, b1).await {
                    let _ = flight.land().await;
                    return Err(e);
                }
                cursor = b1;
            }
            flight.land().await?;
            self.flush_and_clear().await?;
            if self.pending.count() == 0 {
                return Ok(());
            }
        }
    }

    /// Takes the mirror off the disk and removes its state: it is done
    /// (completed) or given up (cancelled), and nothing resumes it.
    pub fn release(&self, phase: &str) {
        self.state.store(2, Ordering::Release);
        self.stop.cancel();
        self.disk.set_tap(None);
        self.remote.close();
        for f in [RECORD, PENDING] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        lock(&self.counters).phase = phase.into();
        tracing::info!(disk = self.disk.name(), phase, "mirror ended");
    }

    pub fn is_running(&self) -> bool {
        self.state.load(Ordering::Acquire) == 0
    }

    pub fn status(&self, disk: &str) -> MirrorStatus {
        let now = Instant::now();
        let sent = self.sent.load(Ordering::Relaxed);
        let written = self.written.load(Ordering::Relaxed);
        let mut c = lock(&self.counters);
        c.samples.push((now, sent, written));
        while c.samples.len() > 2 && now.duration_since(c.samples[0].0) > RATE_WINDOW {
            c.samples.remove(0);
        }
        let (t0, s0, w0) = c.samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        let (link_rate, write_rate) = if secs > 0.0 {
            ((sent - s0) as f64 / secs, (written - w0) as f64 / secs)
        } else {
            (0.0, 0.0)
        };
        let dirty = self.to_send() * self.gran;
        let record = lock(&self.record);
        let budget = link_rate * record.max_downtime_ms as f64 / 1000.0;
        let ready = !c.after_pass.is_empty() && (dirty == 0 || dirty as f64 <= budget);
        let gain = link_rate
            - if self.active.load(Ordering::Acquire) {
                0.0
            } else {
                write_rate
            };
        MirrorStatus {
            disk: disk.to_string(),
            destination: record.destination.clone(),
            mode: if self.active.load(Ordering::Acquire) {
                MirrorMode::Active
            } else {
                MirrorMode::Background
            },
            phase: c.phase.clone(),
            pass: self.pass.load(Ordering::Relaxed),
            bytes_sent: sent,
            dirty_bytes: dirty,
            write_rate: write_rate as u64,
            link_rate: link_rate as u64,
            eta_seconds: if dirty == 0 {
                Some(0)
            } else {
                (gain > 0.0).then(|| (dirty as f64 / gain).ceil() as u64)
            },
            ready,
            destination_connected: self.remote.status().connected,
            last_error: c.last_error.clone(),
        }
    }
}

async fn connect(
    destination: &str,
    recorded: Option<RemoteIdentity>,
) -> Result<Remote, MirrorError> {
    let uri = nbd_client::NbdUri::parse(destination).map_err(state_err)?;
    let opts = nbd_client::ConnectOptions {
        connections: 2,
        requests: 16,
        ..nbd_client::ConnectOptions::default()
    };
    let remote = Remote::connect(uri, opts, Duration::from_secs(30), recorded).await?;
    remote.check_writable()?;
    Ok(remote)
}

/// How a task of the copier's ended.
fn settled(ended: Result<Result<(), MirrorError>, JoinError>) -> Result<(), MirrorError> {
    ended.map_err(state_err).and_then(|r| r)
}

/// Waits for a task of the copier's, if there is one.
async fn joined(task: Option<JoinHandle<Result<(), MirrorError>>>) -> Result<(), MirrorError> {
    match task {
        Some(t) => settled(t.await),
        None => Ok(()),
    }
}

/// The copier's runs in flight. Runs of one pass never overlap (its cursor
/// only moves on), and a pass lands all of its runs before the next one
/// starts, so two sends of a block are never on the wire at once.
#[derive(Default)]
struct Flight {
    runs: JoinSet<Result<(), MirrorError>>,
}

impl Flight {
    /// Starts sending `[b0, b1)` once fewer than [`IN_FLIGHT`] runs are on
    /// the way; fails with the error of a run that ended meanwhile (its
    /// blocks stay pending, for the next pass).
    async fn send(&mut self, mirror: &Arc<Mirror>, b0: u64, b1: u64) -> Result<(), MirrorError> {
        let mut first = Ok(());
        while self.runs.len() >= IN_FLIGHT {
            if let Some(Err(e)) = self.runs.join_next().await.map(settled) {
                first = first.and(Err(e));
            }
        }
        let me = mirror.clone();
        self.runs.spawn(async move { me.send_run(b0, b1).await });
        first
    }

    /// Waits for every run on the way; the first error, if one failed.
    async fn land(&mut self) -> Result<(), MirrorError> {
        let mut first = Ok(());
        while let Some(ended) = self.runs.join_next().await {
            first = first.and(settled(ended));
        }
        first
    }
}

/// A destination write on its way: started, its reply not yet seen.
type Sending = Pin<Box<dyn Future<Output = Result<(), RemoteError>> + Send>>;

/// An active write's hold on its blocks, from before the local write until
/// the destination has it too. The destination's write runs beside the
/// local one: the write waits for the slower of the two, not their sum.
struct ActiveWrite {
    /// Declared before `_held`: dropped first, while the stripes are held.
    unsent: Unsent,
    _held: Held,
    sent: Sending,
}

/// Until disarmed, an active write's blocks count as not sent: dropped
/// armed (the destination's write failed, or the ticket was dropped
/// without `after`, as by a panic), it clears their `active_sent` bits and
/// wakes the copier, which then sends them. A bit left set would have the
/// copier skip a block the destination may not have.
struct Unsent {
    mirror: Arc<Mirror>,
    blocks: std::ops::Range<u64>,
    armed: bool,
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if self.armed {
            for b in self.blocks.clone() {
                self.mirror.active_sent.clear_bit(b);
            }
            self.mirror.wake.notify_one();
        }
    }
}

impl ActiveWrite {
    /// Starts repeating `change` on the destination; None for a change
    /// whose bytes are not in hand (a revert's cloned range): that one
    /// goes the background way, the copier reading it from the disk once
    /// it is down.
    ///
    /// The request is polled once here, on the writer's own thread: the
    /// client puts it on the wire at once when the socket is free, and the
    /// write's thread waits for the reply itself later. A spawned task
    /// would cost two cross-thread wakeups per write (to start it, and to
    /// hear it finished), a fifth of the destination's round trip here.
    fn send(remote: &Arc<Remote>, change: Change<'_>) -> Option<Sending> {
        let remote = remote.clone();
        let mut sending: Sending = match change {
            Change::Write { offset, data, .. } => {
                let data = Bytes::copy_from_slice(data);
                Box::pin(async move { remote.write(Lane::Demand, offset, data).await })
            }
            Change::Zeroes { offset, len, .. } | Change::Trim { offset, len } => {
                Box::pin(async move { remote.write_zeroes(Lane::Demand, offset, len).await })
            }
            Change::Cloned { .. } => return None,
        };
        // Whatever this poll registers is registered again, with the real
        // waker, when `after` polls the future to its end.
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(done) = sending.as_mut().poll(&mut cx) {
            sending = Box::pin(std::future::ready(done));
        }
        Some(sending)
    }
}

impl Ticket for ActiveWrite {
    fn after(self: Box<Self>, _: Change<'_>, local: &BlockResult<()>) -> BlockResult<()> {
        // The stripes stay held until this returns.
        let ActiveWrite {
            mut unsent,
            _held,
            sent,
        } = *self;
        let sent = tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(sent));
        let (m, blocks) = (&unsent.mirror, unsent.blocks.clone());
        match (local, sent) {
            (Ok(()), Ok(())) => {
                m.sent
                    .fetch_add((blocks.end - blocks.start) * m.gran, Ordering::Relaxed);
                let mut u = lock(&m.unflushed);
                u.extend(blocks.map(|b| (b, m.version(b).load(Ordering::Acquire))));
                unsent.armed = false;
            }
            // The blocks stay pending, for the copier to send (the
            // destination may hold a change that failed here): `unsent`
            // says so as it drops.
            (Err(_), _) => {}
            (Ok(()), Err(e)) => {
                let e = e.to_string();
                tracing::warn!(
                    disk = m.disk.name(),
                    "active mirror write failed, going background: {e}"
                );
                m.note_error(&e);
                m.active.store(false, Ordering::Release);
            }
        }
        // The bits first, while the stripes are still held.
        drop(unsent);
        drop(_held);
        Ok(())
    }
}

/// A background write: the copier picks its blocks up once it is down.
/// Until then it holds their stripes, so the copier reads them either
/// before the write (and its version check keeps them pending) or after
/// the data landed. A copier that read them in between would send the old
/// data under the new version, and a flush before the write landed would
/// clear them: the write lost on the destination.
struct Landing {
    _held: Held,
}

impl Ticket for Landing {
    fn after(self: Box<Self>, _: Change<'_>, _: &BlockResult<()>) -> BlockResult<()> {
        // Dropping the ticket releases the stripes.
        Ok(())
    }
}

impl WriteTap for Mirror {
    fn before(self: Arc<Self>, change: Change<'_>) -> BlockResult<Option<Box<dyn Ticket>>> {
        let (offset, len) = change.range();
        if len == 0 {
            return Ok(None);
        }
        self.written.fetch_add(len, Ordering::Relaxed);
        let blocks = self.blocks(offset, len);
        let held = self.stripes.hold(blocks.clone());
        // The destination's copy is current but for active writes. Not
        // before the plan: a block not pending yet may still be sent by
        // the bulk pass, or zeroed by it, after this write went there.
        let current = self.planned.load(Ordering::Acquire)
            && blocks
                .clone()
                .all(|b| !self.pending.get(b) || self.active_sent.get(b));
        for b in blocks.clone() {
            self.version(b).fetch_add(1, Ordering::AcqRel);
        }
        self.pending.mark(blocks.start, blocks.end)?;
        let active = current && self.active.load(Ordering::Acquire) && self.is_running();
        let sent = active
            .then(|| ActiveWrite::send(&self.remote, change))
            .flatten();
        for b in blocks.clone() {
            if sent.is_some() {
                self.active_sent.set(b);
            } else {
                self.active_sent.clear_bit(b);
            }
        }
        let Some(sent) = sent else {
            self.wake.notify_one();
            return Ok(Some(Box::new(Landing { _held: held })));
        };
        Ok(Some(Box::new(ActiveWrite {
            unsent: Unsent {
                mirror: self,
                blocks,
                armed: true,
            },
            _held: held,
            sent,
        })))
    }
}

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
