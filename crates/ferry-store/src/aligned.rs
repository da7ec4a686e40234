//! Page-aligned byte buffers, for `O_DIRECT` writes (the kernel rejects
//! unaligned user memory with EINVAL).

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

pub(crate) const ALIGN: usize = 4096;

/// A zero-initialised, `ALIGN`-aligned heap buffer of fixed length.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Box<[u8]>`;
// shared access only hands out `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only allows reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout_for(len);
        // SAFETY: `layout_for` never returns a zero-sized layout.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout_for(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), ALIGN).expect("buffer size fits in isize")
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of at least `len` bytes, all
        // initialised (allocated zeroed), and `&self` forbids writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this same layout and
        // is freed exactly once.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout_for(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_writable() {
        let mut b = AlignedBuf::zeroed(3 * ALIGN + 5);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[3 * ALIGN + 4] = 7;
        assert_eq!(b.len(), 3 * ALIGN + 5);
        assert_eq!(b[3 * ALIGN + 4], 7);
    }
}
