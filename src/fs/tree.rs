//! The namespace in memory: every node of the catalog, directory children, extended
//! attributes and groups. While mounted this is the authority; each mutation also
//! queues the matching catalog ops (written behind, in order) and, inside a group,
//! a change-log entry that bumps the node's version.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::catalog::{
    Catalog, ChangeOp, ChangeRow, GroupRow, NodeKind, NodeRow, Op, Snapshot, Stamp,
};
use crate::fs::error::{FsError, FsResult};

mod remote;
use crate::ids::{BlockHash, GroupId, GroupName, Ino, Seq, UserName, Version};
pub use remote::{Inval, LinkNames, Situation, ino_of_id};

/// The mount's root directory.
pub const ROOT: Ino = Ino(1);
/// `.wsserver.json`, a read-only file generated on the fly.
pub const WSSERVER: Ino = Ino(2);
/// Name of the signaling-server info file in the root.
pub const WSSERVER_NAME: &[u8] = b".wsserver.json";
/// Name of the member list in a group's root.
pub const MEMBERS_NAME: &[u8] = b".members";
/// How many inode numbers are reserved in the catalog at a time.
const INO_CHUNK: u64 = 1024;
/// Longest name component.
const NAME_MAX: usize = 255;
/// Largest extended attribute value.
const XATTR_SIZE_MAX: usize = 64 * 1024;

/// One node in memory.
#[derive(Debug)]
pub struct Node {
    /// Persistent attributes.
    pub row: NodeRow,
    /// Children by name, for directories.
    pub children: Option<BTreeMap<Vec<u8>, Ino>>,
    /// The containing directory (for directories: their only parent).
    pub parent: Ino,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Open file handles; an unlinked node lives on until this is zero. Atomic so
    /// that opening and closing need only the tree's read lock.
    pub opens: AtomicU32,
    /// The content's blocks, if known for the current content: on an owner, what
    /// the hasher found; on a member, what the owner sent.
    pub blocks: Option<Blocks>,
    /// Bumped on every content change; the hasher's result applies only if it
    /// was computed for the current value.
    pub content_seq: u64,
    /// The backing file's mtime and ctime, if the file may have changed without
    /// a record of it (a write through passthrough cut short by a crash): its
    /// next hash decides, and a different one makes it a new version.
    pub suspect: Option<(Stamp, Stamp)>,
    /// Member side: the owner's block list for this content, named but not
    /// here yet (a list too long to travel in the node; fetched in pieces).
    pub pending_list: Option<crate::sync::proto::ListRef>,
}

impl Node {
    /// A new node linked under `parent`, with no xattrs and no open handles.
    pub fn new(row: NodeRow, parent: Ino, blocks: Option<Blocks>) -> Self {
        let children = (row.kind == NodeKind::Dir).then(BTreeMap::new);
        Self {
            row,
            children,
            parent,
            xattrs: BTreeMap::new(),
            opens: AtomicU32::new(0),
            blocks,
            content_seq: 0,
            suspect: None,
            pending_list: None,
        }
    }
}

/// A file's block list: (hash, length) per block, in order.
pub type Blocks = std::sync::Arc<[(BlockHash, u32)]>;

/// What happened in the tree, for the sync engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeEvent {
    /// A node of an owned group changed (its log got an entry).
    Changed {
        /// The group.
        group: GroupId,
        /// The node.
        ino: Ino,
    },
    /// A file's block list is now known for its current content.
    Hashed {
        /// The group.
        group: GroupId,
        /// The file.
        ino: Ino,
    },
    /// The member joined a group (mkdir under another user's folder).
    Joined {
        /// The group.
        group: GroupId,
    },
    /// The member list of an owned group changed (its `.members` was closed
    /// after writing, renamed into place or removed): in order with the
    /// changes around it.
    Members {
        /// The group.
        group: GroupId,
        /// Who is listed now.
        members: Vec<String>,
    },
    /// The member left a group (rmdir of its root).
    Left {
        /// The group's owner.
        owner: String,
        /// The group's name.
        name: String,
    },
}

/// A group in memory.
#[derive(Debug, Clone)]
pub struct Group {
    /// Persistent row.
    pub row: GroupRow,
    /// Members from `.members`.
    pub members: Vec<String>,
    /// Owned groups whose bytes went missing from the backing store: why
    /// nothing of them is published for the life of this mount.
    pub held: Option<String>,
}

/// Where a directory sits in Brume's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The mount root: holds user folders.
    Root,
    /// `<user>/`: holds that user's groups.
    UserDir,
    /// Inside a group (its root or below).
    Group(GroupId),
}

/// Attribute changes of a setattr.
#[derive(Debug, Default, Clone)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (the caller has resized the backing file).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<Stamp>,
    /// New modification time.
    pub mtime: Option<Stamp>,
    /// Explicit change time.
    pub ctime: Option<Stamp>,
    /// Clear setuid and setgid as a write, truncate or change of owner does
    /// (see [`without_privileges`]); ignored for directories and when `mode`
    /// is given.
    pub drop_privileges: bool,
    /// With `drop_privileges`: the caller is neither privileged nor in the
    /// file's group, so setgid goes even without group-execute.
    pub outsider: bool,
}

impl SetAttr {
    /// Whether nothing at all is to be set: what the kernel sends when it
    /// wants the file's privileges dropped and nothing else changed.
    pub fn is_empty(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
            && self.ctime.is_none()
    }
}

/// How many bytes a block list covers.
fn listed_len(blocks: &[(BlockHash, u32)]) -> u64 {
    blocks.iter().map(|(_, len)| u64::from(*len)).sum()
}

/// Permission bits after a write, truncate or change of owner that drops
/// privileges, as the Linux VFS computes them: setuid always goes; setgid goes
/// with group-execute, or without it when the caller is an `outsider` (neither
/// privileged nor in the file's group).
pub fn without_privileges(perm: u16, outsider: bool) -> u16 {
    let perm = perm & !(libc::S_ISUID as u16);
    if outsider || perm & (libc::S_IXGRP as u16) != 0 {
        perm & !(libc::S_ISGID as u16)
    } else {
        perm
    }
}

/// The in-memory namespace.
#[derive(Debug)]
pub struct Tree {
    nodes: HashMap<Ino, Node>,
    groups: HashMap<GroupId, Group>,
    next_ino: u64,
    /// Inode numbers below this are reserved in the catalog's `next_ino`.
    reserved_ino: u64,
    next_group: u64,
    me: UserName,
    catalog: Journal,
    /// Tells the sync engine what changed. Bounded: a receiver that falls behind
    /// sees `Lagged` and resynchronizes everything instead.
    events: tokio::sync::broadcast::Sender<TreeEvent>,
    /// In joined groups: the local node mirroring each of the owner's nodes.
    remote_ids: HashMap<(GroupId, u64), Ino>,
    /// While set, the node rows and log entries sent are content records of an
    /// owned file (see [`Catalog::send_content`]).
    content_scope: bool,
}

/// The tree's way to the catalog. Under a [`TreeWrite`] guard it holds the ops
/// of the operation in progress and sends them as one [`Op::Batch`] when the
/// guard drops, so that no commit holds half an operation (a rename's removed
/// entry without its new one, say), whatever a crash then cuts off.
#[derive(Debug)]
struct Journal {
    catalog: Catalog,
    /// Ops held while a write guard is alive.
    pending: std::sync::Mutex<Vec<Op>>,
    /// Whether a write guard is alive.
    holding: std::sync::atomic::AtomicBool,
    /// Whether the held ops are all content records ([`Catalog::send_content`]).
    content_only: std::sync::atomic::AtomicBool,
}

