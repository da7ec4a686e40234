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

/// A snapshot of a disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Blocks of this snapshot held in the preserved-block store (shared
    /// ones count for every snapshot that uses them).
    pub preserved_blocks: u64,
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
    /// Preserved blocks no other snapshot needed, punched out of the store.
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
