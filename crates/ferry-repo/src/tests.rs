//! The repository end to end on a local directory: points, incrementals,
//! resume after a kill, deletion, collection beside a running backup,
//! corruption and encryption.

use std::path::Path;

use bytes::Bytes;

use crate::seal::NonceFrom;
use crate::session::{self, Owner};
use crate::*;

const CS: u64 = 4096;

fn opts() -> CreateOptions {
    CreateOptions {
        chunk_size: CS,
        zstd: Some(1),
    }
}

async fn repo(dir: &Path) -> Repo {
    Repo::open_or_create(dir.to_str().unwrap(), None, &opts())
        .await
        .unwrap()
}

/// Distinct, incompressible-ish content per seed.
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn spec(disk: &str, size: u64, bitmap: bool) -> BackupSpec {
    BackupSpec {
        disk: disk.into(),
        source: format!("test:{disk}"),
        bitmap: bitmap.then(|| "qemu:dirty-bitmap:b0".to_string()),
        size,
        notes: PointNotes::default(),
    }
}

/// A full backup of `img`: zero blocks recorded as zeroes, the rest as data.
async fn full(repo: &Repo, disk: &str, img: &[u8]) -> PointMeta {
    let w = PointWriter::begin(repo, spec(disk, img.len() as u64, false))
        .await
        .unwrap();
    for (i, block) in img.chunks(1000).enumerate() {
        let off = i as u64 * 1000;
        if block.iter().all(|&b| b == 0) {
            w.zero(off, block.len() as u64).await.unwrap();
        } else {
            w.write(off, Bytes::copy_from_slice(block)).await.unwrap();
        }
    }
    w.commit(img.len() as u64).await.unwrap()
}

async fn restore(repo: &Repo, disk: &str, point: Option<&str>) -> Vec<u8> {
    let r = PointReader::open(repo, disk, point).await.unwrap();
    let mut out = vec![0u8; r.size() as usize];
    r.read_at(&mut out, 0).await.unwrap();
    out
}

fn image() -> Vec<u8> {
    let mut img = noise(10 * CS as usize + 123, 1);
    img[3 * CS as usize..5 * CS as usize].fill(0);
    img
}

#[tokio::test]
async fn points_restore_and_deduplicate_across_disks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let img = image();
    let a = full(&repo, "a", &img).await;
    assert_eq!(a.stats.new_chunks, 9, "two zero slots of 11 are not chunks");
    assert_eq!(restore(&repo, "a", None).await, img);
    let r = PointReader::open(&repo, "a", None).await.unwrap();
    assert_eq!(
        r.extents(0, img.len() as u64).unwrap(),
        vec![
            (3 * CS, false),
            (2 * CS, true),
            (img.len() as u64 - 5 * CS, false)
        ]
    );
    // The same content as another disk stores nothing new.
    let b = full(&repo, "b", &img).await;
    assert_eq!(b.stats.new_chunks, 0);
    let listed = repo.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].point, a.point, "oldest first");
}

#[tokio::test]
async fn an_unusable_parent_makes_a_full_point_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let w = PointWriter::begin(&repo, spec("d", 8192, true))
        .await
        .unwrap();
    assert!(!w.incremental());
    w.zero(0, 8192).await.unwrap();
    let first = w.commit(0).await.unwrap();
    assert_eq!(
        first.full_reason.as_deref(),
        Some("disk d has no earlier point")
    );
    // The disk grew: the parent's slots no longer line up.
    let mut grown = spec("d", 3 * CS, true);
    grown.notes.checkpoint = Some("c1".into());
    let w = PointWriter::begin(&repo, grown).await.unwrap();
    assert!(!w.incremental());
    w.zero(0, 3 * CS).await.unwrap();
    let p = w.commit(0).await.unwrap();
    assert_eq!(p.checkpoint.as_deref(), Some("c1"));
    let why = p.full_reason.unwrap();
    assert!(why.contains("size changed from 8192 to 12288"), "{why}");
    // A full point nobody asked to be incremental needs no reason.
    assert_eq!(full(&repo, "d", &image()).await.full_reason, None);
}

