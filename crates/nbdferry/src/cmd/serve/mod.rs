//! `nbdferry serve`: export files and block devices over NBD; the config
//! file (`config.rs`), bringing the exports to what it wants
//! (`exports.rs`), and reloading both it and the certificates while
//! serving (`reload.rs`), and the metrics recorder (`prometheus.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_daemon::http::{Grant, Grants, LocalListener, TlsListener};
use ferry_daemon::{Daemon, ExportSpec, Phase, SourceSpec};
use ferry_jobs::PointDev;
use nbd_proto::server_handshake::{HandshakeConfig, TlsMode};
use nbd_server::{Limits, Listener, Registry, Server};
use nbd_tls::ReloadableServerConfig;
use tokio_util::sync::CancellationToken;

use crate::{admin, logging, systemd};

mod config;
mod exports;
mod prometheus;
mod reload;

use config::{ConfigFile, ExportDefaults, TlsArg, load_config, parse_grant, wanted_exports};
use exports::{Exports, Wanted};
use reload::{Certificates, Reloader};

const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Why a granularity given for a read-only export is refused rather than
/// ignored: such an export has no checkpoints or snapshots to apply it to.
const NO_STATE: &str =
    "applies to writable exports only: a read-only export has no checkpoints or snapshots";

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
    /// Boxed: the flags make the command enum large otherwise.
    #[command(flatten)]
    limits: Box<LimitArgs>,
    /// Where snapshots, checkpoint bitmaps and the admin socket live
    /// [default: /var/lib/nbdferry for root, else
    /// $XDG_STATE_HOME/nbdferry or ~/.local/state/nbdferry].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The admin API socket [default: STATE_DIR/admin.sock].
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Also serve the admin API on TCP, with mutual TLS (the --tls-creds
    /// directory; client certificates required), for remote hosts.
    #[arg(long, value_name = "ADDR:PORT")]
    admin_listen: Option<String>,
    /// A remote identity's role: CLIENT=ROLE[:DISK,DISK...] (CLIENT is a
    /// certificate CN or SAN; ROLE viewer, operator or admin; all disks
    /// when none are named). Repeatable; adds to `[[admin.grant]]`.
    #[arg(long = "admin-grant", value_name = "CLIENT=ROLE[:DISKS]", value_parser = parse_grant)]
    admin_grants: Vec<Grant>,
    /// TLS: off, allow (STARTTLS optional; exports may require it) or
    /// require [default: require when --tls-creds is given, else off].
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsArg>,
    /// X.509 directory in qemu's layout: ca-cert.pem, server-cert.pem,
    /// server-key.pem.
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// Do not ask clients for certificates (the server is still
    /// authenticated; per-export allow lists then match nobody).
    #[arg(long)]
    tls_anonymous_clients: bool,
    /// Dirty-tracking and copy-on-write block size of disks whose state is
    /// created from now on (a power of two, 4K to 64M; a disk keeps the
    /// size it was created with) [default: 64K].
    #[arg(long, value_name = "BYTES", value_parser = super::size::parse_granularity)]
    granularity: Option<u64>,
    /// Post-copy: serve a disk that is still arriving from this NBD URI
    /// (nbds:// with tls-certificates= too). FILE is created sparse at the
    /// source's size if missing; absent blocks are fetched when read, and a
    /// background pass brings the rest.
    #[arg(long, value_name = "URI", conflicts_with = "read_only")]
    source: Option<String>,
    /// How long a read of an absent block waits for an unreachable source
    /// before that read fails with EIO.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    source_timeout: u64,
    /// Bytes per second for the background hydration pass (reads clients
    /// need are never paced), e.g. 100M.
    #[arg(long, value_name = "BYTES/s", value_parser = super::size::parse_bytes)]
    rate: Option<u64>,
    /// Client certificate name (CN or SAN) allowed to use the export
    /// (repeatable); without it any certificate signed by the CA is.
    #[arg(long = "allow-client", value_name = "NAME")]
    allow_clients: Vec<String>,
    /// Also export every point of this backup repository read-only, as
    /// DISK@POINT (a directory, or s3://BUCKET/PREFIX).
    #[arg(long, value_name = "REPO")]
    backup: Option<String>,
    /// Key file of an encrypted --backup repository.
    #[arg(long, value_name = "FILE", requires = "backup")]
    key_file: Option<PathBuf>,
    /// File or block device to export.
    #[arg(required_unless_present_any = ["config", "backup"])]
    file: Option<PathBuf>,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Before anything can print readiness: a signal that arrives right
    // after it must drain and exit 0 (or reload), not kill the process.
    let mut signals = Signals::new()?;
    let LimitArgs {
        max_inflight,
        max_inflight_bytes,
        max_connections,
        no_zero_copy,
        mut guards,
    } = *args.limits;
    if max_inflight_bytes < Limits::default().max_payload as usize {
        bail!(
            "--max-inflight-bytes must be at least {} (the largest request)",
            Limits::default().max_payload
        );
    }
    let mut limits = Limits {
        max_inflight_bytes,
        max_inflight: max_inflight.max(1),
        max_connections: max_connections.max(1),
        zero_copy: !no_zero_copy,
        ..Limits::default()
    };
    let registry = Arc::new(Registry::new(limits.max_payload));
    let explicit_state = args.state_dir.is_some() || args.admin_socket.is_some();
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(admin::default_state_dir);
    let daemon = Arc::new(Daemon::new(registry.clone(), &state_dir));
    let (mut listen, mut socket) = (args.listen, args.socket);
    let mut admin_listen = args.admin_listen;
    let mut grants = args.admin_grants;
    let (mut tls, mut tls_creds, mut anonymous) =
        (args.tls, args.tls_creds, args.tls_anonymous_clients);
    let defaults = ExportDefaults {
        granularity: args.granularity,
        source_timeout: args.source_timeout,
        rate: args.rate,
    };
    let mut config = None;
    let wanted = if let Some(path) = &args.config {
        let cfg = load_config(path)?;
        guards = guards.or(Guards::from_config(&cfg, path)?);
        if listen.is_empty() {
            listen = cfg.listen.clone();
        }
        socket = socket.or(cfg.socket.clone());
        tls = tls.or(cfg.tls);
        tls_creds = tls_creds.or(cfg.tls_creds.clone());
        anonymous |= cfg.tls_anonymous_clients;
        admin_listen = admin_listen.or(cfg.admin_listen.clone());
        grants.extend(cfg.admin.grant.iter().cloned());
        let wanted = wanted_exports(&cfg, path, &defaults)?;
        config = Some((path.clone(), cfg));
        wanted
    } else if let Some(file) = &args.file {
        if args.read_only && args.granularity.is_some() {
            bail!("--granularity {NO_STATE}");
        }
        let source = args.source.map(|uri| SourceSpec {
            uri,
            timeout: Duration::from_secs(args.source_timeout),
            rate: args.rate,
        });
        vec![Wanted {
            spec: ExportSpec {
                name: args.name.unwrap_or_default(),
                description: args.description.unwrap_or_default(),
                path: file.clone(),
                read_only: args.read_only,
                granularity: args.granularity,
                source,
            },
            require_tls: false,
            allow_clients: args.allow_clients.clone(),
            default: true,
        }]
    } else {
        Vec::new()
    };
    let (mode, tls_config) =
        tls_setup(tls, tls_creds.as_deref(), anonymous, admin_listen.is_some())?;
    let mut exports = Exports::new(daemon.clone(), mode);
    exports.apply(wanted).await?;
    if let Some(location) = &args.backup {
        let access = nbd_server::Access {
            tls_required: mode == TlsMode::Require,
            allowed_clients: args.allow_clients.clone(),
        };
        if !access.allowed_clients.is_empty() && mode == TlsMode::Off {
            bail!("--allow-client needs TLS (give --tls-creds DIR)");
        }
        for name in serve_points(&registry, location, args.key_file.as_deref()).await? {
            registry.set_access(&name, access.clone());
        }
    }
    if listen.is_empty() && socket.is_none() {
        listen.push(DEFAULT_LISTEN.to_string());
    }
    let listeners = bind(&listen, socket).await?;
    let addrs: Vec<String> = listeners.iter().map(Listener::describe).collect();

    let admin_sock = bind_admin(&state_dir, args.admin_socket.as_deref(), explicit_state)?;
    let admin_tcp = match &admin_listen {
        Some(addr) => Some(bind_admin_tls(addr, tls_creds.as_deref()).await?),
        None => None,
    };
    let grants = Arc::new(Grants(grants));

    guards.apply(&mut limits)?;
    let shutdown = CancellationToken::new();
    let handshake = HandshakeConfig {
        tls: mode,
        ..HandshakeConfig::default()
    };
    let server =
        Server::new(registry, limits, handshake, tls_config).map_err(anyhow::Error::msg)?;
    let mut reloader = Reloader {
        config,
        defaults,
        exports,
        certificates: tls_creds.map(|dir| Certificates {
            dir,
            anonymous_clients: anonymous,
            nbd: server.tls(),
            admin: admin_tcp.as_ref().map(|(_, tls)| tls.clone()),
        }),
    };
    let serving = tokio::spawn(server.run(listeners, shutdown.clone()));
    let upkeep = tokio::spawn(daemon.clone().maintain(shutdown.clone()));
    let metrics = prometheus::install(&daemon, shutdown.clone())?;
    let mut admin_tasks = Vec::new();
    if let Some(l) = admin_sock {
        let api = ferry_daemon::http::serve(l, daemon.clone(), grants.clone(), shutdown.clone());
        admin_tasks.push(tokio::spawn(api));
    }
    if let Some((l, _)) = admin_tcp {
        // Before the readiness line, so a script that waits for that one
        // finds this one too.
        logging::status(&format!("admin API on https://{}", l.local_addr()));
        let api = ferry_daemon::http::serve(l, daemon.clone(), grants.clone(), shutdown.clone());
        admin_tasks.push(tokio::spawn(api));
    }
    let mut reloads = daemon
        .reload_requests()
        .context("reload requests taken twice")?;
    // Before the readiness line: a script that waits for it may ask the
    // admin API where the listeners are at once.
    daemon.set_listeners(addrs.clone());
    logging::status(&format!("listening on {}", addrs.join(", ")));
    enter(&daemon, Phase::Ready);
    // Reloads run here, one at a time, whether a signal or the admin API
    // asked for them.
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => break,
                // The outcome is logged; nobody else waits for it.
                Signal::Reload => drop(reloader.reload().await),
            },
            Some(req) = reloads.recv() => req.answer(reloader.reload().await),
        }
    }
    enter(&daemon, Phase::Stopping);
    tracing::info!("shutting down: draining in-flight requests");
    daemon.stop_jobs();
    shutdown.cancel();
    serving.await.context("server task failed")?;
    for t in admin_tasks {
        t.await.context("admin task failed")?;
    }
    upkeep.await.context("upkeep task failed")?;
    metrics.await.context("metrics task failed")?;
    Ok(())
}

