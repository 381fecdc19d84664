//! Errors of filesystem operations. The FUSE adapter turns them into an errno in
//! one place ([`FsError::errno`]) when it sends the reply.

use fuser::Errno;

use crate::catalog::CatalogError;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such file or directory.
    #[error("not found")]
    NotFound,
    /// The name is taken.
    #[error("already exists")]
    Exists,
    /// A directory was required.
    #[error("not a directory")]
    NotDir,
    /// A non-directory was required.
    #[error("is a directory")]
    IsDir,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// The operation would cross groups (each group is its own device).
    #[error("crosses groups")]
    CrossGroup,
    /// Not allowed here (e.g. files directly under a user folder).
    #[error("operation not permitted: {why}")]
    NotPermitted {
        /// The rule that forbids it.
        why: &'static str,
    },
    /// Invalid argument.
    #[error("invalid argument: {why}")]
    Invalid {
        /// What is invalid.
        why: &'static str,
    },
    /// A name component is too long.
    #[error("name too long")]
    NameTooLong,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoData,
    /// The caller's buffer is too small.
    #[error("result too large for buffer")]
    Range,
    /// Not supported by Brume.
    #[error("not supported")]
    NotSupported,
    /// The file is too large.
    #[error("file too large")]
    TooBig,
    /// Content that must come from the owner is not available (yet).
    #[error("content not available from the owner")]
    Unavailable,
    /// The kernel's handle does not exist.
    #[error("bad file handle")]
    BadHandle,
    /// The backing store failed.
    #[error("backing store: {0}")]
    Io(#[from] std::io::Error),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl FsError {
    /// The errno the kernel gets.
    pub fn errno(&self) -> Errno {
        match self {
            Self::NotFound => Errno::ENOENT,
            Self::Exists => Errno::EEXIST,
            Self::NotDir => Errno::ENOTDIR,
            Self::IsDir => Errno::EISDIR,
            Self::NotEmpty => Errno::ENOTEMPTY,
            Self::CrossGroup => Errno::EXDEV,
            Self::NotPermitted { .. } => Errno::EPERM,
            Self::Invalid { .. } => Errno::EINVAL,
            Self::NameTooLong => Errno::ENAMETOOLONG,
            Self::NoData => Errno::NO_XATTR,
            Self::Range => Errno::ERANGE,
            Self::NotSupported => Errno::ENOTSUP,
            Self::TooBig => Errno::EFBIG,
            Self::BadHandle => Errno::EBADF,
            Self::Unavailable => Errno::EIO,
            Self::Io(e) => e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO),
            Self::Catalog(_) => Errno::EIO,
        }
    }
}

/// Result of a filesystem operation.
pub type FsResult<T> = Result<T, FsError>;
