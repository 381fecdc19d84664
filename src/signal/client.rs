//! The client side of signaling, for the daemon and the peer link: a [`SignalClient`]
//! handle to send setup messages, watch users and look up identity keys; a receiver of
//! [`SignalEvent`]s; and a [`SignalStatus`] watch for `brume status`.
//!
//! One task per client keeps the connection up: it fetches a token with the account's
//! credential, connects, says `hello`, refreshes the token before it expires,
//! reconnects with exponential backoff and jitter, and re-sends its watches after
//! every reconnect.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{Instrument, debug, info, info_span, warn};

use super::protocol::{
    CHALLENGE_HEADER, ClientToServer, CloseReason, ErrorCode, HttpError, IdentityKey,
    MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ServerToClient, hello_proof,
};
use super::token::{DEFAULT_TOKEN_TTL_SECS, TokenRequest, TokenResponse};
use crate::config::Config;
use crate::ids::UserName;

/// Time allowed for TCP connect, each HTTP exchange and the `hello`/`welcome` exchange.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the client pings the server.
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// A connection that brought nothing (not even a pong) for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Commands queued from handles to the connection task.
const COMMAND_QUEUE: usize = 64;
/// Events queued for the consumer; when full, the client stops reading the socket.
const EVENT_QUEUE: usize = 256;
/// Users per `watch`/`unwatch` message, so each stays far below the size limit
/// (a name is at most 64 bytes).
const WATCH_CHUNK: usize = 256;

/// Errors of the signaling client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server URL in `brume.conf` is not one the client can use.
    #[error("server URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server's TLS certificate was refused: the connection is not made
    /// (never tried again without TLS).
    #[error("{url}: the server's TLS certificate is refused: {reason}")]
    Certificate {
        /// The URL.
        url: String,
        /// Why, in words.
        reason: String,
    },
    /// TLS could not be set up on this side (an unreadable `server_ca`, say).
    #[error("{url}: {reason}")]
    Tls {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server could not be reached.
    #[error("{code} ({url}): {reason}", code = ErrorCode::ConnRefused)]
    Unreachable {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server refused with one of the protocol's error codes (token refused at the
    /// upgrade, unknown user in a key lookup, server full, …).
    #[error("{message}")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// What the server said.
        message: String,
    },
    /// The server refused the account's credential.
    #[error(
        "credential refused for {user}: {message} (ask the server's administrator for a new brume.conf)"
    )]
    Credential {
        /// The account.
        user: UserName,
        /// What the server said.
        message: String,
    },
    /// The server closed the connection with a reason.
    #[error("closed by the server: {reason}")]
    Closed {
        /// Its reason.
        reason: CloseReason,
    },
    /// The server did not follow the protocol (or HTTP failed in another way).
    #[error("protocol error: {reason}")]
    Protocol {
        /// What happened.
        reason: String,
    },
    /// No connection to the server at the moment.
    #[error("not connected to the signaling server")]
    NotConnected,
    /// A message would exceed the protocol's size limit.
    #[error("message to {to} is too big: {reason}")]
    TooBig {
        /// The recipient.
        to: UserName,
        /// Sizes.
        reason: String,
    },
    /// The client task has stopped.
    #[error("signaling client stopped")]
    Stopped,
}

impl ClientError {
    /// The protocol error code, for `brume status`, if the error has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Unreachable { .. } => Some(ErrorCode::ConnRefused),
            ClientError::Refused { code, .. } => Some(*code),
            ClientError::Closed {
                reason: CloseReason::TokenExpired,
            } => Some(ErrorCode::TokenExpired),
            _ => None,
        }
    }

    fn protocol(reason: impl Into<String>) -> Self {
        ClientError::Protocol {
            reason: reason.into(),
        }
    }
}

