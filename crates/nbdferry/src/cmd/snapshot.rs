//! `nbdferry snapshot create|list|delete|revert DISK [NAME]`: a client of
//! the daemon's admin API. Prints the daemon's JSON answer.

use ferry_api::CreateSnapshot;

use crate::admin::{AdminArg, print, unix_now};

#[derive(clap::Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    admin: AdminArg,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Freeze the disk's current content as export DISK@NAME.
    Create {
        disk: String,
        /// Snapshot name [default: snap-UNIXTIME].
        name: Option<String>,
        /// Also start a checkpoint of the same name, atomically.
        #[arg(long)]
        checkpoint: bool,
    },
    /// List the disk's snapshots.
    List { disk: String },
    /// Delete a snapshot and free its space (refused while clients read it).
    Delete { disk: String, name: String },
    /// Put the live disk back to the snapshot's content.
    Revert { disk: String, name: String },
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    let api = args.admin.client()?;
    match args.action {
        Action::Create {
            disk,
            name,
            checkpoint,
        } => {
            let name = name.unwrap_or_else(|| format!("snap-{}", unix_now()));
            print(
                &api.create_snapshot(&disk, &CreateSnapshot { name, checkpoint })
                    .await?,
            )
        }
        Action::List { disk } => print(&api.snapshots(&disk).await?),
        Action::Delete { disk, name } => print(&api.delete_snapshot(&disk, &name).await?),
        Action::Revert { disk, name } => print(&api.revert(&disk, &name).await?),
    }
}
