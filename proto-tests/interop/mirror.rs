//! Pre-copy migration: a mirror of a live disk onto another export while a
//! writer keeps writing it, then `complete`. After completion the source
//! refuses writes, so the check is the whole source image against the
//! whole destination image.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::netns::{HostPair, IP_B};
use crate::relay::Relay;

const SIZE: u64 = 64 * MIB;

/// A writer of random 4-64 KiB blocks at about `rate` bytes per second
/// into `uri`, until it is killed (or its writes are refused).
struct Writer(Child);

impl Writer {
    fn start(dir: &Path, uri: &str, rate: u64, seed: u64) -> Writer {
        let script = r#"
import nbd, os, random, time
random.seed(int(os.environ["SEED"]))
h = nbd.NBD()
h.connect_uri(os.environ["NBD_URI"])
rate = int(os.environ["RATE"])
size = h.get_size()
start = time.monotonic()
done = 0
while True:
    n = 4096 * random.randint(1, 16)
    off = 4096 * random.randrange((size - n) // 4096)
    h.pwrite(os.urandom(n), off)
    done += n
    ahead = done / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
"#;
        let env = [
            ("NBD_URI", uri.to_string()),
            ("RATE", rate.to_string()),
            ("SEED", seed.to_string()),
        ];
        let child = nbdsh_command(dir, script, &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        Writer(child)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        terminate_child(&mut self.0, Duration::from_secs(5));
    }
}

fn mirror_cli(state: &Path, args: &[&str]) -> String {
    run(nbdferry()
        .arg("mirror")
        .args(args)
        .arg("--admin")
        .arg(state.join("admin.sock")))
}

fn status(state: &Path) -> String {
    mirror_cli(state, &["status", "disk", "--json"])
}

fn wait_ready(state: &Path, deadline: Duration) -> String {
    let mut last = String::new();
    wait_until(deadline, "the mirror to be ready", || {
        last = status(state);
        json_bool(&last, "ready") == Some(true)
    });
    last
}

/// `mirror complete disk --json`; returns the downtime it reports.
fn complete(state: &Path) -> u64 {
    let out = mirror_cli(state, &["complete", "disk", "--json"]);
    json_u64(&out, "downtime_ms").unwrap_or_else(|| panic!("no downtime in {out}"))
}

fn live(dir: &Path, img: &Path, state: &Path) -> Server {
    let st = state.to_str().unwrap();
    Server::serve(dir, img, &["--name", "disk", "--state-dir", st]).with_name("disk")
}

#[test]
fn background_mirror_under_a_light_writer_converges_exactly() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    make_sparse_image(&img, SIZE, 601);
    let dst = d.join("dst.raw");
    make_filled_image(&dst, SIZE, 0xee);
    let (st1, st2) = (d.join("st1"), d.join("st2"));
    let src = live(d, &img, &st1);
    let target = live(d, &dst, &st2);
    let _w = Writer::start(d, &src.uri(), 1 << 20, 1);
    let out = mirror_cli(&st1, &["start", "disk", "--to", &target.uri()]);
    assert_eq!(json_str(&out, "phase").as_deref(), Some("bulk"), "{out}");
    let st = wait_ready(&st1, CMD_DEADLINE);
    eprintln!("ready: {st}");
    let downtime = complete(&st1);
    eprintln!("downtime {downtime} ms");
    assert_same_content(&img, &dst);
    // The source refuses writes now.
    let out = run_output(
        peer("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(src.uri()),
    );
    assert!(!out.status.success(), "the source still takes writes");
    target.stop();
    src.stop();
}

/// A writer faster than the copier's rate: background passes do not
/// shrink, active mode (switched by hand, or by --auto-active) converges.
#[test]
fn active_mode_converges_where_background_cannot() {
    for auto in [false, true] {
        let dir = tmpdir();
        let d = dir.path();
        let img = d.join("src.raw");
        make_filled_image(&img, SIZE, 0x21);
        let dst = d.join("dst.raw");
        make_empty_image(&dst, SIZE);
        let (st1, st2) = (d.join("st1"), d.join("st2"));
        let src = live(d, &img, &st1);
        let target = live(d, &dst, &st2);
        let _w = Writer::start(d, &src.uri(), 6 << 20, 2);
        let target_uri = target.uri();
        let mut args = vec!["start", "disk", "--to", &target_uri, "--rate", "2M"];
        if auto {
            args.push("--auto-active");
        }
        mirror_cli(&st1, &args);
        if !auto {
            // Give background mode time for a few passes: it stays behind.
            let started = Instant::now();
            let mut seen_ready = false;
            while started.elapsed() < Duration::from_secs(8) {
                let st = status(&st1);
                seen_ready |= json_bool(&st, "ready") == Some(true);
                std::thread::sleep(Duration::from_millis(500));
            }
            let st = status(&st1);
            assert!(
                !seen_ready,
                "background mirror got ready under a heavy writer: {st}"
            );
            assert!(json_u64(&st, "dirty_bytes").unwrap() > 0, "{st}");
            mirror_cli(&st1, &["set", "disk", "--mode", "active"]);
        }
        let st = wait_ready(&st1, CMD_DEADLINE);
        assert_eq!(json_str(&st, "mode").as_deref(), Some("active"), "{st}");
        complete(&st1);
        assert_same_content(&img, &dst);
        target.stop();
        src.stop();
    }
}

/// The source daemon is SIGKILLed mid-mirror and restarted: the mirror
/// resumes from its durable state and sends little more than what was
/// left; then the destination is SIGKILLed and restarted, and the mirror
/// recovers by itself.
#[test]
fn mirrors_survive_kill_9_of_either_side() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    make_filled_image(&img, SIZE, 0x42);
    let dst = d.join("dst.raw");
    make_empty_image(&dst, SIZE);
    let (st1, st2) = (d.join("st1"), d.join("st2"));
    let target = live(d, &dst, &st2);
    let relay = Relay::start(target.addr.unwrap());
    let to = format!("nbd://127.0.0.1:{}/disk", relay.port());
    let src = live(d, &img, &st1);
    mirror_cli(&st1, &["start", "disk", "--to", &to, "--rate", "8M"]);
    wait_until(CMD_DEADLINE, "a third of the bulk pass", || {
        json_u64(&status(&st1), "bytes_sent").unwrap_or(0) >= SIZE / 3
    });
    let left = json_u64(&status(&st1), "dirty_bytes").unwrap();
    src.stop_with(SIGKILL);
    let before = relay.bytes_up();
    let src = live(d, &img, &st1);
    let st = status(&st1);
    assert!(
        json_str(&st, "phase").is_some(),
        "the mirror did not resume: {st}"
    );
    mirror_cli(&st1, &["set", "disk", "--rate", "100M"]);
    wait_ready(&st1, CMD_DEADLINE);
    let after = relay.bytes_up() - before;
    eprintln!("{left} bytes were left; {after} crossed after the restart");
    assert!(
        after <= left + left / 10 + 2 * MIB,
        "{after} bytes sent after the restart for {left} left"
    );
    // Now the destination dies and comes back.
    let _w = Writer::start(d, &src.uri(), 1 << 20, 3);
    target.stop_with(SIGKILL);
    let st = status(&st1);
    eprintln!("destination down: {st}");
    let target = Server::start(&[
        "--listen",
        &format!("127.0.0.1:{}", relay.upstream().port()),
        "--name",
        "disk",
        "--state-dir",
        st2.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    wait_until(CMD_DEADLINE, "the mirror to reconnect", || {
        json_bool(&status(&st1), "destination_connected") == Some(true)
    });
    wait_ready(&st1, CMD_DEADLINE);
    complete(&st1);
    assert_same_content(&img, &dst);
    target.stop();
    src.stop();
}

#[test]
fn qemu_nbd_destination_and_wrong_sizes() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("src.raw");
    make_sparse_image(&img, SIZE, 602);
    let dst = d.join("dst.raw");
    make_empty_image(&dst, SIZE);
    let small = d.join("small.raw");
    make_empty_image(&small, SIZE / 2);
    let st1 = d.join("st1");
    let src = live(d, &img, &st1);
    let q = qemu_nbd(&dst, "disk", false);
    let wrong = qemu_nbd(&small, "small", false);
    let (_, err) = run_fail(
        nbdferry()
            .args([
                "mirror",
                "start",
                "disk",
                "--to",
                &wrong.uri("small"),
                "--admin",
            ])
            .arg(st1.join("admin.sock")),
    );
    assert!(err.contains("bytes"), "{err}");
    let _w = Writer::start(d, &src.uri(), 1 << 20, 4);
    mirror_cli(&st1, &["start", "disk", "--to", &q.uri("disk")]);
    wait_ready(&st1, CMD_DEADLINE);
    complete(&st1);
    drop(q);
    assert_same_content(&img, &dst);
    src.stop();
}

/// Between two hosts over a 200 Mbit/s link with mutual TLS: the source
/// host mirrors to the destination host under a writer, `migrate` in one
/// command, and the destination ends identical.
#[test]
fn migrate_between_two_hosts_over_mutual_tls() {
    let dir = tmpdir();
    let d = dir.path();
    let hosts = HostPair::new(Some("200mbit"));
    let pki = d.join("pki");
    run(nbdferry().args(["certs", "init"]).arg(&pki).args([
        "--server-name",
        IP_B,
        "--client-name",
        "src-01",
    ]));
    let img = d.join("src.raw");
    make_sparse_image(&img, SIZE, 603);
    let dst = d.join("dst.raw");
    make_empty_image(&dst, SIZE);
    let (st1, st2) = (d.join("st1"), d.join("st2"));
    let pki_s = pki.to_str().unwrap();
    let target = Server::start_in(
        &hosts.b,
        &[
            "--listen",
            &format!("{IP_B}:10809"),
            "--tls-creds",
            pki_s,
            "--allow-client",
            "src-01",
            "--name",
            "disk",
            "--state-dir",
            st2.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
    let sock = d.join("src.sock");
    let src = Server::start_in(
        &hosts.a,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--name",
            "disk",
            "--state-dir",
            st1.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let local = format!("nbd+unix:///disk?socket={}", sock.display());
    let _w = Writer::start(d, &local, 2 << 20, 5);
    let to = format!("nbds://{IP_B}:10809/disk?tls-certificates={pki_s}");
    let out = run(nbdferry()
        .args(["migrate", "disk", "--to", &to, "--json", "--admin"])
        .arg(st1.join("admin.sock")));
    eprintln!("migrate: {out}");
    assert!(json_u64(&out, "downtime_ms").is_some(), "{out}");
    assert_same_content(&img, &dst);
    target.stop();
    src.stop();
    drop(hosts);
}
