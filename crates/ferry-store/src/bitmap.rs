//! A fixed-size bitmap of atomic words: writers set bits without a lock.
//!
//! Every access is sequentially consistent: a durable bitmap's rewrite
//! (`durable_bitmap.rs`, `tighten`) relies on the order of a writer's
//! "set my bit in one map, then look at another map" against its own
//! "clear in that map, then look at the first".

use std::sync::atomic::{AtomicU64, Ordering};

pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
}

pub(crate) fn words_for(bits: u64) -> usize {
    bits.div_ceil(64) as usize
}

impl AtomicBitmap {
    pub fn new(bits: u64) -> Self {
        AtomicBitmap {
            words: (0..words_for(bits)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn from_words(words: &[u64]) -> Self {
        AtomicBitmap {
            words: words.iter().map(|&w| AtomicU64::new(w)).collect(),
        }
    }

    #[inline]
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::SeqCst) & (1 << (i % 64)) != 0
    }

    /// True when every bit in `[a, b)` is set.
    pub fn all_set(&self, a: u64, b: u64) -> bool {
        (a..b).all(|i| self.get(i))
    }

    /// Length of the run of set bits ending just before `a`, at most `cap`.
    /// A long run means a sequential writer is coming through.
    pub fn run_before(&self, a: u64, cap: u64) -> u64 {
        let mut n = 0;
        while n < cap && n < a && self.get(a - 1 - n) {
            n += 1;
        }
        n
    }

    #[inline]
    pub fn set(&self, i: u64) {
        self.test_and_set(i);
    }

    /// Sets bit `i`; whether it was set already (one atomic step, so of
    /// two threads setting it, exactly one sees it was not).
    #[inline]
    pub fn test_and_set(&self, i: u64) -> bool {
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Ordering::SeqCst) & bit != 0
    }

    /// Clears bit `i`.
    pub fn clear_bit(&self, i: u64) {
        self.clear_word_bits((i / 64) as usize, 1 << (i % 64));
    }

    /// Clears the bits of `mask` in word `w`.
    pub fn clear_word_bits(&self, w: usize, mask: u64) {
        self.words[w].fetch_and(!mask, Ordering::SeqCst);
    }

    /// Sets the bits of `mask` in word `w`.
    pub fn set_word_bits(&self, w: usize, mask: u64) {
        self.words[w].fetch_or(mask, Ordering::SeqCst);
    }

    pub fn words_len(&self) -> usize {
        self.words.len()
    }

    pub fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect()
    }

    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }
}

/// Little-endian bytes of `words`, the on-disk form of every bitmap.
pub(crate) fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

pub(crate) fn from_bytes(bytes: &[u8], nwords: usize) -> Vec<u64> {
    let mut out = vec![0u64; nwords];
    for (i, c) in bytes.chunks(8).take(nwords).enumerate() {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        out[i] = u64::from_le_bytes(b);
    }
    out
}

#[inline]
pub(crate) fn test_bit(words: &[u64], i: u64) -> bool {
    words[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// Runs `[a, b)` of consecutive blocks in `blocks` (sorted, distinct).
pub(crate) fn runs_of(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(r) if r.1 == b => r.1 += 1,
            _ => out.push((b, b + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_threads_setting_one_bit_exactly_one_sees_it_unset() {
        let map = std::sync::Arc::new(AtomicBitmap::new(256));
        let firsts: usize = (0..4)
            .map(|_| {
                let map = map.clone();
                std::thread::spawn(move || (0..256).filter(|&i| !map.test_and_set(i)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(firsts, 256);
        assert!(map.all_set(0, 256));
    }
}
