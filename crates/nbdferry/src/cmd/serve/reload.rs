//! Reloading a running server (SIGHUP, or `POST /v1/reload`): the config
//! file's exports and the TLS certificates are read again and applied
//! without dropping clients. A new configuration that cannot be applied
//! whole is refused with a one-line reason and the old one keeps running.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ferry_api::Reloaded;
use nbd_tls::ReloadableServerConfig;

use super::config::{ConfigFile, ExportDefaults, load_config, restart_needed, wanted_exports};
use super::exports::Exports;
use crate::{logging, systemd};

/// The certificates the server presents, read again at each reload.
pub(super) struct Certificates {
    pub(super) dir: PathBuf,
    /// Whether NBD clients need no certificate.
    pub(super) anonymous_clients: bool,
    pub(super) nbd: Option<Arc<ReloadableServerConfig>>,
    /// The admin API's mutual-TLS listener (client certificates always).
    pub(super) admin: Option<Arc<ReloadableServerConfig>>,
}

impl Certificates {
    /// Reads the directory; nothing is replaced unless all of it loads.
    fn load(&self) -> anyhow::Result<impl FnOnce() + use<>> {
        let creds = nbd_tls::ServerCreds::from_dir(&self.dir);
        let nbd = match &self.nbd {
            Some(slot) => Some((
                slot.clone(),
                nbd_tls::server_config(&creds, !self.anonymous_clients)?,
            )),
            None => None,
        };
        let admin = match &self.admin {
            Some(slot) => Some((slot.clone(), nbd_tls::server_config(&creds, true)?)),
            None => None,
        };
        Ok(move || {
            for (slot, config) in nbd.into_iter().chain(admin) {
                slot.replace(config);
            }
        })
    }
}

/// What a reload reads, and the state it changes.
pub(super) struct Reloader {
    /// `--config`, and the file as it was at start (what the settings a
    /// reload cannot apply are compared with).
    pub(super) config: Option<(PathBuf, ConfigFile)>,
    pub(super) defaults: ExportDefaults,
    pub(super) exports: Exports,
    pub(super) certificates: Option<Certificates>,
}

impl Reloader {
    /// Reloads, tells the service manager, and logs the outcome on one
    /// line; the error is the line a caller of the admin API gets.
    pub(super) async fn reload(&mut self) -> Result<Reloaded, String> {
        systemd::reloading();
        let started = std::time::Instant::now();
        let outcome = self.apply().await;
        systemd::notify(ferry_daemon::Phase::Ready);
        match outcome {
            Ok(r) => {
                logging::status(&format!(
                    "reloaded in {} ms: added [{}], removed [{}], changed [{}], certificates {}",
                    started.elapsed().as_millis(),
                    r.added.join(", "),
                    r.removed.join(", "),
                    r.changed.join(", "),
                    if r.certificates { "read" } else { "none" },
                ));
                if !r.restart_needed.is_empty() {
                    tracing::warn!(
                        "reload: {} changed; a restart applies that",
                        r.restart_needed.join(", ")
                    );
                }
                Ok(r)
            }
            Err(e) => {
                let line = format!("{e:#}").replace('\n', " ");
                logging::status(&format!(
                    "reload refused: {line}; the running configuration stays"
                ));
                Err(line)
            }
        }
    }

    async fn apply(&mut self) -> anyhow::Result<Reloaded> {
        let mut done = Reloaded::default();
        let wanted = match &self.config {
            Some((path, started)) => {
                let cfg = load_config(path)?;
                let wanted = wanted_exports(&cfg, path, &self.defaults)?;
                done.config = Some(path.display().to_string());
                done.restart_needed = restart_needed(started, &cfg);
                Some(wanted)
            }
            None => None,
        };
        let swap_certificates = match &self.certificates {
            Some(c) => Some(
                c.load()
                    .with_context(|| format!("certificates in {}", c.dir.display()))?,
            ),
            None => None,
        };
        if let Some(wanted) = wanted {
            let changes = self.exports.apply(wanted).await?;
            done.added = changes.added;
            done.removed = changes.removed;
            done.changed = changes.changed;
        }
        if let Some(swap) = swap_certificates {
            swap();
            done.certificates = true;
        }
        Ok(done)
    }
}
