//! Hostile and malformed input over raw TCP (every read has a timeout).
//! Each case checks that the server answers with the right error or closes
//! that one connection, while a bystander connection opened beforehand keeps
//! getting correct data, new clients still work, and the server finally
//! exits 0 on SIGTERM (it did not crash).

use crate::harness::*;
use std::io::Write;
use std::path::PathBuf;

const HOSTILE_SIZE: u64 = 64 * MIB;

/// How fast the server must react to input it can not accept: well below
/// any handshake/idle timeout, so that "closed by a timeout" is not taken
/// for "rejected".
const PROMPT: std::time::Duration = std::time::Duration::from_secs(4);

struct Scene {
    _dir: TempDir,
    img: PathBuf,
    server: Server,
    bystander: RawConn,
    original: u64,
}

impl Scene {
    fn new(seed: u64, extra: &[&str]) -> Scene {
        let dir = tmpdir();
        let img = dir.path().join("disk.raw");
        make_sparse_image(&img, HOSTILE_SIZE, seed);
        let server = Server::serve(dir.path(), &img, extra);
        let mut bystander = RawConn::tcp(server.addr.unwrap());
        bystander.handshake("");
        assert_eq!(bystander.size, HOSTILE_SIZE, "export size from GO");
        let original = hash_file(&img);
        Scene {
            _dir: dir,
            img,
            server,
            bystander,
            original,
        }
    }

    fn conn(&self) -> RawConn {
        RawConn::tcp(self.server.addr.unwrap())
    }

    /// A fresh connection in transmission phase (simple replies).
    fn client(&self) -> RawConn {
        let mut c = self.conn();
        c.handshake("");
        c
    }

    /// The bystander and a brand-new client both read correct data.
    fn check_alive(&mut self, after: &str) {
        assert!(self.server.is_running(), "server died after {after}");
        for (off, len) in [
            (0u64, 64 * 1024u32),
            (HOSTILE_SIZE / 2, 256 * 1024),
            (HOSTILE_SIZE - 12 * KIB, 12 * 1024),
        ] {
            let want = read_range(&self.img, off, len as usize);
            let got = self.bystander.read_at(off, len);
            assert!(
                got == want,
                "bystander read {off}+{len} wrong after {after}"
            );
        }
        let mut c = self.client();
        let got = c.read_at(4096, 8192);
        assert_eq!(
            got,
            read_range(&self.img, 4096, 8192),
            "new client read wrong after {after}"
        );
        c.disconnect();
    }

    /// Final checks: full copy via nbdcopy matches, image unchanged, exit 0.
    fn finish(mut self) {
        self.check_alive("the test");
        let Scene {
            _dir,
            img,
            server,
            bystander,
            original,
        } = self;
        let out = _dir.path().join("final.raw");
        run(peer("nbdcopy").arg(server.uri()).arg(&out));
        assert_same_content(&img, &out);
        bystander.disconnect();
        server.stop();
        assert_eq!(hash_file(&img), original, "image changed by hostile input");
    }
}

fn prompt_closed(c: &mut RawConn, what: &str) {
    c.set_timeout(PROMPT);
    c.expect_closed(&format!("{what} (must close within {PROMPT:?})"));
}

#[test]
fn garbage_client_flags_and_bytes() {
    let mut sc = Scene::new(61, &[]);
    // Unknown client flag bits: the server must drop the connection.
    let mut c = sc.conn();
    c.greeting();
    c.send(&0xffff_fff0u32.to_be_bytes());
    prompt_closed(&mut c, "unknown client flags");
    sc.check_alive("unknown client flags");
    // 64 KiB of random garbage right after connecting.
    let mut c = sc.conn();
    let mut junk = vec![0u8; 65536];
    Rng::new(1).fill(&mut junk);
    c.send(&junk);
    prompt_closed(&mut c, "garbage bytes");
    sc.check_alive("garbage bytes");
    // Garbage after a valid greeting exchange (bad option magic).
    let mut c = sc.conn();
    c.start_options();
    c.send(&junk[..4096]);
    prompt_closed(&mut c, "bad option magic");
    sc.check_alive("bad option magic");
    sc.finish();
}

