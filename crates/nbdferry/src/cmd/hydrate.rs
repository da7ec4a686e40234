//! `nbdferry hydrate status DISK [--watch] [--json]`: where a disk that is
//! still arriving from its source (post-copy) stands.

use std::io::IsTerminal;
use std::time::Duration;

use ferry_api::HydrationStatus;

use crate::admin::{AdminArg, print};

#[derive(clap::Args)]
pub struct HydrateArgs {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    admin: AdminArg,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Bytes present and total, rate, ETA, the source's state.
    Status {
        disk: String,
        /// Follow it until the disk has arrived (a progress bar on a
        /// terminal; with --json one JSON line per second).
        #[arg(long)]
        watch: bool,
        /// The daemon's JSON answer instead of a summary line.
        #[arg(long)]
        json: bool,
    },
}

fn summary(s: &HydrationStatus) -> String {
    let pct = if s.total_bytes == 0 {
        100.0
    } else {
        100.0 * s.present_bytes as f64 / s.total_bytes as f64
    };
    let eta = s
        .eta_seconds
        .map_or_else(|| "-".to_string(), |e| format!("{e}s"));
    let mut line = format!(
        "{}: {}/{} bytes ({pct:.1}%), {} B/s, eta {eta}, source {} ({})",
        s.disk, s.present_bytes, s.total_bytes, s.rate, s.source, s.source_uri
    );
    if let (Some(a), Some(b)) = (s.started_at, s.completed_at) {
        line.push_str(&format!(", arrived in {:.1}s", b - a));
    }
    if let Some(e) = &s.last_error {
        line.push_str(&format!(", last error: {e}"));
    }
    line
}

pub async fn run(args: HydrateArgs) -> anyhow::Result<()> {
    let api = args.admin.client()?;
    let Action::Status { disk, watch, json } = args.action;
    let mut status = api.hydration(&disk).await?;
    if !watch {
        return if json {
            print(&status)
        } else {
            println!("{}", summary(&status));
            Ok(())
        };
    }
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(status.total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    loop {
        match &bar {
            Some(b) => {
                b.set_position(status.present_bytes);
                b.set_message(format!(
                    "{}/s, source {}",
                    indicatif::HumanBytes(status.rate),
                    status.source
                ));
            }
            None if json => println!("{}", serde_json::to_string(&status)?),
            None => println!("{}", summary(&status)),
        }
        if status.complete {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        status = api.hydration(&disk).await?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
        println!("{}", summary(&status));
    }
    Ok(())
}
