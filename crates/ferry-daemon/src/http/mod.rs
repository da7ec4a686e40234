//! The admin API over HTTP: the routes (`router.rs`), who may use them
//! (`auth.rs`), and the listeners (`listen.rs`): the Unix socket, whose
//! callers own the daemon, and TCP with mutual TLS, whose callers are
//! known by their certificate and get the roles granted to it.

mod auth;
mod listen;
mod router;

pub use auth::{Caller, Grant, Grants};
pub use listen::{LocalListener, TlsListener};
pub use router::router;

use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio_util::sync::CancellationToken;

use crate::service::Daemon;

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve<L>(
    listener: L,
    daemon: Arc<Daemon>,
    grants: Arc<Grants>,
    shutdown: CancellationToken,
) where
    L: Listener<Addr = Caller>,
    for<'a> Caller: Connected<IncomingStream<'a, L>>,
{
    let app = router(daemon, grants).into_make_service_with_connect_info::<Caller>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!("admin API stopped: {e}");
    }
}
