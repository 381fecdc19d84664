//! One authenticated WebRTC connection to one peer: setup through the signaling server
//! (offer/answer/trickle ICE), three data channels (control, interactive, bulk) that the
//! offerer opens in-band, the [`handshake`](super::handshake) over the control channel,
//! then framed messages in both directions with send-buffer backpressure.
//!
//! The channels are opened in-band (DCEP), not pre-negotiated: with pre-negotiated
//! channels, webrtc 0.21 drops the first message of a channel when it arrives in the same
//! read as the SCTP handshake's completion (before the receiving side has opened its end),
//! which lost the first `Hello` of most first attempts. A DCEP `OPEN` is accepted however
//! early it arrives, and the opener sends nothing before the peer's `ACK`.
//!
//! A [`Link`] is owned by its peer's supervisor (`super::supervisor`); senders borrow
//! it through an `Arc`. Dropping the last `Arc` closes the connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tracing::{Instrument, debug, info_span, warn};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidate, RTCIceCandidateInit, RTCIceCandidateType, RTCIceConnectionState, RTCIceServer,
    RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};

use super::handshake::{self, Party, Role};
use super::turn_tcp::{Bridge, TurnUrl};
use super::udp;
use super::wire::{self, Assembler, Frame, Inbound, Outbound, ResponseStatus};
use super::{Lane, Membership, PeerEvent, Responder, Signaling, lock};
use crate::ids::{GroupName, UserName};

/// The `kind` of every signaling payload of the peer link.
pub(crate) const SIGNAL_KIND: &str = "brume-peer/1";

/// Bytes one data channel may have handed to SCTP but not yet acknowledged; `send`
/// waits beyond this. This is what bounds the sender's memory.
const SEND_BUFFER_LIMIT: usize = 8 << 20;
/// Handshake frames queued between the control channel's reader and the handshake.
const HANDSHAKE_QUEUE: usize = 4;
/// Channels the peer may open: one per lane. More are refused.
const CHANNELS: usize = Lane::ALL.len();
/// From ICE's connection until the channels are all open, how often the connection's
/// driver is woken (see [`wake_driver`]).
const SETUP_WAKE_INTERVAL: Duration = Duration::from_millis(2);

/// A connection-setup message, relayed by the signaling server as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum SignalMessage {
    /// From the side that does not dial: "please dial me".
    Call,
    /// The dialer's offer for session `sid`.
    Offer {
        /// Session id, fresh per attempt.
        sid: u64,
        /// The SDP.
        sdp: String,
    },
    /// The answer for session `sid`.
    Answer {
        /// Session id.
        sid: u64,
        /// The SDP.
        sdp: String,
    },
    /// A trickled ICE candidate for session `sid`.
    Candidate {
        /// Session id.
        sid: u64,
        /// The candidate.
        candidate: RTCIceCandidateInit,
    },
}

impl SignalMessage {
    /// The JSON payload the signaling client relays.
    pub(crate) fn to_payload(&self) -> serde_json::Value {
        serde_json::json!({ "kind": SIGNAL_KIND, "msg": self })
    }

    /// Reads a relayed payload; `None` if it is not ours or malformed.
    pub(crate) fn from_payload(payload: &serde_json::Value) -> Option<Self> {
        if payload.get("kind")?.as_str()? != SIGNAL_KIND {
            return None;
        }
        serde_json::from_value(payload.get("msg")?.clone()).ok()
    }
}

/// What a peer's supervisor receives: setup messages and presence from the router,
/// wishes from [`Peers`](super::Peers) handles.
#[derive(Debug)]
pub(crate) enum Input {
    /// A setup message from the peer.
    Signal(SignalMessage),
    /// The peer came online or went away.
    Presence { online: bool },
    /// A setup message to the peer could not be delivered.
    Undeliverable {
        code: crate::signal::ErrorCode,
        message: String,
    },
    /// Someone wants a link to the peer.
    Want,
    /// Nobody wants it any more.
    Forget,
}

/// Errors of one link.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum LinkError {
    /// WebRTC refused an operation.
    #[error("webrtc {step}: {reason}")]
    WebRtc {
        /// What was being done.
        step: &'static str,
        /// What it said.
        reason: String,
    },
    /// The signaling server could not carry a setup message.
    #[error("signaling: {reason}")]
    Signal {
        /// Why.
        reason: String,
    },
    /// Setup or handshake took too long.
    #[error("no connection within {after:?} ({stage})")]
    Timeout {
        /// The limit.
        after: Duration,
        /// How far it got.
        stage: &'static str,
    },
    /// The connection failed or closed.
    #[error("connection {state}")]
    Closed {
        /// Its last state.
        state: String,
    },
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Wire(#[from] wire::WireError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] handshake::HandshakeError),
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks protocol version {theirs}, we speak {ours}: the older side must upgrade Brume"
    )]
    Version {
        /// Theirs.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The peer claims another name than the one we are connecting to.
    #[error("peer calls itself {claimed:?}")]
    WrongUser {
        /// Its claim.
        claimed: String,
    },
    /// The key check refused the peer's identity key.
    #[error("{reason}")]
    KeyRefused {
        /// Why (changed key, unknown to the server, …).
        reason: String,
        /// The pinned key, if a different one is pinned.
        pinned: Option<[u8; 32]>,
        /// The key the peer presented.
        presented: [u8; 32],
    },
    /// The peer refused us.
    #[error("refused by the peer: {reason}")]
    RefusedByPeer {
        /// Its reason.
        reason: String,
    },
    /// The peer opened a data channel that is not one of the lanes', or a lane's twice,
    /// or an unordered or unreliable one.
    #[error("unexpected data channel {label:?} from the peer (ordered and reliable: {reliable})")]
    BadChannel {
        /// Its label.
        label: String,
        /// Whether it was ordered and reliable.
        reliable: bool,
    },
    /// A newer offer from the peer, or a local `disconnect`, replaced this attempt.
    #[error("superseded")]
    Superseded,
    /// The server could not deliver a setup message (`ENODEST`, `EBADDEST`).
    #[error("{}: {message}", code.name())]
    Undeliverable {
        /// The code.
        code: crate::signal::ErrorCode,
        /// The server's words.
        message: String,
    },
}

