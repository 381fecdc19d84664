//! The `fuser::Filesystem` implementation. Every callback converts its arguments,
//! calls a helper returning `FsResult`, and replies: errors become an errno in
//! one place, [`FsError::errno`]. Local disk I/O is done inline; nothing here waits
//! on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::blocks::Hasher;
use crate::blocks::cache::BlockCache;
use crate::catalog::{Catalog, NodeKind, Op, Stamp};
use crate::fs::error::{FsError, FsResult};
use crate::fs::store::Store;
use crate::fs::tree::{self, Blocks, Node, ROOT, SetAttr, Tree, WSSERVER};
use crate::fs::workers::WorkerCpus;
use crate::ids::{GroupId, Ino};
use crate::sync::engine::{Engine, FetchError};

/// How long the kernel may cache entries and attributes. Brume is the only writer
/// of its namespace and the kernel invalidates what it changes itself.
const TTL: Duration = Duration::from_secs(300);

/// Extended attribute that tells how much of a mirrored file is in the cache.
const CACHED_XATTR: &str = "user.brume.cached";

/// Flags of every open file: the daemon buffers nothing and the kernel keeps
/// POSIX and flock locks itself, so close needs no FLUSH round trip.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// State shared by all handles of one open regular file.
#[derive(Debug)]
struct OpenInode {
    /// The backing file, opened read-write by the daemon.
    file: Arc<File>,
    /// Kernel passthrough registration; reused by every handle of the inode.
    backing: Option<BackingId>,
    /// Open handles.
    handles: u32,
    /// Open handles that may write.
    writers: u32,
    /// Size and mtime of the backing file when last reconciled with the node:
    /// a difference means a passthrough write the daemon did not see.
    seen: (u64, i64, i64),
    /// Content changed since the last change-log entry.
    dirty: bool,
    /// Byte ranges written through the daemon since the last entry; `None` once
    /// a write happened that the daemon could not see (passthrough).
    ranges: Option<Vec<(u64, u64)>>,
}

/// One open file handle.
#[derive(Debug)]
struct Handle {
    ino: Ino,
    file: Arc<File>,
    writable: bool,
}

/// A handle on a mirrored file whose content comes from the block cache.
#[derive(Debug, Clone)]
struct CachedHandle {
    ino: Ino,
    group: GroupId,
    blocks: Blocks,
    size: u64,
}

