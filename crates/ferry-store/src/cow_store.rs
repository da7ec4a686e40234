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
//! Large runs of slots (a sequential overwrite) are written with `O_DIRECT`
//! where the filesystem allows it: the copy must reach the disk before the
//! origin write anyway, so the page cache would only add a memory copy and
//! writeback work (the store is rarely read back). Single slots of random
//! writers go through the page cache, where one group sync flushes many.
//!
//! Which snapshots a record belongs to is not stored: replaying the valid
//! records in LSN order and giving each to every existing snapshot that is
//! not newer than its `snap_seq` and has no slot for that block yet
//! rebuilds exactly the maps that were in memory (see `origin.rs`). So a
//! block is preserved once however many snapshots share it, and deleting a
//! snapshot is a manifest update plus punching the slots nobody else uses.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{FallocateFlags, OFlags};
use rustix::io::Errno;
use xxhash_rust::xxh3::xxh3_64;

use crate::aligned::AlignedBuf;
use crate::io::{datasync, pread_full, pwrite_all};
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

/// Runs of slots at least this large are written with O_DIRECT.
const DIRECT_MIN: usize = 512 << 10;

/// Slot buffers kept for reuse: at most this many, each at most
/// `POOL_BUF_MAX` bytes (a sequential writer's batch fits).
const POOL_BUFS: usize = 4;
const POOL_BUF_MAX: usize = 8 << 20;

struct Alloc {
    next: u64,
    /// Free slots, sorted descending so that `pop` hands out ascending,
    /// mostly consecutive slots: one write per batch.
    free: Vec<u64>,
}

pub(crate) struct CowStore {
    /// Buffered: scans, reads, hole punching and syncs.
    file: File,
    /// The same file opened `O_DIRECT`, for slot writes; `None` (or
    /// `direct_ok` false after an EINVAL) where the filesystem refuses.
    direct: Option<File>,
    direct_ok: AtomicBool,
    gran: u64,
    alloc: Mutex<Alloc>,
    lsn: AtomicU64,
    sync: GroupSync,
    bufs: Mutex<Vec<AlignedBuf>>,
}

impl CowStore {
    fn slot_size(&self) -> u64 {
        HDR + self.gran
    }

    fn slot_off(&self, slot: u64) -> u64 {
        slot * self.slot_size()
    }

    pub fn create(path: &Path, gran: u64) -> io::Result<Self> {
        Ok(Self::over(
            path,
            crate::manifest::create_zeroed(path, 0)?,
            gran,
        ))
    }

    /// A store over `file` (at `path`) with nothing allocated yet.
    fn over(path: &Path, file: File, gran: u64) -> Self {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(OFlags::DIRECT.bits() as i32)
            .open(path)
            .inspect_err(|e| tracing::debug!("{}: no O_DIRECT ({e})", path.display()))
            .ok();
        CowStore {
            file,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            gran,
            alloc: Mutex::new(Alloc {
                next: 0,
                free: Vec::new(),
            }),
            lsn: AtomicU64::new(1),
            sync: GroupSync::default(),
            bufs: Mutex::new(Vec::new()),
        }
    }

