//! Turns extent runs (length, reads-as-zero) into the copy's work items:
//! data pieces no longer than the request size and split on a grid of that
//! size (so requests stay aligned), and zero ranges shrunk inward to the
//! alignment both ends require (the trimmed edges are copied as data).

use std::collections::VecDeque;

/// Longest zero range handed out as one item; keeps WRITE_ZEROES effect
/// lengths well inside what compact headers and servers accept.
pub const MAX_ZERO_ITEM: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Data { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

impl Item {
    pub fn len(&self) -> u64 {
        match *self {
            Item::Data { len, .. } | Item::Zero { len, .. } => len,
        }
    }
}

/// Appends the items for `runs` starting at `start` to `out`. `size` is the
/// image size: a zero range may end there even if unaligned.
pub fn push_items(
    start: u64,
    runs: &[(u64, bool)],
    align: u64,
    request_size: u64,
    size: u64,
    out: &mut VecDeque<Item>,
) {
    let align = align.max(1);
    // Merge neighbouring runs of the same kind first, so that alignment is
    // applied to whole zero ranges, not to each run of them.
    let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(runs.len());
    let mut pos = start;
    for &(len, zero) in runs {
        merge(&mut merged, pos, pos + len, zero);
        pos += len;
    }
    let mut ranges: Vec<(u64, u64, bool)> = Vec::with_capacity(merged.len() + 2);
    for (a, b, zero) in merged {
        if !zero {
            merge(&mut ranges, a, b, false);
            continue;
        }
        let a2 = a.div_ceil(align) * align;
        let b2 = if b == size { b } else { b / align * align };
        if a2 >= b2 {
            merge(&mut ranges, a, b, false);
        } else {
            merge(&mut ranges, a, a2, false);
            merge(&mut ranges, a2, b2, true);
            merge(&mut ranges, b2, b, false);
        }
    }
    for (a, b, zero) in ranges {
        let mut p = a;
        while p < b {
            let end = if zero {
                (p + MAX_ZERO_ITEM).min(b)
            } else {
                ((p / request_size + 1) * request_size).min(b)
            };
            out.push_back(if zero {
                Item::Zero {
                    offset: p,
                    len: end - p,
                }
            } else {
                Item::Data {
                    offset: p,
                    len: end - p,
                }
            });
            p = end;
        }
    }
}

fn merge(ranges: &mut Vec<(u64, u64, bool)>, a: u64, b: u64, zero: bool) {
    if a >= b {
        return;
    }
    match ranges.last_mut() {
        Some(last) if last.1 == a && last.2 == zero => last.1 = b,
        _ => ranges.push((a, b, zero)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(start: u64, runs: &[(u64, bool)], align: u64, rs: u64, size: u64) -> Vec<Item> {
        let mut q = VecDeque::new();
        push_items(start, runs, align, rs, size, &mut q);
        q.into_iter().collect()
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
