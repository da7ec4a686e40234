//! Snapshots, checkpoints and the admin API against real peers: qemu-io
//! writes, nbdcopy/nbdinfo/qemu-img read snapshot exports and dirty
//! bitmaps, the daemon is restarted and SIGKILLed, and every check is a
//! hash or a block list compared with a log of what was written.
//!
//! The snapshot tests run on both backends with the same assertions
//! (`on_both_backends!`): the image in the temporary directory (the
//! preserved-block store) and on a loop-mounted XFS with reflinks (clones).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ferry_api::SnapshotBackend;
use ferry_store::loop_xfs::LoopXfs;
use tempfile::TempDir;

use crate::harness::*;

const GRAN: u64 = 64 * KIB;

ferry_store::on_both_backends!(
    snapshot_hashes_survive_writes_restart_and_kill,
    snapshots_during_writes_are_point_in_time,
    dirty_bitmaps_match_the_write_log,
    crash_rounds_never_lose_a_dirty_block,
    revert_restores_and_delete_frees_space,
);

/// `fixture(seed)` with the image where snapshots get `backend`: in the
/// temporary directory, or on an XFS with reflinks mounted in it (dropped,
/// so unmounted, before the directory).
fn fixture_on(backend: SnapshotBackend, seed: u64) -> (TempDir, PathBuf, Option<LoopXfs>) {
    let dir = tmpdir();
    let xfs =
        (backend == SnapshotBackend::Reflink).then(|| LoopXfs::mount(dir.path(), true, 1 << 30));
    let img = xfs
        .as_ref()
        .map_or(dir.path(), LoopXfs::path)
        .join("disk.raw");
    make_sparse_image(&img, IMG_SIZE, seed);
    (dir, img, xfs)
}

/// A daemon serving `img` as disk `disk` whose snapshots get `backend`,
/// as `snapshot list` says.
fn live_on(dir: &Path, img: &Path, state: &Path, backend: SnapshotBackend) -> Server {
    let s = Server::live(dir, img, state);
    let list = cli(state, &["snapshot", "list", "disk"]);
    assert_eq!(
        json_str(&list, "backend").as_deref(),
        Some(backend.as_str()),
        "{list}"
    );
    s
}

