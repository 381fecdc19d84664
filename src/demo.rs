//! `brume demo`: everything on one machine with nothing configured. Starts a
//! signaling server on loopback, creates two users with their own data dirs,
//! mounts both, creates a shared group, writes files as the owner, and stays up
//! (printing what happens) until Ctrl-C, when it unmounts and stops cleanly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::fs::{MountOptions, Mounted, mount};
use crate::ids::UserName;
use crate::signal::accounts::Accounts;
use crate::signal::server::{self, ServerConfig};

/// One demo user: config, data dir and mount.
struct DemoUser {
    name: UserName,
    mountpoint: PathBuf,
    data: PathBuf,
    mounted: Option<Mounted>,
}

/// Runs the demo in `root` (a fresh directory is made there) until a signal.
pub fn run(root: &Path) -> anyhow::Result<()> {
    let stop = crate::cli::stop_on_signals();
    if root.exists() {
        for user in ["alice", "bob"] {
            let m = root.join(user).join("Brume");
            if crate::cli::is_brume_mount(&m) {
                anyhow::bail!(
                    "{} is still mounted (another demo running?); unmount it with `fusermount3 -u {}`",
                    m.display(),
                    m.display()
                );
            }
        }
        std::fs::remove_dir_all(root)
            .with_context(|| format!("removing the old demo at {}", root.display()))?;
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    // The signaling server, on a port the kernel picks.
    let db = root.join("server.db");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("binding the demo server")?;
    let url = format!("ws://{}/", listener.local_addr()?);
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let accounts = Accounts::open(&db)?;
    let mut users = Vec::new();
    for name in ["alice", "bob"] {
        let name = UserName::new(name)?;
        let credential = accounts.add_user(&name)?;
        let dir = root.join(name.as_str());
        let mut config = Config::for_account(url.clone(), name.clone(), credential);
        // Both users are on this machine: their link stays on loopback.
        config.udp_addrs = vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))];
        config.save(&dir.join("brume.conf"))?;
        let mountpoint = dir.join("Brume");
        std::fs::create_dir_all(&mountpoint)?;
        users.push((
            config,
            DemoUser {
                name,
                mountpoint,
                data: dir.join("data"),
                mounted: None,
            },
        ));
    }
    drop(accounts);
    // The server task: serves until the demo stops.
    let server = runtime.spawn(server::run(listener, ServerConfig::new(db), async move {
        let _ = server_stopped.await;
    }));
    println!("signaling server: {url}");

    let mut mounted = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for (config, mut user) in users {
            user.mounted = Some(mount(MountOptions {
                mountpoint: user.mountpoint.clone(),
                config,
                data_dir: user.data.clone(),
                network: true,
            })?);
            println!("{:>5}'s Brume: {}", user.name, user.mountpoint.display());
            mounted.push(user);
        }
        let alice = &mounted[0].mountpoint;
        let bob = &mounted[1].mountpoint;
        let group = alice.join("alice/photos");
        std::fs::create_dir(&group)?;
        std::fs::write(group.join(".members"), "# who may read alice/photos\nbob\n")?;
        println!("alice created the group alice/photos and shared it with bob");
        std::fs::create_dir_all(group.join("2026"))?;
        std::fs::write(group.join("README.txt"), "Photos from the beach.\n")?;
        std::fs::write(group.join("2026/beach.txt"), "sand, sea, sun\n")?;
        println!("alice wrote README.txt and 2026/beach.txt");
        std::fs::create_dir_all(bob.join("alice/photos"))?;
        println!("bob joined with `mkdir -p {}/alice/photos`", bob.display());
        let bob_group = bob.join("alice/photos");
        let started = std::time::Instant::now();
        if wait_for(
            &bob_group.join("README.txt"),
            b"Photos from the beach.\n",
            stop,
        ) {
            println!(
                "bob received README.txt from alice, peer to peer, {} ms after joining",
                started.elapsed().as_millis()
            );
        } else {
            println!(
                "bob has not received the files yet (see `{} status`); carrying on",
                invoked_as()
            );
        }
        // A member's own edit is never lost: when the owner changes the file,
        // the member's version is kept as a conflict copy.
        if wait_for(&bob_group.join("2026/beach.txt"), b"sand, sea, sun\n", stop) {
            std::fs::write(bob_group.join("2026/beach.txt"), "bob's own note\n")?;
            println!("bob edited his copy of 2026/beach.txt (it stays on his machine)");
            std::fs::write(group.join("2026/beach.txt"), "sand, sea, sun, and a boat\n")?;
            println!("alice changed 2026/beach.txt");
            if wait_for(
                &bob_group.join("2026/beach.txt-conflict-update-change"),
                b"bob's own note\n",
                stop,
            ) {
                println!(
                    "bob got alice's new version and kept his own as 2026/beach.txt-conflict-update-change"
                );
            }
        }
        show_tree("alice sees", &group);
        show_tree("bob sees", &bob_group);
        println!();
        println!("Try it: cp, mv, rm in {}", group.display());
        println!(
            "        {1} status --config {0}/alice/brume.conf --data {0}/alice/data",
            root.display(),
            invoked_as()
        );
        println!("Ctrl-C stops the demo and unmounts both.");
        println!("demo ready");
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            if mounted.iter_mut().any(|u| {
                u.mounted
                    .as_mut()
                    .is_some_and(|m| m.wait_timeout(Duration::ZERO))
            }) {
                println!("a mount went away; stopping");
                break;
            }
        }
        Ok(())
    })();
    println!("stopping: unmounting and shutting the server down");
    for user in mounted {
        if let Some(m) = user.mounted
            && let Err(e) = m.unmount()
        {
            eprintln!("unmounting {}: {e}", user.mountpoint.display());
        }
    }
    let _ = stop_server.send(());
    let _ = runtime.block_on(server);
    result
}

/// Polls until `path` holds `want` (at most 30 s); true if it did.
fn wait_for(path: &Path, want: &[u8], stop: &AtomicBool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if std::fs::read(path).is_ok_and(|d| d == want) {
            return true;
        }
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn show_tree(title: &str, dir: &Path) {
    println!("{title}:");
    print_dir(dir, 1);
}

fn print_dir(dir: &Path, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let indent = "  ".repeat(depth);
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            println!("{indent}{name}/");
            print_dir(&e.path(), depth + 1);
        } else {
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            println!("{indent}{name} ({size} bytes)");
        }
    }
}

/// Where the demo lives: `$BRUME_DEMO_DIR`, or `brume-demo` in the temp dir.
pub fn default_root() -> PathBuf {
    std::env::var_os("BRUME_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("brume-demo"))
}

/// How to run this same binary again from the same directory, for the commands
/// the demo suggests: the path it was started by (`./target/release/brume`), or
/// `brume` when it was found on `PATH`.
fn invoked_as() -> String {
    std::env::args_os()
        .next()
        .map(|arg0| arg0.to_string_lossy().into_owned())
        .filter(|arg0| arg0.contains('/'))
        .unwrap_or_else(|| "brume".to_owned())
}
