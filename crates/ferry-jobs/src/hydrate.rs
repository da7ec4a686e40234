//! Background hydration of a disk that is still arriving: a pass over
//! the absent blocks, several fetches in flight, ranges clients asked to
//! cache first, the source's holes and zeroes recorded without moving a
//! byte, an optional rate that paces this pass only (clients' on-demand
//! fetches never wait for it). What it fetched is written at once (by one
//! thread: see [`SerialThread`]) and made durably present beside the next
//! fetches, one sync after another, each covering what landed since the
//! previous one began; fetching pauses while a window of 64 MiB waits for
//! a sync. Runs of the source's zeroes are claimed whole, as the source's
//! allocation (asked ahead: see [`crate::source_map`]) shows them, and
//! landed as holes, up to 1 GiB of them waiting for a sync. When every
//! block is durably present the source is let go.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_api::HydrationStatus;
use ferry_store::{Claim, CopyOnRead};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pace::Pacer;
use crate::remote::{Lane, Remote, RemoteError};
use crate::serial::{SerialThread, Stopped};
use crate::source_map::{Lookahead, SourceMap};

/// How the pass runs.
#[derive(Debug, Clone)]
pub struct HydrateOptions {
    /// Fetches in flight at once.
    pub requests: usize,
    /// Bytes per fetch (whole blocks of the disk's granularity).
    pub request_size: u64,
    /// Bytes per second for this pass; None: as fast as the link goes.
    pub rate: Option<u64>,
}

impl Default for HydrateOptions {
    /// 32 x 1 MiB in flight, as `copy` keeps: on loopback 8 left the pass
    /// 6% slower (a median of 0.374 s against 0.350 s for 512 MiB onto
    /// tmpfs, 10 alternated rounds; `copy` took 0.352 s). A crash loses
    /// (fetches again) at most [`WINDOW`] (two blocks, if larger): what
    /// is in flight and what waits for its sync.
    fn default() -> Self {
        HydrateOptions {
            requests: 32,
            request_size: 1 << 20,
            rate: None,
        }
    }
}

/// Bytes fetched or landed and not durably present yet, at most (or twice
/// what may be in flight, when that is more). With 16 MiB the pass waited
/// on syncs of a few MiB each (each sync costs a device flush), and
/// hydrated 20% slower than `copy --flush` of the same disk; 128 MiB was
/// no faster than 64.
const WINDOW: u64 = 64 << 20;

/// Bytes of the source's zeroes landed (as holes) and not durably present
/// yet, at most: they are not fetched again after a crash, but each holds
/// its claim (and readers of its blocks) until its sync.
const ZERO_WINDOW: u64 = 1 << 30;

/// How many fetches of how many blocks the pass keeps in flight, and its
/// window, in blocks of `gran` bytes.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    requests: usize,
    max_blocks: u64,
    window_blocks: usize,
}

impl Shape {
    fn of(opts: &HydrateOptions, gran: u64) -> Shape {
        let max_blocks = (opts.request_size / gran).max(1);
        // Blocks larger than a request (up to 64 MiB) make fewer fetches
        // in flight, not more bytes.
        let wanted = opts.requests.max(1) as u64;
        let budget = wanted * opts.request_size;
        let requests = (budget / (max_blocks * gran)).clamp(1, wanted) as usize;
        let in_flight = requests * max_blocks as usize;
        Shape {
            requests,
            max_blocks,
            window_blocks: (2 * in_flight).max((WINDOW / gran) as usize),
        }
    }
}

/// A failed fetch: wait this long before the next ones.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often an idle pass looks again (blocks a client is fetching).
const IDLE_LOOK: Duration = Duration::from_millis(100);
/// The rate shown is over this window.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// A disk's hydration: the layer, its source, and the pass's state.
pub struct Hydration {
    cor: Arc<CopyOnRead>,
    source: Arc<Remote>,
    uri: String,
    /// Bytes the background pass read from the source.
    fetched: Arc<AtomicU64>,
    samples: Mutex<VecDeque<(Instant, u64)>>,
    last_error: Mutex<Option<String>>,
    /// When the pass started, and when it saw every block durably present
    /// and let the source go.
    started_at: OnceLock<SystemTime>,
    completed_at: OnceLock<SystemTime>,
}

impl Hydration {
    pub fn new(cor: Arc<CopyOnRead>, source: Arc<Remote>, uri: String) -> Arc<Self> {
        Arc::new(Hydration {
            cor,
            source,
            uri,
            fetched: Arc::default(),
            samples: Mutex::new(VecDeque::new()),
            last_error: Mutex::new(None),
            started_at: OnceLock::new(),
            completed_at: OnceLock::new(),
        })
    }

