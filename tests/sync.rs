//! Group sync between real mounts in one process: an owner and members, each a
//! real FUSE mount with its own catalog and block cache, connected by an
//! in-process link that delivers messages in order (and can be cut).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brume::config::Config;
use brume::fs::{MountOptions, Mounted, mount_with_link};
use brume::ids::UserName;
use brume::sync::engine::{BoxFuture, Engine, Link};
use tokio::sync::mpsc;

use crate::harness::{is_mounted, wait_until};

/// A delivery queue: (sender, payload) in order.
type Queue = mpsc::Sender<(UserName, Vec<u8>)>;

/// Routes messages between in-process engines, in order, per destination.
pub(crate) struct Hub {
    runtime: tokio::runtime::Runtime,
    /// Delivery queues by user.
    queues: Mutex<HashMap<String, Queue>>,
    /// Users that are currently unreachable.
    offline: Mutex<HashSet<String>>,
    /// Bytes delivered to each user.
    bytes_to: Mutex<HashMap<String, u64>>,
}

impl Hub {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            queues: Mutex::new(HashMap::new()),
            offline: Mutex::new(HashSet::new()),
            bytes_to: Mutex::new(HashMap::new()),
        })
    }

    fn register(self: &Arc<Self>, user: &str, engine: Engine) {
        let (tx, mut rx) = mpsc::channel::<(UserName, Vec<u8>)>(4096);
        self.queues.lock().unwrap().insert(user.to_owned(), tx);
        self.runtime.spawn(async move {
            while let Some((from, payload)) = rx.recv().await {
                engine.on_message(&from, &payload).await;
            }
        });
    }

    pub(crate) fn set_offline(&self, user: &str, offline: bool) {
        let mut o = self.offline.lock().unwrap();
        if offline {
            o.insert(user.to_owned());
        } else {
            o.remove(user);
        }
    }

    fn bytes_to(&self, user: &str) -> u64 {
        *self.bytes_to.lock().unwrap().get(user).unwrap_or(&0)
    }
}

struct HubLink {
    hub: Arc<Hub>,
    me: UserName,
}

impl Link for HubLink {
    fn send<'a>(
        &'a self,
        to: &'a UserName,
        _urgent: bool,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            {
                let off = self.hub.offline.lock().unwrap();
                if off.contains(to.as_str()) || off.contains(self.me.as_str()) {
                    return Err("ENODEST".to_string());
                }
            }
            let tx = self
                .hub
                .queues
                .lock()
                .unwrap()
                .get(to.as_str())
                .cloned()
                .ok_or("EBADDEST")?;
            *self
                .hub
                .bytes_to
                .lock()
                .unwrap()
                .entry(to.to_string())
                .or_default() += payload.len() as u64;
            tx.send((self.me.clone(), payload))
                .await
                .map_err(|_| "gone".to_string())
        })
    }
}

/// One client mounted in this process.
pub(crate) struct Peer {
    pub(crate) dir: tempfile::TempDir,
    user: String,
    mnt: PathBuf,
    mounted: Option<Mounted>,
    cache_bytes: u64,
    full_copy: bool,
}

impl Peer {
    pub(crate) fn start(hub: &Arc<Hub>, user: &str) -> Self {
        Self::start_with_cache(hub, user, 1 << 30, true)
    }

    fn start_with_cache(hub: &Arc<Hub>, user: &str, cache_bytes: u64, full_copy: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("brume-sync-")
            .tempdir()
            .unwrap();
        let mut p = Self {
            mnt: dir.path().join("mnt"),
            dir,
            user: user.to_owned(),
            mounted: None,
            cache_bytes,
            full_copy,
        };
        std::fs::create_dir_all(&p.mnt).unwrap();
        p.mount(hub);
        p
    }

    pub(crate) fn mount(&mut self, hub: &Arc<Hub>) {
        let config = Config::parse(&format!(
            "server_url = \"ws://127.0.0.1:9/\"\nusername = \"{}\"\ncredential = \"x\"\n\
             [cache]\nmax_bytes = {}\nfull_copy = {}\n",
            self.user, self.cache_bytes, self.full_copy
        ))
        .unwrap();
        let link = Arc::new(HubLink {
            hub: hub.clone(),
            me: UserName::new(&self.user).unwrap(),
        });
        let mounted = mount_with_link(
            MountOptions {
                mountpoint: self.mnt.clone(),
                config,
                data_dir: self.dir.path().join("data"),
                network: false,
            },
            Some(link),
        )
        .unwrap();
        hub.register(&self.user, mounted.engine().unwrap().clone());
        self.mounted = Some(mounted);
    }

