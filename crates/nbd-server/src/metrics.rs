//! What the server records for monitoring, through the `metrics` facade:
//! the binary installs a recorder (Prometheus) or none, in which case each
//! call below is a no-op. The hot path touches only handles cached per
//! connection (an atomic add each); label sets are built once, when a
//! connection starts, and nothing is measured per byte.

use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use nbd_proto::consts::cmd;

/// Request latency, from the start of a request on the device to its
/// reply being ready, in seconds.
pub const REQUEST_DURATION: &str = "nbdferry_request_duration_seconds";
/// Bucket bounds of [`REQUEST_DURATION`]: 50 µs (a cached read) to 10 s
/// (a flush behind a slow disk).
pub const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// The commands counted apart; anything else counts as "other".
const COMMANDS: [(u16, &str); 7] = [
    (cmd::READ, "read"),
    (cmd::WRITE, "write"),
    (cmd::FLUSH, "flush"),
    (cmd::TRIM, "trim"),
    (cmd::CACHE, "cache"),
    (cmd::WRITE_ZEROES, "write_zeroes"),
    (cmd::BLOCK_STATUS, "block_status"),
];

fn slot(command: u16) -> usize {
    COMMANDS
        .iter()
        .position(|(c, _)| *c == command)
        .unwrap_or(COMMANDS.len())
}

struct PerCommand {
    requests: Counter,
    duration: Histogram,
}

/// One connection's handles, labelled with its export.
pub struct ExportMetrics {
    export: String,
    commands: Vec<PerCommand>,
    read_bytes: Counter,
    zero_copy_bytes: Counter,
    written_bytes: Counter,
    in_flight: Gauge,
    connections: Gauge,
}

impl ExportMetrics {
    /// Handles for a connection to `export`; counts it as connected until
    /// dropped.
    pub fn connect(export: &str) -> Self {
        let e = export.to_string();
        let names = COMMANDS.iter().map(|(_, n)| *n).chain(["other"]);
        let commands = names
            .map(|c| PerCommand {
                requests: counter!("nbdferry_requests_total", "export" => e.clone(), "command" => c),
                duration: histogram!(REQUEST_DURATION, "export" => e.clone(), "command" => c),
            })
            .collect();
        let connections = gauge!("nbdferry_connections", "export" => e.clone());
        connections.increment(1.0);
        ExportMetrics {
            commands,
            read_bytes: counter!("nbdferry_read_bytes_total", "export" => e.clone()),
            zero_copy_bytes: counter!("nbdferry_read_zero_copy_bytes_total", "export" => e.clone()),
            written_bytes: counter!("nbdferry_written_bytes_total", "export" => e.clone()),
            in_flight: gauge!("nbdferry_requests_in_flight", "export" => e.clone()),
            connections,
            export: e,
        }
    }

    /// A request goes to the device.
    pub fn started(&self, command: u16, length: u64) -> Instant {
        self.commands[slot(command)].requests.increment(1);
        match command {
            cmd::READ => self.read_bytes.increment(length),
            cmd::WRITE => self.written_bytes.increment(length),
            _ => {}
        }
        self.in_flight.increment(1.0);
        Instant::now()
    }

    /// Read bytes that go to the socket straight from the page cache.
    pub fn zero_copy(&self, bytes: u64) {
        self.zero_copy_bytes.increment(bytes);
    }

    /// Its reply is ready.
    pub fn finished(&self, command: u16, started: Instant) {
        self.in_flight.decrement(1.0);
        let took: Duration = started.elapsed();
        self.commands[slot(command)].duration.record(took);
    }

    /// A request answered with an error (rare: the handle is made here).
    pub fn error(&self, errno: u32) {
        counter!("nbdferry_request_errors_total", "export" => self.export.clone(), "errno" => nbd_proto::consts::errno::name(errno))
            .increment(1);
    }
}

impl Drop for ExportMetrics {
    fn drop(&mut self) {
        self.connections.decrement(1.0);
    }
}

/// A STARTTLS handshake ended: `ok`, or refused (bad or missing client
/// certificate, protocol error).
pub fn tls_handshake(ok: bool) {
    let result = if ok { "ok" } else { "refused" };
    counter!("nbdferry_tls_handshakes_total", "result" => result).increment(1);
}

/// A client was turned away: `reason` is `connection_limit`,
/// `tls_required` or `not_allowed` (its certificate is not on the
/// export's allow list).
pub fn refused(reason: &'static str) {
    counter!("nbdferry_refusals_total", "reason" => reason).increment(1);
}
