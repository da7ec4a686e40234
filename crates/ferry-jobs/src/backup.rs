//! Backup jobs over the copy engine: pull a point from an NBD export into
//! a repository, restore a point to any destination, compare a point with
//! a live export. Each is a copy between a repository end and an ordinary
//! endpoint; only the ends differ.

use std::sync::Arc;

use ferry_repo::{BackupSpec, PointMeta, PointReader, PointWriter, Repo};

use crate::copy::{
    CopyOptions, CopyStats, Dest, OpenDest, Source, ZeroMap, connect_options, nbd_zero_map,
    open_dest, open_source, run,
};
use crate::endpoint::{EndpointSpec, connect};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullStats {
    pub point: PointMeta,
    pub copy: CopyStats,
    /// Only dirty ranges were read (a usable parent point existed).
    pub incremental: bool,
    /// Bytes a killed earlier run had already stored.
    pub resumed: u64,
}

/// Backs up `src` (an NBD URI, or a file or device) as a new point of
/// `disk`. With `bitmap` (a dirty-bitmap context the export offers), only
/// its dirty ranges are read and the rest is kept from the disk's newest
/// point; without a usable one the point is full. The first point reads
/// only allocated data; dirty ranges that now read as zeroes are recorded,
/// not read. A killed run is resumed by running the same pull again.
pub async fn pull(
    repo: &Repo,
    src: &str,
    disk: &str,
    bitmap: Option<&str>,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<PullStats> {
    let spec = EndpointSpec::parse(src)?;
    let contexts: Vec<&str> = bitmap.into_iter().collect();
    let mut source = open_source(spec, opts, &contexts).await?;
    if let Some(b) = bitmap {
        match &source {
            Source::Nbd { client, uri, .. } if !client.info().has_context(b) => {
                return Err(Error::Invalid(format!("{uri} does not offer {b}")));
            }
            Source::Nbd { .. } => {}
            _ => return Err(Error::Invalid("--bitmap needs an NBD source".into())),
        }
    }
    let size = source
        .size()?
        .ok_or_else(|| Error::Invalid("a backup cannot read a stream".into()))?;
    let writer = PointWriter::begin(
        repo,
        BackupSpec {
            disk: disk.to_string(),
            source: src.to_string(),
            bitmap: bitmap.map(str::to_string),
            size,
        },
    )
    .await?;
    if writer.incremental()
        && let Source::Nbd { dirty, .. } = &mut source
    {
        *dirty = bitmap.map(str::to_string);
    }
    tracing::info!(
        disk,
        point = writer.point(),
        parent = writer.parent(),
        resumed = writer.resumed_bytes(),
        "backing up {src}"
    );
    let copy = run(
        source,
        OpenDest::new(Dest::Repo(writer.clone()), ZeroMap::default()),
        opts,
        progress,
    )
    .await?;
    let point = writer.commit(copy.read).await?;
    Ok(PullStats {
        point,
        copy,
        incremental: writer.incremental(),
        resumed: writer.resumed_bytes(),
    })
}

/// Writes `DISK[@POINT]` (the newest by default) to `dst`: a file, a block
/// device or an NBD URI. Thin: zero slots are skipped where the destination
/// reads zeroes, written as zeroes (holes) elsewhere.
pub async fn restore(
    repo: &Repo,
    disk: &str,
    point: Option<&str>,
    dst: &str,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<(PointMeta, CopyStats)> {
    let reader = Arc::new(PointReader::open(repo, disk, point).await?);
    let meta = reader.meta().clone();
    let dst = open_dest(EndpointSpec::parse(dst)?, Some(reader.size()), opts).await?;
    let stats = run(Source::Repo(reader), dst, opts, progress).await?;
    Ok((meta, stats))
}

/// Compares `DISK[@POINT]` with the export at `uri` (an independent
/// snapshot of the same disk) block by block; fails at the first
/// difference ([`Error::Differs`]). Ranges both sides report as zeroes are
/// not read.
pub async fn verify_against(
    repo: &Repo,
    disk: &str,
    point: Option<&str>,
    uri: &str,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<(PointMeta, CopyStats)> {
    let reader = Arc::new(PointReader::open(repo, disk, point).await?);
    let meta = reader.meta().clone();
    let EndpointSpec::Nbd(uri) = EndpointSpec::parse(uri)? else {
        return Err(Error::Invalid(format!("{uri} is not an NBD URI")));
    };
    let client = connect(&uri, &connect_options(opts, &[])).await?;
    if client.size() != reader.size() {
        return Err(Error::Invalid(format!(
            "{uri} has {} bytes, the backup {}",
            client.size(),
            reader.size()
        )));
    }
    let zero = if client
        .info()
        .has_context(nbd_proto::consts::BASE_ALLOCATION)
    {
        nbd_zero_map(&client, &uri, reader.size()).await?
    } else {
        ZeroMap::default()
    };
    let stats = run(
        Source::Repo(reader),
        OpenDest::new(Dest::Compare { client, uri }, zero),
        opts,
        progress,
    )
    .await?;
    Ok((meta, stats))
}
