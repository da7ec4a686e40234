//! A bitmap kept in a file, whose bits are made durable (as far as its
//! [`Persist`] asks) by group commit: the one type behind dirty-tracking
//! generations (and, with exact rounding, any map whose bits must never
//! claim more than the truth).
//!
//! Three in-memory bitmaps describe it:
//! - `exact`: the bits really set, what queries answer;
//! - `ondisk`: what the file should hold (a superset of `exact` when the
//!   rounding marks whole windows);
//! - `durable`: bits known to be in the file (and synced, if it must
//!   be), the fast path.
//!
//! [`DurableBitmap::mark`] sets `exact` at once, and if the bits are not
//! yet durable, sets the rounded range in `ondisk`, queues the changed
//! words and waits for a group sync: one leader writes every queued word
//! and issues one `fdatasync` (none with [`Persist::Written`]) for
//! everyone who queued before it started.
//! Only then are the bits recorded in `durable`, so marking bits that
//! already are costs a few atomic loads and no I/O.
//!
//! The file is a superset of `exact` at all times; at a quiet moment
//! (no mark in flight) [`write_exact`](DurableBitmap::write_exact) makes
//! it exact. While marks go on, [`tighten`](DurableBitmap::tighten) drops
//! the bits that rounding added and no write has needed since: the bound
//! on what a crash can over-report is the rounding of the marks made
//! since the last tighten.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::bitmap::{self, AtomicBitmap};
use crate::io::{datasync, pread_full, pwrite_all};
use crate::sync::GroupSync;

/// How far a mark is widened before it is made durable: the bits of the
/// whole `window` around it, and up to `max_ahead` further bits after a
/// run of set bits (a sequential writer coming through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rounding {
    pub window: u64,
    pub max_ahead: u64,
}

/// How far a mark's bits must outlive what comes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Synced before the mark returns: they survive a host crash.
    Synced,
    /// Written to the file (the page cache) before the mark returns, not
    /// synced: they survive the process dying, not the host. For a map
    /// whose owner notices a host crash (the boot id) and rebuilds it.
    Written,
}

/// Reads the bits of a bitmap file (little-endian words).
pub(crate) fn read_bits(path: &Path, nbits: u64) -> io::Result<Vec<u64>> {
    let nwords = bitmap::words_for(nbits);
    let f = File::open(path)?;
    let mut bytes = vec![0u8; nwords * 8];
    pread_full(&f, &mut bytes, 0)?;
    Ok(bitmap::from_bytes(&bytes, nwords))
}

pub struct DurableBitmap {
    file: File,
    nbits: u64,
    persist: Persist,
    rounding: Rounding,
    exact: AtomicBitmap,
    ondisk: AtomicBitmap,
    durable: AtomicBitmap,
    /// Word indices changed in `ondisk` since the last sync.
    pending: Mutex<Vec<usize>>,
    sync: GroupSync,
    /// Marks that make bits durable hold it shared; `tighten` holds it
    /// alone, so it never rewrites the file under a group sync.
    rewrite: RwLock<()>,
    /// Marks that went to the file, and bits unmarked, since the last
    /// tighten: whether the file may hold bits it no longer needs.
    widened: AtomicU64,
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

    /// The same bitmap, its marks made as durable as `persist` asks.
    pub fn persist(self, persist: Persist) -> Self {
        DurableBitmap { persist, ..self }
    }

    fn with(file: File, nbits: u64, rounding: Rounding, words: &[u64]) -> Self {
        DurableBitmap {
            file,
            nbits,
            persist: Persist::Synced,
            rounding: Rounding {
                window: rounding.window.max(1),
                ..rounding
            },
            exact: AtomicBitmap::from_words(words),
            ondisk: AtomicBitmap::from_words(words),
            durable: AtomicBitmap::from_words(words),
            pending: Mutex::new(Vec::new()),
            sync: GroupSync::default(),
            rewrite: RwLock::new(()),
            widened: AtomicU64::new(0),
        }
    }

    /// Sets bits `[a, b)`; returns once they are durable (as `persist`
    /// asks), at once (no I/O) when they already are.
    pub fn mark(&self, a: u64, b: u64) -> io::Result<()> {
        self.mark_runs(&[(a, b)])
    }