#[test]
fn truncated_and_huge_options() {
    let mut sc = Scene::new(62, &[]);
    // Option header promising 100 bytes, only 10 arrive, then EOF.
    let mut c = sc.conn();
    c.start_options();
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0u8; 10]);
    c.send(&b);
    c.s.shutdown_write();
    prompt_closed(&mut c, "truncated option");
    sc.check_alive("truncated option");
    // Half an option header, then EOF.
    let mut c = sc.conn();
    c.start_options();
    c.send(&IHAVEOPT.to_be_bytes()[..6]);
    c.s.shutdown_write();
    prompt_closed(&mut c, "truncated option header");
    // Options with a 4 GiB length field (unknown option and GO): the server
    // must not wait for 4 GiB; it answers with an error and/or closes.
    for code in [0x4242u32, OPT_GO, OPT_LIST] {
        let mut c = sc.conn();
        c.start_options();
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b.extend_from_slice(&[0u8; 64]);
        c.send(&b);
        c.set_timeout(PROMPT);
        if let Some((opt, ty, _)) = c.read_option_reply() {
            assert_eq!(opt, code, "reply does not echo the option");
            assert!(
                ty & 0x8000_0000 != 0,
                "4 GiB option {code:#x} got a non-error reply {ty:#x}"
            );
        }
        prompt_closed(&mut c, "4 GiB option");
        sc.check_alive("4 GiB option");
    }
    sc.finish();
}

#[test]
fn bad_but_well_framed_options_are_answered() {
    let mut sc = Scene::new(63, &[]);
    let mut c = sc.conn();
    c.start_options();
    // Unknown option with 1 KiB payload: ERR_UNSUP, connection stays usable.
    c.send_option(0x4242, &[7u8; 1024]);
    let (opt, ty, _) = c.read_option_reply().expect("closed on unknown option");
    assert_eq!((opt, ty), (0x4242, REP_ERR_UNSUP), "unknown option");
    // LIST with a payload: ERR_INVALID.
    c.send_option(OPT_LIST, b"junk");
    let (opt, ty, _) = c.read_option_reply().expect("closed on LIST with payload");
    assert_eq!(opt, OPT_LIST);
    assert_eq!(ty, 0x8000_0003, "LIST with data must get ERR_INVALID");
    // GO whose name length overruns the option: ERR_INVALID.
    let mut d = Vec::new();
    d.extend_from_slice(&1000u32.to_be_bytes());
    d.extend_from_slice(b"abc");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(OPT_GO, &d);
    let (opt, ty, _) = c.read_option_reply().expect("closed on malformed GO");
    assert_eq!(opt, OPT_GO);
    assert_eq!(ty, 0x8000_0003, "malformed GO must get ERR_INVALID");
    // GO for an unknown export: ERR_UNKNOWN.
    let mut d = Vec::new();
    d.extend_from_slice(&7u32.to_be_bytes());
    d.extend_from_slice(b"missing");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(OPT_GO, &d);
    let (_, ty, _) = c
        .read_option_reply()
        .expect("closed on GO for unknown export");
    assert_eq!(
        ty, 0x8000_0006,
        "GO for an unknown export must get ERR_UNKNOWN"
    );
    // LIST works and names the default export.
    c.send_option(OPT_LIST, &[]);
    let mut n = 0;
    loop {
        let (_, ty, data) = c.read_option_reply().expect("closed during LIST");
        match ty {
            REP_SERVER => {
                assert!(data.len() >= 4 && be32(&data) as usize <= data.len() - 4);
                n += 1;
            }
            REP_ACK => break,
            t => panic!("LIST failed: {t:#x}"),
        }
    }
    assert!(n >= 1, "LIST returned no exports");
    // And after all that, GO succeeds and data is right.
    c.go("");
    assert_eq!(c.read_at(0, 4096), read_range(&sc.img, 0, 4096));
    c.disconnect();
    // EXPORT_NAME for an unknown export can only be refused by closing.
    let mut c = sc.conn();
    c.start_options();
    c.send_option(OPT_EXPORT_NAME, b"no-such-export");
    prompt_closed(&mut c, "EXPORT_NAME for an unknown export");
    // ABORT gets an ACK (or a close), never a hang.
    let mut c = sc.conn();
    c.start_options();
    c.send_option(OPT_ABORT, &[]);
    if let Some((opt, ty, _)) = c.read_option_reply() {
        assert_eq!((opt, ty), (OPT_ABORT, REP_ACK));
    }
    prompt_closed(&mut c, "ABORT");
    sc.check_alive("bad options");
    sc.finish();
}

