//! The exports a server offers, looked up by name during the handshake.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ferry_store::BlockDev;
use nbd_proto::consts::tflag;
use nbd_proto::option::ServerEntry;
use nbd_proto::server_handshake::{Catalog, ExportInfo, Lookup, Peer};

/// Minimum block size every export advertises (and requests are checked
/// against): the devices take I/O at any byte offset.
pub const MIN_BLOCK: u32 = 1;

/// One export: a name, a description and the device behind it.
pub struct Export {
    pub name: String,
    pub description: String,
    pub dev: Arc<dyn BlockDev>,
}

/// Who may reach an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Only clients that completed STARTTLS may use (or see) the export.
    pub tls_required: bool,
    /// Client certificate names (CN or SAN DNS/URI) allowed; empty means
    /// any client that got this far. A list implies TLS.
    pub allowed_clients: Vec<String>,
}

impl Access {
    fn tls_ok(&self, peer: &Peer) -> bool {
        peer.tls || (!self.tls_required && self.allowed_clients.is_empty())
    }

    fn identity_ok(&self, peer: &Peer) -> bool {
        self.allowed_clients.is_empty()
            || peer
                .identities
                .iter()
                .any(|id| self.allowed_clients.contains(id))
    }

    /// Whether `peer` may use `export`, and if not, the answer to give.
    fn admits(&self, export: &str, peer: &Peer) -> Result<(), Lookup<Arc<Export>>> {
        if !self.tls_ok(peer) {
            return Err(Lookup::TlsRequired);
        }
        if self.identity_ok(peer) {
            return Ok(());
        }
        tracing::warn!(
            export,
            client = %peer.identities.join(","),
            "client certificate not on the export's allow list: access denied"
        );
        Err(Lookup::Denied(format!(
            "client not allowed to use export '{export}'"
        )))
    }
}

impl Export {
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        dev: Arc<dyn BlockDev>,
    ) -> Self {
        Export {
            name: name.into(),
            description: description.into(),
            dev,
        }
    }

    fn info(&self, max_payload: u32) -> ExportInfo {
        let caps = self.dev.caps();
        let mut flags = tflag::HAS_FLAGS;
        let mut set = |on: bool, f: u16| {
            if on {
                flags |= f;
            }
        };
        set(caps.read_only, tflag::READ_ONLY);
        set(caps.flush, tflag::SEND_FLUSH);
        set(caps.fua && !caps.read_only, tflag::SEND_FUA);
        set(caps.trim && !caps.read_only, tflag::SEND_TRIM);
        set(
            caps.write_zeroes && !caps.read_only,
            tflag::SEND_WRITE_ZEROES,
        );
        set(
            caps.fast_zero && caps.write_zeroes && !caps.read_only,
            tflag::SEND_FAST_ZERO,
        );
        set(caps.cache, tflag::SEND_CACHE);
        set(caps.multi_conn, tflag::CAN_MULTI_CONN);
        set(caps.rotational, tflag::ROTATIONAL);
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.dev.size(),
            flags,
            min_block: MIN_BLOCK,
            preferred_block: 4096,
            max_payload,
            contexts: self.dev.contexts(),
        }
    }
}

/// The export table. The empty name reaches the default export.
pub struct Registry {
    exports: RwLock<Vec<Arc<Export>>>,
    access: RwLock<HashMap<String, Access>>,
    default: RwLock<Option<String>>,
    max_payload: u32,
}

impl Registry {
    pub fn new(max_payload: u32) -> Self {
        Registry {
            exports: RwLock::new(Vec::new()),
            access: RwLock::new(HashMap::new()),
            default: RwLock::new(None),
            max_payload,
        }
    }

    /// Adds an export; fails if the name is taken.
    pub fn add(&self, export: Export) -> Result<(), String> {
        let mut exports = self.exports.write().unwrap_or_else(|e| e.into_inner());
        if exports.iter().any(|e| e.name == export.name) {
            return Err(format!("export '{}' already exists", export.name));
        }
        exports.push(Arc::new(export));
        Ok(())
    }

    /// Removes an export from the table. Connections already using it keep
    /// their handle until they close.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut exports = self.exports.write().unwrap_or_else(|e| e.into_inner());
        let i = exports.iter().position(|e| e.name == name)?;
        Some(exports.remove(i))
    }

    /// Sets who may reach `name`. Snapshot exports `name@SNAP` inherit it.
    pub fn set_access(&self, name: &str, access: Access) {
        let mut map = self.access.write().unwrap_or_else(|e| e.into_inner());
        map.insert(name.to_string(), access);
    }

    fn access_for(&self, name: &str) -> Access {
        let map = self.access.read().unwrap_or_else(|e| e.into_inner());
        let base = name.split_once('@').map_or(name, |(disk, _)| disk);
        map.get(name)
            .or_else(|| map.get(base))
            .cloned()
            .unwrap_or_default()
    }

    /// Makes the empty export name an alias of `name`.
    pub fn set_default(&self, name: &str) {
        *self.default.write().unwrap_or_else(|e| e.into_inner()) = Some(name.to_string());
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports.read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = exports.iter().find(|e| e.name == name) {
            return Some(e.clone());
        }
        if name.is_empty() {
            let default = self.default.read().unwrap_or_else(|e| e.into_inner());
            let target = default.as_deref()?;
            return exports.iter().find(|e| e.name == target).cloned();
        }
        None
    }

    pub fn names(&self) -> Vec<String> {
        let exports = self.exports.read().unwrap_or_else(|e| e.into_inner());
        exports.iter().map(|e| e.name.clone()).collect()
    }
}

impl Catalog for Registry {
    type Export = Arc<Export>;

    fn lookup(&self, name: &str, peer: &Peer) -> Lookup<Arc<Export>> {
        match self.get(name) {
            Some(e) => match self.access_for(&e.name).admits(&e.name, peer) {
                Ok(()) => Lookup::Found(e),
                Err(refusal) => refusal,
            },
            None => Lookup::Unknown,
        }
    }

    fn info(&self, export: &Arc<Export>) -> ExportInfo {
        export.info(self.max_payload)
    }

    fn list(&self, peer: &Peer) -> Vec<ServerEntry> {
        let exports = self.exports.read().unwrap_or_else(|e| e.into_inner());
        exports
            .iter()
            .filter(|e| {
                let access = self.access_for(&e.name);
                access.tls_ok(peer) && access.identity_ok(peer)
            })
            .map(|e| ServerEntry {
                name: e.name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }
}