/// Everything a link needs to be set up.
#[derive(Clone)]
pub(crate) struct LinkParams {
    pub(crate) me: UserName,
    pub(crate) peer: UserName,
    pub(crate) identity: SigningKey,
    /// ICE servers from `brume.conf` (the signaling server's are added at each
    /// link's setup, with their current credentials).
    pub(crate) ice_servers: Vec<RTCIceServer>,
    /// Relayed candidates only (`ice_policy = "relay"`).
    pub(crate) relay_only: bool,
    /// How a `turns:` server's certificate is checked.
    pub(crate) turn_tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) udp_addrs: Vec<String>,
    pub(crate) setup_timeout: Duration,
    pub(crate) signal: Arc<dyn Signaling>,
    pub(crate) events: mpsc::Sender<PeerEvent>,
    pub(crate) membership: Arc<dyn Membership>,
    pub(crate) counters: Arc<Counters>,
}

/// Byte counters of one peer, across its links.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
}

/// The key check the supervisor supplies: pins on first contact, refuses changes.
pub(crate) type KeyCheck<'a> =
    &'a (dyn Fn([u8; 32]) -> super::BoxFuture<'static, Result<(), LinkError>> + Send + Sync);

/// Forwards the connection's events to the link: trickled candidates to the peer
/// through the signaling server, state changes to a watch, channels the peer opened to
/// the setup.
struct Handler {
    /// Weak: the connection's driver may outlive the link briefly, and must not keep
    /// the signaling client (and its server session) alive.
    signal: std::sync::Weak<dyn Signaling>,
    peer: UserName,
    sid: u64,
    state: watch::Sender<RTCPeerConnectionState>,
    /// Fired when ICE connects, so the setup wakes the driver (see [`wake_driver`]).
    ice_connected: Arc<tokio::sync::Notify>,
    /// To the answering side's setup, which waits for the offerer's channels. Bounded to
    /// one per lane; `None` on the offering side. Once setup is over the receiver is gone
    /// and any further channel the peer opens is closed.
    incoming: Option<mpsc::Sender<Arc<dyn DataChannel>>>,
    /// Our server-reflexive candidates, for the link's path.
    mapped: Mapped,
}

/// Whether the peer could send to a local candidate. With no interface of a
/// family (IPv6 disabled, say), a wildcard socket is bound as it is and offered as
/// `::` or `0.0.0.0`: the peer's checks to it could only fail, each logged as an
/// error on both sides.
fn dialable(candidate: &RTCIceCandidate) -> bool {
    candidate
        .address
        .parse::<std::net::IpAddr>()
        .map_or(true, |ip| !ip.is_unspecified())
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if !dialable(&event.candidate) {
            debug!(peer = %self.peer, address = %event.candidate.address, "candidate not offered");
            return;
        }
        let c = &event.candidate;
        if c.typ == RTCIceCandidateType::Srflx {
            lock(&self.mapped).push((
                (c.address.clone(), c.port),
                (c.related_address.clone(), c.related_port),
            ));
        }
        match event.candidate.to_json() {
            Ok(candidate) => {
                debug!(peer = %self.peer, candidate = %candidate.candidate, "local candidate");
                let msg = SignalMessage::Candidate {
                    sid: self.sid,
                    candidate,
                };
                let Some(signal) = self.signal.upgrade() else {
                    return;
                };
                if let Err(err) = signal.send(&self.peer, msg.to_payload()).await {
                    debug!(peer = %self.peer, cause = %err, "candidate not sent");
                }
            }
            Err(err) => debug!(peer = %self.peer, cause = %err, "unusable local candidate"),
        }
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        let refused = match &self.incoming {
            Some(tx) => tx.try_send(channel).err().map(|e| match e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
            }),
            None => Some(channel),
        };
        if let Some(channel) = refused {
            debug!(peer = %self.peer, id = channel.id(), "data channel opened by the peer refused");
            let _ = channel.close().await;
        }
    }

    async fn on_ice_connection_state_change(&self, state: RTCIceConnectionState) {
        if state == RTCIceConnectionState::Connected {
            self.ice_connected.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }
}

/// One lane's sending half: its channel and the lock that keeps one message's frames
/// together (frames of two messages must not interleave on a channel).
struct LaneTx {
    channel: Arc<dyn DataChannel>,
    /// Held for the whole of one message's frames.
    lock: tokio::sync::Mutex<()>,
}

/// State shared by the link handle, its reader tasks and responders.
pub(crate) struct Shared {
    peer: UserName,
    lanes: [LaneTx; 3],
    /// Requests awaiting their response, by id. A plain mutex: held for map operations only.
    pending: Mutex<HashMap<u64, oneshot::Sender<(ResponseStatus, Bytes)>>>,
    next_request: AtomicU64,
    counters: Arc<Counters>,
    /// Why the link died; `None` while it lives. Written by whichever task notices first.
    dead: watch::Sender<Option<String>>,
    /// Set once both sides are authenticated.
    authed: watch::Sender<bool>,
    /// Set once the link is the one sends to the peer go on; readers deliver no
    /// application message before, so that whatever answers a message goes on
    /// the link it came in on, not on the one this link replaces.
    live: watch::Sender<bool>,
    closing: AtomicBool,
    /// Announced after each frame sent: see [`flush_relayed`].
    flush: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
}

