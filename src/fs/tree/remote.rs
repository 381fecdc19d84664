//! Both sides of a group in the tree. On the owner: the state of a node as members
//! need it, and a whole group as a snapshot. On a member: applying the owner's
//! nodes, mirrored by the owner's inode number (so renames apply as renames), with
//! SPEC §3's conflict table: whatever the member changed locally is kept as a
//! conflict copy, never destroyed.

use std::collections::{HashMap, HashSet, VecDeque};

use super::{Blocks, Node, Tree};
use crate::catalog::{NodeKind, NodeRow, Op, Remote, Stamp};
use crate::fs::error::{FsError, FsResult};
use crate::ids::{BlockHash, GroupId, Ino, Seq, Version};
use crate::sync::proto::{
    BlockRef, INLINE_BLOCKS, ListRef, NodeState, XATTRS_BYTES, list_hash, mirrored_xattr,
};

/// Which row of the conflict table applies: a full synchronization (subscribe,
/// reconnect) or a live update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Situation {
    /// `sync`: conflict copies are named `…-conflict-sync`.
    Sync,
    /// `update`: `…-conflict-update-add` / `…-conflict-update-change`.
    Update,
}

/// What the kernel must forget after an apply (sent once the tree lock is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inval {
    /// A directory entry appeared, disappeared or moved.
    Entry {
        /// The directory.
        parent: Ino,
        /// The name.
        name: Vec<u8>,
    },
    /// A node's attributes or content changed.
    Inode(Ino),
}

fn kind_of(k: u8) -> Option<NodeKind> {
    Some(match k {
        1 => NodeKind::File,
        2 => NodeKind::Dir,
        3 => NodeKind::Symlink,
        4 => NodeKind::Fifo,
        5 => NodeKind::Socket,
        6 => NodeKind::CharDevice,
        7 => NodeKind::BlockDevice,
        _ => return None,
    })
}

/// Permission bits of a mirrored node: the owner's, without setuid and setgid. The
/// owner is a peer, not a local administrator: a member mounted as root (with `suid`)
/// must not run the owner's programs with privileges the owner chose.
fn mirrored_perm(perm: u16) -> u16 {
    perm & 0o1777
}

fn to_refs(blocks: &[(BlockHash, u32)]) -> Vec<BlockRef> {
    blocks
        .iter()
        .map(|(h, len)| BlockRef {
            hash: h.0,
            len: *len,
        })
        .collect()
}

fn from_refs(refs: &[BlockRef]) -> Blocks {
    refs.iter()
        .map(|b| (BlockHash(b.hash), b.len))
        .collect::<Vec<_>>()
        .into()
}

/// Longest name of a directory entry, in bytes.
const NAME_MAX: usize = 255;

/// `name` followed by `tail`, with `name` shortened if that would be longer
/// than [`NAME_MAX`]: its extension (a short `.ext` at its end) is kept and
/// the part before it cut, never inside a UTF-8 character.
pub(crate) fn fit_name(name: &[u8], tail: &[u8]) -> Vec<u8> {
    if name.len() + tail.len() <= NAME_MAX {
        return [name, tail].concat();
    }
    let ext_at = name
        .iter()
        .rposition(|b| *b == b'.')
        .filter(|&i| i > 0 && name.len() - i <= 16);
    let (stem, ext) = name.split_at(ext_at.unwrap_or(name.len()));
    let mut keep = NAME_MAX
        .saturating_sub(tail.len() + ext.len())
        .min(stem.len());
    // Back to the start of a character: never leave half of one.
    while keep > 0 && keep < stem.len() && stem[keep] & 0b1100_0000 == 0b1000_0000 {
        keep -= 1;
    }
    [&stem[..keep], ext, tail].concat()
}

/// The extended attributes of a node that go to members, in name order, as
/// many as fit [`XATTRS_BYTES`].
fn mirrored_xattrs(
    xattrs: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut left = XATTRS_BYTES;
    xattrs
        .iter()
        .filter(|(name, _)| mirrored_xattr(name))
        .filter(|(name, value)| {
            let size = name.len() + value.len();
            let fits = size <= left;
            if fits {
                left -= size;
            }
            fits
        })
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// Every name of a file with several: (directory, name), sorted.
pub type LinkNames = HashMap<Ino, Vec<(Ino, Vec<u8>)>>;

/// A file with several names at the owner goes to members once per name, as
/// separate files with the same blocks: under its inode number for its first
/// name (by directory, then name), and under a link id for each other name. A
/// link id is the inode number below bit 40, 23 bits of the name's hash above it
/// and the top bit set: it lasts as long as the name does, and never equals an
/// inode number.
const LINK_ID: u64 = 1 << 63;
const LINK_INO_BITS: u32 = 40;
const LINK_SLOTS: u64 = (1 << 23) - 1;

/// The owner's inode behind a node id that members use (see [`LINK_ID`]).
pub fn ino_of_id(id: u64) -> Ino {
    if id & LINK_ID == 0 {
        Ino(id)
    } else {
        Ino(id & ((1 << LINK_INO_BITS) - 1))
    }
}

/// The link id of `ino`'s name `dir/name`, other than those `taken` (hash
/// collisions between names of one file move on to the next slot). `None` for an
/// inode number too large to fit.
fn link_id(ino: Ino, dir: Ino, name: &[u8], taken: &HashSet<u64>) -> Option<u64> {
    if ino.0 >> LINK_INO_BITS != 0 {
        return None;
    }
    let mut h = blake3::Hasher::new();
    h.update(&dir.0.to_le_bytes());
    h.update(name);
    let mut slot = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().ok()?) & LINK_SLOTS;
    loop {
        let id = LINK_ID | (slot << LINK_INO_BITS) | ino.0;
        if !taken.contains(&id) {
            return Some(id);
        }
        slot = (slot + 1) & LINK_SLOTS;
    }
}