impl Journal {
    fn new(catalog: Catalog) -> Self {
        Self {
            catalog,
            pending: std::sync::Mutex::new(Vec::new()),
            holding: std::sync::atomic::AtomicBool::new(false),
            content_only: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn send(&self, op: Op) -> Result<(), crate::catalog::CatalogError> {
        self.send_as(op, false)
    }

    /// Sends `op`; `content`: it only records an owned file's content
    /// ([`Catalog::send_content`]).
    fn send_as(&self, op: Op, content: bool) -> Result<(), crate::catalog::CatalogError> {
        if self.holding.load(Ordering::Relaxed) {
            if !content {
                self.content_only.store(false, Ordering::Relaxed);
            }
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(op);
            Ok(())
        } else if content {
            self.catalog.send_content(op)
        } else {
            self.catalog.send(op)
        }
    }

    fn hold(&self) {
        self.holding.store(true, Ordering::Relaxed);
        self.content_only.store(true, Ordering::Relaxed);
    }

    /// Sends what is held, as one message, and stops holding.
    fn release(&self) {
        self.holding.store(false, Ordering::Relaxed);
        let ops = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if ops.is_empty() {
            return;
        }
        let sent = if self.content_only.load(Ordering::Relaxed) {
            self.catalog.send_content(Op::Batch(ops))
        } else {
            self.catalog.send(Op::Batch(ops))
        };
        if let Err(e) = sent {
            tracing::warn!(cause = %e, "catalog writes lost");
        }
    }
}

/// Exclusive access to the tree for one operation; its catalog ops are sent
/// together when this drops. Take the tree's write lock only through [`write`].
pub struct TreeWrite<'a>(std::sync::RwLockWriteGuard<'a, Tree>);

/// Locks `tree` for one operation.
pub fn write(tree: &std::sync::RwLock<Tree>) -> TreeWrite<'_> {
    let guard = tree.write().unwrap_or_else(|e| e.into_inner());
    guard.catalog.hold();
    TreeWrite(guard)
}

impl std::ops::Deref for TreeWrite<'_> {
    type Target = Tree;
    fn deref(&self) -> &Tree {
        &self.0
    }
}

impl std::ops::DerefMut for TreeWrite<'_> {
    fn deref_mut(&mut self) -> &mut Tree {
        &mut self.0
    }
}

impl Drop for TreeWrite<'_> {
    fn drop(&mut self) {
        self.0.catalog.release();
    }
}

/// How many tree events may wait for a slow receiver before it must resync.
const EVENT_BACKLOG: usize = 8192;

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid { why: "bad name" });
    }
    Ok(())
}

fn mode_kind(kind: NodeKind) -> u32 {
    match kind {
        NodeKind::File => libc::S_IFREG,
        NodeKind::Dir => libc::S_IFDIR,
        NodeKind::Symlink => libc::S_IFLNK,
        NodeKind::Fifo => libc::S_IFIFO,
        NodeKind::Socket => libc::S_IFSOCK,
        NodeKind::CharDevice => libc::S_IFCHR,
        NodeKind::BlockDevice => libc::S_IFBLK,
    }
}

/// The node kind of a `mode`'s file-type bits.
pub fn kind_of_mode(mode: u32) -> Option<NodeKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => NodeKind::File,
        libc::S_IFDIR => NodeKind::Dir,
        libc::S_IFLNK => NodeKind::Symlink,
        libc::S_IFIFO => NodeKind::Fifo,
        libc::S_IFSOCK => NodeKind::Socket,
        libc::S_IFCHR => NodeKind::CharDevice,
        libc::S_IFBLK => NodeKind::BlockDevice,
        _ => return None,
    })
}

/// Parses `.members`: one username per line, `#` starts a comment, blank lines and
/// invalid names are skipped (invalid ones are logged).
pub fn parse_members(text: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(text);
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match UserName::new(line) {
            Ok(u) => {
                if !out.iter().any(|o| o == u.as_str()) {
                    out.push(u.to_string());
                }
            }
            Err(e) => tracing::warn!(cause = %e, "ignoring line in .members"),
        }
    }
    out
}

