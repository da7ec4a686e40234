//! A device in memory, for tests of the layers and of the server: it needs
//! no file system, allocates 4 KiB pages as they are written (so
//! `base:allocation` has holes to report), and can call a hook before each
//! change, so a test can check what a layer above made durable first.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::dev::{BlockDev, Caps, ZeroMode, check_range};
use crate::error::{Error, Result};
use crate::extent::{Extent, block_extents};
use crate::{BASE_ALLOCATION, STATE_HOLE_ZERO};

const PAGE: u64 = 4096;

/// A change about to be made to a [`MemDev`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Write { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Trim { offset: u64, len: u64 },
}

type Hook = Box<dyn Fn(Change) + Send + Sync>;

struct Pages {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

pub struct MemDev {
    pages: RwLock<Pages>,
    read_only: bool,
    hook: Option<Hook>,
}

impl MemDev {
    /// `size` bytes of zeroes, all unallocated.
    pub fn new(size: u64) -> Self {
        MemDev {
            pages: RwLock::new(Pages {
                data: vec![0; size as usize],
                allocated: vec![false; size.div_ceil(PAGE) as usize],
            }),
            read_only: false,
            hook: None,
        }
    }

    /// A device holding `data`, every page allocated.
    pub fn with_data(data: Vec<u8>) -> Self {
        let dev = MemDev::new(0);
        let pages = (data.len() as u64).div_ceil(PAGE) as usize;
        *dev.pages.write().unwrap_or_else(|e| e.into_inner()) = Pages {
            data,
            allocated: vec![true; pages],
        };
        dev
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Calls `hook` before every change, with the device not yet changed.
    pub fn with_hook(mut self, hook: impl Fn(Change) + Send + Sync + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// The whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.read().data.clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, Pages> {
        self.pages.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Pages> {
        self.pages.write().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, c: Change, offset: u64, len: u64) -> Result<RwLockWriteGuard<'_, Pages>> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(self.size(), offset, len)?;
        if let Some(h) = &self.hook {
            h(c);
        }
        Ok(self.write())
    }

    /// Zeroes a range; pages it covers whole become holes when `unmap`.
    fn zero(p: &mut Pages, offset: u64, len: u64, unmap: bool) {
        p.data[offset as usize..(offset + len) as usize].fill(0);
        if unmap {
            let (a, b) = (offset.div_ceil(PAGE), (offset + len) / PAGE);
            for i in a..b {
                p.allocated[i as usize] = false;
            }
        }
    }
}

impl BlockDev for MemDev {
    fn size(&self) -> u64 {
        self.read().data.len() as u64
    }

    fn caps(&self) -> Caps {
        if self.read_only {
            return Caps::READ_ONLY;
        }
        Caps {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            rotational: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let p = self.read();
        check_range(p.data.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&p.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        let len = buf.len() as u64;
        let mut p = self.change(Change::Write { offset, len }, offset, len)?;
        p.data[offset as usize..(offset + len) as usize].copy_from_slice(buf);
        if len > 0 {
            for i in offset / PAGE..(offset + len).div_ceil(PAGE) {
                p.allocated[i as usize] = true;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let mut p = self.change(Change::Zero { offset, len }, offset, len)?;
        Self::zero(&mut p, offset, len, mode.may_trim);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        let mut p = self.change(Change::Trim { offset, len }, offset, len)?;
        Self::zero(&mut p, offset, len, true);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn contexts(&self) -> Vec<String> {
        vec![BASE_ALLOCATION.to_string()]
    }

    fn extents(&self, context: &str, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>> {
        if context != BASE_ALLOCATION {
            return Err(Error::UnknownContext(context.to_string()));
        }
        let p = self.read();
        check_range(p.data.len() as u64, offset, len)?;
        Ok(block_extents(offset, len, PAGE, max, |page| {
            if p.allocated[page as usize] {
                0
            } else {
                STATE_HOLE_ZERO
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn pages_allocate_on_write_and_zero_unmaps() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let d = MemDev::new(4 * PAGE).with_hook(move |c| log.lock().unwrap().push(c));
        d.write_at(&[1; 10], PAGE + 5, false).unwrap();
        let e = d.extents(BASE_ALLOCATION, 0, 4 * PAGE, 10).unwrap();
        let runs: Vec<(u64, u32)> = e.iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(runs, vec![(PAGE, 3), (PAGE, 0), (2 * PAGE, 3)]);
        let mode = ZeroMode {
            may_trim: true,
            fast: false,
            fua: false,
        };
        d.write_zeroes(PAGE, PAGE, mode).unwrap();
        assert_eq!(
            d.extents(BASE_ALLOCATION, 0, 4 * PAGE, 10).unwrap().len(),
            1
        );
        assert_eq!(d.contents(), vec![0; 4 * PAGE as usize]);
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(matches!(
            d.write_at(&[1], 4 * PAGE, false),
            Err(Error::OutOfRange { .. })
        ));
        let ro = MemDev::new(PAGE).read_only();
        assert!(matches!(ro.write_at(&[1], 0, false), Err(Error::ReadOnly)));
    }
}
