//! nbdferry as a client: `copy`, `map` and `info` against qemu-nbd, nbdkit,
//! the reference nbd-server and nbdferry's own server, over TCP and Unix
//! sockets. Every copy is checked byte for byte and for sparseness (the
//! destination never allocates more than the source's data).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::harness::*;

/// `nbdferry copy SRC DST EXTRA...`; fails the test unless it exits 0.
fn copy(src: &str, dst: &str, extra: &[&str]) {
    run(nbdferry()
        .args(["copy", "--progress=none"])
        .args(extra)
        .arg(src)
        .arg(dst));
}

/// The standard sparse image plus one allocated 1 MiB block of zeroes (so
/// zero detection is exercised). Returns (dir, image, bytes of real data):
/// no copy may allocate more than that.
fn source_image(seed: u64) -> (TempDir, PathBuf, u64) {
    let (dir, img) = fixture(seed);
    let data = allocated_bytes(&img);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open image");
    f.write_all_at(&vec![0u8; MIB as usize], 20 * MIB)
        .expect("write zero block");
    f.sync_all().expect("sync");
    assert!(data > 0 && data < IMG_SIZE / 2, "fixture should be sparse");
    (dir, img, data)
}

fn assert_sparse_copy(src: &Path, dst: &Path, data: u64) {
    assert_same_content(src, dst);
    let got = allocated_bytes(dst);
    assert!(
        got <= data,
        "{dst:?} allocates {got} bytes, more than the {data} bytes of source data"
    );
}

fn qemu_nbd_unix(image: &Path, sock: &Path, read_only: bool) -> PeerServer {
    let mut c = peer("qemu-nbd");
    c.args(["-f", "raw", "-t", "-e", "8", "-x", "disk", "-k"])
        .arg(sock);
    if read_only {
        c.arg("-r");
    } else {
        c.arg("--discard=unmap");
    }
    c.arg(image);
    PeerServer::spawn_unix("qemu-nbd", c, sock)
}

fn nbdkit_unix(sock: &Path, plugin_args: &[String]) -> PeerServer {
    let mut c = peer("nbdkit");
    c.args(["-f", "--exit-with-parent", "-U"])
        .arg(sock)
        .args(plugin_args);
    PeerServer::spawn_unix("nbdkit", c, sock)
}

/// The reference nbd-server on a Unix socket (the harness one is TCP only);
/// killed through its pid file.
struct NbdServerUnix {
    pid: u32,
    sock: PathBuf,
}

impl NbdServerUnix {
    fn start(dir: &Path, image: &Path, read_only: bool) -> NbdServerUnix {
        let sock = dir.join("nbd-server.sock");
        let conf = dir.join("nbd-server-unix.conf");
        let pidfile = dir.join("nbd-server-unix.pid");
        let mut text = format!(
            "[generic]\n    allowlist = true\n    unixsock = {}\n[disk]\n    exportname = {}\n    trim = true\n    flush = true\n",
            sock.display(),
            image.display()
        );
        if read_only {
            text.push_str("    readonly = true\n");
        }
        fs::write(&conf, text).expect("write config");
        run(peer("nbd-server")
            .arg("-C")
            .arg(&conf)
            .arg("-p")
            .arg(&pidfile));
        let mut pid = 0;
        wait_until(READY_DEADLINE, "nbd-server pid file and socket", || {
            if let Ok(s) = fs::read_to_string(&pidfile)
                && let Ok(p) = s.trim().parse()
            {
                pid = p;
            }
            pid != 0 && sock.exists()
        });
        NbdServerUnix { pid, sock }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.sock.display())
    }
}

impl Drop for NbdServerUnix {
    fn drop(&mut self) {
        terminate_pid(self.pid, Duration::from_secs(5));
    }
}

/// Kills a spawned nbdferry by pid if the test ends before it does.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        terminate_child(&mut self.0, Duration::from_secs(5));
    }
}

