//! The exports a server offers, looked up by name during the handshake.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ferry_block::BlockDev;
use nbd_proto::consts::tflag;
use nbd_proto::option::ServerEntry;
use nbd_proto::server_handshake::{Catalog, ExportInfo, Lookup, Peer};
use tokio_util::sync::CancellationToken;

/// Minimum block size every export advertises (and requests are checked
/// against): the devices take I/O at any byte offset.
pub const MIN_BLOCK: u32 = 1;

/// One published export: a name, a description and the device behind it,
/// how many connections have it open, and whether it was retired.
pub struct Published {
    pub name: String,
    pub description: String,
    pub dev: Arc<dyn BlockDev>,
    open: AtomicUsize,
    retired: CancellationToken,
}

impl Published {
    /// Connections (and handshakes in progress) holding the export.
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Fires when the export is [retired](Registry::retire): its
    /// connections answer what they have in flight and close.
    pub fn retired(&self) -> &CancellationToken {
        &self.retired
    }
}

/// An export as a connection holds it: while it lives, the export counts
/// as open, and [`Registry::remove_idle`] refuses to take it away.
pub struct Export(Arc<Published>);

impl Export {
    fn open(p: &Arc<Published>) -> Self {
        p.open.fetch_add(1, Ordering::AcqRel);
        Export(p.clone())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::ops::Deref for Export {
    type Target = Published;
    fn deref(&self) -> &Published {
        &self.0
    }
}

/// Why the export table refused a change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("export '{0}' already exists")]
    Taken(String),
    #[error("no export '{0}'")]
    NotFound(String),
    /// Connections have it open.
    #[error("export '{name}' is open by {open} connection(s)")]
    Busy { name: String, open: usize },
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
            crate::metrics::refused("tls_required");
            return Err(Lookup::TlsRequired);
        }
        if self.identity_ok(peer) {
            return Ok(());
        }
        crate::metrics::refused("not_allowed");
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

impl Published {
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
    exports: RwLock<Vec<Arc<Published>>>,
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

    fn read(&self) -> RwLockReadGuard<'_, Vec<Arc<Published>>> {
        self.exports.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<Arc<Published>>> {
        self.exports.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes an export; fails if the name is taken.
    pub fn add(
        &self,
        name: impl Into<String>,
        description: impl Into<String>,
        dev: Arc<dyn BlockDev>,
    ) -> Result<(), RegistryError> {
        let name = name.into();
        let mut exports = self.write();
        if exports.iter().any(|e| e.name == name) {
            return Err(RegistryError::Taken(name));
        }
        exports.push(Arc::new(Published {
            name,
            description: description.into(),
            dev,
            open: AtomicUsize::new(0),
            retired: CancellationToken::new(),
        }));
        Ok(())
    }

    /// Takes an export out of the table: new clients cannot find it;
    /// connections that have it keep their handle until they close.
    pub fn remove(&self, name: &str) -> Option<Arc<Published>> {
        let mut exports = self.write();
        let i = exports.iter().position(|e| e.name == name)?;
        Some(exports.remove(i))
    }

    /// Takes an export out of the table and ends its connections: each
    /// answers the requests it has in flight (later ones get ESHUTDOWN)
    /// and closes. Its access rule goes with it.
    pub fn retire(&self, name: &str) -> Option<Arc<Published>> {
        let gone = self.remove(name)?;
        gone.retired.cancel();
        self.clear_access(name);
        Some(gone)
    }

    /// Takes an export out of the table unless a connection has it open.
    /// Atomic with respect to lookups: a client either got the export
    /// before (and the removal is refused) or cannot find it after.
    pub fn remove_idle(&self, name: &str) -> Result<Arc<Published>, RegistryError> {
        let mut exports = self.write();
        let i = exports
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let open = exports[i].open_count();
        if open > 0 {
            return Err(RegistryError::Busy {
                name: name.to_string(),
                open,
            });
        }
        Ok(exports.remove(i))
    }

    /// Sets who may reach `name`. Snapshot exports `name@SNAP` inherit it.
    pub fn set_access(&self, name: &str, access: Access) {
        let mut map = self.access.write().unwrap_or_else(|e| e.into_inner());
        map.insert(name.to_string(), access);
    }

    /// Forgets the access rule of `name` (it then inherits none).
    pub fn clear_access(&self, name: &str) {
        let mut map = self.access.write().unwrap_or_else(|e| e.into_inner());
        map.remove(name);
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

    /// The export `name` reaches (the empty name: the default export).
    pub fn get(&self, name: &str) -> Option<Arc<Published>> {
        let exports = self.read();
        Self::find(
            &exports,
            name,
            &self.default.read().unwrap_or_else(|e| e.into_inner()),
        )
        .cloned()
    }

    fn find<'a>(
        exports: &'a [Arc<Published>],
        name: &str,
        default: &Option<String>,
    ) -> Option<&'a Arc<Published>> {
        let target = match (name, default) {
            ("", Some(d)) if !exports.iter().any(|e| e.name.is_empty()) => d.as_str(),
            _ => name,
        };
        exports.iter().find(|e| e.name == target)
    }

    /// Every published export, in the order they were added.
    pub fn list(&self) -> Vec<Arc<Published>> {
        self.read().clone()
    }
}

impl Catalog for Registry {
    type Export = Arc<Export>;

    fn lookup(&self, name: &str, peer: &Peer) -> Lookup<Arc<Export>> {
        // The export is opened under the table's lock, so a removal
        // (which takes it exclusively) sees the count.
        let exports = self.read();
        let default = self.default.read().unwrap_or_else(|e| e.into_inner());
        match Self::find(&exports, name, &default) {
            Some(e) => match self.access_for(&e.name).admits(&e.name, peer) {
                Ok(()) => Lookup::Found(Arc::new(Export::open(e))),
                Err(refusal) => refusal,
            },
            None => Lookup::Unknown,
        }
    }

    fn info(&self, export: &Arc<Export>) -> ExportInfo {
        export.info(self.max_payload)
    }

    fn list(&self, peer: &Peer) -> Vec<ServerEntry> {
        let exports = self.read();
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
