//! Sync over the real network: the signaling client and the peer links of a
//! mounted client, a [`Link`] on top of them for the engine, and the task that
//! hands what peers send to the engine.

use std::path::Path;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::fs::tree::Tree;
use crate::ids::{GroupName, UserName};
use crate::peer::{Lane, Membership, PeerEvent, Peers, PeersConfig};
use crate::signal::client::{ClientConfig, connect};
use crate::sync::engine::{BoxFuture, Engine, Link};

/// The engine's link over [`Peers`]. Snapshots, changes and requests go on the
/// control lane, in order; block data on the interactive lane when a reader waits
/// for it, else on the bulk lane.
pub struct PeersLink {
    peers: Peers,
}

impl PeersLink {
    /// The peer links.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }
}

fn lane_of(payload: &[u8], urgent: bool) -> Lane {
    // A block is `O` then tag 3 (see `sync::proto`).
    match payload {
        [b'O', 3, ..] if urgent => Lane::Interactive,
        [b'O', 3, ..] => Lane::Bulk,
        [b'M', 3, ..] if urgent => Lane::Interactive,
        _ => Lane::Control,
    }
}

impl Link for PeersLink {
    fn send<'a>(
        &'a self,
        to: &'a UserName,
        urgent: bool,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.peers
                .send(to, lane_of(&payload, urgent), &payload)
                .await
                .map_err(|e| match e.code() {
                    Some(code) => format!("{}: {e}", code.name()),
                    None => e.to_string(),
                })
        })
    }
}

/// What [`start`] leaves running; hand it the engine with [`Network::attach`].
pub struct Network {
    events: mpsc::Receiver<PeerEvent>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Network")
    }
}

/// Connects to the signaling server and starts the peer links, on the current
/// tokio runtime. Membership questions are answered from `tree`.
pub fn start(
    config: &Config,
    data_dir: &Path,
    catalog: Catalog,
    tree: Arc<RwLock<Tree>>,
) -> Result<(Arc<PeersLink>, Network), String> {
    let identity = crate::signal::identity::load_or_create(data_dir).map_err(|e| e.to_string())?;
    let (signal, signal_events) = connect(ClientConfig::new(config, identity.clone()));
    let membership: Arc<dyn Membership> = Arc::new(move |group: &GroupName, peer: &UserName| {
        let tree = tree.read().unwrap_or_else(|e| e.into_inner());
        tree.find_group(tree.me().as_str(), group.as_str())
            .is_some_and(|g| tree.is_member(g, peer.as_str()))
    });
    let (peers, events) = Peers::start(
        PeersConfig::new(config, identity),
        Arc::new(signal),
        signal_events,
        catalog,
        membership,
    );
    Ok((Arc::new(PeersLink { peers }), Network { events }))
}

impl Network {
    /// Feeds the engine: messages from peers, and owners coming online (so that
    /// joined groups resubscribe).
    pub fn attach(self, engine: Engine) {
        let mut events = self.events;
        // Drains the peer events for the life of the mount (the receiver must be
        // drained or the links stop reading).
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    PeerEvent::Up { peer, .. } => {
                        tracing::info!(%peer, "peer link up");
                        engine.owner_online(&peer).await;
                    }
                    PeerEvent::Down { peer, reason } => {
                        tracing::info!(%peer, %reason, "peer link down");
                        engine.peer_offline(&peer);
                    }
                    PeerEvent::Message { peer, payload, .. } => {
                        engine.on_message(&peer, &payload).await;
                    }
                    PeerEvent::Request { reply, .. } => {
                        let _ = reply.fail("requests are not used by this version").await;
                    }
                    PeerEvent::KeyChanged {
                        peer,
                        pinned,
                        presented,
                    } => {
                        tracing::error!(%peer, %pinned, %presented, "peer presented a different identity key; refused");
                    }
                }
            }
        });
    }
}