#[test]
fn copy_from_qemu_nbd_tcp_and_unix() {
    let (dir, img, data) = source_image(101);
    let tcp = qemu_nbd(&img, "disk", true);
    let out = dir.path().join("from-tcp.raw");
    copy(&tcp.uri("disk"), out.to_str().unwrap(), &[]);
    assert_sparse_copy(&img, &out, data);
    assert!(
        !dir.path().join("from-tcp.raw.part").exists(),
        "temp file left behind"
    );

    let unix = qemu_nbd_unix(&img, &dir.path().join("q.sock"), true);
    let out = dir.path().join("from-unix.raw");
    copy(
        &unix.uri("disk"),
        out.to_str().unwrap(),
        &["--connections", "2", "--request-size", "64K"],
    );
    assert_sparse_copy(&img, &out, data);
}

#[test]
fn copy_from_nbdkit_file_and_memory() {
    let (dir, img, data) = source_image(102);
    let plugin = vec!["file".to_string(), format!("file={}", img.display())];
    let tcp = nbdkit_tcp(&plugin);
    let out = dir.path().join("kit-tcp.raw");
    copy(&tcp.uri(""), out.to_str().unwrap(), &[]);
    assert_sparse_copy(&img, &out, data);

    let unix = nbdkit_unix(&dir.path().join("k.sock"), &plugin);
    let out = dir.path().join("kit-unix.raw");
    copy(&unix.uri(""), out.to_str().unwrap(), &[]);
    assert_sparse_copy(&img, &out, data);

    // Memory plugin: upload, then download again.
    let mem = nbdkit_tcp(&["memory".to_string(), format!("size={IMG_SIZE}")]);
    copy(img.to_str().unwrap(), &mem.uri(""), &[]);
    let out = dir.path().join("kit-mem.raw");
    copy(&mem.uri(""), out.to_str().unwrap(), &[]);
    assert_sparse_copy(&img, &out, data);
    // The memory disk itself stayed sparse. nbdkit allocates it in 32 KiB
    // pages, so the bound is the source's data rounded out to pages.
    const PAGE: u64 = 32 * KIB;
    let mut pages = std::collections::BTreeSet::new();
    for (off, len, is_data) in data_map(&img) {
        if is_data {
            pages.extend(off / PAGE..(off + len).div_ceil(PAGE));
        }
    }
    let bound = pages.len() as u64 * PAGE;
    let map = nbdinfo_map(&mem.uri(""));
    let mapped_data: u64 = map.iter().filter(|e| e.2).map(|e| e.1).sum();
    assert!(
        mapped_data <= bound,
        "memory disk holds {mapped_data} data bytes, source data needs at most {bound}"
    );
}

#[test]
fn copy_from_nbd_server_tcp_and_unix() {
    // nbd-server 3.24: no structured replies, no block status; holes are read
    // as data and must be detected as zeroes.
    let (dir, img, data) = source_image(103);
    let srv = NbdServerRef::start(dir.path(), &[("disk", &img, true)]);
    let out = dir.path().join("ref-tcp.raw");
    copy(&srv.uri("disk"), out.to_str().unwrap(), &[]);
    assert_sparse_copy(&img, &out, data);

    let unix = NbdServerUnix::start(dir.path(), &img, true);
    let out = dir.path().join("ref-unix.raw");
    copy(&unix.uri(), out.to_str().unwrap(), &[]);
    assert_sparse_copy(&img, &out, data);
}

#[test]
fn copy_to_qemu_nbd_and_nbdkit_tcp_and_unix() {
    let (dir, img, data) = source_image(104);
    for (i, unix) in [false, true].into_iter().enumerate() {
        let target = dir.path().join(format!("qemu-target-{i}.raw"));
        make_empty_image(&target, IMG_SIZE);
        let srv = if unix {
            qemu_nbd_unix(&target, &dir.path().join(format!("qt{i}.sock")), false)
        } else {
            qemu_nbd(&target, "disk", false)
        };
        copy(img.to_str().unwrap(), &srv.uri("disk"), &["--flush"]);
        drop(srv);
        assert_sparse_copy(&img, &target, data);

        let target = dir.path().join(format!("kit-target-{i}.raw"));
        make_empty_image(&target, IMG_SIZE);
        let plugin = vec!["file".to_string(), format!("file={}", target.display())];
        let srv = if unix {
            nbdkit_unix(&dir.path().join(format!("kt{i}.sock")), &plugin)
        } else {
            nbdkit_tcp(&plugin)
        };
        copy(img.to_str().unwrap(), &srv.uri(""), &["--flush"]);
        drop(srv);
        assert_sparse_copy(&img, &target, data);
    }
}

