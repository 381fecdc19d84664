//! The SQLite catalog: groups, members, the namespace (nodes and directory entries),
//! extended attributes, each group's change log and the block index.
//!
//! One thread owns the one read-write connection (the catalog actor). While a
//! filesystem is mounted, its in-memory tree is the authority and the catalog is
//! written behind it: callers send [`Op`]s through a bounded channel, the actor
//! applies everything queued in one transaction, and [`Catalog::barrier`] waits
//! until all earlier ops are durable (fsync and fsyncdir use it).

mod schema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

pub use schema::SchemaError;

use crate::ids::{BlockHash, GroupId, Ino, Seq, Version};

/// How many ops may wait for the actor before senders block (backpressure).
const QUEUE_DEPTH: usize = 16 * 1024;
/// Most ops applied in one transaction.
const BATCH: usize = 4096;
/// How long the actor gathers ops before committing them together.
const GROUP_COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);
/// First wait before a failed commit is tried again; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest wait between two tries of a failed commit.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Opening or migrating the database failed.
    #[error("catalog {path}: {source}")]
    Open {
        /// Database path.
        path: PathBuf,
        /// What failed.
        source: SchemaError,
    },
    /// A query failed.
    #[error("catalog: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The actor thread is gone (it failed earlier and logged why).
    #[error("catalog writer has stopped")]
    Stopped,
}

/// Kinds of node, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeKind {
    /// Regular file.
    File = 1,
    /// Directory.
    Dir = 2,
    /// Symbolic link.
    Symlink = 3,
    /// Named pipe.
    Fifo = 4,
    /// Unix socket.
    Socket = 5,
    /// Character device.
    CharDevice = 6,
    /// Block device.
    BlockDevice = 7,
}

impl NodeKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::File,
            2 => Self::Dir,
            3 => Self::Symlink,
            4 => Self::Fifo,
            5 => Self::Socket,
            6 => Self::CharDevice,
            7 => Self::BlockDevice,
            _ => return None,
        })
    }
}

/// A point in time as stored: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Stamp {
    /// Seconds since the epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds, 0..1e9.
    pub nanos: u32,
}

impl Stamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_system(std::time::SystemTime::now())
    }

    /// Converts from a `SystemTime`.
    pub fn from_system(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Self {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Self { secs, nanos }
            }
        }
    }

    /// Converts to a `SystemTime`.
    pub fn to_system(self) -> std::time::SystemTime {
        let base = std::time::UNIX_EPOCH;
        if self.secs >= 0 {
            base + std::time::Duration::new(self.secs as u64, self.nanos)
        } else {
            base - std::time::Duration::from_secs(self.secs.unsigned_abs())
                + std::time::Duration::from_nanos(self.nanos.into())
        }
    }
}

/// One row of `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Inode number.
    pub ino: Ino,
    /// The group the node belongs to; `None` for the root and user folders.
    pub group: Option<GroupId>,
    /// What it is.
    pub kind: NodeKind,
    /// Permission bits including setuid/setgid/sticky.
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group owner.
    pub gid: u32,
    /// Hard links.
    pub nlink: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Size in bytes.
    pub size: u64,
    /// Last access.
    pub atime: Stamp,
    /// Last modification.
    pub mtime: Stamp,
    /// Last status change.
    pub ctime: Stamp,
    /// Version: the change-log position of the node's last change.
    pub version: Version,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// For nodes of joined groups: what the owner's side of it is.
    pub remote: Option<Remote>,
}

/// A member's node that mirrors one of the owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    /// The owner's inode number.
    pub id: u64,
    /// The owner's version this node holds.
    pub version: u64,
    /// The member changed it locally (its content or name no longer mirror the
    /// owner's): the next owner change makes a conflict copy of it.
    pub local_edit: bool,
}

/// One row of `groups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    /// Local id.
    pub id: GroupId,
    /// The owning user.
    pub owner: String,
    /// The group's name.
    pub name: String,
    /// The group's root directory.
    pub root: Ino,
    /// Whether this client owns the group (else it is a member).
    pub owned: bool,
    /// The next change-log position.
    pub next_seq: Seq,
    /// Owned: a random number given to the group's log when it was made, so
    /// that a position means something only in the log it came from (a group
    /// made again, under the same name, starts another log). Joined: the
    /// owner's epoch of the position applied; 0 when the next sync must be a
    /// snapshot.
    pub epoch: u64,
}

/// What a change-log entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    /// A node was created (file, directory, symlink, fifo, …).
    Create,
    /// File content changed (closed after write, truncate, fallocate).
    Write,
    /// Metadata changed (mode, owner, times).
    SetAttr,
    /// A name was renamed.
    Rename,
    /// A name was removed (unlink or rmdir).
    Remove,
    /// A hard link was added.
    Link,
    /// Extended attributes changed.
    Xattr,
}

impl ChangeOp {
    /// The name stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Write => "write",
            Self::SetAttr => "setattr",
            Self::Rename => "rename",
            Self::Remove => "remove",
            Self::Link => "link",
            Self::Xattr => "xattr",
        }
    }

    /// The op stored in the log as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Create,
            Self::Write,
            Self::SetAttr,
            Self::Rename,
            Self::Remove,
            Self::Link,
            Self::Xattr,
        ]
        .into_iter()
        .find(|op| op.as_str() == name)
    }
}

/// One change-log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    /// The group whose log this is.
    pub group: GroupId,
    /// Position in the group's log.
    pub seq: Seq,
    /// What happened.
    pub op: ChangeOp,
    /// The node it happened to.
    pub ino: Ino,
    /// Directory and name concerned (the old name for renames).
    pub parent: Option<(Ino, Vec<u8>)>,
    /// New directory and name, for renames and links.
    pub new_parent: Option<(Ino, Vec<u8>)>,
    /// Byte ranges written, `start-end` pairs; `None` when unknown (whole file).
    pub ranges: Option<Vec<(u64, u64)>>,
}