impl Tree {
    /// The root directory of group `g`.
    pub fn group_root(&self, g: GroupId) -> FsResult<Ino> {
        self.groups
            .get(&g)
            .map(|g| g.row.root)
            .ok_or(FsError::NotFound)
    }

    /// The group `owner/name`, if this client has it.
    pub fn find_group(&self, owner: &str, name: &str) -> Option<GroupId> {
        self.groups
            .values()
            .find(|g| g.row.owner == owner && g.row.name == name)
            .map(|g| g.row.id)
    }

    /// The last log position: on an owner, the newest entry; on a member, what
    /// it has applied.
    pub fn log_position(&self, g: GroupId) -> u64 {
        self.groups.get(&g).map_or(0, |g| {
            if g.row.owned {
                g.row.next_seq.0.saturating_sub(1)
            } else {
                g.row.next_seq.0
            }
        })
    }

    /// Owner side: every name of those of `inos` that are files with more than
    /// one link, in group `g`. One walk of the group, and none unless such a
    /// file is asked for.
    pub fn linked_names(&self, g: GroupId, inos: impl IntoIterator<Item = Ino>) -> LinkNames {
        let wanted: HashSet<Ino> = inos
            .into_iter()
            .filter(|i| {
                self.nodes
                    .get(i)
                    .is_some_and(|n| n.row.kind != NodeKind::Dir && n.row.nlink > 1)
            })
            .collect();
        self.names_in_group(g, &wanted)
    }

    /// Every name of each of `wanted` in group `g`, sorted; one walk of the
    /// group, and none if nothing is wanted.
    pub(super) fn names_in_group(&self, g: GroupId, wanted: &HashSet<Ino>) -> LinkNames {
        let mut out = LinkNames::new();
        if wanted.is_empty() {
            return out;
        }
        let Ok(root) = self.group_root(g) else {
            return out;
        };
        let mut queue = VecDeque::from([root]);
        while let Some(dir) = queue.pop_front() {
            let Some(children) = self.nodes.get(&dir).and_then(|n| n.children.as_ref()) else {
                continue;
            };
            for (name, ino) in children {
                if wanted.contains(ino) {
                    out.entry(*ino).or_default().push((dir, name.clone()));
                } else if self.nodes.get(ino).is_some_and(|n| n.children.is_some()) {
                    queue.push_back(*ino);
                }
            }
        }
        for names in out.values_mut() {
            names.sort();
        }
        out
    }

    /// Owner side: the states of `ino` for members, one per name (see
    /// [`LINK_ID`]; `links` holds its names if it has several), or `None` while
    /// it cannot be sent yet (a file whose blocks are still being hashed).
    pub fn node_states(&self, ino: Ino, links: &LinkNames) -> Option<Vec<NodeState>> {
        let Some(names) = links.get(&ino).filter(|n| !n.is_empty()) else {
            return self.node_state(ino).map(|s| vec![s]);
        };
        let mut out = vec![self.state_at(ino, names[0].0, &names[0].1)?];
        let mut taken = HashSet::new();
        for (dir, name) in &names[1..] {
            let Some(id) = link_id(ino, *dir, name, &taken) else {
                break;
            };
            taken.insert(id);
            let mut s = self.state_at(ino, *dir, name)?;
            s.id = id;
            out.push(s);
        }
        Some(out)
    }

    /// Owner side: the ids members know `ino` by, one per name, as
    /// [`Tree::node_states`] gives them (needs no block list).
    pub fn node_ids(&self, ino: Ino, links: &LinkNames) -> Vec<u64> {
        let Some(names) = links.get(&ino).filter(|n| !n.is_empty()) else {
            return vec![ino.0];
        };
        let mut out = vec![ino.0];
        let mut taken = HashSet::new();
        for (dir, name) in &names[1..] {
            let Some(id) = link_id(ino, *dir, name, &taken) else {
                break;
            };
            taken.insert(id);
            out.push(id);
        }
        out
    }

    /// Owner side: the state of `ino` for members, under its first name, or
    /// `None` while it cannot be sent yet (a file whose blocks are still being
    /// hashed).
    pub fn node_state(&self, ino: Ino) -> Option<NodeState> {
        let (dir, name) = self.entry_of(ino).ok()?;
        self.state_at(ino, dir, &name)
    }

