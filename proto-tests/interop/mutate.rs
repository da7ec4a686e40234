//! Fuzzing the running server from outside: valid client sessions
//! (handshake in every reply mode, then every command) are mutated at
//! random and replayed against one server. Every session must end promptly
//! (no hang), the server must survive all of them, and a read-only export
//! beside the victim must still serve exactly its file.
//!
//! `NBDFERRY_MUTATE_SESSIONS=N` runs more sessions (the default keeps the
//! suite fast); the seed is printed so a failure can be replayed.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::*;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;
const OPT_LIST: u32 = 3;

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn request(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    off: u64,
    len: u64,
) {
    if extended {
        out.extend_from_slice(&0x21E4_1C71u32.to_be_bytes());
    } else {
        out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&off.to_be_bytes());
    if extended {
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// A well-formed session in one of the reply modes, with every command.
fn session(rng: &mut Rng, size: u64) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    let mode = rng.below(4);
    let extended = mode == 2;
    match mode {
        0 => {}
        1 => option(&mut s, OPT_STRUCTURED_REPLY, &[]),
        _ => option(&mut s, OPT_EXTENDED_HEADERS, &[]),
    }
    if rng.below(2) == 0 {
        option(&mut s, OPT_LIST, &[]);
    }
    if mode != 0 {
        let mut q = Vec::new();
        q.extend_from_slice(&0u32.to_be_bytes());
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        option(&mut s, OPT_SET_META_CONTEXT, &q);
    }
    if mode == 3 {
        option(&mut s, OPT_EXPORT_NAME, b"");
    } else {
        option(&mut s, OPT_GO, &[0, 0, 0, 0, 0, 1, 0, 3]);
    }
    for cookie in 0..rng.below(24) {
        let cmd = rng.below(9) as u16;
        let len = [0, 1, 512, 4096, 65536][rng.below(5) as usize];
        let off = rng.below(size / 512) * 512;
        let flags = rng.below(64) as u16;
        let with_payload = cmd == 1 || (extended && flags & 0x20 != 0);
        request(&mut s, extended, flags, cmd, cookie, off, len);
        if with_payload {
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            s.extend_from_slice(&data);
        }
    }
    request(&mut s, extended, 0, 2, 999, 0, 0); // DISC
    s
}

/// Values that break length checks when written over a length field.
const NASTY: [u32; 8] = [
    0,
    1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    32 << 20,
    (32 << 20) + 1,
    4097,
];

fn mutate(rng: &mut Rng, s: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if s.is_empty() {
            return;
        }
        let at = rng.below(s.len() as u64) as usize;
        match rng.below(6) {
            0 => s[at] ^= 1 << rng.below(8),
            1 => s[at] = rng.next_u64() as u8,
            2 if at + 4 <= s.len() => {
                let v = NASTY[rng.below(NASTY.len() as u64) as usize];
                s[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 => s.truncate(at),
            4 => {
                let end = (at + 1 + rng.below(64) as usize).min(s.len());
                let dup = s[at..end].to_vec();
                s.splice(at..at, dup);
            }
            _ => {
                let mut junk = vec![0u8; 1 + rng.below(32) as usize];
                rng.fill(&mut junk);
                s.splice(at..at, junk);
            }
        }
    }
}

/// Sends one session, half-closes, and reads until the server closes.
/// Returns false if the server neither finished nor closed in time.
fn replay(addr: std::net::SocketAddr, bytes: &[u8], deadline: Duration) -> bool {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return false;
    };
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    c.set_write_timeout(Some(deadline)).unwrap();
    let started = Instant::now();
    // The server may hang up halfway through our bytes; that is an answer.
    let _ = c.write_all(bytes);
    let _ = c.shutdown(Shutdown::Write);
    let mut buf = vec![0u8; 1 << 16];
    while started.elapsed() < deadline {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn mutated_sessions_neither_crash_nor_hang_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.raw");
    let check = dir.path().join("check.raw");
    make_sparse_image(&victim, 8 * MIB, 1);
    make_sparse_image(&check, 8 * MIB, 2);
    let cfg = dir.path().join("exports.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[export]]\nname = \"victim\"\npath = \"{}\"\n\n[[export]]\nname = \"check\"\npath = \"{}\"\nread-only = true\n",
            victim.display(),
            check.display()
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let mut s = Server::serve_config(&state, &cfg);
    let addr = s.addr.expect("tcp address");
    let sessions: u64 = std::env::var("NBDFERRY_MUTATE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("mutation seed {seed}, {sessions} sessions");
    let mut rng = Rng::new(seed);
    for i in 0..sessions {
        let mut bytes = session(&mut rng, 8 * MIB);
        mutate(&mut rng, &mut bytes);
        assert!(
            replay(addr, &bytes, Duration::from_secs(15)),
            "session {i} (seed {seed}) neither finished nor closed within 15 s"
        );
        assert!(
            s.is_running(),
            "server died at session {i} (seed {seed}); log:\n{}",
            s.log_text()
        );
    }
    // The server still serves the untouched export exactly.
    let out = dir.path().join("out.raw");
    run(peer("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &s.uri_for("check"),
        out.to_str().unwrap(),
    ]));
    assert_eq!(
        hash_file(&out),
        hash_file(&check),
        "read-only export changed or misread after mutation"
    );
    s.stop();
}
