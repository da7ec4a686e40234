//! The reference nbd-server and nbd-client next to nbdferry: same listing,
//! same bytes.

use crate::harness::*;

/// `nbd-client -l 127.0.0.1 PORT`: export names (text before `:` on each line
/// after the `Negotiation:` line).
fn nbd_client_list(port: u16) -> Vec<String> {
    let out = run(peer("nbd-client")
        .args(["-l", "127.0.0.1"])
        .arg(port.to_string()));
    let mut names: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with("Negotiation:") && !l.trim().is_empty())
        .map(|l| l.split(':').next().unwrap().trim().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn nbd_client_lists_exports_like_reference() {
    let (dir, img) = fixture(51);
    let r = NbdServerRef::start(dir.path(), &[("disk", &img, true)]);
    assert_eq!(
        nbd_client_list(r.port),
        vec!["disk".to_string()],
        "reference listing"
    );
    let s = Server::serve(dir.path(), &img, &["--read-only", "--name", "disk"]);
    assert_eq!(
        nbd_client_list(s.port()),
        vec!["disk".to_string()],
        "nbdferry listing"
    );
    s.stop();

    // Several exports from a config file.
    let other = dir.path().join("other.raw");
    make_sparse_image(&other, 4 * MIB, 52);
    let conf = dir.path().join("c.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[[export]]\nname = \"alpha\"\npath = \"{}\"\n\
             description = \"A\"\n[[export]]\nname = \"beta\"\npath = \"{}\"\nread-only = true\n",
            img.display(),
            other.display()
        ),
    )
    .unwrap();
    let s = Server::start(&[std::ffi::OsStr::new("--config"), conf.as_os_str()]);
    assert_eq!(
        nbd_client_list(s.port()),
        vec!["alpha".to_string(), "beta".to_string()]
    );
    s.stop();
}

#[test]
fn same_bytes_as_reference_server() {
    let (dir, img) = fixture(53);
    let r = NbdServerRef::start(dir.path(), &[("disk", &img, true)]);
    let s = Server::serve(dir.path(), &img, &["--read-only", "--name", "disk"]);
    let from_ref = dir.path().join("from-ref.raw");
    let from_us = dir.path().join("from-us.raw");
    run(peer("nbdcopy").arg(r.uri("disk")).arg(&from_ref));
    run(peer("nbdcopy").arg(s.uri_for("disk")).arg(&from_us));
    assert_same_content(&from_ref, &img);
    assert_same_content(&from_us, &from_ref);
    // Both servers agree with qemu-img compare over NBD.
    let out = run(peer("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(r.uri("disk"))
        .arg(s.uri_for("disk")));
    assert!(out.contains("Images are identical"), "{out}");
    s.stop();
}

#[test]
fn upload_gives_same_result_as_reference_server() {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    make_sparse_image(&src, IMG_SIZE, 54);
    let t_ref = dir.path().join("t-ref.raw");
    let t_us = dir.path().join("t-us.raw");
    make_filled_image(&t_ref, IMG_SIZE, 0x77);
    make_filled_image(&t_us, IMG_SIZE, 0x77);
    let r = NbdServerRef::start(dir.path(), &[("disk", &t_ref, false)]);
    let s = Server::serve(dir.path(), &t_us, &[]);
    run(peer("nbdcopy").arg(&src).arg(r.uri("disk")));
    run(peer("nbdcopy").arg(&src).arg(s.uri()));
    s.stop();
    drop(r);
    assert_same_content(&t_ref, &src);
    assert_same_content(&t_us, &t_ref);
}
