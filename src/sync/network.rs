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
use crate::sync::engine::{BoxFuture, Engine, Link, Priority, Reach};

/// The engine's link over [`Peers`]: each [`Priority`] is a lane of its own.
pub struct PeersLink {
    peers: Peers,
}

impl PeersLink {
    /// The peer links.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }
}

fn lane_of(priority: Priority) -> Lane {
    match priority {
        Priority::Control => Lane::Control,
        Priority::Interactive => Lane::Interactive,
        Priority::Bulk => Lane::Bulk,
    }
}

impl Link for PeersLink {
    fn send<'a>(
        &'a self,
        to: &'a UserName,
        priority: Priority,
        reach: Reach,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let lane = lane_of(priority);
            let sent = match reach {
                Reach::Linked => self.peers.send_if_linked(to, lane, &payload).await,
                Reach::Dial => self.peers.send(to, lane, &payload).await,
            };
            sent.map_err(|e| match e.code() {
                Some(code) => format!("{}: {e}", code.name()),
                None => e.to_string(),
            })
        })
    }
}

/// What [`start`] leaves running; hand it the engine with [`Network::attach`].
pub struct Network {
    events: mpsc::Receiver<PeerEvent>,
    signal: crate::signal::client::SignalClient,
    peers: Peers,
    data_dir: std::path::PathBuf,
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
        Arc::new(signal.clone()),
        signal_events,
        catalog,
        membership,
    );
    let network = Network {
        events,
        signal,
        peers: peers.clone(),
        data_dir: data_dir.to_owned(),
    };
    Ok((Arc::new(PeersLink { peers }), network))
}

