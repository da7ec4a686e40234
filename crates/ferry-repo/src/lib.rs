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
//!   helps, then AES-256-GCM (encrypted repositories) or a BLAKE3 checksum,
//!   bound to the object's key.
//! - **A point's index** ([`index`]) lists every slot of the disk: a chunk
//!   id or "zeroes". It is complete: any point restores alone, and deleting
//!   one never touches what another needs. Point ids start with the UTC
//!   time the backup started (`20261201T000717Z-3fa9`), so they sort
//!   oldest first.
//! - **Crash safety** comes from ordering ([`writer`]): chunks are durable
//!   before the journal segment or index that names them; the index is
//!   written last and atomically, so a killed backup never appears as a
//!   point, and its rerun resumes from the journal.
//! - **Garbage collection** ([`gc`]) sets unreferenced chunks aside and
//!   deletes them once no backup that might have trusted them still runs.
//!
//! # Chunk size
//! 256 KiB by default (chosen per repository when it is created). Smaller
//! chunks make incremental points cheaper (a dirty 64 KiB block rewrites
//! one chunk) and deduplicate better; larger ones mean fewer objects and
//! requests (an S3 PUT per chunk). Measured with
//! `proto-tests/bench/bench-backup.sh`: see the numbers there.

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
pub use id::{ChunkId, check_name, split_target};
pub use index::{PointIndex, PointMeta, PointStats, Slot};
pub use prune::{KeepPolicy, PruneReport};
pub use reader::PointReader;
pub use repo::{CreateOptions, DEFAULT_CHUNK_SIZE, PointRef, Repo, RepoConfig};
pub use seal::KeyFile;
pub use verify::{Problem, VerifyReport};
pub use writer::{BackupSpec, PointWriter};

#[cfg(test)]
mod tests;
