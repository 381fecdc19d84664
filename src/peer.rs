//! The peer link: one long-lived, authenticated WebRTC connection per pair of users,
//! set up through the signaling server and reused for every group and transfer. All
//! file data travels here, directly between the two machines.
//!
//! [`Peers::start`] runs one supervisor task per peer that (re)connects with backoff;
//! callers [`send`](Peers::send) opaque payloads on a [`Lane`] (control, interactive,
//! bulk: separate data channels, so bulk transfers never delay the others) and make
//! [`request`](Peers::request)s answered by the group's owner, who refuses non-members
//! with `ENOTMEMBER`. What arrives comes out of the receiver of [`PeerEvent`]s.
//!
//! - [`wire`]: frames, tags and size limits; reassembly of large messages.
//! - [`handshake`]: the signed transcript that authenticates a link.
//! - `link`: one WebRTC connection: setup, channels, readers.
//! - `supervisor`: one task per peer: dialing, answering, reconnecting, status.
//! - `udp`: socket receive buffers, and the SCTP window sized to what they hold.

pub mod handshake;
mod link;
mod supervisor;
mod turn_check;
mod turn_tcp;

pub use turn_check::RelayStatus;
mod udp;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::ids::{GroupName, UserName};
use crate::signal::ErrorCode;
use crate::signal::client::{ClientError, SignalClient, SignalEvent};
use crate::signal::protocol::IdentityKey;
use link::{Input, SignalMessage};
use supervisor::Supervisor;
use wire::ResponseStatus;

/// Events queued for the consumer of [`PeerEvent`]s; when full, the links stop
/// reading and SCTP's windows push back on the senders.
const EVENT_QUEUE: usize = 256;
/// Inputs queued for one peer's supervisor; setup messages beyond this are dropped
/// (the attempt then times out and is retried).
const INPUT_QUEUE: usize = 64;

/// A priority class of traffic. Each is its own data channel, so one lane's backlog
/// never delays another's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Small control messages (sync start, change notifications).
    Control,
    /// On-demand reads a program is waiting for; requests and responses.
    Interactive,
    /// Bulk transfers (pushing blocks to members).
    Bulk,
}

impl Lane {
    /// Every lane, in channel-id order.
    pub const ALL: [Lane; 3] = [Lane::Control, Lane::Interactive, Lane::Bulk];

    fn index(self) -> usize {
        match self {
            Lane::Control => 0,
            Lane::Interactive => 1,
            Lane::Bulk => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Lane::Control => "control",
            Lane::Interactive => "interactive",
            Lane::Bulk => "bulk",
        }
    }
}

/// Errors of the peer link, as callers of [`Peers`] see them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// No authenticated link to the peer came up in time.
    #[error("{peer}: {}not connected: {reason}", code.map(|c| format!("{} ", c.name())).unwrap_or_default())]
    Unreachable {
        /// The peer.
        peer: UserName,
        /// `ENODEST`, `EBADDEST`, `ECONNREFUSED`, … when the cause has a code.
        code: Option<ErrorCode>,
        /// The last failure, in words.
        reason: String,
    },
    /// The peer presented a different identity key from the pinned one.
    #[error("{peer}: identity key changed (pinned {pinned}, presented {presented}); refused")]
    KeyChanged {
        /// The peer.
        peer: UserName,
        /// Fingerprint of the pinned key.
        pinned: String,
        /// Fingerprint of the presented key.
        presented: String,
    },
    /// The link broke while sending.
    #[error("{peer}: link lost: {reason}")]
    LinkLost {
        /// The peer.
        peer: UserName,
        /// Why.
        reason: String,
    },
    /// `ENOTMEMBER (409)`: the owner says we are not a member of the group.
    #[error("{peer}/{group}: {} (not a member)", ErrorCode::NotMember.name())]
    NotMember {
        /// The owner.
        peer: UserName,
        /// Its group.
        group: GroupName,
    },
    /// The owner could not serve the request.
    #[error("{peer}/{group}: request failed: {reason}")]
    RequestFailed {
        /// The owner.
        peer: UserName,
        /// Its group.
        group: GroupName,
        /// What it said.
        reason: String,
    },
    /// No response within the time allowed.
    #[error("{peer}: no response within {after:?}")]
    Timeout {
        /// The peer.
        peer: UserName,
        /// The limit.
        after: Duration,
    },
    /// The payload is larger than [`wire::MAX_MESSAGE`].
    #[error("payload of {len} bytes exceeds the limit of {limit} bytes")]
    TooBig {
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Addressed to ourselves.
    #[error("cannot link to myself ({peer})")]
    Myself {
        /// Our own name.
        peer: UserName,
    },
    /// [`Peers`] has been shut down.
    #[error("peer links stopped")]
    Stopped,
}

