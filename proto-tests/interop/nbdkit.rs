//! nbdkit against nbdferry: nbdkit's nbd plugin as a proxy in front of
//! nbdferry, and nbdkit plugins as the data source copied into nbdferry.

use crate::harness::*;

fn proxy(upstream: &str) -> PeerServer {
    nbdkit_tcp(&["nbd".to_string(), format!("uri={upstream}")])
}

#[test]
fn nbdkit_proxy_read_tcp_upstream() {
    let (dir, img) = fixture(41);
    let s = Server::serve(dir.path(), &img, &["--read-only", "--name", "disk"]).with_name("disk");
    let p = proxy(&s.uri());
    let out = dir.path().join("out.raw");
    run(peer("nbdcopy").arg(p.uri("")).arg(&out));
    assert_same_content(&img, &out);
    // Extents pass through the proxy unchanged.
    assert_same_map("nbdinfo --map via nbdkit", &nbdinfo_map(&p.uri("")), &img);
    // Every byte, holes included, through the proxy.
    let out2 = dir.path().join("out2.raw");
    run(peer("nbdcopy")
        .arg("--no-extents")
        .arg(p.uri(""))
        .arg(&out2));
    assert_same_content(&img, &out2);
    drop(p);
    s.stop();
}

#[test]
fn nbdkit_proxy_write_unix_upstream() {
    let (dir, img) = fixture(42);
    let mut model = Model::from_file(&img);
    let s = Server::serve(dir.path(), &img, &[]);
    let p = proxy(&s.unix_uri());
    let mut q = peer("qemu-io");
    q.args(["-f", "raw"]);
    for i in 0..16u64 {
        let off = i * 3 * MIB + 4096;
        let pat = 0x20 + i as u8;
        q.arg("-c").arg(format!("write -P {pat:#04x} {off} 200k"));
        model.fill(off, 200 * KIB, pat);
    }
    q.args([
        "-c",
        "write -z 40M 2M",
        "-c",
        "discard 50M 1M",
        "-c",
        "flush",
    ]);
    model.zero(40 * MIB, 2 * MIB);
    model.zero(50 * MIB, MIB);
    for i in 0..16u64 {
        q.arg("-c").arg(format!(
            "read -P {:#04x} {} 200k",
            0x20 + i as u8,
            i * 3 * MIB + 4096
        ));
    }
    q.arg(p.uri(""));
    run(&mut q);
    // Read everything back through the proxy, then check the backing file.
    let out = dir.path().join("out.raw");
    run(peer("nbdcopy").arg(p.uri("")).arg(&out));
    drop(p);
    s.stop();
    model.assert_file(&img);
    assert_same_content(&img, &out);
}

#[test]
fn nbdkit_sparse_random_copied_into_nbdferry() {
    let dir = tmpdir();
    let src = nbdkit_tcp(&[
        "sparse-random".to_string(),
        format!("size={IMG_SIZE}"),
        "seed=4242".to_string(),
        "percent=20".to_string(),
    ]);
    // Reference copy straight from nbdkit to a local file.
    let reference = dir.path().join("ref.raw");
    run(peer("nbdcopy").arg(src.uri("")).arg(&reference));
    // Dirty target behind nbdferry; nbdcopy must zero what is not data.
    let target = dir.path().join("target.raw");
    make_filled_image(&target, IMG_SIZE, 0x3c);
    let s = Server::serve(dir.path(), &target, &[]);
    run(peer("nbdcopy").arg(src.uri("")).arg(s.uri()));
    // Compare the export with nbdkit over NBD as well.
    run(peer("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(src.uri(""))
        .arg(s.unix_uri()));
    s.stop();
    assert_same_content(&reference, &target);
    assert!(
        allocated_bytes(&target) <= allocated_bytes(&reference) + 2 * MIB,
        "target not sparse: {} vs {}",
        allocated_bytes(&target),
        allocated_bytes(&reference)
    );
}
