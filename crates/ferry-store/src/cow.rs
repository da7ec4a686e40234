//! The preserved-block store shared by all snapshots of one disk
//! (`cow.store`).
//!
//! The file is an array of slots; a slot is a 4 KiB header followed by one
//! block (granularity bytes) of old origin data. The header names the
//! block, a log sequence number, the newest snapshot at preservation time
//! and checksums of itself and of the data, so the file is its own journal:
//! header and data go out in one `pwrite` and one (group) `fdatasync`
//! makes them durable before the origin block is overwritten. A record
//! whose checksums do not match was torn by a crash before that sync,
//! which means the origin write it protected was never issued: it is
//! simply free space.
//!
//! Which snapshots a record belongs to is not stored: replaying the valid
//! records in LSN order and giving each to every existing snapshot that is
//! not newer than its `snap_seq` and has no slot for that block yet
//! rebuilds exactly the maps that were in memory (see `volume.rs`). So a
//! block is preserved once however many snapshots share it, and deleting a
//! snapshot is a manifest update plus punching the slots nobody else uses.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::FallocateFlags;
use xxhash_rust::xxh3::xxh3_64;

use crate::sync::GroupSync;

const HDR: u64 = 4096;
const HDR_USED: usize = 56;
const MAGIC: u64 = u64::from_le_bytes(*b"NBDFCOW1");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub slot: u64,
    pub lsn: u64,
    pub block: u64,
    pub snap_seq: u64,
}

struct Alloc {
    next: u64,
    free: Vec<u64>,
}

pub(crate) struct CowStore {
    file: File,
    gran: u64,
    alloc: Mutex<Alloc>,
    lsn: AtomicU64,
    sync: GroupSync,
}

