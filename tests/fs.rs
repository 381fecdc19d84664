//! Filesystem integration tests: a real `brume mount` per test, ordinary syscalls
//! against it, and checks of what the catalog recorded.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use crate::harness::{Client, cpath, errno, sh, wait_until};

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn err_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().expect("os error"),
    }
}

#[test]
fn layout_root_lists_me_and_wsserver_and_groups_are_folders() {
    let mut c = Client::new("alice");
    c.mount();
    let mut names: Vec<String> = fs::read_dir(&c.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![".wsserver.json", "alice"]);
    let ws: serde_json::Value =
        serde_json::from_slice(&read(&c.mnt.join(".wsserver.json"))).unwrap();
    assert_eq!(ws["username"], "alice");
    // Read-only, even for root.
    assert_eq!(
        err_of(
            OpenOptions::new()
                .write(true)
                .open(c.mnt.join(".wsserver.json"))
        ),
        libc::EACCES
    );
    // Files cannot live directly in the root or in a user folder.
    assert_eq!(err_of(File::create(c.mnt.join("x"))), libc::EPERM);
    assert_eq!(err_of(File::create(c.mnt.join("alice/x"))), libc::EPERM);
    // Groups are created by mkdir, named safely, and removed when empty.
    fs::create_dir(c.mnt.join("alice/photos")).unwrap();
    assert_eq!(
        err_of(fs::create_dir(c.mnt.join("alice/.hidden"))),
        libc::EINVAL
    );
    fs::write(c.mnt.join("alice/photos/a"), b"x").unwrap();
    assert_eq!(
        err_of(fs::remove_dir(c.mnt.join("alice/photos"))),
        libc::ENOTEMPTY
    );
    fs::remove_file(c.mnt.join("alice/photos/a")).unwrap();
    fs::remove_dir(c.mnt.join("alice/photos")).unwrap();
    assert!(!c.mnt.join("alice/photos").exists());
    // My own folder stays.
    assert_eq!(err_of(fs::remove_dir(c.mnt.join("alice"))), libc::EPERM);
    let groups: i64 = c
        .db()
        .query_row("SELECT COUNT(*) FROM groups", [], |r| r.get(0))
        .unwrap();
    c.unmount();
    assert_eq!(groups, 0, "removed group still in the catalog");
}

fn file_ops(passthrough: bool) {
    let (c, g) = Client::with_group(passthrough);
    let p = g.join("f");
    fs::write(&p, b"hello").unwrap();
    assert_eq!(read(&p), b"hello");
    // Append.
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(read(&p), b"hello world");
    assert_eq!(fs::metadata(&p).unwrap().len(), 11);
    // Overwrite in the middle, read back through another handle.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all_at(b"HELLO", 0).unwrap();
    let mut buf = [0u8; 11];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"HELLO world");
    // Truncate shorter and longer.
    f.set_len(3).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 3);
    f.set_len(10).unwrap();
    assert_eq!(read(&p), b"HEL\0\0\0\0\0\0\0");
    drop(f);
    // O_TRUNC and O_EXCL.
    fs::write(&p, b"new").unwrap();
    assert_eq!(read(&p), b"new");
    let e = OpenOptions::new().write(true).create_new(true).open(&p);
    assert_eq!(err_of(e), libc::EEXIST);
    // A large file written and read in pieces.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(g.join("big"), &big).unwrap();
    assert_eq!(read(&g.join("big")), big);
    let mut f = File::open(g.join("big")).unwrap();
    f.seek(SeekFrom::Start(1_000_001)).unwrap();
    let mut part = vec![0u8; 4096];
    f.read_exact(&mut part).unwrap();
    assert_eq!(&part[..], &big[1_000_001..1_000_001 + 4096]);
    // Sizes reported while a writer is still open.
    let mut w = File::create(g.join("growing")).unwrap();
    w.write_all(&[1u8; 5000]).unwrap();
    assert_eq!(fs::metadata(g.join("growing")).unwrap().len(), 5000);
    drop(w);
    drop(c);
}

#[test]
fn files_read_write_append_truncate_excl_with_passthrough() {
    file_ops(true);
}

#[test]
fn files_read_write_append_truncate_excl_without_passthrough() {
    file_ops(false);
}

#[test]
fn unlinked_open_file_stays_readable_until_closed() {
    let (c, g) = Client::with_group(true);
    let p = g.join("f");
    fs::write(&p, b"still here").unwrap();
    let mut f = File::open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    drop(f);
    // Its bytes are gone from the backing store once closed.
    let objects = c.data.join("objects");
    wait_until(Duration::from_secs(5), "backing file removal", || {
        walk_files(&objects) == 0
    });
}

fn walk_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walk_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

