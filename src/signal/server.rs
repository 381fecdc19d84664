//! `brume server`: one listener serving `POST /token` (credential → access token) and
//! the WebSocket upgrade at `/`, after which each connection is a [`session`] that
//! relays setup messages and presence through the [`router`].
//!
//! The entry point is [`run`], which takes a bound listener and a shutdown future so
//! tests can start and stop a server in-process.

mod limit;
mod router;
mod session;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{Instrument, debug, info, info_span, warn};

use super::accounts::{AccountStore, Accounts, AccountsError};
use super::protocol::{CHALLENGE_HEADER, CloseReason, ErrorCode, HttpError, MAX_MESSAGE_BYTES};
use super::token::{
    Claims, Clock, DEFAULT_TOKEN_TTL_SECS, MAX_TOKEN_TTL_SECS, TokenError, TokenKey, TokenRequest,
    TokenResponse,
};
use crate::ids::UserName;
use limit::{Counted, Keyed, Tally, address_key};
use router::Router;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The account database could not be opened.
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    /// The listener failed.
    #[error("listener: {source}")]
    Listener {
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Per-connection and global limits. The defaults suit a real deployment; tests
/// shorten the timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most WebSocket sessions at once; further upgrades are answered 503.
    pub max_connections: usize,
    /// Bytes of messages queued for one connection; any one sender may fill a quarter,
    /// and what does not fit is refused to its sender.
    pub queue_bytes: usize,
    /// Messages queued for one connection, shared among senders like `queue_bytes`.
    pub queue_messages: usize,
    /// Sustained frames per second one connection may send; faster senders are
    /// throttled (the server stops reading from them).
    pub frames_per_sec: u32,
    /// Frames one connection may send in a burst above the sustained rate.
    pub burst: u32,
    /// How often the server pings an otherwise quiet connection.
    pub ping_interval: Duration,
    /// A connection that sent nothing (not even a pong) for this long is dropped.
    pub idle_timeout: Duration,
    /// Time allowed for the TLS handshake and HTTP request and, after the upgrade,
    /// for `hello`: everything a client does before it is authenticated.
    pub handshake_timeout: Duration,
    /// Most connections open at once from one address (an IPv6 /64) before they
    /// are authenticated; further ones are closed at once.
    pub unauthenticated_per_address: usize,
    /// Most connections open at once, over all addresses, before they are
    /// authenticated (also bounded by a quarter of the open-file limit).
    pub max_unauthenticated: usize,
    /// Most sessions (upgraded connections, with or without `hello`) one account may
    /// have open at once; further upgrades are answered 429.
    pub sessions_per_account: usize,
    /// `POST /token` requests and refused upgrades one address may make: a burst
    /// of this many, then `attempts_per_sec`; beyond, 429.
    pub attempts_burst: u32,
    /// See `attempts_burst`.
    pub attempts_per_sec: f64,
    /// Refused `POST /token` attempts for one account: a burst of this many, then
    /// `account_refusals_per_sec`; beyond, wrong credentials are answered 429.
    pub account_refusals_burst: u32,
    /// See `account_refusals_burst`.
    pub account_refusals_per_sec: f64,
    /// Whether loopback clients (a reverse proxy on the same machine, local tools)
    /// are exempt from the per-address limits.
    pub exempt_loopback: bool,
    /// Time allowed to write one batch of messages to a connection.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 25_000,
            queue_bytes: 256 * 1024,
            queue_messages: 256,
            frames_per_sec: 100,
            burst: 200,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            unauthenticated_per_address: 32,
            max_unauthenticated: 4096,
            sessions_per_account: 4,
            attempts_burst: 60,
            attempts_per_sec: 2.0,
            account_refusals_burst: 10,
            account_refusals_per_sec: 0.2,
            exempt_loopback: true,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// What a server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The account database (created if missing).
    pub db: PathBuf,
    /// Limits.
    pub limits: Limits,
    /// Source of time for token checks.
    pub clock: Clock,
    /// TLS: serve `wss://` and `https://` (else plain `ws://` and `http://`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// STUN/TURN server URLs handed to every client (`--ice`).
    pub ice: Vec<String>,
    /// The secret shared with the TURN server, for the credentials handed out
    /// with `turn:`/`turns:` URLs (`--turn-secret-file`).
    pub turn_secret: Option<Vec<u8>>,
}