/// The daemon's new phase, for `/v1/ready` and for systemd.
fn enter(daemon: &Daemon, phase: Phase) {
    daemon.set_phase(phase);
    systemd::notify(phase);
}

/// The resource limits of the server.
#[derive(clap::Args)]
struct LimitArgs {
    /// Requests in flight per connection.
    #[arg(long, default_value_t = Limits::default().max_inflight)]
    max_inflight: usize,
    /// Bytes of request buffers one connection may pin (at least 32 MiB,
    /// the largest request).
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_inflight_bytes)]
    max_inflight_bytes: usize,
    /// Simultaneous client connections; clients beyond are refused with
    /// an error that says why.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Copy every read reply through a buffer instead of sending cached
    /// data from the page cache (sendfile on plain sockets, a mapping of
    /// the file over TLS).
    #[arg(long)]
    no_zero_copy: bool,
    #[command(flatten)]
    guards: Guards,
}

/// The limits that guard the server against clients that hog it, from
/// the command line or the config file (the command line wins).
#[derive(clap::Args)]
struct Guards {
    /// Request and reply buffers of all connections together; when they
    /// are in use, requests wait their turn [default: a quarter of the
    /// RAM (or of the cgroup's limit)].
    #[arg(long, value_name = "BYTES", value_parser = super::size::parse_bytes)]
    max_memory: Option<u64>,
    /// Close a connection that takes no byte of its replies, or sends no
    /// byte of a request it started, for this many seconds [default: 30].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout: Option<u64>,
    /// Close a connection that has nothing in flight and sends no request
    /// for this many seconds [default: never].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: Option<u64>,
}

