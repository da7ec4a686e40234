//! The guards against clients that hog the server: the idle timeout, the
//! answer a client over the connection limit gets, and the settings in the
//! config file.

use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn idle_client_is_disconnected_and_a_busy_one_is_not() {
    let (dir, img) = fixture(81);
    let s = Server::serve_env(
        dir.path(),
        &img,
        &["--idle-timeout", "1"],
        &[("NBDFERRY_LOG", "warn,nbd_server::conn=info")],
    );
    let addr = s.addr.expect("tcp address");
    // A client that keeps sending requests outlives the timeout...
    let mut busy = RawConn::tcp(addr);
    busy.handshake("");
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        busy.read_at(0, 4096);
        std::thread::sleep(Duration::from_millis(200));
    }
    busy.disconnect();
    // ...one that goes quiet is disconnected, after the timeout.
    let mut idle = RawConn::tcp(addr);
    idle.handshake("");
    idle.read_at(0, 4096);
    let quiet = Instant::now();
    idle.expect_closed("an idle client");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "idle client closed after {after:?}, before the 1 s timeout"
    );
    wait_until(READY_DEADLINE, "the log line for the idle client", || {
        s.log_text().contains("idle client: disconnecting")
    });
    s.stop();
}

#[test]
fn client_over_the_connection_limit_hears_why() {
    let (dir, img) = fixture(82);
    let s = Server::serve(dir.path(), &img, &["--max-connections", "1"]);
    let mut first = RawConn::tcp(s.addr.expect("tcp address"));
    first.handshake("");

    // qemu prints the server's message (libnbd 1.14 only with
    // LIBNBD_DEBUG=1).
    let out = run_output(peer("qemu-img").args(["info", &s.uri()]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu-img succeeded over the limit");
    assert!(
        stderr.contains("server reported: server busy: connection limit (1) reached"),
        "qemu-img does not say why it was refused:\n{stderr}"
    );

    // Our own client sees ERR_POLICY with the reason, and ABORT works.
    let mut raw = RawConn::tcp(s.addr.expect("tcp address"));
    let local = raw.tcp.as_ref().unwrap().local_addr().unwrap();
    raw.start_options();
    assert!(raw.send_option(OPT_LIST, &[]));
    let (opt, ty, text) = raw.read_option_reply().expect("an option reply");
    assert_eq!((opt, ty), (OPT_LIST, 0x8000_0002), "want ERR_POLICY");
    assert_eq!(
        String::from_utf8_lossy(&text),
        "server busy: connection limit (1) reached, try again later"
    );
    assert!(raw.send_option(OPT_ABORT, &[]));
    let (_, ty, _) = raw.read_option_reply().expect("ACK to ABORT");
    assert_eq!(ty, REP_ACK);
    raw.expect_closed("after ABORT");
    wait_until(READY_DEADLINE, "the log to name the refused peer", || {
        s.log_text()
            .lines()
            .any(|l| l.contains("connection limit reached") && l.contains(&local.to_string()))
    });

    // The served client is untouched, and its slot is free once it goes.
    first.read_at(0, 4096);
    first.disconnect();
    wait_until(READY_DEADLINE, "the slot to be free again", || {
        run_output(peer("nbdinfo").arg("--size").arg(s.uri()))
            .status
            .success()
    });
    s.stop();
}

#[test]
fn config_file_sets_the_guards_and_bad_values_are_refused() {
    let (dir, img) = fixture(83);
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "max-memory = \"1G\"\nstall-timeout = 5\nidle-timeout = 1\n\
             [[export]]\nname = \"disk\"\npath = \"{}\"\n",
            img.display()
        ),
    )
    .unwrap();
    let state = tmpdir();
    let s = Server::serve_config(state.path(), &cfg);
    let mut c = RawConn::tcp(s.addr.expect("tcp address"));
    c.handshake("disk");
    c.read_at(0, 4096);
    // The config's idle timeout applies.
    c.expect_closed("an idle client under idle-timeout = 1");
    s.stop();

    std::fs::write(
        &cfg,
        format!(
            "max-memory = \"1M\"\n[[export]]\nname = \"disk\"\npath = \"{}\"\n",
            img.display()
        ),
    )
    .unwrap();
    let (_, err) = run_fail(
        nbdferry()
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .arg("--config")
            .arg(&cfg),
    );
    assert!(
        err.contains("max-memory must be at least"),
        "a budget below two requests was accepted: {err}"
    );
}
