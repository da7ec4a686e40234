//! The daemon's disks and exports, and the operations on them.
//!
//! Every operation that changes a disk's snapshots or checkpoints runs
//! under that disk's operation lock, which covers both the disk's own
//! change and the export table's: a snapshot is never published after a
//! concurrent delete removed it, and a delete never finds a snapshot whose
//! export is half-published. Whether a snapshot export is in use is the
//! export table's count of open handles (`nbd_server::Registry`), checked
//! and acted on under the table's own lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use ferry_api::{
    AfterMirror, CompleteMirror, MirrorCancelled, MirrorCompleted, MirrorStatus, SetMirror,
    StartMirror,
};
use ferry_api::{
    CheckpointCreated, CheckpointDeleted, CheckpointList, CreateCheckpoint, CreateSnapshot,
    ExportEntry, ExportList, HydrationStatus, Reloaded, Reverted, SnapshotCreated, SnapshotDeleted,
    SnapshotEntry, SnapshotList,
};
use ferry_jobs::{HydrateOptions, Hydration, Mirror};
use ferry_store::{Disk, validate_name};
use nbd_server::{Registry, RegistryError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::error::ServiceError;
use crate::metrics::Renderer;
use crate::phase::{Phase, PhaseCell};
use crate::reload::{ReloadChannel, ReloadRequest};
use crate::stack::{self, ExportSpec};

/// A mirror and its copier task (gone once completion took it).
struct MirrorSlot {
    mirror: Arc<Mirror>,
    copier: Option<tokio::task::JoinHandle<()>>,
}

enum Slot {
    Live {
        disk: Arc<Disk>,
        /// The export that serves the live disk, as configured.
        spec: ExportSpec,
        export: String,
        /// Held across each change of the disk and its exports.
        ops: Arc<Mutex<()>>,
    },
    /// Exported read-only (as `export`): served, but not snapshotted or
    /// tracked.
    ReadOnly { export: String },
}

impl Slot {
    fn export(&self) -> &str {
        match self {
            Slot::Live { export, .. } | Slot::ReadOnly { export } => export,
        }
    }
}

/// A disk arriving from its source, and what stops its background pass.
struct HydrationSlot {
    hydration: Arc<Hydration>,
    stop: CancellationToken,
}

pub struct Daemon {
    registry: Arc<Registry>,
    disks_dir: PathBuf,
    disks: Mutex<BTreeMap<String, Slot>>,
    phase: PhaseCell,
    reloads: ReloadChannel,
    renderer: Renderer,
    /// Disks still arriving from a source, and the pass that brings them.
    hydrations: Mutex<BTreeMap<String, HydrationSlot>>,
    /// The NBD listeners' addresses, once the owner of the listeners has
    /// them up ([`set_listeners`](Self::set_listeners)); they stay.
    listeners: OnceLock<Vec<String>>,
    /// Mirrors of disks (running, or ended: kept for their status).
    mirrors: Mutex<BTreeMap<String, MirrorSlot>>,
    /// Stops the daemon's background jobs.
    stop: CancellationToken,
}

/// The disks and jobs as a scrape of `/metrics` finds them.
pub(crate) struct Sample {
    pub(crate) disks: Vec<(String, Arc<Disk>)>,
    pub(crate) hydrations: Vec<HydrationStatus>,
    pub(crate) mirrors: Vec<MirrorStatus>,
}

/// `DISK@SNAP`, the export name of a snapshot.
fn snapshot_export(disk: &str, snap: &str) -> String {
    format!("{disk}@{snap}")
}

fn snapshot_desc(disk: &str, snap: &str) -> String {
    format!("snapshot {snap} of {disk} (read-only)")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the daemon tightens its disks' dirty bitmaps: a crash can
/// make a checkpoint over-report the marking windows of at most this
/// long before it (plus the writes in flight). A tighten that finds
/// nothing new costs an atomic load per disk; one that does, one small
/// bitmap write and sync.
pub const TIGHTEN_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Daemon {
    /// Background upkeep until `shutdown`: tightens every live disk's
    /// dirty bitmap every [`TIGHTEN_EVERY`].
    pub async fn maintain(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(TIGHTEN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let disks: Vec<Arc<Disk>> = lock(&self.disks)
                .values()
                .filter_map(|s| match s {
                    Slot::Live { disk, .. } => Some(disk.clone()),
                    Slot::ReadOnly { .. } => None,
                })
                .collect();
            let done = tokio::task::spawn_blocking(move || {
                for d in disks {
                    match d.tighten() {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::debug!(disk = d.name(), bits = n, "dirty bitmap tightened")
                        }
                        Err(e) => {
                            tracing::warn!(disk = d.name(), "cannot tighten dirty bitmap: {e}")
                        }
                    }
                }
            });
            let _ = done.await;
        }
    }

    /// A daemon publishing into `registry`, with disk state under
    /// `state_dir/disks`.
    pub fn new(registry: Arc<Registry>, state_dir: &Path) -> Self {
        Daemon {
            registry,
            disks_dir: state_dir.join("disks"),
            disks: Mutex::new(BTreeMap::new()),
            phase: PhaseCell::default(),
            reloads: ReloadChannel::default(),
            renderer: Renderer::default(),
            hydrations: Mutex::new(BTreeMap::new()),
            listeners: OnceLock::new(),
            mirrors: Mutex::new(BTreeMap::new()),
            stop: CancellationToken::new(),
        }
    }

    /// Where the daemon is: [`Phase::Starting`] until the owner of its
    /// listeners says otherwise with [`set_phase`](Self::set_phase).
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.set(phase);
    }

    /// Records where the NBD listeners are, for `GET /v1/exports`: once,
    /// as they are bound once (a second call changes nothing).
    pub fn set_listeners(&self, addrs: Vec<String>) {
        let _ = self.listeners.set(addrs);
    }

    /// Reload requests of the admin API, for whoever owns the
    /// configuration; None after the first call.
    pub fn reload_requests(&self) -> Option<tokio::sync::mpsc::Receiver<ReloadRequest>> {
        self.reloads.listen()
    }

    /// Asks the owner of the configuration to reload it, and waits for
    /// the outcome.
    pub async fn reload(&self) -> Result<Reloaded, ServiceError> {
        self.reloads.request().await
    }

    pub(crate) fn renderer(&self) -> &Renderer {
        &self.renderer
    }

    pub(crate) fn sample(&self) -> Sample {
        let disks = lock(&self.disks)
            .iter()
            .filter_map(|(name, s)| match s {
                Slot::Live { disk, .. } => Some((name.clone(), disk.clone())),
                Slot::ReadOnly { .. } => None,
            })
            .collect();
        let hydrations = lock(&self.hydrations)
            .iter()
            .map(|(d, h)| h.hydration.status(d))
            .collect();
        let mirrors = lock(&self.mirrors)
            .iter()
            .filter(|(_, m)| m.mirror.is_running())
            .map(|(d, m)| m.mirror.status(d))
            .collect();
        Sample {
            disks,
            hydrations,
            mirrors,
        }
    }

    /// Stops the background jobs (hydration passes); their state is
    /// durable, so they resume where they stood at the next start.
    pub fn stop_jobs(&self) {
        self.stop.cancel();
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Adds an export. A writable export gets the snapshot and checkpoint
    /// layers, with snapshots and checkpoints under its disk name: the
    /// export name, or for the nameless default export the file name.
    /// Existing snapshots are published again. A disk with a source starts
    /// its hydration pass (`hydrate` tunes it).
    pub async fn add_export(
        &self,
        spec: &ExportSpec,
        hydrate: &HydrateOptions,
    ) -> Result<(), ServiceError> {
        let name = spec.name.as_str();
        if name.len() > nbd_proto::consts::MAX_STRING || name.contains('\0') {
            return Err(ServiceError::Config(format!(
                "export name '{name}' is not a valid NBD string"
            )));
        }
        let disk_name = if validate_name("disk", name).is_ok() {
            Some(name.to_string())
        } else if name.is_empty() {
            spec.path
                .file_name()
                .and_then(|f| f.to_str())
                .filter(|f| validate_name("disk", f).is_ok())
                .map(str::to_string)
        } else {
            None
        };
        if let Some(d) = &disk_name
            && lock(&self.disks).contains_key(d)
        {
            return Err(ServiceError::Config(format!(
                "two exports use the disk name '{d}'"
            )));
        }
        let built = stack::build(spec, disk_name.as_deref(), &self.disks_dir).await?;
        // A mirror the disk had when the daemon stopped goes on.
        let mirror = match (&built.disk, &disk_name) {
            (Some(disk), Some(d)) => match Mirror::saved(disk) {
                Some(dir) => Some(
                    Mirror::resume(disk.clone(), disk.device(), &dir)
                        .await
                        .map_err(|e| {
                            ServiceError::Config(format!(
                                "disk '{d}': cannot resume its mirror: {e}"
                            ))
                        })?,
                ),
                None => None,
            },
            _ => None,
        };
        let mut disks = lock(&self.disks);
        self.publish(name, &spec.description, built.dev)?;
        if let (Some(h), Some(d)) = (built.hydration, &disk_name) {
            let opts = HydrateOptions {
                rate: spec.source.as_ref().and_then(|s| s.rate),
                ..hydrate.clone()
            };
            let stop = self.stop.child_token();
            // Off the runtime that serves clients: their reads of present
            // blocks must not queue behind the pass.
            let background = ferry_jobs::background::handle().map_err(|e| {
                ServiceError::Config(format!("disk '{d}': cannot start its hydration: {e}"))
            })?;
            background.spawn(h.clone().run(opts, stop.clone()));
            lock(&self.hydrations).insert(d.clone(), HydrationSlot { hydration: h, stop });
        }
        let Some(d) = disk_name else {
            return Ok(());
        };
        let slot = match built.disk {
            Some(disk) => {
                if let Some(m) = mirror {
                    let copier = tokio::spawn(m.clone().run());
                    lock(&self.mirrors).insert(
                        d.clone(),
                        MirrorSlot {
                            mirror: m,
                            copier: Some(copier),
                        },
                    );
                }
                for s in disk.snapshots() {
                    let view = disk.snapshot_view(&s.name)?;
                    self.publish(
                        &snapshot_export(&d, &s.name),
                        &snapshot_desc(&d, &s.name),
                        view,
                    )?;
                }
                Slot::Live {
                    disk,
                    spec: spec.clone(),
                    export: name.to_string(),
                    ops: Arc::default(),
                }
            }
            None => Slot::ReadOnly {
                export: name.to_string(),
            },
        };
        disks.insert(d, slot);
        Ok(())
    }

    fn publish(
        &self,
        name: &str,
        description: &str,
        dev: Arc<dyn ferry_block::BlockDev>,
    ) -> Result<(), ServiceError> {
        self.registry
            .add(name, description, dev)
            .map_err(|e| ServiceError::Exists(e.to_string()))
    }

    /// Whether [`remove_export`](Self::remove_export) would take `name`
    /// away: a disk being mirrored keeps its export until the mirror is
    /// completed or cancelled.
    pub fn check_removal(&self, name: &str) -> Result<(), ServiceError> {
        let disks = lock(&self.disks);
        let Some((disk, _)) = disks.iter().find(|(_, s)| s.export() == name) else {
            return Ok(());
        };
        if lock(&self.mirrors)
            .get(disk)
            .is_some_and(|m| m.mirror.is_running())
        {
            return Err(ServiceError::Busy(format!(
                "export '{name}': disk '{disk}' is being mirrored; complete or cancel the mirror first"
            )));
        }
        Ok(())
    }

    /// Takes export `name` away with its snapshot exports: new clients
    /// cannot find them, and their connections answer what they have in
    /// flight and close. The disk's background hydration stops (its state
    /// is durable); the disk itself closes when its last connection has.
    pub fn remove_export(&self, name: &str) -> Result<(), ServiceError> {
        self.check_removal(name)?;
        let mut disks = lock(&self.disks);
        let disk = disks
            .iter()
            .find(|(_, s)| s.export() == name)
            .map(|(d, _)| d.clone());
        if self.registry.retire(name).is_none() {
            return Err(ServiceError::NotFound(format!("no export '{name}'")));
        }
        let Some(disk) = disk else {
            return Ok(());
        };
        let prefix = snapshot_export(&disk, "");
        for p in self.registry.list() {
            if p.name.starts_with(&prefix) {
                self.registry.retire(&p.name);
            }
        }
        if let Some(h) = lock(&self.hydrations).remove(&disk) {
            h.stop.cancel();
        }
        lock(&self.mirrors).remove(&disk);
        disks.remove(&disk);
        tracing::info!(export = name, disk, "export removed");
        Ok(())
    }

    /// The live disk `disk` and its operation lock.
    fn live(&self, disk: &str) -> Result<(Arc<Disk>, Arc<Mutex<()>>), ServiceError> {
        match lock(&self.disks).get(disk) {
            Some(Slot::Live { disk, ops, .. }) => Ok((disk.clone(), ops.clone())),
            Some(Slot::ReadOnly { .. }) => Err(ServiceError::ReadOnlyDisk(disk.to_string())),
            None => Err(ServiceError::NoSuchDisk(disk.to_string())),
        }
    }

    // ---- mirrors --------------------------------------------------------

    /// Starts a mirror of `disk` to `req.to`.
    pub async fn start_mirror(
        &self,
        disk: &str,
        req: &StartMirror,
    ) -> Result<MirrorStatus, ServiceError> {
        let (d, _) = self.live(disk)?;
        if lock(&self.mirrors)
            .get(disk)
            .is_some_and(|s| s.mirror.is_running())
        {
            return Err(ServiceError::Exists(format!(
                "disk '{disk}' is mirrored already"
            )));
        }
        let m = Mirror::start(
            d.clone(),
            d.device(),
            &req.to,
            req.mode,
            req.rate,
            Duration::from_millis(req.max_downtime_ms),
            req.auto_active,
        )
        .await
        .map_err(|e| {
            ServiceError::Config(format!("cannot mirror disk '{disk}' to {}: {e}", req.to))
        })?;
        let copier = tokio::spawn(m.clone().run());
        let status = m.status(disk);
        lock(&self.mirrors).insert(
            disk.to_string(),
            MirrorSlot {
                mirror: m,
                copier: Some(copier),
            },
        );
        Ok(status)
    }

    fn mirror(&self, disk: &str) -> Result<Arc<Mirror>, ServiceError> {
        self.live(disk)?;
        lock(&self.mirrors)
            .get(disk)
            .map(|s| s.mirror.clone())
            .ok_or_else(|| ServiceError::NotFound(format!("disk '{disk}' has no mirror")))
    }

    pub fn mirror_status(&self, disk: &str) -> Result<MirrorStatus, ServiceError> {
        Ok(self.mirror(disk)?.status(disk))
    }

    pub fn set_mirror(&self, disk: &str, req: &SetMirror) -> Result<MirrorStatus, ServiceError> {
        let m = self.mirror(disk)?;
        let failed = |e: ferry_jobs::MirrorError| ServiceError::Config(e.to_string());
        if let Some(mode) = req.mode {
            m.set_mode(mode).map_err(failed)?;
        }
        if req.rate.is_some() {
            m.set_rate(req.rate).map_err(failed)?;
        }
        Ok(m.status(disk))
    }

    /// Holds writes, sends what is left, flushes the destination, applies
    /// `req.after`, and reports the downtime.
    pub async fn complete_mirror(
        &self,
        disk: &str,
        req: &CompleteMirror,
    ) -> Result<MirrorCompleted, ServiceError> {
        let (d, _) = self.live(disk)?;
        let (m, copier) = {
            let mut mirrors = lock(&self.mirrors);
            let slot = mirrors
                .get_mut(disk)
                .filter(|s| s.mirror.is_running())
                .ok_or_else(|| {
                    ServiceError::NotFound(format!("disk '{disk}' has no running mirror"))
                })?;
            let copier = slot.copier.take().ok_or_else(|| {
                ServiceError::Busy(format!("the mirror of disk '{disk}' is completing already"))
            })?;
            (slot.mirror.clone(), copier)
        };
        if req.postcopy && req.after == AfterMirror::Keep {
            // Writes after the switch would be on the source alone.
            return Err(ServiceError::Config(
                "a post-copy switch seals the source: --after keep does not apply".into(),
            ));
        }
        let sealed = d.clone();
        let after = req.after;
        let seal = move || {
            if after != AfterMirror::Keep {
                sealed.close_writes();
            }
        };
        let done = m.complete(copier, req.postcopy, seal).await.map_err(|e| {
            ServiceError::Config(format!("cannot complete the mirror of '{disk}': {e}"))
        })?;
        match req.after {
            AfterMirror::ReadOnly | AfterMirror::Keep => {}
            AfterMirror::Stop => {
                let export = lock(&self.disks).get(disk).and_then(|s| match s {
                    Slot::Live { export, .. } => Some(export.clone()),
                    Slot::ReadOnly { .. } => None,
                });
                if let Some(e) = export {
                    self.registry.remove(&e);
                }
            }
        }
        m.release("completed");
        // The frozen source the destination fetches from: the sealed disk
        // as a snapshot, which outlives the live export (--after stop).
        let snapshot = if req.postcopy {
            let name = format!(
                "switch-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|t| t.as_millis())
                    .unwrap_or(0)
            );
            let req = CreateSnapshot {
                name,
                checkpoint: false,
            };
            let made = tokio::task::block_in_place(|| self.create_snapshot(disk, &req));
            Some(made?.export)
        } else {
            None
        };
        let status = m.status(disk);
        Ok(MirrorCompleted {
            disk: disk.to_string(),
            destination: status.destination,
            downtime_ms: done.downtime.as_millis() as u64,
            bytes_sent: done.bytes_sent,
            passes: done.passes,
            after: req.after,
            snapshot,
            absent: done.absent,
        })
    }

    /// The end of a hybrid migration, on the destination: `disk` (served
    /// here, the mirror's target) holds all of the disk at `req.source`
    /// but `req.absent`. Its export is rebuilt as a post-copy disk arriving
    /// from there, with only those ranges absent: clients see the
    /// source's content at once, and the rest is fetched.
    pub async fn arrive(
        &self,
        disk: &str,
        req: &ferry_api::Arrive,
        hydrate: &HydrateOptions,
    ) -> Result<ferry_api::Arriving, ServiceError> {
        let (d, ops) = self.live(disk)?;
        if lock(&self.hydrations).contains_key(disk) {
            return Err(ServiceError::Exists(format!(
                "disk '{disk}' is arriving already"
            )));
        }
        if lock(&self.mirrors)
            .get(disk)
            .is_some_and(|m| m.mirror.is_running())
        {
            return Err(ServiceError::Busy(format!("disk '{disk}' is mirrored")));
        }
        let spec = {
            let _op = lock(&ops);
            let mut disks = lock(&self.disks);
            let Some(Slot::Live { spec, export, .. }) = disks.remove(disk) else {
                return Err(ServiceError::NoSuchDisk(disk.to_string()));
            };
            self.registry.remove(&export);
            spec
        };
        let (size, gran) = (ferry_block::BlockDev::size(&*d), d.granularity());
        let dir = d.state_dir().join(stack::HYDRATE);
        drop(d);
        let absent_bytes = req.absent.iter().map(|r| r.1).sum();
        let seeded = tokio::task::block_in_place(|| {
            ferry_store::CopyOnRead::seed(&dir, size, gran, &req.absent)
        });
        let spec = ExportSpec {
            granularity: Some(gran),
            source: Some(stack::SourceSpec {
                uri: req.source.clone(),
                timeout: stack::DEFAULT_SOURCE_TIMEOUT,
                rate: None,
            }),
            ..spec
        };
        // The old stack goes once its last connection (the mirror's) has
        // ended: until then the disk's state directory is locked.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let added = loop {
            let tried = match &seeded {
                Ok(()) => self.add_export(&spec, hydrate).await,
                Err(e) => Err(ServiceError::Config(format!("disk '{disk}': {e}"))),
            };
            match tried {
                Err(ServiceError::Config(m))
                    if m.contains("in use") && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        };
        if let Err(e) = added {
            tracing::error!(disk, "cannot make the disk arrive: {e}");
            return Err(e);
        }
        tracing::info!(
            disk,
            source = req.source,
            absent_bytes,
            "switched to post-copy"
        );
        Ok(ferry_api::Arriving {
            disk: disk.to_string(),
            source: req.source.clone(),
            absent_bytes,
        })
    }

    /// Stops the mirror and forgets it; both sides stay as they are.
    pub fn cancel_mirror(&self, disk: &str) -> Result<MirrorCancelled, ServiceError> {
        let m = self.mirror(disk)?;
        if !m.is_running() {
            return Err(ServiceError::NotFound(format!(
                "disk '{disk}' has no running mirror"
            )));
        }
        m.release("cancelled");
        if let Some(slot) = lock(&self.mirrors).get_mut(disk)
            && let Some(c) = slot.copier.take()
        {
            c.abort();
        }
        Ok(MirrorCancelled {
            disk: disk.to_string(),
            cancelled: true,
        })
    }

    /// Where a disk that arrives from a source stands.
    pub fn hydration(&self, disk: &str) -> Result<HydrationStatus, ServiceError> {
        if let Some(h) = lock(&self.hydrations).get(disk) {
            return Ok(h.hydration.status(disk));
        }
        self.live(disk)?;
        Err(ServiceError::NotFound(format!(
            "disk '{disk}' is not arriving from a source"
        )))
    }

    pub fn exports(&self) -> ExportList {
        let disks = lock(&self.disks);
        let exports = self
            .registry
            .list()
            .into_iter()
            .map(|e| {
                let snapshot_of = e
                    .name
                    .split_once('@')
                    .filter(|(d, _)| disks.contains_key(*d))
                    .map(|(d, _)| d.to_string());
                let disk = disks.iter().find_map(|(d, slot)| match slot {
                    Slot::Live { export, .. } if *export == e.name => Some(d.clone()),
                    _ => None,
                });
                ExportEntry {
                    name: e.name.clone(),
                    size: e.dev.size(),
                    read_only: e.dev.caps().read_only,
                    description: e.description.clone(),
                    disk,
                    snapshot_of,
                }
            })
            .collect();
        ExportList {
            exports,
            listeners: self.listeners.get().cloned().unwrap_or_default(),
        }
    }

    pub fn create_snapshot(
        &self,
        disk: &str,
        req: &CreateSnapshot,
    ) -> Result<SnapshotCreated, ServiceError> {
        let (d, ops) = self.live(disk)?;
        let _op = lock(&ops);
        validate_name("snapshot", &req.name)?;
        let export = snapshot_export(disk, &req.name);
        if d.snapshots().iter().any(|s| s.name == req.name) {
            return Err(ServiceError::Exists(format!(
                "snapshot '{export}' already exists"
            )));
        }
        if self.registry.get(&export).is_some() {
            return Err(ServiceError::Exists(format!(
                "export '{export}' already exists"
            )));
        }
        let info = d.create_snapshot(&req.name, req.checkpoint)?;
        let published = d
            .snapshot_view(&req.name)
            .map_err(ServiceError::from)
            .and_then(|view| self.publish(&export, &snapshot_desc(disk, &req.name), view));
        if let Err(e) = published {
            // Cannot publish it: do not leave it half-created.
            let _ = d.delete_snapshot(&req.name);
            if req.checkpoint {
                let _ = d.delete_checkpoint(&req.name);
            }
            return Err(e);
        }
        Ok(SnapshotCreated {
            disk: disk.to_string(),
            snapshot: info,
            export,
        })
    }

    pub fn snapshots(&self, disk: &str) -> Result<SnapshotList, ServiceError> {
        let (d, _) = self.live(disk)?;
        let snapshots = d
            .snapshots()
            .into_iter()
            .map(|info| SnapshotEntry {
                export: snapshot_export(disk, &info.name),
                info,
            })
            .collect();
        Ok(SnapshotList {
            disk: disk.to_string(),
            backend: d.snapshot_backend(),
            snapshots,
        })
    }

    /// Refuses while an NBD client has the snapshot export open: pulling a
    /// snapshot away under a running backup would turn its reads into
    /// errors. Clients that come after the export is gone cannot find it.
    pub fn delete_snapshot(&self, disk: &str, name: &str) -> Result<SnapshotDeleted, ServiceError> {
        let (d, ops) = self.live(disk)?;
        let _op = lock(&ops);
        validate_name("snapshot", name)?;
        let export = snapshot_export(disk, name);
        let removed = match self.registry.remove_idle(&export) {
            Ok(p) => Some(p),
            Err(RegistryError::Busy { .. }) => {
                return Err(ServiceError::Busy(format!(
                    "snapshot '{export}' is busy: NBD clients have it open; disconnect them and retry"
                )));
            }
            Err(_) => None,
        };
        match d.delete_snapshot(name) {
            Ok(deleted) => Ok(SnapshotDeleted {
                disk: disk.to_string(),
                deleted,
            }),
            Err(err) => {
                if let Some(p) = removed
                    && let Err(e) = self.publish(&p.name, &p.description, p.dev.clone())
                {
                    tracing::warn!("cannot publish {} again: {e}", p.name);
                }
                Err(err.into())
            }
        }
    }

    pub fn revert(&self, disk: &str, name: &str) -> Result<Reverted, ServiceError> {
        let (d, ops) = self.live(disk)?;
        let _op = lock(&ops);
        validate_name("snapshot", name)?;
        Ok(Reverted {
            disk: disk.to_string(),
            reverted: d.revert(name)?,
        })
    }

    pub fn create_checkpoint(
        &self,
        disk: &str,
        req: &CreateCheckpoint,
    ) -> Result<CheckpointCreated, ServiceError> {
        let (d, ops) = self.live(disk)?;
        let _op = lock(&ops);
        Ok(CheckpointCreated {
            disk: disk.to_string(),
            checkpoint: d.create_checkpoint(&req.name)?,
        })
    }

    pub fn checkpoints(&self, disk: &str) -> Result<CheckpointList, ServiceError> {
        let (d, _) = self.live(disk)?;
        Ok(CheckpointList {
            disk: disk.to_string(),
            checkpoints: d.checkpoints(),
        })
    }

    pub fn delete_checkpoint(
        &self,
        disk: &str,
        name: &str,
    ) -> Result<CheckpointDeleted, ServiceError> {
        let (d, ops) = self.live(disk)?;
        let _op = lock(&ops);
        validate_name("checkpoint", name)?;
        d.delete_checkpoint(name)?;
        Ok(CheckpointDeleted {
            disk: disk.to_string(),
            deleted: name.to_string(),
        })
    }
}
