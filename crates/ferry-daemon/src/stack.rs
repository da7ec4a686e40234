//! How an export's block stack is assembled from its configuration: the
//! one place that decides which layers a device gets.
//!
//! ```text
//! read-only export:   file or block device
//! writable disk:      file or block device → dirty tracking → snapshot origin → write fence
//!                     (snapshots: reflink clones of the file where its file system has them)
//! disk still arriving: file → copy-on-read (source) → dirty tracking → snapshot origin → write fence
//! ```
//! (`ferry_store::Disk` stacks the layers above the device.) A writable
//! export whose name cannot be a disk name is served as the plain device.
//! A disk with a source keeps what it knows of it in `hydrate/` in its
//! state directory: the present map and `source.json` (the source's
//! identity, recorded at the first connection). Once every block has
//! arrived it is a plain disk again and needs no source.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_block::BlockDev;
use ferry_jobs::{Hydration, Remote, RemoteIdentity, SourceDev};
use ferry_store::{CopyOnRead, DEFAULT_GRANULARITY, Disk, FileDev, Reflinks};
use serde::{Deserialize, Serialize};

use crate::error::ServiceError;

/// Where a disk still arriving comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// Any NBD URI the client takes (nbds:// with tls-certificates= too).
    pub uri: String,
    /// How long a read of an absent block waits for the source.
    pub timeout: Duration,
    /// Bytes per second for the background pass (None: unpaced).
    pub rate: Option<u64>,
}

/// `hydrate/source.json`.
#[derive(Debug, Serialize, Deserialize)]
struct SourceRecord {
    uri: String,
    identity: RemoteIdentity,
    granularity: u64,
}

pub(crate) const HYDRATE: &str = "hydrate";
/// How long a read of an absent block waits for the source, unless told.
pub const DEFAULT_SOURCE_TIMEOUT: Duration = Duration::from_secs(60);
const SOURCE_RECORD: &str = "source.json";

/// One export as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Dirty-tracking and copy-on-write block size for a disk without
    /// state (a disk with state keeps its own).
    pub granularity: Option<u64>,
    /// Post-copy: the disk is still arriving from here.
    pub source: Option<SourceSpec>,
}

/// What an export serves, the live disk behind it, if any, and its
/// hydration while it is still arriving.
pub(crate) struct Stack {
    pub dev: Arc<dyn BlockDev>,
    pub disk: Option<Arc<Disk>>,
    pub hydration: Option<Arc<Hydration>>,
}

pub(crate) async fn build(
    spec: &ExportSpec,
    disk_name: Option<&str>,
    disks_dir: &Path,
) -> Result<Stack, ServiceError> {
    let cannot_open = |e: &dyn std::fmt::Display| {
        ServiceError::Config(format!("cannot open {}: {e}", spec.path.display()))
    };
    let mut asked = spec.granularity.unwrap_or(DEFAULT_GRANULARITY);
    // A disk that was still arriving keeps arriving from where it did,
    // even if the configuration no longer says so (a hybrid migration's
    // destination switched over the admin API, say): served plain, its
    // absent blocks would read as whatever the file holds.
    let recorded = match (&spec.source, disk_name) {
        (None, Some(name)) if !spec.read_only => {
            recorded_source(&disks_dir.join(name).join(HYDRATE)).map_err(|e| cannot_open(&e))?
        }
        _ => None,
    };
    // Snapshots may be clones of the image only where the device below
    // reads the image itself; a disk still arriving is more than that.
    let (below, hydration, reflinks): (Arc<dyn BlockDev>, _, _) =
        match spec.source.as_ref().or(recorded.as_ref()) {
            Some(src) => {
                let name = disk_name.filter(|_| !spec.read_only).ok_or_else(|| {
                    ServiceError::Config(format!(
                        "export '{}' has a source: it must be writable and have a disk name",
                        spec.name
                    ))
                })?;
                let (dev, hydration, gran) =
                    arriving(spec, src, &disks_dir.join(name).join(HYDRATE), asked).await?;
                // The blocks it arrives in are the disk's.
                asked = gran;
                (dev, hydration, Reflinks::Never)
            }
            None => {
                let file =
                    FileDev::open(&spec.path, spec.read_only).map_err(|e| cannot_open(&e))?;
                (Arc::new(file), None, Reflinks::IfSupported)
            }
        };
    let Some(name) = disk_name.filter(|_| !spec.read_only) else {
        if !spec.read_only {
            tracing::info!(
                export = spec.name,
                "no valid disk name: served without snapshots"
            );
        }
        return Ok(Stack {
            dev: below,
            disk: None,
            hydration: None,
        });
    };
    let disk = Disk::open(name, below, &spec.path, disks_dir, asked, reflinks)
        .map_err(|e| cannot_open(&e))?;
    if hydration.is_some() && disk.granularity() != asked {
        return Err(ServiceError::Config(format!(
            "disk '{name}' has state with {}-byte blocks, not the {asked} its source is fetched in",
            disk.granularity()
        )));
    }
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
        hydration,
    })
}

