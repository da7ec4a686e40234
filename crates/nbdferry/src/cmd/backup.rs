//! `nbdferry backup pull|run|list|verify|prune|delete`: the CLI around the
//! repository (`ferry_repo`) and the backup jobs (`ferry_jobs::backup`;
//! `run` is in [`super::backup_run`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_jobs::backup::PullRequest;
use ferry_jobs::{CopyOptions, Progress};
use ferry_repo::{CreateOptions, KeepPolicy, KeyFile, PointRef, Repo};

use super::copy::{ProgressMode, progress_json, with_progress};

#[derive(clap::Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(clap::Subcommand)]
enum BackupCommand {
    /// Back up an NBD export (or a local file or device) as a new point;
    /// with --bitmap, read only what changed since the disk's last point.
    Pull(PullArgs),
    /// Back up a disk served by an nbdferry daemon: snapshot and
    /// checkpoint it through the admin API, read only what changed since
    /// the last run (all allocated data the first time), clean up.
    Run(super::backup_run::RunArgs),
    /// List the points, oldest first.
    List(ListArgs),
    /// Check that every point's chunks exist (--deep: read and check every
    /// chunk), or compare a point with a live export (--against).
    Verify(VerifyArgs),
    /// Delete the points a retention policy does not keep, and free their
    /// chunks.
    Prune(PruneArgs),
    /// Delete one point, and free the chunks no other point uses.
    Delete(DeleteArgs),
}

/// Where the repository is and how to open it.
#[derive(clap::Args)]
pub(super) struct RepoArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX (credentials,
    /// region and endpoint from the AWS_* environment).
    #[arg(long, value_name = "REPO")]
    repo: String,
    /// Key file of an encrypted repository: any file of at least 32 bytes
    /// (e.g. `head -c 32 /dev/urandom > key`). Given when the repository
    /// is created, it encrypts it; keep a copy: without it nothing restores.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

impl RepoArgs {
    fn key(&self) -> anyhow::Result<Option<KeyFile>> {
        Ok(self.key_file.as_deref().map(KeyFile::read).transpose()?)
    }

    /// Opens the repository, creating it as `create` says if there is none.
    pub(super) async fn open_or_create(&self, create: &CreateArgs) -> anyhow::Result<Repo> {
        Repo::open_or_create(&self.repo, self.key()?.as_ref(), &create.options())
            .await
            .with_context(|| format!("cannot open the repository {}", self.repo))
    }

    pub(super) async fn open(&self) -> anyhow::Result<Repo> {
        Repo::open(&self.repo, self.key()?.as_ref())
            .await
            .with_context(|| format!("cannot open the repository {}", self.repo))
    }
}

/// How a job moves data.
#[derive(clap::Args)]
pub(super) struct JobArgs {
    /// Connections per NBD endpoint (when the server allows multi-conn).
    #[arg(long, default_value_t = CopyOptions::default().connections)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = CopyOptions::default().requests)]
    requests: usize,
    /// Read from the source at most this many bytes per second (suffixes
    /// K, M, G), to spare the host.
    #[arg(long, value_parser = super::size::parse_bytes)]
    rate: Option<u64>,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, num_args = 0..=1, default_missing_value = "bar")]
    progress: ProgressMode,
}

impl JobArgs {
    pub(super) fn options(&self) -> CopyOptions {
        CopyOptions {
            connections: self.connections.clamp(1, 64),
            requests: self.requests.clamp(1, 1024),
            rate: self.rate.filter(|&r| r > 0),
            ..CopyOptions::default()
        }
    }

