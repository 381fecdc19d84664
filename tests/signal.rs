//! Signaling server integration tests: a real server on `127.0.0.1:0`, started and
//! stopped in-process through `brume::signal::server::run`, spoken to by raw WebSocket
//! clients (to check every status, close code and forged field) and by the client
//! library; and once through the real `brume server` binary.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::TestCa;
use brume::config::Config;
use brume::ids::UserName;
use brume::signal::ErrorCode;
use brume::signal::accounts::Accounts;
use brume::signal::client::{self, ClientConfig, ClientError, ConnState, SignalEvent};
use brume::signal::protocol::{
    CHALLENGE_HEADER, ClientToServer, CloseReason, HttpError, IdentityKey, MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION, ServerToClient, hello_proof,
};
use brume::signal::server::{self, Limits, ServerConfig, ServerError};
use brume::signal::token::{Clock, TOKEN_LEEWAY_SECS, TokenKey};
use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Longest wait for any one expected event; only reached when a test fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Awaits `future`, failing the test instead of hanging if it takes too long.
pub(crate) async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("completed in time")
}

/// A server running in this test's runtime; stopped when dropped.
pub(crate) struct TestServer {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) db: PathBuf,
    pub(crate) addr: SocketAddr,
    pub(crate) url: String,
    pub(crate) clock: Clock,
    pub(crate) key: TokenKey,
    pub(crate) accounts: Accounts,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub(crate) async fn start() -> Self {
        Self::with_limits(Limits::default()).await
    }

    pub(crate) async fn with_limits(limits: Limits) -> Self {
        Self::with(limits, None).await
    }

    /// A server speaking `wss://` and `https://` with `tls`.
    async fn with_tls(tls: std::sync::Arc<rustls::ServerConfig>) -> Self {
        Self::with(Limits::default(), Some(tls)).await
    }

    async fn with(limits: Limits, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> Self {
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("server.db");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clock = Clock::tokio();
        let config = ServerConfig {
            db: db.clone(),
            limits,
            clock,
            tls,
            ice: Vec::new(),
            turn_secret: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async {
            let _ = stopped.await;
        }));
        let accounts = Accounts::open(&db).unwrap();
        let key = accounts.token_key().unwrap();
        Self {
            _dir: dir,
            db,
            addr,
            url: format!("{scheme}://{addr}/"),
            clock,
            key,
            accounts,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) fn add_user(&self, name: &str) -> (UserName, String) {
        let user = UserName::new(name).unwrap();
        let credential = self.accounts.add_user(&user).unwrap();
        (user, credential)
    }

    /// A token for `user` as `POST /token` would mint it now: of the account's
    /// current generation, valid for `ttl` seconds from the server's now.
    pub(crate) fn token_for(&self, user: &UserName, ttl: u64) -> String {
        let now = self.clock.now_unix();
        let (_, generations) = self.accounts.token_generations().unwrap();
        let generation = generations
            .into_iter()
            .find_map(|(u, g)| (u == *user).then_some(g))
            .unwrap_or(0);
        self.key
            .mint_generation(user, now, now + ttl, generation)
            .unwrap()
    }

    pub(crate) fn client_config(&self, user: &UserName, credential: &str) -> ClientConfig {
        ClientConfig {
            server_url: self.url.clone(),
            server_ca: None,
            username: user.clone(),
            credential: credential.to_owned(),
            identity: random_identity(),
            token_ttl: 600,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
        }
    }

    pub(crate) async fn stop(mut self) {
        drop(self.stop.take());
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub(crate) fn random_identity() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    SigningKey::from_bytes(&seed)
}

/// An upgraded connection, with the challenge its `hello` must sign.
#[derive(Debug)]
pub(crate) struct Upgraded {
    pub(crate) ws: Ws,
    pub(crate) challenge: String,
}

impl Upgraded {
    /// The `hello` of `user` holding `key`, with its proof.
    pub(crate) fn hello(&self, user: &UserName, key: &SigningKey) -> ClientToServer {
        ClientToServer::Hello {
            version: PROTOCOL_VERSION,
            identity_key: IdentityKey::from(key.verifying_key()),
            proof: Some(hello_proof(key, &self.challenge, user)),
        }
    }
}

impl std::ops::Deref for Upgraded {
    type Target = Ws;
    fn deref(&self) -> &Ws {
        &self.ws
    }
}

impl std::ops::DerefMut for Upgraded {
    fn deref_mut(&mut self) -> &mut Ws {
        &mut self.ws
    }
}

/// A WebSocket upgrade with `token` in the header (or the query), or the refusal.
pub(crate) async fn upgrade(
    addr: SocketAddr,
    token: Option<&str>,
    in_query: bool,
) -> Result<Upgraded, (u16, HttpError)> {
    let url = match (token, in_query) {
        (Some(token), true) => format!("ws://{addr}/?token={token}"),
        _ => format!("ws://{addr}/"),
    };
    let mut request = url.into_client_request().unwrap();
    if let (Some(token), false) = (token, in_query) {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((ws, response)) => Ok(Upgraded {
            ws,
            challenge: response.headers()[CHALLENGE_HEADER]
                .to_str()
                .unwrap()
                .to_owned(),
        }),
        Err(WsError::Http(response)) => {
            let status = response.status().as_u16();
            let body: HttpError =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .expect("JSON error body");
            Err((status, body))
        }
        Err(other) => panic!("handshake failed: {other}"),
    }
}

pub(crate) async fn send(ws: &mut Ws, message: &ClientToServer) {
    ws.send(Message::text(message.encode().unwrap()))
        .await
        .unwrap();
}

/// The next protocol message; panics on close or silence.
pub(crate) async fn recv(ws: &mut Ws) -> ServerToClient {
    loop {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time");
        match frame {
            Some(Ok(Message::Text(text))) => return ServerToClient::decode(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame; returns its code and reason.
pub(crate) async fn recv_close(ws: &mut Ws) -> (u16, String) {
    loop {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a close in time");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Connects as `user` with `key`, says hello, and checks the welcome.
pub(crate) async fn join_with(server: &TestServer, user: &UserName, key: &SigningKey) -> Ws {
    let token = server.token_for(user, 600);
    login(server.addr, &token, user, key).await
}

/// Upgrades with `token`, says hello as `user` holding `key`, and checks the welcome.
pub(crate) async fn login(addr: SocketAddr, token: &str, user: &UserName, key: &SigningKey) -> Ws {
    let mut ws = upgrade(addr, Some(token), false).await.unwrap();
    let hello = ws.hello(user, key);
    send(&mut ws, &hello).await;
    match recv(&mut ws).await {
        ServerToClient::Welcome { user: who, .. } => assert_eq!(&who, user),
        other => panic!("expected welcome, got {other:?}"),
    }
    ws.ws
}

/// Connects as `user` with its usual identity key.
pub(crate) async fn join(server: &TestServer, user: &UserName) -> Ws {
    join_with(server, user, &key_of(user)).await
}

/// A fixed identity key per user name, so reconnecting users present the same key.
pub(crate) fn key_of(user: &UserName) -> SigningKey {
    SigningKey::from_bytes(blake3::hash(user.as_str().as_bytes()).as_bytes())
}

/// Declares `users` (a `watch`).
pub(crate) async fn watch(ws: &mut Ws, users: &[&UserName]) {
    let users = users.iter().map(|u| (*u).clone()).collect();
    send(ws, &ClientToServer::Watch { users }).await;
}

pub(crate) fn relay(to: &UserName, payload: serde_json::Value) -> ClientToServer {
    ClientToServer::Relay {
        to: to.clone(),
        payload,
    }
}

#[tokio::test]
async fn upgrade_without_token_is_400() {
    let server = TestServer::start().await;
    let (status, body) = upgrade(server.addr, None, false).await.unwrap_err();
    assert_eq!(status, 400);
    assert_eq!(body.error, "400");
    assert!(body.message.contains("missing token"), "{body:?}");
}

#[tokio::test]
async fn invalid_tampered_or_foreign_tokens_are_406() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let good = server.token_for(&alice, 600);

    // Payload changed to another user, signature kept.
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let (bob, _) = server.add_user("bob");
    let bobs = server.token_for(&bob, 600);
    parts[1] = bobs.split('.').nth(1).unwrap().to_owned();
    let tampered = parts.join(".");

    let foreign = TokenKey::from_secret(b"not the server's secret at all!!")
        .mint(
            &alice,
            server.clock.now_unix(),
            server.clock.now_unix() + 600,
        )
        .unwrap();
    // Same secret, another algorithm.
    let now = server.clock.now_unix();
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &serde_json::json!({"sub": "alice", "iat": now, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    // The classic: "alg": "none" and no signature.
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(serde_json::json!({"sub": "alice", "iat": now, "exp": now + 600}))
    );

    for (what, token) in [
        ("garbage", "not-a-token".to_owned()),
        ("tampered", tampered),
        ("foreign key", foreign),
        ("HS512", hs512),
        ("alg none", none),
    ] {
        let (status, body) = upgrade(server.addr, Some(&token), false).await.unwrap_err();
        assert_eq!(
            (status, body.error.as_str()),
            (406, "406"),
            "{what}: {body:?}"
        );
    }
    // The untouched token works, in the header and in the query.
    upgrade(server.addr, Some(&good), false).await.unwrap();
    upgrade(server.addr, Some(&good), true).await.unwrap();
}

#[tokio::test]
async fn expired_token_is_401() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let now = server.clock.now_unix();
    let expired = server
        .key
        .mint(&alice, now - 3600, now - TOKEN_LEEWAY_SECS - 1)
        .unwrap();
    let (status, body) = upgrade(server.addr, Some(&expired), true)
        .await
        .unwrap_err();
    assert_eq!((status, body.error.as_str()), (401, "401"), "{body:?}");
    assert!(body.message.contains("token expired"), "{body:?}");
    // Within the clock-skew tolerance it is still accepted.
    let barely = server.key.mint(&alice, now - 3600, now - 1).unwrap();
    upgrade(server.addr, Some(&barely), false).await.unwrap();
}

#[tokio::test]
async fn relay_carries_the_sender_from_its_token_not_its_message() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let mut a = join(&server, &alice).await;
    let mut b = join(&server, &bob).await;

    // A forged `from` (and any other extra field) is ignored: bob sees alice.
    let forged = r#"{"type":"relay","to":"bob","from":"mallory","payload":{"sdp":"offer"}}"#;
    a.send(Message::text(forged)).await.unwrap();
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Relay {
            from: alice.clone(),
            payload: serde_json::json!({"sdp": "offer"}),
        }
    );
    send(&mut b, &relay(&alice, serde_json::json!({"sdp": "answer"}))).await;
    assert_eq!(
        recv(&mut a).await,
        ServerToClient::Relay {
            from: bob.clone(),
            payload: serde_json::json!({"sdp": "answer"}),
        }
    );
}

#[tokio::test]
async fn unknown_recipient_is_ebaddest_404_and_offline_one_enodest_410() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (carol, _) = server.add_user("carol");
    let mut a = join(&server, &alice).await;

    let nobody = UserName::new("nobody").unwrap();
    send(&mut a, &relay(&nobody, serde_json::json!(1))).await;
    match recv(&mut a).await {
        ServerToClient::Error { code, user, .. } => {
            assert_eq!((code, code.status()), (ErrorCode::BadDest, 404));
            assert_eq!(user, Some(nobody));
        }
        other => panic!("expected EBADDEST, got {other:?}"),
    }
    send(&mut a, &relay(&carol, serde_json::json!(1))).await;
    match recv(&mut a).await {
        ServerToClient::Error {
            code,
            user,
            message,
            ..
        } => {
            assert_eq!((code, code.status()), (ErrorCode::NoDest, 410));
            assert_eq!(user, Some(carol));
            assert!(message.starts_with("ENODEST (410)"), "{message}");
        }
        other => panic!("expected ENODEST, got {other:?}"),
    }
}

#[tokio::test]
async fn watchers_are_told_when_users_come_and_go() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let mut b = join(&server, &bob).await;
    let ghost = UserName::new("ghost").unwrap();
    send(
        &mut b,
        &ClientToServer::Watch {
            users: vec![alice.clone(), ghost.clone()],
        },
    )
    .await;
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Presence {
            user: alice.clone(),
            online: false
        }
    );
    match recv(&mut b).await {
        ServerToClient::Error { code, user, .. } => {
            assert_eq!((code, user), (ErrorCode::BadDest, Some(ghost)));
        }
        other => panic!("expected EBADDEST for an unknown watch, got {other:?}"),
    }
    let mut a = join(&server, &alice).await;
    // Alice has not declared bob: bob is told nothing of her.
    send(&mut b, &relay(&bob, serde_json::json!("before"))).await;
    assert!(
        matches!(recv(&mut b).await, ServerToClient::Relay { .. }),
        "no presence of a user who did not declare bob"
    );
    // Once she does, each sees the other.
    watch(&mut a, &[&bob]).await;
    assert_eq!(
        recv(&mut a).await,
        ServerToClient::Presence {
            user: bob.clone(),
            online: true
        }
    );
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Presence {
            user: alice.clone(),
            online: true
        }
    );
    a.close(None).await.unwrap();
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Presence {
            user: alice.clone(),
            online: false
        }
    );
    // After unwatching, nothing more is said about alice.
    send(
        &mut b,
        &ClientToServer::Unwatch {
            users: vec![alice.clone()],
        },
    )
    .await;
    let mut a = join(&server, &alice).await;
    watch(&mut a, &[&bob]).await;
    assert_eq!(
        recv(&mut a).await,
        ServerToClient::Presence {
            user: bob.clone(),
            online: false
        },
        "bob no longer declares alice"
    );
    send(&mut b, &relay(&bob, serde_json::json!("marker"))).await;
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Relay {
            from: bob.clone(),
            payload: serde_json::json!("marker")
        },
        "no presence event before the marker"
    );
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one_with_a_reason() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let key = random_identity();
    let mut b = join(&server, &bob).await;
    watch(&mut b, &[&alice]).await;
    let _ = recv(&mut b).await;
    let mut old = join_with(&server, &alice, &key).await;
    watch(&mut old, &[&bob]).await;
    let _ = recv(&mut old).await;
    assert!(matches!(
        recv(&mut b).await,
        ServerToClient::Presence { online: true, .. }
    ));
    let mut new = join_with(&server, &alice, &key).await;
    let (code, reason) = recv_close(&mut old).await;
    assert_eq!(
        CloseReason::from_close(code, &reason),
        CloseReason::Replaced
    );
    assert!(reason.contains("replaced"), "{reason}");
    // Messages reach the new connection, and watchers saw no flap.
    send(&mut b, &relay(&alice, serde_json::json!("hi"))).await;
    assert_eq!(
        recv(&mut new).await,
        ServerToClient::Relay {
            from: bob.clone(),
            payload: serde_json::json!("hi")
        }
    );
    send(&mut b, &relay(&bob, serde_json::json!("marker"))).await;
    assert!(matches!(recv(&mut b).await, ServerToClient::Relay { .. }));
}

