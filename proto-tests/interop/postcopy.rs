//! Post-copy: `serve --source URI` serves a disk at once while it arrives
//! from the source, fetching what clients read and hydrating the rest.
//! Every check is a whole-image comparison with a model of what the disk
//! must hold; the link to the source goes through a relay of ours that
//! counts what crosses it and cuts it when told.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::*;
use crate::netns::{HostPair, IP_A};
use crate::relay::Relay;

const SIZE: u64 = 64 * MIB;

/// A source daemon serving `img` as `disk` with snapshot `s1`.
fn source(dir: &Path, img: &Path, state: &Path) -> Server {
    let st = state.to_str().unwrap();
    let s = Server::serve(dir, img, &["--name", "disk", "--state-dir", st]).with_name("disk");
    run(nbdferry()
        .args(["snapshot", "create", "disk", "s1", "--admin"])
        .arg(state.join("admin.sock")));
    s
}

/// A destination daemon serving `dst` as `disk`, arriving from `uri`.
fn destination(dir: &Path, dst: &Path, state: &Path, uri: &str, extra: &[&str]) -> Server {
    let st = state.to_str().unwrap();
    let mut args = vec!["--name", "disk", "--state-dir", st, "--source", uri];
    args.extend_from_slice(extra);
    Server::serve(dir, dst, &args).with_name("disk")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `hydrate status disk --json` of the daemon whose state is `state`.
fn status(state: &Path) -> String {
    run(nbdferry()
        .args(["hydrate", "status", "disk", "--json", "--admin"])
        .arg(state.join("admin.sock")))
}

fn wait_complete(state: &Path, deadline: Duration) -> String {
    let mut last = String::new();
    wait_until(deadline, "hydration to complete", || {
        last = status(state);
        json_bool(&last, "complete") == Some(true)
    });
    last
}

/// Bytes of data (not holes) in the runs `make_sparse_image` wrote.
fn data_bytes(img: &Path) -> u64 {
    data_map(img).iter().filter(|e| e.2).map(|e| e.1).sum()
}

fn uri_via(relay: &Relay, export: &str) -> String {
    format!("nbd://127.0.0.1:{}/{export}", relay.port())
}

#[test]
fn serves_at_once_then_arrives_whole_and_sparse() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    make_sparse_image(&img, SIZE, 501);
    let src = source(d, &img, &d.join("st1"));
    let relay = Relay::start(src.addr.unwrap());
    let dst = d.join("dst.raw");
    let t0 = unix_now();
    // Slow enough that the reads below find most blocks absent.
    let s = destination(
        d,
        &dst,
        &d.join("st2"),
        &uri_via(&relay, "disk@s1"),
        &["--rate", "16M"],
    );

    let mut model = Model::from_file(&img);
    // Reads from all over the disk, and writes, right away.
    let mut cmds = Vec::new();
    for i in 0..16u64 {
        let off = i * 4 * MIB + 12345;
        let expect = &model.0[off as usize..][..1000];
        let byte = expect[0];
        if expect.iter().all(|&b| b == byte) {
            cmds.push(format!("read -P {byte} {off} 1000"));
        } else {
            cmds.push(format!("read {off} 1000"));
        }
    }
    for (i, off) in [0u64, 5 * MIB + 100, 33 * MIB, SIZE - 4096]
        .iter()
        .enumerate()
    {
        let len = 4096u64.min(SIZE - off);
        cmds.push(format!("write -P {} {off} {len}", 0x40 + i));
        cmds.push(format!("read -P {} {off} {len}", 0x40 + i));
        model.fill(*off, len, 0x40 + i as u8);
    }
    qemu_io(&s.uri(), &cmds);
    let st = status(&d.join("st2"));
    assert!(
        json_bool(&st, "complete") == Some(false),
        "the disk arrived before the first reads: {st}"
    );

    let st = wait_complete(&d.join("st2"), CMD_DEADLINE);
    assert_eq!(json_str(&st, "source").as_deref(), Some("detached"), "{st}");
    // When the pass ran, by the daemon's clock.
    let (a, b) = (json_f64(&st, "started_at"), json_f64(&st, "completed_at"));
    assert!(
        matches!((a, b), (Some(a), Some(b)) if t0 - 1.0 <= a && a < b && b <= unix_now() + 1.0),
        "{st}"
    );
    let line = run(nbdferry()
        .args(["hydrate", "status", "disk", "--admin"])
        .arg(d.join("st2/admin.sock")));
    assert!(line.contains(", arrived in "), "{line}");
    // The client's view and the image itself.
    let out = d.join("out.raw");
    run(peer("nbdcopy").arg(s.uri()).arg(&out));
    model.assert_file(&out);
    model.assert_file(&dst);
    // Holes stayed holes; nothing crossed twice.
    let data = data_bytes(&img);
    let alloc = allocated_bytes(&dst);
    assert!(
        alloc <= data + 4 * 4096 + 4 * MIB,
        "destination allocates {alloc} bytes for {data} bytes of data"
    );
    let moved = relay.bytes_down();
    assert!(
        moved <= data + data / 20 + 4 * MIB,
        "{moved} bytes crossed for {data} bytes of data"
    );
    eprintln!("data {data}, allocated {alloc}, moved {moved}");
    s.stop();
    src.stop();
}

