//! `nbdferry health [--ready]`: asks a daemon whether it is alive (or
//! ready), for probes that can run a command (Kubernetes `exec` probes,
//! monitoring scripts). Exits 0 with the daemon's JSON answer, else
//! non-zero with the reason on one line.

use crate::admin::{AdminArg, print};

#[derive(clap::Args)]
pub struct HealthArgs {
    /// Ask whether it is ready (listeners up, state loaded, not shutting
    /// down) rather than only alive.
    #[arg(long)]
    ready: bool,
    #[command(flatten)]
    admin: AdminArg,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let api = args.admin.client()?;
    if args.ready {
        print(&api.ready().await?)
    } else {
        print(&api.health().await?)
    }
}