    /// The state of `ino` as `dir/name`. Parents are given as the owner's inode
    /// numbers, with the group root as 0.
    fn state_at(&self, ino: Ino, dir: Ino, name: &[u8]) -> Option<NodeState> {
        let n = self.nodes.get(&ino)?;
        let g = self.groups.get(&n.row.group?)?;
        if g.row.root == ino || n.row.nlink == 0 {
            return None;
        }
        let parent = if dir == g.row.root { 0 } else { dir.0 };
        let mut blocks = match n.row.kind {
            NodeKind::File => to_refs(n.blocks.as_ref()?),
            _ => Vec::new(),
        };
        // A file written through the daemon grows before its close rehashes it:
        // until then its state is not known (it is sent once hashed).
        let listed: u64 = blocks.iter().map(|b| u64::from(b.len)).sum();
        if n.row.kind == NodeKind::File && listed != n.row.size {
            return None;
        }
        // A long list is named, and fetched by the members in pieces.
        let list = (blocks.len() > INLINE_BLOCKS).then(|| ListRef {
            count: blocks.len() as u64,
            hash: list_hash(&blocks),
        });
        if list.is_some() {
            blocks = Vec::new();
        }
        Some(NodeState {
            id: ino.0,
            parent,
            name: name.to_vec(),
            kind: n.row.kind as u8,
            perm: n.row.perm,
            size: if n.row.kind == NodeKind::File {
                n.row.size
            } else {
                0
            },
            mtime: (n.row.mtime.secs, n.row.mtime.nanos),
            version: n.row.version.0,
            target: n.row.target.clone(),
            blocks,
            list,
            xattrs: mirrored_xattrs(&n.xattrs),
        })
    }

    /// Owner side: the block list of owned file `ino` for members, if it is
    /// known for its current content.
    pub fn block_list(&self, ino: Ino) -> Option<Vec<BlockRef>> {
        let n = self.nodes.get(&ino)?;
        if n.row.kind != NodeKind::File || n.row.nlink == 0 {
            return None;
        }
        let refs = to_refs(n.blocks.as_ref()?);
        let listed: u64 = refs.iter().map(|b| u64::from(b.len)).sum();
        (listed == n.row.size).then_some(refs)
    }

    /// Owner side: every node of group `g`, parents before children, and the
    /// files whose blocks are not known yet (sent once hashed).
    pub fn group_snapshot(&self, g: GroupId) -> FsResult<(Vec<NodeState>, Vec<Ino>)> {
        let root = self.group_root(g)?;
        let mut out = Vec::new();
        let mut pending = Vec::new();
        // Files with several names are sent after the walk has found them all
        // (after every directory, so parents still come first).
        let mut links = LinkNames::new();
        let mut queue = VecDeque::from([root]);
        while let Some(dir) = queue.pop_front() {
            let Some(children) = self.nodes.get(&dir).and_then(|n| n.children.as_ref()) else {
                continue;
            };
            for (name, ino) in children {
                let Some(n) = self.nodes.get(ino) else {
                    continue;
                };
                if n.row.kind != NodeKind::Dir && n.row.nlink > 1 {
                    links.entry(*ino).or_default().push((dir, name.clone()));
                    continue;
                }
                match self.state_at(*ino, dir, name) {
                    Some(s) => out.push(s),
                    None => pending.push(*ino),
                }
                if n.children.is_some() {
                    queue.push_back(*ino);
                }
            }
        }
        for names in links.values_mut() {
            names.sort();
        }
        let mut linked: Vec<Ino> = links.keys().copied().collect();
        linked.sort();
        for ino in linked {
            match self.node_states(ino, &links) {
                Some(states) => out.extend(states),
                None => pending.push(ino),
            }
        }
        Ok((out, pending))
    }

    /// Whether `user` is listed in owned group `g`'s `.members`.
    pub fn is_member(&self, g: GroupId, user: &str) -> bool {
        self.groups
            .get(&g)
            .is_some_and(|g| g.row.owned && g.members.iter().any(|m| m == user))
    }

    /// Member side: the local node mirroring the owner's node `id`, if any.
    pub fn mirror(&self, g: GroupId, id: u64) -> Option<Ino> {
        let ino = *self.remote_ids.get(&(g, id))?;
        self.nodes
            .get(&ino)
            .is_some_and(|n| n.row.nlink > 0)
            .then_some(ino)
    }

    /// The catalog this tree writes to.
    pub fn catalog(&self) -> &crate::catalog::Catalog {
        &self.catalog.catalog
    }

    /// The epoch of group `g`'s log: on an owner, its own; on a member, the
    /// owner's epoch of the position applied (0: none usable).
    pub fn epoch(&self, g: GroupId) -> u64 {
        self.groups.get(&g).map_or(0, |g| g.row.epoch)
    }