impl ServerConfig {
    /// A config with default limits, the system clock and no TLS.
    pub fn new(db: PathBuf) -> Self {
        Self {
            db,
            limits: Limits::default(),
            clock: Clock::System,
            tls: None,
            ice: Vec::new(),
            turn_secret: None,
        }
    }
}

/// State shared by every connection of one server.
struct Shared {
    accounts: AccountStore,
    token_key: TokenKey,
    limits: Limits,
    clock: Clock,
    /// Who is online and who watches whom. A plain mutex: it is held for map
    /// operations only, never across an await.
    router: Mutex<Router>,
    /// One permit per open WebSocket session, so their number (and memory) is bounded.
    sessions: Arc<Semaphore>,
    /// Flips to `true` when the server shuts down; every task watches it.
    shutdown: watch::Receiver<bool>,
    /// Connection ids, for logs and for telling a replaced connection from its successor.
    next_id: std::sync::atomic::AtomicU64,
    /// TLS, if the server speaks it.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// ICE server URLs handed out, and the TURN shared secret.
    ice: Vec<String>,
    turn_secret: Option<Vec<u8>>,
    /// Connections not yet authenticated: in all, and per address.
    unauthenticated: Arc<Semaphore>,
    unauthenticated_by_address: Counted<IpAddr>,
    /// Sessions per account.
    sessions_by_account: Counted<UserName>,
    /// Token requests and refused upgrades per address; refused credentials per account.
    attempts_by_address: Keyed<IpAddr>,
    refusals_by_account: Keyed<UserName>,
    /// What was refused, logged in aggregate.
    refused_tokens: Tally,
    refused_upgrades: Tally,
    refused_connections: Tally,
    /// Token generation of each account whose tokens were ever revoked; others are 0.
    generations: Mutex<std::collections::HashMap<UserName, u64>>,
}

