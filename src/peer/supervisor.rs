//! One task per peer: keeps one authenticated link up while someone wants it. The
//! user whose name sorts first dials (sends the offer); the other asks it to with a
//! `call`, so two sides never offer at once. Failed attempts and lost links are retried
//! with exponential backoff and jitter, at once when the peer comes back online; a new
//! offer from the peer (it restarted) replaces the link once the new one is
//! authenticated. Keys are checked here against the catalog's pins.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};
use webrtc::peer_connection::RTCIceServer;

use super::link::{self, Input, Link, LinkError, LinkParams, SignalMessage};
use super::{
    BoxFuture, PeerEvent, PeerProblem, PeerState, PeerStatus, PeersConfig, Signaling,
    key_fingerprint,
};
use crate::catalog::{Catalog, PinOutcome, pinned_keys};
use crate::ids::UserName;
use crate::signal::ErrorCode;

type StatusMap = watch::Sender<BTreeMap<UserName, PeerStatus>>;

/// The supervisor of one peer's link.
pub(crate) struct Supervisor {
    params: LinkParams,
    backoff_initial: Duration,
    backoff_max: Duration,
    catalog: Catalog,
    inputs: mpsc::Receiver<Input>,
    /// An input taken out of the queue by a setup attempt and not yet handled.
    deferred: Option<Input>,
    /// Publishes the current link to `Peers` handles.
    link_tx: watch::Sender<Option<Arc<Link>>>,
    status: StatusMap,
    watching: bool,
    /// Fingerprint of the key the last established link authenticated.
    key_fp: Option<String>,
    /// The peer left the signaling server since the current link came up: a call
    /// from it now comes from a restarted peer, whose end of that link is gone.
    peer_left: bool,
}

/// Records a problem in `peer`'s status.
pub(crate) fn record(status: &StatusMap, peer: &UserName, code: Option<ErrorCode>, message: &str) {
    let at_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    status.send_modify(|m| {
        m.entry(peer.clone())
            .or_insert_with(PeerStatus::new)
            .last_error = Some(PeerProblem {
            code,
            message: message.to_owned(),
            at_unix,
        });
    });
}

/// STUN/TURN servers from `brume.conf`: `stun:host:port`, `turn:host:port`, with TURN
/// credentials written as `turn:USER:PASSWORD@host:port`.
pub(crate) fn ice_servers(urls: &[String]) -> Vec<RTCIceServer> {
    urls.iter()
        .map(|url| {
            let (scheme, rest) = url.split_once(':').unwrap_or((url.as_str(), ""));
            match rest.rsplit_once('@') {
                Some((creds, host)) => {
                    let (user, pass) = creds.split_once(':').unwrap_or((creds, ""));
                    RTCIceServer {
                        urls: vec![format!("{scheme}:{host}")],
                        username: user.to_owned(),
                        credential: pass.to_owned(),
                    }
                }
                None => RTCIceServer {
                    urls: vec![url.clone()],
                    ..Default::default()
                },
            }
        })
        .collect()
}

/// Exponential backoff with jitter: `fraction` (0..=1) of the upper half of
/// `initial * 2^attempt`, capped at `max`.
pub(crate) fn backoff(initial: Duration, max: Duration, attempt: u32, fraction: f64) -> Duration {
    let ceiling = initial
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max);
    ceiling.mul_f64(0.5 + fraction.clamp(0.0, 1.0) / 2.0)
}

fn jitter() -> f64 {
    let mut random = [0u8; 4];
    // Without randomness, no jitter: still correct, just less spread.
    let _ = getrandom::fill(&mut random);
    f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX)
}

