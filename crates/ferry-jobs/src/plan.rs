//! Turns extent runs (length, kind) into the copy's work items: data pieces
//! no longer than the request size and split on a grid of that size (so
//! requests stay aligned), zero ranges shrunk inward to the alignment both
//! ends require (the trimmed edges are copied as data), and kept ranges
//! (the destination has them already: clean ranges of an incremental
//! backup) passed through as they are.

use std::collections::VecDeque;

/// Longest zero range handed out as one item; keeps WRITE_ZEROES effect
/// lengths well inside what compact headers and servers accept.
pub const MAX_ZERO_ITEM: u64 = 1 << 30;

/// What a run of the source is, for the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Must be read.
    Data,
    /// Reads as zeroes: need not be read.
    Zero,
    /// Need not be copied at all: the destination takes it from elsewhere.
    Keep,
}

impl Run {
    pub fn zero_if(zero: bool) -> Run {
        if zero { Run::Zero } else { Run::Data }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Data { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Keep { offset: u64, len: u64 },
}

impl Item {
    pub fn len(&self) -> u64 {
        match *self {
            Item::Data { len, .. } | Item::Zero { len, .. } | Item::Keep { len, .. } => len,
        }
    }
}

/// Appends the items for `runs` starting at `start` to `out`. `size` is the
/// image size: a zero range may end there even if unaligned.
pub fn push_items(
    start: u64,
    runs: &[(u64, Run)],
    align: u64,
    request_size: u64,
    size: u64,
    out: &mut VecDeque<Item>,
) {
    let align = align.max(1);
    // Merge neighbouring runs of the same kind first, so that alignment is
    // applied to whole zero ranges, not to each run of them.
    let mut merged: Vec<(u64, u64, Run)> = Vec::with_capacity(runs.len());
    let mut pos = start;
    for &(len, run) in runs {
        merge(&mut merged, pos, pos + len, run);
        pos += len;
    }
    let mut ranges: Vec<(u64, u64, Run)> = Vec::with_capacity(merged.len() + 2);
    for (a, b, run) in merged {
        if run != Run::Zero {
            merge(&mut ranges, a, b, run);
            continue;
        }
        let a2 = a.div_ceil(align) * align;
        let b2 = if b == size { b } else { b / align * align };
        if a2 >= b2 {
            merge(&mut ranges, a, b, Run::Data);
        } else {
            merge(&mut ranges, a, a2, Run::Data);
            merge(&mut ranges, a2, b2, Run::Zero);
            merge(&mut ranges, b2, b, Run::Data);
        }
    }
    for (a, b, run) in ranges {
        let mut p = a;
        while p < b {
            let end = match run {
                Run::Data => ((p / request_size + 1) * request_size).min(b),
                Run::Zero | Run::Keep => (p + MAX_ZERO_ITEM).min(b),
            };
            let (offset, len) = (p, end - p);
            out.push_back(match run {
                Run::Data => Item::Data { offset, len },
                Run::Zero => Item::Zero { offset, len },
                Run::Keep => Item::Keep { offset, len },
            });
            p = end;
        }
    }
}

fn merge(ranges: &mut Vec<(u64, u64, Run)>, a: u64, b: u64, run: Run) {
    if a >= b {
        return;
    }
    match ranges.last_mut() {
        Some(last) if last.1 == a && last.2 == run => last.1 = b,
        _ => ranges.push((a, b, run)),
    }
}

/// Runs of an incremental source: what is dirty must be copied (as data,
/// or as zeroes where `base:allocation` says so), the rest is kept. Both
/// inputs are (length, flag) runs from the same offset (`zero`, `dirty`);
/// the result covers as much as both do.
pub fn dirty_runs(alloc: &[(u64, bool)], dirty: &[(u64, bool)]) -> Vec<(u64, Run)> {
    let mut out: Vec<(u64, Run)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    let (mut left_a, mut left_d) = (
        alloc.first().map_or(0, |r| r.0),
        dirty.first().map_or(0, |r| r.0),
    );
    while i < alloc.len() && j < dirty.len() {
        let n = left_a.min(left_d);
        let run = if !dirty[j].1 {
            Run::Keep
        } else {
            Run::zero_if(alloc[i].1)
        };
        match out.last_mut() {
            Some(last) if last.1 == run => last.0 += n,
            _ if n > 0 => out.push((n, run)),
            _ => {}
        }
        left_a -= n;
        left_d -= n;
        if left_a == 0 {
            i += 1;
            left_a = alloc.get(i).map_or(0, |r| r.0);
        }
        if left_d == 0 {
            j += 1;
            left_d = dirty.get(j).map_or(0, |r| r.0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(start: u64, runs: &[(u64, bool)], align: u64, rs: u64, size: u64) -> Vec<Item> {
        let runs: Vec<(u64, Run)> = runs.iter().map(|&(l, z)| (l, Run::zero_if(z))).collect();
        let mut q = VecDeque::new();
        push_items(start, &runs, align, rs, size, &mut q);
        q.into_iter().collect()
    }

    #[test]
    fn dirty_runs_keep_clean_ranges_and_zero_dirty_holes() {
        // alloc: data 0..100, zero 100..300, data 300..400
        // dirty: clean 0..50, dirty 50..350, clean 350..500 (beyond alloc)
        let v = dirty_runs(
            &[(100, false), (200, true), (100, false)],
            &[(50, false), (300, true), (150, false)],
        );
        assert_eq!(
            v,
            vec![
                (50, Run::Keep),
                (50, Run::Data),
                (200, Run::Zero),
                (50, Run::Data),
                (50, Run::Keep),
            ]
        );
        // Kept ranges pass through planning whole, next to split data.
        let mut q = VecDeque::new();
        push_items(0, &v, 1, 32, 400, &mut q);
        assert_eq!(q.front(), Some(&Item::Keep { offset: 0, len: 50 }));
        assert_eq!(
            q.back(),
            Some(&Item::Keep {
                offset: 350,
                len: 50
            })
        );
        assert_eq!(q.iter().map(Item::len).sum::<u64>(), 400);
    }

    #[test]
    fn splits_data_on_the_request_grid() {
        let v = items(100, &[(1000, false)], 1, 256, 10_000);
        assert_eq!(
            v[0],
            Item::Data {
                offset: 100,
                len: 156
            }
        );
        assert_eq!(
            v[1],
            Item::Data {
                offset: 256,
                len: 256
            }
        );
        assert_eq!(
            v.last(),
            Some(&Item::Data {
                offset: 1024,
                len: 76
            })
        );
        assert_eq!(v.iter().map(Item::len).sum::<u64>(), 1000);
    }

    #[test]
    fn zero_ranges_shrink_to_alignment_and_merge() {
        // data 0..700, zero 700..5000, zero 5000..9000 (merged), data to 10000
        let v = items(
            0,
            &[(700, false), (4300, true), (4000, true), (1000, false)],
            512,
            4096,
            10_000,
        );
        assert_eq!(
            v,
            vec![
                Item::Data {
                    offset: 0,
                    len: 1024
                },
                Item::Zero {
                    offset: 1024,
                    len: 8704 - 1024
                },
                Item::Data {
                    offset: 8704,
                    len: 10_000 - 8704
                },
            ]
        );
        // A zero tail ending at the image's unaligned end stays zero.
        let v = items(0, &[(1024, false), (1000, true)], 512, 4096, 2024);
        assert_eq!(
            v[1],
            Item::Zero {
                offset: 1024,
                len: 1000
            }
        );
        // Too small to align: becomes data.
        let v = items(
            0,
            &[(100, false), (200, true), (100, false)],
            512,
            4096,
            4096,
        );
        assert_eq!(
            v,
            vec![Item::Data {
                offset: 0,
                len: 400
            }]
        );
    }

    #[test]
    fn long_zero_ranges_are_split() {
        let v = items(
            0,
            &[(3 * MAX_ZERO_ITEM + 5, true)],
            1,
            4096,
            3 * MAX_ZERO_ITEM + 5,
        );
        assert_eq!(v.len(), 4);
        assert!(v.iter().all(|i| matches!(i, Item::Zero { .. })));
    }
}
