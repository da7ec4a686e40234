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
//! 64 KiB by default (chosen per repository when it is created, a power of
//! two from 4 KiB to 16 MiB). It matches qemu's default bitmap granularity
//! and qcow2 cluster: a dirty 64 KiB block is one new chunk, with no
//! read-modify-write of a larger chunk. Measured on the 4 GiB image of
//! `proto-tests/bench/mk-image.py` (1 GiB of data) from qemu-nbd, release
//! build, then 1% of the disk changed (656 random 64 KiB writes) and an
//! incremental pulled with the bitmap:
//!
//! | chunk | full | objects | incremental | unchanged incr. | growth |
//! |---|---|---|---|---|---|
//! | 64 KiB | 5.9-12.4 s | 16634 | 0.35 s | 0.18 s | 0.6 MB |
//! | 256 KiB | 5.6-10.7 s | 4668 | 0.82 s | 0.16 s | 33.6 MB |
//! | 1 MiB | 5.6-12.7 s | 1613 | 1.77 s | 0.42 s | 157.7 MB |
//!
//! (Full backups swing with this shared machine's load. perf shows them
//! CPU-bound on its 2 cores rather than disk-bound: BLAKE3, zstd, and the
//! creation of one file per chunk; the pattern writes compress to almost
//! nothing, hence 64 KiB's small growth.)
//! The price of small chunks is the index: 33 bytes per chunk per point
//! (2 MB for a 4 GiB disk, 0.05% of the disk) and more objects, i.e. more
//! requests on S3; choose a larger `--chunk-size` for very large disks.

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
