//! Block devices as exports and as copy sources: a loop device over an
//! image file, served by nbdferry and read and written by real clients.
//! (Needs root and /dev/loop-control, as CI has.)

use std::path::{Path, PathBuf};

use crate::harness::*;

/// A loop device attached to a file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let dev = run(peer("losetup").args(["--find", "--show", file.to_str().unwrap()]));
        Loop(PathBuf::from(dev.trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = peer("losetup")
            .args(["-d", self.0.to_str().unwrap()])
            .status();
    }
}

#[test]
fn loop_device_is_served_and_copied_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("backing.raw");
    make_sparse_image(&img, 16 * MIB, 7);
    let want = hash_file(&img);
    let lo = Loop::attach(&img);

    let s = Server::serve(dir.path(), &lo.0, &[]);
    // A block device has no holes to report: everything is data, and reads
    // return the real bytes (SEEK_DATA on a device must not be trusted).
    let map = nbdinfo_map(&s.uri());
    assert_eq!(map, vec![(0, 16 * MIB, true)], "map of a block device");
    let out = dir.path().join("out.raw");
    run(peer("nbdcopy").args([&s.uri(), out.to_str().unwrap()]));
    assert_eq!(hash_file(&out), want, "nbdcopy read of the loop device");

    // Writes, zeroes and discards go through to the backing file.
    run(peer("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x6b 1M 512k",
        "-c",
        "write -z 3M 256k",
        "-c",
        "discard 5M 64k",
        &s.uri(),
    ]));
    s.stop();
    drop(lo);
    let back = read_range(&img, MIB, 512 * 1024);
    assert!(back.iter().all(|&b| b == 0x6b), "write through the device");
    assert!(
        read_range(&img, 3 * MIB, 256 * 1024)
            .iter()
            .all(|&b| b == 0),
        "zeroes through the device"
    );

    // nbdferry copy reads a block device source as data too.
    let lo = Loop::attach(&img);
    let copy = dir.path().join("copy.raw");
    run(nbdferry().args(["copy", lo.0.to_str().unwrap(), copy.to_str().unwrap()]));
    drop(lo);
    assert_eq!(
        hash_file(&copy),
        hash_file(&img),
        "nbdferry copy from a loop device"
    );
}
