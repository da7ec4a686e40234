//! `nbdferry snapshot create|list|delete|revert DISK [NAME]`: a client of
//! the daemon's admin API. Prints the daemon's JSON answer.

use std::path::PathBuf;

use hyper::Method;
use serde_json::json;

use crate::admin::client::{request, segment};

#[derive(clap::Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    action: Action,
    /// The daemon's admin socket [default: STATE_DIR/admin.sock].
    #[arg(long, value_name = "PATH", global = true)]
    admin: Option<PathBuf>,
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
    let sock = args
        .admin
        .unwrap_or_else(crate::admin::default_admin_socket);
    let answer = match args.action {
        Action::Create {
            disk,
            name,
            checkpoint,
        } => {
            let name = name.unwrap_or_else(|| format!("snap-{}", unix_now()));
            check_names(&disk, &name, "snapshot")?;
            let path = format!("/v1/disks/{}/snapshots", segment(&disk));
            request(
                &sock,
                Method::POST,
                &path,
                Some(json!({ "name": name, "checkpoint": checkpoint })),
            )
            .await?
        }
        Action::List { disk } => {
            ferry_store::validate_name("disk", &disk)?;
            request(
                &sock,
                Method::GET,
                &format!("/v1/disks/{}/snapshots", segment(&disk)),
                None,
            )
            .await?
        }
        Action::Delete { disk, name } => {
            check_names(&disk, &name, "snapshot")?;
            let path = format!("/v1/disks/{}/snapshots/{}", segment(&disk), segment(&name));
            request(&sock, Method::DELETE, &path, None).await?
        }
        Action::Revert { disk, name } => {
            check_names(&disk, &name, "snapshot")?;
            let path = format!(
                "/v1/disks/{}/snapshots/{}/revert",
                segment(&disk),
                segment(&name)
            );
            request(&sock, Method::POST, &path, None).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// Rejects bad names before bothering the daemon (which checks again).
pub fn check_names(disk: &str, name: &str, kind: &str) -> anyhow::Result<()> {
    ferry_store::validate_name("disk", disk)?;
    ferry_store::validate_name(kind, name)?;
    Ok(())
}

/// Seconds since the epoch, for default snapshot and checkpoint names.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
