//! Reusable I/O buffers. Fresh large allocations cost page faults (and
//! calloc a memset) on every request; recycled ones cost nothing, and
//! `pread` overwrites them, so they are never zero-filled again.
//!
//! What the pool keeps is bounded (per size class and in total), and
//! [`BufPool::trim`], run every few seconds by the server, frees the
//! buffers that sat unused for a whole interval: after a burst the memory
//! goes back to the system instead of staying with the process.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Smallest pooled size class (4 KiB); classes go up by powers of two.
const MIN_CLASS: u32 = 12;
const CLASSES: usize = 14; // 4 KiB ..= 32 MiB
/// Idle buffers kept per class, and at most this many bytes per class:
/// enough for nbdcopy's 4 connections x 64 requests of 256 KiB. A buffer
/// the pool cannot keep goes back to the allocator.
const MAX_IDLE: usize = 256;
const MAX_IDLE_BYTES: usize = 64 << 20;
/// Most idle bytes kept over all classes.
const MAX_IDLE_TOTAL: usize = 128 << 20;

pub struct BufPool {
    classes: [Mutex<Class>; CLASSES],
    idle_bytes: AtomicUsize,
    idle_limit: AtomicUsize,
}

struct Class {
    /// Most recently returned last: `get` takes the warmest buffer.
    idle: Vec<Vec<u8>>,
    /// The fewest idle buffers since the last trim: that many were not
    /// needed during the whole interval.
    low: usize,
}

/// The process-wide pool.
pub static POOL: BufPool = BufPool::new();

fn class_of(len: usize) -> Option<usize> {
    let bits = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS);
    let c = (bits - MIN_CLASS) as usize;
    (c < CLASSES).then_some(c)
}

impl BufPool {
    pub const fn new() -> Self {
        BufPool {
            classes: [const {
                Mutex::new(Class {
                    idle: Vec::new(),
                    low: 0,
                })
            }; CLASSES],
            idle_bytes: AtomicUsize::new(0),
            idle_limit: AtomicUsize::new(MAX_IDLE_TOTAL),
        }
    }

    fn class(&self, c: usize) -> std::sync::MutexGuard<'_, Class> {
        self.classes[c].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps at most `bytes` (and at most 128 MiB) of idle buffers over
    /// all classes.
    pub fn limit_idle(&self, bytes: usize) {
        self.idle_limit
            .store(bytes.min(MAX_IDLE_TOTAL), Ordering::Relaxed);
    }

    /// A buffer of at least `len` bytes (its whole size class) with
    /// unspecified content; callers use the first `len` bytes.
    pub fn get(&self, len: usize) -> Vec<u8> {
        match class_of(len) {
            Some(c) => {
                let recycled = {
                    let mut class = self.class(c);
                    let buf = class.idle.pop();
                    class.low = class.low.min(class.idle.len());
                    buf
                };
                match recycled {
                    Some(buf) => {
                        self.idle_bytes.fetch_sub(buf.len(), Ordering::Relaxed);
                        buf
                    }
                    None => vec![0u8; 1 << (c as u32 + MIN_CLASS)],
                }
            }
            None => vec![0u8; len],
        }
    }

    pub fn put(&self, buf: Vec<u8>) {
        let cap = buf.len();
        if !cap.is_power_of_two() {
            return;
        }
        let Some(c) = class_of(cap) else { return };
        let mut class = self.class(c);
        let fits_class =
            class.idle.len() < MAX_IDLE && (class.idle.len() + 1) * cap <= MAX_IDLE_BYTES;
        let limit = self.idle_limit.load(Ordering::Relaxed);
        let total = self.idle_bytes.fetch_add(cap, Ordering::Relaxed) + cap;
        if fits_class && total <= limit {
            class.idle.push(buf);
        } else {
            self.idle_bytes.fetch_sub(cap, Ordering::Relaxed);
        }
    }

