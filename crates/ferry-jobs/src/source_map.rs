//! What a post-copy source said of its allocation (`base:allocation`),
//! for the background pass: asked ahead of it, a few tens of MiB at a
//! time, so that its claims follow the source's zero runs (landed as one
//! hole each, nothing transferred) and its fetches need not ask.

use std::sync::Arc;

use ferry_block::Extent;
use nbd_proto::consts::state;
use tokio::task::JoinSet;

use crate::remote::{Lane, Remote, RemoteError};

/// Bytes of the source one question asks about. One per fetch cost a
/// third of each fetch's time on loopback (the question waits behind the
/// pass's 1 MiB reads on its connection: 1.5 ms of 4.5).
const AHEAD: u64 = 64 << 20;

/// The source's answers, from byte `start` to byte `end`. The source is
/// frozen, so what it said holds.
#[derive(Default)]
struct Known {
    start: u64,
    end: u64,
    extents: Vec<Extent>,
}

impl Known {
    fn covers(&self, at: u64) -> bool {
        (self.start..self.end).contains(&at)
    }

    /// The source's answer from byte `from`: after what is known (which
    /// stays, one question's worth of it, for fetches still on it), or
    /// instead of it.
    fn add(&mut self, from: u64, extents: Vec<Extent>) {
        if from != self.end {
            (self.start, self.extents) = (from, Vec::new());
        }
        self.end = from.saturating_add(covered(&extents));
        self.extents.extend(extents);
        let keep_from = from.saturating_sub(AHEAD);
        let mut gone = 0;
        while gone + 1 < self.extents.len() && self.start + self.extents[gone].length <= keep_from {
            self.start += self.extents[gone].length;
            gone += 1;
        }
        self.extents.drain(..gone);
    }

    /// See [`SourceMap::zero_run`].
    fn zero_run(&self, a: u64, gran: u64) -> Option<u64> {
        let from = a.checked_mul(gran)?;
        if !self.covers(from) {
            return None;
        }
        let mut pos = self.start;
        let mut zero_to = None;
        for e in &self.extents {
            let next = pos.saturating_add(e.length);
            if next > from {
                if e.flags & state::ZERO == 0 {
                    break;
                }
                // On through zero extents the source told apart (a hole,
                // then allocated zeroes).
                zero_to = Some(next);
            }
            pos = next;
        }
        let end = zero_to?.min(self.end) / gran;
        (end > a).then_some(end)
    }
}

pub(crate) struct SourceMap {
    known: tokio::sync::Mutex<Known>,
    source: Arc<Remote>,
}

impl SourceMap {
    pub fn new(source: Arc<Remote>) -> Arc<Self> {
        Arc::new(SourceMap {
            known: tokio::sync::Mutex::default(),
            source,
        })
    }

    /// Whether each of blocks `[a, b)` reads as zeroes at the source,
    /// asking it again when they are past what it said (clients' ranges,
    /// a rescan).
    pub async fn zeroes(&self, a: u64, b: u64, gran: u64) -> Result<Vec<bool>, RemoteError> {
        let size = self.source.identity().size;
        let (off, end) = (a * gran, (b * gran).min(size));
        let mut known = self.known.lock().await;
        if off < known.start || end > known.end {
            let len = AHEAD.max(end - off).min(size - off);
            let extents = self.source.allocation(Lane::Bulk, off, len).await?;
            known.add(off, extents);
        }
        Ok(zero_blocks(&known.extents, known.start, a, b, gran))
    }

    /// Where the run of zero blocks that starts at block `a` ends, as far
    /// as the source's answers go; None when they do not say block `a` is
    /// zero (or a fetch is asking the source right now).
    pub fn zero_run(&self, a: u64, gran: u64) -> Option<u64> {
        self.known.try_lock().ok()?.zero_run(a, gran)
    }

    /// Asks the source about [`AHEAD`] bytes from `from`, and adds the
    /// answer to what is known: after it (keeping the previous answer for
    /// fetches still on it), or instead of it. A failed question changes
    /// nothing: the fetches ask again, and report the error.
    ///
    /// Asked on the clients' lane: on the pass's own, the question queued
    /// behind the 32 MiB of reads in flight, and the pass, which crosses
    /// the source's holes faster than its data, waited for the answer for
    /// up to 15 ms per hydration of 512 MiB (of 300). A client's read
    /// waits behind one such question at most.
    async fn ask(self: Arc<Self>, from: u64) {
        let size = self.source.identity().size;
        // Not under the lock: fetches on what is known go on meanwhile.
        let Ok(extents) = self
            .source
            .allocation(Lane::Demand, from, AHEAD.min(size - from))
            .await
        else {
            return;
        };
        self.known.lock().await.add(from, extents);
    }
}

/// The background pass's questions to the source, ahead of its claims.
pub(crate) struct Lookahead {
    map: Arc<SourceMap>,
    asking: JoinSet<()>,
}

