//! libnbd tools against nbdferry: nbdinfo, nbdcopy, nbdsh (Python scripts
//! run under /usr/bin/python3 through nbdsh).

use crate::harness::*;

#[test]
fn nbdinfo_json_list_and_size() {
    let (dir, img) = fixture(21);
    let s = Server::serve(dir.path(), &img, &["--name", "disk"]).with_name("disk");
    for uri in [s.uri(), s.unix_uri()] {
        let size = run(peer("nbdinfo").arg("--size").arg(&uri));
        assert_eq!(size.trim(), IMG_SIZE.to_string(), "nbdinfo --size");

        let js = run(peer("nbdinfo").arg("--json").arg(&uri));
        assert_eq!(json_u64(&js, "export-size"), Some(IMG_SIZE), "{js}");
        assert_eq!(
            json_str(&js, "export-name").as_deref(),
            Some("disk"),
            "{js}"
        );
        assert_eq!(json_bool(&js, "structured"), Some(true), "{js}");
        assert_eq!(json_bool(&js, "is_read_only"), Some(false), "{js}");
        for cap in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_multi_conn",
        ] {
            assert_eq!(
                json_bool(&js, cap),
                Some(true),
                "{cap} not advertised:\n{js}"
            );
        }
        assert!(
            js.contains("\"base:allocation\""),
            "no base:allocation context:\n{js}"
        );
        let min = json_u64(&js, "block_size_minimum");
        let max = json_u64(&js, "block_size_maximum");
        if let (Some(min), Some(max)) = (min, max) {
            assert!(
                min.is_power_of_two() && min <= 65536,
                "bad minimum block size {min}"
            );
            assert!(max >= MIB, "maximum block size {max} is below 1 MiB");
        }

        let list = run(peer("nbdinfo").arg("--list").arg(&uri));
        assert!(
            list.contains("export=\"disk\""),
            "nbdinfo --list does not show `disk`:\n{list}"
        );
        assert!(list.contains("export-size: 67108864"), "{list}");
    }
    // Unknown export name is refused.
    let (_, err) = run_fail(peer("nbdinfo").arg(s.uri_for("no-such-export")));
    assert!(!err.is_empty());
    s.stop();
}

#[test]
fn nbdinfo_map_matches_backing_file() {
    let (dir, img) = fixture(22);
    let s = Server::serve(dir.path(), &img, &[]);
    assert_same_map("nbdinfo --map (tcp)", &nbdinfo_map(&s.uri()), &img);
    assert_same_map("nbdinfo --map (unix)", &nbdinfo_map(&s.unix_uri()), &img);
    // --totals: data percentage consistent with the file.
    let data: u64 = data_map(&img).iter().filter(|e| e.2).map(|e| e.1).sum();
    let totals = run(peer("nbdinfo").args(["--map", "--totals"]).arg(s.uri()));
    let reported: u64 = totals
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("0"))
        .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(reported, data, "nbdinfo --totals data bytes:\n{totals}");
    s.stop();
}

fn nbdcopy_download(unix: bool) {
    let (dir, img) = fixture(23);
    let s = Server::serve(dir.path(), &img, &["--read-only"]);
    let uri = if unix { s.unix_uri() } else { s.uri() };
    let out = dir.path().join("out.raw");
    run(peer("nbdcopy").arg(&uri).arg(&out));
    assert_same_content(&img, &out);
    assert_eq!(
        data_map(&out),
        data_map(&img),
        "nbdcopy output not sparse like the source"
    );
    // Without extents every byte crosses the wire (holes read as zeroes).
    let out2 = dir.path().join("out2.raw");
    run(peer("nbdcopy").arg("--no-extents").arg(&uri).arg(&out2));
    assert_same_content(&img, &out2);
    // One connection, small requests, deep queue.
    let out3 = dir.path().join("out3.raw");
    run(peer("nbdcopy")
        .args(["-C", "1", "--request-size=65536", "--requests=64"])
        .arg(&uri)
        .arg(&out3));
    assert_same_content(&img, &out3);
    s.stop();
}

#[test]
fn nbdcopy_download_tcp() {
    nbdcopy_download(false);
}

#[test]
fn nbdcopy_download_unix() {
    nbdcopy_download(true);
}

