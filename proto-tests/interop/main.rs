//! Interop suite: nbdferry against real NBD peers (qemu, libnbd, nbdkit,
//! nbd-server/nbd-client) plus hostile-input and CLI contract tests.
//! Keep this file a plain list of modules.

mod harness;

mod blockdev;
mod cli;
mod client;
mod deploy;
mod full_disk;
mod hostile;
mod libnbd;
mod mutate;
mod nbd_server_ref;
mod nbdkit;
mod qemu;
mod remote_admin;
mod service;
mod snapshots;
mod tls;