/// What a client needs to connect.
#[derive(Clone)]
pub struct ClientConfig {
    /// WebSocket URL of the server (`ws://host:port/` or `wss://…`).
    pub server_url: String,
    /// Extra certificates to trust for a `wss://` server (PEM), beyond the OS's.
    pub server_ca: Option<PathBuf>,
    /// The account.
    pub username: UserName,
    /// Its long-lived credential.
    pub credential: String,
    /// This client's identity key.
    pub identity: SigningKey,
    /// Lifetime to ask for access tokens, in seconds.
    pub token_ttl: u64,
    /// First reconnect delay; doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server_url", &self.server_url)
            .field("username", &self.username)
            .field("token_ttl", &self.token_ttl)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// The client config for a `brume.conf` and an identity key.
    pub fn new(config: &Config, identity: SigningKey) -> Self {
        Self {
            server_url: config.server_url.clone(),
            server_ca: config.server_ca.clone(),
            username: config.username.clone(),
            credential: config.credential.clone(),
            identity,
            token_ttl: DEFAULT_TOKEN_TTL_SECS,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Something that arrived from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalEvent {
    /// A setup message from another user; `from` was set by the server.
    Message {
        /// The sender.
        from: UserName,
        /// What it sent.
        payload: serde_json::Value,
    },
    /// A watched user came online or went away (also sent once per watched user after
    /// each connect, with its current state).
    Presence {
        /// The user.
        user: UserName,
        /// Whether it is connected.
        online: bool,
    },
    /// A message or watch could not be served: `ENODEST` (user offline) or
    /// `EBADDEST` (no such user).
    Undeliverable {
        /// The user it was for.
        to: UserName,
        /// Why.
        code: ErrorCode,
        /// The server's words.
        message: String,
    },
}

/// State of the connection to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    /// Fetching a token or connecting.
    Connecting,
    /// Connected and authenticated.
    Connected,
    /// Waiting before the next attempt.
    Disconnected,
    /// Given up: another connection of this account replaced this one, or every
    /// handle was dropped.
    Stopped,
}

/// The last connection-level problem, as `brume status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastError {
    /// Its protocol code (`ECONNREFUSED`, `401`, …), if it has one.
    pub code: Option<ErrorCode>,
    /// What happened, in words.
    pub message: String,
    /// When, in Unix seconds.
    pub at_unix: u64,
}

/// What the client is doing, for `brume status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignalStatus {
    /// Connection state.
    pub state: ConnState,
    /// The last connection-level error, kept after recovery so it can be shown.
    pub last_error: Option<LastError>,
    /// Successful connects so far.
    pub connects: u64,
    /// Token refreshes the server accepted during sessions so far.
    pub refreshes: u64,
    /// The STUN/TURN servers the server handed out last (with their TURN
    /// credentials: never written to a status file).
    #[serde(skip)]
    pub ice_servers: Vec<super::ice::IceServer>,
}

/// Commands from handles to the connection task.
enum Command {
    /// An encoded `relay` message.
    Send {
        to: UserName,
        text: String,
    },
    Watch(Vec<UserName>),
    Unwatch(Vec<UserName>),
    GetKey {
        user: UserName,
        reply: oneshot::Sender<Result<Option<IdentityKey>, ClientError>>,
    },
}

/// A handle to a signaling client. Cheap to clone; the connection closes when the last
/// handle is dropped.
#[derive(Clone)]
pub struct SignalClient {
    /// To the connection task. Bounded: senders wait when the task is busy.
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<SignalStatus>,
}

impl std::fmt::Debug for SignalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalClient")
            .field("status", &*self.status.borrow())
            .finish()
    }
}

/// Starts a client on the current tokio runtime. Returns its handle and the receiver
/// of what arrives; if the receiver is not drained, the client stops reading from the
/// server (which eventually drops it as lagging).
pub fn connect(config: ClientConfig) -> (SignalClient, mpsc::Receiver<SignalEvent>) {
    // Handles → connection task: sends, watches, key lookups.
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    // Connection task → consumer: messages, presence, undeliverable notices.
    let (events, event_rx) = mpsc::channel(EVENT_QUEUE);
    // Connection task → anyone asking (`brume status`): state and last error.
    let (status_tx, status) = watch::channel(SignalStatus {
        state: ConnState::Connecting,
        last_error: None,
        connects: 0,
        refreshes: 0,
        ice_servers: Vec::new(),
    });
    let span = info_span!("signal", user = %config.username, server = %config.server_url);
    // The connection task: owns the WebSocket; ends when every handle is dropped.
    tokio::spawn(
        Connection {
            config,
            commands: command_rx,
            events,
            status: status_tx,
            watched: BTreeSet::new(),
            pending: HashMap::new(),
            next_id: AtomicU64::new(1),
        }
        .run()
        .instrument(span),
    );
    (SignalClient { commands, status }, event_rx)
}