    pub(crate) fn unmount(&mut self, hub: &Hub) {
        // Messages for this user fail (as to an offline peer) until it is back.
        hub.queues.lock().unwrap().remove(&self.user);
        if let Some(m) = self.mounted.take() {
            m.unmount().unwrap();
        }
    }

    fn engine(&self) -> &Engine {
        self.mounted.as_ref().unwrap().engine().unwrap()
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.mounted.take());
        if is_mounted(&self.mnt) {
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
    }
}

pub(crate) fn online(hub: &Arc<Hub>, member: &Peer, owner: &str) {
    let engine = member.engine().clone();
    let owner = UserName::new(owner).unwrap();
    hub.runtime.block_on(engine.owner_online(&owner));
}

fn read_when(path: &Path, want: &[u8]) {
    wait_until(
        Duration::from_secs(10),
        &format!(
            "{} to read {:?}",
            path.display(),
            String::from_utf8_lossy(want)
        ),
        || std::fs::read(path).map(|d| d == want).unwrap_or(false),
    );
}

fn gone_when(path: &Path) {
    wait_until(
        Duration::from_secs(10),
        &format!("{} to disappear", path.display()),
        || !path.exists(),
    );
}

/// alice owns `alice/g` shared with bob; bob has joined it.
fn shared() -> (Arc<Hub>, Peer, Peer) {
    let hub = Hub::new();
    let alice = Peer::start(&hub, "alice");
    let bob = Peer::start(&hub, "bob");
    std::fs::create_dir(alice.path("alice/g")).unwrap();
    std::fs::write(alice.path("alice/g/.members"), b"bob\n").unwrap();
    std::fs::create_dir_all(bob.path("alice/g")).unwrap();
    (hub, alice, bob)
}

#[test]
fn join_by_mkdir_brings_the_tree_and_its_content() {
    let hub = Hub::new();
    let alice = Peer::start(&hub, "alice");
    let bob = Peer::start(&hub, "bob");
    std::fs::create_dir_all(alice.path("alice/g/sub/deeper")).unwrap();
    std::fs::write(alice.path("alice/g/.members"), b"bob\n").unwrap();
    let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(alice.path("alice/g/sub/big.bin"), &big).unwrap();
    std::fs::write(alice.path("alice/g/hello.txt"), b"hello bob").unwrap();
    std::os::unix::fs::symlink("hello.txt", alice.path("alice/g/link")).unwrap();
    // bob joins.
    std::fs::create_dir_all(bob.path("alice/g")).unwrap();
    read_when(&bob.path("alice/g/hello.txt"), b"hello bob");
    read_when(&bob.path("alice/g/sub/big.bin"), &big);
    assert!(bob.path("alice/g/sub/deeper").is_dir());
    assert_eq!(
        std::fs::read_link(bob.path("alice/g/link"))
            .unwrap()
            .to_str(),
        Some("hello.txt")
    );
    assert_eq!(
        std::fs::read(bob.path("alice/g/.members")).unwrap(),
        b"bob\n"
    );
    // Availability is an extended attribute: all 3 blocks of big.bin are here.
    wait_until(Duration::from_secs(10), "user.brume.cached", || {
        cached_xattr(&bob.path("alice/g/sub/big.bin")).as_deref() == Some("3/3")
    });
    assert_eq!(cached_xattr(&alice.path("alice/g/sub/big.bin")), None);
    // Progress as `brume status` shows it: every file and byte here.
    wait_until(Duration::from_secs(10), "progress", || {
        let s = bob.engine().member_status()["alice/g"].clone();
        (s.files_done, s.files_total, s.bytes_done, s.bytes_total) == (3, 3, 700_013, 700_013)
    });
}

