//! Reading a point as a disk: random access from many tasks or threads at
//! once, every chunk checked against its id, and the zero/data layout for
//! sparse copies and `base:allocation`.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::index::{PointIndex, PointMeta, Slot};
use crate::repo::Repo;

/// Decoded chunks kept for small reads that hit the same chunk (an NBD
/// client reading 4 KiB at a time would otherwise fetch and check a whole
/// chunk per request).
const CACHED_CHUNKS: usize = 16;

pub struct PointReader {
    repo: Repo,
    index: PointIndex,
    cache: Mutex<VecDeque<(ChunkId, Bytes)>>,
}

impl PointReader {
    pub fn new(repo: Repo, index: PointIndex) -> PointReader {
        PointReader {
            repo,
            index,
            cache: Mutex::new(VecDeque::new()),
        }
    }

    /// Opens `DISK@POINT`, or the disk's newest point.
    pub async fn open(repo: &Repo, disk: &str, point: Option<&str>) -> Result<PointReader> {
        Ok(PointReader::new(
            repo.clone(),
            repo.resolve(disk, point).await?,
        ))
    }

    pub fn meta(&self) -> &PointMeta {
        &self.index.meta
    }

    pub fn size(&self) -> u64 {
        self.index.meta.size
    }

    pub fn chunk_size(&self) -> u64 {
        self.index.meta.chunk_size
    }

    /// `[offset, offset+len)` as (length, reads-as-zero) runs, merged.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.check(offset, len)?;
        let cs = self.chunk_size();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let i = pos / cs;
            let end = ((i + 1) * cs).min(offset + len);
            let zero = matches!(self.index.slots[i as usize], Slot::Zero);
            match out.last_mut() {
                Some(last) if last.1 == zero => last.0 += end - pos,
                _ => out.push((end - pos, zero)),
            }
            pos = end;
        }
        Ok(out)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Fills `buf` from `offset`.
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let cs = self.chunk_size();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let i = pos / cs;
            let within = (pos - i * cs) as usize;
            let n = (buf.len() - done).min(cs as usize - within);
            let out = &mut buf[done..done + n];
            match self.index.slots[i as usize] {
                Slot::Zero => out.fill(0),
                Slot::Chunk(id) => {
                    let chunk = self.chunk(&id).await?;
                    let src = chunk
                        .get(within..within + n)
                        .ok_or_else(|| Error::corrupt(&id.key(), "shorter than its slot"))?;
                    out.copy_from_slice(src);
                }
            }
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    /// [`read_at`](Self::read_at) for a thread outside the async runtime
    /// (a `spawn_blocking` thread, a block device layer).
    pub fn read_at_blocking(
        &self,
        runtime: &tokio::runtime::Handle,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        runtime.block_on(self.read_at(buf, offset))
    }

    async fn chunk(&self, id: &ChunkId) -> Result<Bytes> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, c)) = cache.iter().find(|(k, _)| k == id) {
                return Ok(c.clone());
            }
        }
        let c = self.repo.read_chunk(id).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHED_CHUNKS {
            cache.pop_front();
        }
        cache.push_back((*id, c.clone()));
        Ok(c)
    }
}
