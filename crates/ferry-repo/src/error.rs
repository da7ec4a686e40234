use std::path::PathBuf;

/// Why a repository operation failed. Callers branch on the variant: a
/// [`Corrupt`](Error::Corrupt) object is a storage fault to report, a
/// [`NoSuchPoint`](Error::NoSuchPoint) a user's typo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object store, {key}: {source}")]
    ObjectStore {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0}: no backup repository here")]
    NoRepository(String),
    #[error("{location}: {reason}")]
    BadLocation { location: String, reason: String },
    /// A stored object fails its checksum, tag or hash, or does not decode.
    #[error("{key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// An object the repository's structure says must exist does not.
    #[error("{0} is missing")]
    Missing(String),
    #[error("the repository is encrypted: give its --key-file")]
    KeyRequired,
    #[error("the key file does not open this repository")]
    WrongKey,
    #[error("the repository is not encrypted, but a key file was given")]
    NotEncrypted,
    #[error("the key file {} holds fewer than 32 bytes", .0.display())]
    ShortKey(PathBuf),
    #[error("invalid name {0:?}: use letters, digits, '.', '_' and '-'")]
    InvalidName(String),
    #[error("no point {0}")]
    NoSuchPoint(String),
    #[error("{0} matches more than one point")]
    AmbiguousPoint(String),
    #[error("disk {0} has no points")]
    NoPoints(String),
    /// The backup could not renew its session in time, so a concurrent
    /// prune may have taken it for dead: committing could name chunks that
    /// prune removed. Rerun the backup (it resumes).
    #[error("the backup session's lease lapsed (no heartbeat for {0} s); rerun to resume")]
    LeaseLapsed(u64),
    #[error("range {offset}+{len} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn corrupt(key: &str, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}
