//! One module per subcommand, each with its clap arguments and `run`.

mod backup;
mod backup_run;
mod certs;
mod checkpoint;
mod completions;
mod copy;
mod demo;
mod health;
mod hydrate;
mod info;
mod manpage;
mod map;
mod mirror;
mod reload;
mod restore;
mod serve;
mod size;
mod snapshot;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Serve a generated sample disk on loopback, copy it back with the
    /// client and verify it: the whole round trip, nothing to set up.
    Demo(demo::DemoArgs),
    /// Export files and block devices over NBD.
    Serve(Box<serve::ServeArgs>),
    /// Show an export's size, flags, block sizes and meta contexts.
    Info(info::InfoArgs),
    /// List the extents of a meta context (like `nbdinfo --map`).
    Map(map::MapArgs),
    /// Copy a disk between NBD exports, local files and streams.
    Copy(copy::CopyArgs),
    /// Generate TLS certificates for trying nbdferry out.
    Certs(certs::CertsArgs),
    /// Create, list, delete or revert to snapshots of a served disk.
    Snapshot(snapshot::SnapshotArgs),
    /// Create, list or delete dirty-tracking checkpoints of a served disk.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Follow a disk that is still arriving from its source (post-copy).
    Hydrate(hydrate::HydrateArgs),
    /// Mirror a served disk to another export while it is written
    /// (pre-copy): start, status, set, complete, cancel.
    Mirror(mirror::MirrorArgs),
    /// Move a served disk: mirror, wait until ready, complete.
    Migrate(mirror::MigrateArgs),
    /// Back up disks into a repository; list, verify, prune and delete points.
    Backup(backup::BackupArgs),
    /// Restore a backed-up point to a file, a block device or an NBD URI.
    Restore(restore::RestoreArgs),
    /// Ask a daemon whether it is alive, or ready (--ready): exit 0 if so.
    Health(health::HealthArgs),
    /// Make a daemon re-read its config file and certificates (as SIGHUP
    /// does) without dropping clients.
    Reload(reload::ReloadArgs),
    /// Print the shell completion script for bash, zsh, fish, elvish or
    /// powershell.
    Completions(completions::CompletionsArgs),
    /// Print the man page, or write one per command (--dir).
    Manpage(manpage::ManpageArgs),
}

impl Command {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Demo(a) => demo::run(a).await,
            Command::Serve(a) => serve::run(*a).await,
            Command::Info(a) => info::run(a).await,
            Command::Map(a) => map::run(a).await,
            Command::Copy(a) => copy::run(a).await,
            Command::Certs(a) => certs::run(a).await,
            Command::Snapshot(a) => snapshot::run(a).await,
            Command::Checkpoint(a) => checkpoint::run(a).await,
            Command::Hydrate(a) => hydrate::run(a).await,
            Command::Mirror(a) => mirror::run(a).await,
            Command::Migrate(a) => mirror::migrate(a).await,
            Command::Backup(a) => backup::run(a).await,
            Command::Restore(a) => restore::run(a).await,
            Command::Health(a) => health::run(a).await,
            Command::Reload(a) => reload::run(a).await,
            Command::Completions(a) => completions::run(a),
            Command::Manpage(a) => manpage::run(a),
        }
    }
}