pub(crate) fn cached_xattr(p: &Path) -> Option<String> {
    let mut buf = [0u8; 64];
    let n = unsafe {
        libc::getxattr(
            crate::harness::cpath(p).as_ptr(),
            c"user.brume.cached".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

#[test]
fn owner_changes_reach_the_member_live() {
    let (_hub, alice, bob) = shared();
    read_when(&bob.path("alice/g/.members"), b"bob\n");
    // add
    std::fs::write(alice.path("alice/g/a.txt"), b"one").unwrap();
    read_when(&bob.path("alice/g/a.txt"), b"one");
    // change
    std::fs::write(alice.path("alice/g/a.txt"), b"two, longer").unwrap();
    read_when(&bob.path("alice/g/a.txt"), b"two, longer");
    // rename (as a rename: same content, new name)
    std::fs::create_dir(alice.path("alice/g/d")).unwrap();
    std::fs::rename(alice.path("alice/g/a.txt"), alice.path("alice/g/d/b.txt")).unwrap();
    read_when(&bob.path("alice/g/d/b.txt"), b"two, longer");
    gone_when(&bob.path("alice/g/a.txt"));
    // chmod
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        alice.path("alice/g/d/b.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "chmod", || {
        std::fs::metadata(bob.path("alice/g/d/b.txt"))
            .map(|m| m.permissions().mode() & 0o777 == 0o600)
            .unwrap_or(false)
    });
    // unlink and rmdir
    std::fs::remove_file(alice.path("alice/g/d/b.txt")).unwrap();
    std::fs::remove_dir(alice.path("alice/g/d")).unwrap();
    gone_when(&bob.path("alice/g/d"));
}

#[test]
fn member_edits_are_kept_as_update_conflict_copies() {
    let (_hub, alice, bob) = shared();
    std::fs::write(alice.path("alice/g/f"), b"owner v1").unwrap();
    read_when(&bob.path("alice/g/f"), b"owner v1");
    // bob edits his copy; it never reaches alice.
    std::fs::write(bob.path("alice/g/f"), b"bob's edit").unwrap();
    assert_eq!(std::fs::read(alice.path("alice/g/f")).unwrap(), b"owner v1");
    // update/change: alice changes it -> bob's version kept aside.
    std::fs::write(alice.path("alice/g/f"), b"owner v2").unwrap();
    read_when(&bob.path("alice/g/f"), b"owner v2");
    read_when(&bob.path("alice/g/f-conflict-update-change"), b"bob's edit");
    // update/add: bob creates x, then alice creates x.
    std::fs::write(bob.path("alice/g/x"), b"bob's x").unwrap();
    std::fs::write(alice.path("alice/g/x"), b"alice's x").unwrap();
    read_when(&bob.path("alice/g/x"), b"alice's x");
    read_when(&bob.path("alice/g/x-conflict-update-add"), b"bob's x");
    // update/unlink of an edited file keeps the edit.
    std::fs::write(bob.path("alice/g/f"), b"edited again").unwrap();
    std::fs::remove_file(alice.path("alice/g/f")).unwrap();
    gone_when(&bob.path("alice/g/f"));
    read_when(
        &bob.path("alice/g/f-conflict-update-change-2"),
        b"edited again",
    );
    // Conflict copies are never removed by sync, and nothing reached alice.
    assert!(!alice.path("alice/g/x-conflict-update-add").exists());
    assert!(!alice.path("alice/g/f-conflict-update-change").exists());
    // `brume status` counts the three copies against the group, from the catalog.
    let conflicts = || {
        brume::catalog::summarize(&bob.dir.path().join("data/catalog.db"))
            .unwrap()
            .groups
            .iter()
            .find(|g| g.owner == "alice" && g.name == "g")
            .map(|g| g.conflicts)
    };
    wait_until(
        Duration::from_secs(10),
        "3 conflicts in bob's status",
        || conflicts() == Some(3),
    );
}

#[test]
fn offline_member_catches_up_with_sync_conflicts_and_restores_deleted_files() {
    let (hub, alice, bob) = shared();
    std::fs::write(alice.path("alice/g/keep"), b"k1").unwrap();
    std::fs::write(alice.path("alice/g/edit"), b"e1").unwrap();
    read_when(&bob.path("alice/g/edit"), b"e1");
    read_when(&bob.path("alice/g/keep"), b"k1");
    hub.set_offline("bob", true);
    // While bob is away: he edits and deletes; alice changes things.
    std::fs::write(bob.path("alice/g/edit"), b"bob offline edit").unwrap();
    std::fs::remove_file(bob.path("alice/g/keep")).unwrap();
    std::fs::write(alice.path("alice/g/edit"), b"e2").unwrap();
    std::fs::write(alice.path("alice/g/new"), b"n1").unwrap();
    hub.set_offline("bob", false);
    online(&hub, &bob, "alice");
    read_when(&bob.path("alice/g/new"), b"n1");
    read_when(&bob.path("alice/g/edit"), b"e2");
    read_when(&bob.path("alice/g/edit-conflict-sync"), b"bob offline edit");
    // A file the member deleted is restored at the next sync.
    read_when(&bob.path("alice/g/keep"), b"k1");
}

#[test]
fn non_members_get_enotmember_and_no_data() {
    let hub = Hub::new();
    let alice = Peer::start(&hub, "alice");
    let carol = Peer::start(&hub, "carol");
    std::fs::create_dir(alice.path("alice/g")).unwrap();
    std::fs::write(alice.path("alice/g/.members"), b"bob\n").unwrap();
    std::fs::write(alice.path("alice/g/secret"), b"not for carol").unwrap();
    std::fs::create_dir_all(carol.path("alice/g")).unwrap();
    wait_until(Duration::from_secs(10), "ENOTMEMBER", || {
        carol
            .engine()
            .member_status()
            .get("alice/g")
            .and_then(|s| s.problem.clone())
            == Some("ENOTMEMBER".to_string())
    });
    assert!(!carol.path("alice/g/secret").exists());
    assert!(
        hub.bytes_to("carol") < 200,
        "carol received {} bytes",
        hub.bytes_to("carol")
    );
}

#[test]
fn owner_offline_cached_reads_work_and_uncached_reads_fail_fast() {
    let hub = Hub::new();
    let alice = Peer::start(&hub, "alice");
    // bob's cache holds about one block: most of a large file gets evicted.
    let bob = Peer::start_with_cache(&hub, "bob", 300_000, false);
    std::fs::create_dir(alice.path("alice/g")).unwrap();
    std::fs::write(alice.path("alice/g/.members"), b"bob\n").unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(alice.path("alice/g/big"), &big).unwrap();
    std::fs::write(alice.path("alice/g/small"), b"cached").unwrap();
    std::fs::create_dir_all(bob.path("alice/g")).unwrap();
    // Blocks are fetched on demand as the reads need them.
    read_when(&bob.path("alice/g/big"), &big);
    read_when(&bob.path("alice/g/small"), b"cached");
    hub.set_offline("alice", true);
    // The cached file stays readable with the owner gone.
    assert_eq!(std::fs::read(bob.path("alice/g/small")).unwrap(), b"cached");
    // The evicted start of the big one fails with EIO, at once, not after a hang
    // (after the kernel's own page cache of it is dropped).
    let f = std::fs::File::open(bob.path("alice/g/big")).unwrap();
    use std::os::unix::io::AsRawFd;
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
        0
    );
    let t = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    match f.read_at(&mut buf, 0) {
        Ok(n) => panic!("read {n} bytes of an evicted block with the owner offline"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    // The tree itself stays browsable.
    assert!(bob.path("alice/g/big").exists());
}

#[test]
fn member_restart_syncs_what_it_missed() {
    let (hub, alice, mut bob) = shared();
    std::fs::write(alice.path("alice/g/before"), b"b").unwrap();
    read_when(&bob.path("alice/g/before"), b"b");
    bob.unmount(&hub);
    std::fs::write(alice.path("alice/g/while-away"), b"w").unwrap();
    std::fs::remove_file(alice.path("alice/g/before")).unwrap();
    bob.mount(&hub);
    // The link to alice comes up: bob resubscribes and catches up.
    online(&hub, &bob, "alice");
    read_when(&bob.path("alice/g/while-away"), b"w");
    gone_when(&bob.path("alice/g/before"));
}

#[test]
fn leaving_by_rmdir_removes_the_group() {
    let (_hub, alice, bob) = shared();
    std::fs::write(alice.path("alice/g/f"), b"x").unwrap();
    read_when(&bob.path("alice/g/f"), b"x");
    std::fs::remove_dir_all(bob.path("alice/g")).unwrap();
    assert!(!bob.path("alice/g").exists());
    // alice's side is untouched.
    assert_eq!(std::fs::read(alice.path("alice/g/f")).unwrap(), b"x");
}

#[test]
fn a_one_byte_edit_of_a_large_file_sends_about_one_block() {
    let (hub, alice, bob) = shared();
    let mut data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(alice.path("alice/g/big"), &data).unwrap();
    read_when(&bob.path("alice/g/big"), &data);
    // Let the background fill finish before counting.
    wait_until(Duration::from_secs(10), "fill", || {
        bob.engine().cache_usage().blocks as usize >= data.len().div_ceil(256 * 1024)
    });
    let before = hub.bytes_to("bob");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(alice.path("alice/g/big"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"!", 2_000_000).unwrap();
    drop(f);
    data[2_000_000] = b'!';
    read_when(&bob.path("alice/g/big"), &data);
    let sent = hub.bytes_to("bob") - before;
    assert!(
        sent < 256 * 1024 + 16 * 1024,
        "a 1-byte edit sent {sent} bytes to the member"
    );
}

#[test]
fn a_member_removed_from_members_gets_enotmember_and_no_more_data() {
    let (hub, alice, bob) = shared();
    std::fs::write(alice.path("alice/g/f"), b"for bob").unwrap();
    read_when(&bob.path("alice/g/f"), b"for bob");
    std::fs::write(alice.path("alice/g/.members"), b"# nobody\n").unwrap();
    std::fs::write(alice.path("alice/g/later"), b"not for bob").unwrap();
    // bob asks again (a reconnect): refused.
    online(&hub, &bob, "alice");
    wait_until(Duration::from_secs(10), "ENOTMEMBER", || {
        bob.engine()
            .member_status()
            .get("alice/g")
            .and_then(|s| s.problem.clone())
            == Some("ENOTMEMBER".to_string())
    });
    assert!(!bob.path("alice/g/later").exists());
    // What bob already had stays readable.
    assert_eq!(std::fs::read(bob.path("alice/g/f")).unwrap(), b"for bob");
}

#[test]
fn full_copy_keeps_every_block_even_over_the_cache_budget() {
    let hub = Hub::new();
    let alice = Peer::start(&hub, "alice");
    // A budget far below the group's size: full copy pins it all anyway.
    let bob = Peer::start_with_cache(&hub, "bob", 100_000, true);
    std::fs::create_dir(alice.path("alice/g")).unwrap();
    std::fs::write(alice.path("alice/g/.members"), b"bob\n").unwrap();
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 239) as u8).collect();
    std::fs::write(alice.path("alice/g/big"), &big).unwrap();
    std::fs::create_dir_all(bob.path("alice/g")).unwrap();
    wait_until(Duration::from_secs(10), "full copy", || {
        cached_xattr(&bob.path("alice/g/big")).as_deref() == Some("6/6")
    });
    hub.set_offline("alice", true);
    let f = std::fs::File::open(bob.path("alice/g/big")).unwrap();
    use std::os::unix::io::AsRawFd;
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
        0
    );
    drop(f);
    assert!(std::fs::read(bob.path("alice/g/big")).unwrap() == big);
    assert!(bob.engine().cache_usage().pinned_bytes >= 1_500_000);
}

#[test]
fn after_a_restart_blocks_already_here_are_not_sent_again() {
    let (hub, alice, mut bob) = shared();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(alice.path("alice/g/a.bin"), &data).unwrap();
    read_when(&bob.path("alice/g/a.bin"), &data);
    wait_until(Duration::from_secs(10), "fill", || {
        cached_xattr(&bob.path("alice/g/a.bin")).as_deref() == Some("12/12")
    });
    bob.unmount(&hub);
    // While bob is away alice adds a copy of the same content.
    std::fs::write(alice.path("alice/g/copy.bin"), &data).unwrap();
    let before = hub.bytes_to("bob");
    bob.mount(&hub);
    online(&hub, &bob, "alice");
    read_when(&bob.path("alice/g/copy.bin"), &data);
    wait_until(Duration::from_secs(10), "copy complete", || {
        cached_xattr(&bob.path("alice/g/copy.bin")).as_deref() == Some("12/12")
    });
    // Only metadata crossed: the blocks were verified and cached before the restart.
    let sent = hub.bytes_to("bob") - before;
    assert!(
        sent < 64 * 1024,
        "{sent} bytes sent for content bob already had"
    );
}

#[test]
fn a_member_edit_survives_restart_and_resync_until_the_owner_changes_the_file() {
    let (hub, alice, mut bob) = shared();
    // 820 bytes with a hole: the owner's version the member then replaces.
    std::fs::write(alice.path("alice/g/f"), vec![b'A'; 573]).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(alice.path("alice/g/f"))
            .unwrap();
        f.write_all_at(&[b'B'; 68], 752).unwrap();
    }
    wait_until(Duration::from_secs(10), "820 bytes at bob", || {
        std::fs::metadata(bob.path("alice/g/f")).is_ok_and(|m| m.len() == 820)
    });
    std::fs::write(bob.path("alice/g/f"), b"bob's edit").unwrap();
    // A restart and a full resync against an unchanged owner keep bob's bytes.
    bob.unmount(&hub);
    bob.mount(&hub);
    online(&hub, &bob, "alice");
    std::fs::write(alice.path("alice/g/other"), b"o").unwrap();
    read_when(&bob.path("alice/g/other"), b"o");
    assert_eq!(std::fs::read(bob.path("alice/g/f")).unwrap(), b"bob's edit");
    // Once alice changes it, bob's edit becomes the conflict copy.
    std::fs::write(alice.path("alice/g/f"), b"alice v2").unwrap();
    read_when(&bob.path("alice/g/f"), b"alice v2");
    read_when(&bob.path("alice/g/f-conflict-update-change"), b"bob's edit");
}

