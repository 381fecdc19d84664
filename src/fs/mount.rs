//! Mounting: opens the catalog and the backing store, rebuilds the tree, and runs
//! the FUSE session until it is unmounted (by [`Mounted::unmount`], a signal
//! handled by the caller, or `fusermount3 -u`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};

use fuser::{Config as FuseConfig, MountOption, SessionACL};

use crate::blocks::Hasher;
use crate::blocks::cache::BlockCache;
use crate::catalog::{Catalog, CatalogThread, Stamp};
use crate::config::Config;
use crate::fs::adapter::BrumeFs;
use crate::fs::store::Store;
use crate::fs::tree::Tree;
use crate::fs::workers::WorkerCpus;
use crate::ids::Ino;
use crate::sync::engine::{Engine, EngineConfig, Link};

/// What `brume mount` needs.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// The client's configuration.
    pub config: Config,
    /// The data directory: catalog, objects.
    pub data_dir: PathBuf,
    /// Connect to the signaling server and peers and run group sync.
    pub network: bool,
}

/// Errors while mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The data directory could not be prepared.
    #[error("data directory {path}: {source}")]
    Data {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The catalog could not be opened.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// Building the tree failed.
    #[error("loading the namespace: {0}")]
    Tree(#[from] crate::fs::error::FsError),
    /// The kernel refused the mount.
    #[error("cannot mount {path}: {source}")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// What the kernel or fusermount said.
        source: std::io::Error,
    },
}

/// A running mount. Dropping it unmounts.
#[derive(Debug)]
pub struct Mounted {
    mountpoint: PathBuf,
    unmounter: Option<fuser::SessionUnmounter>,
    /// Reports when the session loop has ended (after any unmount).
    done: mpsc::Receiver<std::io::Result<()>>,
    session: Option<std::thread::JoinHandle<()>>,
    hasher: Hasher,
    _catalog: Option<CatalogThread>,
    catalog: Catalog,
    state_file: PathBuf,
    engine: Option<Engine>,
    /// The peer links, closed at unmount so that peers see us go at once.
    peers: Option<crate::peer::Peers>,
    /// The sync engine's runtime; shut down after the session ends.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Mounted {
    /// The sync engine, if the mount has a link to peers.
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref()
    }

    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Blocks until the filesystem is unmounted by someone.
    pub fn wait(&mut self) -> std::io::Result<()> {
        let r = self.done.recv().unwrap_or(Ok(()));
        self.finish();
        r
    }

    /// Waits up to `timeout` for the session to end; true if it has.
    pub fn wait_timeout(&mut self, timeout: std::time::Duration) -> bool {
        match self.done.recv_timeout(timeout) {
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.finish();
                true
            }
            Err(mpsc::RecvTimeoutError::Timeout) => false,
        }
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> std::io::Result<()> {
        if let Some(mut u) = self.unmounter.take()
            && let Err(e) = u.unmount()
        {
            // Busy or already gone: fall back to a lazy unmount so nothing is left.
            tracing::warn!(cause = ?e, "unmount failed; detaching lazily");
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mountpoint)
                .status();
        }
        let _ = self.done.recv();
        self.finish();
        Ok(())
    }

    fn finish(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.join();
        }
        self.engine = None;
        if let Some(rt) = self.runtime.take() {
            // Links closed, not dropped: the peers learn at once that we left,
            // instead of when their connection times out.
            if let Some(peers) = self.peers.take() {
                let closed = rt.block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(2), peers.shutdown()).await
                });
                if closed.is_err() {
                    tracing::debug!("peer links did not all close in time");
                }
            }
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        // Files closed before the unmount are hashed and recorded first.
        self.hasher.stop();
        // The tree (and its catalog handle) may outlive the mount in tasks that
        // still hold the engine: close the catalog explicitly.
        self.catalog.close();
        let _ = std::fs::remove_file(&self.state_file);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.unmount_inner();
        }
    }
}

