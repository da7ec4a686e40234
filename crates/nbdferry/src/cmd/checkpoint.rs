//! `nbdferry checkpoint create|list|delete DISK [NAME]`: a client of the
//! daemon's admin API. Prints the daemon's JSON answer.

use hyper::Method;
use serde_json::json;

use crate::admin::client::{AdminArg, collection, item, unix_now};

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
    let admin = args.admin;
    match args.action {
        Action::Create { disk, name } => {
            let name = name.unwrap_or_else(|| format!("cp-{}", unix_now()));
            let path = collection(&disk, "checkpoint")?;
            ferry_store::validate_name("checkpoint", &name)?;
            let body = json!({ "name": name });
            admin.call(Method::POST, &path, Some(body)).await
        }
        Action::List { disk } => {
            admin
                .call(Method::GET, &collection(&disk, "checkpoint")?, None)
                .await
        }
        Action::Delete { disk, name } => {
            admin
                .call(Method::DELETE, &item(&disk, "checkpoint", &name)?, None)
                .await
        }
    }
}
