//! The admin API: HTTP/JSON on the daemon's Unix socket.
//!
//! Routes (all answers are JSON; errors are `{"error": "one line"}` with a
//! 4xx/5xx status):
//! ```text
//! GET    /v1/exports
//! GET    /v1/disks/{disk}/snapshots
//! POST   /v1/disks/{disk}/snapshots                {"name": N, "checkpoint": bool}
//! DELETE /v1/disks/{disk}/snapshots/{name}
//! POST   /v1/disks/{disk}/snapshots/{name}/revert
//! GET    /v1/disks/{disk}/checkpoints
//! POST   /v1/disks/{disk}/checkpoints              {"name": N}
//! DELETE /v1/disks/{disk}/checkpoints/{name}
//! ```
//! The socket is created mode 0600 inside a 0700 state directory: whoever
//! may use it owns the daemon's disks anyway.

pub mod client;
pub mod disks;
pub mod server;

use std::path::PathBuf;

/// Where state lives when `--state-dir` is not given. A daemon's state
/// (snapshot stores, bitmaps, the admin socket) belongs to the daemon,
/// not next to the images (which may sit on read-only or shared media):
/// `/var/lib/nbdferry` for root, as system daemons do, else the XDG state
/// directory `$XDG_STATE_HOME/nbdferry` (default `~/.local/state/nbdferry`).
pub fn default_state_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/nbdferry");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from)
        && x.is_absolute()
    {
        return x.join("nbdferry");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/state/nbdferry")
}

pub fn default_admin_socket() -> PathBuf {
    default_state_dir().join("admin.sock")
}
