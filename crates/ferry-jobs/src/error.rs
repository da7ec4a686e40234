use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{endpoint}: {source}")]
    Nbd {
        endpoint: String,
        #[source]
        source: nbd_client::Error,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Repo(#[from] ferry_repo::Error),
    /// A point and a live export disagree (verify against an export).
    #[error("{endpoint} differs from the backup at offset {offset}")]
    Differs { endpoint: String, offset: u64 },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