fn random_sid() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// Resolves when `link` dies; never if there is none.
async fn died(link: &Option<Arc<Link>>) -> String {
    match link {
        Some(link) => link.died().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at`; never if `None`.
async fn at(at: Option<Instant>) {
    match at {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Checks a presented identity key: it must equal the pinned one; on first contact it
/// must equal the one the signaling server has, and is then pinned.
async fn check_key(
    catalog: Catalog,
    signal: Arc<dyn Signaling>,
    peer: UserName,
    presented: [u8; 32],
) -> Result<(), LinkError> {
    let refuse = |reason: String, pinned: Option<[u8; 32]>| LinkError::KeyRefused {
        reason,
        pinned,
        presented,
    };
    let path = catalog.path().to_owned();
    let pins = tokio::task::spawn_blocking(move || pinned_keys(&path))
        .await
        .map_err(|e| refuse(format!("catalog: {e}"), None))?
        .map_err(|e| refuse(format!("catalog: {e}"), None))?;
    match pins.into_iter().find(|(u, _)| u == peer.as_str()) {
        Some((_, pinned)) if pinned == presented => return Ok(()),
        Some((_, pinned)) => {
            return Err(refuse(
                format!(
                    "identity key changed: pinned {}, presented {}",
                    key_fingerprint(&pinned),
                    key_fingerprint(&presented)
                ),
                Some(pinned),
            ));
        }
        None => {}
    }
    match signal.identity_key(&peer).await {
        Ok(Some(key)) if key.0 == presented => {}
        Ok(Some(_)) => {
            return Err(refuse(
                "first contact: the key differs from the one the signaling server has".into(),
                None,
            ));
        }
        Ok(None) => {
            return Err(refuse(
                "first contact: the signaling server has no key for this user".into(),
                None,
            ));
        }
        Err(e) => {
            return Err(refuse(
                format!("first contact: cannot look the key up: {e}"),
                None,
            ));
        }
    }
    let user = peer.to_string();
    let outcome = tokio::task::spawn_blocking(move || catalog.pin_key(&user, presented))
        .await
        .map_err(|e| refuse(format!("catalog: {e}"), None))?
        .map_err(|e| refuse(format!("catalog: {e}"), None))?;
    match outcome {
        PinOutcome::Pinned => {
            info!(key = %key_fingerprint(&presented), "identity key pinned on first contact");
            Ok(())
        }
        PinOutcome::Matches => Ok(()),
        PinOutcome::Changed { pinned } => Err(refuse(
            format!(
                "identity key changed: pinned {}, presented {}",
                key_fingerprint(&pinned),
                key_fingerprint(&presented)
            ),
            Some(pinned),
        )),
    }
}

impl Supervisor {
    pub(crate) fn new(
        params: LinkParams,
        config: &PeersConfig,
        catalog: Catalog,
        inputs: mpsc::Receiver<Input>,
        link_tx: watch::Sender<Option<Arc<Link>>>,
        status: StatusMap,
    ) -> Self {
        Self {
            params,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
            catalog,
            inputs,
            deferred: None,
            link_tx,
            status,
            watching: false,
            key_fp: None,
            peer_left: false,
        }
    }

    fn peer(&self) -> &UserName {
        &self.params.peer
    }

    fn set(&self, f: impl FnOnce(&mut PeerStatus)) {
        let peer = self.peer().clone();
        self.status
            .send_modify(|m| f(m.entry(peer).or_insert_with(PeerStatus::new)));
    }

    async fn emit(&self, event: PeerEvent) {
        // A dropped receiver means nobody listens; the links still serve sends.
        let _ = self.params.events.send(event).await;
    }

    /// Runs until `Peers` goes away.
    pub(crate) async fn run(mut self) {
        let dialer = self.params.me < self.params.peer;
        let mut wanted = false;
        let mut attempt: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        let mut current: Option<Arc<Link>> = None;
        loop {
            let input = match self.deferred.take() {
                Some(input) => input,
                None => tokio::select! {
                    input = self.inputs.recv() => match input {
                        Some(input) => input,
                        None => break,
                    },
                    reason = died(&current) => {
                        info!(%reason, "link down");
                        if let Some(link) = current.take() {
                            link.close().await;
                        }
                        self.link_tx.send_replace(None);
                        self.emit(PeerEvent::Down { peer: self.peer().clone(), reason: reason.clone() }).await;
                        record(&self.status, self.peer(), None, &format!("link lost: {reason}"));
                        if wanted {
                            retry_at = Some(Instant::now() + self.delay(attempt));
                            attempt = attempt.saturating_add(1);
                            self.set(|s| s.state = PeerState::Backoff);
                        } else {
                            self.set(|s| s.state = PeerState::Idle);
                        }
                        continue;
                    }
                    () = at(retry_at) => {
                        retry_at = None;
                        let result = if dialer {
                            self.attempt(None).await
                        } else {
                            self.call_and_answer().await
                        };
                        self.settle(result, &mut current, &mut attempt, &mut retry_at, wanted).await;
                        continue;
                    }
                },
            };
            match input {
                Input::Want => {
                    if !wanted {
                        wanted = true;
                        self.watch_presence().await;
                    }
                    if current.is_none() && retry_at.is_none() {
                        retry_at = Some(Instant::now());
                    }
                }
                Input::Forget => {
                    wanted = false;
                    retry_at = None;
                    if let Some(link) = current.take() {
                        link.close().await;
                    }
                    self.link_tx.send_replace(None);
                    self.set(|s| s.state = PeerState::Idle);
                }
                Input::Presence { online } => {
                    if !online && current.is_some() {
                        self.peer_left = true;
                    }
                    if online && wanted && current.is_none() {
                        attempt = 0;
                        retry_at = Some(Instant::now());
                    }
                }
                Input::Undeliverable { code, message } => {
                    record(&self.status, self.peer(), Some(code), &message);
                }
                Input::Signal(SignalMessage::Call) if dialer => {
                    // The peer wants a link, so keep one up from now on.
                    if !wanted {
                        wanted = true;
                        self.watch_presence().await;
                    }
                    if current.as_ref().is_some_and(|l| !l.is_dead()) && !self.peer_left {
                        // Sent while our offer was on its way (both sides wanted a link at
                        // once): redialing would replace a working link. (A restarted
                        // peer left the signaling server first, which `peer_left` saw:
                        // its old link is dead even if ICE has not noticed yet.)
                        debug!("call ignored: the link is up");
                        continue;
                    }
                    if current.is_some() {
                        info!("call from a peer that restarted: replacing the link");
                    }
                    let result = self.attempt(None).await;
                    self.settle(result, &mut current, &mut attempt, &mut retry_at, wanted)
                        .await;
                }
                Input::Signal(SignalMessage::Offer { sid, sdp }) if !dialer => {
                    if !wanted {
                        wanted = true;
                        self.watch_presence().await;
                    }
                    let result = self.attempt(Some((sid, sdp))).await;
                    self.settle(result, &mut current, &mut attempt, &mut retry_at, wanted)
                        .await;
                }
                Input::Signal(other) => debug!(?other, "setup message ignored"),
            }
        }
        if let Some(link) = current.take() {
            link.close().await;
        }
    }

    /// Shows an attempt under way, unless a changed key is being refused: that stays
    /// visible until a link with the pinned key comes up.
    fn connecting(&self) {
        self.set(|s| {
            if s.state != PeerState::Refused {
                s.state = PeerState::Connecting;
            }
        });
    }

    fn connecting_failed(&self) {
        self.set(|s| {
            if s.state != PeerState::Refused {
                s.state = PeerState::Backoff;
            }
        });
    }

    fn delay(&self, attempt: u32) -> Duration {
        backoff(self.backoff_initial, self.backoff_max, attempt, jitter())
    }

    async fn watch_presence(&mut self) {
        if !self.watching {
            self.watching = true;
            if let Err(e) = self.params.signal.watch(self.peer()).await {
                debug!(cause = %e, "cannot watch presence");
            }
        }
    }

    /// Handles the outcome of a setup attempt.
    async fn settle(
        &mut self,
        result: Result<Link, LinkError>,
        current: &mut Option<Arc<Link>>,
        attempt: &mut u32,
        retry_at: &mut Option<Instant>,
        wanted: bool,
    ) {
        match result {
            Ok(link) => {
                let link = Arc::new(link);
                let sid = link.sid;
                // `attempt` checked the key against the pin before succeeding.
                let fp = self.key_fp.clone().unwrap_or_default();
                let path = link.path().await;
                // The status says `Up` before the link is published: whoever gets the
                // link from `Peers` sees a status that agrees.
                self.set(|s| {
                    s.state = PeerState::Up;
                    s.connects += 1;
                    s.key_fingerprint = Some(fp.clone());
                    s.key_changed = None;
                    (s.path, s.relay) = path.clone().map_or((None, None), |(p, r)| (Some(p), r));
                });
                let old = current.replace(link.clone());
                self.peer_left = false;
                self.link_tx.send_replace(Some(link.clone()));
                // Only now: a message the peer sent on the new link is answered on it.
                link.go_live();
                if let Some(old) = old {
                    old.close().await;
                }
                *attempt = 0;
                *retry_at = None;
                info!(key = %fp, sid, "link up");
                self.emit(PeerEvent::Up {
                    peer: self.peer().clone(),
                    key_fingerprint: fp,
                })
                .await;
            }
            Err(LinkError::Superseded) => {
                // A newer offer (or a disconnect) is in `deferred`; handled next.
            }
            Err(err) => {
                warn!(cause = %err, "link attempt failed");
                let code = match &err {
                    LinkError::Undeliverable { code, .. } => Some(*code),
                    LinkError::Signal { .. } => Some(ErrorCode::ConnRefused),
                    _ => None,
                };
                record(&self.status, self.peer(), code, &err.to_string());
                if let LinkError::KeyRefused {
                    pinned: Some(pinned),
                    presented,
                    ..
                } = &err
                {
                    let (pinned, presented) = (key_fingerprint(pinned), key_fingerprint(presented));
                    self.set(|s| {
                        s.state = PeerState::Refused;
                        s.key_changed = Some((pinned.clone(), presented.clone()));
                    });
                    self.emit(PeerEvent::KeyChanged {
                        peer: self.peer().clone(),
                        pinned,
                        presented,
                    })
                    .await;
                }
                if current.as_ref().is_some_and(|l| !l.is_dead()) {
                    // The old link still works; keep it.
                    return;
                }
                if wanted {
                    if matches!(
                        err,
                        LinkError::KeyRefused {
                            pinned: Some(_),
                            ..
                        }
                    ) {
                        // Retrying cannot help until the pin is removed; check rarely.
                        *retry_at = Some(Instant::now() + self.backoff_max);
                    } else {
                        *retry_at = Some(Instant::now() + self.delay(*attempt));
                        *attempt = attempt.saturating_add(1);
                        self.connecting_failed();
                    }
                }
            }
        }
    }

    /// One setup attempt: dial (`offer: None`) or answer an offer.
    async fn attempt(&mut self, offer: Option<(u64, String)>) -> Result<Link, LinkError> {
        self.connecting();
        let (sid, sdp) = match offer {
            Some((sid, sdp)) => (sid, Some(sdp)),
            None => (random_sid(), None),
        };
        let (catalog, signal, peer) = (
            self.catalog.clone(),
            self.params.signal.clone(),
            self.peer().clone(),
        );
        let check = move |key: [u8; 32]| -> BoxFuture<'static, Result<(), LinkError>> {
            Box::pin(check_key(
                catalog.clone(),
                signal.clone(),
                peer.clone(),
                key,
            ))
        };
        let started = Instant::now();
        let result = link::establish(
            &self.params,
            sid,
            sdp,
            &mut self.inputs,
            &mut self.deferred,
            &check,
        )
        .await;
        if let Ok(link) = &result {
            self.key_fp = Some(key_fingerprint(&link.peer_key));
            debug!(sid, elapsed = ?started.elapsed(), "link established");
        }
        result
    }

    /// The side that does not dial: asks the peer to, then answers its offer.
    async fn call_and_answer(&mut self) -> Result<Link, LinkError> {
        self.connecting();
        self.params
            .signal
            .send(self.peer(), SignalMessage::Call.to_payload())
            .await
            .map_err(|e| LinkError::Signal {
                reason: e.to_string(),
            })?;
        let deadline = Instant::now() + self.params.setup_timeout;
        loop {
            let input = tokio::select! {
                input = self.inputs.recv() => input,
                () = sleep_until(deadline) => return Err(LinkError::Timeout { after: self.params.setup_timeout, stage: "waiting for the peer's offer" }),
            };
            match input {
                None => {
                    return Err(LinkError::Closed {
                        state: "stopped".into(),
                    });
                }
                Some(Input::Signal(SignalMessage::Offer { sid, sdp })) => {
                    return self.attempt(Some((sid, sdp))).await;
                }
                Some(Input::Undeliverable { code, message }) => {
                    return Err(LinkError::Undeliverable { code, message });
                }
                Some(input @ Input::Forget) => {
                    self.deferred = Some(input);
                    return Err(LinkError::Superseded);
                }
                Some(other) => debug!(?other, "ignored while waiting for an offer"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..40 {
            let ceiling = i.saturating_mul(1 << attempt.min(16)).min(m);
            assert_eq!(backoff(i, m, attempt, 0.0), ceiling / 2);
            assert_eq!(backoff(i, m, attempt, 1.0), ceiling);
            let d = backoff(i, m, attempt, jitter());
            assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_wait_out_the_backoff() {
        // The supervisor's retry timer under paused time: the attempt fires at the
        // backoff delay, not before.
        let (i, m) = (Duration::from_millis(500), Duration::from_secs(60));
        let start = Instant::now();
        let mut retry_at = None;
        for attempt in 0..6u32 {
            let d = backoff(i, m, attempt, 0.5);
            retry_at = Some(Instant::now() + d);
            tokio::select! {
                () = at(retry_at) => {}
                () = tokio::time::sleep(d - Duration::from_millis(1)) => {
                    // The shorter sleep wins: the retry has not fired early.
                    at(retry_at).await;
                }
            }
        }
        assert!(retry_at.is_some());
        let total: Duration = (0..6u32).map(|a| backoff(i, m, a, 0.5)).sum();
        assert_eq!(start.elapsed(), total);
    }

    #[test]
    fn turn_credentials_are_split_from_the_url() {
        let s = ice_servers(&[
            "stun:127.0.0.1:3478".into(),
            "turn:alice:s3cret@turn.example.org:3478".into(),
        ]);
        assert_eq!(s[0].urls, vec!["stun:127.0.0.1:3478".to_string()]);
        assert_eq!(s[1].urls, vec!["turn:turn.example.org:3478".to_string()]);
        assert_eq!(
            (s[1].username.as_str(), s[1].credential.as_str()),
            ("alice", "s3cret")
        );
    }
}
