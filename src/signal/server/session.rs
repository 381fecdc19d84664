//! One authenticated WebSocket session: `hello`, then a loop that reads the client's
//! requests (rate-limited), writes what other sessions queued for it, pings it, and
//! closes it with a readable reason when its token expires, it is replaced, it lags,
//! it goes quiet, it misbehaves or the server stops.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::error::ProtocolError as ProtocolViolation;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

use super::limit::Bucket;
use super::router::{ConnHandle, Outgoing, Undelivered};
use super::{Shared, Ws};
use crate::ids::UserName;
use crate::signal::accounts::{AccountsError, KeyCheck};
use crate::signal::protocol::{
    ClientToServer, CloseReason, ErrorCode, MAX_WATCHED, PROTOCOL_VERSION, ProtocolError,
    ServerToClient, escaped, hello_proof_holds,
};
use crate::signal::token::{Claims, TOKEN_LEEWAY_SECS};

/// How long the server waits for the client's answer to its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Users one session may look up by name at once: more than it may watch, so a
/// client that watches everyone it needs at start is never held back.
const LOOKUP_BURST: f64 = (MAX_WATCHED + MAX_WATCHED / 4) as f64;
/// Users one session may look up by name per second, beyond [`LOOKUP_BURST`].
const LOOKUPS_PER_SEC: f64 = 20.0;

/// Messages written in one batch before the socket is flushed.
const WRITE_BATCH: usize = 32;

/// Why the session loop stopped.
enum End {
    /// Close the WebSocket with this reason.
    Close(CloseReason),
    /// The connection is already gone (closed by the client, or broken).
    Gone,
}

/// Runs session `id` until it ends; `permit` is its slot in the connection limit.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut ws: Ws,
    id: u64,
    claims: Claims,
    challenge: &str,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    let user = claims.sub.clone();
    let started = Instant::now();
    let end = match hello(&shared, &mut ws, &claims, challenge).await {
        Ok(()) => {
            // What other sessions relay to this one (presence, messages); bounded in
            // count here and in bytes by the handle's budget.
            let (tx, rx) = mpsc::channel(shared.limits.queue_messages);
            // How a newer session of this user, or a full queue, tells this one to close.
            let (kick_tx, kick) = watch::channel(None);
            let handle = Arc::new(ConnHandle::new(
                id,
                user.clone(),
                tx,
                shared.limits.queue_bytes,
                kick_tx,
                claims.generation,
            ));
            let shared_burst = shared.limits.burst.max(1);
            let mut session = Session {
                deadline: session_deadline(&shared, claims.exp),
                shared,
                ws,
                handle,
                rx,
                kick,
                watched: HashSet::new(),
                bucket: Bucket::new(Instant::now(), f64::from(shared_burst)),
                lookups: Bucket::new(Instant::now(), LOOKUP_BURST),
                last_seen: Instant::now(),
            };
            let end = session.serve().await;
            let watched = std::mem::take(&mut session.watched);
            let away = session
                .shared
                .router()
                .disconnect(&session.handle, &watched);
            announce(&away, id, &user, false);
            ws = session.ws;
            end
        }
        Err(end) => end,
    };
    match end {
        End::Close(reason) => {
            info!(reason = %reason, secs = started.elapsed().as_secs(), "session closed by server");
            close(&mut ws, &reason).await;
        }
        End::Gone => info!(secs = started.elapsed().as_secs(), "session ended"),
    }
}

/// The time at which a session whose token expires at `exp` (Unix seconds) ends.
fn session_deadline(shared: &Shared, exp: u64) -> Instant {
    let left = exp
        .saturating_add(TOKEN_LEEWAY_SECS)
        .saturating_sub(shared.clock.now_unix());
    Instant::now() + Duration::from_secs(left)
}