    /// Sets the bits of every run `[a, b)` with one sync for them all: a
    /// post-copy disk's sync of fetched blocks marks a few runs at a time,
    /// and paid a device flush for each.
    pub fn mark_runs(&self, runs: &[(u64, u64)]) -> io::Result<()> {
        for &(a, b) in runs {
            for i in a..b {
                if !self.exact.get(i) {
                    self.exact.set(i);
                }
            }
        }
        // The common case (a write to blocks already marked): no I/O and
        // no allocation.
        if runs.iter().all(|&(a, b)| self.durable.all_set(a, b)) {
            return Ok(());
        }
        let _marking = self.rewrite.read().unwrap_or_else(|e| e.into_inner());
        let window = self.rounding.window;
        let mut widened = Vec::with_capacity(runs.len());
        for &(a, b) in runs {
            if self.durable.all_set(a, b) {
                continue;
            }
            self.widened.fetch_add(1, Ordering::Relaxed);
            let wa = a / window * window;
            let mut wb = (b.div_ceil(window) * window).min(self.nbits);
            // A sequential writer is coming this way: mark as far ahead as
            // the run behind it is long (like readahead), so a stream pays
            // a logarithmic number of syncs, not one per window.
            let ahead = self.durable.run_before(wa, self.rounding.max_ahead);
            if ahead > 0 {
                wb = ((wb + ahead).div_ceil(window) * window).min(self.nbits);
            }
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
            widened.push((wa, wb));
        }
        self.sync.sync(|| self.write_pending())?;
        for (wa, wb) in widened {
            for i in wa..wb {
                self.durable.set(i);
            }
        }
        Ok(())
    }

