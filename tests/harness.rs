//! Test harness: temp dirs, configs, and real `brume mount` daemons that are
//! unmounted and stopped when the guard drops, even if the test panics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `brume` binary under test.
pub fn brume_bin() -> &'static str {
    env!("CARGO_BIN_EXE_brume")
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `dir` is a mountpoint right now.
pub fn is_mounted(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = dir.to_string_lossy().to_string();
    text.lines()
        .any(|l| l.split(' ').nth(1).map(|t| t.replace("\\040", " ")) == Some(want.clone()))
}

/// One client: a config, a data dir and (while mounted) a daemon.
pub struct Client {
    pub dir: tempfile::TempDir,
    pub user: String,
    pub mnt: PathBuf,
    pub data: PathBuf,
    pub config: PathBuf,
    pub passthrough: bool,
    /// Network namespace (a name under `/run/netns`) the daemon runs in; `None`:
    /// the test's own.
    pub netns: Option<String>,
    /// Extra environment for the daemon (e.g. libfaketime's), set after the defaults.
    pub env: Vec<(String, String)>,
    /// Where every daemon of this client logs (stdout and stderr, appended).
    pub log: PathBuf,
    /// The CPUs the daemon may run on; `None`: those the test may.
    pub cpus: Option<Vec<usize>>,
    child: Option<Child>,
}

impl Client {
    /// A fresh client for `user`, not yet mounted.
    pub fn new(user: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("brume-test-")
            .tempdir()
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        let data = dir.path().join("data");
        let config = dir.path().join("brume.conf");
        let log = dir.path().join("daemon.log");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::write(
            &config,
            format!(
                "server_url = \"ws://127.0.0.1:9/\"\nusername = \"{user}\"\ncredential = \"test\"\n\
                 udp_addrs = [\"127.0.0.1:0\"]\n"
            ),
        )
        .unwrap();
        Self {
            dir,
            user: user.to_owned(),
            mnt,
            data,
            config,
            passthrough: true,
            netns: None,
            env: Vec::new(),
            log,
            cpus: None,
            child: None,
        }
    }

    /// A client for `alice`, mounted, with a group `g` created; returns the group path.
    pub fn with_group(passthrough: bool) -> (Self, PathBuf) {
        let mut c = Self::new("alice");
        c.passthrough = passthrough;
        c.mount();
        let g = c.mnt.join("alice/g");
        std::fs::create_dir(&g).unwrap();
        (c, g)
    }

