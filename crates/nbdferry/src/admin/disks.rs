//! The daemon's live disks and their snapshot exports: the glue between
//! `ferry_store::Volume` and the NBD export registry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_store::{
    BlockDev, CheckpointInfo, DEFAULT_GRANULARITY, DeleteInfo, FileDev, RevertInfo, SnapshotInfo,
    StoreError, Volume, validate_name,
};
use nbd_server::{Export, Registry};
use serde::Serialize;

/// What went wrong, with the HTTP status the API answers.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::InvalidName(_) => 400,
            StoreError::NotFound(_) => 404,
            StoreError::Exists(_) | StoreError::Busy(_) | StoreError::ReadOnly => 409,
            _ => 500,
        };
        ApiError::new(status, e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

enum Disk {
    Live {
        vol: Arc<Volume>,
        export: String,
    },
    /// Exported read-only: served, but not snapshotted or tracked.
    ReadOnly,
}

#[derive(Serialize)]
pub struct ExportEntry {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
    /// The disk (snapshots and checkpoints) a live export serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The disk a snapshot export belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
}

pub struct Disks {
    registry: Arc<Registry>,
    disks_dir: PathBuf,
    disks: Mutex<BTreeMap<String, Disk>>,
}

/// `DISK@SNAP`, the export name of a snapshot.
pub fn snapshot_export(disk: &str, snap: &str) -> String {
    format!("{disk}@{snap}")
}

impl Disks {
    pub fn new(registry: Arc<Registry>, state_dir: &Path) -> Self {
        Disks {
            registry,
            disks_dir: state_dir.join("disks"),
            disks: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Disk>> {
        self.disks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds export `name` for `path`. Writable disks get the snapshot and
    /// checkpoint layer (`ferry_store::Volume`), with snapshots and
    /// checkpoints under the disk name: the export name, or for the
    /// nameless default export the file name. Existing snapshots are
    /// published again. `granularity` (default 64 KiB) applies to a disk
    /// without state; one with state keeps its own.
    pub fn add_export(
        &self,
        name: &str,
        description: &str,
        path: &Path,
        read_only: bool,
        granularity: Option<u64>,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        if name.len() > nbd_proto::consts::MAX_STRING || name.contains('\0') {
            anyhow::bail!("export name '{name}' is not a valid NBD string");
        }
        let disk_name = if validate_name("disk", name).is_ok() {
            Some(name.to_string())
        } else if name.is_empty() {
            path.file_name()
                .and_then(|f| f.to_str())
                .filter(|f| validate_name("disk", f).is_ok())
                .map(str::to_string)
        } else {
            None
        };
        let mut disks = self.lock();
        if let Some(d) = &disk_name
            && disks.contains_key(d)
        {
            anyhow::bail!("two exports use the disk name '{d}'");
        }
        let (dev, vol): (Arc<dyn BlockDev>, Option<Arc<Volume>>) = match (&disk_name, read_only) {
            (Some(d), false) => {
                let asked = granularity.unwrap_or(DEFAULT_GRANULARITY);
                let vol = Volume::open(d, path, &self.disks_dir, asked)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                if granularity.is_some_and(|g| g != vol.granularity()) {
                    tracing::warn!(
                        disk = d.as_str(),
                        "keeps the granularity of its existing state, {} bytes, not the {asked} asked for \
                         (delete its snapshots and checkpoints to change it)",
                        vol.granularity()
                    );
                }
                (vol.clone(), Some(vol))
            }
            _ => {
                let dev = FileDev::open(path, read_only)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                if !read_only {
                    tracing::info!(
                        export = name,
                        "no valid disk name: served without snapshots"
                    );
                }
                (Arc::new(dev), None)
            }
        };
        self.registry
            .add(Export::new(name, description, dev))
            .map_err(anyhow::Error::msg)?;
        if let Some(d) = disk_name {
            match vol {
                Some(vol) => {
                    for s in vol.snapshots() {
                        let view = vol.snapshot_view(&s.name)?;
                        self.registry
                            .add(Export::new(
                                snapshot_export(&d, &s.name),
                                snapshot_desc(&d, &s.name),
                                view,
                            ))
                            .map_err(anyhow::Error::msg)?;
                    }
                    disks.insert(
                        d,
                        Disk::Live {
                            vol,
                            export: name.to_string(),
                        },
                    );
                }
                None => {
                    disks.insert(d, Disk::ReadOnly);
                }
            }
        }
        Ok(())
    }

    fn volume(&self, disk: &str) -> ApiResult<Arc<Volume>> {
        match self.lock().get(disk) {
            Some(Disk::Live { vol, .. }) => Ok(vol.clone()),
            Some(Disk::ReadOnly) => Err(ApiError::new(
                409,
                format!("disk '{disk}' is exported read-only: it has no snapshots or checkpoints"),
            )),
            None => Err(ApiError::new(
                404,
                format!("no disk '{}'", disk.escape_default()),
            )),
        }
    }

    pub fn exports(&self) -> Vec<ExportEntry> {
        let disks = self.lock();
        self.registry
            .names()
            .into_iter()
            .filter_map(|n| self.registry.get(&n).map(|e| (n, e)))
            .map(|(name, e)| {
                let snapshot_of = name
                    .split_once('@')
                    .filter(|(d, _)| disks.contains_key(*d))
                    .map(|(d, _)| d.to_string());
                let disk = disks.iter().find_map(|(d, e)| match e {
                    Disk::Live { export, .. } if *export == name => Some(d.clone()),
                    _ => None,
                });
                ExportEntry {
                    disk,
                    size: e.dev.size(),
                    read_only: e.dev.caps().read_only,
                    description: e.description.clone(),
                    snapshot_of,
                    name,
                }
            })
            .collect()
    }

    pub fn create_snapshot(
        &self,
        disk: &str,
        name: &str,
        checkpoint: bool,
    ) -> ApiResult<SnapshotInfo> {
        let vol = self.volume(disk)?;
        validate_name("snapshot", name)?;
        let export = snapshot_export(disk, name);
        if vol.snapshots().iter().any(|s| s.name == name) {
            return Err(ApiError::new(
                409,
                format!("snapshot '{export}' already exists"),
            ));
        }
        if self.registry.get(&export).is_some() {
            return Err(ApiError::new(
                409,
                format!("export '{export}' already exists"),
            ));
        }
        let info = vol.create_snapshot(name, checkpoint)?;
        let view = vol.snapshot_view(name)?;
        if let Err(e) = self
            .registry
            .add(Export::new(export, snapshot_desc(disk, name), view))
        {
            // Cannot publish it: do not leave it half-created.
            let _ = vol.delete_snapshot(name);
            if checkpoint {
                let _ = vol.delete_checkpoint(name);
            }
            return Err(ApiError::new(409, e));
        }
        Ok(info)
    }

    pub fn snapshots(&self, disk: &str) -> ApiResult<Vec<SnapshotInfo>> {
        Ok(self.volume(disk)?.snapshots())
    }

    /// Refuses while an NBD client has the snapshot export open: pulling a
    /// snapshot away under a running backup would turn its reads into
    /// errors. Clients that connect after the check cannot find it.
    pub fn delete_snapshot(&self, disk: &str, name: &str) -> ApiResult<DeleteInfo> {
        let vol = self.volume(disk)?;
        validate_name("snapshot", name)?;
        let export = snapshot_export(disk, name);
        let removed = self.registry.remove(&export);
        if let Some(e) = &removed {
            // Besides `e` (ours) and the view inside it, any reference is
            // an open NBD connection (it holds the export or its device).
            let busy = Arc::strong_count(e) > 1 || Arc::strong_count(&e.dev) > 1;
            if busy {
                self.republish(e);
                return Err(ApiError::new(
                    409,
                    format!(
                        "snapshot '{export}' is busy: NBD clients have it open; disconnect them and retry"
                    ),
                ));
            }
        }
        match vol.delete_snapshot(name) {
            Ok(info) => Ok(info),
            Err(err) => {
                if let Some(e) = &removed {
                    self.republish(e);
                }
                Err(err.into())
            }
        }
    }

    fn republish(&self, e: &Export) {
        let back = Export::new(e.name.clone(), e.description.clone(), e.dev.clone());
        if let Err(msg) = self.registry.add(back) {
            tracing::warn!("cannot publish {} again: {msg}", e.name);
        }
    }

    pub fn revert(&self, disk: &str, name: &str) -> ApiResult<RevertInfo> {
        let vol = self.volume(disk)?;
        validate_name("snapshot", name)?;
        Ok(vol.revert(name)?)
    }

    pub fn create_checkpoint(&self, disk: &str, name: &str) -> ApiResult<CheckpointInfo> {
        Ok(self.volume(disk)?.create_checkpoint(name)?)
    }

    pub fn checkpoints(&self, disk: &str) -> ApiResult<Vec<CheckpointInfo>> {
        Ok(self.volume(disk)?.checkpoints())
    }

    pub fn delete_checkpoint(&self, disk: &str, name: &str) -> ApiResult<()> {
        let vol = self.volume(disk)?;
        validate_name("checkpoint", name)?;
        Ok(vol.delete_checkpoint(name)?)
    }
}

fn snapshot_desc(disk: &str, snap: &str) -> String {
    format!("snapshot {snap} of {disk} (read-only)")
}