impl Shared {
    fn die(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.dead.send_if_modified(|d| {
            if d.is_none() {
                *d = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Sends one application message on `lane`, waiting while the channel's send
    /// buffer is full.
    pub(crate) async fn send(
        &self,
        lane: Lane,
        kind: &Outbound<'_>,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        let frames = wire::encode(kind, payload)?;
        let tx = &self.lanes[lane.index()];
        let _whole_message = tx.lock.lock().await;
        // A send waiting for room in a dead link's buffer fails at once: a link
        // being replaced is declared dead before its connection is closed, and
        // the tasks sending on it hold what others wait for.
        let mut dead = self.dead.subscribe();
        for frame in frames {
            let n = frame.len() as u64;
            let sent = tokio::select! {
                biased;
                r = tx.channel.send(frame) => r.map_err(|e| format!("send failed: {e}")),
                _ = dead.wait_for(Option::is_some) => Err("link closed".to_owned()),
            };
            sent.map_err(|state| {
                let err = LinkError::Closed { state };
                self.die(err.to_string());
                err
            })?;
            self.counters.sent.fetch_add(n, Ordering::Relaxed);
            if let Some(flush) = self.flush.get() {
                flush.notify_one();
            }
        }
        Ok(())
    }

    /// Sends a response to request `id`.
    pub(crate) async fn respond(
        &self,
        id: u64,
        status: ResponseStatus,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        self.send(
            Lane::Interactive,
            &Outbound::Response { id, status },
            payload,
        )
        .await
    }
}

/// An established, authenticated link.
pub(crate) struct Link {
    pub(crate) sid: u64,
    /// The peer's authenticated identity key.
    pub(crate) peer_key: [u8; 32],
    pub(crate) shared: Arc<Shared>,
    pc: Arc<dyn PeerConnection>,
    dead: watch::Receiver<Option<String>>,
    /// The reader tasks, one per channel; aborted when the link is dropped.
    readers: Vec<JoinHandle<()>>,
    /// What the link's path is told from.
    route: Route,
}

/// Our server-reflexive candidates: (address, port) as the STUN server saw them,
/// and their base (address, port).
type Mapped = Arc<Mutex<Vec<((String, u16), (String, u16))>>>;

/// What a link keeps to tell its path, and the bridges it goes through.
#[derive(Default)]
struct Route {
    /// Bridges to TURN servers reached over TCP or TLS, each with its server;
    /// closed with the link.
    bridges: Vec<(TurnUrl, Bridge)>,
    /// The TURN servers the stack reaches over UDP itself, to name the one a
    /// link relays through.
    turn_servers: Vec<TurnUrl>,
    /// Our server-reflexive candidates.
    mapped: Mapped,
    /// Announced for each datagram the connection's sockets receive and each
    /// message sent: see [`flush_relayed`].
    received: Option<Arc<tokio::sync::Notify>>,
    /// Paces what the connection sends to relays.
    pacer: Option<Arc<udp::Pacer>>,
}

impl Link {
    /// Sends one application message.
    pub(crate) async fn send(&self, lane: Lane, payload: &[u8]) -> Result<(), LinkError> {
        self.shared.send(lane, &Outbound::Message, payload).await
    }

    /// Sends a request and waits for its response.
    pub(crate) async fn request(
        &self,
        group: &GroupName,
        payload: &[u8],
        wait: Duration,
    ) -> Result<Option<(ResponseStatus, Bytes)>, LinkError> {
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, tx);
        let sent = self
            .shared
            .send(Lane::Interactive, &Outbound::Request { id, group }, payload)
            .await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(wait, rx).await,
            Err(err) => {
                lock(&self.shared.pending).remove(&id);
                return Err(err);
            }
        };
        lock(&self.shared.pending).remove(&id);
        match answer {
            Ok(Ok(answer)) => Ok(Some(answer)),
            Ok(Err(_)) => Err(LinkError::Closed {
                state: "closed before the response".into(),
            }),
            Err(_) => Ok(None),
        }
    }

    /// Resolves when the link has died, with the reason.
    pub(crate) async fn died(&self) -> String {
        let mut dead = self.dead.clone();
        match dead.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "link gone".into(),
        }
    }

    /// Whether the link has died.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.borrow().is_some()
    }

    /// Starts delivering the peer's messages: called once sends to the peer go
    /// on this link.
    pub(crate) fn go_live(&self) {
        self.shared.live.send_replace(true);
    }

    /// The path the link's traffic takes: the type of the local candidate of
    /// the selected pair (`host`, `srflx`, `prflx`, `relay`) and, relayed, the
    /// relay's address; `None` if not known (yet).
    pub(crate) async fn path(&self) -> Option<(String, Option<String>)> {
        let pair = selected_pair(&self.pc).await?;
        let local = pair.local();
        let remote = pair.remote();
        // The stack reports a server-reflexive pair by its base (our host
        // candidate). When we have a mapping of that base (we are behind a NAT) and
        // the peer is not reached at a host address of its own (so our packets cross
        // NATs to reach it), our packets leave through that mapping: in ICE's terms
        // the pair's local candidate is the server-reflexive one.
        let natted = local.typ == RTCIceCandidateType::Host
            && remote.typ != RTCIceCandidateType::Host
            && lock(&self.route.mapped).iter().any(|(addr, base)| {
                *base == (local.address.clone(), local.port) && addr.0 != local.address
            });
        let kind = if natted {
            "srflx".to_owned()
        } else {
            local.typ.to_string()
        };
        // Relayed: the TURN server that allocated the address (through a
        // bridge, the one the candidate was gathered from, the one whose host it
        // is, or the only one), or failing that the address itself.
        let relay = (kind == "relay").then(|| {
            let allocated = local
                .address
                .parse()
                .ok()
                .map(|ip| std::net::SocketAddr::new(ip, local.port));
            let bridged = self
                .route
                .bridges
                .iter()
                .find(|(_, b)| allocated.is_some_and(|a| b.allocated(a)))
                .map(|(t, _)| t);
            let servers = &self.route.turn_servers;
            let gathered_from = local.url.as_deref().and_then(TurnUrl::parse);
            let by_url = gathered_from.and_then(|from| servers.iter().find(|t| **t == from));
            let by_host: Vec<&TurnUrl> =
                servers.iter().filter(|t| t.host == local.address).collect();
            let named = match (bridged.or(by_url), by_host.as_slice(), servers.as_slice()) {
                (Some(t), _, _) => Some(t),
                (None, [t], _) => Some(*t),
                (None, [], [t]) => Some(t),
                _ => None,
            };
            match named {
                Some(t) if t.stream => format!("{} ({})", t.server, t.transport()),
                Some(t) => t.server.clone(),
                None if local.address.contains(':') => {
                    format!("[{}]:{}", local.address, local.port)
                }
                None => format!("{}:{}", local.address, local.port),
            }
        });
        Some((kind, relay))
    }

