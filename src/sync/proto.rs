//! The sync protocol: messages between a member and the owner of a group, carried
//! as opaque payloads by the peer link. A message is one direction byte (`M` from
//! a member, `O` from an owner) and a postcard encoding whose first byte is the
//! variant index, which is its tag: variants are only ever appended, never
//! reordered or removed (a test pins every tag). Sizes are checked before
//! anything is decoded.

use serde::{Deserialize, Serialize};

/// Version spoken by this build; exchanged in [`MemberToOwner::Hello`].
pub const VERSION: u16 = 2;
/// Largest encoded message: one block plus headers.
pub const MAX_MESSAGE: usize = crate::blocks::BLOCK_SIZE as usize + 64 * 1024;
/// Most nodes in one snapshot chunk (snapshots are split to stay under the limit).
pub const SNAPSHOT_CHUNK: usize = 512;
/// About the most bytes of nodes in one snapshot chunk or `Changes` message.
pub const NODES_BYTES: usize = 192 * 1024;
/// Most blocks a node lists itself; a longer list is named by a [`ListRef`]
/// and fetched in pieces (a file of more than 256 MiB).
pub const INLINE_BLOCKS: usize = 1024;
/// Most blocks in one [`OwnerToMember::BlockList`] piece (about 300 KB).
pub const LIST_PIECE: usize = 8000;
/// Longest name or symlink target accepted from a peer.
const MAX_NAME: usize = 4096;

/// Errors decoding a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// Larger than [`MAX_MESSAGE`]; rejected before decoding.
    #[error("message of {len} bytes exceeds the limit of {MAX_MESSAGE}")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not a valid encoding of any message.
    #[error("malformed message: {reason}")]
    Malformed {
        /// What the decoder said.
        reason: String,
    },
    /// Decoded, but a field is out of range (e.g. a name with `/`).
    #[error("invalid message: {reason}")]
    Invalid {
        /// What is wrong.
        reason: &'static str,
    },
}

/// A file's block: its BLAKE3 hash and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    /// BLAKE3 of the block.
    pub hash: [u8; 32],
    /// Length in bytes (the last block may be short).
    pub len: u32,
}

/// A block list too long to travel inside its node: how many blocks, and the
/// BLAKE3 of the list ([`list_hash`]), by which the member asks for it and
/// checks what it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListRef {
    /// Blocks in the list.
    pub count: u64,
    /// [`list_hash`] of the list.
    pub hash: [u8; 32],
}

/// BLAKE3 of a block list: each block's hash and length (little endian), in order.
pub fn list_hash(blocks: &[BlockRef]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for b in blocks {
        h.update(&b.hash);
        h.update(&b.len.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// The state of one node of the owner's group, as members need it. `id` is the
/// owner's inode number: stable across renames, so a rename is an update of
/// `parent`/`name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Owner's inode number.
    pub id: u64,
    /// Owner's inode number of the containing directory; the group root's id
    /// for top-level entries.
    pub parent: u64,
    /// Entry name (one path component).
    pub name: Vec<u8>,
    /// Kind, as `catalog::NodeKind` numbers it.
    pub kind: u8,
    /// Permission bits.
    pub perm: u16,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// The node's version in the owner's change log.
    pub version: u64,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Content blocks, for regular files (empty when `list` names them).
    pub blocks: Vec<BlockRef>,
    /// For a file of more than [`INLINE_BLOCKS`] blocks: its list, to fetch
    /// with [`MemberToOwner::GetBlockList`].
    pub list: Option<ListRef>,
    /// Its `user.*` extended attributes (name, value), at most [`XATTRS_BYTES`]
    /// in all.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Most bytes of extended attributes (names and values) a node carries.
pub const XATTRS_BYTES: usize = 16 * 1024;

/// Whether an extended attribute of this name goes to members: `user.*`,
/// except Brume's own.
pub fn mirrored_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") && !name.starts_with(b"user.brume.")
}

impl NodeState {
    /// Roughly how many bytes the node takes in a message.
    pub fn wire_size(&self) -> usize {
        64 + self.name.len()
            + self.target.as_ref().map_or(0, Vec::len)
            + 40 * self.blocks.len()
            + self
                .xattrs
                .iter()
                .map(|(n, v)| n.len() + v.len() + 8)
                .sum::<usize>()
    }
}

impl NodeState {
    /// Checks what a hostile owner could put in a node: names that escape the
    /// group or collide with Brume's own files, absurd lengths, block lists that
    /// disagree with the size.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let bad = |reason| Err(ProtoError::Invalid { reason });
        let n = &self.name;
        if n.is_empty() || n.len() > 255 {
            return bad("name length");
        }
        if n == b"." || n == b".." || n.contains(&b'/') || n.contains(&0) {
            return bad("name is not one path component");
        }
        if self
            .target
            .as_ref()
            .is_some_and(|t| t.len() > MAX_NAME || t.contains(&0))
        {
            return bad("symlink target");
        }
        if !(1..=7).contains(&self.kind) {
            return bad("node kind");
        }
        if self.blocks.len() > INLINE_BLOCKS {
            return bad("too many blocks listed in a node");
        }
        let xattr_bytes: usize = self.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
        if xattr_bytes > XATTRS_BYTES
            || self
                .xattrs
                .iter()
                .any(|(n, _)| !mirrored_xattr(n) || n.len() > 255 || n.contains(&0))
        {
            return bad("extended attributes");
        }
        match self.list {
            Some(list) => {
                if self.kind != 1 || !self.blocks.is_empty() {
                    return bad("a block list named by a node that lists blocks");
                }
                if list.count != self.size.div_ceil(crate::blocks::BLOCK_SIZE) {
                    return bad("block list length does not match the size");
                }
            }
            None => {
                let total: u64 = self.blocks.iter().map(|b| u64::from(b.len)).sum();
                if self.kind == 1 && total != self.size {
                    return bad("blocks do not add up to the size");
                }
            }
        }
        if self
            .blocks
            .iter()
            .any(|b| u64::from(b.len) > crate::blocks::BLOCK_SIZE)
        {
            return bad("block longer than the block size");
        }
        Ok(())
    }
}

/// One change pushed to a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Create or update a node (including moves: new parent or name).
    Upsert(NodeState),
    /// Remove a node (and, for a directory, what it still holds).
    Remove {
        /// Owner's inode number.
        id: u64,
    },
}

