//! The nbdferry storage engine: the [`BlockDev`] trait every export is
//! built from, and its layers.

mod blockdev;
mod error;
mod file;

pub use blockdev::{BlockDev, Caps, Extent, ZeroMode};
pub use error::StoreError;
pub use file::FileDev;
