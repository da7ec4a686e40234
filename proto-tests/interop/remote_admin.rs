//! The admin API over TCP with mutual TLS: identities from client
//! certificates, roles granted per disk in the config file, refusals of
//! everyone else, and the Unix socket beside it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

const SIZE: u64 = 16 * MIB;

/// `nbdferry certs init DIR/NAME --client-name CLIENT`.
fn pki(dir: &Path, name: &str, client: &str) -> PathBuf {
    let d = dir.join(name);
    run(nbdferry()
        .args(["certs", "init"])
        .arg(&d)
        .args(["--client-name", client]));
    d
}

/// The `https://127.0.0.1:PORT` the daemon printed for its admin API.
fn admin_url(s: &Server) -> String {
    let log = s.log_text();
    let url = log
        .lines()
        .find_map(|l| l.strip_prefix("admin API on "))
        .unwrap_or_else(|| panic!("no admin API line in:\n{log}"));
    url.trim().to_string()
}

/// `nbdferry ARGS --admin URL --tls-creds CREDS`.
fn remote(url: &str, creds: &Path, args: &[&str]) -> std::process::Output {
    run_output(
        nbdferry()
            .args(args)
            .args(["--admin", url, "--tls-creds"])
            .arg(creds),
    )
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one-line error of a failed command.
fn refused(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "succeeded but should not have");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{err}");
    lines[0].to_string()
}

#[test]
fn operators_snapshot_viewers_look_and_strangers_are_refused() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("disk.raw");
    make_sparse_image(&img, SIZE, 41);
    let original = d.join("original.raw");
    copy_file(&img, &original);
    let certs = pki(d, "pki", "backup-01");
    let viewer = d.join("viewer");
    run(nbdferry()
        .args(["certs", "client"])
        .arg(&certs)
        .arg("viewer-01")
        .arg(&viewer));
    let stranger = pki(d, "other", "backup-01");
    // Trusts our server, but its own certificate comes from another CA.
    let foreign = d.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(stranger.join(f), foreign.join(f)).unwrap();
    }
    let anonymous = d.join("anonymous");
    std::fs::create_dir(&anonymous).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();

    let state = d.join("state");
    let cfg = d.join("nbdferry.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"admin-listen = "127.0.0.1:0"
tls-creds = "{certs}"
tls = "allow"
[[admin.grant]]
client = "backup-01"
role = "operator"
disks = ["disk"]
[[admin.grant]]
client = "viewer-01"
role = "viewer"
[[export]]
name = "disk"
path = "{img}"
[[export]]
name = "other"
path = "{original}"
read-only = true
"#,
            certs = certs.display(),
            img = img.display(),
            original = original.display()
        ),
    )
    .unwrap();
    let s = Server::serve_config(&state, &cfg).with_name("disk");
    let url = admin_url(&s);

    // The operator snapshots its disk remotely; the export serves the
    // content of that instant while the live disk changes.
    let out = ok(&remote(&url, &certs, &["snapshot", "create", "disk", "s1"]));
    assert_eq!(
        json_str(&out, "export").as_deref(),
        Some("disk@s1"),
        "{out}"
    );
    qemu_io(&s.uri(), &["write -P 0x77 0 1M".to_string()]);
    let snap = d.join("snap.raw");
    run(peer("nbdcopy").arg(s.uri_for("disk@s1")).arg(&snap));
    assert_same_content(&snap, &original);
    let live = d.join("live.raw");
    run(peer("nbdcopy").arg(s.uri()).arg(&live));
    assert_eq!(read_range(&live, 0, 4), vec![0x77; 4]);
    // It sees its disk and that disk's snapshot, nothing else.
    let (code, exports) = https_get(&url, &certs, "/v1/exports");
    assert_eq!(code, 200, "{exports}");
    assert!(
        exports.contains("\"disk@s1\"") && !exports.contains("\"other\""),
        "{exports}"
    );

    // A viewer lists but cannot change anything: 403, and the log says who.
    let list = ok(&remote(&url, &viewer, &["snapshot", "list", "disk"]));
    assert!(list.contains("disk@s1"), "{list}");
    let e = refused(&remote(
        &url,
        &viewer,
        &["snapshot", "create", "disk", "s2"],
    ));
    assert!(e.contains("operator role"), "{e}");
    let e = refused(&remote(
        &url,
        &viewer,
        &["checkpoint", "create", "disk", "c1"],
    ));
    assert!(e.contains("operator role"), "{e}");
    let e = refused(&remote(
        &url,
        &viewer,
        &["snapshot", "revert", "disk", "s1"],
    ));
    assert!(e.contains("admin role"), "{e}");
    let log = s.log_text();
    assert!(
        log.lines().any(|l| l.contains("admin request refused")
            && l.contains("viewer-01")
            && l.contains("disk")),
        "refusal not logged:\n{log}"
    );
    // Reverting is for admins, not operators.
    let e = refused(&remote(&url, &certs, &["snapshot", "revert", "disk", "s1"]));
    assert!(e.contains("admin role"), "{e}");

    // No certificate, or one from another CA: no TLS session at all.
    for creds in [&foreign, &anonymous] {
        let e = refused(&remote(&url, creds, &["snapshot", "list", "disk"]));
        assert!(e.contains("client certificate"), "{e}");
    }
    // Plain HTTP on the TLS port gets no HTTP answer.
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.write_all(b"GET /v1/exports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
        "plaintext HTTP was served"
    );

    // The Unix socket still works, with every right.
    let local = run(nbdferry()
        .args(["snapshot", "delete", "disk", "s1", "--admin"])
        .arg(state.join("admin.sock")));
    assert!(local.contains("freed_blocks"), "{local}");
    s.stop();
}

/// `GET path` over HTTPS with the client credentials in `creds`, sent by
/// Python's `ssl` (OpenSSL): (status, whole answer).
fn https_get(url: &str, creds: &Path, path: &str) -> (u16, String) {
    let hostport = url.trim_start_matches("https://");
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let script = r#"
import socket, ssl, sys
d, host, port, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=d + "/ca-cert.pem")
ctx.load_cert_chain(d + "/client-cert.pem", d + "/client-key.pem")
with socket.create_connection((host, port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
sys.stdout.write(out.decode())
"#;
    let text = run(Command::new("python3")
        .args(["-c", script])
        .arg(creds)
        .args([host, port, path]));
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in: {text}"));
    (code, text)
}