#[tokio::test]
async fn incremental_keeps_clean_ranges_from_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let mut img = image();
    let p1 = full(&repo, "d", &img).await;
    // Change 100 bytes inside slot 1 and zero half of slot 7.
    let w = PointWriter::begin(&repo, spec("d", img.len() as u64, true))
        .await
        .unwrap();
    assert!(w.incremental());
    assert_eq!(w.parent(), Some(p1.point.as_str()));
    let new = noise(100, 9);
    img[5000..5100].copy_from_slice(&new);
    img[7 * CS as usize..7 * CS as usize + 2048].fill(0);
    w.keep(0, 5000).await.unwrap();
    w.write(5000, Bytes::copy_from_slice(&new)).await.unwrap();
    w.keep(5100, 7 * CS - 5100).await.unwrap();
    w.zero(7 * CS, 2048).await.unwrap();
    w.keep(7 * CS + 2048, img.len() as u64 - 7 * CS - 2048)
        .await
        .unwrap();
    let p2 = w.commit(100).await.unwrap();
    assert_eq!(p2.stats.new_chunks, 2, "only the two touched slots");
    assert_eq!(restore(&repo, "d", None).await, img);
    assert_eq!(
        restore(&repo, "d", Some(&p1.point)).await,
        image(),
        "the parent is untouched"
    );
    // A unique prefix names a point.
    assert!(
        repo.resolve("d", Some(&p2.point[..p2.point.len() - 1]))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_incremental_finds_chunks_its_parent_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let img = image();
    full(&repo, "d", &img).await;
    // Another disk stores a content that d is about to take.
    let other = noise(CS as usize, 42);
    let mut e = vec![0u8; img.len()];
    e[..CS as usize].copy_from_slice(&other);
    full(&repo, "e", &e).await;
    let w = PointWriter::begin(&repo, spec("d", img.len() as u64, true))
        .await
        .unwrap();
    assert!(w.incremental());
    w.write(0, Bytes::copy_from_slice(&other)).await.unwrap();
    w.keep(CS, img.len() as u64 - CS).await.unwrap();
    let p = w.commit(CS).await.unwrap();
    assert_eq!(p.stats.new_chunks, 0, "disk e stored it already");
    let mut want = img.clone();
    want[..CS as usize].copy_from_slice(&other);
    assert_eq!(restore(&repo, "d", None).await, want);
}

/// Makes a session look like its process was killed.
async fn orphan_sessions(repo: &Repo) {
    for mut s in session::list(repo).await.unwrap() {
        s.owner = Owner {
            pid: u32::MAX - 1,
            ..Owner::me()
        };
        s.save(repo).await.unwrap();
    }
}

#[tokio::test]
async fn a_killed_backup_is_not_listed_and_its_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    // 1024 slots; the journal takes a segment every 1 MiB (256 slots).
    let img = noise(1024 * CS as usize, 3);
    let slot = |i: u64| &img[(i * CS) as usize..((i + 1) * CS) as usize];
    let w = PointWriter::begin(&repo, spec("d", img.len() as u64, false))
        .await
        .unwrap();
    for i in 0..512u64 {
        w.write(i * CS, Bytes::copy_from_slice(slot(i)))
            .await
            .unwrap();
    }
    // Killed: never committed.
    drop(w);
    assert!(repo.list().await.unwrap().is_empty(), "no partial point");
    orphan_sessions(&repo).await;

    let w = PointWriter::begin(&repo, spec("d", img.len() as u64, false))
        .await
        .unwrap();
    assert_eq!(w.resumed_bytes(), 512 * CS);
    assert!(w.slot_done(0) && w.slot_done(511) && !w.slot_done(512));
    for i in 0..1024u64 {
        // Writes to done slots are ignored: the caller need not know.
        w.write(i * CS, Bytes::copy_from_slice(slot(i)))
            .await
            .unwrap();
    }
    let p = w.commit(0).await.unwrap();
    assert_eq!(
        p.stats.new_chunks, 512,
        "stored chunks are not stored again"
    );
    assert_eq!(restore(&repo, "d", None).await, img);
    assert!(session::list(&repo).await.unwrap().is_empty());
}

