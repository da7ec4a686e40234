//! Command line contract: one-line errors with non-zero exit, readiness line,
//! graceful stop on SIGTERM/SIGINT (exit 0, in-flight requests drained).

use crate::harness::*;
use std::ffi::OsString;
use std::time::Duration;

/// Run `nbdferry serve ARGS`, expect a non-zero exit with exactly one
/// non-empty stderr line starting with `error: `.
fn expect_cli_error(args: &[OsString], what: &str) -> String {
    let mut c = nbdferry();
    c.arg("serve").args(args);
    let out = run_output_deadline(&mut c, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what}: nbdferry exited 0; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one stderr line, got:\n{stderr}"
    );
    assert!(
        lines[0].starts_with("error: "),
        "{what}: stderr line does not start with `error: `: {}",
        lines[0]
    );
    lines[0].to_string()
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(Into::into).collect()
}

#[test]
fn cli_errors_are_one_line() {
    let dir = tmpdir();
    let img = dir.path().join("disk.raw");
    make_empty_image(&img, MIB);
    let imgs = img.display().to_string();

    expect_cli_error(
        &os(&["--listen", "127.0.0.1:0", "/nonexistent/dir/disk.raw"]),
        "missing file",
    );
    for bad in [
        "not-an-address",
        "127.0.0.1:99999",
        "256.1.1.1:10809",
        "127.0.0.1",
    ] {
        expect_cli_error(&os(&["--listen", bad, &imgs]), &format!("--listen {bad}"));
    }
    // Usage errors found by the argument parser are one line too.
    let e = expect_cli_error(&os(&["--listen", "127.0.0.1:0"]), "no FILE");
    assert!(e.contains("<FILE>"), "{e}");
    let e = expect_cli_error(&os(&["--max-inflight", "many", &imgs]), "bad number");
    assert!(e.contains("--max-inflight"), "{e}");
    expect_cli_error(&os(&["--no-such-flag", &imgs]), "unknown flag");
    for bad in ["96K", "2K", "128M", "lots", "0"] {
        let e = expect_cli_error(
            &os(&["--listen", "127.0.0.1:0", "--granularity", bad, &imgs]),
            &format!("--granularity {bad}"),
        );
        assert!(e.contains("granularity") || e.contains("size"), "{e}");
    }
    // A read-only export has no state for a granularity to apply to.
    let e = expect_cli_error(
        &os(&["--read-only", "--granularity", "1M", &imgs]),
        "--granularity on a read-only export",
    );
    assert!(e.contains("writable exports only"), "{e}");
    // Port already in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    expect_cli_error(&os(&["--listen", &addr, &imgs]), "port in use");
    drop(busy);
    // Unix socket in a directory that does not exist.
    expect_cli_error(
        &os(&["--socket", "/nonexistent/dir/x.sock", &imgs]),
        "bad socket path",
    );

    // Config files.
    let conf = dir.path().join("bad.toml");
    let cases = [
        (
            "syntax error",
            "listen = [\"127.0.0.1:0\"\n[[export]\nname = \n".to_string(),
        ),
        (
            "missing export file",
            "listen = [\"127.0.0.1:0\"]\n[[export]]\nname = \"a\"\npath = \"/nonexistent/a.raw\"\n"
                .to_string(),
        ),
        (
            "bad listen address in config",
            format!("listen = [\"nowhere\"]\n[[export]]\nname = \"a\"\npath = \"{imgs}\"\n"),
        ),
        (
            "export without path",
            "listen = [\"127.0.0.1:0\"]\n[[export]]\nname = \"a\"\n".to_string(),
        ),
        (
            "wrong type",
            format!("listen = 5\n[[export]]\nname = \"a\"\npath = \"{imgs}\"\n"),
        ),
        (
            "bad granularity in config",
            format!("[[export]]\nname = \"a\"\npath = \"{imgs}\"\ngranularity = \"3K\"\n"),
        ),
        (
            "granularity on a read-only export in config",
            format!(
                "[[export]]\nname = \"a\"\npath = \"{imgs}\"\nread-only = true\ngranularity = \"1M\"\n"
            ),
        ),
        (
            "granularity of the wrong type",
            format!("[[export]]\nname = \"a\"\npath = \"{imgs}\"\ngranularity = true\n"),
        ),
    ];
    for (what, text) in cases {
        std::fs::write(&conf, text).unwrap();
        expect_cli_error(&[OsString::from("--config"), conf.clone().into()], what);
    }
    expect_cli_error(
        &os(&["--config", "/nonexistent/nbdferry.toml"]),
        "missing config file",
    );
}

