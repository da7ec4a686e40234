//! `nbdferry copy SRC DST`: the CLI around `ferry_jobs::copy` (argument
//! parsing and progress display). What a failed copy leaves behind is
//! documented in `ferry_jobs::copy`.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_jobs::{CopyOptions, Progress};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum ProgressMode {
    /// A bar when standard error is a terminal, else nothing.
    Auto,
    Bar,
    /// One JSON object per line on standard error, about once a second.
    Json,
    None,
}

#[derive(clap::Args)]
pub struct CopyArgs {
    /// Source: NBD URI, file or block device, or - for standard input.
    src: String,
    /// Destination: NBD URI, file or block device, - for standard output,
    /// or null: to discard.
    dst: String,
    /// Connections per NBD endpoint (when the server allows multi-conn).
    #[arg(long, default_value_t = CopyOptions::default().connections)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = CopyOptions::default().requests)]
    requests: usize,
    /// Largest request, in bytes (suffixes K, M accepted).
    #[arg(long, default_value_t = CopyOptions::default().request_size, value_parser = super::size::parse_request_size)]
    request_size: u64,
    /// Flush the destination to stable storage before finishing.
    #[arg(long)]
    flush: bool,
    /// The destination already reads as zeroes: skip zero ranges instead of
    /// writing them (for servers that cannot report allocation).
    #[arg(long)]
    destination_is_zero: bool,
    /// Fail when an NBD server leaves requests unanswered for this many
    /// seconds (0: wait forever).
    #[arg(long, value_name = "SECS", default_value_t = CopyOptions::default().io_timeout.map_or(0, |d| d.as_secs()))]
    timeout: u64,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, num_args = 0..=1, default_missing_value = "bar")]
    progress: ProgressMode,
}

pub async fn run(args: CopyArgs) -> anyhow::Result<()> {
    let opts = CopyOptions {
        connections: args.connections.clamp(1, 64),
        requests: args.requests.clamp(1, 1024),
        request_size: args.request_size,
        flush: args.flush,
        destination_is_zero: args.destination_is_zero,
        io_timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
        ..CopyOptions::default()
    };
    let (result, mode, progress) = with_progress(args.progress, |p| {
        ferry_jobs::copy(&args.src, &args.dst, &opts, p)
    })
    .await;
    let stats = result.with_context(|| format!("copy {} -> {} failed", args.src, args.dst))?;
    match mode {
        ProgressMode::Json => eprintln!("{}", progress_json(&progress, true)),
        ProgressMode::Bar => eprintln!(
            "copied {} bytes: {} data, {} zeroed, {} already zero",
            stats.size, stats.data, stats.zeroed, stats.skipped
        ),
        _ => {}
    }
    tracing::info!(?stats, "copy finished");
    Ok(())
}

/// Runs `job` with a progress display in `mode` (`Auto` resolved against
/// standard error); returns its result, the mode shown and the counters.
pub(super) async fn with_progress<T, F: Future<Output = T>>(
    mode: ProgressMode,
    job: impl FnOnce(Arc<Progress>) -> F,
) -> (T, ProgressMode, Arc<Progress>) {
    let progress = Arc::new(Progress::new());
    let mode = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::None,
        m => m,
    };
    let display = tokio::spawn(show_progress(progress.clone(), mode));
    let result = job(progress.clone()).await;
    display.abort();
    let _ = display.await;
    (result, mode, progress)
}

pub(super) fn progress_json(p: &Progress, done: bool) -> String {
    let (d, t) = (p.done(), p.total());
    let pct = if t == 0 {
        0.0
    } else {
        100.0 * d as f64 / t as f64
    };
    serde_json::json!({ "bytes": d, "total": t, "percent": (pct * 10.0).round() / 10.0, "done": done }).to_string()
}

async fn show_progress(p: Arc<Progress>, mode: ProgressMode) {
    match mode {
        ProgressMode::Bar => {
            let bar = indicatif::ProgressBar::new(p.total());
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            // The bar is finished by whoever aborts this task; make sure it
            // is cleared then.
            struct Clear(indicatif::ProgressBar);
            impl Drop for Clear {
                fn drop(&mut self) {
                    self.0.finish_and_clear();
                }
            }
            let bar = Clear(bar);
            loop {
                bar.0.set_length(p.total());
                bar.0.set_position(p.done());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        ProgressMode::Json => loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            eprintln!("{}", progress_json(&p, false));
        },
        _ => {}
    }
}