impl PeerError {
    /// The protocol error code, for `brume status`, if the error has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            PeerError::Unreachable { code, .. } => *code,
            PeerError::NotMember { .. } => Some(ErrorCode::NotMember),
            _ => None,
        }
    }
}

/// What comes out of the peer links.
#[derive(Debug)]
pub enum PeerEvent {
    /// An authenticated link to `peer` is up (first time or after a reconnect).
    Up {
        /// The peer.
        peer: UserName,
        /// Fingerprint of its (pinned) identity key.
        key_fingerprint: String,
    },
    /// The link to `peer` went down; the supervisor is reconnecting.
    Down {
        /// The peer.
        peer: UserName,
        /// Why.
        reason: String,
    },
    /// A message from `peer`.
    Message {
        /// The sender.
        peer: UserName,
        /// The lane it came on.
        lane: Lane,
        /// The payload, as the sender passed it to [`Peers::send`].
        payload: Bytes,
    },
    /// A request about one of our groups from a member of it (non-members were
    /// already refused with `ENOTMEMBER`). Answer it with `reply`.
    Request {
        /// The requester.
        peer: UserName,
        /// Our group.
        group: GroupName,
        /// The request.
        payload: Bytes,
        /// Where the answer goes.
        reply: Responder,
    },
    /// `peer` presented an identity key that differs from the pinned one. The link
    /// was refused; an administrator must check and remove the pin to accept it.
    KeyChanged {
        /// The peer.
        peer: UserName,
        /// Fingerprint of the pinned key.
        pinned: String,
        /// Fingerprint of the presented key.
        presented: String,
    },
}

/// Answers one [`PeerEvent::Request`]. Dropping it unanswered lets the requester time out.
#[derive(Debug)]
pub struct Responder {
    id: u64,
    link: Weak<link::Shared>,
}

impl std::fmt::Debug for link::Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link")
    }
}

impl Responder {
    /// Sends the answer.
    pub async fn respond(self, payload: &[u8]) -> Result<(), PeerError> {
        self.finish(ResponseStatus::Ok, payload).await
    }

    /// Answers that the request could not be served, with a reason.
    pub async fn fail(self, reason: &str) -> Result<(), PeerError> {
        self.finish(ResponseStatus::Failed, reason.as_bytes()).await
    }

    async fn finish(self, status: ResponseStatus, payload: &[u8]) -> Result<(), PeerError> {
        let Some(link) = self.link.upgrade() else {
            return Err(PeerError::Stopped);
        };
        link.respond(self.id, status, payload)
            .await
            .map_err(|e| PeerError::LinkLost {
                peer: link.peer().clone(),
                reason: e.to_string(),
            })
    }
}

/// The owner's side of `ENOTMEMBER`: whether `peer` is a member of our `group`.
/// Injected by the sync layer, which owns group semantics.
pub trait Membership: Send + Sync + 'static {
    /// Whether `peer` may make requests about our `group`.
    fn is_member(&self, group: &GroupName, peer: &UserName) -> bool;
}

impl<F> Membership for F
where
    F: Fn(&GroupName, &UserName) -> bool + Send + Sync + 'static,
{
    fn is_member(&self, group: &GroupName, peer: &UserName) -> bool {
        self(group, peer)
    }
}

