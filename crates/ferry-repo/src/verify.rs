//! Checking a repository: every index opens, every chunk a point names
//! exists and, with `deep`, opens and matches its id. A problem names the
//! chunk and every point that uses it.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::{ChunkId, POINTS};
use crate::repo::Repo;
use crate::seal::Envelope;

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub points: u64,
    /// Distinct chunks the points use.
    pub chunks: u64,
    /// Chunks read and checked (deep only).
    pub chunks_read: u64,
    /// Stored chunks no point uses (freed by the next prune).
    pub unused_chunks: u64,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// The object at fault (`chunks/…`, `points/…`).
    pub object: String,
    pub error: String,
    /// The points that need it, as `DISK@POINT`.
    pub points: Vec<String>,
}

/// Chunks checked at once in a deep verify.
const PARALLEL: usize = 8;

impl Repo {
    pub async fn verify(&self, deep: bool) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut users: BTreeMap<ChunkId, BTreeSet<String>> = BTreeMap::new();
        for r in self.point_refs().await? {
            match self.load_point(&r.disk, &r.point).await {
                Ok(p) => {
                    report.points += 1;
                    let name = format!("{}@{}", r.disk, r.point);
                    for c in p.chunks() {
                        users.entry(c).or_default().insert(name.clone());
                    }
                }
                Err(e) => report.problems.push(Problem {
                    object: format!("{POINTS}{}/{}", r.disk, r.point),
                    error: e.to_string(),
                    points: vec![format!("{}@{}", r.disk, r.point)],
                }),
            }
        }
        report.chunks = users.len() as u64;
        let stored = self.list_chunks().await?;
        report.unused_chunks = stored.keys().filter(|c| !users.contains_key(c)).count() as u64;

        let problem = |c: &ChunkId, error: String| Problem {
            object: c.key(),
            error,
            points: users[c].iter().cloned().collect(),
        };
        let mut present = Vec::new();
        for c in users.keys() {
            if stored.contains_key(c) {
                present.push(*c);
            } else {
                // Perhaps set aside by a prune in progress: still readable?
                match self.read_chunk(c).await {
                    Ok(_) => {}
                    Err(e) => report.problems.push(problem(c, e.to_string())),
                }
            }
        }
        if deep {
            let mut checks = futures_util::stream::iter(present)
                .map(|c| async move { (c, self.read_chunk_checking(&c, Envelope::Check).await) })
                .buffer_unordered(PARALLEL);
            while let Some((c, r)) = checks.next().await {
                report.chunks_read += 1;
                if let Err(e) = r {
                    let text = match e {
                        Error::Corrupt { reason, .. } => reason,
                        e => e.to_string(),
                    };
                    report.problems.push(problem(&c, text));
                }
            }
        }
        report.problems.sort_by(|a, b| a.object.cmp(&b.object));
        Ok(report)
    }
}
