//! Writing a point: pieces of the disk come in (data, zeroes, or "keep":
//! take this range from the previous point), in any order and from many
//! tasks; each chunk-sized slot is sealed and stored as soon as every byte
//! of it has been accounted for, and the slot is journaled. `commit`
//! writes the index and so makes the point exist.
//!
//! Durable-state order: a chunk is stored before the journal segment that
//! names it (a barrier in between), every chunk before the index (which is
//! put `AfterAll`), the index before the session is removed. So a killed
//! backup is never listed, and its rerun trusts only what the journal
//! holds and the repository still has. The session record needs no sync
//! of its own: the barrier before the first segment covers it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use crate::backend::Durability;
use crate::error::{Error, Result};
use crate::id::{self, ChunkId, unix_ms};
use crate::index::{PointIndex, PointMeta, PointNotes, PointStats, Slot, slot_len};
use crate::repo::Repo;
use crate::session::{self, COMMIT_WITHIN, HEARTBEAT, Owner, SessionRecord};

/// What to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpec {
    pub disk: String,
    /// Where the data comes from (URI or path); a rerun with the same
    /// source, bitmap and size resumes a killed run.
    pub source: String,
    /// The dirty-bitmap context, when only changed ranges will be read.
    pub bitmap: Option<String>,
    pub size: u64,
    /// Recorded in the point's metadata.
    pub notes: PointNotes,
}

/// A piece of one slot.
enum Piece {
    Data(Bytes),
    Zero,
    Keep,
}

/// A slot that is not complete yet.
#[derive(Default)]
struct Partial {
    /// Allocated (zero-filled) when the first data piece arrives.
    buf: Option<Vec<u8>>,
    covered: u64,
    /// Bytes of it that came as data: what a rerun would read again. Kept
    /// ranges come from the parent and zero ones are mostly holes the
    /// source reported, not read (zeroes found inside read data are the
    /// exception, and the journal's age limit bounds what they cost).
    read: u64,
    /// Ranges (within the slot) to take from the parent point.
    kept: Vec<(usize, usize)>,
}

/// Completed slots not yet in a journal segment.
struct Journal {
    pending: Vec<(u64, Slot)>,
    /// Bytes of them that a rerun would have to read again (kept and zero
    /// ranges cost nothing to redo, so they do not hurry a flush: an
    /// incremental of a large disk would otherwise sync after every few
    /// clean slots, and a full backup of a sparse one after every few
    /// holes; measured: 4 barriers per 16 MiB of data instead of 1).
    pending_bytes: u64,
    last_flush: Instant,
    next_segment: u64,
}

/// Flush the journal after this much of the disk is done or this long.
const JOURNAL_MAX_BYTES: u64 = 16 << 20;
const JOURNAL_MIN_BYTES: u64 = 1 << 20;
const JOURNAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(2);

/// A backup in progress. Clone it freely; all methods take `&self`.
#[derive(Clone)]
pub struct PointWriter {
    shared: Arc<Shared>,
}

struct Shared {
    repo: Repo,
    record: Mutex<SessionRecord>,
    parent: Option<PointIndex>,
    /// The caller's notes; `full_reason` also says why a wanted parent
    /// could not be used.
    notes: PointNotes,
    /// Chunks known to exist: the listing taken after the session was
    /// registered (or the parent's chunks), plus what this session stored.
    known: Mutex<HashSet<ChunkId>>,
    /// `known` is a listing of every chunk: what it lacks is not stored.
    /// Otherwise a chunk not in it is looked up before it is stored.
    listed: bool,
    entries: Mutex<Vec<Option<Slot>>>,
    partial: Mutex<HashMap<u64, Partial>>,
    journal: Mutex<Journal>,
    journal_every: u64,
    resumed_bytes: u64,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
    started: Instant,
    /// Milliseconds after `started` of the last successful heartbeat.
    heartbeat_ok: AtomicU64,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data that is
    // still consistent for our purposes (counters, maps); go on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.heartbeat).take() {
            h.abort();
        }
    }
}