fn nbdcopy_upload(unix: bool) {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    make_sparse_image(&src, IMG_SIZE, 24);
    let target = dir.path().join("target.raw");
    make_filled_image(&target, IMG_SIZE, 0xa5);
    let s = Server::serve(dir.path(), &target, &[]);
    let uri = if unix { s.unix_uri() } else { s.uri() };
    run(peer("nbdcopy").arg(&src).arg(&uri));
    // Read back through the server too.
    let back = dir.path().join("back.raw");
    run(peer("nbdcopy").arg(&uri).arg(&back));
    s.stop();
    assert_same_content(&src, &target);
    assert_same_content(&src, &back);
    let (a_src, a_dst) = (allocated_bytes(&src), allocated_bytes(&target));
    assert!(
        a_dst <= a_src + 2 * MIB,
        "export did not stay sparse: {a_dst} bytes allocated vs {a_src} in the source"
    );
}

#[test]
fn nbdcopy_upload_tcp() {
    nbdcopy_upload(false);
}

#[test]
fn nbdcopy_upload_unix() {
    nbdcopy_upload(true);
}

#[test]
fn nbdcopy_export_to_export() {
    let dir = tmpdir();
    let a = dir.path().join("a.raw");
    make_sparse_image(&a, IMG_SIZE, 25);
    let b = dir.path().join("b.raw");
    make_sparse_image(&b, IMG_SIZE, 26);
    let sa = Server::serve(dir.path(), &a, &["--read-only"]);
    let sb = Server::serve(dir.path(), &b, &[]);
    run(peer("nbdcopy").arg(sa.uri()).arg(sb.unix_uri()));
    sb.stop();
    sa.stop();
    assert_same_content(&a, &b);
}

/// 64+ concurrent async requests of every command per round, every result
/// checked against a model; final content verified over a second handle and
/// written out for a byte comparison with the backing file.
const NBDSH_CONCURRENT: &str = r##"
import os, random, errno, sys
import nbd

uri = os.environ["NBD_URI"]
rounds = int(os.environ["ROUNDS"])
rng = random.Random(int(os.environ["SEED"]))
model = bytearray(open(os.environ["MODEL_IN"], "rb").read())

h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
assert size == len(model), (size, len(model))
for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache",
            "can_multi_conn", "can_fast_zero"):
    assert getattr(h, cap)(), "server does not advertise " + cap
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert not h.is_read_only()

SLOT = 64 * 1024
NSLOTS = size // SLOT
OPS = ["pread", "pwrite", "pwrite_fua", "trim", "zero", "zero_nohole",
       "zero_fast", "cache", "block_status", "pread", "flush"]
PER_ROUND = 132
stats = {}
fast_zero_unsup = 0
zero_flag_bytes = 0

def is_zero(b):
    return not any(b)