/// Why an owner refuses a member's request. Variants are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Problem {
    /// `ENOTMEMBER`: the group's `.members` does not list the member.
    NotMember,
    /// `EHELD`: the group is held by the mass-delete guard (or its store is
    /// missing); nothing of it is served until its owner releases it.
    Held,
    /// `EBUSY`: the member asked too often; it may ask again later.
    Busy,
    /// `EBEHIND`: the member took what was sent too slowly and the changes
    /// queued for it were dropped; it subscribes again to get the group afresh.
    Behind,
}

impl Problem {
    /// The error code, as `brume status` and the logs show it.
    pub fn code(self) -> &'static str {
        match self {
            Problem::NotMember => "ENOTMEMBER",
            Problem::Held => "EHELD",
            Problem::Busy => "EBUSY",
            Problem::Behind => "EBEHIND",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// Messages from a member to the owner of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberToOwner {
    /// Tag 0: first message on a link: the protocol version spoken.
    Hello {
        /// [`VERSION`].
        version: u16,
    },
    /// Tag 1: send me `group`: the changes after log position `since` if the
    /// owner's log of `epoch` still holds them, else a snapshot; then keep
    /// pushing.
    Subscribe {
        /// Group name (the owner is the peer).
        group: String,
        /// The owner's epoch of `since`; 0 asks for a snapshot.
        epoch: u64,
        /// Last log position applied by the member.
        since: u64,
    },
    /// Tag 2: stop pushing `group` (the member left).
    Unsubscribe {
        /// Group name.
        group: String,
    },
    /// Tag 3: send one block of a file.
    GetBlock {
        /// Group name.
        group: String,
        /// Owner's inode number of the file.
        id: u64,
        /// Block index.
        index: u32,
        /// The hash the member expects.
        hash: [u8; 32],
        /// A program is waiting for it: serve before background fills.
        urgent: bool,
    },
    /// Tag 4: everything up to `seq` of the owner's log of `epoch` is applied:
    /// the owner keeps what comes after in its log for us.
    Ack {
        /// Group name.
        group: String,
        /// The epoch of the owner's log.
        epoch: u64,
        /// Log position.
        seq: u64,
    },
    /// Tag 5: send the block list of a file, which its node named by `hash`.
    GetBlockList {
        /// Group name.
        group: String,
        /// Owner's node id of the file.
        id: u64,
        /// The [`ListRef::hash`] the member has.
        hash: [u8; 32],
    },
}

/// Messages from the owner of a group to a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OwnerToMember {
    /// Tag 0: the owner's protocol version.
    Hello {
        /// [`VERSION`].
        version: u16,
    },
    /// Tag 1: one chunk of a full snapshot of the group at log position `seq`,
    /// parents before children. `last` marks the final chunk; nodes the member
    /// has that no chunk named are gone.
    Snapshot {
        /// Group name.
        group: String,
        /// The epoch of the owner's log.
        epoch: u64,
        /// Log position the snapshot reflects: nodes of the member newer than
        /// this came in a later change and stay.
        seq: u64,
        /// The position the member is at once it has applied the snapshot:
        /// `seq`, or less while files are still being hashed (their state
        /// follows; a member that goes away before must get it from the log).
        settled: u64,
        /// Nodes.
        nodes: Vec<NodeState>,
        /// Whether this is the last chunk.
        last: bool,
        /// Ids (one per name) of files that exist but whose content is not
        /// settled (still written or hashed): the member keeps what it has of
        /// them and gets their state once settled.
        unsettled: Vec<u64>,
    },
    /// Tag 2: changes at log positions up to `seq`, in order.
    Changes {
        /// Group name.
        group: String,
        /// The log position after applying these.
        seq: u64,
        /// The changes.
        changes: Vec<Change>,
    },
    /// Tag 3: a block's bytes.
    Block {
        /// Group name.
        group: String,
        /// Its hash (the member verifies it).
        hash: [u8; 32],
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Tag 4: the block is no longer part of the file (it changed since).
    NoBlock {
        /// Group name.
        group: String,
        /// The hash asked for.
        hash: [u8; 32],
    },
    /// Tag 5: the request was refused, and why.
    Refused {
        /// Group name.
        group: String,
        /// Why.
        problem: Problem,
    },
    /// Tag 6: one piece of a block list, blocks `from..` of it; the pieces of
    /// one list are sent in order.
    BlockList {
        /// Group name.
        group: String,
        /// Owner's node id of the file.
        id: u64,
        /// The list's [`ListRef::hash`].
        hash: [u8; 32],
        /// Index of the first block in this piece.
        from: u64,
        /// At most [`LIST_PIECE`] blocks.
        blocks: Vec<BlockRef>,
    },
    /// Tag 7: the file no longer has that block list (it changed since).
    NoBlockList {
        /// Group name.
        group: String,
        /// Owner's node id of the file.
        id: u64,
        /// The hash asked for.
        hash: [u8; 32],
    },
    /// Tag 8: one part of the answer to `Subscribe{since}` from a member whose
    /// position the owner's log still reaches: the current state of every node
    /// changed after `since` (parents first), then the removals. `last` marks
    /// the final part; the member is then at `seq`.
    CatchUp {
        /// Group name.
        group: String,
        /// The epoch of the owner's log.
        epoch: u64,
        /// The member's position this starts from.
        since: u64,
        /// Log position the member is at once every part is applied.
        seq: u64,
        /// The changes.
        changes: Vec<Change>,
        /// Ids of files that exist but whose content is not settled yet: their
        /// state follows once settled.
        unsettled: Vec<u64>,
        /// Whether this is the last part.
        last: bool,
    },
}

fn check(bytes: &[u8]) -> Result<(), ProtoError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(ProtoError::TooLarge { len: bytes.len() });
    }
    Ok(())
}

