//! Opening a repository, its config, points and chunks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{self, Backend, Durability};
use crate::error::{Error, Result};
use crate::id::{self, CONFIG, ChunkId, FOSSILS, POINTS};
use crate::index::{PointIndex, PointMeta};
use crate::seal::{Envelope, KeyFile, NonceFrom, Sealer};

/// The format this code writes and reads.
const FORMAT: u32 = 1;

/// Chunk size of new repositories: see the crate docs for the measurement.
pub const DEFAULT_CHUNK_SIZE: u64 = 256 * 1024;
/// zstd level of new repositories that compress: level 1 keeps compression
/// well ahead of a disk or network (several hundred MB/s per core).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// The `config` object: plain JSON, readable without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: u32,
    pub chunk_size: u64,
    /// zstd level, or none.
    pub zstd: Option<i32>,
    /// Present when encrypted: the cipher and a value that tells the
    /// right key (see [`KeyFile::check_value`]).
    pub encryption: Option<Encryption>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub cipher: String,
    pub key_check: String,
}

/// Settings for a repository created by [`Repo::open_or_create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub chunk_size: u64,
    pub zstd: Option<i32>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd: Some(DEFAULT_ZSTD_LEVEL),
        }
    }
}

/// An open repository. Cheap to clone; every method takes `&self` and may
/// run from many tasks at once.
#[derive(Clone)]
pub struct Repo {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    sealer: Sealer,
    config: RepoConfig,
}

/// A point's name, as listed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PointRef {
    pub disk: String,
    pub point: String,
}

impl Repo {
    /// Opens an existing repository (`s3://bucket/prefix` or a directory).
    pub async fn open(location: &str, key: Option<&KeyFile>) -> Result<Repo> {
        let backend = backend::open(location)?;
        let Some(raw) = backend.get(CONFIG).await? else {
            return Err(Error::NoRepository(location.to_string()));
        };
        let config: RepoConfig = serde_json::from_slice(&raw)
            .map_err(|e| Error::corrupt(CONFIG, format!("bad config: {e}")))?;
        Repo::with_config(backend, config, key)
    }