/// Space the snapshots hold: the preserved-block store's allocation, or
/// what the XFS of the image uses, once `ok` says so (or after 10 s: XFS
/// frees a removed file's blocks in the background, moments later).
fn space_held(state: &Path, xfs: Option<&LoopXfs>, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let used = match xfs {
            Some(x) => {
                let st = rustix::fs::statvfs(x.path()).expect("statvfs");
                (st.f_blocks - st.f_bfree) * st.f_frsize
            }
            None => {
                let store = state.join("disks/disk/cow.store");
                if store.exists() {
                    allocated_bytes(&store)
                } else {
                    0
                }
            }
        };
        if ok(used) || std::time::Instant::now() > deadline {
            return used;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sock(state: &Path) -> PathBuf {
    state.join("admin.sock")
}

/// `nbdferry ARGS --admin SOCK`, must succeed; returns the JSON it printed.
fn cli(state: &Path, args: &[&str]) -> String {
    run(nbdferry().args(args).arg("--admin").arg(sock(state)))
}

/// `nbdferry ARGS --admin SOCK`, must fail with a one-line error; returns it.
fn cli_fail(state: &Path, args: &[&str]) -> String {
    let (_, err) = run_fail(nbdferry().args(args).arg("--admin").arg(sock(state)));
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{err}");
    lines[0].to_string()
}

/// Copies an export into a local file with nbdcopy and hashes it.
fn pull_hash(dir: &Path, uri: &str) -> u64 {
    let out = dir.join(format!("pull-{}.raw", hash_bytes(uri.as_bytes())));
    let _ = std::fs::remove_file(&out);
    run(peer("nbdcopy").arg(uri).arg(&out));
    let h = hash_file(&out);
    std::fs::remove_file(&out).ok();
    h
}

/// Blocks reported dirty (bit 0) by `nbdinfo --map=CONTEXT`.
fn dirty_blocks(uri: &str, context: &str) -> BTreeSet<u64> {
    dirty_blocks_at(uri, context, GRAN)
}

/// As `dirty_blocks`, for a disk tracked in blocks of `gran` bytes.
fn dirty_blocks_at(uri: &str, context: &str, gran: u64) -> BTreeSet<u64> {
    dirty_blocks_of(uri, context, gran, IMG_SIZE)
}

/// As `dirty_blocks_at`, for a disk of `size` bytes.
fn dirty_blocks_of(uri: &str, context: &str, gran: u64, size: u64) -> BTreeSet<u64> {
    let out = run(peer("nbdinfo").arg(format!("--map={context}")).arg(uri));
    let mut set = BTreeSet::new();
    let mut expect = 0;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert_eq!(off, expect, "map not contiguous at `{line}`");
        expect = off + len;
        if ty & 1 != 0 {
            assert!(
                off % gran == 0 && (len % gran == 0 || off + len == size),
                "unaligned dirty extent `{line}`"
            );
            set.extend(off / gran..(off + len).div_ceil(gran));
        }
    }
    assert_eq!(expect, size, "map does not cover the disk");
    set
}

fn blocks_of(log: &[(u64, u64)]) -> BTreeSet<u64> {
    blocks_of_at(log, GRAN)
}

fn blocks_of_at(log: &[(u64, u64)], gran: u64) -> BTreeSet<u64> {
    log.iter()
        .flat_map(|&(o, l)| o / gran..(o + l).div_ceil(gran))
        .collect()
}

/// Random qemu-io commands (writes, zero writes, discards) with unaligned
/// offsets and lengths; returns the commands and the ranges they touch.
fn random_ops(rng: &mut Rng, n: usize) -> (Vec<String>, Vec<(u64, u64)>) {
    let mut cmds = Vec::new();
    let mut log = Vec::new();
    for _ in 0..n {
        let len = 512 * (1 + rng.below(300)); // 512 B .. 150 KiB
        let off = 512 * rng.below((IMG_SIZE - len) / 512);
        let cmd = match rng.below(10) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", 1 + rng.below(254)),
        };
        cmds.push(cmd);
        log.push((off, len));
    }
    (cmds, log)
}

/// Snapshots taken between writer rounds hash like the disk did at that
/// instant, and keep that hash after more writes, a restart and SIGKILL.
fn snapshot_hashes_survive_writes_restart_and_kill(backend: SnapshotBackend) {
    let (dir, img, _xfs) = fixture_on(backend, 301);
    let state = dir.path().join("state");
    let s = live_on(dir.path(), &img, &state, backend);
    let mut rng = Rng::new(3);
    let mut expected = Vec::new();
    for round in 0..3 {
        let (cmds, _) = random_ops(&mut rng, 40);
        qemu_io(&s.uri(), &cmds);
        // The writer is paused (qemu-io exited): this is the disk now.
        let h = hash_file(&img);
        let name = format!("s{round}");
        let out = cli(&state, &["snapshot", "create", "disk", &name]);
        assert!(out.contains(&format!("\"disk@{name}\"")), "{out}");
        expected.push((name, h));
    }
    let (cmds, _) = random_ops(&mut rng, 60);
    qemu_io(&s.uri(), &cmds);
    assert_ne!(
        hash_file(&img),
        expected[2].1,
        "writes after the snapshots changed nothing"
    );
    let check = |s: &Server, when: &str| {
        for (name, h) in &expected {
            let got = pull_hash(dir.path(), &s.uri_for(&format!("disk@{name}")));
            assert_eq!(got, *h, "snapshot {name} changed {when}");
        }
    };
    check(&s, "after later writes");
    s.stop();
    let s = live_on(dir.path(), &img, &state, backend);
    check(&s, "after a restart");
    let (cmds, _) = random_ops(&mut rng, 60);
    qemu_io(&s.uri(), &cmds);
    let live = hash_file(&img);
    s.stop_with(SIGKILL);
    let s = live_on(dir.path(), &img, &state, backend);
    check(&s, "after SIGKILL");
    assert_eq!(
        pull_hash(dir.path(), &s.uri()),
        live,
        "live disk changed by SIGKILL + restart"
    );
    s.stop();
}