    /// Member side: records that `g` is in step with the owner's log `epoch` at
    /// position `seq` (after a snapshot or a catch-up: a snapshot of another
    /// epoch may move the position back).
    pub fn set_synced(&mut self, g: GroupId, epoch: u64, seq: u64) -> FsResult<()> {
        let Some(group) = self.groups.get_mut(&g) else {
            return Ok(());
        };
        // Never backwards in the same log: a replayed older snapshot changes
        // nothing.
        let seq = if group.row.epoch == epoch {
            seq.max(group.row.next_seq.0)
        } else {
            seq
        };
        group.row.epoch = epoch;
        group.row.next_seq = Seq(seq);
        self.catalog.send(Op::PutGroup(group.row.clone()))?;
        Ok(())
    }

    /// Owner side: how many directories `ino` is below its group's root.
    pub fn depth(&self, ino: Ino) -> usize {
        let mut depth = 0;
        let mut at = ino;
        while let Some(n) = self.nodes.get(&at) {
            let Some(g) = n.row.group.and_then(|g| self.groups.get(&g)) else {
                break;
            };
            if at == g.row.root || n.parent == at || depth > 4096 {
                break;
            }
            at = n.parent;
            depth += 1;
        }
        depth
    }

    /// Member side: records the owner's log position applied in `g`.
    pub fn set_applied(&mut self, g: GroupId, seq: u64) -> FsResult<()> {
        let Some(group) = self.groups.get_mut(&g) else {
            return Ok(());
        };
        // Never backwards: a replayed or reordered older message changes nothing.
        group.row.next_seq = Seq(group.row.next_seq.0.max(seq));
        self.catalog.send(Op::PutGroup(group.row.clone()))?;
        Ok(())
    }

    /// A free name for a conflict copy of `name` in `dir`: `name-SUFFIX`, then
    /// `name-SUFFIX-2`, `-3`, … (each shortened to fit, see [`fit_name`]).
    fn conflict_name(&self, dir: Ino, name: &[u8], suffix: &str) -> Vec<u8> {
        let mut n = 1;
        loop {
            let tail = match n {
                1 => format!("-{suffix}"),
                n => format!("-{suffix}-{n}"),
            };
            let candidate = fit_name(name, tail.as_bytes());
            if self.child(dir, &candidate).is_none() {
                return candidate;
            }
            n += 1;
        }
    }

    /// Moves `ino` from `dir/name` to `dir/new_name` without logging (sync only).
    fn move_entry(
        &mut self,
        ino: Ino,
        dir: Ino,
        name: &[u8],
        new_dir: Ino,
        new_name: &[u8],
        out: &mut Vec<Inval>,
    ) -> FsResult<()> {
        let is_dir = self.get(ino)?.row.kind == NodeKind::Dir;
        if let Some(c) = self.get_mut(dir)?.children.as_mut() {
            c.remove(name);
        }
        self.catalog.send(Op::DeleteDirent {
            parent: dir,
            name: name.to_vec(),
        })?;
        self.set_child(new_dir, new_name, ino)?;
        if is_dir && dir != new_dir {
            let d = self.get_mut(dir)?;
            d.row.nlink = d.row.nlink.saturating_sub(1);
            self.get_mut(new_dir)?.row.nlink += 1;
            self.get_mut(ino)?.parent = new_dir;
        }
        if !is_dir {
            self.get_mut(ino)?.parent = new_dir;
        }
        out.push(Inval::Entry {
            parent: dir,
            name: name.to_vec(),
        });
        out.push(Inval::Entry {
            parent: new_dir,
            name: new_name.to_vec(),
        });
        Ok(())
    }

    /// Turns a mirrored node into a member-local one: it no longer follows the
    /// owner, and sync never removes it.
    fn detach(&mut self, ino: Ino) -> FsResult<()> {
        let n = self.get_mut(ino)?;
        let (Some(g), Some(r)) = (n.row.group, n.row.remote.take()) else {
            return Ok(());
        };
        if self.remote_ids.get(&(g, r.id)) == Some(&ino) {
            self.remote_ids.remove(&(g, r.id));
        }
        self.persist(ino)
    }

    /// Keeps `dir/name` (member-local or locally edited) as a conflict copy.
    fn keep_as_conflict(
        &mut self,
        dir: Ino,
        name: &[u8],
        suffix: &str,
        out: &mut Vec<Inval>,
    ) -> FsResult<()> {
        let Some(ino) = self.child(dir, name) else {
            return Ok(());
        };
        let new_name = self.conflict_name(dir, name, suffix);
        tracing::info!(
            name = %String::from_utf8_lossy(name),
            copy = %String::from_utf8_lossy(&new_name),
            "keeping the member's version as a conflict copy"
        );
        self.move_entry(ino, dir, name, dir, &new_name, out)?;
        if let Some(g) = self.nodes.get(&dir).and_then(|d| d.row.group) {
            self.catalog.send(Op::CountConflict(g))?;
        }
        self.detach(ino)
    }

