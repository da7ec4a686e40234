//! TLS (STARTTLS, X.509 with client certificates) between nbdferry and real
//! peers: qemu-img/qemu-io and libnbd's tools against `nbdferry serve
//! --tls=require`, nbdferry's client against qemu-nbd and nbdkit over TLS,
//! nbd-client's TLS listing, and the refusals: plaintext clients, wrong CA,
//! foreign client certificates, allow lists, no downgrade, STARTTLS with
//! trailing bytes and bad server credentials.
//!
//! Certificates are made per test with `nbdferry certs init` in the test's
//! temp dir.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::harness::*;

const OPT_STARTTLS: u32 = 5;
const PKI_FILES: [&str; 6] = [
    "ca-cert.pem",
    "ca-key.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
];

/// `nbdferry certs init DIR/NAME EXTRA...`; checks the layout and returns
/// the directory.
fn certs_init(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let d = dir.join(name);
    run(nbdferry().args(["certs", "init"]).arg(&d).args(extra));
    for f in PKI_FILES {
        assert!(d.join(f).is_file(), "certs init did not write {f}");
    }
    d
}

/// A directory holding `ca`'s CA certificate and `client`'s client
/// certificate and key: a client whose certificate another CA signed.
fn mixed_creds(dir: &Path, name: &str, ca: &Path, client: &Path) -> PathBuf {
    let d = dir.join(name);
    fs::create_dir(&d).expect("mkdir");
    fs::copy(ca.join("ca-cert.pem"), d.join("ca-cert.pem")).expect("copy ca");
    for f in ["client-cert.pem", "client-key.pem"] {
        fs::copy(client.join(f), d.join(f)).expect("copy client creds");
    }
    d
}

/// `nbdferry serve --tls=require --tls-creds CERTS --state-dir ... EXTRA FILE`
/// on TCP and a Unix socket, export name `disk`.
fn tls_serve(dir: &Path, img: &Path, certs: &Path, extra: &[&str]) -> Server {
    let state = dir.join("state");
    let mut args = vec![
        "--tls=require",
        "--tls-creds",
        certs.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--name",
        "disk",
    ];
    args.extend_from_slice(extra);
    Server::serve(dir, img, &args).with_name("disk")
}

fn nbds_tcp(port: u16, export: &str, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
        certs.display()
    )
}

fn nbds_unix(sock: &Path, export: &str, certs: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        sock.display(),
        certs.display()
    )
}

/// The TLS URIs (TCP, Unix) of `disk` on one of our servers.
fn nbds_both(s: &Server, certs: &Path) -> [String; 2] {
    [
        nbds_tcp(s.port(), "disk", certs),
        nbds_unix(s.socket.as_ref().unwrap(), "disk", certs),
    ]
}

fn qemu_tls_object(certs: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint={endpoint},dir={}",
        certs.display()
    )
}

/// qemu's `--image-opts` for `disk` on our server over TLS (tls0).
fn qemu_nbd_opts(s: &Server, unix: bool) -> String {
    let server = if unix {
        format!(
            "server.type=unix,server.path={}",
            s.socket.as_ref().unwrap().display()
        )
    } else {
        format!(
            "server.type=inet,server.host=127.0.0.1,server.port={}",
            s.port()
        )
    };
    // qemu has no host name to check for a Unix socket unless told.
    let host = if unix { ",tls-hostname=localhost" } else { "" };
    format!("driver=nbd,{server},export=disk,tls-creds=tls0{host}")
}

/// qemu-nbd serving `image` as `disk` over TLS with client-certificate
/// verification (`verify-peer=on`).
fn qemu_nbd_tls(image: &Path, certs: &Path, read_only: bool) -> PeerServer {
    PeerServer::spawn_tcp("qemu-nbd (TLS)", |port| {
        let mut c = peer("qemu-nbd");
        c.args([
            "-f",
            "raw",
            "-t",
            "-e",
            "8",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
        ]);
        c.arg("-p").arg(port.to_string());
        c.arg("--object")
            .arg(format!(
                "{},verify-peer=on",
                qemu_tls_object(certs, "server")
            ))
            .args(["--tls-creds", "tls0"]);
        if read_only {
            c.arg("-r");
        } else {
            c.arg("--discard=unmap");
        }
        c.arg(image);
        c
    })
}