/// One write sent to the catalog actor.
#[derive(Debug)]
pub enum Op {
    /// Insert or replace a node.
    PutNode(NodeRow),
    /// Delete a node and everything hanging off it (xattrs, blocks).
    DeleteNode(Ino),
    /// Insert or replace a directory entry.
    PutDirent {
        /// Directory.
        parent: Ino,
        /// Entry name.
        name: Vec<u8>,
        /// Target node.
        ino: Ino,
    },
    /// Delete a directory entry.
    DeleteDirent {
        /// Directory.
        parent: Ino,
        /// Entry name.
        name: Vec<u8>,
    },
    /// Set an extended attribute.
    PutXattr {
        /// Node.
        ino: Ino,
        /// Attribute name.
        name: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove an extended attribute.
    DeleteXattr {
        /// Node.
        ino: Ino,
        /// Attribute name.
        name: Vec<u8>,
    },
    /// Insert or replace a group.
    PutGroup(GroupRow),
    /// Delete a group, its members, its change log and its members' acks.
    DeleteGroup(GroupId),
    /// Drop old entries of a group's change log: those before `keep_from`
    /// that are at or before `upto` or were written before `older_than_ns`.
    /// The newest entry is never dropped (it tells the log's next position).
    PruneChanges {
        /// Group.
        group: GroupId,
        /// Entries at or before this position go.
        upto: u64,
        /// Entries written before this time (ns since the epoch) go too.
        older_than_ns: i64,
        /// Entries from this position on stay, whatever else says.
        keep_from: u64,
    },
    /// Record the log position a member of an owned group has applied.
    PutAck {
        /// Group.
        group: GroupId,
        /// The member.
        user: String,
        /// Its position.
        seq: u64,
        /// When it said so (seconds since the epoch).
        at: i64,
    },
    /// Replace a group's member list.
    SetMembers {
        /// Group.
        group: GroupId,
        /// Usernames.
        users: Vec<String>,
    },
    /// Append to a group's change log.
    AppendChange(ChangeRow),
    /// Replace a file's block hashes from block `from` on, for a file of `len` bytes.
    PutBlocks {
        /// File.
        ino: Ino,
        /// First block index the hashes start at.
        from: u64,
        /// Hashes and lengths of blocks `from..`.
        blocks: Vec<(BlockHash, u32)>,
        /// Number of blocks the file now has (later ones are dropped).
        count: u64,
    },
    /// The ops of one filesystem operation, delivered as one message so that a
    /// commit holds all of them or none.
    Batch(Vec<Op>),
    /// Count one more conflict copy made in a joined group.
    CountConflict(GroupId),
    /// Set a counter in `meta`.
    SetMeta {
        /// Key.
        key: &'static str,
        /// Value.
        value: i64,
    },
    /// Deletes a file (a removed node's backing object) once every earlier op is
    /// committed durably, so that no committed row ever names a deleted object.
    RemoveFile(PathBuf),
    /// Answered once every earlier op is committed.
    Barrier(mpsc::SyncSender<Result<(), String>>),
    /// Commits what came before and stops the actor, even if handles remain
    /// (their later sends fail with [`CatalogError::Stopped`]).
    Close,
    /// Pins `user`'s identity key if none is pinned yet, and answers how the key
    /// compares with the pinned one. Committed durably before the answer.
    PinKey {
        /// The peer.
        user: String,
        /// Its ed25519 public key.
        key: [u8; 32],
        /// Where the answer goes.
        reply: mpsc::SyncSender<Result<PinOutcome, String>>,
    },
}

/// How a presented identity key compares with the pinned one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// First contact: the key is now pinned.
    Pinned,
    /// The key matches the pinned one.
    Matches,
    /// A different key is pinned: refuse the peer.
    Changed {
        /// The pinned key.
        pinned: [u8; 32],
    },
}

/// Everything the catalog holds, read at mount time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// All nodes.
    pub nodes: Vec<NodeRow>,
    /// All directory entries as (parent, name, ino).
    pub dirents: Vec<(Ino, Vec<u8>, Ino)>,
    /// All extended attributes as (ino, name, value).
    pub xattrs: Vec<(Ino, Vec<u8>, Vec<u8>)>,
    /// All groups.
    pub groups: Vec<GroupRow>,
    /// Members as (group, user).
    pub members: Vec<(GroupId, String)>,
    /// The next inode number to hand out.
    pub next_ino: u64,
    /// Block lists of files as (ino, index, hash, length), in index order.
    pub blocks: Vec<(Ino, u64, BlockHash, u32)>,
}

/// A cloneable handle to the catalog actor.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Ops to the actor thread, which owns the connection. Bounded: a burst of
    /// writes blocks its sender instead of growing without limit.
    tx: mpsc::SyncSender<Op>,
    /// The actor thread, unparked by barriers so they skip the commit window.
    actor: std::thread::Thread,
    /// Set with that unpark: the channel parks the actor too, and can use up
    /// the token an unpark leaves, so the window checks this as well.
    hurry: Arc<AtomicBool>,
    /// Ops sent with [`Catalog::send`], and how many of those a barrier has
    /// made durable: the ops of [`Catalog::send_content`] are not counted.
    sent: Arc<AtomicU64>,
    durable: Arc<AtomicU64>,
    path: PathBuf,
}

/// Closes the catalog (committing what was sent) and joins its actor when dropped,
/// whether or not other [`Catalog`] handles remain.
#[derive(Debug)]
pub struct CatalogThread(Option<JoinHandle<()>>, Catalog);