#[test]
fn oversized_zero_length_and_unknown_requests() {
    let mut sc = Scene::new(64, &[]);
    let mut c = sc.client();
    let size = c.size;
    // Unknown command types: EINVAL, connection stays in sync.
    for ty in [42u16, 0x00ff, 0xffff] {
        assert!(c.send_request(0, ty, 7, 0, 4096));
        let (err, cookie) = c.read_simple_reply().expect("closed on unknown command");
        assert_eq!(cookie, 7);
        assert_eq!(err, EINVAL, "unknown command {ty} must fail with EINVAL");
    }
    // Unknown flag on READ: EINVAL.
    assert!(c.send_request(0x8000, CMD_READ, 8, 0, 4096));
    let (err, _) = c.read_simple_reply().expect("closed on unknown flag");
    assert_eq!(err, EINVAL, "unknown READ flag");
    // Zero-length READ / WRITE / TRIM / WRITE_ZEROES / CACHE: any answer, no data, no close.
    for ty in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
        assert!(c.send_request(0, ty, 9, 4096, 0));
        let (err, cookie) = c
            .read_simple_reply()
            .unwrap_or_else(|| panic!("server closed on zero-length command {ty}"));
        assert_eq!(cookie, 9);
        assert!(
            err == 0 || err == EINVAL,
            "zero-length command {ty}: error {err}"
        );
    }
    assert_eq!(
        c.read_at(0, 512),
        read_range(&sc.img, 0, 512),
        "out of sync after zero-length requests"
    );
    // Past the end / overflowing ranges.
    for (ty, off, len) in [
        (CMD_READ, size, 4096u32),
        (CMD_READ, size - 512, 4096),
        (CMD_READ, u64::MAX - 1023, 4096),
        (CMD_TRIM, size - 512, 4096),
        (CMD_WRITE_ZEROES, u64::MAX - 1023, 4096),
        (CMD_CACHE, u64::MAX - 1023, 4096),
    ] {
        assert!(c.send_request(0, ty, 10, off, len));
        let (err, _) = c
            .read_simple_reply()
            .expect("closed on out-of-range request");
        let ok = match ty {
            CMD_WRITE_ZEROES => err == ENOSPC || err == EINVAL,
            _ => err == EINVAL,
        };
        assert!(ok, "command {ty} at {off}+{len}: got error {err}");
    }
    // WRITE past the end: payload consumed, ENOSPC (or EINVAL).
    let err = c.write_at(size - 512, &[0x11; 4096]);
    assert!(
        err == ENOSPC || err == EINVAL,
        "WRITE past end: error {err}"
    );
    assert_eq!(
        c.read_at(size - 512, 512),
        read_range(&sc.img, size - 512, 512)
    );
    // Oversized READ (48 MiB > 32 MiB maximum payload, inside the export).
    assert!(c.send_request(0, CMD_READ, 11, 0, 48 * MIB as u32));
    match c.read_simple_reply() {
        None => {}
        Some((err, _)) => {
            // EOVERFLOW is for DF reads; a plain READ above the maximum
            // payload broke an advertised limit.
            assert_eq!(err, EINVAL, "48 MiB READ");
            assert_eq!(
                c.read_at(0, 4096),
                read_range(&sc.img, 0, 4096),
                "out of sync after 48 MiB READ"
            );
        }
    }
    sc.check_alive("bad requests");
    sc.finish();
}

#[test]
fn write_larger_than_32_mib() {
    let mut sc = Scene::new(65, &[]);
    let mut c = sc.client();
    let len = 40 * MIB as u32;
    let off = 8 * MIB;
    assert!(c.send_request(0, CMD_WRITE, 12, off, len));
    // Send the payload from another thread: the server may consume and
    // discard it, or hang up, in which case the writes fail.
    let mut tcp = c.tcp.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0xeeu8; MIB as usize];
        for _ in 0..40 {
            if tcp.write_all(&chunk).is_err() {
                return false;
            }
        }
        true
    });
    match c.read_simple_reply() {
        None => {
            let _ = writer.join();
        }
        Some((err, cookie)) => {
            assert_eq!(cookie, 12);
            assert!(
                err != 0,
                "a 40 MiB WRITE (above the 32 MiB maximum) succeeded"
            );
            assert_eq!(err, EINVAL, "40 MiB WRITE");
            // The payload was consumed: the connection is still in sync, or
            // the server closes it after the error.
            if writer.join().unwrap() && c.send_request(0, CMD_READ, 13, off, 4096) {
                match c.read_simple_reply() {
                    None => {}
                    Some((e, _)) => {
                        assert_eq!(e, 0);
                        assert_eq!(c.must_read(4096, "data"), read_range(&sc.img, off, 4096));
                    }
                }
            }
        }
    }
    sc.check_alive("40 MiB WRITE");
    assert_eq!(
        hash_file(&sc.img),
        sc.original,
        "rejected WRITE modified the image"
    );
    sc.finish();
}

