//! Where the daemon keeps its state and admin socket by default, and how
//! the management commands find a daemon (`--admin`, `--tls-creds`).

use std::path::PathBuf;

use ferry_api::{AdminClient, Endpoint};

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

/// Where the management commands find the daemon: shared by the
/// `snapshot`, `checkpoint`, `mirror` and `backup run` commands.
#[derive(clap::Args)]
pub struct AdminArg {
    /// The daemon's admin API: its socket, or https://HOST:PORT for a
    /// daemon's mutual-TLS listener [default: STATE_DIR/admin.sock].
    #[arg(long, value_name = "PATH|URL", global = true)]
    admin: Option<String>,
    /// With an https:// --admin: the directory with ca-cert.pem,
    /// client-cert.pem and client-key.pem.
    #[arg(long, value_name = "DIR", global = true)]
    tls_creds: Option<PathBuf>,
}

impl AdminArg {
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        self.checked(self.endpoint()?)
    }

    /// A client of another daemon's API, `admin`, with the same TLS
    /// credentials (the other end of a migration).
    pub fn client_at(&self, admin: &str) -> anyhow::Result<AdminClient> {
        self.checked(Endpoint::parse(admin, self.tls_creds.as_deref())?)
    }

    fn checked(&self, endpoint: Endpoint) -> anyhow::Result<AdminClient> {
        if self.tls_creds.is_some() && matches!(endpoint, Endpoint::Unix(_)) {
            anyhow::bail!("--tls-creds goes with an https:// --admin");
        }
        Ok(AdminClient::new(endpoint))
    }

    /// Where the daemon is; unlike [`AdminArg::client`], allows
    /// `--tls-creds` beside a socket, for commands that also use them for
    /// NBD.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(match &self.admin {
            Some(a) => Endpoint::parse(a, self.tls_creds.as_deref())?,
            None => Endpoint::Unix(default_admin_socket()),
        })
    }

    pub fn tls_creds(&self) -> Option<&std::path::Path> {
        self.tls_creds.as_deref()
    }
}

/// Prints an answer as the JSON the daemon sent.
pub fn print<T: serde::Serialize>(answer: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(answer)?);
    Ok(())
}

/// Seconds since the epoch, for default snapshot and checkpoint names.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