impl Tree {
    /// Builds the tree from a catalog snapshot, creating the root and `<me>/` on
    /// first use and dropping nodes no directory reaches (left by a crash).
    /// Returns the tree and the inodes of regular files that were dropped, whose
    /// backing files the caller removes.
    pub fn load(
        snapshot: Snapshot,
        me: UserName,
        owner_uid: u32,
        owner_gid: u32,
        catalog: Catalog,
    ) -> FsResult<(Self, Vec<Ino>)> {
        let mut nodes: HashMap<Ino, Node> = HashMap::with_capacity(snapshot.nodes.len());
        for row in snapshot.nodes {
            nodes.insert(row.ino, Node::new(row, ROOT, None));
        }
        let mut dangling = Vec::new();
        for (parent, name, ino) in snapshot.dirents {
            if !nodes.contains_key(&ino) {
                dangling.push((parent, name));
                continue;
            }
            match nodes.get_mut(&parent).and_then(|p| p.children.as_mut()) {
                Some(children) => {
                    children.insert(name, ino);
                }
                None => {
                    dangling.push((parent, name));
                    continue;
                }
            }
            if let Some(n) = nodes.get_mut(&ino) {
                n.parent = parent;
            }
        }
        for (ino, name, value) in snapshot.xattrs {
            if let Some(n) = nodes.get_mut(&ino) {
                n.xattrs.insert(name, value);
            }
        }
        let mut groups = HashMap::new();
        for mut row in snapshot.groups {
            // An owned group from before logs had epochs gets one now.
            if row.owned && row.epoch == 0 {
                row.epoch = new_epoch();
                catalog.send(Op::PutGroup(row.clone()))?;
            }
            groups.insert(
                row.id,
                Group {
                    row,
                    members: Vec::new(),
                    held: None,
                },
            );
        }
        for (g, user) in snapshot.members {
            if let Some(g) = groups.get_mut(&g) {
                g.members.push(user);
            }
        }
        let next_group = groups.keys().map(|g| g.0).max().unwrap_or(0) + 1;
        let mut lists: HashMap<Ino, Vec<(BlockHash, u32)>> = HashMap::new();
        for (ino, _, hash, len) in snapshot.blocks {
            lists.entry(ino).or_default().push((hash, len));
        }
        for (ino, list) in lists {
            // An owned file's list that does not add up to its size is of
            // other bytes (a crash between the two writes): left unhashed, to
            // be hashed again.
            let total = listed_len(&list);
            if let Some(n) = nodes.get_mut(&ino) {
                let owned = n
                    .row
                    .group
                    .and_then(|g| groups.get(&g))
                    .is_some_and(|g: &Group| g.row.owned);
                if total == n.row.size || !owned {
                    n.blocks = Some(list.into());
                }
            }
        }
        let mut tree = Self {
            nodes,
            groups,
            next_ino: snapshot.next_ino.max(3),
            reserved_ino: snapshot.next_ino.max(3),
            next_group,
            me,
            catalog: Journal::new(catalog),
            events: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
            remote_ids: HashMap::new(),
            content_scope: false,
        };
        for (parent, name) in dangling {
            tree.catalog.send(Op::DeleteDirent { parent, name })?;
        }
        if !tree.nodes.contains_key(&ROOT) {
            let now = Stamp::now();
            let row = NodeRow {
                ino: ROOT,
                group: None,
                kind: NodeKind::Dir,
                perm: 0o755,
                uid: owner_uid,
                gid: owner_gid,
                nlink: 2,
                rdev: 0,
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
                version: Version(0),
                target: None,
                remote: None,
            };
            tree.catalog.send(Op::PutNode(row.clone()))?;
            tree.nodes.insert(ROOT, Node::new(row, ROOT, None));
        }
        let me_name = tree.me.as_str().as_bytes().to_vec();
        if tree.child(ROOT, &me_name).is_none() {
            tree.create(
                ROOT,
                &me_name,
                NodeKind::Dir,
                0o755,
                owner_uid,
                owner_gid,
                0,
                None,
            )?;
        }
        // Drop whatever the root does not reach: nodes orphaned by a crash between
        // unlink and the node's deletion, or an unlinked file that was still open.
        let mut reached = std::collections::HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if !reached.insert(ino) {
                continue;
            }
            if let Some(children) = tree.nodes.get(&ino).and_then(|n| n.children.as_ref()) {
                stack.extend(children.values().copied());
            }
        }
        let orphans: Vec<Ino> = tree
            .nodes
            .keys()
            .copied()
            .filter(|i| !reached.contains(i))
            .collect();
        let mut dropped_files = Vec::new();
        for ino in orphans {
            if let Some(n) = tree.nodes.remove(&ino)
                && n.row.kind == NodeKind::File
            {
                dropped_files.push(ino);
            }
            tree.catalog.send(Op::DeleteNode(ino))?;
        }
        // Hard-link counts follow from the entries; repair any a crash left behind.
        let mut links: HashMap<Ino, u32> = HashMap::new();
        for n in tree.nodes.values() {
            if let Some(children) = &n.children {
                for c in children.values() {
                    *links.entry(*c).or_default() += 1;
                }
            }
        }
        let fixes: Vec<NodeRow> = tree
            .nodes
            .values_mut()
            .filter_map(|n| {
                let want = if n.row.kind == NodeKind::Dir {
                    2 + n
                        .children
                        .as_ref()
                        .map(|c| c.len() as u32)
                        .unwrap_or(0)
                        .saturating_sub(0)
                } else {
                    links.get(&n.row.ino).copied().unwrap_or(1)
                };
                (n.row.kind != NodeKind::Dir && n.row.nlink != want).then(|| {
                    n.row.nlink = want;
                    n.row.clone()
                })
            })
            .collect();
        for row in fixes {
            tree.catalog.send(Op::PutNode(row))?;
        }
        tree.recount_dir_links();
        let mirrored: Vec<((GroupId, u64), Ino)> = tree
            .nodes
            .values()
            .filter_map(|n| Some(((n.row.group?, n.row.remote?.id), n.row.ino)))
            .collect();
        tree.remote_ids.extend(mirrored);
        Ok((tree, dropped_files))
    }

    fn recount_dir_links(&mut self) {
        let counts: Vec<(Ino, u32)> = self
            .nodes
            .values()
            .filter_map(|n| {
                n.children.as_ref().map(|c| {
                    let subdirs = c
                        .values()
                        .filter(|i| {
                            self.nodes
                                .get(i)
                                .map(|n| n.row.kind == NodeKind::Dir)
                                .unwrap_or(false)
                        })
                        .count() as u32;
                    (n.row.ino, 2 + subdirs)
                })
            })
            .collect();
        for (ino, want) in counts {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.row.nlink = want;
            }
        }
    }

    /// The user this client acts as.
    pub fn me(&self) -> &UserName {
        &self.me
    }

    /// A node.
    pub fn get(&self, ino: Ino) -> FsResult<&Node> {
        self.nodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn get_mut(&mut self, ino: Ino) -> FsResult<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    /// The child `name` of `parent`, if any.
    pub fn child(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.nodes
            .get(&parent)?
            .children
            .as_ref()?
            .get(name)
            .copied()
    }

    /// Looks up `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Ino> {
        let p = self.get(parent)?;
        let children = p.children.as_ref().ok_or(FsError::NotDir)?;
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        children.get(name).copied().ok_or(FsError::NotFound)
    }

    /// Where directory `ino` sits in the layout.
    pub fn place(&self, ino: Ino) -> FsResult<Place> {
        if ino == ROOT {
            return Ok(Place::Root);
        }
        let n = self.get(ino)?;
        Ok(match n.row.group {
            Some(g) => Place::Group(g),
            None => Place::UserDir,
        })
    }

    /// A group.
    pub fn group(&self, g: GroupId) -> Option<&Group> {
        self.groups.get(&g)
    }

    /// Files of owned groups whose block list is unknown (their hashing had
    /// not reached the catalog when the last mount ended), with their content
    /// sequence: to hash now, or they would not be published until changed.
    pub fn unhashed_owned_files(&self) -> Vec<(Ino, u64)> {
        self.nodes
            .values()
            .filter(|n| n.row.kind == NodeKind::File && n.blocks.is_none())
            .filter(|n| {
                n.row
                    .group
                    .and_then(|g| self.groups.get(&g))
                    .is_some_and(|g| g.row.owned && g.held.is_none())
            })
            .map(|n| (n.row.ino, n.content_seq))
            .collect()
    }

    /// Holds owned group `g`: nothing of it is published until the next mount.
    pub fn hold(&mut self, g: GroupId, why: String) {
        if let Some(group) = self.groups.get_mut(&g) {
            group.held = Some(why);
        }
    }

    /// All groups.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    fn alloc_ino(&mut self) -> FsResult<Ino> {
        let ino = Ino(self.next_ino);
        self.next_ino += 1;
        // Reserve inode numbers in chunks: the catalog only needs an upper bound,
        // and the highest node in use covers the rest after a crash.
        if self.next_ino > self.reserved_ino {
            self.reserved_ino = self.next_ino + INO_CHUNK;
            self.catalog.send(Op::SetMeta {
                key: "next_ino",
                value: self.reserved_ino as i64,
            })?;
        }
        Ok(ino)
    }

    /// Appends to `group`'s change log and returns the new version.
    fn log(
        &mut self,
        group: GroupId,
        op: ChangeOp,
        ino: Ino,
        parent: Option<(Ino, Vec<u8>)>,
        new_parent: Option<(Ino, Vec<u8>)>,
        ranges: Option<Vec<(u64, u64)>>,
    ) -> FsResult<Version> {
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(Version(0));
        };
        let seq = g.row.next_seq;
        g.row.next_seq = Seq(seq.0 + 1);
        self.send_op(Op::AppendChange(ChangeRow {
            group,
            seq,
            op,
            ino,
            parent,
            new_parent,
            ranges,
        }))?;
        Ok(Version(seq.0))
    }

    /// Records a change to node `ino`. In an owned group it appends to the log
    /// and bumps the node's version; in a joined group it marks a mirrored node
    /// as edited locally (nothing a member does reaches the owner).
    fn changed(
        &mut self,
        ino: Ino,
        op: ChangeOp,
        parent: Option<(Ino, Vec<u8>)>,
        new_parent: Option<(Ino, Vec<u8>)>,
        ranges: Option<Vec<(u64, u64)>>,
    ) -> FsResult<()> {
        let group = self.get(ino)?.row.group;
        if let Some(g) = group {
            if self.groups.get(&g).is_some_and(|g| g.row.owned) {
                let v = self.log(g, op, ino, parent, new_parent, ranges)?;
                self.get_mut(ino)?.row.version = v;
                let _ = self.events.send(TreeEvent::Changed { group: g, ino });
            } else if let Some(r) = self.get_mut(ino)?.row.remote.as_mut() {
                r.local_edit = true;
                // A mirror removed, moved or linked here is put back only by a
                // snapshot (the owner's log has nothing new of it): the next
                // sync is one.
                if matches!(op, ChangeOp::Remove | ChangeOp::Rename | ChangeOp::Link) {
                    self.forget_position(g)?;
                }
            }
        }
        self.persist(ino)
    }

    /// Member side: the next sync of joined group `g` must be a snapshot.
    fn forget_position(&mut self, g: GroupId) -> FsResult<()> {
        if let Some(group) = self.groups.get_mut(&g)
            && group.row.epoch != 0
        {
            group.row.epoch = 0;
            self.catalog.send(Op::PutGroup(group.row.clone()))?;
        }
        Ok(())
    }

    /// Marks `ino`'s content as changed: its block list is stale until rehashed.
    /// Returns the new content sequence, for [`Tree::set_blocks`].
    pub fn content_touched(&mut self, ino: Ino) -> FsResult<u64> {
        let n = self.get_mut(ino)?;
        n.content_seq += 1;
        n.blocks = None;
        n.suspect = None;
        Ok(n.content_seq)
    }

    /// Marks file `ino`, whose backing file has times `times` (mtime, ctime)
    /// that the catalog does not, as possibly changed: returns the content
    /// sequence to hash it for, or `None` if it has no block list to compare
    /// with (it is hashed anyway then).
    pub fn suspect(&mut self, ino: Ino, times: (Stamp, Stamp)) -> FsResult<Option<u64>> {
        let n = self.get_mut(ino)?;
        if n.blocks.is_none() {
            return Ok(None);
        }
        n.suspect = Some(times);
        Ok(Some(n.content_seq))
    }

    /// Records a file's block list, computed for content sequence `seq`; ignored
    /// if the content changed again since.
    pub fn set_blocks(
        &mut self,
        ino: Ino,
        seq: u64,
        blocks: Vec<(BlockHash, u32)>,
    ) -> FsResult<()> {
        let n = self.get_mut(ino)?;
        if n.content_seq != seq || n.row.kind != NodeKind::File {
            return Ok(());
        }
        // Hashed while being written (through passthrough, whose writes this
        // side sees only at close): the list is of bytes that are not the
        // recorded content. The close brings a new sequence and a new hash.
        let total = listed_len(&blocks);
        if total != n.row.size {
            tracing::debug!(%ino, size = n.row.size, hashed = total, "file changed while hashed; waiting for its close");
            return Ok(());
        }
        if let Some((mtime, ctime)) = n.suspect.take() {
            if n.blocks.as_deref() == Some(&blocks[..]) {
                return Ok(());
            }
            // Written in place without a record before a crash: the bytes are
            // the backing file's, so they become a new version.
            tracing::warn!(%ino, "file changed in place before a crash; recording it as a new version");
            let size = n.row.size;
            self.content_changed(ino, size, mtime, ctime, None)?;
        }
        let owned = self.in_owned_group(ino);
        let n = self.get_mut(ino)?;
        let count = blocks.len() as u64;
        n.blocks = Some(blocks.clone().into());
        let group = n.row.group;
        self.catalog.send_as(
            Op::PutBlocks {
                ino,
                from: 0,
                blocks,
                count,
            },
            owned,
        )?;
        if let Some(group) = group {
            let _ = self.events.send(TreeEvent::Hashed { group, ino });
        }
        Ok(())
    }

    /// A receiver of tree events, for the sync engine.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<TreeEvent> {
        self.events.subscribe()
    }

    /// Queues the node's current row for the catalog.
    pub fn persist(&mut self, ino: Ino) -> FsResult<()> {
        let row = self.get(ino)?.row.clone();
        self.send_op(Op::PutNode(row))?;
        Ok(())
    }

    fn send_op(&self, op: Op) -> Result<(), crate::catalog::CatalogError> {
        self.catalog.send_as(op, self.content_scope)
    }

    /// Logs a write of `ino` ([`Self::changed`]); `content`: its records are an
    /// owned file's content alone ([`Catalog::send_content`]).
    fn changed_content(
        &mut self,
        ino: Ino,
        ranges: Option<Vec<(u64, u64)>>,
        content: bool,
    ) -> FsResult<()> {
        self.content_scope = content;
        let logged = self.changed(ino, ChangeOp::Write, None, None, ranges);
        self.content_scope = false;
        logged
    }

    /// Whether `ino` is in a group this client owns.
    pub(crate) fn in_owned_group(&self, ino: Ino) -> bool {
        self.nodes
            .get(&ino)
            .and_then(|n| n.row.group)
            .and_then(|g| self.groups.get(&g))
            .is_some_and(|g| g.row.owned)
    }

    fn touch_dir(&mut self, dir: Ino, now: Stamp) -> FsResult<()> {
        let d = self.get_mut(dir)?;
        d.row.mtime = now;
        d.row.ctime = now;
        self.persist(dir)
    }

    /// Creates a node `name` in `parent`. Enforces the layout: user folders in the
    /// root, groups in user folders, anything inside groups.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        parent: Ino,
        name: &[u8],
        kind: NodeKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
    ) -> FsResult<Ino> {
        check_name(name)?;
        let p = self.get(parent)?;
        let pchildren = p.children.as_ref().ok_or(FsError::NotDir)?;
        if pchildren.contains_key(name) || (parent == ROOT && name == WSSERVER_NAME) {
            return Err(FsError::Exists);
        }
        let pgroup = p.row.group;
        let pperm = p.row.perm;
        let pgid = p.row.gid;
        let place = self.place(parent)?;
        let text = std::str::from_utf8(name).unwrap_or("");
        let mut new_group = None;
        let mut pending_join = None;
        let group = match place {
            Place::Root => {
                if kind != NodeKind::Dir {
                    return Err(FsError::NotPermitted {
                        why: "only user folders live in the root",
                    });
                }
                UserName::new(text).map_err(|_| FsError::Invalid {
                    why: "not a valid user name",
                })?;
                None
            }
            Place::UserDir => {
                if kind != NodeKind::Dir {
                    return Err(FsError::NotPermitted {
                        why: "only groups live in a user folder",
                    });
                }
                GroupName::new(text).map_err(|_| FsError::Invalid {
                    why: "not a valid group name",
                })?;
                let id = GroupId(self.next_group);
                self.next_group += 1;
                new_group = Some(id);
                Some(id)
            }
            Place::Group(_) => pgroup,
        };
        let ino = self.alloc_ino()?;
        let now = Stamp::now();
        // BSD group semantics under a setgid directory, as ext4 does it.
        let (gid, mut perm) = if pperm & libc::S_ISGID as u16 != 0 {
            let mut perm = perm;
            if kind == NodeKind::Dir {
                perm |= libc::S_ISGID;
            }
            (pgid, perm)
        } else {
            (gid, perm)
        };
        perm &= 0o7777;
        let size = target.as_ref().map(|t| t.len() as u64).unwrap_or(0);
        let row = NodeRow {
            ino,
            group,
            kind,
            perm: perm as u16,
            uid,
            gid,
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            rdev,
            size,
            atime: now,
            mtime: now,
            ctime: now,
            version: Version(0),
            target,
            remote: None,
        };
        if let Some(id) = new_group {
            let owner = self
                .get(parent)?
                .parent
                .eq(&ROOT)
                .then(|| self.name_in(ROOT, parent))
                .flatten()
                .unwrap_or_default();
            let owned = owner == self.me.as_str();
            let grow = GroupRow {
                id,
                owned,
                owner,
                name: text.to_owned(),
                root: ino,
                // Owned: the first log position; joined: none applied yet.
                next_seq: if owned { Seq(1) } else { Seq(0) },
                epoch: if owned { new_epoch() } else { 0 },
            };
            self.catalog.send(Op::PutGroup(grow.clone()))?;
            let joined = !grow.owned;
            self.groups.insert(
                id,
                Group {
                    row: grow,
                    members: Vec::new(),
                    held: None,
                },
            );
            if joined {
                // Sent once the root exists (below), so the engine can find it.
                pending_join = Some(id);
            }
        }
        // A new file of a group we own has no block list until it is hashed,
        // once its creator closes it: members get it whole, never empty first.
        let owned = group.is_some_and(|g| self.groups.get(&g).is_some_and(|g| g.row.owned));
        let blocks = (kind == NodeKind::File && !owned).then(|| Blocks::from(Vec::new()));
        self.nodes.insert(ino, Node::new(row, parent, blocks));
        let p = self.get_mut(parent)?;
        if let Some(c) = p.children.as_mut() {
            c.insert(name.to_vec(), ino);
        }
        if kind == NodeKind::Dir {
            p.row.nlink += 1;
        }
        self.catalog.send(Op::PutDirent {
            parent,
            name: name.to_vec(),
            ino,
        })?;
        self.touch_dir(parent, now)?;
        self.changed(
            ino,
            ChangeOp::Create,
            Some((parent, name.to_vec())),
            None,
            None,
        )?;
        if let Some(group) = pending_join {
            let _ = self.events.send(TreeEvent::Joined { group });
        }
        Ok(ino)
    }

    /// The name under which `parent` holds `ino`, as text.
    fn name_in(&self, parent: Ino, ino: Ino) -> Option<String> {
        self.nodes
            .get(&parent)?
            .children
            .as_ref()?
            .iter()
            .find(|(_, i)| **i == ino)
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
    }

    /// Removes the entry `name` from `parent`. `dir` selects rmdir semantics.
    /// Returns the node if it has no links left and no open handles: the caller
    /// deletes its backing file.
    pub fn remove(&mut self, parent: Ino, name: &[u8], dir: bool) -> FsResult<Option<Node>> {
        if name == b"." {
            return Err(FsError::Invalid {
                why: "cannot remove .",
            });
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let ino = self.lookup(parent, name)?;
        let place = self.place(parent)?;
        let n = self.get(ino)?;
        let is_dir = n.row.kind == NodeKind::Dir;
        if dir && !is_dir {
            return Err(FsError::NotDir);
        }
        if !dir && is_dir {
            return Err(FsError::IsDir);
        }
        if is_dir && n.children.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(FsError::NotEmpty);
        }
        if place == Place::Root && name == self.me.as_str().as_bytes() {
            return Err(FsError::NotPermitted {
                why: "your own user folder cannot be removed",
            });
        }
        let group_root_of = (place == Place::UserDir).then_some(n.row.group).flatten();
        let now = Stamp::now();
        // Log first, while the node still knows its group.
        self.changed(
            ino,
            ChangeOp::Remove,
            Some((parent, name.to_vec())),
            None,
            None,
        )?;
        let p = self.get_mut(parent)?;
        if let Some(c) = p.children.as_mut() {
            c.remove(name);
        }
        if is_dir {
            p.row.nlink = p.row.nlink.saturating_sub(1);
        }
        self.catalog.send(Op::DeleteDirent {
            parent,
            name: name.to_vec(),
        })?;
        self.touch_dir(parent, now)?;
        if let Some(g) = group_root_of
            && let Some(group) = self.groups.remove(&g)
        {
            self.catalog.send(Op::DeleteGroup(g))?;
            if !group.row.owned {
                let _ = self.events.send(TreeEvent::Left {
                    owner: group.row.owner,
                    name: group.row.name,
                });
            }
        }
        let n = self.get_mut(ino)?;
        n.row.nlink = if is_dir {
            0
        } else {
            n.row.nlink.saturating_sub(1)
        };
        n.row.ctime = now;
        if !is_dir && n.row.nlink > 0 && n.parent == parent {
            self.find_parent(ino);
        }
        self.release_if_unused(ino)
    }

    /// Points a file that lost a name back at a directory that still holds it
    /// (another of its hard links), if the one it pointed at no longer does.
    fn find_parent(&mut self, ino: Ino) {
        if self.entry_of(ino).is_ok() {
            return;
        }
        let Some(g) = self.nodes.get(&ino).and_then(|n| n.row.group) else {
            return;
        };
        let names = self.names_in_group(g, &std::collections::HashSet::from([ino]));
        if let Some((dir, _)) = names.get(&ino).and_then(|n| n.first())
            && let Some(n) = self.nodes.get_mut(&ino)
        {
            n.parent = *dir;
        }
    }

    /// Deletes `ino` if it has no links and no open handles; returns it if so.
    pub fn release_if_unused(&mut self, ino: Ino) -> FsResult<Option<Node>> {
        let n = self.get(ino)?;
        if n.row.nlink > 0 || n.opens.load(Ordering::SeqCst) > 0 {
            self.persist(ino)?;
            return Ok(None);
        }
        self.catalog.send(Op::DeleteNode(ino))?;
        let node = self.nodes.remove(&ino);
        if let Some(n) = &node
            && let (Some(g), Some(r)) = (n.row.group, n.row.remote)
            && self.remote_ids.get(&(g, r.id)) == Some(&ino)
        {
            self.remote_ids.remove(&(g, r.id));
        }
        Ok(node)
    }

    /// Whether `ancestor` is `ino` or one of its ancestors.
    fn is_ancestor(&self, ancestor: Ino, mut ino: Ino) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT {
                return false;
            }
            match self.nodes.get(&ino) {
                Some(n) => ino = n.parent,
                None => return false,
            }
        }
    }

    /// Renames `parent/name` to `newparent/newname`. Returns a node that lost its
    /// last link (a replaced target), for the caller to delete.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> FsResult<Option<Node>> {
        check_name(newname)?;
        let ino = self.lookup(parent, name)?;
        let src_place = self.place(parent)?;
        let dst_place = self.place(newparent)?;
        match (src_place, dst_place) {
            (Place::Group(a), Place::Group(b)) if a == b => {}
            (Place::Group(_), Place::Group(_)) => return Err(FsError::CrossGroup),
            _ => {
                return Err(FsError::NotPermitted {
                    why: "user folders and groups cannot be renamed",
                });
            }
        }
        let target = self.child(newparent, newname);
        if target == Some(ino) {
            return Ok(None);
        }
        let src_dir = self.get(ino)?.row.kind == NodeKind::Dir;
        if src_dir && self.is_ancestor(ino, newparent) {
            return Err(FsError::Invalid {
                why: "cannot move a directory into itself",
            });
        }
        let now = Stamp::now();
        if exchange {
            let other = target.ok_or(FsError::NotFound)?;
            let other_dir = self.get(other)?.row.kind == NodeKind::Dir;
            if other_dir && self.is_ancestor(other, parent) {
                return Err(FsError::Invalid {
                    why: "cannot move a directory into itself",
                });
            }
            self.set_child(parent, name, other)?;
            self.set_child(newparent, newname, ino)?;
            self.get_mut(ino)?.parent = newparent;
            self.get_mut(other)?.parent = parent;
            if src_dir != other_dir && parent != newparent {
                let (gain, lose) = if src_dir {
                    (newparent, parent)
                } else {
                    (parent, newparent)
                };
                self.get_mut(gain)?.row.nlink += 1;
                let l = self.get_mut(lose)?;
                l.row.nlink = l.row.nlink.saturating_sub(1);
            }
            for i in [ino, other] {
                self.get_mut(i)?.row.ctime = now;
            }
            self.touch_dir(parent, now)?;
            self.touch_dir(newparent, now)?;
            self.changed(
                ino,
                ChangeOp::Rename,
                Some((parent, name.to_vec())),
                Some((newparent, newname.to_vec())),
                None,
            )?;
            self.changed(
                other,
                ChangeOp::Rename,
                Some((newparent, newname.to_vec())),
                Some((parent, name.to_vec())),
                None,
            )?;
            return Ok(None);
        }
        let mut replaced = None;
        let mut inherit = None;
        if let Some(t) = target {
            if noreplace {
                return Err(FsError::Exists);
            }
            let tn = self.get(t)?;
            let t_dir = tn.row.kind == NodeKind::Dir;
            match (src_dir, t_dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if tn.children.as_ref().is_some_and(|c| !c.is_empty()) => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
            // A member's file put in place of a mirrored one (an editor's save
            // in a joined group) is the member's edit of that file: it takes
            // over the mirror's identity, so that it stays until the owner
            // changes the file, and is kept as a conflict copy when it does.
            if !t_dir && !src_dir && !self.in_owned_group(t) {
                inherit = tn.row.remote.zip(tn.row.group);
            }
            replaced = self.remove(newparent, newname, t_dir)?;
        }
        let p = self.get_mut(parent)?;
        if let Some(c) = p.children.as_mut() {
            c.remove(name);
        }
        if src_dir {
            p.row.nlink = p.row.nlink.saturating_sub(1);
        }
        self.catalog.send(Op::DeleteDirent {
            parent,
            name: name.to_vec(),
        })?;
        self.set_child(newparent, newname, ino)?;
        if src_dir {
            self.get_mut(newparent)?.row.nlink += 1;
        }
        let n = self.get_mut(ino)?;
        n.parent = newparent;
        n.row.ctime = now;
        // Only content of the member's own (in the backing store) can take
        // over; a clean mirror moved over another stays what it is.
        if let Some((r, g)) = inherit
            && n.row.remote.is_none_or(|own| own.local_edit)
        {
            let before = n.row.remote.replace(crate::catalog::Remote {
                id: r.id,
                version: r.version,
                local_edit: true,
            });
            if let Some(own) = before
                && self.remote_ids.get(&(g, own.id)) == Some(&ino)
            {
                self.remote_ids.remove(&(g, own.id));
            }
            self.remote_ids.insert((g, r.id), ino);
        }
        self.touch_dir(parent, now)?;
        if newparent != parent {
            self.touch_dir(newparent, now)?;
        }
        self.changed(
            ino,
            ChangeOp::Rename,
            Some((parent, name.to_vec())),
            Some((newparent, newname.to_vec())),
            None,
        )?;
        Ok(replaced)
    }

    fn set_child(&mut self, parent: Ino, name: &[u8], ino: Ino) -> FsResult<()> {
        let p = self.get_mut(parent)?;
        p.children
            .as_mut()
            .ok_or(FsError::NotDir)?
            .insert(name.to_vec(), ino);
        self.catalog.send(Op::PutDirent {
            parent,
            name: name.to_vec(),
            ino,
        })?;
        Ok(())
    }

    /// Adds a hard link `newparent/newname` to `ino`.
    pub fn link(&mut self, ino: Ino, newparent: Ino, newname: &[u8]) -> FsResult<()> {
        check_name(newname)?;
        let n = self.get(ino)?;
        if n.row.kind == NodeKind::Dir {
            return Err(FsError::NotPermitted {
                why: "hard links to directories",
            });
        }
        let group = n.row.group;
        match self.place(newparent)? {
            Place::Group(g) if Some(g) == group => {}
            Place::Group(_) => return Err(FsError::CrossGroup),
            _ => {
                return Err(FsError::NotPermitted {
                    why: "only groups hold files",
                });
            }
        }
        if self.child(newparent, newname).is_some() {
            return Err(FsError::Exists);
        }
        let now = Stamp::now();
        self.set_child(newparent, newname, ino)?;
        let n = self.get_mut(ino)?;
        n.row.nlink += 1;
        n.row.ctime = now;
        self.touch_dir(newparent, now)?;
        self.changed(
            ino,
            ChangeOp::Link,
            None,
            Some((newparent, newname.to_vec())),
            None,
        )
    }

    /// Applies a setattr. The caller has already resized the backing file.
    pub fn setattr(&mut self, ino: Ino, set: &SetAttr) -> FsResult<()> {
        let now = Stamp::now();
        let owned = self.in_owned_group(ino);
        let n = self.get_mut(ino)?;
        let perm = n.row.perm;
        if let Some(mode) = set.mode {
            n.row.perm = (mode & 0o7777) as u16;
        } else if set.drop_privileges && n.row.kind != NodeKind::Dir {
            n.row.perm = without_privileges(n.row.perm, set.outsider);
        }
        if let Some(uid) = set.uid {
            n.row.uid = uid;
        }
        if let Some(gid) = set.gid {
            n.row.gid = gid;
        }
        let mut content = false;
        if let Some(size) = set.size {
            if n.row.kind == NodeKind::Dir {
                return Err(FsError::IsDir);
            }
            n.row.size = size;
            n.row.mtime = now;
            content = true;
        }
        if let Some(t) = set.atime {
            n.row.atime = t;
        }
        if let Some(t) = set.mtime {
            n.row.mtime = t;
        }
        n.row.ctime = set.ctime.unwrap_or(now);
        let size = n.row.size;
        // A truncation alone is content: after a crash, the backing file's size
        // is taken back (see `Catalog::send_content`).
        let size_only = n.row.perm == perm
            && [set.mode, set.uid, set.gid].iter().all(Option::is_none)
            && set.atime.is_none()
            && set.mtime.is_none();
        if content {
            self.content_touched(ino)?;
            self.changed_content(ino, Some(vec![(size, u64::MAX)]), owned && size_only)
        } else {
            self.changed(ino, ChangeOp::SetAttr, None, None, None)
        }
    }

    /// Records that a file's content changed: new size and times (as the backing
    /// file reports them), and the byte ranges written if known. Returns the new
    /// content sequence, for hashing.
    pub fn content_changed(
        &mut self,
        ino: Ino,
        size: u64,
        mtime: Stamp,
        ctime: Stamp,
        ranges: Option<Vec<(u64, u64)>>,
    ) -> FsResult<u64> {
        let n = self.get_mut(ino)?;
        n.row.size = size;
        n.row.mtime = mtime;
        n.row.ctime = n.row.ctime.max(ctime);
        let seq = self.content_touched(ino)?;
        // A member's edit is not rebuilt after a crash: its record is not
        // content alone (it marks the mirror as edited).
        let owned = self.in_owned_group(ino);
        self.changed_content(ino, ranges, owned)?;
        Ok(seq)
    }

    /// Updates size and times after a write that goes through the daemon, without
    /// logging (the log entry is written when the file is closed).
    pub fn note_write(&mut self, ino: Ino, end: u64) -> FsResult<()> {
        let now = Stamp::now();
        let n = self.get_mut(ino)?;
        n.row.size = n.row.size.max(end);
        n.row.mtime = now;
        n.row.ctime = now;
        Ok(())
    }

    /// Counts an open handle on `ino` (under the read lock).
    pub fn opened(&self, ino: Ino) -> FsResult<()> {
        self.get(ino)?.opens.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Drops an open handle (under the read lock). Returns true if the node is
    /// unlinked and now unused: the caller then takes the write lock and calls
    /// [`Tree::release_if_unused`].
    pub fn closed(&self, ino: Ino) -> FsResult<bool> {
        let n = self.get(ino)?;
        let left = n.opens.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        Ok(left == 0 && n.row.nlink == 0)
    }

    /// Sets an extended attribute; `flags` are `XATTR_CREATE`/`XATTR_REPLACE`.
    pub fn set_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(FsError::Range);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let n = self.get_mut(ino)?;
        let exists = n.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoData);
        }
        n.xattrs.insert(name.to_vec(), value.to_vec());
        n.row.ctime = Stamp::now();
        self.catalog.send(Op::PutXattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
        })?;
        self.changed(ino, ChangeOp::Xattr, None, None, None)
    }

    /// Removes an extended attribute.
    pub fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> FsResult<()> {
        let n = self.get_mut(ino)?;
        if n.xattrs.remove(name).is_none() {
            return Err(FsError::NoData);
        }
        n.row.ctime = Stamp::now();
        self.catalog.send(Op::DeleteXattr {
            ino,
            name: name.to_vec(),
        })?;
        self.changed(ino, ChangeOp::Xattr, None, None, None)
    }

    /// If `ino` is the `.members` file at the root of an owned group, that group.
    pub fn members_file_group(&self, parent: Ino, name: &[u8]) -> Option<GroupId> {
        if name != MEMBERS_NAME {
            return None;
        }
        let g = self.get(parent).ok()?.row.group?;
        let group = self.groups.get(&g)?;
        (group.row.root == parent && group.row.owned).then_some(g)
    }

    /// Whether `ino` is the `.members` file of an owned group.
    pub fn is_members_file(&self, ino: Ino) -> bool {
        self.get(ino).is_ok_and(|n| {
            self.members_file_group(n.parent, MEMBERS_NAME).is_some()
                && self.child(n.parent, MEMBERS_NAME) == Some(ino)
        })
    }

    /// Replaces a group's member list (from its `.members`).
    pub fn set_members(&mut self, g: GroupId, members: Vec<String>) -> FsResult<()> {
        if let Some(group) = self.groups.get_mut(&g)
            && group.members != members
        {
            tracing::info!(group = %group.row.name, ?members, "members changed");
            group.members = members.clone();
            let _ = self.events.send(TreeEvent::Members {
                group: g,
                members: members.clone(),
            });
            self.catalog.send(Op::SetMembers {
                group: g,
                users: members,
            })?;
        }
        Ok(())
    }

    /// Entries of directory `ino` as (ino, kind, name), with `.` and `..` first.
    pub fn list(&self, ino: Ino) -> FsResult<Vec<(Ino, NodeKind, Vec<u8>)>> {
        let n = self.get(ino)?;
        let children = n.children.as_ref().ok_or(FsError::NotDir)?;
        let mut out = Vec::with_capacity(children.len() + 3);
        out.push((ino, NodeKind::Dir, b".".to_vec()));
        out.push((n.parent, NodeKind::Dir, b"..".to_vec()));
        if ino == ROOT {
            out.push((WSSERVER, NodeKind::File, WSSERVER_NAME.to_vec()));
        }
        for (name, c) in children {
            let kind = self
                .nodes
                .get(c)
                .map(|n| n.row.kind)
                .unwrap_or(NodeKind::File);
            out.push((*c, kind, name.clone()));
        }
        Ok(out)
    }

    /// The path of the group root `g` relative to the mount, for messages.
    pub fn group_path(&self, g: GroupId) -> Option<PathBuf> {
        let group = self.groups.get(&g)?;
        Some(PathBuf::from(&group.row.owner).join(&group.row.name))
    }

    /// Regular files in the tree, for maintenance passes.
    pub fn files(&self) -> impl Iterator<Item = Ino> + '_ {
        self.nodes
            .values()
            .filter(|n| n.row.kind == NodeKind::File)
            .map(|n| n.row.ino)
    }

    /// The file-type bits of `kind`.
    pub fn mode_bits(kind: NodeKind) -> u32 {
        mode_kind(kind)
    }
}