/// nbdkit's file plugin over TLS with client-certificate verification.
fn nbdkit_tls(image: &Path, certs: &Path) -> PeerServer {
    nbdkit_tcp(&[
        "--tls=require".to_string(),
        format!("--tls-certificates={}", certs.display()),
        "--tls-verify-peer".to_string(),
        "file".to_string(),
        format!("file={}", image.display()),
    ])
}

/// Wait (bounded) until the server's log has a line containing all `words`.
fn wait_log(s: &Server, words: &[&str]) -> String {
    let mut found = String::new();
    wait_until(
        READY_DEADLINE,
        &format!("a server log line with {words:?}"),
        || {
            let log = s.log_text();
            match log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
                Some(l) => {
                    found = l.to_string();
                    true
                }
                None => false,
            }
        },
    );
    found
}

/// `nbdferry copy SRC DST` must fail, with `want` in its one error line,
/// and must not have put any data into DST.
fn copy_refused(src: &str, dst: &Path, want: &[&str]) -> String {
    let (_, err) = run_fail(
        nbdferry()
            .args(["copy", "--progress=none"])
            .arg(src)
            .arg(dst),
    );
    for w in want {
        assert!(
            err.contains(w),
            "copy from {src}: expected `{w}` in:\n{err}"
        );
    }
    assert!(
        !dst.exists() || allocated_bytes(dst) == 0,
        "a refused copy wrote data to {dst:?}"
    );
    err
}

// ---------------------------------------------------------------------------
// certs init
// ---------------------------------------------------------------------------

#[test]
fn certs_init_writes_private_keys_and_refuses_overwrite() {
    let dir = tmpdir();
    let d = certs_init(
        dir.path(),
        "pki",
        &["--server-name", "nbd.example", "--client-name", "backup-01"],
    );
    for f in PKI_FILES {
        let mode = fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        if f.ends_with("-key.pem") {
            assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
        } else {
            assert_eq!(mode & 0o022, 0, "{f} is writable by others: {mode:o}");
        }
    }
    let before = fs::read(d.join("ca-key.pem")).unwrap();
    let (_, err) = run_fail(nbdferry().args(["certs", "init"]).arg(&d));
    assert!(err.contains("ca-cert.pem"), "{err}");
    assert_eq!(
        fs::read(d.join("ca-key.pem")).unwrap(),
        before,
        "certs init overwrote the CA key"
    );
    // certtool (gnutls, as qemu, nbdkit and libnbd use) parses what we
    // wrote, and the names are where they belong.
    let srv = run(peer("certtool")
        .args(["-i", "--infile"])
        .arg(d.join("server-cert.pem")));
    for name in ["nbd.example", "localhost", "127.0.0.1"] {
        assert!(
            srv.contains(name),
            "server certificate lacks {name}:\n{srv}"
        );
    }
    let cli = run(peer("certtool")
        .args(["-i", "--infile"])
        .arg(d.join("client-cert.pem")));
    assert!(cli.contains("CN=backup-01"), "{cli}");
}

// ---------------------------------------------------------------------------
// qemu against nbdferry serve --tls=require
// ---------------------------------------------------------------------------

#[test]
fn qemu_img_convert_over_tls_tcp_and_unix() {
    let (dir, img) = fixture(301);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = tls_serve(dir.path(), &img, &certs, &["--read-only"]);
    for unix in [false, true] {
        let out = dir.path().join(format!("out-{unix}.raw"));
        run(peer("qemu-img")
            .arg("convert")
            .arg("--object")
            .arg(qemu_tls_object(&certs, "client"))
            .arg("--image-opts")
            .arg(qemu_nbd_opts(&s, unix))
            .args(["-O", "raw"])
            .arg(&out));
        assert_eq!(hash_file(&out), hash_file(&img), "convert (unix={unix})");
        assert_same_content(&img, &out);
    }
    // The same conversion without TLS credentials gets nothing.
    let plain = dir.path().join("plain.raw");
    let (_, err) = run_fail(
        peer("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(s.uri())
            .arg(&plain),
    );
    assert!(!plain.exists(), "plaintext qemu-img created output: {err}");
    s.stop();
}

#[test]
fn qemu_io_writes_pattern_over_tls_and_compare() {
    let (dir, img) = fixture(302);
    let reference = dir.path().join("ref.raw");
    copy_file(&img, &reference);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = tls_serve(dir.path(), &img, &certs, &[]);
    let out = run(peer("qemu-io")
        .arg("--object")
        .arg(qemu_tls_object(&certs, "client"))
        .arg("--image-opts")
        .args([
            "-c",
            "write -P 0xa5 1M 2M",
            "-c",
            "read -P 0xa5 1M 2M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "read -P 0 8M 1M",
        ])
        .arg(qemu_nbd_opts(&s, false)));
    assert!(
        !out.contains("fail") && out.matches("read ").count() == 2,
        "qemu-io over TLS:\n{out}"
    );
    // Apply the same writes to the local reference; qemu-img compare reads
    // the whole export over TLS (Unix socket this time).
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&reference).unwrap();
        f.write_all_at(&vec![0xa5; 2 * MIB as usize], MIB).unwrap();
        f.write_all_at(&vec![0; MIB as usize], 8 * MIB).unwrap();
    }
    let cmp = run(peer("qemu-img")
        .arg("compare")
        .arg("--object")
        .arg(qemu_tls_object(&certs, "client"))
        .arg("--image-opts")
        .arg(format!("driver=file,filename={}", reference.display()))
        .arg(qemu_nbd_opts(&s, true)));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    s.stop();
    assert_same_content(&reference, &img);
}