impl SignalClient {
    async fn command(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| ClientError::Stopped)
    }

    /// Sends `payload` to `to` through the server. Fails at once when not connected or
    /// when the message would exceed [`MAX_MESSAGE_BYTES`]; otherwise delivery failures
    /// arrive later as [`SignalEvent::Undeliverable`].
    pub async fn send(&self, to: &UserName, payload: serde_json::Value) -> Result<(), ClientError> {
        if self.status.borrow().state != ConnState::Connected {
            return Err(ClientError::NotConnected);
        }
        let message = ClientToServer::Relay {
            to: to.clone(),
            payload,
        };
        let text = message.encode().map_err(|e| ClientError::TooBig {
            to: to.clone(),
            reason: e.to_string(),
        })?;
        self.command(Command::Send {
            to: to.clone(),
            text,
        })
        .await
    }

    /// Watches these users from now on (kept across reconnects).
    pub async fn watch(
        &self,
        users: impl IntoIterator<Item = UserName>,
    ) -> Result<(), ClientError> {
        self.command(Command::Watch(users.into_iter().collect()))
            .await
    }

    /// Stops watching these users.
    pub async fn unwatch(
        &self,
        users: impl IntoIterator<Item = UserName>,
    ) -> Result<(), ClientError> {
        self.command(Command::Unwatch(users.into_iter().collect()))
            .await
    }

    /// The identity key `user` registered with the server (`None`: never connected).
    /// An unknown user is `Refused { code: BadDest }`.
    pub async fn identity_key(&self, user: &UserName) -> Result<Option<IdentityKey>, ClientError> {
        // The connection task answers when the server's `key` (or error) arrives.
        let (reply, answer) = oneshot::channel();
        self.command(Command::GetKey {
            user: user.clone(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| ClientError::Stopped)?
    }

    /// The client's state; `changed()` on it wakes on every change.
    pub fn status(&self) -> watch::Receiver<SignalStatus> {
        self.status.clone()
    }

    /// Waits until the client is connected.
    pub async fn connected(&self) -> Result<(), ClientError> {
        let mut status = self.status.clone();
        let state = status
            .wait_for(|s| matches!(s.state, ConnState::Connected | ConnState::Stopped))
            .await
            .map_err(|_| ClientError::Stopped)?
            .state;
        match state {
            ConnState::Connected => Ok(()),
            _ => Err(ClientError::Stopped),
        }
    }
}

/// Where to reach a server, from its `ws://` URL.
/// A byte stream to the server: plain TCP or TLS over it.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The stream a connection to the server runs on.
pub type Stream = Box<dyn Io>;

#[derive(Clone)]
struct Target {
    url: String,
    authority: String,
    host: String,
    port: u16,
    token_path: String,
    /// For `wss://`: what to trust.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// The server at `url`; for `wss://`, trusting the OS's roots and
    /// `server_ca`.
    fn parse(url: &str, server_ca: Option<&Path>) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("must start with ws:// or wss://")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let base = uri.path().trim_end_matches('/');
        let tls = match secure {
            true => Some(
                super::tls::client_config(server_ca).map_err(|e| ClientError::Tls {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?,
            ),
            false => None,
        };
        Ok(Self {
            url: url.to_owned(),
            authority: authority.as_str().to_owned(),
            host,
            port: authority
                .port_u16()
                .unwrap_or(if secure { 443 } else { 80 }),
            token_path: format!("{base}/token"),
            tls,
        })
    }

    /// Connects, and for `wss://` completes TLS: a certificate problem is an
    /// error of its own, never a reason to try without TLS.
    async fn connect(&self) -> Result<Stream, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let stream = timeout(
            STEP_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(stream));
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
            ClientError::Url {
                url: self.url.clone(),
                reason: format!("not a TLS server name: {e}"),
            }
        })?;
        let handshake = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream);
        match timeout(STEP_TIMEOUT, handshake).await {
            Err(_) => Err(unreachable("TLS handshake timed out".into())),
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(e)) => Err(match super::tls::certificate_problem(&e) {
                Some(reason) => ClientError::Certificate {
                    url: self.url.clone(),
                    reason,
                },
                None => unreachable(format!("TLS handshake: {e}")),
            }),
        }
    }
}

/// Exchanges an account's credential for an access token (`POST /token`).
pub async fn fetch_token(
    server_url: &str,
    server_ca: Option<&Path>,
    username: &UserName,
    credential: &str,
    ttl: Option<u64>,
) -> Result<TokenResponse, ClientError> {
    let target = Target::parse(server_url, server_ca)?;
    fetch_token_at(&target, username, credential, ttl).await
}