/// A boxed future, for the object-safe [`Signaling`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the peer link needs from the signaling server: relay a setup message, look up
/// a user's registered identity key, watch presence. [`SignalClient`] implements it;
/// tests wrap it to play a compromised server.
pub trait Signaling: Send + Sync + 'static {
    /// Relays `payload` to `to`.
    fn send(
        &self,
        to: &UserName,
        payload: serde_json::Value,
    ) -> BoxFuture<'_, Result<(), ClientError>>;
    /// The identity key `user` registered with the server.
    fn identity_key(
        &self,
        user: &UserName,
    ) -> BoxFuture<'_, Result<Option<IdentityKey>, ClientError>>;
    /// Watches `user`'s presence from now on.
    fn watch(&self, user: &UserName) -> BoxFuture<'_, Result<(), ClientError>>;
    /// The STUN/TURN servers the signaling server hands out, with current
    /// credentials.
    fn ice_servers(&self) -> Vec<crate::signal::ice::IceServer> {
        Vec::new()
    }
}

impl Signaling for SignalClient {
    fn send(
        &self,
        to: &UserName,
        payload: serde_json::Value,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let to = to.clone();
        Box::pin(async move { SignalClient::send(self, &to, payload).await })
    }

    fn identity_key(
        &self,
        user: &UserName,
    ) -> BoxFuture<'_, Result<Option<IdentityKey>, ClientError>> {
        let user = user.clone();
        Box::pin(async move { SignalClient::identity_key(self, &user).await })
    }

    fn watch(&self, user: &UserName) -> BoxFuture<'_, Result<(), ClientError>> {
        let user = user.clone();
        Box::pin(async move { SignalClient::watch(self, [user]).await })
    }

    fn ice_servers(&self) -> Vec<crate::signal::ice::IceServer> {
        self.status().borrow().ice_servers.clone()
    }
}

/// How the peer links run.
#[derive(Clone)]
pub struct PeersConfig {
    /// Our account.
    pub me: UserName,
    /// Our identity key (`signal::identity::load_or_create`).
    pub identity: SigningKey,
    /// STUN/TURN server URLs from `brume.conf`; TURN credentials as
    /// `turn:USER:PASSWORD@host:port`. Empty: host candidates only.
    pub ice_servers: Vec<String>,
    /// Relayed candidates only: peers never learn our addresses.
    pub relay_only: bool,
    /// How a `turns:` server's certificate is checked (`None`: the system's roots).
    pub turn_tls: Option<Arc<rustls::ClientConfig>>,
    /// Local UDP addresses to gather host candidates on. A wildcard binds every
    /// interface except loopback; tests use `127.0.0.1:0`.
    pub udp_addrs: Vec<String>,
    /// Longest wait for one connection attempt (ICE, DTLS, SCTP and handshake).
    pub setup_timeout: Duration,
    /// Longest wait in [`Peers::send`] and [`Peers::request`] for a link to come up.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl std::fmt::Debug for PeersConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeersConfig")
            .field("me", &self.me)
            .field("ice_servers", &self.ice_servers)
            .field("udp_addrs", &self.udp_addrs)
            .finish_non_exhaustive()
    }
}