    /// Whether `ino` holds anything of the member's: a node without a mirror, or
    /// one edited locally, at any depth.
    fn holds_member_data(&self, ino: Ino) -> bool {
        let Some(n) = self.nodes.get(&ino) else {
            return false;
        };
        if n.row
            .remote
            .is_none_or(|r| r.local_edit && n.row.kind == NodeKind::File)
        {
            return true;
        }
        n.children
            .as_ref()
            .is_some_and(|c| c.values().any(|c| self.holds_member_data(*c)))
    }

    /// Member side: applies one of the owner's nodes to joined group `g`.
    pub fn apply_upsert(
        &mut self,
        g: GroupId,
        state: &NodeState,
        situation: Situation,
        out: &mut Vec<Inval>,
    ) -> FsResult<()> {
        let kind = kind_of(state.kind).ok_or(FsError::Invalid { why: "node kind" })?;
        let root = self.group_root(g)?;
        let parent = if state.parent == 0 {
            root
        } else {
            self.mirror(g, state.parent).ok_or(FsError::NotFound)?
        };
        if self.get(parent)?.children.is_none() {
            return Err(FsError::NotDir);
        }
        let change_suffix = match situation {
            Situation::Sync => "conflict-sync",
            Situation::Update => "conflict-update-change",
        };
        let mut existing = self.mirror(g, state.id);
        if let Some(ino) = existing
            && self
                .get(ino)?
                .row
                .remote
                .is_some_and(|r| r.version > state.version)
        {
            // An older state than the one applied (a replayed or reordered
            // message): never roll a node back.
            return Ok(());
        }
        // A mirrored file the member edited, whose owner version moved on: the
        // member's version becomes a conflict copy; the owner's is installed anew.
        if let Some(ino) = existing {
            let n = self.get(ino)?;
            let edited = n.row.remote.is_some_and(|r| r.local_edit);
            let moved_on = n.row.remote.is_some_and(|r| r.version != state.version);
            if n.row.kind != kind || (edited && moved_on && n.row.kind == NodeKind::File) {
                let (dir, name) = self.entry_of(ino)?;
                if n.row.kind == NodeKind::File && edited {
                    self.keep_as_conflict(dir, &name, change_suffix, out)?;
                } else {
                    self.remove_mirrored(ino, situation, out)?;
                }
                existing = None;
            }
        }
        match existing {
            Some(ino) => self.update_mirror(ino, parent, state, situation, out),
            None => self.create_mirror(g, parent, kind, state, situation, out),
        }
    }

    /// The directory and name under which `ino` is linked.
    pub(super) fn entry_of(&self, ino: Ino) -> FsResult<(Ino, Vec<u8>)> {
        let n = self.get(ino)?;
        let dir = n.parent;
        let name = self
            .get(dir)?
            .children
            .as_ref()
            .and_then(|c| c.iter().find(|(_, i)| **i == ino).map(|(n, _)| n.clone()))
            .ok_or(FsError::NotFound)?;
        Ok((dir, name))
    }

    /// Makes room for the owner's node at `dir/name`: a member-local node there
    /// becomes a conflict copy; a mirror of another owner node steps aside under
    /// a temporary name until its own update moves it (or the sync removes it).
    fn clear_name(
        &mut self,
        dir: Ino,
        name: &[u8],
        keep: Ino,
        situation: Situation,
        out: &mut Vec<Inval>,
    ) -> FsResult<()> {
        let Some(occupant) = self.child(dir, name) else {
            return Ok(());
        };
        if occupant == keep {
            return Ok(());
        }
        let n = self.get(occupant)?;
        let mirrored_clean = n.row.remote.is_some_and(|r| !r.local_edit);
        if mirrored_clean || n.row.kind == NodeKind::Dir && !self.holds_member_data(occupant) {
            let id = n.row.remote.map_or(occupant.0, |r| r.id);
            let temp = self.conflict_name(dir, format!(".brume-moving-{id}").as_bytes(), "tmp");
            return self.move_entry(occupant, dir, name, dir, &temp, out);
        }
        let suffix = match situation {
            Situation::Sync => "conflict-sync",
            Situation::Update => "conflict-update-add",
        };
        self.keep_as_conflict(dir, name, suffix, out)
    }