/// The destination is SIGKILLed at random points of its hydration, five
/// times: each restart resumes from the durable present map, the disk
/// arrives byte-exact, and what crossed the link in all stays within 5% of
/// the source's data. (At 8 MiB/s a kill loses what was in flight and
/// waiting for its sync, a 1 MiB request or two: the disk is large enough
/// that five of them stay under 5%.)
#[test]
fn kill_9_rounds_resume_and_fetch_almost_nothing_twice() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    let size = 4 * SIZE;
    make_sparse_image(&img, size, 502);
    let src = source(d, &img, &d.join("st1"));
    let relay = Relay::start(src.addr.unwrap());
    let dst = d.join("dst.raw");
    let st2 = d.join("st2");
    let uri = uri_via(&relay, "disk@s1");
    let data = data_bytes(&img);
    let mut rng = Rng::new(77);
    for round in 0..5 {
        let s = destination(d, &dst, &st2, &uri, &["--rate", "8M"]);
        // Kill once some more of it has arrived.
        let target = (round + 1) * data / 6 + rng.below(data / 12);
        wait_until(CMD_DEADLINE, "some blocks to arrive", || {
            json_u64(&status(&st2), "present_bytes").unwrap_or(0) >= target.min(size)
        });
        s.stop_with(SIGKILL);
    }
    let s = destination(d, &dst, &st2, &uri, &[]);
    wait_complete(&st2, CMD_DEADLINE);
    let out = d.join("out.raw");
    run(peer("nbdcopy").arg(s.uri()).arg(&out));
    assert_same_content(&out, &img);
    assert_same_content(&dst, &img);
    let moved = relay.bytes_down();
    eprintln!("data {data}, moved {moved} over 6 starts");
    assert!(
        moved <= data + data / 20,
        "{moved} bytes crossed for {data} bytes of data"
    );
    s.stop();
    src.stop();
}

/// The source goes away mid-hydration: present blocks are still served;
/// a read of an absent block waits and completes when the source is back;
/// past `--source-timeout` such a read fails with EIO and the export keeps
/// serving; a cut link comes back by itself.
#[test]
fn a_lost_source_delays_or_fails_only_absent_reads() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    make_filled_image(&img, SIZE, 0x3c);
    let src = source(d, &img, &d.join("st1"));
    let relay = Relay::start(src.addr.unwrap());
    let dst = d.join("dst.raw");
    let st2 = d.join("st2");
    let s = destination(
        d,
        &dst,
        &st2,
        &uri_via(&relay, "disk@s1"),
        &["--rate", "4M", "--source-timeout", "3"],
    );
    qemu_io(&s.uri(), &["read -P 0x3c 0 1M".to_string()]);
    relay.cut();
    // Present: fine. Absent: EIO after the timeout, the export lives on.
    qemu_io(&s.uri(), &["read -P 0x3c 0 1M".to_string()]);
    let started = Instant::now();
    let out = run_output(
        peer("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x3c 60M 64k"])
            .arg(s.uri()),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error"),
        "absent read with the source gone: {text}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "failed before the source timeout"
    );
    let st = status(&st2);
    assert_eq!(
        json_str(&st, "source").as_deref(),
        Some("reconnecting"),
        "{st}"
    );
    qemu_io(&s.uri(), &["read -P 0x3c 0 1M".to_string()]);
    // A read waiting when the link comes back completes.
    let mut waiting = peer("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x3c 50M 64k"])
        .arg(s.uri())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    relay.restore();
    let st = wait_child(&mut waiting, CMD_DEADLINE).expect("read finished");
    assert!(st.success(), "read across the restored link failed");
    // And the pass finishes by itself.
    let st = wait_complete(&st2, CMD_DEADLINE);
    assert!(json_u64(&st, "reconnects").unwrap() >= 1, "{st}");
    assert_same_content(&dst, &img);
    s.stop();
    src.stop();
}

