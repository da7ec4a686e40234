//! A backup point as a read-only block device, so the server can export
//! it (`serve --backup`): qemu-img, guestfish or nbdcopy read a point
//! without restoring it, and a post-copy destination can use one as its
//! source (an instant restore). Every chunk read is checked against its
//! id; a bad one fails that read with EIO rather than serve wrong data.
//! A point's index is loaded at its first use: a repository of many
//! points costs nothing until they are read.

use std::sync::OnceLock;

use ferry_block::{
    BASE_ALLOCATION, BlockDev, Caps, Error as BlockError, Extent, Result as BlockResult,
    STATE_HOLE_ZERO, check_range,
};
use ferry_repo::{PointMeta, PointReader, Repo};

pub struct PointDev {
    repo: Repo,
    meta: PointMeta,
    reader: OnceLock<PointReader>,
    handle: tokio::runtime::Handle,
}

impl PointDev {
    pub fn new(repo: Repo, meta: PointMeta, handle: tokio::runtime::Handle) -> Self {
        PointDev {
            repo,
            meta,
            reader: OnceLock::new(),
            handle,
        }
    }

    /// Runs `f` on this thread, which may be an async worker:
    /// block_in_place lets it wait (its other tasks move elsewhere); on a
    /// blocking-pool thread it just runs.
    fn wait<T>(&self, f: impl FnOnce() -> ferry_repo::Result<T>) -> BlockResult<T> {
        tokio::task::block_in_place(f).map_err(io)
    }

    fn reader(&self) -> BlockResult<&PointReader> {
        if let Some(r) = self.reader.get() {
            return Ok(r);
        }
        let (disk, point) = (&self.meta.disk, &self.meta.point);
        let index = self.wait(|| self.handle.block_on(self.repo.load_point(disk, point)))?;
        Ok(self
            .reader
            .get_or_init(|| PointReader::new(self.repo.clone(), index)))
    }
}

fn io(e: ferry_repo::Error) -> BlockError {
    BlockError::Io(std::io::Error::other(e.to_string()))
}

impl BlockDev for PointDev {
    fn size(&self) -> u64 {
        self.meta.size
    }

    fn caps(&self) -> Caps {
        Caps::READ_ONLY
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let reader = self.reader()?;
        self.wait(|| reader.read_at_blocking(&self.handle, buf, offset))
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn contexts(&self) -> Vec<String> {
        vec![BASE_ALLOCATION.to_string()]
    }

    fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> BlockResult<Vec<Extent>> {
        if context != BASE_ALLOCATION {
            return Err(BlockError::UnknownContext(context.to_string()));
        }
        check_range(self.size(), offset, len)?;
        let runs = self.reader()?.extents(offset, len).map_err(io)?;
        Ok(runs
            .into_iter()
            .take(max.max(1))
            .map(|(length, zero)| Extent {
                length,
                flags: if zero { STATE_HOLE_ZERO } else { 0 },
            })
            .collect())
    }
}
