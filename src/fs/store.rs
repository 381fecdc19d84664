//! The backing store: the bytes of every regular file, one file per inode under
//! `<data>/objects/`. Inode numbers never change, so renames and hard links never
//! touch it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::ids::Ino;

/// The object directory of one client.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the store under `data`.
    pub fn open(data: &Path) -> io::Result<Self> {
        let root = data.join("objects");
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    /// The folder holding every backing file.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `ino`'s bytes live. Fanned out over 256 folders.
    pub fn path(&self, ino: Ino) -> PathBuf {
        self.root
            .join(format!("{:02x}", ino.0 & 0xff))
            .join(ino.0.to_string())
    }

    /// Creates an empty backing file for a new node (replacing a stale one).
    pub fn create(&self, ino: Ino) -> io::Result<File> {
        let path = self.path(ino);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
        };
        match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                open()
            }
            r => r,
        }
    }

    /// Opens `ino`'s bytes for reading and writing. A file the catalog knows but
    /// whose bytes are missing (crash before the first write reached the disk) is
    /// recreated empty.
    pub fn open_rw(&self, ino: Ino) -> io::Result<File> {
        let path = self.path(ino);
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(%ino, "backing file missing; recreating it empty");
                self.create(ino)
            }
            r => r,
        }
    }

    /// Removes `ino`'s bytes.
    pub fn remove(&self, ino: Ino) {
        if let Err(e) = std::fs::remove_file(self.path(ino))
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(%ino, cause = ?e, "cannot remove backing file");
        }
    }

    /// Every inode that has a backing file.
    pub fn list(&self) -> io::Result<Vec<Ino>> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(&self.root)? {
            let dir = dir?;
            if !dir.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(dir.path())? {
                let f = f?;
                if let Some(ino) = f.file_name().to_str().and_then(|s| s.parse().ok()) {
                    out.push(Ino(ino));
                }
            }
        }
        Ok(out)
    }
}
