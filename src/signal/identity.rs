//! The client's ed25519 identity key: generated once, kept in `<data>/identity.key`
//! (32 raw secret bytes, mode 0600). Its public half is registered with the signaling
//! server on first connect and pinned by peers.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

/// File name of the identity key inside the client's data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Errors loading or creating the identity key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("identity key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The key file is not 32 bytes.
    #[error("identity key {path} is corrupt: {len} bytes instead of 32")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// Its size.
        len: usize,
    },
    /// The file can be read by other users.
    #[error("identity key {path} has mode {mode:o}; it must not be readable by others (chmod 600)")]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The system's random number generator failed.
    #[error("no randomness available to create an identity key: {reason}")]
    Random {
        /// What failed.
        reason: String,
    },
}

/// Loads `<data_dir>/identity.key`, creating it (and `data_dir`) if it does not exist.
pub fn load_or_create(data_dir: &Path) -> Result<SigningKey, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::File::open(&path) {
        Ok(mut file) => {
            let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Exposed { path, mode });
            }
            let mut bytes = Vec::with_capacity(32);
            (&mut file).take(33).read_to_end(&mut bytes).map_err(io)?;
            let secret: [u8; 32] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| IdentityError::Corrupt {
                        path: path.clone(),
                        len: bytes.len(),
                    })?;
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| IdentityError::Random {
                reason: e.to_string(),
            })?;
            // Written under a temporary name and renamed, so a crash never leaves a
            // truncated key behind, and two racing creators end with one key.
            let tmp = data_dir.join(format!(".{IDENTITY_FILE}.{}", std::process::id()));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(&secret).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Err(err) = std::fs::hard_link(&tmp, &path) {
                let _ = std::fs::remove_file(&tmp);
                if err.kind() == std::io::ErrorKind::AlreadyExists {
                    return load_or_create(data_dir);
                }
                return Err(io(err));
            }
            let _ = std::fs::remove_file(&tmp);
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(err) => Err(io(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let key = load_or_create(&data).unwrap();
        let path = data.join(IDENTITY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&data).unwrap().to_bytes(), key.to_bytes());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&data),
            Err(IdentityError::Exposed { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load_or_create(&data),
            Err(IdentityError::Corrupt { len: 5, .. })
        ));
    }
}
