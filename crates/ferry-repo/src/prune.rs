//! Which points a retention policy keeps, per disk.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::gc::GcReport;
use crate::index::PointMeta;
use crate::repo::{PointRef, Repo};

/// Keep the newest `last` points, plus the newest point of each of the
/// newest `daily` days and `weekly` ISO weeks (UTC) that have points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: usize,
    pub daily: usize,
    pub weekly: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub deleted: Vec<String>,
    pub gc: GcReport,
}

const DAY_MS: u64 = 86_400_000;

/// The points of one disk (any order) that `policy` keeps.
pub fn select(points: &[PointMeta], policy: KeepPolicy) -> HashSet<String> {
    let mut newest_first: Vec<&PointMeta> = points.iter().collect();
    newest_first.sort_by(|a, b| (b.created_ms, &b.point).cmp(&(a.created_ms, &a.point)));
    let mut keep: HashSet<String> = newest_first
        .iter()
        .take(policy.last)
        .map(|p| p.point.clone())
        .collect();
    // Days since the epoch; weeks start on Monday (the epoch was a Thursday).
    type Bucket = fn(u64) -> u64;
    let buckets: [(usize, Bucket); 2] = [
        (policy.daily, |ms| ms / DAY_MS),
        (policy.weekly, |ms| (ms / DAY_MS + 3) / 7),
    ];
    for (n, bucket) in buckets {
        let mut seen = Vec::new();
        for p in &newest_first {
            let b = bucket(p.created_ms);
            if seen.len() >= n {
                break;
            }
            if !seen.contains(&b) {
                seen.push(b);
                keep.insert(p.point.clone());
            }
        }
    }
    keep
}

impl Repo {
    /// Deletes the points `policy` does not keep (of every disk), then
    /// frees the chunks no point uses any more.
    pub async fn prune(&self, policy: KeepPolicy) -> Result<PruneReport> {
        let mut by_disk: BTreeMap<String, Vec<PointMeta>> = BTreeMap::new();
        for m in self.list().await? {
            by_disk.entry(m.disk.clone()).or_default().push(m);
        }
        let mut report = PruneReport::default();
        for (disk, points) in by_disk {
            let keep = select(&points, policy);
            for p in points {
                let name = format!("{disk}@{}", p.point);
                if keep.contains(&p.point) {
                    report.kept.push(name);
                } else {
                    self.delete_point(&disk, &p.point).await?;
                    report.deleted.push(name);
                }
            }
        }
        report.gc = self.collect_garbage().await?;
        Ok(report)
    }

    /// Deletes one point and frees the chunks no point uses any more.
    pub async fn delete_and_collect(&self, point: &PointRef) -> Result<GcReport> {
        self.delete_point(&point.disk, &point.point).await?;
        self.collect_garbage().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::PointStats;

    fn p(point: &str, created_ms: u64) -> PointMeta {
        PointMeta {
            disk: "d".into(),
            point: point.into(),
            created_ms,
            size: 1,
            chunk_size: 4096,
            parent: None,
            bitmap: None,
            source: String::new(),
            stats: PointStats::default(),
        }
    }

    #[test]
    fn keeps_last_daily_and_weekly() {
        let h = 3_600_000;
        // Two points a day for 20 days.
        let pts: Vec<PointMeta> = (0..40)
            .map(|i| p(&format!("p{i:02}"), 100 * DAY_MS + i * 12 * h))
            .collect();
        let only_last = select(
            &pts,
            KeepPolicy {
                last: 3,
                daily: 0,
                weekly: 0,
            },
        );
        assert_eq!(only_last.len(), 3);
        assert!(only_last.contains("p39") && only_last.contains("p37"));
        let daily = select(
            &pts,
            KeepPolicy {
                last: 1,
                daily: 5,
                weekly: 0,
            },
        );
        // The newest of each of the 5 newest days: p39 p37 p35 p33 p31.
        assert_eq!(daily.len(), 5);
        assert!(daily.contains("p31") && !daily.contains("p30"));
        let weekly = select(
            &pts,
            KeepPolicy {
                last: 0,
                daily: 0,
                weekly: 10,
            },
        );
        // 20 days touch 3 or 4 ISO weeks.
        assert!((3..=4).contains(&weekly.len()), "{weekly:?}");
        assert!(select(&pts, KeepPolicy::default()).is_empty());
    }
}