/// Snapshots created while qemu-io is writing: qemu-io writes block i
/// after block i-1 was acknowledged, so a point-in-time snapshot holds new
/// data in exactly a prefix of the blocks.
fn snapshots_during_writes_are_point_in_time(backend: SnapshotBackend) {
    let (dir, img, _xfs) = fixture_on(backend, 0);
    make_empty_image(&img, IMG_SIZE);
    let state = dir.path().join("state");
    let s = live_on(dir.path(), &img, &state, backend);
    let nblocks = 256u64;
    let mut c = peer("qemu-io");
    c.args(["-f", "raw"]);
    for i in 0..nblocks {
        c.arg("-c")
            .arg(format!("write -P 0x5a {} {GRAN}", i * GRAN));
    }
    let mut writer = ChildGuard(
        c.arg(s.uri())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io"),
    );
    let mut names = Vec::new();
    for n in 0..6 {
        let name = format!("w{n}");
        cli(&state, &["snapshot", "create", "disk", &name]);
        names.push(name);
    }
    let st = wait_child(&mut writer.0, CMD_DEADLINE).expect("qemu-io did not finish");
    assert!(st.success(), "qemu-io failed: {st}");
    cli(&state, &["snapshot", "create", "disk", "after"]);
    names.push("after".into());
    let mut prefixes = Vec::new();
    for name in &names {
        let out = dir.path().join(format!("{name}.raw"));
        run(peer("nbdcopy")
            .arg(s.uri_for(&format!("disk@{name}")))
            .arg(&out));
        let f = std::fs::File::open(&out).unwrap();
        let mut buf = vec![0u8; GRAN as usize];
        let mut states = Vec::new();
        for i in 0..nblocks {
            f.read_exact_at(&mut buf, i * GRAN).unwrap();
            let new = buf.iter().all(|&b| b == 0x5a);
            let old = buf.iter().all(|&b| b == 0);
            assert!(new || old, "snapshot {name}: block {i} is torn");
            states.push(new);
        }
        let k = states.iter().take_while(|&&b| b).count();
        assert!(
            states[k..].iter().all(|&b| !b),
            "snapshot {name} is not point-in-time: {states:?}"
        );
        prefixes.push(k);
    }
    eprintln!("blocks written in each snapshot: {prefixes:?}");
    assert!(
        prefixes.windows(2).all(|w| w[0] <= w[1]),
        "snapshots go back in time: {prefixes:?}"
    );
    assert_eq!(
        *prefixes.last().unwrap(),
        nblocks as usize,
        "final snapshot misses writes"
    );
    s.stop();
}