#[test]
fn copy_over_a_dirty_target_zeroes_it() {
    // The destination holds old data everywhere: every hole of the source
    // must become zeroes there (WRITE_ZEROES, which qemu-nbd punches).
    let (dir, img, data) = source_image(105);
    let target = dir.path().join("dirty.raw");
    make_filled_image(&target, IMG_SIZE, 0xee);
    let srv = qemu_nbd(&target, "disk", false);
    copy(img.to_str().unwrap(), &srv.uri("disk"), &["--flush"]);
    drop(srv);
    assert_sparse_copy(&img, &target, data);

    // Same into an existing local file: holes are punched.
    let local = dir.path().join("dirty-local.raw");
    make_filled_image(&local, IMG_SIZE, 0xee);
    copy(img.to_str().unwrap(), local.to_str().unwrap(), &[]);
    assert_sparse_copy(&img, &local, data);
}

#[test]
fn copy_to_nbd_server_tcp_and_unix() {
    let (dir, img, data) = source_image(106);
    let target = dir.path().join("ref-target.raw");
    make_empty_image(&target, IMG_SIZE);
    let srv = NbdServerRef::start(dir.path(), &[("disk", &target, false)]);
    // nbd-server cannot report that the new target reads as zeroes.
    copy(
        img.to_str().unwrap(),
        &srv.uri("disk"),
        &["--destination-is-zero", "--flush"],
    );
    drop(srv);
    assert_sparse_copy(&img, &target, data);

    let target = dir.path().join("ref-target-unix.raw");
    make_empty_image(&target, IMG_SIZE);
    let srv = NbdServerUnix::start(dir.path(), &target, false);
    copy(
        img.to_str().unwrap(),
        &srv.uri(),
        &["--destination-is-zero"],
    );
    drop(srv);
    assert_sparse_copy(&img, &target, data);
}

#[test]
fn copy_between_nbdferry_and_qemu_nbd() {
    let (dir, img, data) = source_image(107);
    let ours = Server::serve(dir.path(), &img, &["--read-only"]);

    // nbdferry server -> qemu-nbd
    let t1 = dir.path().join("ferry-to-qemu.raw");
    make_empty_image(&t1, IMG_SIZE);
    let q = qemu_nbd(&t1, "disk", false);
    copy(&ours.uri(), &q.uri("disk"), &["--flush"]);
    drop(q);
    assert_sparse_copy(&img, &t1, data);

    // nbdferry server (unix) -> nbdferry server (tcp)
    let t2 = dir.path().join("ferry-to-ferry.raw");
    make_empty_image(&t2, IMG_SIZE);
    let ours_dst = Server::serve(dir.path(), &t2, &[]);
    copy(&ours.unix_uri(), &ours_dst.uri(), &["--flush"]);
    ours_dst.stop();
    assert_sparse_copy(&img, &t2, data);

    // qemu-nbd -> nbdferry server
    let q = qemu_nbd(&img, "disk", true);
    let t3 = dir.path().join("qemu-to-ferry.raw");
    make_empty_image(&t3, IMG_SIZE);
    let ours_dst = Server::serve(dir.path(), &t3, &[]);
    copy(&q.uri("disk"), &ours_dst.uri(), &["--flush"]);
    ours_dst.stop();
    assert_sparse_copy(&img, &t3, data);
}

