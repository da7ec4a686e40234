//! A bitmap kept in a file, whose bits are made durable by group commit:
//! the one type behind dirty-tracking generations (and, with exact
//! rounding, any map whose bits must never claim more than the truth).
//!
//! Three in-memory bitmaps describe it:
//! - `exact`: the bits really set, what queries answer;
//! - `ondisk`: what the file should hold (a superset of `exact` when the
//!   rounding marks whole windows);
//! - `durable`: bits known to be in the file and synced, the fast path.
//!
//! [`DurableBitmap::mark`] sets `exact` at once, and if the bits are not
//! yet durable, sets the rounded range in `ondisk`, queues the changed
//! words and waits for a group sync: one leader writes every queued word
//! and issues one `fdatasync` for everyone who queued before it started.
//! Only then are the bits recorded in `durable`, so marking bits that
//! already are costs a few atomic loads and no I/O.
//!
//! The file is a superset of `exact` at all times; at a quiet moment
//! (no mark in flight) [`write_exact`](DurableBitmap::write_exact) makes
//! it exact.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Mutex;

use crate::bitmap::{self, AtomicBitmap};
use crate::io::{datasync, pread_full, pwrite_all};
use crate::sync::GroupSync;

/// How far a mark is widened before it is made durable: the bits of the
/// whole `window` around it, and up to `max_ahead` further bits after a
/// run of set bits (a sequential writer coming through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rounding {
    pub window: u64,
    pub max_ahead: u64,
}

/// Reads the bits of a bitmap file (little-endian words).
pub(crate) fn read_bits(path: &Path, nbits: u64) -> io::Result<Vec<u64>> {
    let nwords = bitmap::words_for(nbits);
    let f = File::open(path)?;
    let mut bytes = vec![0u8; nwords * 8];
    pread_full(&f, &mut bytes, 0)?;
    Ok(bitmap::from_bytes(&bytes, nwords))
}

pub(crate) struct DurableBitmap {
    file: File,
    nbits: u64,
    rounding: Rounding,
    exact: AtomicBitmap,
    ondisk: AtomicBitmap,
    durable: AtomicBitmap,
    /// Word indices changed in `ondisk` since the last sync.
    pending: Mutex<Vec<usize>>,
    sync: GroupSync,
}

impl DurableBitmap {
    /// A new, empty, durable bitmap file at `path` (which must not exist).
    pub fn create(path: &Path, nbits: u64, rounding: Rounding) -> io::Result<Self> {
        let len = bitmap::words_for(nbits) as u64 * 8;
        let file = crate::manifest::create_zeroed(path, len)?;
        let zero = vec![0; bitmap::words_for(nbits)];
        Ok(Self::with(file, nbits, rounding, &zero))
    }

    /// Reopens a bitmap file, with whatever bits it holds.
    pub fn open(path: &Path, nbits: u64, rounding: Rounding) -> io::Result<Self> {
        let words = read_bits(path, nbits)?;
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self::with(file, nbits, rounding, &words))
    }

    fn with(file: File, nbits: u64, rounding: Rounding, words: &[u64]) -> Self {
        DurableBitmap {
            file,
            nbits,
            rounding: Rounding {
                window: rounding.window.max(1),
                ..rounding
            },
            exact: AtomicBitmap::from_words(words),
            ondisk: AtomicBitmap::from_words(words),
            durable: AtomicBitmap::from_words(words),
            pending: Mutex::new(Vec::new()),
            sync: GroupSync::default(),
        }
    }

    /// Sets bits `[a, b)`; returns once they are durable, at once (no I/O)
    /// when they already are.
    pub fn mark(&self, a: u64, b: u64) -> io::Result<()> {
        for i in a..b {
            if !self.exact.get(i) {
                self.exact.set(i);
            }
        }
        if self.durable.all_set(a, b) {
            return Ok(());
        }
        let window = self.rounding.window;
        let wa = a / window * window;
        let mut wb = (b.div_ceil(window) * window).min(self.nbits);
        // A sequential writer is coming this way: mark as far ahead as the
        // run behind it is long (like readahead), so a stream pays a
        // logarithmic number of syncs, not one per window.
        let ahead = self.durable.run_before(wa, self.rounding.max_ahead);
        if ahead > 0 {
            wb = ((wb + ahead).div_ceil(window) * window).min(self.nbits);
        }
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for i in wa..wb {
                if !self.durable.get(i) {
                    self.ondisk.set(i);
                    let w = (i / 64) as usize;
                    if p.last() != Some(&w) {
                        p.push(w);
                    }
                }
            }
        }
        self.sync.sync(|| self.write_pending())?;
        for i in wa..wb {
            self.durable.set(i);
        }
        Ok(())
    }

    /// Leader work of a group sync: write every queued word (its current
    /// value holds all bits set before it was queued), then one fdatasync.
    fn write_pending(&self) -> io::Result<()> {
        let mut words =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        words.sort_unstable();
        words.dedup();
        let mut i = 0;
        while i < words.len() {
            let mut j = i + 1;
            while j < words.len() && words[j] == words[j - 1] + 1 {
                j += 1;
            }
            let vals: Vec<u64> = words[i..j].iter().map(|&w| self.ondisk.word(w)).collect();
            pwrite_all(&self.file, &bitmap::to_bytes(&vals), words[i] as u64 * 8)?;
            i = j;
        }
        datasync(&self.file)
    }

    /// Replaces the file's rounded bits by the exact ones. Only when no
    /// mark is in flight: the exact bits then cover every one made.
    pub fn write_exact(&self) -> io::Result<()> {
        pwrite_all(&self.file, &bitmap::to_bytes(&self.exact.snapshot()), 0)?;
        datasync(&self.file)
    }

    /// The bits set so far.
    pub fn words(&self) -> Vec<u64> {
        self.exact.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRTY: Rounding = Rounding {
        window: 16,
        max_ahead: 1024,
    };

    fn set(words: &[u64], n: u64) -> Vec<u64> {
        (0..n).filter(|&i| bitmap::test_bit(words, i)).collect()
    }

    #[test]
    fn marks_are_durable_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("3.bits");
        let g = DurableBitmap::create(&path, 1000, DIRTY).unwrap();
        g.mark(10, 12).unwrap();
        g.mark(500, 501).unwrap();
        g.mark(13, 14).unwrap(); // inside a durable window: no I/O
        assert_eq!(set(&g.words(), 1000), vec![10, 11, 13, 500]);
        drop(g); // no write_exact: a crash
        let g = DurableBitmap::open(&path, 1000, DIRTY).unwrap();
        let mut want: Vec<u64> = (0..16).collect();
        want.extend(496..512);
        assert_eq!(set(&g.words(), 1000), want, "after a crash: whole windows");
        g.write_exact().unwrap();
        let g = DurableBitmap::open(&path, 1000, DIRTY).unwrap();
        assert_eq!(set(&g.words(), 1000), want);
    }

    #[test]
    fn exact_rounding_never_claims_more() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.bits");
        let exact = Rounding {
            window: 1,
            max_ahead: 0,
        };
        let g = DurableBitmap::create(&path, 300, exact).unwrap();
        for i in 0..200 {
            g.mark(i, i + 1).unwrap();
        }
        g.mark(250, 252).unwrap();
        drop(g);
        let words = read_bits(&path, 300).unwrap();
        let mut want: Vec<u64> = (0..200).collect();
        want.extend([250, 251]);
        assert_eq!(set(&words, 300), want);
    }
}
