//! Reloading a running server without dropping clients: SIGHUP (and the
//! admin route) re-read the config file and the certificates. Exports are
//! added and removed, a rotated certificate reaches the next client, and a
//! broken configuration is refused whole while the old one keeps serving.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::harness::*;

const SIZE: u64 = 16 * MIB;
const SIGHUP: i32 = 1;

/// `nbdferry certs init DIR/NAME`: a CA, a server and a client certificate.
fn pki(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    run(nbdferry().args(["certs", "init"]).arg(&d));
    d
}

/// Makes `live` hold the files of `from` (what an operator's certificate
/// rotation does to the directory the daemon reads).
fn install_pki(from: &Path, live: &Path) {
    std::fs::create_dir_all(live).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), live.join(f.file_name())).unwrap();
    }
}

fn config(live: &Path, exports: &[(&str, &Path)]) -> String {
    let mut text = format!("tls-creds = \"{}\"\ntls = \"allow\"\n", live.display());
    for (name, path) in exports {
        text += &format!(
            "[[export]]\nname = \"{name}\"\npath = \"{}\"\n",
            path.display()
        );
    }
    text
}

/// The names `GET /v1/exports` lists.
fn export_names(admin: &Path) -> Vec<String> {
    let (status, body) = admin_http(admin, "GET", "/v1/exports", "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn nbds_uri(s: &Server, export: &str, pki: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        s.port(),
        pki.display()
    )
}

#[test]
fn sighup_swaps_exports_and_certificates_and_keeps_clients() {
    require_peer("nbdinfo");
    require_peer("nbdcopy");
    let dir = tmpdir();
    let d = dir.path();
    let (old_pki, new_pki, live) = (pki(d, "old"), pki(d, "new"), d.join("live"));
    install_pki(&old_pki, &live);
    let (keep, gone, fresh) = (d.join("keep.raw"), d.join("gone.raw"), d.join("fresh.raw"));
    make_sparse_image(&keep, SIZE, 1);
    make_sparse_image(&gone, SIZE, 2);
    make_sparse_image(&fresh, SIZE, 3);
    let cfg = d.join("nbdferry.toml");
    std::fs::write(&cfg, config(&live, &[("keep", &keep), ("gone", &gone)])).unwrap();
    let state = d.join("state");
    let admin = state.join("admin.sock");
    let s = Server::serve_config(&state, &cfg).with_name("keep");
    let addr = format!("127.0.0.1:{}", s.port()).parse().unwrap();

    // Clients of both exports, connected before the reload.
    let mut kept = RawConn::tcp(addr);
    kept.handshake("keep");
    assert_eq!(
        kept.read_at(0, MIB as u32),
        read_range(&keep, 0, MIB as usize)
    );
    let mut doomed = RawConn::tcp(addr);
    doomed.handshake("gone");
    let copied = d.join("copied.raw");
    let mut copy = peer("nbdcopy")
        .arg(s.uri_for("keep"))
        .arg(&copied)
        .spawn()
        .expect("spawn nbdcopy");

    // Remove one export, add another, rotate the certificates.
    std::fs::write(&cfg, config(&live, &[("keep", &keep), ("fresh", &fresh)])).unwrap();
    install_pki(&new_pki, &live);
    let asked = Instant::now();
    s.signal(SIGHUP);
    wait_until(READY_DEADLINE, "the reload to publish 'fresh'", || {
        export_names(&admin) == ["fresh", "keep"]
    });
    eprintln!("reload visible after {:?}", asked.elapsed());

    // The copy running across the reload completes byte-exact.
    let st = wait_child(&mut copy, CMD_DEADLINE).expect("nbdcopy finishes");
    assert!(st.success(), "nbdcopy across the reload: {st}");
    assert_same_content(&keep, &copied);
    // The kept export's open connection still reads correct data.
    assert_eq!(
        kept.read_at(5 * MIB, MIB as u32),
        read_range(&keep, 5 * MIB, MIB as usize)
    );
    // The removed export's idle client is closed; new clients are refused.
    doomed.expect_closed("client of the removed export");
    let (_, err) = run_fail(peer("nbdinfo").arg(s.uri_for("gone")));
    assert!(!err.is_empty(), "a new client of the removed export got in");
    // The new export serves its image.
    let out = d.join("fresh-copy.raw");
    run(peer("nbdcopy").arg(s.uri_for("fresh")).arg(&out));
    assert_eq!(hash_file(&out), hash_file(&fresh));
    // The next TLS client is shown the new certificate: only the new CA
    // trusts it.
    let size = run(peer("nbdinfo")
        .arg("--size")
        .arg(nbds_uri(&s, "keep", &new_pki)));
    assert_eq!(size.trim(), SIZE.to_string());
    run_fail(
        peer("nbdinfo")
            .arg("--size")
            .arg(nbds_uri(&s, "keep", &old_pki)),
    );

    // A broken config is refused whole, with one line; the old one serves.
    let keeps_serving = |why: &str| {
        assert_eq!(export_names(&admin), ["fresh", "keep"], "after {why}");
        let size = run(peer("nbdinfo").arg("--size").arg(s.uri_for("fresh")));
        assert_eq!(size.trim(), SIZE.to_string(), "after {why}");
    };
    std::fs::write(&cfg, "[[export]\nname = \"keep\"\n").unwrap();
    let (status, body) = admin_http(&admin, "POST", "/v1/reload", "");
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("nbdferry.toml line") && !body.contains('\n'),
        "{body}"
    );
    keeps_serving("a syntax error");
    let missing = d.join("missing.raw");
    std::fs::write(
        &cfg,
        config(
            &live,
            &[("keep", &keep), ("fresh", &fresh), ("new", &missing)],
        ),
    )
    .unwrap();
    let out = run_output(nbdferry().args(["reload", "--admin"]).arg(&admin));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.raw"),
        "{err}"
    );
    keeps_serving("an export of a missing file");
    // By signal the refusal is logged on one line.
    s.signal(SIGHUP);
    wait_until(READY_DEADLINE, "the refusal in the log", || {
        s.log_text()
            .lines()
            .filter(|l| l.contains("reload refused"))
            .count()
            >= 3
    });
    keeps_serving("a refused SIGHUP");
    kept.disconnect();
    s.stop();
}
