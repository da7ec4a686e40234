//! Who may do what over the admin API.
//!
//! A caller on the Unix socket owns the daemon (the socket is mode 0600 in
//! a 0700 state directory). A caller over TCP has passed mutual TLS: its
//! identities are its certificate's CN and SAN names, and it may do what
//! the grants give any of them, per disk ([`Role::needed`] says what a
//! route takes; the health probes take none). Every refusal is logged
//! with the identity, the route and the disk.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferry_api::{ErrorBody, Role};
use serde::Deserialize;

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Local,
    Remote {
        addr: SocketAddr,
        identities: Vec<String>,
    },
}

/// One `[[admin.grant]]` of the config file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// A certificate CN or SAN name.
    pub client: String,
    pub role: Role,
    /// The disks it applies to; all of them when absent.
    #[serde(default)]
    pub disks: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct Grants(pub Vec<Grant>);

impl Grants {
    /// The highest role `caller` has for `disk` (None: a route about no
    /// particular disk, which any grant reaches).
    pub fn role(&self, caller: &Caller, disk: Option<&str>) -> Option<Role> {
        let identities = match caller {
            Caller::Local => return Some(Role::Admin),
            Caller::Remote { identities, .. } => identities,
        };
        self.0
            .iter()
            .filter(|g| identities.contains(&g.client))
            .filter(|g| match (&g.disks, disk) {
                (Some(list), Some(d)) => list.iter().any(|x| x == d),
                _ => true,
            })
            .map(|g| g.role)
            .max()
    }

    /// The highest role `caller` has on every disk: what a route that acts
    /// on the whole daemon (reload, metrics) needs, since a grant limited
    /// to some disks must not reach the others through it.
    pub fn role_everywhere(&self, caller: &Caller) -> Option<Role> {
        let identities = match caller {
            Caller::Local => return Some(Role::Admin),
            Caller::Remote { identities, .. } => identities,
        };
        self.0
            .iter()
            .filter(|g| identities.contains(&g.client) && g.disks.is_none())
            .map(|g| g.role)
            .max()
    }

    /// Whether `caller` may see disk `disk` at all (for listings).
    pub fn sees(&self, caller: &Caller, disk: Option<&str>) -> bool {
        match (caller, disk) {
            (Caller::Local, _) => true,
            // Exports that belong to no disk: for grants on every disk.
            (Caller::Remote { identities, .. }, None) => self
                .0
                .iter()
                .any(|g| identities.contains(&g.client) && g.disks.is_none()),
            (_, Some(d)) => self.role(caller, Some(d)).is_some(),
        }
    }
}

/// The disk a route names: `/v1/disks/{disk}/...`, percent-decoded.
fn disk_of(path: &str) -> Option<String> {
    let seg = path.strip_prefix("/v1/disks/")?.split('/').next()?;
    Some(percent_decode(seg))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Middleware: lets a request through if its caller has the role its
/// route needs, else answers 403.
pub(crate) async fn authorize(
    State(grants): State<Arc<Grants>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let Some(needed) = Role::needed(&method, &path) else {
        return next.run(req).await;
    };
    let disk = disk_of(&path);
    let role = match &disk {
        Some(d) => grants.role(&caller, Some(d)),
        // The export list is filtered per disk by its handler.
        None if path == "/v1/exports" => grants.role(&caller, None),
        None => grants.role_everywhere(&caller),
    };
    if role >= Some(needed) {
        return next.run(req).await;
    }
    let (who, addr) = match &caller {
        Caller::Remote { identities, addr } => (identities.join(","), addr.to_string()),
        Caller::Local => (String::new(), String::new()),
    };
    tracing::warn!(
        client = who,
        peer = addr,
        route = format!("{method} {path}"),
        disk = disk.as_deref().unwrap_or("-"),
        needed = needed.as_str(),
        "admin request refused"
    );
    let message = format!(
        "client '{who}' may not {method} {path}: it needs the {} role{}",
        needed.as_str(),
        disk.map(|d| format!(" on disk '{d}'")).unwrap_or_default()
    );
    (
        axum::http::StatusCode::FORBIDDEN,
        axum::Json(ErrorBody { error: message }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(id: &str) -> Caller {
        Caller::Remote {
            addr: "127.0.0.1:1".parse().unwrap(),
            identities: vec![id.to_string()],
        }
    }

    #[test]
    fn grants_are_per_identity_and_disk() {
        let grants = Grants(vec![
            Grant {
                client: "backup-01".into(),
                role: Role::Operator,
                disks: Some(vec!["disk1".into()]),
            },
            Grant {
                client: "monitor".into(),
                role: Role::Viewer,
                disks: None,
            },
        ]);
        let b = remote("backup-01");
        assert_eq!(grants.role(&b, Some("disk1")), Some(Role::Operator));
        assert_eq!(grants.role(&b, Some("disk2")), None);
        assert!(grants.sees(&b, Some("disk1")) && !grants.sees(&b, None));
        let m = remote("monitor");
        assert_eq!(grants.role(&m, Some("disk2")), Some(Role::Viewer));
        assert!(grants.sees(&m, None));
        assert_eq!(grants.role(&remote("nobody"), None), None);
        assert_eq!(grants.role(&Caller::Local, Some("x")), Some(Role::Admin));
        assert_eq!(disk_of("/v1/disks/a%2Fb/snapshots"), Some("a/b".into()));
        assert_eq!(disk_of("/v1/exports"), None);
    }
}