    /// Leader work of a group sync: write every queued word (its current
    /// value holds all bits set before it was queued), then one fdatasync
    /// (if the bits must survive a host crash).
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
        self.sync_file()
    }

    fn sync_file(&self) -> io::Result<()> {
        match self.persist {
            Persist::Synced => datasync(&self.file),
            Persist::Written => Ok(()),
        }
    }

    /// Drops from the file the bits that rounding added and that no write
    /// has needed since (set in `durable` but not in `exact`); returns how
    /// many. Marks that are making bits durable wait meanwhile; writes whose
    /// bits are durable do not.
    ///
    /// Why no write can lose its bit: a writer sets its `exact` bit, then
    /// looks at `durable`. This clears `durable` first, then reads `exact`
    /// again and keeps in the file every bit set there. A writer that saw
    /// its `durable` bit still set had set `exact` before this cleared it,
    /// so the second read sees it and the bit stays; a writer that looks
    /// after the clear finds it gone and makes it durable again itself,
    /// after this rewrite (it waits for `rewrite`). Until the new words are
    /// written the file holds the old ones, a superset either way.
    pub fn tighten(&self) -> io::Result<u64> {
        if self.widened.load(Ordering::Relaxed) == 0 {
            return Ok(0);
        }
        let _alone = self.rewrite.write().unwrap_or_else(|e| e.into_inner());
        self.widened.store(0, Ordering::Relaxed);
        let mut changed = Vec::new();
        let mut dropped = 0;
        for w in 0..self.durable.words_len() {
            let extra = self.durable.word(w) & !self.exact.word(w);
            if extra == 0 {
                continue;
            }
            self.durable.clear_word_bits(w, extra);
            self.ondisk.clear_word_bits(w, extra);
            self.ondisk.set_word_bits(w, self.exact.word(w));
            dropped += u64::from((extra & !self.exact.word(w)).count_ones());
            changed.push(w);
        }
        if changed.is_empty() {
            return Ok(0);
        }
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = changed;
        self.write_pending()?;
        if self.persist == Persist::Written {
            // Now and then even unsynced marks are synced: an error the
            // kernel met writing them back surfaces here, not never.
            datasync(&self.file)?;
        }
        Ok(dropped)
    }

    /// Replaces the file's rounded bits by the exact ones. Only when no
    /// mark is in flight: the exact bits then cover every one made.
    pub fn write_exact(&self) -> io::Result<()> {
        pwrite_all(&self.file, &bitmap::to_bytes(&self.exact.snapshot()), 0)?;
        self.sync_file()
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.exact.get(i)
    }

    /// Clears bit `i` (what it stood for is done). The file keeps it until
    /// the next [`tighten`](Self::tighten): a crash before that only
    /// brings it back.
    pub fn unmark(&self, i: u64) {
        self.exact.clear_word_bits((i / 64) as usize, 1 << (i % 64));
        // The file holds a bit too many now: the next tighten drops it.
        self.widened.fetch_add(1, Ordering::Relaxed);
    }

    /// How many bits are set.
    pub fn count(&self) -> u64 {
        (0..self.exact.words_len())
            .map(|w| u64::from(self.exact.word(w).count_ones()))
            .sum()
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.nbits {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.exact.word(w) & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (i < self.nbits).then_some(i);
            }
            w += 1;
            if w >= self.exact.words_len() {
                return None;
            }
            word = self.exact.word(w);
        }
    }

    /// The bits set so far.
    pub fn words(&self) -> Vec<u64> {
        self.exact.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXACT: Rounding = Rounding {
        window: 1,
        max_ahead: 0,
    };
    const DIRTY: Rounding = Rounding {
        window: 16,
        max_ahead: 1024,
    };

    fn set(words: &[u64], n: u64) -> Vec<u64> {
        (0..n).filter(|&i| bitmap::test_bit(words, i)).collect()
    }

    #[test]
    fn marks_are_durable_and_reloaded() {
        // Written-only marks are in the file as well (what a killed
        // process leaves); only a host crash tells the two apart.
        for persist in [Persist::Synced, Persist::Written] {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("3.bits");
            let g = DurableBitmap::create(&path, 1000, DIRTY)
                .unwrap()
                .persist(persist);
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
    }

    #[test]
    fn runs_marked_together_are_all_in_the_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.bits");
        let g = DurableBitmap::create(&path, 1000, EXACT).unwrap();
        g.mark_runs(&[(3, 5), (70, 72), (999, 1000)]).unwrap();
        g.mark_runs(&[(3, 4), (4, 5)]).unwrap(); // durable already: no I/O
        let want = vec![3, 4, 70, 71, 999];
        assert_eq!(set(&g.words(), 1000), want);
        drop(g); // a crash: what the file holds is what survives
        assert_eq!(set(&read_bits(&path, 1000).unwrap(), 1000), want);
    }

    #[test]
    fn tighten_drops_what_rounding_added_and_keeps_every_write() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.bits");
        let g = DurableBitmap::create(&path, 1000, DIRTY).unwrap();
        g.mark(10, 11).unwrap();
        g.mark(500, 501).unwrap();
        assert_eq!(set(&read_bits(&path, 1000).unwrap(), 1000).len(), 32);
        assert_eq!(g.tighten().unwrap(), 30);
        assert_eq!(set(&read_bits(&path, 1000).unwrap(), 1000), vec![10, 500]);
        assert_eq!(g.tighten().unwrap(), 0, "nothing marked since");
        // A block in a tightened window is made durable again.
        g.mark(12, 13).unwrap();
        let on_disk = set(&read_bits(&path, 1000).unwrap(), 1000);
        assert!(on_disk.contains(&12) && on_disk.contains(&10) && on_disk.contains(&500));
    }

    /// Writers keep marking while tighten runs over and over: whenever a
    /// writer's mark returns, its bit is in the file.
    #[test]
    fn tighten_races_marks_without_losing_a_bit() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r.bits");
        let g = std::sync::Arc::new(DurableBitmap::create(&path, 4096, DIRTY).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tightener = {
            let (g, stop) = (g.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    g.tighten().unwrap();
                }
            })
        };
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let (g, path) = (g.clone(), path.clone());
                std::thread::spawn(move || {
                    let mut x = t + 1;
                    for _ in 0..300 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let b = (x >> 33) % 4096;
                        g.mark(b, b + 1).unwrap();
                        let on_disk = read_bits(&path, 4096).unwrap();
                        assert!(bitmap::test_bit(&on_disk, b), "bit {b} not in the file");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        tightener.join().unwrap();
    }

    #[test]
    fn exact_rounding_never_claims_more() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.bits");
        let g = DurableBitmap::create(&path, 300, EXACT).unwrap();
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
