//! The sync engine of one client: the owner side (answer subscriptions with the
//! changes since the member's position, from the change log, or a snapshot;
//! push every change of an owned group to its subscribed members; serve blocks
//! to members only; keep the log for the members that acknowledge it) and the
//! member side (subscribe to joined groups when their owner is reachable, apply
//! catch-ups, snapshots and changes, acknowledge them, fetch blocks into the
//! cache, urgently for a waiting reader and in the background for the rest).
//!
//! What an owner sends goes through [`Outbox`], one queue per member and
//! priority, so a slow member delays only itself. Peers are bounded even when
//! they are members: blocks are taken only from the peer asked, snapshots only
//! up to a size, subscriptions and block requests only at a rate.
//!
//! The engine talks to peers through a [`Link`]: the peer link in the daemon, an
//! in-process loopback in some tests. Nothing a member does is ever sent to an
//! owner except requests and acknowledgements.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, broadcast, oneshot};

use crate::blocks::BLOCK_SIZE;
use crate::blocks::cache::BlockCache;
use crate::fs::store::Store;
use crate::fs::tree::{Blocks, Inval, Situation, Tree, TreeEvent, ino_of_id};
use crate::ids::{BlockHash, GroupId, Ino, UserName};
use crate::sync::outbox::Outbox;
use crate::sync::proto::{
    BlockRef, Change, LIST_PIECE, ListRef, MemberToOwner, NODES_BYTES, NodeState, OwnerToMember,
    Problem, SNAPSHOT_CHUNK, VERSION,
};

/// A boxed future, for the object-safe [`Link`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How soon a message must arrive. Each is a lane of its own on a peer link:
/// what a reader waits for goes ahead of bulk transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Snapshots, changes, requests and refusals, in order.
    Control,
    /// Blocks (and requests for them) a program is waiting for.
    Interactive,
    /// Background block transfers.
    Bulk,
}

/// Whether a send may set up a link to its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only over a link that is up now: an owner answers and pushes to members
    /// over the links they set up, and never waits for one to a member that is
    /// away (it resyncs when back).
    Linked,
    /// Connects first if needed (a member asking its owner).
    Dial,
}

/// How the engine reaches peers.
pub trait Link: Send + Sync + 'static {
    /// Sends `payload` to `to`, waiting while its lane is full.
    fn send<'a>(
        &'a self,
        to: &'a UserName,
        priority: Priority,
        reach: Reach,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Why a block could not be had.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    /// The owner refused us the group (`ENOTMEMBER`, `EHELD`).
    #[error("the owner refused: {problem}")]
    Refused {
        /// Why.
        problem: Problem,
    },
    /// The owner did not answer in time (offline, unreachable).
    #[error("the owner did not send block {hash} in time")]
    Timeout {
        /// The block.
        hash: BlockHash,
    },
    /// The owner's file changed: the block is no longer part of it.
    #[error("block {hash} is no longer part of the owner's file")]
    Stale {
        /// The block.
        hash: BlockHash,
    },
    /// The request could not be sent.
    #[error("cannot reach the owner: {reason}")]
    Unreachable {
        /// What the link said.
        reason: String,
    },
}

/// Result of a block fetch.
pub type Fetched = Result<Arc<[u8]>, FetchError>;

/// Tunables.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long a reader waits for a missing block.
    pub read_timeout: Duration,
    /// Pin the current content of joined groups in the cache (full copy).
    pub full_copy: bool,
    /// Background block requests in flight per client.
    pub fill_parallelism: usize,
    /// Most bytes of one snapshot a member holds while its chunks arrive; a
    /// larger one is dropped (`ETOOBIG`), so an owner cannot fill our memory.
    pub snapshot_most_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(5),
            fill_parallelism: 32,
            full_copy: true,
            snapshot_most_bytes: SNAPSHOT_MOST_BYTES,
        }
    }
}

/// Sync state of one joined group, for `brume status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MemberGroupStatus {
    /// Owner's log position applied.
    pub applied: u64,
    /// The last refusal or problem, by SPEC code (`ENOTMEMBER`, …).
    pub problem: Option<String>,
    /// Refusals in a row (the retry delay doubles with each).
    pub refusals: u32,
    /// Mirrored files, and how many have all their blocks here.
    pub files_total: u64,
    /// Files complete in the cache.
    pub files_done: u64,
    /// Bytes of mirrored files, and how many of them are here.
    pub bytes_total: u64,
    /// Bytes in the cache.
    pub bytes_done: u64,
    /// Bytes per second arriving lately (filled in by the daemon's status writer).
    #[serde(default)]
    pub rate: u64,
    /// Seconds until complete at that rate, while syncing.
    #[serde(default)]
    pub eta_secs: Option<u64>,
    /// Whether the whole content is kept here (`cache.full_copy`); otherwise
    /// blocks come when read, and `bytes_done` is what happens to be here.
    #[serde(default = "yes")]
    pub full_copy: bool,
    /// Why the owner cannot be reached now, if it cannot (its link's last
    /// problem, e.g. `ENODEST`).
    #[serde(default)]
    pub waiting_for: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for MemberGroupStatus {
    fn default() -> Self {
        Self {
            applied: 0,
            problem: None,
            refusals: 0,
            files_total: 0,
            files_done: 0,
            bytes_total: 0,
            bytes_done: 0,
            rate: 0,
            eta_secs: None,
            full_copy: true,
            waiting_for: None,
        }
    }
}

/// Default for [`EngineConfig::snapshot_most_bytes`]: room for a group of about
/// two million files.
pub const SNAPSHOT_MOST_BYTES: usize = 256 << 20;

/// Member side: what is wrong with a joined group, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GroupProblem {
    /// The owner refused us.
    Refused(Problem),
    /// This side cannot store what comes (`ELOCAL`: a full disk, say).
    Local(String),
    /// The subscription could not be sent (what the link said).
    Unreachable(String),
    /// The owner's snapshot was larger than we accept (`ETOOBIG`).
    TooBig,
}

impl std::fmt::Display for GroupProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupProblem::Refused(p) => write!(f, "{p}"),
            GroupProblem::Local(e) => write!(f, "ELOCAL {e}"),
            GroupProblem::Unreachable(e) => f.write_str(e),
            GroupProblem::TooBig => write!(
                f,
                "ETOOBIG: the owner's snapshot exceeds the limit; asking again later"
            ),
        }
    }
}

/// Member side: the sync state of a joined group kept by the engine.
#[derive(Debug, Clone, Default)]
struct MemberState {
    /// The last problem, until the next snapshot or change is applied.
    problem: Option<GroupProblem>,
    /// Refusals (or dropped snapshots) in a row: the retry delay doubles.
    refusals: u32,
}

/// Batches of kernel invalidations queued for the invalidation thread.
const INVALIDATION_QUEUE: usize = 1024;

/// Tells the kernel to drop what it cached of these entries and inodes.
fn invalidate(n: &fuser::Notifier, invals: Vec<Inval>) {
    for inv in invals {
        let r = match &inv {
            Inval::Entry { parent, name } => {
                n.inval_entry(fuser::INodeNo(parent.0), std::ffi::OsStr::from_bytes(name))
            }
            Inval::Inode(ino) => n.inval_inode(fuser::INodeNo(ino.0), 0, 0),
        };
        if let Err(e) = r
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(?inv, cause = ?e, "kernel invalidation failed");
        }
    }
}

/// First delay before asking a refusing owner again; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// How often blocks missing from joined groups are asked for again.
const REFILL_EVERY: Duration = Duration::from_secs(2);
/// Longest delay between two requests to a refusing owner.
const RETRY_MAX: Duration = Duration::from_secs(300);

struct Inner {
    me: UserName,
    tree: Arc<RwLock<Tree>>,
    store: Store,
    cache: Arc<BlockCache>,
    link: Arc<dyn Link>,
    /// Owner side: what goes to each member, queued per member.
    outbox: Arc<Outbox>,
    notifier: Option<fuser::Notifier>,
    /// Kernel cache invalidations, done in order by a thread of their own: the
    /// kernel's inode invalidation waits for reads of that inode in flight, which
    /// may be waiting for a block that only the message loop can deliver.
    invalidations: Option<std::sync::mpsc::SyncSender<Vec<Inval>>>,
    config: EngineConfig,
    /// Readers and fills waiting for a block, by hash. A request goes out once
    /// per hash; every waiter gets the answer.
    waiters: Mutex<HashMap<BlockHash, Waiting>>,
    /// Owner side: which members are subscribed to which owned groups.
    subscribers: Mutex<HashMap<GroupId, HashSet<UserName>>>,
    /// Owner side: how many times each member has subscribed. A send that
    /// fails drops the member's subscriptions only if it has not subscribed
    /// again since the send began (its new link must not lose them).
    subscriptions: Mutex<HashMap<UserName, u64>>,
    /// Owner side: files changed before they were hashed; pushed once hashed.
    /// (By file: its group and the log position of its first change not sent
    /// yet. A member's position never passes it until it is sent: see
    /// [`Engine::settled`].)
    unhashed: Mutex<HashMap<Ino, (GroupId, u64)>>,
    /// Owner side: the log position each member said it applied, by owned
    /// group, and when (what the log keeps for it).
    acks: Mutex<HashMap<(GroupId, UserName), Acked>>,
    /// Member side: joined groups with an acknowledgement to send soon.
    acking: Mutex<HashSet<GroupId>>,
    /// Member side: joined groups subscribed to whose snapshot or catch-up has
    /// not arrived whole yet: pushes meanwhile do not move the position.
    syncing: Mutex<HashSet<GroupId>>,
    /// Owner side: the link ids (the names other than the first) of files with
    /// several names that members may hold: sent in a push or a snapshot, and
    /// not removed since. A name that goes is sent as the removal of its id.
    links_sent: Mutex<HashMap<Ino, BTreeSet<u64>>>,
    /// Owner side: the (member, group) pairs a snapshot is queued for. Another
    /// subscription meanwhile needs none: that snapshot and the pushes queued
    /// after it bring the member up to date.
    snapshotting: Mutex<HashSet<(UserName, GroupId)>>,
    /// Member side: snapshot chunks received so far, per group: the nodes, and
    /// the ids of the files not settled yet.
    snapshots: Mutex<HashMap<GroupId, SnapshotParts>>,
    /// Member side: files the last snapshot named unsettled, per group: their
    /// state, when it comes, completes that sync (so a member edit is kept as a
    /// sync conflict).
    unsettled: Mutex<HashMap<GroupId, HashSet<u64>>>,
    /// Member side: per-group state.
    groups: Mutex<HashMap<GroupId, MemberState>>,
    /// Member side: blocks asked of each peer lately, and when.
    asked_lately: Mutex<HashMap<(UserName, BlockHash), tokio::time::Instant>>,
    /// Member side: blocks (and `NoBlock` answers) dropped because nobody asked
    /// their sender for them.
    unasked_blocks: std::sync::atomic::AtomicU64,
    /// Owner side: how often each peer may subscribe to each group.
    subscribe_rates: Mutex<HashMap<(UserName, String), Bucket>>,
    /// Owner side: block requests of each peer being served or waiting to be.
    serving: Mutex<HashMap<UserName, usize>>,
    /// Owner side: the blocks being served to each peer, until sent: the same
    /// block asked again meanwhile (the member's wait timed out) is not sent
    /// twice.
    answering: Mutex<HashSet<(UserName, [u8; 32])>>,
    /// Bounds background block requests.
    fill_slots: Arc<Semaphore>,
    /// Owner side: bounds the block requests being served at once.
    serve_slots: Arc<Semaphore>,
    /// Member side: bounds the blocks being verified and written at once.
    insert_slots: Semaphore,
    /// Per group, what its filler task is still to look at; a group is in the
    /// map while its filler runs.
    filling: Mutex<HashMap<GroupId, FillWork>>,
    /// Groups where a background fetch failed: their next fill looks at every file.
    fill_failed: Mutex<HashSet<GroupId>>,
    /// Full copy: whether a recomputation of the exact pin set is scheduled.
    repin_scheduled: Mutex<bool>,
    /// Block requests that got no answer within the read timeout, since start.
    fetch_timeouts: std::sync::atomic::AtomicU64,
    /// Owner side: users refused or revoked per owned group, served at once if
    /// `.members` lists them again (at most [`REFUSED_MOST`] per group).
    refused: Mutex<HashMap<GroupId, HashSet<UserName>>>,
    /// Member side: joined groups with a retry of a refused subscription
    /// scheduled.
    retrying: Mutex<HashSet<GroupId>>,
    /// Member side: named block lists asked for, by (group, owner's node id),
    /// with the pieces received so far.
    lists: Mutex<HashMap<(GroupId, u64), ListAssembly>>,
    /// Member side: background fetches paused while the cache cannot store
    /// what they bring.
    local_full: LocalFull,
    /// Rounds of [`Engine::refill`] so far.
    refills: std::sync::atomic::AtomicU64,
}

