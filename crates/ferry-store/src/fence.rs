//! The write fence at the top of a live disk's stack.
//!
//! Every write-like request holds the fence (shared) from before the
//! layers below start their durability work until its data write
//! returns. An operation that changes what the layers consult (a snapshot
//! or checkpoint created or deleted, a revert) holds it exclusively: it
//! waits for writes in flight and holds new ones back. So a snapshot holds
//! exactly the writes acknowledged before its creation returned, and a
//! checkpoint boundary never splits a write. Reads never take it.

use std::sync::{Arc, RwLock, RwLockWriteGuard};

use ferry_block::{BlockDev, Layer, Result, ZeroMode};

pub struct WriteFence {
    next: Arc<dyn BlockDev>,
    lock: RwLock<()>,
}

impl WriteFence {
    pub(crate) fn new(next: Arc<dyn BlockDev>) -> Self {
        WriteFence {
            next,
            lock: RwLock::new(()),
        }
    }

    /// Holds writes back until the guard is dropped (after those in
    /// flight finish).
    pub(crate) fn hold(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    fn pass<T>(&self, op: impl FnOnce(&dyn BlockDev) -> Result<T>) -> Result<T> {
        let _shared = self.lock.read().unwrap_or_else(|e| e.into_inner());
        op(&*self.next)
    }
}

impl Layer for WriteFence {
    fn next(&self) -> &dyn BlockDev {
        &*self.next
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<()> {
        self.pass(|n| n.prepare_write(offset, len))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.pass(|n| n.write_at(buf, offset, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.pass(|n| n.write_zeroes(offset, len, mode))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.pass(|n| n.trim(offset, len, fua))
    }
}
