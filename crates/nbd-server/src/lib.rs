//! The async NBD server: listeners, the handshake driver and the
//! transmission loop. It knows nothing of what an export is made of: every
//! export is a [`ferry_block::BlockDev`].

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
mod outgoing;
mod refuse;
mod registry;
mod split;

pub use limits::Limits;
pub use listen::{Listener, Server, bind_unix_socket};
pub use registry::{Access, Export, Published, Registry, RegistryError};
