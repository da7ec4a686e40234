//! The nbdferry daemon as a library: the disks and exports it serves, the
//! management operations on them ([`Daemon`], typed errors), how an
//! export's block stack is assembled from its configuration (`stack.rs`),
//! whether it is ready for clients (`phase.rs`), reload requests for the
//! owner of the configuration (`reload.rs`), the state sampled for
//! `/metrics` (`metrics.rs`), and the admin API that
//! serves the operations over HTTP (`http/`), generic over its listener: a
//! Unix socket, or TCP with mutual TLS and per-disk roles. The binary only
//! parses arguments and wires these up.

mod error;
pub mod http;
mod metrics;
mod phase;
mod reload;
mod service;
mod stack;

pub use error::ServiceError;
pub use ferry_jobs::HydrateOptions;
pub use metrics::{Gauge, Render};
pub use phase::Phase;
pub use reload::ReloadRequest;
pub use service::{Daemon, TIGHTEN_EVERY};
pub use stack::{ExportSpec, SourceSpec};