// ---------------------------------------------------------------------------
// libnbd tools against nbdferry serve --tls=require
// ---------------------------------------------------------------------------

#[test]
fn nbdinfo_size_and_list_over_tls() {
    let (dir, img) = fixture(303);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = tls_serve(dir.path(), &img, &certs, &["--read-only"]);
    for uri in nbds_both(&s, &certs) {
        let size = run(peer("nbdinfo").arg("--size").arg(&uri));
        assert_eq!(size.trim(), IMG_SIZE.to_string(), "nbdinfo --size {uri}");
        let js = run(peer("nbdinfo").arg("--json").arg(&uri));
        assert_eq!(json_u64(&js, "export-size"), Some(IMG_SIZE), "{js}");
        assert!(
            js.contains("\"TLS\": true") || js.contains("\"TLS\":true"),
            "nbdinfo does not report TLS:\n{js}"
        );
        let list = run(peer("nbdinfo").arg("--list").arg(&uri));
        assert!(
            list.contains("export=\"disk\"") && list.contains("with TLS"),
            "nbdinfo --list {uri}:\n{list}"
        );
        assert_same_map(&format!("nbdinfo --map {uri}"), &nbdinfo_map(&uri), &img);
    }
    s.stop();
}

#[test]
fn nbdcopy_both_directions_over_tls() {
    let (dir, img) = fixture(304);
    let certs = certs_init(dir.path(), "pki", &[]);
    // Download from a read-only export.
    let s = tls_serve(dir.path(), &img, &certs, &["--read-only"]);
    for (i, uri) in nbds_both(&s, &certs).iter().enumerate() {
        let out = dir.path().join(format!("down-{i}.raw"));
        run(peer("nbdcopy").arg(uri).arg(&out));
        assert_eq!(hash_file(&out), hash_file(&img), "nbdcopy from {uri}");
        assert_eq!(data_map(&out), data_map(&img), "not sparse: {uri}");
    }
    s.stop();
    // Upload into a dirty, fully allocated target.
    for unix in [false, true] {
        let d = dir.path().join(format!("up-{unix}"));
        fs::create_dir(&d).unwrap();
        let target = d.join("target.raw");
        make_filled_image(&target, IMG_SIZE, 0xee);
        let s = tls_serve(&d, &target, &certs, &[]);
        let uri = &nbds_both(&s, &certs)[usize::from(unix)];
        run(peer("nbdcopy").arg(&img).arg(uri));
        s.stop();
        assert_eq!(hash_file(&target), hash_file(&img), "nbdcopy to {uri}");
    }
}

const NBDSH_READ_ALL: &str = r##"
import os
import nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["NBD_URI"])
assert h.get_tls_negotiated(), "TLS was not negotiated"
size = h.get_size()
with open(os.environ["OUT"], "wb") as f:
    off = 0
    while off < size:
        n = min(4 << 20, size - off)
        f.write(h.pread(n, off))
        off += n
h.shutdown()
print("READ-OK", size)
"##;