#[tokio::test]
async fn malformed_messages_close_the_connection_with_a_reason() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    for (what, frame) in [
        ("not JSON", Message::text("{nope")),
        (
            "unknown type",
            Message::text(r#"{"type":"shout","to":"x"}"#),
        ),
        (
            "bad user name",
            Message::text(r#"{"type":"relay","to":"../etc","payload":1}"#),
        ),
        ("binary", Message::binary(vec![1u8, 2, 3])),
        (
            "second hello",
            Message::text(
                ClientToServer::Hello {
                    version: PROTOCOL_VERSION,
                    identity_key: IdentityKey::from(random_identity().verifying_key()),
                    proof: None,
                }
                .encode()
                .unwrap(),
            ),
        ),
    ] {
        let mut ws = join(&server, &alice).await;
        ws.send(frame).await.unwrap();
        let (code, reason) = recv_close(&mut ws).await;
        assert!(
            matches!(
                CloseReason::from_close(code, &reason),
                CloseReason::Malformed { .. }
            ),
            "{what}: {code} {reason}"
        );
        assert!(reason.starts_with("malformed message"), "{what}: {reason}");
    }
    // Garbage instead of hello, and a hello of a future version.
    let token = server.token_for(&alice, 600);
    let mut ws = upgrade(server.addr, Some(&token), false).await.unwrap();
    ws.send(Message::text("[]")).await.unwrap();
    let (code, _) = recv_close(&mut ws).await;
    assert_eq!(
        code,
        CloseReason::Malformed {
            detail: String::new()
        }
        .code()
    );
    let mut ws = upgrade(server.addr, Some(&token), false).await.unwrap();
    send(
        &mut ws,
        &ClientToServer::Hello {
            version: PROTOCOL_VERSION + 1,
            identity_key: IdentityKey::from(random_identity().verifying_key()),
            proof: None,
        },
    )
    .await;
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!(
        code,
        CloseReason::UnsupportedVersion { version: 0 }.code(),
        "{reason}"
    );
    // The server is still serving.
    join(&server, &alice).await;
}

#[tokio::test]
async fn oversized_frames_close_the_connection_with_1009() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let mut b = join(&server, &bob).await;
    let mut a = join(&server, &alice).await;
    let big = format!(
        r#"{{"type":"relay","to":"bob","payload":"{}"}}"#,
        "x".repeat(MAX_MESSAGE_BYTES)
    );
    a.send(Message::text(big)).await.unwrap();
    let (code, reason) = recv_close(&mut a).await;
    assert_eq!(code, 1009, "{reason}");
    assert_eq!(CloseReason::from_close(code, &reason), CloseReason::TooBig);
    // Just under the limit passes.
    let mut a = join(&server, &alice).await;
    let envelope = r#"{"type":"relay","to":"bob","payload":""}"#.len();
    let payload = "y".repeat(MAX_MESSAGE_BYTES - envelope - 16);
    send(&mut a, &relay(&bob, serde_json::json!(payload))).await;
    assert!(matches!(recv(&mut b).await, ServerToClient::Relay { .. }));
}