    /// Frees the buffers no request needed since the last trim (the
    /// coldest ones); returns how many bytes that was.
    pub fn trim(&self) -> usize {
        let mut freed = 0;
        for c in 0..CLASSES {
            let unused: Vec<Vec<u8>> = {
                let mut class = self.class(c);
                let n = class.low.min(class.idle.len());
                let unused = class.idle.drain(..n).collect();
                class.low = class.idle.len();
                unused
            };
            let bytes: usize = unused.iter().map(Vec::len).sum();
            self.idle_bytes.fetch_sub(bytes, Ordering::Relaxed);
            freed += bytes;
        }
        freed
    }

    /// Bytes held by idle buffers.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle_bytes.load(Ordering::Relaxed)
    }
}

/// Hands the allocator's free memory back to the system. glibc keeps
/// freed blocks in its arenas (it raises its mmap threshold to the largest
/// block freed, up to 32 MiB, so request buffers come from the arenas):
/// after a burst of large requests a process kept over a GiB it no longer
/// used. Fixing the threshold instead cost about 15% more server CPU in
/// nbdcopy's steady state, so the memory is released after the burst,
/// when the pool has found buffers unused. Walks every arena: run it on
/// the blocking pool. A no-op elsewhere than glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // heaps to the system, under the allocator's locks; no live memory is
    // touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes every thread allocate from glibc's main arena. `malloc_trim`
/// returns the free pages inside any arena, but the free top of a thread's
/// own arena only goes back when a free lands there while that top is above
/// the trim threshold, which glibc raises to twice the largest buffer freed
/// (32 MiB after 16 MiB WRITE payloads): after a flood of large requests,
/// each worker's arena could keep tens of MiB that no trim reached. With one
/// arena the trim reaches all of it. Server CPU per GiB and IOPS measured
/// the same either way (bench-server.sh). Call it before any thread starts.
pub fn use_one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning, under its locks;
    // arenas that exist already stay valid.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Free memory the allocator keeps beyond which it is handed back even
/// when the pool found nothing unused: buffers that never went through
/// the pool (the payloads of cut connections; with zero-copy reads, most
/// READs take no buffer at all) would otherwise stay with the process.
const RELEASE_ABOVE: usize = 32 << 20;

/// Whether the allocator holds more than [`RELEASE_ABOVE`] of free
/// memory. Walks every arena: run it on the blocking pool.
pub fn much_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics, under
        // its locks.
        let info = unsafe { libc::mallinfo2() };
        info.fordblks > RELEASE_ABOVE
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_by_class() {
        let pool = BufPool::new();
        let a = pool.get(300_000);
        assert_eq!(a.len(), 512 * 1024);
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.get(262_145);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(pool.get(0).len(), 4096);
        assert_eq!(pool.get(64 << 20).len(), 64 << 20);
    }

    #[test]
    fn idle_buffers_are_bounded_in_total() {
        let pool = BufPool::new();
        pool.limit_idle(3 << 20);
        let bufs: Vec<_> = (0..8).map(|_| pool.get(1 << 20)).collect();
        for b in bufs {
            pool.put(b);
        }
        assert_eq!(pool.idle(), 3 << 20);
    }

    #[test]
    fn trim_frees_what_an_interval_did_not_use() {
        let pool = BufPool::new();
        let burst: Vec<_> = (0..8).map(|_| pool.get(64 << 10)).collect();
        for b in burst {
            pool.put(b);
        }
        pool.trim(); // starts an interval with 8 idle buffers
        // Steady use of two buffers at a time.
        for _ in 0..10 {
            let (a, b) = (pool.get(64 << 10), pool.get(64 << 10));
            pool.put(a);
            pool.put(b);
        }
        assert_eq!(pool.trim(), 6 * (64 << 10), "the six unused are freed");
        assert_eq!(pool.idle(), 2 * (64 << 10));
        pool.trim();
        assert_eq!(pool.idle(), 0, "an idle interval frees the rest");
    }
}
