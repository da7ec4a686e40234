//! Local file to local file copies: the file reader (page cache reads in
//! place, misses on the blocking pool) and the file writer thread, with
//! holes, an allocated block of zeroes, and odd request sizes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use ferry_jobs::{CopyOptions, Progress, copy};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB + 12345;

/// Data at a few places (one run crossing a MiB boundary, one at the
/// unaligned end), a written block of zeroes, holes everywhere else.
fn source(path: &Path) {
    let f = File::create(path).expect("create");
    f.set_len(SIZE).expect("size");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8 | 1
            })
            .collect()
    };
    f.write_all_at(&noise(300_000), MIB - 1000).expect("write");
    f.write_all_at(&noise(4096), 7 * MIB).expect("write");
    f.write_all_at(&vec![0u8; MIB as usize], 9 * MIB)
        .expect("write zeroes");
    f.write_all_at(&noise(10_000), SIZE - 10_000)
        .expect("write tail");
}

fn same(a: &Path, b: &Path) {
    let (a, b) = (
        std::fs::read(a).expect("read"),
        std::fs::read(b).expect("read"),
    );
    assert_eq!(a.len(), b.len(), "sizes differ");
    assert!(a == b, "contents differ");
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() * 512
}

async fn run(src: &Path, dst: &Path, opts: &CopyOptions) -> ferry_jobs::CopyStats {
    copy(
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        opts,
        Arc::new(Progress::new()),
    )
    .await
    .expect("copy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_to_new_and_existing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    source(&src);
    for request_size in [64 * 1024 + 512, MIB] {
        let opts = CopyOptions {
            request_size,
            ..CopyOptions::default()
        };
        // New file: created under a temporary name, holes stay holes and
        // the zero block is not written.
        let new = dir.path().join(format!("new-{request_size}.raw"));
        let stats = run(&src, &new, &opts).await;
        same(&src, &new);
        assert_eq!(stats.size, SIZE);
        assert!(stats.data < 2 * MIB, "{stats:?}");
        assert!(allocated(&new) < allocated(&src), "zero block was written");

        // Existing file full of other data: everything is overwritten and
        // the source's holes and zero block become zeroes.
        let old = dir.path().join(format!("old-{request_size}.raw"));
        let f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&old)
            .expect("create");
        f.write_all_at(&vec![0xee; (SIZE + MIB) as usize], 0)
            .expect("fill");
        drop(f);
        let stats = run(&src, &old, &opts).await;
        same(&src, &old);
        assert!(stats.zeroed > 0, "{stats:?}");
    }
}
