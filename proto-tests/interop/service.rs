//! Running as a service: systemd's readiness protocol (a datagram socket
//! stands in for systemd's NOTIFY_SOCKET), the health probes through the
//! CLI over the Unix socket and mutual TLS, and JSON logs that parse line
//! by line.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Stdio};

use crate::harness::*;

const SIZE: u64 = 16 * MIB;

/// A daemon spawned without the harness's wait for its status line (the
/// tests here wait on something else); killed by pid on drop.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        terminate_child(&mut self.0, READY_DEADLINE);
    }
}

/// The next notification, within the deadline.
fn next_notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within {READY_DEADLINE:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_notified_once_listeners_accept_and_stopping_on_shutdown() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("disk.raw");
    make_sparse_image(&img, SIZE, 7);
    let notify_path = d.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(READY_DEADLINE)).unwrap();
    let port = free_port();
    let nbd_sock = d.join("nbd.sock");
    let state = d.join("state");
    let mut cmd = nbdferry();
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--socket",
    ])
    .arg(&nbd_sock)
    .arg("--state-dir")
    .arg(&state)
    .arg(&img)
    .env("NOTIFY_SOCKET", &notify_path)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut daemon = Spawned(cmd.spawn().expect("spawn nbdferry serve"));

    // The moment READY=1 arrives, every listener takes clients.
    assert_eq!(next_notification(&notify), "READY=1\n");
    let mut tcp = RawConn::tcp(format!("127.0.0.1:{port}").parse().unwrap());
    tcp.handshake("");
    assert_eq!(tcp.size, SIZE);
    let mut unix = RawConn::unix(&nbd_sock);
    unix.handshake("");
    let (status, body) = admin_http(&state.join("admin.sock"), "GET", "/v1/ready", "");
    assert_eq!((status, body.as_str()), (200, r#"{"ready":true}"#));
    tcp.disconnect();
    unix.disconnect();

    send_signal(daemon.0.id(), SIGTERM);
    assert_eq!(next_notification(&notify), "STOPPING=1\n");
    let st = wait_child(&mut daemon.0, READY_DEADLINE).expect("exit after SIGTERM");
    assert!(st.success(), "exit status {st}");
}

#[test]
fn health_probes_answer_any_certificate_of_the_ca_and_the_local_socket() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("disk.raw");
    make_sparse_image(&img, SIZE, 8);
    let pki = d.join("pki");
    run(nbdferry()
        .args(["certs", "init"])
        .arg(&pki)
        .args(["--client-name", "backup-01"]));
    // An identity the CA signed but no grant names.
    let monitor = d.join("monitor");
    run(nbdferry()
        .args(["certs", "client"])
        .arg(&pki)
        .arg("monitor")
        .arg(&monitor));
    let state = d.join("state");
    let pki_arg = pki.to_str().unwrap();
    let s = Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state.to_str().unwrap(),
        "--tls-creds",
        pki_arg,
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-grant",
        "backup-01=operator",
        "--name",
        "disk",
        img.to_str().unwrap(),
    ]);
    let log = s.log_text();
    let url = log
        .lines()
        .find_map(|l| l.strip_prefix("admin API on "))
        .unwrap_or_else(|| panic!("no admin API line in:\n{log}"))
        .trim()
        .to_string();
    let sock = state.join("admin.sock");

    let remote = |creds: &Path, args: &[&str]| {
        run_output(
            nbdferry()
                .args(args)
                .args(["--admin", &url, "--tls-creds"])
                .arg(creds),
        )
    };
    for probe in [&["health"][..], &["health", "--ready"]] {
        let out = remote(&monitor, probe);
        assert!(
            out.status.success(),
            "{probe:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let local = run(nbdferry().args(probe).arg("--admin").arg(&sock));
        assert_eq!(local, String::from_utf8_lossy(&out.stdout));
    }
    assert!(run(nbdferry().arg("health").arg("--admin").arg(&sock)).contains("\"alive\": true"));
    // Everything else still needs a grant.
    let out = remote(&monitor, &["snapshot", "list", "disk"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("viewer role"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    s.stop();
    let (_, err) = run_fail(nbdferry().arg("health").arg("--admin").arg(&sock));
    assert!(err.contains("cannot reach"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Every stderr line of a run must be one JSON object with the fields log
/// collectors key on; returns the messages.
fn parse_json_log(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {l}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(v[key].is_string(), "no {key} in {l}");
            }
            v
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("disk.raw");
    make_sparse_image(&img, SIZE, 9);
    let state = d.join("state");
    let json = [("NBDFERRY_LOG_FORMAT", "json"), ("NBDFERRY_LOG", "debug")];
    let s = Server::start_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
            "--name",
            "disk",
            img.to_str().unwrap(),
        ],
        &json,
    );
    // Traffic that logs: an NBD session, an admin change, an admin error.
    let mut c = RawConn::tcp(s.addr.unwrap());
    c.handshake("disk");
    c.read_at(0, 4096);
    c.disconnect();
    let sock = state.join("admin.sock");
    run(nbdferry()
        .args(["checkpoint", "create", "disk", "c1", "--admin"])
        .arg(&sock));
    assert_eq!(
        admin_http(&sock, "GET", "/v1/disks/nope/checkpoints", "").0,
        404
    );
    let log = s.log.clone();
    s.stop();
    let text = log.lock().unwrap().join("\n");

    let lines = parse_json_log(&text);
    let messages: Vec<&str> = lines.iter().filter_map(|v| v["message"].as_str()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("listening on 127.0.0.1:")),
        "{text}"
    );
    assert!(
        messages.iter().any(|m| m.contains("checkpoint")),
        "the checkpoint was not logged:\n{text}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("shutting down")),
        "{text}"
    );
    // Event fields stand beside the message, for collectors to index.
    assert!(
        lines.iter().any(|v| v["socket"].is_string()),
        "no structured field in:\n{text}"
    );

    // A daemon that cannot start says why in JSON too.
    let out = run_output(
        nbdferry()
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .arg(d.join("missing.raw"))
            .envs(json),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines = parse_json_log(&err);
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR", "{err}");
    assert!(
        last["message"].as_str().unwrap().contains("missing.raw"),
        "{err}"
    );
}

/// `GET /v1/exports` says where the NBD listeners are, as the readiness
/// line does, so that a daemon on an ephemeral port can be found through
/// its admin API: the addresses it lists take clients.
#[test]
fn exports_list_the_listeners_clients_reach() {
    let dir = tmpdir();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let state = dir.path().join("state");
    let s = Server::live(dir.path(), &img, &state);
    let (status, body) = admin_http(&state.join("admin.sock"), "GET", "/v1/exports", "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let listeners: Vec<&str> = v["listeners"]
        .as_array()
        .unwrap_or_else(|| panic!("no listeners in {body}"))
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let socket = format!("unix:{}", s.socket.as_ref().unwrap().display());
    assert_eq!(
        listeners,
        [s.addr.unwrap().to_string().as_str(), socket.as_str()]
    );
    let mut tcp = RawConn::tcp(listeners[0].parse().unwrap());
    tcp.handshake("disk");
    assert_eq!(tcp.size, SIZE);
    tcp.disconnect();
    let mut unix = RawConn::unix(Path::new(listeners[1].strip_prefix("unix:").unwrap()));
    unix.handshake("disk");
    assert_eq!(unix.size, SIZE);
    unix.disconnect();
    s.stop();
}
