//! The nbdferry storage engine: the [`BlockDev`] trait every export is
//! built from, and its layers: the file ([`FileDev`]), and a live disk with
//! checkpoints and snapshots ([`Volume`], [`SnapshotView`]).

mod aligned;
mod bitmap;
mod blockdev;
mod cow;
mod dirty;
mod error;
mod file;
mod meta;
mod snapshot;
mod sync;
mod volume;

#[cfg(test)]
mod tests;

pub use blockdev::{BlockDev, Caps, Extent, ZeroMode};
pub use error::StoreError;
pub use file::FileDev;
pub use meta::validate_name;
pub use snapshot::SnapshotView;
pub use volume::{
    CheckpointInfo, DEFAULT_GRANULARITY, DeleteInfo, RevertInfo, SnapshotInfo, Volume,
    validate_granularity,
};