#[test]
fn readiness_line_lists_every_listener() {
    let (dir, img) = fixture(71);
    let s = Server::serve(dir.path(), &img, &[]);
    // Both listeners really serve: read the first block over each.
    let want = read_range(&img, 0, 4096);
    let mut t = RawConn::tcp(s.addr.unwrap());
    t.handshake("");
    assert_eq!(t.read_at(0, 4096), want);
    t.disconnect();
    let mut u = RawConn::unix(s.socket.as_ref().unwrap());
    u.handshake("");
    assert_eq!(u.read_at(0, 4096), want);
    u.disconnect();
    s.stop();
    // Unix socket only.
    let sock = dir.path().join("only.sock");
    let s = Server::start(&[
        OsString::from("--socket"),
        sock.clone().into(),
        img.clone().into(),
    ]);
    assert!(
        s.addr.is_none(),
        "unexpected TCP listener with --socket only"
    );
    assert_eq!(s.socket.as_deref(), Some(sock.as_path()));
    let mut u = RawConn::unix(&sock);
    u.handshake("");
    assert_eq!(u.size, IMG_SIZE);
    u.disconnect();
    s.stop();
}

fn stop_with_idle_clients(sig: i32) {
    let (dir, img) = fixture(72);
    let s = Server::serve(dir.path(), &img, &[]);
    // One client in transmission, idle; one stuck in the handshake.
    let mut a = RawConn::tcp(s.addr.unwrap());
    a.handshake("");
    assert_eq!(a.read_at(0, 4096), read_range(&img, 0, 4096));
    let mut b = RawConn::unix(s.socket.as_ref().unwrap());
    b.greeting();
    let log = s.log.clone();
    let st = s.stop_with(sig);
    assert!(
        st.success(),
        "nbdferry exited with {st} after signal {sig}; stderr:\n{}",
        log.lock().unwrap().join("\n")
    );
    a.expect_closed("idle client after shutdown");
    b.expect_closed("handshaking client after shutdown");
}

#[test]
fn sigterm_exits_zero() {
    stop_with_idle_clients(SIGTERM);
}

#[test]
fn sigint_exits_zero() {
    stop_with_idle_clients(SIGINT);
}

/// Requests in flight when SIGTERM arrives are answered (data or
/// ESHUTDOWN), then the connection closes and the exit status is 0.
#[test]
fn sigterm_drains_in_flight_requests() {
    let (dir, img) = fixture(73);
    let s = Server::serve(dir.path(), &img, &["--read-only"]);
    let mut c = RawConn::tcp(s.addr.unwrap());
    c.handshake("");
    let n = 64u64;
    let len = MIB as u32;
    for i in 0..n {
        assert!(c.send_request(0, CMD_READ, 1000 + i, i * MIB, len));
    }
    let check = |c: &mut RawConn, err: u32, cookie: u64| -> bool {
        assert!(
            (1000..1000 + n).contains(&cookie),
            "unknown cookie {cookie}"
        );
        if err == 0 {
            let off = (cookie - 1000) * MIB;
            let data = c.must_read(len as usize, "READ data");
            assert!(
                data == read_range(&img, off, len as usize),
                "wrong data for READ at {off}"
            );
            true
        } else {
            assert_eq!(
                err, ESHUTDOWN,
                "in-flight READ failed with {err} during shutdown"
            );
            false
        }
    };
    let (err, cookie) = c.read_simple_reply().expect("no reply before SIGTERM");
    assert!(check(&mut c, err, cookie), "first READ failed");
    s.signal(SIGTERM);
    // All requests were sent (and most likely read by the server) before
    // SIGTERM: every one of them must be answered before the close.
    let mut replies = 1;
    let mut with_data = 1;
    while replies < n {
        let Some((err, cookie)) = c.read_simple_reply() else {
            panic!("connection closed after {replies} of {n} replies ({with_data} with data)");
        };
        if check(&mut c, err, cookie) {
            with_data += 1;
        }
        replies += 1;
    }
    let log = s.log.clone();
    let st = s.wait_exit();
    assert!(
        st.success(),
        "exit status {st} after SIGTERM with requests in flight; stderr:\n{}",
        log.lock().unwrap().join("\n")
    );
    c.expect_closed("after drain");
}

/// The readiness line promises that the server is fully up, signal handling
/// included: a SIGTERM right after it must still give a clean exit 0.
#[test]
fn sigterm_right_after_readiness_exits_zero() {
    let (dir, img) = fixture(74);
    for i in 0..10 {
        let sock = dir.path().join(format!("r{i}.sock"));
        let mut args: Vec<OsString> = vec!["--socket".into(), sock.into()];
        if i % 2 == 1 {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        args.push(img.clone().into());
        let s = Server::start(&args);
        let st = s.stop_with(SIGTERM);
        assert!(
            st.success(),
            "iteration {i}: SIGTERM right after `listening on` gave {st} (signal handler not yet installed?)"
        );
    }
}
