//! The backing store: the bytes of every regular file, one file per inode under
//! `<data>/objects/`, fanned out over 256 folders by the inode's low byte
//! (`objects/2a/42`). Inode numbers never change, so renames and hard links
//! never touch it.
//!
//! The objects folder is opened once, when the store is opened, and every
//! backing file is reached relative to that open folder (`openat`, `fstatat`,
//! `unlinkat`, `mkdirat`) by its two-part name, never by a path from `/`. So
//! the store depends only on the folder it opened: what is above it may be
//! renamed, moved or have its modes changed while Brume runs, and a file is
//! never created in a new store at the old path. The daemon does all of it
//! with its own credentials, whoever the caller is: ownership and permissions
//! are the catalog's, which the kernel checks on the mount
//! (`default_permissions`); backing files are the daemon's, mode 0600.
//!
//! A fan-out folder is made on the first create that needs it. A file the
//! catalog knows whose bytes are missing (a crash before they reached the
//! disk) is recreated empty when opened. Every descriptor is close-on-exec.
//!
//! [`Store::path`] remains for the one user that needs a path (the catalog
//! deletes a removed node's bytes by path once the removal is committed); it
//! names the objects folder where it is at the time of the call.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ids::Ino;

/// The object directory of one client.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Objects>,
}

#[derive(Debug)]
struct Objects {
    /// Where the objects folder was when opened (for messages).
    root: PathBuf,
    /// The objects folder, open for the store's lifetime.
    dir: OwnedFd,
}

/// Returns the result of a libc call that reports failure as -1 in errno.
fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The fan-out folder of `ino`.
fn fan_out(ino: Ino) -> String {
    format!("{:02x}", ino.0 & 0xff)
}

/// `ino`'s backing file relative to the objects folder.
fn name_of(ino: Ino) -> CString {
    CString::new(format!("{}/{}", fan_out(ino), ino.0)).expect("no NUL in a number")
}