/// Member side: whether the block cache is full (its disk, say). While it is,
/// background fetches wait, then try one block to see whether there is room.
#[derive(Debug, Default)]
struct LocalFull {
    state: Mutex<Room>,
}

#[derive(Debug, Default, Clone, Copy)]
enum Room {
    /// Blocks are stored.
    #[default]
    Free,
    /// A block could not be stored: nothing until `until`; the next pause
    /// lasts `next`.
    Paused {
        until: tokio::time::Instant,
        next: Duration,
    },
    /// One block is on its way to see whether there is room (since `since`).
    Probing {
        since: tokio::time::Instant,
        next: Duration,
    },
}

impl LocalFull {
    /// First pause after a failed store; doubles with each failure up to
    /// [`LocalFull::LONGEST`].
    const FIRST: Duration = Duration::from_secs(2);
    const LONGEST: Duration = Duration::from_secs(60);

    /// Pauses background fetches after a block could not be stored; true if
    /// they were not paused already.
    fn pause(&self) -> bool {
        let mut state = lock(&self.state);
        let now = tokio::time::Instant::now();
        let next = match *state {
            Room::Paused { .. } => return false,
            Room::Probing { next, .. } => next,
            Room::Free => Self::FIRST,
        };
        *state = Room::Paused {
            until: now + next,
            next: (next * 2).min(Self::LONGEST),
        };
        true
    }

    /// Whether a background fetch may go now: always while blocks are stored;
    /// while they are not, one at a time once the pause is over.
    fn may_fetch(&self) -> bool {
        let mut state = lock(&self.state);
        let now = tokio::time::Instant::now();
        match *state {
            Room::Free => true,
            Room::Paused { until, next } if until <= now => {
                *state = Room::Probing { since: now, next };
                true
            }
            // A probe that got no answer (the owner went away) is not waited
            // for forever.
            Room::Probing { since, next } if now - since >= Self::LONGEST => {
                *state = Room::Probing { since: now, next };
                true
            }
            Room::Paused { .. } | Room::Probing { .. } => false,
        }
    }

    /// Whether blocks could not be stored lately.
    fn full(&self) -> bool {
        !matches!(*lock(&self.state), Room::Free)
    }

    /// A block was stored, or room was found: fetch freely again.
    fn clear(&self) {
        *lock(&self.state) = Room::Free;
    }
}

/// Member side: what applying a message does to a joined group's position in
/// the owner's log.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Nothing (part of an answer still arriving, or a push while one is).
    Kept,
    /// A push: the position moves up to `seq`.
    Pushed(u64),
    /// The last part of a catch-up in the log of `epoch`.
    CaughtUp { epoch: u64, seq: u64 },
    /// The last chunk of a snapshot: the position is `seq` in the log of
    /// `epoch`, whatever it was.
    Synced { epoch: u64, seq: u64 },
}

/// Member side: a snapshot's nodes and unsettled files, as its chunks arrive.
#[derive(Debug, Default)]
struct SnapshotParts {
    nodes: Vec<NodeState>,
    unsettled: HashSet<u64>,
    /// About how many bytes it holds so far.
    bytes: usize,
    /// Grew past the limit: dropped, and its chunks are ignored until the last.
    dropped: bool,
}