#[test]
fn bad_request_magic_and_abrupt_disconnects() {
    let mut sc = Scene::new(66, &[]);
    let mut c = sc.client();
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.send(&b);
    prompt_closed(&mut c, "bad request magic");
    sc.check_alive("bad request magic");
    // Half a request header, then vanish.
    let mut c = sc.client();
    c.send(&REQUEST_MAGIC.to_be_bytes());
    drop(c);
    // Half a WRITE payload, then vanish.
    let mut c = sc.client();
    c.send_request(0, CMD_WRITE, 1, 0, 65536);
    // (the same bytes as on disk, so even a partial apply changes nothing)
    c.send(&read_range(&sc.img, 0, 1000));
    drop(c);
    // Many connections that stall in the handshake or leave immediately.
    let stalled: Vec<RawConn> = (0..20).map(|_| sc.conn()).collect();
    for _ in 0..20 {
        let mut c = sc.conn();
        c.greeting();
    }
    sc.check_alive("stalled handshakes");
    drop(stalled);
    sc.check_alive("abrupt disconnects");
    sc.finish();
}

#[test]
fn read_only_export_rejects_writes_with_eperm() {
    let sc = Scene::new(67, &["--read-only"]);
    let mut c = sc.client();
    assert!(c.tflags & 2 != 0, "READ_ONLY transmission flag not set");
    assert_eq!(
        c.write_at(0, &[1u8; 4096]),
        EPERM,
        "WRITE on read-only export"
    );
    for ty in [CMD_TRIM, CMD_WRITE_ZEROES] {
        assert!(c.send_request(0, ty, 3, 0, 4096));
        let (err, _) = c.read_simple_reply().expect("closed");
        assert_eq!(err, EPERM, "command {ty} on read-only export");
    }
    assert!(c.send_request(0, CMD_FLUSH, 4, 0, 0));
    let (err, _) = c.read_simple_reply().expect("closed");
    assert!(
        err == 0 || err == EINVAL,
        "FLUSH on read-only export: {err}"
    );
    assert_eq!(c.read_at(0, 4096), read_range(&sc.img, 0, 4096));
    c.disconnect();
    sc.finish();
}

/// With structured replies negotiated, even a failing READ must get a
/// structured error chunk, never a simple reply.
#[test]
fn structured_read_errors_are_chunks() {
    let sc = Scene::new(68, &[]);
    let mut c = sc.conn();
    c.start_options();
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    let (_, ty, _) = c.read_option_reply().expect("closed on STRUCTURED_REPLY");
    assert_eq!(ty, REP_ACK, "STRUCTURED_REPLY not acknowledged");
    c.go("");
    let size = c.size;
    assert!(c.send_request(0, CMD_READ, 21, size, 4096));
    let h = c.must_read(20, "structured reply header");
    assert_eq!(
        be32(&h[0..4]),
        0x668E_33EF,
        "READ error was not a structured reply: {h:02x?}"
    );
    let flags = be16(&h[4..6]);
    let ty = be16(&h[6..8]);
    assert_eq!(be64(&h[8..16]), 21, "cookie");
    let len = be32(&h[16..20]) as usize;
    assert!(len < 1000, "error chunk payload too long for qemu: {len}");
    let p = c.must_read(len, "chunk payload");
    assert!(
        ty == 0x8001 || ty == 0x8002,
        "expected an error chunk, got type {ty:#x}"
    );
    assert_eq!(flags & 1, 1, "error chunk must carry DONE");
    assert_eq!(be32(&p[0..4]), EINVAL, "READ past end error");
    // A good READ gives data chunks covering the range.
    assert!(c.send_request(0, CMD_READ, 22, 0, 8192));
    let mut got = vec![None::<u8>; 8192];
    loop {
        let h = c.must_read(20, "chunk header");
        assert_eq!(be32(&h[0..4]), 0x668E_33EF);
        assert_eq!(be64(&h[8..16]), 22);
        let (flags, ty, len) = (be16(&h[4..6]), be16(&h[6..8]), be32(&h[16..20]) as usize);
        let p = c.must_read(len, "chunk payload");
        match ty {
            0 => assert_eq!(len, 0),
            1 => {
                let off = be64(&p[0..8]) as usize;
                for (i, &b) in p[8..].iter().enumerate() {
                    got[off + i] = Some(b);
                }
            }
            2 => {
                let off = be64(&p[0..8]) as usize;
                let n = be32(&p[8..12]) as usize;
                for g in &mut got[off..off + n] {
                    *g = Some(0);
                }
            }
            t => panic!("unexpected chunk type {t:#x}"),
        }
        if flags & 1 == 1 {
            break;
        }
    }
    let got: Vec<u8> = got
        .into_iter()
        .enumerate()
        .map(|(i, b)| b.unwrap_or_else(|| panic!("byte {i} not covered by any chunk")))
        .collect();
    assert_eq!(got, read_range(&sc.img, 0, 8192));
    c.disconnect();
    sc.finish();
}

