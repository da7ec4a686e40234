//! A backup in progress: its record (who runs it, a heartbeat) and its
//! journal (which slots are done, in segments written after the chunks
//! they name are durable). A killed backup leaves both behind; a rerun of
//! the same backup finds them and continues without reading again what
//! the journal holds. Garbage collection reads them too: it keeps every
//! journaled chunk, and waits for live sessions (see `gc`).
//!
//! Keys: `sessions/ID/record`, `sessions/ID/seg-NNNNNNNN`.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backend::Durability;
use crate::error::{Error, Result};
use crate::id::{ChunkId, SESSIONS, unix_ms};
use crate::index::Slot;
use crate::repo::Repo;

/// A session whose heartbeat is older than this is not live, for garbage
/// collection. Generous: it must cover clock skew between the backup's
/// host and the pruning host.
pub const LEASE: Duration = Duration::from_secs(15 * 60);
/// How often a running backup renews its record.
pub const HEARTBEAT: Duration = Duration::from_secs(20);
/// A backup may commit only if it renewed its record this recently: well
/// inside [`LEASE`], so no prune can have taken it for dead.
pub const COMMIT_WITHIN: Duration = Duration::from_secs(5 * 60);
/// A session of another host may be taken over by a rerun once its
/// heartbeat is this old (on this host, as soon as its process is gone).
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub disk: String,
    /// The point id this session will commit.
    pub point: String,
    pub source: String,
    pub bitmap: Option<String>,
    pub parent: Option<String>,
    pub size: u64,
    pub chunk_size: u64,
    pub created_ms: u64,
    pub owner: Owner,
    pub heartbeat_ms: u64,
}

/// The process running a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub boot_id: String,
    pub pid: u32,
}

impl Owner {
    pub fn me() -> Owner {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Owner {
            host: read("/proc/sys/kernel/hostname"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            pid: std::process::id(),
        }
    }

    /// Known to be gone: same host and boot, and no such process.
    fn gone(&self) -> bool {
        let me = Owner::me();
        !me.boot_id.is_empty()
            && me.boot_id == self.boot_id
            && me.host == self.host
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

impl SessionRecord {
    pub fn record_key(&self) -> String {
        record_key(&self.id)
    }

    fn age(&self) -> Duration {
        Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(self.heartbeat_ms))
    }

    /// Might still commit a point: garbage collection must wait for it.
    pub fn is_live(&self) -> bool {
        !self.owner.gone() && self.age() < LEASE
    }

    /// May be continued by a rerun (its owner is gone or silent).
    pub fn can_take_over(&self) -> bool {
        self.owner.gone() || self.age() >= TAKEOVER_AFTER
    }

    /// Stores the record. Visible at once to garbage collection (all it
    /// needs); durable at the session's next barrier, which comes before
    /// its first journal segment and its index: a record lost to a power
    /// cut loses nothing a rerun could resume.
    pub async fn save(&self, repo: &Repo) -> Result<()> {
        let raw = serde_json::to_vec(self)
            .map_err(|e| Error::Invalid(format!("cannot encode a session: {e}")))?;
        repo.put_meta(&self.record_key(), &raw, Durability::Deferred)
            .await
    }
}

pub fn record_key(id: &str) -> String {
    format!("{SESSIONS}{id}/record")
}

pub fn segment_key(id: &str, n: u64) -> String {
    format!("{SESSIONS}{id}/seg-{n:08}")
}

/// Every session's record. One that does not open is skipped (and logged):
/// its chunks then lose garbage collection's protection, which costs a
/// rerun re-reading them, never correctness (a rerun checks that journaled
/// chunks still exist).
pub async fn list(repo: &Repo) -> Result<Vec<SessionRecord>> {
    let mut out = Vec::new();
    for m in repo.backend().list(SESSIONS).await? {
        if !m.key.ends_with("/record") {
            continue;
        }
        let rec = match repo.get_meta(&m.key).await {
            Ok(Some(raw)) => serde_json::from_slice::<SessionRecord>(&raw)
                .map_err(|e| Error::corrupt(&m.key, e.to_string())),
            Ok(None) => continue,
            Err(e) => Err(e),
        };
        match rec {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("skipping a session: {e}"),
        }
    }
    Ok(out)
}

/// The slots a session's journal says are done.
pub async fn journal(repo: &Repo, id: &str) -> Result<Vec<(u64, Slot)>> {
    let prefix = format!("{SESSIONS}{id}/");
    let mut out = Vec::new();
    for m in repo.backend().list(&prefix).await? {
        if !m.key.contains("/seg-") {
            continue;
        }
        if let Some(raw) = repo.get_meta(&m.key).await? {
            decode_segment(&m.key, &raw, &mut out)?;
        }
    }
    Ok(out)
}

/// Removes a session's journal and record (the record last, so that a
/// session without a record never holds segments we forget).
pub async fn remove(repo: &Repo, id: &str) -> Result<()> {
    let prefix = format!("{SESSIONS}{id}/");
    for m in repo.backend().list(&prefix).await? {
        if m.key.contains("/seg-") {
            repo.backend().delete(&m.key).await?;
        }
    }
    repo.backend().delete(&record_key(id)).await
}

pub fn encode_segment(entries: &[(u64, Slot)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * 41);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (slot, s) in entries {
        out.extend_from_slice(&slot.to_le_bytes());
        match s {
            Slot::Zero => out.push(0),
            Slot::Chunk(id) => {
                out.push(1);
                out.extend_from_slice(&id.0);
            }
        }
    }
    out
}

fn decode_segment(key: &str, b: &[u8], out: &mut Vec<(u64, Slot)>) -> Result<()> {
    let bad = || Error::corrupt(key, "bad journal segment");
    let n = u64::from_le_bytes(b.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let mut r = &b[8..];
    // Each entry takes at least 9 bytes.
    if n > (r.len() / 9) as u64 {
        return Err(bad());
    }
    for _ in 0..n {
        let slot = u64::from_le_bytes(r.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        match r.get(8) {
            Some(0) => {
                out.push((slot, Slot::Zero));
                r = &r[9..];
            }
            Some(1) => {
                let id: [u8; 32] = r
                    .get(9..41)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?;
                out.push((slot, Slot::Chunk(ChunkId(id))));
                r = &r[41..];
            }
            _ => return Err(bad()),
        }
    }
    if r.is_empty() { Ok(()) } else { Err(bad()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_and_refuse_garbage() {
        let e = vec![(3, Slot::Zero), (9, Slot::Chunk(ChunkId([5; 32])))];
        let b = encode_segment(&e);
        let mut out = Vec::new();
        decode_segment("k", &b, &mut out).unwrap();
        assert_eq!(out, e);
        for n in 0..b.len() {
            assert!(decode_segment("k", &b[..n], &mut Vec::new()).is_err());
        }
    }

    #[test]
    fn liveness_follows_the_owner_and_the_heartbeat() {
        let mut r = SessionRecord {
            id: "s".into(),
            disk: "d".into(),
            point: "p".into(),
            source: "x".into(),
            bitmap: None,
            parent: None,
            size: 1,
            chunk_size: 4096,
            created_ms: 0,
            owner: Owner::me(),
            heartbeat_ms: unix_ms(SystemTime::now()),
        };
        assert!(r.is_live() && !r.can_take_over());
        r.heartbeat_ms -= LEASE.as_millis() as u64 + 1;
        assert!(!r.is_live() && r.can_take_over());
        r.heartbeat_ms = unix_ms(SystemTime::now());
        // A process of this host that no longer exists.
        r.owner.pid = u32::MAX - 1;
        assert!(!r.is_live() && r.can_take_over());
    }
}