impl PeersConfig {
    /// The configuration for a `brume.conf` and an identity key.
    pub fn new(config: &Config, identity: SigningKey) -> Self {
        Self {
            me: config.username.clone(),
            identity,
            ice_servers: config.ice_servers.clone(),
            relay_only: config.ice_policy == crate::config::IcePolicy::Relay,
            // The same roots as the signaling server's; a bad `server_ca` is
            // reported there.
            turn_tls: crate::signal::tls::client_config(config.server_ca.as_deref()).ok(),
            udp_addrs: config.udp_addrs.iter().map(|a| a.to_string()).collect(),
            setup_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// State of the link to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Setting up a connection.
    Connecting,
    /// Authenticated and usable.
    Up,
    /// Waiting before the next attempt.
    Backoff,
    /// The peer's identity key changed: refused until the pin is removed.
    Refused,
    /// Not wanted (never asked for, or [`Peers::disconnect`]ed).
    Idle,
}

/// A problem with a peer, as `brume status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerProblem {
    /// Its code (`ENODEST`, `ENOTMEMBER`, …), if it has one.
    pub code: Option<ErrorCode>,
    /// What happened, in words.
    pub message: String,
    /// When, in Unix seconds.
    pub at_unix: u64,
}

/// One peer's link, for `brume status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    /// Link state.
    pub state: PeerState,
    /// The last problem, kept after recovery so it can be shown.
    pub last_error: Option<PeerProblem>,
    /// Bytes sent to this peer (frames, all links so far).
    pub bytes_sent: u64,
    /// Bytes received from it.
    pub bytes_received: u64,
    /// Fingerprint of its pinned identity key, once authenticated.
    pub key_fingerprint: Option<String>,
    /// Set while a changed key is being refused: (pinned, presented) fingerprints.
    pub key_changed: Option<(String, String)>,
    /// Links established so far.
    pub connects: u64,
    /// The current link's path: the local candidate type of its selected pair
    /// (`host`, `srflx`, `prflx` or `relay`).
    pub path: Option<String>,
    /// For a relayed link, the TURN server it goes through (`HOST:PORT`, with
    /// ` (TCP)` or ` (TLS)` when reached over one).
    pub relay: Option<String>,
}

impl PeerStatus {
    pub(crate) fn new() -> Self {
        Self {
            state: PeerState::Idle,
            last_error: None,
            bytes_sent: 0,
            bytes_received: 0,
            key_fingerprint: None,
            key_changed: None,
            connects: 0,
            path: None,
            relay: None,
        }
    }
}

/// The fingerprint of an identity key for out-of-band comparison: BLAKE3 of the key,
/// first 16 bytes, as eight groups of four hex digits.
pub fn key_fingerprint(key: &[u8; 32]) -> String {
    let hash = blake3::hash(key);
    hash.as_bytes()[..16]
        .chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One peer's supervisor, as [`Peers`] holds it.
struct Slot {
    /// To the supervisor. Bounded; see [`INPUT_QUEUE`].
    inputs: mpsc::Sender<Input>,
    /// The current link, published by the supervisor.
    link: watch::Receiver<Option<Arc<link::Link>>>,
    counters: Arc<link::Counters>,
    /// The supervisor task; aborted when [`Peers`] is dropped.
    task: JoinHandle<()>,
}

/// State shared by [`Peers`] handles and the router task.
struct Inner {
    config: PeersConfig,
    signal: Arc<dyn Signaling>,
    catalog: Catalog,
    membership: Arc<dyn Membership>,
    events: mpsc::Sender<PeerEvent>,
    /// One supervisor per peer, created on first use. A plain mutex: held for map
    /// operations only, never across an await.
    slots: Mutex<HashMap<UserName, Slot>>,
    /// Per-peer status for `brume status`; supervisors write their entry.
    status: watch::Sender<BTreeMap<UserName, PeerStatus>>,
    /// Each TURN server's state, for `brume status`.
    relays: turn_check::Relays,
}

/// The peer links of one client. Cheap to clone; the links close when the last
/// handle is dropped or [`shutdown`](Peers::shutdown) is called.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
    /// The router task (signaling events to supervisors); aborted on drop.
    router: Arc<AbortOnDrop>,
    /// The task that checks the TURN servers; aborted on drop.
    _relay_check: Arc<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let slots = self.slots.get_mut().unwrap_or_else(|e| e.into_inner());
        for slot in slots.values() {
            slot.task.abort();
        }
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("me", &self.inner.config.me)
            .finish_non_exhaustive()
    }
}

