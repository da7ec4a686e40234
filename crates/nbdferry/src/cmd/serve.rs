//! `nbdferry serve`: export files and block devices over NBD.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use ferry_store::FileDev;
use nbd_proto::server_handshake::HandshakeConfig;
use nbd_server::{Export, Limits, Listener, Registry, Server};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TCP address to listen on (repeatable); default 127.0.0.1:10809 when
    /// no --socket is given either.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<String>,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Export name; the export is also the default (empty name).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Description shown in export lists.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Serve the exports described in a TOML file instead of FILE.
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = ["file", "name", "read_only", "description"])]
    config: Option<PathBuf>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = Limits::default().max_inflight)]
    max_inflight: usize,
    /// Simultaneous client connections.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// File or block device to export.
    #[arg(required_unless_present = "config")]
    file: Option<PathBuf>,
}

/// The `--config` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    #[serde(default)]
    listen: Vec<String>,
    socket: Option<PathBuf>,
    #[serde(default, rename = "export")]
    exports: Vec<ExportConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExportConfig {
    name: String,
    path: PathBuf,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    description: String,
    /// Makes this export the one the empty name reaches.
    #[serde(default)]
    default: bool,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let limits = Limits {
        max_inflight: args.max_inflight.max(1),
        max_connections: args.max_connections.max(1),
        ..Limits::default()
    };
    let registry = Arc::new(Registry::new(limits.max_payload));
    let (mut listen, mut socket) = (args.listen, args.socket);
    if let Some(path) = &args.config {
        let cfg = load_config(path)?;
        if listen.is_empty() {
            listen = cfg.listen;
        }
        socket = socket.or(cfg.socket);
        if cfg.exports.is_empty() {
            bail!("{}: no [[export]] defined", path.display());
        }
        for (i, e) in cfg.exports.iter().enumerate() {
            add_export(&registry, &e.name, &e.description, &e.path, e.read_only)?;
            if e.default || i == 0 {
                registry.set_default(&e.name);
            }
        }
    } else if let Some(file) = &args.file {
        let name = args.name.unwrap_or_default();
        add_export(&registry, &name, args.description.as_deref().unwrap_or(""), file, args.read_only)?;
        registry.set_default(&name);
    }
    if listen.is_empty() && socket.is_none() {
        listen.push(DEFAULT_LISTEN.to_string());
    }
    let listeners = bind(&listen, socket).await?;
    let addrs: Vec<String> = listeners.iter().map(Listener::describe).collect();

    let shutdown = CancellationToken::new();
    let server = Server::new(registry, limits, HandshakeConfig::default());
    let serving = tokio::spawn(server.run(listeners, shutdown.clone()));
    eprintln!("listening on {}", addrs.join(", "));
    wait_for_signal().await?;
    tracing::info!("shutting down: draining in-flight requests");
    shutdown.cancel();
    serving.await.context("server task failed")?;
    Ok(())
}

fn load_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's messages span several lines; keep the error to one.
        let msg = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                anyhow::anyhow!("{} line {line}: {msg}", path.display())
            }
            None => anyhow::anyhow!("{}: {msg}", path.display()),
        }
    })
}

fn add_export(registry: &Registry, name: &str, description: &str, path: &Path, read_only: bool) -> anyhow::Result<()> {
    if name.len() > nbd_proto::consts::MAX_STRING || name.contains('\0') {
        bail!("export name '{name}' is not a valid NBD string");
    }
    let dev = FileDev::open(path, read_only).with_context(|| format!("cannot open {}", path.display()))?;
    registry
        .add(Export::new(name, description, Arc::new(dev)))
        .map_err(anyhow::Error::msg)
}

async fn bind(listen: &[String], socket: Option<PathBuf>) -> anyhow::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for addr in listen {
        let sa: SocketAddr = addr
            .parse()
            .with_context(|| format!("bad listen address '{addr}' (want IP:PORT, e.g. 127.0.0.1:10809 or [::1]:10809)"))?;
        let l = tokio::net::TcpListener::bind(sa)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(Listener::Tcp(l));
    }
    if let Some(path) = socket {
        let l = Listener::bind_unix(path.clone()).with_context(|| format!("cannot listen on {}", path.display()))?;
        listeners.push(l);
    }
    Ok(listeners)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
