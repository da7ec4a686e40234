//! Where credentials live: qemu's and libnbd's file names in one directory,
//! or explicit paths.

use std::path::{Path, PathBuf};

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// A server's certificate, key and (to verify clients) CA.
#[derive(Debug, Clone)]
pub struct ServerCreds {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ServerCreds {
    pub fn from_dir(dir: &Path) -> Self {
        ServerCreds {
            cert: dir.join(SERVER_CERT),
            key: dir.join(SERVER_KEY),
            ca: dir.join(CA_CERT),
        }
    }
}

/// A client's CA (to verify the server) and optional certificate and key.
#[derive(Debug, Clone, Default)]
pub struct ClientCreds {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientCreds {
    /// Takes whichever of the standard files the directory holds.
    pub fn from_dir(dir: &Path) -> Self {
        let existing = |name: &str| {
            let p = dir.join(name);
            p.exists().then_some(p)
        };
        ClientCreds {
            ca: existing(CA_CERT),
            cert: existing(CLIENT_CERT),
            key: existing(CLIENT_KEY),
        }
    }
}
