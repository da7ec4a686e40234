//! Reload requests from the admin API. The daemon does not own its
//! configuration file (the binary does, and also reloads on SIGHUP), so
//! the route only asks: a request goes down one channel to the owner,
//! which applies reloads one at a time and answers each.

use std::sync::OnceLock;

use ferry_api::Reloaded;
use tokio::sync::{mpsc, oneshot};

use crate::error::ServiceError;

/// One reload asked for; answer it with what the reload did, or the
/// one-line reason the new configuration was refused.
pub struct ReloadRequest {
    reply: oneshot::Sender<Result<Reloaded, String>>,
}

impl ReloadRequest {
    pub fn answer(self, outcome: Result<Reloaded, String>) {
        // The caller may have gone away; the reload happened regardless.
        let _ = self.reply.send(outcome);
    }
}

/// The sending end, once someone listens.
#[derive(Default)]
pub(crate) struct ReloadChannel(OnceLock<mpsc::Sender<ReloadRequest>>);

impl ReloadChannel {
    /// The receiving end; only the first caller gets one.
    pub(crate) fn listen(&self) -> Option<mpsc::Receiver<ReloadRequest>> {
        let (tx, rx) = mpsc::channel(4);
        self.0.set(tx).ok().map(|()| rx)
    }

    pub(crate) async fn request(&self) -> Result<Reloaded, ServiceError> {
        let unavailable = || ServiceError::NotFound("this daemon cannot reload".into());
        let tx = self.0.get().ok_or_else(unavailable)?;
        let (reply, answer) = oneshot::channel();
        tx.send(ReloadRequest { reply })
            .await
            .map_err(|_| unavailable())?;
        answer
            .await
            .map_err(|_| unavailable())?
            .map_err(ServiceError::Refused)
    }
}
