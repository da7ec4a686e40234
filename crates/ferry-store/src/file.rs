//! The bottom layer: a regular file or block device, with positional I/O
//! (no lock, no shared file offset), sparse-aware zeroing and extents, and
//! reflinked ranges where the file system has them.

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{Advice, FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use ferry_block::{
    BASE_ALLOCATION, BlockDev, Caps, Error, Extent, FileSpan, Result, STATE_HOLE_ZERO, ZeroMode,
    check_range,
};

use crate::io::{datasync, pread_full, pwrite_all};
/// Largest buffer used when zeroes have to be written as data.
const ZERO_CHUNK: usize = 1 << 20;
/// Most buffers one `preadv` takes.
const IOV_MAX: usize = 1024;

pub struct FileDev {
    /// Shared with replies that send from it (see [`FileSpan`]).
    file: Arc<File>,
    size: u64,
    read_only: bool,
    block_device: bool,
    /// The last runs of data SEEK_HOLE found. On tmpfs (and over
    /// unwritten extents elsewhere) SEEK_HOLE walks every page up to the
    /// next hole, and the server asks for holes before each read: serving
    /// a fully allocated 512 MiB image from tmpfs took 1.4-1.6 s against
    /// 0.2 s for qemu-nbd, which remembers one run the same way.
    data_runs: Mutex<DataRuns>,
    /// Set once `preadv2(RWF_NOWAIT)` answered EOPNOTSUPP (tmpfs does):
    /// reads that must not block then ask `cachestat` first. Without it,
    /// every read of a tmpfs image went to the blocking pool.
    no_nowait: AtomicBool,
}

/// Runs `[start, end)` known to be data, as of `generation`. Punching a
/// hole moves the generation on once done: a run looked for before then is
/// neither used nor kept. Writes by other processes can only turn this
/// data into zeroes, and calling zeroes data is always allowed
/// (`base:allocation` promises nothing more).
struct DataRuns {
    /// For readers in different parts of the file at once, and for random
    /// reads over a sparse region: with 4, fio randread QD32 over 128 MiB
    /// of the post-copy benchmark's image (64 runs of 1 MiB) on tmpfs got
    /// 72K IOPS, a third of the server's CPU walking pages for SEEK_HOLE.
    runs: [(u64, u64); KNOWN_RUNS],
    /// The one replaced next.
    next: usize,
    generation: u64,
}

/// How many runs of data [`DataRuns`] keeps: a lookup scans them all,
/// which costs far less than one `lseek`.
const KNOWN_RUNS: usize = 64;

impl Default for DataRuns {
    fn default() -> Self {
        DataRuns {
            runs: [(0, 0); KNOWN_RUNS],
            next: 0,
            generation: 0,
        }
    }
}

impl DataRuns {
    /// Where the known run of data that holds `pos` ends.
    fn end_of(&self, pos: u64) -> Option<u64> {
        self.runs
            .iter()
            .find(|(start, end)| (*start..*end).contains(&pos))
            .map(|r| r.1)
    }

    fn remember(&mut self, generation: u64, start: u64, end: u64) {
        if generation == self.generation && start < end {
            self.runs[self.next] = (start, end);
            self.next = (self.next + 1) % self.runs.len();
        }
    }

    /// `[offset, offset + len)` may read as holes now: runs over it are cut
    /// short where it starts, the rest are still true. (Forgetting every
    /// run made a hydrating disk on tmpfs walk pages again after each of
    /// the pass's zero runs: 0.82 of a plain export's reads, not 0.99.)
    fn forget(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        for run in &mut self.runs {
            if run.0 < end && offset < run.1 {
                *run = if run.0 < offset {
                    (run.0, offset)
                } else {
                    (0, 0)
                };
            }
        }
        self.generation += 1;
    }
}

impl FileDev {
    /// Opens a regular file or a block device. Anything else is refused.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let (size, block_device) = if ft.is_file() {
            (meta.len(), false)
        } else if ft.is_block_device() {
            (rustix::fs::seek(&file, SeekFrom::End(0))?, true)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(FileDev {
            file: Arc::new(file),
            size,
            read_only,
            block_device,
            data_runs: Mutex::default(),
            no_nowait: AtomicBool::new(false),
        })
    }

    /// `read_at_nowait` where the file system has no RWF_NOWAIT: a plain
    /// read once `cachestat` finds every page cached. A page evicted in
    /// between makes this one read wait for it, which RWF_NOWAIT would
    /// have refused: rare, and no worse than any read.
    fn read_if_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        if !crate::cache::all_cached(&self.file, offset, buf.len() as u64) {
            return Ok(false);
        }
        pread_full(&self.file, buf, offset)?;
        Ok(true)
    }

    fn data_runs(&self) -> std::sync::MutexGuard<'_, DataRuns> {
        self.data_runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, offset, len)
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)
    }

    fn sync(&self) -> Result<()> {
        Ok(datasync(&self.file)?)
    }

    fn fallocate(
        &self,
        flags: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(&self.file, flags | FallocateFlags::KEEP_SIZE, offset, len)
    }

    fn write_zero_data(&self, mut offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            pwrite_all(&self.file, &zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Next data offset at or after `pos`, or `size` when only holes follow.
    fn next_data(&self, pos: u64) -> std::result::Result<u64, Errno> {
        match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
            Ok(d) => Ok(d.min(self.size)),
            Err(Errno::NXIO) => Ok(self.size),
            Err(e) => Err(e),
        }
    }

    fn next_hole(&self, pos: u64) -> std::result::Result<u64, Errno> {
        rustix::fs::seek(&self.file, SeekFrom::Hole(pos)).map(|h| h.min(self.size))
    }

    fn allocation(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        if self.block_device {
            // A block device has no holes to find, and SEEK_DATA on one does
            // not say "all data": Linux answered ENXIO here, which would turn
            // the whole device into a hole and its reads into zeroes.
            return vec![Extent {
                length: len,
                flags: 0,
            }];
        }
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, length: u64, flags: u32| match out.last_mut() {
            Some(last) if last.flags == flags => last.length += length,
            _ => out.push(Extent { length, flags }),
        };
        let mut pos = offset;
        while pos < end && out.len() < max.max(1) {
            let (known, generation) = {
                let runs = self.data_runs();
                (runs.end_of(pos), runs.generation)
            };
            if let Some(run_end) = known {
                let stop = run_end.min(end);
                push(&mut out, stop - pos, 0);
                pos = stop;
                continue;
            }
            let data = match self.next_data(pos) {
                Ok(d) => d,
                // No SEEK_DATA here (block device, old file system): all data.
                Err(_) => end,
            };
            if data > pos {
                let stop = data.min(end);
                push(&mut out, stop - pos, STATE_HOLE_ZERO);
                pos = stop;
                continue;
            }
            let hole = match self.next_hole(pos) {
                Ok(h) => {
                    self.data_runs().remember(generation, pos, h);
                    h
                }
                Err(_) => end,
            }
            .max(pos + 1);
            let stop = hole.min(end);
            push(&mut out, stop - pos, 0);
            pos = stop;
        }
        out
    }
}