impl PointWriter {
    /// Starts a backup, or resumes a killed run of the same one. With a
    /// bitmap, the disk's newest point becomes the parent: clean ranges
    /// are taken from it ([`PointWriter::keep`]). Without a usable parent
    /// (none, another size, a chunk of it set aside by a prune) every range must be
    /// written: see [`PointWriter::incremental`].
    pub async fn begin(repo: &Repo, spec: BackupSpec) -> Result<PointWriter> {
        id::check_name(&spec.disk)?;
        let chunk_size = repo.chunk_size();
        let now = SystemTime::now();

        let mut resumed: Option<(SessionRecord, Vec<(u64, Slot)>)> = None;
        for s in session::list(repo).await? {
            let same = s.disk == spec.disk
                && s.source == spec.source
                && s.bitmap == spec.bitmap
                && s.size == spec.size
                && s.chunk_size == chunk_size;
            if !same || !s.can_take_over() {
                continue;
            }
            if repo
                .backend()
                .get(&id::point_key(&s.disk, &s.point))
                .await?
                .is_some()
            {
                // Killed after its commit: nothing left to resume.
                session::remove(repo, &s.id).await?;
                continue;
            }
            let journal = session::journal(repo, &s.id).await?;
            tracing::info!(session = s.id, slots = journal.len(), "resuming a backup");
            resumed = Some((s, journal));
            break;
        }

        let (mut record, journal) = match resumed {
            Some((r, j)) => (r, j),
            None => {
                let parent = match &spec.bitmap {
                    Some(_) => repo.disk_points(&spec.disk).await?.pop().map(|r| r.point),
                    None => None,
                };
                let record = SessionRecord {
                    id: crate::seal::hex(&id::random::<8>()?),
                    disk: spec.disk.clone(),
                    point: id::new_point_id(now)?,
                    source: spec.source.clone(),
                    bitmap: spec.bitmap.clone(),
                    parent,
                    size: spec.size,
                    chunk_size,
                    created_ms: unix_ms(now),
                    owner: Owner::me(),
                    heartbeat_ms: 0,
                };
                (record, Vec::new())
            }
        };
        // Register (or take over) before learning which chunks exist:
        // garbage collection that does not see us live has finished setting
        // chunks aside before we look, so we never trust a chunk that could
        // vanish under us (argument in `gc`).
        record.owner = Owner::me();
        record.heartbeat_ms = unix_ms(SystemTime::now());
        record.save(repo).await?;
        // A full backup or a resumed run lists every chunk (a rerun must
        // know which journaled ones survived). An incremental trusts its
        // parent's index instead, which costs nothing per chunk of the
        // disk: it lists only the fossils, *before* loading the parent, and
        // the parent existed since before we registered, so each chunk it
        // names was then under `chunks/` or among these fossils (`gc`).
        let mut listed = record.parent.is_none() || !journal.is_empty();
        let (mut known, fossils) = if listed {
            (
                repo.list_chunks().await?.into_keys().collect(),
                HashSet::new(),
            )
        } else {
            (HashSet::new(), repo.fossil_chunks().await?)
        };
        let stored = |c: &ChunkId| {
            if listed {
                known.contains(c)
            } else {
                !fossils.contains(c)
            }
        };

        let (parent, unusable) = match &record.parent {
            Some(p) => match repo.load_point(&record.disk, p).await {
                Ok(idx) => match parent_unusable(&idx, &spec, chunk_size, stored) {
                    None => (Some(idx), None),
                    why => (None, why),
                },
                Err(Error::NoSuchPoint(_)) => (None, Some(format!("point {p} was deleted"))),
                Err(e) => return Err(e),
            },
            None => (
                None,
                Some(format!("disk {} has no earlier point", spec.disk)),
            ),
        };
        match &parent {
            Some(p) if !listed => known.extend(p.chunks()),
            // A full point after all: one listing beats a lookup per chunk.
            None if !listed => {
                known = repo.list_chunks().await?.into_keys().collect();
                listed = true;
            }
            _ => {}
        }
        let mut notes = spec.notes.clone();
        if spec.bitmap.is_some() && notes.full_reason.is_none() {
            notes.full_reason = unusable;
        }
        let slots = PointIndex::slot_count(spec.size, chunk_size) as usize;
        let mut entries = vec![None; slots];
        let mut resumed_bytes = 0;
        // A journal built on a parent that is no longer usable is worth
        // nothing: its "keep" slots came from that parent. Start over.
        let journal = if record.parent.is_some() && parent.is_none() {
            record.parent = None;
            Vec::new()
        } else {
            journal
        };
        for (slot, entry) in journal {
            let ok = match entry {
                Slot::Zero => true,
                Slot::Chunk(id) => known.contains(&id),
            };
            if ok && let Some(e) = entries.get_mut(slot as usize) {
                *e = Some(entry);
                resumed_bytes += slot_len(spec.size, chunk_size, slot);
            }
        }

        let shared = Arc::new(Shared {
            repo: repo.clone(),
            record: Mutex::new(record),
            parent,
            notes,
            known: Mutex::new(known),
            listed,
            entries: Mutex::new(entries),
            partial: Mutex::new(HashMap::new()),
            journal: Mutex::new(Journal {
                pending: Vec::new(),
                pending_bytes: 0,
                last_flush: Instant::now(),
                next_segment: unix_ms(SystemTime::now()),
            }),
            journal_every: (spec.size / 64).clamp(JOURNAL_MIN_BYTES, JOURNAL_MAX_BYTES),
            resumed_bytes,
            new_chunks: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            started: Instant::now(),
            heartbeat_ok: AtomicU64::new(0),
            heartbeat: Mutex::new(None),
        });
        let task = tokio::spawn(heartbeat(Arc::downgrade(&shared)));
        *lock(&shared.heartbeat) = Some(task);
        Ok(PointWriter { shared })
    }

