//! systemd's readiness protocol, for `Type=notify` units: `READY=1` once
//! every listener accepts connections, `STOPPING=1` when shutdown begins.
//! A daemon that systemd did not start has no `NOTIFY_SOCKET`, and these
//! do nothing.

use ferry_daemon::Phase;
use sd_notify::NotifyState;

/// Tells the service manager (if any) that the daemon entered `phase`.
pub fn notify(phase: Phase) {
    let state = match phase {
        Phase::Starting => return,
        Phase::Ready => NotifyState::Ready,
        Phase::Stopping => NotifyState::Stopping,
    };
    // A manager that cannot be told will time the start out or kill the
    // unit itself; say why here, but keep serving.
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}
