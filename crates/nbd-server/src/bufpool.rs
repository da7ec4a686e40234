//! Reusable I/O buffers. Fresh large allocations cost page faults (and
//! calloc a memset) on every request; recycled ones cost nothing, and
//! `pread` overwrites them, so they are never zero-filled again.

use std::sync::Mutex;

/// Smallest pooled size class (4 KiB); classes go up by powers of two.
const MIN_CLASS: u32 = 12;
const CLASSES: usize = 14; // 4 KiB ..= 32 MiB
/// Idle buffers kept per class, and at most this many bytes per class.
const MAX_IDLE: usize = 64;
const MAX_IDLE_BYTES: usize = 64 << 20;

pub struct BufPool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
}

/// The process-wide pool.
pub static POOL: BufPool = BufPool::new();

fn class_of(len: usize) -> Option<usize> {
    let bits = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS);
    let c = (bits - MIN_CLASS) as usize;
    (c < CLASSES).then_some(c)
}

impl BufPool {
    pub const fn new() -> Self {
        BufPool {
            classes: [const { Mutex::new(Vec::new()) }; CLASSES],
        }
    }

    /// A buffer of at least `len` bytes (its whole size class) with
    /// unspecified content; callers use the first `len` bytes.
    pub fn get(&self, len: usize) -> Vec<u8> {
        match class_of(len) {
            Some(c) => {
                let recycled = self.classes[c]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop();
                recycled.unwrap_or_else(|| vec![0u8; 1 << (c as u32 + MIN_CLASS)])
            }
            None => vec![0u8; len],
        }
    }

    pub fn put(&self, buf: Vec<u8>) {
        let cap = buf.len();
        if !cap.is_power_of_two() {
            return;
        }
        let Some(c) = class_of(cap) else { return };
        let mut idle = self.classes[c].lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE && (idle.len() + 1) * cap <= MAX_IDLE_BYTES {
            idle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_by_class() {
        let pool = BufPool::new();
        let a = pool.get(300_000);
        assert_eq!(a.len(), 512 * 1024);
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.get(262_145);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(pool.get(0).len(), 4096);
        assert_eq!(pool.get(64 << 20).len(), 64 << 20);
    }
}