    /// The point id this backup will commit.
    pub fn point(&self) -> String {
        lock(&self.shared.record).point.clone()
    }

    pub fn disk(&self) -> String {
        lock(&self.shared.record).disk.clone()
    }

    /// The parent point, when clean ranges may be kept from it.
    pub fn parent(&self) -> Option<&str> {
        self.shared.parent.as_ref().map(|p| p.meta.point.as_str())
    }

    /// True when only dirty ranges need writing (a usable parent exists).
    pub fn incremental(&self) -> bool {
        self.shared.parent.is_some()
    }

    /// Why the point will be full, when the caller or the repository knows.
    pub fn full_reason(&self) -> Option<&str> {
        self.shared.notes.full_reason.as_deref()
    }

    pub fn chunk_size(&self) -> u64 {
        self.shared.repo.chunk_size()
    }

    pub fn size(&self) -> u64 {
        lock(&self.shared.record).size
    }

    /// Bytes of the disk a resumed run found already done.
    pub fn resumed_bytes(&self) -> u64 {
        self.shared.resumed_bytes
    }

    /// True if slot `i` (of `chunk_size` bytes) is already stored, by this
    /// run or a killed one: its ranges need not be read again.
    pub fn slot_done(&self, i: u64) -> bool {
        lock(&self.shared.entries)
            .get(i as usize)
            .is_some_and(Option::is_some)
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        let mut pos = 0usize;
        for (slot, a, b) in self.split(offset, data.len() as u64)? {
            let n = b - a;
            self.piece(slot, a, b, Piece::Data(data.slice(pos..pos + n)))
                .await?;
            pos += n;
        }
        Ok(())
    }

    /// The range reads as zeroes.
    pub async fn zero(&self, offset: u64, len: u64) -> Result<()> {
        for (slot, a, b) in self.split(offset, len)? {
            self.piece(slot, a, b, Piece::Zero).await?;
        }
        Ok(())
    }

    /// The range is unchanged since the parent point. Whole slots take the
    /// parent's entry in one batch (an incremental keeps most of a disk:
    /// tens of thousands of slots); parts of slots wait for the rest.
    pub async fn keep(&self, offset: u64, len: u64) -> Result<()> {
        let (size, cs) = (self.size(), self.chunk_size());
        let mut whole = Vec::new();
        for (slot, a, b) in self.split(offset, len)? {
            match &self.shared.parent {
                Some(parent) if (b - a) as u64 == slot_len(size, cs, slot) => {
                    let entry = parent.slots.get(slot as usize).copied();
                    whole.push((slot, entry.unwrap_or(Slot::Zero)));
                }
                _ => self.piece(slot, a, b, Piece::Keep).await?,
            }
        }
        self.finish_kept(whole).await
    }

    /// Records whole slots kept from the parent (those not done already).
    async fn finish_kept(&self, kept: Vec<(u64, Slot)>) -> Result<()> {
        if kept.is_empty() {
            return Ok(());
        }
        {
            let partial = lock(&self.shared.partial);
            if let Some((slot, _)) = kept.iter().find(|(s, _)| partial.contains_key(s)) {
                return Err(Error::Invalid(format!("slot {slot} was written twice")));
            }
        }
        let fresh: Vec<(u64, Slot)> = {
            let mut entries = lock(&self.shared.entries);
            kept.into_iter()
                .filter(|&(slot, entry)| {
                    let e = &mut entries[slot as usize];
                    let fresh = e.is_none();
                    e.get_or_insert(entry);
                    fresh
                })
                .collect()
        };
        // Kept slots cost a rerun nothing to redo.
        self.journal(&fresh, 0).await
    }

