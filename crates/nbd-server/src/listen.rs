//! Listening sockets and the accept loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nbd_proto::server_handshake::{HandshakeConfig, TlsMode};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::MemoryBudget;
use crate::bufpool::{POOL, much_free_memory, release_free_memory};
use crate::conn::{ConnContext, serve};
use crate::limits::Limits;
use crate::refuse::refuse;
use crate::registry::Registry;

/// Clients over the connection limit that are told so at the same time;
/// beyond that they get a bare close.
const MAX_REFUSING: usize = 16;
/// How long a refused client may take to hear why.
const REFUSAL_TIME: Duration = Duration::from_secs(5);
/// How often idle buffers the last interval did not need are freed.
const POOL_TRIM_INTERVAL: Duration = Duration::from_secs(5);

pub enum Listener {
    Tcp(TcpListener),
    /// A Unix socket and its path, removed when the server stops.
    Unix(UnixListener, PathBuf),
}

/// Binds a Unix socket at `path`, replacing a stale socket file nobody
/// listens on; a live one, or a file that is not a socket, is an error.
pub fn bind_unix_socket(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another server listens on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

impl Listener {
    /// Binds a Unix socket (see [`bind_unix_socket`]).
    pub fn bind_unix(path: PathBuf) -> std::io::Result<Self> {
        Ok(Listener::Unix(bind_unix_socket(&path)?, path))
    }

    /// A printable address: `127.0.0.1:10809` or `unix:/path`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

pub struct Server {
    registry: Arc<Registry>,
    limits: Limits,
    handshake: HandshakeConfig,
    tls: Option<Arc<nbd_tls::ReloadableServerConfig>>,
}

impl Server {
    /// A server; `tls` carries the credentials STARTTLS uses. A TLS mode
    /// other than off without credentials is a configuration error.
    pub fn new(
        registry: Arc<Registry>,
        limits: Limits,
        handshake: HandshakeConfig,
        tls: Option<Arc<nbd_tls::ServerConfig>>,
    ) -> Result<Self, &'static str> {
        if tls.is_none() && handshake.tls != TlsMode::Off {
            return Err("TLS mode needs TLS credentials");
        }
        Ok(Server {
            registry,
            limits,
            handshake,
            tls: tls.map(|c| Arc::new(nbd_tls::ReloadableServerConfig::new(c))),
        })
    }

    /// The credentials STARTTLS uses, to replace (on reload) while the
    /// server runs; None when the server has no TLS.
    pub fn tls(&self) -> Option<Arc<nbd_tls::ReloadableServerConfig>> {
        self.tls.clone()
    }

    /// Accepts clients until `shutdown` fires, then lets every connection
    /// finish its in-flight requests and returns.
    pub async fn run(self, listeners: Vec<Listener>, shutdown: CancellationToken) {
        POOL.limit_idle(self.limits.max_memory / 8);
        let ctx = Arc::new(ConnContext {
            registry: self.registry,
            limits: self.limits.clone(),
            handshake: self.handshake,
            shutdown: shutdown.clone(),
            tls: self.tls,
            budget: Arc::new(MemoryBudget::new(&self.limits)),
        });
        let tracker = TaskTracker::new();
        let gate = Arc::new(Gate {
            slots: Semaphore::new(self.limits.max_connections),
            refusing: Semaphore::new(MAX_REFUSING),
            limit: self.limits.max_connections,
        });
        let mut sockets = Vec::new();
        for l in listeners {
            let (ctx, tracker, gate, shutdown) =
                (ctx.clone(), tracker.clone(), gate.clone(), shutdown.clone());
            if let Listener::Unix(_, p) = &l {
                sockets.push(p.clone());
            }
            tracker
                .clone()
                .spawn(accept_loop(l, ctx, tracker, gate, shutdown));
        }
        tracker.spawn(trim_pool(shutdown.clone()));
        shutdown.cancelled().await;
        tracker.close();
        tracker.wait().await;
        for p in sockets {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Frees pooled buffers that went unused, until shutdown. Once some were,
/// a burst is over and the allocator's free memory goes back too; so it
/// does whenever the allocator holds much of it (buffers that never went
/// through the pool).
async fn trim_pool(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(POOL_TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let trimmed = POOL.trim() > 0;
                tokio::task::spawn_blocking(move || {
                    if trimmed || much_free_memory() {
                        release_free_memory();
                    }
                });
            }
        }
    }
}

/// The connection limit: slots for served clients, and a few more for
/// clients being told that there is no room.
struct Gate {
    slots: Semaphore,
    refusing: Semaphore,
    limit: usize,
}

async fn accept_loop(
    listener: Listener,
    ctx: Arc<ConnContext>,
    tracker: TaskTracker,
    gate: Arc<Gate>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let gate = gate.clone();
        let ctx = ctx.clone();
        tracker.spawn(async move {
            let Ok(_slot) = gate.slots.try_acquire() else {
                tokio::select! {
                    () = turn_away(stream, &gate, peer) => {}
                    _ = ctx.shutdown.cancelled() => {}
                }
                return;
            };
            let result = match stream {
                Accepted::Tcp(s) => serve(s, ctx, peer.clone()).await,
                Accepted::Unix(s) => serve(s, ctx, peer.clone()).await,
            };
            if let Err(e) = result {
                tracing::info!(%peer, "connection error: {e}");
            }
        });
    }
}

/// Tells a client over the connection limit why it is refused, within a
/// bounded time; when many are refused at once, the rest are just closed.
async fn turn_away(stream: Accepted, gate: &Gate, peer: String) {
    let limit = gate.limit;
    crate::metrics::refused("connection_limit");
    let Ok(_refusing) = gate.refusing.try_acquire() else {
        tracing::warn!(%peer, limit, "connection limit reached: closing client");
        return;
    };
    tracing::warn!(%peer, limit, "connection limit reached: refusing client");
    let message = format!("server busy: connection limit ({limit}) reached, try again later");
    let refusal = async {
        match stream {
            Accepted::Tcp(s) => refuse(s, &message).await,
            Accepted::Unix(s) => refuse(s, &message).await,
        }
    };
    if let Ok(Err(e)) = tokio::time::timeout(REFUSAL_TIME, refusal).await {
        tracing::debug!(%peer, "refused client: {e}");
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Accepted::Tcp(s), addr.to_string()))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok((Accepted::Unix(s), format!("unix:{}", path.display())))
        }
    }
}
