//! How an export's block stack is assembled from its configuration: the
//! one place that decides which layers a device gets.
//!
//! ```text
//! read-only export:   file or block device
//! writable disk:      file or block device → dirty tracking → snapshot origin → write fence
//! ```
//! (`ferry_store::Disk` stacks the layers above the device.) A writable
//! export whose name cannot be a disk name is served as the plain device.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_block::BlockDev;
use ferry_store::{DEFAULT_GRANULARITY, Disk, FileDev};

use crate::error::ServiceError;

/// One export as configured.
#[derive(Debug, Clone, Default)]
pub struct ExportSpec {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Dirty-tracking and copy-on-write block size for a disk without
    /// state (a disk with state keeps its own).
    pub granularity: Option<u64>,
}

/// What an export serves, and the live disk behind it, if any.
pub(crate) struct Stack {
    pub dev: Arc<dyn BlockDev>,
    pub disk: Option<Arc<Disk>>,
}

pub(crate) fn build(
    spec: &ExportSpec,
    disk_name: Option<&str>,
    disks_dir: &Path,
) -> Result<Stack, ServiceError> {
    let cannot_open = |e: &dyn std::fmt::Display| {
        ServiceError::Config(format!("cannot open {}: {e}", spec.path.display()))
    };
    let file = Arc::new(FileDev::open(&spec.path, spec.read_only).map_err(|e| cannot_open(&e))?);
    let Some(name) = disk_name.filter(|_| !spec.read_only) else {
        if !spec.read_only {
            tracing::info!(
                export = spec.name,
                "no valid disk name: served without snapshots"
            );
        }
        return Ok(Stack {
            dev: file,
            disk: None,
        });
    };
    let asked = spec.granularity.unwrap_or(DEFAULT_GRANULARITY);
    let disk = Disk::open(name, file, &spec.path, disks_dir, asked).map_err(|e| cannot_open(&e))?;
    if spec.granularity.is_some_and(|g| g != disk.granularity()) {
        tracing::warn!(
            disk = name,
            "keeps the granularity of its existing state, {} bytes, not the {asked} asked for \
             (delete its snapshots and checkpoints to change it)",
            disk.granularity()
        );
    }
    Ok(Stack {
        dev: disk.device(),
        disk: Some(disk),
    })
}
