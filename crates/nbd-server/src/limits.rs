use std::time::Duration;

/// Resource limits of the server. Every connection can pin at most
/// `max_inflight` requests and `max_inflight_bytes` of buffers, and all
/// connections together at most `max_memory`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_inflight: usize,
    pub max_inflight_bytes: usize,
    /// Request and reply buffers of all connections together (see
    /// `budget.rs`); at least [`Limits::min_memory`].
    pub max_memory: usize,
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// A client that takes no byte of its pending replies, or sends no byte
    /// of a payload (or header) it started, for this long is cut off.
    pub stall_timeout: Duration,
    /// An established client with nothing in flight that sends no request
    /// for this long is disconnected; None keeps idle clients forever.
    pub idle_timeout: Option<Duration>,
    /// Cached read data goes from the file to a plain socket without a
    /// copy through a buffer, and to TLS from a mapping of the file
    /// (`zero_copy.rs`). Not a limit, but a server setting like them; off
    /// is for comparison.
    pub zero_copy: bool,
}

impl Default for Limits {
    fn default() -> Self {
        let max_payload: u32 = 32 << 20;
        Limits {
            max_connections: 256,
            max_inflight: 128,
            max_inflight_bytes: 128 << 20,
            max_memory: default_max_memory(max_payload),
            max_payload,
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            idle_timeout: None,
            zero_copy: true,
        }
    }
}

impl Limits {
    /// WRITE payloads up to this size are read and discarded when refused;
    /// larger ones make the server hang up (the spec allows either).
    pub fn discard_limit(&self) -> u64 {
        u64::from(self.max_payload) * 2
    }

    /// The smallest memory budget: room for two of the largest requests,
    /// so that no single connection can take all of it.
    pub fn min_memory(&self) -> usize {
        2 * self.max_payload as usize
    }
}

/// A quarter of the memory this process may use (the host's RAM, or the
/// cgroup's limit when lower): the server shares the host with the page
/// cache it serves from and with whatever else runs there. Never below
/// the minimum budget.
fn default_max_memory(max_payload: u32) -> usize {
    let usable = [host_ram(), cgroup_limit()]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(4 << 30);
    (usable / 4).max(2 * max_payload as u64) as usize
}

fn host_ram() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

/// The cgroup v2 memory limit; "max" (no limit) reads as None.
fn cgroup_limit() -> Option<u64> {
    std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_budget_is_sized_to_the_host() {
        let limits = Limits::default();
        assert!(limits.max_memory >= limits.min_memory());
        if let Some(ram) = host_ram() {
            assert!(limits.max_memory as u64 <= (ram / 4).max(64 << 20));
        }
    }
}