async fn fetch_token_at(
    target: &Target,
    username: &UserName,
    credential: &str,
    ttl: Option<u64>,
) -> Result<TokenResponse, ClientError> {
    let body = serde_json::to_vec(&TokenRequest {
        username: username.clone(),
        credential: credential.to_owned(),
        ttl,
    })
    .map_err(|e| ClientError::protocol(e.to_string()))?;
    let stream = target.connect().await?;
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::protocol(format!("token request: {e}")))?;
        // Drives the HTTP connection while `sender` makes the one request; ends with it.
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(cause = ?err, "token connection failed");
            }
        });
        let request = Request::post(target.token_path.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::protocol(format!("token request: {e}")))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), 16 * 1024)
            .collect()
            .await
            .map_err(|e| ClientError::protocol(format!("token response: {e}")))?
            .to_bytes();
        Ok::<_, ClientError>((status, body))
    };
    let (status, body) = timeout(STEP_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::protocol("token request timed out"))??;
    if status == StatusCode::OK {
        return serde_json::from_slice(&body)
            .map_err(|e| ClientError::protocol(format!("token response: {e}")));
    }
    let message = serde_json::from_slice::<HttpError>(&body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
    Err(match status {
        StatusCode::FORBIDDEN => ClientError::Credential {
            user: username.clone(),
            message,
        },
        _ => match ErrorCode::from_status(status.as_u16()) {
            Some(code) => ClientError::Refused { code, message },
            None => ClientError::protocol(format!("token request: HTTP {status}: {message}")),
        },
    })
}

type Ws = WebSocketStream<Stream>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8192)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_MESSAGE_BYTES * 4)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// Opens a WebSocket to the server with `token` (no `hello` yet).
pub async fn open_websocket(
    server_url: &str,
    server_ca: Option<&Path>,
    token: &str,
) -> Result<WebSocketStream<Stream>, ClientError> {
    let target = Target::parse(server_url, server_ca)?;
    Ok(open_at(&target, token).await?.0)
}

/// Upgrades to a WebSocket with `token`; returns it with the server's challenge for
/// `hello`.
async fn open_at(target: &Target, token: &str) -> Result<(Ws, String), ClientError> {
    let mut request = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Url {
            url: target.url.clone(),
            reason: e.to_string(),
        })?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ClientError::protocol("token is not a valid header value"))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let stream = target.connect().await?;
    let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()));
    match timeout(STEP_TIMEOUT, handshake).await {
        Err(_) => Err(ClientError::protocol("WebSocket handshake timed out")),
        Ok(Ok((ws, response))) => {
            let challenge = response
                .headers()
                .get(CHALLENGE_HEADER)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    ClientError::protocol(
                        "the server sent no challenge with the upgrade (an older brume server?)",
                    )
                })?;
            Ok((ws, challenge.to_owned()))
        }
        Ok(Err(WsError::Http(response))) => {
            let status = response.status().as_u16();
            let message = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<HttpError>(b).ok())
                .map(|e| e.message)
                .unwrap_or_else(|| format!("HTTP {status}"));
            Err(match ErrorCode::from_status(status) {
                Some(code) => ClientError::Refused { code, message },
                None => ClientError::protocol(format!("upgrade refused: HTTP {status}: {message}")),
            })
        }
        Ok(Err(err)) => Err(ClientError::protocol(format!("WebSocket handshake: {err}"))),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// How a session ended.
enum SessionEnd {
    /// Every handle was dropped: close and stop.
    Dropped,
    /// The connection failed or was closed; reconnect.
    Failed(ClientError),
}

type Refreshing = Pin<Box<dyn Future<Output = Result<TokenResponse, ClientError>> + Send>>;

/// The connection task's state.
struct Connection {
    config: ClientConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<SignalEvent>,
    status: watch::Sender<SignalStatus>,
    /// Users to watch; re-sent after every reconnect.
    watched: BTreeSet<UserName>,
    /// Key lookups waiting for their answer, by request id.
    pending: HashMap<u64, oneshot::Sender<Result<Option<IdentityKey>, ClientError>>>,
    next_id: AtomicU64,
}

