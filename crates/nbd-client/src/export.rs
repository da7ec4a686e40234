//! What a connection learned about its export.

use nbd_proto::client_handshake::{BlockSize, ClientNegotiated};
use nbd_proto::consts::{DEFAULT_MAX_PAYLOAD, tflag};
use nbd_proto::reply::ReplyMode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (NBD_FLAG_*).
    pub flags: u16,
    pub mode: ReplyMode,
    /// Block sizes the server sent, if any.
    pub block_size: Option<BlockSize>,
    /// Selected meta contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
    /// Every context the export offers, when listing was asked for.
    pub available_contexts: Option<Vec<String>>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub handshake_flags: u16,
    pub used_export_name: bool,
}

impl From<ClientNegotiated> for ExportInfo {
    fn from(n: ClientNegotiated) -> Self {
        ExportInfo {
            size: n.size,
            flags: n.flags,
            mode: n.mode,
            block_size: n.block_size,
            contexts: n.contexts,
            available_contexts: n.available_contexts,
            name: n.name,
            description: n.description,
            handshake_flags: n.handshake_flags,
            used_export_name: n.used_export_name,
        }
    }
}

impl ExportInfo {
    fn flag(&self, f: u16) -> bool {
        self.flags & f != 0
    }
    pub fn read_only(&self) -> bool {
        self.flag(tflag::READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.flag(tflag::SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.flag(tflag::SEND_FUA)
    }
    pub fn is_rotational(&self) -> bool {
        self.flag(tflag::ROTATIONAL)
    }
    pub fn can_trim(&self) -> bool {
        self.flag(tflag::SEND_TRIM)
    }
    pub fn can_zero(&self) -> bool {
        self.flag(tflag::SEND_WRITE_ZEROES)
    }
    pub fn can_df(&self) -> bool {
        self.flag(tflag::SEND_DF)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flag(tflag::CAN_MULTI_CONN)
    }
    pub fn can_cache(&self) -> bool {
        self.flag(tflag::SEND_CACHE)
    }
    pub fn can_fast_zero(&self) -> bool {
        self.flag(tflag::SEND_FAST_ZERO)
    }
    /// Alignment every request must honour (1 when not advertised: a
    /// server that says nothing accepts any alignment).
    pub fn min_block(&self) -> u32 {
        self.block_size.map_or(1, |b| b.minimum)
    }
    pub fn preferred_block(&self) -> u32 {
        self.block_size.map_or(4096, |b| b.preferred)
    }
    /// Largest READ/WRITE payload. Without advice, 32 MiB is what every
    /// server accepts.
    pub fn max_payload(&self) -> u32 {
        self.block_size.map_or(DEFAULT_MAX_PAYLOAD, |b| {
            b.maximum.min(DEFAULT_MAX_PAYLOAD.max(b.preferred))
        })
    }
    /// The id of a selected context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }
    pub fn has_context(&self, name: &str) -> bool {
        self.context_id(name).is_some()
    }
}
