//! Read replies sent straight from the page cache (sendfile on plain
//! sockets, a mapping of the file handed to the encryption over TLS): they
//! must carry exactly the bytes a copied reply would, while the data under
//! them changes, and go out whole to a client that takes them slowly.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use crate::harness::*;

/// A server of a random image written just before, so that its pages are
/// cached and reads take the zero-copy path (`zero_copied` proves it).
struct Cached {
    dir: tempfile::TempDir,
    data: Vec<u8>,
    admin: PathBuf,
    s: Server,
    /// The credentials of a TLS server (its clients use them too).
    certs: Option<PathBuf>,
}

impl Cached {
    fn serve(size: usize, seed: u64) -> Cached {
        Cached::serve_with(size, seed, false)
    }

    fn serve_with(size: usize, seed: u64, tls: bool) -> Cached {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let mut data = vec![0u8; size];
        Rng::new(seed).fill(&mut data);
        fs::write(&img, &data).unwrap();
        let admin = dir.path().join("admin.sock");
        let certs = tls.then(|| {
            let d = dir.path().join("pki");
            run(nbdferry().args(["certs", "init"]).arg(&d));
            d
        });
        let mut args = vec!["--admin-socket", admin.to_str().unwrap()];
        if let Some(c) = &certs {
            args.extend(["--tls=require", "--tls-creds", c.to_str().unwrap()]);
        }
        let s = Server::serve(dir.path(), &img, &args);
        Cached {
            dir,
            data,
            admin,
            s,
            certs,
        }
    }

    /// The server's TCP and Unix socket URIs, `nbds` ones for TLS.
    fn uris(&self) -> (String, String) {
        let (tcp, unix) = (self.s.uri(), self.s.unix_uri());
        match &self.certs {
            None => (tcp, unix),
            Some(c) => (
                format!("nbds{}?tls-certificates={}", &tcp[3..], c.display()),
                format!("nbds{}&tls-certificates={}", &unix[3..], c.display()),
            ),
        }
    }

    /// Bytes of reads the server sent from the page cache, from its
    /// metrics.
    fn zero_copied(&self) -> u64 {
        let (code, body) = admin_http(&self.admin, "GET", "/metrics", "");
        assert_eq!(code, 200, "metrics: {body}");
        body.lines()
            .filter(|l| l.starts_with("nbdferry_read_zero_copy_bytes_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }
}

/// One writer rewrites blocks with patterns that name the block, the
/// sector and the generation; three readers (TCP and Unix socket,
/// structured and simple replies) read ranges whose last write has been
/// acknowledged, while the writer keeps rewriting other blocks, and check
/// every byte against the model.
const CHANGING_SCRIPT: &str = r#"
import os, random, nbd
size = int(os.environ["SIZE"])
BLK = 64 * 1024
nblocks = size // BLK
rng = random.Random(7)
gen = [0] * nblocks

def connect(uri, structured=True):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-certificates= names a directory
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    assert h.get_tls_negotiated() == (os.environ["TLS"] == "1"), uri
    return h

def pattern(b, g):
    out = bytearray()
    for s in range(BLK // 4096):
        head = b"%08d:%08d:%04d|" % (b, g, s)
        out += head + bytes([(b * 31 + g * 7 + s) & 255]) * (4096 - len(head))
    return bytes(out)

w = connect(os.environ["TCP"])
for b in range(nblocks):
    w.pwrite(pattern(b, 0), b * BLK)
readers = [connect(uri, structured) for uri, structured in
           [(os.environ["TCP"], True), (os.environ["UNIX"], True), (os.environ["TCP"], False)]]

checked = 0
for rnd in range(int(os.environ["ROUNDS"])):
    first = rng.randrange(nblocks)
    count = min(rng.choice([1, 1, 2, 4, 16]), nblocks - first)
    b = rng.randrange(first, first + count)
    gen[b] += 1
    w.pwrite(pattern(b, gen[b]), b * BLK)
    # Writes to other blocks, in flight while the read runs.
    others = [o for o in rng.sample(range(nblocks), 8) if not first <= o < first + count]
    writes = [(o, gen[o] + 1, w.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(o, gen[o] + 1))), o * BLK))
              for o in others]
    r = rng.choice(readers)
    buf = nbd.Buffer(count * BLK)
    cookie = r.aio_pread(buf, first * BLK)
    while not r.aio_command_completed(cookie):
        r.poll(-1)
    got = buf.to_bytearray()
    want = b"".join(pattern(x, gen[x]) for x in range(first, first + count))
    if got != want:
        bad = next(i for i in range(len(want)) if got[i] != want[i])
        raise SystemExit("round %d: byte %d of blocks %d+%d differs: got %r want %r" %
                         (rnd, bad, first, count, bytes(got[bad - bad % 4096:][:24]), want[bad - bad % 4096:][:24]))
    checked += len(got)
    for o, g, c in writes:
        while not w.aio_command_completed(c):
            w.poll(-1)
        gen[o] = max(gen[o], g)
print("checked", checked)
"#;

#[test]
fn zero_copy_reads_carry_exactly_the_latest_acknowledged_data() {
    reads_carry_the_latest_data(false);
}

#[test]
fn mapped_reads_over_tls_carry_exactly_the_latest_acknowledged_data() {
    reads_carry_the_latest_data(true);
}

fn reads_carry_the_latest_data(tls: bool) {
    require_peer("nbdsh");
    let size = 16 * MIB as usize;
    let c = Cached::serve_with(size, 91, tls);
    let before = c.zero_copied();
    let (tcp, unix) = c.uris();
    let out = nbdsh_script(
        c.dir.path(),
        CHANGING_SCRIPT,
        &[
            ("TCP", tcp),
            ("UNIX", unix),
            ("TLS", u8::from(tls).to_string()),
            ("SIZE", size.to_string()),
            ("ROUNDS", "600".to_string()),
        ],
    );
    let checked: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("script output: {out}"));
    assert!(checked >= 600 * 64 * KIB, "only {checked} bytes checked");
    let sent = c.zero_copied() - before;
    assert!(
        sent >= checked / 2,
        "only {sent} of {checked} checked bytes went out from the page cache"
    );
    c.s.stop();
}

