//! Long-running jobs. For now: [`copy`], a sparse-aware, pipelined disk
//! copy between NBD exports, local files or block devices, and streams.

pub mod copy;
mod endpoint;
mod error;
mod plan;
mod progress;
pub mod zero;

pub use copy::{CopyOptions, CopyStats, copy};
pub use endpoint::EndpointSpec;
pub use error::{Error, Result};
pub use progress::Progress;