/// State of a running mount, written to `<data>/mount.json` for `brume status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountState {
    /// The daemon's pid.
    pub pid: u32,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Whether file data uses kernel passthrough.
    pub passthrough_wanted: bool,
}

/// Name of the mount state file in the data dir.
pub(crate) const STATE_FILE: &str = "mount.json";

/// Verified block contents kept in memory for member reads.
const HOT_BLOCKS_BYTES: u64 = 64 << 20;

/// Mounts Brume at `opts.mountpoint` and returns once the kernel has it.
pub fn mount(opts: MountOptions) -> Result<Mounted, MountError> {
    mount_with_link(opts, None)
}

/// Mounts Brume and, given a link to peers, runs group sync over it.
pub fn mount_with_link(
    opts: MountOptions,
    link: Option<Arc<dyn Link>>,
) -> Result<Mounted, MountError> {
    let data = &opts.data_dir;
    let io = |source| MountError::Data {
        path: data.clone(),
        source,
    };
    std::fs::create_dir_all(data).map_err(io)?;
    let store = Store::open(data).map_err(io)?;
    let (catalog, snapshot, catalog_thread) = Catalog::open(&data.join("catalog.db"))?;
    // SAFETY: getuid/getgid have no preconditions.
    let owner = unsafe { (libc::getuid(), libc::getgid()) };
    let (mut tree, dropped) = Tree::load(
        snapshot,
        opts.config.username.clone(),
        owner.0,
        owner.1,
        catalog.clone(),
    )?;
    for ino in dropped {
        store.remove(ino);
    }
    // Backing files that no node owns: created just before a crash.
    let known: std::collections::HashSet<_> = tree.files().collect();
    for ino in store.list().map_err(io)? {
        if !known.contains(&ino) {
            store.remove(ino);
        }
    }
    let rehash = repair_sizes(&mut tree, &store).map_err(io)?;
    catalog.barrier()?;
    let tree = Arc::new(RwLock::new(tree));
    let hasher = Hasher::start(
        Box::new({
            let store = store.clone();
            move |ino| store.open_read(ino)
        }),
        Box::new({
            let tree = tree.clone();
            move |ino, seq, blocks| {
                let mut tree = crate::fs::tree::write(&tree);
                if let Err(e) = tree.set_blocks(ino, seq, blocks) {
                    tracing::debug!(%ino, cause = ?e, "hashed file is gone");
                }
            }
        }),
    );
    let unhashed = tree
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .unhashed_owned_files();
    for (ino, seq) in rehash.into_iter().chain(unhashed) {
        hasher.enqueue(ino, seq);
    }
    let wsserver = serde_json::to_vec_pretty(&serde_json::json!({
        "url": opts.config.server_url,
        "username": opts.config.username.as_str(),
    }))
    .unwrap_or_default();
    let cache = Arc::new(
        BlockCache::open(
            &data.join("cache"),
            opts.config.cache.max_bytes,
            HOT_BLOCKS_BYTES,
        )
        .map_err(|e| MountError::Data {
            path: data.join("cache"),
            source: std::io::Error::other(e.to_string()),
        })?,
    );
    let sync_slot = Arc::new(std::sync::OnceLock::new());
    let catalog_handle = catalog.clone();
    let workers = match opts.config.fs.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get().min(4))
            .unwrap_or(2),
        n => n,
    };
    let fs = BrumeFs::new(
        tree.clone(),
        store.clone(),
        catalog,
        hasher.clone(),
        opts.config.fs.passthrough,
        wsserver,
        owner,
        cache.clone(),
        sync_slot.clone(),
    )
    .with_workers(if opts.config.fs.pin_threads {
        WorkerCpus::plan(
            workers,
            std::time::Duration::from_micros(opts.config.fs.busy_cpu_us),
        )
    } else {
        WorkerCpus::default()
    });
    let mut fuse = FuseConfig::default();
    fuse.mount_options = vec![
        MountOption::FSName(format!("brume:{}", opts.config.username)),
        MountOption::Subtype("brume".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if owner.0 == 0 {
        fuse.mount_options.push(MountOption::Dev);
        fuse.mount_options.push(MountOption::Suid);
        fuse.acl = SessionACL::All;
    }
    fuse.n_threads = Some(workers);
    fuse.clone_fd = true;
    let mut session =
        fuser::Session::new(fs, &opts.mountpoint, &fuse).map_err(|source| MountError::Mount {
            path: opts.mountpoint.clone(),
            source,
        })?;
    let unmounter = session.unmount_callable();
    // Sync runs on its own small runtime, started only with a link or network.
    let (runtime, engine, peers) = if link.is_some() || opts.network {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("brume-sync")
            .enable_all()
            .build()
            .map_err(io)?;
        let _guard = runtime.enter();
        let (link, network, peers): (Arc<dyn Link>, _, _) = match link {
            Some(link) => (link, None, None),
            None => {
                let (link, network) = crate::sync::network::start(
                    &opts.config,
                    data,
                    catalog_handle.clone(),
                    tree.clone(),
                )
                .map_err(|e| MountError::Data {
                    path: data.clone(),
                    source: std::io::Error::other(e),
                })?;
                let peers = link.peers().clone();
                (link, Some(network), Some(peers))
            }
        };
        let engine = Engine::start(
            opts.config.username.clone(),
            tree.clone(),
            store,
            cache,
            link,
            Some(session.notifier()),
            EngineConfig {
                full_copy: opts.config.cache.full_copy,
                ..EngineConfig::default()
            },
        );
        if let Some(network) = network {
            network.attach(engine.clone());
        }
        // Joined groups ask their owners for what changed while we were away.
        let joined: Vec<_> = tree
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .joined_groups()
            .into_iter()
            .map(|(g, ..)| g)
            .collect();
        for g in joined {
            let engine = engine.clone();
            tokio::spawn(async move { engine.subscribe(g).await });
        }
        let _ = sync_slot.set((engine.clone(), runtime.handle().clone()));
        drop(_guard);
        (Some(runtime), Some(engine), peers)
    } else {
        (None, None, None)
    };
    let (tx, done) = mpsc::channel();
    // The session loop: serves the kernel until the filesystem is unmounted.
    let session = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = tx.send(r);
        })
        .map_err(io)?;
    let state_file = data.join(STATE_FILE);
    let state = MountState {
        pid: std::process::id(),
        mountpoint: opts.mountpoint.clone(),
        passthrough_wanted: opts.config.fs.passthrough,
    };
    if let Ok(text) = serde_json::to_vec(&state) {
        let _ = std::fs::write(&state_file, text);
    }
    tracing::info!(mountpoint = %opts.mountpoint.display(), user = %opts.config.username, "mounted");
    Ok(Mounted {
        mountpoint: opts.mountpoint,
        unmounter: Some(unmounter),
        done,
        session: Some(session),
        hasher,
        _catalog: Some(catalog_thread),
        catalog: catalog_handle,
        state_file,
        engine,
        peers,
        runtime,
    })
}