#[test]
fn rename_files_and_directories_and_across_groups() {
    let (c, g) = Client::with_group(true);
    fs::write(g.join("a"), b"A").unwrap();
    fs::write(g.join("b"), b"B").unwrap();
    // Over an existing file.
    fs::rename(g.join("a"), g.join("b")).unwrap();
    assert_eq!(read(&g.join("b")), b"A");
    assert!(!g.join("a").exists());
    // Directories, with content, into another directory.
    fs::create_dir_all(g.join("d1/sub")).unwrap();
    fs::write(g.join("d1/sub/x"), b"X").unwrap();
    fs::create_dir(g.join("d2")).unwrap();
    fs::rename(g.join("d1"), g.join("d2/moved")).unwrap();
    assert_eq!(read(&g.join("d2/moved/sub/x")), b"X");
    assert_eq!(fs::metadata(g.join("d2")).unwrap().nlink(), 3);
    // Into itself: EINVAL. Over a non-empty directory: ENOTEMPTY.
    assert_eq!(
        err_of(fs::rename(g.join("d2"), g.join("d2/moved/sub/in"))),
        libc::EINVAL
    );
    fs::create_dir(g.join("d3")).unwrap();
    assert_eq!(
        err_of(fs::rename(g.join("d3"), g.join("d2"))),
        libc::ENOTEMPTY
    );
    // Across groups: EXDEV (mv falls back to copying).
    fs::create_dir(c.mnt.join("alice/other")).unwrap();
    assert_eq!(
        err_of(fs::rename(g.join("b"), c.mnt.join("alice/other/b"))),
        libc::EXDEV
    );
    // renameat2 flags.
    fs::write(g.join("p"), b"P").unwrap();
    fs::write(g.join("q"), b"Q").unwrap();
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cpath(&g.join("p")).as_ptr(),
            libc::AT_FDCWD,
            cpath(&g.join("q")).as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!((rc, errno()), (-1, libc::EEXIST));
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cpath(&g.join("p")).as_ptr(),
            libc::AT_FDCWD,
            cpath(&g.join("q")).as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(rc, 0);
    assert_eq!(read(&g.join("p")), b"Q");
    assert_eq!(read(&g.join("q")), b"P");
}

#[test]
fn links_symlinks_and_special_files() {
    let (_c, g) = Client::with_group(true);
    fs::write(g.join("f"), b"data").unwrap();
    fs::hard_link(g.join("f"), g.join("h")).unwrap();
    assert_eq!(fs::metadata(g.join("f")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(g.join("f")).unwrap().ino(),
        fs::metadata(g.join("h")).unwrap().ino()
    );
    fs::write(g.join("h"), b"changed").unwrap();
    assert_eq!(read(&g.join("f")), b"changed");
    fs::remove_file(g.join("f")).unwrap();
    assert_eq!(fs::metadata(g.join("h")).unwrap().nlink(), 1);
    std::os::unix::fs::symlink("h", g.join("s")).unwrap();
    assert_eq!(fs::read_link(g.join("s")).unwrap().to_str(), Some("h"));
    assert_eq!(read(&g.join("s")), b"changed");
    assert!(
        fs::symlink_metadata(g.join("s"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // A fifo works as a fifo.
    let fifo = g.join("fifo");
    assert_eq!(unsafe { libc::mkfifo(cpath(&fifo).as_ptr(), 0o644) }, 0);
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || fs::read(fifo).unwrap()
    });
    fs::write(&fifo, b"through the pipe").unwrap();
    assert_eq!(reader.join().unwrap(), b"through the pipe");
    // A unix socket node.
    let sock = g.join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &fs::symlink_metadata(&sock).unwrap().file_type()
    ));
    // Hard links across groups: EXDEV.
    let other = g.parent().unwrap().join("other");
    fs::create_dir(&other).unwrap();
    assert_eq!(
        err_of(fs::hard_link(g.join("h"), other.join("h"))),
        libc::EXDEV
    );
}

#[test]
fn chmod_chown_utimens_statfs() {
    let (_c, g) = Client::with_group(true);
    let p = g.join("f");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4751);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    let f = File::options().write(true).open(&p).unwrap();
    let t = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    drop(f);
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!(m.atime(), 1_000_000_000);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cpath(&g).as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_namemax == 255);
}

