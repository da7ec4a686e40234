//! Tests of a whole live disk over a real file: content, snapshots, dirty
//! tracking, and crash simulation (the disk is dropped without flush or
//! clean shutdown and reopened from its state directory).
//!
//! The snapshot tests run on both backends with the same assertions (see
//! `on_both_backends!`): the preserved-block store on the temporary
//! directory's file system, and reflink clones on a loop-mounted XFS.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_block::{BlockDev, Error, Extent, IDENTITY_PREFIX, ZeroMode};

use ferry_api::SnapshotBackend;

use crate::disk::{Disk, Reflinks};
use crate::error::StoreError;
use crate::file::FileDev;
use crate::loop_xfs::LoopXfs;
use crate::reflink;
use crate::tap::{Change, Ticket, WriteTap};

const GRAN: u64 = 64 * 1024;
const SIZE: u64 = 4 << 20; // 64 blocks
const XFS_SIZE: u64 = 512 << 20;
/// The clone of a disk's first snapshot.
const S1_CLONE: &str = ".disk.raw.nbdferry-snap.1";

struct Fixture {
    backend: SnapshotBackend,
    image: PathBuf,
    state: PathBuf,
    // Unmounted before the directory it is in goes.
    xfs: Option<LoopXfs>,
    _dir: tempfile::TempDir,
}

/// A sparse image `disk.raw` of SIZE on a file system where snapshots get
/// `backend`, and a state directory in the temporary directory (as the
/// daemon's lives apart from the images).
fn fixture_on(backend: SnapshotBackend) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let xfs =
        (backend == SnapshotBackend::Reflink).then(|| LoopXfs::mount(dir.path(), true, XFS_SIZE));
    let root = xfs.as_ref().map_or(dir.path(), LoopXfs::path).to_path_buf();
    let image = root.join("disk.raw");
    File::create(&image).unwrap().set_len(SIZE).unwrap();
    Fixture {
        backend,
        image,
        state: dir.path().join("state"),
        xfs,
        _dir: dir,
    }
}

fn fixture() -> Fixture {
    fixture_on(SnapshotBackend::PreservedBlocks)
}

impl Fixture {
    fn open(&self) -> Arc<Disk> {
        self.open_with(GRAN)
    }

    /// The disk with blocks of `gran`, asserting the backend it got.
    fn open_with(&self, gran: u64) -> Arc<Disk> {
        let v = self.open_as(gran, Reflinks::IfSupported);
        assert_eq!(v.snapshot_backend(), self.backend);
        v
    }

    /// The disk served as if its image could not be cloned (a disk that
    /// arrived from elsewhere, say): new snapshots preserve blocks.
    fn open_without_reflinks(&self) -> Arc<Disk> {
        self.open_as(GRAN, Reflinks::Never)
    }

    fn open_as(&self, gran: u64, reflinks: Reflinks) -> Arc<Disk> {
        // A child process that another test forks (mkfs.xfs, mount) holds
        // a copy of every descriptor until it execs, the lock of a disk
        // just dropped included: give such a moment time to pass (any
        // other refusal fails all the same, a second later).
        let mut tries = 0;
        loop {
            let file = Arc::new(FileDev::open(&self.image, false).unwrap());
            match Disk::open("disk", file, &self.image, &self.state, gran, reflinks) {
                Err(StoreError::BadState(_)) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r.unwrap(),
            }
        }
    }

    /// A file beside the image.
    fn file(&self, name: &str) -> PathBuf {
        self.image.with_file_name(name)
    }

    /// Ranges where the image does not map the same blocks as the file
    /// `clone` beside it (see [`reflink::differing`]): none once the image
    /// is a reflink of it again.
    fn unshared(&self, clone: &str) -> Vec<(u64, u64)> {
        let map = |p: &Path| {
            let file = File::open(p).unwrap();
            let size = file.metadata().unwrap().len();
            reflink::mapping(&file, size, true).unwrap()
        };
        let size = std::fs::metadata(&self.image).unwrap().len();
        reflink::differing(&map(&self.file(clone)), &map(&self.image), size)
    }

