//! `backup run`: one point of a live disk that an nbdferry daemon serves,
//! driven through its admin API. A snapshot and a checkpoint of the same
//! name are taken at one instant; the snapshot export is pulled (only
//! what is dirty since the previous point's checkpoint, when the host
//! still has it); the point records the new checkpoint; then the snapshot
//! and the older checkpoints go.
//!
//! Names carry the repository's tag (`backup-TAG-POINT`): a disk backed up
//! into two repositories (a local one and an offsite one, say) keeps one
//! checkpoint per repository, and neither run deletes, or reads again,
//! what the other took.
//!
//! Crash reasoning: the checkpoint the newest point records is deleted
//! only by a later run, after that run's own point (recording a newer
//! checkpoint) is committed, and commits are durable and atomic
//! (`ferry_repo::writer`). So a run killed anywhere leaves either the old
//! chain intact or the new point complete. What it can leave behind is a
//! `backup-*` snapshot: the next run deletes it when its point exists,
//! else reads it again (same source, so the repository resumes the killed
//! pull from its journal).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferry_api::{AdminClient, ClientError, CreateSnapshot, SnapshotEntry, SnapshotInfo};
use ferry_repo::{PointMeta, PointNotes, Repo};
use nbd_client::NbdUri;
use nbd_proto::consts::QEMU_DIRTY_BITMAP_PREFIX;

use crate::backup::{PullRequest, PullStats, pull};
use crate::copy::{CopyOptions, connect_options};
use crate::endpoint::{EndpointSpec, connect};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Snapshots and checkpoints named so belong to `backup run`: it deletes
/// the ones it no longer needs, of its own repository (see [`own_prefix`]).
pub const PREFIX: &str = "backup-";

/// The names a run into `repo` gives its snapshots and checkpoints start
/// so.
fn own_prefix(repo: &Repo) -> String {
    format!("{PREFIX}{}-", repo.tag())
}

/// How long a snapshot may stay busy after our reads end: the daemon
/// notices our NBD connections closing a moment after we close them.
const BUSY_FOR: Duration = Duration::from_secs(10);

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub pull: PullStats,
    /// The snapshot read (and the checkpoint the point records).
    pub snapshot: String,
    /// The snapshot was left by a killed run and read again.
    pub reused: bool,
    pub duration: Duration,
    /// Clean-up that failed after the point was stored; the next run
    /// retries it.
    pub warnings: Vec<String>,
}

