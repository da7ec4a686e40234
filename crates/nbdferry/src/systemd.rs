//! systemd's readiness protocol, for `Type=notify` units: `READY=1` once
//! every listener accepts connections, `RELOADING=1` (with the monotonic
//! time `Type=notify-reload` wants) while a reload runs and `READY=1`
//! after it, `STOPPING=1` when shutdown begins.
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
    send(&[state]);
}

/// Tells the service manager that a reload began; [`notify`] with
/// [`Phase::Ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => {
            tracing::warn!("cannot read the monotonic clock: {e}");
            send(&[NotifyState::Reloading]);
        }
    }
}

fn send(states: &[NotifyState]) {
    // A manager that cannot be told will time the start out or kill the
    // unit itself; say why here, but keep serving.
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}
