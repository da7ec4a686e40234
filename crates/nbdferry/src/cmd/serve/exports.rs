//! The exports the daemon serves, brought to what the configuration wants:
//! at start, and again at each reload. All or nothing: a change that
//! cannot be made leaves the running exports as they were.

use std::sync::Arc;

use anyhow::bail;
use ferry_daemon::{Daemon, ExportSpec, HydrateOptions};
use nbd_proto::server_handshake::TlsMode;
use nbd_server::Access;

/// An export as the configuration wants it.
#[derive(Clone)]
pub(super) struct Wanted {
    pub(super) spec: ExportSpec,
    /// Only TLS clients may use or see it.
    pub(super) require_tls: bool,
    /// Client certificate names allowed (empty: any).
    pub(super) allow_clients: Vec<String>,
    /// The export the empty name reaches.
    pub(super) default: bool,
}

/// What one application changed, by export name.
#[derive(Default)]
pub(super) struct Changes {
    pub(super) added: Vec<String>,
    pub(super) removed: Vec<String>,
    pub(super) changed: Vec<String>,
}

/// The running exports and the daemon that serves them.
pub(super) struct Exports {
    daemon: Arc<Daemon>,
    mode: TlsMode,
    running: Vec<Wanted>,
    default: Option<String>,
}

impl Exports {
    /// None running yet; `mode` is the server's TLS mode, which export
    /// access rules are checked against.
    pub(super) fn new(daemon: Arc<Daemon>, mode: TlsMode) -> Self {
        Exports {
            daemon,
            mode,
            running: Vec::new(),
            default: None,
        }
    }

    fn access(&self, w: &Wanted) -> anyhow::Result<Access> {
        let name = &w.spec.name;
        if (w.require_tls || !w.allow_clients.is_empty()) && self.mode == TlsMode::Off {
            bail!("export '{name}' requires TLS but TLS is off (give --tls-creds DIR)");
        }
        Ok(Access {
            tls_required: w.require_tls || self.mode == TlsMode::Require,
            allowed_clients: w.allow_clients.clone(),
        })
    }

    /// Serves exactly `wanted`: publishes the new exports, retires the
    /// ones no longer wanted (their clients finish what is in flight) and
    /// updates the access rules and the default of the others. An export
    /// that stays keeps its disk: a change of its path, description,
    /// read-only flag, granularity or source is refused (remove it in one
    /// reload and add it back in the next).
    pub(super) async fn apply(&mut self, wanted: Vec<Wanted>) -> anyhow::Result<Changes> {
        let running = |name: &str| self.running.iter().find(|r| r.spec.name == name);
        let mut access = Vec::with_capacity(wanted.len());
        for w in &wanted {
            if let Some(r) = running(&w.spec.name)
                && r.spec != w.spec
            {
                bail!(
                    "export '{}': path, description, read-only, granularity or source changed; \
                     a served export keeps them (remove it, reload, then add it back)",
                    w.spec.name
                );
            }
            access.push(self.access(w)?);
        }
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|r| !wanted.iter().any(|w| w.spec.name == r.spec.name))
            .map(|r| r.spec.name.clone())
            .collect();
        for name in &gone {
            self.daemon.check_removal(name)?;
        }

        let mut changes = Changes::default();
        let registry = self.daemon.registry().clone();
        for (w, a) in wanted.iter().zip(&access) {
            if running(&w.spec.name).is_some() {
                continue;
            }
            let name = &w.spec.name;
            // The rule is in place before the export can be found.
            registry.set_access(name, a.clone());
            if let Err(e) = self
                .daemon
                .add_export(&w.spec, &HydrateOptions::default())
                .await
            {
                registry.clear_access(name);
                for added in &changes.added {
                    let _ = self.daemon.remove_export(added);
                }
                bail!("export '{name}': {e}");
            }
            changes.added.push(name.clone());
        }
        for name in gone {
            if let Err(e) = self.daemon.remove_export(&name) {
                tracing::warn!(export = name, "cannot remove export: {e}");
            }
            changes.removed.push(name);
        }
        for (w, a) in wanted.iter().zip(access) {
            if let Some(r) = running(&w.spec.name)
                && (r.require_tls, &r.allow_clients) != (w.require_tls, &w.allow_clients)
            {
                registry.set_access(&w.spec.name, a);
                changes.changed.push(w.spec.name.clone());
            }
        }
        let default = wanted
            .iter()
            .find(|w| w.default)
            .or(wanted.first())
            .map(|w| w.spec.name.clone());
        if let Some(d) = &default
            && self.default.as_ref() != Some(d)
        {
            registry.set_default(d);
            if self.default.is_some() && !changes.changed.contains(d) {
                changes.changed.push(d.clone());
            }
        }
        self.default = default;
        self.running = wanted;
        Ok(changes)
    }
}