impl Drop for CatalogThread {
    fn drop(&mut self) {
        self.1.close();
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`, reads it whole, and starts
    /// the actor. The actor exits when every handle is dropped.
    pub fn open(path: &Path) -> Result<(Self, Snapshot, CatalogThread), CatalogError> {
        Self::open_with_window(path, GROUP_COMMIT_WINDOW)
    }

    /// [`Catalog::open`] with another group-commit window.
    fn open_with_window(
        path: &Path,
        window: std::time::Duration,
    ) -> Result<(Self, Snapshot, CatalogThread), CatalogError> {
        let mut conn = Connection::open(path).map_err(|e| CatalogError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        schema::prepare(&mut conn).map_err(|source| CatalogError::Open {
            path: path.to_owned(),
            source,
        })?;
        let snapshot = load(&conn)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
        let hurry = Arc::new(AtomicBool::new(false));
        // The actor: sole writer of the database, for the life of the mount.
        let handle = std::thread::Builder::new()
            .name("catalog".into())
            .spawn({
                let hurry = hurry.clone();
                move || {
                    crate::blocks::background_priority();
                    actor(conn, rx, &hurry, window)
                }
            })
            .map_err(|e| CatalogError::Open {
                path: path.to_owned(),
                source: SchemaError::Sql(rusqlite::Error::InvalidPath(e.to_string().into())),
            })?;
        let catalog = Self {
            tx,
            actor: handle.thread().clone(),
            hurry,
            sent: Arc::new(AtomicU64::new(0)),
            durable: Arc::new(AtomicU64::new(0)),
            path: path.to_owned(),
        };
        Ok((
            catalog.clone(),
            snapshot,
            CatalogThread(Some(handle), catalog),
        ))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one op. Blocks only when the queue is full.
    pub fn send(&self, op: Op) -> Result<(), CatalogError> {
        self.tx.send(op).map_err(|_| CatalogError::Stopped)?;
        // Counted once queued: a barrier that reads the count is behind it.
        self.sent.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Queues an op that only records an owned file's new content (its size,
    /// times, log entry and block list). A mount after a crash rebuilds that
    /// record from the backing file, so an fsync need not wait for it: see
    /// [`Catalog::begin_barrier_if_needed`].
    pub fn send_content(&self, op: Op) -> Result<(), CatalogError> {
        self.tx.send(op).map_err(|_| CatalogError::Stopped)
    }

    /// Queues several ops; they land in the same transaction unless the batch fills.
    pub fn send_all(&self, ops: impl IntoIterator<Item = Op>) -> Result<(), CatalogError> {
        for op in ops {
            self.send(op)?;
        }
        Ok(())
    }

    /// Checks `user`'s identity key against the pinned one, pinning it on first
    /// contact. A changed key is never replaced here: an administrator removes
    /// the pin explicitly.
    pub fn pin_key(&self, user: &str, key: [u8; 32]) -> Result<PinOutcome, CatalogError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Op::PinKey {
            user: user.to_owned(),
            key,
            reply: tx,
        })?;
        self.wake();
        match rx.recv() {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) | Err(_) => Err(CatalogError::Stopped),
        }
    }

    /// Ends the actor's commit window now (something waits for its commit).
    fn wake(&self) {
        self.hurry.store(true, Ordering::SeqCst);
        self.actor.unpark();
    }

    /// Commits everything sent so far durably and stops the actor.
    pub fn close(&self) {
        if self.send(Op::Close).is_ok() {
            self.wake();
        }
    }

    /// Waits until every op sent before this call is committed durably.
    pub fn barrier(&self) -> Result<(), CatalogError> {
        self.begin_barrier()?.wait()
    }

    /// Starts committing every op sent before this call, to be waited for
    /// with [`Committed::wait`]; the caller can flush other things meanwhile.
    pub fn begin_barrier(&self) -> Result<Committed, CatalogError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let covers = self.sent.load(Ordering::SeqCst);
        self.tx
            .send(Op::Barrier(tx))
            .map_err(|_| CatalogError::Stopped)?;
        self.wake();
        Ok(Committed {
            answer: rx,
            covers,
            durable: self.durable.clone(),
        })
    }

    /// [`Catalog::begin_barrier`], or `None` if every op sent with
    /// [`Catalog::send`] is durable already: what is left is content records
    /// (and what others send meanwhile), which an fsync need not wait for.
    pub fn begin_barrier_if_needed(&self) -> Result<Option<Committed>, CatalogError> {
        if self.durable.load(Ordering::SeqCst) >= self.sent.load(Ordering::SeqCst) {
            return Ok(None);
        }
        self.begin_barrier().map(Some)
    }
}

/// A commit under way; see [`Catalog::begin_barrier`].
#[derive(Debug)]
pub struct Committed {
    answer: mpsc::Receiver<Result<(), String>>,
    /// How many counted ops were sent before the barrier.
    covers: u64,
    durable: Arc<AtomicU64>,
}

impl Committed {
    /// Waits until the ops before the barrier are committed durably.
    pub fn wait(self) -> Result<(), CatalogError> {
        match self.answer.recv() {
            Ok(Ok(())) => {
                self.durable.fetch_max(self.covers, Ordering::SeqCst);
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Err(CatalogError::Stopped),
        }
    }
}

fn actor(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    hurry: &AtomicBool,
    window: std::time::Duration,
) {
    let mut batch = Vec::with_capacity(BATCH);
    // After a failed commit (a full disk, say): its ops are kept, in order, and
    // tried again after this delay, with whatever came meanwhile.
    let mut retry: Option<std::time::Duration> = None;
    let mut gone = false;
    loop {
        let first = match retry {
            None => match rx.recv() {
                Ok(op) => Some(op),
                Err(_) => break,
            },
            Some(delay) => match rx.recv_timeout(delay) {
                Ok(op) => Some(op),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    gone = true;
                    None
                }
            },
        };
        // Group commit: after the first op of a batch, sleep through a short window
        // (senders do not wake us; only a barrier does, via `wake`) and then take
        // everything queued, so a burst of small operations costs one transaction
        // and one wake-up instead of one each.
        if let Some(first) = first {
            let urgent = matches!(first, Op::Barrier(_) | Op::PinKey { .. } | Op::Close);
            push_op(&mut batch, first);
            let until = std::time::Instant::now() + window;
            while !urgent && !hurry.load(Ordering::SeqCst) {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
        // Whatever hurried us is in the channel by now (sent before the flag).
        hurry.store(false, Ordering::SeqCst);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => push_op(&mut batch, op),
                Err(_) => break,
            }
        }
        coalesce(&mut batch);
        let closing = batch.iter().any(|op| matches!(op, Op::Close));
        // Commits are cheap (synchronous=NORMAL: the WAL is not fsynced) unless the
        // batch answers a barrier or removes files: then that commit fsyncs the
        // WAL, which makes it and every earlier commit durable.
        let durable = batch.iter().any(|op| {
            matches!(
                op,
                Op::Barrier(_) | Op::PinKey { .. } | Op::Close | Op::RemoveFile(_)
            )
        });
        let mode = if durable { "FULL" } else { "NORMAL" };
        if let Err(e) = conn.pragma_update(None, "synchronous", mode) {
            tracing::error!(cause = ?e, "cannot set catalog sync mode");
        }
        let mut barriers = Vec::new();
        let mut removals = Vec::new();
        let result = apply(&mut conn, &batch, &mut barriers, &mut removals);
        match &result {
            // Only now that the rows naming them are gone for good.
            Ok(()) => {
                for path in removals {
                    if let Err(e) = std::fs::remove_file(&path)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        tracing::warn!(path = %path.display(), cause = ?e, "cannot remove backing file");
                    }
                }
            }
            // The files stay; the sweep at the next mount removes those no node owns.
            Err(e) => tracing::error!(
                cause = ?e,
                ops = batch.len(),
                "catalog commit failed; will retry"
            ),
        }
        for answer in barriers {
            let err = result.as_ref().err().map(|e| e.to_string());
            match answer {
                Answer::Barrier(b) => {
                    let _ = b.send(err.map_or(Ok(()), Err));
                }
                Answer::Pin(b, outcome) => {
                    let _ = b.send(err.map_or(Ok(outcome), Err));
                }
            }
        }
        match result {
            Ok(()) => {
                batch.clear();
                retry = None;
            }
            Err(_) => {
                // What waits for an answer has had it (the error); the writes
                // are tried again.
                batch.retain(|op| !matches!(op, Op::Barrier(_) | Op::PinKey { .. }));
                retry = Some(retry.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX)));
                if closing || gone {
                    tracing::error!(
                        ops = batch.len(),
                        "catalog closed with writes it could not commit"
                    );
                }
            }
        }
        if closing || gone {
            break;
        }
    }
    tracing::debug!("catalog actor stopped");
}

/// Adds `op` to the batch, the ops of an [`Op::Batch`] in their order.
fn push_op(batch: &mut Vec<Op>, op: Op) {
    match op {
        Op::Batch(ops) => {
            for op in ops {
                push_op(batch, op);
            }
        }
        op => batch.push(op),
    }
}

/// Drops node writes that a later write or delete of the same node in the batch
/// supersedes: a file created, written and closed within one window is stored
/// once, and its directory's times once per batch. A node write that a block
/// list after it needs (it is stored only for a node that exists) is kept.
fn coalesce(batch: &mut Vec<Op>) {
    let mut later = std::collections::HashSet::new();
    let mut keep = vec![true; batch.len()];
    for (i, op) in batch.iter().enumerate().rev() {
        match op {
            Op::PutNode(n) => keep[i] = later.insert(n.ino),
            Op::DeleteNode(ino) => {
                later.insert(*ino);
            }
            Op::PutBlocks { ino, .. } => {
                later.remove(ino);
            }
            _ => {}
        }
    }
    let mut i = 0;
    batch.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// Answers owed once the batch's transaction commits.
enum Answer {
    Barrier(mpsc::SyncSender<Result<(), String>>),
    Pin(mpsc::SyncSender<Result<PinOutcome, String>>, PinOutcome),
}

fn apply(
    conn: &mut Connection,
    batch: &[Op],
    barriers: &mut Vec<Answer>,
    removals: &mut Vec<PathBuf>,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    for op in batch {
        match op {
            Op::PinKey { user, key, reply } => {
                let pinned: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT key FROM peer_keys WHERE user = ?1")?
                    .query_row([&user], |r| r.get(0))
                    .optional()?;
                let outcome = match pinned {
                    None => {
                        tx.prepare_cached(
                            "INSERT INTO peer_keys (user, key, first_seen) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![
                            user,
                            &key[..],
                            Stamp::now().secs
                        ])?;
                        PinOutcome::Pinned
                    }
                    Some(p) if p == key => PinOutcome::Matches,
                    Some(p) => {
                        let mut pinned = [0u8; 32];
                        if p.len() == 32 {
                            pinned.copy_from_slice(&p);
                        }
                        PinOutcome::Changed { pinned }
                    }
                };
                barriers.push(Answer::Pin(reply.clone(), outcome));
            }
            Op::PutNode(n) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO nodes (ino, group_id, kind, perm, uid, gid, nlink, rdev, \
                     size, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, version, target, \
                     remote_id, remote_version, local_edit) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                     ?18, ?19, ?20)",
                )?
                .execute(params![
                    n.ino.0 as i64,
                    n.group.map(|g| g.0 as i64),
                    n.kind as u8,
                    n.perm,
                    n.uid,
                    n.gid,
                    n.nlink,
                    n.rdev,
                    n.size as i64,
                    n.atime.secs,
                    n.atime.nanos,
                    n.mtime.secs,
                    n.mtime.nanos,
                    n.ctime.secs,
                    n.ctime.nanos,
                    n.version.0 as i64,
                    n.target,
                    n.remote.map(|r| r.id as i64),
                    n.remote.map(|r| r.version as i64),
                    n.remote.map(|r| r.local_edit),
                ])?;
            }
            Op::DeleteNode(ino) => {
                let ino = ino.0 as i64;
                tx.prepare_cached("DELETE FROM nodes WHERE ino = ?1")?
                    .execute([ino])?;
                tx.prepare_cached("DELETE FROM xattrs WHERE ino = ?1")?
                    .execute([ino])?;
                tx.prepare_cached("DELETE FROM blocks WHERE ino = ?1")?
                    .execute([ino])?;
            }
            Op::PutDirent { parent, name, ino } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO dirents (parent, name, ino) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![parent.0 as i64, name, ino.0 as i64])?;
            }
            Op::DeleteDirent { parent, name } => {
                tx.prepare_cached("DELETE FROM dirents WHERE parent = ?1 AND name = ?2")?
                    .execute(params![parent.0 as i64, name])?;
            }
            Op::PutXattr { ino, name, value } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![ino.0 as i64, name, value])?;
            }
            Op::DeleteXattr { ino, name } => {
                tx.prepare_cached("DELETE FROM xattrs WHERE ino = ?1 AND name = ?2")?
                    .execute(params![ino.0 as i64, name])?;
            }
            Op::PutGroup(g) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO groups (id, owner, name, root, owned, next_seq, \
                     epoch) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    g.id.0 as i64,
                    g.owner,
                    g.name,
                    g.root.0 as i64,
                    g.owned,
                    g.next_seq.0 as i64,
                    g.epoch as i64
                ])?;
            }
            Op::DeleteGroup(g) => {
                let g = g.0 as i64;
                tx.prepare_cached("DELETE FROM groups WHERE id = ?1")?
                    .execute([g])?;
                tx.prepare_cached("DELETE FROM members WHERE group_id = ?1")?
                    .execute([g])?;
                tx.prepare_cached("DELETE FROM changes WHERE group_id = ?1")?
                    .execute([g])?;
                tx.prepare_cached("DELETE FROM acks WHERE group_id = ?1")?
                    .execute([g])?;
                tx.prepare_cached("DELETE FROM meta WHERE key = ?1")?
                    .execute([conflicts_key(GroupId(g as u64))])?;
            }
            Op::PruneChanges {
                group,
                upto,
                older_than_ns,
                keep_from,
            } => {
                let newest: Option<i64> = tx
                    .prepare_cached("SELECT MAX(seq) FROM changes WHERE group_id = ?1")?
                    .query_row([group.0 as i64], |r| r.get(0))?;
                let keep_from =
                    newest.map_or(0, |n| ((*keep_from).min(i64::MAX as u64) as i64).min(n));
                tx.prepare_cached(
                    "DELETE FROM changes WHERE group_id = ?1 AND seq < ?2 \
                     AND (seq <= ?3 OR at_ns < ?4)",
                )?
                .execute(params![
                    group.0 as i64,
                    keep_from,
                    (*upto).min(i64::MAX as u64) as i64,
                    older_than_ns
                ])?;
            }
            Op::PutAck {
                group,
                user,
                seq,
                at,
            } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO acks (group_id, user, seq, at) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![group.0 as i64, user, *seq as i64, at])?;
            }
            Op::SetMembers { group, users } => {
                tx.prepare_cached("DELETE FROM members WHERE group_id = ?1")?
                    .execute([group.0 as i64])?;
                for u in users {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO members (group_id, user) VALUES (?1, ?2)",
                    )?
                    .execute(params![group.0 as i64, u])?;
                }
            }
            Op::AppendChange(c) => {
                let ranges = c.ranges.as_ref().map(|r| {
                    r.iter()
                        .map(|(a, b)| format!("{a}-{b}"))
                        .collect::<Vec<_>>()
                        .join(",")
                });
                tx.prepare_cached(
                    "INSERT INTO changes (group_id, seq, op, ino, parent, name, new_parent, \
                     new_name, ranges, at_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    c.group.0 as i64,
                    c.seq.0 as i64,
                    c.op.as_str(),
                    c.ino.0 as i64,
                    c.parent.as_ref().map(|p| p.0.0 as i64),
                    c.parent.as_ref().map(|p| p.1.clone()),
                    c.new_parent.as_ref().map(|p| p.0.0 as i64),
                    c.new_parent.as_ref().map(|p| p.1.clone()),
                    ranges,
                    Stamp::now().secs.saturating_mul(1_000_000_000),
                ])?;
            }
            Op::PutBlocks {
                ino,
                from,
                blocks,
                count,
            } => {
                let i = ino.0 as i64;
                // The file may have been deleted after it was queued for hashing.
                let exists = tx
                    .prepare_cached("SELECT 1 FROM nodes WHERE ino = ?1")?
                    .exists([i])?;
                if !exists {
                    continue;
                }
                for (k, (hash, len)) in blocks.iter().enumerate() {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO blocks (ino, idx, hash, len) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![i, (from + k as u64) as i64, &hash.0[..], len])?;
                }
                tx.prepare_cached("DELETE FROM blocks WHERE ino = ?1 AND idx >= ?2")?
                    .execute(params![i, *count as i64])?;
            }
            Op::CountConflict(g) => {
                tx.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES (?1, 1) \
                     ON CONFLICT (key) DO UPDATE SET value = value + 1",
                )?
                .execute([conflicts_key(*g)])?;
            }
            Op::SetMeta { key, value } => {
                tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                    .execute(params![key, value])?;
            }
            Op::RemoveFile(path) => removals.push(path.clone()),
            Op::Barrier(b) => barriers.push(Answer::Barrier(b.clone())),
            Op::Close => {}
            // Flattened on receipt (push_op): never here.
            Op::Batch(ops) => tracing::error!(ops = ops.len(), "unflattened catalog batch dropped"),
        }
    }
    tx.commit()
}

fn load(conn: &Connection) -> Result<Snapshot, rusqlite::Error> {
    let mut s = Snapshot::default();
    let mut q = conn.prepare(
        "SELECT ino, group_id, kind, perm, uid, gid, nlink, rdev, size, atime_s, atime_ns, \
         mtime_s, mtime_ns, ctime_s, ctime_ns, version, target, remote_id, remote_version, \
         local_edit FROM nodes",
    )?;
    let rows = q.query_map([], |r| {
        let kind: u8 = r.get(2)?;
        Ok(NodeRow {
            ino: Ino(r.get::<_, i64>(0)? as u64),
            group: r.get::<_, Option<i64>>(1)?.map(|g| GroupId(g as u64)),
            kind: NodeKind::from_u8(kind).unwrap_or(NodeKind::File),
            perm: r.get(3)?,
            uid: r.get(4)?,
            gid: r.get(5)?,
            nlink: r.get(6)?,
            rdev: r.get(7)?,
            size: r.get::<_, i64>(8)? as u64,
            atime: Stamp {
                secs: r.get(9)?,
                nanos: r.get(10)?,
            },
            mtime: Stamp {
                secs: r.get(11)?,
                nanos: r.get(12)?,
            },
            ctime: Stamp {
                secs: r.get(13)?,
                nanos: r.get(14)?,
            },
            version: Version(r.get::<_, i64>(15)? as u64),
            target: r.get(16)?,
            remote: match r.get::<_, Option<i64>>(17)? {
                Some(id) => Some(Remote {
                    id: id as u64,
                    version: r.get::<_, Option<i64>>(18)?.unwrap_or(0) as u64,
                    local_edit: r.get::<_, Option<bool>>(19)?.unwrap_or(false),
                }),
                None => None,
            },
        })
    })?;
    for n in rows {
        s.nodes.push(n?);
    }
    let mut q = conn.prepare("SELECT parent, name, ino FROM dirents")?;
    for d in q.query_map([], |r| {
        Ok((
            Ino(r.get::<_, i64>(0)? as u64),
            r.get::<_, Vec<u8>>(1)?,
            Ino(r.get::<_, i64>(2)? as u64),
        ))
    })? {
        s.dirents.push(d?);
    }
    let mut q = conn.prepare("SELECT ino, name, value FROM xattrs")?;
    for x in q.query_map([], |r| {
        Ok((Ino(r.get::<_, i64>(0)? as u64), r.get(1)?, r.get(2)?))
    })? {
        s.xattrs.push(x?);
    }
    let mut q = conn.prepare("SELECT id, owner, name, root, owned, next_seq, epoch FROM groups")?;
    for g in q.query_map([], |r| {
        Ok(GroupRow {
            id: GroupId(r.get::<_, i64>(0)? as u64),
            owner: r.get(1)?,
            name: r.get(2)?,
            root: Ino(r.get::<_, i64>(3)? as u64),
            owned: r.get(4)?,
            next_seq: Seq(r.get::<_, i64>(5)? as u64),
            epoch: r.get::<_, i64>(6)? as u64,
        })
    })? {
        s.groups.push(g?);
    }
    // The group row keeps the first position; the log itself says how far it got.
    for g in &mut s.groups {
        let max: Option<i64> = conn.query_row(
            "SELECT MAX(seq) FROM changes WHERE group_id = ?1",
            [g.id.0 as i64],
            |r| r.get(0),
        )?;
        if let Some(m) = max {
            g.next_seq = Seq(g.next_seq.0.max(m as u64 + 1));
        }
    }
    let mut q = conn.prepare("SELECT ino, idx, hash, len FROM blocks ORDER BY ino, idx")?;
    for b in q.query_map([], |r| {
        let hash: Vec<u8> = r.get(2)?;
        let mut h = [0u8; 32];
        if hash.len() == 32 {
            h.copy_from_slice(&hash);
        }
        Ok((
            Ino(r.get::<_, i64>(0)? as u64),
            r.get::<_, i64>(1)? as u64,
            BlockHash(h),
            r.get::<_, u32>(3)?,
        ))
    })? {
        s.blocks.push(b?);
    }
    let mut q = conn.prepare("SELECT group_id, user FROM members")?;
    for m in q.query_map([], |r| Ok((GroupId(r.get::<_, i64>(0)? as u64), r.get(1)?)))? {
        s.members.push(m?);
    }
    let next: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'next_ino'", [], |r| {
            r.get(0)
        })
        .ok();
    let max_ino = s.nodes.iter().map(|n| n.ino.0).max().unwrap_or(0);
    s.next_ino = (next.unwrap_or(0) as u64).max(max_ino + 1);
    Ok(s)
}

/// Summary figures for `brume status`, read from a catalog file without writing.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Groups with their file counts and log positions.
    pub groups: Vec<GroupSummary>,
    /// Size of the database files in bytes (main file and WAL).
    pub catalog_bytes: u64,
}

/// One group in a [`Summary`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupSummary {
    /// Owner.
    pub owner: String,
    /// Group name.
    pub name: String,
    /// Whether this client owns it.
    pub owned: bool,
    /// Regular files in the group.
    pub files: u64,
    /// Directories in the group (not counting its root).
    pub dirs: u64,
    /// Bytes in its regular files.
    pub bytes: u64,
    /// Members listed in `.members` (for a joined group: as the owner lists
    /// them, once the blocks of its `.members` are cached).
    pub members: Vec<String>,
    /// Joined groups: the blocks of the owner's `.members`, as mirrored here
    /// (empty if there is none, or the member edited its copy).
    #[serde(skip)]
    pub members_file: Vec<BlockHash>,
    /// Whether `members` is known: always for owned groups; for joined groups
    /// once the owner's `.members` could be read here.
    pub members_known: bool,
    /// Owned groups: the last change-log position used. Joined groups: the
    /// owner's position applied.
    pub last_seq: u64,
    /// Joined groups: conflict copies sync has made of the member's files.
    pub conflicts: u64,
}

/// The `meta` key counting a joined group's conflict copies.
fn conflicts_key(g: GroupId) -> String {
    format!("conflicts:{}", g.0)
}

/// Pinned identity keys as (user, key), read without modifying the catalog.
pub fn pinned_keys(path: &Path) -> Result<Vec<(String, [u8; 32])>, CatalogError> {
    let conn = open_read_only(path)?;
    let mut q = conn.prepare("SELECT user, key FROM peer_keys ORDER BY user")?;
    let rows = q.query_map([], |r| {
        let key: Vec<u8> = r.get(1)?;
        let mut k = [0u8; 32];
        if key.len() == 32 {
            k.copy_from_slice(&key);
        }
        Ok((r.get(0)?, k))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A read-only connection to the catalog at `path`, beside the actor's.
fn open_read_only(path: &Path) -> Result<Connection, CatalogError> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| {
        CatalogError::Open {
            path: path.to_owned(),
            source: e.into(),
        }
    })
}

/// What a group's change log holds after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSince {
    /// The entries after it, oldest first: (position, what, node).
    Entries(Vec<(Seq, ChangeOp, Ino)>),
    /// The log no longer reaches back to it, or more than the most asked
    /// for follow it.
    Beyond,
}

/// The entries of group `g`'s log after position `since`, at most `most` of
/// them, read from the catalog at `path` (a connection of its own: the
/// catalog's writer never waits for it).
pub fn log_since(
    path: &Path,
    g: GroupId,
    since: u64,
    most: usize,
) -> Result<LogSince, CatalogError> {
    let conn = open_read_only(path)?;
    let first: Option<i64> = conn.query_row(
        "SELECT MIN(seq) FROM changes WHERE group_id = ?1",
        [g.0 as i64],
        |r| r.get(0),
    )?;
    // The log must hold every entry after `since`: its first is at most the next.
    if first.is_some_and(|f| f as u64 > since.saturating_add(1)) {
        return Ok(LogSince::Beyond);
    }
    let mut q = conn.prepare(
        "SELECT seq, op, ino FROM changes WHERE group_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut out = Vec::new();
    let rows = q.query_map(
        params![
            g.0 as i64,
            since.min(i64::MAX as u64) as i64,
            most as i64 + 1
        ],
        |r| {
            Ok((
                Seq(r.get::<_, i64>(0)? as u64),
                r.get::<_, String>(1)?,
                Ino(r.get::<_, i64>(2)? as u64),
            ))
        },
    )?;
    for row in rows {
        let (seq, op, ino) = row?;
        // An entry this build does not know: only a snapshot is sure.
        let Some(op) = ChangeOp::parse(&op) else {
            return Ok(LogSince::Beyond);
        };
        out.push((seq, op, ino));
    }
    if out.len() > most {
        return Ok(LogSince::Beyond);
    }
    Ok(LogSince::Entries(out))
}

/// The log positions members of owned groups said they applied, as (group,
/// member, position, when in seconds since the epoch), read from the catalog at
/// `path`.
pub fn acks(path: &Path) -> Result<Vec<(GroupId, String, u64, i64)>, CatalogError> {
    let conn = open_read_only(path)?;
    let mut q = conn.prepare("SELECT group_id, user, seq, at FROM acks")?;
    let rows = q.query_map([], |r| {
        Ok((
            GroupId(r.get::<_, i64>(0)? as u64),
            r.get(1)?,
            r.get::<_, i64>(2)? as u64,
            r.get(3)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The first and newest positions of group `g`'s change log at `path`, if it
/// has entries.
pub fn log_extent(path: &Path, g: GroupId) -> Result<Option<(u64, u64)>, CatalogError> {
    let conn = open_read_only(path)?;
    let (first, newest): (Option<i64>, Option<i64>) = conn.query_row(
        "SELECT MIN(seq), MAX(seq) FROM changes WHERE group_id = ?1",
        [g.0 as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(first.zip(newest).map(|(f, n)| (f as u64, n as u64)))
}

/// Reads a [`Summary`] from the catalog at `path` without modifying it.
pub fn summarize(path: &Path) -> Result<Summary, CatalogError> {
    let conn = open_read_only(path)?;
    let mut out = Summary::default();
    let mut q = conn.prepare(
        "SELECT g.id, g.owner, g.name, g.owned, \
           CASE WHEN g.owned THEN (SELECT COALESCE(MAX(seq), 0) FROM changes c \
             WHERE c.group_id = g.id) ELSE g.next_seq END, \
           (SELECT COUNT(*) FROM nodes n WHERE n.group_id = g.id AND n.kind = 1), \
           (SELECT COUNT(*) FROM nodes n WHERE n.group_id = g.id AND n.kind = 2) - 1, \
           (SELECT COALESCE(SUM(size), 0) FROM nodes n WHERE n.group_id = g.id AND n.kind = 1), \
           (SELECT COALESCE(MAX(value), 0) FROM meta m WHERE m.key = 'conflicts:' || g.id) \
         FROM groups g ORDER BY g.owner, g.name",
    )?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            GroupSummary {
                owner: r.get(1)?,
                name: r.get(2)?,
                owned: r.get(3)?,
                last_seq: r.get::<_, i64>(4)? as u64,
                files: r.get::<_, i64>(5)? as u64,
                dirs: r.get::<_, i64>(6)?.max(0) as u64,
                bytes: r.get::<_, i64>(7)? as u64,
                conflicts: r.get::<_, i64>(8)? as u64,
                members: Vec::new(),
                members_file: Vec::new(),
                members_known: false,
            },
        ))
    })?;
    for row in rows {
        let (id, mut g) = row?;
        let mut m = conn.prepare("SELECT user FROM members WHERE group_id = ?1 ORDER BY user")?;
        g.members = m.query_map([id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        g.members_known = g.owned;
        if !g.owned {
            let mut b = conn.prepare(
                "SELECT b.hash FROM groups g \
                   JOIN dirents d ON d.parent = g.root AND d.name = CAST('.members' AS BLOB) \
                   JOIN nodes n ON n.ino = d.ino AND n.kind = 1 AND NOT COALESCE(n.local_edit, 0) \
                   JOIN blocks b ON b.ino = n.ino \
                 WHERE g.id = ?1 ORDER BY b.idx",
            )?;
            g.members_file = b
                .query_map([id], |r| r.get::<_, Vec<u8>>(0))?
                .filter_map(|h| h.ok().and_then(|h| h.try_into().ok().map(BlockHash)))
                .collect();
        }
        out.groups.push(g);
    }
    for suffix in ["", "-wal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        out.catalog_bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_is_needed_only_while_counted_ops_are_not_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _, _thread) = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let op = |i: u8| Op::DeleteDirent {
            parent: Ino(1),
            name: vec![i],
        };
        assert!(cat.begin_barrier_if_needed().unwrap().is_none());
        // Content records alone never need one.
        cat.send_content(op(1)).unwrap();
        assert!(cat.begin_barrier_if_needed().unwrap().is_none());
        // Anything else does, until a barrier behind it has been waited for.
        cat.send(op(2)).unwrap();
        let barrier = cat.begin_barrier_if_needed().unwrap().expect("a barrier");
        assert!(cat.begin_barrier_if_needed().unwrap().is_some());
        barrier.wait().unwrap();
        assert!(cat.begin_barrier_if_needed().unwrap().is_none());
        // A barrier begun before an op does not cover it.
        let early = cat.begin_barrier().unwrap();
        cat.send(op(3)).unwrap();
        early.wait().unwrap();
        assert!(cat.begin_barrier_if_needed().unwrap().is_some());
        cat.barrier().unwrap();
        assert!(cat.begin_barrier_if_needed().unwrap().is_none());
    }

    #[test]
    fn a_block_list_stored_between_two_writes_of_its_new_node_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let row = |size: u64| NodeRow {
            ino: Ino(42),
            group: None,
            kind: NodeKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            rdev: 0,
            size,
            atime: Stamp::now(),
            mtime: Stamp::now(),
            ctime: Stamp::now(),
            version: Version(1),
            target: None,
            remote: None,
        };
        let hash = BlockHash([7; 32]);
        {
            let (cat, _, _thread) = Catalog::open(&path).unwrap();
            // One batch: the node is created, its blocks stored, then it is
            // written again (a member installing a mirror, say).
            cat.send(Op::Batch(vec![
                Op::PutNode(row(5)),
                Op::PutBlocks {
                    ino: Ino(42),
                    from: 0,
                    blocks: vec![(hash, 5)],
                    count: 1,
                },
                Op::PutNode(row(5)),
            ]))
            .unwrap();
            cat.barrier().unwrap();
        }
        let (_, snapshot, _thread) = Catalog::open(&path).unwrap();
        assert_eq!(snapshot.blocks, vec![(Ino(42), 0, hash, 5)]);
    }

    #[test]
    fn a_barrier_never_waits_out_the_commit_window() {
        // A window far longer than the test may take: one barrier that fails to
        // end it shows.
        let dir = tempfile::tempdir().unwrap();
        let window = std::time::Duration::from_secs(60);
        let (cat, _, _thread) =
            Catalog::open_with_window(&dir.path().join("catalog.db"), window).unwrap();
        let start = std::time::Instant::now();
        for i in 0..200u32 {
            // A write that opens a window, then a barrier right behind it.
            cat.send(Op::DeleteDirent {
                parent: Ino(1),
                name: i.to_le_bytes().to_vec(),
            })
            .unwrap();
            cat.barrier().unwrap();
        }
        assert!(
            start.elapsed() < window / 2,
            "a barrier waited out the window: {:?} for 200",
            start.elapsed()
        );
    }

    #[test]
    fn the_log_is_read_after_a_position_and_pruned_never_past_its_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let (cat, _, _thread) = Catalog::open(&path).unwrap();
        let g = GroupId(3);
        for seq in 1..=10u64 {
            cat.send(Op::AppendChange(ChangeRow {
                group: g,
                seq: Seq(seq),
                op: if seq % 2 == 0 {
                    ChangeOp::Write
                } else {
                    ChangeOp::Rename
                },
                ino: Ino(100 + seq),
                parent: None,
                new_parent: None,
                ranges: None,
            }))
            .unwrap();
        }
        cat.barrier().unwrap();
        let since = |s| log_since(&path, g, s, 100).unwrap();
        let LogSince::Entries(e) = since(7) else {
            panic!("the log reaches 7");
        };
        assert_eq!(
            e,
            [
                (Seq(8), ChangeOp::Write, Ino(108)),
                (Seq(9), ChangeOp::Rename, Ino(109)),
                (Seq(10), ChangeOp::Write, Ino(110))
            ]
        );
        assert_eq!(since(10), LogSince::Entries(vec![]));
        // More than the most asked for: beyond.
        assert_eq!(log_since(&path, g, 0, 9).unwrap(), LogSince::Beyond);
        // Up to 5 goes; from 8 on stays whatever the age says.
        cat.send(Op::PruneChanges {
            group: g,
            upto: 5,
            older_than_ns: 0,
            keep_from: 8,
        })
        .unwrap();
        cat.barrier().unwrap();
        assert_eq!(log_extent(&path, g).unwrap(), Some((6, 10)));
        assert_eq!(since(4), LogSince::Beyond);
        assert!(matches!(since(5), LogSince::Entries(e) if e.len() == 5));
        // Everything old, everything asked: the newest stays.
        cat.send(Op::PruneChanges {
            group: g,
            upto: u64::MAX,
            older_than_ns: i64::MAX,
            keep_from: u64::MAX,
        })
        .unwrap();
        cat.barrier().unwrap();
        assert_eq!(log_extent(&path, g).unwrap(), Some((10, 10)));
        // Acknowledgements are kept by group and member.
        cat.send(Op::PutAck {
            group: g,
            user: "bob".into(),
            seq: 9,
            at: 1234,
        })
        .unwrap();
        cat.barrier().unwrap();
        assert_eq!(acks(&path).unwrap(), [(g, "bob".to_string(), 9, 1234)]);
    }

    #[test]
    fn keys_are_pinned_on_first_contact_and_changes_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let (cat, _, thread) = Catalog::open(&path).unwrap();
        assert_eq!(cat.pin_key("bob", [1; 32]).unwrap(), PinOutcome::Pinned);
        assert_eq!(cat.pin_key("bob", [1; 32]).unwrap(), PinOutcome::Matches);
        assert_eq!(
            cat.pin_key("bob", [2; 32]).unwrap(),
            PinOutcome::Changed { pinned: [1; 32] }
        );
        drop(cat);
        drop(thread);
        // Durable across reopen.
        assert_eq!(
            pinned_keys(&path).unwrap(),
            vec![("bob".to_string(), [1; 32])]
        );
        let (cat, _, _t) = Catalog::open(&path).unwrap();
        assert_eq!(
            cat.pin_key("bob", [2; 32]).unwrap(),
            PinOutcome::Changed { pinned: [1; 32] }
        );
    }

    #[test]
    fn a_failed_commit_is_tried_again_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let (cat, _, _thread) = Catalog::open(&path).unwrap();
        // Another writer holds the database: the next commit fails.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        cat.send(Op::SetMeta {
            key: "test",
            value: 7,
        })
        .unwrap();
        assert!(cat.barrier().is_err(), "the commit should have failed");
        other.execute_batch("ROLLBACK").unwrap();
        // Written by a later try, without being sent again.
        cat.barrier().unwrap();
        let value: i64 = other
            .query_row("SELECT value FROM meta WHERE key = 'test'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(value, 7);
    }
}
