//! `nbdferry checkpoint create|list|delete DISK [NAME]`: a client of the
//! daemon's admin API. Prints the daemon's JSON answer.

use ferry_api::CreateCheckpoint;

use crate::admin::{AdminArg, print, unix_now};

#[derive(clap::Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    admin: AdminArg,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Start recording the blocks written from now on.
    Create {
        disk: String,
        /// Checkpoint name [default: cp-UNIXTIME].
        name: Option<String>,
    },
    /// List the disk's checkpoints with their dirty block counts.
    List { disk: String },
    /// Delete a checkpoint; the others keep their exact answers.
    Delete { disk: String, name: String },
}

pub async fn run(args: CheckpointArgs) -> anyhow::Result<()> {
    let api = args.admin.client()?;
    match args.action {
        Action::Create { disk, name } => {
            let name = name.unwrap_or_else(|| format!("cp-{}", unix_now()));
            print(
                &api.create_checkpoint(&disk, &CreateCheckpoint { name })
                    .await?,
            )
        }
        Action::List { disk } => print(&api.checkpoints(&disk).await?),
        Action::Delete { disk, name } => print(&api.delete_checkpoint(&disk, &name).await?),
    }
}