    fn create_mirror(
        &mut self,
        g: GroupId,
        parent: Ino,
        kind: NodeKind,
        state: &NodeState,
        situation: Situation,
        out: &mut Vec<Inval>,
    ) -> FsResult<()> {
        self.clear_name(parent, &state.name, Ino(0), situation, out)?;
        let ino = self.alloc_ino()?;
        let now = Stamp::now();
        let (uid, gid) = self.get(super::ROOT).map(|r| (r.row.uid, r.row.gid))?;
        let mtime = Stamp {
            secs: state.mtime.0,
            nanos: state.mtime.1.min(999_999_999),
        };
        let row = NodeRow {
            ino,
            group: Some(g),
            kind,
            perm: mirrored_perm(state.perm),
            uid,
            gid,
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            rdev: 0,
            size: match kind {
                NodeKind::File => state.size,
                NodeKind::Symlink => state.target.as_ref().map_or(0, |t| t.len() as u64),
                _ => 0,
            },
            atime: now,
            mtime,
            ctime: now,
            version: Version(state.version),
            target: state.target.clone(),
            remote: Some(Remote {
                id: state.id,
                version: state.version,
                local_edit: false,
            }),
        };
        // A list named by its hash arrives later: the file waits for it.
        let blocks =
            (kind == NodeKind::File && state.list.is_none()).then(|| from_refs(&state.blocks));
        self.catalog.send(Op::PutNode(row.clone()))?;
        if let Some(b) = &blocks {
            self.catalog.send(Op::PutBlocks {
                ino,
                from: 0,
                blocks: b.to_vec(),
                count: b.len() as u64,
            })?;
        }
        let mut node = Node::new(row, parent, blocks);
        node.pending_list = state.list.filter(|_| kind == NodeKind::File);
        self.nodes.insert(ino, node);
        self.mirror_xattrs(ino, &state.xattrs)?;
        self.set_child(parent, &state.name, ino)?;
        if kind == NodeKind::Dir {
            self.get_mut(parent)?.row.nlink += 1;
        }
        self.persist(parent)?;
        self.remote_ids.insert((g, state.id), ino);
        out.push(Inval::Entry {
            parent,
            name: state.name.clone(),
        });
        out.push(Inval::Inode(parent));
        Ok(())
    }

    fn update_mirror(
        &mut self,
        ino: Ino,
        parent: Ino,
        state: &NodeState,
        situation: Situation,
        out: &mut Vec<Inval>,
    ) -> FsResult<()> {
        let (dir, name) = self.entry_of(ino)?;
        if dir != parent || name != state.name {
            if self.get(ino)?.row.kind == NodeKind::Dir && self.is_ancestor(ino, parent) {
                return Err(FsError::Invalid {
                    why: "owner moved a directory into itself",
                });
            }
            self.clear_name(parent, &state.name, ino, situation, out)?;
            self.move_entry(ino, dir, &name, parent, &state.name, out)?;
        }
        let n = self.get_mut(ino)?;
        if n.row.kind == NodeKind::File && n.row.remote.is_some_and(|r| r.local_edit) {
            // The member edited this version of the file (had the owner's moved
            // on, it would be a conflict copy by now): the member's bytes stay
            // until the owner changes it.
            self.persist(ino)?;
            out.push(Inval::Inode(ino));
            return Ok(());
        }
        let new_blocks = from_refs(&state.blocks);
        let content_changed = n.row.kind == NodeKind::File
            && match state.list {
                // The list it has (or awaits) is the one named, or it changed.
                Some(list) => match n.blocks.as_deref() {
                    Some(b) => list_hash(&to_refs(b)) != list.hash,
                    None => n.pending_list != Some(list),
                },
                None => n.blocks.as_deref().is_none_or(|b| *b != *new_blocks),
            };
        n.row.perm = mirrored_perm(state.perm);
        n.row.mtime = Stamp {
            secs: state.mtime.0,
            nanos: state.mtime.1.min(999_999_999),
        };
        n.row.ctime = Stamp::now();
        n.row.version = Version(state.version);
        n.row.remote = Some(Remote {
            id: state.id,
            version: state.version,
            local_edit: false,
        });
        if n.row.kind == NodeKind::Symlink {
            n.row.size = state.target.as_ref().map_or(0, |t| t.len() as u64);
            n.row.target = state.target.clone();
        }
        self.mirror_xattrs(ino, &state.xattrs)?;
        let n = self.get_mut(ino)?;
        if content_changed {
            n.row.size = state.size;
            n.content_seq += 1;
            n.pending_list = state.list;
            // A named list arrives later: until then the file waits for it.
            let blocks = if state.list.is_some() {
                n.blocks = None;
                Vec::new()
            } else {
                n.blocks = Some(new_blocks.clone());
                new_blocks.to_vec()
            };
            self.catalog.send(Op::PutBlocks {
                ino,
                from: 0,
                count: blocks.len() as u64,
                blocks,
            })?;
        }
        self.persist(ino)?;
        out.push(Inval::Inode(ino));
        Ok(())
    }

    /// Member side: gives mirrored node `ino` the owner's `user.*` extended
    /// attributes (its own other ones stay).
    fn mirror_xattrs(&mut self, ino: Ino, xattrs: &[(Vec<u8>, Vec<u8>)]) -> FsResult<()> {
        let n = self.get_mut(ino)?;
        let gone: Vec<Vec<u8>> = n
            .xattrs
            .keys()
            .filter(|name| mirrored_xattr(name) && !xattrs.iter().any(|(x, _)| x == *name))
            .cloned()
            .collect();
        let changed: Vec<(Vec<u8>, Vec<u8>)> = xattrs
            .iter()
            .filter(|(name, value)| n.xattrs.get(name) != Some(value))
            .cloned()
            .collect();
        for name in &gone {
            n.xattrs.remove(name);
        }
        for (name, value) in &changed {
            n.xattrs.insert(name.clone(), value.clone());
        }
        for name in gone {
            self.catalog.send(Op::DeleteXattr { ino, name })?;
        }
        for (name, value) in changed {
            self.catalog.send(Op::PutXattr { ino, name, value })?;
        }
        Ok(())
    }