/// Locks `m`. The server's mutexes guard maps and counters held for a few map
/// operations, never across an await: a panic while one is held cannot leave them
/// in a state that matters more than stopping the whole server would.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Whether per-address limits apply to `ip`.
    fn limits_address(&self, ip: IpAddr) -> bool {
        !(self.limits.exempt_loopback && ip.to_canonical().is_loopback())
    }

    /// The generation `user`'s tokens must have (see `Claims::generation`).
    fn generation(&self, user: &UserName) -> u64 {
        lock(&self.generations).get(user).copied().unwrap_or(0)
    }

    /// `claims`, unless the account's tokens were revoked after they were minted.
    fn current(&self, claims: Claims) -> Result<Claims, TokenError> {
        if claims.generation < self.generation(&claims.sub) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// Takes one attempt from `peer`'s allowance; `Err(wait)` when it has none left.
    fn attempt(&self, peer: SocketAddr) -> Result<(), Duration> {
        if !self.limits_address(peer.ip()) {
            return Ok(());
        }
        self.attempts_by_address.take(&address_key(peer.ip()))
    }

    fn router(&self) -> std::sync::MutexGuard<'_, Router> {
        lock(&self.router)
    }
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        // Small buffers: most connections are idle, and messages are small.
        .read_buffer_size(4096)
        .write_buffer_size(8192)
        .max_write_buffer_size(MAX_MESSAGE_BYTES * 4)
        // Checked on the frame header, before the payload is read.
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// Serves on `listener` until `shutdown` completes, then closes every connection
/// (close code 1001) and returns once they are gone.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let accounts = Accounts::open(&config.db)?;
    let token_key = accounts.token_key()?;
    let (mut revocations_seen, generations) = accounts.token_generations()?;
    let accounts = AccountStore::spawn(accounts)?;
    // Shutdown signal for every task: the accept loop flips it, HTTP connections and
    // sessions watch it.
    let (stop, stopped) = watch::channel(false);
    // Every connection task holds a clone of `done`; when all are dropped, `all_done`
    // yields `None` and shutdown is complete (mini-redis's pattern).
    let (done, mut all_done) = mpsc::channel::<()>(1);
    let (max_sessions, max_unauthenticated) = connection_caps(&config.limits);
    let limits = &config.limits;
    let shared = Arc::new(Shared {
        accounts,
        token_key,
        sessions: Arc::new(Semaphore::new(max_sessions)),
        unauthenticated: Arc::new(Semaphore::new(max_unauthenticated)),
        unauthenticated_by_address: Counted::new(limits.unauthenticated_per_address),
        sessions_by_account: Counted::new(limits.sessions_per_account),
        attempts_by_address: Keyed::new(limits.attempts_per_sec, f64::from(limits.attempts_burst)),
        refusals_by_account: Keyed::new(
            limits.account_refusals_per_sec,
            f64::from(limits.account_refusals_burst),
        ),
        refused_tokens: Tally::new("token requests"),
        refused_upgrades: Tally::new("WebSocket upgrades"),
        refused_connections: Tally::new("connections"),
        generations: Mutex::new(generations.into_iter().collect()),
        limits: config.limits,
        clock: config.clock,
        router: Mutex::new(Router::default()),
        shutdown: stopped,
        next_id: Default::default(),
        tls: config.tls.map(tokio_rustls::TlsAcceptor::from),
        ice: config.ice,
        turn_secret: config.turn_secret,
    });
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listener { source })?;
    info!(
        %addr,
        db = %config.db.display(),
        tls = shared.tls.is_some(),
        max_sessions,
        max_unauthenticated,
        "signaling server listening"
    );

    tokio::pin!(shutdown);
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    // `revoke-tokens` and `reset-key` write to the database from another process:
    // picked up here within a second.
    let mut revocations = tokio::time::interval(REVOCATION_POLL);
    revocations.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = revocations.tick() => apply_revocations(&shared, &mut revocations_seen).await,
            _ = prune.tick() => {
                shared.attempts_by_address.prune();
                shared.refusals_by_account.prune();
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(admitted) = admit(&shared, peer) else {
                        // Closed at once: it holds no descriptor and no task.
                        continue;
                    };
                    let span = info_span!("http", %peer);
                    // One task per TCP connection: serves its HTTP request and, after an
                    // upgrade, hands over to the session task.
                    tokio::spawn(serve_http(shared.clone(), stream, peer, done.clone(), admitted).instrument(span));
                }
                Err(err) => {
                    // Usually EMFILE: wait for connections to close rather than spin.
                    warn!(cause = ?err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    info!("shutting down");
    stop.send_replace(true);
    drop(done);
    drop(shared);
    let _ = all_done.recv().await;
    info!("stopped");
    Ok(())
}

/// How often the server looks for revocations made by `brume server revoke-tokens`
/// and `reset-key`.
const REVOCATION_POLL: Duration = Duration::from_secs(1);

/// Applies the revocations logged after `seen`: tokens of older generations are
/// refused from now on, and sessions opened with one are closed.
async fn apply_revocations(shared: &Shared, seen: &mut i64) {
    let revoked = match shared.accounts.revocations_since(*seen).await {
        Ok(revoked) => revoked,
        Err(err) => {
            warn!(cause = ?err, "cannot read revocations from the account store");
            return;
        }
    };
    for revocation in revoked {
        *seen = revocation.seq;
        {
            let mut generations = lock(&shared.generations);
            let current = generations.entry(revocation.name.clone()).or_default();
            *current = (*current).max(revocation.token_gen);
        }
        let session = shared.router().lookup(&revocation.name);
        if let Some(session) = session
            && session.generation() < revocation.token_gen
        {
            info!(user = %revocation.name, "tokens revoked: closing the session");
            session.kick(CloseReason::Revoked);
        }
    }
}

/// What a connection holds until it is authenticated (or closed): its place among
/// the unauthenticated connections, in all and for its address.
struct Admitted {
    _all: tokio::sync::OwnedSemaphorePermit,
    _address: Option<limit::CountGuard<IpAddr>>,
}

/// Admits a new connection from `peer`, or refuses it (it is then closed at once)
/// when its address or the server has as many unauthenticated connections open as
/// allowed.
fn admit(shared: &Shared, peer: SocketAddr) -> Option<Admitted> {
    let address = if shared.limits_address(peer.ip()) {
        match shared
            .unauthenticated_by_address
            .open(&address_key(peer.ip()))
        {
            Some(guard) => Some(guard),
            None => {
                shared.refused_connections.refused(
                    "too many unauthenticated connections from this address",
                    &peer.ip().to_string(),
                    true,
                );
                return None;
            }
        }
    } else {
        None
    };
    let Ok(all) = shared.unauthenticated.clone().try_acquire_owned() else {
        shared.refused_connections.refused(
            "too many unauthenticated connections in all",
            &peer.ip().to_string(),
            true,
        );
        return None;
    };
    Some(Admitted {
        _all: all,
        _address: address,
    })
}

/// The most sessions, and the most unauthenticated connections, this process can hold
/// with its open-file limit: every connection is a descriptor, and running out of
/// them would refuse everyone (including the account database) rather than answer 503.
fn connection_caps(limits: &Limits) -> (usize, usize) {
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlimit) } == 0 {
        usize::try_from(rlimit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    // Kept for the database, the listener, logs and the runtime.
    let budget = files.saturating_sub(64).max(32);
    let unauthenticated = limits.max_unauthenticated.min(budget / 4).max(8);
    let sessions = limits
        .max_connections
        .min(budget.saturating_sub(unauthenticated))
        .max(1);
    if sessions < limits.max_connections {
        info!(
            open_file_limit = files,
            sessions,
            "the open-file limit allows fewer sessions than configured; raise it (ulimit -n) for more"
        );
    }
    (sessions, unauthenticated)
}

async fn serve_http(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    done: mpsc::Sender<()>,
    admitted: Admitted,
) {
    // Released when the request has been served: an upgraded session is then
    // counted as a session.
    let _admitted = admitted;
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = shared.tls.clone() else {
        return serve_io(shared, stream, peer, done).await;
    };
    // The TLS handshake counts against the same deadline as the request.
    let mut stop = shared.shutdown.clone();
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(stream)) => accepted,
        () = stopping(&mut stop) => return,
    };
    match accepted {
        Ok(Ok(tls)) => serve_io(shared, tls, peer, done).await,
        Ok(Err(err)) => debug!(cause = %err, "TLS handshake failed"),
        Err(_) => debug!("TLS handshake timed out"),
    }
}