#[tokio::test]
async fn token_expiry_during_a_session_closes_it_with_401() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let token = server.token_for(&alice, 5);
    let mut ws = upgrade(server.addr, Some(&token), false).await.unwrap();
    let hello = ws.hello(&alice, &random_identity());
    send(&mut ws, &hello).await;
    assert!(matches!(
        recv(&mut ws).await,
        ServerToClient::Welcome { .. }
    ));

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(5 + TOKEN_LEEWAY_SECS + 1)).await;
    match recv(&mut ws).await {
        ServerToClient::Error { code, .. } => assert_eq!(code, ErrorCode::TokenExpired),
        other => panic!("expected 401, got {other:?}"),
    }
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!(
        CloseReason::from_close(code, &reason),
        CloseReason::TokenExpired
    );
    assert!(reason.contains("401"), "{reason}");
}

#[tokio::test]
async fn refresh_extends_a_session_beyond_its_first_token() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let token = server.token_for(&alice, 5);
    let mut ws = upgrade(server.addr, Some(&token), false).await.unwrap();
    let hello = ws.hello(&alice, &random_identity());
    send(&mut ws, &hello).await;
    assert!(matches!(
        recv(&mut ws).await,
        ServerToClient::Welcome { .. }
    ));
    // Someone else's token is refused, and changes nothing.
    send(
        &mut ws,
        &ClientToServer::Refresh {
            token: server.token_for(&bob, 600),
        },
    )
    .await;
    assert!(matches!(
        recv(&mut ws).await,
        ServerToClient::Error {
            code: ErrorCode::InvalidToken,
            ..
        }
    ));
    // The new token outlives the first one by 15 s. Every step below stays well
    // inside the 60 s idle timeout, so only token expiry can end the session.
    send(
        &mut ws,
        &ClientToServer::Refresh {
            token: server.token_for(&alice, 20),
        },
    )
    .await;
    assert!(matches!(
        recv(&mut ws).await,
        ServerToClient::Refreshed { expires_in: 20 }
    ));

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(5 + TOKEN_LEEWAY_SECS + 10)).await;
    // Still open: a relay to oneself comes back.
    send(&mut ws, &relay(&alice, serde_json::json!("still here"))).await;
    assert!(matches!(recv(&mut ws).await, ServerToClient::Relay { .. }));
    tokio::time::advance(Duration::from_secs(10)).await;
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!(
        CloseReason::from_close(code, &reason),
        CloseReason::TokenExpired
    );
}

