//! `nbdferry checkpoint create|list|delete DISK [NAME]`: a client of the
//! daemon's admin API. Prints the daemon's JSON answer.

use std::path::PathBuf;

use hyper::Method;
use serde_json::json;

use super::snapshot::{check_names, unix_now};
use crate::admin::client::{request, segment};

#[derive(clap::Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    action: Action,
    /// The daemon's admin socket [default: STATE_DIR/admin.sock].
    #[arg(long, value_name = "PATH", global = true)]
    admin: Option<PathBuf>,
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
    let sock = args
        .admin
        .unwrap_or_else(crate::admin::default_admin_socket);
    let answer = match args.action {
        Action::Create { disk, name } => {
            let name = name.unwrap_or_else(|| format!("cp-{}", unix_now()));
            check_names(&disk, &name, "checkpoint")?;
            let path = format!("/v1/disks/{}/checkpoints", segment(&disk));
            request(&sock, Method::POST, &path, Some(json!({ "name": name }))).await?
        }
        Action::List { disk } => {
            ferry_store::validate_name("disk", &disk)?;
            request(
                &sock,
                Method::GET,
                &format!("/v1/disks/{}/checkpoints", segment(&disk)),
                None,
            )
            .await?
        }
        Action::Delete { disk, name } => {
            check_names(&disk, &name, "checkpoint")?;
            let path = format!(
                "/v1/disks/{}/checkpoints/{}",
                segment(&disk),
                segment(&name)
            );
            request(&sock, Method::DELETE, &path, None).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}