impl Connection {
    fn set_state(&self, state: ConnState) {
        self.status.send_modify(|s| {
            s.state = state;
            if state == ConnState::Connected {
                s.connects += 1;
            }
        });
    }

    fn record(&self, err: &ClientError) {
        warn!(code = ?err.code().map(ErrorCode::name), cause = %err, "signaling problem");
        self.status.send_modify(|s| {
            s.last_error = Some(LastError {
                code: err.code(),
                message: err.to_string(),
                at_unix: now_unix(),
            })
        });
    }

    fn fail_pending(&mut self) {
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(ClientError::NotConnected));
        }
    }

    async fn run(mut self) {
        let mut attempt: u32 = 0;
        let target = match Target::parse(&self.config.server_url, self.config.server_ca.as_deref())
        {
            Ok(target) => target,
            Err(err) => {
                self.record(&err);
                self.set_state(ConnState::Stopped);
                return;
            }
        };
        loop {
            self.set_state(ConnState::Connecting);
            let mut fatal = false;
            match self.open(&target).await {
                Ok((ws, expires_in)) => {
                    attempt = 0;
                    self.set_state(ConnState::Connected);
                    info!("connected");
                    match self.session(&target, ws, expires_in).await {
                        SessionEnd::Dropped => {
                            self.set_state(ConnState::Stopped);
                            return;
                        }
                        SessionEnd::Failed(err) => {
                            self.record(&err);
                            if let ClientError::Closed {
                                reason: CloseReason::Replaced,
                            } = err
                            {
                                // Another client of this account took over; fighting it
                                // would only make both flap.
                                self.set_state(ConnState::Stopped);
                                return;
                            }
                        }
                    }
                }
                Err(err) => {
                    fatal = matches!(
                        err,
                        ClientError::Credential { .. }
                            | ClientError::Closed {
                                reason: CloseReason::KeyRefused
                                    | CloseReason::UnsupportedVersion { .. }
                            }
                    );
                    self.record(&err);
                }
            }
            self.fail_pending();
            self.set_state(ConnState::Disconnected);
            let delay = if fatal {
                self.config.backoff_max
            } else {
                backoff(&self.config, attempt)
            };
            attempt = attempt.saturating_add(1);
            debug!(?delay, "reconnecting later");
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    () = sleep_until(wake) => break,
                    command = self.commands.recv() => match command {
                        None => {
                            self.set_state(ConnState::Stopped);
                            return;
                        }
                        Some(command) => self.offline(command),
                    },
                }
            }
        }
    }

    /// Serves a command while disconnected.
    fn offline(&mut self, command: Command) {
        match command {
            Command::Send { to, .. } => debug!(%to, "dropped: not connected"),
            Command::Watch(users) => self.watched.extend(users),
            Command::Unwatch(users) => {
                for user in users {
                    self.watched.remove(&user);
                }
            }
            Command::GetKey { reply, .. } => {
                let _ = reply.send(Err(ClientError::NotConnected));
            }
        }
    }

    /// Token, WebSocket, `hello`, `welcome`. Returns the socket and the token's lifetime.
    async fn open(&self, target: &Target) -> Result<(Ws, u64), ClientError> {
        let config = &self.config;
        let token = fetch_token_at(
            target,
            &config.username,
            &config.credential,
            Some(config.token_ttl),
        )
        .await?;
        let (mut ws, challenge) = open_at(target, &token.token).await?;
        let hello = ClientToServer::Hello {
            version: PROTOCOL_VERSION,
            identity_key: IdentityKey::from(config.identity.verifying_key()),
            proof: Some(hello_proof(&config.identity, &challenge, &config.username)),
        };
        send(&mut ws, &hello).await?;
        let welcome = timeout(STEP_TIMEOUT, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return ServerToClient::decode(&text)
                            .map_err(|e| ClientError::protocol(e.to_string()));
                    }
                    Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => return Err(ClientError::protocol(err.to_string())),
                    None => return Err(ClientError::protocol("connection closed before welcome")),
                }
            }
        })
        .await
        .map_err(|_| ClientError::protocol("no welcome in time"))??;
        match welcome {
            ServerToClient::Welcome {
                user, ice_servers, ..
            } if user == config.username => {
                self.status.send_modify(|s| s.ice_servers = ice_servers);
                Ok((ws, token.expires_in))
            }
            other => Err(ClientError::protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    async fn session(&mut self, target: &Target, mut ws: Ws, expires_in: u64) -> SessionEnd {
        let watched: Vec<UserName> = self.watched.iter().cloned().collect();
        for users in watched.chunks(WATCH_CHUNK) {
            let watch = ClientToServer::Watch {
                users: users.to_vec(),
            };
            if let Err(err) = send(&mut ws, &watch).await {
                return SessionEnd::Failed(err);
            }
        }
        let mut refresh_at = Instant::now() + refresh_delay(expires_in);
        let mut refreshing: Option<Refreshing> = None;
        let mut last_seen = Instant::now();
        let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        let _ = timeout(STEP_TIMEOUT, ws.close(None)).await;
                        return SessionEnd::Dropped;
                    };
                    if let Err(err) = self.online(&mut ws, command).await {
                        return SessionEnd::Failed(err);
                    }
                }
                frame = ws.next() => {
                    last_seen = Instant::now();
                    match frame {
                        None => return SessionEnd::Failed(ClientError::protocol("connection closed")),
                        Some(Err(err)) => return SessionEnd::Failed(ClientError::protocol(err.to_string())),
                        Some(Ok(Message::Close(frame))) => return SessionEnd::Failed(closed(frame)),
                        Some(Ok(Message::Text(text))) => match ServerToClient::decode(&text) {
                            Ok(message) => self.incoming(message).await,
                            Err(err) => warn!(cause = %err, "ignoring a malformed message from the server"),
                        },
                        Some(Ok(_)) => {}
                    }
                }
                () = sleep_until(refresh_at), if refreshing.is_none() => {
                    let (target, user, credential, ttl) = (
                        target.clone(),
                        self.config.username.clone(),
                        self.config.credential.clone(),
                        self.config.token_ttl,
                    );
                    refreshing = Some(Box::pin(async move {
                        fetch_token_at(&target, &user, &credential, Some(ttl)).await
                    }));
                }
                token = refreshed(&mut refreshing), if refreshing.is_some() => {
                    refreshing = None;
                    match token {
                        Ok(token) => {
                            debug!(expires_in = token.expires_in, "token refreshed");
                            refresh_at = Instant::now() + refresh_delay(token.expires_in);
                            if let Err(err) = send(&mut ws, &ClientToServer::Refresh { token: token.token }).await {
                                return SessionEnd::Failed(err);
                            }
                        }
                        Err(err) => {
                            // The session lives until the old token expires; retry soon.
                            self.record(&err);
                            refresh_at = Instant::now() + Duration::from_secs(5);
                        }
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() >= IDLE_TIMEOUT {
                        return SessionEnd::Failed(ClientError::protocol("server stopped answering"));
                    }
                    if let Err(err) = ws.send(Message::Ping(Default::default())).await {
                        return SessionEnd::Failed(ClientError::protocol(err.to_string()));
                    }
                }
            }
        }
    }

    async fn online(&mut self, ws: &mut Ws, command: Command) -> Result<(), ClientError> {
        match command {
            Command::Send { to, text } => {
                debug!(%to, "relay");
                ws.send(Message::text(text))
                    .await
                    .map_err(|e| ClientError::protocol(e.to_string()))
            }
            Command::Watch(users) => {
                let new: Vec<UserName> = users
                    .into_iter()
                    .filter(|u| self.watched.insert(u.clone()))
                    .collect();
                for users in new.chunks(WATCH_CHUNK) {
                    let users = users.to_vec();
                    send(ws, &ClientToServer::Watch { users }).await?;
                }
                Ok(())
            }
            Command::Unwatch(users) => {
                let gone: Vec<UserName> = users
                    .into_iter()
                    .filter(|u| self.watched.remove(u))
                    .collect();
                for users in gone.chunks(WATCH_CHUNK) {
                    let users = users.to_vec();
                    send(ws, &ClientToServer::Unwatch { users }).await?;
                }
                Ok(())
            }
            Command::GetKey { user, reply } => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.pending.insert(id, reply);
                send(ws, &ClientToServer::GetKey { id, user }).await
            }
        }
    }

    async fn incoming(&mut self, message: ServerToClient) {
        let event = match message {
            ServerToClient::Relay { from, payload } => SignalEvent::Message { from, payload },
            ServerToClient::Presence { user, online } => SignalEvent::Presence { user, online },
            ServerToClient::Key {
                id, identity_key, ..
            } => {
                if let Some(reply) = self.pending.remove(&id) {
                    let _ = reply.send(Ok(identity_key));
                }
                return;
            }
            ServerToClient::Error {
                code,
                message,
                user,
                id,
            } => {
                if let Some(reply) = id.and_then(|id| self.pending.remove(&id)) {
                    let _ = reply.send(Err(ClientError::Refused { code, message }));
                    return;
                }
                match user {
                    Some(to) => SignalEvent::Undeliverable { to, code, message },
                    None => {
                        self.record(&ClientError::Refused { code, message });
                        return;
                    }
                }
            }
            ServerToClient::Refreshed { expires_in } => {
                debug!(expires_in, "session extended");
                self.status.send_modify(|s| s.refreshes += 1);
                return;
            }
            ServerToClient::Welcome { .. } => return,
            ServerToClient::IceServers {
                servers,
                expires_in,
            } => {
                debug!(
                    servers = servers.len(),
                    expires_in, "ICE servers from the server"
                );
                self.status.send_modify(|s| s.ice_servers = servers);
                return;
            }
        };
        // A dropped receiver means nobody listens; the connection still serves sends.
        let _ = self.events.send(event).await;
    }
}