/// Reads the data of READ reply `cookie` and checks it against the image.
fn expect_data(c: &mut RawConn, image: &[u8], cookie: u64, off: usize, len: usize) {
    let got = c.must_read(len, "READ data");
    assert!(
        got == image[off..off + len],
        "READ {cookie} at {off}: wrong bytes"
    );
}

/// A client that sends many requests before reading any reply (so the
/// socket fills in the middle of replies) still gets every reply whole:
/// each cookie once, each READ's bytes equal to the image, and the
/// payload-less FLUSH replies (sent ahead of queued data) never land
/// inside a READ's data.
#[test]
fn replies_stay_whole_when_the_client_reads_late() {
    let scene = Scene::new(9, &[]);
    let image = std::fs::read(&scene.img).unwrap();
    let mut c = scene.client();
    let len = 256 * 1024u32;
    let mut expect = std::collections::HashMap::new();
    for i in 0..120u64 {
        // Unaligned offsets, some overlapping, all inside the image.
        let off = (i * 7 * u64::from(len) / 3 + i * 512) % (HOSTILE_SIZE - u64::from(len));
        assert!(c.send_request(0, CMD_READ, i, off, len), "server closed");
        expect.insert(i, Some(off as usize));
        if i % 8 == 7 {
            assert!(
                c.send_request(0, CMD_FLUSH, 1000 + i, 0, 0),
                "server closed"
            );
            expect.insert(1000 + i, None);
        }
    }
    while !expect.is_empty() {
        let (err, cookie) = c.read_simple_reply().expect("server closed mid-way");
        assert_eq!(err, 0, "request {cookie} failed");
        let want = expect
            .remove(&cookie)
            .unwrap_or_else(|| panic!("unknown or repeated cookie {cookie}"));
        if let Some(off) = want {
            expect_data(&mut c, &image, cookie, off, len as usize);
        }
    }
    c.disconnect();
    scene.finish();
}

/// READs of mixed large sizes while the send queue is full: deferred READs
/// hold in-flight byte permits that a later request waits for, so the
/// server must start them while it waits, or the connection stalls for
/// good. Here a 16 MiB reply is being sent (the client holds off reading
/// its data), READs of 32 + 32 + 32 + 12 MiB are deferred, and a last
/// 32 MiB READ needs more of the default 128 MiB than the first reply
/// frees.
#[test]
fn mixed_large_reads_do_not_stall() {
    let scene = Scene::new(10, &[]);
    let image = std::fs::read(&scene.img).unwrap();
    let mut c = scene.client();
    c.set_timeout(std::time::Duration::from_secs(20));
    let sizes = [16 * MIB, 32 * MIB, 32 * MIB, 32 * MIB, 12 * MIB, 32 * MIB];
    let place = |i: usize| (i as u64 * 3 * MIB + 4096 * i as u64) % (HOSTILE_SIZE - sizes[i]);
    let check = |c: &mut RawConn, cookie: u64| {
        let i = cookie as usize;
        expect_data(c, &image, cookie, place(i) as usize, sizes[i] as usize);
    };
    assert!(c.send_request(0, CMD_READ, 0, place(0), sizes[0] as u32));
    // Its header arriving means the 16 MiB reply is on its way out.
    let (err, cookie) = c.read_simple_reply().expect("server closed");
    assert_eq!((err, cookie), (0, 0));
    for (i, &len) in sizes.iter().enumerate().skip(1) {
        assert!(
            c.send_request(0, CMD_READ, i as u64, place(i), len as u32),
            "server closed"
        );
    }
    check(&mut c, 0);
    let mut left: std::collections::BTreeSet<u64> = (1..sizes.len() as u64).collect();
    while !left.is_empty() {
        let (err, cookie) = c
            .read_simple_reply()
            .unwrap_or_else(|| panic!("stalled or closed; waiting for {left:?}"));
        assert_eq!(err, 0, "request {cookie} failed");
        assert!(left.remove(&cookie), "unknown or repeated cookie {cookie}");
        check(&mut c, cookie);
    }
    c.disconnect();
    scene.finish();
}