/// Locks `m` even if a holder panicked: the module's mutexes guard maps, lists
/// and counters that no panic can leave half-changed, and are never held across
/// an await.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Peers {
    /// Starts the peer links on the current tokio runtime. `signal_events` is the
    /// receiver [`crate::signal::client::connect`] returned; `catalog` holds the
    /// pinned keys; `membership` answers for our groups. Returns the handle and the
    /// receiver of what arrives (drain it: when it is full, links stop reading).
    pub fn start(
        config: PeersConfig,
        signal: Arc<dyn Signaling>,
        signal_events: mpsc::Receiver<SignalEvent>,
        catalog: Catalog,
        membership: Arc<dyn Membership>,
    ) -> (Peers, mpsc::Receiver<PeerEvent>) {
        let (events, event_rx) = mpsc::channel(EVENT_QUEUE);
        let (status, _) = watch::channel(BTreeMap::new());
        let span = info_span!("peers", me = %config.me);
        let inner = Arc::new(Inner {
            config,
            signal,
            catalog,
            membership,
            events,
            slots: Mutex::new(HashMap::new()),
            status,
            relays: turn_check::Relays::default(),
        });
        // The router: hands signaling events to the supervisors. Holds a weak
        // reference so that dropping every `Peers` handle stops everything.
        let router =
            tokio::spawn(route(Arc::downgrade(&inner), signal_events).instrument(span.clone()));
        let weak = Arc::downgrade(&inner);
        let servers = move || {
            let inner = weak.upgrade()?;
            let configured = supervisor::ice_servers(&inner.config.ice_servers);
            Some(turn_check::turn_servers(&link::all_ice_servers(
                &configured,
                &*inner.signal,
            )))
        };
        let relay_check = tokio::spawn(
            turn_check::watch(servers, inner.config.turn_tls.clone(), inner.relays.clone())
                .instrument(span),
        );
        (
            Peers {
                inner,
                router: Arc::new(AbortOnDrop(router)),
                _relay_check: Arc::new(AbortOnDrop(relay_check)),
            },
            event_rx,
        )
    }

    /// Our own identity key's fingerprint.
    pub fn my_fingerprint(&self) -> String {
        key_fingerprint(&self.inner.config.identity.verifying_key().to_bytes())
    }

    /// Keeps a link to `peer` up from now on (reconnecting after failures) and waits,
    /// at most `connect_timeout`, until it is up.
    pub async fn connect(&self, peer: &UserName) -> Result<(), PeerError> {
        self.link(peer).await.map(drop)
    }

    /// Stops keeping a link to `peer` and closes it.
    pub async fn disconnect(&self, peer: &UserName) {
        let inputs = lock(&self.inner.slots).get(peer).map(|s| s.inputs.clone());
        if let Some(inputs) = inputs {
            let _ = inputs.send(Input::Forget).await;
        }
    }

    /// Sends `payload` to `peer` on `lane`, connecting first if needed (bounded by
    /// `connect_timeout`), and waiting while the lane's send buffer is full.
    pub async fn send(&self, peer: &UserName, lane: Lane, payload: &[u8]) -> Result<(), PeerError> {
        if payload.len() > wire::MAX_MESSAGE {
            return Err(PeerError::TooBig {
                len: payload.len(),
                limit: wire::MAX_MESSAGE,
            });
        }
        let link = self.link(peer).await?;
        link.send(lane, payload)
            .await
            .map_err(|e| PeerError::LinkLost {
                peer: peer.clone(),
                reason: e.to_string(),
            })
    }

    /// Sends `payload` to `peer` on `lane` if a link to it is up now; never
    /// waits for one to be set up (`ENODEST` at once otherwise).
    pub async fn send_if_linked(
        &self,
        peer: &UserName,
        lane: Lane,
        payload: &[u8],
    ) -> Result<(), PeerError> {
        let link = {
            let slots = lock(&self.inner.slots);
            slots
                .get(peer)
                .and_then(|slot| slot.link.borrow().clone())
                .filter(|l| !l.is_dead())
        };
        let Some(link) = link else {
            return Err(PeerError::Unreachable {
                peer: peer.clone(),
                code: Some(ErrorCode::NoDest),
                reason: "no link to it is up".into(),
            });
        };
        if payload.len() > wire::MAX_MESSAGE {
            return Err(PeerError::TooBig {
                len: payload.len(),
                limit: wire::MAX_MESSAGE,
            });
        }
        link.send(lane, payload)
            .await
            .map_err(|e| PeerError::LinkLost {
                peer: peer.clone(),
                reason: e.to_string(),
            })
    }

    /// Asks `owner` about its `group` on the interactive lane and waits at most
    /// `wait` for the answer. A non-member gets [`PeerError::NotMember`], which is also
    /// recorded in the peer's status.
    pub async fn request(
        &self,
        owner: &UserName,
        group: &GroupName,
        payload: &[u8],
        wait: Duration,
    ) -> Result<Bytes, PeerError> {
        if payload.len() > wire::MAX_MESSAGE {
            return Err(PeerError::TooBig {
                len: payload.len(),
                limit: wire::MAX_MESSAGE,
            });
        }
        let link = self.link(owner).await?;
        let answer = link
            .request(group, payload, wait)
            .await
            .map_err(|e| PeerError::LinkLost {
                peer: owner.clone(),
                reason: e.to_string(),
            })?;
        match answer {
            None => Err(PeerError::Timeout {
                peer: owner.clone(),
                after: wait,
            }),
            Some((ResponseStatus::Ok, payload)) => Ok(payload),
            Some((ResponseStatus::NotMember, _)) => {
                let err = PeerError::NotMember {
                    peer: owner.clone(),
                    group: group.clone(),
                };
                supervisor::record(
                    &self.inner.status,
                    owner,
                    Some(ErrorCode::NotMember),
                    &err.to_string(),
                );
                Err(err)
            }
            Some((ResponseStatus::Failed, reason)) => Err(PeerError::RequestFailed {
                peer: owner.clone(),
                group: group.clone(),
                reason: String::from_utf8_lossy(&reason).into_owned(),
            }),
        }
    }

    /// Each TURN server's state, by `HOST:PORT` (with ` (TCP)` or ` (TLS)` for
    /// one reached over a stream).
    pub fn relay_status(&self) -> BTreeMap<String, RelayStatus> {
        lock(&self.inner.relays).clone()
    }

    /// Every known peer's status, with current byte counters.
    pub fn status(&self) -> BTreeMap<UserName, PeerStatus> {
        let mut map = self.inner.status.borrow().clone();
        for (peer, slot) in lock(&self.inner.slots).iter() {
            if let Some(s) = map.get_mut(peer) {
                s.bytes_sent = slot
                    .counters
                    .sent
                    .load(std::sync::atomic::Ordering::Relaxed);
                s.bytes_received = slot
                    .counters
                    .received
                    .load(std::sync::atomic::Ordering::Relaxed);
            }
        }
        map
    }

    /// A watch of every peer's status that wakes on state changes (its byte counters
    /// are as of the last change; [`status`](Self::status) has current ones).
    pub fn watch_status(&self) -> watch::Receiver<BTreeMap<UserName, PeerStatus>> {
        self.inner.status.subscribe()
    }

    /// Closes every link and stops every supervisor.
    pub async fn shutdown(self) {
        self.router.0.abort();
        let slots: Vec<Slot> = lock(&self.inner.slots).drain().map(|(_, s)| s).collect();
        for slot in slots {
            slot.task.abort();
            let _ = slot.task.await;
            let link = slot.link.borrow().clone();
            if let Some(link) = link {
                link.close().await;
            }
        }
    }

    /// The live link to `peer`, waiting for one (bounded) and asking for it first.
    async fn link(&self, peer: &UserName) -> Result<Arc<link::Link>, PeerError> {
        if *peer == self.inner.config.me {
            return Err(PeerError::Myself { peer: peer.clone() });
        }
        let (mut watch, inputs) = {
            let mut slots = lock(&self.inner.slots);
            let slot = slot(&self.inner, &mut slots, peer);
            (slot.link.clone(), slot.inputs.clone())
        };
        if let Some(link) = watch.borrow().as_ref().filter(|l| !l.is_dead()) {
            return Ok(link.clone());
        }
        inputs
            .send(Input::Want)
            .await
            .map_err(|_| PeerError::Stopped)?;
        let wait = self.inner.config.connect_timeout;
        let got = tokio::time::timeout(wait, async {
            loop {
                if let Some(link) = watch.borrow_and_update().as_ref().filter(|l| !l.is_dead()) {
                    return Ok(link.clone());
                }
                if watch.changed().await.is_err() {
                    return Err(PeerError::Stopped);
                }
            }
        })
        .await;
        match got {
            Ok(result) => result,
            Err(_) => {
                let status = self.inner.status.borrow().get(peer).cloned();
                Err(match status {
                    Some(PeerStatus {
                        key_changed: Some((pinned, presented)),
                        ..
                    }) => PeerError::KeyChanged {
                        peer: peer.clone(),
                        pinned,
                        presented,
                    },
                    Some(PeerStatus {
                        last_error: Some(problem),
                        ..
                    }) => PeerError::Unreachable {
                        peer: peer.clone(),
                        code: problem.code,
                        reason: problem.message,
                    },
                    _ => PeerError::Unreachable {
                        peer: peer.clone(),
                        code: None,
                        reason: format!("no link within {wait:?}"),
                    },
                })
            }
        }
    }
}

