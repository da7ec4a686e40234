//! A point's index: what every chunk-sized slot of the disk holds (a chunk
//! or zeroes). Complete on its own: restoring a point needs no other point.
//!
//! Encoding (before sealing): `u32 LE` length of a JSON header
//! ([`PointMeta`]), the header, `u64 LE` slot count, then per slot one tag
//! byte (`0` zeroes, `1` chunk) and for a chunk its 32-byte id. Decoding
//! checks every length against what is left before allocating.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::ChunkId;

/// Longest header accepted when decoding.
const MAX_HEADER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Zero,
    Chunk(ChunkId),
}

/// What a point is, beside its slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMeta {
    pub disk: String,
    pub point: String,
    /// When the backup started (ms since the Unix epoch).
    pub created_ms: u64,
    pub size: u64,
    pub chunk_size: u64,
    /// The point whose slots clean ranges were taken from, if any.
    pub parent: Option<String>,
    /// The dirty-bitmap context that said which ranges changed, if any.
    pub bitmap: Option<String>,
    /// Where the data came from (URI or path), for people.
    pub source: String,
    pub stats: PointStats,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Chunks this backup stored (not already in the repository).
    pub new_chunks: u64,
    /// Their stored (compressed, sealed) size.
    pub new_bytes: u64,
    /// Bytes of the disk held in chunks (not zero slots).
    pub data_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointIndex {
    pub meta: PointMeta,
    pub slots: Vec<Slot>,
}

impl PointIndex {
    /// Slots a disk of `size` bytes needs.
    pub fn slot_count(size: u64, chunk_size: u64) -> u64 {
        size.div_ceil(chunk_size)
    }

    /// Length of slot `i` (the last one may be short).
    pub fn slot_len(&self, i: usize) -> u64 {
        slot_len(self.meta.size, self.meta.chunk_size, i as u64)
    }

    pub fn chunks(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.slots.iter().filter_map(|s| match s {
            Slot::Chunk(id) => Some(*id),
            Slot::Zero => None,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec(&self.meta)
            .map_err(|e| Error::Invalid(format!("cannot encode a point header: {e}")))?;
        let mut out = Vec::with_capacity(4 + header.len() + 8 + self.slots.len() * 33);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.slots.len() as u64).to_le_bytes());
        for s in &self.slots {
            match s {
                Slot::Zero => out.push(0),
                Slot::Chunk(id) => {
                    out.push(1);
                    out.extend_from_slice(&id.0);
                }
            }
        }
        Ok(out)
    }

    /// Decodes an index; `key` names it in errors.
    pub fn decode(key: &str, b: &[u8]) -> Result<PointIndex> {
        let bad = |why: &str| Error::corrupt(key, why);
        let mut r = b;
        let hlen = take(&mut r, 4).ok_or_else(|| bad("truncated header length"))?;
        let hlen = u32::from_le_bytes(hlen.try_into().unwrap_or_default()) as usize;
        if hlen > MAX_HEADER {
            return Err(bad("header too long"));
        }
        let header = take(&mut r, hlen).ok_or_else(|| bad("truncated header"))?;
        let meta: PointMeta =
            serde_json::from_slice(header).map_err(|e| bad(&format!("bad header: {e}")))?;
        if meta.chunk_size == 0 {
            return Err(bad("chunk size 0"));
        }
        let n = take(&mut r, 8).ok_or_else(|| bad("truncated slot count"))?;
        let n = u64::from_le_bytes(n.try_into().unwrap_or_default());
        if n != PointIndex::slot_count(meta.size, meta.chunk_size) {
            return Err(bad("slot count does not match the disk size"));
        }
        // Each slot takes at least one byte: bound the allocation by what
        // is actually there.
        if n > r.len() as u64 {
            return Err(bad("truncated slots"));
        }
        let mut slots = Vec::with_capacity(n as usize);
        for _ in 0..n {
            match take(&mut r, 1).map(|t| t[0]) {
                Some(0) => slots.push(Slot::Zero),
                Some(1) => {
                    let id = take(&mut r, 32).ok_or_else(|| bad("truncated chunk id"))?;
                    let mut a = [0u8; 32];
                    a.copy_from_slice(id);
                    slots.push(Slot::Chunk(ChunkId(a)));
                }
                Some(t) => return Err(bad(&format!("unknown slot tag {t}"))),
                None => return Err(bad("truncated slots")),
            }
        }
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(PointIndex { meta, slots })
    }
}

pub(crate) fn slot_len(size: u64, chunk_size: u64, i: u64) -> u64 {
    (size - (i * chunk_size).min(size)).min(chunk_size)
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (a, b) = r.split_at(n);
    *r = b;
    Some(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PointIndex {
        PointIndex {
            meta: PointMeta {
                disk: "d".into(),
                point: "p".into(),
                created_ms: 5,
                size: 10_000,
                chunk_size: 4096,
                parent: None,
                bitmap: Some("qemu:dirty-bitmap:b0".into()),
                source: "nbd://x".into(),
                stats: PointStats::default(),
            },
            slots: vec![Slot::Zero, Slot::Chunk(ChunkId([3; 32])), Slot::Zero],
        }
    }

    #[test]
    fn round_trips_and_slot_lengths() {
        let p = sample();
        let b = p.encode().unwrap();
        assert_eq!(PointIndex::decode("k", &b).unwrap(), p);
        assert_eq!(p.slot_len(0), 4096);
        assert_eq!(p.slot_len(2), 10_000 - 8192);
        assert_eq!(p.chunks().count(), 1);
    }

    #[test]
    fn every_truncation_and_garbage_is_refused_without_panic() {
        let b = sample().encode().unwrap();
        for n in 0..b.len() {
            assert!(PointIndex::decode("k", &b[..n]).is_err(), "prefix {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(PointIndex::decode("k", &long).is_err());
        // A huge slot count with nothing behind it must not allocate.
        let mut huge = b.clone();
        let hlen = u32::from_le_bytes(huge[..4].try_into().unwrap()) as usize;
        huge[4 + hlen..4 + hlen + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(PointIndex::decode("k", &huge).is_err());
    }
}