#[tokio::test]
async fn half_open_connections_are_dropped_as_idle() {
    let limits = Limits {
        ping_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let mut b = join(&server, &bob).await;
    // Alice connects, declares bob, then never reads again: she answers no ping.
    let mut a = join(&server, &alice).await;
    watch(&mut a, &[&bob]).await;
    watch(&mut b, &[&alice]).await;
    assert!(matches!(
        recv(&mut b).await,
        ServerToClient::Presence { online: true, .. }
    ));
    // Bob keeps reading (and so answers pings); time runs on by itself.
    tokio::time::pause();
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Presence {
            user: alice,
            online: false
        }
    );
}

#[tokio::test]
async fn a_recipient_that_does_not_read_is_dropped_not_buffered() {
    let limits = Limits {
        queue_bytes: 64 * 1024,
        queue_messages: 8,
        frames_per_sec: 10_000,
        burst: 10_000,
        write_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let mut a = join(&server, &alice).await;
    let _b = join(&server, &bob).await; // never read
    let chunk = "z".repeat(MAX_MESSAGE_BYTES - 100);
    let mut refused = None;
    for _ in 0..2000 {
        send(&mut a, &relay(&bob, serde_json::json!(chunk))).await;
        // Poll for the server's verdict without blocking on it.
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::ZERO, a.next()).await
        {
            refused = Some(ServerToClient::decode(&text).unwrap());
            break;
        }
    }
    let refused = match refused {
        Some(message) => message,
        None => recv(&mut a).await,
    };
    match refused {
        ServerToClient::Error { code, user, .. } => {
            assert_eq!((code, user), (ErrorCode::NoDest, Some(bob.clone())));
        }
        other => panic!("expected ENODEST for a lagging recipient, got {other:?}"),
    }
    // The server carries on.
    join(&server, &bob).await;
}