    /// Closes the connection.
    pub(crate) async fn close(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.die("closed locally");
        let _ = self.pc.close().await;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        self.shared.die("closed locally");
        // The connection's driver task lives until `close`; run it even when the
        // owner forgot, as long as a runtime is there to run it on.
        let pc = self.pc.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // Short-lived: closes the connection and ends.
            rt.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

fn rtc(step: &'static str) -> impl FnOnce(webrtc::error::Error) -> LinkError {
    move |e| LinkError::WebRtc {
        step,
        reason: e.to_string(),
    }
}

/// Builds a peer connection tuned for Brume: host candidates plus the configured
/// STUN/TURN servers, no mDNS, fast ICE checks, SCTP windows as large as the UDP
/// receive buffers hold, bounded send buffers.
async fn build_pc(
    params: &LinkParams,
    sid: u64,
    state: watch::Sender<RTCPeerConnectionState>,
    ice_connected: Arc<tokio::sync::Notify>,
    incoming: Option<mpsc::Sender<Arc<dyn DataChannel>>>,
) -> Result<(Arc<dyn PeerConnection>, Route), LinkError> {
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(50))
        .with_host_acceptance_min_wait(Some(Duration::ZERO))
        // The peer's first check often arrives before its trickled host candidate, so
        // its address is first learned as peer-reflexive: without this, nominating
        // that pair waited out the default second.
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        // Relayed pairs are the only ones with relayed candidates only; otherwise a
        // direct pair gets a second to succeed first.
        .with_relay_acceptance_min_wait(Some(if params.relay_only {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        }))
        .with_ice_timeouts(
            Some(Duration::from_secs(3)),
            Some(Duration::from_secs(6)),
            Some(Duration::from_millis(500)),
        )
        // No larger than the UDP socket can hold: see `super::udp`.
        // Through a relay, no more than its sockets hold (see `udp::relay_window`).
        .with_sctp_max_receive_buffer_size(if params.relay_only {
            udp::relay_window()
        } else {
            udp::receive_window()
        })
        .build();
    let mut ice_servers = all_ice_servers(&params.ice_servers, &*params.signal);
    // TURN over TCP or TLS goes through a bridge of ours (see `super::turn_tcp`).
    let mut bridges = Vec::new();
    let mut turn_servers = Vec::new();
    for server in &mut ice_servers {
        for url in &mut server.urls {
            let Some(turn) = TurnUrl::parse(url) else {
                continue;
            };
            if !turn.stream {
                turn_servers.push(turn);
                continue;
            }
            match Bridge::start(turn.clone(), params.turn_tls.clone()).await {
                Ok(bridge) => {
                    *url = bridge.stand_in();
                    bridges.push((turn, bridge));
                }
                Err(e) => warn!(url = %url, cause = %e, "cannot bridge to the TURN server"),
            }
        }
    }
    let policy = if params.relay_only {
        rtc::peer_connection::configuration::RTCIceTransportPolicy::Relay
    } else {
        rtc::peer_connection::configuration::RTCIceTransportPolicy::All
    };
    let config = RTCConfigurationBuilder::new()
        .with_ice_servers(ice_servers)
        .with_ice_transport_policy(policy)
        .build();
    let mapped = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::new(tokio::sync::Notify::new());
    // What goes to the TURN servers (or to their bridges) is paced.
    let pacer = Arc::new(udp::Pacer::default());
    for t in &turn_servers {
        if let Ok(addrs) = tokio::net::lookup_host(&t.server).await {
            addrs.for_each(|a| pacer.pace(a));
        }
    }
    for (_, bridge) in &bridges {
        pacer.pace(bridge.local);
    }
    let handler = Handler {
        signal: Arc::downgrade(&params.signal),
        peer: params.peer.clone(),
        sid,
        state,
        ice_connected,
        incoming,
        mapped: mapped.clone(),
    };
    let pc = PeerConnectionBuilder::new()
        .with_configuration(config)
        .with_setting_engine(settings)
        .with_handler(Arc::new(handler))
        .with_udp_addrs(params.udp_addrs.clone())
        .with_data_channel_send_buffer_limit(SEND_BUFFER_LIMIT)
        .with_runtime(Arc::new(udp::SizedSockets {
            received: Some(received.clone()),
            pacer: Some(pacer.clone()),
        }))
        .build()
        .await
        .map_err(rtc("build"))?;
    Ok((
        Arc::new(pc),
        Route {
            bridges,
            turn_servers,
            mapped,
            received: Some(received),
            pacer: Some(pacer),
        },
    ))
}

/// The STUN and TURN servers a link uses: `brume.conf`'s, then those the
/// signaling server hands out, with their current credentials.
pub(crate) fn all_ice_servers(
    configured: &[RTCIceServer],
    signal: &dyn Signaling,
) -> Vec<RTCIceServer> {
    let mut servers = configured.to_vec();
    servers.extend(signal.ice_servers().into_iter().map(|s| RTCIceServer {
        urls: s.urls,
        username: s.username.unwrap_or_default(),
        credential: s.credential.unwrap_or_default(),
    }));
    servers
}

/// Wakes the connection's driver so that it sends what it has queued.
///
/// webrtc 0.21's driver sends queued packets before it handles the connection's
/// events, then sleeps until its next timer (ICE's, 200 ms once connected). What an
/// event queues (the DTLS `ClientHello` when ICE connects, the SCTP `INIT` when DTLS
/// completes, the DCEP `OPEN`s when SCTP completes) therefore waits up to 200 ms unless
/// something else wakes the driver; each of those stalls was a fixed part of every
/// setup. Adding a remote ICE candidate does not wake it either, so checks on a
/// trickled candidate could wait a second. Setting the unchanged configuration again
/// wakes it and changes nothing.
async fn wake_driver(pc: &Arc<dyn PeerConnection>) {
    let config = pc.get_configuration().await;
    if let Err(err) = pc.set_configuration(config).await {
        debug!(cause = %err, "cannot wake the connection's driver");
    }
}

/// A link whose three channels exist but are not all open yet, and not authenticated.
struct Wired {
    link: Link,
    /// Handshake frames from the control channel's reader.
    handshake: mpsc::Receiver<HandshakeFrame>,
    /// Resolves `true` once every channel is open, `false` if one closed first.
    all_open: Pin<Box<dyn Future<Output = bool> + Send>>,
}

/// Builds the link around its three channels (in lane order) and starts their readers.
fn wire(
    params: &LinkParams,
    sid: u64,
    pc: &Arc<dyn PeerConnection>,
    channels: [Arc<dyn DataChannel>; CHANNELS],
) -> Wired {
    let (dead_tx, dead) = watch::channel(None);
    let (authed, _) = watch::channel(false);
    let (live, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        peer: params.peer.clone(),
        lanes: channels.clone().map(|channel| LaneTx {
            channel,
            lock: tokio::sync::Mutex::new(()),
        }),
        pending: Mutex::new(HashMap::new()),
        next_request: AtomicU64::new(1),
        counters: params.counters.clone(),
        dead: dead_tx,
        authed,
        live,
        closing: AtomicBool::new(false),
        flush: std::sync::OnceLock::new(),
    });
    // Handshake frames, from the control channel's reader to `establish`.
    let (hs_tx, handshake) = mpsc::channel(HANDSHAKE_QUEUE);
    let mut opened = Vec::with_capacity(CHANNELS);
    let mut readers = Vec::with_capacity(CHANNELS);
    for lane in Lane::ALL {
        // Fired by the reader when its channel is open.
        let (open_tx, open_rx) = oneshot::channel();
        opened.push(open_rx);
        let span = info_span!("peer-reader", peer = %params.peer, lane = lane.label(), sid);
        // One reader per channel, for the life of the link: drains the channel's events
        // (the driver stalls the whole connection if any channel's queue fills) and
        // delivers complete messages. Aborted when the link is dropped.
        readers.push(tokio::spawn(
            Reader {
                lane,
                channel: channels[lane.index()].clone(),
                shared: shared.clone(),
                events: params.events.clone(),
                membership: params.membership.clone(),
                handshake: (lane == Lane::Control).then(|| hs_tx.clone()),
                opened: Some(open_tx),
            }
            .run()
            .instrument(span),
        ));
    }
    let all_open = Box::pin(async move {
        for rx in opened {
            if rx.await.is_err() {
                return false;
            }
        }
        true
    });
    Wired {
        link: Link {
            sid,
            peer_key: [0; 32],
            shared,
            pc: pc.clone(),
            dead,
            readers,
            route: Route::default(),
        },
        handshake,
        all_open,
    }
}