/// Direction byte of member-to-owner messages.
const FROM_MEMBER: u8 = b'M';
/// Direction byte of owner-to-member messages.
const FROM_OWNER: u8 = b'O';

fn decode<T: for<'de> Deserialize<'de>>(direction: u8, bytes: &[u8]) -> Result<T, ProtoError> {
    check(bytes)?;
    let Some((&first, bytes)) = bytes.split_first() else {
        return Err(ProtoError::Malformed {
            reason: "empty message".into(),
        });
    };
    if first != direction {
        return Err(ProtoError::Malformed {
            reason: format!("direction byte {first:#x}"),
        });
    }
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| ProtoError::Malformed {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed {
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

fn encode<T: Serialize>(direction: u8, value: &T) -> Vec<u8> {
    let mut out = vec![direction];
    // Encoding plain data into a growable Vec cannot fail.
    out.extend(postcard::to_allocvec(value).unwrap_or_default());
    out
}

impl MemberToOwner {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        encode(FROM_MEMBER, self)
    }

    /// Checks the size, then decodes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        decode(FROM_MEMBER, bytes)
    }
}

impl OwnerToMember {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        encode(FROM_OWNER, self)
    }

    /// Checks the size, then decodes and validates every node it carries.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        let msg: Self = decode(FROM_OWNER, bytes)?;
        match &msg {
            Self::Snapshot { nodes, .. } => nodes.iter().try_for_each(NodeState::validate)?,
            Self::Changes { changes, .. } | Self::CatchUp { changes, .. } => {
                changes.iter().try_for_each(|c| match c {
                    Change::Upsert(n) => n.validate(),
                    Change::Remove { .. } => Ok(()),
                })?
            }
            Self::BlockList { blocks, .. } => {
                if blocks.len() > LIST_PIECE {
                    return Err(ProtoError::Invalid {
                        reason: "block list piece too long",
                    });
                }
                if blocks
                    .iter()
                    .any(|b| u64::from(b.len) > crate::blocks::BLOCK_SIZE)
                {
                    return Err(ProtoError::Invalid {
                        reason: "block longer than the block size",
                    });
                }
            }
            _ => {}
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn block_data_is_encoded_as_a_plain_sequence_of_bytes() {
        // The encoding of `Block` before its data became one byte string.
        #[derive(Serialize)]
        enum Before {
            _Hello,
            _Snapshot,
            _Changes,
            Block {
                group: String,
                hash: [u8; 32],
                data: Vec<u8>,
            },
        }
        for len in [0usize, 1, 127, 128, 300, 262_144] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let now = OwnerToMember::Block {
                group: "g".into(),
                hash: [9; 32],
                data: data.clone(),
            };
            let before = encode(
                FROM_OWNER,
                &Before::Block {
                    group: "g".into(),
                    hash: [9; 32],
                    data,
                },
            );
            assert_eq!(now.encode(), before, "{len} bytes");
            assert_eq!(OwnerToMember::decode(&before).unwrap(), now);
        }
    }

    fn node(name: &[u8]) -> NodeState {
        NodeState {
            id: 7,
            parent: 3,
            name: name.to_vec(),
            kind: 1,
            perm: 0o644,
            size: 5,
            mtime: (1, 2),
            version: 9,
            target: None,
            blocks: vec![BlockRef {
                hash: [1; 32],
                len: 5,
            }],
            list: None,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn tags_never_change() {
        let g = || "g".to_string();
        let m = [
            MemberToOwner::Hello { version: 1 }.encode()[1],
            MemberToOwner::Subscribe {
                group: g(),
                epoch: 0,
                since: 0,
            }
            .encode()[1],
            MemberToOwner::Unsubscribe { group: g() }.encode()[1],
            MemberToOwner::GetBlock {
                group: g(),
                id: 1,
                index: 0,
                hash: [0; 32],
                urgent: true,
            }
            .encode()[1],
            MemberToOwner::Ack {
                group: g(),
                epoch: 1,
                seq: 1,
            }
            .encode()[1],
            MemberToOwner::GetBlockList {
                group: g(),
                id: 1,
                hash: [0; 32],
            }
            .encode()[1],
        ];
        assert_eq!(m, [0, 1, 2, 3, 4, 5]);
        assert_eq!(MemberToOwner::Hello { version: 1 }.encode()[0], b'M');
        assert_eq!(OwnerToMember::Hello { version: 1 }.encode()[0], b'O');
        // One direction's message never decodes as the other's.
        assert!(OwnerToMember::decode(&MemberToOwner::Hello { version: 1 }.encode()).is_err());
        let o = [
            OwnerToMember::Hello { version: 1 }.encode()[1],
            OwnerToMember::Snapshot {
                group: g(),
                epoch: 1,
                seq: 1,
                settled: 1,
                nodes: vec![],
                last: true,
                unsettled: vec![],
            }
            .encode()[1],
            OwnerToMember::Changes {
                group: g(),
                seq: 1,
                changes: vec![],
            }
            .encode()[1],
            OwnerToMember::Block {
                group: g(),
                hash: [0; 32],
                data: vec![],
            }
            .encode()[1],
            OwnerToMember::NoBlock {
                group: g(),
                hash: [0; 32],
            }
            .encode()[1],
            OwnerToMember::Refused {
                group: g(),
                problem: Problem::NotMember,
            }
            .encode()[1],
            OwnerToMember::BlockList {
                group: g(),
                id: 1,
                hash: [0; 32],
                from: 0,
                blocks: vec![],
            }
            .encode()[1],
            OwnerToMember::NoBlockList {
                group: g(),
                id: 1,
                hash: [0; 32],
            }
            .encode()[1],
            OwnerToMember::CatchUp {
                group: g(),
                epoch: 1,
                since: 0,
                seq: 1,
                changes: vec![],
                unsettled: vec![],
                last: true,
            }
            .encode()[1],
        ];
        assert_eq!(o, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn problems_keep_their_tags_and_codes() {
        let all = [
            Problem::NotMember,
            Problem::Held,
            Problem::Busy,
            Problem::Behind,
        ];
        let tags: Vec<u8> = all
            .iter()
            .map(|p| postcard::to_allocvec(p).unwrap()[0])
            .collect();
        assert_eq!(tags, [0, 1, 2, 3]);
        let codes: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(codes, ["ENOTMEMBER", "EHELD", "EBUSY", "EBEHIND"]);
        // A problem this build does not know is a malformed message, not a panic.
        let mut unknown = OwnerToMember::Refused {
            group: "g".into(),
            problem: Problem::Busy,
        }
        .encode();
        *unknown.last_mut().unwrap() = 99;
        assert!(matches!(
            OwnerToMember::decode(&unknown),
            Err(ProtoError::Malformed { .. })
        ));
    }

    #[test]
    fn hostile_names_are_rejected_at_decode() {
        for bad in [&b".."[..], b".", b"a/b", b"", b"x\0y", &[b'a'; 256]] {
            let msg = OwnerToMember::Changes {
                group: "g".into(),
                seq: 1,
                changes: vec![Change::Upsert(node(bad))],
            };
            assert!(
                matches!(
                    OwnerToMember::decode(&msg.encode()),
                    Err(ProtoError::Invalid { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let mut n = node(b"ok");
        n.size = 6;
        let msg = OwnerToMember::Snapshot {
            group: "g".into(),
            epoch: 1,
            seq: 1,
            settled: 1,
            nodes: vec![n],
            last: true,
            unsettled: vec![],
        };
        assert!(OwnerToMember::decode(&msg.encode()).is_err());
    }

    #[test]
    fn oversized_messages_are_rejected_before_decoding() {
        let big = vec![0u8; MAX_MESSAGE + 1];
        assert_eq!(
            MemberToOwner::decode(&big),
            Err(ProtoError::TooLarge {
                len: MAX_MESSAGE + 1
            })
        );
    }

    fn arb_node() -> impl Strategy<Value = NodeState> {
        (
            any::<u64>(),
            any::<u64>(),
            "[a-z]{1,20}",
            1u8..=7,
            any::<u16>(),
            proptest::collection::vec(any::<u32>().prop_map(|l| l % 1000), 0..4),
        )
            .prop_map(|(id, parent, name, kind, perm, lens)| NodeState {
                id,
                parent,
                name: name.into_bytes(),
                kind,
                perm,
                size: lens.iter().map(|l| u64::from(*l)).sum(),
                mtime: (5, 6),
                version: id / 2,
                target: (kind == 3).then(|| b"t".to_vec()),
                blocks: lens
                    .into_iter()
                    .map(|len| BlockRef { hash: [7; 32], len })
                    .collect(),
                list: None,
                xattrs: vec![(b"user.x".to_vec(), perm.to_le_bytes().to_vec())],
            })
    }

    proptest! {
        #[test]
        fn owner_messages_round_trip(nodes in proptest::collection::vec(arb_node(), 0..8), seq: u64, last: bool) {
            let msg = OwnerToMember::Snapshot { group: "g".into(), epoch: seq ^ 1, seq, settled: seq / 2, nodes, last, unsettled: vec![seq] };
            prop_assert_eq!(OwnerToMember::decode(&msg.encode()).unwrap(), msg);
        }

        #[test]
        fn member_messages_round_trip(group in "[a-z]{1,10}", since: u64, id: u64, index: u32, urgent: bool) {
            for msg in [
                MemberToOwner::Subscribe { group: group.clone(), epoch: since ^ 7, since },
                MemberToOwner::GetBlock { group: group.clone(), id, index, hash: [3; 32], urgent },
                MemberToOwner::Ack { group: group.clone(), epoch: since ^ 3, seq: since },
            ] {
                prop_assert_eq!(MemberToOwner::decode(&msg.encode()).unwrap(), msg);
            }
        }

        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = MemberToOwner::decode(&bytes);
            let _ = OwnerToMember::decode(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_truncated_or_flipped_messages(
            nodes in proptest::collection::vec(arb_node(), 1..4),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let bytes = OwnerToMember::Snapshot { group: "g".into(), epoch: 1, seq: 1, settled: 1, nodes, last: false, unsettled: vec![] }.encode();
            let _ = OwnerToMember::decode(&bytes[..cut.index(bytes.len())]);
            let mut flipped = bytes.clone();
            let i = flip.index(flipped.len());
            flipped[i] ^= 0xff;
            let _ = OwnerToMember::decode(&flipped);
        }
    }
}
