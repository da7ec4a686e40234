//! The nbdferry storage engine: the layers of the block stack and the
//! state they keep.
//!
//! - [`FileDev`]: the bottom, a regular file or block device.
//! - [`CopyOnRead`] (`copy_on_read.rs`): a disk still arriving from a
//!   source (post-copy): absent blocks are fetched when read.
//! - [`DirtyTracker`] (`dirty.rs`): records written blocks in bitmap
//!   generations, one per checkpoint.
//! - [`SnapshotOrigin`] (`origin.rs`): preserves blocks before their first
//!   overwrite, for every snapshot at once (`cow_store.rs`). Where the
//!   image's file system has reflinks, snapshots are clones of the image
//!   instead (`clones.rs` over `reflink.rs`) and the origin has nothing
//!   to do.
//! - [`Tap`] (`tap.rs`): where a mirror sees every change, and where
//!   writes are closed off once a disk has moved.
//! - [`WriteFence`] (`fence.rs`): holds writes back while snapshots and
//!   checkpoints change.
//! - [`Disk`] (`disk.rs`): owns a live disk's state directory and stacks
//!   the layers above over the device below; snapshot exports are
//!   read-only views (`view.rs`).
//!
//! Durable bitmaps (`durable_bitmap.rs`) are one type with one group
//! commit (`sync.rs`), used by every layer that needs one.
//!
//! Test support (feature `loop-xfs`, and this crate's tests): `loop_xfs.rs`
//! mounts a small XFS on a loop device so that snapshot tests run on both
//! backends.

mod aligned;
mod bitmap;
mod cache;
mod clones;
mod copy_on_read;
mod cow_store;
mod dirty;
mod disk;
mod durable_bitmap;
mod error;
mod fence;
mod file;
mod io;
mod manifest;
mod origin;
mod reflink;
mod sync;
mod tap;
mod view;

#[cfg(test)]
mod disk_tests;
#[cfg(any(test, feature = "loop-xfs"))]
pub mod loop_xfs;

pub use bitmap::AtomicBitmap;
pub use copy_on_read::{AsyncRead, Claim, CopyOnRead, HydrationProgress, PRESENT_MAP};
pub use dirty::DirtyTracker;
pub use disk::{DEFAULT_GRANULARITY, Disk, Reflinks, validate_granularity};
pub use durable_bitmap::{DurableBitmap, Persist, Rounding};
pub use error::{Result, StoreError};
pub use fence::WriteFence;
pub use file::FileDev;
pub use manifest::{validate_name, write_atomic};
pub use origin::SnapshotOrigin;
pub use tap::{Change, Tap, Ticket, WriteTap};
