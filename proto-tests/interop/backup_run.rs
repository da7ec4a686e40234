//! `backup run` against a real daemon: three runs with qemu-io writes in
//! between (a full, then incrementals that read only what changed), the
//! leftover snapshot of a killed run read again, every point restored and
//! compared with a copy of the disk taken at its time, one checkpoint left
//! on the host after each run; then the daemon's state is lost and the
//! next run falls back to a full point that says why.

use std::path::{Path, PathBuf};

use crate::harness::*;

const SIZE: u64 = 64 * MIB;

struct Setup {
    dir: PathBuf,
    state: PathBuf,
    repo: PathBuf,
}

impl Setup {
    fn admin(&self) -> PathBuf {
        self.state.join("admin.sock")
    }

    /// `nbdferry ARGS --admin SOCK`, must succeed; its standard output.
    fn cli(&self, args: &[&str]) -> String {
        run(nbdferry().args(args).arg("--admin").arg(self.admin()))
    }

    /// `backup run --json` against `server`; the object it printed.
    fn backup_run(&self, server: &Server) -> serde_json::Value {
        let out = run(nbdferry()
            .args(["backup", "run", "--disk", "disk", "--json", "--admin"])
            .arg(self.admin())
            .arg("--repo")
            .arg(&self.repo)
            .args(["--nbd", &server.uri_for("")]));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("run printed {out:?}: {e}"))
    }

    /// The disk's content now, read over NBD: (hash, bytes).
    fn reference(&self, server: &Server) -> u64 {
        let copy = self.dir.join("reference.raw");
        run(peer("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri()])
            .arg(&copy));
        let h = hash_file(&copy);
        std::fs::remove_file(&copy).ok();
        h
    }

    fn restore_hash(&self, point: &str) -> u64 {
        let out = self.dir.join("restored.raw");
        let _ = std::fs::remove_file(&out);
        run(nbdferry()
            .args(["restore", &format!("disk@{point}"), "--repo"])
            .arg(&self.repo)
            .arg(&out));
        let h = hash_file(&out);
        std::fs::remove_file(&out).ok();
        h
    }

    /// The host's checkpoints and snapshots of the disk, by name.
    fn host_state(&self) -> (Vec<String>, Vec<String>) {
        let names = |json: &str, key: &str| -> Vec<String> {
            let v: serde_json::Value = serde_json::from_str(json).expect("JSON");
            v[key]
                .as_array()
                .unwrap_or_else(|| panic!("no {key} in {v}"))
                .iter()
                .map(|c| c["name"].as_str().expect("a name").to_string())
                .collect()
        };
        (
            names(&self.cli(&["checkpoint", "list", "disk"]), "checkpoints"),
            names(&self.cli(&["snapshot", "list", "disk"]), "snapshots"),
        )
    }
}

/// `backup-TAG-` of a run's checkpoint: the names its repository's runs
/// give their snapshots and checkpoints.
fn own_prefix(run: &serde_json::Value) -> String {
    let cp = text(run, "checkpoint");
    let tag = cp.strip_prefix("backup-").and_then(|r| r.get(..9));
    match tag {
        Some(t) if t.ends_with('-') && t[..8].chars().all(|c| c.is_ascii_hexdigit()) => {
            format!("backup-{t}")
        }
        _ => panic!("checkpoint {cp} is not named backup-TAG-POINT"),
    }
}

fn text<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Writes 8 random 64 KiB blocks (and zeroes one) through the live export.
fn write_some(server: &Server, rng: &mut Rng) {
    let mut cmds = Vec::new();
    for i in 0..8 {
        let off = rng.below(SIZE / (64 * KIB)) * 64 * KIB;
        cmds.push(format!("write -P {} {off} 64k", 0x11 + i));
    }
    let off = rng.below(SIZE / (64 * KIB)) * 64 * KIB;
    cmds.push(format!("write -z {off} 64k"));
    qemu_io(&server.uri(), &cmds);
}

/// After a run: the point's checkpoint is the only one, no snapshot left.
fn assert_tidy(s: &Setup, point: &serde_json::Value) {
    let (checkpoints, snapshots) = s.host_state();
    assert_eq!(checkpoints, vec![text(point, "checkpoint").to_string()]);
    assert!(snapshots.is_empty(), "snapshots left: {snapshots:?}");
}