    /// Opens a repository, creating it first if the location holds none.
    /// The key file, if any, decides whether a new repository is encrypted.
    pub async fn open_or_create(
        location: &str,
        key: Option<&KeyFile>,
        create: &CreateOptions,
    ) -> Result<Repo> {
        let backend = backend::open(location)?;
        if backend.get(CONFIG).await?.is_some() {
            return Repo::open(location, key).await;
        }
        if !create.chunk_size.is_power_of_two() || !(4096..=(16 << 20)).contains(&create.chunk_size)
        {
            return Err(Error::Invalid(format!(
                "chunk size {} is not a power of two between 4 KiB and 16 MiB",
                create.chunk_size
            )));
        }
        let config = RepoConfig {
            format: FORMAT,
            chunk_size: create.chunk_size,
            zstd: create.zstd,
            encryption: key.map(|k| Encryption {
                cipher: "aes-256-gcm".into(),
                key_check: k.check_value(),
            }),
        };
        let raw = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::Invalid(format!("cannot encode the config: {e}")))?;
        backend
            .put(CONFIG, Bytes::from(raw), Durability::Now)
            .await?;
        tracing::info!(location, ?config, "created a backup repository");
        Repo::with_config(backend, config, key)
    }

    pub(crate) fn with_config(
        backend: Arc<dyn Backend>,
        config: RepoConfig,
        key: Option<&KeyFile>,
    ) -> Result<Repo> {
        if config.format != FORMAT {
            return Err(Error::corrupt(
                CONFIG,
                format!("format {} (this nbdferry reads {FORMAT})", config.format),
            ));
        }
        match (&config.encryption, key) {
            (Some(_), None) => return Err(Error::KeyRequired),
            (None, Some(_)) => return Err(Error::NotEncrypted),
            (Some(e), Some(k)) if e.key_check != k.check_value() => return Err(Error::WrongKey),
            _ => {}
        }
        let sealer = Sealer::new(key, config.zstd)?;
        Ok(Repo {
            inner: Arc::new(Inner {
                backend,
                sealer,
                config,
            }),
        })
    }

    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.config.chunk_size
    }

    pub fn location(&self) -> String {
        self.inner.backend.describe()
    }

    /// Eight hex digits that tell this repository from others, the same
    /// however its location is written: `backup run` names the snapshots
    /// and checkpoints it takes for this repository with it.
    pub fn tag(&self) -> String {
        let identity = self.inner.backend.identity();
        crate::seal::hex(&blake3::hash(identity.as_bytes()).as_bytes()[..4])
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    pub(crate) fn sealer(&self) -> &Sealer {
        &self.inner.sealer
    }

    /// Largest plain object other than a chunk (indexes, journals) that we
    /// accept: a generous bound over the encoded size of a 64 TiB disk's
    /// index at the smallest chunk size.
    pub(crate) fn max_meta_len(&self) -> usize {
        let slots = (64u64 << 40) / self.chunk_size();
        (slots * 41 + (2 << 20)) as usize
    }

    /// Seals and stores a metadata object (index, journal, record).
    pub(crate) async fn put_meta(&self, key: &str, plain: &[u8], d: Durability) -> Result<()> {
        let sealed = self.sealer().seal(key, plain, NonceFrom::Random)?;
        self.backend().put(key, Bytes::from(sealed), d).await
    }

    /// Reads and opens a metadata object; `None` if it does not exist.
    pub(crate) async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.backend().get(key).await? {
            None => Ok(None),
            Some(raw) => Ok(Some(self.sealer().open(key, &raw, self.max_meta_len())?)),
        }
    }

    // ---- chunks --------------------------------------------------------

    /// Stores a chunk under its id; returns the stored size.
    pub(crate) async fn put_chunk(&self, id: &ChunkId, data: Bytes) -> Result<u64> {
        let key = id.key();
        let sealed = self.sealer().seal_parts(&key, data, NonceFrom::Chunk(id))?;
        let n = sealed.iter().map(Bytes::len).sum::<usize>() as u64;
        self.backend()
            .put_parts(&key, sealed, Durability::Deferred)
            .await?;
        Ok(n)
    }

    /// A chunk's content, checked against its id. A chunk that a
    /// concurrent prune set aside (see `gc`) is still found there.
    pub async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes> {
        self.read_chunk_checking(id, Envelope::ContentOnly).await
    }

    /// [`read_chunk`](Self::read_chunk) that also checks the bytes that do
    /// not make the content (the envelope's checksum): `verify --deep`.
    pub(crate) async fn read_chunk_checking(
        &self,
        id: &ChunkId,
        envelope: Envelope,
    ) -> Result<Bytes> {
        let key = id.key();
        let (key, raw) = match self.backend().get(&key).await? {
            Some(raw) => (key, raw),
            None => self.find_fossil(id).await?.ok_or(Error::Missing(key))?,
        };
        // Open under the chunk's own key: that is what it was sealed with,
        // wherever it lies now.
        let plain =
            self.sealer()
                .open_chunk(&id.key(), raw, self.chunk_size() as usize, envelope)?;
        if self.sealer().chunk_id(&plain) != *id {
            return Err(Error::corrupt(&key, "content does not match its id"));
        }
        Ok(plain)
    }

    async fn find_fossil(&self, id: &ChunkId) -> Result<Option<(String, Bytes)>> {
        let name = id.to_string();
        for m in self.backend().list(FOSSILS).await? {
            if m.key.ends_with(&name)
                && let Some(raw) = self.backend().get(&m.key).await?
            {
                return Ok(Some((m.key, raw)));
            }
        }
        Ok(None)
    }

    /// Whether a chunk is stored (under `chunks/`, not set aside).
    pub(crate) async fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.backend().exists(&id.key()).await
    }

    /// The chunks garbage collection has set aside (see `gc`).
    pub(crate) async fn fossil_chunks(&self) -> Result<HashSet<ChunkId>> {
        Ok(self
            .backend()
            .list(FOSSILS)
            .await?
            .into_iter()
            .filter_map(|m| ChunkId::from_key(&m.key))
            .collect())
    }

    /// Every stored chunk and its stored size.
    pub(crate) async fn list_chunks(&self) -> Result<HashMap<ChunkId, u64>> {
        Ok(self
            .backend()
            .list(id::CHUNKS)
            .await?
            .into_iter()
            .filter_map(|m| Some((ChunkId::from_key(&m.key)?, m.size)))
            .collect())
    }

    // ---- points --------------------------------------------------------

    /// The names of every committed point (unordered).
    pub async fn point_refs(&self) -> Result<Vec<PointRef>> {
        Ok(self
            .backend()
            .list(POINTS)
            .await?
            .into_iter()
            .filter_map(|m| {
                let rest = m.key.strip_prefix(POINTS)?;
                let (disk, point) = rest.split_once('/')?;
                (id::check_name(disk).is_ok() && id::check_name(point).is_ok()).then(|| PointRef {
                    disk: disk.to_string(),
                    point: point.to_string(),
                })
            })
            .collect())
    }

    pub async fn load_point(&self, disk: &str, point: &str) -> Result<PointIndex> {
        let key = id::point_key(disk, point);
        let plain = self
            .get_meta(&key)
            .await?
            .ok_or_else(|| Error::NoSuchPoint(format!("{disk}@{point}")))?;
        let index = PointIndex::decode(&key, &plain)?;
        if index.meta.disk != disk || index.meta.point != point {
            return Err(Error::corrupt(&key, "names another point"));
        }
        Ok(index)
    }

    /// Every point with its index, oldest first. Fails if any index cannot
    /// be read: callers that act on the set (prune) must see all of it.
    pub async fn points(&self) -> Result<Vec<PointIndex>> {
        let mut out = Vec::new();
        for r in self.point_refs().await? {
            out.push(self.load_point(&r.disk, &r.point).await?);
        }
        out.sort_by(|a, b| {
            (a.meta.created_ms, &a.meta.point).cmp(&(b.meta.created_ms, &b.meta.point))
        });
        Ok(out)
    }

    /// The metadata of every point, oldest first.
    pub async fn list(&self) -> Result<Vec<PointMeta>> {
        Ok(self.points().await?.into_iter().map(|p| p.meta).collect())
    }

    /// A disk's points, oldest first.
    pub async fn disk_points(&self, disk: &str) -> Result<Vec<PointRef>> {
        let mut v: Vec<PointRef> = self
            .point_refs()
            .await?
            .into_iter()
            .filter(|r| r.disk == disk)
            .collect();
        // Ids start with the UTC start time: their order is the time order.
        v.sort();
        Ok(v)
    }

    /// `DISK@POINT` (a unique prefix of the id will do) or, without a
    /// point, the disk's newest.
    pub async fn resolve(&self, disk: &str, point: Option<&str>) -> Result<PointIndex> {
        id::check_name(disk)?;
        let all = self.disk_points(disk).await?;
        let found = match point {
            None => all
                .last()
                .ok_or_else(|| Error::NoPoints(disk.to_string()))?,
            Some(p) => {
                if let Some(exact) = all.iter().find(|r| r.point == p) {
                    exact
                } else {
                    let mut m = all.iter().filter(|r| r.point.starts_with(p));
                    match (m.next(), m.next()) {
                        (Some(one), None) => one,
                        (Some(_), Some(_)) => {
                            return Err(Error::AmbiguousPoint(format!("{disk}@{p}")));
                        }
                        _ => return Err(Error::NoSuchPoint(format!("{disk}@{p}"))),
                    }
                }
            }
        };
        self.load_point(&found.disk, &found.point).await
    }

    /// Removes a point's index. Its chunks stay until garbage collection
    /// finds them unreferenced ([`Repo::collect_garbage`]).
    pub async fn delete_point(&self, disk: &str, point: &str) -> Result<()> {
        let key = id::point_key(disk, point);
        if self.backend().get(&key).await?.is_none() {
            return Err(Error::NoSuchPoint(format!("{disk}@{point}")));
        }
        self.backend().delete(&key).await
    }
}
