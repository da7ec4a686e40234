//! Interop suite: nbdferry against real NBD peers (qemu, libnbd, nbdkit,
//! nbd-server/nbd-client) plus hostile-input and CLI contract tests.
//! Keep this file a plain list of modules.

mod harness;

mod blockdev;
mod cli;
mod client;
mod flood;
mod guards;
mod hostile;
mod libnbd;
mod mutate;
mod nbd_server_ref;
mod nbdkit;
mod qemu;
mod snapshots;
mod tls;
