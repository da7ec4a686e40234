//! What the reflink snapshot backend asks of the file system: clone a
//! whole file (`FICLONE`) or a range of one (`FICLONERANGE`), find out
//! whether a directory's file system can (a probe clone), and read a
//! file's block mapping (`FS_IOC_FIEMAP`) to tell which ranges two files
//! still share and which blocks a file holds alone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use std::os::fd::AsRawFd;

use rustix::ioctl::{Opcode, Setter, Updater, ioctl, opcode};

/// Makes `dst` (empty, open for writing) share all of `src`'s blocks.
pub(crate) fn clone_file(src: &File, dst: &File) -> io::Result<()> {
    Ok(rustix::fs::ioctl_ficlone(dst, src)?)
}

/// Linux's `struct file_clone_range` (linux/fs.h).
#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: Opcode = opcode::write::<FileCloneRange>(0x94, 13);
const _: () = assert!(FICLONERANGE as u64 == 0x4020_940d);

/// Makes `dst`'s `[offset, offset+len)` share `src`'s blocks at the same
/// offset. `offset` and `len` aligned to the file system's block, or the
/// range ends at `src`'s end; `len` is never 0 (which would mean "to the
/// end"). The kernel writes back both ranges and drops `dst`'s cached
/// pages of it first, so reads see the cloned bytes at once.
pub(crate) fn clone_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    debug_assert!(len > 0);
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: offset,
        src_length: len,
        dest_offset: offset,
    };
    // SAFETY: `FileCloneRange` is `struct file_clone_range`, which
    // FICLONERANGE only reads; `src_fd` is an open descriptor borrowed
    // for the call.
    unsafe { ioctl(dst, Setter::<FICLONERANGE, FileCloneRange>::new(arg))? };
    Ok(())
}

/// Whether files in `dir` can be cloned: clones a tiny probe file there.
/// Any failure (no reflinks, a read-only directory) means no.
pub(crate) fn probe(dir: &Path, stem: &str) -> bool {
    let src = dir.join(format!("{stem}.probe"));
    let dst = dir.join(format!("{stem}.probe-clone"));
    let cloned = (|| {
        let mut a = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src)?;
        a.write_all(&[0x5a; 4096])?;
        let b = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dst)?;
        clone_file(&a, &b)
    })();
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
    match cloned {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), "no reflinks: {e}");
            false
        }
    }
}

/// One mapped range of a file (holes are absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapped {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    /// Another file (a clone) uses these blocks too.
    pub shared: bool,
    /// The mapping cannot be compared by address (delayed allocation,
    /// inline or encoded data): treat it as differing from anything.
    pub opaque: bool,
}

// Linux's `struct fiemap` and `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Default)]
struct FiemapHeader {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

const BATCH: usize = 128;

#[repr(C)]
struct Fiemap {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

/// `_IOWR('f', 11, struct fiemap)`: the size in the opcode is the header's.
const FS_IOC_FIEMAP: Opcode = opcode::read_write::<FiemapHeader>(b'f', 11);
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
const OPAQUE: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE;

/// The mapping of `file`'s first `size` bytes, by logical offset. With
/// `settled`, after its dirty pages are written back: until then a
/// copy-on-write of a shared block may still map the old block, which
/// would hide a difference. Without, nothing is forced out (a listing
/// must not cost a writeback), and the latest writes may not show yet.
pub(crate) fn mapping(file: &File, size: u64, settled: bool) -> io::Result<Vec<Mapped>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut map = Box::new(Fiemap {
        header: FiemapHeader::default(),
        extents: [FiemapExtent::default(); BATCH],
    });
    while start < size {
        map.header = FiemapHeader {
            start,
            length: size - start,
            flags: if settled { FIEMAP_FLAG_SYNC } else { 0 },
            extent_count: BATCH as u32,
            ..FiemapHeader::default()
        };
        // SAFETY: `Fiemap` is `struct fiemap` followed by room for the
        // `extent_count` extents it announces, which is all the kernel
        // writes; the opcode is FS_IOC_FIEMAP's.
        unsafe { ioctl(file, Updater::<FS_IOC_FIEMAP, Fiemap>::new(&mut map))? };
        let n = (map.header.mapped_extents as usize).min(BATCH);
        if n == 0 {
            break;
        }
        for e in &map.extents[..n] {
            out.push(Mapped {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                shared: e.flags & FIEMAP_EXTENT_SHARED != 0,
                opaque: e.flags & OPAQUE != 0,
            });
        }
        let last = map.extents[n - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            break;
        }
        start = last.logical + last.length;
    }
    Ok(out)
}

/// What `[pos, ..)` maps to in `map` (sorted, non-overlapping), from
/// index `*i` on: the key to compare and where it stops being valid.
fn key_at(map: &[Mapped], i: &mut usize, pos: u64, size: u64) -> (Option<(u64, bool)>, u64) {
    while *i < map.len() && map[*i].logical + map[*i].length <= pos {
        *i += 1;
    }
    match map.get(*i) {
        Some(m) if m.logical <= pos => {
            // An opaque range gets a key no other position has.
            let key = if m.opaque {
                (u64::MAX, true)
            } else {
                (m.physical + (pos - m.logical), false)
            };
            (Some(key), (m.logical + m.length).min(size))
        }
        Some(m) => (None, m.logical.min(size)),
        None => (None, size),
    }
}

/// Ranges of `[0, size)` where `a` and `b` do not map to the same blocks:
/// everything the two files may differ in. Shared blocks hold the same
/// data, and so do holes in both; anything else counts as changed.
pub(crate) fn differing(a: &[Mapped], b: &[Mapped], size: u64) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (ka, ea) = key_at(a, &mut i, pos, size);
        let (kb, eb) = key_at(b, &mut j, pos, size);
        let end = ea.min(eb).max(pos + 1);
        let same = match (ka, kb) {
            (None, None) => true,
            (Some((pa, oa)), Some((pb, ob))) => !oa && !ob && pa == pb,
            _ => false,
        };
        if !same {
            match out.last_mut() {
                Some((s, l)) if *s + *l == pos => *l += end - pos,
                _ => out.push((pos, end - pos)),
            }
        }
        pos = end;
    }
    out
}

/// Ranges of `map` that no other file shares: what removing the file
/// frees.
pub(crate) fn exclusive(map: &[Mapped]) -> impl Iterator<Item = (u64, u64)> + '_ {
    map.iter()
        .filter(|m| !m.shared)
        .map(|m| (m.logical, m.length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(logical: u64, physical: u64, length: u64) -> Mapped {
        Mapped {
            logical,
            physical,
            length,
            shared: true,
            opaque: false,
        }
    }

    #[test]
    fn differing_ranges_are_where_the_blocks_are_not_the_same() {
        let clone = [m(0, 1000, 100), m(200, 5000, 50)];
        // Rewritten in [40, 60) (new blocks), hole punched at [200, 220),
        // appended data where the clone has a hole.
        let image = [
            m(0, 1000, 40),
            m(40, 9000, 20),
            m(60, 1060, 40),
            m(120, 7000, 10),
            m(220, 5020, 30),
        ];
        assert_eq!(
            differing(&clone, &image, 300),
            vec![(40, 20), (120, 10), (200, 20)]
        );
        assert_eq!(differing(&clone, &clone, 300), vec![]);
        let mut opaque = clone;
        opaque[1].opaque = true;
        assert_eq!(differing(&opaque, &clone, 300), vec![(200, 50)]);
        assert_eq!(differing(&[], &[], 10), vec![]);
    }
}
