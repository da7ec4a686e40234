//! `nbdferry demo`: the whole round trip on a generated disk, with nothing
//! to set up: write a sparse sample disk, serve it on a loopback port, map
//! it and copy it back over NBD with nbdferry's own client, and check that
//! every byte came back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use ferry_jobs::{CopyOptions, Progress};
use ferry_store::FileDev;
use nbd_client::{Client, ConnectOptions, NbdUri};
use nbd_proto::consts::{BASE_ALLOCATION, state};
use nbd_proto::server_handshake::HandshakeConfig;
use nbd_server::{Limits, Listener, Registry, Server};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 256 << 20;
const RUN: usize = 1 << 20;
const RUNS: u64 = 16;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep the sample disk and the copy in this directory instead of a
    /// temporary one.
    #[arg(long, value_name = "DIR")]
    keep_in: Option<PathBuf>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.keep_in {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let sample = dir.join("sample.raw");
    let copy = dir.join("copy.raw");
    let _ = std::fs::remove_file(&copy);
    write_sample(&sample)?;
    println!(
        "sample disk  {} ({} MiB, {} runs of 1 MiB data, the rest holes)",
        sample.display(),
        SIZE >> 20,
        RUNS
    );

    let registry = Arc::new(Registry::new(Limits::default().max_payload));
    let dev = FileDev::open(&sample, true)
        .with_context(|| format!("cannot open {}", sample.display()))?;
    registry.add("sample", "nbdferry demo disk", Arc::new(dev))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on loopback")?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = Server::new(
        registry,
        Limits::default(),
        HandshakeConfig::default(),
        None,
    )
    .map_err(anyhow::Error::msg)?;
    let serving = tokio::spawn(server.run(vec![Listener::Tcp(listener)], shutdown.clone()));
    let uri = format!("nbd://{addr}/sample");
    println!("serving      {uri}");

    let result = round_trip(&uri, &sample, &copy).await;
    shutdown.cancel();
    serving.await.context("server task failed")?;
    result
}

async fn round_trip(uri: &str, sample: &Path, copy: &Path) -> anyhow::Result<()> {
    let parsed = NbdUri::parse(uri)?;
    let opts = ConnectOptions {
        meta_contexts: vec![BASE_ALLOCATION.to_string()],
        ..ConnectOptions::default()
    };
    let client = Client::connect(&parsed, &opts).await?;
    let extents = client.block_status(0, client.size()).await?;
    let (mut data, mut holes, mut count) = (0u64, 0u64, 0usize);
    for e in extents.iter().flat_map(|c| c.extents.iter()) {
        count += 1;
        if e.flags & u64::from(state::HOLE) != 0 {
            holes += e.length;
        } else {
            data += e.length;
        }
    }
    client.disconnect().await?;
    println!(
        "map          {count} extents: {} MiB data, {} MiB holes (base:allocation)",
        data >> 20,
        holes >> 20
    );

    let started = Instant::now();
    let stats = ferry_jobs::copy(
        uri,
        &copy.to_string_lossy(),
        &CopyOptions::default(),
        Arc::new(Progress::new()),
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "copied back  {} in {:.3} s: {} MiB read as data, {} MiB of holes skipped",
        copy.display(),
        secs,
        stats.data >> 20,
        (stats.zeroed + stats.skipped) >> 20
    );
    let (a, b) = (digest(sample)?, digest(copy)?);
    if a != b {
        bail!("the copy differs from the sample disk ({a:016x} vs {b:016x})");
    }
    println!("verified     contents identical (xxh3 {a:016x})");
    Ok(())
}

/// A deterministic sparse disk: RUNS runs of pseudo-random data at spread
/// offsets, holes elsewhere.
fn write_sample(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(SIZE)?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; RUN];
    for i in 0..RUNS {
        for chunk in buf.chunks_mut(8) {
            // xorshift64: cheap, reproducible, incompressible enough.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        let slot = SIZE / RUNS;
        f.write_all_at(&buf, i * slot + (seed % (slot - RUN as u64)) / 4096 * 4096)?;
    }
    f.sync_all()?;
    Ok(())
}

fn digest(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.digest());
        }
        h.update(&buf[..n]);
    }
}

/// A private temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let base = std::env::temp_dir().join(format!("nbdferry-demo-{}", std::process::id()));
        std::fs::create_dir_all(&base)
            .with_context(|| format!("cannot create {}", base.display()))?;
        Ok(TempDir(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