#[test]
fn member_truncate_and_touch_of_a_mirrored_file_keep_its_bytes() {
    let (hub, alice, bob) = shared();
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(alice.path("alice/g/t"), &data).unwrap();
    std::fs::write(alice.path("alice/g/m"), b"touch me").unwrap();
    std::fs::write(alice.path("alice/g/z"), &data).unwrap();
    read_when(&bob.path("alice/g/t"), &data);
    read_when(&bob.path("alice/g/m"), b"touch me");
    read_when(&bob.path("alice/g/z"), &data);
    // Shrinking keeps the first bytes (crossing a block boundary).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(bob.path("alice/g/t"))
        .unwrap();
    f.set_len(300_000).unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(bob.path("alice/g/t")).unwrap(),
        &data[..300_000]
    );
    // Setting the times keeps the content.
    let f = std::fs::File::open(bob.path("alice/g/m")).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    drop(f);
    assert_eq!(std::fs::read(bob.path("alice/g/m")).unwrap(), b"touch me");
    // Overwriting needs none of the old bytes: it works with the owner away.
    hub.set_offline("alice", true);
    let t = std::time::Instant::now();
    std::fs::write(bob.path("alice/g/z"), b"bob's z").unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(std::fs::read(bob.path("alice/g/z")).unwrap(), b"bob's z");
}