#[test]
fn nbdsh_reads_over_tls() {
    let (dir, img) = fixture(305);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = tls_serve(dir.path(), &img, &certs, &["--read-only"]);
    for (i, uri) in nbds_both(&s, &certs).into_iter().enumerate() {
        let out = dir.path().join(format!("nbdsh-{i}.raw"));
        let stdout = nbdsh_script(
            dir.path(),
            NBDSH_READ_ALL,
            &[("NBD_URI", uri.clone()), ("OUT", out.display().to_string())],
        );
        assert!(
            stdout.contains(&format!("READ-OK {IMG_SIZE}")),
            "nbdsh {uri}: {stdout}"
        );
        assert_eq!(hash_file(&out), hash_file(&img), "nbdsh read {uri}");
    }
    // nbdsh -u does not opt in to tls-certificates= (libnbd 1.14), so
    // the script above calls set_uri_allow_local_file itself.
    s.stop();
}

// ---------------------------------------------------------------------------
// nbdferry's client against qemu-nbd and nbdkit over TLS
// ---------------------------------------------------------------------------

/// copy (down), info and map through `uri`; the map must equal
/// `nbdinfo --map` over the same TLS URI.
fn ferry_client_checks(uri: &str, img: &Path, dir: &Path, tag: &str) {
    let out = dir.join(format!("{tag}-down.raw"));
    run(nbdferry()
        .args(["copy", "--progress=none"])
        .arg(uri)
        .arg(&out));
    assert_eq!(hash_file(&out), hash_file(img), "nbdferry copy from {tag}");
    assert_same_content(img, &out);

    let info = run(nbdferry().args(["info", "--json"]).arg(uri));
    let v: serde_json::Value = serde_json::from_str(&info).expect("info JSON");
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(IMG_SIZE),
        "{tag} info:\n{info}"
    );
    let text = run(nbdferry().arg("info").arg(uri));
    assert!(text.contains("with TLS"), "{tag} info:\n{text}");

    let ours = run(nbdferry().args(["map", "--json"]).arg(uri));
    let theirs = run(peer("nbdinfo").args(["--json", "--map"]).arg(uri));
    let a: serde_json::Value = serde_json::from_str(&ours).expect("our map JSON");
    let b: serde_json::Value = serde_json::from_str(&theirs).expect("nbdinfo JSON");
    assert_eq!(a, b, "{tag}: nbdferry map differs from nbdinfo --map");
    assert!(
        a.as_array().is_some_and(|e| e.len() > 2),
        "{tag}: suspiciously short map: {ours}"
    );
}

#[test]
fn ferry_client_against_qemu_nbd_tls() {
    let (dir, img) = fixture(306);
    let certs = certs_init(dir.path(), "pki", &[]);
    let q = qemu_nbd_tls(&img, &certs, true);
    let uri = nbds_tcp(q.port.unwrap(), "disk", &certs);
    ferry_client_checks(&uri, &img, dir.path(), "qemu-nbd");
    // tls-hostname: the certificate names localhost.
    let host_uri = format!("{uri}&tls-hostname=localhost");
    let info = run(nbdferry().arg("info").arg(&host_uri));
    assert!(info.contains("with TLS"), "{info}");
    drop(q);

    // Upload into a writable qemu-nbd.
    let target = dir.path().join("target.raw");
    make_filled_image(&target, IMG_SIZE, 0x77);
    let q = qemu_nbd_tls(&target, &certs, false);
    run(nbdferry()
        .args(["copy", "--progress=none"])
        .arg(&img)
        .arg(nbds_tcp(q.port.unwrap(), "disk", &certs)));
    drop(q);
    assert_eq!(hash_file(&target), hash_file(&img), "upload to qemu-nbd");
}

#[test]
fn ferry_client_against_nbdkit_tls() {
    let (dir, img) = fixture(307);
    let certs = certs_init(dir.path(), "pki", &[]);
    let k = nbdkit_tls(&img, &certs);
    let uri = nbds_tcp(k.port.unwrap(), "", &certs);
    ferry_client_checks(&uri, &img, dir.path(), "nbdkit");
    drop(k);

    let target = dir.path().join("target.raw");
    make_filled_image(&target, IMG_SIZE, 0x33);
    let k = nbdkit_tls(&target, &certs);
    run(nbdferry()
        .args(["copy", "--progress=none"])
        .arg(&img)
        .arg(nbds_tcp(k.port.unwrap(), "", &certs)));
    drop(k);
    assert_eq!(hash_file(&target), hash_file(&img), "upload to nbdkit");
}

