//! Test support: a small XFS file system on a loop device, with or
//! without reflinks, so that the snapshot tests run on both backends
//! wherever the machine allows it (root, a loop device, xfsprogs: as CI
//! has). A missing tool or a refused mount fails the test loudly; it is
//! never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted XFS; unmounted and its loop device detached when dropped.
pub struct LoopXfs {
    mnt: PathBuf,
    device: String,
}

fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {shown} (loop-mounted XFS tests need root, util-linux and xfsprogs): {e}"
        )
    });
    assert!(
        out.status.success(),
        "{shown} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl LoopXfs {
    /// Makes a `size`-byte XFS (sparse backing file `under/xfs.img`) with
    /// `-m reflink=1` or `=0` and mounts it at `under/mnt`.
    pub fn mount(under: &Path, reflink: bool, size: u64) -> LoopXfs {
        let image = under.join("xfs.img");
        let mnt = under.join("mnt");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("backing file of the XFS");
        std::fs::create_dir_all(&mnt).expect("mount point");
        run(Command::new("mkfs.xfs")
            .arg("-q")
            .arg("-m")
            .arg(format!("reflink={}", u8::from(reflink)))
            .arg(&image));
        let device = run(Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(&image));
        let fs = LoopXfs { mnt, device };
        run(Command::new("mount").arg(&fs.device).arg(&fs.mnt));
        fs
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        // Not mounted if `mount` failed: then only the device goes. A
        // mount something still holds is detached lazily.
        let unmounted = Command::new("umount").arg(&self.mnt).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Runs test bodies `fn NAME(backend: SnapshotBackend)` once per snapshot
/// backend, as the tests `NAME::preserved_blocks` and `NAME::reflink`
/// (which puts its image on a [`LoopXfs`] with reflinks).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn preserved_blocks() {
                super::$name(::ferry_api::SnapshotBackend::PreservedBlocks);
            }
            #[test]
            fn reflink() {
                super::$name(::ferry_api::SnapshotBackend::Reflink);
            }
        }
    )*};
}
