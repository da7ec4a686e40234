//! The stall deadline: a client that stops taking its replies, or stops
//! sending a request it started, pins the buffers involved; after
//! `--stall-timeout` without a byte of progress its connection is closed,
//! which frees them.

use std::time::Duration;

/// What a stalled client failed to do.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Stall {
    #[error("client read no byte of its replies for {0:?}")]
    Replies(Duration),
    #[error("client sent no byte of a started request for {0:?}")]
    Request(Duration),
}

/// Runs one I/O step (a read or write that returns when some bytes have
/// moved) unless `limit` passes first. The timer only starts when the step
/// has to wait, so a step that completes at once costs no timer.
pub async fn progress<T>(
    limit: Duration,
    stall: fn(Duration) -> Stall,
    step: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match tokio::time::timeout(limit, step).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            stall(limit),
        )),
    }
}