/// Dirty bitmaps on snapshot and live exports list exactly the
/// granularity-aligned blocks written after the checkpoint.
fn dirty_bitmaps_match_the_write_log(backend: SnapshotBackend) {
    let (dir, img, _xfs) = fixture_on(backend, 302);
    let state = dir.path().join("state");
    let s = live_on(dir.path(), &img, &state, backend);
    let mut rng = Rng::new(5);
    cli(&state, &["checkpoint", "create", "disk", "c1"]);
    let (cmds, log1) = random_ops(&mut rng, 50);
    qemu_io(&s.uri(), &cmds);
    cli(&state, &["snapshot", "create", "disk", "s1"]);
    let (cmds, log2) = random_ops(&mut rng, 50);
    qemu_io(&s.uri(), &cmds);
    let b1 = blocks_of(&log1);
    let b12: BTreeSet<u64> = b1.union(&blocks_of(&log2)).copied().collect();
    assert_eq!(
        dirty_blocks(&s.uri_for("disk@s1"), "qemu:dirty-bitmap:c1"),
        b1
    );
    assert_eq!(dirty_blocks(&s.uri(), "qemu:dirty-bitmap:c1"), b12);

    // Snapshot + checkpoint in one step; the new checkpoint is not older
    // than its own snapshot, so that export does not offer it.
    let out = cli(
        &state,
        &["snapshot", "create", "disk", "s2", "--checkpoint"],
    );
    assert!(out.contains("\"c1\""), "{out}");
    let (cmds, log3) = random_ops(&mut rng, 30);
    qemu_io(&s.uri(), &cmds);
    assert_eq!(
        dirty_blocks(&s.uri_for("disk@s2"), "qemu:dirty-bitmap:c1"),
        b12
    );
    assert_eq!(
        dirty_blocks(&s.uri(), "qemu:dirty-bitmap:s2"),
        blocks_of(&log3)
    );
    let list = run(peer("nbdinfo").arg("--list").arg(s.uri()));
    let s2_part = &list[list.find("export=\"disk@s2\"").expect("disk@s2 listed")..];
    let s2_part = &s2_part[..s2_part[1..]
        .find("export=")
        .map_or(s2_part.len(), |i| i + 1)];
    assert!(
        s2_part.contains("qemu:dirty-bitmap:c1") && !s2_part.contains("qemu:dirty-bitmap:s2"),
        "{s2_part}"
    );

    // qemu reads the same context (dirty shows as "data": false).
    let port = s.port();
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk@s1,x-dirty-bitmap=qemu:dirty-bitmap:c1"
    );
    let out = run(peer("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(&opts));
    let mut from_qemu = BTreeSet::new();
    for line in out.lines().filter(|l| l.contains("\"start\"")) {
        if json_bool(line, "data") == Some(false) {
            let (o, l) = (
                json_u64(line, "start").unwrap(),
                json_u64(line, "length").unwrap(),
            );
            from_qemu.extend(o / GRAN..(o + l).div_ceil(GRAN));
        }
    }
    assert_eq!(from_qemu, b1, "qemu-img map disagrees");

    // After a clean restart the answers are still exact.
    s.stop();
    let s = live_on(dir.path(), &img, &state, backend);
    assert_eq!(
        dirty_blocks(&s.uri_for("disk@s1"), "qemu:dirty-bitmap:c1"),
        b1
    );
    assert_eq!(
        dirty_blocks(&s.uri(), "qemu:dirty-bitmap:c1"),
        b12.union(&blocks_of(&log3)).copied().collect()
    );
    assert_eq!(
        dirty_blocks(&s.uri(), "qemu:dirty-bitmap:s2"),
        blocks_of(&log3)
    );

    // Deleting a checkpoint keeps the others exact.
    cli(&state, &["checkpoint", "delete", "disk", "c1"]);
    assert_eq!(
        dirty_blocks(&s.uri(), "qemu:dirty-bitmap:s2"),
        blocks_of(&log3)
    );
    s.stop();
}

/// `--granularity` (and `granularity` in the config file) sets the block
/// size of dirty tracking and copy-on-write for a disk's new state; a disk
/// with state keeps its own, and says so.
#[test]
fn granularity_is_set_per_disk_and_kept() {
    let (dir, img) = fixture(306);
    let state = dir.path().join("state");
    let st = state.to_str().unwrap();
    let serve = |gran: &str| {
        Server::serve(
            dir.path(),
            &img,
            &["--name", "disk", "--state-dir", st, "--granularity", gran],
        )
        .with_name("disk")
    };
    let s = serve("16K");
    let out = cli(&state, &["checkpoint", "create", "disk", "c1"]);
    assert!(
        out.replace(' ', "").contains("\"granularity\":16384"),
        "{out}"
    );
    let before = pull_hash(dir.path(), &s.uri());
    cli(&state, &["snapshot", "create", "disk", "s1"]);
    let mut rng = Rng::new(306);
    let (cmds, log) = random_ops(&mut rng, 40);
    qemu_io(&s.uri(), &cmds);
    let want = blocks_of_at(&log, 16 * KIB);
    assert_eq!(
        dirty_blocks_at(&s.uri(), "qemu:dirty-bitmap:c1", 16 * KIB),
        want
    );
    assert_eq!(pull_hash(dir.path(), &s.uri_for("disk@s1")), before);
    s.stop();

    // Restarted with another size: the state keeps 16K, and the log says so.
    let s = serve("1M");
    let out = cli(&state, &["checkpoint", "list", "disk"]);
    assert!(
        out.replace(' ', "").contains("\"granularity\":16384"),
        "{out}"
    );
    assert_eq!(
        dirty_blocks_at(&s.uri(), "qemu:dirty-bitmap:c1", 16 * KIB),
        want
    );
    assert_eq!(pull_hash(dir.path(), &s.uri_for("disk@s1")), before);
    assert!(
        s.log_text()
            .contains("keeps the granularity of its existing state"),
        "{}",
        s.log_text()
    );
    s.stop();

    // Per export in the config file, here for a disk without state.
    let img2 = dir.path().join("second.raw");
    make_sparse_image(&img2, IMG_SIZE, 307);
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[export]]\nname = \"other\"\npath = \"{}\"\ngranularity = \"256K\"\n",
            img2.display()
        ),
    )
    .unwrap();
    let state2 = dir.path().join("state2");
    let s = Server::serve_config(&state2, &cfg).with_name("other");
    let out = cli(&state2, &["checkpoint", "create", "other", "c1"]);
    assert!(
        out.replace(' ', "").contains("\"granularity\":262144"),
        "{out}"
    );
    qemu_io(&s.uri(), &["write -P 7 300000 10".to_string()]);
    assert_eq!(
        dirty_blocks_at(&s.uri(), "qemu:dirty-bitmap:c1", 256 * KIB),
        BTreeSet::from([1])
    );
    s.stop();
}