#[test]
fn ferry_client_without_certificate_is_refused_by_verifying_peers() {
    let (dir, img) = fixture(308);
    let certs = certs_init(dir.path(), "pki", &[]);
    // Only the CA: we can check the server, but have nothing to show it.
    let ca_only = dir.path().join("ca-only");
    fs::create_dir(&ca_only).unwrap();
    fs::copy(certs.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let q = qemu_nbd_tls(&img, &certs, true);
    copy_refused(
        &nbds_tcp(q.port.unwrap(), "disk", &ca_only),
        &dir.path().join("q.raw"),
        &["TLS", "client certificate"],
    );
    drop(q);
    let k = nbdkit_tls(&img, &certs);
    copy_refused(
        &nbds_tcp(k.port.unwrap(), "", &ca_only),
        &dir.path().join("k.raw"),
        &["TLS", "client certificate"],
    );
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[test]
fn plaintext_clients_are_refused_by_tls_server() {
    let (dir, img) = fixture(309);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = tls_serve(dir.path(), &img, &certs, &[]);
    for uri in [s.uri(), s.unix_uri()] {
        let (_, err) = run_fail(peer("nbdinfo").arg(&uri));
        assert!(
            err.contains("opt_go") && err.contains("not supported"),
            "nbdinfo {uri}:\n{err}"
        );
        let (_, err) = run_fail(nbdferry().arg("info").arg(&uri));
        assert!(err.contains("ERR_TLS_REQD"), "nbdferry info {uri}:\n{err}");
        copy_refused(&uri, &dir.path().join("plain.raw"), &["ERR_TLS_REQD"]);
        let (_, err) = run_fail(peer("nbdcopy").arg(&uri).arg("null:"));
        assert!(!err.is_empty());
    }
    // Nor can a plaintext client write.
    let before = hash_file(&img);
    let src = dir.path().join("src.raw");
    make_filled_image(&src, IMG_SIZE, 0x11);
    run_fail(peer("nbdcopy").arg(&src).arg(s.uri()));
    s.stop();
    assert_eq!(
        hash_file(&img),
        before,
        "a plaintext client changed the export"
    );
}

#[test]
fn wrong_ca_is_refused_by_our_client() {
    let (dir, img) = fixture(310);
    let certs = certs_init(dir.path(), "pki", &[]);
    let other = certs_init(dir.path(), "other", &[]);
    // A good client certificate, but the other PKI's CA to check the server
    // with: that CA did not sign the server's certificate.
    let wrong_ca = mixed_creds(dir.path(), "wrong-ca", &other, &certs);
    let s = tls_serve(dir.path(), &img, &certs, &[]);
    for uri in [
        nbds_tcp(s.port(), "disk", &wrong_ca),
        nbds_unix(s.socket.as_ref().unwrap(), "disk", &wrong_ca),
    ] {
        let (_, err) = run_fail(nbdferry().arg("info").arg(&uri));
        assert!(
            err.contains("not signed by our ca-cert.pem"),
            "nbdferry info {uri}:\n{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "not one line:\n{err}");
        copy_refused(&uri, &dir.path().join("wrong-ca.raw"), &["not signed"]);
    }
    // libnbd 1.14 checks the chain only when it has a host name, i.e. not
    // on nbds+unix (it then accepts any server): TCP only.
    let (_, err) = run_fail(peer("nbdinfo").arg(nbds_tcp(s.port(), "disk", &wrong_ca)));
    assert!(err.contains("certificate"), "nbdinfo:\n{err}");
    // Our server saw the handshake abort (the client's alert).
    wait_log(&s, &["TLS handshake failed"]);
    assert!(
        !s.log_text().contains("TLS established"),
        "{}",
        s.log_text()
    );
    s.stop();
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let (dir, img) = fixture(311);
    let certs = certs_init(dir.path(), "pki", &[]);
    let other = certs_init(dir.path(), "other", &["--client-name", "mallory"]);
    // Trusts the right CA, but presents a certificate the other CA signed.
    let mixed = mixed_creds(dir.path(), "mixed", &certs, &other);
    let s = tls_serve(dir.path(), &img, &certs, &[]);
    let uri = nbds_tcp(s.port(), "disk", &mixed);
    let err = copy_refused(&uri, &dir.path().join("out.raw"), &["TLS handshake failed"]);
    assert!(err.contains("rejected our client certificate"), "{err}");
    let line = wait_log(&s, &["TLS handshake failed", "not signed by our CA"]);
    assert!(line.contains("WARN"), "{line}");
    run_fail(peer("nbdinfo").arg(&uri));
    let (_, err) = run_fail(peer("nbdcopy").arg(&uri).arg("null:"));
    assert!(!err.is_empty());
    // The same peers refuse it too (control: the mixed dir is really bad).
    let q = qemu_nbd_tls(&img, &certs, true);
    copy_refused(
        &nbds_tcp(q.port.unwrap(), "disk", &mixed),
        &dir.path().join("q.raw"),
        &["TLS", "client certificate"],
    );
    drop(q);
    // And the good credentials still work on the same server.
    let size = run(peer("nbdinfo")
        .arg("--size")
        .arg(nbds_tcp(s.port(), "disk", &certs)));
    assert_eq!(size.trim(), IMG_SIZE.to_string());
    s.stop();
}

#[test]
fn allow_list_denies_unlisted_client() {
    let (dir, img) = fixture(312);
    let certs = certs_init(dir.path(), "pki", &[]); // client CN nbdferry-client
    let other = dir.path().join("other.raw");
    make_sparse_image(&other, 8 * MIB, 313);
    let conf = dir.path().join("serve.toml");
    fs::write(
        &conf,
        format!(
            "tls = \"require\"\ntls-creds = {certs:?}\n\
             [[export]]\nname = \"secret\"\npath = {img:?}\nallow-clients = [\"alice\", \"bob\"]\n\
             [[export]]\nname = \"mine\"\npath = {img:?}\nread-only = true\nallow-clients = [\"nbdferry-client\"]\n\
             [[export]]\nname = \"open\"\npath = {other:?}\n"
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let args: Vec<std::ffi::OsString> = vec![
        "--config".into(),
        conf.clone().into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state-dir".into(),
        state.into(),
    ];
    let s = Server::start(&args);
    let port = s.port();
    let before = hash_file(&img);

    let secret = nbds_tcp(port, "secret", &certs);
    let (_, err) = run_fail(nbdferry().arg("info").arg(&secret));
    assert!(
        err.contains("ERR_POLICY") && err.contains("secret"),
        "nbdferry info {secret}:\n{err}"
    );
    let line = wait_log(&s, &["allow list", "secret", "nbdferry-client"]);
    assert!(line.contains("WARN"), "{line}");
    copy_refused(&secret, &dir.path().join("secret.raw"), &["ERR_POLICY"]);
    run_fail(peer("nbdinfo").arg(&secret));
    // Writing is refused as well.
    let src = dir.path().join("src.raw");
    make_filled_image(&src, IMG_SIZE, 0x42);
    run_fail(peer("nbdcopy").arg(&src).arg(&secret));

    // The same client on an export without a list, and on one listing it.
    let out = dir.path().join("open.raw");
    run(nbdferry()
        .args(["copy", "--progress=none"])
        .arg(nbds_tcp(port, "open", &certs))
        .arg(&out));
    assert_eq!(hash_file(&out), hash_file(&other), "copy of `open`");
    let out = dir.path().join("mine.raw");
    run(peer("nbdcopy")
        .arg(nbds_tcp(port, "mine", &certs))
        .arg(&out));
    assert_eq!(hash_file(&out), hash_file(&img), "copy of `mine`");
    s.stop();
    assert_eq!(
        hash_file(&img),
        before,
        "the refused client changed `secret`"
    );
}

#[test]
fn nbds_against_plaintext_server_does_not_downgrade() {
    let (dir, img) = fixture(314);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = Server::serve(dir.path(), &img, &["--name", "disk"]).with_name("disk");
    for uri in nbds_both(&s, &certs) {
        let (_, err) = run_fail(nbdferry().arg("info").arg(&uri));
        assert!(err.contains("TLS"), "nbdferry info {uri}:\n{err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line:\n{err}");
        copy_refused(&uri, &dir.path().join("down.raw"), &["TLS"]);
    }
    // Uploads do not fall back either.
    let before = hash_file(&img);
    let src = dir.path().join("src.raw");
    make_filled_image(&src, IMG_SIZE, 0x99);
    run_fail(
        nbdferry()
            .args(["copy", "--progress=none"])
            .arg(&src)
            .arg(nbds_tcp(s.port(), "disk", &certs)),
    );
    // Control: the plaintext URI works.
    let info = run(nbdferry().arg("info").arg(s.uri()));
    assert!(info.contains("without TLS"), "{info}");
    s.stop();
    assert_eq!(hash_file(&img), before, "a refused nbds:// copy wrote data");

    // Same against a plaintext nbdkit.
    let k = nbdkit_tcp(&["file".to_string(), format!("file={}", img.display())]);
    let uri = nbds_tcp(k.port.unwrap(), "", &certs);
    let (_, err) = run_fail(nbdferry().arg("info").arg(&uri));
    assert!(err.contains("TLS"), "nbdferry info {uri}:\n{err}");
    copy_refused(&uri, &dir.path().join("kit.raw"), &["TLS"]);
}

/// Read whatever the server sends until it closes (bounded by IO_TIMEOUT).
fn read_until_closed(c: &mut RawConn) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return all;
            }
            Err(e) => panic!("server neither closed nor kept quiet: {e} (got {all:02x?})"),
        }
        assert!(all.len() < MIB as usize, "server keeps sending");
    }
}

fn option_bytes(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn starttls_followed_by_options_in_one_write_is_not_answered_in_plaintext() {
    let (dir, img) = fixture(315);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = tls_serve(dir.path(), &img, &certs, &[]);
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    let rep_magic = REP_MAGIC.to_be_bytes();
    let mut tcp_and_unix = vec![RawConn::tcp(s.addr.unwrap())];
    tcp_and_unix.push(RawConn::unix(s.socket.as_ref().unwrap()));

    for mut c in tcp_and_unix {
        // Control: without STARTTLS in front, the server answers a LIST
        // in plaintext (with ERR_TLS_REQD), so the check below can fail.
        c.start_options();
        assert!(c.send(&option_bytes(OPT_LIST, &[])));
        let (opt, ty, _) = c.read_option_reply().expect("reply to LIST");
        assert_eq!((opt, ty), (OPT_LIST, 0x8000_0005), "LIST before TLS");

        // STARTTLS, then LIST and GO in the same write.
        let mut b = option_bytes(OPT_STARTTLS, &[]);
        b.extend(option_bytes(OPT_LIST, &[]));
        b.extend(option_bytes(OPT_GO, &go));
        assert!(c.send(&b), "server closed before STARTTLS");
        let (opt, ty, data) = c.read_option_reply().expect("reply to STARTTLS");
        assert_eq!((opt, ty), (OPT_STARTTLS, REP_ACK), "STARTTLS not acked");
        assert!(data.is_empty());
        // Everything after the ACK must be TLS (at most an alert record),
        // never an option reply, and the connection must end.
        let rest = read_until_closed(&mut c);
        assert!(
            !rest.windows(8).any(|w| w == rep_magic),
            "server answered the trailing options in plaintext: {rest:02x?}"
        );
        assert!(
            rest.is_empty() || rest[0] == 0x15,
            "expected nothing or a TLS alert after STARTTLS, got {rest:02x?}"
        );
    }
    wait_log(&s, &["TLS handshake failed"]);
    assert!(
        !s.log_text().contains("TLS established"),
        "{}",
        s.log_text()
    );
    // The server is still fine for a real client.
    let size = run(peer("nbdinfo")
        .arg("--size")
        .arg(nbds_tcp(s.port(), "disk", &certs)));
    assert_eq!(size.trim(), IMG_SIZE.to_string());
    s.stop();
}

// ---------------------------------------------------------------------------
// Server credential errors
// ---------------------------------------------------------------------------

/// `nbdferry serve ARGS FILE` must exit non-zero before listening with one
/// error line containing every word of `want`.
fn serve_refused(args: &[&str], file: &Path, state: &Path, want: &[&str]) {
    let (_, err) = run_fail(
        nbdferry()
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .args(args)
            .arg(file),
    );
    assert!(!err.contains("listening on"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line:\n{err}");
    for w in want {
        assert!(err.contains(w), "expected `{w}` in: {err}");
    }
}

#[test]
fn serve_tls_without_creds_is_a_one_line_error() {
    let (dir, img) = fixture(316);
    let state = dir.path().join("state");
    serve_refused(&["--tls=require"], &img, &state, &["--tls-creds"]);
    serve_refused(&["--tls=allow"], &img, &state, &["--tls-creds"]);
    serve_refused(
        &["--allow-client", "alice"],
        &img,
        &state,
        &["TLS", "--tls-creds"],
    );
    let nowhere = dir.path().join("no-such-dir");
    serve_refused(
        &["--tls-creds", nowhere.to_str().unwrap()],
        &img,
        &state,
        &["no-such-dir", "server-cert.pem"],
    );
}

#[test]
fn serve_missing_or_mismatched_key_names_the_file() {
    let (dir, img) = fixture(317);
    let state = dir.path().join("state");
    let good = certs_init(dir.path(), "pki", &[]);
    let other = certs_init(dir.path(), "other", &[]);
    let copy_pki = |name: &str| {
        let d = dir.path().join(name);
        fs::create_dir(&d).unwrap();
        for f in PKI_FILES {
            fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };

    let missing = copy_pki("missing-key");
    fs::remove_file(missing.join("server-key.pem")).unwrap();
    let key = missing.join("server-key.pem");
    serve_refused(
        &["--tls-creds", missing.to_str().unwrap()],
        &img,
        &state,
        &[key.to_str().unwrap()],
    );

    let mismatched = copy_pki("mismatched-key");
    fs::copy(
        other.join("server-key.pem"),
        mismatched.join("server-key.pem"),
    )
    .unwrap();
    let key = mismatched.join("server-key.pem");
    serve_refused(
        &["--tls-creds", mismatched.to_str().unwrap()],
        &img,
        &state,
        &[key.to_str().unwrap(), "server-cert.pem"],
    );

    let garbage = copy_pki("garbage-key");
    fs::write(garbage.join("server-key.pem"), "not a key\n").unwrap();
    let key = garbage.join("server-key.pem");
    serve_refused(
        &["--tls-creds", garbage.to_str().unwrap()],
        &img,
        &state,
        &[key.to_str().unwrap()],
    );

    // Client certificates are verified by default: the CA must be there.
    let no_ca = copy_pki("no-ca");
    fs::remove_file(no_ca.join("ca-cert.pem")).unwrap();
    let ca = no_ca.join("ca-cert.pem");
    serve_refused(
        &["--tls-creds", no_ca.to_str().unwrap()],
        &img,
        &state,
        &[ca.to_str().unwrap()],
    );
    // ...and not needed with anonymous clients (control: it does start).
    let s = Server::serve(
        dir.path(),
        &img,
        &[
            "--tls-creds",
            no_ca.to_str().unwrap(),
            "--tls-anonymous-clients",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    let ca_only = dir.path().join("ca-only");
    fs::create_dir(&ca_only).unwrap();
    fs::copy(good.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let size = run(peer("nbdinfo")
        .arg("--size")
        .arg(nbds_tcp(s.port(), "", &ca_only)));
    assert_eq!(size.trim(), IMG_SIZE.to_string());
    s.stop();
}

// ---------------------------------------------------------------------------
// nbd-client (kernel client's userspace) listing over TLS
// ---------------------------------------------------------------------------

#[test]
fn nbd_client_lists_exports_over_tls() {
    let (dir, img) = fixture(318);
    let certs = certs_init(dir.path(), "pki", &[]);
    let s = tls_serve(dir.path(), &img, &certs, &["--read-only"]);
    let out = run(peer("nbd-client")
        .args(["-l", "127.0.0.1"])
        .arg(s.port().to_string())
        .arg("-x")
        .arg("-A")
        .arg(certs.join("ca-cert.pem"))
        .arg("-certfile")
        .arg(certs.join("client-cert.pem"))
        .arg("-K")
        .arg(certs.join("client-key.pem"))
        .args(["-H", "localhost"]));
    let names: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("Negotiation:") && !l.trim().is_empty())
        .map(|l| l.split(':').next().unwrap().trim())
        .collect();
    assert_eq!(names, vec!["disk"], "nbd-client -l over TLS:\n{out}");
    // Without TLS the same listing is refused.
    let out = run_output(
        peer("nbd-client")
            .args(["-l", "127.0.0.1"])
            .arg(s.port().to_string()),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("TLS") && !text.lines().any(|l| l.trim() == "disk"),
        "plaintext nbd-client -l:\n{text}"
    );
    s.stop();
}