/// Bytes `offset..offset + size` of the mirrored file `h`, from the block cache or
/// the owner; on failure, the index of the block that could not be had and why.
async fn fetch_range(
    engine: &Engine,
    h: &CachedHandle,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, (usize, FetchError)> {
    let end = (offset + u64::from(size)).min(h.size);
    let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
    if offset >= end {
        return Ok(out);
    }
    let first = (offset / crate::blocks::BLOCK_SIZE) as usize;
    let last = ((end - 1) / crate::blocks::BLOCK_SIZE) as usize;
    // Every block of the range at once: a read waits for the slowest, not for
    // the sum of them (a size beyond its blocks has nothing more to read).
    let blocks = (first..=last).map_while(|i| h.blocks.get(i).map(|(hash, _)| (i, *hash)));
    let fetched = futures_util::future::try_join_all(blocks.map(|(i, hash)| async move {
        let data = engine
            .fetch(h.group, h.ino, i as u32, hash, true)
            .await
            .map_err(|e| (i, e))?;
        Ok::<_, (usize, FetchError)>((i, data))
    }))
    .await?;
    for (i, data) in fetched {
        let block_start = i as u64 * crate::blocks::BLOCK_SIZE;
        let from = offset.saturating_sub(block_start) as usize;
        let to = ((end - block_start) as usize).min(data.len());
        if from < to {
            out.extend_from_slice(&data[from..to]);
        }
    }
    Ok(out)
}

/// Waits (until `deadline`) for the mirrored file of `h` to get content other than
/// `h`'s from its owner; `None` if it does not, or is no longer a mirrored file.
async fn newer_content(
    tree: &RwLock<Tree>,
    h: &CachedHandle,
    deadline: tokio::time::Instant,
) -> Option<CachedHandle> {
    loop {
        {
            let tree = tree.read().unwrap_or_else(|e| e.into_inner());
            let blocks = match tree.cached_content(h.ino) {
                Some(blocks) => blocks,
                None if tree.awaits_blocks(h.ino) => h.blocks.clone(),
                None => return None,
            };
            if blocks != h.blocks {
                return Some(CachedHandle {
                    ino: h.ino,
                    group: h.group,
                    blocks,
                    size: tree.get(h.ino).ok()?.row.size,
                });
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `h` with its block list: at once if it has one, else once the list arrives
/// (until `deadline`); `None` if it does not.
async fn with_block_list(
    tree: &RwLock<Tree>,
    h: CachedHandle,
    deadline: tokio::time::Instant,
) -> Option<CachedHandle> {
    if h.blocks.is_empty() {
        newer_content(tree, &h, deadline).await
    } else {
        Some(h)
    }
}

/// Opens for writing under way, by inode, until their handle exists.
type Opening = Arc<Mutex<HashMap<Ino, u32>>>;

/// Counts an open for writing of one inode as under way until it drops: once
/// the open has its handle (before its reply: the handle's release may come
/// at once), or failed.
struct WriterOpening {
    opening: Opening,
    ino: Ino,
}

impl WriterOpening {
    fn new(opening: &Opening, ino: Ino) -> Self {
        *opening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ino)
            .or_default() += 1;
        Self {
            opening: opening.clone(),
            ino,
        }
    }
}

impl Drop for WriterOpening {
    fn drop(&mut self) {
        let mut opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = opening.get_mut(&self.ino) {
            *n -= 1;
            if *n == 0 {
                opening.remove(&self.ino);
            }
        }
    }
}

/// What finishing an open needs, detached from `BrumeFs` so that a task can do it
/// after fetching blocks.
#[derive(Clone)]
struct Opener {
    tree: Arc<RwLock<Tree>>,
    open: Arc<Mutex<HashMap<Ino, OpenInode>>>,
    handles: Arc<Mutex<HashMap<u64, Handle>>>,
    next_fh: Arc<AtomicU64>,
    store: Store,
    cache: Arc<BlockCache>,
    passthrough: bool,
}

/// One open directory handle: a snapshot of the entries taken at opendir, so that
/// offsets stay stable while the directory changes.
#[derive(Debug)]
struct DirHandle {
    entries: Vec<(Ino, NodeKind, Vec<u8>)>,
}

/// The filesystem served to the kernel.
#[derive(Debug)]
pub(crate) struct BrumeFs {
    /// The namespace. Readers (lookup, getattr, readdir) share it; every mutation
    /// takes it exclusively, which also orders the catalog ops it queues.
    tree: Arc<RwLock<Tree>>,
    /// Open regular files by inode; lock order: `tree` before `open`. Shared with
    /// tasks that finish an open after fetching blocks.
    open: Arc<Mutex<HashMap<Ino, OpenInode>>>,
    /// File handles by fh (shared likewise).
    handles: Arc<Mutex<HashMap<u64, Handle>>>,
    /// Handles of mirrored files read from the block cache, by fh.
    cached: Mutex<HashMap<u64, CachedHandle>>,
    /// Mirrored files: the content sequence their kernel pages were read at.
    page_seq: Mutex<HashMap<Ino, u64>>,
    /// Opens for writing under way, by inode, until their handle exists: a
    /// `.members` is not read while one may have emptied it (`O_TRUNC`).
    writers_opening: Opening,
    /// Directory handles by fh.
    dirs: Mutex<HashMap<u64, DirHandle>>,
    next_fh: Arc<AtomicU64>,
    store: Store,
    /// Members' block cache.
    cache: Arc<BlockCache>,
    /// The sync engine and the runtime its tasks run on, once sync is started
    /// (set by the mount after the session exists, hence shared).
    sync: Arc<std::sync::OnceLock<(Engine, tokio::runtime::Handle)>>,
    catalog: Catalog,
    hasher: Hasher,
    /// Whether the kernel accepted passthrough (decided in `init`).
    passthrough: AtomicBool,
    want_passthrough: bool,
    /// Content of `.wsserver.json`.
    wsserver: Vec<u8>,
    owner: (u32, u32),
    /// CPUs the worker threads pin themselves to.
    workers: WorkerCpus,
}

fn kind_to_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

fn stamp_of(t: TimeOrNow) -> Stamp {
    match t {
        TimeOrNow::SpecificTime(t) => Stamp::from_system(t),
        TimeOrNow::Now => Stamp::now(),
    }
}

fn name_bytes(name: &OsStr) -> &[u8] {
    name.as_bytes()
}

impl BrumeFs {
    // Built in exactly one place (the mount), from the parts it has just made.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        tree: Arc<RwLock<Tree>>,
        store: Store,
        catalog: Catalog,
        hasher: Hasher,
        want_passthrough: bool,
        wsserver: Vec<u8>,
        owner: (u32, u32),
        cache: Arc<BlockCache>,
        sync: Arc<std::sync::OnceLock<(Engine, tokio::runtime::Handle)>>,
    ) -> Self {
        Self {
            tree,
            open: Arc::new(Mutex::new(HashMap::new())),
            handles: Arc::new(Mutex::new(HashMap::new())),
            cached: Mutex::new(HashMap::new()),
            page_seq: Mutex::new(HashMap::new()),
            writers_opening: Arc::new(Mutex::new(HashMap::new())),
            dirs: Mutex::new(HashMap::new()),
            next_fh: Arc::new(AtomicU64::new(1)),
            store,
            cache,
            sync,
            catalog,
            hasher,
            passthrough: AtomicBool::new(false),
            want_passthrough,
            wsserver,
            owner,
            workers: WorkerCpus::default(),
        }
    }

    /// Pins worker threads to CPUs as `workers` plans, each when it first serves
    /// one of the common requests.
    pub(crate) fn with_workers(mut self, workers: WorkerCpus) -> Self {
        if !workers.cpus().is_empty() {
            tracing::info!(cpus = ?workers.cpus(), "one FUSE worker per CPU");
        }
        self.workers = workers;
        self
    }

    fn tree_read(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        // A panic while holding the lock leaves the tree as it was at the panic:
        // every mutation keeps it consistent step by step, so keep serving.
        self.tree.read().unwrap_or_else(|e| e.into_inner())
    }

    fn tree_write(&self) -> crate::fs::tree::TreeWrite<'_> {
        crate::fs::tree::write(&self.tree)
    }

    fn open_map(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, OpenInode>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dir_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DirHandle>> {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wsserver_attr(&self) -> FileAttr {
        let t = SystemTime::now();
        FileAttr {
            ino: INodeNo(WSSERVER.0),
            size: self.wsserver.len() as u64,
            blocks: 1,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The attributes of `node`, reconciled with the backing file if a write the
    /// daemon did not see may have changed it.
    fn attr_of(&self, node: &Node) -> FileAttr {
        let r = &node.row;
        let mut size = r.size;
        let mut mtime = r.mtime;
        let mut ctime = r.ctime;
        let mut blocks = size.div_ceil(512);
        if r.kind == NodeKind::File
            && node.opens.load(Ordering::Relaxed) > 0
            && let Some(oi) = self.open_map().get(&r.ino)
            && let Ok(m) = oi.file.metadata()
        {
            blocks = m.blocks();
            if (m.size(), m.mtime(), m.mtime_nsec()) != oi.seen {
                size = m.size();
                mtime = Stamp {
                    secs: m.mtime(),
                    nanos: m.mtime_nsec() as u32,
                };
                ctime = ctime.max(Stamp {
                    secs: m.ctime(),
                    nanos: m.ctime_nsec() as u32,
                });
            }
        }
        FileAttr {
            ino: INodeNo(r.ino.0),
            size,
            blocks,
            atime: r.atime.to_system(),
            mtime: mtime.to_system(),
            ctime: ctime.to_system(),
            crtime: r.ctime.to_system(),
            kind: kind_to_type(r.kind),
            perm: r.perm,
            nlink: r.nlink,
            uid: r.uid,
            gid: r.gid,
            rdev: r.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn getattr_ino(&self, ino: Ino) -> FsResult<FileAttr> {
        if ino == WSSERVER {
            return Ok(self.wsserver_attr());
        }
        let tree = self.tree_read();
        Ok(self.attr_of(tree.get(ino)?))
    }

    /// Deletes the bytes of a node that lost its last link and handle, once the
    /// catalog has committed the node's removal: deleting them first would let a
    /// crash in between leave a committed name whose bytes are gone.
    fn drop_node(&self, node: Option<Node>) {
        if let Some(n) = node
            && n.row.kind == NodeKind::File
            && let Err(e) = self
                .catalog
                .send(Op::RemoveFile(self.store.path(n.row.ino)))
        {
            // The sweep at the next mount removes it.
            tracing::warn!(ino = %n.row.ino, cause = ?e, "backing file left for the next mount");
        }
    }

    /// Brings the node's size and times up to date with its backing file and, if
    /// the content changed since the last entry, appends a `write` entry. Called
    /// when a writable handle is released or the file is synced.
    fn reconcile(&self, tree: &mut Tree, ino: Ino, log: bool) -> FsResult<()> {
        let mut open = self.open_map();
        let Some(oi) = open.get_mut(&ino) else {
            return Ok(());
        };
        let m = oi.file.metadata()?;
        let stat = (m.size(), m.mtime(), m.mtime_nsec());
        if stat != oi.seen {
            oi.seen = stat;
            oi.dirty = true;
            oi.ranges = None;
        }
        if !(oi.dirty && log) {
            return Ok(());
        }
        oi.dirty = false;
        let ranges = oi.ranges.replace(Vec::new());
        drop(open);
        let mtime = Stamp {
            secs: m.mtime(),
            nanos: m.mtime_nsec() as u32,
        };
        let ctime = Stamp {
            secs: m.ctime(),
            nanos: m.ctime_nsec() as u32,
        };
        // Writes through the daemon already set the node's times; keep them.
        let node = tree.get(ino)?;
        let (mtime, ctime) = if ranges.is_some() {
            (node.row.mtime, node.row.ctime)
        } else {
            (mtime, ctime)
        };
        let seq = tree.content_changed(ino, m.size(), mtime, ctime, ranges)?;
        self.hasher.enqueue(ino, seq);
        Ok(())
    }

    /// Logs the writes not yet recorded of the open files at `names` (parent,
    /// name), before a rename or unlink of them is logged. The kernel sends a
    /// close's RELEASE without waiting for it, so a rename made right after a
    /// close can arrive first; this keeps the log in the order of the calls.
    fn record_pending_writes(&self, tree: &mut Tree, names: &[(Ino, &[u8])]) -> FsResult<()> {
        for &(parent, name) in names {
            if let Some(ino) = tree.child(parent, name) {
                self.reconcile(tree, ino, true)?;
            }
        }
        Ok(())
    }

    /// The whole content of `ino`'s backing file; empty if it cannot be read.
    fn read_backing(&self, ino: Ino) -> Vec<u8> {
        let mut text = Vec::new();
        if let Err(e) = self
            .store
            .open_read(ino)
            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut text))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%ino, cause = ?e, "cannot read backing file");
        }
        text
    }

    /// If `ino` is a group's `.members`, re-reads it.
    fn refresh_members_of(&self, tree: &mut Tree, ino: Ino) -> FsResult<()> {
        let node = tree.get(ino)?;
        let parent = node.parent;
        if let Some(g) = tree.members_file_group(parent, tree::MEMBERS_NAME)
            && tree.child(parent, tree::MEMBERS_NAME) == Some(ino)
        {
            let text = self.read_backing(ino);
            tree.set_members(g, tree::parse_members(&text))?;
        }
        Ok(())
    }

    /// Re-reads the member list of the group whose root is `dir`, if `name` is its
    /// `.members` (after a rename onto it or its removal).
    fn refresh_members_at(&self, tree: &mut Tree, dir: Ino, name: &[u8]) -> FsResult<()> {
        if let Some(g) = tree.members_file_group(dir, name) {
            let members = match tree.child(dir, name) {
                Some(ino) => tree::parse_members(&self.read_backing(ino)),
                None => Vec::new(),
            };
            tree.set_members(g, members)?;
        }
        Ok(())
    }

    fn do_mknod(
        &self,
        req: &Request,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<(FileAttr, Option<File>)> {
        let kind = tree::kind_of_mode(mode).ok_or(FsError::Invalid { why: "file type" })?;
        let mut tree = self.tree_write();
        let ino = tree.create(
            parent,
            name,
            kind,
            mode & !umask & 0o7777,
            req.uid(),
            req.gid(),
            rdev,
            None,
        )?;
        let file = match kind {
            NodeKind::File => Some(self.store.create(ino)?),
            _ => None,
        };
        Ok((self.attr_of(tree.get(ino)?), file))
    }

    fn cached_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, CachedHandle>> {
        self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If `ino` is a mirrored file whose content is in the block cache: what a
    /// handle on it needs.
    fn mirrored(&self, ino: Ino) -> Option<CachedHandle> {
        let tree = self.tree_read();
        let blocks = match tree.cached_content(ino) {
            Some(blocks) => blocks,
            // Content not known yet: an empty list, which reads and opens for
            // writing wait to see replaced.
            None if tree.awaits_blocks(ino) => Blocks::from(Vec::new()),
            None => return None,
        };
        let n = tree.get(ino).ok()?;
        Some(CachedHandle {
            ino,
            group: n.row.group?,
            blocks,
            size: n.row.size,
        })
    }

    /// Fetches the missing blocks of a mirrored file in a task, then opens it for
    /// writing (copying it into the backing store) and replies from there.
    fn open_after_fetch(&self, h: CachedHandle, reply: ReplyOpen) {
        let Some((engine, runtime)) = self.sync.get() else {
            tracing::warn!(ino = %h.ino, "content not cached and no sync running");
            return reply.error(Errno::EIO);
        };
        let engine = engine.clone();
        let opener = self.opener();
        let tree = self.tree.clone();
        // Owns the reply until the blocks are here (or the owner is unreachable).
        runtime.spawn(async move {
            let ino = h.ino;
            let deadline = tokio::time::Instant::now() + engine.read_timeout();
            let Some(h) = with_block_list(&tree, h, deadline).await else {
                tracing::warn!(%ino, "cannot open for writing: its block list did not arrive");
                return reply.error(Errno::EIO);
            };
            for (i, (hash, _)) in h.blocks.iter().enumerate() {
                if let Err(e) = engine.fetch(h.group, h.ino, i as u32, *hash, true).await {
                    tracing::warn!(ino = %h.ino, block = i, cause = %e, "cannot open for writing");
                    return reply.error(Errno::EIO);
                }
            }
            opener.open_and_reply(h.ino, true, None, reply);
        });
    }

    /// Reads a mirrored file from the block cache; blocks not there are fetched
    /// from the owner in a task, which then replies (EIO if the owner cannot
    /// send them within the read timeout).
    fn read_cached(&self, h: CachedHandle, offset: u64, size: u32, reply: ReplyData) {
        let end = (offset + u64::from(size)).min(h.size);
        if offset >= end {
            return reply.data(&[]);
        }
        if h.blocks.is_empty() {
            // The block list has not arrived: wait for it in a task.
            return self.read_later(h, offset, size, reply);
        }
        let first = (offset / crate::blocks::BLOCK_SIZE) as usize;
        let last = ((end - 1) / crate::blocks::BLOCK_SIZE) as usize;
        let mut parts: Vec<Option<Arc<[u8]>>> = Vec::with_capacity(last - first + 1);
        for (hash, _) in h.blocks.get(first..=last).unwrap_or_default() {
            match self.cache.read(hash) {
                Ok(d) => parts.push(d),
                Err(e) => {
                    tracing::error!(ino = %h.ino, cause = %e, "block cache read failed");
                    return reply.error(Errno::EIO);
                }
            }
        }
        if parts.len() != last - first + 1 {
            return reply.error(Errno::EIO);
        }
        let assemble = move |parts: Vec<Arc<[u8]>>| {
            let mut out = Vec::with_capacity((end - offset) as usize);
            for (k, data) in parts.iter().enumerate() {
                let block_start = (first + k) as u64 * crate::blocks::BLOCK_SIZE;
                let from = offset.saturating_sub(block_start) as usize;
                let to = ((end - block_start) as usize).min(data.len());
                if from < to {
                    out.extend_from_slice(&data[from..to]);
                }
            }
            out
        };
        if parts.iter().all(Option::is_some) {
            return reply.data(&assemble(parts.into_iter().flatten().collect()));
        }
        self.read_later(h, offset, size, reply);
    }

    /// Reads from mirrored file `h` in a task: waits for its block list if it
    /// has none yet, fetches the blocks the cache lacks, then replies.
    fn read_later(&self, h: CachedHandle, offset: u64, size: u32, reply: ReplyData) {
        let Some((engine, runtime)) = self.sync.get() else {
            tracing::warn!(ino = %h.ino, "block not cached and no sync running");
            return reply.error(Errno::EIO);
        };
        let engine = engine.clone();
        let tree = self.tree.clone();
        // Owns the reply until the missing blocks arrive or the wait times out.
        runtime.spawn(async move {
            let ino = h.ino;
            let deadline = tokio::time::Instant::now() + engine.read_timeout();
            let Some(mut h) = with_block_list(&tree, h, deadline).await else {
                tracing::error!(%ino, "read failed: the block list did not arrive");
                return reply.error(Errno::EIO);
            };
            loop {
                // However many blocks it needs, a read waits at most the timeout.
                let fetched =
                    tokio::time::timeout_at(deadline, fetch_range(&engine, &h, offset, size))
                        .await
                        .unwrap_or_else(|_| {
                            Err((
                                0,
                                FetchError::Unreachable {
                                    reason: format!(
                                        "no answer from the owner within {:?}",
                                        engine.read_timeout()
                                    ),
                                },
                            ))
                        });
                let (i, e) = match fetched {
                    Ok(data) => return reply.data(&data),
                    Err(failed) => failed,
                };
                // The owner has moved on from the version this handle started with
                // and no longer has its blocks; its newer version is on its way.
                // Read that one, as from a local file rewritten in place.
                if matches!(e, FetchError::Stale { .. })
                    && let Some(newer) = newer_content(&tree, &h, deadline).await
                {
                    h = newer;
                    continue;
                }
                tracing::error!(ino = %h.ino, block = i, cause = %e, "read failed");
                return reply.error(Errno::EIO);
            }
        });
    }

    fn opener(&self) -> Opener {
        Opener {
            tree: self.tree.clone(),
            open: self.open.clone(),
            handles: self.handles.clone(),
            next_fh: self.next_fh.clone(),
            store: self.store.clone(),
            cache: self.cache.clone(),
            passthrough: self.passthrough.load(Ordering::Relaxed),
        }
    }

    fn release_file(&self, fh: u64) -> FsResult<()> {
        let Some(h) = self.handle_map().remove(&fh) else {
            return Err(FsError::BadHandle);
        };
        // Only a handle that may have changed the file needs the write lock, and
        // only if the content did change.
        // The handle's bookkeeping below is done whatever this says.
        let reconciled = if h.writable && self.content_may_have_changed(h.ino) {
            let mut tree = self.tree_write();
            self.reconcile(&mut tree, h.ino, true)
        } else {
            Ok(())
        };
        let writers_left = {
            let mut open = self.open_map();
            let left = match open.get_mut(&h.ino) {
                Some(oi) => {
                    oi.handles -= 1;
                    oi.writers -= u32::from(h.writable);
                    let left = oi.writers;
                    if oi.handles == 0 {
                        open.remove(&h.ino);
                    }
                    left
                }
                None => 0,
            };
            left + self
                .writers_opening
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&h.ino)
                .copied()
                .unwrap_or(0)
        };
        if writers_left == 0 {
            self.settle(h.ino, h.writable)?;
        }
        reconciled?;
        let unused = self.tree_read().closed(h.ino)?;
        if unused {
            // Re-checked under the write lock: another handle may have gone first.
            // The lock (and its catalog ops) ends before the bytes go.
            let gone = self.tree_write().release_if_unused(h.ino);
            if let Ok(gone) = gone {
                self.drop_node(gone);
            }
        }
        Ok(())
    }

    /// Once the last writer of `ino` has closed it: a file of a group we own
    /// whose content is not hashed yet (new, or truncated) is hashed now, so
    /// that members get it whole; and a group's `.members` is read, never
    /// while it is half-written (the kernel's release of one writer may come
    /// after the next one's open, which an `O_TRUNC` empties: that open counts
    /// as a writer from its start, and truncates under the tree lock, which
    /// this holds while it reads).
    fn settle(&self, ino: Ino, wrote: bool) -> FsResult<()> {
        let (unhashed, members) = {
            let tree = self.tree_read();
            let Ok(n) = tree.get(ino) else {
                return Ok(());
            };
            (
                n.row.kind == NodeKind::File && n.blocks.is_none() && tree.in_owned_group(ino),
                wrote && tree.is_members_file(ino),
            )
        };
        if unhashed {
            let seq = self.tree_read().get(ino)?.content_seq;
            self.hasher.enqueue(ino, seq);
        }
        if members {
            let mut tree = self.tree_write();
            let writers = self.open_map().get(&ino).map_or(0, |oi| oi.writers)
                + self
                    .writers_opening
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&ino)
                    .copied()
                    .unwrap_or(0);
            if writers == 0 {
                self.refresh_members_of(&mut tree, ino)?;
            }
        }
        Ok(())
    }

    /// Whether `ino`'s content changed since its last change-log entry: a write
    /// through the daemon, or a backing file that no longer matches what was seen.
    fn content_may_have_changed(&self, ino: Ino) -> bool {
        let open = self.open_map();
        let Some(oi) = open.get(&ino) else {
            return false;
        };
        oi.dirty
            || oi
                .file
                .metadata()
                .map(|m| (m.size(), m.mtime(), m.mtime_nsec()) != oi.seen)
                .unwrap_or(true)
    }

    /// Whether the caller of `req` is an outsider to file `ino` for dropping
    /// privileges: not root and not in the file's group. Asked only for a file
    /// whose setgid survives anyone else (no group-execute), so the supplementary
    /// groups are read from `/proc` rarely; if they cannot be, the caller counts
    /// as an outsider and the bit goes.
    fn outsider(&self, req: &Request, ino: Ino) -> bool {
        let gid = match self.tree_read().get(ino) {
            Ok(n)
                if n.row.perm & libc::S_ISGID as u16 != 0
                    && n.row.perm & libc::S_IXGRP as u16 == 0 =>
            {
                n.row.gid
            }
            _ => return false,
        };
        if req.uid() == 0 || req.gid() == gid {
            return false;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", req.pid()));
        !status.is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .is_some_and(|g| g.split_whitespace().any(|g| g.parse() == Ok(gid)))
        })
    }

    /// Empties regular file `ino` for an open with `O_TRUNC`, as the setattr
    /// the kernel would otherwise send after the open; an unprivileged opener
    /// drops setuid and setgid, as a truncate does.
    fn truncate_at_open(&self, req: &Request, ino: Ino) -> FsResult<()> {
        if self.tree_read().get(ino)?.row.kind != NodeKind::File {
            return Ok(());
        }
        let set = SetAttr {
            size: Some(0),
            drop_privileges: req.uid() != 0,
            outsider: self.outsider(req, ino),
            ..SetAttr::default()
        };
        // The opener writes the new content and closes: `.members` is read then.
        self.do_setattr(ino, set, None, false).map(|_| ())
    }

    fn handle(&self, fh: FileHandle) -> FsResult<(Ino, Arc<File>, bool)> {
        self.handle_map()
            .get(&fh.0)
            .map(|h| (h.ino, h.file.clone(), h.writable))
            .ok_or(FsError::BadHandle)
    }

    /// Applies `set` to `ino`; `complete`: a truncation is all the caller does
    /// to the file (a `truncate` by path), so a `.members` it empties is read now.
    fn do_setattr(
        &self,
        ino: Ino,
        set: SetAttr,
        fh: Option<FileHandle>,
        complete: bool,
    ) -> FsResult<FileAttr> {
        if ino == WSSERVER {
            return Err(FsError::NotPermitted {
                why: ".wsserver.json is read-only",
            });
        }
        let mut tree = self.tree_write();
        let kind = tree.get(ino)?.row.kind;
        if kind == NodeKind::File && (set.size.is_some() || set.mtime.is_some()) {
            // A mirrored file becomes the member's: its bytes (up to the new
            // size) move from the block cache to the backing store first.
            self.opener()
                .copy_up_prefix(&mut tree, ino, set.size.unwrap_or(u64::MAX))?;
            // Keep the backing file's size and mtime in step so that a later
            // reconcile does not mistake them for a write.
            let file = match fh.and_then(|fh| self.handle(fh).ok()) {
                Some((_, f, _)) => f,
                None => match self.open_map().get(&ino) {
                    Some(oi) => oi.file.clone(),
                    None => Arc::new(self.store.open_rw(ino)?),
                },
            };
            if self.open_map().contains_key(&ino) {
                self.reconcile(&mut tree, ino, false)?;
            }
            if let Some(size) = set.size {
                file.set_len(size)?;
            }
            if let Some(mt) = set.mtime {
                let at = set.atime.unwrap_or(tree.get(ino)?.row.atime);
                let times = [
                    libc::timespec {
                        tv_sec: at.secs,
                        tv_nsec: at.nanos as i64,
                    },
                    libc::timespec {
                        tv_sec: mt.secs,
                        tv_nsec: mt.nanos as i64,
                    },
                ];
                // SAFETY: the fd is open for the duration of the call and `times`
                // points to two valid timespecs.
                let rc = unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
            if let Some(oi) = self.open_map().get_mut(&ino) {
                let m = oi.file.metadata()?;
                oi.seen = (m.size(), m.mtime(), m.mtime_nsec());
                if set.size.is_some() {
                    oi.ranges = None;
                }
            }
        }
        tree.setattr(ino, &set)?;
        // A truncation by path is complete: hashed (and a `.members` read) now.
        // One through an open file is completed by its writer, whose close
        // does both (see `settle`): members never see it emptied half-way.
        if set.size.is_some() && complete && !self.open_map().contains_key(&ino) {
            let seq = tree.get(ino)?.content_seq;
            self.hasher.enqueue(ino, seq);
            self.refresh_members_of(&mut tree, ino)?;
        }
        Ok(self.attr_of(tree.get(ino)?))
    }

    fn statfs_data(&self) -> FsResult<libc::statvfs> {
        Ok(self.store.statvfs()?)
    }

    /// Flushes everything to disk: used at unmount.
    pub(crate) fn flush_all(&self) {
        if let Err(e) = self.catalog.barrier() {
            tracing::error!(cause = ?e, "final catalog flush failed");
        }
    }
}

impl Opener {
    /// Opens an existing file and sends the reply (passthrough when possible).
    fn open_and_reply(
        &self,
        ino: Ino,
        writable: bool,
        opening: Option<WriterOpening>,
        reply: ReplyOpen,
    ) {
        // The reply is needed both to register the backing file and to answer.
        let reply = std::cell::RefCell::new(Some(reply));
        let r = self.open_file(
            ino,
            None,
            writable,
            opening,
            |f| match reply.borrow().as_ref() {
                Some(r) => r.open_backing(f),
                None => Err(std::io::Error::other("reply already sent")),
            },
            |fh, backing| {
                if let Some(r) = reply.borrow_mut().take() {
                    match backing {
                        Some(b) => r.opened_passthrough(fh, OPEN_FLAGS, b),
                        None => r.opened(fh, OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE),
                    }
                }
            },
        );
        if let Err(e) = r
            && let Some(r) = reply.borrow_mut().take()
        {
            r.error(e.errno());
        }
    }

    /// Opens `ino` for a new handle and replies through `reply_with`, with the
    /// inode's passthrough backing id if there is one. `register` makes the
    /// backing id from the backing file through the reply object. A mirrored file
    /// opened for writing is first copied from the block cache into the backing
    /// store (its blocks must be cached).
    fn open_file(
        &self,
        ino: Ino,
        created: Option<File>,
        writable: bool,
        opening: Option<WriterOpening>,
        register: impl FnOnce(&File) -> std::io::Result<BackingId>,
        reply_with: impl FnOnce(FileHandle, Option<&BackingId>),
    ) -> FsResult<()> {
        if writable {
            let mut tree = crate::fs::tree::write(&self.tree);
            self.copy_up(&mut tree, ino)?;
        }
        let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
        let node = tree.get(ino)?;
        match node.row.kind {
            NodeKind::File => {}
            NodeKind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid { why: "not a file" }),
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let oi = match open.entry(ino) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let file = match created {
                    Some(f) => f,
                    None => self.store.open_rw(ino)?,
                };
                let m = file.metadata()?;
                let backing = if self.passthrough {
                    match register(&file) {
                        Ok(b) => Some(b),
                        Err(e) => {
                            tracing::warn!(%ino, cause = ?e, "passthrough refused; serving through the daemon");
                            None
                        }
                    }
                } else {
                    None
                };
                v.insert(OpenInode {
                    file: Arc::new(file),
                    backing,
                    handles: 0,
                    writers: 0,
                    seen: (m.size(), m.mtime(), m.mtime_nsec()),
                    dirty: false,
                    ranges: Some(Vec::new()),
                })
            }
        };
        oi.handles += 1;
        oi.writers += u32::from(writable);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                fh,
                Handle {
                    ino,
                    file: oi.file.clone(),
                    writable,
                },
            );
        tree.opened(ino)?;
        // The handle exists: from now on it counts as the writer.
        drop(opening);
        reply_with(FileHandle(fh), oi.backing.as_ref());
        Ok(())
    }

    /// Moves a mirrored file's content from the block cache into the backing
    /// store before the member changes it: from then on it is the member's.
    fn copy_up(&self, tree: &mut Tree, ino: Ino) -> FsResult<()> {
        self.copy_up_prefix(tree, ino, u64::MAX)
    }

    /// [`Self::copy_up`] of only the first `keep` bytes, for a truncation: the
    /// blocks past them are not needed (none at all for a truncation to zero).
    fn copy_up_prefix(&self, tree: &mut Tree, ino: Ino, keep: u64) -> FsResult<()> {
        let Some(blocks) = tree.cached_content(ino) else {
            // A mirror whose block list has not arrived has nothing to copy yet.
            if tree.awaits_blocks(ino) {
                return Err(FsError::Unavailable);
            }
            return Ok(());
        };
        let mut needed = Vec::new();
        let mut at = 0u64;
        for (h, len) in blocks.iter() {
            if at >= keep {
                break;
            }
            needed.push((*h, (u64::from(*len)).min(keep - at)));
            at += u64::from(*len);
        }
        if !needed.iter().all(|(h, _)| self.cache.contains(h)) {
            return Err(FsError::Unavailable);
        }
        let mut file = self.store.create(ino)?;
        for (h, take) in needed {
            let data = self
                .cache
                .read(&h)
                .map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?
                .ok_or(FsError::Unavailable)?;
            std::io::Write::write_all(&mut file, &data[..take as usize])?;
        }
        tree.begin_local_edit(ino)?;
        Ok(())
    }
}

fn reply_entry(reply: ReplyEntry, r: FsResult<FileAttr>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e.errno()),
    }
}

