use serde::{Deserialize, Serialize};

/// Every error answer: one line, with a 4xx/5xx status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/disks/{disk}/snapshots`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub name: String,
    /// Also start a checkpoint of the same name, at the same instant.
    #[serde(default)]
    pub checkpoint: bool,
}

/// `POST /v1/disks/{disk}/checkpoints`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpoint {
    pub name: String,
}

/// How a disk keeps its snapshots' content.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotBackend {
    /// Old blocks are copied into the disk's preserved-block store before
    /// their first overwrite (works on any file system or device).
    #[default]
    PreservedBlocks,
    /// A snapshot is a reflink clone of the image, next to it; the file
    /// system shares the blocks and copies on write.
    Reflink,
}

impl SnapshotBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotBackend::PreservedBlocks => "preserved-blocks",
            SnapshotBackend::Reflink => "reflink",
        }
    }
}

/// A snapshot of a disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Blocks changed since the snapshot, whose old content it holds: in
    /// the preserved-block store (shared ones count for every snapshot
    /// that uses them), or, for a reflink snapshot, in its clone (those
    /// the image no longer shares with it, as far as the kernel has
    /// written the image back: a listing forces no writeback).
    pub preserved_blocks: u64,
    /// Where its content lives (absent in answers of older daemons).
    #[serde(default)]
    pub backend: SnapshotBackend,
    /// Checkpoints older than the snapshot: the snapshot export offers
    /// `qemu:dirty-bitmap:NAME` for each.
    pub checkpoints: Vec<String>,
}

/// A snapshot in a listing, with the export that serves it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotEntry {
    #[serde(flatten)]
    pub info: SnapshotInfo,
    /// `DISK@NAME`
    pub export: String,
}

/// `GET /v1/disks/{disk}/snapshots`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotList {
    pub disk: String,
    /// The backend new snapshots of this disk get, chosen when the disk
    /// was opened (absent in answers of older daemons).
    #[serde(default)]
    pub backend: SnapshotBackend,
    pub snapshots: Vec<SnapshotEntry>,
}

/// `POST /v1/disks/{disk}/snapshots` (201)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotCreated {
    pub disk: String,
    pub snapshot: SnapshotInfo,
    pub export: String,
}

/// What deleting a snapshot freed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeleteInfo {
    pub name: String,
    /// Preserved blocks no other snapshot needed, punched out of the store
    /// (reflink: blocks of the clone nothing else shared, freed with it).
    pub freed_blocks: u64,
    pub freed_bytes: u64,
}

/// `DELETE /v1/disks/{disk}/snapshots/{name}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDeleted {
    pub disk: String,
    pub deleted: DeleteInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevertInfo {
    pub name: String,
    /// Blocks copied back (those changed since the snapshot).
    pub blocks: u64,
}

/// `POST /v1/disks/{disk}/snapshots/{name}/revert`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reverted {
    pub disk: String,
    pub reverted: RevertInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub name: String,
    pub created: u64,
    /// Blocks written since the checkpoint, up to now.
    pub dirty_blocks: u64,
    pub granularity: u64,
}

/// `GET /v1/disks/{disk}/checkpoints`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointList {
    pub disk: String,
    pub checkpoints: Vec<CheckpointInfo>,
}

/// `POST /v1/disks/{disk}/checkpoints` (201)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointCreated {
    pub disk: String,
    pub checkpoint: CheckpointInfo,
}

/// `DELETE /v1/disks/{disk}/checkpoints/{name}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointDeleted {
    pub disk: String,
    /// The checkpoint's name.
    pub deleted: String,
}

/// One export the daemon serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
    /// The disk (snapshots and checkpoints) a live export serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The disk a snapshot export belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
}

/// `GET /v1/exports`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportList {
    pub exports: Vec<ExportEntry>,
    /// Where NBD clients reach them: the daemon's listeners as its
    /// `listening on` line gives them (`127.0.0.1:10809`,
    /// `unix:/run/nbdferry.sock`), so that a daemon on an ephemeral port
    /// can be found without reading its log. Empty until they are up.
    #[serde(default)]
    pub listeners: Vec<String>,
}

/// `GET /v1/health`: the daemon answers, so it is alive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub alive: bool,
}

/// `GET /v1/ready` (200): every listener is up and every disk's state is
/// loaded. A daemon that is starting or shutting down answers 503 with an
/// [`ErrorBody`] that says which.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub ready: bool,
}

/// `POST /v1/reload`: what a reload of the configuration changed. A
/// refused reload answers an [`ErrorBody`] (422) and changed nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reloaded {
    /// The configuration file read, if the daemon has one.
    pub config: Option<String>,
    /// Exports published by this reload.
    pub added: Vec<String>,
    /// Exports retired: their clients finished what was in flight.
    pub removed: Vec<String>,
    /// Exports whose access (tls, allow-clients) or default-ness changed.
    pub changed: Vec<String>,
    /// Whether the TLS certificates were read again.
    pub certificates: bool,
    /// Settings that differ from the running ones but only take effect
    /// at the next start (listeners, limits, TLS mode, admin grants).
    pub restart_needed: Vec<String>,
}