impl Guards {
    fn from_config(cfg: &ConfigFile, path: &Path) -> anyhow::Result<Self> {
        let max_memory = match &cfg.max_memory {
            Some(b) => Some(
                b.bytes()
                    .map_err(|m| anyhow::anyhow!("{}: max-memory: {m}", path.display()))?,
            ),
            None => None,
        };
        for (key, v) in [
            ("stall-timeout", cfg.stall_timeout),
            ("idle-timeout", cfg.idle_timeout),
        ] {
            if v == Some(0) {
                bail!("{}: {key} must be at least 1 second", path.display());
            }
        }
        Ok(Guards {
            max_memory,
            stall_timeout: cfg.stall_timeout,
            idle_timeout: cfg.idle_timeout,
        })
    }

    fn or(self, other: Guards) -> Guards {
        Guards {
            max_memory: self.max_memory.or(other.max_memory),
            stall_timeout: self.stall_timeout.or(other.stall_timeout),
            idle_timeout: self.idle_timeout.or(other.idle_timeout),
        }
    }

    fn apply(self, limits: &mut Limits) -> anyhow::Result<()> {
        if let Some(bytes) = self.max_memory {
            let min = limits.min_memory();
            if bytes < min as u64 {
                bail!("max-memory must be at least {min} bytes (two of the largest requests)");
            }
            limits.max_memory = usize::try_from(bytes).unwrap_or(usize::MAX);
        }
        if let Some(s) = self.stall_timeout {
            limits.stall_timeout = Duration::from_secs(s);
        }
        limits.idle_timeout = self.idle_timeout.map(Duration::from_secs);
        Ok(())
    }
}

