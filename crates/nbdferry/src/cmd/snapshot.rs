//! `nbdferry snapshot create|list|delete|revert DISK [NAME]`: a client of
//! the daemon's admin API. Prints the daemon's JSON answer.

use hyper::Method;
use serde_json::json;

use crate::admin::client::{AdminArg, collection, item, unix_now};

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
    let admin = args.admin;
    match args.action {
        Action::Create {
            disk,
            name,
            checkpoint,
        } => {
            let name = name.unwrap_or_else(|| format!("snap-{}", unix_now()));
            let path = collection(&disk, "snapshot")?;
            ferry_store::validate_name("snapshot", &name)?;
            let body = json!({ "name": name, "checkpoint": checkpoint });
            admin.call(Method::POST, &path, Some(body)).await
        }
        Action::List { disk } => {
            admin
                .call(Method::GET, &collection(&disk, "snapshot")?, None)
                .await
        }
        Action::Delete { disk, name } => {
            admin
                .call(Method::DELETE, &item(&disk, "snapshot", &name)?, None)
                .await
        }
        Action::Revert { disk, name } => {
            let path = format!("{}/revert", item(&disk, "snapshot", &name)?);
            admin.call(Method::POST, &path, None).await
        }
    }
}