#[test]
fn copy_streams_and_null() {
    let (dir, img, data) = source_image(108);
    let q = qemu_nbd(&img, "disk", true);
    // NBD -> stdout -> stdin -> new file.
    let out = run_output(nbdferry().args(["copy", "--progress=none", &q.uri("disk"), "-"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len() as u64, IMG_SIZE);
    assert_eq!(hash_bytes(&out.stdout), hash_file(&img));
    let streamed = dir.path().join("stream-in.bin");
    fs::write(&streamed, &out.stdout).expect("write");
    let back = dir.path().join("from-stdin.raw");
    let mut c = nbdferry();
    c.args(["copy", "--progress=none", "-", back.to_str().unwrap()])
        .stdin(fs::File::open(&streamed).expect("open"));
    run(&mut c);
    assert_sparse_copy(&img, &back, data);
    // null: sink, with JSON progress lines on stderr.
    let out = run_output(nbdferry().args(["copy", "--progress=json", &q.uri("disk"), "null:"]));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().expect("a progress line");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON progress line");
    assert_eq!(v["bytes"], IMG_SIZE);
    assert_eq!(v["done"], true);
}

#[test]
fn map_dirty_bitmap_matches_nbdinfo() {
    let dir = tmpdir();
    let disk = dir.path().join("disk.qcow2");
    run(peer("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M"));
    run(peer("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xaa 0 4M"])
        .arg(&disk));
    run(peer("qemu-img")
        .args(["bitmap", "-f", "qcow2", "--add", "--granularity", "64K"])
        .arg(&disk)
        .arg("b0"));
    run(peer("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xbb 8M 1M",
            "-c",
            "write -P 0xcc 40M 4K",
        ])
        .args(["-c", "write -z 50M 1M"])
        .arg(&disk));
    let q = PeerServer::spawn_tcp("qemu-nbd", |port| {
        let mut c = peer("qemu-nbd");
        c.args([
            "-f",
            "qcow2",
            "-r",
            "-t",
            "-e",
            "8",
            "-x",
            "disk",
            "-B",
            "b0",
            "-b",
            "127.0.0.1",
        ]);
        c.arg("-p").arg(port.to_string()).arg(&disk);
        c
    });
    let uri = q.uri("disk");
    let ctx = "qemu:dirty-bitmap:b0";
    for (ours_args, theirs_args) in [
        (vec!["--context", ctx], vec![format!("--map={ctx}")]),
        (vec![], vec!["--map".to_string()]),
        (
            vec!["--totals"],
            vec!["--map".to_string(), "--totals".to_string()],
        ),
    ] {
        let ours = run(nbdferry()
            .args(["map", "--json"])
            .args(&ours_args)
            .arg(&uri));
        let theirs = run(peer("nbdinfo").arg("--json").args(&theirs_args).arg(&uri));
        let a: serde_json::Value = serde_json::from_str(&ours).expect("our JSON");
        let b: serde_json::Value = serde_json::from_str(&theirs).expect("nbdinfo JSON");
        assert_eq!(
            a, b,
            "map {ours_args:?} differs from nbdinfo {theirs_args:?}"
        );
        assert_eq!(ours, theirs, "same values but different text");
    }
    // Sanity: the bitmap really has dirty extents.
    let ours = run(nbdferry().args(["map", "--context", ctx]).arg(&uri));
    assert!(ours.lines().any(|l| l.ends_with("dirty")), "{ours}");
    // Several contexts at once on one connection.
    let info = run(nbdferry().args(["info", "--json"]).arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&info).expect("info JSON");
    assert_eq!(
        v["exports"][0]["contexts"],
        serde_json::json!(["base:allocation", ctx])
    );
}