#[tokio::test]
async fn full_server_answers_503() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let _a = join(&server, &alice).await;
    let token = server.token_for(&bob, 600);
    let (status, body) = upgrade(server.addr, Some(&token), false).await.unwrap_err();
    assert_eq!((status, body.error.as_str()), (503, "ECONNREFUSED"));
}

#[tokio::test]
async fn identity_keys_are_registered_served_and_pinned_until_reset() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let first = random_identity();
    let ws = join_with(&server, &alice, &first).await;
    drop(ws);

    let mut b = join(&server, &bob).await;
    send(
        &mut b,
        &ClientToServer::GetKey {
            id: 7,
            user: alice.clone(),
        },
    )
    .await;
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Key {
            id: 7,
            user: alice.clone(),
            identity_key: Some(IdentityKey::from(first.verifying_key())),
        }
    );
    let nobody = UserName::new("nobody").unwrap();
    send(
        &mut b,
        &ClientToServer::GetKey {
            id: 8,
            user: nobody.clone(),
        },
    )
    .await;
    assert!(matches!(
        recv(&mut b).await,
        ServerToClient::Error {
            code: ErrorCode::BadDest,
            id: Some(8),
            ..
        }
    ));

    // Another key for alice is refused...
    let second = random_identity();
    let token = server.token_for(&alice, 600);
    let mut ws = upgrade(server.addr, Some(&token), false).await.unwrap();
    let hello = ws.hello(&alice, &second);
    send(&mut ws, &hello).await;
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!(
        CloseReason::from_close(code, &reason),
        CloseReason::KeyRefused
    );
    assert!(reason.contains("reset-key"), "{reason}");
    // ...until an administrator resets it (another handle, as `brume server reset-key`).
    Accounts::open(&server.db)
        .unwrap()
        .reset_key(&alice)
        .unwrap();
    join_with(&server, &alice, &second).await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_going_away() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let mut a = join(&server, &alice).await;
    let stopping = tokio::spawn(server.stop());
    let (code, reason) = recv_close(&mut a).await;
    assert_eq!(
        (code, CloseReason::from_close(code, &reason)),
        (1001, CloseReason::Shutdown)
    );
    stopping.await.unwrap();
}