    /// (slot, start, end) within each slot the range touches.
    fn split(&self, offset: u64, len: u64) -> Result<Vec<(u64, usize, usize)>> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        let cs = self.chunk_size();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let slot = pos / cs;
            let end = ((slot + 1) * cs).min(offset + len);
            out.push((slot, (pos - slot * cs) as usize, (end - slot * cs) as usize));
            pos = end;
        }
        Ok(out)
    }

    async fn piece(&self, slot: u64, a: usize, b: usize, piece: Piece) -> Result<()> {
        if self.slot_done(slot) {
            return Ok(());
        }
        let len = slot_len(self.size(), self.chunk_size(), slot);
        // A piece that is the whole slot (most of a full backup) is stored
        // straight from the caller's buffer: no staging copy.
        if let Piece::Data(d) = &piece
            && d.len() as u64 == len
            && !lock(&self.shared.partial).contains_key(&slot)
        {
            let entry = self.store(d.clone()).await?;
            return self.finish_slot(slot, len, entry).await;
        }
        let complete = {
            let mut partial = lock(&self.shared.partial);
            let p = partial.entry(slot).or_default();
            match piece {
                Piece::Data(d) => {
                    p.buf.get_or_insert_with(|| vec![0u8; len as usize])[a..b].copy_from_slice(&d);
                    p.read += d.len() as u64;
                }
                Piece::Zero => {}
                Piece::Keep => {
                    if self.shared.parent.is_none() {
                        return Err(Error::Invalid(
                            "a range was kept from a parent point, but there is none".into(),
                        ));
                    }
                    p.kept.push((a, b));
                }
            }
            p.covered += (b - a) as u64;
            if p.covered > len {
                return Err(Error::Invalid(format!("slot {slot} was written twice")));
            }
            if p.covered == len {
                partial.remove(&slot)
            } else {
                None
            }
        };
        match complete {
            Some(p) => self.complete(slot, len, p).await,
            None => Ok(()),
        }
    }

    /// Turns a fully covered slot into its entry, storing a new chunk.
    async fn complete(&self, slot: u64, len: u64, p: Partial) -> Result<()> {
        let parent_slot = self
            .shared
            .parent
            .as_ref()
            .and_then(|x| x.slots.get(slot as usize).copied())
            .unwrap_or(Slot::Zero);
        let kept = p.kept.iter().map(|(a, b)| (b - a) as u64).sum::<u64>();
        let redo = p.read;
        let entry =
            match (p.buf, parent_slot) {
                _ if kept == len => parent_slot,
                (None, Slot::Zero) => Slot::Zero,
                (None, _) if p.kept.is_empty() => Slot::Zero,
                (buf, parent) => {
                    let mut buf = buf.unwrap_or_else(|| vec![0u8; len as usize]);
                    if let (Slot::Chunk(pid), false) = (parent, p.kept.is_empty()) {
                        let old = self.shared.repo.read_chunk(&pid).await?;
                        for (a, b) in p.kept {
                            buf[a..b].copy_from_slice(old.get(a..b).ok_or_else(|| {
                                Error::corrupt(&pid.key(), "shorter than its slot")
                            })?);
                        }
                    }
                    self.store(Bytes::from(buf)).await?
                }
            };
        self.finish_slot(slot, redo, entry).await
    }

    /// The entry for a slot's whole content, storing it as a chunk unless
    /// the repository has it already.
    async fn store(&self, content: Bytes) -> Result<Slot> {
        // Data pieces may carry zeroes (the caller decides its pieces); a
        // slot that is all zeroes is no chunk. Real data ends this scan at
        // its first bytes.
        if content.iter().all(|&b| b == 0) {
            return Ok(Slot::Zero);
        }
        let id = self.shared.repo.sealer().chunk_id(&content);
        let mut stored = lock(&self.shared.known).contains(&id);
        if !stored && !self.shared.listed && self.shared.repo.has_chunk(&id).await? {
            // Seen under `chunks/` after we registered: as safe to trust
            // as a listing (`gc`).
            lock(&self.shared.known).insert(id);
            stored = true;
        }
        if !stored {
            let n = self.shared.repo.put_chunk(&id, content).await?;
            lock(&self.shared.known).insert(id);
            self.shared.new_chunks.fetch_add(1, Ordering::Relaxed);
            self.shared.new_bytes.fetch_add(n, Ordering::Relaxed);
        }
        Ok(Slot::Chunk(id))
    }

    /// Records a slot's entry and journals it; `redo` is what a rerun
    /// would read again without it.
    async fn finish_slot(&self, slot: u64, redo: u64, entry: Slot) -> Result<()> {
        lock(&self.shared.entries)[slot as usize] = Some(entry);
        self.journal(&[(slot, entry)], redo).await
    }

    /// Journals finished slots, writing a segment when enough is pending.
    async fn journal(&self, done: &[(u64, Slot)], redo: u64) -> Result<()> {
        let batch = {
            let mut j = lock(&self.shared.journal);
            j.pending.extend_from_slice(done);
            j.pending_bytes += redo;
            if j.pending_bytes >= self.shared.journal_every
                || j.last_flush.elapsed() >= JOURNAL_MAX_AGE
            {
                j.pending_bytes = 0;
                j.last_flush = Instant::now();
                j.next_segment += 1;
                Some((j.next_segment, std::mem::take(&mut j.pending)))
            } else {
                None
            }
        };
        if let Some((n, entries)) = batch {
            self.write_segment(n, &entries).await?;
        }
        Ok(())
    }

    async fn write_segment(&self, n: u64, entries: &[(u64, Slot)]) -> Result<()> {
        let repo = &self.shared.repo;
        // The chunks a segment names must be durable before it is.
        repo.backend().barrier().await?;
        let id = lock(&self.shared.record).id.clone();
        repo.put_meta(
            &session::segment_key(&id, n),
            &session::encode_segment(entries),
            Durability::Deferred,
        )
        .await
    }

    /// Writes the index: from now on the point exists. `bytes_read` is
    /// what the caller read from the source (kept in the point's stats).
    pub async fn commit(&self, bytes_read: u64) -> Result<PointMeta> {
        let s = &self.shared;
        let slots: Vec<Slot> = {
            let entries = lock(&s.entries);
            if let Some(i) = entries.iter().position(Option::is_none) {
                return Err(Error::Invalid(format!(
                    "the backup is incomplete: slot {i} was never written"
                )));
            }
            entries.iter().flatten().copied().collect()
        };
        let since = s.started.elapsed().as_millis() as u64 - s.heartbeat_ok.load(Ordering::Relaxed);
        if since > COMMIT_WITHIN.as_millis() as u64 {
            return Err(Error::LeaseLapsed(since / 1000));
        }
        let record = lock(&s.record).clone();
        let data_bytes = slots
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Slot::Chunk(_)))
            .map(|(i, _)| slot_len(record.size, record.chunk_size, i as u64))
            .sum();
        let index = PointIndex {
            meta: PointMeta {
                disk: record.disk.clone(),
                point: record.point.clone(),
                created_ms: record.created_ms,
                size: record.size,
                chunk_size: record.chunk_size,
                parent: s.parent.as_ref().map(|p| p.meta.point.clone()),
                bitmap: record.bitmap.clone(),
                source: record.source.clone(),
                stats: PointStats {
                    bytes_read,
                    new_chunks: s.new_chunks.load(Ordering::Relaxed),
                    new_bytes: s.new_bytes.load(Ordering::Relaxed),
                    data_bytes,
                },
                checkpoint: s.notes.checkpoint.clone(),
                full_reason: s.notes.full_reason.clone(),
            },
            slots,
        };
        // Every chunk is durable before the index is visible.
        s.repo
            .put_meta(
                &id::point_key(&record.disk, &record.point),
                &index.encode()?,
                Durability::AfterAll,
            )
            .await?;
        if let Some(h) = lock(&s.heartbeat).take() {
            h.abort();
        }
        if let Err(e) = session::remove(&s.repo, &record.id).await {
            // The point exists; a leftover session is found and removed by
            // the next run of this backup (or expires for prune).
            tracing::warn!("cannot remove the finished session {}: {e}", record.id);
        }
        Ok(index.meta)
    }
}

/// Why `parent` cannot lend its slots to a backup of `spec`, if it cannot.
fn parent_unusable(
    parent: &PointIndex,
    spec: &BackupSpec,
    chunk_size: u64,
    stored: impl Fn(&ChunkId) -> bool,
) -> Option<String> {
    let p = &parent.meta;
    if p.size != spec.size {
        Some(format!(
            "the disk's size changed from {} to {} bytes since point {}",
            p.size, spec.size, p.point
        ))
    } else if p.chunk_size != chunk_size {
        Some(format!("point {} has another chunk size", p.point))
    } else if !parent.chunks().all(|c| stored(&c)) {
        Some(format!("chunks of point {} are missing", p.point))
    } else {
        None
    }
}

/// Renews the session record until the writer is gone.
async fn heartbeat(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let Some(s) = shared.upgrade() else { return };
        let mut record = lock(&s.record).clone();
        record.heartbeat_ms = unix_ms(SystemTime::now());
        match record.save(&s.repo).await {
            Ok(()) => s
                .heartbeat_ok
                .store(s.started.elapsed().as_millis() as u64, Ordering::Relaxed),
            Err(e) => tracing::warn!("cannot renew the backup session: {e}"),
        }
    }
}
