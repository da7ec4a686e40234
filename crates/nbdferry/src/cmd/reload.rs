//! `nbdferry reload`: asks a daemon to re-read its config file and TLS
//! certificates, as SIGHUP does, and prints what changed; a refused
//! configuration exits non-zero with the daemon's one-line reason.

use crate::admin::{AdminArg, print};

#[derive(clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    admin: AdminArg,
}

pub async fn run(args: ReloadArgs) -> anyhow::Result<()> {
    print(&args.admin.client()?.reload().await?)
}
