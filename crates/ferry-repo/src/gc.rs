//! Freeing chunks no point uses, safely while backups run.
//!
//! # The danger
//! A running backup decides that a chunk exists (it was in its listing, or
//! its parent point names it) and stores nothing for it. If a concurrent
//! collection deleted that chunk before the backup committed, the new
//! point would name a chunk that is gone.
//!
//! # The scheme: set aside, then delete after every witness is gone
//! Collection works in two phases, possibly in two runs:
//!
//! 1. **Mark** (generation G): read every point, every session's journal;
//!    list the chunks; each chunk that none of them names is *renamed* to
//!    `fossils/G/ID` (not deleted). Then note which sessions are live
//!    (`session::SessionRecord::is_live`) and write `gc/G` naming them.
//! 2. **Sweep** G, only once none of the sessions named in `gc/G` is live
//!    any more: read every point again; a fossil that a point names is
//!    renamed back (or dropped if the chunk was stored again meanwhile);
//!    every other fossil is deleted, then `gc/G`.
//!
//! # Why no point loses a chunk
//! Take a backup B that commits a point naming chunk X, and a collection
//! that set X aside in generation G. B stored X itself (then X is a new
//! object under `chunks/`, and sweeps delete only fossils), or B trusted X
//! because it saw X under `chunks/` after it registered its session: in
//! its listing of the chunks, in a lookup of X, or (an incremental) in
//! its parent's index while X was not among the fossils B listed. That
//! last one is the same fact: the parent existed from before B registered
//! until B loaded it after listing the fossils, and while a point exists
//! each chunk it names is under `chunks/` or among the fossils (this
//! argument, by induction). Two cases:
//! - B registered after G's mark ended: every rename of G happened before
//!   B looked, so B saw X among the fossils or nowhere and did not trust
//!   it (the writer refuses a parent whose chunks are not all there).
//! - B registered before G's mark ended: B is live when `gc/G` is written,
//!   so it is named there, and G is swept only after B stopped being live,
//!   that is after B committed (index written before the session is
//!   removed) or died. A committed point is seen by the sweep's fresh
//!   reading of the points, and X is renamed back. A backup commits only
//!   while its lease is fresh (`session::COMMIT_WITHIN`, well inside
//!   `session::LEASE`), so "not live" really means it can no longer commit.
//!
//! Between a mark and its sweep a point may name a fossil; readers look
//! for a missing chunk among the fossils (`Repo::read_chunk`), so the
//! point restores meanwhile. Marks run from different hosts at once are
//! harmless: renames of the same chunk race to the same result, and each
//! generation is swept on its own evidence.

use std::collections::HashSet;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::backend::Durability;
use crate::error::{Error, Result};
use crate::id::{self, ChunkId, FOSSILS, GC};
use crate::repo::Repo;
use crate::session;

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Chunks deleted and their stored bytes.
    pub freed_chunks: u64,
    pub freed_bytes: u64,
    /// Fossils a point turned out to need, put back.
    pub restored_chunks: u64,
    /// Chunks set aside that wait for running backups to finish; a later
    /// prune or delete frees them.
    pub waiting_chunks: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Generation {
    created_ms: u64,
    /// Sessions live when the mark ended.
    witnesses: Vec<String>,
}

impl Repo {
    /// Sweeps the generations that can be swept, marks a new one, and
    /// sweeps it at once if no backup was running.
    pub async fn collect_garbage(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        self.sweep_ready(&mut report).await?;
        self.mark().await?;
        self.sweep_ready(&mut report).await?;
        Ok(report)
    }

    /// Every chunk a point or a session journal names.
    async fn referenced(&self) -> Result<HashSet<ChunkId>> {
        let mut used: HashSet<ChunkId> = HashSet::new();
        // `points()` fails if any index does not open: collecting without
        // knowing every reference would delete live chunks.
        for p in self.points().await? {
            used.extend(p.chunks());
        }
        for s in session::list(self).await? {
            for (_, slot) in session::journal(self, &s.id).await? {
                if let crate::index::Slot::Chunk(c) = slot {
                    used.insert(c);
                }
            }
        }
        Ok(used)
    }

    async fn mark(&self) -> Result<()> {
        let used = self.referenced().await?;
        let chunks = self.list_chunks().await?;
        let gen_id = format!(
            "{}-{}",
            id::unix_ms(SystemTime::now()),
            crate::seal::hex(&id::random::<4>()?)
        );
        let mut n = 0u64;
        for c in chunks.keys().filter(|c| !used.contains(c)) {
            if self
                .backend()
                .rename(&c.key(), &format!("{FOSSILS}{gen_id}/{c}"))
                .await?
            {
                n += 1;
            }
        }
        if n == 0 {
            return Ok(());
        }
        let witnesses = session::list(self)
            .await?
            .into_iter()
            .filter(|s| s.is_live())
            .map(|s| s.id)
            .collect();
        let g = Generation {
            created_ms: id::unix_ms(SystemTime::now()),
            witnesses,
        };
        let raw = serde_json::to_vec(&g)
            .map_err(|e| Error::Invalid(format!("cannot encode a gc record: {e}")))?;
        tracing::info!(generation = gen_id, chunks = n, waiting_for = ?g.witnesses, "set unreferenced chunks aside");
        self.put_meta(&format!("{GC}{gen_id}"), &raw, Durability::Now)
            .await
    }

    async fn sweep_ready(&self, report: &mut GcReport) -> Result<()> {
        let gens = self.backend().list(GC).await?;
        if gens.is_empty() {
            return Ok(());
        }
        let live: HashSet<String> = session::list(self)
            .await?
            .into_iter()
            .filter(|s| s.is_live())
            .map(|s| s.id)
            .collect();
        let mut ready = Vec::new();
        for m in gens {
            let Some(gen_id) = m.key.strip_prefix(GC).map(str::to_string) else {
                continue;
            };
            let Some(raw) = self.get_meta(&m.key).await? else {
                continue;
            };
            let g: Generation =
                serde_json::from_slice(&raw).map_err(|e| Error::corrupt(&m.key, e.to_string()))?;
            let fossils = self.backend().list(&format!("{FOSSILS}{gen_id}/")).await?;
            if g.witnesses.iter().any(|w| live.contains(w)) {
                report.waiting_chunks += fossils.len() as u64;
            } else {
                ready.push((m.key, fossils));
            }
        }
        if ready.is_empty() {
            return Ok(());
        }
        // Read the points only now, after the witnesses are gone.
        let used = self.referenced().await?;
        for (gen_key, fossils) in ready {
            for f in fossils {
                let Some(c) = ChunkId::from_key(&f.key) else {
                    continue;
                };
                if used.contains(&c) {
                    let home = c.key();
                    if self.backend().exists(&home).await? {
                        self.backend().delete(&f.key).await?;
                    } else {
                        self.backend().rename(&f.key, &home).await?;
                    }
                    report.restored_chunks += 1;
                } else {
                    self.backend().delete(&f.key).await?;
                    report.freed_chunks += 1;
                    report.freed_bytes += f.size;
                }
            }
            self.backend().delete(&gen_key).await?;
        }
        Ok(())
    }
}