impl Network {
    /// Feeds the engine: messages from peers, and owners coming online (so that
    /// joined groups resubscribe).
    pub fn attach(self, engine: Engine) {
        let mut events = self.events;
        // Writes what `brume status` shows about the network, once a second, for
        // the life of the mount.
        tokio::spawn(declare_members(self.signal.clone(), engine.clone()));
        tokio::spawn(write_live_status(
            self.data_dir,
            self.signal,
            self.peers,
            engine.clone(),
        ));
        // Drains the peer events for the life of the mount (the receiver must be
        // drained or the links stop reading).
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    PeerEvent::Up { peer, .. } => {
                        tracing::info!(%peer, "peer link up");
                        engine.link_changed(&peer);
                        engine.owner_online(&peer).await;
                    }
                    PeerEvent::Down { peer, reason } => {
                        // Its subscriptions stay: the news may be of a link
                        // already replaced by one on which it subscribed again;
                        // the next push that cannot reach it drops them.
                        tracing::info!(%peer, %reason, "peer link down");
                        engine.link_changed(&peer);
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

/// Keeps `<data>/live.json` current: the signaling connection, every peer link,
/// each joined group's sync state and the block cache.
/// Declares to the signaling server the members of every owned group, as they are
/// added, for the life of the mount: the server shows an owner online only to users
/// it declared, and members dial their owner as soon as they see it come online.
/// (A member's own side is declared when it asks for a link to its owner.)
async fn declare_members(signal: crate::signal::client::SignalClient, engine: Engine) {
    let mut declared: std::collections::HashSet<UserName> = Default::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let new: Vec<UserName> = engine
            .owned_members()
            .into_iter()
            .flat_map(|(_, members)| members)
            .filter_map(|m| UserName::new(&m).ok())
            .filter(|m| !declared.contains(m))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if new.is_empty() {
            continue;
        }
        // The client keeps what it watches across reconnections; a failure here
        // (not connected yet) is retried on the next tick.
        match signal.watch(new.clone()).await {
            Ok(()) => declared.extend(new),
            Err(err) => tracing::debug!(cause = %err, "members not declared yet"),
        }
    }
}

async fn write_live_status(
    data_dir: std::path::PathBuf,
    signal: crate::signal::client::SignalClient,
    peers: Peers,
    engine: Engine,
) {
    let path = data_dir.join(crate::status::LIVE_FILE);
    let tmp = path.with_extension("tmp");
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut rates = Rates::default();
    let mut accounts = Accounts::default();
    loop {
        tick.tick().await;
        accounts.check(&signal, engine.owned_members()).await;
        let mut groups: std::collections::BTreeMap<_, _> =
            engine.member_status().into_iter().collect();
        rates.update(std::time::Instant::now(), &mut groups);
        let links = peers.status();
        for (name, g) in groups.iter_mut() {
            owner_link_problem(name, g, &links);
        }
        let live = crate::status::LiveStatus {
            updated_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            signal: serde_json::to_value(&*signal.status().borrow()).unwrap_or_default(),
            peers: serde_json::to_value(peers.status()).unwrap_or_default(),
            relays: peers
                .relay_status()
                .into_iter()
                .map(|(server, r)| (server, serde_json::to_value(r).unwrap_or_default()))
                .collect(),
            groups,
            cache: engine.cache_usage(),
            held: engine.held_groups(),
            unknown_members: accounts.unknown(&engine.owned_members()),
        };
        let Ok(text) = serde_json::to_vec_pretty(&live) else {
            continue;
        };
        if std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_err()
        {
            tracing::debug!("cannot write the live status file");
        }
    }
}

/// Whether the users that owned groups list in `.members` have accounts on the
/// signaling server, asked once each (again after [`Accounts::RECHECK`]), a few
/// per second.
#[derive(Default)]
struct Accounts {
    /// By user: whether the server knows it, and when it was asked.
    known: std::collections::HashMap<String, (bool, std::time::Instant)>,
}

impl Accounts {
    /// How long an answer holds (accounts are added by an administrator).
    const RECHECK: std::time::Duration = std::time::Duration::from_secs(600);
    /// Most users asked about per call.
    const PER_CALL: usize = 8;

    async fn check(
        &mut self,
        signal: &crate::signal::client::SignalClient,
        groups: Vec<(String, Vec<String>)>,
    ) {
        let now = std::time::Instant::now();
        let mut due: Vec<String> = groups
            .into_iter()
            .flat_map(|(_, members)| members)
            .filter(|u| {
                self.known
                    .get(u)
                    .is_none_or(|(_, at)| now.duration_since(*at) >= Self::RECHECK)
            })
            .collect();
        due.sort();
        due.dedup();
        for user in due.into_iter().take(Self::PER_CALL) {
            let Ok(name) = UserName::new(&user) else {
                continue;
            };
            let asked = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                signal.identity_key(&name),
            )
            .await;
            let exists = match asked {
                Ok(Ok(_)) => true,
                Ok(Err(e)) if e.code() == Some(crate::signal::protocol::ErrorCode::BadDest) => {
                    false
                }
                // Not connected, or no answer: ask again next time.
                _ => continue,
            };
            if !exists && self.known.get(&user).is_none_or(|(known, _)| *known) {
                tracing::warn!(%user, "a .members lists a user the signaling server does not know (EBADDEST)");
            }
            self.known.insert(user, (exists, now));
        }
    }

    /// By owned group, the listed users known not to exist.
    fn unknown(
        &self,
        groups: &[(String, Vec<String>)],
    ) -> std::collections::BTreeMap<String, Vec<String>> {
        groups
            .iter()
            .filter_map(|(group, members)| {
                let unknown: Vec<String> = members
                    .iter()
                    .filter(|u| self.known.get(*u).is_some_and(|(known, _)| !known))
                    .cloned()
                    .collect();
                (!unknown.is_empty()).then(|| (group.clone(), unknown))
            })
            .collect()
    }
}

/// A joined group whose owner cannot be reached says why: an owner the server
/// does not know is a problem of the group (`EBADDEST`); any other reason the
/// link is down (`ENODEST`, …) is why the group waits.
fn owner_link_problem(
    group: &str,
    g: &mut crate::sync::engine::MemberGroupStatus,
    links: &std::collections::BTreeMap<UserName, crate::peer::PeerStatus>,
) {
    let Some(link) = group
        .split_once('/')
        .and_then(|(owner, _)| UserName::new(owner).ok())
        .and_then(|owner| links.get(&owner))
    else {
        return;
    };
    if g.problem.is_some() || link.state == crate::peer::PeerState::Up {
        return;
    }
    let Some(last) = &link.last_error else {
        return;
    };
    if last.code == Some(crate::signal::protocol::ErrorCode::BadDest) {
        g.problem = Some(last.message.clone());
    } else {
        g.waiting_for = Some(short_problem(last));
    }
}

/// A problem as `CODE: what happened` (`ENODEST: alice is not connected`): the
/// code by its name, without the meaning the server's message spells out.
fn short_problem(p: &crate::peer::PeerProblem) -> String {
    let Some(code) = p.code else {
        return p.message.clone();
    };
    let detail = p
        .message
        .strip_prefix(&code.to_string())
        .or_else(|| p.message.strip_prefix(code.name()))
        .map_or(p.message.as_str(), |rest| rest.trim_start_matches(": "));
    format!("{}: {detail}", code.name())
}

/// Smoothed arrival rate of each joined group's bytes, for its rate and ETA.
#[derive(Default)]
struct Rates {
    /// By group: when last seen, bytes done then, smoothed bytes per second.
    last: std::collections::HashMap<String, (std::time::Instant, u64, Option<f64>)>,
}

impl Rates {
    /// Weight of the newest sample in the smoothed rate.
    const ALPHA: f64 = 0.3;

