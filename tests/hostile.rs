//! The signaling server against hostile clients: each test plays an attacker (a
//! stranger or a logged-in user) against a real server and checks that other users
//! keep their sessions, the log stays honest and small, and limits answer clearly.

use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use brume::ids::UserName;
use brume::signal::ErrorCode;
use brume::signal::accounts::Accounts;
use brume::signal::client::{self, ClientError};
use brume::signal::protocol::{
    ClientToServer, IdentityKey, PROTOCOL_VERSION, ServerToClient, hello_proof,
};
use brume::signal::server::Limits;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::signal::{
    ChildGuard, PATIENCE, TestServer, join, key_of, login, recv, relay, send, upgrade, watch,
    within,
};

/// `brume server` on a free loopback port, its log (RUST_LOG=info) going to `log`.
struct RealServer {
    child: ChildGuard,
    url: String,
    addr: SocketAddr,
}

impl RealServer {
    fn start(db: &std::path::Path, log: &std::path::Path, nofile: Option<u64>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_brume"));
        command
            .args(["server", "--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe and only affects the child.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = ChildGuard(command.spawn().unwrap());
        let mut line = String::new();
        std::io::BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("brume server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let addr = url
            .trim_start_matches("ws://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        Self { child, url, addr }
    }

    /// Stops the server (SIGTERM) and waits for it, so its log is complete.
    fn stop(mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = self.child.0.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
}

/// `add-user NAME`, its output written where `out` says; returns the credential.
fn add_user(db: &std::path::Path, url: &str, name: &str, out: &std::path::Path) -> String {
    let status = Command::new(env!("CARGO_BIN_EXE_brume"))
        .args(["server", "add-user", name, "--db"])
        .arg(db)
        .args(["--url", url, "--out"])
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
    brume::config::Config::load(out).unwrap().credential
}

fn token_for(url: &str, user: &UserName, credential: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(client::fetch_token(url, None, user, credential, Some(600)))
        .unwrap()
        .token
}

#[tokio::test]
async fn a_flooding_sender_loses_only_its_own_messages_and_the_recipient_keeps_its_session() {
    let limits = Limits {
        queue_messages: 16,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (mallory, _) = server.add_user("mallory");
    let (bob, _) = server.add_user("bob");
    let (alice, _) = server.add_user("alice");
    let mut m = join(&server, &mallory).await;
    let mut b = join(&server, &bob).await;
    let mut a = join(&server, &alice).await;

    // 200 relays to bob (the whole burst a session may send) in one write.
    let flood = 200;
    for i in 0..flood {
        let frame = relay(&bob, serde_json::json!({ "n": i })).encode().unwrap();
        m.feed(Message::text(frame)).await.unwrap();
    }
    m.flush().await.unwrap();
    // Every message is either delivered to bob or refused to mallory: none is lost
    // silently, and bob is never closed for it.
    let mut refused = 0;
    let mut delivered = 0;
    while refused + delivered < flood {
        tokio::select! {
            message = recv(&mut m) => match message {
                ServerToClient::Error { code, user, .. } => {
                    assert_eq!((code, user.as_ref()), (ErrorCode::NoDest, Some(&bob)));
                    refused += 1;
                }
                other => panic!("mallory got {other:?}"),
            },
            message = recv(&mut b) => match message {
                ServerToClient::Relay { from, .. } => {
                    assert_eq!(from, mallory);
                    delivered += 1;
                }
                other => panic!("bob got {other:?}"),
            },
        }
    }
    assert!(
        refused > 0,
        "a 16-message queue took all {flood} of one sender's messages"
    );
    // Bob's session is still there, and others still reach it.
    send(&mut a, &relay(&bob, serde_json::json!("hello bob"))).await;
    match recv(&mut b).await {
        ServerToClient::Relay { from, payload } => {
            assert_eq!((from, payload), (alice, serde_json::json!("hello bob")));
        }
        other => panic!("bob got {other:?}"),
    }
}

#[test]
fn nothing_from_outside_reaches_the_log_unescaped_and_refusals_are_counted_not_listed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let log = dir.path().join("server.log");
    let server = RealServer::start(&db, &log, None);
    let credential = add_user(&db, &server.url, "erin", &dir.path().join("erin.conf"));
    let erin = UserName::new("erin").unwrap();
    let token = token_for(&server.url, &erin, &credential);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // A stranger's token whose header names an algorithm with a line break and a
        // terminal escape in it.
        let header = URL_SAFE_NO_PAD
            .encode(br#"{"alg":"HS256\nFORGED by a stranger \u001b[31m","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"erin","iat":1,"exp":9999999999}"#);
        let forged = format!("{header}.{claims}.c2ln");
        let (status, body) = upgrade(server.addr, Some(&forged), false)
            .await
            .unwrap_err();
        assert_eq!(status, 406);
        assert!(
            !body.message.contains("FORGED") && !body.message.contains('\u{1b}'),
            "{body:?}"
        );

        // A logged-in user's message of an unknown type, with the same payload.
        let mut ws = login(server.addr, &token, &erin, &key_of(&erin)).await;
        ws.send(Message::text(
            "{\"type\":\"x\\nFORGED by a user \\u001b[0m\"}".to_owned(),
        ))
        .await
        .unwrap();
        let (code, reason) = crate::signal::recv_close(&mut ws).await;
        assert_eq!(code, 4004, "{reason}");
        assert!(
            !reason.contains('\n') && !reason.contains('\u{1b}'),
            "{reason:?}"
        );

        // A client that drops its connection without a close: not a malformed message.
        let ws = login(server.addr, &token, &erin, &key_of(&erin)).await;
        drop(ws.into_inner());

        // 60 wrong credentials: a few log lines, not sixty.
        for _ in 0..60 {
            let err = client::fetch_token(&server.url, None, &erin, "wrong", None)
                .await
                .unwrap_err();
            assert!(
                matches!(err, ClientError::Credential { .. }) || err.to_string().contains("429"),
                "{err}"
            );
        }
    });
    server.stop();
    let mut text = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(!text.contains('\u{1b}'), "an escape byte reached the log");
    for line in text.lines() {
        assert!(!line.starts_with("FORGED"), "forged log line: {line}");
    }
    let malformed = text
        .lines()
        .filter(|l| l.contains("reason=malformed message"))
        .count();
    assert_eq!(malformed, 1, "{text}");
    let token_lines = text
        .lines()
        .filter(|l| l.contains("token requests refused"))
        .count();
    assert!(
        (1..=3).contains(&token_lines),
        "{token_lines} lines: {text}"
    );
}

#[tokio::test]
async fn token_requests_are_limited_per_address_and_wrong_credentials_per_account() {
    let limits = Limits {
        exempt_loopback: false,
        attempts_burst: 12,
        attempts_per_sec: 0.01,
        account_refusals_burst: 3,
        account_refusals_per_sec: 0.01,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (erin, credential) = server.add_user("erin");
    let fetch = |credential: &str| {
        let credential = credential.to_owned();
        let (url, erin) = (server.url.clone(), erin.clone());
        async move { client::fetch_token(&url, None, &erin, &credential, None).await }
    };
    for _ in 0..3 {
        let err = fetch("wrong").await.unwrap_err();
        assert!(matches!(err, ClientError::Credential { .. }), "{err}");
    }
    // The account's allowance for wrong credentials is spent...
    let err = fetch("wrong").await.unwrap_err();
    assert!(err.to_string().contains("429"), "{err}");
    // ...but the right credential still gets its token: nobody can lock erin out.
    fetch(&credential).await.unwrap();
    // The address's allowance: 12 requests in all, then 429 for anything.
    let mut refused_at = None;
    for i in 5..20 {
        if let Err(err) = fetch(&credential).await {
            assert!(err.to_string().contains("429"), "{err}");
            refused_at = Some(i);
            break;
        }
    }
    assert_eq!(refused_at, Some(12));
}

/// Opens a TCP connection to `addr` from `from` (a loopback address).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Whether the server closed `tcp` (EOF or reset) within `wait`.
async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, tcp.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn idle_connections_from_one_address_cannot_keep_others_out() {
    let limits = Limits {
        exempt_loopback: false,
        unauthenticated_per_address: 8,
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (bob, _) = server.add_user("bob");
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(connect_from("127.0.0.2", server.addr).await);
    }
    // The ninth from that address is closed at once...
    let mut ninth = connect_from("127.0.0.2", server.addr).await;
    assert!(closed_within(&mut ninth, Duration::from_millis(500)).await);
    // ...while another address logs in.
    let mut b = join(&server, &bob).await;
    // The idle ones are cut at the handshake deadline; the address may connect again.
    for tcp in &mut idle {
        assert!(closed_within(tcp, PATIENCE).await);
    }
    // Served again: a request gets its answer (426: only WebSocket upgrades at /).
    let mut again = connect_from("127.0.0.2", server.addr).await;
    tokio::io::AsyncWriteExt::write_all(&mut again, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    within(again.read_exact(&mut answer)).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 426");
    send(&mut b, &relay(&bob, serde_json::json!("still here"))).await;
    assert!(matches!(recv(&mut b).await, ServerToClient::Relay { .. }));
}

#[tokio::test]
async fn one_account_cannot_hold_more_than_its_sessions() {
    let limits = Limits {
        sessions_per_account: 2,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (mallory, _) = server.add_user("mallory");
    let (bob, _) = server.add_user("bob");
    let token = server.token_for(&mallory, 600);
    // Upgraded, never saying hello.
    let _first = upgrade(server.addr, Some(&token), false).await.unwrap();
    let _second = upgrade(server.addr, Some(&token), false).await.unwrap();
    let (status, body) = upgrade(server.addr, Some(&token), false).await.unwrap_err();
    assert_eq!((status, body.error.as_str()), (429, "too_many_sessions"));
    // Others are not affected.
    within(join(&server, &bob)).await;
}

#[test]
fn sessions_are_capped_by_the_open_file_limit_with_a_503_not_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let log = dir.path().join("server.log");
    // 256 descriptors: 64 kept back, a quarter of the rest for connections not yet
    // authenticated, 144 sessions.
    let sessions = 144;
    let users: Vec<UserName> = (0..sessions + 1)
        .map(|i| UserName::new(&format!("u{i:03}")).unwrap())
        .collect();
    let key = {
        let accounts = Accounts::open(&db).unwrap();
        for user in &users {
            accounts.add_user(user).unwrap();
        }
        accounts.token_key().unwrap()
    };
    let server = RealServer::start(&db, &log, Some(256));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut open = Vec::new();
        for user in &users[..sessions] {
            let token = key.mint(user, now, now + 600).unwrap();
            open.push(login(server.addr, &token, user, &key_of(user)).await);
        }
        let last = &users[sessions];
        let token = key.mint(last, now, now + 600).unwrap();
        let (status, body) = upgrade(server.addr, Some(&token), false).await.unwrap_err();
        assert_eq!((status, body.error.as_str()), (503, "ECONNREFUSED"));
        // One leaves: the next one gets in.
        drop(open.pop());
        let mut admitted = None;
        let started = Instant::now();
        while admitted.is_none() && started.elapsed() < PATIENCE {
            match upgrade(server.addr, Some(&token), false).await {
                Ok(ws) => admitted = Some(ws),
                Err((503, _)) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(admitted.is_some(), "a freed session slot was not reused");
    });
    server.stop();
}

#[test]
fn add_user_never_leaves_the_credential_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let bin = env!("CARGO_BIN_EXE_brume");
    // --out PATH, even over an existing world-readable file.
    let out = dir.path().join("ann.conf");
    std::fs::write(&out, "old").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    add_user(&db, "ws://127.0.0.1:8787/", "ann", &out);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // `add-user NAME > FILE` with the usual umask.
    let redirected = dir.path().join("ben.conf");
    let file = std::fs::File::create(&redirected).unwrap();
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .unwrap();
    let status = Command::new(bin)
        .args(["server", "add-user", "ben", "--db"])
        .arg(&db)
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success());
    let mode = std::fs::metadata(&redirected).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let config = brume::config::Config::load(&redirected).unwrap();
    assert_eq!(config.username.as_str(), "ben");
}

#[tokio::test]
async fn revoked_tokens_end_sessions_and_are_refused_until_the_credential_is_used() {
    let server = TestServer::start().await;
    let (alice, credential) = server.add_user("alice");
    let (bob, _) = server.add_user("bob");
    let old = server.token_for(&alice, 600);
    let mut a = join(&server, &alice).await;
    let mut b = join(&server, &bob).await;
    // `brume server revoke-tokens alice` from another process: the same database.
    let revoker = Accounts::open(&server.db).unwrap();
    revoker.revoke_tokens(&alice).unwrap();
    let (code, reason) = crate::signal::recv_close(&mut a).await;
    assert_eq!(code, 4008, "{reason}");
    // The token from before is refused at the upgrade (401: fetch a new one)...
    let (status, _) = upgrade(server.addr, Some(&old), false).await.unwrap_err();
    assert_eq!(status, 401);
    // ...and in a refresh by someone else's session is no better: bob is untouched.
    send(&mut b, &relay(&bob, serde_json::json!("ping"))).await;
    assert!(matches!(recv(&mut b).await, ServerToClient::Relay { .. }));
    // The credential gets a token of the new generation, which works.
    let fresh = client::fetch_token(&server.url, None, &alice, &credential, Some(600))
        .await
        .unwrap();
    let mut ws = login(server.addr, &fresh.token, &alice, &key_of(&alice)).await;
    // A refresh with a revoked token is refused too.
    send(&mut ws, &ClientToServer::Refresh { token: old }).await;
    match recv(&mut ws).await {
        ServerToClient::Error { code, .. } => assert_eq!(code, ErrorCode::TokenExpired),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_must_prove_the_key_and_a_key_belongs_to_one_account() {
    let server = TestServer::start().await;
    let (mallory, _) = server.add_user("mallory");
    let (bob, _) = server.add_user("bob");
    join(&server, &bob).await;
    let token = server.token_for(&mallory, 600);
    let refused = |hello: ClientToServer| {
        let token = token.clone();
        let addr = server.addr;
        async move {
            let mut ws = upgrade(addr, Some(&token), false).await.unwrap();
            let hello = match hello {
                ClientToServer::Hello { proof: Some(p), .. } if p == "ANSWER" => ws.hello(
                    &UserName::new("mallory").unwrap(),
                    &key_of(&UserName::new("bob").unwrap()),
                ),
                other => other,
            };
            send(&mut ws, &hello).await;
            crate::signal::recv_close(&mut ws).await.0
        }
    };
    let mallory_key = IdentityKey::from(key_of(&mallory).verifying_key());
    // No proof, or a proof made for another challenge: refused.
    let no_proof = ClientToServer::Hello {
        version: PROTOCOL_VERSION,
        identity_key: mallory_key,
        proof: None,
    };
    assert_eq!(refused(no_proof).await, 4002);
    let replayed = ClientToServer::Hello {
        version: PROTOCOL_VERSION,
        identity_key: mallory_key,
        proof: Some(hello_proof(
            &key_of(&mallory),
            "another challenge",
            &mallory,
        )),
    };
    assert_eq!(refused(replayed).await, 4002);
    // bob's key, even with a valid proof (mallory copied bob's private key): taken.
    let bobs = ClientToServer::Hello {
        version: PROTOCOL_VERSION,
        identity_key: IdentityKey::from(key_of(&bob).verifying_key()),
        proof: Some("ANSWER".into()),
    };
    assert_eq!(refused(bobs).await, 4002);
    // Mallory's own key with its proof is fine, and was not registered before.
    join(&server, &mallory).await;
}

#[tokio::test]
async fn presence_and_names_cannot_be_harvested() {
    let server = TestServer::start().await;
    let (mallory, _) = server.add_user("mallory");
    let (alice, _) = server.add_user("alice");
    let mut a = join(&server, &alice).await;
    let mut m = join(&server, &mallory).await;
    // Alice is online, but has not declared mallory: shown offline.
    watch(&mut m, &[&alice]).await;
    assert_eq!(
        recv(&mut m).await,
        ServerToClient::Presence {
            user: alice.clone(),
            online: false
        }
    );
    // And alice hears nothing of mallory.
    send(&mut a, &relay(&alice, serde_json::json!("marker"))).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Relay { .. }));
    // Thousands of names in a few messages: the lookups run out and the session is
    // closed (4005) long before the list does.
    let mut answers = 0;
    let mut closed = None;
    'outer: for chunk in 0..10 {
        let users = (0..520)
            .map(|i| UserName::new(&format!("guess{chunk}x{i}")).unwrap())
            .collect();
        send(&mut m, &ClientToServer::Watch { users }).await;
        loop {
            match tokio::time::timeout(Duration::from_millis(200), m.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => answers += 1,
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    closed = Some(u16::from(frame.code));
                    break 'outer;
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("{other:?}"),
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, Some(4005), "after {answers} answers");
    assert!(answers < 1_400, "{answers} names answered");
}

/// A real owner's mount declares the members of its groups, so a member sees the owner
/// come online (and dials it at once) though it declared only the owner.
#[test]
fn an_owners_mount_declares_its_members() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let log = dir.path().join("server.log");
    let server = RealServer::start(&db, &log, None);
    let mut alice = crate::harness::Client::new("alice");
    add_user(&db, &server.url, "alice", &alice.config);
    let carol_credential = add_user(&db, &server.url, "carol", &dir.path().join("carol.conf"));
    let (alice_name, carol) = (
        UserName::new("alice").unwrap(),
        UserName::new("carol").unwrap(),
    );
    let token = token_for(&server.url, &carol, &carol_credential);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut c = login(server.addr, &token, &carol, &key_of(&carol)).await;
        watch(&mut c, &[&alice_name]).await;
        assert_eq!(
            recv(&mut c).await,
            ServerToClient::Presence {
                user: alice_name.clone(),
                online: false
            }
        );
        // Alice mounts and shares a group with carol: carol is told she is online.
        alice.mount();
        std::fs::create_dir(alice.mnt.join("alice/g")).unwrap();
        std::fs::write(alice.mnt.join("alice/g/.members"), b"carol\n").unwrap();
        assert_eq!(
            within(recv(&mut c)).await,
            ServerToClient::Presence {
                user: alice_name.clone(),
                online: true
            }
        );
    });
    alice.unmount();
    server.stop();
}