for rnd in range(rounds):
    slots = rng.sample(range(NSLOTS), PER_ROUND)
    pending = []
    for i, slot in enumerate(slots):
        op = OPS[i % len(OPS)]
        base = slot * SLOT
        off = base + rng.randrange(0, SLOT // 512) * 512
        length = rng.randrange(1, (base + SLOT - off) // 512 + 1) * 512
        rec = {"op": op, "off": off, "len": length}
        if op == "pread":
            rec["buf"] = nbd.Buffer(length)
            rec["cookie"] = h.aio_pread(rec["buf"], off)
        elif op in ("pwrite", "pwrite_fua"):
            data = bytearray(rng.getrandbits(8) for _ in range(64)) * (length // 64)
            rec["data"] = data
            flags = nbd.CMD_FLAG_FUA if op == "pwrite_fua" else 0
            rec["cookie"] = h.aio_pwrite(nbd.Buffer.from_bytearray(data), off, flags=flags)
        elif op == "trim":
            rec["cookie"] = h.aio_trim(length, off)
        elif op == "zero":
            rec["cookie"] = h.aio_zero(length, off)
        elif op == "zero_nohole":
            rec["cookie"] = h.aio_zero(length, off, flags=nbd.CMD_FLAG_NO_HOLE)
        elif op == "zero_fast":
            rec["cookie"] = h.aio_zero(length, off, flags=nbd.CMD_FLAG_FAST_ZERO)
        elif op == "cache":
            rec["cookie"] = h.aio_cache(length, off)
        elif op == "block_status":
            rec["extents"] = []
            def cb(ctx, start, entries, err, rec=rec):
                rec["extents"].append((ctx, start, list(entries)))
                return 0
            rec["cookie"] = h.aio_block_status(length, off, cb)
        elif op == "flush":
            rec["cookie"] = h.aio_flush()
        pending.append(rec)
    assert h.aio_in_flight() >= 64, "expected 64+ requests in flight, got %d" % h.aio_in_flight()
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for rec in pending:
        op, off, length = rec["op"], rec["off"], rec["len"]
        stats[op] = stats.get(op, 0) + 1
        try:
            ok = h.aio_command_completed(rec["cookie"])
        except nbd.Error as e:
            if op == "zero_fast" and e.errnum == errno.ENOTSUP:
                fast_zero_unsup += 1
                continue
            raise AssertionError("round %d: %s %d+%d failed: %s (errno %s)"
                                 % (rnd, op, off, length, e.string, e.errnum))
        assert ok, (op, off, length)
        if op == "pread":
            got = rec["buf"].to_bytearray()
            want = model[off:off + length]
            if got != want:
                i = next(i for i in range(length) if got[i] != want[i])
                raise AssertionError("round %d: pread %d+%d differs from model at %d"
                                     % (rnd, off, length, off + i))
        elif op in ("pwrite", "pwrite_fua"):
            model[off:off + length] = rec["data"]
        elif op in ("trim", "zero", "zero_nohole", "zero_fast"):
            # nbdferry's contract: TRIM punches holes, i.e. reads back zeroes.
            model[off:off + length] = bytes(length)
        elif op == "block_status":
            ext = [e for e in rec["extents"] if e[0] == nbd.CONTEXT_BASE_ALLOCATION]
            assert len(ext) == 1, "round %d: block_status %d+%d: %r" % (rnd, off, length, rec["extents"])
            _, start, entries = ext[0]
            assert start == off, (start, off)
            assert len(entries) >= 2 and len(entries) % 2 == 0, entries
            pos = off
            for j in range(0, len(entries), 2):
                elen, eflags = entries[j], entries[j + 1]
                assert elen > 0, "zero-length extent %r" % entries
                end = min(pos + elen, off + length)
                if pos < end and eflags & nbd.STATE_ZERO:
                    assert is_zero(model[pos:end]), \
                        "round %d: extent %d+%d flagged zero but model has data" % (rnd, pos, end - pos)
                pos += elen
            assert pos > off

# Whole-disk block status: zero-flagged ranges must really be zero, and
# (sparse image + trims) a good part of the disk must be reported as zero.
off = 0
while off < size:
    got = []
    h.block_status(min(size - off, 1 << 30), off,
                   lambda ctx, start, entries, err: got.append(list(entries)) or 0)
    entries = got[0]
    for j in range(0, len(entries), 2):
        elen, eflags = entries[j], entries[j + 1]
        elen = min(elen, size - off)
        if eflags & nbd.STATE_ZERO:
            assert is_zero(model[off:off + elen]), "zero-flagged %d+%d has data" % (off, elen)
            zero_flag_bytes += elen
        off += elen
assert zero_flag_bytes >= size // 2, "only %d bytes reported as zero" % zero_flag_bytes

h.flush()
# Verify through a second connection (multi-conn: flushed data is visible).
h2 = nbd.NBD()
h2.connect_uri(uri)
for off in range(0, size, 4 << 20):
    n = min(4 << 20, size - off)
    got = h2.pread(n, off)
    if got != model[off:off + n]:
        i = next(i for i in range(n) if got[i] != model[off + i])
        raise AssertionError("final read differs from model at %d" % (off + i))
h2.shutdown()
h.shutdown()
open(os.environ["MODEL_OUT"], "wb").write(model)
print("MODEL-OK", sorted(stats.items()), "fast_zero_enotsup", fast_zero_unsup)
"##;

fn nbdsh_concurrent(unix: bool, rounds: u32, seed: u64) {
    let (dir, img) = fixture(seed);
    let model_in = dir.path().join("model-in.raw");
    let model_out = dir.path().join("model-out.raw");
    copy_file(&img, &model_in);
    let s = Server::serve(dir.path(), &img, &[]);
    let uri = if unix { s.unix_uri() } else { s.uri() };
    let out = nbdsh_script(
        dir.path(),
        NBDSH_CONCURRENT,
        &[
            ("NBD_URI", uri),
            ("ROUNDS", rounds.to_string()),
            ("SEED", seed.to_string()),
            ("MODEL_IN", model_in.display().to_string()),
            ("MODEL_OUT", model_out.display().to_string()),
        ],
    );
    assert!(
        out.contains("MODEL-OK"),
        "nbdsh script did not finish:\n{out}"
    );
    s.stop();
    assert_same_content(&model_out, &img);
}

#[test]
fn nbdsh_concurrent_all_commands_tcp() {
    nbdsh_concurrent(false, 8, 27);
}

#[test]
fn nbdsh_concurrent_all_commands_unix() {
    nbdsh_concurrent(true, 4, 28);
}

/// Old-client path: structured replies disabled, so every reply is simple.
const NBDSH_SIMPLE: &str = r##"
import os, errno
import nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(os.environ["NBD_URI"])
assert not h.get_structured_replies_negotiated(), "structured replies negotiated"
size = h.get_size()
with open(os.environ["OUT"], "wb") as f:
    for off in range(0, size, 1 << 20):
        f.write(h.pread(min(1 << 20, size - off), off))
# Writes, zeroes and trims with simple replies, verified by reading back.
h.pwrite(b"\xab" * 65536, 1 << 20)
assert h.pread(65536, 1 << 20) == b"\xab" * 65536
h.zero(4096, (1 << 20) + 4096)
assert h.pread(4096, (1 << 20) + 4096) == bytes(4096)
h.pwrite(b"\xcd" * 8192, 3 << 20, nbd.CMD_FLAG_FUA)
h.trim(8192, 3 << 20)
assert h.pread(8192, 3 << 20) == bytes(8192)
h.flush()
# Errors come back as simple replies too.
h.set_strict_mode(0)
try:
    h.pread(4096, size)
    raise AssertionError("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, ("read past end", e.errnum, e.string)
try:
    h.pwrite(b"x" * 4096, size)
    raise AssertionError("write past the end succeeded")
except nbd.Error as e:
    assert e.errnum in (errno.ENOSPC, errno.EINVAL), ("write past end", e.errnum, e.string)
assert h.pread(16, 1 << 20) == b"\xab" * 16, "connection unusable after errors"
h.shutdown()
print("SIMPLE-OK")
"##;

#[test]
fn nbdsh_simple_replies() {
    let (dir, img) = fixture(29);
    let mut model = Model::from_file(&img);
    let out = dir.path().join("simple-read.raw");
    let s = Server::serve(dir.path(), &img, &[]);
    let stdout = nbdsh_script(
        dir.path(),
        NBDSH_SIMPLE,
        &[("NBD_URI", s.uri()), ("OUT", out.display().to_string())],
    );
    assert!(stdout.contains("SIMPLE-OK"), "{stdout}");
    s.stop();
    // What was read with simple replies is the original image...
    assert_file_eq_bytes(&out, &model.0);
    // ...and the writes landed.
    model.fill(MIB, 64 * KIB, 0xab);
    model.zero(MIB + 4 * KIB, 4 * KIB);
    model.zero(3 * MIB, 8 * KIB);
    model.assert_file(&img);
}

const NBDSH_READ_ONLY: &str = r##"
import os, errno
import nbd
h = nbd.NBD()
h.connect_uri(os.environ["NBD_URI"])
assert h.is_read_only(), "export not flagged read-only"
# Make libnbd send the requests instead of refusing them locally.
h.set_strict_mode(0)
size = h.get_size()
before = h.pread(65536, 0)
for name, fn in (("pwrite", lambda: h.pwrite(b"\x11" * 4096, 0)),
                 ("pwrite_fua", lambda: h.pwrite(b"\x11" * 4096, 0, nbd.CMD_FLAG_FUA)),
                 ("zero", lambda: h.zero(4096, 0)),
                 ("trim", lambda: h.trim(4096, 0))):
    try:
        fn()
        raise AssertionError(name + " succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, (name, e.errnum, e.string)
assert h.pread(65536, 0) == before, "read-only export changed"
h.shutdown()
print("RO-OK")
"##;

#[test]
fn nbdsh_read_only_eperm() {
    let (dir, img) = fixture(30);
    let before = hash_file(&img);
    let s = Server::serve(dir.path(), &img, &["--read-only"]);
    for uri in [s.uri(), s.unix_uri()] {
        let out = nbdsh_script(dir.path(), NBDSH_READ_ONLY, &[("NBD_URI", uri)]);
        assert!(out.contains("RO-OK"), "{out}");
    }
    s.stop();
    assert_eq!(hash_file(&img), before, "read-only export was modified");
}

/// Requests above the limits, with structured replies: a DF read longer
/// than the server serves in one chunk gets EOVERFLOW, while a plain READ
/// or a WRITE above the advertised maximum payload gets EINVAL (as
/// qemu-nbd answers). The connection stays usable and nothing is written.
const NBDSH_OVERSIZED: &str = r##"
import os, errno
import nbd
h = nbd.NBD()
h.connect_uri(os.environ["NBD_URI"])
assert h.get_structured_replies_negotiated()
assert h.can_df(), "DF not offered with structured replies"
# Make libnbd send the requests instead of refusing them locally.
h.set_strict_mode(0)
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
assert len(h.pread(1 << 20, 0, nbd.CMD_FLAG_DF)) == 1 << 20
for name, fn, want in (
        ("DF read", lambda: h.pread(2 << 20, 0, nbd.CMD_FLAG_DF), errno.EOVERFLOW),
        ("read", lambda: h.pread(48 << 20, 0), errno.EINVAL),
        ("write", lambda: h.pwrite(b"\x11" * (40 << 20), 0), errno.EINVAL)):
    try:
        fn()
        raise AssertionError(name + " above the limit succeeded")
    except nbd.Error as e:
        assert e.errnum == want, (name, e.errnum, e.string)
assert len(h.pread(4096, 0)) == 4096, "connection unusable after refusals"
h.shutdown()
print("OVERSIZED-OK")
"##;

#[test]
fn nbdsh_oversized_requests() {
    let (dir, img) = fixture(319);
    let before = hash_file(&img);
    let s = Server::serve(dir.path(), &img, &[]);
    let out = nbdsh_script(dir.path(), NBDSH_OVERSIZED, &[("NBD_URI", s.uri())]);
    assert!(out.contains("OVERSIZED-OK"), "{out}");
    s.stop();
    assert_eq!(
        hash_file(&img),
        before,
        "a refused WRITE modified the image"
    );
}

#[test]
fn config_with_several_exports() {
    let dir = tmpdir();
    let names = ["disk1", "disk2", "scratch"];
    let descs = ["first disk", "second disk (read-only)", "scratch space"];
    let mut paths = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let p = dir.path().join(format!("{n}.raw"));
        make_sparse_image(&p, IMG_SIZE / (i as u64 + 1) / MIB * MIB, 31 + i as u64);
        paths.push(p);
    }
    let before2 = hash_file(&paths[1]);
    let sock = dir.path().join("cfg.sock");
    let conf = dir.path().join("nbdferry.toml");
    let mut text = format!(
        "listen = [\"127.0.0.1:0\"]\nsocket = \"{}\"\n",
        sock.display()
    );
    for i in 0..3 {
        text.push_str(&format!(
            "\n[[export]]\nname = \"{}\"\npath = \"{}\"\nread-only = {}\ndescription = \"{}\"\n",
            names[i],
            paths[i].display(),
            i == 1,
            descs[i]
        ));
    }
    std::fs::write(&conf, text).unwrap();
    let s = Server::start(&[std::ffi::OsStr::new("--config"), conf.as_os_str()]);
    assert!(s.addr.is_some() && s.socket.as_deref() == Some(sock.as_path()));

    for list_uri in [s.uri_for(""), s.unix_uri_for("")] {
        let list = run(peer("nbdinfo").arg("--list").arg(&list_uri));
        for i in 0..3 {
            assert!(
                list.contains(&format!("export=\"{}\"", names[i])),
                "nbdinfo --list misses {}:\n{list}",
                names[i]
            );
            assert!(
                list.contains(&format!("description: {}", descs[i])),
                "nbdinfo --list misses the description of {}:\n{list}",
                names[i]
            );
        }
        let js = run(peer("nbdinfo").args(["--list", "--json"]).arg(&list_uri));
        for i in 0..3 {
            assert!(
                js.contains(&format!("\"export-name\": \"{}\"", names[i])),
                "{js}"
            );
            assert!(
                js.contains(&format!("\"description\": \"{}\"", descs[i])),
                "{js}"
            );
        }
    }
    // Each export serves its own file, with its own size and mode.
    for i in 0..3 {
        let uri = s.uri_for(names[i]);
        let js = run(peer("nbdinfo").arg("--json").arg(&uri));
        let size = std::fs::metadata(&paths[i]).unwrap().len();
        assert_eq!(
            json_u64(&js, "export-size"),
            Some(size),
            "{}: {js}",
            names[i]
        );
        assert_eq!(
            json_bool(&js, "is_read_only"),
            Some(i == 1),
            "{}: {js}",
            names[i]
        );
        let out = dir.path().join(format!("{}-copy.raw", names[i]));
        run(peer("nbdcopy").arg(s.unix_uri_for(names[i])).arg(&out));
        assert_same_content(&paths[i], &out);
    }
    let out = nbdsh_script(
        dir.path(),
        NBDSH_READ_ONLY,
        &[("NBD_URI", s.uri_for("disk2"))],
    );
    assert!(out.contains("RO-OK"), "{out}");
    run(peer("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x42 0 64k"])
        .arg(s.uri_for("scratch")));
    let (_, err) = run_fail(peer("nbdinfo").arg(s.uri_for("nope")));
    assert!(!err.is_empty());
    s.stop();
    assert_eq!(
        hash_file(&paths[1]),
        before2,
        "read-only export disk2 changed"
    );
    assert_eq!(read_range(&paths[2], 0, 65536), vec![0x42; 65536]);
}

#[test]
fn named_export_is_also_the_default() {
    let (dir, img) = fixture(34);
    let s = Server::serve(dir.path(), &img, &["--read-only", "--name", "vm-disk"]);
    let list = run(peer("nbdinfo").arg("--list").arg(s.uri_for("")));
    assert!(
        list.contains("export=\"vm-disk\""),
        "LIST does not show the name:\n{list}"
    );
    for uri in [
        s.uri_for(""),
        s.uri_for("vm-disk"),
        s.unix_uri_for(""),
        s.unix_uri_for("vm-disk"),
    ] {
        let out = dir.path().join("copy.raw");
        let _ = std::fs::remove_file(&out);
        run(peer("nbdcopy").arg(&uri).arg(&out));
        assert_same_content(&img, &out);
    }
    s.stop();
}

/// nbdsh queues 100 READs of 256 KiB (25 MiB: beyond the 8 MiB of data
/// replies the server lets wait per connection plus what a Unix socket
/// holds) and then one BLOCK_STATUS, and reads no reply until the server's
/// request trace shows the BLOCK_STATUS arrived. Its answer must then come
/// back before most READs (a server answering in order puts it last; this
/// one right after the reply already under way, or a batch of them): the
/// server holds READs back while its send queue is full but goes on
/// answering other requests (nbdcopy waits on block status like this every
/// 128 MiB). Every READ must still match the image.
///
/// The image is all data, so each reply carries 256 KiB. The client is
/// held until the server has read everything, and the socket is a Unix
/// one, whose buffers are fixed: over TCP the kernel grows the client's
/// receive buffer (up to 32 MiB here) once it reads, and a client that
/// reads early lets the server answer in order with nothing queued.
#[test]
fn block_status_overtakes_queued_reads() {
    let dir = tmpdir();
    let img = dir.path().join("full.raw");
    let mut data = vec![0u8; IMG_SIZE as usize];
    Rng::new(41).fill(&mut data);
    std::fs::write(&img, &data).expect("write image");
    let s = Server::serve_env(
        dir.path(),
        &img,
        &[],
        &[("NBDFERRY_LOG", "warn,nbd_server::conn=trace")],
    );
    let out = nbdsh_script_gated(
        dir.path(),
        r##"
import os
import sys
import nbd

image = open(os.environ["IMAGE"], "rb").read()
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(os.environ["NBD_URI"])
L = 256 * 1024
order = []
bufs = []
for i in range(100):
    off = (i * 7 * L // 3) % (len(image) - L)
    b = nbd.Buffer(L)
    bufs.append((off, b))
    h.aio_pread(b, off, completion=lambda err, i=i: order.append(("read", i)) or 1)
h.aio_block_status(len(image), 0, lambda *a: 0,
                   completion=lambda err: order.append(("status", 0)) or 1)
sys.stdin.readline()
while h.aio_in_flight() > 0:
    h.poll(-1)
pos = order.index(("status", 0))
reads_after = len(order) - 1 - pos
print("READS-AFTER-STATUS", reads_after)
for off, b in bufs:
    assert b.to_bytearray() == image[off:off + L], "READ at %d corrupted" % off
print("DATA-OK")
"##,
        &[
            ("NBD_URI", s.unix_uri()),
            ("IMAGE", img.display().to_string()),
        ],
        || {
            wait_until(READY_DEADLINE, "the server to read BLOCK_STATUS", || {
                s.log_text().contains(" request command=7 ")
            })
        },
    );
    assert!(
        out.contains("DATA-OK"),
        "nbdsh script did not finish:\n{out}"
    );
    let after: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("READS-AFTER-STATUS "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in:\n{out}"));
    eprintln!("block status overtook {after} of 100 reads");
    assert!(
        after >= 50,
        "block status came after all but {after} of 100 reads:\n{out}"
    );
    s.stop();
}
