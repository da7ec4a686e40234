//! The admin API's listeners, as axum sees them: each accepted connection
//! comes with its [`Caller`].

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::auth::Caller;

/// A client has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting to be served.
const BACKLOG: usize = 64;

/// The Unix socket (mode 0600); its file goes when the listener does,
/// unless another daemon has replaced it since.
pub struct LocalListener {
    inner: UnixListener,
    _file: RemoveOnDrop,
}

struct RemoveOnDrop(PathBuf, Option<(u64, u64)>);

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.1.is_some() && identity(&self.0) == self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl LocalListener {
    /// Binds `path`. A socket file left by a dead daemon is replaced; one a
    /// live daemon answers on is an error.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let inner = nbd_server::bind_unix_socket(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!(socket = %path.display(), "admin API listening");
        Ok(LocalListener {
            inner,
            _file: RemoveOnDrop(path.to_path_buf(), identity(path)),
        })
    }
}

impl Listener for LocalListener {
    type Io = UnixStream;
    type Addr = Caller;

    async fn accept(&mut self) -> (UnixStream, Caller) {
        loop {
            match self.inner.accept().await {
                Ok((s, _)) => return (s, Caller::Local),
                Err(e) => accept_failed(e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Caller> {
        Ok(Caller::Local)
    }
}

impl Connected<IncomingStream<'_, LocalListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, LocalListener>) -> Self {
        stream.remote_addr().clone()
    }
}

async fn accept_failed(e: std::io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!("admin API accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

type TlsStream = nbd_tls::server::TlsStream<TcpStream>;

/// TCP with mutual TLS. Handshakes run in their own tasks (a slow client
/// holds up nobody); connections that complete one are served with the
/// identities of their certificate. Plain HTTP, a missing client
/// certificate or one from another CA never gets past the handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream, Caller)>,
    local: SocketAddr,
    _stop: DropGuard,
}

impl TlsListener {
    /// Binds `addr`; `tls` must require client certificates. Each
    /// handshake takes `tls` as it is then, so a reload that replaces it
    /// reaches the next client.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<nbd_tls::ReloadableServerConfig>,
    ) -> std::io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(BACKLOG);
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(tcp, tls, tx, stop.clone()));
        tracing::info!(%local, "admin API listening (mutual TLS)");
        Ok(TlsListener {
            ready,
            local,
            _stop: stop.drop_guard(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

async fn accept_loop(
    tcp: TcpListener,
    tls: Arc<nbd_tls::ReloadableServerConfig>,
    tx: mpsc::Sender<(TlsStream, Caller)>,
    stop: CancellationToken,
) {
    loop {
        let (sock, addr) = tokio::select! {
            _ = stop.cancelled() => return,
            a = tcp.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let (acceptor, tx) = (tls.acceptor(), tx.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    let why = nbd_tls::describe_handshake_error(&e, nbd_tls::Side::Server);
                    tracing::warn!(peer = %addr, "admin API TLS refused: {why}");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %addr, "admin API TLS handshake timed out");
                    return;
                }
            };
            let identities = nbd_tls::peer_identities(tls.get_ref().1.peer_certificates());
            let _ = tx.send((tls, Caller::Remote { addr, identities })).await;
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream;
    type Addr = Caller;

    async fn accept(&mut self) -> (TlsStream, Caller) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Caller> {
        Ok(Caller::Remote {
            addr: self.local,
            identities: Vec::new(),
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