/// A random, non-zero epoch for a new owned group's log.
pub fn new_epoch() -> u64 {
    // Without the system's random source, the time is unique enough to tell
    // one log from the next.
    getrandom::u64()
        .unwrap_or_else(|_| Stamp::now().secs.unsigned_abs() ^ u64::from(Stamp::now().nanos))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_privileges_keeps_setgid_only_without_group_execute_for_members() {
        assert_eq!(without_privileges(0o4755, false), 0o755);
        assert_eq!(without_privileges(0o6777, false), 0o777);
        assert_eq!(without_privileges(0o2767, false), 0o2767);
        assert_eq!(without_privileges(0o2767, true), 0o767);
        assert_eq!(without_privileges(0o1777, true), 0o1777);
        assert_eq!(without_privileges(0o644, true), 0o644);
    }

    /// Names in the catalog file under directory `parent`.
    fn entries(db: &std::path::Path, parent: Ino) -> Vec<Vec<u8>> {
        let c = rusqlite::Connection::open(db).unwrap();
        let mut q = c
            .prepare("SELECT name FROM dirents WHERE parent = ?1 ORDER BY name")
            .unwrap();
        q.query_map([parent.0 as i64], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn an_operation_reaches_the_catalog_whole_when_its_write_guard_drops() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.db");
        let (catalog, snapshot, _thread) = Catalog::open(&db).unwrap();
        let (tree, _) = Tree::load(
            snapshot,
            UserName::new("alice").unwrap(),
            0,
            0,
            catalog.clone(),
        )
        .unwrap();
        let lock = std::sync::RwLock::new(tree);
        let (me, g) = {
            let mut t = write(&lock);
            let me = t.lookup(ROOT, b"alice").unwrap();
            let g = t
                .create(me, b"g", NodeKind::Dir, 0o755, 0, 0, 0, None)
                .unwrap();
            t.create(g, b"old", NodeKind::File, 0o644, 0, 0, 0, None)
                .unwrap();
            (me, g)
        };
        catalog.barrier().unwrap();
        assert_eq!(entries(&db, me), vec![b"g".to_vec()]);
        let mut t = write(&lock);
        t.rename(g, b"old", g, b"new", false, false).unwrap();
        // Held while the operation's guard lives, even across a commit.
        catalog.barrier().unwrap();
        assert_eq!(entries(&db, g), vec![b"old".to_vec()]);
        drop(t);
        catalog.barrier().unwrap();
        assert_eq!(entries(&db, g), vec![b"new".to_vec()]);
    }

    /// Creates group `g` in alice's folder and an empty file `f` in it.
    fn file_in_a_group(t: &mut Tree) -> Ino {
        let me = t.lookup(ROOT, b"alice").unwrap();
        let g = t
            .create(me, b"g", NodeKind::Dir, 0o755, 0, 0, 0, None)
            .unwrap();
        t.create(g, b"f", NodeKind::File, 0o644, 0, 0, 0, None)
            .unwrap()
    }

    #[test]
    fn a_suspect_file_becomes_a_new_version_only_if_its_hash_differs() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, snapshot, _thread) = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let me = UserName::new("alice").unwrap();
        let (mut t, _) = Tree::load(snapshot, me, 0, 0, catalog).unwrap();
        let f = file_in_a_group(&mut t);
        let old = Stamp { secs: 1, nanos: 0 };
        let seq = t.content_changed(f, 10, old, old, None).unwrap();
        let same = vec![(BlockHash([1; 32]), 10)];
        t.set_blocks(f, seq, same.clone()).unwrap();
        let version = t.get(f).unwrap().row.version;
        let later = (Stamp { secs: 2, nanos: 0 }, Stamp { secs: 2, nanos: 0 });
        // The same bytes: nothing to record.
        let seq = t.suspect(f, later).unwrap().unwrap();
        t.set_blocks(f, seq, same).unwrap();
        assert_eq!(t.get(f).unwrap().row.version, version);
        assert_eq!(t.get(f).unwrap().row.mtime, old);
        // Other bytes: a new version with the backing file's times and the hash.
        let seq = t.suspect(f, later).unwrap().unwrap();
        t.set_blocks(f, seq, vec![(BlockHash([2; 32]), 10)])
            .unwrap();
        let n = t.get(f).unwrap();
        assert!(n.row.version > version);
        assert_eq!(n.row.mtime, later.0);
        assert_eq!(n.blocks.as_deref(), Some(&[(BlockHash([2; 32]), 10)][..]));
        assert!(n.suspect.is_none());
    }

    #[test]
    fn a_block_list_that_does_not_add_up_to_the_size_is_never_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.db");
        let load = || {
            let (catalog, snapshot, thread) = Catalog::open(&db).unwrap();
            let me = UserName::new("alice").unwrap();
            let (tree, _) = Tree::load(snapshot, me, 0, 0, catalog.clone()).unwrap();
            (tree, catalog, thread)
        };
        let (mut t, catalog, thread) = load();
        let f = file_in_a_group(&mut t);
        let now = Stamp::now();
        let seq = t.content_changed(f, 10, now, now, None).unwrap();
        // Hashed while a writer was still at it: 4 bytes, not the 10 recorded.
        t.set_blocks(f, seq, vec![(BlockHash([1; 32]), 4)]).unwrap();
        assert!(t.get(f).unwrap().blocks.is_none());
        assert!(
            t.node_state(f).is_none(),
            "an inconsistent state was published"
        );
        t.set_blocks(f, seq, vec![(BlockHash([2; 32]), 10)])
            .unwrap();
        assert_eq!(t.node_state(f).unwrap().size, 10);
        // A crash between the size and the list reaching the catalog: the list
        // read back with another size is dropped, to be hashed again.
        catalog.barrier().unwrap();
        drop((t, catalog));
        drop(thread);
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute("UPDATE nodes SET size = 12 WHERE ino = ?1", [f.0 as i64])
            .unwrap();
        let (t, _catalog, _thread) = load();
        assert_eq!(t.get(f).unwrap().row.size, 12);
        assert!(t.get(f).unwrap().blocks.is_none());
        assert!(t.node_state(f).is_none());
    }

    #[test]
    fn each_name_of_a_hard_linked_file_goes_to_members_under_an_id_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, snapshot, _thread) = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let me = UserName::new("alice").unwrap();
        let (mut t, _) = Tree::load(snapshot, me, 0, 0, catalog).unwrap();
        let f = file_in_a_group(&mut t);
        let root = t.get(f).unwrap().parent;
        let g = t.get(f).unwrap().row.group.unwrap();
        let now = Stamp::now();
        let seq = t.content_changed(f, 10, now, now, None).unwrap();
        t.set_blocks(f, seq, vec![(BlockHash([1; 32]), 10)])
            .unwrap();
        let d = t
            .create(root, b"d", NodeKind::Dir, 0o755, 0, 0, 0, None)
            .unwrap();
        t.link(f, d, b"b").unwrap();
        t.link(f, root, b"c").unwrap();
        let sent = |t: &Tree| {
            let states = t.node_states(f, &t.linked_names(g, [f])).unwrap();
            for s in &states {
                assert_eq!(ino_of_id(s.id), f);
                assert_eq!(s.blocks.len(), 1);
            }
            states
                .into_iter()
                .map(|s| (s.id, s.parent, String::from_utf8(s.name).unwrap()))
                .collect::<Vec<_>>()
        };
        // First by directory, then by name: the group root's `c` gets the
        // inode number; `f` and `d/b` get link ids, distinct and stable.
        let three = sent(&t);
        assert_eq!(three[0], (f.0, 0, "c".to_string()));
        assert_eq!((three[1].1, three[1].2.as_str()), (0, "f"));
        assert_eq!((three[2].1, three[2].2.as_str()), (d.0, "b"));
        assert!(three[1].0 != f.0 && three[2].0 != f.0 && three[1].0 != three[2].0);
        assert_eq!(sent(&t), three);
        // The first name goes: the next one takes the inode number, the
        // other keeps its id.
        t.remove(root, b"c", false).unwrap();
        assert_eq!(sent(&t), [(f.0, 0, "f".to_string()), three[2].clone()]);
        // Down to one name, in another directory than the file was made in.
        t.remove(root, b"f", false).unwrap();
        let one = t.node_state(f).unwrap();
        assert_eq!(
            (one.id, one.parent, one.name.as_slice()),
            (f.0, d.0, &b"b"[..])
        );
        assert_eq!(sent(&t), [(f.0, d.0, "b".to_string())]);
    }

    #[test]
    fn only_an_owned_files_content_records_skip_the_fsync_barrier() {
        let dir = tempfile::tempdir().unwrap();
        let (catalog, snapshot, _thread) = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let me = UserName::new("alice").unwrap();
        let (mut t, _) = Tree::load(snapshot, me, 0, 0, catalog.clone()).unwrap();
        let needs_barrier = || {
            let b = catalog.begin_barrier_if_needed().unwrap();
            let needed = b.is_some();
            if let Some(b) = b {
                b.wait().unwrap();
            }
            needed
        };
        let f = file_in_a_group(&mut t);
        assert!(needs_barrier(), "a create is metadata");
        assert!(!needs_barrier());
        let now = Stamp::now();
        let seq = t.content_changed(f, 10, now, now, None).unwrap();
        t.set_blocks(f, seq, vec![(BlockHash([1; 32]), 10)])
            .unwrap();
        assert!(!needs_barrier(), "a write's record is content");
        let truncate = SetAttr {
            size: Some(3),
            ..SetAttr::default()
        };
        t.setattr(f, &truncate).unwrap();
        assert!(!needs_barrier(), "a truncation alone is content");
        let chmod = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        t.setattr(f, &chmod).unwrap();
        assert!(needs_barrier(), "a chmod is metadata");
        let truncate_and_touch = SetAttr {
            size: Some(0),
            mtime: Some(now),
            ..SetAttr::default()
        };
        t.setattr(f, &truncate_and_touch).unwrap();
        assert!(needs_barrier(), "explicit times are metadata");
        t.setattr(
            f,
            &SetAttr {
                mode: Some(0o4755),
                ..SetAttr::default()
            },
        )
        .unwrap();
        assert!(needs_barrier());
        let dropping = SetAttr {
            size: Some(0),
            drop_privileges: true,
            ..SetAttr::default()
        };
        t.setattr(f, &dropping).unwrap();
        assert!(
            needs_barrier(),
            "a truncation that drops setuid is metadata"
        );
        // The same through a write guard, which sends its ops as one batch.
        let t = std::sync::RwLock::new(t);
        write(&t).content_changed(f, 5, now, now, None).unwrap();
        assert!(!needs_barrier(), "a batch of content records is content");
        {
            let mut g = write(&t);
            g.content_changed(f, 6, now, now, None).unwrap();
            g.setattr(f, &chmod).unwrap();
        }
        assert!(needs_barrier(), "a batch with metadata in it is metadata");
    }

    #[test]
    fn members_parse_comments_blanks_and_bad_names() {
        let m = parse_members(b"# team\nbob\n\n  carol  # friend\n../evil\nbob\n");
        assert_eq!(m, vec!["bob".to_string(), "carol".to_string()]);
    }
}