fn pwrite_all(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(file, buf, off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(crate) fn pread_full(file: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pread(file, &mut *buf, off) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(crate) fn pwrite(file: &File, buf: &[u8], off: u64) -> io::Result<()> {
    pwrite_all(file, buf, off)
}

impl CowStore {
    fn slot_size(&self) -> u64 {
        HDR + self.gran
    }

    fn slot_off(&self, slot: u64) -> u64 {
        slot * self.slot_size()
    }

    pub fn create(path: &Path, gran: u64) -> io::Result<Self> {
        Ok(Self::over(crate::meta::create_zeroed(path, 0)?, gran))
    }

    /// A store over `file` with nothing allocated yet.
    fn over(file: File, gran: u64) -> Self {
        CowStore {
            file,
            gran,
            alloc: Mutex::new(Alloc {
                next: 0,
                free: Vec::new(),
            }),
            lsn: AtomicU64::new(1),
            sync: GroupSync::default(),
        }
    }

    /// Opens the store and returns its valid records, in slot order.
    /// Invalid (torn, punched) slots become free space.
    pub fn open(path: &Path, gran: u64) -> io::Result<(Self, Vec<Record>)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        let mut store = Self::over(file, gran);
        let nslots = len.div_ceil(store.slot_size());
        let mut recs = Vec::new();
        let mut free = Vec::new();
        let mut buf = vec![0u8; store.slot_size() as usize];
        let mut max_lsn = 0;
        for slot in 0..nslots {
            pread_full(&store.file, &mut buf, store.slot_off(slot))?;
            match parse(&buf, gran) {
                Some(mut r) => {
                    r.slot = slot;
                    max_lsn = max_lsn.max(r.lsn);
                    recs.push(r);
                }
                None => free.push(slot),
            }
        }
        store.lsn = AtomicU64::new(max_lsn + 1);
        store.alloc = Mutex::new(Alloc { next: nslots, free });
        Ok((store, recs))
    }

    /// Writes one preserved block into a free slot (see `write_many`).
    #[cfg(test)]
    pub fn write(&self, block: u64, snap_seq: u64, data: &[u8]) -> io::Result<u64> {
        Ok(self.write_many(snap_seq, &[(block, data)])?[0])
    }

    /// Writes preserved blocks `(block, old data)` into free slots and
    /// returns the slots. Consecutive slots go out in one `pwritev`. Not
    /// durable until [`commit`](Self::commit) returns.
    pub fn write_many(&self, snap_seq: u64, items: &[(u64, &[u8])]) -> io::Result<Vec<u64>> {
        let slots: Vec<u64> = {
            let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            (0..items.len())
                .map(|_| match a.free.pop() {
                    Some(s) => s,
                    None => {
                        a.next += 1;
                        a.next - 1
                    }
                })
                .collect()
        };
        let mut hdrs = vec![0u8; items.len() * HDR as usize];
        for ((block, data), hdr) in items.iter().zip(hdrs.chunks_mut(HDR as usize)) {
            debug_assert!(data.len() as u64 <= self.gran);
            let lsn = self.lsn.fetch_add(1, Ordering::Relaxed);
            let fields = [
                MAGIC,
                lsn,
                *block,
                snap_seq,
                data.len() as u64,
                xxh3_64(data),
            ];
            for (i, v) in fields.iter().enumerate() {
                hdr[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            let h = xxh3_64(&hdr[..48]);
            hdr[48..56].copy_from_slice(&h.to_le_bytes());
        }
        let hdr = |i: usize| &hdrs[i * HDR as usize..(i + 1) * HDR as usize];
        // Runs of consecutive slots with full blocks (a short last block
        // ends a run), at most 512 slots (IOV_MAX is 1024).
        let mut i = 0;
        while i < items.len() {
            let mut j = i + 1;
            while j < items.len()
                && j - i < 512
                && slots[j] == slots[j - 1] + 1
                && items[j - 1].1.len() as u64 == self.gran
            {
                j += 1;
            }
            let iov: Vec<io::IoSlice<'_>> = (i..j)
                .flat_map(|k| [io::IoSlice::new(hdr(k)), io::IoSlice::new(items[k].1)])
                .collect();
            let total: usize = iov.iter().map(|v| v.len()).sum();
            let n = rustix::io::pwritev(&self.file, &iov, self.slot_off(slots[i])).unwrap_or(0);
            if n < total {
                // Short or failed: write slot by slot (rewriting the same
                // bytes is harmless).
                for k in i..j {
                    let mut buf = hdr(k).to_vec();
                    buf.extend_from_slice(items[k].1);
                    pwrite_all(&self.file, &buf, self.slot_off(slots[k]))?;
                }
            }
            i = j;
        }
        Ok(slots)
    }

    /// Makes every record written so far durable (shared `fdatasync`).
    pub fn commit(&self) -> io::Result<()> {
        self.sync
            .sync(|| rustix::fs::fdatasync(&self.file).map_err(io::Error::from))
    }

    /// Reads `buf.len()` bytes of the block in `slot`, from `off` within it.
    pub fn read(&self, slot: u64, off: u64, buf: &mut [u8]) -> io::Result<()> {
        pread_full(&self.file, buf, self.slot_off(slot) + HDR + off)
    }

    /// Gives slots back: their space is punched out of the file at once
    /// (delete frees space without copying) and they are reused later.
    /// Callers only release slots after the manifest change that orphaned
    /// them is durable.
    pub fn release(&self, slots: &[u64]) -> io::Result<()> {
        for &slot in slots {
            let r = rustix::fs::fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                self.slot_off(slot),
                self.slot_size(),
            );
            if r.is_err() {
                // No hole punching here: at least kill the header so the
                // slot cannot be replayed.
                pwrite_all(&self.file, &[0u8; HDR_USED], self.slot_off(slot))?;
            }
        }
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        a.free.extend_from_slice(slots);
        Ok(())
    }
}

fn parse(buf: &[u8], gran: u64) -> Option<Record> {
    let f = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if f(0) != MAGIC || f(6) != xxh3_64(&buf[..48]) {
        return None;
    }
    let len = f(4);
    if len == 0 || len > gran {
        return None;
    }
    let data = &buf[HDR as usize..HDR as usize + len as usize];
    if xxh3_64(data) != f(5) {
        return None;
    }
    Some(Record {
        slot: 0,
        lsn: f(1),
        block: f(2),
        snap_seq: f(3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_torn_ones_are_free() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cow.store");
        let s = CowStore::create(&p, 8192).unwrap();
        let a = s.write(5, 1, &[1u8; 8192]).unwrap();
        let b = s.write(7, 2, &[2u8; 100]).unwrap();
        s.commit().unwrap();
        // Tear b's data as a crash before the sync could.
        pwrite_all(&s.file, &[9u8; 10], s.slot_off(b) + HDR).unwrap();
        drop(s);
        let (s, recs) = CowStore::open(&p, 8192).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!((recs[0].slot, recs[0].block, recs[0].snap_seq), (a, 5, 1));
        let mut buf = [0u8; 4];
        s.read(a, 8000, &mut buf).unwrap();
        assert_eq!(buf, [1u8; 4]);
        // The torn slot is reused first.
        assert_eq!(s.write(9, 3, &[3u8; 8192]).unwrap(), b);
        assert!(recs[0].lsn < s.lsn.load(Ordering::Relaxed));
    }
}