/// Kills the process when dropped (qemu-io writers).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        terminate_child(&mut self.0, Duration::from_secs(5));
    }
}

/// A writer hammers the live export; the daemon is SIGKILLed at a random
/// write, restarted, and every block that differs from the checkpoint's
/// snapshot must be reported dirty since the checkpoint.
fn crash_rounds_never_lose_a_dirty_block(backend: SnapshotBackend) {
    let (dir, img, _xfs) = fixture_on(backend, 303);
    let state = dir.path().join("state");
    let mut s = live_on(dir.path(), &img, &state, backend);
    cli(
        &state,
        &["snapshot", "create", "disk", "base", "--checkpoint"],
    );
    let base_hash = hash_file(&img);
    let base_copy = dir.path().join("base.raw");
    copy_file(&img, &base_copy);
    let mut rng = Rng::new(9);
    for round in 0..3 {
        let (cmds, _) = random_ops(&mut rng, 400);
        let mut c = peer("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in &cmds {
            c.arg("-c").arg(cmd);
        }
        let mut writer = ChildGuard(
            c.arg(s.uri())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn qemu-io"),
        );
        let stdout = writer.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let kill_at = 20 + rng.below(300);
        let mut seen = 0;
        while seen < kill_at {
            match rx.recv_timeout(CMD_DEADLINE) {
                Ok(l) if l.starts_with("wrote") || l.starts_with("discard") => seen += 1,
                Ok(_) => {}
                Err(e) => panic!("round {round}: writer output ended after {seen} ops: {e}"),
            }
        }
        s.stop_with(SIGKILL);
        drop(writer);
        s = live_on(dir.path(), &img, &state, backend);
        // The snapshot survived intact...
        assert_eq!(
            pull_hash(dir.path(), &s.uri_for("disk@base")),
            base_hash,
            "round {round}: snapshot damaged"
        );
        // ...and every changed block is dirty since the checkpoint.
        let dirty = dirty_blocks(&s.uri(), "qemu:dirty-bitmap:base");
        let (a, b) = (
            std::fs::File::open(&img).unwrap(),
            std::fs::File::open(&base_copy).unwrap(),
        );
        let (mut ba, mut bb) = (vec![0u8; GRAN as usize], vec![0u8; GRAN as usize]);
        let mut changed = 0;
        for blk in 0..IMG_SIZE / GRAN {
            a.read_exact_at(&mut ba, blk * GRAN).unwrap();
            b.read_exact_at(&mut bb, blk * GRAN).unwrap();
            if ba != bb {
                changed += 1;
                assert!(
                    dirty.contains(&blk),
                    "round {round}: block {blk} changed but is not dirty"
                );
            }
        }
        eprintln!(
            "round {round}: killed after {seen} ops, {changed} blocks changed, {} dirty",
            dirty.len()
        );
        assert!(
            changed > 0,
            "round {round}: the writer changed nothing before the kill"
        );
    }
    s.stop();
}

