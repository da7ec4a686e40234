//! `nbdferry mirror start|status|set|complete|cancel DISK` and
//! `nbdferry migrate DISK --to URI`: pre-copy migration of a served disk,
//! through the daemon's admin API.

use std::io::IsTerminal;
use std::time::Duration;

use ferry_api::{AfterMirror, CompleteMirror, MirrorMode, MirrorStatus, SetMirror, StartMirror};

use crate::admin::{AdminArg, print};

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Background,
    Active,
}

impl From<ModeArg> for MirrorMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Background => MirrorMode::Background,
            ModeArg::Active => MirrorMode::Active,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AfterArg {
    ReadOnly,
    Stop,
    Keep,
}

impl From<AfterArg> for AfterMirror {
    fn from(a: AfterArg) -> Self {
        match a {
            AfterArg::ReadOnly => AfterMirror::ReadOnly,
            AfterArg::Stop => AfterMirror::Stop,
            AfterArg::Keep => AfterMirror::Keep,
        }
    }
}

/// What `start` and `migrate` share.
#[derive(clap::Args)]
struct StartOpts {
    /// Any writable NBD export (nbdferry, qemu-nbd, nbdkit), nbds:// too.
    #[arg(long, value_name = "URI")]
    to: String,
    /// background: writes are sent by the copier; active: every write is
    /// also written to the destination before it is acknowledged.
    #[arg(long, value_enum, default_value = "background")]
    mode: ModeArg,
    /// Bytes per second for the copier, e.g. 100M.
    #[arg(long, value_name = "BYTES/s", value_parser = super::size::parse_bytes)]
    rate: Option<u64>,
    /// Ready when what is left can be sent within this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    max_downtime: u64,
    /// Go active by itself when passes stop shrinking.
    #[arg(long)]
    auto_active: bool,
}

impl StartOpts {
    fn request(&self) -> StartMirror {
        StartMirror {
            to: self.to.clone(),
            mode: self.mode.into(),
            rate: self.rate,
            max_downtime_ms: self.max_downtime,
            auto_active: self.auto_active,
        }
    }
}

#[derive(clap::Args)]
pub struct MirrorArgs {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    admin: AdminArg,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Start mirroring DISK to another export while it is written.
    Start {
        disk: String,
        #[command(flatten)]
        opts: StartOpts,
    },
    /// Phase, pass, bytes sent and left, rates, ETA, and whether it is ready.
    Status {
        disk: String,
        /// Follow it (until it ends).
        #[arg(long)]
        watch: bool,
        /// The daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Change a running mirror's mode or rate.
    Set {
        disk: String,
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        #[arg(long, value_name = "BYTES/s", value_parser = super::size::parse_bytes)]
        rate: Option<u64>,
    },
    /// Hold writes, send the rest, flush the destination, then apply
    /// --after; reports the downtime.
    Complete {
        disk: String,
        /// read-only: the source export refuses writes; stop: it is
        /// removed; keep: nothing changes.
        #[arg(long, value_enum, default_value = "read-only")]
        after: AfterArg,
        #[arg(long)]
        json: bool,
    },
    /// Stop mirroring; both sides stay as they are.
    Cancel { disk: String },
}

fn summary(s: &MirrorStatus) -> String {
    let eta = s
        .eta_seconds
        .map_or_else(|| "-".to_string(), |e| format!("{e}s"));
    format!(
        "{}: {} pass {} ({:?}), {} sent, {} left, writes {} B/s, link {} B/s, eta {eta}, {}{}",
        s.disk,
        s.phase,
        s.pass,
        s.mode,
        s.bytes_sent,
        s.dirty_bytes,
        s.write_rate,
        s.link_rate,
        if s.ready { "ready" } else { "not ready" },
        s.last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    )
}

pub async fn run(args: MirrorArgs) -> anyhow::Result<()> {
    let api = args.admin.client()?;
    match args.action {
        Action::Start { disk, opts } => print(&api.start_mirror(&disk, &opts.request()).await?),
        Action::Status { disk, watch, json } => loop {
            let s = api.mirror(&disk).await?;
            if json && !watch {
                return print(&s);
            }
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("{}", summary(&s));
            }
            let ended = !matches!(s.phase.as_str(), "bulk" | "passes" | "completing");
            if !watch || ended {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
        Action::Set { disk, mode, rate } => {
            let req = SetMirror {
                mode: mode.map(Into::into),
                rate,
            };
            print(&api.set_mirror(&disk, &req).await?)
        }
        Action::Complete { disk, after, json } => {
            let done = api
                .complete_mirror(
                    &disk,
                    &CompleteMirror {
                        after: after.into(),
                    },
                )
                .await?;
            if json {
                print(&done)
            } else {
                println!(
                    "{}: completed to {}: {} bytes in {} passes, writes held {} ms",
                    done.disk, done.destination, done.bytes_sent, done.passes, done.downtime_ms
                );
                Ok(())
            }
        }
        Action::Cancel { disk } => print(&api.cancel_mirror(&disk).await?),
    }
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    disk: String,
    #[command(flatten)]
    opts: StartOpts,
    /// What the source export does afterwards.
    #[arg(long, value_enum, default_value = "read-only")]
    after: AfterArg,
    /// Give up if the mirror is not ready within this many seconds (0:
    /// wait for ever).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    timeout: u64,
    /// The summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: AdminArg,
}

/// Starts a mirror, waits until it is ready, completes it, and prints a
/// summary: the whole pre-copy migration for scripts.
pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let api = args.admin.client()?;
    let disk = &args.disk;
    api.start_mirror(disk, &args.opts.request()).await?;
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal() && !args.json;
    loop {
        let s = api.mirror(disk).await?;
        if tty {
            eprint!("\r{}\x1b[K", summary(&s));
        }
        if s.ready {
            break;
        }
        if args.timeout > 0 && started.elapsed() > Duration::from_secs(args.timeout) {
            let _ = api.cancel_mirror(disk).await;
            anyhow::bail!(
                "the mirror of '{disk}' was not ready after {}s ({} bytes left at {} B/s); cancelled",
                args.timeout,
                s.dirty_bytes,
                s.link_rate
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if tty {
        eprintln!();
    }
    let done = api
        .complete_mirror(
            disk,
            &CompleteMirror {
                after: args.after.into(),
            },
        )
        .await?;
    if args.json {
        return print(&done);
    }
    println!(
        "migrated {} to {}: {} bytes in {} passes, {:.1}s, writes held {} ms",
        done.disk,
        done.destination,
        done.bytes_sent,
        done.passes,
        started.elapsed().as_secs_f64(),
        done.downtime_ms
    );
    Ok(())
}