/// Reads below 64 KiB are copied into their reply (sendfile costs more
/// than it saves there); 64 KiB and more go out from the page cache. Both
/// carry the image's bytes.
#[test]
fn small_reads_are_copied_and_large_ones_sent_from_the_cache() {
    let size = 4 * MIB as usize;
    let srv = Cached::serve(size, 93);
    let mut c = RawConn::tcp(srv.s.addr.unwrap());
    c.start_options();
    c.go("");
    let mut read = |cookie: u64, off: usize, len: usize| {
        let before = srv.zero_copied();
        assert!(c.send_request(0, CMD_READ, cookie, off as u64, len as u32));
        assert_eq!(c.read_simple_reply(), Some((0, cookie)));
        assert!(c.must_read(len, "read reply data") == srv.data[off..][..len]);
        srv.zero_copied() - before
    };
    for (i, len) in [512, 4096, 65535].into_iter().enumerate() {
        assert_eq!(read(i as u64, 8192 * i + 512, len), 0, "{len} bytes");
    }
    for (i, len) in [65536, 1 << 20].into_iter().enumerate() {
        assert_eq!(
            read(10 + i as u64, MIB as usize * i + 4096, len),
            len as u64,
            "{len} bytes"
        );
    }
    srv.s.stop();
}

/// A client that sends 96 READs of up to 1 MiB and then takes the replies
/// a few KiB at a time: the socket fills and empties again and again, so every
/// reply goes out in many partial sends. Each must arrive whole, in the
/// right place, and the connection must stay usable.
#[test]
fn a_slow_reader_gets_whole_zero_copy_replies() {
    let size = 8 * MIB as usize;
    let srv = Cached::serve(size, 92);
    let data = &srv.data;
    let before = srv.zero_copied();
    let mut c = RawConn::tcp(srv.s.addr.unwrap());
    c.start_options();
    c.go("");
    let mut rng = Rng::new(5);
    let mut want: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut total = 0;
    for cookie in 0..96u64 {
        let len = [4096, 65536, 512 * 1024, 1 << 20][rng.below(4) as usize];
        let off = rng.below((size - len) as u64 / 512) * 512;
        assert!(c.send_request(0, CMD_READ, cookie, off, len as u32));
        want.insert(cookie, (off, len));
        total += len;
    }
    while !want.is_empty() {
        let (err, cookie) = c.read_simple_reply().expect("server closed mid-replies");
        assert_eq!(err, 0, "READ {cookie} failed");
        let (off, len) = want.remove(&cookie).expect("unknown or repeated cookie");
        let mut got = Vec::with_capacity(len);
        while got.len() < len {
            let n = (len - got.len()).min(3000);
            got.extend(c.must_read(n, "read reply data"));
        }
        assert!(
            got == data[off as usize..][..len],
            "reply {cookie} ({len} bytes at {off}) differs"
        );
    }
    let sent = srv.zero_copied() - before;
    assert!(
        sent as usize >= total / 2,
        "only {sent} of {total} bytes went out from the page cache"
    );
    // Still in step: one more read after all of that.
    assert!(c.send_request(0, CMD_READ, 1000, 4096, 4096));
    let (err, cookie) = c.read_simple_reply().unwrap();
    assert_eq!((err, cookie), (0, 1000));
    assert_eq!(c.must_read(4096, "last read"), data[4096..8192]);
    srv.s.stop();
}
