//! `nbdferry restore --repo REPO DISK[@POINT] DST`: writes a backed-up
//! point (the newest by default) to a file, a block device or an NBD URI,
//! thin and with every chunk checked. A new file is written as `DST.part`
//! and renamed when complete (see `ferry_jobs::copy`).

use anyhow::Context;

use super::backup::{JobArgs, RepoArgs};

#[derive(clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The point: DISK (its newest point) or DISK@POINT.
    target: String,
    /// Destination: a file, a block device or an NBD URI.
    dst: String,
    #[command(flatten)]
    job: JobArgs,
}

pub async fn run(a: RestoreArgs) -> anyhow::Result<()> {
    let (disk, point) = ferry_repo::split_target(&a.target)?;
    let repo = a.repo.open().await?;
    let opts = a.job.options();
    let (meta, stats) = a
        .job
        .with_progress(|p| ferry_jobs::backup::restore(&repo, disk, point, &a.dst, &opts, p))
        .await
        .with_context(|| format!("restore of {} to {} failed", a.target, a.dst))?;
    println!(
        "restored {}@{} to {}: {} bytes, {} data, {} zeroed, {} already zero",
        meta.disk, meta.point, a.dst, stats.size, stats.data, stats.zeroed, stats.skipped
    );
    Ok(())
}