impl Lookahead {
    pub fn new(map: Arc<SourceMap>) -> Self {
        Lookahead {
            map,
            asking: JoinSet::new(),
        }
    }

    /// Drops the questions under way (the source is about to be let go).
    pub fn stop(&mut self) {
        self.asking.abort_all();
    }

    /// Before the pass claims from byte `at`: asks the source about what
    /// comes next once the pass is past the middle of what it knows (the
    /// answer is then there before the pass needs it), and waits for the
    /// answer if `at` is not known yet (claimed before it, the source's
    /// zeroes would go a request size at a time).
    pub async fn before_claim(&mut self, at: u64) {
        while self.asking.try_join_next().is_some() {}
        let size = self.map.source.identity().size;
        let (known, next) = match self.map.known.try_lock() {
            Ok(k) if k.covers(at) => (
                true,
                (at - k.start >= (k.end - k.start) / 2).then_some(k.end),
            ),
            Ok(_) => (false, Some(at)),
            // A fetch is asking the source: it will know.
            Err(_) => (false, None),
        };
        if let Some(from) = next.filter(|&f| f < size && self.asking.is_empty()) {
            self.asking.spawn(self.map.clone().ask(from));
        }
        if !known {
            self.asking.join_next().await;
        }
    }
}

/// Bytes the extents cover (saturating: the lengths are the source's to
/// choose).
fn covered(extents: &[Extent]) -> u64 {
    extents.iter().fold(0u64, |n, e| n.saturating_add(e.length))
}

/// For blocks `[a, b)`: whether each reads as zeroes at the source, by its
/// `base:allocation` extents from byte `start` (at or before block `a`). A
/// block only partly covered by zero extents, or not covered, is data.
fn zero_blocks(extents: &[Extent], start: u64, a: u64, b: u64, gran: u64) -> Vec<bool> {
    let mut zero = vec![true; (b - a) as usize];
    let mut mark_data = |from: u64, to: u64| {
        for blk in (from / gran).max(a)..to.div_ceil(gran).min(b) {
            zero[(blk - a) as usize] = false;
        }
    };
    let mut pos = start;
    for e in extents {
        if pos >= b * gran {
            break;
        }
        let next = pos.saturating_add(e.length);
        if e.flags & state::ZERO == 0 {
            mark_data(pos, next);
        }
        pos = next;
    }
    mark_data(pos, b * gran);
    zero
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_zero_only_when_zero_extents_cover_them_whole() {
        let ext = |length, flags| Extent { length, flags };
        // Blocks of 100 bytes from 1000: 1000-1150 zero, 1150-1200 data,
        // 1200-1400 zero, then the answer stops at 1400.
        let z = zero_blocks(&[ext(150, 3), ext(50, 0), ext(200, 2)], 1000, 10, 16, 100);
        assert_eq!(z, vec![true, false, true, true, false, false]);
        // The same answer, asked about blocks 11-14 only.
        let z = zero_blocks(&[ext(150, 3), ext(50, 0), ext(200, 2)], 1000, 11, 14, 100);
        assert_eq!(z, vec![false, true, true]);
    }

    #[test]
    fn zero_runs_end_at_data_or_at_what_is_known() {
        let ext = |length, flags| Extent { length, flags };
        let mut k = Known::default();
        // Blocks of 100 bytes: 0-250 hole, 250-400 allocated zeroes,
        // 400-500 data, 500-800 hole.
        k.add(0, vec![ext(250, 3), ext(150, 2), ext(100, 0), ext(300, 3)]);
        assert_eq!(k.zero_run(0, 100), Some(4));
        assert_eq!(k.zero_run(3, 100), Some(4));
        assert_eq!(k.zero_run(4, 100), None);
        // Up to what is known, not past it.
        assert_eq!(k.zero_run(5, 100), Some(8));
        assert_eq!(k.zero_run(8, 100), None);
        // Partly zero blocks are not in a run.
        k.add(800, vec![ext(150, 3), ext(50, 0)]);
        assert_eq!((k.start, k.end), (0, 1000));
        assert_eq!(k.zero_run(5, 100), Some(9));
        assert_eq!(k.zero_run(9, 100), None);
    }

    #[test]
    fn answers_follow_on_and_old_ones_go() {
        let ext = |length| Extent { length, flags: 0 };
        let mut k = Known::default();
        k.add(0, vec![ext(AHEAD / 2), ext(AHEAD / 2)]);
        k.add(AHEAD, vec![ext(AHEAD)]);
        assert_eq!((k.start, k.end, k.extents.len()), (0, 2 * AHEAD, 3));
        // One question's worth behind the newest answer is kept.
        k.add(2 * AHEAD, vec![ext(AHEAD)]);
        assert_eq!((k.start, k.end, k.extents.len()), (AHEAD, 3 * AHEAD, 2));
        // Not following on: instead.
        k.add(10 * AHEAD, vec![ext(7)]);
        assert_eq!(
            (k.start, k.end, k.extents.len()),
            (10 * AHEAD, 10 * AHEAD + 7, 1)
        );
    }
}
