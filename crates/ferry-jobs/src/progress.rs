//! Progress counters the copy updates and a front end (bar, JSON lines)
//! reads. Lock-free so workers never wait on the display.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the source handled (copied, zeroed or skipped).
    done: AtomicU64,
    /// Total bytes; 0 while unknown (stream source).
    total: AtomicU64,
}

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    pub(crate) fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
}
