//! Where the daemon is in its life: what `GET /v1/ready` answers. The
//! daemon does not own its NBD listeners, so whoever binds them says when
//! it is ready (every listener accepts connections and every disk's state
//! is loaded) and when it starts to shut down.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Loading state and binding listeners.
    Starting,
    /// Serving.
    Ready,
    /// Draining: clients should go elsewhere.
    Stopping,
}

impl Phase {
    /// Why a daemon in this phase is not ready, for `/v1/ready`'s 503.
    pub fn not_ready_reason(self) -> Option<&'static str> {
        match self {
            Phase::Starting => Some("starting: listeners not up yet"),
            Phase::Ready => None,
            Phase::Stopping => Some("shutting down"),
        }
    }
}

/// A [`Phase`] shared between the code that runs the listeners and the
/// admin API's handlers.
#[derive(Debug, Default)]
pub(crate) struct PhaseCell(AtomicU8);

impl PhaseCell {
    pub(crate) fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Release);
    }

    pub(crate) fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }
}
