//! qemu-img / qemu-io / qemu-nbd -L against nbdferry (TCP and Unix socket).

use crate::harness::*;

fn uri_of(s: &Server, unix: bool) -> String {
    if unix { s.unix_uri() } else { s.uri() }
}

fn qemu_img_info(unix: bool) {
    let (dir, img) = fixture(11);
    let s = Server::serve(dir.path(), &img, &[]);
    let out = run(peer("qemu-img")
        .args(["info", "--output=json"])
        .arg(uri_of(&s, unix)));
    assert_eq!(
        json_u64(&out, "virtual-size"),
        Some(IMG_SIZE),
        "qemu-img info reports the wrong size:\n{out}"
    );
    // The top-level (last) "format" is the probed image format.
    let top = &out[out.rfind("\"format\":").expect("no format")..];
    assert_eq!(json_str(top, "format").as_deref(), Some("raw"), "{out}");
    s.stop();
}

#[test]
fn qemu_img_info_tcp() {
    qemu_img_info(false);
}

#[test]
fn qemu_img_info_unix() {
    qemu_img_info(true);
}

#[test]
fn qemu_img_compare_tcp_and_unix() {
    let (dir, img) = fixture(12);
    let reference = dir.path().join("ref.raw");
    copy_file(&img, &reference);
    let s = Server::serve(dir.path(), &img, &[]);
    for uri in [s.uri(), s.unix_uri()] {
        let out = run(peer("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(&uri));
        assert!(out.contains("Images are identical"), "{out}");
    }
    // Negative control: one byte changed inside a hole of the local copy must
    // be found at exactly that offset (proves compare really reads data).
    let map = data_map(&img);
    let hole = map.iter().find(|e| !e.2 && e.1 >= 8192).expect("a hole");
    let off = hole.0 + 4096 + 17;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&reference)
            .unwrap();
        f.write_all_at(&[0x5a], off).unwrap();
    }
    for uri in [s.uri(), s.unix_uri()] {
        let (stdout, _) = run_fail(
            peer("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&reference)
                .arg(&uri),
        );
        // qemu-img reports the start of the mismatching block.
        let reported: u64 = stdout
            .split("Content mismatch at offset ")
            .nth(1)
            .and_then(|r| r.split('!').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("qemu-img compare did not report a mismatch: {stdout}"));
        assert!(
            reported <= off && off - reported < 64 * KIB,
            "qemu-img compare reported the mismatch at {reported}, expected the block holding {off}"
        );
    }
    s.stop();
}

fn convert_from_export(unix: bool) {
    let (dir, img) = fixture(13);
    let s = Server::serve(dir.path(), &img, &["--read-only"]);
    let out = dir.path().join("out.raw");
    run(peer("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri_of(&s, unix))
        .arg(&out));
    assert_same_content(&img, &out);
    // Holes came across as holes (block status and/or zero detection).
    assert_eq!(
        data_map(&out),
        data_map(&img),
        "converted copy is not sparse like the source"
    );
    s.stop();
}

#[test]
fn qemu_img_convert_from_export_tcp() {
    convert_from_export(false);
}

#[test]
fn qemu_img_convert_from_export_unix() {
    convert_from_export(true);
}

fn convert_to_export(unix: bool) {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    make_sparse_image(&src, IMG_SIZE, 14);
    // A dirty, fully allocated target: the holes of the source must become
    // zeroes on the export, and (server contract) holes in its backing file.
    let target = dir.path().join("target.raw");
    make_filled_image(&target, IMG_SIZE, 0xff);
    let s = Server::serve(dir.path(), &target, &[]);
    run(peer("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(uri_of(&s, unix)));
    s.stop();
    assert_same_content(&src, &target);
    let (a_src, a_dst) = (allocated_bytes(&src), allocated_bytes(&target));
    assert!(
        a_dst <= a_src + 2 * MIB,
        "export did not stay sparse: backing file has {a_dst} bytes allocated, source {a_src}"
    );
}

#[test]
fn qemu_img_convert_to_export_tcp() {
    convert_to_export(false);
}

#[test]
fn qemu_img_convert_to_export_unix() {
    convert_to_export(true);
}

#[test]
fn qemu_img_map_matches_backing_file() {
    let (dir, img) = fixture(15);
    let s = Server::serve(dir.path(), &img, &[]);
    assert_same_map("qemu-img map (tcp)", &qemu_img_map(&s.uri()), &img);
    assert_same_map("qemu-img map (unix)", &qemu_img_map(&s.unix_uri()), &img);
    s.stop();
}

/// qemu-io write/read/zero/discard/aio bursts, checked by qemu-io patterns,
/// then the whole backing file against a model.
fn qemu_io_patterns(unix: bool) {
    let (dir, img) = fixture(16);
    let mut model = Model::from_file(&img);
    let s = Server::serve(dir.path(), &img, &[]);
    let uri = uri_of(&s, unix);

    let mut cmds: Vec<String> = Vec::new();
    let mut c = |s: String| cmds.push(s);
    c("write -P 0x11 0 1M".into());
    model.fill(0, MIB, 0x11);
    c("read -P 0x11 0 1M".into());
    // Unaligned write (byte granularity, or read-modify-write by qemu).
    c("write -P 0x55 1000 3000".into());
    model.fill(1000, 3000, 0x55);
    c("read -P 0x55 1000 3000".into());
    c("read -P 0x11 0 1000".into());
    c("read -P 0x11 4000 4096".into());
    // WRITE_ZEROES with NO_HOLE (qemu sends NO_HOLE without -u).
    c("write -z 256k 64k".into());
    model.zero(256 * KIB, 64 * KIB);
    c("read -P 0 256k 64k".into());
    c("read -P 0x11 320k 64k".into());
    // WRITE_ZEROES that may unmap: must read back zero and punch a hole.
    c("write -P 0x77 8M 1M".into());
    c("read -P 0x77 8M 1M".into());
    c("write -z -u 8M 1M".into());
    model.zero(8 * MIB, MIB);
    c("read -P 0 8M 1M".into());
    // TRIM: nbdferry punches holes, so the range reads back as zeroes.
    c("write -P 0x78 16M 1M".into());
    c("discard 16M 1M".into());
    model.zero(16 * MIB, MIB);
    c("read -P 0 16M 1M".into());
    // FUA write.
    c("write -f -P 0x33 20M 64k".into());
    model.fill(20 * MIB, 64 * KIB, 0x33);
    c("read -P 0x33 20M 64k".into());
    // Last block of the export.
    c(format!("write -P 0x66 {} 4k", IMG_SIZE - 4 * KIB));
    model.fill(IMG_SIZE - 4 * KIB, 4 * KIB, 0x66);
    c(format!("read -P 0x66 {} 4k", IMG_SIZE - 4 * KIB));
    // aio_write burst: 32 concurrent writes, then flush and verify each.
    for i in 0..32u64 {
        let off = 32 * MIB + i * 160 * KIB;
        let pat = 0x40 + i as u8;
        c(format!("aio_write -P {pat:#04x} {off} 96k"));
        model.fill(off, 96 * KIB, pat);
    }
    c("aio_flush".into());
    for i in 0..32u64 {
        let off = 32 * MIB + i * 160 * KIB;
        c(format!("read -P {:#04x} {off} 96k", 0x40 + i as u8));
    }
    // A burst of concurrent zeroes and writes interleaved.
    for i in 0..16u64 {
        let off = 48 * MIB + i * 256 * KIB;
        if i % 2 == 0 {
            c(format!("aio_write -z {off} 128k"));
            model.zero(off, 128 * KIB);
        } else {
            c(format!("aio_write -P 0x9{:x} {off} 128k", i % 16));
            model.fill(off, 128 * KIB, 0x90 + (i % 16) as u8);
        }
    }
    c("aio_flush".into());
    c("flush".into());

    let mut q = peer("qemu-io");
    q.args(["-f", "raw"]);
    for cmd in &cmds {
        q.arg("-c").arg(cmd);
    }
    q.arg(&uri);
    let out = run(&mut q);
    assert!(
        !out.contains("Pattern verification failed"),
        "qemu-io pattern check failed:\n{out}"
    );
    // Independent check on a second qemu-io connection (multi-conn coherence).
    let mut q = peer("qemu-io");
    q.args(["-r", "-f", "raw"]);
    for i in 0..32u64 {
        let off = 32 * MIB + i * 160 * KIB;
        q.arg("-c")
            .arg(format!("read -P {:#04x} {off} 96k", 0x40 + i as u8));
    }
    q.arg(&uri);
    run(&mut q);

    s.stop();
    model.assert_file(&img);
    assert_hole(&img, 8 * MIB, MIB);
    assert_hole(&img, 16 * MIB, MIB);
}

#[test]
fn qemu_io_patterns_tcp() {
    qemu_io_patterns(false);
}

#[test]
fn qemu_io_patterns_unix() {
    qemu_io_patterns(true);
}

/// What `qemu-nbd -L` prints when extended headers were negotiated; checked
/// against qemu-nbd itself first so the assertion tracks the tool.
const EH_MARKER: &str = "transaction size: 64-bit";

#[test]
fn qemu_negotiates_extended_headers() {
    let (dir, img) = fixture(17);
    {
        let q = qemu_nbd(&img, "disk", true);
        let out = run(peer("qemu-nbd")
            .args(["-L", "-b", "127.0.0.1", "-p"])
            .arg(q.port.unwrap().to_string()));
        assert!(
            out.contains(EH_MARKER),
            "reference qemu-nbd -L output lacks `{EH_MARKER}` (tool changed?):\n{out}"
        );
    }
    let s = Server::serve(dir.path(), &img, &["--name", "disk"]);
    let tcp = run(peer("qemu-nbd")
        .args(["-L", "-b", "127.0.0.1", "-p"])
        .arg(s.port().to_string()));
    let unix = run(peer("qemu-nbd")
        .arg("-L")
        .arg("-k")
        .arg(s.socket.as_ref().unwrap()));
    for (what, out) in [("tcp", &tcp), ("unix", &unix)] {
        assert!(
            out.contains(EH_MARKER),
            "{what}: qemu did not negotiate extended headers:\n{out}"
        );
        assert!(
            out.contains("export: 'disk'"),
            "{what}: export `disk` not listed:\n{out}"
        );
        assert!(
            out.contains(&format!("size:  {IMG_SIZE}")),
            "{what}: wrong size:\n{out}"
        );
        assert!(
            out.contains("base:allocation"),
            "{what}: no base:allocation:\n{out}"
        );
        let flags = out
            .lines()
            .find(|l| l.trim_start().starts_with("flags:"))
            .unwrap_or_else(|| panic!("{what}: no flags line:\n{out}"));
        for f in [
            "flush",
            "fua",
            "trim",
            "zeroes",
            "multi",
            "cache",
            "fast-zero",
        ] {
            assert!(
                flags.split_whitespace().any(|w| w == f),
                "{what}: flag `{f}` not advertised: {flags}"
            );
        }
        assert!(
            !flags.contains("readonly"),
            "{what}: writable export flagged readonly: {flags}"
        );
    }
    s.stop();
}

#[test]
fn qemu_io_read_only_export() {
    let (dir, img) = fixture(18);
    let before = hash_file(&img);
    let s = Server::serve(dir.path(), &img, &["--read-only"]);
    let list = run(peer("qemu-nbd")
        .args(["-L", "-b", "127.0.0.1", "-p"])
        .arg(s.port().to_string()));
    assert!(
        list.contains("readonly"),
        "read-only export not flagged readonly:\n{list}"
    );
    for uri in [s.uri(), s.unix_uri()] {
        let (stdout, stderr) = run_fail(
            peer("qemu-io")
                .args(["-f", "raw", "-c", "write -P 0x11 0 4k"])
                .arg(&uri),
        );
        let all = format!("{stdout}{stderr}").to_lowercase();
        assert!(
            all.contains("read-only")
                || all.contains("permission denied")
                || all.contains("operation not permitted"),
            "write to a read-only export failed for an unexpected reason:\n{stdout}{stderr}"
        );
        // Reads still work and return the right bytes.
        let out = dir.path().join("ro-copy.raw");
        let _ = std::fs::remove_file(&out);
        run(peer("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out));
        assert_same_content(&img, &out);
    }
    s.stop();
    assert_eq!(hash_file(&img), before, "read-only export was modified");
}