#[test]
fn backup_run_takes_incrementals_and_falls_back_to_full_when_state_is_lost() {
    let tmp = tmpdir();
    let s = Setup {
        dir: tmp.path().to_path_buf(),
        state: tmp.path().join("state"),
        repo: tmp.path().join("repo"),
    };
    let img = s.dir.join("disk.raw");
    make_sparse_image(&img, SIZE, 1201);
    let data = allocated_bytes(&img);
    let mut rng = Rng::new(12);
    let server = Server::live(&s.dir, &img, &s.state);
    let mut points: Vec<(String, u64)> = Vec::new();

    let full = s.backup_run(&server);
    eprintln!("first: {full}");
    assert_eq!(text(&full, "kind"), "full");
    assert!(
        text(&full, "full_reason").contains("no earlier point"),
        "{full}"
    );
    // About a quarter of the image is data; holes are not read.
    assert!(
        num(&full, "bytes_read") < SIZE / 2,
        "reads only allocated data ({data} bytes): {full}"
    );
    points.push((text(&full, "point").into(), s.reference(&server)));
    assert_tidy(&s, &full);
    let own = own_prefix(&full);

    for round in 0..2 {
        write_some(&server, &mut rng);
        let inc = s.backup_run(&server);
        eprintln!("incremental {round}: {inc}");
        assert_eq!(text(&inc, "kind"), "incremental", "{inc}");
        assert!(inc["full_reason"].is_null(), "{inc}");
        assert_eq!(text(&inc, "parent"), points.last().unwrap().0);
        assert!(
            num(&inc, "bytes_read") <= 9 * 64 * KIB,
            "reads only the dirty blocks: {inc}"
        );
        points.push((text(&inc, "point").into(), s.reference(&server)));
        assert_tidy(&s, &inc);
    }

    // A run killed after taking its snapshot leaves it behind: the next
    // run reads it (the disk as it was then), not the disk as it is now.
    write_some(&server, &mut rng);
    let stale = format!("{own}20261201T000000.000Z-dead");
    s.cli(&["snapshot", "create", "disk", &stale, "--checkpoint"]);
    let at_snapshot = s.reference(&server);
    write_some(&server, &mut rng);
    let reread = s.backup_run(&server);
    eprintln!("stale snapshot: {reread}");
    assert_eq!(reread["reused_snapshot"], true, "{reread}");
    assert_eq!(text(&reread, "kind"), "incremental");
    assert_eq!(text(&reread, "checkpoint"), stale);
    assert!(
        num(&reread, "bytes_read") > 0,
        "the writes before it: {reread}"
    );
    points.push((text(&reread, "point").into(), at_snapshot));
    assert_tidy(&s, &reread);

    // The daemon loses the disk's state (checkpoints and all).
    server.stop();
    std::fs::remove_dir_all(&s.state).expect("remove the state");
    let server = Server::live(&s.dir, &img, &s.state);
    let after = s.backup_run(&server);
    eprintln!("after the state was lost: {after}");
    assert_eq!(text(&after, "kind"), "full");
    let why = text(&after, "full_reason");
    assert!(why.contains("no longer has checkpoint"), "{why}");
    points.push((text(&after, "point").into(), s.reference(&server)));
    assert_tidy(&s, &after);
    // `backup list` says why too.
    let list = run(nbdferry().args(["backup", "list", "--repo"]).arg(&s.repo));
    assert!(list.contains(&format!("full: {why}")), "{list}");

    for (point, want) in &points {
        assert_eq!(s.restore_hash(point), *want, "point {point}");
    }
    server.stop();
}

/// A disk backed up into two repositories (a local and an offsite one):
/// each keeps its own checkpoint on the host, so every run after the first
/// into either is an incremental that reads only what changed.
#[test]
fn two_repositories_of_one_disk_keep_their_own_chains() {
    let tmp = tmpdir();
    let setup = |repo: &str| Setup {
        dir: tmp.path().to_path_buf(),
        state: tmp.path().join("state"),
        repo: tmp.path().join(repo),
    };
    let (a, b) = (setup("repo-a"), setup("repo-b"));
    let img = a.dir.join("disk.raw");
    make_sparse_image(&img, SIZE, 1202);
    let mut rng = Rng::new(13);
    let server = Server::live(&a.dir, &img, &a.state);
    let first = [a.backup_run(&server), b.backup_run(&server)];
    assert_ne!(
        own_prefix(&first[0]),
        own_prefix(&first[1]),
        "the repositories name their checkpoints apart"
    );
    let mut want = Vec::new();
    for round in 0..2 {
        write_some(&server, &mut rng);
        let at = a.reference(&server);
        for s in [&a, &b] {
            let inc = s.backup_run(&server);
            eprintln!("round {round}, {}: {inc}", s.repo.display());
            assert_eq!(text(&inc, "kind"), "incremental", "{inc}");
            assert!(
                num(&inc, "bytes_read") <= 9 * 64 * KIB,
                "reads only the dirty blocks: {inc}"
            );
            want.push((s, text(&inc, "point").to_string(), at));
        }
        // One checkpoint per repository, the one its newest point needs.
        let (mut checkpoints, snapshots) = a.host_state();
        checkpoints.sort();
        let mut newest: Vec<String> = want[want.len() - 2..]
            .iter()
            .map(|(s, p, _)| {
                let list = run(nbdferry()
                    .args(["backup", "list", "--json", "--repo"])
                    .arg(&s.repo));
                let v: serde_json::Value = serde_json::from_str(&list).expect("list JSON");
                let last = v.as_array().and_then(|a| a.last()).expect("a point");
                assert_eq!(text(last, "point"), p);
                text(last, "checkpoint").to_string()
            })
            .collect();
        newest.sort();
        assert_eq!(checkpoints, newest);
        assert!(snapshots.is_empty(), "snapshots left: {snapshots:?}");
    }
    for (s, point, hash) in &want {
        assert_eq!(s.restore_hash(point), *hash, "{} {point}", s.repo.display());
    }
    server.stop();
}

#[test]
fn backup_run_refuses_bad_input_with_one_line() {
    let tmp = tmpdir();
    let d = tmp.path();
    let img = d.join("disk.raw");
    make_sparse_image(&img, 4 * MIB, 3);
    let state = d.join("state");
    let server = Server::live(d, &img, &state);
    let base = |disk: &str, admin: &Path| {
        let mut c = nbdferry();
        c.args(["backup", "run", "--disk", disk, "--admin"])
            .arg(admin)
            .arg("--repo")
            .arg(d.join("repo"))
            .args(["--nbd", &server.uri_for("")]);
        c
    };
    let admin = state.join("admin.sock");
    for (mut cmd, want) in [
        (base("nosuch", &admin), "nosuch"),
        (base("disk", &d.join("no.sock")), "cannot reach"),
        (base("bad/name", &admin), "invalid"),
    ] {
        let (_, err) = run_fail(&mut cmd);
        assert!(err.contains(want), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    server.stop();
}