#[tokio::test]
async fn holes_do_not_hurry_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    // 1024 slots; a segment (and the barrier before it) every 1 MiB of
    // data (256 slots). Three quarters holes, then one segment's data.
    let img = noise(256 * CS as usize, 5);
    let w = PointWriter::begin(&repo, spec("d", 1024 * CS, false))
        .await
        .unwrap();
    w.zero(0, 768 * CS).await.unwrap();
    w.write(768 * CS, Bytes::from(img)).await.unwrap();
    let segments = repo
        .backend()
        .list(crate::id::SESSIONS)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.key.contains("/seg-"))
        .count();
    assert_eq!(
        segments, 1,
        "holes cost a rerun nothing: no segment of their own"
    );
    drop(w);
    orphan_sessions(&repo).await;
    let w = PointWriter::begin(&repo, spec("d", 1024 * CS, false))
        .await
        .unwrap();
    assert_eq!(
        w.resumed_bytes(),
        1024 * CS,
        "the segment names the holes too"
    );
}

#[tokio::test]
async fn deleting_a_point_frees_only_its_own_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let img1 = image();
    let mut img2 = image();
    img2[..CS as usize].copy_from_slice(&noise(CS as usize, 77));
    let p1 = full(&repo, "d", &img1).await;
    let p2 = full(&repo, "d", &img2).await;
    let gc = repo
        .delete_and_collect(&PointRef {
            disk: "d".into(),
            point: p1.point.clone(),
        })
        .await
        .unwrap();
    assert_eq!(gc.freed_chunks, 1, "only slot 0 of point 1 was its own");
    assert!(gc.freed_bytes > 0);
    assert_eq!(restore(&repo, "d", Some(&p2.point)).await, img2);
    let v = repo.verify(true).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(v.unused_chunks, 0);
}

#[tokio::test]
async fn collection_beside_a_running_backup_never_loses_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let img = image();
    let p1 = full(&repo, "d", &img).await;
    // A backup starts and will keep everything from point 1...
    let w = PointWriter::begin(&repo, spec("d", img.len() as u64, true))
        .await
        .unwrap();
    assert!(w.incremental());
    // ...while point 1 is deleted and garbage collected.
    let gc = repo
        .delete_and_collect(&PointRef {
            disk: "d".into(),
            point: p1.point.clone(),
        })
        .await
        .unwrap();
    assert_eq!(gc.freed_chunks, 0, "the running backup is a witness");
    assert_eq!(gc.waiting_chunks, 9);
    w.keep(0, img.len() as u64).await.unwrap();
    let p2 = w.commit(0).await.unwrap();
    // Its chunks are set aside, yet the point reads.
    assert_eq!(restore(&repo, "d", Some(&p2.point)).await, img);
    // An incremental does not trust a parent whose chunks are set aside:
    // the collection it did not witness may delete them before it commits.
    let w = PointWriter::begin(&repo, spec("d", img.len() as u64, true))
        .await
        .unwrap();
    assert!(!w.incremental());
    let why = w.full_reason().unwrap();
    assert!(why.contains("are missing"), "{why}");
    drop(w);
    orphan_sessions(&repo).await;
    // Once the backup is done, collection puts them back.
    let gc = repo.collect_garbage().await.unwrap();
    assert_eq!((gc.restored_chunks, gc.freed_chunks), (9, 0));
    let v = repo.verify(true).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(v.chunks_read, 9);
}

#[tokio::test]
async fn a_flipped_byte_is_named_with_its_points_and_never_restored() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let img = image();
    let p1 = full(&repo, "a", &img).await;
    let p2 = full(&repo, "b", &img).await;
    let r = PointReader::open(&repo, "a", None).await.unwrap();
    let Slot::Chunk(victim) = repo.load_point("a", &p1.point).await.unwrap().slots[0] else {
        panic!("slot 0 holds data");
    };
    let path = dir.path().join(victim.key());
    let mut raw = std::fs::read(&path).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x40;
    std::fs::write(&path, raw).unwrap();
    let v = repo.verify(true).await.unwrap();
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert_eq!(v.problems[0].object, victim.key());
    assert_eq!(
        v.problems[0].points,
        vec![format!("a@{}", p1.point), format!("b@{}", p2.point)]
    );
    let mut buf = vec![0u8; CS as usize];
    assert!(matches!(
        r.read_at(&mut buf, 0).await,
        Err(Error::Corrupt { .. })
    ));
}