/// Takes a channel the offerer opened into its lane's slot. Only the three lanes'
/// channels, each once, ordered and reliable, are accepted.
async fn accept_channel(
    slots: &mut [Option<Arc<dyn DataChannel>>; CHANNELS],
    channel: Arc<dyn DataChannel>,
) -> Result<(), LinkError> {
    let label = channel.label().await.map_err(rtc("channel label"))?;
    let reliable = channel.ordered().await.unwrap_or(false)
        && channel.max_retransmits().await.ok() == Some(None)
        && channel.max_packet_life_time().await.ok() == Some(None);
    let lane = Lane::ALL.into_iter().find(|l| l.label() == label);
    match lane {
        Some(lane) if reliable && slots[lane.index()].is_none() => {
            slots[lane.index()] = Some(channel);
            Ok(())
        }
        _ => {
            let _ = channel.close().await;
            Err(LinkError::BadChannel { label, reliable })
        }
    }
}

/// Resolves when the wired channels are all open (or one closed); never before the
/// link is wired.
async fn opened(wired: &mut Option<Wired>) -> bool {
    match wired {
        Some(w) => (&mut w.all_open).await,
        None => std::future::pending().await,
    }
}

/// Sets up a link. The dialer passes `offer: None` and sends an offer; the other side
/// passes the offer it received. `inbox` yields the peer's further setup messages;
/// `check_key` decides whether the peer's identity key is acceptable.
pub(crate) async fn establish(
    params: &LinkParams,
    sid: u64,
    offer: Option<String>,
    inbox: &mut mpsc::Receiver<Input>,
    deferred: &mut Option<Input>,
    check_key: KeyCheck<'_>,
) -> Result<Link, LinkError> {
    let role = if offer.is_none() {
        Role::Offerer
    } else {
        Role::Answerer
    };
    let deadline = Instant::now() + params.setup_timeout;
    // The connection's state, from its handler to this setup and then to the watcher
    // that kills the link when the connection fails.
    let (state_tx, mut state) = watch::channel(RTCPeerConnectionState::New);
    // From the handler when ICE connects; this setup then wakes the driver.
    let ice_connected = Arc::new(tokio::sync::Notify::new());
    // The channels the offerer opens, from the connection's handler to this setup.
    let (incoming_tx, mut incoming) = mpsc::channel(CHANNELS);
    let (pc, route) = build_pc(
        params,
        sid,
        state_tx,
        ice_connected.clone(),
        (role == Role::Answerer).then_some(incoming_tx),
    )
    .await?;
    // Close the connection on every early return.
    let guard = CloseOnDrop(Some(pc.clone()));

    // The offerer opens the channels (in-band: see the module's documentation); the
    // answerer receives them once SCTP is up.
    let mut slots: [Option<Arc<dyn DataChannel>>; CHANNELS] = Default::default();
    let mut wired = None;
    if role == Role::Offerer {
        for lane in Lane::ALL {
            let init = RTCDataChannelInit {
                ordered: true,
                ..Default::default()
            };
            slots[lane.index()] = Some(
                pc.create_data_channel(lane.label(), Some(init))
                    .await
                    .map_err(rtc("create data channel"))?,
            );
        }
        if let [Some(c), Some(i), Some(b)] = slots.clone() {
            wired = Some(wire(params, sid, &pc, [c, i, b]));
        }
    }
    let signal = |msg: SignalMessage| {
        let signal = params.signal.clone();
        let peer = params.peer.clone();
        async move {
            signal
                .send(&peer, msg.to_payload())
                .await
                .map_err(|e| LinkError::Signal {
                    reason: e.to_string(),
                })
        }
    };

    // Offer / answer.
    let mut remote_set = false;
    match offer {
        None => {
            let offer = pc.create_offer(None).await.map_err(rtc("create offer"))?;
            let sdp = offer.sdp.clone();
            pc.set_local_description(offer)
                .await
                .map_err(rtc("set local offer"))?;
            signal(SignalMessage::Offer { sid, sdp }).await?;
        }
        Some(sdp) => {
            let offer = RTCSessionDescription::offer(sdp).map_err(rtc("parse offer"))?;
            pc.set_remote_description(offer)
                .await
                .map_err(rtc("set remote offer"))?;
            remote_set = true;
            let answer = pc.create_answer(None).await.map_err(rtc("create answer"))?;
            let sdp = answer.sdp.clone();
            pc.set_local_description(answer)
                .await
                .map_err(rtc("set local answer"))?;
            signal(SignalMessage::Answer { sid, sdp }).await?;
        }
    }

    // Until the three channels are open: apply the peer's answer and candidates, and
    // (answerer) take the channels the offerer opens.
    let timed_out = |stage| LinkError::Timeout {
        after: params.setup_timeout,
        stage,
    };
    // From ICE's connection until the channels are open, the driver is woken often:
    // DTLS and SCTP progress queue packets on events this side cannot observe.
    let mut connected = false;
    let mut wake = tokio::time::interval(SETUP_WAKE_INTERVAL);
    wake.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = ice_connected.notified() => {
                connected = true;
                wake_driver(&pc).await;
            }
            _ = wake.tick(), if connected => wake_driver(&pc).await,
            ok = opened(&mut wired) => {
                if ok { break; }
                return Err(LinkError::Closed { state: "channel closed during setup".into() });
            }
            Some(channel) = incoming.recv(), if wired.is_none() => {
                accept_channel(&mut slots, channel).await?;
                if let [Some(c), Some(i), Some(b)] = slots.clone() {
                    wired = Some(wire(params, sid, &pc, [c, i, b]));
                }
            }
            msg = inbox.recv() => match msg {
                None => return Err(LinkError::Closed { state: "stopped".into() }),
                Some(Input::Signal(SignalMessage::Answer { sid: s, sdp })) if s == sid && role == Role::Offerer && !remote_set => {
                    let answer = RTCSessionDescription::answer(sdp).map_err(rtc("parse answer"))?;
                    pc.set_remote_description(answer).await.map_err(rtc("set remote answer"))?;
                    remote_set = true;
                }
                Some(Input::Signal(SignalMessage::Candidate { sid: s, candidate })) if s == sid => {
                    match pc.add_ice_candidate(candidate).await {
                        // Adding a candidate does not wake the driver: its checks would
                        // wait for whatever timer is next (up to a second).
                        Ok(()) => wake_driver(&pc).await,
                        Err(e) => debug!(cause = %e, "remote candidate refused"),
                    }
                }
                Some(Input::Signal(SignalMessage::Call)) if role == Role::Offerer => {
                    // The peer asked for a link while ours was on its way (both sides
                    // wanted one at once): this offer answers it.
                    debug!("call while dialing: the offer under way answers it");
                }
                Some(m @ (Input::Signal(SignalMessage::Offer { .. }) | Input::Forget)) => {
                    // The peer started over (restart), or we gave up on it: the
                    // supervisor decides what next.
                    *deferred = Some(m);
                    return Err(LinkError::Superseded);
                }
                Some(Input::Undeliverable { code, message }) => {
                    return Err(LinkError::Undeliverable { code, message });
                }
                Some(other) => debug!(?other, "stale setup message ignored"),
            },
            changed = state.changed() => {
                let s = *state.borrow();
                if changed.is_err() || matches!(s, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) {
                    return Err(LinkError::Closed { state: s.to_string() });
                }
                if s == RTCPeerConnectionState::Connected && !connected {
                    connected = true;
                    wake_driver(&pc).await;
                }
            }
            () = tokio::time::sleep_until(deadline) => return Err(timed_out("ICE/DTLS/SCTP")),
        }
    }
    let Some(Wired {
        mut link,
        handshake: mut hs_rx,
        ..
    }) = wired
    else {
        return Err(LinkError::Closed {
            state: "no channels".into(),
        });
    };
    let shared = link.shared.clone();
    // The handshake, bound to both DTLS fingerprints as this side sees them.
    let local_sdp = pc
        .local_description()
        .await
        .map(|d| d.sdp)
        .unwrap_or_default();
    let remote_sdp = pc
        .remote_description()
        .await
        .map(|d| d.sdp)
        .unwrap_or_default();
    let mine = Party {
        user: params.me.to_string(),
        key: params.identity.verifying_key().to_bytes(),
        nonce: handshake::nonce(),
        fingerprint: handshake::sdp_fingerprints(&local_sdp, "local")?,
    };
    let remote_fp = handshake::sdp_fingerprints(&remote_sdp, "remote")?;
    shared
        .send_raw(Lane::Control, wire::hello(&mine.user, mine.key, mine.nonce))
        .await?;
    let HandshakeFrame::Hello {
        version,
        user,
        key,
        nonce,
    } = next_handshake(&mut hs_rx, deadline, params.setup_timeout).await?
    else {
        return Err(wire::WireError::Unexpected {
            frame: "auth",
            reason: "expected hello",
        }
        .into());
    };
    let refuse = |err: LinkError| {
        let shared = shared.clone();
        async move {
            let _ = shared
                .send_raw(Lane::Control, wire::refuse(&err.to_string()))
                .await;
            err
        }
    };
    if version != wire::PROTOCOL_VERSION {
        return Err(refuse(LinkError::Version {
            theirs: version,
            ours: wire::PROTOCOL_VERSION,
        })
        .await);
    }
    if user != params.peer.as_str() {
        return Err(refuse(LinkError::WrongUser { claimed: user }).await);
    }
    if let Err(err) = check_key(key).await {
        return Err(refuse(err).await);
    }
    let theirs = Party {
        user,
        key,
        nonce,
        fingerprint: remote_fp,
    };
    let (transcript, their_role) = match role {
        Role::Offerer => (handshake::transcript(&mine, &theirs), Role::Answerer),
        Role::Answerer => (handshake::transcript(&theirs, &mine), Role::Offerer),
    };
    let signature = handshake::sign(&params.identity, role, &transcript);
    shared
        .send_raw(Lane::Control, wire::auth(signature))
        .await?;
    let HandshakeFrame::Auth(signature) =
        next_handshake(&mut hs_rx, deadline, params.setup_timeout).await?
    else {
        return Err(wire::WireError::Unexpected {
            frame: "hello",
            reason: "expected auth",
        }
        .into());
    };
    if let Err(err) = handshake::verify(
        &theirs.user,
        &theirs.key,
        their_role,
        &transcript,
        &signature,
    ) {
        return Err(refuse(err.into()).await);
    }
    shared.authed.send_replace(true);
    // Watch the connection for the rest of its life: a failed or closed connection
    // kills the link. Ends when the link dies or the connection's state goes away.
    let watcher_shared = shared.clone();
    let watcher = tokio::spawn(async move {
        loop {
            if state.changed().await.is_err() {
                watcher_shared.die("connection gone");
                return;
            }
            let s = *state.borrow();
            if matches!(
                s,
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            ) {
                watcher_shared.die(format!("connection {s}"));
                return;
            }
        }
    });
    link.peer_key = theirs.key;
    link.readers.push(watcher);
    if !route.turn_servers.is_empty() || !route.bridges.is_empty() {
        if let Some(received) = route.received.clone() {
            let _ = link.shared.flush.set(received.clone());
            link.readers.push(tokio::spawn(flush_relayed(
                link.pc.clone(),
                received,
                route.pacer.clone(),
            )));
        }
    }
    link.route = route;
    std::mem::forget(guard);
    Ok(link)
}