    fn note_error(&self, e: &dyn std::fmt::Display) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }

    /// Runs the pass until the disk is complete (then lets the source go),
    /// the source turns out to be another disk, or `shutdown`.
    pub async fn run(self: Arc<Self>, opts: HydrateOptions, shutdown: CancellationToken) {
        let gran = self.cor.granularity();
        let Shape {
            requests,
            max_blocks,
            window_blocks,
        } = Shape::of(&opts, gran);
        let pacer = opts.rate.filter(|r| *r > 0).map(Pacer::new);
        let mut cursor = 0u64;
        let mut wanted: VecDeque<(u64, u64)> = VecDeque::new();
        let mut tasks: JoinSet<Result<(), FetchError>> = JoinSet::new();
        // Blocks fetched or landed and not durably present yet: a fetch
        // takes its share before its claim and gives it back once its
        // blocks are durable. A crash fetches again at most this much.
        let window = Arc::new(Semaphore::new(window_blocks));
        // Room for one claim of the largest request, whatever the size.
        let zero_window_blocks = (ZERO_WINDOW / gran).max(max_blocks);
        let zero_window = Arc::new(Semaphore::new(zero_window_blocks as usize));
        let settled = Arc::new(Notify::new());
        let broken = Arc::new(AtomicBool::new(false));
        let map = SourceMap::new(self.source.clone());
        let mut lookahead = Lookahead::new(map.clone());
        // The pass's writes, one after another (see `SerialThread`), at
        // the background's priority.
        let writer = SerialThread::start("hydrate-writer", crate::background::lower_priority);
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(source = %self.uri, "hydration stopped: cannot start its writer thread: {e}");
                self.note_error(&e);
                return;
            }
        };
        let (landed, to_settle) = mpsc::unbounded_channel();
        tokio::spawn(
            self.clone()
                .settle(to_settle, settled.clone(), broken.clone()),
        );
        let _ = self.started_at.set(SystemTime::now());
        tracing::info!(source = %self.uri, "hydration started");
        loop {
            if broken.load(Ordering::Acquire) {
                // Every fetch would be lost again: stop, and say why.
                tracing::error!(source = %self.uri, "hydration stopped: fetched blocks cannot be made durable");
                return;
            }
            while let Some(w) = self.cor.take_wanted() {
                wanted.push_back(w);
            }
            while tasks.len() < requests && !shutdown.is_cancelled() {
                let next = match wanted.pop_front() {
                    Some((a, b)) => {
                        if b - a > max_blocks {
                            wanted.push_front((a + max_blocks, b));
                        }
                        Some((a, b.min(a + max_blocks), false))
                    }
                    None => tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = self.next_in_pass(
                            &mut cursor,
                            &mut lookahead,
                            &map,
                            (gran, max_blocks, zero_window_blocks),
                        ) => r,
                    },
                };
                let Some((a, b, zero)) = next else { break };
                // Paced and given its share of the window before the claim:
                // a claim held while waiting would hold up clients' reads
                // of those blocks. Zeroes the source reported cross nothing
                // and are not fetched again after a crash: they are not
                // paced, and have a window of their own.
                let limit = if zero {
                    &zero_window
                } else {
                    if let Some(pacer) = &pacer {
                        // By the data the source holds there.
                        let bytes = self.data_bytes(&map, a, b, gran).await;
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            () = pacer.wait(bytes) => {}
                        }
                    }
                    &window
                };
                let share = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    s = limit.clone().acquire_many_owned((b - a) as u32) => {
                        s.expect("the window is never closed")
                    }
                };
                let claim = self.cor.claim_owned(a, b);
                if claim.is_empty() {
                    continue;
                }
                tasks.spawn(fetch(
                    self.source.clone(),
                    writer.clone(),
                    map.clone(),
                    claim,
                    (gran, max_blocks),
                    self.fetched.clone(),
                    (landed.clone(), share),
                ));
            }
            if tasks.is_empty() {
                if self.cor.next_absent(0, 1).is_none() {
                    // No question may open the source again once it is
                    // let go.
                    lookahead.stop();
                    if self.finish().await {
                        return;
                    }
                }
                // Landed blocks waiting for their sync, blocks clients are
                // fetching, or a rescan after failures.
                cursor = 0;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = settled.notified() => continue,
                    _ = tokio::time::sleep(IDLE_LOOK) => continue,
                }
            }
            let done = tokio::select! {
                _ = shutdown.cancelled() => return,
                d = tasks.join_next() => d,
            };
            self.sample();
            match done {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(
                    e @ (FetchError::Source(RemoteError::Changed { .. }) | FetchError::Writer(_)),
                ))) => {
                    tracing::error!(source = %self.uri, "hydration stopped: {e}");
                    self.note_error(&e);
                    return;
                }
                Some(Ok(Err(e))) => {
                    tracing::warn!(source = %self.uri, "fetch failed, will retry: {e}");
                    self.note_error(&e);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
                Some(Err(e)) => self.note_error(&e),
            }
        }
    }

    /// Makes what the fetches landed durably present: one sync at a time,
    /// each for everything that landed since the previous one began. Ends
    /// when the pass is gone and nothing is left to sync. A failed sync
    /// sets `broken` (the local image's syncs fail from then on).
    async fn settle(
        self: Arc<Self>,
        mut landed: mpsc::UnboundedReceiver<Landed>,
        settled: Arc<Notify>,
        broken: Arc<AtomicBool>,
    ) {
        while let Some(first) = landed.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = landed.try_recv() {
                batch.push(more);
            }
            let (claims, shares): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let cor = self.cor.clone();
            let synced = tokio::task::spawn_blocking(move || cor.settle_landed(claims)).await;
            drop(shares);
            let e = match synced {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = e {
                // Those blocks stay absent.
                tracing::warn!(source = %self.uri, "syncing fetched blocks failed: {e}");
                self.note_error(&e);
                broken.store(true, Ordering::Release);
            }
            settled.notify_one();
        }
    }

    /// The next run the background pass claims, from `cursor` on (moved
    /// past it), and whether the source holds zeroes there; None when no
    /// block is left to claim.
    async fn next_in_pass(
        &self,
        cursor: &mut u64,
        lookahead: &mut Lookahead,
        map: &SourceMap,
        (gran, max_blocks, zero_most): (u64, u64, u64),
    ) -> Option<(u64, u64, bool)> {
        while let Some(r) = self.cor.next_absent(*cursor, max_blocks) {
            *cursor = r.1;
            // Landed and waiting for a sync, or fetched for a reader:
            // nothing to claim, nor to ask the source about.
            if self.cor.being_fetched(r.0, r.1) {
                continue;
            }
            lookahead.before_claim(r.0 * gran).await;
            let r = self.zero_run_from(r, map, gran, zero_most);
            *cursor = r.1;
            return Some(r);
        }
        None
    }

    /// `[a, b)`, or a longer run from `a` where the source said it holds
    /// zeroes (then true): that is claimed and landed as one hole, not as
    /// one claim per request size (a 1 GiB hole took 15 ms in 1 MiB
    /// claims; `copy` skips it in 2 ms). It is as long as the source's
    /// answers go ahead (two questions' worth), `most` blocks at most.
    fn zero_run_from(
        &self,
        (a, b): (u64, u64),
        map: &SourceMap,
        gran: u64,
        most: u64,
    ) -> (u64, u64, bool) {
        match map.zero_run(a, gran) {
            Some(end) if end >= b => {
                let end = end.min(a + most.max(b - a));
                // From block `a` on, unless a client wrote it meanwhile.
                match self.cor.next_absent(a, end - a) {
                    Some((from, to)) if from == a => (a, to.min(end), true),
                    _ => (a, b, false),
                }
            }
            _ => (a, b, false),
        }
    }

    /// Bytes of blocks `[a, b)` that the source holds as data (all of them
    /// when it cannot say: pacing then errs on the slow side).
    async fn data_bytes(&self, map: &SourceMap, a: u64, b: u64, gran: u64) -> u64 {
        let size = self.source.identity().size;
        let zero = map
            .zeroes(a, b, gran)
            .await
            .unwrap_or_else(|_| vec![false; (b - a) as usize]);
        (a..b)
            .filter(|i| !zero[(i - a) as usize])
            .map(|i| ((i + 1) * gran).min(size) - i * gran)
            .sum()
    }

    /// Every block is here: make it durable, then let the source go.
    async fn finish(&self) -> bool {
        let cor = self.cor.clone();
        match tokio::task::spawn_blocking(move || cor.settle()).await {
            Ok(Ok(true)) => {
                let _ = self.completed_at.set(SystemTime::now());
                self.source.close();
                tracing::info!(
                    source = %self.uri,
                    fetched = self.fetched_bytes(),
                    on_demand = self.cor.progress().fetched_on_demand,
                    "hydration complete: the disk no longer needs its source"
                );
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(e)) => {
                self.note_error(&e);
                false
            }
            Err(e) => {
                self.note_error(&e);
                false
            }
        }
    }

    /// Bytes read from the source since this daemon started, by clients
    /// and by the pass.
    fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed) + self.cor.progress().fetched_on_demand
    }

    fn sample(&self) {
        let now = Instant::now();
        let total = self.fetched_bytes();
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back((now, total));
        while s.len() > 2 && now.duration_since(s[0].0) > RATE_WINDOW {
            s.pop_front();
        }
    }

    /// Where the disk stands, for the status route.
    pub fn status(&self, disk: &str) -> HydrationStatus {
        let p = self.cor.progress();
        // Complete once the source is let go, not as soon as every block
        // is here: blocks readers fetched or clients wrote are durably
        // present only after the next sync, and a crash before it would
        // need the source again.
        let complete = self.completed_at.get().is_some();
        let rate = {
            let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            match (s.front(), s.back()) {
                (Some(a), Some(b)) if b.0 > a.0 && !complete => {
                    (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
                }
                _ => 0.0,
            }
        };
        let left = p.total_bytes - p.present_bytes;
        let src = self.source.status();
        let source = if complete {
            "detached"
        } else if src.connected {
            "connected"
        } else {
            "reconnecting"
        };
        HydrationStatus {
            disk: disk.to_string(),
            source_uri: self.uri.clone(),
            present_bytes: p.present_bytes,
            total_bytes: p.total_bytes,
            rate: rate as u64,
            eta_seconds: (rate > 0.0).then(|| (left as f64 / rate).ceil() as u64),
            fetched_bytes: self.fetched_bytes(),
            fetched_on_demand_bytes: p.fetched_on_demand,
            source: source.to_string(),
            reconnects: src.reconnects,
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .or(src.last_error),
            complete,
            started_at: unix_seconds(&self.started_at),
            completed_at: unix_seconds(&self.completed_at),
        }
    }
}

