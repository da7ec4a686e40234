//! The bottom of the block stack: the [`BlockDev`] trait that the server,
//! the jobs and every layer share, and nothing else.
//!
//! A *device* answers requests itself (a file, a snapshot view, memory).
//! A *layer* sits on another device (`next`) and adds one concern, the way
//! an nbdkit filter sits on `next_ops`: it implements [`Layer`], overrides
//! only what it changes, and every other method passes through to `next`
//! (but `clone_range`, which a layer takes up or refuses).
//! A layer never reaches for a concrete device below it: it only calls the
//! trait.

mod dev;
mod error;
mod extent;
#[cfg(feature = "mem")]
mod mem;

pub use dev::{BlockDev, Caps, Fetch, FileSpan, Layer, ZeroMode, check_range};
pub use error::{Error, Result};
pub use extent::{Extent, block_extents};
#[cfg(feature = "mem")]
pub use mem::{Change, MemDev};

/// The standard allocation context: bit 0 hole, bit 1 reads as zeroes.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flags of a hole that reads as zeroes.
pub const STATE_HOLE_ZERO: u32 = 0b11;
/// Dirty-bitmap contexts are `qemu:dirty-bitmap:NAME` (bit 0 = dirty),
/// the way qemu publishes pull-mode backups.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `nbdferry:identity:ID` names the disk (and snapshot) an nbdferry export
/// serves, so that a client that reconnects can tell it got the same one.
/// Listed like a meta context; its only extent says nothing (flags 0).
pub const IDENTITY_PREFIX: &str = "nbdferry:identity:";