/// Sends a close frame with `reason`, then waits briefly for the client's close so
/// the reason is not lost to a reset connection.
async fn close(ws: &mut Ws, reason: &CloseReason) {
    let frame = CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.text().into(),
    };
    let _ = timeout(CLOSE_TIMEOUT, async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Waits for `hello`, checks the protocol version, that the client holds the identity
/// key it presents (its signature of `challenge`), and the key itself.
async fn hello(shared: &Shared, ws: &mut Ws, claims: &Claims, challenge: &str) -> Result<(), End> {
    let user = &claims.sub;
    let first = match timeout(shared.limits.handshake_timeout, ws.next()).await {
        Err(_) => {
            return Err(End::Close(CloseReason::Malformed {
                detail: "no hello in time".into(),
            }));
        }
        Ok(None) => return Err(End::Gone),
        Ok(Some(Err(err))) => return Err(ws_error(err)),
        Ok(Some(Ok(message))) => message,
    };
    let Message::Text(text) = first else {
        return Err(End::Close(CloseReason::Malformed {
            detail: "expected hello".into(),
        }));
    };
    let (version, key, proof) = match ClientToServer::decode(&text) {
        Ok(ClientToServer::Hello {
            version,
            identity_key,
            proof,
        }) => (version, identity_key, proof),
        Ok(_) => {
            return Err(End::Close(CloseReason::Malformed {
                detail: "expected hello".into(),
            }));
        }
        Err(err) => return Err(End::Close(protocol_close(err))),
    };
    if version != PROTOCOL_VERSION {
        return Err(End::Close(CloseReason::UnsupportedVersion { version }));
    }
    if !proof.is_some_and(|proof| hello_proof_holds(&key, challenge, user, &proof)) {
        warn!(key = %key, "identity key refused: no valid proof that the client holds it");
        return Err(End::Close(CloseReason::KeyRefused));
    }
    // Revoked between the upgrade and now.
    if shared.current(claims.clone()).is_err() {
        return Err(End::Close(CloseReason::Revoked));
    }
    match shared.accounts.check_key(user.clone(), key).await {
        Ok(KeyCheck::Registered) => {
            info!(key = %key, "identity key registered");
            Ok(())
        }
        Ok(KeyCheck::Matches) => Ok(()),
        Ok(KeyCheck::Differs) => {
            warn!(key = %key, "identity key refused: differs from the registered one");
            Err(End::Close(CloseReason::KeyRefused))
        }
        Ok(KeyCheck::Taken) => {
            warn!(key = %key, "identity key refused: another account registered it");
            Err(End::Close(CloseReason::KeyRefused))
        }
        Err(AccountsError::UnknownUser { .. }) => {
            warn!("token for a user that no longer exists");
            Err(End::Close(CloseReason::KeyRefused))
        }
        Err(err) => {
            warn!(cause = ?err, "account store failed");
            Err(End::Close(CloseReason::ServerError))
        }
    }
}

fn protocol_close(err: ProtocolError) -> CloseReason {
    match err {
        ProtocolError::TooBig { .. } => CloseReason::TooBig,
        ProtocolError::Malformed { reason } => CloseReason::Malformed { detail: reason },
    }
}

fn ws_error(err: WsError) -> End {
    match err {
        WsError::Capacity(_) => End::Close(CloseReason::TooBig),
        // The client went away without a closing handshake: not its message's fault.
        WsError::Protocol(ProtocolViolation::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(e) => End::Close(CloseReason::Malformed {
            detail: escaped(&e.to_string()),
        }),
        WsError::Utf8(e) => End::Close(CloseReason::Malformed {
            detail: escaped(&e),
        }),
        other => {
            debug!(cause = ?other, "connection failed");
            End::Gone
        }
    }
}

/// Tells `watchers` that `user` (session `id`) came online or went away.
fn announce(watchers: &[Arc<ConnHandle>], id: u64, user: &UserName, online: bool) {
    if watchers.is_empty() {
        return;
    }
    let message = ServerToClient::Presence {
        user: user.clone(),
        online,
    };
    let Ok(text) = message.encode() else {
        return;
    };
    for watcher in watchers {
        if let Err(err) = watcher.deliver(id, text.clone().into()) {
            debug!(watcher = %watcher.user, ?err, "presence not delivered");
        }
    }
}

/// A fraction in [0, 1) that differs between consecutive ids (Fibonacci hashing).
fn spread(id: u64) -> f64 {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

struct Session {
    shared: Arc<Shared>,
    ws: Ws,
    /// How other sessions reach this one (also held by the router while online).
    handle: Arc<ConnHandle>,
    /// Messages other sessions queued for this one.
    rx: mpsc::Receiver<Outgoing>,
    /// Set by another session (replacement) or by the router (lagging).
    kick: watch::Receiver<Option<CloseReason>>,
    /// Users this session watches.
    watched: HashSet<UserName>,
    /// When the session's token (plus leeway) expires.
    deadline: Instant,
    bucket: Bucket,
    /// Users looked up by name (watch, get_key, relay to someone offline).
    lookups: Bucket,
    /// Last time anything arrived from the client.
    last_seen: Instant,
}

impl Session {
    fn user(&self) -> &UserName {
        &self.handle.user
    }

    async fn serve(&mut self) -> End {
        let replaced = self.shared.router().connect(self.handle.clone());
        if let Some(old) = replaced {
            info!(old = old.id, "replacing the user's previous connection");
            old.kick(CloseReason::Replaced);
        }
        let expires_in = self
            .deadline
            .saturating_duration_since(Instant::now())
            .as_secs();
        let welcome = ServerToClient::Welcome {
            version: PROTOCOL_VERSION,
            user: self.user().clone(),
            expires_in: expires_in.saturating_sub(TOKEN_LEEWAY_SECS),
            ice_servers: self.ice_servers(),
        };
        if let Err(end) = self.reply(&welcome).await {
            return end;
        }
        info!("session open");

        let limits = self.shared.limits.clone();
        let (rate, burst) = (
            f64::from(limits.frames_per_sec.max(1)),
            f64::from(limits.burst.max(1)),
        );
        let mut stop = self.shared.shutdown.clone();
        // Sessions that connected together (after a restart, say) ping at spread-out
        // times instead of in one wave.
        let first_ping = limits
            .ping_interval
            .mul_f64(0.5 + spread(self.handle.id) / 2.0);
        let mut ping = tokio::time::interval_at(Instant::now() + first_ping, limits.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let expiry = sleep_until(self.deadline);
        tokio::pin!(expiry);
        loop {
            let throttled = self.bucket.ready_at(Instant::now(), rate, burst);
            tokio::select! {
                _ = self.kick.changed() => {
                    let reason = self.kick.borrow().clone().unwrap_or(CloseReason::Shutdown);
                    return End::Close(reason);
                }
                () = super::stopping(&mut stop) => return End::Close(CloseReason::Shutdown),
                () = &mut expiry => {
                    if Instant::now() < self.deadline {
                        // Refreshed since the timer was set.
                        expiry.as_mut().reset(self.deadline);
                        continue;
                    }
                    info!("token expired without refresh");
                    let expired = ServerToClient::Error {
                        code: ErrorCode::TokenExpired,
                        message: "token expired; connect again with a fresh token".into(),
                        user: None,
                        id: None,
                    };
                    let _ = self.reply(&expired).await;
                    return End::Close(CloseReason::TokenExpired);
                }
                _ = ping.tick() => {
                    if self.last_seen.elapsed() >= limits.idle_timeout {
                        info!("no traffic from the client: dropping");
                        return End::Close(CloseReason::Idle);
                    }
                    if let Err(end) = self.write(Message::Ping(Default::default())).await {
                        return end;
                    }
                }
                Some(first) = self.rx.recv() => {
                    if let Err(end) = self.write_queued(first).await {
                        return end;
                    }
                }
                () = sleep_until(throttled.unwrap_or_else(Instant::now)), if throttled.is_some() => {}
                frame = self.ws.next(), if throttled.is_none() => {
                    self.last_seen = Instant::now();
                    self.bucket.take();
                    let message = match frame {
                        None => return End::Gone,
                        Some(Err(err)) => return ws_error(err),
                        Some(Ok(message)) => message,
                    };
                    let result = match message {
                        Message::Text(text) => match ClientToServer::decode(&text) {
                            Ok(request) => self.handle(request).await,
                            Err(err) => Err(End::Close(protocol_close(err))),
                        },
                        Message::Binary(_) => Err(End::Close(CloseReason::Malformed {
                            detail: "binary frames are not part of the protocol".into(),
                        })),
                        Message::Close(_) => Err(End::Gone),
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
                    };
                    if let Err(end) = result {
                        return end;
                    }
                    if self.deadline > expiry.deadline() {
                        expiry.as_mut().reset(self.deadline);
                    }
                }
            }
        }
    }

    /// Writes one frame now (the client's own answers bypass its queue).
    async fn write(&mut self, message: Message) -> Result<(), End> {
        match timeout(self.shared.limits.write_timeout, self.ws.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(ws_error(err)),
            Err(_) => Err(End::Close(CloseReason::Lagging)),
        }
    }

    /// Hands the client the ICE servers, with TURN credentials for it, if the
    /// server has any.
    async fn send_ice_servers(&mut self) -> Result<(), End> {
        if self.shared.ice.is_empty() {
            return Ok(());
        }
        let servers = self.ice_servers();
        self.reply(&ServerToClient::IceServers {
            servers,
            expires_in: crate::signal::ice::TURN_CREDENTIAL_TTL_SECS,
        })
        .await
    }

    /// The ICE servers for this user now, with fresh TURN credentials.
    fn ice_servers(&self) -> Vec<crate::signal::ice::IceServer> {
        crate::signal::ice::servers_for(
            &self.shared.ice,
            self.shared.turn_secret.as_deref(),
            self.user(),
            self.shared.clock.now_unix(),
        )
    }

    async fn reply(&mut self, message: &ServerToClient) -> Result<(), End> {
        match message.encode() {
            Ok(text) => self.write(Message::text(text)).await,
            Err(err) => {
                warn!(cause = %err, "reply not encodable");
                Ok(())
            }
        }
    }

    /// Writes `first` and whatever else is queued (up to a batch), then flushes.
    async fn write_queued(&mut self, first: Outgoing) -> Result<(), End> {
        let write_timeout = self.shared.limits.write_timeout;
        let batch = async {
            self.ws.feed(Message::Text(first.text)).await?;
            for _ in 1..WRITE_BATCH {
                match self.rx.try_recv() {
                    Ok(next) => self.ws.feed(Message::Text(next.text)).await?,
                    Err(_) => break,
                }
            }
            self.ws.flush().await
        };
        match timeout(write_timeout, batch).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(ws_error(err)),
            Err(_) => Err(End::Close(CloseReason::Lagging)),
        }
    }

    async fn error(
        &mut self,
        code: ErrorCode,
        message: String,
        user: Option<UserName>,
        id: Option<u64>,
    ) -> Result<(), End> {
        self.reply(&ServerToClient::Error {
            code,
            message,
            user,
            id,
        })
        .await
    }

    /// `Ok(true)` if `user` has an account. Each lookup counts against the session's
    /// allowance ([`LOOKUP_BURST`], [`LOOKUPS_PER_SEC`]): names cannot be tried in bulk.
    async fn exists(&mut self, user: &UserName) -> Result<bool, End> {
        self.looked_up()?;
        let shared = self.shared.clone();
        shared
            .accounts
            .user_exists(user.clone())
            .await
            .map_err(|err| {
                warn!(cause = ?err, "account store failed");
                End::Close(CloseReason::ServerError)
            })
    }

    /// Counts one lookup of a user by name; closes the session beyond its allowance.
    fn looked_up(&mut self) -> Result<(), End> {
        if self
            .lookups
            .ready_at(Instant::now(), LOOKUPS_PER_SEC, LOOKUP_BURST)
            .is_some()
        {
            return Err(End::Close(CloseReason::Limit {
                detail: "too many users looked up".into(),
            }));
        }
        self.lookups.take();
        Ok(())
    }

    async fn handle(&mut self, request: ClientToServer) -> Result<(), End> {
        match request {
            ClientToServer::Hello { .. } => Err(End::Close(CloseReason::Malformed {
                detail: "hello sent twice".into(),
            })),
            ClientToServer::Relay { to, payload } => self.relay(to, payload).await,
            ClientToServer::Watch { users } => {
                for user in users {
                    if !self.watched.contains(&user) && self.watched.len() >= MAX_WATCHED {
                        return Err(End::Close(CloseReason::Limit {
                            detail: format!("more than {MAX_WATCHED} watched users"),
                        }));
                    }
                    if !self.watched.contains(&user) && !self.exists(&user).await? {
                        let message = format!("cannot watch {user}: {}", ErrorCode::BadDest);
                        self.error(ErrorCode::BadDest, message, Some(user), None)
                            .await?;
                        continue;
                    }
                    // Shown online only if `user` declared this user too; then `user`
                    // learns that this user is online.
                    let seen = self.shared.router().watch(&self.handle, &user);
                    self.watched.insert(user.clone());
                    self.reply(&ServerToClient::Presence {
                        user,
                        online: seen.is_some(),
                    })
                    .await?;
                    if let Some(other) = seen {
                        announce(&[other], self.handle.id, self.user(), true);
                    }
                }
                Ok(())
            }
            ClientToServer::Unwatch { users } => {
                let mut told = Vec::new();
                {
                    let mut router = self.shared.router();
                    for user in users {
                        if self.watched.remove(&user)
                            && let Some(other) = router.unwatch(&self.handle, &user)
                        {
                            told.push(other);
                        }
                    }
                }
                announce(&told, self.handle.id, self.user(), false);
                Ok(())
            }
            ClientToServer::GetKey { id, user } => {
                self.looked_up()?;
                match self.shared.accounts.identity_key(user.clone()).await {
                    Ok(identity_key) => {
                        self.reply(&ServerToClient::Key {
                            id,
                            user,
                            identity_key,
                        })
                        .await
                    }
                    Err(AccountsError::UnknownUser { .. }) => {
                        let message = format!("no key for {user}: {}", ErrorCode::BadDest);
                        self.error(ErrorCode::BadDest, message, Some(user), Some(id))
                            .await
                    }
                    Err(err) => {
                        warn!(cause = ?err, "account store failed");
                        Err(End::Close(CloseReason::ServerError))
                    }
                }
            }
            ClientToServer::Refresh { token } => {
                let now = self.shared.clock.now_unix();
                let checked = self
                    .shared
                    .token_key
                    .verify(&token, now)
                    .and_then(|claims| self.shared.current(claims));
                match checked {
                    Ok(claims) if claims.sub == *self.user() => {
                        self.handle.set_generation(claims.generation);
                        self.deadline = session_deadline(&self.shared, claims.exp);
                        debug!(exp = claims.exp, "session refreshed");
                        self.reply(&ServerToClient::Refreshed {
                            expires_in: claims.exp.saturating_sub(now),
                        })
                        .await?;
                        // Fresh TURN credentials with every refresh.
                        self.send_ice_servers().await
                    }
                    Ok(claims) => {
                        warn!(other = %claims.sub, "refresh with another user's token");
                        let message = format!(
                            "{}: token is for {}, not {}",
                            ErrorCode::InvalidToken,
                            claims.sub,
                            self.user()
                        );
                        self.error(ErrorCode::InvalidToken, message, None, None)
                            .await
                    }
                    Err(err) => self.error(err.code(), err.to_string(), None, None).await,
                }
            }
        }
    }

    async fn relay(&mut self, to: UserName, payload: serde_json::Value) -> Result<(), End> {
        let recipient = self.shared.router().lookup(&to);
        let undelivered = match recipient {
            Some(recipient) => {
                let message = ServerToClient::Relay {
                    from: self.user().clone(),
                    payload,
                };
                let text = message
                    .encode()
                    .map_err(|err| End::Close(protocol_close(err)))?;
                match recipient.deliver(self.handle.id, text.into()) {
                    Ok(()) => return Ok(()),
                    Err(Undelivered::Gone) => "went away",
                    Err(Undelivered::Busy) => {
                        "has more of your messages waiting than it may queue: this one was dropped"
                    }
                }
            }
            None => "is not connected",
        };
        let code = if self.exists(&to).await? {
            ErrorCode::NoDest
        } else {
            ErrorCode::BadDest
        };
        let message = match code {
            ErrorCode::BadDest => format!("{code}: no user {to}"),
            _ => format!("{code}: {to} {undelivered}"),
        };
        debug!(%to, %code, "relay failed");
        self.error(code, message, Some(to), None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_sessions_ping_at_spread_out_times() {
        let mut firsts: Vec<f64> = (0..100).map(spread).collect();
        assert!(firsts.iter().all(|f| (0.0..1.0).contains(f)));
        firsts.sort_by(f64::total_cmp);
        let widest_gap = firsts.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        assert!(widest_gap < 0.05, "{widest_gap}");
    }
}
