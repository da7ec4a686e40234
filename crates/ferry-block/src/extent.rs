/// A run of `length` bytes sharing the status `flags` of one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// Extents of `[offset, offset+len)` where the status of block `b` (of
/// `gran` bytes) is `flag_of(b)`: merged, at most `max` of them.
pub fn block_extents(
    offset: u64,
    len: u64,
    gran: u64,
    max: usize,
    flag_of: impl Fn(u64) -> u32,
) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let b = pos / gran;
        let stop = ((b + 1) * gran).min(end);
        let flags = flag_of(b);
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += stop - pos,
            _ => {
                if out.len() >= max.max(1) {
                    break;
                }
                out.push(Extent {
                    length: stop - pos,
                    flags,
                })
            }
        }
        pos = stop;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_clip() {
        let e = block_extents(100, 4000, 1024, 10, |b| (b == 1 || b == 2) as u32);
        let lens: Vec<(u64, u32)> = e.iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(lens, vec![(924, 0), (2048, 1), (1028, 0)]);
        assert_eq!(block_extents(0, 4096, 1024, 1, |b| b as u32).len(), 1);
    }
}
