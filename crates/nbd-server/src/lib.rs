//! The async NBD server: listeners, the handshake driver and the
//! transmission loop. It knows nothing of what an export is made of: every
//! export is a [`ferry_block::BlockDev`]. What it records for monitoring
//! is in `metrics.rs`.

mod admission;
mod budget;
mod bufpool;
mod conn;
mod deadline;
mod dispatch;
mod execute;
mod frame;
mod limits;
mod listen;
mod metrics;
mod outgoing;
mod refuse;
mod registry;
mod split;
mod zero_copy;

pub use bufpool::{POOL, use_one_arena};
pub use limits::Limits;
pub use listen::{Listener, Server, bind_unix_socket};
pub use metrics::{DURATION_BUCKETS, REQUEST_DURATION};
pub use registry::{Access, Export, Published, Registry, RegistryError};