#[tokio::test]
async fn client_library_relays_presence_keys_and_reconnects() {
    let server = TestServer::start().await;
    let (alice, alice_cred) = server.add_user("alice");
    let (bob, bob_cred) = server.add_user("bob");
    let alice_config = server.client_config(&alice, &alice_cred);
    let alice_key = IdentityKey::from(alice_config.identity.verifying_key());
    let (a, mut a_events) = client::connect(alice_config);
    let (b, mut b_events) = client::connect(server.client_config(&bob, &bob_cred));
    within(a.connected()).await.unwrap();
    within(b.connected()).await.unwrap();

    // Presence between two users who declared each other (watch both ways).
    a.watch([bob.clone()]).await.unwrap();
    assert_eq!(
        within(a_events.recv()).await.unwrap(),
        SignalEvent::Presence {
            user: bob.clone(),
            online: false
        },
        "bob has not declared alice yet"
    );
    b.watch([alice.clone()]).await.unwrap();
    assert_eq!(
        within(b_events.recv()).await.unwrap(),
        SignalEvent::Presence {
            user: alice.clone(),
            online: true
        }
    );
    assert_eq!(
        within(a_events.recv()).await.unwrap(),
        SignalEvent::Presence {
            user: bob.clone(),
            online: true
        }
    );
    a.send(&bob, serde_json::json!({"offer": 1})).await.unwrap();
    assert_eq!(
        within(b_events.recv()).await.unwrap(),
        SignalEvent::Message {
            from: alice.clone(),
            payload: serde_json::json!({"offer": 1})
        }
    );
    assert_eq!(
        within(b.identity_key(&alice)).await.unwrap(),
        Some(alice_key)
    );
    let nobody = UserName::new("nobody").unwrap();
    assert!(matches!(
        within(b.identity_key(&nobody)).await,
        Err(ClientError::Refused {
            code: ErrorCode::BadDest,
            ..
        })
    ));
    let huge = serde_json::json!("h".repeat(MAX_MESSAGE_BYTES));
    assert!(matches!(
        a.send(&bob, huge).await,
        Err(ClientError::TooBig { .. })
    ));
    a.send(&nobody, serde_json::json!(0)).await.unwrap();
    assert!(matches!(
        within(a_events.recv()).await.unwrap(),
        SignalEvent::Undeliverable {
            code: ErrorCode::BadDest,
            ..
        }
    ));

    // Alice goes away: bob is told; a message to her is ENODEST.
    drop(a);
    assert_eq!(
        within(b_events.recv()).await.unwrap(),
        SignalEvent::Presence {
            user: alice.clone(),
            online: false
        }
    );
    b.send(&alice, serde_json::json!(0)).await.unwrap();
    assert!(matches!(
        within(b_events.recv()).await.unwrap(),
        SignalEvent::Undeliverable {
            code: ErrorCode::NoDest,
            ..
        }
    ));

    // The server restarts on the same address: bob reconnects by himself and his
    // watch is restored.
    let addr = server.addr;
    let db = server.db.clone();
    let mut status = b.status();
    let _db_dir = stop_keep_dir(server).await;
    within(status.wait_for(|s| s.state != ConnState::Connected))
        .await
        .unwrap();
    let restarted = restart(addr, &db).await;
    within(status.wait_for(|s| s.state == ConnState::Connected && s.connects >= 2))
        .await
        .unwrap();
    assert_eq!(
        within(b_events.recv()).await.unwrap(),
        SignalEvent::Presence {
            user: alice.clone(),
            online: false
        },
        "watch restored after reconnect"
    );
    drop(restarted);
}

/// Stops `server` but keeps its database, returned as the guard of its directory.
async fn stop_keep_dir(mut server: TestServer) -> tempfile::TempDir {
    drop(server.stop.take());
    let task = server.task.take().unwrap();
    tokio::time::timeout(PATIENCE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    std::mem::replace(&mut server._dir, tempfile::tempdir().unwrap())
}

/// A server on `addr` using an existing database; stops when the sender drops.
async fn restart(addr: SocketAddr, db: &std::path::Path) -> oneshot::Sender<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::run(
        listener,
        ServerConfig::new(db.to_owned()),
        async {
            let _ = stopped.await;
        },
    ));
    stop
}

#[tokio::test]
async fn client_watches_more_users_than_fit_in_one_message() {
    let server = TestServer::start().await;
    let (bob, cred) = server.add_user("bob");
    // 600 names of 60 bytes: 36 KB of names, more than one message may carry.
    let many: Vec<UserName> = (0..600)
        .map(|i| server.add_user(&format!("{i:03}{}", "w".repeat(57))).0)
        .collect();
    let (b, mut events) = client::connect(server.client_config(&bob, &cred));
    within(b.connected()).await.unwrap();
    b.watch(many.clone()).await.unwrap();
    let mut told = std::collections::BTreeSet::new();
    while told.len() < many.len() {
        match within(events.recv()).await.unwrap() {
            SignalEvent::Presence {
                user,
                online: false,
            } => {
                told.insert(user);
            }
            other => panic!("expected presence, got {other:?}"),
        }
    }
    assert_eq!(told, many.into_iter().collect());
    assert_eq!(b.status().borrow().connects, 1, "no reconnect on the way");
}

#[tokio::test]
async fn client_reports_econnrefused_503_when_the_server_is_unreachable() {
    // A port nobody listens on: bind one, then close it.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let url = format!("ws://{addr}/");
    let user = UserName::new("alice").unwrap();
    let err = client::fetch_token(&url, None, &user, "cred", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ConnRefused));
    assert!(err.to_string().starts_with("ECONNREFUSED (503)"), "{err}");

    let (handle, _events) = client::connect(ClientConfig {
        server_url: url,
        server_ca: None,
        username: user.clone(),
        credential: "cred".into(),
        identity: random_identity(),
        token_ttl: 60,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    });
    let mut status = handle.status();
    let status = within(status.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .clone();
    assert_eq!(
        status.last_error.unwrap().code,
        Some(ErrorCode::ConnRefused)
    );
    assert!(matches!(
        handle.send(&user, serde_json::json!(0)).await,
        Err(ClientError::NotConnected)
    ));
}

