use ferry_store::StoreError;

/// Why the daemon refused or failed an operation. The admin API maps each
/// kind to an HTTP status; callers branch on the variants.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A disk, snapshot or checkpoint name that is not allowed.
    #[error("{0}")]
    InvalidName(String),
    #[error("no disk '{}'", .0.escape_default())]
    NoSuchDisk(String),
    /// The disk is exported read-only: it has no snapshots or checkpoints.
    #[error("disk '{0}' is exported read-only: it has no snapshots or checkpoints")]
    ReadOnlyDisk(String),
    /// No such snapshot or checkpoint.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    /// NBD clients have it open.
    #[error("{0}")]
    Busy(String),
    /// An export cannot be set up as configured.
    #[error("{0}")]
    Config(String),
    /// A reload refused the new configuration; the old one keeps running.
    #[error("{0}")]
    Refused(String),
    /// I/O or damaged state.
    #[error(transparent)]
    Storage(StoreError),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidName(m) => ServiceError::InvalidName(m),
            StoreError::NotFound(m) => ServiceError::NotFound(m),
            StoreError::Exists(m) => ServiceError::Exists(m),
            other => ServiceError::Storage(other),
        }
    }
}
