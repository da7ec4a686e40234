//! The `--config` file: its format, and the exports it asks for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_daemon::http::Grant;
use ferry_daemon::{ExportSpec, SourceSpec};
use serde::Deserialize;

use super::NO_STATE;
use super::exports::Wanted;

/// The `--config` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ConfigFile {
    #[serde(default)]
    pub(super) listen: Vec<String>,
    pub(super) socket: Option<PathBuf>,
    pub(super) tls: Option<TlsArg>,
    pub(super) tls_creds: Option<PathBuf>,
    #[serde(default)]
    pub(super) tls_anonymous_clients: bool,
    pub(super) admin_listen: Option<String>,
    #[serde(default)]
    pub(super) admin: AdminConfig,
    /// As `--max-memory`: bytes, or a string like "4G".
    pub(super) max_memory: Option<Bytes>,
    /// As `--stall-timeout`, in seconds.
    pub(super) stall_timeout: Option<u64>,
    /// As `--idle-timeout`, in seconds.
    pub(super) idle_timeout: Option<u64>,
    #[serde(default, rename = "export")]
    pub(super) exports: Vec<ExportConfig>,
}

/// `[admin]` in the config file.
#[derive(Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminConfig {
    #[serde(default)]
    pub(super) grant: Vec<Grant>,
}

/// `--admin-grant CLIENT=ROLE[:DISK,DISK...]`.
pub(super) fn parse_grant(s: &str) -> Result<Grant, String> {
    let (client, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': want CLIENT=ROLE[:DISK,...]"))?;
    let (role, disks) = match rest.split_once(':') {
        Some((r, d)) => (r, Some(d.split(',').map(str::to_string).collect())),
        None => (rest, None),
    };
    let role = match role {
        "viewer" => ferry_api::Role::Viewer,
        "operator" => ferry_api::Role::Operator,
        "admin" => ferry_api::Role::Admin,
        other => return Err(format!("role '{other}': want viewer, operator or admin")),
    };
    if client.is_empty() {
        return Err(format!("'{s}': the client name is empty"));
    }
    Ok(Grant {
        client: client.to_string(),
        role,
        disks,
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(super) enum TlsArg {
    Off,
    Allow,
    Require,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ExportConfig {
    pub(super) name: String,
    pub(super) path: PathBuf,
    #[serde(default)]
    pub(super) read_only: bool,
    #[serde(default)]
    pub(super) description: String,
    /// Makes this export the one the empty name reaches.
    #[serde(default)]
    pub(super) default: bool,
    /// `require`: only TLS clients may use or see this export.
    pub(super) tls: Option<TlsArg>,
    /// Client certificate names allowed to use this export.
    #[serde(default)]
    pub(super) allow_clients: Vec<String>,
    /// As `--granularity`, for this export: bytes, or a string like "1M".
    pub(super) granularity: Option<Bytes>,
    /// Post-copy: the disk arrives from this NBD URI (as `--source`).
    pub(super) source: Option<String>,
    /// As `--source-timeout`, in seconds, for this export.
    pub(super) source_timeout: Option<u64>,
    /// As `--rate`, for this export: bytes per second, or "100M".
    pub(super) rate: Option<Bytes>,
}

/// A byte count in the config file: `65536` or `"64K"`.
#[derive(PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(super) enum Bytes {
    Number(u64),
    Text(String),
}

impl Bytes {
    pub(super) fn bytes(&self) -> Result<u64, String> {
        match self {
            Bytes::Number(n) => Ok(*n),
            Bytes::Text(s) => crate::cmd::size::parse_bytes(s),
        }
    }

    fn granularity(&self) -> Result<u64, String> {
        match self {
            Bytes::Number(n) => crate::cmd::size::check_granularity(*n),
            Bytes::Text(s) => crate::cmd::size::parse_granularity(s),
        }
    }
}

pub(super) fn load_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's messages span several lines; keep the error to one.
        let msg = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                anyhow::anyhow!("{} line {line}: {msg}", path.display())
            }
            None => anyhow::anyhow!("{}: {msg}", path.display()),
        }
    })
}

/// What an export of the config file takes from the command line when it
/// does not say.
pub(super) struct ExportDefaults {
    pub(super) granularity: Option<u64>,
    pub(super) source_timeout: u64,
    pub(super) rate: Option<u64>,
}

/// The exports `cfg` (read from `path`) asks for, checked.
pub(super) fn wanted_exports(
    cfg: &ConfigFile,
    path: &Path,
    defaults: &ExportDefaults,
) -> anyhow::Result<Vec<Wanted>> {
    if cfg.exports.is_empty() {
        bail!("{}: no [[export]] defined", path.display());
    }
    let mut wanted: Vec<Wanted> = Vec::new();
    for e in &cfg.exports {
        let bad = |m: String| anyhow::anyhow!("{}: export '{}': {m}", path.display(), e.name);
        if wanted.iter().any(|w| w.spec.name == e.name) {
            return Err(bad("defined twice".into()));
        }
        let granularity = match &e.granularity {
            Some(_) if e.read_only => return Err(bad(format!("granularity {NO_STATE}"))),
            Some(g) => Some(g.granularity().map_err(bad)?),
            None => defaults.granularity,
        };
        let source = match &e.source {
            Some(uri) => Some(SourceSpec {
                uri: uri.clone(),
                timeout: Duration::from_secs(e.source_timeout.unwrap_or(defaults.source_timeout)),
                rate: match &e.rate {
                    Some(r) => Some(r.bytes().map_err(bad)?),
                    None => defaults.rate,
                },
            }),
            None => None,
        };
        wanted.push(Wanted {
            spec: ExportSpec {
                name: e.name.clone(),
                description: e.description.clone(),
                path: e.path.clone(),
                read_only: e.read_only,
                granularity,
                source,
            },
            require_tls: e.tls == Some(TlsArg::Require),
            allow_clients: e.allow_clients.clone(),
            default: e.default,
        });
    }
    Ok(wanted)
}

/// The settings of `new` that differ from `old` and that only a restart
/// applies: listeners, TLS mode and credentials' location, admin API,
/// resource guards.
pub(super) fn restart_needed(old: &ConfigFile, new: &ConfigFile) -> Vec<String> {
    let differs = [
        ("listen", old.listen != new.listen),
        ("socket", old.socket != new.socket),
        ("tls", old.tls != new.tls),
        ("tls-creds", old.tls_creds != new.tls_creds),
        (
            "tls-anonymous-clients",
            old.tls_anonymous_clients != new.tls_anonymous_clients,
        ),
        ("admin-listen", old.admin_listen != new.admin_listen),
        ("admin", old.admin != new.admin),
        ("max-memory", old.max_memory != new.max_memory),
        ("stall-timeout", old.stall_timeout != new.stall_timeout),
        ("idle-timeout", old.idle_timeout != new.idle_timeout),
    ];
    differs
        .into_iter()
        .filter(|(_, d)| *d)
        .map(|(k, _)| k.to_string())
        .collect()
}
