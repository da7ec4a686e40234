//! Byte counts on the command line and in the config file: a number with
//! an optional binary suffix (K, M, G).

/// Parses `65536`, `64K`, `1M`, `2G`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("bad size '{s}': use a number of bytes, optionally with K, M or G"))
}

/// A copy request size: 1 byte to 32M.
pub fn parse_request_size(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        v @ 1..=0x200_0000 => Ok(v),
        _ => Err(format!("request size '{s}' must be between 1 byte and 32M")),
    }
}

/// A disk's tracking and copy-on-write block size.
pub fn parse_granularity(s: &str) -> Result<u64, String> {
    check_granularity(parse_bytes(s)?)
}

/// `g` if it is a valid granularity (see [`ferry_store::validate_granularity`]).
pub fn check_granularity(g: u64) -> Result<u64, String> {
    ferry_store::validate_granularity(g)
        .map(|()| g)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("K").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999999999G").is_err());
        assert_eq!(parse_request_size("32M"), Ok(32 << 20));
        assert!(parse_request_size("0").is_err());
        assert!(parse_request_size("33M").is_err());
        assert_eq!(parse_granularity("1M"), Ok(1 << 20));
        assert!(parse_granularity("96K").is_err());
        assert!(parse_granularity("2K").is_err());
        assert!(parse_granularity("128M").is_err());
    }
}