    /// Member side: the owner removed node `id` of group `g`.
    pub fn apply_remove(
        &mut self,
        g: GroupId,
        id: u64,
        situation: Situation,
        out: &mut Vec<Inval>,
    ) -> FsResult<Vec<Node>> {
        match self.mirror(g, id) {
            Some(ino) => self.remove_mirrored(ino, situation, out),
            None => Ok(Vec::new()),
        }
    }

    /// Removes a mirrored node and its mirrored contents. What holds member data
    /// stays: an edited file as a conflict copy, a directory with member files
    /// in it as a member-local directory. Returns the removed nodes (their
    /// backing files, if any, are the caller's to delete).
    fn remove_mirrored(
        &mut self,
        ino: Ino,
        situation: Situation,
        out: &mut Vec<Inval>,
    ) -> FsResult<Vec<Node>> {
        let mut gone = Vec::new();
        let n = self.get(ino)?;
        let (dir, name) = self.entry_of(ino)?;
        if n.row.kind == NodeKind::Dir {
            let children: Vec<Ino> = n
                .children
                .iter()
                .flat_map(|c| c.values().copied())
                .collect();
            for c in children {
                if self.get(c)?.row.remote.is_some() {
                    gone.extend(self.remove_mirrored(c, situation, out)?);
                }
            }
            if self
                .get(ino)?
                .children
                .as_ref()
                .is_some_and(|c| !c.is_empty())
            {
                // Member files remain inside: keep the directory as theirs.
                return self.detach(ino).map(|()| gone);
            }
        } else if n.row.remote.is_some_and(|r| r.local_edit) {
            let suffix = match situation {
                Situation::Sync => "conflict-sync",
                Situation::Update => "conflict-update-change",
            };
            self.keep_as_conflict(dir, &name, suffix, out)?;
            return Ok(gone);
        }
        let is_dir = self.get(ino)?.row.kind == NodeKind::Dir;
        if let Some(c) = self.get_mut(dir)?.children.as_mut() {
            c.remove(&name);
        }
        self.catalog.send(Op::DeleteDirent {
            parent: dir,
            name: name.clone(),
        })?;
        let d = self.get_mut(dir)?;
        if is_dir {
            d.row.nlink = d.row.nlink.saturating_sub(1);
        }
        d.row.mtime = Stamp::now();
        self.persist(dir)?;
        let n = self.get_mut(ino)?;
        n.row.nlink = if is_dir {
            0
        } else {
            n.row.nlink.saturating_sub(1)
        };
        out.push(Inval::Entry { parent: dir, name });
        if let Some(node) = self.release_if_unused(ino)? {
            gone.push(node);
        }
        Ok(gone)
    }

    /// Member side: after a full snapshot, removes the mirrors of owner nodes the
    /// snapshot did not contain, except those of files whose content the owner
    /// has not settled (`unsettled`, by node id, one per name): they keep their
    /// previous version until their new one comes.
    pub fn finish_snapshot(
        &mut self,
        g: GroupId,
        seq: u64,
        seen: &HashSet<u64>,
        unsettled: &HashSet<u64>,
        out: &mut Vec<Inval>,
    ) -> FsResult<Vec<Node>> {
        // Nodes newer than the snapshot came in a later change: they stay.
        let stale: Vec<u64> = self
            .remote_ids
            .iter()
            .filter(|((group, id), ino)| {
                *group == g
                    && !seen.contains(id)
                    && !unsettled.contains(id)
                    && self
                        .nodes
                        .get(ino)
                        .and_then(|n| n.row.remote)
                        .is_none_or(|r| r.version <= seq)
            })
            .map(|((_, id), _)| *id)
            .collect();
        let mut gone = Vec::new();
        for id in stale {
            // A parent removed first may have taken this one with it.
            if self.mirror(g, id).is_some() {
                gone.extend(self.apply_remove(g, id, Situation::Sync, out)?);
            }
        }
        Ok(gone)
    }

    /// Member side: the member is about to change mirrored file `ino`'s content
    /// locally; from now on its bytes live in the backing store. Returns the
    /// blocks to copy there, or `None` if the content is local already.
    pub fn begin_local_edit(&mut self, ino: Ino) -> FsResult<Option<Blocks>> {
        let n = self.get_mut(ino)?;
        match n.row.remote.as_mut() {
            Some(r) if !r.local_edit => {
                r.local_edit = true;
                let blocks = n.blocks.take();
                // The owner's block list no longer describes this content.
                self.catalog.send(Op::PutBlocks {
                    ino,
                    from: 0,
                    blocks: Vec::new(),
                    count: 0,
                })?;
                self.persist(ino)?;
                Ok(blocks)
            }
            _ => Ok(None),
        }
    }

    /// Whether `ino`'s content lives in the block cache (a mirrored file the
    /// member has not edited) rather than in the backing store.
    pub fn cached_content(&self, ino: Ino) -> Option<Blocks> {
        let n = self.nodes.get(&ino)?;
        match n.row.remote {
            Some(r) if !r.local_edit && n.row.kind == NodeKind::File => n.blocks.clone(),
            _ => None,
        }
    }