/// Keeps a relayed link's data moving.
///
/// webrtc 0.21's driver hands relayed packets to its TURN client after it has
/// sent what that client had queued, so what a loop turn produces for the relay
/// waits for the next turn: for the next datagram, message or timer. A transfer
/// over a relay then stalled for hundreds of milliseconds at a time (0.3 MB/s
/// through coturn on loopback, and a retransmission that a timer made could wait
/// out the next timer). So while the link's selected pair is relayed, every
/// datagram received and every frame sent is followed by one more turn, and so is
/// every 20 ms without either.
///
/// A peer that relays (the selected pair's remote candidate is a relay address)
/// has what we send it paced, as what goes to our own relays is.
async fn flush_relayed(
    pc: Arc<dyn PeerConnection>,
    received: Arc<tokio::sync::Notify>,
    pacer: Option<Arc<udp::Pacer>>,
) {
    const RECHECK: Duration = Duration::from_secs(1);
    const TICK: Duration = Duration::from_millis(20);
    let mut relayed = false;
    let mut checked: Option<Instant> = None;
    loop {
        if relayed {
            let _ = tokio::time::timeout(TICK, received.notified()).await;
        } else {
            received.notified().await;
        }
        if checked.is_none_or(|at| at.elapsed() >= RECHECK) {
            let pair = selected_pair(&pc).await;
            relayed = pair
                .as_ref()
                .is_some_and(|p| p.local().typ == RTCIceCandidateType::Relay);
            if let (Some(pair), Some(pacer)) = (&pair, &pacer) {
                let remote = pair.remote();
                if remote.typ == RTCIceCandidateType::Relay
                    && let Ok(ip) = remote.address.parse()
                {
                    pacer.pace(std::net::SocketAddr::new(ip, remote.port));
                }
            }
            checked = Some(Instant::now());
        }
        if relayed {
            wake_driver(&pc).await;
        }
    }
}

