//! Names: chunk ids, disk names, point ids, and the object keys built from
//! them.

use std::fmt;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::seal::hex;

/// A chunk's identity: BLAKE3 of its content (keyed when encrypted).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl ChunkId {
    pub fn parse_hex(s: &str) -> Option<ChunkId> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ChunkId(out))
    }

    /// `chunks/ab/ab12…`: a two-hex-digit fan-out keeps directories small.
    pub fn key(&self) -> String {
        let h = self.to_string();
        format!("{CHUNKS}{}/{h}", &h[..2])
    }

    /// The id in a chunk or fossil key (its last path component).
    pub fn from_key(key: &str) -> Option<ChunkId> {
        ChunkId::parse_hex(key.rsplit('/').next()?)
    }
}

pub const CHUNKS: &str = "chunks/";
pub const POINTS: &str = "points/";
pub const SESSIONS: &str = "sessions/";
pub const FOSSILS: &str = "fossils/";
pub const GC: &str = "gc/";
pub const CONFIG: &str = "config";

/// Disk names and point ids become object keys: keep them to a safe set.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

pub fn point_key(disk: &str, point: &str) -> String {
    format!("{POINTS}{disk}/{point}")
}

/// `20261201T000717.123Z-3fa9`: the UTC time the backup started, to the
/// millisecond (so ids sort oldest first) and 16 random bits (two backups
/// of one disk in the same millisecond get distinct ids).
pub fn new_point_id(at: SystemTime) -> Result<String> {
    let stamp: String = humantime::format_rfc3339_millis(at)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    Ok(format!("{stamp}-{}", hex(&random::<2>()?)))
}

/// Random bytes from the kernel (`getrandom(2)`). Not aws-lc's generator:
/// its first use seeds a jitter entropy source that costs about 100 ms of
/// CPU, a third of an incremental backup's run.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    let mut filled = 0;
    while filled < N {
        match rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return Err(Error::Invalid("no random bytes".into())),
        }
    }
    Ok(b)
}

/// Splits `DISK@POINT` (the point is optional).
pub fn split_target(s: &str) -> Result<(&str, Option<&str>)> {
    let (disk, point) = match s.split_once('@') {
        Some((d, p)) => (d, Some(p)),
        None => (s, None),
    };
    check_name(disk)?;
    if let Some(p) = point {
        check_name(p)?;
    }
    Ok((disk, point))
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        assert!(check_name("vm-1.disk_a").is_ok());
        for bad in ["", "a/b", "..", ".hidden", "a@b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let id = new_point_id(SystemTime::UNIX_EPOCH).unwrap();
        assert!(id.starts_with("19700101T000000.000Z-"), "{id}");
        let later =
            new_point_id(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1)).unwrap();
        assert!(later > id, "ids sort by time: {later} {id}");
        check_name(&id).unwrap();
        let c = ChunkId([0xab; 32]);
        assert_eq!(ChunkId::from_key(&c.key()), Some(c));
        assert!(c.key().starts_with("chunks/ab/abab"));
        assert_eq!(split_target("d@p").unwrap(), ("d", Some("p")));
        assert_eq!(split_target("d").unwrap(), ("d", None));
        assert!(split_target("d@").is_err());
    }
}