/// `--rate` paces the data the pass moves, not the disk's size: 4 MiB of
/// data in 64 MiB at 1 MiB/s arrive in about 3 s (the first MiB goes at
/// once), where pacing the holes too would take a minute.
#[test]
fn the_rate_paces_data_not_holes() {
    use std::os::unix::fs::FileExt;
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, at) in [3 * MIB, 20 * MIB, 41 * MIB, SIZE - MIB].iter().enumerate() {
        f.write_all_at(&vec![0x51 + i as u8; MIB as usize], *at)
            .unwrap();
    }
    drop(f);
    let src = source(d, &img, &d.join("st1"));
    let dst = d.join("dst.raw");
    let st2 = d.join("st2");
    let started = Instant::now();
    let s = destination(d, &dst, &st2, &src.uri(), &["--rate", "1M"]);
    let st = wait_complete(&st2, Duration::from_secs(30));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "4 MiB of data at 1 MiB/s arrived in {took:?}: the data was not paced"
    );
    assert_eq!(json_u64(&st, "fetched_bytes"), Some(4 * MIB), "{st}");
    assert_same_content(&dst, &img);
    s.stop();
    src.stop();
}

/// Another disk behind the source's address after a reconnect (same
/// size, same export name) is refused: nothing of it is written.
#[test]
fn a_different_disk_behind_the_source_is_refused() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    make_filled_image(&img, SIZE, 0x11);
    let other = d.join("other.raw");
    make_filled_image(&other, SIZE, 0x99);
    let src = source(d, &img, &d.join("st1"));
    let impostor = source(d, &other, &d.join("st3"));
    let relay = Relay::start(src.addr.unwrap());
    let dst = d.join("dst.raw");
    let st2 = d.join("st2");
    let s = destination(
        d,
        &dst,
        &st2,
        &uri_via(&relay, "disk@s1"),
        &["--rate", "4M", "--source-timeout", "3"],
    );
    qemu_io(&s.uri(), &["read -P 0x11 0 64k".to_string()]);
    relay.cut();
    relay.retarget(impostor.addr.unwrap());
    relay.restore();
    let out = run_output(
        peer("qemu-io")
            .args(["-f", "raw", "-c", "read 40M 64k"])
            .arg(s.uri()),
    );
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("error"));
    wait_until(CMD_DEADLINE, "the refusal to show", || {
        status(&st2).contains("not the disk it was")
    });
    // Nothing of the other disk reached the image.
    let bytes = std::fs::read(&dst).unwrap();
    assert!(!bytes.contains(&0x99), "the other disk's data was written");
    // A restart refuses it too, with a clear error.
    s.stop();
    let (_, err) = run_fail(
        nbdferry()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--name",
                "disk",
                "--state-dir",
            ])
            .arg(&st2)
            .args(["--source", &uri_via(&relay, "disk@s1")])
            .arg(&dst),
    );
    assert!(err.contains("not the disk it was"), "{err}");
    src.stop();
    impostor.stop();
}

