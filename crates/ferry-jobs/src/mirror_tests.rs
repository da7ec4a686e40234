//! The copier against a client write that is under way: the race that
//! lost writes on the destination before background writes held their
//! stripes until they were down.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_api::MirrorMode;
use ferry_store::{Change, Disk, FileDev, Reflinks, WriteTap};

use super::Mirror;

const GRAN: u64 = 64 << 10;
const SIZE: u64 = 64 * GRAN;

/// qemu-nbd serving a file on a Unix socket, killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(file: &Path, socket: PathBuf) -> Self {
        let child = Command::new("qemu-nbd")
            .args(["-t", "-e", "8", "-f", "raw", "-x", "dst", "-k"])
            .arg(&socket)
            .arg(file)
            .spawn()
            .expect("this test needs qemu-nbd (qemu-utils)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen in 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        QemuNbd { child, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///dst?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A disk of 0x11 bytes (`DIR/img.raw`), mirrored in background mode to an
/// empty file (`DIR/dst.raw`) behind qemu-nbd, its plan not made yet.
async fn started(dir: &Path) -> (QemuNbd, Arc<Disk>, Arc<Mirror>) {
    let image = dir.join("img.raw");
    std::fs::write(&image, vec![0x11u8; SIZE as usize]).unwrap();
    let dst = dir.join("dst.raw");
    std::fs::File::create(&dst).unwrap().set_len(SIZE).unwrap();
    let nbd = QemuNbd::start(&dst, dir.join("nbd.sock"));
    let file = Arc::new(FileDev::open(&image, false).unwrap());
    let disk = Disk::open(
        "disk",
        file,
        &image,
        &dir.join("state"),
        GRAN,
        Reflinks::Never,
    )
    .unwrap();
    let m = Mirror::start(
        disk.clone(),
        disk.device(),
        &nbd.uri(),
        MirrorMode::Background,
        None,
        Duration::from_millis(100),
        false,
    )
    .await
    .unwrap();
    (nbd, disk, m)
}

/// The bulk pass, run to its end: nothing is pending.
async fn bulk_done(m: &Arc<Mirror>) {
    m.plan().await.unwrap();
    m.send_run(0, SIZE / GRAN).await.unwrap();
    m.flush_and_clear().await.unwrap();
}

/// Writes `data` at `off` of the file, behind the mirror's back.
fn write_behind(path: &Path, data: &[u8], off: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, off)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_way_is_never_cleared_with_its_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_nbd, disk, m) = started(dir.path()).await;
    let (image, dst) = (dir.path().join("img.raw"), dir.path().join("dst.raw"));
    m.plan().await.unwrap();
    assert!(m.pending.get(3), "the bulk plan marks the data pending");

    // A client write to block 3 has passed the tap; its data is not down.
    let (off, new) = (3 * GRAN, vec![0x22u8; GRAN as usize]);
    let write = || Change::Write {
        offset: off,
        data: &new,
        fua: false,
    };
    let ticket = m.clone().before(write()).unwrap().expect("a ticket");

    // The copier sends block 3 and clears what a flush covers, meanwhile.
    let mut copier = tokio::spawn({
        let m = m.clone();
        async move {
            m.send_run(3, 4).await?;
            m.flush_and_clear().await
        }
    });
    // Room for the copier to get it wrong: unhindered it is done in a few
    // ms. Held off by the write (the fix), it runs once the write is down.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut copier).await;
    write_behind(&image, &new, off);
    ticket.after(write(), &Ok(())).unwrap();
    match early {
        Ok(done) => done,
        Err(_) => copier.await,
    }
    .unwrap()
    .unwrap();

    let mut on_dst = vec![0u8; GRAN as usize];
    std::fs::File::open(&dst)
        .unwrap()
        .read_exact_at(&mut on_dst, off)
        .unwrap();
    assert!(
        m.pending.get(3) || on_dst == new,
        "the write is lost: block 3 is no longer pending and the destination holds its old data"
    );
    disk.set_tap(None);
}

/// An active write's ticket dropped without `after` (its writer panicked)
/// leaves its blocks to the copier: a block still counted as sent would
/// never be sent, and the destination may not have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_write_dropped_midway_is_left_to_the_copier() {
    let dir = tempfile::tempdir().unwrap();
    let (_nbd, disk, m) = started(dir.path()).await;
    bulk_done(&m).await;
    assert!(!m.pending.get(5), "the bulk pass is done");
    m.active.store(true, Ordering::Release);

    let new = vec![0x33u8; GRAN as usize];
    let change = Change::Write {
        offset: 5 * GRAN,
        data: &new,
        fua: false,
    };
    let ticket = m.clone().before(change).unwrap().expect("a ticket");
    assert!(
        m.pending.get(5) && m.active_sent.get(5),
        "an active write: pending, and sent by the write itself"
    );
    drop(ticket);
    assert!(
        m.pending.get(5) && !m.active_sent.get(5),
        "dropped midway: the copier must send block 5"
    );
    disk.set_tap(None);
}

/// The pending map's marks are written, not synced: within one boot the
/// file is trusted, after a host restart it is not, and the mirror plans
/// the whole disk again rather than skip a block whose mark was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_in_another_boot_sends_the_whole_disk_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_nbd, disk, m) = started(dir.path()).await;
    let (image, dst) = (dir.path().join("img.raw"), dir.path().join("dst.raw"));
    bulk_done(&m).await;
    assert_eq!(m.pending.count(), 0, "everything is on the destination");
    disk.set_tap(None);
    drop(m);
    let saved = Mirror::saved(&disk).expect("a mirror to resume");

    // A write whose mark a host crash lost: the data is down, no bit says so.
    write_behind(&image, &[0x22u8; GRAN as usize], 5 * GRAN);

    // The same boot: the map is trusted, nothing is pending.
    let m = Mirror::resume(disk.clone(), disk.device(), &saved)
        .await
        .unwrap();
    assert!(m.planned.load(Ordering::Acquire));
    assert_eq!(m.pending.count(), 0);
    disk.set_tap(None);
    drop(m);

    // A record with no boot id (its marks were synced) is trusted, and
    // gets this boot's id at once: unsynced marks follow.
    let record = saved.join(super::RECORD);
    let read_record = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap()
    };
    let mut json = read_record();
    json.as_object_mut().unwrap().remove("boot_id");
    std::fs::write(&record, json.to_string()).unwrap();
    let m = Mirror::resume(disk.clone(), disk.device(), &saved)
        .await
        .unwrap();
    assert!(m.planned.load(Ordering::Acquire));
    assert!(read_record()["boot_id"].is_string(), "the boot is recorded");
    disk.set_tap(None);
    drop(m);

    // Another boot: the map is not trusted; the plan marks all the data.
    let mut json = read_record();
    json["boot_id"] = "an-earlier-boot".into();
    std::fs::write(&record, json.to_string()).unwrap();
    let m = Mirror::resume(disk.clone(), disk.device(), &saved)
        .await
        .unwrap();
    assert!(!m.planned.load(Ordering::Acquire));
    let again = read_record();
    assert_eq!(
        again["planned"], false,
        "a restart now would plan again too"
    );
    assert_ne!(again["boot_id"], "an-earlier-boot");
    m.plan().await.unwrap();
    assert!(m.pending.get(5), "the block whose mark was lost is pending");
    m.send_run(0, SIZE / GRAN).await.unwrap();
    m.flush_and_clear().await.unwrap();
    disk.set_tap(None);
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        std::fs::read(&image).unwrap(),
        "the destination holds the write"
    );
}