/// Where a disk with no source configured still arrives from, if it does:
/// its recorded source while blocks are absent. A present map without a
/// record (a switch cut short) is refused: which source is unknown.
fn recorded_source(dir: &Path) -> Result<Option<SourceSpec>, String> {
    let present = dir.join(ferry_store::PRESENT_MAP);
    let record = match std::fs::read(dir.join(SOURCE_RECORD)) {
        Ok(b) => serde_json::from_slice::<SourceRecord>(&b)
            .map_err(|e| format!("damaged {}: {e}", dir.join(SOURCE_RECORD).display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if present.exists() {
                return Err(format!(
                    "{} says the disk is arriving, but from where is not recorded: \
                     give its source (--source)",
                    present.display()
                ));
            }
            return Ok(None);
        }
        Err(e) => return Err(e.to_string()),
    };
    if CopyOnRead::arrived(dir, record.identity.size, record.granularity)
        .map_err(|e| e.to_string())?
    {
        return Ok(None);
    }
    tracing::info!(
        source = record.uri,
        "the disk is still arriving: from its recorded source"
    );
    Ok(Some(SourceSpec {
        uri: record.uri,
        timeout: DEFAULT_SOURCE_TIMEOUT,
        rate: None,
    }))
}

/// The device below a disk with a source: the copy-on-read layer over the
/// local file while blocks are still absent (one handshake with the
/// source; nothing proportional to the disk), or the file alone once
/// they have all arrived.
type Arriving = (Arc<dyn BlockDev>, Option<Arc<Hydration>>, u64);

/// (device, hydration, the block size it arrives in).
async fn arriving(
    spec: &ExportSpec,
    src: &SourceSpec,
    dir: &Path,
    gran: u64,
) -> Result<Arriving, ServiceError> {
    let fail = |e: &dyn std::fmt::Display| {
        ServiceError::Config(format!("disk '{}' with source {}: {e}", spec.name, src.uri))
    };
    let record_path = dir.join(SOURCE_RECORD);
    let record: Option<SourceRecord> = match std::fs::read(&record_path) {
        Ok(b) => Some(
            serde_json::from_slice(&b)
                .map_err(|e| fail(&format!("damaged {}: {e}", record_path.display())))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(fail(&e)),
    };
    if let Some(r) = &record
        && CopyOnRead::arrived(dir, r.identity.size, r.granularity).map_err(|e| fail(&e))?
    {
        tracing::info!(
            export = spec.name,
            "every block has arrived: the source is not needed"
        );
        let file = FileDev::open(&spec.path, false).map_err(|e| fail(&e))?;
        return Ok((Arc::new(file), None, r.granularity));
    }
    let gran = record.as_ref().map_or(gran, |r| r.granularity);
    let uri = nbd_client::NbdUri::parse(&src.uri).map_err(|e| fail(&e))?;
    // The pass's 32 requests in flight spread over 4 connections, as
    // `copy` spreads them: on loopback, 1 x 32 took a median of 0.358 s
    // for 512 MiB onto tmpfs, 2 x 16 0.332 s, 4 x 8 0.323 s (8 alternated
    // rounds). Room for all 32 on each: a source without multi-conn gets
    // one connection, and a fetch queued behind a full one would hold its
    // blocks' claim, keeping their readers waiting. (Clients' reads get a
    // connection of their own with as many.)
    let opts = nbd_client::ConnectOptions {
        connections: 4,
        requests: 32,
        ..nbd_client::ConnectOptions::default()
    };
    // The pass's connections live on the background runtime, as the pass.
    let background = ferry_jobs::background::handle().map_err(|e| fail(&e))?;
    let source = Remote::connect(uri, opts, src.timeout, record.map(|r| r.identity))
        .await
        .map_err(|e| fail(&e))?
        .with_bulk_runtime(background);
    let source = Arc::new(source);
    source.open_bulk_ahead();
    let size = source.identity().size;
    if !spec.path.exists() {
        let f = std::fs::File::create(&spec.path).map_err(|e| fail(&e))?;
        f.set_len(size).map_err(|e| fail(&e))?;
        f.sync_all().map_err(|e| fail(&e))?;
    }
    let file = FileDev::open(&spec.path, false).map_err(|e| fail(&e))?;
    if file.size() != size {
        return Err(fail(&format!(
            "{} has {} bytes, the source {size}",
            spec.path.display(),
            file.size()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    if !record_path.exists() {
        let rec = SourceRecord {
            uri: src.uri.clone(),
            identity: source.identity().clone(),
            granularity: gran,
        };
        let text = serde_json::to_vec_pretty(&rec).map_err(|e| fail(&e))?;
        ferry_store::write_atomic(dir, SOURCE_RECORD, &text).map_err(|e| fail(&e))?;
    }
    let dev = Arc::new(SourceDev::new(
        source.clone(),
        tokio::runtime::Handle::current(),
    ));
    let reads = dev.async_reads();
    let cor = CopyOnRead::open(Arc::new(file), dev, gran, dir)
        .map_err(|e| fail(&e))?
        .with_wait_limit(src.timeout)
        .with_async_reads(reads);
    let progress = cor.progress();
    tracing::info!(
        export = spec.name,
        present = progress.present_bytes,
        total = progress.total_bytes,
        "serving a disk that is still arriving"
    );
    Ok((
        cor.clone(),
        Some(Hydration::new(cor, source, src.uri.clone())),
        gran,
    ))
}
