use std::time::Duration;

/// Resource limits of the server. Every connection can pin at most
/// `max_inflight` requests and `max_inflight_bytes` of buffers.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_inflight: usize,
    pub max_inflight_bytes: usize,
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_inflight: 128,
            max_inflight_bytes: 128 << 20,
            max_payload: 32 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// WRITE payloads up to this size are read and discarded when refused;
    /// larger ones make the server hang up (the spec allows either).
    pub fn discard_limit(&self) -> u64 {
        u64::from(self.max_payload) * 2
    }
}