    /// Starts `brume mount -f` and waits for the mount.
    pub fn mount(&mut self) {
        assert!(self.child.is_none(), "already mounted");
        let mut cmd = Command::new(brume_bin());
        cmd.arg("mount")
            .arg(&self.mnt)
            .arg("--config")
            .arg(&self.config)
            .arg("--data")
            .arg(&self.data)
            .arg("-f")
            .env(
                "RUST_LOG",
                std::env::var("BRUME_DAEMON_LOG").unwrap_or_else(|_| "error,brume::fs=warn".into()),
            )
            .stdin(Stdio::null());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        cmd.stdout(log.try_clone().expect("daemon log")).stderr(log);
        if !self.passthrough {
            cmd.arg("--no-passthrough");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(ns) = &self.netns {
            in_netns(&mut cmd, ns);
        }
        if let Some(cpus) = &self.cpus {
            on_cpus(&mut cmd, cpus);
        }
        let mut child = cmd.spawn().expect("spawn brume mount");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&self.mnt) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("brume mount exited early: {status}");
            }
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child = Some(child);
    }

    /// The mounted daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// What this client's daemons have logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts cleanly (as `fusermount3 -u` would) and waits for the daemon.
    /// Fails if the daemon logged that writes were lost on the way down.
    pub fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .expect("fusermount3");
        if !status.success() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit after unmount");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let log = self.log_text();
        let lost: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("catalog writes lost"))
            .collect();
        assert!(
            lost.is_empty(),
            "{}'s daemon lost writes at a clean unmount:\n{}",
            self.user,
            lost.join("\n")
        );
    }

    /// Sends a signal to the daemon and waits for it to exit.
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("mounted");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().expect("wait");
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
        status
    }

    /// Kills the daemon with SIGKILL and detaches the dead mount.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// Remounts after a clean unmount.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// The catalog database path.
    pub fn catalog(&self) -> PathBuf {
        self.data.join("catalog.db")
    }

    /// Opens the catalog read-only (works while mounted: WAL).
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.catalog(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open catalog")
    }

    /// Runs `brume` with this client's config and data dir appended.
    pub fn brume(&self, args: &[&str]) -> std::process::Output {
        Command::new(brume_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--data")
            .arg(&self.data)
            .output()
            .expect("run brume")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The daemon's side of a failure: its last log lines (BRUME_LOG_LINES
            // of them, 40 unless set).
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let keep = std::env::var("BRUME_LOG_LINES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(40);
            let tail = &lines[lines.len().saturating_sub(keep)..];
            eprintln!(
                "--- last {} lines of {}'s daemon log ({}):\n{}",
                tail.len(),
                self.user,
                self.log.display(),
                tail.join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            // A daemon with a thread stuck in the kernel (a FUSE deadlock) cannot
            // exit even on SIGKILL: report it rather than hang the whole run.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    eprintln!(
                        "brume mount (pid {}) of {} did not exit after SIGKILL; left behind",
                        child.id(),
                        self.mnt.display()
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// Makes `cmd` run in network namespace `name` (under `/run/netns`, as `ip netns add`
/// makes them). Only the network namespace changes: unlike `ip netns exec`, the
/// process stays in this mount namespace, so a FUSE mount it makes is visible here.
pub fn in_netns(cmd: &mut Command, name: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let path = Path::new("/run/netns").join(name);
    let ns = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("network namespace {}: {e}", path.display()));
    // SAFETY: setns(2) is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd` run on `cpus` only (as `taskset` would).
pub fn on_cpus(cmd: &mut Command, cpus: &[usize]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET only sets bits in it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: sched_setaffinity(2) is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity(2) fills the set we pass; CPU_ISSET reads it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) },
        0
    );
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Runs a shell command in `dir`, panicking with its output if it fails.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The errno of the last failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A path as a C string.
pub fn cpath(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Kills a process (and detaches the demo's mounts) if a test panics before
/// stopping it.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) of a pid we started; harmless if it already exited.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in text.lines().filter_map(|l| l.split(' ').nth(1)) {
            if m.contains("/demo/") {
                let _ = Command::new("fusermount3").arg("-uz").arg(m).status();
            }
        }
    }
}

/// Logs to the test's output, filtered by `RUST_LOG` (nothing unless it is set).
pub fn log_to_test_output() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        // Another test of this binary may have installed it already.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// SplitMix64: small, seedable and the same on every machine; for tests that
/// pick operations and bytes from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A certificate authority made for one test, and server certificates it signs,
/// written as PEM files in a temp dir.
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Brume test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Self {
            dir,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// The CA's certificate (what a client puts in `server_ca`).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server configuration with a certificate for `names`, valid from
    /// `days_from_now.0` to `days_from_now.1` days from now.
    pub fn server(
        &self,
        names: &[&str],
        days_from_now: (i64, i64),
    ) -> std::sync::Arc<rustls::ServerConfig> {
        let (cert, key) = self.server_files(names, days_from_now);
        brume::signal::tls::server_config(&cert, &key).unwrap()
    }

    /// The PEM files (certificate, key) of such a server certificate.
    pub fn server_files(&self, names: &[&str], days_from_now: (i64, i64)) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(days_from_now.0);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days_from_now.1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let tag = format!("{}-{}", names.join("_"), days_from_now.1);
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{tag}.pem")),
            self.dir.path().join(format!("{tag}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}