#[tokio::test]
async fn client_refreshes_its_token_before_it_expires() {
    let server = TestServer::start().await;
    let (alice, cred) = server.add_user("alice");
    let config = ClientConfig {
        token_ttl: 1,
        ..server.client_config(&alice, &cred)
    };
    let (a, _events) = client::connect(config);
    within(a.connected()).await.unwrap();
    let mut status = a.status();
    within(status.wait_for(|s| s.refreshes >= 2)).await.unwrap();
    assert_eq!(status.borrow().connects, 1, "refreshed, not reconnected");
    assert_eq!(status.borrow().last_error, None);
}

#[tokio::test]
async fn client_with_a_wrong_credential_says_so() {
    let server = TestServer::start().await;
    let (alice, _) = server.add_user("alice");
    let (a, _events) = client::connect(server.client_config(&alice, "wrong"));
    let mut status = a.status();
    let last = within(status.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert!(last.message.contains("credential refused"), "{last:?}");
}

/// Kills the child process when dropped, even if the test panics.
pub(crate) struct ChildGuard(pub(crate) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn real_binary_serves_add_user_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let bin = env!("CARGO_BIN_EXE_brume");
    let mut server = ChildGuard(
        Command::new(bin)
            .args(["server", "--listen", "127.0.0.1:0", "--db"])
            .arg(&db)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("brume server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();

    // add-user while the server runs; its output is the user's brume.conf.
    let out = Command::new(bin)
        .args(["server", "add-user", "dora", "--db"])
        .arg(&db)
        .args(["--url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let conf_text = String::from_utf8(out.stdout).unwrap();
    let config = Config::parse(&conf_text).unwrap();
    assert_eq!(
        (config.server_url.as_str(), config.username.as_str()),
        (url.as_str(), "dora")
    );
    let conf = dir.path().join("brume.conf");
    config.save(&conf).unwrap();
    // Taken and reserved names are refused.
    for bad in ["dora", ".members"] {
        let out = Command::new(bin)
            .args(["server", "add-user", bad, "--db"])
            .arg(&db)
            .output()
            .unwrap();
        assert!(!out.status.success(), "add-user {bad} accepted");
    }

    // `brume token` prints a token the server accepts at the upgrade.
    let out = Command::new(bin)
        .args(["token", "--ttl", "60", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut ws = upgrade(addr, Some(&token), false).await.unwrap();
        let hello = ws.hello(&UserName::new("dora").unwrap(), &random_identity());
        send(&mut ws, &hello).await;
        assert!(matches!(
            recv(&mut ws).await,
            ServerToClient::Welcome { .. }
        ));
        // SIGTERM: the session is closed as "going away" and the server exits cleanly.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(server.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let (code, _) = recv_close(&mut ws).await;
        assert_eq!(code, 1001);
    });
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn real_binary_serves_wss_and_a_client_trusts_it_through_server_ca() {
    let ca = TestCa::new();
    let (cert, key) = ca.server_files(&["127.0.0.1"], (-1, 30));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let bin = env!("CARGO_BIN_EXE_brume");
    let mut server = ChildGuard(
        Command::new(bin)
            .args(["server", "--listen", "127.0.0.1:0", "--db"])
            .arg(&db)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("brume server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    let out = Command::new(bin)
        .args(["server", "add-user", "dora", "--db"])
        .arg(&db)
        .args(["--url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Without the CA: refused, saying so; with it (a path relative to the
    // config file): a token.
    let conf = dir.path().join("brume.conf");
    std::fs::write(&conf, &out.stdout).unwrap();
    let token = |conf: &std::path::Path| {
        Command::new(bin)
            .args(["token", "--ttl", "60", "--config"])
            .arg(conf)
            .output()
            .unwrap()
    };
    let refused = token(&conf);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("certificate") && err.contains(&url),
        "{refused:?}"
    );
    std::fs::copy(ca.ca_pem(), dir.path().join("ca.pem")).unwrap();
    let mut text = String::from_utf8(out.stdout).unwrap();
    text.insert_str(0, "server_ca = \"ca.pem\"\n");
    std::fs::write(&conf, text).unwrap();
    let ok = token(&conf);
    assert!(ok.status.success(), "{ok:?}");
    assert!(!String::from_utf8_lossy(&ok.stdout).trim().is_empty());
}

#[tokio::test]
async fn wss_with_a_private_ca_serves_tokens_sessions_and_relay() {
    let ca = TestCa::new();
    let server = TestServer::with_tls(ca.server(&["localhost", "127.0.0.1"], (-1, 30))).await;
    assert!(server.url.starts_with("wss://"));
    let (alice, alice_cred) = server.add_user("alice");
    let (bob, bob_cred) = server.add_user("bob");
    // POST /token over https.
    let token = within(client::fetch_token(
        &server.url,
        Some(&ca.ca_pem()),
        &alice,
        &alice_cred,
        None,
    ))
    .await
    .unwrap();
    assert!(!token.token.is_empty());
    // Sessions and relay over wss, by IP address and by name.
    let mut a_config = server.client_config(&alice, &alice_cred);
    a_config.server_ca = Some(ca.ca_pem());
    let mut b_config = server.client_config(&bob, &bob_cred);
    b_config.server_ca = Some(ca.ca_pem());
    b_config.server_url = format!("wss://localhost:{}/", server.addr.port());
    let (a, _a_events) = client::connect(a_config);
    let (b, mut b_events) = client::connect(b_config);
    within(a.connected()).await.unwrap();
    within(b.connected()).await.unwrap();
    a.send(&bob, serde_json::json!({"over": "tls"}))
        .await
        .unwrap();
    assert_eq!(
        within(b_events.recv()).await.unwrap(),
        SignalEvent::Message {
            from: alice.clone(),
            payload: serde_json::json!({"over": "tls"})
        }
    );
    // A plain connection to the TLS listener gets nowhere.
    assert!(
        client::fetch_token(
            &format!("ws://{}/", server.addr),
            None,
            &alice,
            &alice_cred,
            None
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn certificates_the_client_does_not_trust_are_refused_with_the_reason() {
    let ca = TestCa::new();
    let cases: [(
        &str,
        std::sync::Arc<rustls::ServerConfig>,
        Option<PathBuf>,
        &str,
    ); 3] = [
        (
            "not trusted",
            ca.server(&["127.0.0.1"], (-1, 30)),
            None,
            "unknown issuer",
        ),
        (
            "for another name",
            ca.server(&["other.example"], (-1, 30)),
            Some(ca.ca_pem()),
            "another name",
        ),
        (
            "expired",
            ca.server(&["127.0.0.1"], (-30, -1)),
            Some(ca.ca_pem()),
            "expired",
        ),
    ];
    for (case, tls, server_ca, why) in cases {
        let server = TestServer::with_tls(tls).await;
        let (alice, cred) = server.add_user("alice");
        let err = within(client::fetch_token(
            &server.url,
            server_ca.as_deref(),
            &alice,
            &cred,
            None,
        ))
        .await
        .unwrap_err();
        assert!(
            matches!(err, ClientError::Certificate { .. }),
            "{case}: {err:?}"
        );
        // One readable line naming the server, the certificate and the reason,
        // in the client's status too; the client never tries without TLS.
        let mut config = server.client_config(&alice, &cred);
        config.server_ca = server_ca.clone();
        let (handle, _events) = client::connect(config);
        let mut status = handle.status();
        let status = within(status.wait_for(|s| s.last_error.is_some()))
            .await
            .unwrap()
            .clone();
        let message = status.last_error.unwrap().message;
        assert!(
            message.contains(&server.url)
                && message.contains("certificate")
                && message.contains(why),
            "{case}: {message}"
        );
        assert!(!message.contains('\n'), "{case}: {message}");
        assert_ne!(status.state, ConnState::Connected, "{case}");
    }
}

#[tokio::test]
async fn a_tls_handshake_that_never_comes_is_cut_at_the_handshake_deadline() {
    let ca = TestCa::new();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = TestServer::with(limits, Some(ca.server(&["127.0.0.1"], (-1, 30)))).await;
    // Connects and says nothing: the server closes the connection by itself.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = within(tokio::io::AsyncReadExt::read(&mut tcp, &mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn the_server_hands_out_ice_servers_with_turn_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = ServerConfig::new(db.clone());
    config.ice = vec![
        "stun:stun.example:3478".into(),
        "turn:turn.example:3478".into(),
    ];
    config.turn_secret = Some(b"k".to_vec());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(listener, config, async {
        let _ = stopped.await;
    }));
    let accounts = Accounts::open(&db).unwrap();
    let alice = UserName::new("alice").unwrap();
    let credential = accounts.add_user(&alice).unwrap();
    let (client, _events) = client::connect(ClientConfig {
        server_url: format!("ws://{addr}/"),
        server_ca: None,
        username: alice.clone(),
        credential,
        identity: random_identity(),
        token_ttl: 600,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    });
    within(client.connected()).await.unwrap();
    let servers = client.status().borrow().ice_servers.clone();
    assert_eq!(servers.len(), 2, "{servers:?}");
    assert_eq!(servers[0].urls, ["stun:stun.example:3478"]);
    assert_eq!(servers[0].username, None);
    let username = servers[1].username.clone().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "alice");
    let expiry: u64 = expiry.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        expiry > now && expiry <= now + 3600 + 5,
        "{expiry} vs {now}"
    );
    assert_eq!(
        servers[1].credential.as_deref(),
        Some(
            brume::signal::ice::turn_credentials(b"k", &alice, expiry)
                .1
                .as_str()
        )
    );
    drop(client);
    drop(stop);
    within(task).await.unwrap().unwrap();
}
