//! A full state file system (a small tmpfs mounted for the test): every
//! operation that fails for lack of space leaves no trace and no poisoned
//! state, the next one succeeds once there is room, deletes work on a full
//! file system and free the space at once, and the preserved-block
//! accounting stays exact after a write that failed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

const SIZE: u64 = 8 * MIB;
const GRAN: u64 = 64 * KIB;
/// The state file system: room for the manifests, the bitmaps and a few
/// dozen preserved blocks.
const STATE_FS: &str = "size=6m";

/// A tmpfs mounted at `dir` for the test's life (needs root, as CI runs).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", STATE_FS, "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs for the full-disk tests (they need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with `dir/filler` until a write
/// fails for lack of space.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let chunk = vec![0xeeu8; 4096];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {path:?}: {e}"),
        }
    }
    let _ = f.sync_all();
    path
}

fn free_bytes(dir: &Path) -> u64 {
    let st = rustix::fs::statvfs(dir).expect("statvfs");
    st.f_bavail * st.f_frsize
}

/// Files in the disk's state directory that no manifest should leave:
/// temporaries and bitmaps of generations it does not list.
fn strays(disk_dir: &Path) -> Vec<String> {
    let manifest = fs::read_to_string(disk_dir.join("manifest.json")).unwrap_or_default();
    let mut out = Vec::new();
    for e in fs::read_dir(disk_dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        if n.ends_with(".tmp") {
            out.push(n);
        }
    }
    if let Ok(gens) = fs::read_dir(disk_dir.join("gens")) {
        for e in gens {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            let id = n.trim_end_matches(".bits");
            let listed = manifest
                .split("\"gens\"")
                .nth(1)
                .and_then(|r| r.split(']').next())
                .is_some_and(|list| list.split(|c: char| !c.is_ascii_digit()).any(|x| x == id));
            if !listed {
                out.push(format!("gens/{n}"));
            }
        }
    }
    out
}

fn cli(state: &Path, args: &[&str]) -> std::process::Output {
    run_output(
        nbdferry()
            .args(args)
            .arg("--admin")
            .arg(state.join("admin.sock")),
    )
}

fn must(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn no_space(out: std::process::Output) {
    assert!(!out.status.success(), "succeeded on a full file system");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left"), "{err}");
}

#[test]
fn a_full_state_file_system_poisons_nothing_and_deletes_free_space() {
    let dir = tmpdir();
    let d = dir.path();
    let img = d.join("disk.raw");
    make_filled_image(&img, SIZE, 0x11);
    let state = d.join("state");
    let _fs = Tmpfs::mount(&state);
    let disk_dir = state.join("disks/disk");
    let st = state.to_str().unwrap();
    let s = Server::serve(d, &img, &["--name", "disk", "--state-dir", st]).with_name("disk");

    // A checkpoint and a snapshot exist; then the file system fills up.
    must(cli(&state, &["checkpoint", "create", "disk", "c0"]));
    must(cli(&state, &["snapshot", "create", "disk", "s0"]));
    let filler = fill(&state);

    // Creating fails cleanly, again and again, and leaves nothing.
    for _ in 0..2 {
        no_space(cli(&state, &["snapshot", "create", "disk", "s1"]));
        no_space(cli(&state, &["checkpoint", "create", "disk", "c1"]));
        no_space(cli(
            &state,
            &["snapshot", "create", "disk", "s1", "--checkpoint"],
        ));
        assert_eq!(strays(&disk_dir), Vec::<String>::new());
    }

    // A first overwrite under s0 needs 16 preserved copies; with room for
    // a few the write fails part-way, and what the store holds is exactly
    // what is counted.
    let room = fs::metadata(&filler).unwrap().len() - 300 * KIB;
    fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(room)
        .unwrap();
    let out = run_output(
        peer("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x22 0 1M"])
            .arg(s.uri()),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("No space left"), "write did not fail: {text}");
    let list = must(cli(&state, &["snapshot", "list", "disk"]));
    let counted = json_u64(&list, "preserved_blocks").unwrap();
    let store = allocated_bytes(&disk_dir.join("cow.store"));
    // Each preserved block is its data plus a 4 KiB header.
    assert!(
        store <= counted * (GRAN + 4096) + 4096,
        "store holds {store} bytes but {counted} blocks are counted"
    );
    let snap = d.join("s0.raw");
    run(peer("nbdcopy").arg(s.uri_for("disk@s0")).arg(&snap));
    assert_file_eq_bytes(&snap, &vec![0x11; SIZE as usize]);

    // Room again: every operation succeeds.
    fs::remove_file(&filler).unwrap();
    qemu_io(&s.uri(), &["write -P 0x22 0 1M".to_string()]);
    must(cli(
        &state,
        &["snapshot", "create", "disk", "s1", "--checkpoint"],
    ));
    must(cli(&state, &["checkpoint", "create", "disk", "c1"]));
    qemu_io(&s.uri(), &["write -P 0x33 0 2M".to_string()]);
    fs::remove_file(&snap).unwrap();
    run(peer("nbdcopy").arg(s.uri_for("disk@s0")).arg(&snap));
    assert_file_eq_bytes(&snap, &vec![0x11; SIZE as usize]);

    // Full again: deletes still work, and free their space at once.
    let filler = fill(&state);
    let before = free_bytes(&state);
    let out = must(cli(&state, &["snapshot", "delete", "disk", "s0"]));
    assert!(json_u64(&out, "freed_blocks").unwrap() >= 16, "{out}");
    must(cli(&state, &["checkpoint", "delete", "disk", "c0"]));
    let after = free_bytes(&state);
    assert!(
        after >= before + 16 * GRAN,
        "delete freed {} bytes",
        after.saturating_sub(before)
    );
    assert_eq!(strays(&disk_dir), Vec::<String>::new());
    // s1 is intact through all of it.
    let mut model = vec![0x11u8; SIZE as usize];
    model[..MIB as usize].fill(0x22);
    let s1 = d.join("s1.raw");
    run(peer("nbdcopy").arg(s.uri_for("disk@s1")).arg(&s1));
    assert_file_eq_bytes(&s1, &model);
    fs::remove_file(&filler).unwrap();
    must(cli(&state, &["snapshot", "create", "disk", "s2"]));
    s.stop();
}
