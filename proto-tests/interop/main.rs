//! Interop suite: nbdferry against real NBD peers (qemu, libnbd, nbdkit,
//! nbd-server/nbd-client) plus hostile-input and CLI contract tests.
//! Keep this file a plain list of modules.

mod harness;

mod backup;
mod backup_run;
mod blockdev;
mod cli;
mod client;
mod deploy;
mod flood;
mod full_disk;
mod guards;
mod hostile;
mod libnbd;
mod mirror;
mod mutate;
mod nbd_server_ref;
mod nbdkit;
mod netns;
mod postcopy;
mod prometheus;
mod qemu;
mod relay;
mod reload;
mod remote_admin;
mod service;
mod snapshots;
mod tls;
mod zero_copy;