/// The slot of `peer`, creating it (and spawning its supervisor) on first use.
fn slot<'a>(
    inner: &Arc<Inner>,
    slots: &'a mut HashMap<UserName, Slot>,
    peer: &UserName,
) -> &'a Slot {
    slots.entry(peer.clone()).or_insert_with(|| {
        let (inputs, input_rx) = mpsc::channel(INPUT_QUEUE);
        let (link_tx, link) = watch::channel(None);
        let counters = Arc::new(link::Counters::default());
        inner.status.send_modify(|m| {
            m.entry(peer.clone()).or_insert_with(PeerStatus::new);
        });
        let span = info_span!("peer", peer = %peer);
        let supervisor = Supervisor::new(
            link::LinkParams {
                me: inner.config.me.clone(),
                peer: peer.clone(),
                identity: inner.config.identity.clone(),
                ice_servers: supervisor::ice_servers(&inner.config.ice_servers),
                relay_only: inner.config.relay_only,
                turn_tls: inner.config.turn_tls.clone(),
                udp_addrs: inner.config.udp_addrs.clone(),
                setup_timeout: inner.config.setup_timeout,
                signal: inner.signal.clone(),
                events: inner.events.clone(),
                membership: inner.membership.clone(),
                counters: counters.clone(),
            },
            &inner.config,
            inner.catalog.clone(),
            input_rx,
            link_tx,
            inner.status.clone(),
        );
        // The peer's supervisor: owns its link for the life of `Peers`; aborted when
        // `Peers` is dropped or shut down.
        let task = tokio::spawn(supervisor.run().instrument(span));
        Slot {
            inputs,
            link,
            counters,
            task,
        }
    })
}

/// Routes signaling events to the supervisors until the signaling client stops or
/// every [`Peers`] handle is gone.
async fn route(inner: Weak<Inner>, mut events: mpsc::Receiver<SignalEvent>) {
    while let Some(event) = events.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let (user, input) = match event {
            SignalEvent::Message { from, payload } => match SignalMessage::from_payload(&payload) {
                Some(msg) => (from, Input::Signal(msg)),
                None => continue,
            },
            SignalEvent::Presence { user, online } => (user, Input::Presence { online }),
            SignalEvent::Undeliverable { to, code, message } => {
                (to, Input::Undeliverable { code, message })
            }
        };
        if user == inner.config.me {
            continue;
        }
        let inputs = {
            let mut slots = lock(&inner.slots);
            // Only setup messages create a supervisor: presence alone does not.
            if matches!(input, Input::Signal(_)) {
                Some(slot(&inner, &mut slots, &user).inputs.clone())
            } else {
                slots.get(&user).map(|s| s.inputs.clone())
            }
        };
        if let Some(inputs) = inputs
            && inputs.try_send(input).is_err()
        {
            debug!(peer = %user, "supervisor busy: setup message dropped");
        }
    }
}