fn unix_seconds(t: &OnceLock<SystemTime>) -> Option<f64> {
    let t = t.get()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

/// Why a fetch of the background pass failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Source(#[from] RemoteError),
    #[error("cannot store fetched blocks: {0}")]
    Local(String),
    /// Every fetch would be read and then lost: the pass stops.
    #[error("cannot store fetched blocks: {0}")]
    Writer(#[from] Stopped),
}

/// A fetch's claim once its blocks are written, for a sync to make them
/// present, and its share of the pass's window (or of the zeroes').
type Landed = (Claim<Arc<CopyOnRead>>, OwnedSemaphorePermit);

/// Fetches the claimed runs: the source's holes and zeroes land as holes;
/// data is read in whole blocks and written (all-zero data as a hole too,
/// so the local file stays sparse).
async fn fetch(
    source: Arc<Remote>,
    writer: SerialThread,
    map: Arc<SourceMap>,
    mut claim: Claim<Arc<CopyOnRead>>,
    (gran, max_blocks): (u64, u64),
    fetched: Arc<AtomicU64>,
    (landed, share): (mpsc::UnboundedSender<Landed>, OwnedSemaphorePermit),
) -> Result<(), FetchError> {
    let size = source.identity().size;
    for (a, b) in claim.runs() {
        let zero = map.zeroes(a, b, gran).await?;
        let mut i = a;
        while i < b {
            let is_zero = zero[(i - a) as usize];
            let mut j = i + 1;
            // Data one request size at a time: a claim of zeroes may hold
            // data after all, where the source's answer ran short.
            while j < b && zero[(j - a) as usize] == is_zero && (is_zero || j - i < max_blocks) {
                j += 1;
            }
            let (s, e) = (i * gran, (j * gran).min(size));
            let data = if is_zero {
                None
            } else {
                // From the server's pool of I/O buffers: a fresh 1 MiB
                // buffer per fetch went back to the system when freed (one
                // trimmed malloc arena) and was faulted in again for the
                // next one; reusing them made a full-speed pass onto tmpfs
                // 5-7% faster.
                let mut buf = nbd_server::POOL.get((e - s) as usize);
                buf.truncate((e - s) as usize);
                let d = source.read_into(Lane::Bulk, s, buf).await?;
                fetched.fetch_add(e - s, Ordering::Relaxed);
                Some(d)
            };
            let written;
            // All-zero data needs no check here: landing writes zero pages
            // as holes.
            (claim, written) = writer
                .run(move || {
                    claim
                        .land(i, e - s, data.as_deref())
                        .map(|()| (claim, data))
                })
                .await?
                .map_err(|e| FetchError::Local(e.to_string()))?;
            if let Some(buf) = written {
                nbd_server::POOL.put(buf);
            }
            i = j;
        }
    }
    // The settler outlives the pass's tasks: a send fails only at shutdown,
    // and the claim then lets its blocks go, absent.
    let _ = landed.send((claim, share));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_in_flight_hold_32_mib_whatever_the_block_size() {
        let opts = HydrateOptions::default();
        let shape = |gran| {
            let s = Shape::of(&opts, gran);
            (s.requests, s.max_blocks, s.window_blocks)
        };
        assert_eq!(shape(4 << 10), (32, 256, 16384));
        assert_eq!(shape(64 << 10), (32, 16, 1024));
        assert_eq!(shape(1 << 20), (32, 1, 64));
        // Larger blocks: fewer fetches; the window holds two of them.
        assert_eq!(shape(2 << 20), (16, 1, 32));
        assert_eq!(shape(64 << 20), (1, 1, 2));
    }
}