#[tokio::test]
async fn a_flipped_checksum_fails_verify_but_the_proven_content_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let img = image();
    let p = full(&repo, "a", &img).await;
    let Slot::Chunk(victim) = repo.load_point("a", &p.point).await.unwrap().slots[0] else {
        panic!("slot 0 holds data");
    };
    // Chunks are stored bare now; one stored before that has a checksum.
    let path = dir.path().join(victim.key());
    let mut raw = repo
        .sealer()
        .seal(&victim.key(), &img[..CS as usize], NonceFrom::Random)
        .unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    std::fs::write(&path, raw).unwrap();
    // A read proves the content by its id; the envelope's own checksum
    // is for `verify --deep`.
    assert_eq!(restore(&repo, "a", None).await, img);
    let v = repo.verify(true).await.unwrap();
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert_eq!(v.problems[0].object, victim.key());
}

#[tokio::test]
async fn pieces_of_any_size_make_the_same_point() {
    // The copy hands a point whole chunks, runs of them, or parts of one.
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    let img = image();
    let a = full(&repo, "a", &img).await;
    let w = PointWriter::begin(&repo, spec("b", img.len() as u64, false))
        .await
        .unwrap();
    let cut = 2 * CS as usize + 100;
    w.write(0, Bytes::copy_from_slice(&img[..cut]))
        .await
        .unwrap();
    w.write(cut as u64, Bytes::copy_from_slice(&img[cut..]))
        .await
        .unwrap();
    let b = w.commit(img.len() as u64).await.unwrap();
    assert_eq!(
        repo.load_point("a", &a.point).await.unwrap().slots,
        repo.load_point("b", &b.point).await.unwrap().slots
    );
    assert_eq!(b.stats.new_chunks, 0);
    assert_eq!(restore(&repo, "b", None).await, img);
}

#[tokio::test]
async fn encrypted_repositories_hide_content_and_need_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key");
    std::fs::write(&key_path, [42u8; 32]).unwrap();
    let key = KeyFile::read(&key_path).unwrap();
    let loc = dir.path().join("repo");
    let loc = loc.to_str().unwrap();
    let repo = Repo::open_or_create(loc, Some(&key), &opts())
        .await
        .unwrap();
    let marker = b"plaintext marker that must not be stored ".repeat(200);
    let mut img = vec![0u8; 4 * CS as usize];
    img[..marker.len()].copy_from_slice(&marker);
    full(&repo, "d", &img).await;
    assert_eq!(restore(&repo, "d", None).await, img);
    for entry in walk(&dir.path().join("repo")) {
        let raw = std::fs::read(&entry).unwrap();
        assert!(
            !raw.windows(20).any(|w| w == &marker[..20]),
            "{entry:?} holds plaintext"
        );
    }
    assert!(matches!(
        Repo::open(loc, None).await,
        Err(Error::KeyRequired)
    ));
    std::fs::write(&key_path, [43u8; 32]).unwrap();
    let wrong = KeyFile::read(&key_path).unwrap();
    assert!(matches!(
        Repo::open(loc, Some(&wrong)).await,
        Err(Error::WrongKey)
    ));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_backups_into_one_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path()).await;
    // Two disks sharing half their content, backed up at the same time.
    let a = noise(256 * CS as usize, 1);
    let mut b = a.clone();
    b[128 * CS as usize..].copy_from_slice(&noise(128 * CS as usize, 2));
    let (ra, rb) = (repo.clone(), repo.clone());
    let (ia, ib) = (a.clone(), b.clone());
    let ta = tokio::spawn(async move { full(&ra, "a", &ia).await });
    let tb = tokio::spawn(async move { full(&rb, "b", &ib).await });
    let (pa, pb) = (ta.await.unwrap(), tb.await.unwrap());
    // Each shared chunk is stored at least once and the total is no more
    // than both disks' distinct content (a race may store a chunk twice
    // over the same object, never as two objects).
    assert!(pa.stats.new_chunks + pb.stats.new_chunks >= 384);
    assert_eq!(repo.list_chunks().await.unwrap().len(), 384);
    assert_eq!(restore(&repo, "a", None).await, a);
    assert_eq!(restore(&repo, "b", None).await, b);
    let v = repo.verify(true).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

#[tokio::test]
async fn a_repository_has_one_tag_however_its_path_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let a = repo(&dir.path().join("r")).await.tag();
    assert_eq!(a.len(), 8);
    assert_eq!(repo(&dir.path().join("r/")).await.tag(), a);
    assert_eq!(repo(&dir.path().join("x/../r")).await.tag(), a);
    assert_ne!(repo(&dir.path().join("other")).await.tag(), a);
}