impl Store {
    /// Opens (creating) the store under `data`.
    pub fn open(data: &Path) -> io::Result<Self> {
        let root = data.join("objects");
        std::fs::create_dir_all(&root)?;
        // std opens with O_CLOEXEC.
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&root)?;
        Ok(Self {
            inner: Arc::new(Objects {
                root,
                dir: dir.into(),
            }),
        })
    }

    /// Where the objects folder was when the store was opened (for messages).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn dir(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.inner.dir.as_fd()
    }

    /// A path to `ino`'s bytes through the objects folder as it is named now
    /// (it may have moved since the store was opened), for what can only take
    /// a path. Everything else goes through the open folder.
    pub fn path(&self, ino: Ino) -> PathBuf {
        let now = std::fs::read_link(format!("/proc/self/fd/{}", self.dir().as_raw_fd()))
            .ok()
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| self.inner.root.clone());
        now.join(fan_out(ino)).join(ino.0.to_string())
    }

    /// Opens `name` (relative to the objects folder) with `flags`.
    fn open_at(&self, name: &CStr, flags: libc::c_int) -> io::Result<File> {
        // SAFETY: openat(2) with a folder fd we own and a valid C string.
        let fd = cvt(unsafe {
            libc::openat(
                self.dir().as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: the fd was just opened and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Creates an empty backing file for a new node (replacing a stale one).
    pub fn create(&self, ino: Ino) -> io::Result<File> {
        let name = name_of(ino);
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC;
        match self.open_at(&name, flags) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = CString::new(fan_out(ino)).expect("no NUL in hex");
                // SAFETY: mkdirat(2) with a folder fd we own and a valid C string.
                let made =
                    cvt(unsafe { libc::mkdirat(self.dir().as_raw_fd(), dir.as_ptr(), 0o777) });
                match made {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
                self.open_at(&name, flags)
            }
            r => r,
        }
    }

    /// Opens `ino`'s bytes for reading and writing. A file the catalog knows but
    /// whose bytes are missing (crash before the first write reached the disk) is
    /// recreated empty.
    pub fn open_rw(&self, ino: Ino) -> io::Result<File> {
        match self.open_at(&name_of(ino), libc::O_RDWR) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(%ino, "backing file missing; recreating it empty");
                self.create(ino)
            }
            r => r,
        }
    }

    /// Opens `ino`'s bytes for reading only (`NotFound` if it has none).
    pub fn open_read(&self, ino: Ino) -> io::Result<File> {
        self.open_at(&name_of(ino), libc::O_RDONLY)
    }

    /// The status of `ino`'s backing file (`NotFound` if it has none).
    pub fn stat(&self, ino: Ino) -> io::Result<libc::stat> {
        let name = name_of(ino);
        // SAFETY: fstatat(2) fills the zeroed struct we own; the name is a
        // valid C string and the folder fd is ours.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::fstatat(self.dir().as_raw_fd(), name.as_ptr(), &mut st, 0) })?;
        Ok(st)
    }

    /// The status of the filesystem holding the store.
    pub fn statvfs(&self) -> io::Result<libc::statvfs> {
        // SAFETY: fstatvfs(2) fills the zeroed struct we own; the fd is ours.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::fstatvfs(self.dir().as_raw_fd(), &mut st) })?;
        Ok(st)
    }

    /// Removes `ino`'s bytes.
    pub fn remove(&self, ino: Ino) {
        let name = name_of(ino);
        // SAFETY: unlinkat(2) with a folder fd we own and a valid C string.
        let r = cvt(unsafe { libc::unlinkat(self.dir().as_raw_fd(), name.as_ptr(), 0) });
        if let Err(e) = r
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(%ino, cause = ?e, "cannot remove backing file");
        }
    }

    /// Every inode that has a backing file.
    pub fn list(&self) -> io::Result<Vec<Ino>> {
        // The open folder, through the kernel's link to it: no path above it
        // is looked up.
        let here = PathBuf::from(format!("/proc/self/fd/{}", self.dir().as_raw_fd()));
        let mut out = Vec::new();
        for low in 0..=0xffu64 {
            let entries = match std::fs::read_dir(here.join(fan_out(Ino(low)))) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                if let Some(ino) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
                    out.push(Ino(ino));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn files_are_fanned_out_and_listed() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        for ino in [1u64, 42, 256 + 42, 0xffff] {
            s.create(Ino(ino)).unwrap().write_all(b"x").unwrap();
        }
        assert!(d.path().join("objects/2a/42").is_file());
        assert!(d.path().join("objects/2a/298").is_file());
        assert!(d.path().join("objects/ff/65535").is_file());
        let mut all = s.list().unwrap();
        all.sort();
        assert_eq!(all, vec![Ino(1), Ino(42), Ino(298), Ino(0xffff)]);
        s.remove(Ino(42));
        s.remove(Ino(42));
        assert!(!d.path().join("objects/2a/42").exists());
        assert_eq!(s.list().unwrap().len(), 3);
    }

    #[test]
    fn backing_files_are_private_and_missing_ones_come_back_empty() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.create(Ino(7)).unwrap().write_all(b"abc").unwrap();
        let st = s.stat(Ino(7)).unwrap();
        assert_eq!((st.st_size, st.st_mode & 0o7777), (3, 0o600));
        let mode = std::fs::metadata(d.path().join("objects/07/7"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut text = String::new();
        s.open_read(Ino(7))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "abc");
        assert_eq!(
            s.open_read(Ino(8)).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(s.stat(Ino(8)).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(s.open_rw(Ino(8)).unwrap().metadata().unwrap().len(), 0);
        // Close-on-exec, like every descriptor of the daemon.
        let f = s.open_rw(Ino(7)).unwrap();
        // SAFETY: fcntl(F_GETFD) on an fd we hold.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn the_store_follows_its_folder_not_the_path_to_it() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().canonicalize().unwrap();
        let s = Store::open(&d.join("data")).unwrap();
        s.create(Ino(1)).unwrap().write_all(b"one").unwrap();
        std::fs::rename(d.join("data"), d.join("moved")).unwrap();
        s.create(Ino(2)).unwrap();
        assert_eq!(s.open_rw(Ino(1)).unwrap().metadata().unwrap().len(), 3);
        assert!(!d.join("data").exists());
        assert!(d.join("moved/objects/02/2").is_file());
        assert_eq!(s.path(Ino(1)), d.join("moved/objects/01/1"));
        s.remove(Ino(1));
        assert!(!d.join("moved/objects/01/1").exists());
        assert!(s.statvfs().unwrap().f_blocks > 0);
    }
}