async fn send(ws: &mut Ws, message: &ClientToServer) -> Result<(), ClientError> {
    let text = message
        .encode()
        .map_err(|e| ClientError::protocol(e.to_string()))?;
    ws.send(Message::text(text))
        .await
        .map_err(|e| ClientError::protocol(e.to_string()))
}

fn closed(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> ClientError {
    match frame {
        Some(frame) => ClientError::Closed {
            reason: CloseReason::from_close(u16::from(frame.code), &frame.reason),
        },
        None => ClientError::protocol("closed without a reason"),
    }
}

/// The result of the token refresh under way; never completes if there is none.
async fn refreshed(refreshing: &mut Option<Refreshing>) -> Result<TokenResponse, ClientError> {
    match refreshing {
        Some(fetch) => fetch.await,
        None => std::future::pending().await,
    }
}

/// When to refresh a token that lives `expires_in` seconds: at three quarters of it.
fn refresh_delay(expires_in: u64) -> Duration {
    Duration::from_millis(expires_in.saturating_mul(750).max(500))
}

/// Exponential backoff with jitter: a random delay in the upper half of
/// `initial * 2^attempt`, capped at `max`.
fn backoff(config: &ClientConfig, attempt: u32) -> Duration {
    let ceiling = config
        .backoff_initial
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(config.backoff_max);
    let mut random = [0u8; 4];
    // Without randomness, no jitter: still correct, just less spread.
    let _ = getrandom::fill(&mut random);
    let fraction = f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX);
    ceiling.mul_f64(0.5 + fraction / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let config = ClientConfig {
            server_url: "ws://127.0.0.1:1/".into(),
            server_ca: None,
            username: UserName::new("a").unwrap(),
            credential: String::new(),
            identity: SigningKey::from_bytes(&[1; 32]),
            token_ttl: 60,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        };
        for attempt in 0..40 {
            let d = backoff(&config, attempt);
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(5));
            assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn token_url_follows_the_server_url() {
        let t = Target::parse("ws://127.0.0.1:8787/", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.token_path.as_str()),
            ("127.0.0.1", 8787, "/token")
        );
        assert!(t.tls.is_none());
        let t = Target::parse("ws://[::1]:9/brume", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.token_path.as_str()),
            ("::1", 9, "/brume/token")
        );
        let t = Target::parse("wss://example.org/", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("example.org", 443));
        assert!(t.tls.is_some());
        assert!(Target::parse("http://example.org/", None).is_err());
    }

    proptest::proptest! {
        #[test]
        fn server_urls_never_panic(
            url in proptest::prop_oneof![
                "\\PC{0,40}",
                "(ws|WS|wss|http)://[a-z0-9.:@\\[\\]%-]{0,20}(:[0-9]{0,6})?(/[a-z/?#%]{0,10})?",
            ],
        ) {
            if let Ok(t) = Target::parse(&url, None) {
                let lower = url.to_ascii_lowercase();
                proptest::prop_assert!(lower.starts_with("ws://") || lower.starts_with("wss://"), "{}", url);
                proptest::prop_assert!(t.token_path.ends_with("/token"));
                proptest::prop_assert!(t.token_path.starts_with('/'), "{}", t.token_path);
            }
        }
    }
}