/// Gives every file whose size the catalog has out of step with its backing file
/// the backing file's size, logged as a write. A crash between a change to a
/// file's bytes and the catalog write recording it (a truncate, an open with
/// `O_TRUNC`, writes not yet closed or fsynced) leaves them apart, and reads are
/// served from the backing file. A file of the same size but another mtime may
/// have been written in place; it is hashed again and becomes a new version only
/// if its hash differs ([`Tree::suspect`]). Returns the files to hash again.
///
/// The mass-delete guard: a backing file that is missing altogether is never a
/// crash's doing (it is created with its node and removed only once the
/// catalog has dropped the node), and neither are most of a group's files
/// emptied at once. Such an owned group is held instead of repaired: its files
/// keep their catalog sizes and nothing of it is published, so members keep
/// their copies, until the store is restored and Brume mounted again.
fn repair_sizes(tree: &mut Tree, store: &Store) -> std::io::Result<Vec<(Ino, u64)>> {
    use std::collections::HashMap;
    struct Found {
        ino: Ino,
        group: Option<crate::ids::GroupId>,
        size: u64,
        len: u64,
        missing: bool,
        times: (Stamp, Stamp),
    }
    // A member's clean mirror keeps its bytes in the block cache, never in the
    // store (even if its block list did not reach the catalog before a crash:
    // the next sync installs it again).
    let files: Vec<Ino> = tree
        .files()
        .filter(|ino| {
            tree.get(*ino)
                .is_ok_and(|n| n.row.remote.is_none_or(|r| r.local_edit))
        })
        .collect();
    let mut found = Vec::new();
    let mut verify: Vec<(Ino, u64)> = Vec::new();
    // Per group: files with bytes, and how many of them lost all their bytes.
    let mut tally: HashMap<crate::ids::GroupId, (u64, u64, u64)> = HashMap::new();
    for ino in files {
        let Ok(node) = tree.get(ino) else { continue };
        let (size, group, recorded) = (node.row.size, node.row.group, node.row.mtime);
        let (len, missing, times) = match store.stat(ino) {
            Ok(st) => (
                st.st_size as u64,
                false,
                (
                    Stamp {
                        secs: st.st_mtime,
                        nanos: st.st_mtime_nsec as u32,
                    },
                    Stamp {
                        secs: st.st_ctime,
                        nanos: st.st_ctime_nsec as u32,
                    },
                ),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (0, size > 0, (recorded, Stamp::now()))
            }
            Err(e) => return Err(e),
        };
        if let Some(g) = group
            && size > 0
        {
            let t = tally.entry(g).or_default();
            t.0 += 1;
            t.1 += u64::from(missing);
            t.2 += u64::from(len == 0);
        }
        if len == size && !missing && times.0 != recorded {
            // Same size, other mtime: maybe written in place through passthrough
            // and never closed. The hash decides (a daemon write's mtime differs
            // too, harmlessly: its hash is the recorded one).
            if let Some(seq) = tree
                .suspect(ino, times)
                .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                verify.push((ino, seq));
            }
        }
        if len != size {
            found.push(Found {
                ino,
                group,
                size,
                len,
                missing,
                times,
            });
        }
    }
    for (g, (with_bytes, missing, emptied)) in tally {
        let owned = tree.group(g).is_some_and(|grp| grp.row.owned);
        if owned && (missing > 0 || (emptied >= 2 && emptied * 2 >= with_bytes)) {
            let why = format!(
                "{missing} of its {with_bytes} files with content are missing from the \
                 backing store and {} are empty: publishing nothing from it until the \
                 store ({}) is restored and Brume mounted again",
                emptied - missing,
                store.root().display()
            );
            let name = tree
                .group(g)
                .map(|grp| grp.row.name.clone())
                .unwrap_or_default();
            tracing::error!(group = %name, "{why}");
            tree.hold(g, why);
        }
    }
    let mut rehash = Vec::new();
    for f in found {
        if f.group
            .and_then(|g| tree.group(g))
            .is_some_and(|grp| grp.held.is_some())
        {
            continue;
        }
        if f.missing {
            tracing::warn!(ino = %f.ino, "backing file missing");
        }
        tracing::warn!(ino = %f.ino, catalog = f.size, backing = f.len, "file size out of step after a crash; taking the backing file's");
        let seq = tree
            .content_changed(f.ino, f.len, f.times.0, f.times.1, None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        rehash.push((f.ino, seq));
    }
    // Nothing of a held group is published, so nothing of it is verified.
    rehash.extend(verify.into_iter().filter(|(ino, _)| {
        tree.get(*ino)
            .ok()
            .and_then(|n| n.row.group)
            .and_then(|g| tree.group(g))
            .is_none_or(|g| g.held.is_none())
    }));
    Ok(rehash)
}

/// The state file of a mount using `data_dir`, if one was written.
pub fn mount_state(data_dir: &Path) -> Option<MountState> {
    let text = std::fs::read(data_dir.join(STATE_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}