/// `GET /v1/disks/{disk}/hydration`: a post-copy disk still arriving (or
/// arrived) from its source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HydrationStatus {
    pub disk: String,
    pub source_uri: String,
    /// Bytes of the disk that are here (fetched, written, or known zero).
    pub present_bytes: u64,
    pub total_bytes: u64,
    /// Bytes per second fetched lately.
    pub rate: u64,
    /// Seconds left at that rate (None while unknown).
    pub eta_seconds: Option<u64>,
    /// Bytes fetched from the source, in all and because clients read them.
    pub fetched_bytes: u64,
    pub fetched_on_demand_bytes: u64,
    /// connected, reconnecting, or detached (complete: source let go).
    pub source: String,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Every block is durably present and the source is let go.
    pub complete: bool,
    /// When this daemon started its pass, and when it saw every block
    /// durably present and let the source go: seconds since the Unix epoch
    /// (null until then, and in answers of older daemons).
    #[serde(default)]
    pub started_at: Option<f64>,
    #[serde(default)]
    pub completed_at: Option<f64>,
}

/// How a mirror treats client writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorMode {
    /// Writes are tracked and sent later by the copier.
    Background,
    /// Writes are also written to the destination before they are
    /// acknowledged: the mirror converges under any write rate.
    Active,
}

/// `POST /v1/disks/{disk}/mirror`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StartMirror {
    /// Any writable NBD export (nbds:// included).
    pub to: String,
    #[serde(default = "background")]
    pub mode: MirrorMode,
    /// Bytes per second for the copier (None: unpaced).
    #[serde(default)]
    pub rate: Option<u64>,
    /// Ready when what is left can be sent within this at the link rate.
    #[serde(default = "default_max_downtime")]
    pub max_downtime_ms: u64,
    /// Go active by itself when passes stop shrinking.
    #[serde(default)]
    pub auto_active: bool,
}

fn background() -> MirrorMode {
    MirrorMode::Background
}

fn default_max_downtime() -> u64 {
    100
}

/// `POST /v1/disks/{disk}/mirror/set`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetMirror {
    #[serde(default)]
    pub mode: Option<MirrorMode>,
    #[serde(default)]
    pub rate: Option<u64>,
}

/// What the source export does once a mirror completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterMirror {
    /// The export refuses further writes (EPERM: NBD has no EROFS).
    ReadOnly,
    /// The export is removed.
    Stop,
    /// Nothing changes.
    Keep,
}

/// `POST /v1/disks/{disk}/mirror/complete`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CompleteMirror {
    #[serde(default = "read_only")]
    pub after: AfterMirror,
    /// Switch now: seal the source, snapshot it, and leave the blocks
    /// still pending for the destination to fetch (hybrid migration).
    #[serde(default)]
    pub postcopy: bool,
}

fn read_only() -> AfterMirror {
    AfterMirror::ReadOnly
}

/// `GET /v1/disks/{disk}/mirror`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorStatus {
    pub disk: String,
    pub destination: String,
    pub mode: MirrorMode,
    /// bulk, passes, completing, completed, cancelled, failed.
    pub phase: String,
    pub pass: u64,
    pub bytes_sent: u64,
    /// Bytes not on the destination yet.
    pub dirty_bytes: u64,
    /// Bytes per second clients write to the disk, and the copier sends.
    pub write_rate: u64,
    pub link_rate: u64,
    pub eta_seconds: Option<u64>,
    /// What is left can be sent within the downtime allowed.
    pub ready: bool,
    pub destination_connected: bool,
    pub last_error: Option<String>,
}

/// The answer to `complete`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorCompleted {
    pub disk: String,
    pub destination: String,
    /// How long client writes were held.
    pub downtime_ms: u64,
    pub bytes_sent: u64,
    pub passes: u64,
    pub after: AfterMirror,
    /// With `postcopy`: the snapshot export the destination fetches from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// With `postcopy`: byte ranges `[offset, length]` the destination
    /// does not hold current yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<(u64, u64)>,
}

/// `POST /v1/disks/{disk}/arrive`: a disk this daemon serves (a mirror's
/// destination) holds all but `absent` of the disk at `source`; it
/// becomes a post-copy disk that fetches the rest from there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Arrive {
    pub source: String,
    #[serde(default)]
    pub absent: Vec<(u64, u64)>,
}

/// The answer to `arrive`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Arriving {
    pub disk: String,
    pub source: String,
    pub absent_bytes: u64,
}

/// `DELETE /v1/disks/{disk}/mirror`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorCancelled {
    pub disk: String,
    pub cancelled: bool,
}