    /// Runs `job` while showing its progress.
    pub(super) async fn with_progress<T, F>(&self, job: impl FnOnce(Arc<Progress>) -> F) -> T
    where
        F: Future<Output = T>,
    {
        let (result, mode, progress) = with_progress(self.progress, job).await;
        if mode == ProgressMode::Json {
            eprintln!("{}", progress_json(&progress, true));
        }
        result
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Compression {
    Zstd,
    None,
}

/// How a backup that creates its repository creates it.
#[derive(clap::Args)]
pub(super) struct CreateArgs {
    /// Compression of a repository this backup creates.
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    compression: Compression,
    /// Chunk size of a repository this backup creates (a power of two,
    /// 4K to 16M; default 256K).
    #[arg(long, value_parser = super::size::parse_bytes)]
    chunk_size: Option<u64>,
}

impl CreateArgs {
    fn options(&self) -> CreateOptions {
        CreateOptions {
            chunk_size: self.chunk_size.unwrap_or(ferry_repo::DEFAULT_CHUNK_SIZE),
            zstd: match self.compression {
                Compression::Zstd => CreateOptions::default().zstd,
                Compression::None => None,
            },
        }
    }
}

#[derive(clap::Args)]
struct PullArgs {
    /// The source: an NBD URI (or a local file or block device).
    uri: String,
    #[command(flatten)]
    repo: RepoArgs,
    /// The disk's name in the repository.
    #[arg(long, value_name = "NAME")]
    disk: String,
    /// A dirty-bitmap meta context of the export (e.g.
    /// qemu:dirty-bitmap:b0, or just b0): read only its dirty ranges and
    /// take the rest from the disk's last point.
    #[arg(long, value_name = "CONTEXT")]
    bitmap: Option<String>,
    #[command(flatten)]
    create: CreateArgs,
    /// Print the new point as JSON on standard output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(clap::Args)]
struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// One JSON array of points (each with its `disk` and `point` id).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Read every chunk and check it against its id.
    #[arg(long)]
    deep: bool,
    /// Compare a point (DISK[@POINT]) with this NBD export block by block.
    #[arg(long, value_name = "URI", requires = "target")]
    against: Option<String>,
    /// The point to compare with --against: DISK or DISK@POINT.
    target: Option<String>,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(clap::Args)]
struct PruneArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Keep the newest N points of each disk.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: usize,
    /// Also keep the newest point of each of the last N days with points.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: usize,
    /// Also keep the newest point of each of the last N weeks with points.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: usize,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DeleteArgs {
    /// The point to delete: DISK@POINT (a unique prefix of the id will do).
    target: String,
    #[command(flatten)]
    repo: RepoArgs,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BackupArgs) -> anyhow::Result<()> {
    match args.command {
        BackupCommand::Pull(a) => pull(a).await,
        BackupCommand::Run(a) => super::backup_run::run(a).await,
        BackupCommand::List(a) => list(a).await,
        BackupCommand::Verify(a) => verify(a).await,
        BackupCommand::Prune(a) => prune(a).await,
        BackupCommand::Delete(a) => delete(a).await,
    }
}

/// `b0` means `qemu:dirty-bitmap:b0`; a full context name stays as it is.
fn bitmap_context(b: &str) -> String {
    if b.contains(':') {
        b.to_string()
    } else {
        format!("{}{b}", nbd_proto::consts::QEMU_DIRTY_BITMAP_PREFIX)
    }
}

async fn pull(a: PullArgs) -> anyhow::Result<()> {
    ferry_repo::check_name(&a.disk)?;
    let repo = a.repo.open_or_create(&a.create).await?;
    let bitmap = a.bitmap.as_deref().map(bitmap_context);
    let req = PullRequest::parse(&a.uri, &a.disk, bitmap.as_deref())?;
    let opts = a.job.options();
    let stats = a
        .job
        .with_progress(|p| ferry_jobs::backup::pull(&repo, req, &opts, p))
        .await
        .with_context(|| format!("backup of {} failed", a.uri))?;
    let s = &stats.point.stats;
    if a.json {
        let v = serde_json::json!({
            "disk": stats.point.disk,
            "point": stats.point.point,
            "parent": stats.point.parent,
            "incremental": stats.incremental,
            "size": stats.point.size,
            "bytes_read": stats.copy.read,
            "resumed_bytes": stats.resumed,
            "new_chunks": s.new_chunks,
            "new_bytes": s.new_bytes,
            "data_bytes": s.data_bytes,
        });
        println!("{v}");
    } else {
        println!(
            "{}@{}: {} of {} bytes read, {} new chunks ({} bytes stored){}",
            stats.point.disk,
            stats.point.point,
            stats.copy.read,
            stats.point.size,
            s.new_chunks,
            s.new_bytes,
            match &stats.point.parent {
                Some(p) => format!(", incremental on {p}"),
                None => String::new(),
            }
        );
    }
    Ok(())
}

async fn list(a: ListArgs) -> anyhow::Result<()> {
    let repo = a.repo.open().await?;
    let points = repo.list().await?;
    if a.json {
        let v: Vec<serde_json::Value> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "disk": p.disk,
                    "point": p.point,
                    "created": humantime_ms(p.created_ms),
                    "size": p.size,
                    "parent": p.parent,
                    "bitmap": p.bitmap,
                    "checkpoint": p.checkpoint,
                    "full_reason": p.full_reason,
                    "source": p.source,
                    "bytes_read": p.stats.bytes_read,
                    "new_chunks": p.stats.new_chunks,
                    "new_bytes": p.stats.new_bytes,
                    "data_bytes": p.stats.data_bytes,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for p in points {
            println!(
                "{}@{}  {}  {} bytes, {} data{}",
                p.disk,
                p.point,
                humantime_ms(p.created_ms),
                p.size,
                p.stats.data_bytes,
                match (&p.parent, &p.full_reason) {
                    (Some(_), _) => ", incremental".to_string(),
                    (None, Some(why)) => format!(", full: {why}"),
                    (None, None) => String::new(),
                }
            );
        }
    }
    Ok(())
}

fn humantime_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let repo = a.repo.open().await?;
    if let (Some(uri), Some(target)) = (&a.against, &a.target) {
        let (disk, point) = ferry_repo::split_target(target)?;
        let opts = a.job.options();
        let (meta, stats) = a
            .job
            .with_progress(|p| {
                ferry_jobs::backup::verify_against(&repo, disk, point, uri, &opts, p)
            })
            .await
            .with_context(|| format!("{target} does not match {uri}"))?;
        let line = format!(
            "{}@{} matches {uri}: {} bytes compared, {} zero",
            meta.disk,
            meta.point,
            stats.data + stats.zeroed,
            stats.zeroed + stats.skipped
        );
        if a.json {
            println!(
                "{}",
                serde_json::json!({"disk": meta.disk, "point": meta.point, "against": uri, "equal": true})
            );
        } else {
            println!("{line}");
        }
        return Ok(());
    }
    let report = repo.verify(a.deep).await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} points, {} chunks{}, {} unused",
            report.points,
            report.chunks,
            if a.deep {
                format!(" ({} read and checked)", report.chunks_read)
            } else {
                String::new()
            },
            report.unused_chunks
        );
        for p in &report.problems {
            println!(
                "{}: {} (used by {})",
                p.object,
                p.error,
                p.points.join(", ")
            );
        }
    }
    if !report.problems.is_empty() {
        bail!(
            "{} problem(s) found: {}",
            report.problems.len(),
            report
                .problems
                .iter()
                .map(|p| format!(
                    "{} ({}; used by {})",
                    p.object,
                    p.error,
                    p.points.join(", ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

async fn prune(a: PruneArgs) -> anyhow::Result<()> {
    if a.keep_last + a.keep_daily + a.keep_weekly == 0 {
        bail!("give --keep-last, --keep-daily or --keep-weekly: prune would delete every point");
    }
    let repo = a.repo.open().await?;
    let report = repo
        .prune(KeepPolicy {
            last: a.keep_last,
            daily: a.keep_daily,
            weekly: a.keep_weekly,
        })
        .await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "kept {} points, deleted {}; freed {} chunks ({} bytes){}",
            report.kept.len(),
            report.deleted.len(),
            report.gc.freed_chunks,
            report.gc.freed_bytes,
            waiting(&report.gc)
        );
    }
    Ok(())
}

fn waiting(gc: &ferry_repo::GcReport) -> String {
    if gc.waiting_chunks == 0 {
        String::new()
    } else {
        format!(
            "; {} more chunks are freed by a later prune, once running backups finish",
            gc.waiting_chunks
        )
    }
}

async fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    let (disk, Some(point)) = ferry_repo::split_target(&a.target)? else {
        bail!("name the point to delete as DISK@POINT");
    };
    let repo = a.repo.open().await?;
    let found = repo.resolve(disk, Some(point)).await?;
    let target = PointRef {
        disk: found.meta.disk,
        point: found.meta.point,
    };
    let gc = repo.delete_and_collect(&target).await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"disk": target.disk, "point": target.point, "gc": gc})
        );
    } else {
        println!(
            "deleted {}@{}; freed {} chunks ({} bytes){}",
            target.disk,
            target.point,
            gc.freed_chunks,
            gc.freed_bytes,
            waiting(&gc)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The help states the default in words; it must be the real one.
    #[test]
    fn the_chunk_size_help_names_the_default() {
        let want = format!("default {}K", ferry_repo::DEFAULT_CHUNK_SIZE / 1024);
        let cmd = <super::CreateArgs as clap::Args>::augment_args(clap::Command::new("t"));
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "chunk_size")
            .expect("a --chunk-size argument");
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        assert!(help.contains(&want), "{help:?} does not say {want}");
    }
}
