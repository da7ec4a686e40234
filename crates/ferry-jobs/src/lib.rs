//! Long-running jobs: [`copy`], a sparse-aware, pipelined disk copy
//! between NBD exports, local files or block devices, and streams; and the
//! [`backup`] jobs built on it (pull into a repository, restore, verify
//! against a live export).

pub mod backup;
pub mod copy;
mod endpoint;
mod error;
mod pace;
mod plan;
mod progress;
pub mod zero;

pub use copy::{CopyOptions, CopyStats, copy};
pub use endpoint::EndpointSpec;
pub use error::{Error, Result};
pub use progress::Progress;
