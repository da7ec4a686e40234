//! Fast all-zero detection, so zero blocks inside data extents are written
//! as zeroes (or skipped) instead of as data.

/// True if every byte of `buf` is zero. Works on 64-byte blocks OR-ed
/// together as u64 words (the compiler vectorises the inner loop), checking
/// for a non-zero word only once per block so the common data case exits
/// after the first block.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Splits `buf` into alternating (start, end, all_zero) runs on a grid of
/// `grain` bytes, so zero blocks inside a data piece are not written as
/// data (the destination stays as sparse as the source's real data).
pub fn zero_runs(buf: &[u8], grain: usize) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut start = 0;
    for block in buf.chunks(grain.max(1)) {
        let end = start + block.len();
        let z = is_zero(block);
        match out.last_mut() {
            Some(last) if last.2 == z => last.1 = end,
            _ => out.push((start, end, z)),
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{is_zero, zero_runs};

    #[test]
    fn runs_alternate() {
        let mut v = vec![0u8; 4 * 4096 + 10];
        v[4096] = 1;
        v[4 * 4096 + 3] = 9;
        assert_eq!(
            zero_runs(&v, 4096),
            vec![
                (0, 4096, true),
                (4096, 8192, false),
                (8192, 16384, true),
                (16384, 16394, false)
            ]
        );
        assert_eq!(zero_runs(&[], 4096), vec![]);
    }

    #[test]
    fn detects_zero_and_nonzero_everywhere() {
        for len in [0usize, 1, 7, 63, 64, 65, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "len {len}");
            for i in 0..len {
                v[i] = 1;
                assert!(!is_zero(&v), "len {len} byte {i}");
                v[i] = 0;
            }
        }
    }
}