/// Owner side: a token bucket bounding how often one peer subscribes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn full() -> Self {
        Self {
            tokens: SUBSCRIBE_BURST,
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() / SUBSCRIBE_EVERY.as_secs_f64();
        self.tokens = (self.tokens + earned).min(SUBSCRIBE_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Owner side: a member's word on the log position it applied.
#[derive(Debug, Clone, Copy)]
struct Acked {
    seq: u64,
    /// When (seconds since the epoch).
    at: i64,
    /// When last taken, to take at most one a second per member and group.
    taken: Option<tokio::time::Instant>,
}

/// How much of each owned group's change log is kept: what members that
/// acknowledged lately have not applied yet, within bounds.
#[derive(Debug, Clone, Copy)]
pub struct LogKeeping {
    /// Entries kept whatever else says (the newest).
    pub least: u64,
    /// Most entries kept: a member further behind gets a snapshot.
    pub most: u64,
    /// Members that acknowledged within this long keep what they have not
    /// applied.
    pub acked_within: Duration,
    /// Entries older than this go, unless among the newest `least`.
    pub max_age: Duration,
}

impl Default for LogKeeping {
    fn default() -> Self {
        Self {
            least: 1024,
            most: 100_000,
            acked_within: Duration::from_secs(30 * 24 * 3600),
            max_age: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// How often the owner prunes its groups' logs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Member side: how long after applying something the member acknowledges
/// it (one acknowledgement for a burst).
const ACK_DELAY: Duration = Duration::from_secs(1);

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Member side: how long an answer to a block request is taken after the
/// request was given up on ...
const ASKED_LATELY: Duration = Duration::from_secs(120);
/// ... for at most this many requests.
const ASKED_LATELY_MOST: usize = 16_384;

/// Owner side: most log entries a catch-up is made of; a member further
/// behind gets a snapshot.
const CATCH_UP_MOST: usize = 100_000;

/// Owner side: subscriptions one peer may make at once ...
const SUBSCRIBE_BURST: f64 = 16.0;
/// ... and then one per this long (each costs a snapshot of the group).
const SUBSCRIBE_EVERY: Duration = Duration::from_secs(2);
/// Owner side: one block request of a peer counted in [`Inner::serving`]
/// until dropped.
struct Serving {
    engine: Engine,
    peer: UserName,
}

impl Serving {
    /// Counts a request of `peer`, unless it has [`SERVING_PER_PEER`] already.
    fn start(engine: &Engine, peer: &UserName) -> Option<Self> {
        let mut serving = lock(&engine.inner.serving);
        let n = serving.entry(peer.clone()).or_default();
        if *n >= SERVING_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self {
            engine: engine.clone(),
            peer: peer.clone(),
        })
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut serving = lock(&self.engine.inner.serving);
        if let Some(n) = serving.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                serving.remove(&self.peer);
            }
        }
    }
}

/// Owner side: a block being answered to a peer, in [`Inner::answering`]
/// until dropped.
struct Answering {
    engine: Engine,
    key: (UserName, [u8; 32]),
}

impl Drop for Answering {
    fn drop(&mut self) {
        lock(&self.engine.inner.answering).remove(&self.key);
    }
}

/// Owner side: block requests of one peer served or waiting at once; more are
/// refused with `EBUSY` (a member asks for at most its fill parallelism plus
/// what its readers wait for).
const SERVING_PER_PEER: usize = 256;

/// Member side: a block list arriving in pieces.
#[derive(Debug)]
struct ListAssembly {
    list: ListRef,
    blocks: Vec<BlockRef>,
    /// When it was asked for: asked again if nothing came for a while.
    asked: tokio::time::Instant,
}

/// Member side: those waiting for one block, the group it was asked of and the
/// peer asked (only that peer's answer is taken).
#[derive(Debug)]
struct Waiting {
    group: GroupId,
    asked: UserName,
    senders: Vec<oneshot::Sender<Fetched>>,
}

/// What a group's filler looks at for missing blocks.
#[derive(Debug, Default)]
enum FillWork {
    /// Nothing (left): the filler ends.
    #[default]
    Nothing,
    /// The mirrors of these owner node ids, in the order they changed.
    Nodes(Vec<u64>, HashSet<u64>),
    /// Every mirrored file of the group (after a snapshot, or a failed fetch).
    All,
}

impl FillWork {
    fn add(&mut self, more: FillWork) {
        match more {
            FillWork::Nothing => {}
            FillWork::All => *self = FillWork::All,
            FillWork::Nodes(ids, _) => match self {
                FillWork::All => {}
                FillWork::Nothing => *self = FillWork::nodes(ids),
                FillWork::Nodes(order, seen) => {
                    for id in ids {
                        if seen.insert(id) {
                            order.push(id);
                        }
                    }
                }
            },
        }
    }

    fn nodes(ids: impl IntoIterator<Item = u64>) -> Self {
        let mut w = FillWork::Nodes(Vec::new(), HashSet::new());
        if let FillWork::Nodes(order, seen) = &mut w {
            for id in ids {
                if seen.insert(id) {
                    order.push(id);
                }
            }
        }
        w
    }
}

/// How long after a change the exact set of pinned blocks is recomputed (full
/// copy). Until then blocks a change replaced stay pinned; new ones are pinned at
/// once.
const REPIN_DELAY: Duration = Duration::from_millis(300);

/// How long the owner waits for more changes once a burst of them is under way,
/// to send them together; it goes on while they keep coming, up to
/// [`COALESCE_MAX`].
const COALESCE: Duration = Duration::from_millis(3);
/// Longest the owner holds back the changes of a burst.
const COALESCE_MAX: Duration = Duration::from_millis(25);
/// Owner side: block requests served at once.
const SERVE_PARALLELISM: usize = 8;
/// Owner side: most refused users remembered per group.
const REFUSED_MOST: usize = 1024;

/// Member side: blocks verified and written to the cache at once.
const INSERT_PARALLELISM: usize = 2;

/// Most tree events handled at once.
const DRAIN_MOST: usize = 4096;

/// A client's sync engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({})", self.inner.me)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its map consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// Creates the engine and starts its task that follows the tree's events.
    /// Must be called inside a tokio runtime.
    pub fn start(
        me: UserName,
        tree: Arc<RwLock<Tree>>,
        store: Store,
        cache: Arc<BlockCache>,
        link: Arc<dyn Link>,
        notifier: Option<fuser::Notifier>,
        config: EngineConfig,
    ) -> Self {
        let events = tree.read().unwrap_or_else(|e| e.into_inner()).subscribe();
        let invalidations = notifier.clone().and_then(|n| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Inval>>(INVALIDATION_QUEUE);
            // Ends when the engine, and with it the sender, is gone.
            std::thread::Builder::new()
                .name("brume-inval".into())
                .spawn(move || {
                    while let Ok(batch) = rx.recv() {
                        invalidate(&n, batch);
                    }
                })
                .map_err(|e| tracing::warn!(cause = %e, "no invalidation thread"))
                .ok()
                .map(|_| tx)
        });
        let inner = Arc::new(Inner {
            me,
            tree,
            store,
            cache,
            outbox: Outbox::new(link.clone()),
            link,
            notifier,
            invalidations,
            fill_slots: Arc::new(Semaphore::new(config.fill_parallelism.max(1))),
            serve_slots: Arc::new(Semaphore::new(SERVE_PARALLELISM)),
            insert_slots: Semaphore::new(INSERT_PARALLELISM),
            config,
            waiters: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            unhashed: Mutex::new(HashMap::new()),
            syncing: Mutex::new(HashSet::new()),
            acks: Mutex::new(HashMap::new()),
            acking: Mutex::new(HashSet::new()),
            links_sent: Mutex::new(HashMap::new()),
            snapshotting: Mutex::new(HashSet::new()),
            snapshots: Mutex::new(HashMap::new()),
            unsettled: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            unasked_blocks: std::sync::atomic::AtomicU64::new(0),
            asked_lately: Mutex::new(HashMap::new()),
            subscribe_rates: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
            answering: Mutex::new(HashSet::new()),
            filling: Mutex::new(HashMap::new()),
            fill_failed: Mutex::new(HashSet::new()),
            repin_scheduled: Mutex::new(false),
            fetch_timeouts: std::sync::atomic::AtomicU64::new(0),
            refused: Mutex::new(HashMap::new()),
            retrying: Mutex::new(HashSet::new()),
            lists: Mutex::new(HashMap::new()),
            local_full: LocalFull::default(),
            refills: std::sync::atomic::AtomicU64::new(0),
        });
        let engine = Self { inner };
        // Follows the tree: pushes owner changes, subscribes on join. Ends when
        // the tree (and so the mount) is gone.
        tokio::spawn(engine.clone().follow(events));
        tokio::spawn(Self::refill(Arc::downgrade(&engine.inner)));
        tokio::spawn(Self::keep_logs(Arc::downgrade(&engine.inner)));
        engine
    }

    fn tree_read(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.inner.tree.read().unwrap_or_else(|e| e.into_inner())
    }

    fn tree_write(&self) -> crate::fs::tree::TreeWrite<'_> {
        crate::fs::tree::write(&self.inner.tree)
    }

    /// Owned groups held by the mass-delete guard, by name, with the reason.
    pub fn held_groups(&self) -> std::collections::BTreeMap<String, String> {
        self.tree_read()
            .groups()
            .filter_map(|g| Some((g.row.name.clone(), g.held.clone()?)))
            .collect()
    }

    /// Owned groups by name, with the users their `.members` lists.
    pub fn owned_members(&self) -> Vec<(String, Vec<String>)> {
        self.tree_read()
            .groups()
            .filter(|g| g.row.owned)
            .map(|g| (g.row.name.clone(), g.members.clone()))
            .collect()
    }

    /// Block cache usage.
    pub fn cache_usage(&self) -> crate::blocks::cache::CacheUsage {
        self.inner.cache.usage()
    }

    /// The member-side status of every joined group, by `owner/name`.
    pub fn member_status(&self) -> HashMap<String, MemberGroupStatus> {
        let tree = self.tree_read();
        let groups = lock(&self.inner.groups);
        tree.joined_groups()
            .into_iter()
            .map(|(g, owner, name, applied)| {
                let state = groups.get(&g).cloned().unwrap_or_default();
                let mut s = MemberGroupStatus {
                    problem: state.problem.map(|p| p.to_string()),
                    refusals: state.refusals,
                    ..Default::default()
                };
                s.applied = applied;
                s.full_copy = self.inner.config.full_copy;
                for (_, _, blocks) in tree.mirrored_files(g) {
                    let mut complete = true;
                    for (hash, len) in blocks.iter() {
                        s.bytes_total += u64::from(*len);
                        if self.inner.cache.contains(hash) {
                            s.bytes_done += u64::from(*len);
                        } else {
                            complete = false;
                        }
                    }
                    s.files_total += 1;
                    s.files_done += u64::from(complete);
                }
                // Files whose block list is still on its way are not here yet.
                for (id, _) in tree.pending_lists(g) {
                    s.files_total += 1;
                    s.bytes_total += tree
                        .mirror(g, id)
                        .and_then(|ino| tree.get(ino).ok())
                        .map_or(0, |n| n.row.size);
                }
                (format!("{owner}/{name}"), s)
            })
            .collect()
    }

    async fn follow(self, mut events: broadcast::Receiver<TreeEvent>) {
        loop {
            let mut batch = vec![events.recv().await];
            drain(&mut events, &mut batch);
            if batch.len() > 1 {
                // A burst is under way: what follows within a few milliseconds goes
                // in the same messages, for as long as it keeps coming (bounded).
                let until = tokio::time::Instant::now() + COALESCE_MAX;
                loop {
                    tokio::time::sleep(COALESCE).await;
                    let had = batch.len();
                    drain(&mut events, &mut batch);
                    if batch.len() == had
                        || batch.len() >= DRAIN_MOST
                        || tokio::time::Instant::now() >= until
                    {
                        break;
                    }
                }
            }
            // Changes in event order; other events flush them first.
            let mut pushes: Vec<(GroupId, Ino)> = Vec::new();
            for event in batch {
                match event {
                    Ok(TreeEvent::Changed { group, ino }) => pushes.push((group, ino)),
                    Ok(TreeEvent::Hashed { group, ino }) => {
                        // If its `Changed` is in this batch, that one sends it.
                        if lock(&self.inner.unhashed).remove(&ino).is_some() {
                            pushes.push((group, ino));
                        }
                    }
                    other => {
                        self.push_changes(std::mem::take(&mut pushes));
                        match other {
                            Ok(TreeEvent::Joined { group }) => {
                                // Never waits here: the owner's link may take a
                                // while to come up.
                                let engine = self.clone();
                                tokio::spawn(async move { engine.subscribe(group).await });
                            }
                            Ok(TreeEvent::Members { group, members }) => {
                                self.members_changed(group, members);
                            }
                            Ok(TreeEvent::Left { owner, name }) => {
                                self.free_left_blocks();
                                if let Ok(owner) = UserName::new(&owner) {
                                    let msg = MemberToOwner::Unsubscribe { group: name };
                                    let link = self.inner.link.clone();
                                    tokio::spawn(async move {
                                        let sent = link.send(
                                            &owner,
                                            Priority::Control,
                                            Reach::Dial,
                                            msg.encode(),
                                        );
                                        let _ = sent.await;
                                    });
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::warn!(
                                    missed = n,
                                    "sync fell behind the tree; resending snapshots"
                                );
                                self.resend_all_snapshots();
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                            Ok(TreeEvent::Changed { .. } | TreeEvent::Hashed { .. }) => {}
                        }
                    }
                }
            }
            self.push_changes(pushes);
        }
    }

    // ----- owner side -----

    /// Pushes the current state of changed nodes, one group at a time, as few
    /// `Changes` messages as fit. Order within a group is kept (a parent is sent
    /// before the child made in it); a node changed several times in a row is sent
    /// once.
    fn push_changes(&self, pushes: Vec<(GroupId, Ino)>) {
        let mut by_group: Vec<(GroupId, Vec<Ino>)> = Vec::new();
        for (g, ino) in pushes {
            match by_group.iter_mut().find(|(x, _)| *x == g) {
                Some((_, inos)) => {
                    if inos.last() != Some(&ino) {
                        inos.push(ino);
                    }
                }
                None => by_group.push((g, vec![ino])),
            }
        }
        for (g, inos) in by_group {
            self.push_group(g, inos);
        }
    }

    fn push_group(&self, group: GroupId, inos: Vec<Ino>) {
        let members: Vec<UserName> = match lock(&self.inner.subscribers).get(&group) {
            Some(s) if !s.is_empty() => s.iter().cloned().collect(),
            _ => return,
        };
        let mut members = members;
        {
            let tree = self.tree_read();
            let Some(g) = tree.group(group) else {
                return;
            };
            if g.held.is_some() {
                return;
            }
            // Subscribers are members as of these changes: a removal takes the
            // member out, in order with them, in `members_changed`. (A member
            // listed again may subscribe before that runs: the tree, which the
            // subscription checks, has it already.)
            let name = g.row.name.clone();
            let root = tree.group_root(group).ok();
            let links = tree.linked_names(group, inos.iter().copied());
            let mut links_sent = lock(&self.inner.links_sent);
            let mut changes = Vec::new();
            for ino in inos {
                match tree.node_states(ino, &links) {
                    Some(states) => {
                        // Names gone first: a file whose first name went is
                        // sent under the next one, which a link id held so far.
                        let now: BTreeSet<u64> = states
                            .iter()
                            .map(|s| s.id)
                            .filter(|id| *id != ino.0)
                            .collect();
                        let before = links_sent.remove(&ino).unwrap_or_default();
                        changes
                            .extend(before.difference(&now).map(|id| Change::Remove { id: *id }));
                        if !now.is_empty() {
                            links_sent.insert(ino, now);
                        }
                        changes.extend(states.into_iter().map(Change::Upsert));
                        // Sent: it no longer holds members' positions back.
                        lock(&self.inner.unhashed).remove(&ino);
                    }
                    None => match tree.get(ino) {
                        // Exists but is not hashed yet: sent when it is.
                        Ok(n) if n.row.nlink > 0 && n.row.group == Some(group) => {
                            if root != Some(ino) {
                                lock(&self.inner.unhashed)
                                    .entry(ino)
                                    .or_insert((group, n.row.version.0));
                            }
                        }
                        _ => {
                            lock(&self.inner.unhashed).remove(&ino);
                            changes.push(Change::Remove { id: ino.0 });
                            let before = links_sent.remove(&ino).unwrap_or_default();
                            changes.extend(before.into_iter().map(|id| Change::Remove { id }));
                        }
                    },
                }
            }
            drop(links_sent);
            let seq = self.settled(&tree, group);
            let mut msgs = batches(changes);
            msgs.retain(|m| !m.is_empty());
            // Queued under the tree's lock, which a snapshot is read and
            // queued under too: a member gets them in the order they were read
            // (a push never overtakes an older snapshot, which would remove
            // what the push brought).
            for changes in msgs {
                let bytes = OwnerToMember::Changes {
                    group: name.clone(),
                    seq,
                    changes,
                }
                .encode();
                members.retain(|m| self.to_member(&tree, m, group, bytes.clone()));
            }
        }
    }

    /// How many times `member` has subscribed so far.
    fn subscription(&self, member: &UserName) -> u64 {
        lock(&self.inner.subscriptions)
            .get(member)
            .copied()
            .unwrap_or(0)
    }

    /// Queues `bytes`, a push of group `g`, for subscribed `member`; false if
    /// the member is no longer subscribed to anything (it fell behind).
    fn to_member(&self, tree: &Tree, member: &UserName, g: GroupId, bytes: Vec<u8>) -> bool {
        let on_done = self.unsubscribe_on_error(member, g);
        match self
            .inner
            .outbox
            .push(member, Priority::Control, bytes, Some(on_done))
        {
            Ok(()) => true,
            Err(crate::sync::outbox::Full) => {
                self.fell_behind(tree, member);
                false
            }
        }
    }

    /// What to do when a message for subscribed `member` of group `g` could not
    /// be sent: drop its subscriptions, unless it has subscribed again since it
    /// was queued (on a new link, which must not lose them); it resyncs when back.
    fn unsubscribe_on_error(&self, member: &UserName, g: GroupId) -> crate::sync::outbox::OnDone {
        let generation = self.subscription(member);
        let engine = std::sync::Arc::downgrade(&self.inner);
        let member = member.clone();
        Box::new(move |sent| {
            let (Err(e), Some(inner)) = (sent, engine.upgrade()) else {
                return;
            };
            let engine = Engine { inner };
            if engine.subscription(&member) == generation {
                tracing::info!(peer = %member, group = %g, cause = %e, "member unreachable; it resyncs when back");
                engine.drop_subscriber(&member);
            }
        })
    }

    /// `member` reads too slowly for what it is subscribed to: what waits for
    /// it is dropped, and it is told `EBEHIND` for each group, so that it
    /// subscribes again (and gets the group afresh) when it can.
    fn fell_behind(&self, tree: &Tree, member: &UserName) {
        let groups: Vec<GroupId> = {
            let mut subs = lock(&self.inner.subscribers);
            subs.iter_mut()
                .filter_map(|(g, s)| s.remove(member).then_some(*g))
                .collect()
        };
        tracing::warn!(peer = %member, waiting = self.inner.outbox.waiting(member, Priority::Control), "member fell behind; it is told to subscribe again");
        lock(&self.inner.snapshotting).retain(|(m, _)| m != member);
        self.inner.outbox.clear(member, Priority::Control);
        for g in groups {
            if let Some(grp) = tree.group(g) {
                self.refuse(member, &grp.row.name, Problem::Behind);
            }
        }
    }

    fn drop_subscriber(&self, member: &UserName) {
        for subs in lock(&self.inner.subscribers).values_mut() {
            subs.remove(member);
        }
        // What is pushed from now on misses it: a snapshot queued before is not
        // enough when it subscribes again.
        lock(&self.inner.snapshotting).retain(|(m, _)| m != member);
    }

    /// Remembers that `user` asked for owned group `g` and was refused.
    fn remember_refused(&self, g: GroupId, user: &UserName) {
        let mut refused = lock(&self.inner.refused);
        let set = refused.entry(g).or_default();
        if set.len() < REFUSED_MOST {
            set.insert(user.clone());
        }
    }

    /// `.members` of owned group `g` now lists `members` (every change before
    /// this has been pushed): removed subscribers are told `ENOTMEMBER` and get
    /// nothing more; users refused or removed before and listed again are
    /// served at once, without waiting for them to ask again.
    fn members_changed(&self, g: GroupId, members: Vec<String>) {
        let members: HashSet<String> = members.into_iter().collect();
        let Some(name) = self.tree_read().group(g).map(|grp| grp.row.name.clone()) else {
            return;
        };
        let revoked: Vec<UserName> = {
            let mut subs = lock(&self.inner.subscribers);
            match subs.get_mut(&g) {
                Some(s) => {
                    let gone: Vec<UserName> = s
                        .iter()
                        .filter(|m| !members.contains(m.as_str()))
                        .cloned()
                        .collect();
                    for m in &gone {
                        s.remove(m);
                    }
                    gone
                }
                None => Vec::new(),
            }
        };
        for m in revoked {
            tracing::info!(peer = %m, group = %name, "membership revoked");
            self.remember_refused(g, &m);
            lock(&self.inner.snapshotting).remove(&(m.clone(), g));
            self.refuse(&m, &name, Problem::NotMember);
        }
        self.serve_readded(g, &members);
    }

    /// Subscribes the users of `g` refused before whom `members` lists now, and
    /// sends each a snapshot.
    fn serve_readded(&self, g: GroupId, members: &HashSet<String>) {
        let back: Vec<UserName> = {
            let mut refused = lock(&self.inner.refused);
            let Some(set) = refused.get_mut(&g) else {
                return;
            };
            let back: Vec<UserName> = set
                .iter()
                .filter(|u| members.contains(u.as_str()))
                .cloned()
                .collect();
            for u in &back {
                set.remove(u);
            }
            back
        };
        for user in back {
            tracing::info!(peer = %user, "member listed again; serving it");
            self.add_subscriber(g, &user);
            self.send_snapshot(&user, g);
        }
    }

    /// Makes `member` a subscriber of owned group `g`.
    fn add_subscriber(&self, g: GroupId, member: &UserName) {
        *lock(&self.inner.subscriptions)
            .entry(member.clone())
            .or_default() += 1;
        lock(&self.inner.subscribers)
            .entry(g)
            .or_default()
            .insert(member.clone());
    }

    fn resend_all_snapshots(&self) {
        let subs: Vec<(GroupId, Vec<UserName>)> = lock(&self.inner.subscribers)
            .iter()
            .map(|(g, s)| (*g, s.iter().cloned().collect()))
            .collect();
        for (g, members) in subs {
            for m in members {
                // The events missed were not pushed: a snapshot queued before
                // does not bring them.
                lock(&self.inner.snapshotting).remove(&(m.clone(), g));
                self.send_snapshot(&m, g);
            }
        }
    }

    /// Owner side: drops what no member needs from every owned group's change
    /// log, as `keeping` says. The database does it in the background.
    pub fn prune_logs(&self, keeping: &LogKeeping) {
        let now = unix_now();
        let acks = lock(&self.inner.acks).clone();
        let tree = self.tree_read();
        let owned: Vec<GroupId> = tree
            .groups()
            .filter(|g| g.row.owned)
            .map(|g| g.row.id)
            .collect();
        for g in owned {
            let newest = tree.log_position(g);
            let recent = |at: i64| now.saturating_sub(at) <= keeping.acked_within.as_secs() as i64;
            // What the members that acknowledged lately still need.
            let need = tree
                .group(g)
                .map(|grp| grp.members.clone())
                .unwrap_or_default()
                .iter()
                .filter_map(|m| UserName::new(m).ok())
                .filter_map(|m| acks.get(&(g, m)))
                .filter(|a| recent(a.at))
                .map(|a| a.seq)
                .fold(newest, u64::min);
            let upto = need.max(newest.saturating_sub(keeping.most));
            let older_than_ns = (now.saturating_sub(keeping.max_age.as_secs() as i64))
                .saturating_mul(1_000_000_000);
            let op = crate::catalog::Op::PruneChanges {
                group: g,
                upto,
                older_than_ns,
                keep_from: (newest + 1).saturating_sub(keeping.least.max(1)),
            };
            if let Err(e) = tree.catalog().send(op) {
                tracing::warn!(cause = %e, "cannot prune a change log");
            }
        }
    }

    /// Owner side: the log position `member` last said it applied in owned
    /// group `name`.
    pub fn acknowledged(&self, name: &str, member: &UserName) -> Option<u64> {
        let g = {
            let tree = self.tree_read();
            tree.find_group(tree.me().as_str(), name)?
        };
        lock(&self.inner.acks)
            .get(&(g, member.clone()))
            .map(|a| a.seq)
    }

    /// Owner side: loads what members acknowledged, then prunes the change
    /// logs every [`PRUNE_EVERY`]. Ends when the engine is gone.
    async fn keep_logs(inner: std::sync::Weak<Inner>) {
        let Some(path) = inner.upgrade().map(|inner| {
            let engine = Self { inner };
            engine.tree_read().catalog().path().to_owned()
        }) else {
            return;
        };
        let loaded = tokio::task::spawn_blocking(move || crate::catalog::acks(&path)).await;
        if let Some(inner) = inner.upgrade() {
            match loaded {
                Ok(Ok(rows)) => {
                    let mut acks = lock(&inner.acks);
                    for (g, user, seq, at) in rows {
                        if let Ok(user) = UserName::new(&user) {
                            acks.entry((g, user)).or_insert(Acked {
                                seq,
                                at,
                                taken: None,
                            });
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(cause = %e, "cannot read members' acknowledgements"),
                Err(_) => {}
            }
        }
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            Self { inner }.prune_logs(&LogKeeping::default());
        }
    }

    /// Owner side: the log position of owned group `g` a member is at once it
    /// has everything sent so far: the newest, or just before the first change
    /// of a file not sent yet (still being hashed), which a member that
    /// reconnects must get from the log.
    fn settled(&self, tree: &Tree, g: GroupId) -> u64 {
        let newest = tree.log_position(g);
        lock(&self.inner.unhashed)
            .values()
            .filter(|(group, _)| *group == g)
            .map(|(_, v)| v.saturating_sub(1))
            .fold(newest, u64::min)
    }

    /// Owner side: files of `g` that exist but cannot be sent yet: each is
    /// pushed once hashed.
    fn unsettled_until_hashed(&self, tree: &Tree, g: GroupId, pending: &[Ino]) {
        let mut unhashed = lock(&self.inner.unhashed);
        for ino in pending {
            let version = tree.get(*ino).map_or(0, |n| n.row.version.0);
            unhashed.entry(*ino).or_insert((g, version));
        }
    }

    /// Owner side: answers the subscription of `member` to owned group `g`
    /// from position `since` with the changes since, from the log, or with a
    /// snapshot when the log cannot say.
    async fn catch_up(&self, member: UserName, g: GroupId, since: u64) {
        let (catalog, path) = {
            let tree = self.tree_read();
            (tree.catalog().clone(), tree.catalog().path().to_owned())
        };
        // A change in the tree may not be in the database yet: read after a
        // barrier, and again if the log grew meanwhile.
        for _ in 0..3 {
            let (catalog, path) = (catalog.clone(), path.clone());
            let read = tokio::task::spawn_blocking(move || {
                catalog.barrier()?;
                crate::catalog::log_since(&path, g, since, CATCH_UP_MOST)
            })
            .await;
            let entries = match read {
                Ok(Ok(crate::catalog::LogSince::Entries(e))) => e,
                Ok(Ok(crate::catalog::LogSince::Beyond)) => break,
                Ok(Err(e)) => {
                    tracing::warn!(cause = %e, "cannot read the change log; sending a snapshot");
                    break;
                }
                Err(_) => break,
            };
            let tree = self.tree_read();
            let end = entries.last().map_or(since, |(seq, ..)| seq.0);
            if end != tree.log_position(g) {
                continue;
            }
            let Some(group) = tree.group(g).filter(|grp| grp.held.is_none()) else {
                return;
            };
            let Some((changes, pending)) = self.changes_since(&tree, g, &entries) else {
                break;
            };
            // Queued under the tree lock, with the member made a subscriber in
            // the same breath: every later change is pushed after this.
            self.add_subscriber(g, &member);
            self.unsettled_until_hashed(&tree, g, &pending);
            let seq = self.settled(&tree, g);
            let parts = batches(changes);
            let count = parts.len();
            for (i, changes) in parts.into_iter().enumerate() {
                let last = i + 1 == count;
                let msg = OwnerToMember::CatchUp {
                    group: group.row.name.clone(),
                    epoch: tree.epoch(g),
                    since,
                    seq,
                    changes,
                    unsettled: if last {
                        pending.iter().map(|i| i.0).collect()
                    } else {
                        Vec::new()
                    },
                    last,
                };
                let on_done = self.unsubscribe_on_error(&member, g);
                self.inner.outbox.push_always(
                    &member,
                    Priority::Control,
                    msg.encode(),
                    Some(on_done),
                );
            }
            tracing::info!(peer = %member, group = %group.row.name, since, entries = entries.len(), "member caught up from the log");
            return;
        }
        self.add_subscriber(g, &member);
        self.send_snapshot(&member, g);
    }

    /// Owner side: the changes that bring a member of owned group `g` from
    /// the log position before `entries` to now: the current state of each
    /// node named (parents first), then the removals; and the files that are
    /// not hashed yet. `None` where only a snapshot is sure (hard links).
    fn changes_since(
        &self,
        tree: &Tree,
        g: GroupId,
        entries: &[(crate::ids::Seq, crate::catalog::ChangeOp, Ino)],
    ) -> Option<(Vec<Change>, Vec<Ino>)> {
        use crate::catalog::ChangeOp;
        let root = tree.group_root(g).ok()?;
        let mut named = Vec::new();
        let mut seen = HashSet::new();
        let mut removed = HashSet::new();
        for (_, op, ino) in entries {
            match op {
                ChangeOp::Link => return None,
                ChangeOp::Remove => {
                    removed.insert(*ino);
                }
                _ => {}
            }
            if seen.insert(*ino) {
                named.push(*ino);
            }
        }
        let links_sent = lock(&self.inner.links_sent);
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        let mut pending = Vec::new();
        for ino in named {
            if ino == root {
                continue;
            }
            match tree.get(ino) {
                Ok(n) if n.row.nlink > 0 && n.row.group == Some(g) => {
                    // A name of a file with several (or that had several) went
                    // or came: only a snapshot says which the member keeps.
                    if removed.contains(&ino)
                        || links_sent.contains_key(&ino)
                        || (n.row.kind != crate::catalog::NodeKind::Dir && n.row.nlink > 1)
                    {
                        return None;
                    }
                    match tree.node_state(ino) {
                        Some(state) => upserts.push((tree.depth(ino), state)),
                        None => pending.push(ino),
                    }
                }
                _ => removes.push(Change::Remove { id: ino.0 }),
            }
        }
        upserts.sort_by_key(|(depth, _)| *depth);
        let mut changes: Vec<Change> = upserts
            .into_iter()
            .map(|(_, s)| Change::Upsert(s))
            .collect();
        changes.extend(removes);
        Some((changes, pending))
    }

    /// Queues a snapshot of owned group `g` for `to`, unless one is queued for
    /// it already.
    fn send_snapshot(&self, to: &UserName, g: GroupId) {
        let tree = self.tree_read();
        let Some(group) = tree.group(g) else {
            return;
        };
        if group.held.is_some() {
            return;
        }
        let Ok((nodes, pending)) = tree.group_snapshot(g) else {
            return;
        };
        if !lock(&self.inner.snapshotting).insert((to.clone(), g)) {
            return;
        }
        // Recorded under the tree lock: a file's `Hashed` event comes from
        // under the write lock, so it cannot slip in before this and be missed.
        self.unsettled_until_hashed(&tree, g, &pending);
        let links = tree.linked_names(g, pending.iter().copied());
        let unsettled: Vec<u64> = pending
            .iter()
            .flat_map(|ino| tree.node_ids(*ino, &links))
            .collect();
        // The member may hold every name named here, settled or not: the
        // removal of one that goes is sent.
        {
            let mut links_sent = lock(&self.inner.links_sent);
            for id in nodes
                .iter()
                .map(|n| n.id)
                .chain(unsettled.iter().copied())
                .filter(|id| ino_of_id(*id).0 != *id)
            {
                links_sent.entry(ino_of_id(id)).or_default().insert(id);
            }
        }
        // Queued under the tree lock, like every push: a push read after this
        // goes after it.
        let chunks = snapshot_chunks(
            &group.row.name,
            tree.epoch(g),
            (tree.log_position(g), self.settled(&tree, g)),
            nodes,
            unsettled,
        );
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut on_done = self.unsubscribe_on_error(to, g);
            if i + 1 == count {
                let engine = std::sync::Arc::downgrade(&self.inner);
                let key = (to.clone(), g);
                let failed = on_done;
                on_done = Box::new(move |sent| {
                    if let Some(inner) = engine.upgrade() {
                        lock(&inner.snapshotting).remove(&key);
                    }
                    failed(sent);
                });
            }
            self.inner
                .outbox
                .push_always(to, Priority::Control, chunk, Some(on_done));
        }
    }

    /// Queues a refusal for `to`.
    fn refuse(&self, to: &UserName, group: &str, problem: Problem) {
        let msg = OwnerToMember::Refused {
            group: group.to_owned(),
            problem,
        };
        self.inner
            .outbox
            .push_always(to, Priority::Control, msg.encode(), None);
    }
    /// Whether `peer` may subscribe to `group` now (a token of its bucket), so
    /// that a peer that subscribes again and again cannot have us read and send
    /// snapshots without end.
    fn may_subscribe(&self, peer: &UserName, group: &str) -> bool {
        let key = (peer.clone(), group.to_owned());
        let mut rates = lock(&self.inner.subscribe_rates);
        if rates.len() > REFUSED_MOST && !rates.contains_key(&key) {
            // Peers whose bucket has filled again are as if never seen.
            let now = tokio::time::Instant::now();
            rates.retain(|_, b| {
                now.duration_since(b.at).as_secs_f64()
                    < SUBSCRIBE_BURST * SUBSCRIBE_EVERY.as_secs_f64()
            });
        }
        rates.entry(key).or_insert_with(Bucket::full).take()
    }

    /// The owned group `name` if `peer` is a member of it.
    fn member_group(&self, peer: &UserName, name: &str) -> Option<GroupId> {
        let tree = self.tree_read();
        let g = tree.find_group(tree.me().as_str(), name)?;
        tree.is_member(g, peer.as_str()).then_some(g)
    }

    async fn on_member_message(&self, from: &UserName, msg: MemberToOwner) {
        match msg {
            MemberToOwner::Hello { version } => {
                if version != VERSION {
                    tracing::warn!(peer = %from, version, "peer speaks another sync version");
                }
            }
            MemberToOwner::Subscribe {
                group,
                epoch,
                since,
            } => {
                if !self.may_subscribe(from, &group) {
                    tracing::warn!(peer = %from, %group, "refused: subscribing too often (EBUSY)");
                    return self.refuse(from, &group, Problem::Busy);
                }
                let Some(g) = self.member_group(from, &group) else {
                    tracing::info!(peer = %from, %group, "refused: not a member");
                    let owned = {
                        let tree = self.tree_read();
                        tree.find_group(tree.me().as_str(), &group)
                    };
                    if let Some(g) = owned {
                        self.remember_refused(g, from);
                    }
                    return self.refuse(from, &group, Problem::NotMember);
                };
                if self
                    .tree_read()
                    .group(g)
                    .is_some_and(|grp| grp.held.is_some())
                {
                    tracing::warn!(peer = %from, %group, "refused: the group is held");
                    return self.refuse(from, &group, Problem::Held);
                }
                tracing::info!(peer = %from, %group, epoch, since, "member subscribed");
                if let Some(set) = lock(&self.inner.refused).get_mut(&g) {
                    set.remove(from);
                }
                let in_log = {
                    let tree = self.tree_read();
                    epoch != 0 && epoch == tree.epoch(g) && since <= tree.log_position(g)
                };
                if in_log {
                    // Read from the database in a task of its own.
                    let engine = self.clone();
                    let from = from.clone();
                    tokio::spawn(async move { engine.catch_up(from, g, since).await });
                } else {
                    self.add_subscriber(g, from);
                    self.send_snapshot(from, g);
                }
            }
            MemberToOwner::Unsubscribe { group } => {
                let tree = self.tree_read();
                if let Some(g) = tree.find_group(tree.me().as_str(), &group)
                    && let Some(s) = lock(&self.inner.subscribers).get_mut(&g)
                {
                    s.remove(from);
                    lock(&self.inner.snapshotting).remove(&(from.clone(), g));
                }
            }
            MemberToOwner::GetBlock {
                group,
                id,
                index,
                hash,
                urgent,
            } => {
                let Some(g) = self.member_group(from, &group) else {
                    return self.refuse(from, &group, Problem::NotMember);
                };
                let key = (from.clone(), hash);
                if !lock(&self.inner.answering).insert(key.clone()) {
                    // Its answer is on its way already.
                    return;
                }
                let answering = Answering {
                    engine: self.clone(),
                    key,
                };
                let Some(serving) = Serving::start(self, from) else {
                    tracing::warn!(peer = %from, %group, "refused: too many block requests at once (EBUSY)");
                    return self.refuse(from, &group, Problem::Busy);
                };
                // Served in a task of its own, a few at once: reading, hashing and
                // sending one block overlaps with the next, and the messages behind
                // this one (of any peer) never wait for a turn.
                let engine = self.clone();
                let from = from.clone();
                let priority = if urgent {
                    Priority::Interactive
                } else {
                    Priority::Bulk
                };
                tokio::spawn(async move {
                    let _serving = serving;
                    // Room in the member's queue first: one that reads slowly
                    // holds up its own requests, never a serving slot.
                    let outbox = &engine.inner.outbox;
                    let generation = outbox.generation(&from, priority);
                    outbox.wait_room(&from, priority, BLOCK_SIZE as usize).await;
                    // The member's link was lost meanwhile: it asks again.
                    if outbox.generation(&from, priority) != generation {
                        return;
                    }
                    let reply = {
                        let Ok(_permit) = engine.inner.serve_slots.acquire().await else {
                            return;
                        };
                        engine
                            .read_block(g, ino_of_id(id), index, BlockHash(hash))
                            .await
                    };
                    let msg = match reply {
                        Some(data) => OwnerToMember::Block { group, hash, data },
                        None => OwnerToMember::NoBlock { group, hash },
                    };
                    // Answered once sent (or dropped): `answering` goes with it.
                    let on_done: crate::sync::outbox::OnDone = Box::new(move |_| drop(answering));
                    outbox
                        .push_waiting(&from, priority, msg.encode(), generation, Some(on_done))
                        .await;
                });
            }
            MemberToOwner::Ack { group, epoch, seq } => {
                let Some(g) = self.member_group(from, &group) else {
                    return;
                };
                {
                    let tree = self.tree_read();
                    if epoch != tree.epoch(g) || seq > tree.log_position(g) {
                        return;
                    }
                }
                let now = tokio::time::Instant::now();
                let at = unix_now();
                {
                    let mut acks = lock(&self.inner.acks);
                    let entry = acks.entry((g, from.clone())).or_insert(Acked {
                        seq: 0,
                        at,
                        taken: None,
                    });
                    // At most one a second: each is a database write.
                    if entry
                        .taken
                        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
                    {
                        return;
                    }
                    *entry = Acked {
                        seq,
                        at,
                        taken: Some(now),
                    };
                }
                let sent = self.tree_read().catalog().send(crate::catalog::Op::PutAck {
                    group: g,
                    user: from.to_string(),
                    seq,
                    at,
                });
                if let Err(e) = sent {
                    tracing::warn!(cause = %e, "cannot record a member's acknowledgement");
                }
            }
            MemberToOwner::GetBlockList { group, id, hash } => {
                let Some(g) = self.member_group(from, &group) else {
                    return self.refuse(from, &group, Problem::NotMember);
                };
                let list = {
                    let tree = self.tree_read();
                    let ino = ino_of_id(id);
                    tree.get(ino)
                        .is_ok_and(|n| n.row.group == Some(g))
                        .then(|| tree.block_list(ino))
                        .flatten()
                };
                // Queued from a task of its own: a long list is several
                // messages, queued as the member takes them. On the
                // interactive lane: the member's fetches of the file wait
                // for it, and it must not count against the pushes' bound.
                let outbox = self.inner.outbox.clone();
                let from = from.clone();
                let priority = Priority::Interactive;
                let generation = outbox.generation(&from, priority);
                tokio::spawn(async move {
                    let Some(blocks) = list.filter(|b| crate::sync::proto::list_hash(b) == hash)
                    else {
                        let msg = OwnerToMember::NoBlockList { group, id, hash };
                        outbox.push_always(&from, priority, msg.encode(), None);
                        return;
                    };
                    for (k, piece) in blocks.chunks(LIST_PIECE).enumerate() {
                        let msg = OwnerToMember::BlockList {
                            group: group.clone(),
                            id,
                            hash,
                            from: (k * LIST_PIECE) as u64,
                            blocks: piece.to_vec(),
                        };
                        outbox
                            .push_waiting(&from, priority, msg.encode(), generation, None)
                            .await;
                    }
                });
            }
        }
    }

    /// Reads block `index` of owned file `ino` in group `g`, if it still hashes
    /// to `hash`.
    async fn read_block(
        &self,
        g: GroupId,
        ino: Ino,
        index: u32,
        hash: BlockHash,
    ) -> Option<Vec<u8>> {
        {
            let tree = self.tree_read();
            let n = tree.get(ino).ok()?;
            if n.row.group != Some(g) || n.row.kind != crate::catalog::NodeKind::File {
                return None;
            }
        }
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let f = store.open_read(ino).ok()?;
            let mut buf = vec![0u8; BLOCK_SIZE as usize];
            let off = u64::from(index) * BLOCK_SIZE;
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], off + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(_) => return None,
                }
            }
            buf.truncate(got);
            (crate::blocks::hash_block(&buf) == hash).then_some(buf)
        })
        .await
        .ok()
        .flatten()
    }

    // ----- member side -----

    /// Asks the owner of joined group `g` for it (on join, start and reconnect).
    pub async fn subscribe(&self, g: GroupId) {
        let (owner, name, epoch, since) = {
            let tree = self.tree_read();
            let Some(group) = tree.group(g) else {
                return;
            };
            if group.row.owned {
                return;
            }
            (
                group.row.owner.clone(),
                group.row.name.clone(),
                // A position is of use only if everything it stands for is
                // here.
                if tree.mirror_lacks_blocks(g) {
                    0
                } else {
                    tree.epoch(g)
                },
                tree.log_position(g),
            )
        };
        // Until the answer has come whole, pushes do not move the position.
        lock(&self.inner.syncing).insert(g);
        let Ok(owner) = UserName::new(&owner) else {
            return;
        };
        // A snapshot dropped for its size is forgotten: the one asked for now
        // is assembled afresh.
        {
            let mut snaps = lock(&self.inner.snapshots);
            if snaps.get(&g).is_some_and(|p| p.dropped) {
                snaps.remove(&g);
            }
        }
        let msgs = [
            MemberToOwner::Hello { version: VERSION },
            MemberToOwner::Subscribe {
                group: name.clone(),
                epoch,
                since,
            },
        ];
        for m in msgs {
            let sent = self
                .inner
                .link
                .send(&owner, Priority::Control, Reach::Dial, m.encode());
            if let Err(e) = sent.await {
                tracing::info!(%owner, group = %name, cause = %e, "cannot subscribe yet");
                lock(&self.inner.groups).entry(g).or_default().problem =
                    Some(GroupProblem::Unreachable(e));
                return;
            }
        }
    }

    /// Subscribes to every joined group owned by `owner` (it came online).
    pub async fn owner_online(&self, owner: &UserName) {
        let groups: Vec<GroupId> = self
            .tree_read()
            .joined_groups()
            .into_iter()
            .filter(|(_, o, _, _)| o == owner.as_str())
            .map(|(g, ..)| g)
            .collect();
        for g in groups {
            self.subscribe(g).await;
        }
    }

    /// Handles one message from `from`.
    pub async fn on_message(&self, from: &UserName, payload: &[u8]) {
        if let Ok(msg) = MemberToOwner::decode(payload) {
            return self.on_member_message(from, msg).await;
        }
        match OwnerToMember::decode(payload) {
            Ok(msg) => self.on_owner_message(from, msg).await,
            Err(e) => tracing::warn!(peer = %from, cause = %e, "dropping a malformed sync message"),
        }
    }

    fn joined(&self, owner: &UserName, name: &str) -> Option<GroupId> {
        let tree = self.tree_read();
        let g = tree.find_group(owner.as_str(), name)?;
        (!tree.group(g)?.row.owned).then_some(g)
    }

    async fn on_owner_message(&self, from: &UserName, msg: OwnerToMember) {
        match msg {
            OwnerToMember::Hello { .. } => {}
            OwnerToMember::Snapshot {
                group,
                epoch,
                seq,
                settled,
                nodes,
                last,
                unsettled,
            } => {
                let Some(g) = self.joined(from, &group) else {
                    return;
                };
                let (all, unsettled) = {
                    let mut snaps = lock(&self.inner.snapshots);
                    let buf = snaps.entry(g).or_default();
                    let mut cut = false;
                    if !buf.dropped {
                        buf.bytes += nodes.iter().map(NodeState::wire_size).sum::<usize>()
                            + 8 * unsettled.len();
                        if buf.bytes > self.inner.config.snapshot_most_bytes {
                            // Its memory goes now; its next chunks are ignored.
                            *buf = SnapshotParts {
                                dropped: true,
                                ..Default::default()
                            };
                            cut = true;
                        } else {
                            buf.nodes.extend(nodes);
                            buf.unsettled.extend(unsettled);
                        }
                    }
                    let parts = if last { snaps.remove(&g) } else { None };
                    drop(snaps);
                    if cut {
                        tracing::warn!(owner = %from, %group, limit = self.inner.config.snapshot_most_bytes, "dropping a snapshot larger than the limit (ETOOBIG)");
                        self.refused(from, &group, g, GroupProblem::TooBig);
                    }
                    match parts {
                        Some(p) if !p.dropped => (p.nodes, p.unsettled),
                        _ => return,
                    }
                };
                lock(&self.inner.syncing).remove(&g);
                let position = Position::Synced {
                    epoch,
                    seq: settled.min(seq),
                };
                self.apply(g, position, |tree, out, gone| {
                    let mut seen = HashSet::new();
                    for n in &all {
                        seen.insert(n.id);
                        if let Err(e) = tree.apply_upsert(g, n, Situation::Sync, out) {
                            tracing::warn!(node = n.id, cause = %e, "cannot apply node");
                        }
                    }
                    gone.extend(tree.finish_snapshot(g, seq, &seen, &unsettled, out)?);
                    Ok(())
                })
                .await;
                lock(&self.inner.unsettled).insert(g, unsettled);
                self.repin();
                self.request_fill(g, FillWork::All);
            }
            OwnerToMember::Changes {
                group,
                seq,
                changes,
            } => {
                let Some(g) = self.joined(from, &group) else {
                    return;
                };
                let completes_sync: HashSet<u64> = {
                    let mut unsettled = lock(&self.inner.unsettled);
                    let ids = unsettled.entry(g).or_default();
                    changes
                        .iter()
                        .filter_map(|c| match c {
                            Change::Upsert(n) => ids.remove(&n.id).then_some(n.id),
                            Change::Remove { .. } => None,
                        })
                        .collect()
                };
                let position = if lock(&self.inner.syncing).contains(&g) {
                    Position::Kept
                } else {
                    Position::Pushed(seq)
                };
                self.apply(g, position, |tree, out, gone| {
                    let upsert = |id| {
                        if completes_sync.contains(&id) {
                            Situation::Sync
                        } else {
                            Situation::Update
                        }
                    };
                    apply_changes(tree, g, &changes, (out, gone), upsert, Situation::Update);
                    Ok(())
                })
                .await;
                self.fetch_changed(g, &changes);
            }
            OwnerToMember::CatchUp {
                group,
                epoch,
                since,
                seq,
                changes,
                unsettled,
                last,
            } => {
                let Some(g) = self.joined(from, &group) else {
                    return;
                };
                let position = if last {
                    lock(&self.inner.syncing).remove(&g);
                    Position::CaughtUp { epoch, seq }
                } else {
                    Position::Kept
                };
                tracing::debug!(owner = %from, %group, since, seq, changes = changes.len(), last, "catching up");
                // Files named unsettled complete this sync when their state comes.
                {
                    let mut waiting = lock(&self.inner.unsettled);
                    let ids = waiting.entry(g).or_default();
                    for c in &changes {
                        if let Change::Upsert(n) = c {
                            ids.remove(&n.id);
                        }
                    }
                    ids.extend(unsettled);
                }
                // Applied as a sync: the member's own edits of what changed are
                // kept as sync conflict copies, as with a snapshot.
                self.apply(g, position, |tree, out, gone| {
                    let upsert = |_| Situation::Sync;
                    apply_changes(tree, g, &changes, (out, gone), upsert, Situation::Sync);
                    Ok(())
                })
                .await;
                self.fetch_changed(g, &changes);
            }
            OwnerToMember::Block { group, hash, data } => {
                let hash = BlockHash(hash);
                // Only what we asked for, from the peer we asked: anything else
                // could only push blocks we need out of the cache.
                if !self.asked(&hash, from) {
                    return self.unasked(from, &hash);
                }
                // Verified and written off the message loop: the next block's
                // message need not wait for this one's disk.
                let engine = self.clone();
                let from = from.clone();
                tokio::spawn(async move {
                    // Few at once: each blocking thread costs memory of its own.
                    let Ok(_slot) = engine.inner.insert_slots.acquire().await else {
                        return;
                    };
                    let cache = engine.inner.cache.clone();
                    let inserted = tokio::task::spawn_blocking(move || {
                        let r = cache.insert(&hash, &data);
                        (r, data)
                    })
                    .await;
                    let result = match inserted {
                        Ok((Ok(()), data)) => {
                            engine.inner.local_full.clear();
                            engine.local_problem(&from, &group, None);
                            Ok(Arc::from(data))
                        }
                        Ok((Err(e @ crate::blocks::cache::CacheError::Io { .. }), data)) => {
                            // Our side failed (a full disk, say): nothing is lost.
                            // The verified bytes still serve whoever waits for
                            // them; background fetches pause until there is room
                            // (or a while has passed), so nothing is fetched
                            // again and again for nothing.
                            if engine.inner.local_full.pause() {
                                tracing::error!(cause = %e, "cannot store blocks; pausing background fetches until there is room");
                            }
                            engine.local_problem(&from, &group, Some(e.to_string()));
                            Ok(Arc::from(data))
                        }
                        Ok((Err(e), _)) => {
                            tracing::warn!(peer = %from, cause = %e, "rejecting a block");
                            Err(FetchError::Stale { hash })
                        }
                        Err(e) => {
                            tracing::warn!(cause = %e, "block insert task failed");
                            Err(FetchError::Stale { hash })
                        }
                    };
                    engine.wake(&hash, result);
                });
            }
            OwnerToMember::BlockList {
                group,
                id,
                hash,
                from: start,
                blocks,
            } => {
                let Some(g) = self.joined(from, &group) else {
                    return;
                };
                let complete = {
                    let mut lists = lock(&self.inner.lists);
                    let Some(a) = lists.get_mut(&(g, id)) else {
                        return;
                    };
                    // Pieces come in order, and never beyond the list's length.
                    if a.list.hash != hash
                        || start != a.blocks.len() as u64
                        || a.blocks.len() as u64 + blocks.len() as u64 > a.list.count
                    {
                        tracing::warn!(owner = %from, %group, id, "dropping a block list piece out of order");
                        lists.remove(&(g, id));
                        return;
                    }
                    a.blocks.extend(blocks);
                    if (a.blocks.len() as u64) < a.list.count {
                        return;
                    }
                    lists.remove(&(g, id))
                };
                if let Some(a) = complete {
                    self.install_list(g, id, a).await;
                }
            }
            OwnerToMember::NoBlockList { group, id, hash } => {
                // The file changed since: its new state names another list.
                if let Some(g) = self.joined(from, &group) {
                    let mut lists = lock(&self.inner.lists);
                    if lists.get(&(g, id)).is_some_and(|a| a.list.hash == hash) {
                        lists.remove(&(g, id));
                    }
                }
            }
            OwnerToMember::NoBlock { hash, .. } => {
                let hash = BlockHash(hash);
                if !self.asked(&hash, from) {
                    return self.unasked(from, &hash);
                }
                self.wake(&hash, Err(FetchError::Stale { hash }));
            }
            OwnerToMember::Refused {
                group,
                problem: Problem::Behind,
            } => {
                // The owner dropped what it had queued for us: what came of a
                // snapshot is incomplete, and the group is asked for afresh.
                if let Some(g) = self.joined(from, &group) {
                    tracing::info!(owner = %from, %group, "the owner dropped changes for us (EBEHIND); subscribing again");
                    lock(&self.inner.snapshots).remove(&g);
                    let engine = self.clone();
                    tokio::spawn(async move { engine.subscribe(g).await });
                }
            }
            OwnerToMember::Refused { group, problem } => {
                if let Some(g) = self.joined(from, &group) {
                    self.refused(from, &group, g, GroupProblem::Refused(problem));
                }
            }
        }
    }

    /// After changes of joined group `g` were applied: pins what the changed
    /// files hold now (full copy) before any of it arrives (what they held
    /// before is released by the next recomputation), and fetches it.
    fn fetch_changed(&self, g: GroupId, changes: &[Change]) {
        if self.inner.config.full_copy {
            self.inner.cache.pin_at_least(
                changes
                    .iter()
                    .flat_map(|c| match c {
                        Change::Upsert(n) => n.blocks.as_slice(),
                        Change::Remove { .. } => &[],
                    })
                    .map(|b| BlockHash(b.hash)),
            );
            self.schedule_repin();
        }
        let ids = changes.iter().filter_map(|c| match c {
            Change::Upsert(n) => Some(n.id),
            Change::Remove { .. } => None,
        });
        self.request_fill(g, FillWork::nodes(ids));
    }

    /// Whether block `hash` is waited for, asked of `peer`.
    fn asked(&self, hash: &BlockHash, peer: &UserName) -> bool {
        if lock(&self.inner.waiters)
            .get(hash)
            .is_some_and(|w| w.asked == *peer)
        {
            return true;
        }
        // Asked lately and given up on (the wait timed out, a link was cut for
        // a while): the answer is still good, and taking it saves asking again.
        lock(&self.inner.asked_lately)
            .get(&(peer.clone(), *hash))
            .is_some_and(|at| at.elapsed() < ASKED_LATELY)
    }

    /// Remembers that `hash` was asked of `peer` (see [`Engine::asked`]).
    fn asking(&self, peer: &UserName, hash: BlockHash) {
        let mut lately = lock(&self.inner.asked_lately);
        if lately.len() >= ASKED_LATELY_MOST {
            lately.retain(|_, at| at.elapsed() < ASKED_LATELY);
            if lately.len() >= ASKED_LATELY_MOST {
                lately.clear();
            }
        }
        lately.insert((peer.clone(), hash), tokio::time::Instant::now());
    }

    /// Drops a block (or its absence) from `peer` that nobody asked it for.
    fn unasked(&self, peer: &UserName, hash: &BlockHash) {
        let n = self
            .inner
            .unasked_blocks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Logged once in a while: a peer sending them could flood the log.
        if n.is_power_of_two() {
            tracing::warn!(%peer, %hash, dropped = n + 1, "dropping blocks nobody asked this peer for");
        }
    }

    /// The link to `peer` went down or was replaced: the blocks it asked for
    /// over the old one are not sent over the new one (it asks again for
    /// what it still lacks), so that nothing is sent twice.
    pub fn link_changed(&self, peer: &UserName) {
        for p in [Priority::Interactive, Priority::Bulk] {
            self.inner.outbox.clear(peer, p);
        }
    }

    /// Owner side: bytes queued for `peer` and not sent yet.
    pub fn queued_bytes(&self, peer: &UserName) -> usize {
        [Priority::Control, Priority::Interactive, Priority::Bulk]
            .into_iter()
            .map(|p| self.inner.outbox.waiting(peer, p))
            .sum()
    }

    /// Blocks (or their absence) dropped so far because nobody asked their
    /// sender for them.
    pub fn unasked_blocks(&self) -> u64 {
        self.inner
            .unasked_blocks
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of snapshots being assembled now, of every joined group.
    pub fn snapshot_bytes(&self) -> usize {
        lock(&self.inner.snapshots).values().map(|p| p.bytes).sum()
    }

    /// The owner of joined group `g` (`group`) did not serve us: records why,
    /// fails what waits on the group if it refused us the group, and asks again
    /// later, after a delay that doubles with each refusal in a row.
    fn refused(&self, from: &UserName, group: &str, g: GroupId, problem: GroupProblem) {
        let delay = {
            let mut groups = lock(&self.inner.groups);
            let s = groups.entry(g).or_default();
            if s.problem.as_ref() == Some(&problem) {
                tracing::debug!(owner = %from, %group, %problem, "owner refused again");
            } else {
                tracing::warn!(owner = %from, %group, %problem, "owner refused");
            }
            s.problem = Some(problem.clone());
            if problem == GroupProblem::Refused(Problem::Busy) {
                // Asked too often: the owner takes one more every 2 s.
                SUBSCRIBE_EVERY
            } else {
                s.refusals += 1;
                RETRY_FIRST
                    .saturating_mul(1 << s.refusals.min(16))
                    .min(RETRY_MAX)
            }
        };
        // Reads and fills waiting on the group fail now, not at their timeout
        // (after the refusal is recorded: see `fetch`).
        if let GroupProblem::Refused(p @ (Problem::NotMember | Problem::Held)) = problem {
            self.wake_group(g, FetchError::Refused { problem: p });
        }
        // Ask again later, once: the owner may add us to `.members` (it also
        // serves us at once when it does, if we are reachable).
        if !lock(&self.inner.retrying).insert(g) {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            lock(&engine.inner.retrying).remove(&g);
            let still = lock(&engine.inner.groups)
                .get(&g)
                .is_some_and(|s| s.problem.is_some());
            if still {
                engine.subscribe(g).await;
            }
        });
    }

    /// Applies a batch under the tree's write lock, then tells the kernel what
    /// changed (after the lock: the kernel may call back into the filesystem).
    async fn apply(
        &self,
        g: GroupId,
        position: Position,
        f: impl FnOnce(
            &mut Tree,
            &mut Vec<Inval>,
            &mut Vec<crate::fs::tree::Node>,
        ) -> crate::fs::error::FsResult<()>,
    ) {
        let mut invals = Vec::new();
        let mut gone = Vec::new();
        {
            let mut tree = self.tree_write();
            if let Err(e) = f(&mut tree, &mut invals, &mut gone) {
                tracing::warn!(cause = %e, "sync apply failed");
            }
            let recorded = match position {
                Position::Kept => Ok(()),
                Position::Pushed(seq) => tree.set_applied(g, seq),
                // Unless the member removed or moved a mirror meanwhile (its
                // next sync must then be a snapshot).
                Position::CaughtUp { epoch, seq } if tree.epoch(g) == epoch => {
                    tree.set_applied(g, seq)
                }
                Position::CaughtUp { .. } => Ok(()),
                Position::Synced { epoch, seq } => tree.set_synced(g, epoch, seq),
            };
            if let Err(e) = recorded {
                tracing::warn!(cause = %e, "cannot record the applied position");
            }
            if !matches!(position, Position::Kept) {
                self.schedule_ack(g);
            }
        }
        {
            let mut status = lock(&self.inner.groups);
            let s = status.entry(g).or_default();
            s.problem = None;
            s.refusals = 0;
        }
        for node in gone {
            // Mirrored files edited locally had their bytes in the store.
            self.inner.store.remove(node.row.ino);
        }
        self.invalidate_later(invals);
        // Asked from a task of its own: the messages behind this one never
        // wait for the owner's link.
        let engine = self.clone();
        tokio::spawn(async move { engine.request_lists(g).await });
    }

    /// Member side: tells the owner of joined group `g`, a little later, the
    /// position applied (once for a burst), so that its log keeps what comes
    /// after.
    fn schedule_ack(&self, g: GroupId) {
        if !lock(&self.inner.acking).insert(g) {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ACK_DELAY).await;
            lock(&engine.inner.acking).remove(&g);
            let ack = {
                let tree = engine.tree_read();
                tree.group(g)
                    .filter(|grp| !grp.row.owned && tree.epoch(g) != 0)
                    .map(|grp| {
                        (
                            grp.row.owner.clone(),
                            MemberToOwner::Ack {
                                group: grp.row.name.clone(),
                                epoch: tree.epoch(g),
                                seq: tree.log_position(g),
                            },
                        )
                    })
            };
            let Some((owner, msg)) = ack else {
                return;
            };
            let Ok(owner) = UserName::new(&owner) else {
                return;
            };
            let sent =
                engine
                    .inner
                    .link
                    .send(&owner, Priority::Control, Reach::Linked, msg.encode());
            if let Err(e) = sent.await {
                tracing::debug!(%owner, cause = %e, "cannot acknowledge yet");
            }
        });
    }

    /// Has the kernel forget `invals` (after the tree lock is gone: the kernel
    /// may call back into the filesystem).
    fn invalidate_later(&self, invals: Vec<Inval>) {
        if invals.is_empty() {
            return;
        }
        // Queued for the invalidation thread; inline only if it is missing or
        // far behind (the queue is bounded).
        let invals = match &self.inner.invalidations {
            Some(tx) => match tx.try_send(invals) {
                Ok(()) => return,
                Err(
                    std::sync::mpsc::TrySendError::Full(b)
                    | std::sync::mpsc::TrySendError::Disconnected(b),
                ) => b,
            },
            None => invals,
        };
        if let Some(n) = &self.inner.notifier {
            invalidate(n, invals);
        }
    }

    /// Asks the owner of joined group `g` for the block lists its mirrors wait
    /// for (named by their nodes, too long to travel in them), except those
    /// already asked for lately.
    async fn request_lists(&self, g: GroupId) {
        let (owner, group, wanted) = {
            let tree = self.tree_read();
            let Some(grp) = tree.group(g) else {
                return;
            };
            (
                grp.row.owner.clone(),
                grp.row.name.clone(),
                tree.pending_lists(g),
            )
        };
        if wanted.is_empty() || self.refusal(g).is_some() {
            return;
        }
        let Ok(owner) = UserName::new(&owner) else {
            return;
        };
        let now = tokio::time::Instant::now();
        let ask: Vec<(u64, ListRef)> = {
            let mut lists = lock(&self.inner.lists);
            let mut ask = Vec::new();
            for (id, list) in wanted {
                let fresh = lists.get(&(g, id)).is_some_and(|a| {
                    a.list == list && now - a.asked < self.inner.config.read_timeout
                });
                if !fresh {
                    lists.insert(
                        (g, id),
                        ListAssembly {
                            list,
                            blocks: Vec::new(),
                            asked: now,
                        },
                    );
                    ask.push((id, list));
                }
            }
            ask
        };
        for (id, list) in ask {
            let msg = MemberToOwner::GetBlockList {
                group: group.clone(),
                id,
                hash: list.hash,
            };
            let sent = self
                .inner
                .link
                .send(&owner, Priority::Control, Reach::Dial, msg.encode());
            if let Err(e) = sent.await {
                tracing::debug!(%owner, %group, id, cause = %e, "cannot ask for a block list");
                lock(&self.inner.lists).remove(&(g, id));
                return;
            }
        }
    }

    /// Installs a block list that has arrived whole, then fetches its blocks.
    async fn install_list(&self, g: GroupId, id: u64, a: ListAssembly) {
        let mut invals = Vec::new();
        let installed = self
            .tree_write()
            .install_list(g, id, a.list, &a.blocks, &mut invals);
        match installed {
            Ok(Some(_)) => {
                if self.inner.config.full_copy {
                    self.inner
                        .cache
                        .pin_at_least(a.blocks.iter().map(|b| BlockHash(b.hash)));
                    self.schedule_repin();
                }
                self.invalidate_later(invals);
                self.request_fill(g, FillWork::nodes([id]));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(id, cause = %e, "dropping a block list"),
        }
    }

    /// After leaving a group: drops every cached block that no joined group's
    /// mirrors hold any more, pinned or not, so leaving frees the disk.
    fn free_left_blocks(&self) {
        let tree = self.tree_read();
        let wanted: HashSet<BlockHash> = tree
            .joined_groups()
            .into_iter()
            .flat_map(|(g, ..)| tree.mirrored_files(g))
            .flat_map(|(_, _, blocks)| blocks.iter().map(|(h, _)| *h).collect::<Vec<_>>())
            .collect();
        let freed = self.inner.cache.keep_only(&wanted);
        tracing::info!(freed, "left a group; its blocks are removed from the cache");
    }

    /// Full copy: makes what the joined groups hold now exactly the pinned blocks;
    /// replaced versions become evictable. O(blocks of all joined groups).
    fn repin(&self) {
        if !self.inner.config.full_copy {
            return;
        }
        // The tree stays read-locked until the cache has the new set: a change
        // applied meanwhile pins its blocks after this, not before.
        let tree = self.tree_read();
        let wanted: HashSet<BlockHash> = tree
            .joined_groups()
            .into_iter()
            .flat_map(|(g, ..)| tree.mirrored_files(g))
            .flat_map(|(_, _, blocks)| blocks.iter().map(|(h, _)| *h).collect::<Vec<_>>())
            .collect();
        self.inner.cache.pin_exactly(&wanted);
    }

    /// Runs [`repin`](Self::repin) a little later, once for all changes until then.
    fn schedule_repin(&self) {
        {
            let mut scheduled = lock(&self.inner.repin_scheduled);
            if *scheduled {
                return;
            }
            *scheduled = true;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REPIN_DELAY).await;
            *lock(&engine.inner.repin_scheduled) = false;
            engine.repin();
        });
    }

    fn wake(&self, hash: &BlockHash, result: Fetched) {
        let waiting = lock(&self.inner.waiters).remove(hash);
        for w in waiting.map(|w| w.senders).unwrap_or_default() {
            let _ = w.send(result.clone());
        }
    }

    /// What the owner of joined group `g` refused us, while it does: the
    /// group (not a moment's `EBUSY`).
    fn refusal(&self, g: GroupId) -> Option<Problem> {
        match lock(&self.inner.groups).get(&g)?.problem {
            Some(GroupProblem::Refused(p @ (Problem::NotMember | Problem::Held))) => Some(p),
            _ => None,
        }
    }

    /// Fails every fetch waiting on joined group `g`: its owner refused us.
    fn wake_group(&self, g: GroupId, err: FetchError) {
        let senders: Vec<oneshot::Sender<Fetched>> = {
            let mut waiters = lock(&self.inner.waiters);
            let hashes: Vec<BlockHash> = waiters
                .iter()
                .filter(|(_, w)| w.group == g)
                .map(|(h, _)| *h)
                .collect();
            hashes
                .iter()
                .filter_map(|h| waiters.remove(h))
                .flat_map(|w| w.senders)
                .collect()
        };
        for s in senders {
            let _ = s.send(Err(err.clone()));
        }
    }

    /// How long a reader waits for a missing block.
    pub fn read_timeout(&self) -> Duration {
        self.inner.config.read_timeout
    }

    /// Rounds of the background refill (every 2 s) so far.
    pub fn refills(&self) -> u64 {
        self.inner
            .refills
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the block cache's filesystem has room for a few more blocks.
    fn cache_has_room(&self) -> bool {
        const ROOM: u64 = 16 * BLOCK_SIZE;
        self.inner
            .cache
            .free_bytes()
            .is_some_and(|free| free >= ROOM)
    }

    /// Block requests that got no answer within the read timeout, since start.
    pub fn fetch_timeouts(&self) -> u64 {
        self.inner
            .fetch_timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Gets block `index` (hash `hash`) of mirrored file `ino` of group `g`: from
    /// the cache, or from the owner, waiting at most the read timeout.
    pub async fn fetch(
        &self,
        g: GroupId,
        ino: Ino,
        index: u32,
        hash: BlockHash,
        urgent: bool,
    ) -> Fetched {
        if let Ok(Some(data)) = self.inner.cache.read(&hash) {
            return Ok(data);
        }
        let (owner, group, id) = {
            let tree = self.tree_read();
            let Some(grp) = tree.group(g) else {
                return Err(FetchError::Unreachable {
                    reason: "group left".into(),
                });
            };
            let id = tree.get(ino).ok().and_then(|n| n.row.remote).map(|r| r.id);
            (grp.row.owner.clone(), grp.row.name.clone(), id)
        };
        let Some(id) = id else {
            return Err(FetchError::Stale { hash });
        };

        let Ok(owner) = UserName::new(&owner) else {
            return Err(FetchError::Unreachable {
                reason: "bad owner name".into(),
            });
        };
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut w = lock(&self.inner.waiters);
            let waiting = w.entry(hash).or_insert_with(|| Waiting {
                group: g,
                asked: owner.clone(),
                senders: Vec::new(),
            });
            waiting.senders.push(tx);
            waiting.senders.len() == 1
        };
        // An owner that refused us refuses this too: fail now, not at the
        // timeout. (Looked at once waiting: a refusal that comes after this
        // wakes the waiters it finds.)
        if let Some(problem) = self.refusal(g) {
            let err = FetchError::Refused { problem };
            self.wake(&hash, Err(err.clone()));
            return Err(err);
        }
        if first {
            self.asking(&owner, hash);
            let msg = MemberToOwner::GetBlock {
                group,
                id,
                index,
                hash: hash.0,
                urgent,
            };
            let priority = if urgent {
                Priority::Interactive
            } else {
                Priority::Control
            };
            let sent = self
                .inner
                .link
                .send(&owner, priority, Reach::Dial, msg.encode());
            if let Err(reason) = sent.await {
                let err = FetchError::Unreachable { reason };
                self.wake(&hash, Err(err.clone()));
                lock(&self.inner.fill_failed).insert(g);
                return Err(err);
            }
        }
        match tokio::time::timeout(self.inner.config.read_timeout, rx).await {
            Ok(Ok(r)) => r,
            _ => {
                self.inner
                    .fetch_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                lock(&self.inner.waiters).remove(&hash);
                // The group's next fill looks at every file again.
                lock(&self.inner.fill_failed).insert(g);
                Err(FetchError::Timeout { hash })
            }
        }
    }

    /// Records (or clears) a problem on this side with joined group
    /// `owner/group`, for `brume status`.
    fn local_problem(&self, owner: &UserName, group: &str, problem: Option<String>) {
        let Some(g) = self.joined(owner, group) else {
            return;
        };
        let mut groups = lock(&self.inner.groups);
        let s = groups.entry(g).or_default();
        match problem {
            Some(p) => s.problem = Some(GroupProblem::Local(p)),
            None if matches!(s.problem, Some(GroupProblem::Local(_))) => s.problem = None,
            None => {}
        }
    }

    /// Every [`REFILL_EVERY`], starts a fill of each joined group that misses
    /// blocks: background fetches that failed (a full disk, an owner away, a
    /// timeout) are tried again without waiting for the owner's next change.
    /// Ends when the engine is gone.
    async fn refill(inner: std::sync::Weak<Inner>) {
        let mut tick = tokio::time::interval(REFILL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let engine = Self { inner };
            if engine.inner.local_full.full() && engine.cache_has_room() {
                engine.inner.local_full.clear();
            }
            engine.refill_once();
            engine
                .inner
                .refills
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Block lists asked for that never came (the owner was away).
            let joined: Vec<GroupId> = engine
                .tree_read()
                .joined_groups()
                .into_iter()
                .map(|(g, ..)| g)
                .collect();
            for g in joined {
                engine.request_lists(g).await;
            }
        }
    }

    fn refill_once(&self) {
        if !self.inner.config.full_copy {
            return;
        }
        let missing: Vec<GroupId> = {
            let tree = self.tree_read();
            tree.joined_groups()
                .into_iter()
                .map(|(g, ..)| g)
                .filter(|g| {
                    tree.mirrored_files(*g).iter().any(|(_, _, blocks)| {
                        blocks.iter().any(|(h, _)| !self.inner.cache.contains(h))
                    })
                })
                .collect()
        };
        for g in missing {
            self.request_fill(g, FillWork::All);
        }
    }

    /// Has group `g`'s filler look at `work`: starts the filler in a task of its
    /// own, or adds to what the running one has still to do. Never waits: the
    /// caller is the loop that delivers the owner's answers, which the fill's
    /// fetches wait for.
    fn request_fill(&self, g: GroupId, work: FillWork) {
        let work = if lock(&self.inner.fill_failed).remove(&g) {
            FillWork::All
        } else {
            work
        };
        {
            let mut filling = lock(&self.inner.filling);
            if let Some(pending) = filling.get_mut(&g) {
                pending.add(work);
                return;
            }
            filling.insert(g, work);
        }
        let engine = self.clone();
        tokio::spawn(async move {
            loop {
                let work = {
                    let mut filling = lock(&engine.inner.filling);
                    match filling.get_mut(&g) {
                        Some(w) if !matches!(w, FillWork::Nothing) => std::mem::take(w),
                        _ => {
                            filling.remove(&g);
                            return;
                        }
                    }
                };
                engine.fill(g, work).await;
            }
        });
    }

    /// Fetches, in the background, the blocks of the files `work` names that are
    /// neither in the cache nor already asked for.
    async fn fill(&self, g: GroupId, work: FillWork) {
        let files: Vec<(Ino, Blocks)> = {
            let tree = self.tree_read();
            match work {
                FillWork::Nothing => return,
                FillWork::All => tree
                    .mirrored_files(g)
                    .into_iter()
                    .map(|(ino, _, blocks)| (ino, blocks))
                    .collect(),
                FillWork::Nodes(ids, _) => ids
                    .into_iter()
                    .filter_map(|id| {
                        let ino = tree.mirror(g, id)?;
                        Some((ino, tree.cached_content(ino)?))
                    })
                    .collect(),
            }
        };
        for (ino, blocks) in files {
            for (i, (hash, _)) in blocks.iter().enumerate() {
                if self.inner.cache.contains(hash) || lock(&self.inner.waiters).contains_key(hash) {
                    continue;
                }
                // An owner that refuses us would refuse every request: none
                // until it serves us again (its snapshot starts a fill). Nor
                // while the cache cannot store what comes.
                if self.refusal(g).is_some() || !self.inner.local_full.may_fetch() {
                    return;
                }
                let Ok(permit) = self.inner.fill_slots.clone().acquire_owned().await else {
                    return;
                };
                let engine = self.clone();
                let hash = *hash;
                // One background fetch; the permit bounds how many run at once.
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = engine.fetch(g, ino, i as u32, hash, false).await {
                        tracing::debug!(%ino, cause = %e, "background fetch failed");
                    }
                });
            }
        }
    }
}