/// Serves the HTTP request (and any WebSocket upgrade) of one connection.
async fn serve_io<I>(shared: Arc<Shared>, io: I, peer: SocketAddr, done: mpsc::Sender<()>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    let mut stop = shared.shutdown.clone();
    let service_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        handle(service_shared.clone(), peer, req, done.clone())
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        served = tokio::time::timeout(limits.handshake_timeout, conn) => match served {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!(cause = ?err, "http connection failed"),
            Err(_) => debug!("http request timed out"),
        },
        () = stopping(&mut stop) => {}
    }
}

/// Completes when the server starts shutting down.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the server is gone: that is shutdown too.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn http_error(
    status: StatusCode,
    error: &str,
    message: impl Into<String>,
) -> Response<Full<Bytes>> {
    json_response(
        status,
        &HttpError {
            error: error.to_owned(),
            message: message.into(),
        },
    )
}

fn code_error(code: ErrorCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST);
    http_error(status, code.name(), message)
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    done: mpsc::Sender<()>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::POST, "/token") => token_endpoint(&shared, peer, req).await,
        (&Method::GET, "/") => upgrade(shared, peer, req, done),
        (_, "/" | "/token") => http_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            "use GET / (WebSocket) or POST /token",
        ),
        _ => http_error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    };
    debug!(status = %response.status(), "answered");
    Ok(response)
}

