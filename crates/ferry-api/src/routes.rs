//! Route paths and who may use them.

use serde::{Deserialize, Serialize};

/// What an identity may do with a disk; each role includes the ones
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// List, status, metrics.
    Viewer,
    /// Create and delete snapshots and checkpoints, start jobs.
    Operator,
    /// Everything, revert included.
    Admin,
}

/// Liveness: answers whenever the daemon's admin API does.
pub const HEALTH: &str = "/v1/health";
/// Readiness: 200 once the listeners are up and the state is loaded, 503
/// before and while shutting down.
pub const READY: &str = "/v1/ready";
/// Re-reads the configuration file and certificates (as SIGHUP does).
pub const RELOAD: &str = "/v1/reload";
/// Prometheus metrics, in the text exposition format (viewer on all
/// disks).
pub const METRICS: &str = "/metrics";

impl Role {
    /// The role a request needs: reading is for viewers, reverting a disk
    /// for admins, every other change for operators. `None`: the health
    /// probes, which any caller that reached the API may read (over TCP,
    /// mutual TLS has already proved a certificate of the daemon's CA), so
    /// that monitors and load balancers need no grant on any disk.
    pub fn needed(method: &str, path: &str) -> Option<Role> {
        match method {
            "GET" | "HEAD" if path == HEALTH || path == READY => None,
            "GET" | "HEAD" => Some(Role::Viewer),
            // Both replace what a disk holds.
            _ if path.ends_with("/revert") || path.ends_with("/arrive") => Some(Role::Admin),
            _ => Some(Role::Operator),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// Checks a disk, snapshot or checkpoint name: 1 to 64 of
/// `[A-Za-z0-9._-]`, not starting with `.`. Names become file names and
/// export names (`DISK@SNAP`), so `/`, `@`, `..` and the like never pass.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name '{}': use 1-64 characters from A-Z a-z 0-9 . _ - , not starting with '.'",
            name.escape_default()
        ))
    }
}

/// Percent-encodes a path segment so any name reaches the daemon, which
/// validates it (clients check names first, but the API is the boundary).
pub fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "s1", "disk.raw", "A-b_c.9", &"x".repeat(64)] {
            validate_name("snapshot", good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a@b",
            "../x",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(validate_name("snapshot", bad).is_err(), "{bad:?} passed");
        }
        assert_eq!(path_segment("a/b@c"), "a%2Fb%40c");
    }

    #[test]
    fn roles() {
        assert_eq!(Role::needed("GET", "/v1/exports"), Some(Role::Viewer));
        assert_eq!(
            Role::needed("POST", "/v1/disks/d/snapshots"),
            Some(Role::Operator)
        );
        assert_eq!(
            Role::needed("POST", "/v1/disks/d/snapshots/s/revert"),
            Some(Role::Admin)
        );
        assert_eq!(Role::needed("GET", HEALTH), None);
        assert_eq!(Role::needed("GET", READY), None);
        // Only reading them is free.
        assert_eq!(Role::needed("POST", READY), Some(Role::Operator));
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }
}
