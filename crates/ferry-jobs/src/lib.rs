//! Long-running jobs: [`copy`], a sparse-aware, pipelined disk copy
//! between NBD exports, local files or block devices, and streams; and the
//! [`backup`] jobs built on it (pull into a repository, restore, verify
//! against a live export, and [`backup_run`], one point of a daemon's live
//! disk through its admin API); the hydration of a post-copy disk from its
//! source ([`Hydration`], [`Remote`]); and the [`Mirror`] of a live disk
//! onto another export (pre-copy); a backup point as a read-only device
//! ([`PointDev`]).

pub mod background;
pub mod backup;
pub mod backup_run;
pub mod copy;
mod endpoint;
mod error;
mod hydrate;
mod mirror;
mod pace;
mod plan;
mod point_dev;
mod progress;
mod remote;
mod serial;
mod source_map;
pub mod zero;

pub use copy::{CopyOptions, CopyStats, copy};
pub use endpoint::EndpointSpec;
pub use error::{Error, Result};
pub use hydrate::{HydrateOptions, Hydration};
pub use mirror::{Finished, Mirror, MirrorError};
pub use point_dev::PointDev;
pub use progress::Progress;
pub use remote::{Lane, Remote, RemoteError, RemoteIdentity, RemoteStatus, SourceDev};
