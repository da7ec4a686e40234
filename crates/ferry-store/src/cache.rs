//! Whether a file range is in the page cache, asked without reading it:
//! `cachestat(2)` (Linux 6.5). A read reply is sent straight from the
//! cache only when every page is there; a miss would make the socket
//! writer wait for the disk, one read at a time, where the blocking pool
//! reads many at once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `cachestat` has one number on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;
/// Pages are counted in units of this size; on a kernel with larger pages
/// the count falls short and the answer is "not cached", the safe side.
const PAGE: u64 = 4096;

/// Set once the kernel has said it has no `cachestat`.
static MISSING: AtomicBool = AtomicBool::new(false);

#[repr(C)]
struct Range {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Stat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// True when every page of `[off, off+len)` is cached. False when some is
/// not, or the kernel cannot tell.
pub(crate) fn all_cached(file: &File, off: u64, len: u64) -> bool {
    if len == 0 || MISSING.load(Ordering::Relaxed) {
        return false;
    }
    let range = Range { off, len };
    let mut stat = Stat::default();
    // SAFETY: `range` and `stat` are live, #[repr(C)] structs laid out as
    // the kernel's `cachestat_range` and `cachestat`; the kernel reads the
    // first and writes the second only during the call; the fd is open for
    // as long as `file` is borrowed; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            MISSING.store(true, Ordering::Relaxed);
        }
        return false;
    }
    let pages = (off + len).div_ceil(PAGE) - off / PAGE;
    stat.nr_cache >= pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn written_pages_are_cached_and_holes_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 64 << 10]).unwrap();
        f.set_len(1 << 20).unwrap();
        let f = File::open(&path).unwrap();
        assert!(all_cached(&f, 0, 64 << 10));
        assert!(all_cached(&f, 4096 + 100, 8000));
        assert!(
            !all_cached(&f, 0, 128 << 10),
            "a never-read hole is not cached"
        );
        assert!(!all_cached(&f, 0, 0));
    }
}