    /// Space the snapshots hold: the preserved-block store's allocation,
    /// or what the XFS (clones and image) uses.
    fn held(&self) -> u64 {
        self.held_once(|_| true)
    }

    /// [`held`](Self::held), once it is `ok` (or after 10 s): XFS frees
    /// the blocks of a removed file in the background, moments later.
    fn held_once(&self, ok: impl Fn(u64) -> bool) -> u64 {
        match &self.xfs {
            Some(xfs) => {
                let d = File::open(xfs.path()).unwrap();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    let st = rustix::fs::fstatvfs(&d).unwrap();
                    let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
                    if ok(used) || std::time::Instant::now() > deadline {
                        return used;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            None => {
                let store = self.state.join("disk/cow.store");
                std::fs::metadata(&store).map_or(0, |m| m.blocks() * 512)
            }
        }
    }
}

crate::on_both_backends!(
    snapshot_freezes_content_and_shares_preserved_blocks,
    crash_keeps_snapshots_and_dirty_bits,
    checkpoints_stay_exact_for_any_older_one_and_after_deletes,
    revert_restores_and_delete_frees_space,
    deleted_view_fails_and_names_are_checked,
    snapshot_is_a_write_fence,
    short_last_block,
    snapshot_reads_race_first_overwrites,
);

fn open_disk(name: &str, image: &Path, state: &Path, gran: u64) -> crate::Result<Arc<Disk>> {
    let file = Arc::new(FileDev::open(image, false)?);
    Disk::open(name, file, image, state, gran, Reflinks::IfSupported)
}

fn read(dev: &dyn BlockDev, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, off).unwrap();
    b
}

fn all(dev: &dyn BlockDev) -> Vec<u8> {
    read(dev, 0, dev.size() as usize)
}

fn dirty_of(dev: &dyn BlockDev, ctx: &str) -> Vec<u64> {
    let ext = dev.extents(ctx, 0, dev.size(), usize::MAX).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    for Extent { length, flags } in ext {
        if flags & 1 != 0 {
            out.extend(pos / GRAN..(pos + length) / GRAN);
        }
        pos += length;
    }
    out
}

#[test]
fn no_state_until_first_use() {
    let f = fixture();
    let v = f.open();
    v.write_at(&[1; 4096], 0, false).unwrap();
    assert!(
        !f.state.exists(),
        "state directory created without a snapshot"
    );
    let ctx = v.contexts();
    assert_eq!(ctx[0], "base:allocation");
    assert_eq!(ctx.len(), 2);
    assert!(ctx[1].starts_with(IDENTITY_PREFIX), "{ctx:?}");
}

fn snapshot_freezes_content_and_shares_preserved_blocks(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    let v = f.open();
    v.write_at(&vec![0xaa; SIZE as usize], 0, false).unwrap();
    let before = all(&*v);
    v.create_snapshot("s1", false).unwrap();
    v.create_snapshot("s2", false).unwrap();
    // First overwrite: preserved once for both snapshots.
    v.write_at(&[0xbb; 100], GRAN + 10, false).unwrap();
    v.write_zeroes(
        3 * GRAN,
        2 * GRAN,
        ZeroMode {
            may_trim: true,
            fast: false,
            fua: false,
        },
    )
    .unwrap();
    v.trim(10 * GRAN, GRAN, false).unwrap();
    let s1 = v.snapshot_view("s1").unwrap();
    let s2 = v.snapshot_view("s2").unwrap();
    assert_eq!(all(&*s1), before);
    assert_eq!(all(&*s2), before);
    assert_eq!(read(&*v, GRAN + 10, 100), vec![0xbb; 100]);
    // Reflink counts see what the kernel has written back.
    v.flush().unwrap();
    let infos = v.snapshots();
    assert_eq!(infos[0].preserved_blocks, 4);
    assert_eq!(infos[1].preserved_blocks, 4);
    assert!(infos.iter().all(|i| i.backend == f.backend));
    // 4 blocks held, not 8: sharing (the file system's own blocks for
    // reflink clones).
    if f.xfs.is_none() {
        assert!(f.held() <= 4 * (GRAN + 4096) + 4096, "{}", f.held());
    }
    // A third snapshot sees the new content; unaligned reads across blocks.
    v.create_snapshot("s3", false).unwrap();
    v.write_at(&[0xcc; 3 * GRAN as usize], GRAN / 2, false)
        .unwrap();
    let s3 = v.snapshot_view("s3").unwrap();
    assert_eq!(read(&*s3, GRAN + 10, 100), vec![0xbb; 100]);
    assert_eq!(
        read(&*s1, GRAN / 2 - 5, 3 * GRAN as usize + 10),
        before[(GRAN / 2 - 5) as usize..][..3 * GRAN as usize + 10]
    );
    // The inline cached path: never for a preserved block (a clone is
    // one file, cached like any), and right whenever it answers.
    let mut b = vec![0u8; 100];
    if s1.read_at_nowait(&mut b, GRAN + 10).unwrap() {
        assert_eq!(f.backend, SnapshotBackend::Reflink);
        assert_eq!(b, before[(GRAN + 10) as usize..][..100]);
    }
    if s1.read_at_nowait(&mut b, 20 * GRAN).unwrap() {
        assert_eq!(b, before[20 * GRAN as usize..][..100]);
    }
    assert!(s1.write_at(&[0], 0, false).is_err());
    assert!(s1.caps().read_only);
}

fn crash_keeps_snapshots_and_dirty_bits(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    let v = f.open();
    v.write_at(&vec![1; SIZE as usize], 0, false).unwrap();
    v.create_checkpoint("c1").unwrap();
    v.write_at(&[2; 10], 5 * GRAN, false).unwrap();
    let snap_content = all(&*v);
    v.create_snapshot("s1", false).unwrap();
    v.write_at(&[3; 10], 5 * GRAN, false).unwrap();
    v.write_at(&[3; 10], 9 * GRAN, false).unwrap();
    let live_content = all(&*v);
    // No flush, no orderly close: the process "dies".
    crash(v);
    let v = f.open();
    assert_eq!(all(&*v), live_content);
    assert_eq!(all(&*v.snapshot_view("s1").unwrap()), snap_content);
    // The frozen generation (c1 up to s1) is exact; the active one may
    // report whole marking windows around what was written.
    let s1 = v.snapshot_view("s1").unwrap();
    assert_eq!(dirty_of(&*s1, "qemu:dirty-bitmap:c1"), vec![5]);
    let live = v.dirty_blocks("c1").unwrap();
    assert!(live.contains(&5) && live.contains(&9), "{live:?}");
    assert!(live.iter().all(|&b| b < 16), "{live:?}");
    assert_eq!(dirty_of(&*v, "qemu:dirty-bitmap:c1"), live);
    // New writes after the restart are tracked and preserved again.
    v.write_at(&[4; 10], 9 * GRAN, false).unwrap();
    v.write_at(&[4; 10], 20 * GRAN, false).unwrap();
    assert_eq!(all(&*v.snapshot_view("s1").unwrap()), snap_content);
    assert!(v.dirty_blocks("c1").unwrap().contains(&20));
    drop(s1);
    // A clean close leaves exact bits.
    drop(v);
    let v = f.open();
    assert_eq!(v.dirty_blocks("c1").unwrap(), [live, vec![20]].concat());
}

fn crash(v: Arc<Disk>) {
    v.crash();
}

#[test]
fn clean_close_keeps_exact_dirty_bits() {
    let f = fixture();
    let v = f.open();
    v.create_checkpoint("c1").unwrap();
    v.write_at(&[2; 10], 5 * GRAN, false).unwrap();
    v.write_at(&[2; 10], 9 * GRAN, false).unwrap();
    drop(v);
    let v = f.open();
    assert_eq!(v.dirty_blocks("c1").unwrap(), vec![5, 9]);
}

#[test]
fn interrupted_changes_leave_nothing_behind() {
    let f = fixture();
    let v = f.open();
    v.create_checkpoint("c1").unwrap();
    drop(v);
    // A generation file written by a create that died before the manifest.
    let stray = f.state.join("disk/gens/999.bits");
    std::fs::write(&stray, [0xff; 16]).unwrap();
    let v = f.open();
    assert!(!stray.exists());
    assert_eq!(v.checkpoints().len(), 1);
    assert!(v.dirty_blocks("c1").unwrap().is_empty());
}

fn checkpoints_stay_exact_for_any_older_one_and_after_deletes(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    let v = f.open();
    v.write_at(&[9; 10], 0, false).unwrap();
    v.create_checkpoint("a").unwrap();
    v.write_at(&[1; 10], GRAN, false).unwrap();
    v.create_checkpoint("b").unwrap();
    v.write_at(&[1; 10], 2 * GRAN, false).unwrap();
    v.create_snapshot("s", true).unwrap();
    v.write_at(&[1; 10], 3 * GRAN - 1, false).unwrap(); // spans blocks 2 and 3
    assert_eq!(v.dirty_blocks("a").unwrap(), vec![1, 2, 3]);
    assert_eq!(v.dirty_blocks("b").unwrap(), vec![2, 3]);
    assert_eq!(v.dirty_blocks("s").unwrap(), vec![2, 3]);
    let s = v.snapshot_view("s").unwrap();
    let mut ctx = s.contexts();
    let identity = ctx.pop().unwrap();
    assert_eq!(
        ctx,
        vec![
            "base:allocation",
            "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b"
        ]
    );
    // The snapshot's identity: the disk's, and which snapshot.
    let live = v.contexts().pop().unwrap();
    assert!(
        identity.starts_with(&format!("{live}@")),
        "{identity} vs {live}"
    );
    assert_eq!(s.extents(&identity, 0, GRAN, 1).unwrap()[0].length, GRAN);
    assert_eq!(dirty_of(&*s, "qemu:dirty-bitmap:a"), vec![1, 2]);
    assert!(matches!(
        s.extents("qemu:dirty-bitmap:s", 0, GRAN, 10),
        Err(Error::UnknownContext(_))
    ));
    v.delete_checkpoint("b").unwrap();
    assert_eq!(v.dirty_blocks("a").unwrap(), vec![1, 2, 3]);
    assert_eq!(v.dirty_blocks("s").unwrap(), vec![2, 3]);
    v.delete_checkpoint("a").unwrap();
    assert_eq!(v.dirty_blocks("s").unwrap(), vec![2, 3]);
    drop(s); // a view keeps the disk (and its state lock) alive
    drop(v);
    let v = f.open();
    assert_eq!(v.dirty_blocks("s").unwrap(), vec![2, 3]);
    v.delete_checkpoint("s").unwrap();
    assert_eq!(
        std::fs::read_dir(f.state.join("disk/gens"))
            .unwrap()
            .count(),
        0
    );
    assert!(matches!(
        v.delete_checkpoint("s"),
        Err(StoreError::NotFound(_))
    ));
}

fn revert_restores_and_delete_frees_space(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    let v = f.open();
    v.write_at(&vec![5; SIZE as usize], 0, false).unwrap();
    let old = all(&*v);
    let base = f.held();
    v.create_snapshot("s1", false).unwrap();
    v.write_at(&vec![6; 16 * GRAN as usize], 8 * GRAN, false)
        .unwrap();
    v.create_snapshot("s2", false).unwrap();
    v.write_at(&vec![7; 4 * GRAN as usize], 10 * GRAN, false)
        .unwrap();
    v.create_checkpoint("c").unwrap();
    let reflink = backend == SnapshotBackend::Reflink;
    if reflink {
        assert_eq!(f.unshared(S1_CLONE), vec![(8 * GRAN, 16 * GRAN)]);
    }
    let held = f.held();
    let r = v.revert("s1").unwrap();
    assert_eq!(r.blocks, 16);
    assert_eq!(all(&*v), old);
    // The revert changed those blocks: a checkpoint reports them.
    let reverted: Vec<u64> = (8..24).collect();
    assert_eq!(v.dirty_blocks("c").unwrap(), reverted);
    assert_eq!(dirty_of(&*v, "qemu:dirty-bitmap:c"), reverted);
    if reflink {
        // Reflinked, not copied: the image maps the clone's blocks again,
        // and the 4 blocks only it held are free at once (a copy would
        // have taken 12 more, where s2 shared them).
        assert_eq!(f.unshared(S1_CLONE), vec![]);
        let after = f.held_once(|h| held.saturating_sub(h) >= 3 * GRAN);
        assert!(
            held.saturating_sub(after) >= 3 * GRAN,
            "revert freed {} bytes",
            held as i64 - after as i64
        );
    }
    // s2 kept its content through the revert (which wrote to the origin).
    let s2 = v.snapshot_view("s2").unwrap();
    assert_eq!(read(&*s2, 10 * GRAN, 4), vec![6; 4]);
    let before = f.held();
    let d = v.delete_snapshot("s1").unwrap();
    // s2 got its own copies when the revert rewrote blocks it shared; s1's
    // clone, reflinked back, holds nothing the image does not.
    let freed = if reflink { 0 } else { 16 };
    assert_eq!(d.freed_blocks, freed);
    assert_eq!(d.freed_bytes, freed * GRAN);
    assert_eq!(v.snapshots()[0].preserved_blocks, 16);
    let after = f.held_once(|h| before.saturating_sub(h) >= freed * GRAN);
    assert!(
        before.saturating_sub(after) >= freed * GRAN,
        "freed {} bytes",
        before as i64 - after as i64
    );
    assert!(v.snapshot_view("s1").is_err());
    v.delete_snapshot("s2").unwrap();
    let left = f.held_once(|h| h < base + GRAN);
    assert!(left < base + GRAN, "{left} held, {base} before");
    // Writes after the last snapshot is gone preserve nothing.
    v.write_at(&[1; 10], 0, false).unwrap();
    assert!(f.held() < base + GRAN, "{} held, {base} before", f.held());
}

fn deleted_view_fails_and_names_are_checked(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    let v = f.open();
    v.create_snapshot("s1", false).unwrap();
    let s1 = v.snapshot_view("s1").unwrap();
    v.delete_snapshot("s1").unwrap();
    assert!(matches!(s1.read_at(&mut [0; 10], 0), Err(Error::Gone(_))));
    for bad in ["", "../x", "a/b", "a@b", ".x"] {
        assert!(matches!(
            v.create_snapshot(bad, false),
            Err(StoreError::InvalidName(_))
        ));
        assert!(matches!(
            v.create_checkpoint(bad),
            Err(StoreError::InvalidName(_))
        ));
    }
    v.create_snapshot("s1", false).unwrap();
    assert!(matches!(
        v.create_snapshot("s1", false),
        Err(StoreError::Exists(_))
    ));
    v.create_checkpoint("c").unwrap();
    assert!(matches!(
        v.create_snapshot("c", true),
        Err(StoreError::Exists(_))
    ));
    assert!(
        v.snapshots().iter().all(|s| s.name != "c"),
        "half-created snapshot left"
    );
    assert!(matches!(v.revert("nope"), Err(StoreError::NotFound(_))));
    assert!(matches!(
        v.delete_snapshot("nope"),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn other_disk_in_same_state_dir_is_refused() {
    let f = fixture();
    let v = f.open();
    v.create_checkpoint("c").unwrap();
    // Same name, still open: the lock refuses a second owner.
    assert!(matches!(
        open_disk("disk", &f.image, &f.state, GRAN),
        Err(StoreError::BadState(_))
    ));
    drop(v);
    let other = f.file("other.raw");
    File::create(&other).unwrap().set_len(SIZE).unwrap();
    assert!(matches!(
        open_disk("disk", &other, &f.state, GRAN),
        Err(StoreError::BadState(_))
    ));
}

/// Writers race snapshot creation: each snapshot holds every write
/// acknowledged before `create` started and none issued after it returned.
fn snapshot_is_a_write_fence(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    let v = f.open();
    v.create_checkpoint("c0").unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let writer = {
        let (v, acked, stop) = (v.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 1u64;
            while stop.load(Ordering::SeqCst) == 0 && i < 60 * 8 {
                // Sequence number i goes to 8 KiB piece i.
                v.write_at(&i.to_le_bytes().repeat(1024), (i % 480) * 8192, false)
                    .unwrap();
                acked.store(i, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    let mut checks = Vec::new();
    for n in 0..5 {
        let lo = acked.load(Ordering::SeqCst);
        let name = format!("s{n}");
        v.create_snapshot(&name, false).unwrap();
        let hi = acked.load(Ordering::SeqCst) + 1; // at most one in flight
        checks.push((name, lo, hi));
    }
    stop.store(1, Ordering::SeqCst);
    writer.join().unwrap();
    for (name, lo, hi) in checks {
        let s = v.snapshot_view(&name).unwrap();
        for i in 1..480u64 {
            let got = u64::from_le_bytes(read(&*s, i * 8192, 8).try_into().unwrap());
            if i <= lo {
                assert_eq!(got, i, "{name}: acknowledged write {i} missing");
            }
            if i > hi {
                assert_eq!(got, 0, "{name}: write {i} issued after create is visible");
            }
        }
    }
}

/// A disk whose size is not a multiple of the granularity: the short last
/// block is preserved, read and reverted like the others.
fn short_last_block(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    let size = 3 * GRAN + 1000;
    std::fs::write(&f.image, vec![7u8; size as usize]).unwrap();
    let v = f.open();
    v.create_snapshot("s", true).unwrap();
    v.write_at(&vec![9u8; (2 * GRAN + 1000) as usize], GRAN, false)
        .unwrap();
    let s = v.snapshot_view("s").unwrap();
    assert_eq!(all(&*s), vec![7u8; size as usize]);
    assert_eq!(v.dirty_blocks("s").unwrap(), vec![1, 2, 3]);
    v.revert("s").unwrap();
    assert_eq!(all(&*v), vec![7u8; size as usize]);
    if backend == SnapshotBackend::Reflink {
        // The last run, ending at the end of the file but not on a file
        // system block, was reflinked too.
        assert_eq!(f.unshared(S1_CLONE), vec![]);
    }
    drop(s);
    crash(v);
    let v = f.open();
    assert_eq!(
        all(&*v.snapshot_view("s").unwrap()),
        vec![7u8; size as usize]
    );
}

/// Readers of a snapshot race writers that overwrite (and so preserve)
/// the same blocks: every read must return the frozen content. Several
/// rounds, each with a fresh snapshot, since the race only exists while
/// blocks are overwritten for the first time.
fn snapshot_reads_race_first_overwrites(backend: SnapshotBackend) {
    let f = fixture_on(backend);
    // Small blocks: many first overwrites, so the race lasts.
    let v = f.open_with(4096);
    let mut content = vec![0u8; SIZE as usize];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / 4096) as u8 ^ 0x5a;
    }
    v.write_at(&content, 0, false).unwrap();
    v.create_checkpoint("c").unwrap();
    let base = Arc::new(content);
    for round in 0..6u64 {
        // Writers are stopped: this is the snapshot's content.
        let frozen = Arc::new(all(&*v));
        let name = format!("s{round}");
        v.create_snapshot(&name, false).unwrap();
        let stop = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let (v, stop) = (v.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = t + 1 + 10 * round;
                    while stop.load(Ordering::SeqCst) == 0 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let off = (x >> 33) % (SIZE - 8192);
                        v.write_at(&[(t + round) as u8; 8192], off, false).unwrap();
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2u64)
            .map(|t| {
                let (s, frozen) = (v.snapshot_view(&name).unwrap(), frozen.clone());
                std::thread::spawn(move || {
                    let mut x = t + 99 + round;
                    for _ in 0..10_000 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let off = (x >> 33) % (SIZE - 100_000);
                        let len = 1 + (x >> 7) as usize % 100_000;
                        let got = read(&*s, off, len);
                        assert!(
                            got == frozen[off as usize..][..len],
                            "snapshot read at {off}+{len} saw a live write"
                        );
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        stop.store(1, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(all(&*v.snapshot_view(&name).unwrap()), *frozen);
    }
    // Every block that differs from the first content is dirty since c.
    let live = all(&*v);
    let dirty = v.dirty_blocks("c").unwrap();
    for b in 0..SIZE / 4096 {
        let r = (b * 4096) as usize..((b + 1) * 4096) as usize;
        if live[r.clone()] != base[r] {
            assert!(dirty.contains(&b), "block {b} changed but is not dirty");
        }
    }
}

/// Where a probe clone fails, the preserved-block store is chosen: the
/// temporary directory's file system (`fixture`) and an XFS without
/// reflinks.
#[test]
fn no_reflinks_means_the_preserved_block_store() {
    let dir = tempfile::tempdir().unwrap();
    let xfs = LoopXfs::mount(dir.path(), false, XFS_SIZE);
    let image = xfs.path().join("disk.raw");
    File::create(&image).unwrap().set_len(SIZE).unwrap();
    let v = open_disk("disk", &image, &xfs.path().join("state"), GRAN).unwrap();
    assert_eq!(v.snapshot_backend(), SnapshotBackend::PreservedBlocks);
    v.create_snapshot("s", false).unwrap();
    assert!(xfs.path().join("state/disk/cow.store").exists());
    drop(v);
    let leftovers: Vec<_> = std::fs::read_dir(xfs.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".disk.raw"))
        .collect();
    assert!(leftovers.is_empty(), "probe left {leftovers:?}");
}

/// A clone no manifest names (a create or delete interrupted between the
/// clone and the manifest) is removed at open; a named clone that is
/// missing makes the state refused, not served as something else.
#[test]
fn leftover_clones_go_and_missing_ones_are_refused() {
    let f = fixture_on(SnapshotBackend::Reflink);
    let v = f.open();
    v.write_at(&[3; 4096], 0, false).unwrap();
    v.create_snapshot("s1", false).unwrap();
    v.write_at(&[4; 4096], 0, false).unwrap();
    crash(v);
    let stray = f.file(".disk.raw.nbdferry-snap.99");
    std::fs::write(&stray, [1; 4096]).unwrap();
    let v = f.open();
    assert!(!stray.exists(), "leftover clone kept");
    assert_eq!(read(&*v.snapshot_view("s1").unwrap(), 0, 4), [3; 4]);
    let clone = f.file(".disk.raw.nbdferry-snap.1");
    assert!(clone.exists());
    drop(v);
    std::fs::remove_file(&clone).unwrap();
    assert!(matches!(
        open_disk("disk", &f.image, &f.state, GRAN),
        Err(StoreError::BadState(_))
    ));
}

/// What a tap saw of each change: its kind and range, and the byte the
/// disk held all over it once it was down (None: not one byte).
#[derive(Debug, PartialEq)]
struct Seen {
    cloned: bool,
    offset: u64,
    len: u64,
    after: Option<u8>,
}

/// A tap that reads each change's range back from the image once it is
/// down, as a tap that needs a clone's bytes does.
struct Recorder {
    image: File,
    seen: std::sync::Mutex<Vec<Seen>>,
}

impl WriteTap for Recorder {
    fn before(self: Arc<Self>, _: Change<'_>) -> ferry_block::Result<Option<Box<dyn Ticket>>> {
        Ok(Some(Box::new(self)))
    }
}

impl Ticket for Arc<Recorder> {
    fn after(
        self: Box<Self>,
        change: Change<'_>,
        local: &ferry_block::Result<()>,
    ) -> ferry_block::Result<()> {
        assert!(local.is_ok(), "{local:?}");
        let (offset, len) = change.range();
        let mut after = vec![0; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&self.image, &mut after, offset)?;
        self.seen.lock().unwrap().push(Seen {
            cloned: matches!(change, Change::Cloned { .. }),
            offset,
            len,
            after: after.iter().all(|&b| b == after[0]).then_some(after[0]),
        });
        Ok(())
    }
}

/// A revert to a reflink snapshot reflinks the changed blocks back, and
/// every layer takes that as a change of them: an older preserved-block
/// snapshot keeps its exact content (preserved first), a checkpoint
/// reports the blocks, and a tap sees each cloned range and reads the
/// reverted bytes back from the image once it is down.
#[test]
fn reflink_revert_is_a_change_every_layer_sees() {
    let f = fixture_on(SnapshotBackend::Reflink);
    let v = f.open();
    v.write_at(&vec![1; SIZE as usize], 0, false).unwrap();
    v.create_snapshot("r", false).unwrap();
    v.write_at(&vec![2; 16 * GRAN as usize], 8 * GRAN, false)
        .unwrap();
    v.write_at(&vec![3; GRAN as usize], 40 * GRAN, false)
        .unwrap();
    drop(v);
    // A preserved-block snapshot (and checkpoint) of the changed disk,
    // made while it was served without reflinks.
    let v = f.open_without_reflinks();
    v.create_snapshot("p", true).unwrap();
    let changed = all(&*v);
    drop(v);
    let v = f.open();
    let tap = Arc::new(Recorder {
        image: File::open(&f.image).unwrap(),
        seen: Default::default(),
    });
    v.set_tap(Some(tap.clone()));
    assert_eq!(v.revert("r").unwrap().blocks, 17);
    v.set_tap(None);
    assert_eq!(all(&*v), vec![1; SIZE as usize]);
    assert_eq!(f.unshared(S1_CLONE), vec![], "not reflinked back");
    let seen = std::mem::take(&mut *tap.seen.lock().unwrap());
    let clone = |offset: u64, blocks: u64| Seen {
        cloned: true,
        offset,
        len: blocks * GRAN,
        after: Some(1),
    };
    assert_eq!(seen, [clone(8 * GRAN, 16), clone(40 * GRAN, 1)]);
    let p = v.snapshot_view("p").unwrap();
    assert!(all(&*p) == changed, "the older snapshot lost its content");
    let listed: Vec<(String, u64)> = v
        .snapshots()
        .into_iter()
        .map(|s| (s.name, s.preserved_blocks))
        .collect();
    assert_eq!(listed, [("r".to_string(), 0), ("p".to_string(), 17)]);
    let mut reverted: Vec<u64> = (8..24).collect();
    reverted.push(40);
    assert_eq!(v.dirty_blocks("p").unwrap(), reverted);
}

/// Snapshots keep the backend they were made with when new ones get
/// another (a disk first served where reflinks were not used).
#[test]
fn snapshots_keep_their_backend() {
    let f = fixture_on(SnapshotBackend::Reflink);
    let file = Arc::new(FileDev::open(&f.image, false).unwrap());
    let v = Disk::open("disk", file, &f.image, &f.state, GRAN, Reflinks::Never).unwrap();
    v.write_at(&vec![1; SIZE as usize], 0, false).unwrap();
    v.create_snapshot("p", false).unwrap();
    v.write_at(&[2; 100], 0, false).unwrap();
    drop(v);
    let v = f.open();
    v.create_snapshot("r", false).unwrap();
    v.write_at(&vec![3; 2 * GRAN as usize], 0, false).unwrap();
    let backends: Vec<_> = v.snapshots().iter().map(|s| s.backend).collect();
    assert_eq!(
        backends,
        [SnapshotBackend::PreservedBlocks, SnapshotBackend::Reflink]
    );
    let p = v.snapshot_view("p").unwrap();
    let r = v.snapshot_view("r").unwrap();
    assert_eq!(read(&*p, 0, 200), vec![1; 200]);
    assert_eq!(read(&*r, 0, 200), [vec![2; 100], vec![1; 100]].concat());
    assert_eq!(read(&*r, GRAN, 10), vec![1; 10]);
    drop((p, r));
    v.revert("p").unwrap();
    assert_eq!(all(&*v), vec![1; SIZE as usize]);
    v.revert("r").unwrap();
    assert_eq!(read(&*v, 0, 200), [vec![2; 100], vec![1; 100]].concat());
    v.delete_snapshot("p").unwrap();
    v.delete_snapshot("r").unwrap();
    assert!(v.snapshots().is_empty());
}