use std::os::unix::ffi::OsStrExt;

/// Takes the events already queued, without waiting.
fn drain(
    events: &mut broadcast::Receiver<TreeEvent>,
    batch: &mut Vec<Result<TreeEvent, broadcast::error::RecvError>>,
) {
    while batch.len() < DRAIN_MOST {
        match events.try_recv() {
            Ok(e) => batch.push(Ok(e)),
            Err(broadcast::error::TryRecvError::Empty) => return,
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                batch.push(Err(broadcast::error::RecvError::Lagged(n)));
            }
            Err(broadcast::error::TryRecvError::Closed) => {
                batch.push(Err(broadcast::error::RecvError::Closed));
                return;
            }
        }
    }
}

/// A snapshot of group `name` at log position `seq`, as encoded chunks of a
/// bounded number of nodes and bytes, whatever the group; the unsettled files'
/// ids go in the last chunks, a bounded number each.
fn snapshot_chunks(
    name: &str,
    epoch: u64,
    (seq, settled): (u64, u64),
    nodes: Vec<NodeState>,
    unsettled: Vec<u64>,
) -> Vec<Vec<u8>> {
    let mut chunks: Vec<Vec<NodeState>> = vec![Vec::new()];
    let mut bytes = 0;
    for n in nodes {
        let size = n.wire_size();
        let last = chunks.last().map_or(0, Vec::len);
        if last > 0 && (last >= SNAPSHOT_CHUNK || bytes + size > NODES_BYTES) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(n);
        }
    }
    let mut unsettled = unsettled.chunks(NODES_BYTES / 10).map(<[u64]>::to_vec);
    let mut chunks: Vec<(Vec<NodeState>, Vec<u64>)> = chunks
        .into_iter()
        .map(|nodes| (nodes, Vec::new()))
        .collect();
    if let Some(last) = chunks.last_mut() {
        last.1 = unsettled.next().unwrap_or_default();
    }
    chunks.extend(unsettled.map(|ids| (Vec::new(), ids)));
    let count = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (nodes, unsettled))| {
            OwnerToMember::Snapshot {
                group: name.to_owned(),
                epoch,
                seq,
                settled,
                nodes,
                last: i + 1 == count,
                unsettled,
            }
            .encode()
        })
        .collect()
}

