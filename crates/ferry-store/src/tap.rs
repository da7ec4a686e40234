//! The write tap of a live disk: where a job that must see every change
//! (a mirror) plugs in, and where writes are closed off once a disk has
//! moved elsewhere.
//!
//! With no tap and writes open, a change costs two atomic loads here. A
//! tap sees each change twice: before it goes down (to record what must
//! outlive a crash, e.g. "this block is not on the destination yet"), and after
//! (to repeat it elsewhere, for an active mirror), all under the disk's
//! write fence.
//!
//! A revert's reflinked ranges are changes too ([`Change::Cloned`]): the
//! tap sees their range but not their bytes, which never pass through
//! here; a tap that needs them reads them from the disk once the clone is
//! down.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use ferry_block::{BlockDev, Caps, Error, Layer, Result, ZeroMode};

/// A change to a disk, as a tap sees it before and after it goes down.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        mode: ZeroMode,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    /// The range now shares `from`'s blocks at the same offset (a revert
    /// to a reflink snapshot): its new bytes are on the disk once the
    /// change is down, not in hand before.
    Cloned {
        offset: u64,
        len: u64,
        from: &'a File,
    },
}

impl Change<'_> {
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Change::Write { offset, data, .. } => (offset, data.len() as u64),
            Change::Zeroes { offset, len, .. }
            | Change::Trim { offset, len }
            | Change::Cloned { offset, len, .. } => (offset, len),
        }
    }
}

/// Something that must see every change of a disk.
pub trait WriteTap: Send + Sync + 'static {
    /// `change` is about to go down: record what must outlive a crash (or
    /// start repeating it elsewhere, beside the local change). A returned
    /// ticket is handed back to [`Ticket::after`] once the change went down
    /// locally.
    fn before(self: Arc<Self>, change: Change<'_>) -> Result<Option<Box<dyn Ticket>>>;
}

/// What a tap asked to be told once a change has gone down.
pub trait Ticket: Send {
    /// The change went down locally (Err: it failed there).
    fn after(self: Box<Self>, change: Change<'_>, local: &Result<()>) -> Result<()>;
}

pub struct Tap {
    next: Arc<dyn BlockDev>,
    on: AtomicBool,
    tap: RwLock<Option<Arc<dyn WriteTap>>>,
    closed: AtomicBool,
}

impl Tap {
    pub(crate) fn new(next: Arc<dyn BlockDev>) -> Self {
        Tap {
            next,
            on: AtomicBool::new(false),
            tap: RwLock::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// Plugs `tap` in (None: out). Only with the write fence held, so no
    /// change is half seen.
    pub(crate) fn set(&self, tap: Option<Arc<dyn WriteTap>>) {
        let on = tap.is_some();
        *self.tap.write().unwrap_or_else(|e| e.into_inner()) = tap;
        self.on.store(on, Ordering::Release);
    }

    /// Refuses every change from now on (the disk lives elsewhere).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn change(&self, change: Change<'_>) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ReadOnly);
        }
        if !self.on.load(Ordering::Acquire) {
            return self.apply(change);
        }
        let tap = self.tap.read().unwrap_or_else(|e| e.into_inner()).clone();
        let ticket = match tap {
            Some(t) => t.before(change)?,
            None => None,
        };
        let local = self.apply(change);
        match ticket {
            Some(t) => {
                t.after(change, &local)?;
                local
            }
            None => local,
        }
    }

    fn apply(&self, change: Change<'_>) -> Result<()> {
        match change {
            Change::Write { offset, data, fua } => self.next.write_at(data, offset, fua),
            Change::Zeroes { offset, len, mode } => self.next.write_zeroes(offset, len, mode),
            Change::Trim { offset, len } => self.next.trim(offset, len, false),
            Change::Cloned { offset, len, from } => self.next.clone_range(from, offset, len),
        }
    }
}

impl Layer for Tap {
    fn next(&self) -> &dyn BlockDev {
        &*self.next
    }

    fn caps(&self) -> Caps {
        let caps = self.next.caps();
        if self.closed.load(Ordering::Acquire) {
            return Caps {
                read_only: true,
                ..caps
            };
        }
        caps
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let change = Change::Write {
            offset,
            data: buf,
            fua,
        };
        self.change(change)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.change(Change::Zeroes { offset, len, mode })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        if fua {
            // A tap repeats a trim without FUA; the flush below covers it.
            self.change(Change::Trim { offset, len })?;
            return self.next.flush();
        }
        self.change(Change::Trim { offset, len })
    }

    fn clone_range(&self, from: &File, offset: u64, len: u64) -> Result<()> {
        self.change(Change::Cloned { offset, len, from })
    }
}