/// The connection's selected candidate pair, once there is one.
async fn selected_pair(
    pc: &Arc<dyn PeerConnection>,
) -> Option<rtc::peer_connection::transport::RTCIceCandidatePair> {
    let sctp = pc.sctp().await?;
    sctp.transport()
        .ice_transport()
        .get_selected_candidate_pair()
        .await
        .ok()?
}

/// The next handshake frame, or why there is none.
async fn next_handshake(
    rx: &mut mpsc::Receiver<HandshakeFrame>,
    deadline: Instant,
    limit: Duration,
) -> Result<HandshakeFrame, LinkError> {
    match timeout_at(deadline, rx.recv()).await {
        Err(_) => Err(LinkError::Timeout {
            after: limit,
            stage: "handshake",
        }),
        Ok(None) => Err(LinkError::Closed {
            state: "closed during the handshake".into(),
        }),
        Ok(Some(HandshakeFrame::Refuse(reason))) => Err(LinkError::RefusedByPeer { reason }),
        Ok(Some(f)) => Ok(f),
    }
}

/// Closes a connection when setup fails part way.
struct CloseOnDrop(Option<Arc<dyn PeerConnection>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let (Some(pc), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            // Short-lived: closes the failed connection's driver and ends.
            rt.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

impl Shared {
    /// The peer at the other end.
    pub(crate) fn peer(&self) -> &UserName {
        &self.peer
    }

    async fn send_raw(&self, lane: Lane, frame: BytesMut) -> Result<(), LinkError> {
        let tx = &self.lanes[lane.index()];
        let _whole_message = tx.lock.lock().await;
        let n = frame.len() as u64;
        tx.channel.send(frame).await.map_err(rtc("send"))?;
        self.counters.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// A handshake frame, owned, passed from the control reader to the handshake.
#[derive(Debug)]
enum HandshakeFrame {
    Hello {
        version: u16,
        user: String,
        key: [u8; 32],
        nonce: [u8; 32],
    },
    Auth([u8; 64]),
    Refuse(String),
}

/// Reads one data channel for the life of the link.
struct Reader {
    lane: Lane,
    channel: Arc<dyn DataChannel>,
    shared: Arc<Shared>,
    events: mpsc::Sender<PeerEvent>,
    membership: Arc<dyn Membership>,
    /// To the handshake (control channel only), until it is over.
    handshake: Option<mpsc::Sender<HandshakeFrame>>,
    opened: Option<oneshot::Sender<()>>,
}

impl Reader {
    async fn run(mut self) {
        let mut assembler = Assembler::default();
        let reason = loop {
            let Some(event) = self.channel.poll().await else {
                break "channel closed".to_string();
            };
            match event {
                DataChannelEvent::OnOpen => {
                    if let Some(tx) = self.opened.take() {
                        let _ = tx.send(());
                    }
                }
                DataChannelEvent::OnClose => break "channel closed".to_string(),
                DataChannelEvent::OnMessage(msg) => {
                    self.shared
                        .counters
                        .received
                        .fetch_add(msg.data.len() as u64, Ordering::Relaxed);
                    if let Err(err) = self.message(&msg.data, &mut assembler).await {
                        warn!(cause = %err, "dropping the link");
                        break err.to_string();
                    }
                }
                _ => {}
            }
        };
        self.shared.die(reason);
    }

    async fn message(&mut self, data: &[u8], assembler: &mut Assembler) -> Result<(), LinkError> {
        let frame = wire::decode(data)?;
        if !*self.shared.live.borrow() {
            let owned = match frame {
                Frame::Hello {
                    version,
                    user,
                    key,
                    nonce,
                } => Some(HandshakeFrame::Hello {
                    version,
                    user: user.to_owned(),
                    key,
                    nonce,
                }),
                Frame::Auth { signature } => Some(HandshakeFrame::Auth(signature)),
                Frame::Refuse { reason } => Some(HandshakeFrame::Refuse(reason.to_owned())),
                _ => None,
            };
            if let (Some(owned), Some(tx)) = (owned, &self.handshake)
                && !*self.shared.authed.borrow()
            {
                return tx.send(owned).await.map_err(|_| LinkError::Closed {
                    state: "handshake over".into(),
                });
            }
            // Application data may arrive as soon as the peer has verified us, before
            // we have verified it and made this link the one we send on: hold this
            // channel until then.
            let mut live = self.shared.live.subscribe();
            let mut dead = self.shared.dead.subscribe();
            tokio::select! {
                r = live.wait_for(|a| *a) => { r.map_err(|_| LinkError::Closed { state: "link gone".into() })?; }
                _ = dead.wait_for(Option::is_some) => return Err(LinkError::Closed { state: "not authenticated".into() }),
            }
        }
        if self.handshake.is_some() {
            self.handshake = None;
        }
        if let Frame::Refuse { reason } = frame {
            return Err(LinkError::RefusedByPeer {
                reason: reason.to_owned(),
            });
        }
        let Some(inbound) = assembler.push(frame)? else {
            return Ok(());
        };
        let peer = self.shared.peer.clone();
        match inbound {
            Inbound::Message(payload) => {
                let event = PeerEvent::Message {
                    peer,
                    lane: self.lane,
                    payload,
                };
                // Waiting here is the receive side's backpressure: SCTP's window fills.
                self.events
                    .send(event)
                    .await
                    .map_err(|_| LinkError::Closed {
                        state: "nobody listens".into(),
                    })?;
            }
            Inbound::Request { id, group, payload } => {
                if !self.membership.is_member(&group, &peer) {
                    debug!(%group, "request from a non-member refused (ENOTMEMBER)");
                    return self
                        .shared
                        .respond(id, ResponseStatus::NotMember, group.as_str().as_bytes())
                        .await;
                }
                let event = PeerEvent::Request {
                    peer,
                    group,
                    payload,
                    reply: Responder {
                        id,
                        link: Arc::downgrade(&self.shared),
                    },
                };
                self.events
                    .send(event)
                    .await
                    .map_err(|_| LinkError::Closed {
                        state: "nobody listens".into(),
                    })?;
            }
            Inbound::Response {
                id,
                status,
                payload,
            } => {
                if let Some(tx) = lock(&self.shared.pending).remove(&id) {
                    let _ = tx.send((status, payload));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn unspecified_candidates_are_not_offered() {
        let at = |address: &str| RTCIceCandidate {
            address: address.into(),
            ..Default::default()
        };
        assert!(!dialable(&at("::")));
        assert!(!dialable(&at("0.0.0.0")));
        assert!(dialable(&at("10.231.0.2")));
        assert!(dialable(&at("2001:db8::1")));
        // mDNS names and anything else not an address are the peer's to judge.
        assert!(dialable(&at("a1b2.local")));
    }

    fn signal_message() -> impl Strategy<Value = SignalMessage> {
        prop_oneof![
            Just(SignalMessage::Call),
            (any::<u64>(), any::<String>())
                .prop_map(|(sid, sdp)| SignalMessage::Offer { sid, sdp }),
            (any::<u64>(), any::<String>())
                .prop_map(|(sid, sdp)| SignalMessage::Answer { sid, sdp }),
            (
                any::<u64>(),
                any::<String>(),
                proptest::option::of(any::<String>()),
                proptest::option::of(any::<u16>()),
                proptest::option::of(any::<String>()),
            )
                .prop_map(
                    |(sid, candidate, sdp_mid, sdp_mline_index, username_fragment)| {
                        SignalMessage::Candidate {
                            sid,
                            candidate: RTCIceCandidateInit {
                                candidate,
                                sdp_mid,
                                sdp_mline_index,
                                username_fragment,
                                ..Default::default()
                            },
                        }
                    }
                ),
        ]
    }

    /// What another user may relay: our kind or another, and a `msg` of any shape.
    fn relayed() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            prop::sample::select(vec!["call", "offer", "answer", "candidate", "Call", ""])
                .prop_map(|s| json!(s)),
            any::<String>().prop_map(Value::String),
        ];
        let field = prop::sample::select(vec![
            "type",
            "sid",
            "sdp",
            "candidate",
            "sdpMid",
            "sdpMLineIndex",
            "usernameFragment",
            "extra",
        ]);
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec!["candidate", "sdpMid", "x"]),
                    inner,
                    0..4
                )
                .prop_map(|m| json!(m)),
            ]
        });
        let kind = prop::sample::select(vec![SIGNAL_KIND, "brume-peer/2", ""]);
        (kind, prop::collection::btree_map(field, value, 0..5))
            .prop_map(|(kind, msg)| json!({ "kind": kind, "msg": msg }))
    }

    proptest! {
        #[test]
        fn signal_messages_round_trip(m in signal_message()) {
            prop_assert_eq!(SignalMessage::from_payload(&m.to_payload()), Some(m));
        }

        #[test]
        fn relayed_payloads_never_panic(payload in relayed()) {
            if let Some(m) = SignalMessage::from_payload(&payload) {
                prop_assert_eq!(payload["kind"].as_str(), Some(SIGNAL_KIND));
                prop_assert_eq!(SignalMessage::from_payload(&m.to_payload()), Some(m));
            }
        }
    }
}