/// Publishes every point of the repository at `location` as a read-only
/// export `DISK@POINT`; returns their names.
async fn serve_points(
    registry: &Registry,
    location: &str,
    key_file: Option<&Path>,
) -> anyhow::Result<Vec<String>> {
    let key = key_file.map(ferry_repo::KeyFile::read).transpose()?;
    let repo = ferry_repo::Repo::open(location, key.as_ref())
        .await
        .with_context(|| format!("cannot open the repository {location}"))?;
    let mut names = Vec::new();
    for meta in repo.list().await? {
        let name = format!("{}@{}", meta.disk, meta.point);
        let description = format!("backup of {} from {}", meta.disk, meta.source);
        let dev = PointDev::new(repo.clone(), meta, tokio::runtime::Handle::current());
        registry
            .add(name.as_str(), description, Arc::new(dev))
            .map_err(anyhow::Error::msg)?;
        names.push(name);
    }
    tracing::info!(
        repo = location,
        points = names.len(),
        "serving backup points"
    );
    Ok(names)
}

/// Binds the admin socket. With an explicit `--state-dir`/`--admin-socket`
/// any failure is fatal; with the defaults the daemon still serves NBD
/// (say, a user without a writable home, or a second daemon) and warns.
fn bind_admin(
    state_dir: &Path,
    socket: Option<&Path>,
    explicit: bool,
) -> anyhow::Result<Option<LocalListener>> {
    let path = socket.map_or_else(|| state_dir.join("admin.sock"), Path::to_path_buf);
    let bound = (|| {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
        LocalListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))
    })();
    match bound {
        Ok(s) => Ok(Some(s)),
        Err(e) if !explicit => {
            tracing::warn!("admin API disabled: {e:#}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The admin API's mutual-TLS listener, with the server certificate of the
/// `--tls-creds` directory (and that configuration, for reloads); clients
/// must present one the CA signed.
async fn bind_admin_tls(
    addr: &str,
    creds: Option<&Path>,
) -> anyhow::Result<(TlsListener, Arc<ReloadableServerConfig>)> {
    let Some(dir) = creds else {
        bail!("--admin-listen needs --tls-creds DIR (its server certificate and CA)");
    };
    let sa = parse_addr(addr)?;
    let config = nbd_tls::server_config(&nbd_tls::ServerCreds::from_dir(dir), true)?;
    let config = Arc::new(ReloadableServerConfig::new(config));
    let listener = TlsListener::bind(sa, config.clone())
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok((listener, config))
}

fn parse_addr(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.parse().with_context(|| {
        format!("bad listen address '{addr}' (want IP:PORT, e.g. 127.0.0.1:10809 or [::1]:10809)")
    })
}

async fn bind(listen: &[String], socket: Option<PathBuf>) -> anyhow::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for addr in listen {
        let sa = parse_addr(addr)?;
        let l = tokio::net::TcpListener::bind(sa)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(Listener::Tcp(l));
    }
    if let Some(path) = socket {
        let l = Listener::bind_unix(path.clone())
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// SIGTERM and SIGINT, both of which stop the server gracefully, and
/// SIGHUP, which reloads it.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

enum Signal {
    Stop,
    Reload,
}

/// The server's TLS mode and credentials from the flags.
/// `admin_tls`: the credentials are (also) for the admin API, so NBD may
/// still be plaintext with `--tls=off`.
fn tls_setup(
    tls: Option<TlsArg>,
    creds: Option<&Path>,
    anonymous_clients: bool,
    admin_tls: bool,
) -> anyhow::Result<(TlsMode, Option<Arc<nbd_tls::ServerConfig>>)> {
    let mode = match (tls, creds) {
        (Some(TlsArg::Off), Some(_)) if admin_tls => return Ok((TlsMode::Off, None)),
        (Some(TlsArg::Off), Some(_)) => bail!("--tls-creds given but --tls=off"),
        (Some(TlsArg::Off), None) | (None, None) => return Ok((TlsMode::Off, None)),
        (Some(m), None) => bail!(
            "--tls={} needs --tls-creds DIR",
            if m == TlsArg::Allow {
                "allow"
            } else {
                "require"
            }
        ),
        (Some(TlsArg::Allow), Some(_)) => TlsMode::Allow,
        (Some(TlsArg::Require) | None, Some(_)) => TlsMode::Require,
    };
    let dir = creds.unwrap_or(Path::new("."));
    let config = nbd_tls::server_config(&nbd_tls::ServerCreds::from_dir(dir), !anonymous_clients)?;
    Ok((mode, Some(config)))
}