    /// Opens the store and returns its valid records, in slot order.
    /// Invalid (torn, punched) slots become free space.
    pub fn open(path: &Path, gran: u64) -> io::Result<(Self, Vec<Record>)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        let mut store = Self::over(path, file, gran);
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
        free.reverse();
        store.alloc = Mutex::new(Alloc { next: nslots, free });
        Ok((store, recs))
    }

    /// Writes one preserved block into a free slot (see `write_many`).
    #[cfg(test)]
    pub fn write(&self, block: u64, snap_seq: u64, data: &[u8]) -> io::Result<u64> {
        let slots = self.write_many(snap_seq, &[(block, data.len())], |bufs| {
            bufs[0].copy_from_slice(data);
            Ok::<_, io::Error>(())
        })?;
        Ok(slots[0])
    }

    /// Preserves blocks: `fill` gets one buffer per item `(block, len)`, in
    /// order, `len` bytes each (at most the granularity), and puts the
    /// blocks' old data in them (one vectored read for a run); each record
    /// goes into a free slot. Returns the slots. Consecutive slots go out
    /// in one write. Not durable until [`commit`](Self::commit) returns.
    pub fn write_many<E: From<io::Error>>(
        &self,
        snap_seq: u64,
        items: &[(u64, usize)],
        fill: impl FnOnce(&mut [io::IoSliceMut<'_>]) -> Result<(), E>,
    ) -> Result<Vec<u64>, E> {
        let slot = self.slot_size() as usize;
        let mut buf = self.take_buf(items.len() * slot);
        let mut datas: Vec<io::IoSliceMut<'_>> = buf
            .chunks_mut(slot)
            .zip(items)
            .map(|(s, &(_, len))| {
                debug_assert!(len > 0 && len as u64 <= self.gran);
                io::IoSliceMut::new(&mut s[HDR as usize..HDR as usize + len])
            })
            .collect();
        fill(&mut datas)?;
        drop(datas);
        for (k, &(block, len)) in items.iter().enumerate() {
            let (hdr, data) = buf[k * slot..(k + 1) * slot].split_at_mut(HDR as usize);
            data[len..].fill(0);
            let lsn = self.lsn.fetch_add(1, Ordering::Relaxed);
            let fields = [
                MAGIC,
                lsn,
                block,
                snap_seq,
                len as u64,
                xxh3_64(&data[..len]),
            ];
            for (i, v) in fields.iter().enumerate() {
                hdr[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            let h = xxh3_64(&hdr[..48]);
            hdr[48..56].copy_from_slice(&h.to_le_bytes());
        }
        let slots = self.alloc_slots(items.len());
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                j += 1;
            }
            if let Err(e) = self.write_slots(&buf[i * slot..j * slot], self.slot_off(slots[i])) {
                // Nothing points at these slots yet: they are free again,
                // and punched, so that no record written before the
                // failure is replayed after a restart.
                let _ = self.release(&slots);
                return Err(e.into());
            }
            i = j;
        }
        self.put_buf(buf);
        Ok(slots)
    }

    fn alloc_slots(&self, n: usize) -> Vec<u64> {
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        (0..n)
            .map(|_| match a.free.pop() {
                Some(s) => s,
                None => {
                    a.next += 1;
                    a.next - 1
                }
            })
            .collect()
    }

    fn free_slots(&self, slots: &[u64]) {
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        a.free.extend_from_slice(slots);
        a.free.sort_unstable_by(|x, y| y.cmp(x));
        a.free.dedup();
    }

    /// Writes whole slots at `off`: a large run directly where possible, a
    /// small one through the page cache (the next group sync writes many
    /// of those at once, where each direct write would wait for the disk).
    fn write_slots(&self, mut bytes: &[u8], mut off: u64) -> io::Result<()> {
        if let Some(direct) = self.direct.as_ref().filter(|_| bytes.len() >= DIRECT_MIN) {
            while self.direct_ok.load(Ordering::Relaxed) && !bytes.is_empty() {
                match rustix::io::pwrite(direct, bytes, off) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        bytes = &bytes[n..];
                        off += n as u64;
                    }
                    Err(Errno::INTR) => {}
                    Err(Errno::INVAL) => {
                        tracing::debug!("O_DIRECT write refused; preserved blocks go buffered");
                        self.direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        pwrite_all(&self.file, bytes, off)
    }

    /// A zeroed-once, aligned buffer of at least `len` bytes (its tail
    /// beyond `len` is unused). Slots sit at the same offsets in every use
    /// of a buffer, so the unused part of each header stays zero.
    fn take_buf(&self, len: usize) -> AlignedBuf {
        let mut pool = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        match pool.iter().position(|b| b.len() >= len) {
            Some(i) => pool.swap_remove(i),
            None => AlignedBuf::zeroed(len),
        }
    }

    fn put_buf(&self, buf: AlignedBuf) {
        let mut pool = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() <= POOL_BUF_MAX && pool.len() < POOL_BUFS {
            pool.push(buf);
        }
    }

    /// Makes every record written so far durable (shared `fdatasync`).
    pub fn commit(&self) -> io::Result<()> {
        self.sync.sync(|| datasync(&self.file))
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
        self.free_slots(slots);
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

    #[test]
    fn direct_and_buffered_writes_read_back_alike() {
        const G: u64 = 65536;
        let d = tempfile::tempdir().unwrap();
        for direct in [true, false] {
            let p = d.path().join(format!("cow-{direct}.store"));
            let s = CowStore::create(&p, G).unwrap();
            // Where the filesystem refuses O_DIRECT both rounds go buffered.
            s.direct_ok.store(direct, Ordering::Relaxed);
            // Ten slots: a run large enough to go direct.
            let items: Vec<(u64, usize)> = (0..10).map(|b| (b, (G - b) as usize)).collect();
            let slots = s
                .write_many(9, &items, |bufs| {
                    for (k, buf) in bufs.iter_mut().enumerate() {
                        buf.fill(k as u8 + 1);
                    }
                    Ok::<_, io::Error>(())
                })
                .unwrap();
            assert_eq!(
                slots,
                (0..10).collect::<Vec<u64>>(),
                "fresh slots are consecutive"
            );
            s.commit().unwrap();
            drop(s);
            let (s, recs) = CowStore::open(&p, G).unwrap();
            assert_eq!(recs.len(), 10);
            for r in &recs {
                let mut b = [0u8; 2];
                s.read(r.slot, G - 2 - r.block, &mut b).unwrap();
                assert_eq!(b, [r.slot as u8 + 1; 2], "direct={direct} slot {}", r.slot);
            }
        }
    }
}