#[test]
fn filling_many_blocks_never_waits_for_a_request_timeout() {
    // More missing blocks than background requests in flight: the answers must
    // still get through while the fill waits for a free slot.
    let (_hub, alice, bob) = shared();
    let data: Vec<u8> = (0..6_000_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(alice.path("alice/g/big"), &data).unwrap();
    let t = std::time::Instant::now();
    wait_until(Duration::from_secs(20), "all 23 blocks at bob", || {
        cached_xattr(&bob.path("alice/g/big")).as_deref() == Some("23/23")
    });
    // A request that got no answer would have cost the 5 s read timeout.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(std::fs::read(bob.path("alice/g/big")).unwrap(), data);
}

#[test]
fn a_handle_opened_before_the_owner_rewrote_the_file_reads_the_new_version() {
    let hub = Hub::new();
    let alice = Peer::start(&hub, "alice");
    // bob's cache holds about one block, so what he read of v1 is soon evicted.
    let bob = Peer::start_with_cache(&hub, "bob", 300_000, false);
    std::fs::create_dir(alice.path("alice/g")).unwrap();
    std::fs::write(alice.path("alice/g/.members"), b"bob\n").unwrap();
    let v1: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    let v2: Vec<u8> = (0..1_000_000u32).map(|i| (i % 239) as u8).collect();
    std::fs::write(alice.path("alice/g/f"), &v1).unwrap();
    std::fs::create_dir_all(bob.path("alice/g")).unwrap();
    read_when(&bob.path("alice/g/f"), &v1);
    // bob opens v1; alice then rewrites the file in place, and her old blocks are
    // gone: she can only send v2's.
    let f = std::fs::File::open(bob.path("alice/g/f")).unwrap();
    std::fs::write(alice.path("alice/g/f"), &v2).unwrap();
    read_when(&bob.path("alice/g/f"), &v2);
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    assert_eq!(
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
        0
    );
    // The old handle reads what the file holds now (as a local file rewritten in
    // place would), not EIO.
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).expect("read through the old handle");
    assert_eq!(&buf[..n], &v2[..n]);
    assert!(n > 0);
}