/// qemu-nbd and nbdkit serve the source; checkpoints and snapshots taken
/// on the destination while it hydrates hold exact content.
#[test]
fn peers_as_sources_and_snapshots_while_arriving() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    make_sparse_image(&img, SIZE, 503);
    let qemu = qemu_nbd(&img, "disk", true);
    let kit = nbdkit_tcp(&["file".to_string(), format!("file={}", img.display())]);
    // No structured replies, so no `base:allocation`: every block is
    // fetched, and its block status asks cannot be what stops the pass.
    let kit_plain = nbdkit_tcp(&[
        "--no-sr".to_string(),
        "file".to_string(),
        format!("file={}", img.display()),
    ]);
    for (what, uri) in [
        ("qemu-nbd", qemu.uri("disk")),
        ("nbdkit", kit.uri("")),
        ("nbdkit-no-sr", kit_plain.uri("")),
    ] {
        let dst = d.join(format!("dst-{what}.raw"));
        let st2 = d.join(format!("st-{what}"));
        let s = destination(d, &dst, &st2, &uri, &["--rate", "16M"]);
        let sock = st2.join("admin.sock");
        run(nbdferry()
            .args(["checkpoint", "create", "disk", "c1", "--admin"])
            .arg(&sock));
        qemu_io(&s.uri(), &["write -P 0x77 8M 1M".to_string()]);
        run(nbdferry()
            .args(["snapshot", "create", "disk", "snap", "--admin"])
            .arg(&sock));
        qemu_io(&s.uri(), &["write -P 0x78 8M 2M".to_string()]);
        let mut at_snap = Model::from_file(&img);
        at_snap.fill(8 * MIB, MIB, 0x77);
        let snap = d.join(format!("snap-{what}.raw"));
        run(peer("nbdcopy").arg(s.uri_for("disk@snap")).arg(&snap));
        at_snap.assert_file(&snap);
        let dirty = run(peer("nbdinfo")
            .arg("--map=qemu:dirty-bitmap:c1")
            .arg(s.uri()));
        assert!(
            dirty.contains("8388608") && dirty.contains("dirty"),
            "{dirty}"
        );
        wait_complete(&st2, CMD_DEADLINE);
        let mut live = at_snap;
        live.fill(8 * MIB, 2 * MIB, 0x78);
        live.assert_file(&dst);
        s.stop();
    }
}

/// The whole scenario between two hosts: the source host serves `disk@s1`
/// over mutual TLS on a 200 Mbit/s link; the destination serves at once,
/// a client reads all over the disk and writes, and the disk arrives
/// byte-exact and sparse.
#[test]
fn two_hosts_over_mutual_tls_on_a_shaped_link() {
    let dir = tmpdir();
    let d = dir.path();
    let hosts = HostPair::new(Some("200mbit"));
    let pki = d.join("pki");
    run(nbdferry().args(["certs", "init"]).arg(&pki).args([
        "--server-name",
        IP_A,
        "--client-name",
        "dest-01",
    ]));
    let img = d.join("src.raw");
    make_sparse_image(&img, SIZE, 504);
    let st1 = d.join("st1");
    let pki_s = pki.to_str().unwrap();
    let src = Server::start_in(
        &hosts.a,
        &[
            "--listen",
            &format!("{IP_A}:10809"),
            "--tls-creds",
            pki_s,
            "--allow-client",
            "dest-01",
            "--name",
            "disk",
            "--state-dir",
            st1.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    run(nbdferry()
        .args(["snapshot", "create", "disk", "s1", "--admin"])
        .arg(st1.join("admin.sock")));
    let st2 = d.join("st2");
    let dst = d.join("dst.raw");
    let sock = d.join("dst.sock");
    let uri = format!("nbds://{IP_A}:10809/disk@s1?tls-certificates={pki_s}");
    let s = Server::start_in(
        &hosts.b,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--name",
            "disk",
            "--state-dir",
            st2.to_str().unwrap(),
            "--source",
            &uri,
            dst.to_str().unwrap(),
        ],
    );
    let local = format!("nbd+unix:///disk?socket={}", sock.display());
    let mut model = Model::from_file(&img);
    let mut cmds = Vec::new();
    for i in 0..8u64 {
        let off = i * 8 * MIB + 777;
        let byte = model.0[off as usize];
        if model.0[off as usize..][..512].iter().all(|&b| b == byte) {
            cmds.push(format!("read -P {byte} {off} 512"));
        }
        cmds.push(format!("write -P {} {} 4k", 0x60 + i, off + 2 * MIB));
        cmds.push(format!("read -P {} {} 4k", 0x60 + i, off + 2 * MIB));
        model.fill(off + 2 * MIB, 4096, 0x60 + i as u8);
    }
    qemu_io(&local, &cmds);
    let st = wait_complete(&st2, CMD_DEADLINE);
    eprintln!("two hosts: {st}");
    model.assert_file(&dst);
    let (data, alloc) = (data_bytes(&img), allocated_bytes(&dst));
    assert!(
        alloc <= data + 8 * 4096 + 4 * MIB,
        "destination allocates {alloc} bytes for {data} bytes of data"
    );
    s.stop();
    src.stop();
    drop(hosts);
}
