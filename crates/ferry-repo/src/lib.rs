//! The backup repository: full and incremental points of disks, stored as
//! content-addressed chunks on a local directory or an S3-compatible
//! object store, in the same format on both.
//!
//! # Format (version 1)
//!
//! ```text
//! config                      plain JSON: format, chunk_size, zstd level,
//!                             encryption (cipher, key check) or null
//! chunks/ab/ab12…             one chunk per object, named by its id
//! points/DISK/POINT           a point's index
//! sessions/ID/record          a running (or killed) backup: who, heartbeat
//! sessions/ID/seg-N           its journal: slots done so far
//! fossils/GEN/ID              chunks set aside by garbage collection
//! gc/GEN                      a collection waiting for backups to finish
//! ```
//!
//! - **Chunks** hold `chunk_size` bytes of the disk at an offset that is a
//!   multiple of `chunk_size` (a power of two, so aligned to the disk's
//!   blocks; the last one may be short). Their id is BLAKE3 of the content
//!   (keyed with a secret from the key file when encrypted: ids then say
//!   nothing about contents), so equal contents are stored once, across
//!   points and disks. Every read checks the content against the id.
//! - **Every object** but `config` is sealed ([`seal`]): zstd when that
//!   helps (samples tell, for large objects), then AES-256-GCM (encrypted repositories) or a BLAKE3 checksum,
//!   bound to the object's key.
//! - **A point's index** ([`index`]) lists every slot of the disk: a chunk
//!   id or "zeroes". It is complete: any point restores alone, and deleting
//!   one never touches what another needs. Point ids start with the UTC
//!   time the backup started (`20261201T000717.123Z-3fa9`), so they sort
//!   oldest first.
//! - **Crash safety** comes from ordering ([`writer`]): chunks are durable
//!   before the journal segment or index that names them; the index is
//!   written last and atomically, so a killed backup never appears as a
//!   point, and its rerun resumes from the journal.
//! - **Garbage collection** ([`gc`]) sets unreferenced chunks aside and
//!   deletes them once no backup that might have trusted them still runs.
//!
//! # Chunk size
//! 256 KiB by default (chosen per repository when it is created, a power of
//! two from 4 KiB to 16 MiB). Every chunk is one object, and on a local
//! file system each costs an inode, a rename and a few system calls
//! whatever its size (about 70 µs on the benchmark VM): small chunks make
//! full backups slow. Large ones make incrementals slow: a dirty block
//! rewrites its whole chunk (the rest read back from the parent point),
//! and the repository grows by whole chunks. Measured with
//! `proto-tests/bench/bench-backup.sh --chunk-size SIZE` (release build,
//! source qemu-nbd, medians, nbdcopy of the same export alongside):
//!
//! | chunk | full, 1 GiB data | full / nbdcopy speed | incr., 4 GiB data, 1% dirty | incr. / full | repo growth |
//! |---|---|---|---|---|---|
//! | 64 KiB | 2.84 s | 0.49× | 0.14 s | 1.7% | 2.2 MB |
//! | 256 KiB | 1.59 s | 0.69× | 0.10 s | 1.4% | 0.6 MB |
//! | 1 MiB | 1.54 s | 0.87× | 0.31 s | 4.2% | 124 MB |
//! | 4 MiB | 3.15 s | 0.33× | 0.90 s (1 GiB data) | 27% | |
//!
//! (The full column is on the 4 GiB image with 1 GiB of data, `--cases
//! full`; the incremental on a fully allocated one, `--data-mib 4096
//! --cases incr`, where 1% of the disk is 1% of the data: 164 random
//! 256 KiB writes of compressible patterns, hence the small growth. Full
//! backups swing 20-40% between runs on this VM. Measured before chunks
//! were written without a copy, which made all sizes faster alike.)
//! 256 KiB keeps most of 1 MiB's full-backup speed and 64 KiB's
//! incrementals. The price of small chunks is also the index: 33 bytes
//! per chunk per point (0.5 MB for a 4 GiB disk) and more objects, i.e.
//! more requests on S3; choose a larger `--chunk-size` for very large
//! disks.

pub mod backend;
mod error;
pub mod gc;
mod id;
pub mod index;
pub mod prune;
mod reader;
mod repo;
pub mod seal;
mod session;
pub mod verify;
pub mod writer;

pub use error::{Error, Result};
pub use gc::GcReport;
pub use id::{ChunkId, check_name, new_point_id, split_target};
pub use index::{PointIndex, PointMeta, PointNotes, PointStats, Slot};
pub use prune::{KeepPolicy, PruneReport};
pub use reader::PointReader;
pub use repo::{CreateOptions, DEFAULT_CHUNK_SIZE, PointRef, Repo, RepoConfig};
pub use seal::KeyFile;
pub use verify::{Problem, VerifyReport};
pub use writer::{BackupSpec, PointWriter};

#[cfg(test)]
mod power_cut_tests;
#[cfg(test)]
mod tests;
