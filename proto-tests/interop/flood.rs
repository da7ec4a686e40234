//! A flood of clients that pin server memory: some never read their
//! replies, some stop in the middle of a WRITE payload. The server must
//! stay within its memory budget, keep serving a well-behaved client,
//! cut the stalled ones at the stall deadline and give the memory back.

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::*;

const BUDGET: u64 = 512 * MIB;
/// Beyond the budget: the buffer pool's idle buffers (an eighth of the
/// budget), the runtime, threads' stacks, per-connection state. Measured:
/// a peak of 414 MiB with the budget; 847 MiB with a budget too large to
/// matter (64G).
const OVERHEAD: u64 = 128 * MIB;
const STALL: Duration = Duration::from_secs(4);
/// A well-behaved client's request must be answered within this, even
/// while the flood holds the whole shared budget (a request waiting its
/// turn for the budget behind stalled clients takes at least STALL).
const MAX_LATENCY: Duration = Duration::from_secs(2);

const PROBE_READ: u64 = 128 * KIB;

const READERS: usize = 64;
/// Each never-reader asks for this many 1 MiB READs: more than the
/// kernel's socket buffers hold, so its replies back up in the server.
const READS_EACH: u64 = 12;
const STALLERS: usize = 64;
/// Each staller announces a WRITE of this size and sends 3/4 of it.
const WRITE_LEN: u64 = 16 * MIB;

/// A field of /proc/PID/status in KiB (VmRSS) or as a count (Threads).
fn status(pid: u32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn rss(pid: u32) -> u64 {
    status(pid, "VmRSS:") * KIB
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn count(server: &Server, what: &str) -> usize {
    server.log_text().matches(what).count()
}

#[test]
fn flood_of_stalled_clients_stays_within_the_memory_budget() {
    let (dir, img) = fixture(77);
    let s = Server::serve_env(
        dir.path(),
        &img,
        &[
            "--max-memory",
            &BUDGET.to_string(),
            "--max-inflight-bytes",
            &(32 * MIB).to_string(),
            "--stall-timeout",
            &STALL.as_secs().to_string(),
        ],
        &[("NBDFERRY_LOG", "warn")],
    );
    let addr = s.addr.expect("tcp address");
    let pid = s.pid;
    let mut probe = RawConn::tcp(addr);
    probe.handshake("");
    probe.read_at(0, 64 * KIB as u32);
    let idle_rss = rss(pid);
    let idle_threads = status(pid, "Threads:");

    // Sample the server's RSS until the flood is over (or the test
    // fails: the guard stops the sampler either way).
    let done = AtomicBool::new(false);
    let peak = AtomicU64::new(0);
    let stalled_closed = std::sync::Mutex::new(Vec::new());
    thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(20));
            }
        });
        let _stop_sampling = SetOnDrop(&done);

        let mut readers = Vec::new();
        for _ in 0..READERS {
            let mut c = RawConn::tcp(addr);
            c.handshake("");
            let mut batch = Vec::new();
            for i in 0..READS_EACH {
                batch.extend_from_slice(&request_header(0, CMD_READ, i, i * MIB, MIB as u32));
            }
            assert!(c.send(&batch), "server closed a never-reader early");
            readers.push(c);
        }
        for _ in 0..STALLERS {
            let stalled_closed = &stalled_closed;
            scope.spawn(move || {
                let mut c = RawConn::tcp(addr);
                c.handshake("");
                let mut head = request_header(0, CMD_WRITE, 1, 0, WRITE_LEN as u32).to_vec();
                head.resize(28 + (WRITE_LEN * 3 / 4) as usize, 0xEE);
                // Blocks while the server waits for budget to read it.
                c.set_timeout(Duration::from_secs(60));
                if let Some(tcp) = &c.tcp {
                    tcp.set_write_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                }
                if !c.send(&head) {
                    panic!("server closed a staller before its payload was in");
                }
                let sent = Instant::now();
                c.expect_closed("a client stalled mid-payload");
                stalled_closed.lock().unwrap().push(sent.elapsed());
            });
        }

        // A well-behaved client meanwhile: READs one at a time, within
        // the allowance every connection has (the reserve, 64 MiB, over
        // 256 connections).
        let flood_start = Instant::now();
        let mut worst = Duration::ZERO;
        let mut served = 0;
        while count(&s, "client read no byte of its replies") < READERS
            || count(&s, "client sent no byte of a started request") < STALLERS
        {
            assert!(
                flood_start.elapsed() < Duration::from_secs(45),
                "stalled clients were not all cut off: {} never-readers, {} stallers closed",
                count(&s, "client read no byte of its replies"),
                count(&s, "client sent no byte of a started request"),
            );
            let t = Instant::now();
            let off = (served * PROBE_READ) % (IMG_SIZE - PROBE_READ);
            probe.read_at(off, PROBE_READ as u32);
            worst = worst.max(t.elapsed());
            served += 1;
        }
        eprintln!(
            "flood over after {:?}; well-behaved client: {served} reads, worst {worst:?}",
            flood_start.elapsed()
        );
        assert!(
            worst < MAX_LATENCY,
            "a well-behaved client waited {worst:?} for a READ during the flood"
        );
        drop(readers);
    });

    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "RSS idle {} MiB, peak {} MiB (budget {} MiB)",
        idle_rss / MIB,
        peak / MIB,
        BUDGET / MIB
    );
    assert!(
        peak < idle_rss + BUDGET + OVERHEAD,
        "server RSS peaked at {} MiB: over the {} MiB budget plus {} MiB overhead",
        peak / MIB,
        BUDGET / MIB,
        OVERHEAD / MIB
    );

    let closed = stalled_closed.into_inner().unwrap();
    assert_eq!(closed.len(), STALLERS);
    let (min, max) = (closed.iter().min().unwrap(), closed.iter().max().unwrap());
    eprintln!("stallers cut {min:?} to {max:?} after their last byte");
    assert!(
        *min >= STALL - Duration::from_millis(100),
        "a staller was cut {min:?} after its last byte, before the {STALL:?} deadline"
    );
    assert!(
        *max < STALL + Duration::from_secs(5),
        "a staller was cut only {max:?} after its last byte ({STALL:?} deadline)"
    );

    // Memory and threads go back near their idle level.
    let back = Instant::now();
    let mut now = 0;
    let fell = wait_for(Duration::from_secs(30), || {
        now = rss(pid);
        now < idle_rss + 32 * MIB
    });
    assert!(
        fell,
        "RSS still {} MiB 30s after the flood (idle {} MiB)",
        now / MIB,
        idle_rss / MIB
    );
    wait_until(Duration::from_secs(30), "blocking threads to exit", || {
        status(pid, "Threads:") <= idle_threads + 4
    });
    eprintln!(
        "back to {} MiB and {} threads after {:?}",
        rss(pid) / MIB,
        status(pid, "Threads:"),
        back.elapsed()
    );
    probe.read_at(0, 64 * KIB as u32);
    probe.disconnect();
    s.stop();
}