/// Member side: applies `changes` to joined group `g`: an upsert of node `id`
/// in the situation `upsert` gives (a sync or a live update), a removal in
/// `removal`. A change that cannot be applied is logged and skipped.
fn apply_changes(
    tree: &mut Tree,
    g: GroupId,
    changes: &[Change],
    (out, gone): (&mut Vec<Inval>, &mut Vec<crate::fs::tree::Node>),
    upsert: impl Fn(u64) -> Situation,
    removal: Situation,
) {
    for c in changes {
        let r = match c {
            Change::Upsert(n) => tree.apply_upsert(g, n, upsert(n.id), out),
            Change::Remove { id } => tree
                .apply_remove(g, *id, removal, out)
                .map(|g2| gone.extend(g2)),
        };
        if let Err(e) = r {
            tracing::warn!(cause = %e, "cannot apply change");
        }
    }
}

/// `changes` in messages of at most about [`NODES_BYTES`]; one (maybe empty)
/// at least.
fn batches(changes: Vec<Change>) -> Vec<Vec<Change>> {
    let mut msgs = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for c in changes {
        let size = change_size(&c);
        if !batch.is_empty() && bytes + size > NODES_BYTES {
            msgs.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(c);
    }
    msgs.push(batch);
    msgs
}

/// About how many bytes `c` takes in a message.
fn change_size(c: &Change) -> usize {
    match c {
        Change::Upsert(n) => n.wire_size(),
        Change::Remove { .. } => 16,
    }
}