/// Backs up the live disk `disk` of the daemon behind `api` into `repo`.
/// `nbd` says where the daemon serves NBD (its export name is ignored;
/// TLS parameters are kept).
pub async fn run(
    api: &AdminClient,
    repo: &Repo,
    disk: &str,
    nbd: &NbdUri,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<RunReport> {
    let started = Instant::now();
    let latest = match repo.resolve(disk, None).await {
        Ok(p) => Some(p.meta),
        Err(ferry_repo::Error::NoPoints(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let snapshots = api.snapshots(disk).await?.snapshots;
    let checkpoints: Vec<String> = api
        .checkpoints(disk)
        .await?
        .checkpoints
        .into_iter()
        .map(|c| c.name)
        .collect();
    probe(api, disk, nbd, opts).await?;

    let own = own_prefix(repo);
    let plan = plan(latest.as_ref(), &snapshots, &checkpoints, &own);
    for name in &plan.stale {
        tracing::info!(disk, "deleting the snapshot {name} of an earlier run");
        delete_snapshot(api, disk, name).await?;
    }
    let (snap, export, reused) = match plan.reuse {
        Some(s) => {
            tracing::info!(
                disk,
                "reading again the snapshot {} of a killed run",
                s.info.name
            );
            (s.info, s.export, true)
        }
        None => {
            let name = format!("{own}{}", ferry_repo::new_point_id(SystemTime::now())?);
            let req = CreateSnapshot {
                name,
                checkpoint: true,
            };
            let created = api.create_snapshot(disk, &req).await?;
            (created.snapshot, created.export, false)
        }
    };

    let base = base(latest.as_ref(), &snap);
    match (&base, &latest) {
        (Base::Full(why), Some(_)) => tracing::warn!(disk, "full backup: {why}"),
        (Base::Full(why), None) => tracing::info!(disk, "full backup: {why}"),
        (Base::Since(_), _) => {}
    }
    let (bitmap, full_reason) = match base {
        Base::Since(c) => (Some(format!("{QEMU_DIRTY_BITMAP_PREFIX}{c}")), None),
        Base::Full(why) => (None, Some(why)),
    };
    let mut uri = nbd.clone();
    uri.export = export;
    // The URI without its TLS parameters: no credential paths in points,
    // and a rerun with moved credentials still resumes.
    let label = uri.to_string();
    let stats = pull(
        repo,
        PullRequest {
            source: EndpointSpec::Nbd(uri),
            label: &label,
            disk,
            bitmap: bitmap.as_deref(),
            notes: PointNotes {
                checkpoint: Some(snap.name.clone()),
                full_reason,
            },
        },
        opts,
        progress,
    )
    .await?;

    // The point is stored: from here on, failures leave only clutter that
    // the next run removes.
    let mut warnings = Vec::new();
    if let Err(e) = delete_snapshot(api, disk, &snap.name).await {
        warnings.push(format!("cannot delete the snapshot {}: {e}", snap.name));
    }
    let previous = latest.as_ref().and_then(|p| p.checkpoint.as_deref());
    for old in checkpoints_to_delete(&checkpoints, &snap.name, &own, previous) {
        match api.delete_checkpoint(disk, old).await {
            Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => warnings.push(format!("cannot delete the checkpoint {old}: {e}")),
        }
    }
    for w in &warnings {
        tracing::warn!(disk, "{w}");
    }
    Ok(RunReport {
        pull: stats,
        snapshot: snap.name,
        reused,
        duration: started.elapsed(),
        warnings,
    })
}

/// Connects to the disk's live export before anything is created, so a
/// wrong NBD address fails without leaving a snapshot behind.
async fn probe(api: &AdminClient, disk: &str, nbd: &NbdUri, opts: &CopyOptions) -> Result<()> {
    let exports = api.exports().await?.exports;
    let Some(live) = exports.iter().find(|e| e.disk.as_deref() == Some(disk)) else {
        return Err(Error::Invalid(format!(
            "the daemon serves no live disk named {disk}"
        )));
    };
    let mut uri = nbd.clone();
    uri.export = live.name.clone();
    connect(&uri, &connect_options(opts, &[])).await?;
    Ok(())
}

/// Deletes a snapshot, waiting out our own connections closing; one that
/// is already gone is fine.
async fn delete_snapshot(api: &AdminClient, disk: &str, name: &str) -> Result<(), ClientError> {
    let deadline = Instant::now() + BUSY_FOR;
    loop {
        match api.delete_snapshot(disk, name).await {
            Ok(_) | Err(ClientError::Api { status: 404, .. }) => return Ok(()),
            Err(ClientError::Api { status: 409, .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What to do with the `backup-*` snapshots a run finds.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Delete these first.
    stale: Vec<String>,
    /// Read this one instead of taking a new snapshot.
    reuse: Option<SnapshotEntry>,
}

/// A leftover snapshot is worth reading again when its point was never
/// stored, its checkpoint still exists (else the next run could not build
/// on it) and it is newer than the newest point's checkpoint (else the
/// point would go back in time). Of those, the newest; all others go.
/// Only snapshots named with `own` are looked at.
fn plan(
    latest: Option<&PointMeta>,
    snapshots: &[SnapshotEntry],
    checkpoints: &[String],
    own: &str,
) -> Plan {
    let prev = latest.and_then(|p| p.checkpoint.as_deref());
    let ours = snapshots.iter().filter(|s| s.info.name.starts_with(own));
    let reusable = |s: &SnapshotEntry| {
        Some(s.info.name.as_str()) != prev
            && checkpoints.contains(&s.info.name)
            && prev.is_none_or(|c| s.info.checkpoints.iter().any(|x| x == c))
    };
    let reuse = ours
        .clone()
        .filter(|s| reusable(s))
        .max_by(|a, b| (a.info.created, &a.info.name).cmp(&(b.info.created, &b.info.name)))
        .cloned();
    let stale = ours
        .filter(|s| reuse.as_ref().is_none_or(|r| r.info.name != s.info.name))
        .map(|s| s.info.name.clone())
        .collect();
    Plan { stale, reuse }
}

/// What a point builds on.
#[derive(Debug, PartialEq, Eq)]
enum Base {
    /// Read what is dirty since this checkpoint (the snapshot offers it).
    Since(String),
    /// Read everything allocated, for this reason.
    Full(String),
}

fn base(latest: Option<&PointMeta>, snap: &SnapshotInfo) -> Base {
    let Some(p) = latest else {
        return Base::Full("no earlier point of the disk".into());
    };
    match &p.checkpoint {
        None => Base::Full(format!(
            "point {} records no checkpoint (it was not made by backup run)",
            p.point
        )),
        Some(c) if snap.checkpoints.contains(c) => Base::Since(c.clone()),
        Some(c) => Base::Full(format!(
            "the host no longer has checkpoint {c} of point {} (its state was lost or the disk replaced)",
            p.point
        )),
    }
}

/// Every checkpoint named with `own` but the one the new point records,
/// and the one the previous point recorded (whatever its name: an older
/// build named them `backup-TIME`, and a moved repository has another tag).
fn checkpoints_to_delete<'a>(
    checkpoints: &'a [String],
    keep: &str,
    own: &str,
    previous: Option<&str>,
) -> Vec<&'a str> {
    checkpoints
        .iter()
        .map(String::as_str)
        .filter(|c| (c.starts_with(own) || Some(*c) == previous) && *c != keep)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_repo::PointStats;

    fn point(checkpoint: Option<&str>) -> PointMeta {
        PointMeta {
            disk: "d".into(),
            point: "p1".into(),
            created_ms: 0,
            size: 1 << 20,
            chunk_size: 65536,
            parent: None,
            bitmap: None,
            source: String::new(),
            stats: PointStats::default(),
            checkpoint: checkpoint.map(str::to_string),
            full_reason: None,
        }
    }

    fn snap(name: &str, created: u64, checkpoints: &[&str]) -> SnapshotEntry {
        SnapshotEntry {
            info: SnapshotInfo {
                name: name.into(),
                created,
                preserved_blocks: 0,
                backend: Default::default(),
                checkpoints: checkpoints.iter().map(|c| c.to_string()).collect(),
            },
            export: format!("d@{name}"),
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stored_snapshot_goes_and_the_newest_unstored_one_is_read_again() {
        let latest = point(Some("backup-1"));
        let snaps = [
            snap("backup-1", 1, &[]),
            snap("backup-2", 2, &["backup-1"]),
            snap("backup-3", 3, &["backup-1", "backup-2"]),
            snap("mine", 4, &["backup-1"]),
        ];
        let cps = names(&["backup-1", "backup-2", "backup-3"]);
        let p = plan(Some(&latest), &snaps, &cps, PREFIX);
        assert_eq!(p.reuse.unwrap().info.name, "backup-3");
        assert_eq!(p.stale, names(&["backup-1", "backup-2"]), "not 'mine'");
    }

    #[test]
    fn leftovers_that_cannot_extend_the_chain_are_not_read() {
        let latest = point(Some("backup-5"));
        // Older than the newest point's checkpoint; and one whose own
        // checkpoint is gone.
        let snaps = [snap("backup-4", 4, &[]), snap("backup-6", 6, &["backup-5"])];
        let cps = names(&["backup-4", "backup-5"]);
        let p = plan(Some(&latest), &snaps, &cps, PREFIX);
        assert_eq!(p.reuse, None);
        assert_eq!(p.stale, names(&["backup-4", "backup-6"]));
        // With no point yet, any leftover with its checkpoint will do.
        let p = plan(None, &snaps[..1], &cps, PREFIX);
        assert_eq!(p.reuse.unwrap().info.name, "backup-4");
        assert!(p.stale.is_empty());
    }

    #[test]
    fn the_base_is_the_previous_checkpoint_when_the_snapshot_offers_it() {
        let s = snap("backup-2", 2, &["backup-1", "other"]).info;
        assert_eq!(
            base(Some(&point(Some("backup-1"))), &s),
            Base::Since("backup-1".into())
        );
        let lost = base(Some(&point(Some("backup-0"))), &s);
        assert!(matches!(&lost, Base::Full(w) if w.contains("no longer has checkpoint backup-0")));
        assert!(matches!(base(Some(&point(None)), &s), Base::Full(_)));
        assert!(matches!(base(None, &s), Base::Full(_)));
    }

    #[test]
    fn another_repositorys_snapshots_are_neither_read_nor_deleted() {
        let latest = point(Some("backup-aa-1"));
        let snaps = [
            snap("backup-aa-0", 0, &[]),
            snap("backup-bb-2", 2, &["backup-aa-1"]),
        ];
        let cps = names(&["backup-aa-1", "backup-bb-2"]);
        let p = plan(Some(&latest), &snaps, &cps, "backup-aa-");
        assert_eq!(p.reuse, None);
        assert_eq!(p.stale, names(&["backup-aa-0"]));
    }

    #[test]
    fn only_our_other_checkpoints_are_deleted() {
        let cps = names(&["backup-aa-1", "backup-aa-2", "backup-bb-1", "vm-cp"]);
        let del = |prev| checkpoints_to_delete(&cps, "backup-aa-2", "backup-aa-", prev);
        assert_eq!(del(None), vec!["backup-aa-1"]);
        // The previous point's checkpoint, even named otherwise (an older
        // build's, or the repository's under another path).
        let cps = names(&["backup-1", "backup-aa-2", "backup-bb-1"]);
        let del = |prev| checkpoints_to_delete(&cps, "backup-aa-2", "backup-aa-", prev);
        assert_eq!(del(Some("backup-1")), vec!["backup-1"]);
        assert!(del(Some("backup-aa-2")).is_empty());
    }
}