/// The daemon reaches its backing files through the directory it opened at
/// mount, not by their paths: the data directory moved away while mounted
/// changes nothing for the files (old or new, read, written, hashed, statfs),
/// and no new store appears at the old path.
#[test]
fn files_keep_their_bytes_when_the_data_directory_moves_while_mounted() {
    let (mut c, g) = Client::with_group(true);
    fs::write(g.join("before"), b"one").unwrap();
    let moved = c.dir.path().join("moved-data");
    fs::rename(&c.data, &moved).unwrap();
    fs::write(g.join("after"), b"two").unwrap();
    OpenOptions::new()
        .append(true)
        .open(g.join("before"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_eq!(read(&g.join("before")), b"one+");
    assert_eq!(read(&g.join("after")), b"two");
    fs::write(g.join("gone"), b"x").unwrap();
    let gone = fs::metadata(g.join("gone")).unwrap().ino();
    let backing = moved.join(format!("objects/{:02x}/{gone}", gone & 0xff));
    assert!(backing.is_file());
    fs::remove_file(g.join("gone")).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the removed file's bytes to go",
        || !backing.exists(),
    );
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cpath(&g).as_ptr(), &mut st) }, 0);
    let ino = fs::metadata(g.join("after")).unwrap().ino() as i64;
    let db = rusqlite::Connection::open_with_flags(
        moved.join("catalog.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let hashes = || -> Vec<Vec<u8>> {
        let mut q = db
            .prepare("SELECT hash FROM blocks WHERE ino = ?1 ORDER BY idx")
            .unwrap();
        q.query_map([ino], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    wait_until(
        Duration::from_secs(10),
        "the new file's block hashes",
        || hashes() == block_hashes(b"two"),
    );
    drop(db);
    assert!(
        !c.data.exists(),
        "a store was made at the data directory's old path"
    );
    // Back where the configuration says, for the next mount: all there.
    fs::rename(&moved, &c.data).unwrap();
    c.remount();
    assert_eq!(read(&g.join("before")), b"one+");
    assert_eq!(read(&g.join("after")), b"two");
    assert!(!g.join("gone").exists());
}

/// Runs `script` with `sh` in `dir` as nobody (uid and gid 65534).
fn sh_as_nobody(dir: &Path, script: &str) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{script}` as nobody failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes, truncates and changes of owner drop setuid and setgid exactly as the
/// Linux VFS does on a local filesystem, with and without passthrough (the
/// daemon applies them itself: the kernel leaves it to the filesystem).
fn privileges_dropped(passthrough: bool) {
    let (c, g) = Client::with_group(passthrough);
    // The test's temporary directory is private; nobody must reach the mount.
    fs::set_permissions(c.mnt.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&g, fs::Permissions::from_mode(0o777)).unwrap();
    let make = |name: &str, mode: u32, gid: u32| {
        let p = g.join(name);
        fs::write(&p, b"hello").unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(gid)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let mode = |name: &str| fs::metadata(g.join(name)).unwrap().mode() & 0o7777;
    // By an unprivileged process.
    let cases: &[(&str, u32, u32, &str, u32)] = &[
        ("w-suid", 0o4777, 65534, "printf x >> w-suid", 0o777),
        ("w-sgid", 0o2777, 65534, "printf x >> w-sgid", 0o777),
        ("w-sgid-nx", 0o2767, 65534, "printf x >> w-sgid-nx", 0o2767),
        (
            "w-sgid-nx-other",
            0o2767,
            0,
            "printf x >> w-sgid-nx-other",
            0o767,
        ),
        ("truncate", 0o4777, 65534, "truncate -s 2 truncate", 0o777),
        ("otrunc", 0o6777, 65534, ": > otrunc", 0o777),
        (
            "fallocate",
            0o4777,
            65534,
            "fallocate -l 100 fallocate",
            0o777,
        ),
        (
            "chmod-while-open",
            0o777,
            65534,
            "exec 3>> chmod-while-open; printf 1 >&3; chmod 4777 chmod-while-open; printf 2 >&3",
            0o777,
        ),
    ];
    for &(name, before, gid, script, after) in cases {
        make(name, before, gid);
        sh_as_nobody(&g, script);
        assert_eq!(mode(name), after, "{name}: `{script}` from {before:o}");
    }
    // By root, which keeps them on write and truncate.
    let p = make("r-write", 0o6777, 65534);
    fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(mode("r-write"), 0o6777);
    let p = make("r-truncate", 0o6777, 65534);
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(1)
        .unwrap();
    assert_eq!(mode("r-truncate"), 0o6777);
    let p = make("r-chown", 0o6777, 65534);
    std::os::unix::fs::chown(&p, Some(65533), None).unwrap();
    assert_eq!(mode("r-chown"), 0o777);
    let p = make("r-chown-nx", 0o6767, 65534);
    std::os::unix::fs::chown(&p, Some(65533), None).unwrap();
    assert_eq!(mode("r-chown-nx"), 0o2767);
    let p = make("r-chown-none", 0o6777, 65534);
    std::os::unix::fs::chown(&p, None, None).unwrap();
    assert_eq!(mode("r-chown-none"), 0o777);
    let p = make("r-utime", 0o6777, 65534);
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
    File::open(&p).unwrap().set_modified(t).unwrap();
    assert_eq!(mode("r-utime"), 0o6777);
    let d = g.join("dir");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o2775)).unwrap();
    std::os::unix::fs::chown(&d, Some(65533), None).unwrap();
    assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, 0o2775);
}

#[test]
fn setuid_and_setgid_are_dropped_as_linux_does_with_passthrough() {
    privileges_dropped(true);
}

#[test]
fn setuid_and_setgid_are_dropped_as_linux_does_without_passthrough() {
    privileges_dropped(false);
}

/// The CPUs each FUSE worker thread of daemon `pid` may run on.
fn worker_cpus(pid: u32) -> Vec<String> {
    let mut cpus = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("fuser-") {
            continue;
        }
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            cpus.push(l.trim().to_owned());
        }
    }
    cpus.sort();
    cpus
}

/// Keeps four threads looking up names in `dir` until `stop` is set.
fn stat_load(dir: &Path, stop: &std::sync::atomic::AtomicBool) {
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::metadata(dir.join("missing"));
                }
            });
        }
    });
}

/// Two CPUs this test may use, on which a daemon then runs: it starts one
/// worker per CPU and pins them, whatever the machine's count.
fn two_cpus() -> Vec<usize> {
    let cpus = crate::harness::allowed_cpus();
    assert!(
        cpus.len() >= 2,
        "this test needs 2 CPUs to pin workers on; it may use only {cpus:?}"
    );
    cpus[..2].to_vec()
}

/// The CPUs daemon `pid`'s main thread may run on, as `/proc` lists them.
fn process_cpus(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|l| l.trim().to_owned())
        })
        .unwrap()
}

/// With as many workers as CPUs, each worker pins itself to a CPU of its own
/// when it first serves a request; with `pin_threads = false` they are left
/// to the scheduler.
#[test]
fn fuse_workers_are_pinned_one_per_cpu_unless_disabled() {
    let cpus = two_cpus();
    for pin in [true, false] {
        let mut c = Client::new("alice");
        c.cpus = Some(cpus.clone());
        // Other work on the machine must not unpin the workers during the test.
        let mut conf = fs::read_to_string(&c.config).unwrap();
        conf.push_str(&format!(
            "[fs]\npin_threads = {pin}\nbusy_cpu_us = 1000000000\n"
        ));
        fs::write(&c.config, conf).unwrap();
        c.mount();
        let pid = c.pid().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let root = c.mnt.join("alice");
        std::thread::scope(|s| {
            s.spawn(|| stat_load(&root, &stop));
            // Stops the load even when an assertion below fails.
            struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _stop = Stop(&stop);
            if pin {
                let want: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
                wait_until(Duration::from_secs(20), "every worker pinned", || {
                    worker_cpus(pid) == want
                });
            } else {
                for _ in 0..2000 {
                    let _ = fs::metadata(root.join("other"));
                }
                assert_eq!(worker_cpus(pid), vec![process_cpus(pid); cpus.len()]);
            }
        });
    }
}

/// A worker pinned to a CPU that another program keeps busy unpins itself, and
/// goes back to its CPU once that is free again. The other program runs at a
/// real-time priority, so the worker waits on its CPU far longer than anything
/// else on the machine makes it wait (the limit is 2 ms per request here).
#[test]
fn a_fuse_worker_leaves_a_busy_cpu_and_comes_back() {
    let cpus = two_cpus();
    let mut c = Client::new("alice");
    c.cpus = Some(cpus.clone());
    let mut conf = fs::read_to_string(&c.config).unwrap();
    conf.push_str("[fs]\nbusy_cpu_us = 2000\n");
    fs::write(&c.config, conf).unwrap();
    c.mount();
    let pid = c.pid().unwrap();
    let root = c.mnt.join("alice");
    let pinned: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let busy = std::sync::atomic::AtomicBool::new(true);
    let hog = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        s.spawn(|| stat_load(&root, &stop));
        // Another program's work on the first CPU, until told to stop.
        s.spawn(|| {
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(cpus[0], &mut set) };
            assert_eq!(
                unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) },
                0
            );
            while !hog.load(std::sync::atomic::Ordering::Relaxed)
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                std::thread::yield_now();
            }
            // SCHED_FIFO: ahead of every ordinary thread on its CPU.
            let param = libc::sched_param { sched_priority: 1 };
            assert_eq!(
                unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) },
                0,
                "real-time priority: {}",
                std::io::Error::last_os_error()
            );
            // Spins 20 ms, then sleeps 1 ms: the worker, when it runs, gets to
            // unpin itself.
            while busy.load(std::sync::atomic::Ordering::Relaxed)
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let _stop = Stop(&stop);
        wait_until(Duration::from_secs(30), "every worker pinned", || {
            worker_cpus(pid) == pinned
        });
        hog.store(true, std::sync::atomic::Ordering::Relaxed);
        wait_until(
            Duration::from_secs(30),
            "the worker of the busy CPU unpinned",
            || !worker_cpus(pid).contains(&pinned[0]),
        );
        busy.store(false, std::sync::atomic::Ordering::Relaxed);
        wait_until(Duration::from_secs(30), "every worker pinned again", || {
            worker_cpus(pid) == pinned
        });
    });
}

#[test]
fn extended_attributes_are_stored_with_correct_errors() {
    let (mut c, g) = Client::with_group(true);
    let p = g.join("f");
    fs::write(&p, b"x").unwrap();
    let set = |name: &str, val: &[u8], flags: i32| unsafe {
        libc::setxattr(
            cpath(&p).as_ptr(),
            std::ffi::CString::new(name).unwrap().as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    };
    assert_eq!(set("user.color", b"blue", 0), 0);
    assert_eq!(
        (set("user.color", b"red", libc::XATTR_CREATE), errno()),
        (-1, libc::EEXIST)
    );
    assert_eq!(
        (set("user.none", b"x", libc::XATTR_REPLACE), errno()),
        (-1, libc::ENODATA)
    );
    let get = |name: &str| -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; 256];
        let n = unsafe {
            libc::getxattr(
                cpath(&p).as_ptr(),
                std::ffi::CString::new(name).unwrap().as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(errno());
        }
        buf.truncate(n as usize);
        Ok(buf)
    };
    assert_eq!(get("user.color"), Ok(b"blue".to_vec()));
    assert_eq!(get("user.missing"), Err(libc::ENODATA));
    // A too-small buffer: ERANGE.
    let mut tiny = [0u8; 2];
    let n = unsafe {
        libc::getxattr(
            cpath(&p).as_ptr(),
            c"user.color".as_ptr(),
            tiny.as_mut_ptr().cast(),
            tiny.len(),
        )
    };
    assert_eq!((n, errno()), (-1, libc::ERANGE));
    let mut list = vec![0u8; 256];
    let n = unsafe { libc::listxattr(cpath(&p).as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert_eq!(&list[..n as usize], b"user.color\0");
    // Namespaces Brume does not store are refused as unsupported.
    assert_eq!(
        (set("system.brume", b"xx", 0), errno()),
        (-1, libc::EOPNOTSUPP)
    );
    c.remount();
    assert_eq!(get("user.color"), Ok(b"blue".to_vec()));
    assert_eq!(
        unsafe { libc::removexattr(cpath(&p).as_ptr(), c"user.color".as_ptr()) },
        0
    );
    assert_eq!(get("user.color"), Err(libc::ENODATA));
}

#[test]
fn posix_and_flock_locks_exclude_other_processes() {
    let (_c, g) = Client::with_group(true);
    let p = g.join("lock");
    fs::write(&p, b"x").unwrap();
    let f = File::open(&p).unwrap();
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    // Another open file description cannot take it.
    let f2 = File::open(&p).unwrap();
    let rc = unsafe { libc::flock(f2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!((rc, errno()), (-1, libc::EWOULDBLOCK));
    drop(f);
    assert_eq!(
        unsafe { libc::flock(f2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    // POSIX record locks: a child process sees our write lock.
    let out = sh(
        &g,
        "python3 -c '
import fcntl, os, sys, time
f = open(\"lock\", \"r+\")
fcntl.lockf(f, fcntl.LOCK_EX)
pid = os.fork()
if pid == 0:
    g = open(\"lock\", \"r+\")
    try:
        fcntl.lockf(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os._exit(1)
    except OSError:
        os._exit(0)
_, st = os.waitpid(pid, 0)
print(\"blocked\" if os.WEXITSTATUS(st) == 0 else \"not blocked\")
'",
    );
    assert_eq!(out.trim(), "blocked");
}

#[test]
fn mmap_reads_and_writes_reach_the_file() {
    for passthrough in [true, false] {
        let (_c, g) = Client::with_group(passthrough);
        let p = g.join("m");
        fs::write(&p, vec![b'a'; 8192]).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED, "mmap failed: {}", errno());
            let s = std::slice::from_raw_parts_mut(ptr as *mut u8, 8192);
            assert_eq!(s[100], b'a');
            s[4096..4101].copy_from_slice(b"HELLO");
            assert_eq!(libc::msync(ptr, 8192, libc::MS_SYNC), 0);
            libc::munmap(ptr, 8192);
        }
        drop(f);
        let data = read(&p);
        assert_eq!(&data[4096..4101], b"HELLO", "passthrough={passthrough}");
    }
}

#[test]
fn fallocate_fsync_and_fsyncdir() {
    let (_c, g) = Client::with_group(true);
    let f = File::create(g.join("f")).unwrap();
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            0,
            4096,
        )
    };
    assert_eq!(rc, 0);
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let d = File::open(&g).unwrap();
    d.sync_all().unwrap();
}

#[test]
fn everything_survives_unmount_and_remount() {
    let (mut c, g) = Client::with_group(true);
    fs::create_dir_all(g.join("a/b")).unwrap();
    fs::write(g.join("a/b/file"), b"persist me").unwrap();
    fs::hard_link(g.join("a/b/file"), g.join("hl")).unwrap();
    std::os::unix::fs::symlink("a/b/file", g.join("sl")).unwrap();
    fs::set_permissions(g.join("a"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(g.join(".members"), b"bob\n# comment\ncarol\n").unwrap();
    let ino = fs::metadata(g.join("hl")).unwrap().ino();
    c.remount();
    assert_eq!(read(&g.join("a/b/file")), b"persist me");
    assert_eq!(fs::metadata(g.join("hl")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(g.join("hl")).unwrap().ino(), ino);
    assert_eq!(
        fs::read_link(g.join("sl")).unwrap().to_str(),
        Some("a/b/file")
    );
    assert_eq!(fs::metadata(g.join("a")).unwrap().mode() & 0o7777, 0o700);
    let out = c.brume(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["groups"][0]["name"], "g");
    assert_eq!(
        status["groups"][0]["members"],
        serde_json::json!(["bob", "carol"])
    );
    assert_eq!(status["groups"][0]["files"], 2);
    assert!(status["mount"]["pid"].as_u64().is_some());
}

/// Everything that returned before a clean unmount is in the catalog when the
/// daemon has exited, block hashes of files closed a moment before included,
/// and the daemon logs no lost write (the harness's `unmount` checks its log).
#[test]
fn a_clean_unmount_right_after_many_operations_records_them_all() {
    let (mut c, g) = Client::with_group(true);
    let body = |i: usize| -> Vec<u8> {
        // Some files of several blocks, so that hashing is still under way at
        // the unmount.
        let len = if i % 10 == 0 { 3 << 20 } else { 100 + i * 37 };
        (0..len).map(|j| ((i * 31 + j / 7) % 251) as u8).collect()
    };
    let mut expect: Vec<(String, Vec<u8>)> = Vec::new();
    fs::create_dir(g.join("d")).unwrap();
    for i in 0..120 {
        let name = format!("d/f{i}");
        fs::write(g.join(&name), body(i)).unwrap();
        expect.push((name, body(i)));
    }
    // Renames, removals, modes, links and truncations among them.
    for i in (0..120).step_by(7) {
        let (from, to) = (format!("d/f{i}"), format!("r{i}"));
        fs::rename(g.join(&from), g.join(&to)).unwrap();
        expect.iter_mut().find(|e| e.0 == from).unwrap().0 = to;
    }
    for i in (3..120).step_by(11) {
        let name = format!("d/f{i}");
        if expect.iter().any(|e| e.0 == name) {
            fs::remove_file(g.join(&name)).unwrap();
            expect.retain(|e| e.0 != name);
        }
    }
    for i in (5..120).step_by(13) {
        let name = format!("d/f{i}");
        if let Some(e) = expect.iter_mut().find(|e| e.0 == name) {
            File::options()
                .write(true)
                .open(g.join(&name))
                .unwrap()
                .set_len(50)
                .unwrap();
            e.1.truncate(50);
        }
    }
    fs::set_permissions(g.join("d/f1"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("d/f1", g.join("sl")).unwrap();
    fs::create_dir_all(g.join("x/y/z")).unwrap();
    fs::write(g.join(".members"), b"bob\n").unwrap();
    // The last writes, right before the unmount.
    for i in 120..140 {
        let name = format!("late{i}");
        fs::write(g.join(&name), body(i)).unwrap();
        expect.push((name, body(i)));
    }
    let inos: Vec<i64> = expect
        .iter()
        .map(|(name, _)| fs::metadata(g.join(name)).unwrap().ino() as i64)
        .collect();
    c.unmount();

    // The catalog as the daemon left it, before a new mount repairs anything.
    for ((name, data), ino) in expect.iter().zip(&inos) {
        let size: i64 = c
            .db()
            .query_row("SELECT size FROM nodes WHERE ino = ?1", [ino], |r| r.get(0))
            .unwrap();
        assert_eq!(size as usize, data.len(), "{name}: size in the catalog");
        assert_eq!(
            catalog_hashes(&c, *ino),
            block_hashes(data),
            "{name}: block hashes in the catalog"
        );
    }
    c.mount();
    for (name, data) in &expect {
        assert_eq!(&read(&g.join(name)), data, "{name} after remount");
    }
    assert!(!g.join("d/f3").exists() && !g.join("d/f0").exists());
    assert_eq!(fs::metadata(g.join("d/f1")).unwrap().mode() & 0o777, 0o640);
    assert_eq!(fs::read_link(g.join("sl")).unwrap(), Path::new("d/f1"));
    assert!(g.join("x/y/z").is_dir());
    let members: String = c
        .db()
        .query_row("SELECT group_concat(user) FROM members", [], |r| r.get(0))
        .unwrap();
    assert_eq!(members, "bob");
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mut c, g) = Client::with_group(true);
        fs::write(g.join("f"), b"x").unwrap();
        let status = c.signal(sig);
        assert!(
            status.success(),
            "daemon exit status {status} after signal {sig}"
        );
        assert!(!crate::harness::is_mounted(&c.mnt));
        c.mount();
        assert_eq!(read(&g.join("f")), b"x");
    }
}

#[test]
fn kill9_keeps_every_fsynced_file_and_the_catalog_intact() {
    let (mut c, g) = Client::with_group(true);
    let mut ledger = Vec::new();
    for i in 0..200u32 {
        let p = g.join(format!("f{i}"));
        let body = format!("file {i} ").repeat(1 + (i as usize * 37) % 500);
        let mut f = File::create(&p).unwrap();
        f.write_all(body.as_bytes()).unwrap();
        if i % 3 == 0 {
            f.sync_all().unwrap();
            ledger.push((p, body));
        }
        // Unsynced files are allowed to be lost, never to be corrupt.
    }
    fs::create_dir(g.join("dir")).unwrap();
    File::open(&g).unwrap().sync_all().unwrap();
    assert!(!ledger.is_empty());
    c.kill9();
    c.mount();
    for (p, body) in &ledger {
        assert_eq!(read(p), body.as_bytes(), "{} lost", p.display());
    }
    assert!(g.join("dir").is_dir());
    let ok: String = c
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn every_change_appends_to_the_log_and_bumps_the_version() {
    let (mut c, g) = Client::with_group(false);
    fs::write(g.join("f"), b"one").unwrap();
    // One entry per writer's release: while the first close's RELEASE (which the
    // kernel sends without waiting) is still on its way, a second open shares the
    // first's record and both writes make one entry. Wait for it to be logged.
    let db = c.db();
    wait_until(Duration::from_secs(30), "the first write logged", || {
        db.query_row("SELECT COUNT(*) FROM changes WHERE op = 'write'", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
            == 1
    });
    drop(db);
    let f = OpenOptions::new().write(true).open(g.join("f")).unwrap();
    f.write_all_at(b"XY", 1).unwrap();
    // The close's RELEASE may reach the daemon after the rename; the write is
    // still logged first.
    drop(f);
    fs::rename(g.join("f"), g.join("f2")).unwrap();
    fs::set_permissions(g.join("f2"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(g.join("d")).unwrap();
    std::os::unix::fs::symlink("f2", g.join("s")).unwrap();
    fs::hard_link(g.join("f2"), g.join("l")).unwrap();
    fs::remove_file(g.join("l")).unwrap();
    fs::remove_dir(g.join("d")).unwrap();
    c.unmount();
    let db = c.db();
    let mut q = db
        .prepare("SELECT seq, op, ranges FROM changes ORDER BY seq")
        .unwrap();
    let log: Vec<(i64, String, Option<String>)> = q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let ops: Vec<&str> = log.iter().map(|l| l.1.as_str()).collect();
    // The group root's own creation, then each change in order.
    assert_eq!(
        ops,
        vec![
            "create", "create", "write", "write", "rename", "setattr", "create", "create", "link",
            "remove", "remove"
        ]
    );
    let seqs: Vec<i64> = log.iter().map(|l| l.0).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // The in-place edit recorded exactly the bytes it touched.
    assert_eq!(log[3].2.as_deref(), Some("1-3"));
    // The node's version is the position of its last change.
    let (version, last): (i64, i64) = db
        .query_row(
            "SELECT n.version, (SELECT MAX(seq) FROM changes c WHERE c.ino = n.ino) \
             FROM nodes n JOIN dirents d ON d.ino = n.ino WHERE d.name = CAST('f2' AS BLOB)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(version, last);
}

/// The BLAKE3 hash of each block of `data`.
fn block_hashes(data: &[u8]) -> Vec<Vec<u8>> {
    data.chunks(brume::blocks::BLOCK_SIZE as usize)
        .map(|b| blake3::hash(b).as_bytes().to_vec())
        .collect()
}

/// The block hashes the catalog of `c` has for `ino`.
fn catalog_hashes(c: &Client, ino: i64) -> Vec<Vec<u8>> {
    let db = c.db();
    let mut q = db
        .prepare("SELECT hash FROM blocks WHERE ino = ?1 ORDER BY idx")
        .unwrap();
    q.query_map([ino], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[test]
fn block_hashes_are_computed_after_close() {
    let (c, g) = Client::with_group(true);
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(g.join("f"), &data).unwrap();
    let ino = fs::metadata(g.join("f")).unwrap().ino() as i64;
    let expect = block_hashes(&data);
    wait_until(Duration::from_secs(10), "block hashes", || {
        catalog_hashes(&c, ino) == expect
    });
}

/// An in-place write through passthrough that a crash cut short (the file was
/// never closed) keeps its bytes, and the next mount records them as a new
/// version with their hashes, so that members can fetch them.
#[test]
fn an_in_place_edit_cut_short_by_a_crash_becomes_a_new_version() {
    let (mut c, g) = Client::with_group(true);
    let p = g.join("f");
    let mut data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&p, &data).unwrap();
    // An old mtime, so that the edit's cannot fall in the same clock tick.
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
        .unwrap();
    let ino = fs::metadata(&p).unwrap().ino() as i64;
    wait_until(Duration::from_secs(10), "block hashes", || {
        catalog_hashes(&c, ino) == block_hashes(&data)
    });
    let version = |c: &Client| -> i64 {
        c.db()
            .query_row("SELECT version FROM nodes WHERE ino = ?1", [ino], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let before = version(&c);
    let f = File::options().write(true).open(&p).unwrap();
    f.write_all_at(b"EDIT", 300_000).unwrap();
    data[300_000..300_004].copy_from_slice(b"EDIT");
    c.kill9();
    drop(f);
    c.mount();
    assert_eq!(read(&p), data);
    wait_until(Duration::from_secs(10), "the edit recorded", || {
        catalog_hashes(&c, ino) == block_hashes(&data) && version(&c) > before
    });
}

#[test]
fn members_file_is_parsed_when_closed_and_when_renamed_into_place() {
    let (c, g) = Client::with_group(true);
    let members = |c: &Client| -> Vec<String> {
        let db = c.db();
        let mut q = db
            .prepare("SELECT user FROM members ORDER BY user")
            .unwrap();
        q.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    fs::write(g.join(".members"), b"bob\n").unwrap();
    wait_until(Duration::from_secs(5), "members", || members(&c) == ["bob"]);
    // An editor saving through a temp file and a rename.
    fs::write(g.join(".members.tmp"), b"carol # new\n\n  dave\n").unwrap();
    fs::rename(g.join(".members.tmp"), g.join(".members")).unwrap();
    wait_until(Duration::from_secs(5), "members after rename", || {
        members(&c) == ["carol", "dave"]
    });
    fs::remove_file(g.join(".members")).unwrap();
    wait_until(Duration::from_secs(5), "members after unlink", || {
        members(&c).is_empty()
    });
}

#[test]
fn ordinary_programs_tar_git_rsync_editors_and_sqlite_work() {
    let (_c, g) = Client::with_group(true);
    let src = tempfile::tempdir().unwrap();
    sh(
        src.path(),
        "mkdir -p t/a/b t/c && for i in $(seq 1 50); do echo $i > t/a/b/f$i; done && ln -s a/b/f1 t/link && ln t/a/b/f2 t/hard && chmod 600 t/c",
    );
    sh(
        &g,
        &format!("tar -C {} -cf - t | tar -xf -", src.path().display()),
    );
    sh(&g, &format!("diff -r {}/t t", src.path().display()));
    // rsync (when installed) with hard links, perms and times.
    if std::process::Command::new("rsync")
        .arg("--version")
        .output()
        .is_ok()
    {
        sh(&g, &format!("rsync -aH {}/t/ r/", src.path().display()));
        sh(&g, &format!("diff -r {}/t r", src.path().display()));
    }
    // Editors: write a temp file, fsync, rename over the original.
    fs::write(g.join("doc.txt"), b"v1").unwrap();
    sh(
        &g,
        "printf v2 > .doc.txt.swp && sync .doc.txt.swp && mv .doc.txt.swp doc.txt",
    );
    assert_eq!(read(&g.join("doc.txt")), b"v2");
    // git: init, commit, status clean.
    sh(
        &g,
        "git init -q repo && cd repo && echo hi > a && git add a && \
         git -c user.name=t -c user.email=t@t commit -qm one && test -z \"$(git status --porcelain)\"",
    );
    // SQLite with WAL, transactions and fsync, from inside the mount.
    let db = rusqlite::Connection::open(g.join("app.db")).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.execute_batch("CREATE TABLE t (x INTEGER); BEGIN;")
        .unwrap();
    for i in 0..500 {
        db.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
    }
    db.execute_batch("COMMIT;").unwrap();
    let n: i64 = db
        .query_row("SELECT SUM(x) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, (0..500).sum::<i64>());
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn owner_groups_work_with_no_signaling_server() {
    // The config points at a port nothing listens on; the mount must not care.
    let (_c, g) = Client::with_group(true);
    fs::write(g.join("offline"), b"fine").unwrap();
    assert_eq!(read(&g.join("offline")), b"fine");
}

#[test]
fn demo_runs_shows_the_group_and_stops_on_sigint_leaving_no_mount() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("demo");
    // Started by a relative path, as README's command does.
    let bin = Path::new(crate::harness::brume_bin());
    let mut child = std::process::Command::new("./brume")
        .current_dir(bin.parent().unwrap())
        .arg("demo")
        .env("BRUME_DEMO_DIR", &root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = crate::harness::KillOnDrop(child.id());
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = line == "demo ready";
        seen.push(line);
        if ready {
            break;
        }
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("demo ready"),
        "{seen:?}"
    );
    let alice = root.join("alice/Brume");
    assert!(crate::harness::is_mounted(&alice));
    assert_eq!(
        read(&alice.join("alice/photos/2026/beach.txt")),
        b"sand, sea, sun, and a boat\n"
    );
    // The file crossed to bob over the real signaling server and peer link, and
    // bob's own edit survived as a conflict copy.
    let bob = root.join("bob/Brume/alice/photos");
    assert_eq!(read(&bob.join("README.txt")), b"Photos from the beach.\n");
    assert_eq!(
        read(&bob.join("2026/beach.txt")),
        b"sand, sea, sun, and a boat\n"
    );
    assert_eq!(
        read(&bob.join("2026/beach.txt-conflict-update-change")),
        b"bob's own note\n"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("bob received README.txt")),
        "{seen:?}"
    );
    // The status command it prints works as printed, from where it was started.
    let status_cmd = seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("./brume status"))
        .map(|args| format!("./brume status{args}"))
        .unwrap_or_else(|| panic!("no status command in {seen:?}"));
    let out = sh(bin.parent().unwrap(), &status_cmd);
    assert!(
        out.contains("user:    alice") && out.contains("group alice/photos (owner)"),
        "{out}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    drop(guard);
    assert!(status.success(), "demo exited with {status}");
    assert!(!crate::harness::is_mounted(&alice));
    assert!(!crate::harness::is_mounted(&root.join("bob/Brume")));
}

#[test]
fn members_written_right_after_a_rename_into_place_is_read() {
    let (c, g) = Client::with_group(true);
    let members = |c: &Client| -> Vec<String> {
        let db = c.db();
        let mut q = db
            .prepare("SELECT user FROM members ORDER BY user")
            .unwrap();
        q.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    for i in 0..30 {
        fs::write(g.join(".members.tmp"), b"carol\n").unwrap();
        fs::rename(g.join(".members.tmp"), g.join(".members")).unwrap();
        fs::write(g.join(".members"), format!("bob{i}\n")).unwrap();
        wait_until(Duration::from_secs(10), &format!("members bob{i}"), || {
            members(&c) == [format!("bob{i}")]
        });
    }
}
