//! Long-running jobs: [`copy`], a sparse-aware, pipelined disk copy
//! between NBD exports, local files or block devices, and streams; and the
//! [`backup`] jobs built on it (pull into a repository, restore, verify
//! against a live export); and the hydration of a post-copy disk from its
//! [`Source`] ([`Hydration`]).

pub mod backup;
pub mod copy;
mod endpoint;
mod error;
mod hydrate;
mod pace;
mod plan;
mod progress;
mod source;
pub mod zero;

pub use copy::{CopyOptions, CopyStats, copy};
pub use endpoint::EndpointSpec;
pub use error::{Error, Result};
pub use hydrate::{HydrateOptions, Hydration};
pub use progress::Progress;
pub use source::{Lane, Source, SourceDev, SourceError, SourceIdentity, SourceStatus};