    /// Fills in `rate` and `eta_secs` of every group from the bytes done since
    /// the previous call.
    fn update(
        &mut self,
        now: std::time::Instant,
        groups: &mut std::collections::BTreeMap<String, crate::sync::engine::MemberGroupStatus>,
    ) {
        self.last.retain(|g, _| groups.contains_key(g));
        for (name, g) in groups.iter_mut() {
            let rate = self.last.get(name).map(|&(then, done, rate)| {
                let secs = now.duration_since(then).as_secs_f64().max(1e-3);
                let sample = g.bytes_done.saturating_sub(done) as f64 / secs;
                rate.map_or(sample, |r| Self::ALPHA * sample + (1.0 - Self::ALPHA) * r)
            });
            self.last.insert(name.clone(), (now, g.bytes_done, rate));
            let rate = rate.unwrap_or(0.0);
            g.rate = rate.round() as u64;
            let left = g.bytes_total.saturating_sub(g.bytes_done);
            g.eta_secs =
                (left > 0 && rate >= 1.0).then(|| (left as f64 / rate).round().max(1.0) as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::engine::MemberGroupStatus;
    use std::time::{Duration, Instant};

    #[test]
    fn an_offline_owner_is_named_by_code_and_what_happened() {
        use crate::peer::{PeerProblem, PeerState, PeerStatus};
        use crate::signal::protocol::ErrorCode;
        let alice = UserName::new("alice").unwrap();
        let mut link = PeerStatus::new();
        link.state = PeerState::Backoff;
        // As the signaling server words a relay to a user who is away.
        link.last_error = Some(PeerProblem {
            code: Some(ErrorCode::NoDest),
            message: format!("{}: alice is not connected", ErrorCode::NoDest),
            at_unix: 0,
        });
        let links = [(alice.clone(), link.clone())].into_iter().collect();
        let mut g = MemberGroupStatus::default();
        owner_link_problem("alice/g", &mut g, &links);
        assert_eq!(
            g.waiting_for.as_deref(),
            Some("ENODEST: alice is not connected")
        );
        assert_eq!(g.problem, None);
        // Without a code, the message as it is.
        link.last_error = Some(PeerProblem {
            code: None,
            message: "link lost: connection failed".into(),
            at_unix: 0,
        });
        let links = [(alice, link)].into_iter().collect();
        let mut g = MemberGroupStatus::default();
        owner_link_problem("alice/g", &mut g, &links);
        assert_eq!(
            g.waiting_for.as_deref(),
            Some("link lost: connection failed")
        );
    }

    #[test]
    fn rate_and_eta_follow_the_bytes_arriving() {
        let mut rates = Rates::default();
        let t0 = Instant::now();
        let mut groups = std::collections::BTreeMap::new();
        let g = |done| MemberGroupStatus {
            bytes_total: 10_000_000,
            bytes_done: done,
            ..Default::default()
        };
        groups.insert("alice/g".to_string(), g(0));
        rates.update(t0, &mut groups);
        assert_eq!(groups["alice/g"].rate, 0);
        assert_eq!(groups["alice/g"].eta_secs, None, "no rate yet, no ETA");
        // A steady 1 MB/s converges on 1 MB/s, and the ETA on what is left.
        for s in 1..=30u64 {
            groups.insert("alice/g".to_string(), g(s * 100_000));
            rates.update(t0 + Duration::from_millis(100 * s), &mut groups);
        }
        let st = &groups["alice/g"];
        assert_eq!(st.rate, 1_000_000);
        assert_eq!(st.eta_secs, Some(7));
        // Complete: no ETA.
        groups.insert("alice/g".to_string(), g(10_000_000));
        rates.update(t0 + Duration::from_secs(4), &mut groups);
        assert_eq!(groups["alice/g"].eta_secs, None);
        // A group that is gone is forgotten.
        groups.clear();
        rates.update(t0 + Duration::from_secs(5), &mut groups);
        assert!(rates.last.is_empty());
    }
}