/// A 429 answer telling the client to wait `wait`.
fn too_many(wait: Duration, message: &str) -> Response<Full<Bytes>> {
    let mut response = http_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// `POST /token`: `{username, credential, ttl?}` → `{token, expires_in}`.
async fn token_endpoint(
    shared: &Shared,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let client = peer.ip().to_string();
    if let Err(wait) = shared.attempt(peer) {
        shared
            .refused_tokens
            .refused("too many requests from this address", &client, true);
        return too_many(
            wait,
            "too many token requests from this address; try again later",
        );
    }
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            return http_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body",
                format!("request body: {err}"),
            );
        }
    };
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                "body",
                format!("malformed request: {err}"),
            );
        }
    };
    let user = request.username.clone();
    let generation = match shared
        .accounts
        .credential_generation(request.username, request.credential)
        .await
    {
        Ok(Some(generation)) => generation,
        Ok(None) => {
            // Wrong credentials for one account beyond its allowance are answered 429:
            // the right credential still gets its token.
            if let Err(wait) = shared.refusals_by_account.take(&user) {
                shared.refused_tokens.refused(
                    &format!("too many wrong credentials for {user}"),
                    &client,
                    true,
                );
                return too_many(
                    wait,
                    "too many wrong credentials for this account; try again later",
                );
            }
            shared.refused_tokens.refused(
                &format!("unknown user or wrong credential for {user}"),
                &client,
                false,
            );
            return http_error(
                StatusCode::FORBIDDEN,
                "credential",
                "unknown user or wrong credential",
            );
        }
        Err(err) => {
            warn!(cause = ?err, "account store failed");
            return http_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "account store failed",
            );
        }
    };
    let ttl = request
        .ttl
        .unwrap_or(DEFAULT_TOKEN_TTL_SECS)
        .clamp(1, MAX_TOKEN_TTL_SECS);
    let now = shared.clock.now_unix();
    match shared
        .token_key
        .mint_generation(&user, now, now + ttl, generation)
    {
        Ok(token) => {
            debug!(%user, ttl, "token issued");
            json_response(
                StatusCode::OK,
                &TokenResponse {
                    token,
                    expires_in: ttl,
                },
            )
        }
        Err(err) => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            err.to_string(),
        ),
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The access token of an upgrade request: `Authorization: Bearer T`, else `?token=T`.
fn request_token(req: &Request<Incoming>) -> Option<&str> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    bearer
        .or_else(|| {
            req.uri()
                .query()?
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))
        })
        .filter(|t| !t.is_empty())
}

/// `GET /` with `Upgrade: websocket`: checks the token, answers 101 and starts the
/// session; or answers 400/401/406 (token) or 503 (full) with a JSON body.
fn upgrade(
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    done: mpsc::Sender<()>,
) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let is_websocket = header_has_token(headers, header::UPGRADE, "websocket")
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_websocket)
    else {
        return http_error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint only accepts WebSocket upgrades",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let claims = match request_token(&req) {
        None => Err(TokenError::Missing),
        Some(token) => shared
            .token_key
            .verify(token, shared.clock.now_unix())
            .and_then(|claims| shared.current(claims)),
    };
    let claims = match claims {
        Ok(claims) => claims,
        Err(err) => {
            let client = peer.ip().to_string();
            if let Err(wait) = shared.attempt(peer) {
                shared.refused_upgrades.refused(
                    "too many refused upgrades from this address",
                    &client,
                    true,
                );
                return too_many(
                    wait,
                    "too many refused upgrades from this address; try again later",
                );
            }
            shared
                .refused_upgrades
                .refused(&err.to_string(), &client, false);
            return code_error(err.code(), err.to_string());
        }
    };
    let Some(account_slot) = shared.sessions_by_account.open(&claims.sub) else {
        shared.refused_upgrades.refused(
            &format!("{} has too many sessions open", claims.sub),
            &peer.ip().to_string(),
            true,
        );
        return http_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions",
            format!(
                "this account has {} sessions open already",
                shared.limits.sessions_per_account
            ),
        );
    };
    let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
        shared.refused_upgrades.refused(
            "the server is at its session limit",
            &peer.ip().to_string(),
            true,
        );
        return code_error(
            ErrorCode::ConnRefused,
            "the server is at its connection limit",
        );
    };
    let mut challenge = [0u8; 32];
    if let Err(err) = super::accounts::random_bytes(&mut challenge) {
        warn!(cause = %err, "no randomness for a challenge");
        return http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "cannot make a challenge",
        );
    }
    let challenge =
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, challenge);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = info_span!("session", user = %claims.sub, conn = id, %peer);
    let challenge_sent = challenge.clone();
    // The session's task: lives as long as the WebSocket, holds the session permit and
    // a `done` handle so shutdown waits for it.
    tokio::spawn(
        async move {
            let _done = done;
            let _account_slot = account_slot;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ws = Ws::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(ws_config()),
                    )
                    .await;
                    session::run(shared, ws, id, claims, &challenge_sent, permit).await;
                }
                Err(err) => debug!(cause = ?err, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Ok(challenge) = HeaderValue::from_str(&challenge) {
        headers.insert(CHALLENGE_HEADER, challenge);
    }
    response
}