    /// Member side: whether `ino` is a mirrored file with content whose block
    /// list has not arrived (announced before its owner hashed it, or lost to a
    /// crash before the catalog kept it). Its reads wait for the list.
    pub fn awaits_blocks(&self, ino: Ino) -> bool {
        self.nodes.get(&ino).is_some_and(|n| {
            n.row.kind == NodeKind::File
                && n.row.size > 0
                && n.blocks.is_none()
                && n.row.remote.is_some_and(|r| !r.local_edit)
        })
    }

    /// Member side: the mirrored files of `g` waiting for a named block list,
    /// as (owner's id, list).
    pub fn pending_lists(&self, g: GroupId) -> Vec<(u64, ListRef)> {
        self.remote_ids
            .iter()
            .filter(|((group, _), _)| *group == g)
            .filter_map(|((_, id), ino)| {
                let n = self.nodes.get(ino)?;
                n.row
                    .remote
                    .is_some_and(|r| !r.local_edit)
                    .then_some((*id, n.pending_list?))
            })
            .collect()
    }

    /// Member side: installs the block list named `list` of the mirror of the
    /// owner's file `id` in `g`, if that is still the list it waits for and
    /// the blocks add up to its size. Returns the mirror.
    pub fn install_list(
        &mut self,
        g: GroupId,
        id: u64,
        list: ListRef,
        blocks: &[BlockRef],
        out: &mut Vec<Inval>,
    ) -> FsResult<Option<Ino>> {
        let Some(ino) = self.mirror(g, id) else {
            return Ok(None);
        };
        let n = self.get_mut(ino)?;
        if n.pending_list != Some(list) {
            return Ok(None);
        }
        let total: u64 = blocks.iter().map(|b| u64::from(b.len)).sum();
        if blocks.len() as u64 != list.count
            || list_hash(blocks) != list.hash
            || total != n.row.size
        {
            return Err(FsError::Invalid {
                why: "a block list that does not match its node",
            });
        }
        let blocks = from_refs(blocks);
        n.pending_list = None;
        n.blocks = Some(blocks.clone());
        n.content_seq += 1;
        self.catalog.send(Op::PutBlocks {
            ino,
            from: 0,
            count: blocks.len() as u64,
            blocks: blocks.to_vec(),
        })?;
        out.push(Inval::Inode(ino));
        Ok(Some(ino))
    }

    /// Member side: every mirrored file of `g` with its blocks, for filling the
    /// cache in the background.
    pub fn mirrored_files(&self, g: GroupId) -> Vec<(Ino, u64, Blocks)> {
        self.remote_ids
            .iter()
            .filter(|((group, _), _)| *group == g)
            .filter_map(|((_, id), ino)| {
                let blocks = self.cached_content(*ino)?;
                Some((*ino, *id, blocks))
            })
            .collect()
    }

    /// Member side: whether a mirrored file of `g` knows neither its blocks nor
    /// the list to ask for (its catalog lost them): only a snapshot restores it.
    pub fn mirror_lacks_blocks(&self, g: GroupId) -> bool {
        self.remote_ids
            .iter()
            .filter(|((group, _), _)| *group == g)
            .filter_map(|(_, ino)| self.nodes.get(ino))
            .any(|n| {
                n.row.kind == NodeKind::File
                    && n.row.nlink > 0
                    && n.row.remote.is_some_and(|r| !r.local_edit)
                    && n.blocks.is_none()
                    && n.pending_list.is_none()
            })
    }

    /// Joined groups as (group, owner, name, applied position).
    pub fn joined_groups(&self) -> Vec<(GroupId, String, String, u64)> {
        self.groups
            .values()
            .filter(|g| !g.row.owned)
            .map(|g| {
                (
                    g.row.id,
                    g.row.owner.clone(),
                    g.row.name.clone(),
                    g.row.next_seq.0,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_fit_in_255_bytes_with_their_extension_and_whole_characters() {
        let tail = b"-conflict-update-change-12";
        assert_eq!(fit_name(b"a.txt", b"-x"), b"a.txt-x");
        for stem in ["a", "é", "日本", "x\u{1F600}"] {
            for ext in ["", ".txt", ".tar.gz"] {
                let mut name = stem.repeat(300).into_bytes();
                name.truncate(255 - ext.len());
                while std::str::from_utf8(&name).is_err() {
                    name.pop();
                }
                name.extend_from_slice(ext.as_bytes());
                let fitted = fit_name(&name, tail);
                assert!(fitted.len() <= 255, "{} bytes", fitted.len());
                let text = std::str::from_utf8(&fitted).expect("valid UTF-8");
                let ext_kept = if ext == ".tar.gz" { ".gz" } else { ext };
                assert!(
                    text.ends_with(&format!("{ext_kept}-conflict-update-change-12")),
                    "{text}"
                );
            }
        }
    }
}