impl BlockDev for FileDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let w = !self.read_only;
        Caps {
            read_only: self.read_only,
            flush: true,
            fua: w,
            trim: w,
            write_zeroes: w,
            fast_zero: w,
            cache: true,
            multi_conn: true,
            rotational: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        // A file that shrank under us reads as zeroes where it is gone.
        Ok(pread_full(&self.file, buf, offset)?)
    }

    fn read_at_nowait(&self, mut buf: &mut [u8], mut offset: u64) -> Result<bool> {
        self.check(offset, buf.len() as u64)?;
        if self.no_nowait.load(Ordering::Relaxed) {
            return self.read_if_cached(buf, offset);
        }
        while !buf.is_empty() {
            let mut iov = [io::IoSliceMut::new(buf)];
            match rustix::io::preadv2(&self.file, &mut iov, offset, ReadWriteFlags::NOWAIT) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP) => {
                    self.no_nowait.store(true, Ordering::Relaxed);
                    return self.read_if_cached(buf, offset);
                }
                // EAGAIN: not cached.
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    fn file_span(&self, offset: u64, len: u64) -> Option<FileSpan> {
        let inside = self.check(offset, len).is_ok();
        (inside && crate::cache::all_cached(&self.file, offset, len)).then(|| FileSpan {
            file: self.file.clone(),
            offset,
        })
    }

    /// As few `preadv` calls as the iovec limit allows.
    fn read_vectored_at(&self, mut bufs: &mut [io::IoSliceMut<'_>], mut offset: u64) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.check(offset, total as u64)?;
        while !bufs.is_empty() {
            let n = bufs.len().min(IOV_MAX);
            match rustix::io::preadv(&self.file, &mut bufs[..n], offset) {
                // The file shrank under us: what is gone reads as zeroes.
                Ok(0) => {
                    bufs.iter_mut().for_each(|b| b.fill(0));
                    return Ok(());
                }
                Ok(n) => {
                    io::IoSliceMut::advance_slices(&mut bufs, n);
                    offset += n as u64;
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check_writable(offset, buf.len() as u64)?;
        if fua {
            // One syscall that is durable for this range only, where supported.
            let iov = [io::IoSlice::new(buf)];
            match rustix::io::pwritev2(&self.file, &iov, offset, ReadWriteFlags::DSYNC) {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(n) => {
                    pwrite_all(&self.file, &buf[n..], offset + n as u64)?;
                }
                Err(_) => pwrite_all(&self.file, buf, offset)?,
            }
            return self.sync();
        }
        Ok(pwrite_all(&self.file, buf, offset)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_writable(offset, len)?;
        let punched = mode.may_trim
            && self
                .fallocate(FallocateFlags::PUNCH_HOLE, offset, len)
                .is_ok();
        if !punched
            && self
                .fallocate(FallocateFlags::ZERO_RANGE, offset, len)
                .is_err()
        {
            if mode.fast {
                return Err(Error::NotFast);
            }
            self.write_zero_data(offset, len)?;
        }
        // Punched and zeroed ranges may read as holes now.
        self.data_runs().forget(offset, len);
        if mode.fua { self.sync() } else { Ok(()) }
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        // Advisory: a file system that cannot punch holes simply keeps the data.
        if !self.block_device {
            let _ = self.fallocate(FallocateFlags::PUNCH_HOLE, offset, len);
            self.data_runs().forget(offset, len);
        }
        if fua { self.sync() } else { Ok(()) }
    }

    /// A reflink of `src`'s range, where both files are on one file system
    /// that has them (else Unsupported: nothing changed). Like a write it
    /// is durable at the next flush.
    fn clone_range(&self, src: &File, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        if self.block_device {
            return Err(Error::Unsupported);
        }
        if len == 0 {
            return Ok(());
        }
        let cloned = crate::reflink::clone_range(src, &self.file, offset, len);
        // The source's holes came along.
        self.data_runs().forget(offset, len);
        match cloned {
            Ok(()) => Ok(()),
            // No reflinks here, or not the same file system.
            Err(e) if matches!(e.raw_os_error(), Some(95 /* EOPNOTSUPP */ | 18 /* EXDEV */)) => {
                Err(Error::Unsupported)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only { Ok(()) } else { self.sync() }
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        rustix::fs::fadvise(&self.file, offset, NonZeroU64::new(len), Advice::WillNeed)
            .map_err(io::Error::from)?;
        Ok(())
    }

    fn contexts(&self) -> Vec<String> {
        vec![BASE_ALLOCATION.to_string()]
    }

    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>> {
        if context != BASE_ALLOCATION {
            return Err(Error::UnknownContext(context.to_string()));
        }
        self.check(offset, len)?;
        Ok(self.allocation(offset, len, max_extents))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        (dir, path)
    }

    #[test]
    fn extents_follow_data_and_holes() {
        let (_d, path) = sparse_file(4 << 20);
        let dev = FileDev::open(&path, false).unwrap();
        dev.write_at(&[7u8; 65536], 1 << 20, false).unwrap();
        let ext = dev.extents(BASE_ALLOCATION, 0, 4 << 20, 100).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 1 << 20,
                    flags: 3
                },
                Extent {
                    length: 65536,
                    flags: 0
                },
                Extent {
                    length: (3 << 20) - 65536,
                    flags: 3
                },
            ]
        );
        let one = dev.extents(BASE_ALLOCATION, 0, 4 << 20, 1).unwrap();
        assert_eq!(one.len(), 1);
        let total: u64 = dev
            .extents(BASE_ALLOCATION, 4096, 1 << 20, 100)
            .unwrap()
            .iter()
            .map(|e| e.length)
            .sum();
        assert_eq!(total, 1 << 20);
    }

    #[test]
    fn a_hole_punched_in_known_data_shows() {
        let (_d, path) = sparse_file(4 << 20);
        let dev = FileDev::open(&path, false).unwrap();
        dev.write_at(&[7u8; 1 << 20], 0, false).unwrap();
        let data = |len| Extent {
            length: len,
            flags: 0,
        };
        let hole = |len| Extent {
            length: len,
            flags: STATE_HOLE_ZERO,
        };
        // Found once, then answered inside the run without looking again.
        assert_eq!(
            dev.extents(BASE_ALLOCATION, 0, 2 << 20, 10).unwrap(),
            vec![data(1 << 20), hole(1 << 20)]
        );
        assert_eq!(
            dev.extents(BASE_ALLOCATION, 4096, 8192, 10).unwrap(),
            vec![data(8192)]
        );
        assert_eq!(dev.data_runs().end_of(4096), Some(1 << 20));
        // A second run is remembered beside the first.
        dev.write_at(&[7u8; 4096], 3 << 20, false).unwrap();
        assert_eq!(
            dev.extents(BASE_ALLOCATION, 3 << 20, 4096, 10).unwrap(),
            vec![data(4096)]
        );
        assert_eq!(dev.data_runs().end_of(3 << 20), Some((3 << 20) + 4096));
        assert_eq!(dev.data_runs().end_of(4096), Some(1 << 20));
        for punch in [
            |d: &FileDev| d.trim(65536, 65536, false).unwrap(),
            |d: &FileDev| {
                let mode = ZeroMode {
                    may_trim: true,
                    fast: false,
                    fua: false,
                };
                d.write_zeroes(65536, 65536, mode).unwrap()
            },
        ] {
            dev.write_at(&[7u8; 65536], 65536, false).unwrap();
            assert_eq!(
                dev.extents(BASE_ALLOCATION, 0, 1 << 20, 10).unwrap(),
                vec![data(1 << 20)]
            );
            punch(&dev);
            assert_eq!(
                dev.extents(BASE_ALLOCATION, 0, 1 << 20, 10).unwrap(),
                vec![data(65536), hole(65536), data((1 << 20) - 131072)]
            );
        }
    }

    #[test]
    fn many_runs_are_remembered_and_the_oldest_goes_first() {
        let mut runs = DataRuns::default();
        let n = KNOWN_RUNS as u64;
        for i in 0..n {
            runs.remember(0, i * 100, i * 100 + 50);
        }
        for i in 0..n {
            assert_eq!(runs.end_of(i * 100 + 10), Some(i * 100 + 50), "run {i}");
            assert_eq!(runs.end_of(i * 100 + 60), None, "after run {i}");
        }
        runs.remember(0, n * 100, n * 100 + 50);
        assert_eq!(runs.end_of(10), None);
        assert_eq!(runs.end_of(110), Some(150));
        assert_eq!(runs.end_of(n * 100), Some(n * 100 + 50));
        // A punch cuts the runs over it short and leaves the others.
        runs.forget(120, 1000);
        assert_eq!(runs.end_of(110), Some(120));
        assert_eq!(runs.end_of(130), None);
        assert_eq!(runs.end_of(210), None);
        assert_eq!(runs.end_of(1110), None);
        assert_eq!(runs.end_of(1210), Some(1250));
        // Found before the punch: not kept.
        runs.remember(0, 200, 250);
        assert_eq!(runs.end_of(210), None);
    }

    /// tmpfs has no RWF_NOWAIT: its cached pages are read at once all the
    /// same, and a hole (no page) is left to the blocking read.
    #[test]
    fn reads_that_must_not_block_work_on_tmpfs() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed");
        let kind = rustix::fs::statfs(dir.path()).unwrap().f_type;
        assert_eq!(kind, libc::TMPFS_MAGIC, "/dev/shm is not tmpfs");
        let path = dir.path().join("d.raw");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let dev = FileDev::open(&path, false).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
        dev.write_at(&data, 0, false).unwrap();
        for _ in 0..2 {
            // The first read learns that RWF_NOWAIT is refused, the second
            // does not ask again.
            let mut buf = vec![0u8; 8192];
            assert!(dev.read_at_nowait(&mut buf, 4096).unwrap());
            assert_eq!(buf, data[4096..][..8192]);
        }
        assert!(dev.no_nowait.load(Ordering::Relaxed));
        let mut buf = vec![1u8; 4096];
        assert!(!dev.read_at_nowait(&mut buf, 512 << 10).unwrap());
    }

    #[test]
    fn vectored_reads_match_one_read() {
        let (_d, path) = sparse_file(1 << 20);
        let dev = FileDev::open(&path, false).unwrap();
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&data, 4096, false).unwrap();
        // More buffers than one preadv takes, of uneven sizes.
        let mut bufs: Vec<Vec<u8>> = (0..1500).map(|i| vec![0xff; 20 + i % 13]).collect();
        let total: usize = bufs.iter().map(Vec::len).sum();
        let mut iov: Vec<io::IoSliceMut<'_>> =
            bufs.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
        dev.read_vectored_at(&mut iov, 4096 + 17).unwrap();
        assert_eq!(bufs.concat(), &data[17..17 + total]);
    }

    #[test]
    fn zeroes_punch_and_read_back() {
        let (_d, path) = sparse_file(1 << 20);
        let dev = FileDev::open(&path, false).unwrap();
        dev.write_at(&[9u8; 131072], 0, true).unwrap();
        dev.write_zeroes(
            4096,
            65536,
            ZeroMode {
                may_trim: true,
                fast: true,
                fua: false,
            },
        )
        .unwrap();
        let mut buf = vec![1u8; 131072];
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9));
        assert!(buf[4096..69632].iter().all(|&b| b == 0));
        assert!(buf[69632..].iter().all(|&b| b == 9));
    }

    #[test]
    fn bounds_and_read_only_are_enforced() {
        let (_d, path) = sparse_file(8192);
        let dev = FileDev::open(&path, true).unwrap();
        assert!(matches!(dev.write_at(&[1], 0, false), Err(Error::ReadOnly)));
        let mut buf = [0u8; 2];
        assert!(matches!(
            dev.read_at(&mut buf, 8191),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.read_at(&mut buf, u64::MAX),
            Err(Error::OutOfRange { .. })
        ));
        assert!(dev.caps().read_only);
    }
}