fn reply_empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e.errno()),
    }
}

impl fuser::Filesystem for BrumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_SPLICE_READ
            | InitFlags::FUSE_SPLICE_WRITE
            | InitFlags::FUSE_SPLICE_MOVE
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        for flag in wanted.iter() {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let root = nix_geteuid() == 0;
        if self.want_passthrough && root {
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                self.passthrough.store(true, Ordering::Relaxed);
                tracing::info!("kernel passthrough enabled");
            } else {
                tracing::info!("kernel has no FUSE passthrough; file data goes through the daemon");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.flush_all();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.workers.settle();
        let parent = Ino(parent.0);
        let name = name_bytes(name);
        if parent == ROOT && name == tree::WSSERVER_NAME {
            return reply.entry(&TTL, &self.wsserver_attr(), Generation(0));
        }
        let tree = self.tree_read();
        match tree.lookup(parent, name) {
            Ok(ino) => match tree.get(ino) {
                Ok(n) => reply.entry(&TTL, &self.attr_of(n), Generation(0)),
                Err(e) => reply.error(e.errno()),
            },
            Err(e) => reply.error(e.errno()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.workers.settle();
        match self.getattr_ino(Ino(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.workers.settle();
        let mut set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(stamp_of),
            mtime: mtime.map(stamp_of),
            ctime: ctime.map(Stamp::from_system),
            drop_privileges: false,
            outsider: false,
        };
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves dropping setuid and
        // setgid to the filesystem (and in exchange stops asking for fresh
        // attributes before every chown). It sends a setattr with nothing to
        // set when a write needs them dropped (through passthrough or the
        // daemon alike, so WRITE's FUSE_WRITE_KILL_SUIDGID adds nothing) and
        // for chown(-1, -1); a change of owner always drops them, a truncate
        // only for an unprivileged caller.
        set.drop_privileges = set.mode.is_none()
            && (set.uid.is_some()
                || set.gid.is_some()
                || set.is_empty()
                || (set.size.is_some() && req.uid() != 0));
        // A change of owner keeps setgid without group-execute (the VFS asks
        // about the new group there); the kernel's other requests do not.
        set.outsider = set.drop_privileges
            && set.uid.is_none()
            && set.gid.is_none()
            && self.outsider(req, Ino(ino.0));
        match self.do_setattr(Ino(ino.0), set, fh, fh.is_none()) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let tree = self.tree_read();
        match tree.get(Ino(ino.0)) {
            Ok(n) => match &n.row.target {
                Some(t) => reply.data(t),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e.errno()),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let made = self
            .do_mknod(req, Ino(parent.0), name_bytes(name), mode, umask, rdev)
            .map(|(attr, _)| attr);
        // A regular file made without an open handle is complete (and empty):
        // no close will settle it.
        if let Ok(attr) = &made
            && attr.kind == fuser::FileType::RegularFile
        {
            let _ = self.settle(Ino(attr.ino.0), false);
        }
        reply_entry(reply, made);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.do_mknod(
                req,
                Ino(parent.0),
                name_bytes(name),
                libc::S_IFDIR | mode,
                umask,
                0,
            )
            .map(|(attr, _)| attr),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let mut tree = self.tree_write();
            self.record_pending_writes(&mut tree, &[(Ino(parent.0), name_bytes(name))])?;
            let gone = tree.remove(Ino(parent.0), name_bytes(name), false)?;
            self.refresh_members_at(&mut tree, Ino(parent.0), name_bytes(name))?;
            drop(tree);
            self.drop_node(gone);
            Ok(())
        })();
        reply_empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .tree_write()
            .remove(Ino(parent.0), name_bytes(name), true)
            .map(|_| ());
        reply_empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let target = target.as_os_str().as_bytes();
            if target.len() > 4095 {
                return Err(FsError::NameTooLong);
            }
            let mut tree = self.tree_write();
            let ino = tree.create(
                Ino(parent.0),
                name_bytes(link_name),
                NodeKind::Symlink,
                0o777,
                req.uid(),
                req.gid(),
                0,
                Some(target.to_vec()),
            )?;
            Ok(self.attr_of(tree.get(ino)?))
        })();
        reply_entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                return Err(FsError::Invalid { why: "whiteout" });
            }
            let (p, n) = (Ino(parent.0), name_bytes(name));
            let (np, nn) = (Ino(newparent.0), name_bytes(newname));
            let mut tree = self.tree_write();
            self.record_pending_writes(&mut tree, &[(p, n), (np, nn)])?;
            let gone = tree.rename(
                p,
                n,
                np,
                nn,
                flags.contains(RenameFlags::RENAME_NOREPLACE),
                flags.contains(RenameFlags::RENAME_EXCHANGE),
            )?;
            self.refresh_members_at(&mut tree, p, n)?;
            self.refresh_members_at(&mut tree, np, nn)?;
            drop(tree);
            self.drop_node(gone);
            Ok(())
        })();
        reply_empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let mut tree = self.tree_write();
            tree.link(Ino(ino.0), Ino(newparent.0), name_bytes(newname))?;
            Ok(self.attr_of(tree.get(Ino(ino.0))?))
        })();
        reply_entry(reply, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.workers.settle();
        let ino = Ino(ino.0);
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if ino == WSSERVER {
            if writable {
                return reply.error(Errno::EACCES);
            }
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        }
        let opening = writable.then(|| WriterOpening::new(&self.writers_opening, ino));
        // `O_TRUNC` comes with the open (FUSE_ATOMIC_O_TRUNC), not as a setattr
        // after it: a mirrored file is emptied without fetching the bytes it
        // is about to lose, so it can be overwritten with the owner away.
        if flags.0 & libc::O_TRUNC != 0
            && let Err(e) = self.truncate_at_open(req, ino)
        {
            return reply.error(e.errno());
        }
        let mirrored = self.mirrored(ino);
        if let Some(h) = mirrored {
            if !writable {
                let tree = self.tree_read();
                return match tree.opened(ino) {
                    Ok(()) => {
                        // Keep the kernel's pages only if the content is the one
                        // they were read from.
                        let seq = tree.get(ino).map_or(0, |n| n.content_seq);
                        drop(tree);
                        let same = self
                            .page_seq
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(ino, seq)
                            == Some(seq);
                        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                        self.cached_map().insert(fh, h);
                        let keep = if same {
                            FopenFlags::FOPEN_KEEP_CACHE
                        } else {
                            FopenFlags::empty()
                        };
                        reply.opened(FileHandle(fh), OPEN_FLAGS | keep)
                    }
                    Err(e) => reply.error(e.errno()),
                };
            }
            if h.blocks.is_empty() || !h.blocks.iter().all(|(b, _)| self.cache.contains(b)) {
                // Writing needs the whole content here first: fetch what is missing
                // in a task, then finish the open there.
                return self.open_after_fetch(h, reply);
            }
        }
        self.opener().open_and_reply(ino, writable, opening, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.workers.settle();
        let (attr, file) = match self.do_mknod(
            req,
            Ino(parent.0),
            name_bytes(name),
            libc::S_IFREG | (mode & 0o7777),
            umask,
            0,
        ) {
            Ok(a) => a,
            Err(e) => return reply.error(e.errno()),
        };
        let writable = OpenFlags(flags).acc_mode() != OpenAccMode::O_RDONLY;
        let reply = std::cell::RefCell::new(Some(reply));
        let r = self.opener().open_file(
            Ino(attr.ino.0),
            file,
            writable,
            None,
            |f| match reply.borrow().as_ref() {
                Some(r) => r.open_backing(f),
                None => Err(std::io::Error::other("reply already sent")),
            },
            |fh, backing| {
                if let Some(r) = reply.borrow_mut().take() {
                    match backing {
                        Some(b) => {
                            r.created_passthrough(&TTL, &attr, Generation(0), fh, OPEN_FLAGS, b)
                        }
                        None => r.created(
                            &TTL,
                            &attr,
                            Generation(0),
                            fh,
                            OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE,
                        ),
                    }
                }
            },
        );
        if let Err(e) = r
            && let Some(r) = reply.borrow_mut().take()
        {
            r.error(e.errno());
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.workers.settle();
        if Ino(ino.0) == WSSERVER {
            let start = (offset as usize).min(self.wsserver.len());
            let end = (start + size as usize).min(self.wsserver.len());
            return reply.data(&self.wsserver[start..end]);
        }
        if let Some(h) = self.cached_map().get(&fh.0).cloned() {
            // The owner's current version, even through a handle opened on an
            // older one: a read racing an update must not put old bytes into
            // the page cache after the update invalidated it.
            let h = self.mirrored(h.ino).unwrap_or(h);
            return self.read_cached(h, offset, size, reply);
        }
        let file = match self.handle(fh) {
            Ok((_, f, _)) => f,
            Err(e) => return reply.error(e.errno()),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(FsError::from(e).errno()),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.workers.settle();
        let r = (|| -> FsResult<u32> {
            let (ino, file, _) = self.handle(fh)?;
            file.write_all_at(data, offset)?;
            let end = offset + data.len() as u64;
            let mut tree = self.tree_write();
            tree.note_write(ino, end)?;
            if let Some(oi) = self.open_map().get_mut(&ino) {
                oi.dirty = true;
                if let Ok(m) = oi.file.metadata() {
                    oi.seen = (m.size(), m.mtime(), m.mtime_nsec());
                }
                // Track written ranges, merging sequential writes; past 1024
                // distinct ranges, fall back to "unknown" (whole-file diff).
                let overflow = match oi.ranges.as_mut() {
                    Some(r) => {
                        let len = r.len();
                        match r.last_mut() {
                            Some(last) if last.1 == offset => {
                                last.1 = end;
                                false
                            }
                            _ if len >= 1024 => true,
                            _ => {
                                r.push((offset, end));
                                false
                            }
                        }
                    }
                    None => false,
                };
                if overflow {
                    oi.ranges = None;
                }
            }
            Ok(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 == 0 {
            return reply.ok();
        }
        let cached = self.cached_map().remove(&fh.0);
        if let Some(h) = cached {
            let r = (|| {
                if self.tree_read().closed(h.ino)? {
                    let gone = self.tree_write().release_if_unused(h.ino);
                    if let Ok(gone) = gone {
                        self.drop_node(gone);
                    }
                }
                Ok(())
            })();
            return reply_empty(reply, r);
        }
        reply_empty(reply, self.release_file(fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let (ino, file, writable) = self.handle(fh)?;
            if writable {
                let mut tree = self.tree_write();
                self.reconcile(&mut tree, ino, true)?;
            }
            // What the catalog has not made durable yet (a create, a rename,
            // a chmod) is committed while the bytes go to disk: both flushes
            // run at once, and the reply waits for both. The record of an
            // owned file's new content is not waited for: after a crash, the
            // next mount rebuilds it from the backing file (a new size or
            // other bytes become a new version), so a database's fsyncs cost
            // one flush, not two.
            let committed = self.catalog.begin_barrier_if_needed()?;
            if datasync {
                file.sync_data()?;
            } else {
                file.sync_all()?;
            }
            if let Some(c) = committed {
                c.wait()?;
            }
            Ok(())
        })();
        reply_empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let entries = match self.tree_read().list(Ino(ino.0)) {
            Ok(e) => e,
            Err(e) => return reply.error(e.errno()),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dir_map().insert(fh, DirHandle { entries });
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dirs = self.dir_map();
        let Some(d) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in d.entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(ino.0),
                i as u64 + 1,
                kind_to_type(*kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dirs = self.dir_map();
        let Some(d) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let tree = self.tree_read();
        for (i, (ino, _, name)) in d.entries.iter().enumerate().skip(offset as usize) {
            let attr = if *ino == WSSERVER {
                self.wsserver_attr()
            } else {
                match tree.get(*ino) {
                    Ok(n) => self.attr_of(n),
                    // Removed since opendir: skip it.
                    Err(_) => continue,
                }
            };
            if reply.add(
                INodeNo(ino.0),
                i as u64 + 1,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dir_map().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .catalog
            .begin_barrier_if_needed()
            .and_then(|c| c.map_or(Ok(()), |c| c.wait()));
        reply_empty(reply, r.map_err(FsError::from));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.statfs_data() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                255,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = name_bytes(name);
        if name.starts_with(b"system.") {
            return reply.error(Errno::ENOTSUP);
        }
        reply_empty(
            reply,
            self.tree_write().set_xattr(Ino(ino.0), name, value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.workers.settle();
        if Ino(ino.0) == WSSERVER {
            return reply.error(Errno::NO_XATTR);
        }
        let tree = self.tree_read();
        let r = if name_bytes(name) == CACHED_XATTR.as_bytes() {
            // Availability of a mirrored file: "<blocks cached>/<blocks>".
            match tree.cached_content(Ino(ino.0)) {
                Some(blocks) => {
                    let have = blocks
                        .iter()
                        .filter(|(h, _)| self.cache.contains(h))
                        .count();
                    Ok(format!("{have}/{}", blocks.len()).into_bytes())
                }
                None => Err(FsError::NoData),
            }
        } else {
            tree.get(Ino(ino.0)).and_then(|n| {
                n.xattrs
                    .get(name_bytes(name))
                    .cloned()
                    .ok_or(FsError::NoData)
            })
        };
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if Ino(ino.0) == WSSERVER {
            return reply.size(0);
        }
        let tree = self.tree_read();
        let r = tree.get(Ino(ino.0)).map(|n| {
            let mut out = Vec::new();
            for k in n.xattrs.keys() {
                out.extend_from_slice(k);
                out.push(0);
            }
            out
        });
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.tree_write().remove_xattr(Ino(ino.0), name_bytes(name)),
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let (ino, file, _) = self.handle(fh)?;
            // SAFETY: plain syscall on an fd we keep open for its duration.
            let rc =
                unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut tree = self.tree_write();
            if let Some(oi) = self.open_map().get_mut(&ino) {
                oi.dirty = true;
            }
            self.reconcile(&mut tree, ino, false)?;
            let m = file.metadata()?;
            let now = Stamp::now();
            tree.content_changed(
                ino,
                m.size(),
                now,
                now,
                Some(vec![(offset, offset + length)]),
            )?;
            Ok(())
        })();
        reply_empty(reply, r);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No device-specific requests: what isatty() and friends expect.
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = (|| {
            let (_, file, _) = self.handle(fh)?;
            // SAFETY: plain syscall on an fd we keep open for its duration. The
            // backing fd's own position is never used for I/O (pread/pwrite only).
            let off = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
            if off < 0 {
                return Err(FsError::from(std::io::Error::last_os_error()));
            }
            Ok(off)
        })();
        match r {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(e.errno()),
        }
    }
}

fn nix_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}