#[test]
fn info_uses_go_and_lists_exports() {
    let (dir, img, _) = source_image(109);
    let other = dir.path().join("other.raw");
    make_empty_image(&other, 2 * MIB);
    let srv = NbdServerRef::start(
        dir.path(),
        &[("disk", &img, true), ("other", &other, false)],
    );
    // nbd-server answers INFO with size 0; we must show the GO size.
    let out = run(nbdferry().args(["info", "--json"]).arg(srv.uri("disk")));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["exports"][0]["export-size"], IMG_SIZE);
    assert_eq!(v["exports"][0]["is_read_only"], true);
    let out = run(nbdferry()
        .args(["info", "--list", "--json"])
        .arg(srv.uri("")));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let names: Vec<&str> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk", "other"]);
    assert_eq!(v["exports"][1]["export-size"], 2 * MIB);
    // A TLS URI without credentials is refused before connecting.
    let (_, err) = run_fail(nbdferry().args(["info", "nbds://127.0.0.1:1/"]));
    assert!(err.contains("TLS needs a CA"), "{err}");
}

#[test]
fn garbage_server_fails_fast() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(&[0x5a; 4096]);
            // Keep the socket open until the client gives up.
            let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
        }
    });
    let out = run_output_deadline(
        nbdferry()
            .args(["info"])
            .arg(format!("nbd://127.0.0.1:{port}/")),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("magic"), "{err}");
    t.join().unwrap();
}

/// A copy from an nbdkit whose reads are delayed by `rdelay`, into DST in
/// `dir`, waited on until it is surely in progress (DST.part exists).
/// Returns the server, the running copy and DST.
fn copy_from_slow_server(
    dir: &Path,
    img: &Path,
    rdelay: &str,
    extra: &[&str],
) -> (PeerServer, ChildGuard, PathBuf) {
    let kit = nbdkit_tcp(&[
        "--filter=delay".to_string(),
        "file".to_string(),
        format!("file={}", img.display()),
        format!("rdelay={rdelay}"),
    ]);
    let out = dir.join("slow.raw");
    let part = dir.join("slow.raw.part");
    let child = nbdferry()
        .args([
            "copy",
            "--progress=none",
            "--connections",
            "1",
            "--requests",
            "2",
        ])
        .args(extra)
        .arg(kit.uri(""))
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn copy");
    let guard = ChildGuard(child);
    wait_until(READY_DEADLINE, "the copy to start writing", || {
        part.exists()
    });
    (kit, guard, out)
}

fn stderr_of(guard: &mut ChildGuard) -> String {
    let mut err = String::new();
    std::io::Read::read_to_string(guard.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    err
}

#[test]
fn server_killed_mid_copy_fails_cleanly() {
    let (dir, img, _) = source_image(110);
    let (kit, mut guard, out) = copy_from_slow_server(dir.path(), &img, "300ms", &[]);
    assert!(
        guard.0.try_wait().unwrap().is_none(),
        "copy finished before the kill"
    );
    send_signal(kit.pid(), SIGKILL);
    let status =
        wait_child(&mut guard.0, Duration::from_secs(30)).expect("copy hung after the server died");
    assert!(!status.success(), "copy succeeded although the server died");
    let err = stderr_of(&mut guard);
    assert!(err.contains("error:"), "{err}");
    assert!(
        !out.exists(),
        "a failed copy must not leave a complete-looking destination"
    );
    drop(kit);
}

#[test]
fn copy_times_out_when_the_server_stops_answering() {
    // Signal numbers on Linux (the harness only names the fatal ones).
    const SIGSTOP: i32 = 19;
    const SIGCONT: i32 = 18;
    let (dir, img, _) = source_image(111);
    let (kit, mut guard, out) =
        copy_from_slow_server(dir.path(), &img, "200ms", &["--timeout", "2"]);
    // Frozen, not dead: the socket stays open and nothing comes back.
    assert!(send_signal(kit.pid(), SIGSTOP));
    let status = wait_child(&mut guard.0, Duration::from_secs(30));
    assert!(send_signal(kit.pid(), SIGCONT));
    let status = status.expect("copy hung on a server that stopped answering");
    assert!(!status.success(), "copy succeeded against a frozen server");
    let err = stderr_of(&mut guard);
    assert!(err.contains("did not answer for 2s"), "{err}");
    assert!(!out.exists(), "a failed copy must not look complete");
    drop(kit);
}
