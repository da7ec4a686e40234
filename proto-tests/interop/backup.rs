//! Backups against real peers: `backup pull` from qemu-nbd serving a qcow2
//! with a persistent dirty bitmap, through five points with qemu-io writes,
//! discards and zero writes between them; restore, delete, prune, verify
//! (also against a live export), a SIGKILLed backup and its rerun, a
//! corrupted chunk, and the same cycle on a real S3 server (s3s-fs) with
//! encryption. Every check is a whole-image hash or a byte count.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::*;

/// qemu-nbd serving a qcow2 read-only, with its bitmap `b0` if asked.
fn serve_qcow2(img: &Path, bitmap: bool) -> PeerServer {
    PeerServer::spawn_tcp("qemu-nbd", |port| {
        let mut c = peer("qemu-nbd");
        c.args([
            "-f",
            "qcow2",
            "-r",
            "-t",
            "-e",
            "8",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
        ]);
        c.arg("-p").arg(port.to_string());
        if bitmap {
            c.args(["-B", "b0"]);
        }
        c.arg(img);
        c
    })
}

/// The image's content as a sparse raw file: its hash and allocated bytes.
fn image_hash(dir: &Path, img: &Path) -> (u64, u64) {
    let raw = dir.join("state.raw");
    run(peer("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&raw));
    let h = (hash_file(&raw), allocated_bytes(&raw));
    std::fs::remove_file(&raw).ok();
    h
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = peer("qemu-io");
    // -d unmap: discards really deallocate.
    c.args(["-f", "qcow2", "-d", "unmap"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(img));
}

/// A repository and how to reach it.
struct Repo {
    location: String,
    key: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Repo {
    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = nbdferry();
        c.args(args).arg("--repo").arg(&self.location);
        if let Some(k) = &self.key {
            c.arg("--key-file").arg(k);
        }
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    /// `backup pull --json`; returns the printed point.
    fn pull(&self, uri: &str, bitmap: bool, extra: &[&str]) -> serde_json::Value {
        let mut c = self.cmd(&["backup", "pull", uri, "--disk", "disk", "--json"]);
        if bitmap {
            c.args(["--bitmap", "qemu:dirty-bitmap:b0"]);
        }
        c.args(extra);
        let out = run(&mut c);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("pull printed {out:?}: {e}"))
    }

    fn list(&self) -> Vec<serde_json::Value> {
        let out = run(&mut self.cmd(&["backup", "list", "--json"]));
        serde_json::from_str::<serde_json::Value>(out.trim())
            .expect("list JSON")
            .as_array()
            .expect("an array")
            .clone()
    }

    fn restore_hash(&self, dir: &Path, target: &str) -> (u64, u64) {
        let out = dir.join("restored.raw");
        let _ = std::fs::remove_file(&out);
        run(self.cmd(&["restore", target]).arg(&out));
        let r = (hash_file(&out), allocated_bytes(&out));
        std::fs::remove_file(&out).ok();
        r
    }
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn s(v: &serde_json::Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .to_string()
}

/// Bytes under `dir` (a local repository, or an S3 server's data).
fn tree_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        n += if p.is_dir() {
            tree_bytes(&p)
        } else {
            e.metadata().map_or(0, |m| m.len())
        };
    }
    n
}

/// One round of changes: pattern writes, discards and zero writes at
/// random places.
fn mutate(img: &Path, rng: &mut Rng, round: u64) {
    let mut cmds = Vec::new();
    for i in 0..12 {
        let len = (1 + rng.below(16)) * 4 * KIB;
        let off = rng.below((IMG_SIZE - len) / (4 * KIB)) * 4 * KIB;
        match i % 4 {
            0 | 1 => cmds.push(format!(
                "write -P {} {off} {len}",
                1 + (round * 16 + i) % 250
            )),
            2 => cmds.push(format!("discard {off} {len}")),
            _ => cmds.push(format!("write -z {off} {len}")),
        }
    }
    qemu_io(img, &cmds);
}

/// Bytes the export's bitmap b0 marks dirty (what an incremental may read).
fn dirty_bytes(uri: &str) -> u64 {
    let out = run(peer("nbdinfo").arg("--map=qemu:dirty-bitmap:b0").arg(uri));
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (len, ty): (u64, u64) = (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?);
            (ty & 1 != 0).then_some(len)
        })
        .sum()
}

