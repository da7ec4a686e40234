//! Long-running jobs: [`copy`], a sparse-aware, pipelined disk copy
//! between NBD exports, local files or block devices, and streams; and the
//! [`backup`] jobs built on it (pull into a repository, restore, verify
//! against a live export); the hydration of a post-copy disk from its
//! source ([`Hydration`], [`Remote`]); and the [`Mirror`] of a live disk
//! onto another export (pre-copy).

pub mod backup;
pub mod copy;
mod endpoint;
mod error;
mod hydrate;
mod mirror;
mod pace;
mod plan;
mod progress;
mod remote;
pub mod zero;

pub use copy::{CopyOptions, CopyStats, copy};
pub use endpoint::EndpointSpec;
pub use error::{Error, Result};
pub use hydrate::{HydrateOptions, Hydration};
pub use mirror::{Finished, Mirror, MirrorError};
pub use progress::Progress;
pub use remote::{Lane, Remote, RemoteError, RemoteIdentity, RemoteStatus, SourceDev};