/// Dirty bits after a crash over-report only around the last seconds'
/// writes: a paced random writer runs for several seconds before the
/// daemon is SIGKILLed; every block reported dirty but not written must lie
/// in the marking window of a write made within the last
/// `RECENT` before the kill (the daemon tightens its bitmaps every 2 s),
/// and no written block may be missing, over several crashes.
#[test]
fn crashes_over_report_only_the_last_seconds_windows() {
    const SIZE: u64 = 1024 * MIB;
    const WINDOW: u64 = 16; // blocks marked together (dirty.rs)
    const RECENT: Duration = Duration::from_secs(5);
    let dir = tmpdir();
    let img = dir.path().join("big.raw");
    make_empty_image(&img, SIZE);
    let state = dir.path().join("state");
    let mut s = Server::live(dir.path(), &img, &state);
    cli(&state, &["checkpoint", "create", "disk", "c"]);
    // Writes go to random blocks of even windows only, so no write lands
    // right after a marked window and no read-ahead marking widens them.
    let script = format!(
        r#"
import nbd, os, random, time
random.seed({seed} + int(os.environ["ROUND"]))
h = nbd.NBD()
h.connect_uri(os.environ["NBD_URI"])
buf = b"\xab" * 4096
windows = {windows}
while True:
    w = 2 * random.randrange(windows // 2)
    off = (w * {window} + random.randrange({window})) * {gran} + 4096 * random.randrange(16)
    print(off, flush=True)
    h.pwrite(buf, off)
    time.sleep(0.02)
"#,
        seed = 7,
        windows = SIZE / GRAN / WINDOW,
        window = WINDOW,
        gran = GRAN,
    );
    let mut written: Vec<(std::time::Instant, u64)> = Vec::new();
    // What earlier crashes over-reported stays: after a restart those bits
    // cannot be told from writes. Each crash is judged on what it adds.
    let mut earlier: BTreeSet<u64> = BTreeSet::new();
    for round in 0..3 {
        let env = [("NBD_URI", s.uri()), ("ROUND", round.to_string())];
        let mut c = nbdsh_command(dir.path(), &script, &env);
        let mut writer = ChildGuard(
            c.stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nbdsh"),
        );
        let stdout = writer.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((std::time::Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let started = std::time::Instant::now();
        // Long enough that early writes are older than RECENT.
        while started.elapsed() < 2 * RECENT {
            let (at, line) = rx
                .recv_timeout(CMD_DEADLINE)
                .unwrap_or_else(|e| panic!("round {round}: writer stopped: {e}"));
            written.push((at, line.trim().parse().expect("offset")));
        }
        s.stop_with(SIGKILL);
        let killed = std::time::Instant::now();
        drop(writer);
        while let Ok((at, line)) = rx.try_recv() {
            written.push((at, line.trim().parse().expect("offset")));
        }
        s = Server::live(dir.path(), &img, &state);
        let dirty = dirty_blocks_of(&s.uri(), "qemu:dirty-bitmap:c", GRAN, SIZE);
        let changed: BTreeSet<u64> = data_map(&img)
            .into_iter()
            .filter(|e| e.2)
            .flat_map(|(off, len, _)| off / GRAN..(off + len).div_ceil(GRAN))
            .collect();
        let missing: Vec<_> = changed.difference(&dirty).collect();
        assert!(
            missing.is_empty(),
            "round {round}: written but not dirty: {missing:?}"
        );
        let recent: BTreeSet<u64> = written
            .iter()
            .filter(|(at, _)| killed.duration_since(*at) <= RECENT)
            .map(|(_, off)| off / GRAN / WINDOW)
            .collect();
        let extra: Vec<u64> = dirty.difference(&changed).copied().collect();
        let stale: Vec<u64> = extra
            .iter()
            .copied()
            .filter(|b| !recent.contains(&(b / WINDOW)) && !earlier.contains(b))
            .collect();
        earlier.extend(extra.iter().copied());
        eprintln!(
            "round {round}: {} writes, {} blocks written, {} dirty, {} over-reported, {} recent windows",
            written.len(),
            changed.len(),
            dirty.len(),
            extra.len(),
            recent.len()
        );
        assert!(
            stale.is_empty(),
            "round {round}: {} blocks over-reported outside the last {RECENT:?}'s windows, e.g. {:?}",
            stale.len(),
            &stale[..stale.len().min(20)]
        );
    }
    s.stop();
}

/// revert restores the snapshot's hash on the live disk; delete frees the
/// space of the blocks only the snapshot held at once. A reflink revert
/// shares the clone's blocks again: the space the changed blocks took is
/// free once it returns, and the snapshot then holds nothing apart.
fn revert_restores_and_delete_frees_space(backend: SnapshotBackend) {
    let (dir, img, xfs) = fixture_on(backend, 304);
    let state = dir.path().join("state");
    let s = live_on(dir.path(), &img, &state, backend);
    // Data (not holes) where the snapshot will hold old blocks, so that
    // both backends hold all of them.
    qemu_io(
        &s.uri(),
        &[
            "write -P 0x55 16M 8M".to_string(),
            "write -P 0x55 40M 1M".to_string(),
        ],
    );
    let held = |ok: &dyn Fn(u64) -> bool| space_held(&state, xfs.as_ref(), ok);
    let base = held(&|_| true);
    cli(&state, &["snapshot", "create", "disk", "s1"]);
    let h1 = hash_file(&img);
    qemu_io(
        &s.uri(),
        &[
            "write -P 0x77 16M 8M".to_string(),
            "write -z 40M 1M".to_string(),
            // (reflink counts see what the kernel has written back)
            "flush".to_string(),
        ],
    );
    assert_ne!(hash_file(&img), h1);
    let list = cli(&state, &["snapshot", "list", "disk"]);
    assert_eq!(
        json_u64(&list, "preserved_blocks"),
        Some(9 * MIB / GRAN),
        "{list}"
    );
    let out = cli(&state, &["snapshot", "revert", "disk", "s1"]);
    assert_eq!(json_u64(&out, "blocks"), Some(9 * MIB / GRAN), "{out}");
    assert_eq!(hash_file(&img), h1, "revert did not restore the snapshot");
    assert_eq!(pull_hash(dir.path(), &s.uri()), h1);
    let reflink = backend == SnapshotBackend::Reflink;
    if reflink {
        let used = held(&|h| h < base + MIB);
        assert!(
            used < base + MIB,
            "{used} bytes held after revert ({base} before the snapshot)"
        );
        let list = cli(&state, &["snapshot", "list", "disk"]);
        assert_eq!(json_u64(&list, "preserved_blocks"), Some(0), "{list}");
    }
    let freed = if reflink { 0 } else { 9 * MIB };
    let used = held(&|_| true);
    let out = cli(&state, &["snapshot", "delete", "disk", "s1"]);
    assert_eq!(json_u64(&out, "freed_bytes"), Some(freed), "{out}");
    let after = held(&|h| used.saturating_sub(h) >= freed && h < base + MIB);
    assert!(
        used.saturating_sub(after) >= freed && after < base + MIB,
        "{after} bytes held after delete (was {used}, {base} before the snapshot)"
    );
    eprintln!(
        "delete freed {} bytes of preserved blocks",
        used as i64 - after as i64
    );
    s.stop();
}

#[test]
fn bad_input_gives_one_line_errors_and_leaves_nothing() {
    let dir = tmpdir();
    let img = dir.path().join("disk.raw");
    let ro = dir.path().join("ro.raw");
    make_sparse_image(&img, IMG_SIZE, 305);
    make_empty_image(&ro, IMG_SIZE);
    let state = dir.path().join("state");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[export]]\nname = \"disk\"\npath = \"{}\"\n[[export]]\nname = \"ro\"\npath = \"{}\"\nread-only = true\n",
            img.display(),
            ro.display()
        ),
    )
    .unwrap();
    let s = Server::serve_config(&state, &cfg).with_name("disk");

    for bad in ["../x", "a/b", "a@b", ".hidden", "", &"x".repeat(65)] {
        let e = cli_fail(&state, &["snapshot", "create", "disk", bad]);
        assert!(e.contains("invalid snapshot name"), "{e}");
        let e = cli_fail(&state, &["checkpoint", "create", "disk", bad]);
        assert!(e.contains("invalid checkpoint name"), "{e}");
    }
    // The daemon validates too (the CLI is not the only client).
    let (code, body) = admin_http(
        &sock(&state),
        "POST",
        "/v1/disks/disk/snapshots",
        r#"{"name":"../evil"}"#,
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = admin_http(
        &sock(&state),
        "DELETE",
        "/v1/disks/disk/snapshots/%2E%2E%2Fx",
        "",
    );
    assert_eq!(code, 400, "{body}");
    let (code, _) = admin_http(&sock(&state), "GET", "/v1/disks/..%2Fetc/snapshots", "");
    assert_eq!(code, 404);

    assert!(cli_fail(&state, &["snapshot", "create", "nodisk", "s1"]).contains("no disk 'nodisk'"));
    assert!(cli_fail(&state, &["snapshot", "create", "ro", "s1"]).contains("read-only"));
    assert!(cli_fail(&state, &["checkpoint", "create", "ro", "c1"]).contains("read-only"));
    assert!(cli_fail(&state, &["snapshot", "delete", "disk", "missing"]).contains("no snapshot"));
    assert!(cli_fail(&state, &["snapshot", "revert", "disk", "missing"]).contains("no snapshot"));
    assert!(
        cli_fail(&state, &["checkpoint", "delete", "disk", "missing"]).contains("no checkpoint")
    );
    cli(&state, &["checkpoint", "create", "disk", "c1"]);
    assert!(cli_fail(&state, &["checkpoint", "create", "disk", "c1"]).contains("already exists"));
    // --checkpoint with a taken checkpoint name creates neither.
    assert!(
        cli_fail(
            &state,
            &["snapshot", "create", "disk", "c1", "--checkpoint"]
        )
        .contains("already exists")
    );
    cli(&state, &["snapshot", "create", "disk", "s1"]);
    // The export list shows the live disk, its snapshot and the read-only
    // export.
    let (code, body) = admin_http(&sock(&state), "GET", "/v1/exports", "");
    assert_eq!(code, 200, "{body}");
    let object = |name: &str| {
        body.split('}')
            .find(|o| o.contains(&format!("\"name\":\"{name}\"")))
            .unwrap_or_else(|| panic!("{name} not in {body}"))
            .to_string()
    };
    assert!(
        object("disk@s1").contains("\"snapshot_of\":\"disk\""),
        "{body}"
    );
    assert!(object("disk@s1").contains("\"read_only\":true"), "{body}");
    assert!(object("ro").contains("\"read_only\":true"), "{body}");
    assert!(object("disk").contains("\"read_only\":false"), "{body}");
    assert!(cli_fail(&state, &["snapshot", "create", "disk", "s1"]).contains("already exists"));
    let list = cli(&state, &["snapshot", "list", "disk"]);
    assert_eq!(
        list.matches("\"export\"").count(),
        1,
        "half-created snapshot listed:\n{list}"
    );
    let disks: Vec<_> = std::fs::read_dir(state.join("disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        disks,
        vec![std::ffi::OsString::from("disk")],
        "state for other disks created"
    );

    // A snapshot being read over NBD cannot be deleted: the delete is
    // refused (409, "busy") and the reader keeps working.
    let mut conn = RawConn::tcp(s.addr.unwrap());
    conn.handshake("disk@s1");
    let e = cli_fail(&state, &["snapshot", "delete", "disk", "s1"]);
    assert!(e.contains("busy"), "{e}");
    assert_eq!(
        conn.read_at(0, 4096),
        read_range(&img, 0, 4096),
        "reader broken by refused delete"
    );
    let exports = cli(&state, &["snapshot", "list", "disk"]);
    assert!(exports.contains("disk@s1"));
    conn.disconnect();
    // The server notices the disconnect asynchronously: retry until the
    // connection is gone (deadline-bounded).
    let mut deleted = false;
    wait_until(READY_DEADLINE, "the reader's connection to close", || {
        let out = run_output(
            nbdferry()
                .args(["snapshot", "delete", "disk", "s1", "--admin"])
                .arg(sock(&state)),
        );
        deleted = out.status.success();
        deleted
    });
    assert!(deleted);
    run_fail(peer("nbdinfo").arg(s.uri_for("disk@s1")));
    s.stop();

    // No daemon: a clear error, non-zero exit.
    let e = cli_fail(&state, &["snapshot", "list", "disk"]);
    assert!(e.contains("cannot reach the nbdferry daemon"), "{e}");
}