/// A 64 MiB qcow2 (sparse random data) with the persistent bitmap b0.
fn make_qcow2(dir: &Path, seed: u64) -> PathBuf {
    let raw = dir.join("src.raw");
    make_sparse_image(&raw, IMG_SIZE, seed);
    let img = dir.join("disk.qcow2");
    run(peer("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img));
    std::fs::remove_file(&raw).ok();
    run(peer("qemu-img")
        .args(["bitmap", "-f", "qcow2", "--add", "--granularity", "64K"])
        .arg(&img)
        .arg("b0"));
    img
}

/// The five-point cycle; returns the repository's points' ids and hashes.
fn cycle(dir: &Path, repo: &Repo, data_dir: &Path) {
    let img = make_qcow2(dir, 11);
    let mut rng = Rng::new(5);
    // (point id, image hash, allocated bytes of the image as raw)
    let mut points: Vec<(String, u64, u64)> = Vec::new();
    let mut full_read = 0;
    for round in 0..5u64 {
        if round > 0 {
            mutate(&img, &mut rng, round);
        }
        let (want, alloc) = image_hash(dir, &img);
        let srv = serve_qcow2(&img, true);
        let dirty = dirty_bytes(&srv.uri("disk"));
        let p = repo.pull(&srv.uri("disk"), true, &[]);
        drop(srv);
        // The bitmap now tracks changes since this point.
        run(peer("qemu-img")
            .args(["bitmap", "-f", "qcow2", "--clear"])
            .arg(&img)
            .arg("b0"));
        let read = u(&p, "bytes_read");
        if round == 0 {
            assert!(!p["incremental"].as_bool().unwrap(), "{p}");
            // Only allocated data is read: about a quarter of the disk.
            assert!(read < IMG_SIZE / 2 && read > IMG_SIZE / 8, "{p}");
            full_read = read;
        } else {
            assert!(p["incremental"].as_bool().unwrap(), "{p}");
            assert!(
                read <= dirty && dirty > 0,
                "round {round}: read {read} bytes, but the bitmap marks {dirty} dirty"
            );
            assert!(read < full_read / 10, "{p}");
        }
        points.push((s(&p, "point"), want, alloc));
    }
    let listed = repo.list();
    let ids: Vec<String> = listed.iter().map(|p| s(p, "point")).collect();
    assert_eq!(
        ids,
        points.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        "list shows the points oldest first"
    );
    assert!(listed.iter().all(|p| s(p, "disk") == "disk"));

    // Every point restores to its source's hash, thin: no more allocated
    // than the source as a sparse raw file, give or take a little.
    for (i, (id, want, src_alloc)) in points.iter().enumerate() {
        let (got, alloc) = repo.restore_hash(dir, &format!("disk@{id}"));
        assert_eq!(got, *want, "point {} restores to another image", i + 1);
        assert!(
            alloc <= src_alloc + MIB,
            "point {} restored {alloc} bytes allocated, the source has {src_alloc}",
            i + 1
        );
    }
    // The newest by default.
    assert_eq!(repo.restore_hash(dir, "disk").0, points[4].1);

    // The live export compares equal to the newest point, and unequal to an
    // older one.
    let srv = serve_qcow2(&img, false);
    run(&mut repo.cmd(&["backup", "verify", "--against", &srv.uri("disk"), "disk"]));
    let (_, err) = run_fail(&mut repo.cmd(&[
        "backup",
        "verify",
        "--against",
        &srv.uri("disk"),
        &format!("disk@{}", points[0].0),
    ]));
    assert!(err.contains("differs"), "{err}");
    drop(srv);

    // Deleting point 1 leaves 3 and 5 whole.
    run(&mut repo.cmd(&["backup", "delete", &format!("disk@{}", points[0].0)]));
    for i in [2, 4] {
        let (got, _) = repo.restore_hash(dir, &format!("disk@{}", points[i].0));
        assert_eq!(got, points[i].1, "point {} after deleting point 1", i + 1);
    }
    // Prune frees space and keeps what it keeps restorable.
    let before = tree_bytes(data_dir);
    let out = run(&mut repo.cmd(&["backup", "prune", "--keep-last", "2", "--json"]));
    let after = tree_bytes(data_dir);
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("prune JSON");
    assert_eq!(
        report["deleted"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert!(u(&report["gc"], "freed_bytes") > 0, "{report}");
    assert!(
        after < before,
        "prune freed nothing: {before} -> {after} bytes"
    );
    eprintln!(
        "repository: {before} bytes before prune, {after} after (freed {})",
        u(&report["gc"], "freed_bytes")
    );
    for i in [3, 4] {
        let (got, _) = repo.restore_hash(dir, &format!("disk@{}", points[i].0));
        assert_eq!(got, points[i].1, "point {} after prune", i + 1);
    }
    assert_eq!(repo.list().len(), 2);
    run(&mut repo.cmd(&["backup", "verify", "--deep"]));
}

#[test]
fn five_points_from_qemu_nbd_with_a_persistent_bitmap() {
    let dir = tmpdir();
    let loc = dir.path().join("repo");
    let repo = Repo {
        location: loc.to_str().unwrap().to_string(),
        key: None,
        env: Vec::new(),
    };
    cycle(dir.path(), &repo, &loc);
}

/// A fully allocated 64 MiB raw image of random data.
fn random_raw(path: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut data = Vec::with_capacity(IMG_SIZE as usize);
    for _ in 0..IMG_SIZE / MIB {
        rng.fill(&mut buf);
        data.extend_from_slice(&buf);
    }
    std::fs::write(path, data).expect("write image");
}

fn segments(repo: &Path) -> usize {
    let Ok(sessions) = std::fs::read_dir(repo.join("sessions")) else {
        return 0;
    };
    sessions
        .flatten()
        .filter_map(|s| std::fs::read_dir(s.path()).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
        .count()
}

#[test]
fn a_killed_backup_leaves_no_point_and_its_rerun_reads_only_the_rest() {
    let dir = tmpdir();
    let img = dir.path().join("full.raw");
    random_raw(&img, 3);
    let srv = qemu_nbd(&img, "disk", true);
    let loc = dir.path().join("repo");
    let repo = Repo {
        location: loc.to_str().unwrap().to_string(),
        key: None,
        env: Vec::new(),
    };
    // Paced so that the kill lands in the middle: 64 MiB at 16 MiB/s.
    let mut child = repo
        .cmd(&[
            "backup",
            "pull",
            &srv.uri("disk"),
            "--disk",
            "disk",
            "--rate",
            "16M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn backup");
    let end = Instant::now() + Duration::from_secs(60);
    while segments(&loc) < 24 {
        assert!(Instant::now() < end, "no journal segment within 60 s");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the backup ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    send_signal(child.id(), SIGKILL);
    child.wait().expect("reap");
    assert!(repo.list().is_empty(), "a killed backup is listed");

    let p = repo.pull(&srv.uri("disk"), false, &[]);
    let (read, resumed) = (u(&p, "bytes_read"), u(&p, "resumed_bytes"));
    assert!(resumed > 0 && resumed < IMG_SIZE, "{p}");
    assert!(
        read <= IMG_SIZE - resumed + IMG_SIZE / 10,
        "the rerun read {read} bytes; {resumed} of {IMG_SIZE} were stored already"
    );
    assert_eq!(repo.list().len(), 1);
    assert_eq!(repo.restore_hash(dir.path(), "disk").0, hash_file(&img));
    assert_eq!(segments(&loc), 0, "the finished session is gone");
}

#[test]
fn a_corrupted_chunk_is_named_and_never_restored() {
    let dir = tmpdir();
    let (_d, img) = fixture(21);
    let srv = qemu_nbd(&img, "disk", true);
    let loc = dir.path().join("repo");
    let repo = Repo {
        location: loc.to_str().unwrap().to_string(),
        key: None,
        env: Vec::new(),
    };
    let p = repo.pull(&srv.uri("disk"), false, &[]);
    let point = s(&p, "point");
    run(&mut repo.cmd(&["backup", "verify", "--deep"]));
    // Flip one byte in the middle of some chunk.
    let mut chunks = Vec::new();
    for d in std::fs::read_dir(loc.join("chunks")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            chunks.push(f.path());
        }
    }
    chunks.sort();
    let victim = &chunks[chunks.len() / 2];
    let mut raw = std::fs::read(victim).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    std::fs::write(victim, raw).unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();

    let (out, err) = run_fail(&mut repo.cmd(&["backup", "verify", "--deep"]));
    let text = format!("{out}{err}");
    assert!(
        text.contains(&name),
        "verify does not name the chunk:\n{text}"
    );
    assert!(
        text.contains(&format!("disk@{point}")),
        "verify does not name the point:\n{text}"
    );

    let dst = dir.path().join("restored.raw");
    let (_, err) = run_fail(repo.cmd(&["restore", "disk"]).arg(&dst));
    assert!(err.contains("corrupt"), "{err}");
    assert!(
        !dst.exists(),
        "a failed restore left a complete-looking file"
    );
}

/// s3s-fs (`cargo install s3s-fs --features binary`) on a free port.
fn s3_server(root: &Path) -> PeerServer {
    PeerServer::spawn_tcp("s3s-fs", |port| {
        let mut c = peer("s3s-fs");
        c.args([
            "--host",
            "127.0.0.1",
            "--access-key",
            "ferry",
            "--secret-key",
            "ferrysecret",
        ]);
        c.arg("--port").arg(port.to_string());
        c.arg(root);
        c
    })
}

fn s3_env(port: u16) -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "ferry".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "ferrysecret".to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[test]
fn five_points_on_an_s3_server_encrypted() {
    let dir = tmpdir();
    let data = dir.path().join("s3");
    std::fs::create_dir_all(data.join("bucket")).unwrap();
    let srv = s3_server(&data);
    let key = dir.path().join("key");
    std::fs::write(&key, Rng::new(9).next_u64().to_le_bytes().repeat(4)).unwrap();
    let repo = Repo {
        location: "s3://bucket/backups".into(),
        key: Some(key),
        env: s3_env(srv.port.expect("tcp")),
    };
    cycle(dir.path(), &repo, &data);
    // Nothing the server stores contains a piece of the disk's data: take
    // 64-byte samples of what the last point holds.
    let restored = dir.path().join("final.raw");
    run(repo.cmd(&["restore", "disk"]).arg(&restored));
    let plain = std::fs::read(&restored).unwrap();
    let samples: Vec<&[u8]> = data_map(&restored)
        .into_iter()
        .filter(|r| r.2 && r.1 >= 4096)
        .take(20)
        .map(|(off, _, _)| &plain[off as usize + 100..off as usize + 164])
        .collect();
    assert!(!samples.is_empty());
    let mut files = vec![data.clone()];
    while let Some(d) = files.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                files.push(p);
                continue;
            }
            let raw = std::fs::read(&p).unwrap();
            for smp in &samples {
                assert!(!raw.windows(64).any(|w| w == *smp), "{p:?} holds plaintext");
            }
        }
    }
    // Without the key nothing opens.
    let mut c = nbdferry();
    c.args(["backup", "list", "--repo", "s3://bucket/backups"]);
    c.envs(repo.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let (_, err) = run_fail(&mut c);
    assert!(err.contains("key"), "{err}");
}
